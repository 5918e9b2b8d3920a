"""Decoding and SIFT in a DataLoader: each item is one image on exactly the pixels the model sees.

The one :class:`KeypointDataset` of the project: the analysis reads its weight maps, discovery, prompting and
repair its keypoints with descriptors. One skip rule for all of them: an image that cannot be decoded, is
larger than ``max_pixels`` or smaller than one patch is skipped with its reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import DEFAULT_MAX_PIXELS, ImageSource
from .errors import SkipImage
from .keypoints import SiftParams, descriptor_bytes, detect, keypoint_map
from .models import Backend


class MapSettings(Protocol):
    """What the weight maps of an item need (an :class:`~siftlens.analysis.config.AnalysisConfig` has it)."""

    max_pixels: int
    scheme: str
    n_levels: int
    thresholds: Sequence[float] | None


class Batching(Protocol):
    """What :func:`make_loader` needs of a run's options."""

    batch_size: int
    workers: int


class KeypointDataset(Dataset):
    """Images ``indices`` of ``source``: decode, preprocess with the model's own transform, detect SIFT.

    An item is a dict with ``index``, ``pixels`` (H, W, 3) uint8, ``xy`` (k, 2), ``size`` (k,), ``response`` (k,);
    with ``maps`` also the patch ``weights`` (N,) float32 and ``levels`` (N,) int; with ``descriptors`` also
    ``desc`` (k, 128) uint8; with ``boxes`` (object boxes per image name, in the original image's pixels) also
    ``inside`` (k,) bool, keypoints inside the image's object. A bad image yields ``{"index", "skip": reason}``.
    """

    def __init__(self, source: ImageSource, backend: Backend, maps: MapSettings | None, sift: SiftParams,
                 indices: Sequence[int] | None = None, *, descriptors: bool = False, boxes: dict | None = None):
        self.source = source
        self.preprocess = backend.preprocess
        self.patch = backend.patch_size
        self.grid = tuple(backend.grid_size)
        self.maps = maps
        self.sift = sift
        self.descriptors = descriptors
        self.boxes = boxes
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        m = self.maps
        try:
            img = self.source.load(i, max_pixels=m.max_pixels if m is not None else DEFAULT_MAX_PIXELS)
            if min(img.size) < self.patch:
                raise SkipImage(f"image smaller than one {self.patch}-pixel patch ({img.size[0]}x{img.size[1]})")
            pixels = self.preprocess(img)
            if m is not None:
                km = keypoint_map(pixels, self.patch, self.grid, m.scheme, m.n_levels, self.sift,
                                  thresholds=m.thresholds, descriptors=self.descriptors)
                kp = km.keypoints
            else:
                kp = detect(pixels, self.sift, descriptors=self.descriptors)
        except SkipImage as e:
            return {"index": i, "skip": e.reason}
        item = {"index": i, "pixels": pixels, "xy": kp.xy, "size": kp.size, "response": kp.response}
        if m is not None:
            item.update(weights=km.weights.astype(np.float32), levels=km.levels)
        if self.descriptors:
            item["desc"] = descriptor_bytes(kp.desc)
        if self.boxes is not None:
            item["inside"] = inside_object(img, self.boxes.get(self.source.entries[i].name), self.preprocess, kp.xy)
        return item


def inside_object(img: Image.Image, boxes, preprocess, xy: np.ndarray) -> np.ndarray:
    """Keypoints (K, 2) inside the object boxes given in original-image pixels (all False without boxes)."""
    if not boxes:
        return np.zeros(len(xy), bool)
    if isinstance(boxes[0], (int, float)):
        boxes = [boxes]
    mask = np.zeros((img.height, img.width), np.uint8)
    for b in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 255
    m = preprocess(Image.fromarray(mask).convert("RGB"))[..., 0] > 127
    h, w = m.shape
    cx = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
    cy = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
    return m[cy, cx]


def collate_list(items: list[dict]) -> list[dict]:
    """A batch is the list of its items (images differ in their number of keypoints)."""
    return items


def make_loader(dataset: Dataset, run: Batching) -> DataLoader:
    """``run.batch_size`` images per batch, decoded by ``run.workers`` worker processes, in order. Iterate it
    inside :func:`one_cv2_thread_per_worker` (``run.workers``)."""
    return DataLoader(dataset, batch_size=run.batch_size, num_workers=run.workers, collate_fn=collate_list,
                      persistent_workers=False, prefetch_factor=4 if run.workers else None)


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
