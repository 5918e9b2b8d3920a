"""Shared helpers of the benchmark scripts: machine info, side-by-side timing, checks, JSON results.

Every ratio a benchmark reports is measured *side by side in one run*: the two things compared run in
alternating order, round after round, and the ratio is the median of the per-round ratios. The machine is
shared and noisy, so absolute times are recorded but never compared across runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"  # random models written once, reused by later runs (git-ignored)
DATA = Path(os.environ.get("SIFTLENS_DATA", ROOT.parent / "shared" / "data"))
CIFAR_ZIP = DATA / "cifar10-jpg.zip"
IMAGENET_ZIP = DATA / "imagenet-samples-dev.zip"

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no loading bars in benchmark output
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

if str(ROOT / "src") not in sys.path:  # run from a checkout without an installed package too
    sys.path.insert(0, str(ROOT / "src"))


# glibc's malloc returns large freed blocks to the system and adjusts its thresholds as it goes, so how many
# page faults a forward pass takes (and up to 20 % of its CPU time) depends on what the process allocated
# before. Timing benchmarks fix the thresholds before the process starts: large blocks come from the heap
# and are reused, and every side of a ratio runs without page faults.
STABLE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def stable_malloc() -> None:
    """Re-execute this script, from its ``__main__`` block, with :data:`STABLE_MALLOC` in its environment unless
    it is there already (Linux with glibc; elsewhere nothing happens)."""
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in STABLE_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STABLE_MALLOC})


def malloc_settings() -> dict:
    """The malloc environment this process runs with (recorded with timing results)."""
    return {k: os.environ.get(k) for k in STABLE_MALLOC}


def be_nice() -> int:
    """Lower this process to nice 19 (the machine is shared with higher-priority work); returns it."""
    try:
        cur = os.nice(0)
        return os.nice(max(0, 19 - cur))
    except OSError:
        return os.nice(0)


def machine_info() -> dict:
    """CPU count, thread settings and library versions; stored with every result."""
    import cv2
    import numpy as np
    import torch

    import siftlens

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "load_average_1_5_15": list(os.getloadavg()),
        "nice": os.nice(0),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cv2_threads": cv2.getNumThreads(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "transformers": tf, "siftlens": siftlens.__version__,
        },
    }


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def side_by_side(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, dict]:
    """Run every function once per round, in an order rotated each round; return their timings.

    Returns ``{name: {"wall": [s, ...], "cpu": [s, ...]}}`` with one entry per round.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            w, c = timed(fns[n])
            out[n]["wall"].append(w)
            out[n]["cpu"].append(c)
    return out


def ratio(t: dict[str, dict], num: str, den: str, kind: str = "wall") -> float:
    """Median over rounds of ``t[num] / t[den]`` (per-round ratios, so slow phases of a noisy machine
    affect both sides of a ratio alike)."""
    return statistics.median(a / b for a, b in zip(t[num][kind], t[den][kind], strict=True))


def summary(t: dict[str, dict]) -> dict[str, dict]:
    """Median and min of each timing list, in seconds (absolute numbers: reported, never compared)."""
    return {n: {k: {"median_s": statistics.median(v), "min_s": min(v), "rounds": len(v)} for k, v in d.items()}
            for n, d in t.items()}


def check(name: str, value: float | None, target: float | None, op: str = "<=", note: str = "") -> dict:
    """One row of the results table: ``value op target`` decides PASS/FAIL (value None: not measured;
    target None: a reported number without a target, status "info")."""
    if target is None:
        status = "info"
    elif value is None:
        status = "n/a"
    else:
        status = "PASS" if (value <= target if op == "<=" else value >= target) else "FAIL"
    return {"name": name, "value": value, "target": target, "op": op, "status": status, "note": note}


def write_result(name: str, payload: dict, quick: bool, results: Path = RESULTS) -> Path:
    """Atomically write ``results``/<name>[-quick].json (bench/results by default) with machine info added."""
    from siftlens.io import write_json

    payload = {"benchmark": name, "mode": "quick" if quick else "full",
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine_info(), **payload}
    path = results / f"{name}{'-quick' if quick else ''}.json"
    return write_json(path, payload)


def format_table(checks: list[dict]) -> str:
    rows = [("check", "value", "target", "status", "note")]
    for c in checks:
        v = "-" if c["value"] is None else f"{c['value']:.3f}"
        t = "-" if c["target"] is None else f"{c['op']} {c['target']:g}"
        rows.append((c["name"], v, t, c["status"], c.get("note", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- models ------------------------------------------------------------------------------------------
DEFAULT_CONFIG = {"img_size": 32, "patch_size": 4, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2.0,
                  "num_classes": 10}


def default_backend():
    """The built-in model if it is installed, else a random native ViT with its configuration."""
    import torch

    from siftlens.models import builtin_dir, load_backend
    from siftlens.models.native import NativeBackend
    from siftlens.models.vit import ViT, ViTConfig

    if (builtin_dir("default") / "model.safetensors").exists():
        return load_backend("default"), "builtin:default"
    torch.manual_seed(0)
    return NativeBackend(ViT(ViTConfig(**DEFAULT_CONFIG)).eval(), source="random"), "random native ViT " + str(
        DEFAULT_CONFIG)


def hf_backend(size: str):
    """A random Hugging Face ViT-S/16 or ViT-B/16 at 224, written once to bench/.cache."""
    from siftlens.models.hf import HFBackend

    d = CACHE / f"hf-vit-{size}16"
    if not (d / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_hf_vit.py"), str(d), "--size", size],
                       check=True, stdout=subprocess.DEVNULL)
    return HFBackend.load(str(d)), f"random HF ViT-{size.upper()}/16"


def image_source(which: str, n: int | None):
    """``cifar`` (test split, spread over classes) or ``imagenet`` (the 200 photos)."""
    from siftlens.data import ImageSource

    if which == "cifar":
        return ImageSource(f"{CIFAR_ZIP}/cifar10/test", limit=n)
    return ImageSource(str(IMAGENET_ZIP), limit=n)


# -- the analysis of one batch, exactly as analysis.analyze runs it ---------------------------------
def keypoint_items(backend, source, cfg=None) -> list[dict]:
    """Decode, preprocess and detect keypoints for every image of ``source`` (the analysis dataset,
    :class:`siftlens.loading.KeypointDataset`, with the run's SIFT settings)."""
    from siftlens.analysis.config import AnalysisConfig
    from siftlens.keypoints import sift_params
    from siftlens.loading import KeypointDataset

    cfg = cfg or AnalysisConfig()
    ds = KeypointDataset(source, backend, cfg, sift_params(backend.input_size, cfg.sift))
    return [it for it in (ds[i] for i in range(len(ds))) if "skip" not in it]


def batch_of(items: list[dict], b: int) -> list[dict]:
    """``b`` items, repeating the list when it is shorter."""
    return [items[i % len(items)] for i in range(b)]


def analysis_batch(backend, items: list[dict], names: list[str], null: int | str, cfg=None) -> Callable[[], None]:
    """A callable running :func:`siftlens.analysis.engine.analyse_batch` on ``items``: one forward with
    attention captured, all layers, heads and metrics, each with its null mean and variance; no overlays,
    no rollout, nothing written to disk.

    ``names``: the source's image names, indexed by each item's ``index`` (they key the Monte Carlo null
    maps). ``null``: ``"exact"`` (or 0) for the closed-form null moments (one weight map per image, the
    default), or an integer M >= 20 of Monte Carlo null maps per image (K = M + 1, the reference).
    ``cfg``: the other analysis parameters (default ``AnalysisConfig(overlays=0)``); its ``null`` is replaced.
    The run plan (layers, metric cells, patch centres) is built once, as ``analyze`` does.
    """
    import dataclasses

    from siftlens.analysis.config import AnalysisConfig
    from siftlens.analysis.engine import RunPlan, analyse_batch

    if null in (0, "exact"):
        null = "exact"
    elif not (isinstance(null, int) and null >= 20):
        raise ValueError(f"null must be 'exact' (or 0) or an integer >= 20, got {null!r}")
    cfg = dataclasses.replace(cfg or AnalysisConfig(overlays=0), null=null)
    cfg.validate()
    plan = RunPlan.build(backend, cfg)
    item_names = [names[it["index"]] for it in items]

    def run() -> None:
        analyse_batch(plan, items, item_names)

    return run


def forward_batch(backend, items: list[dict], eager: bool = True) -> Callable[[], None]:
    """A callable running the plain forward of ``items`` (normalisation included, no hooks, no metrics).

    ``eager``: the eager attention path (the one the analysis must use); else the model's default
    (the native ViT's fused SDPA; Hugging Face models switched to ``sdpa``)."""
    import contextlib

    import numpy as np
    import torch

    pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))

    @contextlib.contextmanager
    def sdpa():
        cfgs = {id(c): c for c in [backend.model.config] + [getattr(m, "config", None) for m in backend._attention]
                if c is not None}
        prev = [(c, c._attn_implementation) for c in cfgs.values()]
        for c, _ in prev:
            c._attn_implementation = "sdpa"
        try:
            yield
        finally:
            for c, impl in prev:
                c._attn_implementation = impl

    def ctx():
        if eager:
            return backend.eager()
        if backend.kind == "hf":
            return sdpa()
        return contextlib.nullcontext()

    @torch.inference_mode()
    def run() -> None:
        with ctx():
            backend.forward(backend.normalize(pixels))

    return run
