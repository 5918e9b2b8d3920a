"""Non-finite attention is an error for that image (issue 22, item 3): skipped, counted, listed with the
reason; the other images of its batch are measured as if it were not there."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from PIL import Image

from siftlens.analysis import analyze
from siftlens.models.native import NativeBackend
from siftlens.models.vit import ViT, ViTConfig

POISONED = "a/2.png"


class NaNForMarkedImages(torch.nn.Module):
    """An attention probe that turns the attention of the marked images of the batch into NaN."""

    def __init__(self):
        super().__init__()
        self.marked = torch.zeros(0, dtype=torch.bool)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return torch.where(self.marked[:, None, None, None], torch.nan, attn)


def poisoned_model(poison: bool) -> ViT:
    """A small ViT whose layer-1 attention is NaN for images whose top-left pixel is white."""
    torch.manual_seed(0)
    m = ViT(ViTConfig(img_size=(24, 32), patch_size=8, dim=32, depth=2, heads=2, num_classes=2)).eval()
    if poison:
        probe = NaNForMarkedImages()
        m.blocks[1].attn.probe = probe
        m.register_forward_pre_hook(lambda _m, args: setattr(probe, "marked", args[0][:, 0, 0, 0] > 1.5))
    return m


def make_images(root):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            img = np.full((48, 64, 3), 90, np.uint8)
            for _ in range(6):
                y, x = rng.integers(4, 42), rng.integers(4, 58)
                img[y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = rng.integers(150, 255)
            img[:4, :4] = 255 if f"{cls}/{i}.png" == POISONED else 90
            Image.fromarray(img).save(root / cls / f"{i}.png")


def test_an_image_with_nan_attention_is_skipped_counted_and_listed(tmp_path):
    make_images(tmp_path / "imgs")
    clean = analyze(NativeBackend(poisoned_model(False)), tmp_path / "imgs", out=tmp_path / "clean", n_boot=20,
                    progress=False, batch_size=6)
    res = analyze(NativeBackend(poisoned_model(True)), tmp_path / "imgs", out=tmp_path / "out", n_boot=20,
                  progress=False, batch_size=6)
    images = pd.read_csv(tmp_path / "out" / "images.csv", keep_default_na=False)
    bad = images[images["status"] == "skipped"]
    assert len(bad) == 1 and bad["name"].iloc[0].endswith("2.png") and "a" in bad["name"].iloc[0]
    assert bad["reason"].iloc[0] == "non-finite attention in layer 1"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert json.dumps(manifest).count("non-finite attention in layer 1") >= 1
    counts = manifest.get("counts", manifest.get("images", {}))
    assert counts.get("skipped") == 1, counts
    long = res.long
    assert not long["image"].astype(str).str.endswith(bad["name"].iloc[0]).any()
    assert long["value"].notna().all()
    s = res.summary
    assert (s["n"] == 5).all() and s["mean"].notna().all()
    # the other five images of the batch: the numbers of a run without the poisoned layer
    keep = clean.long[~clean.long["image"].astype(str).str.endswith(bad["name"].iloc[0])]
    cols = ["image", "layer", "head", "metric", "level_a", "level_b"]
    merged = keep.merge(long, on=cols, suffixes=("", "_p"))
    assert len(merged) == len(keep) == len(long)
    np.testing.assert_allclose(merged["value"], merged["value_p"], rtol=1e-5, atol=1e-6)


def test_every_kind_of_non_finite_entry_is_found_in_its_first_layer():
    """One NaN, one +inf, or a +inf and a -inf together anywhere in an image's attention mark that image at the
    first layer where they occur; finite images stay clean."""
    from siftlens.analysis.engine import NonFiniteLayers

    torch.manual_seed(0)
    found = NonFiniteLayers(4, "cpu")
    for layer in range(3):
        attn = torch.softmax(torch.randn(4, 2, 5, 5), -1)
        if layer == 1:
            attn[0, 1, 3, 2] = float("nan")
            attn[1, 0, 4, 4] = float("inf")
        if layer == 2:
            attn[0, 0, 0, 0] = float("inf")  # image 0 already marked at layer 1
            attn[2, 1, 0, 1], attn[2, 0, 2, 3] = float("inf"), float("-inf")
        found.check(layer, attn)
    assert found.errors() == {0: "non-finite attention in layer 1", 1: "non-finite attention in layer 1",
                              2: "non-finite attention in layer 2"}
