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

The insertion test (``--causal-test insert``, :mod:`siftlens.shortcuts.discovery.causal`) records the same
statistics of its own paired differences (the rise of p(class) when v's patches are pasted into an image
predicted as another class, minus the rise when the matched control patches are pasted) as ``insert_effect``,
``insert_lo``, ``insert_hi`` and ``insert_p``. With ``--causal-test both`` a candidate is flagged only when both
tests pass: ``q`` is then the larger of the two BH q-values (an intersection-union test, still at level alpha).

The cross-class test (``--causal-test cross``) confirms an occlusion flag on *labelled* images of the other
classes. Occlusion measures images predicted as c, so it cannot tell a shortcut from a feature the class really
has (a wheel of a car): both lower p(c) when occluded. The two differ where the word appears in an image whose
label is another class: a shortcut pulls that image towards c (the conflicting errors of a shortcut model), a
core feature of c rarely overrides another class's evidence. So for images labelled c' != c that hold v, the same
paired difference (fall of p(c) with v's patches occluded minus the fall with matched control patches occluded,
where a control that *raises* p(c) counts as no fall: in another class's image the control patches can remove that
class's own evidence, which lifts p(c) and would credit any word with an effect; so this test is conservative)
gives ``cross_effect``, ``cross_lo``, ``cross_hi`` and ``cross_p``. A flag needs occlusion's, then a confirmation:
``cross_q`` (Benjamini-Hochberg over the candidates occlusion flagged, a second family on other images) below
alpha and ``cross_effect`` at least ``min_effect``. It needs labels, and images of other classes that carry the
word: a word seen only in its own class cannot be confirmed (nothing in labelled data tells such a shortcut from a
core feature).

The reference test (``--causal-test reference``, with ``--reference MODEL``: the model the checked one was
fine-tuned from, or any model with the same classes trained on clean data) asks whether the checked model leans on
the word *more than* the reference does. Occlusion cannot tell a shortcut the fine-tuning taught from a correlation
every model of the task learns (the sky of an airplane, on a control that never relied on a marker): both lower
p(c). A reference that never saw the bias shows the second and not the first. The same images, word patches and
control patches are occluded in the reference, giving its own paired difference ``r_i``; the excess ``d_i - r_i``
gives ``excess``, ``excess_lo``, ``excess_hi`` and ``excess_p`` (``reference_effect`` is the mean of r). A flag
needs both tests, as with ``both``: ``q`` is the larger of the two BH q-values over every candidate tested, and
both ``effect`` and ``excess`` at least ``min_effect``.

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
_STATS = ("one-sided for effect > 0; 95% percentile bootstrap CI over images; Benjamini-Hochberg q over every "
          "candidate tested")
TEST = {  # the decision's test, as discovery.json records it, per --causal-test
    "occlude": f"paired sign-flip test of the per-image differences (word occluded - matched control occluded), "
               f"{_STATS}",
    "insert": f"paired sign-flip test of the per-image differences (rise of p(class) with the word's patches pasted "
              f"into an image predicted as another class - rise with the matched control patches pasted), {_STATS}",
    "both": f"both paired sign-flip tests (occlusion and insertion), {_STATS} within each; flagged when both pass "
            f"(q: the larger)",
    "cross": f"paired sign-flip test of the per-image differences (word occluded - matched control occluded) on the "
             f"images predicted as the class, {_STATS}; each flag then confirmed by the same test on images labelled "
             f"as another class that hold the word (cross_q: Benjamini-Hochberg over the flagged candidates)",
    "reference": f"paired sign-flip tests of the per-image differences (word occluded - matched control occluded) in "
                 f"the checked model, and of their excess over the same differences in the reference model, "
                 f"{_STATS} within each; flagged when both pass (q: the larger)",
}
COLUMNS = ("effect", "effect_lo", "effect_hi", "p", "q", "flagged")
INSERT_COLUMNS = ("insert_effect", "insert_lo", "insert_hi", "insert_p")
CROSS_COLUMNS = ("cross_effect", "cross_lo", "cross_hi", "cross_p")
EXCESS_COLUMNS = ("excess", "excess_lo", "excess_hi", "excess_p")
# the columns each causal test decides on: (p-value, effect)
TEST_COLUMNS = {"occlude": ("p", "effect"), "insert": ("insert_p", "insert_effect"),
                "reference": ("excess_p", "excess")}  # cross: _confirm_across_classes
CAUSAL_TESTS = ("occlude", "insert", "both", "cross", "reference")


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


def tests_of(test: str) -> tuple[str, ...]:
    """The causal tests a decision needs: ``occlude``, ``insert``, both, ``occlude`` and ``cross``, or ``occlude``
    and ``reference``."""
    return {"both": ("occlude", "insert"), "cross": ("occlude", "cross"),
            "reference": ("occlude", "reference")}.get(test, (test,))


def decide(stats: pd.DataFrame, alpha: float = 0.05, min_effect: float = 0.05, test: str = "occlude",
           region_min_effect: float = 0.0) -> pd.DataFrame:
    """Add ``q`` (BH over every row with a p-value: every candidate tested in the run) and ``flagged``
    (``q < alpha`` and ``effect >= min_effect``) to ``stats`` (in place; returned). ``test``: ``occlude``
    decides on ``p`` and ``effect``, ``insert`` on ``insert_p`` and ``insert_effect``, ``both`` on both (``q``
    the larger of the two q-values, and both effects at least ``min_effect``), ``reference`` likewise on occlusion and
    its excess over the reference (``excess_p``, ``excess``); ``cross`` decides on occlusion, then
    confirms its flags by the cross-class test (:func:`_confirm_across_classes`). ``region_min_effect``: a region
    word (``source`` "region") also needs an occlusion ``effect`` of at least this (no bar beyond ``min_effect``
    when smaller)."""
    if test == "cross":
        return _confirm_across_classes(decide(stats, alpha, min_effect, "occlude", region_min_effect), alpha,
                                       min_effect)
    q = np.zeros(len(stats))
    big = np.ones(len(stats), bool)
    for t in tests_of(test):
        p_col, effect_col = TEST_COLUMNS[t]
        q = np.maximum(q, bh_qvalues(stats[p_col].to_numpy(np.float64)) if len(stats) else q)
        big &= stats[effect_col].to_numpy(np.float64) >= min_effect
    if region_min_effect > min_effect and "source" in stats:
        big &= ~((stats["source"] == "region").to_numpy() & (stats["effect"].to_numpy(np.float64) < region_min_effect))
    stats["q"] = q
    stats["flagged"] = (q < alpha) & big
    return stats


def _confirm_across_classes(stats: pd.DataFrame, alpha: float, min_effect: float) -> pd.DataFrame:
    """The cross-class test's confirmation of occlusion's flags, a second family: ``cross_q`` is Benjamini-Hochberg
    over the cross-class p-values of the candidates occlusion flagged (NaN elsewhere), and a flag stays only with
    ``cross_q < alpha`` and ``cross_effect >= min_effect``. The images of the two tests differ (predicted as the class;
    labelled as another), so the confirmation is tested on data the screening did not use."""
    first = stats["flagged"].to_numpy(bool)
    q2 = np.full(len(stats), np.nan)
    if first.any():
        q2[first] = bh_qvalues(stats.loc[first, "cross_p"].to_numpy(np.float64))
    stats["cross_q"] = q2
    stats["flagged"] = first & (q2 < alpha) & (stats["cross_effect"].to_numpy(np.float64) >= min_effect)
    return stats


def _number(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def claim_text(r: dict, test: str, fmt=_number) -> str:
    """A flagged candidate's effect(s) as the decision used them: ``effect 0.12 [0.08, 0.16]`` (occlusion),
    ``insertion 0.20 [0.15, 0.26]``, or both; ``r`` a candidate row as a dict, ``fmt`` formats one number."""
    parts = {"occlude": f"effect {fmt(r['effect'])} [{fmt(r['effect_lo'])}, {fmt(r['effect_hi'])}]",
             "insert": f"insertion {fmt(r.get('insert_effect'))} [{fmt(r.get('insert_lo'))}, "
                       f"{fmt(r.get('insert_hi'))}]",
             "cross": f"other classes {fmt(r.get('cross_effect'))} [{fmt(r.get('cross_lo'))}, "
                      f"{fmt(r.get('cross_hi'))}], cross q {fmt(r.get('cross_q'))}",
             "reference": f"beyond the reference {fmt(r.get('excess'))} [{fmt(r.get('excess_lo'))}, "
                       f"{fmt(r.get('excess_hi'))}]"}
    return ", ".join(parts[t] for t in tests_of(test))


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
