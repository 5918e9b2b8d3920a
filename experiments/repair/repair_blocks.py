"""``siftlens repair --blocks K``: choose the fine-tuning options on a validation build, then report once on the
benchmark's evaluated splits.

    # 1. the grid, scored on a validation build only (make-spurious --splits holdout --holdout-start 700 --rho 0.5)
    python experiments/repair/repair_blocks.py grid --model runs/x/train-spurious/model \
        --candidates runs/x/discover-spurious \
        --control runs/c/model --control-candidates runs/x/discover-control --fit runs/x/spurious-cifar/train:5000 \
        --val runs/v/holdout --blocks 1,2,4 --lr 1e-4,3e-4,1e-3 \
        --out experiments/repair/results/repair-blocks-val.json
    # 2. the chosen settings, once, on the evaluated splits: `siftlens repair` then `siftlens prompt --policy drop`
    python experiments/repair/repair_blocks.py final --model ... --control ... --data runs/x/spurious-cifar \
        --fit-limit 20000 \
        --blocks 2 --epochs 3 --lr 1e-4 --head-start fit --work runs/repair3/final-fit \
        --control-base 'runs/x/prompt-control-{split}-base-drop' \
        --out experiments/repair/results/repair-blocks-seed1.json

``grid``: the fitting images are flagged once per model (the package's
:func:`siftlens.shortcuts.retraining.head.flagged_batches`); every variant is then fitted with the package's own
:func:`siftlens.shortcuts.retraining.head.retrain` (head-only L-BFGS fit, then the last ``blocks`` blocks, final norm
and head by AdamW) on a fresh copy of the model, and scored on ``--val`` with the flagged tokens dropped
(``repair+drop``) and with nothing dropped (``repair``). Scores per variant: the val set's
conflicting and aligned accuracy and worst ``class|group`` (as ``repair_holdout.py``); with ``--control``, the
same variants repair the clean control with its own discovery, and ``control_cost`` is the change of its overall
accuracy on the val set (repaired model as it is, points). ``blocks=0`` rows are today's head-only repair.

``--dilate 1`` grows the fitting images' flags by one patch (``siftlens repair --dilate``); with ``--val-dilate``
the val images are scored with flags grown the same way, as ``siftlens prompt --policy drop --dilate`` drops them
at test time (without it they keep the benchmark's flags). ``--cache-name control`` with the control as ``--model``
runs one model's grid alone (two such processes use two cores).

``final``: the CLI exactly as the benchmark runs it (``commands.log``): ``siftlens repair`` on ``--fit-limit``
training images, then ``siftlens prompt --policy drop ... --dilate D --limit 1000`` on ``aligned`` and
``conflicting`` for the repaired shortcut model and the repaired control; the control's repair cost is the mean
over the two splits of its accuracy change (as ``experiments/spurious/spurious.py``'s ``repair_cost``), against
``--control-base`` (the benchmark's own prompt runs of the unrepaired control).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_holdout import control_costs, scores  # noqa: E402

from siftlens.data import ImageSource  # noqa: E402
from siftlens.io import write_text  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.options import build  # noqa: E402
from siftlens.shortcuts.discovery.features import model_labels  # noqa: E402
from siftlens.shortcuts.discovery.vocabulary import load_vocabulary  # noqa: E402
from siftlens.shortcuts.retraining.blocks import frozen_tokens, tuned_predictions  # noqa: E402
from siftlens.shortcuts.retraining.head import (  # noqa: E402
    RepairConfig,
    _groups,
    flagged_batches,
    group_weights,
    pooled_features,
    retrain,
)

ROOT = Path(__file__).resolve().parents[2]


def flagged(model: str, images: str, limit: int | None, candidates: str, cache: Path, dilate: int = 0) -> dict:
    """One image set through discovery's flags (grown by ``dilate`` patches): x (n, 3, H, W) normalised, flag (n, N),
    shortcut (n,), labels (n,), aligned (n,) sidecar groups (1 = aligned)."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    be, src = load_backend(model, "cpu"), ImageSource(images, limit=limit)
    cfg = build(RepairConfig, dict(candidates=candidates, dilate=dilate))
    bs = list(flagged_batches(be, src, load_vocabulary(candidates), cfg, False))
    d = {k: np.concatenate([np.asarray(b[k]) for b in bs]) for k in ("x", "flag", "shortcut", "index")}
    d["labels"] = model_labels(src, be)[d["index"]]
    d["aligned"] = _groups(RepairConfig(candidates=candidates, groups="sidecar"), src, d, d["labels"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **d)
    return d


def tokens_of(model, d: dict, blocks: int, drop: bool) -> list[torch.Tensor]:
    """The frozen part's tokens of every image of ``d`` (its flagged tokens dropped or not)."""
    x, f = torch.from_numpy(d["x"]), torch.from_numpy(d["flag"] if drop else np.zeros_like(d["flag"]))
    return [t for s in range(0, len(x), 256) for t in frozen_tokens(model, x[s : s + 256], f[s : s + 256], blocks)]


def features_of(model, d: dict, pool: str) -> torch.Tensor:
    x, f = torch.from_numpy(d["x"]), torch.from_numpy(d["flag"])
    return torch.cat([pooled_features(model, x[s : s + 256], f[s : s + 256], pool) for s in range(0, len(x), 256)])


def variants(model: str, candidates: str, fit: tuple[str, int | None], val: str, cache: Path, grid: list[dict],
             val_dilate: bool = False) -> dict:
    """{variant name: {repair, repair+drop scores on val, fit}} for every setting of ``grid`` (and the old model).
    The val images are scored with the benchmark's flags (no dilation), or with ``val_dilate`` grown as the
    variant's fitting flags are (the ``drop --dilate`` policy at test time)."""
    base = load_backend(model, "cpu").model
    memo: dict = {}

    def get(key, fn, *args):  # computed once per key
        if key not in memo:
            memo[key] = fn(*args)
        return memo[key]

    def val_flags(dl: int) -> dict:
        name = f"val-dilate{dl}.npz" if dl else "val.npz"
        return get(("vd", dl), flagged, model, val, None, candidates, cache / name, dl)

    out = {}
    for dl in sorted({0} | {s["dilate"] for s in grid if val_dilate}):  # "before (old model)": the control's base
        vd = val_flags(dl)
        out["before (old model)" + (f" val-dilate{dl}" if dl else "")] = {
            name: scores(tuned_predictions(base, get(("v", 1, drop, dl), tokens_of, base, vd, 1, drop), 1, "model"),
                         vd["labels"], vd["aligned"]) for name, drop in (("repair", False), ("repair+drop", True))}
    for s in grid:
        cfg = build(RepairConfig, dict(candidates=candidates, **s))
        k, dl = max(cfg.blocks, 1), cfg.flags.dilate
        tag = f"-{fit[1]}" + (f"-dilate{dl}" if dl else "")
        fd = get(("fd", dl), flagged, model, fit[0], fit[1], candidates, cache / f"fit{tag}.npz", dl)
        y = fd["labels"]
        w, _ = group_weights(y, ((fd["shortcut"] >= 0) & (fd["shortcut"] != y)).astype(np.int64))
        d = {"features": get(("f", dl, cfg.pool), features_of, base, fd, cfg.pool),
             "tokens": get(("t", dl, cfg.blocks), tokens_of, base, fd, cfg.blocks, True) if cfg.blocks else []}
        m = copy.deepcopy(base)
        t0 = time.time()
        fit_res = retrain(m, d, y, w, cfg, progress=False)
        fit_res["seconds"] = round(time.time() - t0, 2)
        res = {"fit": fit_res}
        vdl = dl if val_dilate else 0
        vd = val_flags(vdl)
        for name, drop in (("repair", False), ("repair+drop", True)):
            toks = get(("v", k, drop, vdl), tokens_of, base, vd, k, drop)
            res[name] = scores(tuned_predictions(m, toks, k, cfg.pool), vd["labels"], vd["aligned"])
        name = " ".join(f"{a}={b:g}" if isinstance(b, float) else f"{a}={b}" for a, b in s.items())
        out[name] = res
        print(model.split("/")[-2], name, {n: res[n] for n in ("repair", "repair+drop")}, fit_res["seconds"], "s",
              flush=True)
    return out


def grid_main(a) -> dict:
    keys = ("blocks", "epochs", "lr", "pool", "l2", "head_start", "dilate")
    vals = [[int(v) for v in a.blocks.split(",")], [int(v) for v in a.epochs.split(",")],
            [float(v) for v in a.lr.split(",")], a.pool.split(","), [float(v) for v in a.l2.split(",")],
            a.head_start.split(","), [int(v) for v in a.dilate.split(",")]]
    grid = []
    for c in itertools.product(*vals):
        s = dict(zip(keys, c, strict=True))
        if not s["blocks"]:  # head-only: epochs, lr and start play no part
            s.update(epochs=3, lr=1e-4, head_start="fit")
        if s not in grid:
            grid.append(s)
    path, _, lim = a.fit.partition(":")
    fit = (path, int(lim) if lim else None)
    res = {"fit": a.fit, "val": a.val, "grid": grid,
           "shortcut": variants(a.model, a.candidates, fit, a.val, Path(a.cache) / a.cache_name, grid, a.val_dilate)}
    if a.control:
        ctl = variants(a.control, a.control_candidates, fit, a.val, Path(a.cache) / "control", grid, a.val_dilate)
        res["control_cost"] = control_costs(ctl, "before (old model)")
        res["control"] = ctl
    return res


def sh(args: list[str], log: Path) -> float:
    """Run ``python -m siftlens.cli ARGS`` (appending the command and its output to ``log``); returns seconds."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", *args], capture_output=True, text=True, cwd=ROOT)
    with log.open("a") as f:
        f.write(f"$ -m siftlens.cli {' '.join(args)}\n{r.stdout}{r.stderr[-2000:] if r.returncode else ''}")
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{r.stderr[-2000:]}")
    return round(time.time() - t0, 1)


def final_one(a, name: str, model: str, candidates: str, work: Path, log: Path) -> dict:
    """Repair one model with the chosen settings, then prompt it with `drop` on aligned and conflicting."""
    o = work / f"repair-{name}"
    opts = ["--blocks", str(a.blocks), "--epochs", str(a.epochs), "--lr", str(a.lr), "--pool", a.pool, "--l2",
            str(a.l2), "--head-start", a.head_start, "--limit", str(a.fit_limit), "--dilate", str(a.dilate)]
    wall = sh(["repair", "--model", model, "--images", str(Path(a.data) / "train"), "--candidates", candidates,
               "--out", str(o), "--groups", "discovery", "--no-progress", "--device", "cpu", *opts], log)
    rep = json.loads((o / "repair.json").read_text())
    out = {"repair": {"wall_seconds": wall, **{k: rep.get(k) for k in ("seconds", "train_accuracy_dropped",
                                                                          "finetune", "images")}}}
    for split in ("aligned", "conflicting"):
        p = work / f"prompt-{name}-{split}"
        sh(["prompt", "--model", str(o / "model"), "--images", str(Path(a.data) / split), "--out", str(p),
            "--no-progress", "--workers", "0", "--device", "cpu", "--policy", "drop", "--candidates", candidates,
            "--top-words", "5", "--score-ratio", "0.25", "--extent", "footprint", "--dilate", str(a.dilate),
            "--limit", str(a.prompt_limit)], log)
        s = json.loads((p / "prompting.json").read_text())
        out[split] = {k: {"accuracy": s[w]["overall"], "worst_group": s[w]["worst_group"]["accuracy"],
                          "worst_group_name": s[w]["worst_group"]["name"]}
                      for k, w in (("repair", "before"), ("repair+drop", "after"))}
    return out


def final_main(a) -> dict:
    a.blocks, a.epochs, a.lr, a.l2, a.dilate = int(a.blocks), int(a.epochs), float(a.lr), float(a.l2), int(a.dilate)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as ex:  # the two models side by side (OMP_NUM_THREADS=1 gives each one core)
        shortcut = ex.submit(final_one, a, "spurious", a.model, a.candidates, work, work / "commands-spurious.log")
        control = ex.submit(final_one, a, "control", a.control, a.control_candidates, work,
                            work / "commands-control.log")
        res = {"settings": {k: getattr(a, k) for k in ("blocks", "epochs", "lr", "pool", "l2", "head_start",
                                                       "dilate", "fit_limit", "prompt_limit")},
               "shortcut": shortcut.result(), "control": control.result()}
    base = {s: json.loads((Path(a.control_base.format(split=s)) / "prompting.json").read_text())["before"]["overall"]
            for s in ("aligned", "conflicting")}
    res["control_base"] = base
    res["repair_cost"] = round(sum(res["control"][s]["repair"]["accuracy"] - base[s] for s in base) / 2, 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("grid", "final"))
    for k in ("--model", "--candidates", "--out"):
        ap.add_argument(k, required=True)
    ap.add_argument("--control", help="the clean control model")
    ap.add_argument("--control-candidates", help="its discovery.json")
    ap.add_argument("--fit", help="grid: images[:limit]")
    ap.add_argument("--val", help="grid: the validation build's holdout split")
    ap.add_argument("--cache", default="runs/repair3/cache")
    ap.add_argument("--data", help="final: the SpuriousCIFAR build (train, aligned, conflicting)")
    ap.add_argument("--control-base", default="runs/spurious-full/glyphs/prompt-control-{split}-base-drop")
    ap.add_argument("--work", default="runs/repair3/final")
    ap.add_argument("--fit-limit", type=int, default=5000)
    ap.add_argument("--prompt-limit", type=int, default=1000)
    ap.add_argument("--blocks", default="1,2,4")
    ap.add_argument("--epochs", default="3")
    ap.add_argument("--lr", default="1e-4,3e-4,1e-3")
    ap.add_argument("--pool", default="model")
    ap.add_argument("--l2", default="1e-3")
    ap.add_argument("--head-start", default="fit")
    ap.add_argument("--dilate", default="0", help="grow the fitting images' flags (the scored ones: --val-dilate)")
    ap.add_argument("--val-dilate", action="store_true", help="grid: grow the val images' flags as the fitting ones")
    ap.add_argument("--cache-name", default="shortcut", help="grid: the cache folder of --model (control: 'control')")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    res = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch_threads": a.threads,
           **(grid_main(a) if a.mode == "grid" else final_main(a))}
    res["seconds"] = round(time.time() - t0, 1)
    write_text(a.out, json.dumps(res, indent=2, allow_nan=False))  # atomic; never NaN
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
