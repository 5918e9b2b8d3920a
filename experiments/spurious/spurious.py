"""SpuriousCIFAR over shortcut kinds: does discovery find the planted shortcut, and do prompting and repair undo it?

Per kind of marker (``--kinds``, each built from the real CIFAR-10 images by ``siftlens make-spurious``):

- ``glyphs``: the built-in 8x8 black-and-white glyphs at random positions;
- ``imagenet``: centre crops of ImageNet sample photos (one per class, seeded choice), 8x8 (``--markers``);
- ``large``: the glyphs at 12x12;
- ``watermark``: the glyphs always in the bottom-right corner.

Steps, each a ``siftlens`` command (so the benchmark exercises the CLI): build; ``train`` the shortcut model on the
kind's ``train`` split (the clean control is trained once on clean CIFAR-10); ``discover`` on the training split
(scored against the sidecar by two rules: word purity, and the patch rule that credits a candidate when at least
half of its patches lie on the class's marker); ``prompt`` on the ``aligned`` and ``conflicting`` splits with each
policy (discovery's output only); the oracle reference (drop every patch the marker overlaps, sidecar boxes);
``repair`` (new head on shortcut-dropped features, label-free pseudo-groups) and its oracle reference (the
sidecar's groups); the same discovery, ``drop`` and repair for the control model.

Kinds run in parallel (``--jobs K``): every step is a subprocess, a thread per kind waits on them.

    python experiments/spurious/spurious.py --quick   # tiny build and model on the CPU: checks the pipeline
    python experiments/spurious/spurious.py --device cuda --jobs 4 --seed 1 --cifar $CIFAR \
        --imagenet $IMAGENET --out $RES/s.json

Results: ``--out`` (default experiments/spurious/results/spurious[-quick].json); write-up: docs/spurious.md.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from spurious_eval import summarise  # noqa: E402

DEFAULT_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.zip"
DEFAULT_IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-samples-dev.zip"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
KINDS = {
    "glyphs": [],
    "imagenet": ["--markers", "{imagenet_markers}"],
    "large": ["--marker-size", "12"],
    "watermark": ["--placement", "bottom-right"],
}
FULL = dict(
    limit_per_class=None,
    train=dict(dim=128, depth=6, heads=4, mlp_ratio=2.0, patch_size=4, epochs=12, batch_size=256, lr=1e-3,
               warmup_epochs=1.0, pad=4),
    control_limit=None,
    discover=dict(limit=5000, vocab=256, causal_top=10, causal_images=32),
    prompt_limit=2000,
    repair_limit=5000,
)
QUICK = dict(
    limit_per_class=100,
    train=dict(dim=64, depth=3, heads=2, mlp_ratio=2.0, patch_size=4, epochs=30, batch_size=50, lr=3e-3,
               warmup_epochs=1.0, pad=0),
    control_limit=1000,
    discover=dict(limit=None, vocab=256, causal_top=5, causal_images=16),
    prompt_limit=300,
    repair_limit=None,
)
FLAG = ["--candidates", "{cand}", "--top-words", "5", "--score-ratio", "0.25"]
POLICIES = {
    "drop-top1": ["--policy", "drop", "--candidates", "{cand}", "--top-words", "1", "--extent", "footprint"],
    "drop": ["--policy", "drop", *FLAG, "--extent", "footprint"],
    # drop, with the flagged patches grown by one patch: covers the part of a marker the candidates miss
    "drop-dilate1": ["--policy", "drop", *FLAG, "--extent", "footprint", "--dilate", "1"],
    "keep-top-0.5": ["--policy", "keep-top", "--q", "0.5", *FLAG],
    "bias-prior": ["--policy", "bias", "--beta", "1"],
}


class Runner:
    """Runs ``siftlens`` commands for one kind: logs, timings, resumption by output files."""

    def __init__(self, work: Path, env: dict, device: str):
        self.work, self.env, self.device = work, env, device
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / "commands.log"
        self.timing_file = work / "timing.json"  # kept across resumed runs
        self.timing: dict[str, float] = json.loads(self.timing_file.read_text()) if self.timing_file.exists() else {}

    def sh(self, stage: str, args: list[str], done: Path, module: str = "siftlens.cli") -> None:
        if done.exists():
            return
        cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
        t0 = time.time()
        with open(self.log, "a") as f:
            f.write("$ " + " ".join(cmd[1:]) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        self.timing[stage] = round(self.timing.get(stage, 0.0) + time.time() - t0, 1)
        self.timing_file.write_text(json.dumps(self.timing))
        print(f"  [{self.work.name}] {stage}: {time.time() - t0:.0f} s", flush=True)
        if r.returncode != 0:
            raise SystemExit(f"{self.work.name}: {stage} failed ({r.returncode}); see {self.log}\n"
                             + self.log.read_text()[-2000:])


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]


def imagenet_markers(src: str, out: Path, seed: int) -> Path:
    """One centre crop (half the short side) of a seeded choice of ImageNet photos per CIFAR class."""
    from PIL import Image

    if (out / f"{CLASSES[-1]}.png").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    p = Path(src)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.suffix.lower() in (".jpeg", ".jpg", ".png"))
        blobs = [x.read_bytes for x in files]
    else:
        z = zipfile.ZipFile(p)
        names = sorted(n for n in z.namelist() if n.lower().endswith((".jpeg", ".jpg", ".png")))
        blobs = [lambda n=n: z.read(n) for n in names]
    if len(blobs) < len(CLASSES):
        raise SystemExit(f"{src}: need at least {len(CLASSES)} photos for the imagenet markers")
    import numpy as np

    pick = np.random.default_rng(seed).choice(len(blobs), len(CLASSES), replace=False)
    for c, i in zip(CLASSES, pick, strict=True):
        im = Image.open(io.BytesIO(blobs[i]())).convert("RGB")
        s = min(im.size) // 2
        x0, y0 = (im.width - s) // 2, (im.height - s) // 2
        im.crop((x0, y0, x0 + s, y0 + s)).save(out / f"{c}.png")
    return out


def train(run: Runner, data: str, out: Path, cfg: dict, a, limit: int | None = None, val: str | None = None) -> dict:
    args = ["train", "--train", data, "--out", str(out), "--threads", str(a.threads), "--no-progress",
            "--device", a.device, "--seed", str(a.seed), *flags(cfg["train"])]
    if val:
        args += ["--val", val]
    if limit:
        args += ["--limit", str(limit)]
    run.sh("train", args, out / "model" / "model.safetensors")
    hist = json.loads((out / "history.json").read_text())
    return {"epochs": len(hist["epochs"]), "final": hist["epochs"][-1], "wall_seconds": hist.get("wall_seconds")}


def repaired_drop(repair_args: list[str]) -> list[str]:
    """The ``drop`` policy a repaired model is prompted with: grown as its fitting flags were (``--dilate R``)."""
    for i, arg in enumerate(repair_args):
        if arg == "--dilate" or arg.startswith("--dilate="):
            radius = arg.partition("=")[2] or repair_args[i + 1]
            return [*POLICIES["drop"], "--dilate", radius]
    return POLICIES["drop"]


def evaluate(run: Runner, name: str, model: str, data: Path, cfg: dict, a, policies: dict) -> dict:
    """Discovery on the training split, each policy on aligned and conflicting, the oracle, repairs."""
    dev = ["--device", a.device]
    d = run.work / f"discover-{name}"
    run.sh("discover", ["discover", "--model", model, "--images", str(data / "train"), "--out", str(d),
                        "--no-progress", "--seed", str(a.seed), "--workers", str(a.workers), *dev,
                        *flags(cfg["discover"])], d / "discovery.json")
    cand = str(d / "discovery.json")
    models = {"": model}
    for g in (("discovery", "sidecar") if name == "spurious" else ("discovery",)):
        o = run.work / f"repair-{name}-{g}"
        run.sh("repair", ["repair", "--model", model, "--images", str(data / "train"), "--candidates", cand,
                          "--out", str(o), "--groups", g, "--no-progress", *dev, *a.repair_extra]
               + (["--limit", str(cfg["repair_limit"])] if cfg["repair_limit"] else []), o / "repair.json")
        models[f"repair-{g}"] = str(o / "model")
    out = {}
    for split in ("aligned", "conflicting"):
        for mname, m in models.items():
            for pname, extra in (policies if not mname else {"drop": repaired_drop(a.repair_extra)}).items():
                o = run.work / f"prompt-{name}-{split}-{mname or 'base'}-{pname}"
                args = ["prompt", "--model", m, "--images", str(data / split), "--out", str(o), "--no-progress",
                        "--workers", str(a.workers), *dev, *[x.replace("{cand}", cand) for x in extra]]
                if cfg["prompt_limit"]:
                    args += ["--limit", str(cfg["prompt_limit"])]
                run.sh("prompt", args, o / "prompting.json")
                out[f"{split}/{mname or 'base'}/{pname}"] = str(o / "prompting.json")
        o = run.work / f"oracle-{name}-{split}.json"
        run.sh("oracle", [str(HERE / "spurious_eval.py"), "--model", model, "--split", str(data / split),
                          "--device", a.device, "--out", str(o)]
               + (["--limit", str(cfg["prompt_limit"])] if cfg["prompt_limit"] else []), o, module="")
        out[f"{split}/oracle"] = str(o)
    repairs = {g: str(run.work / f"repair-{name}-{g}" / "repair.json") for g in ("discovery", "sidecar")
               if f"repair-{g}" in models}
    return summarise(d / "discovery.json", out, repairs)


BUILT: dict[str, threading.Event] = {}


def run_kind(kind: str, a, cfg: dict, env: dict, control: Path | None) -> dict:
    """Phase 1 (``control`` None): build, train and evaluate the shortcut model; phase 2: evaluate the control
    on the kind's splits (after phase 1 built them)."""
    work = Path(a.work) / kind
    if control is not None:
        BUILT[kind].wait()
    run = Runner(work, env, a.device)
    data = work / "spurious-cifar"
    extra = [x.replace("{imagenet_markers}", str(Path(a.work) / "imagenet-markers")) for x in KINDS[kind]]
    build = ["make-spurious", "--cifar", a.cifar_root, "--out", str(data), "--seed", str(a.seed), "--no-progress",
             *extra]
    if cfg["limit_per_class"]:
        build += ["--limit-per-class", str(cfg["limit_per_class"])]
    try:
        run.sh("build", build, data / "manifest.json")
    finally:
        BUILT[kind].set()
    man = json.loads((data / "manifest.json").read_text())
    res = {"kind": kind, "build_options": extra,
           "dataset": {"splits": man["splits"], "marker_check": man["marker_check"], "rho": man["config"]["rho"]}}
    if control is None:  # phase 1: the shortcut model
        res["train"] = train(run, str(data / "train"), work / "train-spurious", cfg, a, val=str(data / "conflicting"))
        res.update(evaluate(run, "spurious", str(work / "train-spurious" / "model"), data, cfg, a, a.policy_set))
    else:  # phase 2: the clean control on this kind's splits
        control_policies = {p: POLICIES[p] for p in ("drop", "drop-dilate1") if p in a.policy_set}
        res.update(evaluate(run, "control", str(control), data, cfg, a, control_policies))
    res["timing"] = run.timing
    return res


def _result(fut) -> dict:
    """A kind's result, or ``{"error": ...}`` so the other kinds still get reported (rerun to resume)."""
    try:
        return fut.result()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - one failed kind must not lose the others' results
        return {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny build and model: checks the pipeline end to end")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="cifar10-jpg.zip, or a folder holding cifar10/")
    ap.add_argument("--imagenet", default=str(DEFAULT_IMAGENET), help="ImageNet sample photos: zip or folder")
    ap.add_argument("--work", default=None, help="working folder (default runs/spurious-bench[-quick])")
    ap.add_argument("--out", default=None,
                    help="results JSON (default experiments/spurious/results/spurious[-quick].json)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--jobs", type=int, default=1, help="kinds run in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per command")
    ap.add_argument("--workers", type=int, default=0, help="data-loading workers per discover/prompt command")
    ap.add_argument("--seed", type=int, default=0, help="build, training and discovery seed (choose on 0, report 1)")
    ap.add_argument("--epochs", type=int, default=None, help="override training epochs")
    ap.add_argument("--limit-per-class", type=int, default=None, help="images per class and split of each build")
    ap.add_argument("--prompt-limit", type=int, default=None, help="test images per split for prompting")
    ap.add_argument("--discover-limit", type=int, default=None, help="training images for discovery")
    ap.add_argument("--repair-limit", type=int, default=None, help="training images for repair")
    ap.add_argument("--repair-args", default="", help="more `siftlens repair` options, e.g. '--blocks 6 --dilate 1 "
                    "--epochs 8 --lr 3e-4'; repaired models are prompted with drop grown by the same --dilate")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, of {', '.join(POLICIES)}")
    ap.add_argument("--control-model", default=None, help="reuse this clean-CIFAR model as the control")
    a = ap.parse_args()
    bad = [k for k in a.kinds.split(",") if k not in KINDS] + [p for p in a.policies.split(",") if p not in POLICIES]
    if bad:
        ap.error(f"unknown kinds or policies {bad}; kinds: {', '.join(KINDS)}; policies: {', '.join(POLICIES)}")
    return a


def main() -> None:
    a = parse()
    cfg = copy.deepcopy(QUICK if a.quick else FULL)
    for k, v in (("limit_per_class", a.limit_per_class), ("prompt_limit", a.prompt_limit),
                 ("repair_limit", a.repair_limit)):
        if v:
            cfg[k] = v
    if a.limit_per_class:  # the clean control is trained on as many images as each kind's train split
        cfg["control_limit"] = a.limit_per_class * len(CLASSES)
    if a.discover_limit:
        cfg["discover"]["limit"] = a.discover_limit
    a.repair_extra = shlex.split(a.repair_args)
    a.policy_set = {p: POLICIES[p] for p in dict.fromkeys(["drop", *a.policies.split(",")])}  # drop: always
    if a.epochs:
        cfg["train"]["epochs"] = a.epochs
    tag = "-quick" if a.quick else ""
    a.work = str(Path(a.work or ROOT / "runs" / f"spurious-bench{tag}").resolve())
    out = Path(a.out or HERE / "results" / f"spurious{tag}.json").resolve()
    if not Path(a.cifar).exists():
        raise SystemExit(f"CIFAR-10 not found at {a.cifar}; pass --cifar")
    a.cifar_root = f"{a.cifar}/cifar10" if a.cifar.endswith(".zip") or (Path(a.cifar) / "cifar10").is_dir() else a.cifar
    kinds = a.kinds.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if "imagenet" in kinds:
        imagenet_markers(a.imagenet, Path(a.work) / "imagenet-markers", a.seed)
    t0 = time.time()
    ctl_run = Runner(Path(a.work) / "control", env, a.device)
    BUILT.update({k: threading.Event() for k in kinds})
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        ctl = None if a.control_model else pool.submit(
            train, ctl_run, f"{a.cifar_root}/train", Path(a.work) / "control" / "train-clean", cfg, a,
            cfg["control_limit"])
        phase1 = {k: pool.submit(run_kind, k, a, cfg, env, None) for k in kinds}
        control_train = {"reused": a.control_model} if ctl is None else _result(ctl)
        control = Path(a.control_model or Path(a.work) / "control" / "train-clean" / "model")
        phase2 = {k: pool.submit(run_kind, k, a, cfg, env, control) for k in kinds}
        res = {k: {"spurious_model": _result(phase1[k]), "control_model": _result(phase2[k])} for k in kinds}
    results = {
        "benchmark": "SpuriousCIFAR over shortcut kinds", "mode": "quick" if a.quick else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {**cfg, "seed": a.seed, "policies": a.policy_set, "kinds": {k: KINDS[k] for k in kinds},
                   "repair_args": a.repair_extra, "device": a.device, "jobs": a.jobs, "threads": a.threads},
        "control_train": {**control_train, "timing": ctl_run.timing}, "kinds": res,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_seconds": round(time.time() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False))
    os.replace(tmp, out)
    print_summary(results)
    print(f"results: {out}")


def print_summary(r: dict) -> None:
    for kind, m in r["kinds"].items():
        s, c = m["spurious_model"], m["control_model"]
        if "error" in s or "error" in c:
            print(f"\n== {kind}: FAILED: {s.get('error') or c.get('error')}")
            continue
        d = s["discovery"]
        print(f"\n== {kind}: rank 1 for {d['rank1_patch_rule']}/10 (patch rule), {d['rank1_word_rule']}/10 (word "
              f"purity); precision@1/5 {d['precision_at']['1']:.2f}/{d['precision_at']['5']:.2f}")
        for name, v in s["conflicting"].items():
            print(f"   conflicting {name:24s} {v['before']:.3f} -> {v['after']:.3f}   worst group "
                  f"{v['worst_before']:.3f} -> {v['worst_after']:.3f}   oracle share "
                  f"{'-' if v.get('oracle_share') is None else format(v['oracle_share'], '.2f')}")
        print(f"   aligned drop {s['aligned']['drop']['before']:.3f} -> {s['aligned']['drop']['after']:.3f}"
              f"; control conflicting drop {c['conflicting']['drop']['before']:.3f} -> "
              f"{c['conflicting']['drop']['after']:.3f}, control repair cost "
              f"{c.get('repair_cost', {}).get('discovery', float('nan')):+.3f}")


if __name__ == "__main__":
    main()
