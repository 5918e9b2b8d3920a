"""Choosing ``siftlens repair``'s options on a validation set: which images to fit on (the training split, or a
held-out split the model never trained on), pseudo-groups, start from the old head or not, l2, CLS or mean pooling.

    python experiments/repair/repair_holdout.py --model runs/x/train-spurious/model \
        --candidates runs/x/discover-spurious \
        --fit train=runs/x/spurious-cifar/train:5000 --fit holdout=runs/h/holdout --val runs/v/holdout \
        --control runs/c/model --control-candidates runs/x/discover-control \
        --out experiments/repair/results/repair-holdout.json

Every variant's head is fitted with the package's own code
(:func:`siftlens.shortcuts.retraining.head.dropped_features`,
:func:`~siftlens.shortcuts.retraining.head.group_weights`, :func:`~siftlens.shortcuts.retraining.head.fit_head`) and
scored on ``--val``, a SpuriousCIFAR ``holdout`` build disjoint from the fitting images and from the benchmark's
evaluation images (for example ``make-spurious --splits holdout --holdout-start 700 --rho 0.5``: half its images carry
a wrong marker).
Per variant: the accuracy on the val set's conflicting and aligned images and its worst ``class|group``, for the
repaired model as it is and with discovery's flagged tokens dropped (``repair+drop``). With ``--control``, the
same variants repair the clean control with its own discovery, and ``control_cost`` is the change of its accuracy
on the val set (repaired model as it is, points). The seed-1 evaluation splits are never read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_ceiling import features as plain_features  # noqa: E402

from siftlens.data import ImageSource  # noqa: E402
from siftlens.io import write_text  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.shortcuts.discovery.features import model_labels  # noqa: E402
from siftlens.shortcuts.discovery.vocabulary import load_vocabulary  # noqa: E402
from siftlens.shortcuts.groups import read_sidecar  # noqa: E402
from siftlens.shortcuts.retraining.head import RepairConfig, _groups, dropped_features, fit_head, group_weights  # noqa: E402

POOLS = ("cls", "mean")


def flagged(model: str, images: str, limit: int | None, candidates: str, pool: str, cache: Path) -> dict:
    """Discovery-dropped features of one image set: features, shortcut class, labels, names, sidecar groups."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    be = load_backend(model, "cpu")
    src = ImageSource(images, limit=limit)
    cfg = RepairConfig(candidates=candidates, pool=pool)
    d = dropped_features(be, src, load_vocabulary(candidates), cfg, progress=False)
    y = model_labels(src, be)[d["index"]]
    sidecar = _groups(RepairConfig(candidates=candidates, groups="sidecar"), src, d, y)  # 1 = aligned
    res = {"features": d["features"].numpy(), "shortcut": d["shortcut"], "labels": y,
           "names": np.array([src.names[i].rsplit(".", 1)[0] for i in d["index"]]), "aligned": sidecar}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **res)
    return res


def scores(pred: np.ndarray, y: np.ndarray, aligned: np.ndarray) -> dict:
    hit = pred == y
    cells = {(c, g): hit[(y == c) & (aligned == g)] for c in np.unique(y) for g in (0, 1)}
    worst = {g: min(float(v.mean()) for (_, gg), v in cells.items() if gg == g and len(v)) for g in (0, 1)}
    return {"conflicting": round(float(hit[aligned == 0].mean()), 4),
            "aligned": round(float(hit[aligned == 1].mean()), 4), "overall": round(float(hit.mean()), 4),
            "worst_conflicting": round(worst[0], 4),
            "worst_group": round(min(worst.values()), 4)}


def variants(model: str, candidates: str, fits: dict, val: str, cache: Path, grid: dict) -> dict:
    """{variant name: scores on val} for every fit set x pool x groups x init x l2."""
    be = load_backend(model, "cpu")
    old = be.model.head
    C = old.out_features
    plain_val = plain_features(model, val, cache / "val-plain.npz", False, None)
    out = {}
    for pool in grid["pool"]:
        vd = flagged(model, val, None, candidates, pool, cache / f"val-{pool}.npz")
        order = {n: i for i, n in enumerate(plain_val["names"])}
        vp = plain_val[pool][[order[n] for n in vd["names"]]]
        for fit_name, (images, limit) in fits.items():
            fd = flagged(model, images, limit, candidates, pool, cache / f"fit-{fit_name}-{pool}.npz")
            x, y = torch.from_numpy(fd["features"]), fd["labels"]
            for groups, init, l2 in itertools.product(grid["groups"], grid["init"], grid["l2"]):
                g = {"discovery": ((fd["shortcut"] >= 0) & (fd["shortcut"] != y)).astype(np.int64),
                     "sidecar": fd["aligned"], "none": np.zeros(len(y), np.int64)}[groups]
                w, _ = group_weights(y, g)
                head = fit_head(x, torch.from_numpy(y), torch.from_numpy(w).float(), C, l2, 200,
                                init=old if init == "old" else None)
                with torch.no_grad():
                    p_drop = head(torch.from_numpy(vd["features"])).argmax(1).numpy()
                    p_plain = head(torch.from_numpy(vp)).argmax(1).numpy()
                name = f"fit={fit_name} pool={pool} groups={groups} init={init} l2={l2:g}"
                out[name] = {"repair": scores(p_plain, vd["labels"], vd["aligned"]),
                             "repair+drop": scores(p_drop, vd["labels"], vd["aligned"])}
                print(name, out[name], flush=True)
        if pool == "cls":
            with torch.no_grad():
                out["before (old head)"] = {
                    "repair": scores(old(torch.from_numpy(vp)).argmax(1).numpy(), vd["labels"], vd["aligned"]),
                    "repair+drop": scores(old(torch.from_numpy(vd["features"])).argmax(1).numpy(), vd["labels"],
                                          vd["aligned"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--candidates", required=True)
    ap.add_argument("--fit", action="append", required=True, help="name=images[:limit] (repeat)")
    ap.add_argument("--val", required=True)
    ap.add_argument("--control")
    ap.add_argument("--control-candidates")
    ap.add_argument("--l2", default="1e-4,1e-3,1e-2,1e-1")
    ap.add_argument("--groups", default="discovery,sidecar,none")
    ap.add_argument("--init", default="old,fresh")
    ap.add_argument("--pool", default="cls,mean")
    ap.add_argument("--cache", default="runs/repair-holdout")
    ap.add_argument("--out", default="experiments/repair/results/repair-holdout.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    fits = {}
    for spec in a.fit:
        name, rest = spec.split("=", 1)
        path, _, lim = rest.partition(":")
        fits[name] = (path, int(lim) if lim else None)
    grid = {"l2": [float(v) for v in a.l2.split(",")], "groups": a.groups.split(","), "init": a.init.split(","),
            "pool": a.pool.split(",")}
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "val": a.val,
                 "val_images": len(read_sidecar(Path(a.val) / "markers.json")["images"]), "fits": fits, "grid": grid,
                 "shortcut": variants(a.model, a.candidates, fits, a.val, Path(a.cache) / "shortcut", grid)}
    if a.control:
        ctl = variants(a.control, a.control_candidates, fits, a.val, Path(a.cache) / "control", grid)
        res["control_cost"] = control_costs(ctl, "before (old head)")
        res["control"] = ctl
    res["seconds"] = round(time.time() - t0, 1)
    write_text(a.out, json.dumps(res, indent=2, allow_nan=False))  # atomic; never NaN
    print(f"written {a.out}")



def control_costs(ctl: dict, before: str) -> dict:
    """Each control variant's change in overall validation accuracy against variant ``before``, in points."""
    base = ctl[before]["repair"]["overall"]
    return {k: round(100 * (v["repair"]["overall"] - base), 2) for k, v in ctl.items()}

if __name__ == "__main__":
    main()
