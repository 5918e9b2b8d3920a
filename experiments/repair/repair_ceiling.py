"""How far can any head-only repair go on a shortcut model's encoder? A ceiling diagnostic for ``siftlens repair``.

    python experiments/repair/repair_ceiling.py --model spurious=runs/x/train-spurious/model \
        --model control=runs/c/model \
        --spurious runs/x/spurious-cifar --cifar-test $CIFAR/test --out experiments/repair/results/repair-ceiling.json

Per model, pooled features (the CLS token, and the mean of the patch tokens) are computed with the package's own
code (:func:`siftlens.shortcuts.retraining.head.pooled_features`) on

- the SpuriousCIFAR ``conflicting`` and ``aligned`` splits, with the marker's patches dropped (the oracle's mask:
  every patch the sidecar box overlaps, ``experiments/spurious/spurious_eval.py``) and without dropping anything;
- clean CIFAR-10 test images (the same source images, no marker).

A linear head (:func:`siftlens.shortcuts.retraining.head.fit_head`, not started from the old head, no re-weighting) is
fitted with the true class labels and scored by 2-fold cross-validation. The folds split the CIFAR-10 *source* images
(stratified by class, seeded), so a head trained on one fold of split A and tested on the other fold of split B never
sees a
test image's source picture, with or without a marker. The cross-validated accuracy of a head fitted on the
evaluation distribution itself (conflicting, marker dropped) bounds what any head-only repair can reach on this
encoder. ``eval`` rows restrict the scores to the images the benchmark evaluates (``--prompt-limit 1000``: the
first 100 per class); ``worst`` is the worst class there (on the conflicting split, the worst ``class|group``).
Rows are reported for every ``--l2`` value; the best of them is an optimistic ceiling. A last row fits a
one-hidden-layer MLP head instead (``--mlp-epochs``, weight decay 1e-2): does a non-linear head read more out of the
same features?
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spurious"))  # spurious_eval.marker_patches
from spurious_eval import marker_patches  # noqa: E402

from siftlens.data import ImageSource  # noqa: E402
from siftlens.io import write_text  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.shortcuts.groups import read_sidecar  # noqa: E402
from siftlens.shortcuts.retraining.head import fit_head, pooled_features  # noqa: E402

POOLS = ("cls", "mean")
EVAL_PER_CLASS = 100  # spurious.py --prompt-limit 1000: ImageSource's spread takes the first 100 per class


def features(model: str, images: str, cache: Path, oracle: bool, limit: int | None, batch: int = 256) -> dict:
    """{pool: (n, D) float32, labels (n,), names (n,)} for one split and mask, cached as .npz."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    be = load_backend(model, "cpu")
    src = ImageSource(images, limit=limit)
    side = read_sidecar(Path(images) / "markers.json") if oracle else None
    names = src.names
    idx = {c: i for i, c in enumerate(be.class_names)}
    labels = np.array([idx[n.split("/", 1)[0]] for n in names], np.int64)
    out: dict[str, list] = {p: [] for p in POOLS}
    N = be.grid_size[0] * be.grid_size[1]
    for s in range(0, len(src), batch):
        part = names[s : s + batch]
        x = be.normalize(torch.from_numpy(np.stack([be.preprocess(src.load(i)) for i in range(s, s + len(part))])))
        drop = (torch.from_numpy(marker_patches(part, side, be.patch_size, tuple(be.grid_size))) if oracle
                else torch.zeros((len(part), N), dtype=torch.bool))
        for p in POOLS:
            out[p].append(pooled_features(be.model, x, drop, p).numpy())
    res = {**{p: np.concatenate(v).astype(np.float32) for p, v in out.items()}, "labels": labels,
           "names": np.array([n.rsplit(".", 1)[0] for n in names])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **res)
    return res


def folds(names: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, int]:
    """Source image name (without extension) -> fold 0/1, stratified by class, seeded."""
    out = {}
    for y in np.unique(labels):
        ix = np.flatnonzero(labels == y)
        perm = np.random.default_rng([seed, int(y)]).permutation(len(ix))
        for r, i in enumerate(ix[perm]):
            out[str(names[i])] = r % 2
    return out


def evaluate(train: dict, test: dict, fold: dict[str, int], pool: str, l2: float, iters: int,
             n_classes: int, weights: np.ndarray | None = None) -> dict:
    """2-fold cross-validated accuracy: fit on train's fold f, predict test's fold 1 - f."""
    pred = np.full(len(test["labels"]), -1)
    ftr = np.array([fold[n] for n in train["names"]])
    fte = np.array([fold[n] for n in test["names"]])
    for f in (0, 1):
        m = ftr == f
        w = torch.ones(int(m.sum())) if weights is None else torch.from_numpy(weights[m]).float()
        head = fit_head(torch.from_numpy(train[pool][m]), torch.from_numpy(train["labels"][m]), w, n_classes,
                        l2, iters)
        with torch.no_grad():
            pred[fte == 1 - f] = head(torch.from_numpy(test[pool][fte == 1 - f])).argmax(1).numpy()
    hit = pred == test["labels"]
    k = np.array([int(n.rsplit("/", 1)[1]) for n in test["names"]])
    ev = k < EVAL_PER_CLASS
    per_class = [float(hit[ev & (test["labels"] == y)].mean()) for y in range(n_classes)]
    return {"accuracy": round(float(hit.mean()), 4), "images": int(len(hit)),
            "eval_accuracy": round(float(hit[ev].mean()), 4), "eval_images": int(ev.sum()),
            "eval_worst_class": round(min(per_class), 4)}


def fit_mlp(x: torch.Tensor, y: torch.Tensor, n_classes: int, wd: float, hidden: int = 512, epochs: int = 300,
            seed: int = 0) -> torch.nn.Module:
    """A one-hidden-layer MLP head (GELU), full-batch AdamW: a non-linear head, for the ceiling's last row."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=wd)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def evaluate_mlp(data: dict, fold: dict[str, int], pool: str, epochs: int, n_classes: int) -> dict:
    """2-fold cross-validated accuracy of :func:`fit_mlp` within one split."""
    pred = np.full(len(data["labels"]), -1)
    f_ = np.array([fold[n] for n in data["names"]])
    for f in (0, 1):
        net = fit_mlp(torch.from_numpy(data[pool][f_ == f]), torch.from_numpy(data["labels"][f_ == f]), n_classes,
                      1e-2, epochs=epochs)
        with torch.no_grad():
            pred[f_ == 1 - f] = net(torch.from_numpy(data[pool][f_ == 1 - f])).argmax(1).numpy()
    hit = pred == data["labels"]
    k = np.array([int(n.rsplit("/", 1)[1]) for n in data["names"]])
    ev = k < EVAL_PER_CLASS
    per_class = [float(hit[ev & (data["labels"] == y)].mean()) for y in range(n_classes)]
    return {"accuracy": round(float(hit.mean()), 4), "eval_accuracy": round(float(hit[ev].mean()), 4),
            "eval_worst_class": round(min(per_class), 4)}


def old_head(model: str, test: dict) -> dict:
    """The model's own head on the same features (CLS pool: a check against the prompt/oracle runs)."""
    be = load_backend(model, "cpu")
    with torch.no_grad():
        pred = be.model.head(torch.from_numpy(test["cls"])).argmax(1).numpy()
    hit = pred == test["labels"]
    k = np.array([int(n.rsplit("/", 1)[1]) for n in test["names"]])
    return {"accuracy": round(float(hit.mean()), 4), "eval_accuracy": round(float(hit[k < EVAL_PER_CLASS].mean()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="label=model folder (repeat)")
    ap.add_argument("--spurious", required=True, help="the SpuriousCIFAR build (aligned/, conflicting/)")
    ap.add_argument("--cifar-test", required=True, help="clean CIFAR-10 test images (ImageFolder)")
    ap.add_argument("--limit", type=int, default=None, help="images per split (spread over classes)")
    ap.add_argument("--l2", default="0,1e-5,1e-4,1e-3,1e-2")
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--mlp-epochs", default="50,100,200", help="full-batch epochs of the MLP head row ('' = none)")
    ap.add_argument("--cache", default="runs/repair-ceiling")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/repair/results/repair-ceiling.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    l2s = [float(v) for v in a.l2.split(",")]
    sp = Path(a.spurious)
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "l2": l2s, "iters": a.iters,
                 "mlp_epochs": a.mlp_epochs, "spurious": str(sp), "cifar_test": a.cifar_test, "limit": a.limit,
                 "models": {}}
    for spec in a.model:
        label, path = spec.split("=", 1)
        cache = Path(a.cache) / label
        data = {"conflicting/oracle": features(path, str(sp / "conflicting"), cache / "conf-oracle.npz", True, a.limit),
                "conflicting/none": features(path, str(sp / "conflicting"), cache / "conf-none.npz", False, a.limit),
                "aligned/oracle": features(path, str(sp / "aligned"), cache / "al-oracle.npz", True, a.limit),
                "clean": features(path, a.cifar_test, cache / "clean.npz", False, a.limit)}
        n_classes = int(data["clean"]["labels"].max()) + 1
        fold = folds(data["clean"]["names"], data["clean"]["labels"])
        both = {k: np.concatenate([data["aligned/oracle"][k], data["conflicting/oracle"][k]])
                for k in data["clean"]}
        n_al = len(data["aligned/oracle"]["labels"])
        group = np.r_[np.zeros(n_al, int), np.ones(len(both["labels"]) - n_al, int)]
        cell = both["labels"] * 2 + group
        balanced = (len(cell) / len(np.unique(cell))) / np.bincount(cell)[cell]
        rows = {}
        for name, tr, te, w in [("conflicting/oracle -> conflicting/oracle", "conflicting/oracle",
                                 "conflicting/oracle", None),
                                ("conflicting/none -> conflicting/none", "conflicting/none", "conflicting/none", None),
                                ("aligned/oracle -> aligned/oracle", "aligned/oracle", "aligned/oracle", None),
                                ("clean -> clean", "clean", "clean", None),
                                ("clean -> conflicting/oracle", "clean", "conflicting/oracle", None),
                                ("aligned/oracle -> conflicting/oracle", "aligned/oracle", "conflicting/oracle", None),
                                ("aligned+conflicting/oracle, groups balanced -> conflicting/oracle", "both",
                                 "conflicting/oracle", balanced)]:
            train = both if tr == "both" else data[tr]
            for pool in POOLS:
                for l2 in l2s:
                    rows.setdefault(name, {}).setdefault(pool, {})[f"{l2:g}"] = evaluate(
                        train, data[te], fold, pool, l2, a.iters, n_classes, w)
                    print(name, pool, l2, rows[name][pool][f"{l2:g}"], flush=True)
        mlp_row = "MLP head: conflicting/oracle -> conflicting/oracle"
        for pool in POOLS:
            for ep in (int(v) for v in a.mlp_epochs.split(",") if v):
                rows.setdefault(mlp_row, {}).setdefault(pool, {})[f"epochs={ep}"] = evaluate_mlp(
                    data["conflicting/oracle"], fold, pool, ep, n_classes)
                print(mlp_row, pool, ep, rows[mlp_row][pool][f"epochs={ep}"], flush=True)
        res["models"][label] = {"model": path, "old_head": {k: old_head(path, v) for k, v in data.items()},
                                "cv": rows}
    res["seconds"] = round(time.time() - t0, 1)
    write_text(a.out, json.dumps(res, indent=2, allow_nan=False))  # atomic; never NaN
    print(f"written {a.out}")


if __name__ == "__main__":
    main()
