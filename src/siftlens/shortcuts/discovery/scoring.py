"""Statistics per (class, word) over the images predicted as the class, the scores, and the ranking.

Per (class c, word v), over the images *predicted* c: ``share`` (mean CLS attention on the patches holding
v), ``lift`` (that attention relative to uniform attention over the same patches), ``assoc`` (smoothed
log-odds of v being present in images predicted c minus that in the others) and, with object boxes,
``off_object``. ``score = share * max(assoc, 0) * (max(causal, 0) + 0.01)`` (times ``off_object``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .decision import COLUMNS, CROSS_COLUMNS, EXCESS_COLUMNS, INSERT_COLUMNS
from .features import Features, word_patches

CAUSAL_FLOOR = 0.01


def class_word_stats(f: Features, K: int, n_classes: int, smoothing: float = 0.5) -> pd.DataFrame:
    """Per (class, word) over images predicted class: share, lift, assoc, support (and off_object)."""
    n, N = f.attention.shape
    ti, tv, tp = word_patches(f, K, N)
    A = np.zeros((n, K))  # attention on word v's patches
    np.add.at(A, (ti, tv), f.attention[ti, tp])
    C = np.zeros((n, K))  # number of patches holding v
    np.add.at(C, (ti, tv), 1.0)
    present = C > 0
    kp_count = np.zeros((n, K))
    np.add.at(kp_count, (f.kp_image, f.words), 1.0)
    off = None
    if f.kp_inside is not None:
        off = np.zeros((n, K))
        np.add.at(off, (f.kp_image, f.words), (~f.kp_inside).astype(float))
    out = []
    a = smoothing
    for c in range(n_classes):
        mc = f.preds == c
        m1, m0 = int(mc.sum()), int((~mc).sum())
        if m1 == 0:
            continue
        n1 = present[mc].sum(0)
        n0 = present[~mc].sum(0)
        p1 = (n1 + a) / (m1 + 2 * a)
        p0 = (n0 + a) / (m0 + 2 * a)
        assoc = np.log(p1 / (1 - p1)) - np.log(p0 / (1 - p0))
        share = A[mc].sum(0) / m1
        cover = C[mc].sum(0) / N
        lift = np.where(cover > 0, A[mc].sum(0) / np.maximum(cover, 1e-12), np.nan)
        kpc = kp_count[mc].sum(0)
        df = pd.DataFrame({
            "class_index": c, "word": np.arange(K), "support": n1.astype(int), "images_predicted": m1,
            "present_in_class": n1 / m1, "present_elsewhere": n0 / max(m0, 1), "share": share, "lift": lift,
            "assoc": assoc, "keypoints": kpc.astype(int),
        })
        if off is not None:
            df["off_object"] = np.where(kpc > 0, off[mc].sum(0) / np.maximum(kpc, 1), np.nan)
        out.append(df)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def pre_score(df: pd.DataFrame) -> pd.Series:
    s = df["share"] * df["assoc"].clip(lower=0)
    if "off_object" in df:
        s = s * df["off_object"].fillna(0)
    return s


def final_score(df: pd.DataFrame) -> pd.Series:
    return pre_score(df) * (df["causal"].fillna(0).clip(lower=0) + CAUSAL_FLOOR)


def row_dict(r: pd.Series) -> dict:
    keys = ("word", "source", "rank", "score", "share", "lift", "assoc", "causal", "drop_fall", "control_fall",
            "effect", "effect_lo", "effect_hi", "p", "insert_rise", "insert_control_rise", "insert_effect",
            "insert_lo", "insert_hi", "insert_p", "cross_fall", "cross_control_fall", "cross_effect", "cross_lo",
            "cross_hi", "cross_p", "cross_q", "reference_effect", "excess", "excess_lo", "excess_hi", "excess_p", "q",
            "flagged", "causal_images", "support", "kp_per_patch",
            "present_in_class", "present_elsewhere", "off_object")
    out = {}
    for k in keys:
        if k in r:
            v = r[k]
            if k == "source":
                out[k] = str(v)
                continue
            if k == "flagged":
                out[k] = bool(v)
                continue
            if k == "causal_images":
                out[k] = None if pd.isna(v) else int(v)
                continue
            out[k] = None if pd.isna(v) else (int(v) if k in ("word", "rank", "support") else float(v))
    return out


def candidate_stats(f: Features, K: int, n_classes: int, smoothing: float, min_images: int) -> pd.DataFrame:
    """:func:`class_word_stats` with ``eligible``, ``pre_score``, empty causal and effect columns and
    ``flagged`` False."""
    stats = class_word_stats(f, K, n_classes, smoothing)
    stats["eligible"] = stats["support"] >= min_images
    stats["pre_score"] = pre_score(stats)
    for col in ("causal", "drop_fall", "control_fall", "halved_rate", "causal_images", *COLUMNS[:-1],
                "insert_rise", "insert_control_rise", *INSERT_COLUMNS, "cross_fall", "cross_control_fall",
                *CROSS_COLUMNS, "cross_q", "reference_effect", *EXCESS_COLUMNS):
        stats[col] = np.nan
    stats["flagged"] = False
    return stats


def causal_candidates(stats: pd.DataFrame, causal_top: int) -> pd.DataFrame:
    """Per class, the ``causal_top`` eligible rows with the largest ``pre_score`` (checked by occlusion)."""
    return (stats[stats["eligible"]].sort_values(["class_index", "pre_score"], ascending=[True, False])
            .groupby("class_index", sort=False).head(causal_top))


def rank(stats: pd.DataFrame, class_names: list[str], top: int) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Score and rank the eligible rows per class; returns the sorted table (with ``class``, ``score``,
    ``rank``) and per class its ``top`` best rows as dicts."""
    stats["score"] = final_score(stats)
    stats["rank"] = np.nan
    elig = stats[stats["eligible"]].sort_values(["class_index", "score", "pre_score"], ascending=[True, False, False])
    stats.loc[elig.index, "rank"] = elig.groupby("class_index").cumcount() + 1
    stats.insert(0, "class", [class_names[c] for c in stats["class_index"]])
    stats = stats.sort_values(["class_index", "rank", "word"], na_position="last").reset_index(drop=True)
    best = {}
    for c in class_names:
        rows = stats[(stats["class"] == c) & stats["rank"].notna()].head(top)
        best[c] = [row_dict(r) for _, r in rows.iterrows()]
    return stats, best
