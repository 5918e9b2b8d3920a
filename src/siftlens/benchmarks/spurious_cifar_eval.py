"""The SpuriousCIFAR benchmark's evaluation of a discovery (:mod:`siftlens.benchmarks.spurious_cifar`): against
its sidecar, the rank of each class's own marker among its candidates. The sidecar is never used for the
ranking itself."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..shortcuts.discovery.features import Features, word_patches
from ..shortcuts.discovery.pipeline import DiscoveryResult


def word_marker_purity(f: Features, sidecar: dict, K: int) -> pd.DataFrame:
    """Per word: its keypoints' share inside each marker class's boxes; ``marker`` = the majority marker
    class when that share is at least 0.5, else ''."""
    assert f.words is not None
    recs = sidecar["images"]
    classes = list(sidecar.get("classes") or sorted({r["marker"] for r in recs.values()}))
    cidx = {c: i for i, c in enumerate(classes)}
    n_img = len(f.names)
    mk = np.full(n_img, -1, np.int64)
    box = np.zeros((n_img, 4), np.float64)
    for i, name in enumerate(f.names):
        r = recs.get(name)
        if r is not None:
            mk[i] = cidx.get(r["marker"], -1)
            box[i] = r["box"]
    b = box[f.kp_image]
    x, y = f.kp_xy[:, 0], f.kp_xy[:, 1]
    inside = ((x >= b[:, 0] - 0.5) & (x < b[:, 2] - 0.5) & (y >= b[:, 1] - 0.5) & (y < b[:, 3] - 0.5)
              & (mk[f.kp_image] >= 0))
    counts = np.zeros((K, len(classes) + 1))
    col = np.where(inside, mk[f.kp_image], len(classes))
    np.add.at(counts, (f.words, col), 1.0)
    total = counts.sum(1)
    share = counts[:, :-1] / np.maximum(total, 1)[:, None]
    best = share.argmax(1)
    purity = share[np.arange(K), best]
    return pd.DataFrame({"word": np.arange(K), "keypoints": total.astype(int),
                         "marker": [classes[g] if p >= 0.5 else "" for g, p in zip(best, purity, strict=True)],
                         "purity": purity, "outside_markers": counts[:, -1] / np.maximum(total, 1)})


def evaluate_markers(result: DiscoveryResult, sidecar: dict) -> dict:
    """Rank of each class's own marker among its candidates: the best rank of a word attributed to it.

    Returns ``{"ranks": {class: rank or None}, "words": {class: word or None}, "rank1": share of classes
    with rank 1, "mean_rank_found": mean rank over the classes whose marker was found (or None),
    "missing": classes whose marker no ranked word belongs to, "marker_words": {class: its marker's words}}``
    (a word belongs to a marker by :func:`word_marker_purity`).
    """
    K = len(result.vocabulary) + (0 if result.regions is None else len(result.regions))
    pur = word_marker_purity(result.features, sidecar, K)
    attributed = dict(zip(pur["word"], pur["marker"], strict=True))
    ranks, words = {}, {}
    for c in result.class_names:
        rows = result.candidates[(result.candidates["class"] == c) & result.candidates["rank"].notna()]
        mine = np.array([attributed.get(int(w)) == c for w in rows["word"]], dtype=bool)
        hit = rows.loc[mine].sort_values("rank")
        ranks[c] = None if hit.empty else int(hit["rank"].iloc[0])
        words[c] = None if hit.empty else int(hit["word"].iloc[0])
    got = [r for r in ranks.values() if r is not None]
    return {
        "ranks": ranks, "words": words,
        "rank1": float(np.mean([r == 1 for r in ranks.values()])) if ranks else 0.0,
        "mean_rank_found": float(np.mean(got)) if got else None,
        "missing": [c for c, r in ranks.items() if r is None],
        "marker_words": {c: sorted(int(w) for w, m in attributed.items() if m == c) for c in result.class_names},
    }


def _marker_patch_masks(f: Features, sidecar: dict, N: int, P: int, gw: int, classes: list[str]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (n, N) bool of the patches the marker overlaps, and (n,) the marker's class index (-1)."""
    recs = sidecar["images"]
    cidx = {c: i for i, c in enumerate(classes)}
    on = np.zeros((len(f.names), N), bool)
    mk = np.full(len(f.names), -1, np.int64)
    for i, name in enumerate(f.names):
        r = recs.get(name)
        if r is None:
            continue
        mk[i] = cidx.get(r["marker"], -1)
        x0, y0, x1, y1 = r["box"]
        g = np.zeros((N // gw, gw), bool)
        g[y0 // P : (y1 - 1) // P + 1, x0 // P : (x1 - 1) // P + 1] = True
        on[i] = g.reshape(-1)
    return on, mk


def evaluate_patches(result: DiscoveryResult, sidecar: dict, P: int, grid: tuple[int, int],
                     ks: tuple[int, ...] = (1, 3, 5)) -> dict:
    """The patch rule: a candidate of class c is credited when at least half of its patches, in the images
    predicted c, lie on a class-c marker; the class's marker rank is the best rank of a credited candidate.

    Also ``precision_at``: per k, the share of the top-k candidates (pooled over classes) whose patches lie
    on *some* marker at least half of the time; ``on_marker``: per class, that share for each of its top 5;
    ``flagged_first_on_marker``: per class, whether its first flagged candidate (in rank order) is credited (None
    when discovery flagged nothing for it, or made no decision).
    """
    f = result.features
    N = grid[0] * grid[1]
    K = len(result.vocabulary) + (0 if result.regions is None else len(result.regions))
    classes = list(result.class_names)
    on, mk = _marker_patch_masks(f, sidecar, N, P, grid[1], classes)
    ti, tv, tp = word_patches(f, K, N)
    hit = on[ti, tp]
    C = len(classes)
    pred = f.preds[ti]
    key = tv * C + pred
    tot = np.bincount(key, minlength=K * C)
    own = np.bincount(key, weights=(hit & (mk[ti] == pred)).astype(float), minlength=K * C) / np.maximum(tot, 1)
    anym = np.bincount(key, weights=hit.astype(float), minlength=K * C) / np.maximum(tot, 1)
    ranks, own_share, flagged_first = {}, {}, {}
    pooled: dict[int, list[bool]] = {k: [] for k in ks}
    for ci, c in enumerate(classes):
        rows = result.candidates[(result.candidates["class"] == c) & result.candidates["rank"].notna()]
        rows = rows.sort_values("rank")
        words = rows["word"].to_numpy(int)
        o, a = own[words * C + ci], anym[words * C + ci]
        good = np.flatnonzero(o >= 0.5)
        ranks[c] = int(rows["rank"].iloc[good[0]]) if len(good) else None
        own_share[c] = [round(float(v), 4) for v in o[:5]]
        fl = rows["flagged"].astype(bool).to_numpy() if "flagged" in rows else np.zeros(len(rows), bool)
        flagged_first[c] = bool(o[np.flatnonzero(fl)[0]] >= 0.5) if fl.any() else None
        for k in ks:
            pooled[k] += (a[:k] >= 0.5).tolist()
    return {"rule": "patches", "ranks": ranks, "rank1": float(np.mean([r == 1 for r in ranks.values()])),
            "rank1_count": int(sum(r == 1 for r in ranks.values())), "on_marker": own_share,
            "precision_at": {str(k): float(np.mean(v)) if v else 0.0 for k, v in pooled.items()},
            "missing": [c for c, r in ranks.items() if r is None], "flagged_first_on_marker": flagged_first}
