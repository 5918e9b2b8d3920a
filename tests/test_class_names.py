"""The viewer and the overlays show the folder's own class names for labels and the model's class names for
predictions (issue 22, item 4): folders cat/ and dog/ are not 'airplane' and 'automobile'."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from siftlens.analysis import analyze
from siftlens.models.native import NativeBackend
from siftlens.models.vit import ViT, ViTConfig

MODEL_CLASSES = ["airplane", "automobile"]


def test_labels_are_folder_names_and_predictions_are_model_names(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            img = np.full((48, 64, 3), 90, np.uint8)
            for _ in range(6):
                y, x = rng.integers(0, 42), rng.integers(0, 58)
                img[y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = rng.integers(150, 255)
            Image.fromarray(img).save(tmp_path / "imgs" / cls / f"{i}.png")
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=(24, 32), patch_size=8, dim=32, depth=2, heads=2, num_classes=2,
                          class_names=tuple(MODEL_CLASSES))).eval()
    res = analyze(NativeBackend(model), tmp_path / "imgs", n_boot=20, progress=False, explore=4, overlays=4)
    assert res.explore and res.overlays
    for rec in res.explore + res.overlays:
        folder = str(rec["name"]).replace("\\\\", "/").split("/")[-2]
        assert rec["label"] == folder, (rec["name"], rec["label"])
        assert rec["prediction"] in MODEL_CLASSES
