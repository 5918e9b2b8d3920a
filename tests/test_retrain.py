"""Repair at training time (``siftlens retrain``): training with a given token drop never sees the dropped patches'
pixels, crops and flips included; a drop that names nothing is plain training, bit for bit; the retrained folder
carries the drop it was trained with, and a discovery that flagged nothing gives the plain model with no drop."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from siftlens.errors import ConfigError
from siftlens.models import load_backend
from siftlens.models.vit import ViT, ViTConfig, load_vit, save_vit
from siftlens.options import build
from siftlens.shortcuts import DiscoveryConfig, RetrainConfig, discover, retrain
from siftlens.shortcuts.artefact import SIDECAR
from siftlens.shortcuts.dropping import DroppedBackend
from siftlens.training import TrainConfig, train
from siftlens.training.augment import AugParams, augment_patch_mask

REGION = (slice(0, 8), slice(0, 8))  # the pixels of patches (0, 0), (0, 1), (1, 0), (1, 1) of a 16x16 image


def two_class_folder(root, fill_region: int | None = None, n: int = 12) -> None:
    """Two classes told apart by a bright bar low in the image; with ``fill_region`` the top-left 8x8 pixels of every
    image are random noise drawn from that seed (the rest of the pixels never change)."""
    rng = np.random.default_rng(0)
    other = np.random.default_rng(fill_region) if fill_region is not None else None
    for c, cls in enumerate(("left", "right")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            img[10:14, 1 + 8 * c : 7 + 8 * c] = 250
            if other is not None:
                img[REGION] = other.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / cls / f"{i:03d}.png")


def start_model(path) -> str:
    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(img_size=(16, 16), patch_size=4, dim=16, depth=1, heads=2, num_classes=2,
                           class_names=["left", "right"], mean=(0.5,) * 3, std=(0.25,) * 3)), path)
    return str(path)


def tc(**kw) -> TrainConfig:
    return build(TrainConfig, {**dict(epochs=2, batch_size=8, lr=3e-3, warmup_epochs=0.5, pad=2, seed=3), **kw})


def top_left(model, x: torch.Tensor) -> torch.Tensor:
    """The region's four patches, in every image: (B, 16) bool."""
    drop = torch.zeros(len(x), 4, 4, dtype=torch.bool)
    drop[:, :2, :2] = True
    return drop.view(len(x), 16)


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_the_patch_mask_moves_with_the_crop_and_the_flip():
    """pad 4 = one patch: offset 0 moves the image one patch down and right, offset 4 keeps it, offset 2 spreads a
    patch over four; the flip mirrors the columns."""
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, 0, 0] = True
    aug = AugParams(dy=torch.tensor([0, 4, 2]), dx=torch.tensor([0, 4, 2]), flip=torch.tensor([False, True, False]))
    out = augment_patch_mask(mask, aug, pad=4, patch=4)
    assert out[0].nonzero().tolist() == [[1, 1]]
    assert out[1].nonzero().tolist() == [[0, 3]]
    assert out[2].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_training_never_sees_the_dropped_pixels_and_an_empty_drop_changes_nothing(tmp_path):
    """Two folders that differ only inside the region: with the region's patches dropped (moved with every crop and
    flip) the two trainings are identical to the bit; without the drop they differ (the premise). A drop that names
    no patch trains exactly as no drop."""
    two_class_folder(tmp_path / "a", fill_region=1)
    two_class_folder(tmp_path / "b", fill_region=2)
    start = start_model(tmp_path / "start")
    dropped = [weights(train(start, str(tmp_path / d), tc(), progress=False, token_drop=top_left)) for d in "ab"]
    for k in dropped[0]:
        torch.testing.assert_close(dropped[0][k], dropped[1][k], rtol=0, atol=0)
    plain = [weights(train(start, str(tmp_path / d), tc(), progress=False)) for d in "ab"]
    assert any(not torch.equal(plain[0][k], plain[1][k]) for k in plain[0])
    nothing = weights(train(start, str(tmp_path / "a"), tc(), progress=False,
                            token_drop=lambda m, x: torch.zeros(len(x), 16, dtype=torch.bool)))
    for k in nothing:
        torch.testing.assert_close(nothing[k], plain[0][k], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="keep-rate"):
        train(start, str(tmp_path / "a"), tc(keep_rate=0.5), progress=False, token_drop=top_left)


def test_the_drop_is_asked_once_per_image_whatever_the_epochs(tmp_path):
    """The images are the same every epoch, so the drop (SIFT, in ``retrain``) is asked once per training image and
    once per validation image, before the first epoch: three epochs ask it no more than one, and train the same
    weights as a drop asked again every epoch would (the asked masks are those of the images it was given)."""
    two_class_folder(tmp_path / "a", fill_region=1)
    start = start_model(tmp_path / "start")
    asked = []

    def counting(model, x):
        asked.append(len(x))
        return top_left(model, x)

    for epochs in (1, 3):
        asked.clear()
        train(start, str(tmp_path / "a"), tc(epochs=epochs, val=str(tmp_path / "a")), progress=False,
              token_drop=counting)
        assert sum(asked) == 24 + 24  # 24 training images and the same 24 as validation, each asked once


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A random tiny ViT (32x32, patch 4), two classes with a glyph marker each (a third of the images carry the other
    class's), and its discovery (nothing flagged: a random model relies on nothing)."""
    from siftlens.benchmarks.spurious_cifar import glyph

    root = tmp_path_factory.mktemp("retrain")
    torch.manual_seed(0)
    save_vit(ViT(ViTConfig(img_size=(32, 32), patch_size=4, dim=32, depth=2, heads=2, num_classes=2,
                           class_names=["a", "b"])).eval(), root / "model")
    rng = np.random.default_rng(0)
    for c, g, other in (("a", "checker", "ring"), ("b", "ring", "checker")):
        (root / "data" / c).mkdir(parents=True)
        for i in range(12):
            img = np.clip(rng.integers(90, 160, 3)[None, None] + rng.integers(-8, 9, (32, 32, 3)), 0, 255)
            img = img.astype(np.uint8)
            x0, y0 = (int(v) for v in rng.integers(0, 25, 2))
            img[y0 : y0 + 8, x0 : x0 + 8] = glyph(g if i % 3 != 2 else other)
            Image.fromarray(img).save(root / "data" / c / f"{i}.png")
    dc = DiscoveryConfig(vocab_size=8, min_images=1, causal_top=2, causal_images=2, gallery=0)
    discover(str(root / "model"), str(root / "data"), dc, progress=False).save(root / "disc")
    return root


def test_the_retrained_folder_carries_the_drop_it_was_trained_with(marked, tmp_path):
    """Every ranked candidate dropped (``flagged_only`` off): the record names the words and the share of images with
    a flagged patch; the folder loads as a DroppedBackend with those words, and its logits are the network's with
    that rule's patches removed."""
    from siftlens.shortcuts.interventions import forward_drop

    cfg = build(RetrainConfig, dict(candidates=str(marked / "disc"), flagged_only=False, top_words=2, dilate=1,
                                    epochs=1, batch_size=8, pad=0, seed=1))
    res = retrain(str(marked / "model"), str(marked / "data"), cfg, progress=False)
    assert res.record["words"] and 0 < res.record["flagged_share"] <= 1
    paths = res.save(tmp_path / "r")
    assert (paths["model"] / SIDECAR).exists()
    be = load_backend(paths["model"])
    assert isinstance(be, DroppedBackend) and be.rule.words == set(res.record["words"])
    x = torch.rand(6, 3, 32, 32)
    drop = be.rule.patches(be.inner, x)
    assert drop.any()
    with torch.no_grad():
        torch.testing.assert_close(be.forward(x), forward_drop(be.inner, x, drop, "group"))
    assert json.loads((tmp_path / "r" / "retrain.json").read_text())["label_free"] is True


def test_retrain_with_nothing_flagged_is_plain_training_with_no_drop(marked, tmp_path):
    """Discovery flagged nothing: the CLI says so, and the model is what `siftlens train` gives with the same recipe,
    with no drop in its folder."""
    common = ["--model", str(marked / "model"), "--epochs", "1", "--batch-size", "8", "--seed", "1", "--no-progress"]
    # the same torch threads as the training below (conftest's), whatever OMP_NUM_THREADS and the cores say: the sums
    # of a step differ in the last bits with the thread count
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "retrain", "--images", str(marked / "data"),
                        "--candidates", str(marked / "disc"), "--out", str(tmp_path / "r"), *common,
                        "--threads", str(torch.get_num_threads())],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "no shortcut found" in r.stdout
    assert not (tmp_path / "r" / "model" / SIDECAR).exists()
    assert not isinstance(load_backend(tmp_path / "r" / "model"), DroppedBackend)
    plain = train(str(marked / "model"), str(marked / "data"), build(TrainConfig, dict(epochs=1, batch_size=8, seed=1)),
                  progress=False)
    got = load_vit(tmp_path / "r" / "model").state_dict()
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_the_drop_keeps_the_model_in_training_mode(marked, monkeypatch):
    """The drop builds a Backend of the model in training (a Backend puts its model in eval mode): every training
    step still runs in training mode."""
    modes = []
    forward = ViT.forward

    def spy(self, x, keep_idx=None, *a, **kw):
        if torch.is_grad_enabled():
            modes.append(self.training)
        return forward(self, x, keep_idx, *a, **kw)

    monkeypatch.setattr(ViT, "forward", spy)
    cfg = build(RetrainConfig, dict(candidates=str(marked / "disc"), flagged_only=False, top_words=2, epochs=1,
                                    batch_size=8, seed=1))
    retrain(str(marked / "model"), str(marked / "data"), cfg, progress=False)
    assert modes and all(modes)
