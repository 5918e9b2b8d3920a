"""Shared fixtures. Data from ../shared/data is optional: tests that need it skip with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_ZIP = SHARED_DATA / "cifar10-jpg.zip"
IMAGENET_ZIP = SHARED_DATA / "imagenet-samples-dev.zip"


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"real CIFAR-10 data not present at {CIFAR_ZIP}")
    return CIFAR_ZIP


@pytest.fixture(scope="session")
def imagenet_zip() -> Path:
    if not IMAGENET_ZIP.is_file():
        pytest.skip(f"real ImageNet sample photos not present at {IMAGENET_ZIP}")
    return IMAGENET_ZIP


@pytest.fixture
def tiny_vit():
    """A random, small native ViT (non-square input, CLS + 1 register) for fast tests."""
    from siftlens.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    return ViT(ViTConfig(img_size=(24, 32), patch_size=8, dim=32, depth=2, heads=4, num_registers=1,
                         num_classes=5)).eval()


@pytest.fixture
def eager_reductions(monkeypatch):
    """The attention reductions on their eager PyTorch path, without the fused CPU kernel."""
    from siftlens.core import fused

    monkeypatch.setenv("SIFTLENS_FUSED", "0")
    fused._load.cache_clear()
    yield
    fused._load.cache_clear()  # before monkeypatch restores the environment: the next test loads afresh
