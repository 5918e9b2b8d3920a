"""Training images: an ImageFolder (folder, zip, or a folder inside a zip) decoded once into memory at
the model's input size, its per-channel statistics, and normalisation of uint8 batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import ImageSource, load_labelled_array
from ..errors import ConfigError


@dataclass
class Labelled:
    """Decoded images ``x: (M, H, W, 3) uint8`` with labels ``y: (M,) int64`` indexing ``classes``, and the
    reasons of the images skipped while decoding."""

    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    skipped: list[str]


def _source(spec: str, limit: int | None) -> ImageSource:
    src = ImageSource(spec, limit=limit)
    if src.classes is None:
        raise ConfigError(f"{spec} is not in ImageFolder layout (root/<class>/<image>)")
    return src


def _decode(src: ImageSource, size: tuple[int, int], pb, what: str) -> Labelled:
    task = pb.add_task(f"decode {what}", total=len(src), info="")
    x, y, skipped = load_labelled_array(src, size, progress=lambda n: pb.advance(task, n))
    return Labelled(list(src.classes), x, y, skipped)


def load_train_val(train: str, val: str | None, size: tuple[int, int], limits: tuple[int | None, int | None],
                   pb) -> tuple[Labelled, Labelled | None]:
    """Decode ``train`` and, if given, ``val`` (which must have the same class folders) at ``size`` = (H, W).

    ``limits``: at most this many (train, val) images; ``pb``: a :func:`siftlens.progress.progress_bar`.
    """
    src = _source(train, limits[0])
    tr = _decode(src, size, pb, "train")
    if not val:
        return tr, None
    vsrc = _source(val, limits[1])
    if vsrc.classes != src.classes:
        raise ConfigError(f"class folders of {val} differ from those of {train}")
    return tr, _decode(vsrc, size, pb, "val")


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (M, H, W, 3), in [0, 1] units."""
    flat = x.reshape(-1, 3)
    mean = tuple(float(m) for m in (flat.mean(0) / 255.0))
    std = tuple(float(s) for s in (flat.std(0) / 255.0))
    return mean, std


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised."""
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
