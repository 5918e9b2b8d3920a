"""Keypoints that follow the augmentation: the keypoint map follows every crop and flip exactly.

SIFT runs once on the cached original images (:class:`KeypointBank`: per image, keypoint centres
``xy`` and sizes, in model-input pixels, pixel centres at integers). Every training batch draws one
random crop (with zero padding) and one horizontal flip per image
(:func:`siftlens.training.augment.draw_augment`, the draws supervised training makes too), applies them
to the pixels (:func:`siftlens.training.augment.apply_augment`) *and* to the cached keypoints
(:func:`transform_keypoints`), and rebuilds the patch weight map from the moved keypoints
(:func:`patch_counts`, the ``count`` scheme of :func:`siftlens.keypoints.weight_map`, vectorised over
the batch).

Geometry of a crop with padding ``pad`` and offsets ``(dy, dx)``: output pixel ``(r, c)`` is padded
pixel ``(r + dy, c + dx)``, i.e. original pixel ``(r + dy - pad, c + dx - pad)``; so a keypoint moves
by ``(pad - dx, pad - dy)``. A horizontal flip maps pixel column ``c`` to ``W - 1 - c`` and a
keypoint ``x`` to ``W - 1 - x``. Keypoints whose moved centre leaves the image ``[-0.5, W - 0.5) x
[-0.5, H - 0.5)`` are dropped: they are not visible in the augmented image.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..devices import DistInfo, barrier
from ..errors import ConfigError
from ..io import atomic_path
from ..keypoints import SiftParams, detect
from .augment import AugParams


def transform_keypoints(xy: torch.Tensor, valid: torch.Tensor, p: AugParams, pad: int,
                        size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Move keypoints with the crop and flip of ``p``.

    xy: (B, K, 2) float (x, y) pixels; valid: (B, K) bool -> moved xy (B, K, 2), valid (B, K) with the
    keypoints that left the image switched off.
    """
    H, W = size
    xy = xy.clone()
    if p.dy is not None:
        shift = torch.stack([pad - p.dx, pad - p.dy], dim=-1).to(xy)  # (B, 2)
        xy += shift[:, None, :]
    flip = p.flip.to(xy.device)[:, None]
    xy[..., 0] = torch.where(flip, (W - 1) - xy[..., 0], xy[..., 0])
    inside = (xy[..., 0] >= -0.5) & (xy[..., 0] < W - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] < H - 0.5)
    return xy, valid & inside


def patch_counts(xy: torch.Tensor, valid: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Keypoints per patch: (B, K, 2), (B, K) -> (B, g_h * g_w) float32, row-major.

    Same convention as :func:`siftlens.keypoints.patch_index`: column ``floor((x + 0.5) / P)``.
    """
    gh, gw = grid
    col = torch.floor((xy[..., 0] + 0.5) / patch).long().clamp(0, gw - 1)
    row = torch.floor((xy[..., 1] + 0.5) / patch).long().clamp(0, gh - 1)
    out = torch.zeros(xy.shape[0], gh * gw, device=xy.device)
    return out.scatter_add_(1, row * gw + col, valid.to(out.dtype))


@dataclass
class KeypointBank:
    """SIFT keypoints of every cached image, padded to the largest count.

    xy: (M, Kmax, 2) float32 model-input pixels; size: (M, Kmax) float32 keypoint diameters (pixels);
    count: (M,) int64 keypoints of each image (entries past ``count`` are padding). ``fingerprint``
    identifies the images (a hash of their pixels), so a cache is never applied to other images.
    """

    xy: np.ndarray
    size: np.ndarray
    count: np.ndarray
    params: SiftParams
    fingerprint: str

    def __len__(self) -> int:
        return len(self.count)

    def batch(self, idx: torch.Tensor, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """idx: (B,) image indices -> xy (B, Kmax, 2) float32 and valid (B, Kmax) bool."""
        i = idx.cpu().numpy()
        xy = torch.from_numpy(self.xy[i]).to(device)
        valid = torch.arange(self.xy.shape[1])[None, :] < torch.from_numpy(self.count[i])[:, None]
        return xy, valid.to(device)

    @staticmethod
    def detect(images: np.ndarray, params: SiftParams, progress: Callable[[int], None] | None = None,
               workers: int = 0) -> KeypointBank:
        """Run SIFT on uint8 images (M, H, W, 3), exactly as :func:`siftlens.keypoints.detect` does;
        ``workers`` > 1 splits the images over that many processes."""
        if workers > 1 and len(images) >= 2 * workers:
            chunks = np.array_split(np.arange(len(images)), 4 * workers)
            with ProcessPoolExecutor(workers) as pool:
                kps = []
                for part in pool.map(_detect_chunk, (images[c] for c in chunks), [params] * len(chunks)):
                    kps += part
                    if progress is not None:
                        progress(len(part))
        else:
            kps = []
            for img in images:
                kps.append(detect(img, params))
                if progress is not None:
                    progress(1)
        count = np.array([len(k) for k in kps], np.int64)
        kmax = max(int(count.max(initial=0)), 1)
        xy = np.zeros((len(kps), kmax, 2), np.float32)
        size = np.zeros((len(kps), kmax), np.float32)
        for j, k in enumerate(kps):
            xy[j, : len(k)] = k.xy
            size[j, : len(k)] = k.size
        return KeypointBank(xy, size, count, params, fingerprint(images))

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` atomically (with the SIFT parameters, checked by :meth:`load`)."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, xy=self.xy, size=self.size, count=self.count, params=np.array(repr(self.params)),
                     fingerprint=np.array(self.fingerprint))
        return Path(path)

    @staticmethod
    def load(path: str | os.PathLike, params: SiftParams, images: np.ndarray) -> KeypointBank:
        """Read a bank written by :meth:`save`; it must have been made from ``images`` with ``params``."""
        with np.load(path) as z:
            fp = fingerprint(images)
            if str(z["params"]) != repr(params) or str(z["fingerprint"]) != fp:
                raise ConfigError(f"keypoint cache {path} was made with other SIFT parameters or images; "
                                  "delete it or choose another --keypoint-cache")
            return KeypointBank(z["xy"], z["size"], z["count"], params, fp)


def _detect_chunk(images: np.ndarray, params: SiftParams) -> list:
    return [detect(img, params) for img in images]


def fingerprint(images: np.ndarray) -> str:
    """A short hash of a uint8 image array (M, H, W, 3): its shape and every pixel."""
    h = hashlib.blake2b(repr(images.shape).encode(), digest_size=16)
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def cached_keypoints(x: np.ndarray, params: SiftParams, path: str | os.PathLike, dist: DistInfo, pb,
                     workers: int = 0) -> tuple[KeypointBank, float]:
    """SIFT with ``params`` (:func:`siftlens.keypoints.sift_params`) on every training image (M, H, W, 3) uint8
    once, cached at ``path`` (rank 0 detects, in ``workers`` processes when > 1; other ranks wait and read the
    cache). Returns the bank and the seconds it took."""
    path = Path(path)
    t0 = time.time()
    if dist.rank == 0 and not path.exists():
        task = pb.add_task("SIFT", total=len(x), info=f"u = {params.upsample:g}")
        KeypointBank.detect(x, params, progress=lambda n: pb.advance(task, n), workers=workers).save(path)
    barrier(dist)
    return KeypointBank.load(path, params, x), time.time() - t0
