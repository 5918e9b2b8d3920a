"""Batches of the analysis loader, with their pixels on the way to the GPU before they are needed (issue 26 item 2).

The DataLoader's workers decode and run SIFT (``--workers``, by default the free cores when the device is a GPU,
:func:`default_workers`). On CUDA a :class:`Prefetcher` thread takes each batch as it comes, stacks its pixels into
pinned (page-locked) host memory and starts their copy to the GPU with ``non_blocking=True`` on a side stream, up
to ``depth`` batches ahead; the main loop's stream waits for that copy only (an event), so batch k+1's SIFT and
transfer overlap batch k's forward and reductions. On other devices it is the plain loader (nothing staged, no
thread: the CPU path is unchanged).

Either way it records how long the main loop waited for batches (:attr:`Prefetcher.wait_s`): when that exceeds
the time spent analysing them, the job is SIFT-bound and the progress bar says so (:func:`pace_note`).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


def default_workers(device: str | torch.device, world: int = 1) -> int:
    """``--workers`` when not given: 0 on the CPU (SIFT in the main process, whose cores the forward uses); on
    an accelerator the cores this process may run on, shared among the ``world`` ranks of this machine, less one
    for the main loop of each."""
    if torch.device(device).type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores // max(1, world) - 1)


def pace_note(wait_s: float, busy_s: float, batches: int, workers: int) -> str:
    """The progress bar's note: ``"SIFT-bound: add --workers"`` once the main loop has waited for the loader
    (decode + SIFT) longer than it computed, over at least 2 batches; else ""."""
    if batches < 2 or wait_s <= busy_s:
        return ""
    return f"SIFT-bound: add --workers (now {workers}; waited {wait_s:.0f} s for images, computed {busy_s:.0f} s)"


@dataclass
class Batch:
    """One batch of the loader: its ``items`` (good and skipped), and the good items' ``pixels`` (B, H, W, 3) uint8
    already on the device (None: not staged, the engine stacks them itself)."""

    items: list[dict]
    pixels: torch.Tensor | None = None


_END = object()


class Prefetcher:
    """Iterate ``loader`` (batches: lists of item dicts) as :class:`Batch` es; on CUDA ``device`` the pixels of the
    next ``depth`` batches are staged by a background thread (pinned memory, non-blocking copies on a side
    stream). ``wait_s``: seconds the consumer spent waiting for batches so far."""

    def __init__(self, loader: Iterable[list[dict]], device: str | torch.device, depth: int = 2):
        self.loader = loader
        self.device = torch.device(device)
        self.depth = depth
        self.wait_s = 0.0
        self.stage = self.device.type == "cuda" and torch.cuda.is_available()

    def __iter__(self) -> Iterator[Batch]:
        return self._staged() if self.stage else self._plain()

    def _plain(self) -> Iterator[Batch]:
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            items = next(it, _END)
            self.wait_s += time.perf_counter() - t
            if items is _END:
                return
            yield Batch(items)

    def _staged(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        side = torch.cuda.Stream(self.device)

        def put(x) -> bool:
            while not stop.is_set():
                try:
                    q.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for items in self.loader:
                    if stop.is_set():
                        return
                    if not put(self._to_device(items, side)):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - raised again in the consumer
                put(e)

        thread = threading.Thread(target=work, name="siftlens-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                t = time.perf_counter()
                got = q.get()
                self.wait_s += time.perf_counter() - t
                if got is _END:
                    return
                if isinstance(got, BaseException):
                    raise got
                items, pixels, event = got
                if pixels is not None:
                    cur = torch.cuda.current_stream(self.device)
                    cur.wait_event(event)  # the copy, not the host, is waited for
                    pixels.record_stream(cur)
                yield Batch(items, pixels)
        finally:
            stop.set()
            thread.join(timeout=5)

    def _to_device(self, items: list[dict], side) -> tuple:
        good = [it["pixels"] for it in items if "skip" not in it]
        if not good:
            return items, None, None
        host = torch.empty((len(good), *good[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(good, out=host.numpy())
        with torch.cuda.stream(side):
            pixels = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return items, pixels, event
