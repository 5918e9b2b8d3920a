"""Keypoint stage: siftlens' keypoint-map extraction against raw OpenCV SIFT, and its scaling to 2 workers.

    python bench/keypoints.py [--quick]

Images: the ImageNet photos with the 224x224 preprocessing (resize + centre crop, patch 16, u = 1) and
CIFAR-10 test images at 32x32 (patch 4, automatic upsampling u = 4, as the analysis uses). Each image is
decoded and preprocessed once, outside the timings.

- ``raw``: ``cv2.SIFT.detect`` on the greyscale, upsampled image (prepared beforehand: conversion and
  upsampling are not timed), the cheapest possible detection;
- ``map``: :func:`siftlens.keypoint_map` on the preprocessed RGB pixels: greyscale, upsampling, detection,
  keypoints to arrays, patch weight map and levels.

Overhead = median over rounds of time(map) / time(raw) - 1, on one core (``cv2.setNumThreads(1)``; CPU time
of this single-threaded process, wall time recorded too); within a round the two alternate image by image
(raw, map, raw, map, ..., the order swapped every round), so that bursts of other work on the shared
machine hit both alike. Scaling: a fork pool of 1 and of 2 processes
maps ``keypoint_map`` over the same images (held by the workers, so only indices and the small weight maps
cross processes); speedup = wall(1 worker) / wall(2 workers), side by side. OpenCV is set to one thread in
this process before the pools fork, so every worker inherits it (as the analysis does for its DataLoader
workers). The same pools also run a fixed pure-CPU loop, whose speedup is the ceiling the machine offers
at that moment (it is shared: the ceiling falls below 2 when other work holds a core).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import multiprocessing as mp
import pstats
import time

import _common as C

_IMAGES: list = []  # set before the pools fork; workers read it
_ARGS: tuple = ()


def _map_chunk(idx: list[int]) -> int:
    from siftlens.keypoints import keypoint_map

    patch, grid, params = _ARGS
    return sum(int(keypoint_map(_IMAGES[i], patch, grid, params=params).weights.sum()) for i in idx)


def _burn_chunk(idx: list[int]) -> int:
    s = 0
    for i in idx:
        for j in range(20_000):
            s += (i * j) % 7
    return s


def prepare(which: str, n: int):
    """Preprocessed RGB pixels and the greyscale upsampled images raw SIFT sees, plus the geometry."""
    import cv2

    from siftlens.keypoints import SiftParams, auto_upsample, to_gray
    from siftlens.models.backend import resize_center_crop

    size, patch = ((224, 224), 16) if which == "imagenet" else ((32, 32), 4)
    u = auto_upsample(size)
    src = C.image_source(which, n)
    pixels = [resize_center_crop(src.load(i), size) for i in range(len(src))]
    grays = []
    for p in pixels:
        g = to_gray(p)
        if u != 1.0:
            g = cv2.resize(g, (round(g.shape[1] * u), round(g.shape[0] * u)), interpolation=cv2.INTER_CUBIC)
        grays.append(g)
    return pixels, grays, patch, (size[0] // patch, size[1] // patch), SiftParams(upsample=u)


def per_core(which: str, n: int, rounds: int) -> dict:
    import cv2

    from siftlens.keypoints import _sift, keypoint_map

    pixels, grays, patch, grid, params = prepare(which, n)
    sift = _sift(params)  # the same detector object keypoint_map uses

    def mapped():
        for p in pixels:
            keypoint_map(p, patch, grid, params=params)

    # interleaved per image (raw, map, raw, map, ... with the order swapped every round), so that bursts of
    # other work on the shared machine hit both sides alike; one sum per side and round
    clock = {"cpu": time.process_time, "wall": time.perf_counter}
    t = {"raw_sift": {"wall": [], "cpu": []}, "keypoint_map": {"wall": [], "cpu": []}}
    mapped()  # warm-up
    for r in range(rounds):
        acc = {k: {"wall": 0.0, "cpu": 0.0} for k in t}
        for g, p in zip(grays, pixels, strict=True):
            steps = [("raw_sift", lambda g=g: sift.detect(g, None)),
                     ("keypoint_map", lambda p=p: keypoint_map(p, patch, grid, params=params))]
            for name, fn in steps if r % 2 == 0 else steps[::-1]:
                c0, w0 = clock["cpu"](), clock["wall"]()
                fn()
                acc[name]["cpu"] += clock["cpu"]() - c0
                acc[name]["wall"] += clock["wall"]() - w0
        for name in t:
            for kind in ("wall", "cpu"):
                t[name][kind].append(acc[name][kind])
    n_kp = [len(sift.detect(g, None)) for g in grays]
    prof = cProfile.Profile()
    prof.enable()
    mapped()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(8)
    top = [ln.strip() for ln in s.getvalue().splitlines() if ln.strip()[:1].isdigit()][:8]
    return {
        "images": len(pixels), "upsample": params.upsample, "patch": patch, "grid": list(grid),
        "sift_input": list(grays[0].shape), "keypoints_mean": sum(n_kp) / len(n_kp),
        "cv2_threads": cv2.getNumThreads(),
        "overhead_cpu": C.ratio(t, "keypoint_map", "raw_sift", "cpu") - 1.0,
        "overhead_wall": C.ratio(t, "keypoint_map", "raw_sift", "wall") - 1.0,
        "ms_per_image": {k: 1e3 * v["cpu"]["median_s"] / len(pixels) for k, v in C.summary(t).items()},
        "timings": C.summary(t),
        "profile_keypoint_map_tottime": top,
    }


def sift_rate(backend, images, n: int = 32, rounds: int = 3) -> dict:
    """Images/s of one core for the analysis' per-image loader work on ``backend``'s own preprocessing (a ViT-B/16
    at 224: resize to 224 x 224): ``item`` = decode + preprocess + SIFT + weight map (KeypointDataset's item, what a
    DataLoader worker does), ``sift`` = keypoint_map on the preprocessed pixels alone. One process, OpenCV on one
    thread, CPU time of this process (best of ``rounds`` passes over the ``n`` images): what --workers multiply.
    Used by bench/gpu.py beside the forward's images/s."""
    import cv2

    from siftlens.analysis.config import AnalysisConfig
    from siftlens.data import ImageSource
    from siftlens.keypoints import keypoint_map, sift_params
    from siftlens.loading import KeypointDataset

    cfg = AnalysisConfig()
    params = sift_params(backend.input_size, cfg.sift)
    ds = KeypointDataset(ImageSource(images, limit=n), backend, cfg, params)
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        pixels = [it["pixels"] for it in (ds[i] for i in range(len(ds))) if "skip" not in it]  # also a warm-up
        grid = tuple(backend.grid_size)

        def best(fn) -> float:
            out = []
            for _ in range(rounds):
                c0 = time.process_time()
                fn()
                out.append(time.process_time() - c0)
            return min(out)

        t_item = best(lambda: [ds[i] for i in range(len(ds))])
        t_sift = best(lambda: [keypoint_map(p, backend.patch_size, grid, params=params) for p in pixels])
    finally:
        cv2.setNumThreads(prev)
    return {"images": len(ds), "input_size": list(backend.input_size), "upsample": params.upsample,
            "images_per_s": len(ds) / t_item, "sift_only_images_per_s": len(pixels) / t_sift,
            "ms_per_image": 1e3 * t_item / len(ds), "clock": "CPU time of one process, cv2.setNumThreads(1)"}


def scaling(which: str, n: int, rounds: int) -> dict:
    global _IMAGES, _ARGS
    pixels, _, patch, grid, params = prepare(which, n)
    _IMAGES, _ARGS = pixels, (patch, grid, params)
    ctx = mp.get_context("fork")
    chunks = [list(range(i, min(i + 8, len(pixels)))) for i in range(0, len(pixels), 8)]
    # cv2.setNumThreads(1) was called in this process before the pools fork: the workers inherit it
    # (calling it inside a forked worker can hang on the parent's OpenCV thread pool)
    pools = {w: ctx.Pool(w) for w in (1, 2)}
    try:
        fns = {f"{kind}_{w}": (lambda p=p, f=f: p.map(f, chunks, chunksize=1))
               for w, p in pools.items() for kind, f in (("sift", _map_chunk), ("burn", _burn_chunk))}
        t = C.side_by_side(fns, rounds=rounds)
    finally:
        for p in pools.values():
            p.terminate()
    speedup = C.ratio(t, "sift_1", "sift_2")
    ceiling = C.ratio(t, "burn_1", "burn_2")
    return {
        "images": len(pixels), "speedup_2_vs_1": speedup, "machine_ceiling_2_vs_1": ceiling,
        "efficiency_vs_ceiling": speedup / ceiling,
        "images_per_s": {f"{w}_workers": len(pixels) / C.summary(t)[f"sift_{w}"]["wall"]["median_s"] for w in (1, 2)},
        "timings": C.summary(t),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few images and rounds")
    a = ap.parse_args(argv)
    C.be_nice()
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    n_in, n_c, rounds = (24, 64, 3) if a.quick else (200, 1000, 9)
    res = {
        "settings": {"cv2.setNumThreads": "1, in the parent before forking (inherited by the workers)",
                     "torch_threads": 1, "rounds": rounds,
                     "timing": "side by side, order rotated per round; ratio = median of per-round ratios"},
        "per_core": {"imagenet_224": per_core("imagenet", n_in, rounds), "cifar_32_u4": per_core("cifar", n_c, rounds)},
        "scaling": {"cifar_32_u4": scaling("cifar", n_c, rounds),
                    "imagenet_224": scaling("imagenet", n_in, rounds)},
    }
    pc, sc = res["per_core"], res["scaling"]
    res["checks"] = [
        C.check("keypoints: map overhead vs raw SIFT, ImageNet 224", pc["imagenet_224"]["overhead_cpu"], 0.10),
        C.check("keypoints: map overhead vs raw SIFT, CIFAR u=4", pc["cifar_32_u4"]["overhead_cpu"], 0.10),
        C.check("keypoints: 2 workers vs 1, ImageNet 224", sc["imagenet_224"]["speedup_2_vs_1"], 1.8, ">=",
                note=f"machine ceiling {sc['imagenet_224']['machine_ceiling_2_vs_1']:.2f}"),
        C.check("keypoints: 2 workers vs 1, CIFAR u=4", sc["cifar_32_u4"]["speedup_2_vs_1"], 1.8, ">=",
                note=f"machine ceiling {sc['cifar_32_u4']['machine_ceiling_2_vs_1']:.2f}"),
        C.check("keypoints: 2-worker speedup / machine ceiling, ImageNet", sc["imagenet_224"]["efficiency_vs_ceiling"],
                0.9, ">=", note="how much of the parallelism the machine offered was used"),
        C.check("keypoints: 2-worker speedup / machine ceiling, CIFAR", sc["cifar_32_u4"]["efficiency_vs_ceiling"],
                0.9, ">=", note="how much of the parallelism the machine offered was used"),
    ]
    path = C.write_result("keypoints", res, a.quick)
    print(C.format_table(res["checks"]))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main()
