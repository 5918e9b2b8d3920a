"""Peak memory of the analysis of ViT-B/16 at 224, batch 32: one layer's attention at a time, not all twelve.

    python bench/memory.py [--quick]

torch's CPU allocator keeps no statistics (and tracemalloc does not see it), so every configuration runs in
a fresh subprocess that measures its resident set: it loads a random Hugging Face ViT-B/16, prepares one
batch of ImageNet photos (decoding, preprocessing and keypoints happen here, outside the measurement), runs
the configuration once to warm up, returns freed memory to the system (``malloc_trim``), resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), runs it again and reads ``VmHWM``. The children run
with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=65536``, so that glibc maps every
tensor-sized block separately and gives it back when freed: the resident set then follows the live
tensors instead of what the allocator keeps cached from the warm-up. The peak *increase* over the
resident set just before the run is reported, in MiB and in units of one layer's attention tensor,
``B * h * S * S * 4`` bytes. ``--quick`` uses ViT-S/16 and a batch of 2 (a smoke run of the machinery).

- ``forward``: a plain eager forward pass (no hooks, no metrics): what the model itself needs;
- ``analysis``: :func:`siftlens.analysis.engine.analyse_batch` with the Monte Carlo reference null,
  100 null maps per image (``null=100``, K = 101), all layers, heads and metrics, attention streamed one
  layer at a time;
- ``analysis_exact``: the same with the exact null (the default, ``null="exact"``: one weight map per
  image, closed-form null moments);
- ``all_layers``: the Hugging Face forward with ``output_attentions=True``, keeping every layer's
  attention until the pass ends (what an analysis holding all twelve layers would need).

Check: over the plain forward, the analysis (null model included, Monte Carlo and exact) needs at most 3
layers' worth of attention, ``(analysis - forward) / one layer <= 3``, where keeping all twelve layers
needs about 12.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys

import _common as C


def _status() -> dict[str, float]:
    s = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", s).group(1)) / 1024.0 for k in ("VmRSS", "VmHWM")}


def _trim() -> None:
    """Return freed heap memory to the system (glibc), so RSS counts live memory only."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(config: str, batch: int, size: str) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    backend, desc = C.hf_backend(size)
    src = C.image_source("imagenet", max(batch, 8))
    items = C.batch_of(C.keypoint_items(backend, src), batch)
    if config == "forward":
        fn = C.forward_batch(backend, items, eager=True)
    elif config == "analysis":
        fn = C.analysis_batch(backend, items, src.names, null=100)
    elif config == "analysis_exact":
        fn = C.analysis_batch(backend, items, src.names, null="exact")
    elif config == "all_layers":
        pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))

        @torch.inference_mode()
        def fn():
            with backend.eager():
                out = backend.model(pixel_values=backend.normalize(pixels), output_attentions=True)
            assert len(out.attentions) == backend.num_layers
            return out
    else:
        raise SystemExit(f"unknown configuration {config}")
    fn()  # warm-up: allocator pools, MKL buffers
    gc.collect()
    _trim()
    before = _status()["VmRSS"]
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    fn()
    peak = _status()["VmHWM"]
    S = backend.num_prefix_tokens + backend.num_patches
    layer_mib = batch * backend.num_heads * S * S * 4 / 2**20
    return {"config": config, "model": desc, "batch": batch, "rss_before_mib": before, "peak_mib": peak,
            "peak_increase_mib": peak - before, "one_layer_attention_mib": layer_mib,
            "increase_in_layers": (peak - before) / layer_mib, "hwm_reset": reset}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: ViT-S/16, batch 2")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--size", choices=["s", "b"], default=None)
    a = ap.parse_args(argv)
    C.be_nice()
    batch = a.batch or (2 if a.quick else 32)
    size = a.size or ("s" if a.quick else "b")
    if a.child:
        print("RESULT " + json.dumps(child(a.child, batch, size)))
        return {}
    C.hf_backend(size)  # write the model once, before the children time anything
    runs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "65536"}
    for config in ("forward", "analysis", "analysis_exact", "all_layers"):
        p = subprocess.run([sys.executable, __file__, "--child", config, "--batch", str(batch), "--size", size],
                           capture_output=True, text=True, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            raise SystemExit(f"{config} failed:\n{p.stderr[-3000:]}")
        runs[config] = json.loads(line[0][len("RESULT "):])
        r = runs[config]
        print(f"  {config}: peak +{r['peak_increase_mib']:.0f} MiB = {r['increase_in_layers']:.2f} layers", flush=True)
    layer = runs["forward"]["one_layer_attention_mib"]
    fwd = runs["forward"]["peak_increase_mib"]
    extra = {k: (v["peak_increase_mib"] - fwd) / layer for k, v in runs.items() if k != "forward"}
    res = {"model": runs["forward"]["model"], "batch": batch, "one_layer_attention_mib": layer, "runs": runs,
           "extra_over_forward_in_layers": extra,
           "method": "fresh subprocess per configuration; VmHWM after /proc/self/clear_refs reset, minus VmRSS "
                     "before the measured run (after a warm-up run and malloc_trim); glibc mmap and trim "
                     "thresholds 64 KiB so that RSS follows live tensors"}
    res["checks"] = [
        C.check("memory: analysis (null 100) extra over forward, in layers", extra["analysis"], 3.0,
                note=f"all layers kept: {extra['all_layers']:.1f}"),
        C.check("memory: analysis (exact null) extra over forward, in layers", extra["analysis_exact"], 3.0,
                note=f"all layers kept: {extra['all_layers']:.1f}"),
        C.check("memory: analysis peak / all-layers peak (increase over RSS)",
                runs["analysis"]["peak_increase_mib"] / runs["all_layers"]["peak_increase_mib"], 1.0),
    ]
    path = C.write_result("memory", res, a.quick)
    print(C.format_table(res["checks"]))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main()
