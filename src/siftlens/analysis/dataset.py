"""Decoding and SIFT in a DataLoader: each item is one image on exactly the pixels the model sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from ..data import ImageSource
from ..errors import SkipImage
from ..keypoints import SiftParams, keypoint_map
from ..models import Backend
from .config import AnalysisConfig


class KeypointDataset(Dataset):
    """Images ``indices`` of ``source``: decode, preprocess with the model's own transform, detect SIFT.

    An item is a dict with ``index``, ``pixels`` (H, W, 3) uint8, ``weights`` (N,) float32, ``levels``
    (N,) int, ``xy`` (k, 2), ``size`` (k,); a bad image yields ``{"index", "skip": reason}`` instead.
    """

    def __init__(self, source: ImageSource, backend: Backend, cfg: AnalysisConfig, sift: SiftParams,
                 indices: Sequence[int] | None = None):
        self.source = source
        self.preprocess = backend.preprocess
        self.patch = backend.patch_size
        self.grid = tuple(backend.grid_size)
        self.cfg = cfg
        self.sift = sift
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        try:
            img = self.source.load(i, max_pixels=self.cfg.max_pixels)
            if min(img.size) < self.patch:
                raise SkipImage(f"image smaller than one {self.patch}-pixel patch ({img.size[0]}x{img.size[1]})")
            pixels = self.preprocess(img)
            km = keypoint_map(pixels, self.patch, self.grid, self.cfg.scheme, self.cfg.n_levels, self.sift,
                              thresholds=self.cfg.thresholds)
        except SkipImage as e:
            return {"index": i, "skip": e.reason}
        return {"index": i, "pixels": pixels, "weights": km.weights.astype(np.float32),
                "levels": km.levels, "xy": km.keypoints.xy, "size": km.keypoints.size}


def _collate(items: list[dict]) -> list[dict]:
    return items


def make_loader(dataset: Dataset, cfg: AnalysisConfig) -> DataLoader:
    """``cfg.batch_size`` images per batch, decoded by ``cfg.workers`` worker processes, in order."""
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate,
                      persistent_workers=False, prefetch_factor=4 if cfg.workers else None)


@contextlib.contextmanager
def one_cv2_thread_per_worker(workers: int) -> Iterator[None]:
    """With worker processes, make OpenCV single-threaded for the block: the workers are the parallelism
    (each would otherwise start a SIFT thread per core). Set in this process before the workers fork, and
    restored after: calling ``cv2.setNumThreads`` inside a forked worker can hang on the parent's pool."""
    if not workers:
        yield
        return
    import cv2

    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)
