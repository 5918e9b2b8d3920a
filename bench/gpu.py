"""Where the time of the analysis goes on a device: torch.profiler traces of one analysis batch against a plain
forward, the host-device syncs, the host-to-device copies, the ops repeated per layer or head, and how long the
device waits for the loader (decode + SIFT) in a short loader-fed loop (issue 26 item 1).

    python bench/gpu.py [--model vit-b16|PATH|default] [--batch-size 128] [--device cuda|cpu] [--precision fp32]
                        [--loader-batches 4] [--workers N] [--images ZIP]

``--model vit-b16`` (the default): a random Hugging Face ViT-B/16 made once into bench/.cache/hf-vit-b16 with
scripts/make_random_hf_vit.py (``vit-s16`` likewise); anything else is passed to ``load_backend`` (``default``: the
built-in model). Images: the ImageNet sample photos (repeated to fill the batch). Device: cuda if available, else
cpu. Writes bench/results/gpu_profile.json on CUDA, gpu_profile-DEVICE.json elsewhere, with:

- ``forward`` / ``analysis``: the wall time of the batch (best of 3, synchronised), the top ops by self device time
  (self CPU time on the CPU), the syncs (aten::item, _local_scalar_dense, nonzero, cudaStreamSynchronize,
  cudaDeviceSynchronize, cudaMemcpy and device-to-host copies: counts and time), the host-to-device copies (count,
  bytes, time), the device's idle time within the batch (gaps between kernels, CUDA only), and the ops run at least
  once per layer whose mean time is small: a Python loop over layers or heads shows up there;
- ``loader_loop``: ``--loader-batches`` batches from the analysis' DataLoader (``--workers`` processes, default as
  ``analyze``'s) through the runner's Prefetcher and analyse_batch: seconds waiting for batches against seconds
  computing them, i.e. the share of the time the device sits idle for SIFT;
- ``sift_per_core``: decode + preprocess + SIFT images/s in one process on one core (bench/keypoints.py's
  ``sift_rate``) beside the plain forward's images/s, and the floor of a job, max(forward, SIFT / workers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common as C

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "cudaStreamSynchronize",
            "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "Memcpy DtoH")
RANDOM_MODELS = {"vit-b16": "b", "vit-s16": "s"}


def model_spec(name: str) -> str:
    """A random HF ViT made once into bench/.cache for ``vit-b16`` / ``vit-s16``; any other spec as it is."""
    if name not in RANDOM_MODELS:
        return name
    path = C.CACHE / f"hf-{name}"
    if not (path / "model.safetensors").exists():
        subprocess.run([sys.executable, str(C.ROOT / "scripts" / "make_random_hf_vit.py"), str(path), "--size",
                        RANDOM_MODELS[name]], check=True, stdout=subprocess.DEVNULL)
    return str(path)


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def best_of(fn, dev, k: int = 3) -> float:
    times = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return min(times)


def profile(fn, dev, layers: int, heads: int, top: int = 15) -> dict:
    """One profiled call of ``fn``: top ops, syncs, H2D copies, idle gaps and per-layer repeated ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=False) as prof:
        fn()
        sync(dev)
    on_device = dev.type == "cuda"
    avgs = prof.key_averages()

    def self_us(e) -> float:
        return float(e.self_device_time_total if on_device else e.self_cpu_time_total)

    ops = sorted(avgs, key=self_us, reverse=True)
    total = sum(self_us(e) for e in avgs) or 1.0
    top_ops = [{"name": e.key, "count": e.count, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total}
               for e in ops[:top] if self_us(e) > 0]
    syncs = {e.key: {"count": e.count, "ms": (e.cpu_time_total + (e.device_time_total if on_device else 0)) / 1e3}
             for e in avgs if any(e.key.startswith(s) for s in SYNC_OPS)}
    repeated = sorted(({"name": e.key, "count": e.count, "per_layer": round(e.count / layers, 2),
                        "mean_us": self_us(e) / e.count, "self_ms": self_us(e) / 1e3}
                       for e in avgs if e.count >= layers and e.key.startswith(("aten::", "void", "triton"))
                       and self_us(e) / max(1, e.count) < (20.0 if on_device else 50.0)),
                      key=lambda r: -r["count"])[:top]
    out = {"self_total_ms": total / 1e3, "timed": "self device time" if on_device else "self CPU time",
           "top_ops": top_ops, "syncs": syncs, "ops_per_layer_small": repeated,
           "kernel_launches": sum(e.count for e in avgs if e.key in ("cudaLaunchKernel", "cuLaunchKernel")),
           **trace_summary(prof, on_device)}
    return out


def trace_summary(prof, on_device: bool) -> dict:
    """H2D / D2H copies (count, bytes, ms) and the device's idle time between kernels, from the chrome trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    copies: dict[str, dict] = defaultdict(lambda: {"count": 0, "bytes": 0, "ms": 0.0})
    spans = []
    for ev in events:
        cat, name = ev.get("cat", ""), ev.get("name", "")
        if cat == "gpu_memcpy":
            kind = "HtoD" if "HtoD" in name else "DtoH" if "DtoH" in name else "DtoD"
            c = copies[kind]
            c["count"] += 1
            c["bytes"] += int(ev.get("args", {}).get("bytes", 0))
            c["ms"] += ev.get("dur", 0) / 1e3
        if cat in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in ev:
            spans.append((ev["ts"], ev["ts"] + ev["dur"]))
    res = {"copies": dict(copies)}
    if on_device and spans:
        spans.sort()
        busy, (s0, e0) = 0.0, spans[0]
        for s, e in spans[1:]:
            if s > e0:
                busy, s0, e0 = busy + e0 - s0, s, e
            else:
                e0 = max(e0, e)
        busy += e0 - s0
        span = max(e for _, e in spans) - spans[0][0]
        res["device_busy_ms"], res["device_span_ms"] = busy / 1e3, span / 1e3
        res["device_idle_share"] = 1 - busy / span if span else 0.0
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit-b16")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--loader-batches", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: as analyze's)")
    ap.add_argument("--images", default=str(C.IMAGENET_ZIP))
    ap.add_argument("--sift-images", type=int, default=32, help="images of the SIFT-per-core timing")
    a = ap.parse_args(argv)
    import numpy as np
    import torch
    from keypoints import sift_rate

    from siftlens.analysis.config import configure
    from siftlens.analysis.engine import RunPlan, analyse_batch
    from siftlens.analysis.prefetch import Prefetcher, default_workers
    from siftlens.data import ImageSource
    from siftlens.devices import autocast, check_precision
    from siftlens.keypoints import sift_params
    from siftlens.loading import KeypointDataset, make_loader, one_cv2_thread_per_worker
    from siftlens.models import load_backend

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_precision(device, a.precision)
    if device == "cpu":
        C.be_nice()
    spec = model_spec(a.model)
    backend = load_backend(spec, device)
    dev = backend.device
    cfg = configure(None, device=device, batch_size=a.batch_size, precision=a.precision,
                    workers=a.workers if a.workers is not None else default_workers(device))
    plan = RunPlan.build(backend, cfg)
    sift = sift_params(backend.input_size, cfg.sift)
    src = ImageSource(a.images, limit=a.batch_size)
    ds = KeypointDataset(src, backend, cfg, sift)
    base = [it for it in (ds[i] for i in range(len(ds))) if "skip" not in it]
    items = [dict(base[i % len(base)], index=i) for i in range(a.batch_size)]
    names = [f"img{i}" for i in range(len(items))]
    pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))

    @torch.inference_mode()
    def forward():
        with backend.eager(), autocast(dev, a.precision):
            backend.forward(backend.normalize(pixels))

    def analysis():
        analyse_batch(plan, items, names)

    analysis()  # warm-up (and the compile, on CUDA)
    forward()
    sync(dev)
    t_fwd, t_ana = best_of(forward, dev), best_of(analysis, dev)
    mem = {}
    if dev.type == "cuda":
        for name, fn in (("forward", forward), ("analysis", analysis)):
            torch.cuda.reset_peak_memory_stats(dev)
            fn()
            sync(dev)
            mem[name] = torch.cuda.max_memory_allocated(dev) / 2**20
    L, H = backend.num_layers, backend.num_heads
    res = {"benchmark": "gpu_profile", "machine": C.machine_info(), "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "model": spec, "layers": L, "heads": H, "patches": int(np.prod(backend.grid_size)),
           "batch": len(items), "precision": a.precision, "torch_threads": torch.get_num_threads(),
           "compiled_reductions": bool(dev.type == "cuda" and __import__("siftlens.core.compiled",
                                                                         fromlist=["x"]).wanted(dev)),
           "wall_ms": {"forward": 1e3 * t_fwd, "analysis": 1e3 * t_ana},
           "images_per_s": {"forward": len(items) / t_fwd, "analysis": len(items) / t_ana},
           "analysis_over_forward": t_ana / t_fwd, "peak_memory_mib": mem or None,
           "forward": profile(forward, dev, L, H), "analysis": profile(analysis, dev, L, H)}

    # the loader-fed loop: how long the main loop (the device) waits for decode + SIFT
    n_img = min(len(src), a.batch_size) * a.loader_batches
    loop_src = ImageSource(a.images, limit=n_img)
    loader = make_loader(KeypointDataset(loop_src, backend, cfg, sift), cfg.run)
    batches = Prefetcher(loader, dev)
    busy, t0, n = 0.0, time.perf_counter(), 0
    with one_cv2_thread_per_worker(cfg.run.workers):
        for b in batches:
            t = time.perf_counter()
            good = [it for it in b.items if "skip" not in it]
            if good:
                analyse_batch(plan, good, [f"l{it['index']}" for it in good], pixels=b.pixels)
            sync(dev)
            busy += time.perf_counter() - t
            n += len(b.items)
    wall = time.perf_counter() - t0
    res["loader_loop"] = {"images": n, "workers": cfg.run.workers, "batch": cfg.run.batch_size,
                          "staged_on_device": batches.stage, "wall_s": wall, "wait_for_loader_s": batches.wait_s,
                          "compute_s": busy, "device_idle_for_loader_share": batches.wait_s / wall if wall else 0.0,
                          "images_per_s": n / wall if wall else None,
                          "sift_bound": batches.wait_s > busy}

    rate = sift_rate(backend, a.images, a.sift_images)
    fwd_ips = len(items) / t_fwd
    workers = max(1, cfg.run.workers)
    res["sift_per_core"] = {**rate, "forward_images_per_s": fwd_ips,
                            "floor_images_per_s_at_workers": min(fwd_ips, rate["images_per_s"] * workers),
                            "floor_workers": workers,
                            "workers_to_feed_the_forward": fwd_ips / rate["images_per_s"],
                            "note": "floor of a job = max(forward time, SIFT time / workers); SIFT per core from one "
                                    "process with OpenCV on one thread; the forward at this device and batch"}
    name = "gpu_profile" if dev.type == "cuda" else f"gpu_profile-{dev.type}"
    path = C.RESULTS / f"{name}.json"
    path.write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(headline(res))
    print(f"written {path}")
    return res


def headline(res: dict) -> str:
    a, f = res["analysis"], res["forward"]
    top = ", ".join(f"{o['name']} {100 * o['share']:.0f}%" for o in a["top_ops"][:5])
    syncs = sum(v["count"] for v in a["syncs"].values())
    ll, sc = res["loader_loop"], res["sift_per_core"]
    return (f"{res['device']} {res['model']} batch {res['batch']} {res['precision']}: forward "
            f"{res['images_per_s']['forward']:.1f} img/s, analysis {res['images_per_s']['analysis']:.1f} img/s "
            f"({res['analysis_over_forward']:.2f}x); analysis top: {top}; sync-like events {syncs} "
            f"(forward {sum(v['count'] for v in f['syncs'].values())}); loader loop: waited "
            f"{ll['wait_for_loader_s']:.2f} s of {ll['wall_s']:.2f} s ({ll['workers']} workers); SIFT "
            f"{sc['images_per_s']:.1f} img/s per core, {sc['workers_to_feed_the_forward']:.1f} cores feed the forward")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
