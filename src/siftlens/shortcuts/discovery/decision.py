"""Deciding: a flag is a tested claim (docs/method.md, "Shortcut discovery").

For each candidate (class c, word v) checked by occlusion, the causal check records per image i (predicted c,
holding v) the paired difference ``d_i = fall of p(c) with v's patches occluded - fall with the matched control
patches occluded``. From those:

- ``effect``: the mean of d (the same number as the ``causal`` column);
- ``effect_lo``, ``effect_hi``: a 95% percentile bootstrap interval of that mean over images
  (:func:`siftlens.core.stats.bootstrap_ci`, seeded). A bootstrap rather than a t interval: the differences are
  bounded falls of a probability, often skewed (many images near 0, a few large falls), and there is no t
  distribution in the project's dependencies;
- ``p``: one-sided p-value for "effect <= 0" by the paired sign-flip (randomisation) test: if occluding v is no
  worse than occluding its control, each image's difference is as likely to have either sign, so the observed sum
  is compared with the sums under all ``2^n`` sign patterns: exactly for n <= :data:`EXACT_MAX`, beyond that by
  the normal approximation of that distribution (mean 0, variance ``sum d_i^2``: ``z = sum d / sqrt(sum d^2)``,
  :func:`siftlens.core.stats.normal_two_sided_p` halved). It needs no normality of the differences, so it holds
  for the small, skewed samples of the check; the smallest p that n images can give is ``2^-n`` (about
  ``Phi(-sqrt n)`` beyond the exact range), so a claim over many candidates needs enough images per candidate
  (``--causal-images``, default 32; 8 images give at best 0.004, too little to survive BH over ~100 tests);
- ``q``: Benjamini-Hochberg over every candidate tested in the run (:func:`siftlens.core.stats.bh_qvalues`);
- ``flagged``: ``q < alpha`` and ``effect >= min_effect``.

With fewer than :data:`MIN_IMAGES` images the interval, p and q are empty (NaN) and the candidate is not flagged.
A class with no flagged candidate has "no shortcut found" (:data:`NO_SHORTCUT`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...core.stats import bh_qvalues, bootstrap_ci, normal_two_sided_p

MIN_IMAGES = 2
EXACT_MAX = 16  # exact enumeration of the 2^n sign patterns up to n = 16 (65,536 patterns)
N_BOOT = 2000
NO_SHORTCUT = "no shortcut found"
SHORTCUT = "shortcut found"
TEST = ("paired sign-flip test of the per-image differences (word occluded - matched control occluded), "
        "one-sided for effect > 0; 95% percentile bootstrap CI over images; Benjamini-Hochberg q over every "
        "candidate tested")
COLUMNS = ("effect", "effect_lo", "effect_hi", "p", "q", "flagged")


def sign_flip_p(d) -> float:
    """One-sided p-value of "mean(d) <= 0" by the paired sign-flip test (see the module); NaN for n < 2."""
    d = np.asarray(d, np.float64)
    n = len(d)
    if n < MIN_IMAGES:
        return float("nan")
    obs, ss = d.sum(), float(np.sum(d * d))
    if ss == 0.0:
        return 1.0  # every difference is zero: every sign pattern ties with the observed sum
    if n <= EXACT_MAX:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # every pattern once
        return float(np.mean(signs @ d >= obs - 1e-12 * np.sqrt(ss)))
    z = obs / np.sqrt(ss)
    half = 0.5 * float(normal_two_sided_p(np.array([z]))[0])
    return half if z > 0 else 1.0 - half


def paired_effect(d, seed: int = 0, n_boot: int = N_BOOT, alpha: float = 0.05) -> dict:
    """Effect of one candidate from its per-image paired differences ``d``: ``effect`` (mean), ``effect_lo`` and
    ``effect_hi`` (percentile bootstrap ``1 - alpha`` interval, ``seed``-ed) and ``p`` (one-sided sign-flip test);
    with n < 2 images only the mean (n = 1) is given, the rest NaN."""
    d = np.asarray(d, np.float64)
    out = {"effect": float(d.mean()) if len(d) else np.nan, "effect_lo": np.nan, "effect_hi": np.nan, "p": np.nan}
    if len(d) >= MIN_IMAGES:
        lo, hi = bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)
        out.update(effect_lo=float(lo), effect_hi=float(hi), p=sign_flip_p(d))
    return out


def decide(stats: pd.DataFrame, alpha: float = 0.05, min_effect: float = 0.05) -> pd.DataFrame:
    """Add ``q`` (BH over every row with a p-value: every candidate tested in the run) and ``flagged``
    (``q < alpha`` and ``effect >= min_effect``) to ``stats`` (in place; returned)."""
    stats["q"] = bh_qvalues(stats["p"].to_numpy(np.float64)) if len(stats) else np.nan
    stats["flagged"] = (stats["q"] < alpha).to_numpy() & (stats["effect"] >= min_effect).to_numpy()
    return stats


def verdicts(stats: pd.DataFrame, class_names: list[str]) -> dict[str, dict]:
    """Per class: the flagged words (in rank order), how many candidates were tested, and the verdict
    (:data:`SHORTCUT` or :data:`NO_SHORTCUT`)."""
    out = {}
    for c in class_names:
        rows = stats[stats["class"] == c]
        fl = rows[rows["flagged"].astype(bool)].sort_values(["rank", "word"], na_position="last")
        out[c] = {"verdict": SHORTCUT if len(fl) else NO_SHORTCUT,
                  "flagged": [int(w) for w in fl["word"]], "tested": int(rows["p"].notna().sum())}
    return out
