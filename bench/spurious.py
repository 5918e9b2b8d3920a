"""SpuriousCIFAR benchmark: does discovery find the planted shortcuts, and does prompting undo them?

Steps (every step is a `siftlens` command, run as a subprocess, so the benchmark exercises the CLI):

1. ``siftlens make-spurious``: build SpuriousCIFAR from the real CIFAR-10 images (seeded).
2. ``siftlens train``: a ViT on its ``train`` split (the shortcut model) and, as a control, the same recipe
   on clean CIFAR-10 (or ``--control-model`` to reuse a clean model).
3. ``siftlens discover`` on (a sample of) the training split of SpuriousCIFAR, for both models; the rank
   of each class's own marker among its candidates is scored with the build's sidecar (evaluation only).
4. ``siftlens prompt`` on the ``aligned`` and ``conflicting`` splits with each policy, using only what
   discovery found (its discovery.json), never the sidecar's boxes.

Results go to ``bench/results/spurious[-quick].json``; the write-up is docs/spurious.md.

    python bench/spurious.py            # full run (about 2.5 hours on 2 CPU cores)
    python bench/spurious.py --quick    # tiny build, tiny model, a few epochs: checks the pipeline end to end
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.zip"

FULL = dict(
    limit_per_class=None,
    train=dict(dim=128, depth=6, heads=4, mlp_ratio=2.0, patch_size=4, epochs=12, batch_size=256, lr=1e-3,
               warmup_epochs=1.0, pad=4),
    control_limit=None,
    discover=dict(limit=5000, vocab=256, causal_top=10, causal_images=32),
    prompt_limit=None,
)
QUICK = dict(
    limit_per_class=100,
    train=dict(dim=64, depth=3, heads=2, mlp_ratio=2.0, patch_size=4, epochs=30, batch_size=50, lr=3e-3,
               warmup_epochs=1.0, pad=0),
    control_limit=1000,
    discover=dict(limit=None, vocab=256, causal_top=5, causal_images=16),
    prompt_limit=300,
)
# name -> extra `siftlens prompt` options; "{cand}" is replaced by the discovery.json of the model. Flagged
# words: each class's best candidates (up to 5, scoring at least a quarter of the class's best).
FLAG = ["--candidates", "{cand}", "--top-words", "5", "--score-ratio", "0.25"]
POLICIES = {
    "drop-top1": ["--policy", "drop", "--candidates", "{cand}", "--top-words", "1"],
    "drop": ["--policy", "drop", *FLAG, "--extent", "footprint"],
    "keep-top-0.5": ["--policy", "keep-top", "--q", "0.5", *FLAG],
    "bias-flagged": ["--policy", "bias", "--beta", "0", *FLAG, "--extent", "footprint"],
    "bias-prior": ["--policy", "bias", "--beta", "1"],
}


def sh(args: list[str], log: Path) -> None:
    """Run ``python -m siftlens.cli ARGS``; its output goes to ``log``; raise with the log tail on failure."""
    cmd = [sys.executable, "-m", "siftlens.cli", *args]
    print("$ siftlens " + " ".join(args), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ siftlens " + " ".join(args) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({r.returncode}): siftlens {' '.join(args)}\n{tail}")


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        if v is None:
            continue
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def train(data: str, out: Path, spec: dict, threads: int, log: Path, limit: int | None = None,
          val: str | None = None) -> dict:
    if not (out / "model" / "model.safetensors").exists():
        args = ["train", "--train", data, "--out", str(out), "--threads", str(threads), "--no-progress",
                *flags(spec)]
        if val:
            args += ["--val", val]
        if limit:
            args += ["--limit", str(limit)]
        if (out / "checkpoint.pt").exists():
            args.append("--resume")
        sh(args, log)
    hist = json.loads((out / "history.json").read_text())
    last = hist["epochs"][-1]
    return {"epochs": len(hist["epochs"]), "final": last, "wall_seconds": hist.get("wall_seconds"),
            "model": hist["model"]}


def evaluate_model(name: str, model: str, data: Path, work: Path, cfg: dict, log: Path) -> dict:
    """Discovery on the training split, then every policy on the aligned and conflicting splits."""
    d = work / f"discover-{name}"
    if not (d / "discovery.json").exists():
        sh(["discover", "--model", model, "--images", str(data / "train"), "--out", str(d), "--no-progress",
            *flags(cfg["discover"])], log)
    disc = json.loads((d / "discovery.json").read_text())
    res = {"discovery": {
        "images": disc["manifest"]["images"]["analysed"],
        "accuracy_on_discovery_images": disc["manifest"]["images"]["accuracy"],
        "marker_rank": disc["evaluation"]["ranks"], "marker_word": disc["evaluation"]["words"],
        "rank1_share": disc["evaluation"]["rank1"], "missing": disc["evaluation"]["missing"],
        "top1": {c: (rows[0] if rows else None) for c, rows in disc["top"].items()},
    }, "prompting": {}}
    for split in ("aligned", "conflicting"):
        for pname, extra in POLICIES.items():
            o = work / f"prompt-{name}-{split}-{pname}"
            if not (o / "prompting.json").exists():
                args = ["prompt", "--model", model, "--images", str(data / split), "--out", str(o), "--no-progress",
                        *[a.replace("{cand}", str(d / "discovery.json")) for a in extra]]
                if cfg["prompt_limit"]:
                    args += ["--limit", str(cfg["prompt_limit"])]
                sh(args, log)
            s = json.loads((o / "prompting.json").read_text())
            res["prompting"].setdefault(split, {})[pname] = {
                "before": s["before"]["overall"], "after": s["after"]["overall"],
                "worst_group_before": s["before"]["worst_group"], "worst_group_after": s["after"]["worst_group"],
                "mean_removed_patches": s["interventions"]["mean_removed_patches"],
                "mean_flagged_patches": s["interventions"]["mean_flagged_patches"],
                "images": s["images"]["evaluated"],
            }
        res["prompting"][split]["oracle-drop (reference)"] = oracle_drop(model, data / split, cfg["prompt_limit"])
        res.setdefault("accuracy", {})[split] = next(iter(res["prompting"][split].values()))["before"]
    return res


def oracle_drop(model: str, split: Path, limit: int | None) -> dict:
    """Reference only (uses the sidecar's marker boxes): drop every patch the marker overlaps."""
    import numpy as np
    import torch

    from siftlens.data import ImageSource
    from siftlens.interventions import forward_drop
    from siftlens.models import load_backend
    from siftlens.prompting import group_accuracy, image_groups
    from siftlens.spurious.data import read_sidecar

    be = load_backend(model)
    side = read_sidecar(split / "markers.json")
    src = ImageSource(str(split), limit=limit)
    P, (gh, gw) = be.patch_size, be.grid_size
    before, after, labels = [], [], []
    with torch.inference_mode():
        for s in range(0, len(src), 256):
            names = src.names[s : s + 256]
            px = np.stack([be.preprocess(src.load(i)) for i in range(s, s + len(names))])
            drop = np.zeros((len(names), gh, gw), bool)
            for k, n in enumerate(names):
                x0, y0, x1, y1 = side["images"][n]["box"]
                drop[k, y0 // P : (y1 - 1) // P + 1, x0 // P : (x1 - 1) // P + 1] = True
            x = be.normalize(torch.from_numpy(px))
            before.append(be.forward(x).argmax(1).numpy())
            after.append(forward_drop(be, x, torch.from_numpy(drop.reshape(len(names), -1))).argmax(1).numpy())
            labels += [side["images"][n]["label"] for n in names]
    y = np.array([be.class_names.index(c) for c in labels])
    groups = image_groups(src.names, labels, side)
    b = group_accuracy(np.concatenate(before) == y, groups)
    a = group_accuracy(np.concatenate(after) == y, groups)
    return {"before": b["overall"], "after": a["overall"], "worst_group_before": b["worst_group"],
            "worst_group_after": a["worst_group"], "mean_removed_patches": None, "mean_flagged_patches": None,
            "images": b["n"], "uses_oracle_boxes": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny build and model: checks the pipeline end to end")
    ap.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="cifar10-jpg.zip (or a folder with cifar10/)")
    ap.add_argument("--work", default=None, help="working folder (default runs/spurious-bench[-quick])")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/spurious[-quick].json)")
    ap.add_argument("--control-model", default=None, help="reuse this clean-CIFAR model instead of training one")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="override the shortcut model's training epochs")
    ap.add_argument("--prompt-limit", type=int, default=None,
                    help="evaluate prompting on this many images per split (spread over classes; default all)")
    a = ap.parse_args()
    cfg = copy.deepcopy(QUICK if a.quick else FULL)
    if a.epochs:
        cfg["train"]["epochs"] = a.epochs
    if a.prompt_limit:
        cfg["prompt_limit"] = a.prompt_limit
    tag = "-quick" if a.quick else ""
    work = Path(a.work or ROOT / "runs" / f"spurious-bench{tag}").resolve()
    out = Path(a.out or ROOT / "bench" / "results" / f"spurious{tag}.json").resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    cifar = a.cifar
    cifar_root = f"{cifar}/cifar10" if cifar.endswith(".zip") else cifar
    if not Path(cifar).exists():
        raise SystemExit(f"CIFAR-10 not found at {cifar}; pass --cifar")
    t0 = time.time()
    data = work / "spurious-cifar"
    if not (data / "manifest.json").exists():
        build = ["make-spurious", "--cifar", cifar_root, "--out", str(data), "--seed", str(a.seed), "--no-progress"]
        if cfg["limit_per_class"]:
            build += ["--limit-per-class", str(cfg["limit_per_class"])]
        sh(build, log)
    manifest = json.loads((data / "manifest.json").read_text())
    spur = train(str(data / "train"), work / "train-spurious", cfg["train"], a.threads, log,
                 val=str(data / "conflicting"))
    if a.control_model:
        control_model, control_train = a.control_model, {"reused": a.control_model}
    else:
        control_train = train(f"{cifar_root}/train", work / "train-clean", cfg["train"], a.threads, log,
                              limit=cfg["control_limit"])
        control_model = str(work / "train-clean" / "model")
    results = {
        "benchmark": "SpuriousCIFAR", "mode": "quick" if a.quick else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {**cfg, "seed": a.seed, "policies": POLICIES, "threads": a.threads},
        "dataset": {"splits": manifest["splits"], "markers": manifest["markers"],
                    "marker_check": manifest["marker_check"], "rho": manifest["config"]["rho"]},
        "spurious_model": {"train": spur, **evaluate_model("spurious", str(work / "train-spurious" / "model"), data,
                                                             work, cfg, log)},
        "control_model": {"train": control_train, **evaluate_model("control", control_model, data, work, cfg, log)},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "wall_seconds": round(time.time() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)
    print_summary(results)
    print(f"results: {out}")


def print_summary(r: dict) -> None:
    import numpy as np

    for who in ("spurious_model", "control_model"):
        m = r[who]
        print(f"\n== {who}: accuracy aligned {m['accuracy']['aligned']:.3f}, conflicting "
              f"{m['accuracy']['conflicting']:.3f}")
        ranks = m["discovery"]["marker_rank"]
        print(f"   own marker rank per class: {ranks} (rank 1 for {m['discovery']['rank1_share']:.0%})")
        top1 = [t for t in m["discovery"]["top1"].values() if t]
        if top1:
            med = {k: float(np.median([t[k] or 0.0 for t in top1])) for k in ("score", "causal", "assoc")}
            print(f"   top candidate per class (median over classes): score {med['score']:.3g}, causal "
                  f"{med['causal']:.3f}, assoc {med['assoc']:.2f}")
        for split in ("conflicting", "aligned"):
            for p, v in m["prompting"][split].items():
                wb, wa = v["worst_group_before"], v["worst_group_after"]
                print(f"   {split:11s} {p:18s} acc {v['before']:.3f} -> {v['after']:.3f}   worst group "
                      f"{wb['accuracy']:.3f} -> {wa['accuracy']:.3f}" + (
                          "" if v["mean_removed_patches"] is None
                          else f"   removed {v['mean_removed_patches']:.1f} patches/image"))


if __name__ == "__main__":
    main()
