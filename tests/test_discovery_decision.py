"""Deciding: a discovery flag is a tested claim. The effect, its bootstrap interval and the sign-flip p-value of one
candidate on hand-made paired differences, and Benjamini-Hochberg q with the flagging rule across candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from siftlens.core.stats import bh_qvalues
from siftlens.errors import CandidatesError
from siftlens.shortcuts.discovery.decision import decide, paired_effect, sign_flip_p, verdicts
from siftlens.shortcuts.discovery.vocabulary import Vocabulary
from siftlens.shortcuts.flags import word_sets


def test_effect_interval_and_p_on_known_differences():
    rng = np.random.default_rng(0)
    d = 0.2 + 0.1 * rng.standard_normal(32)  # mean about 0.2, sd 0.1, 32 images
    d = d - d.mean() + 0.2  # exactly mean 0.2
    r = paired_effect(d, seed=3)
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert r["effect"] == pytest.approx(0.2)
    assert r["effect_lo"] < 0.2 < r["effect_hi"]
    assert r["effect_lo"] == pytest.approx(0.2 - 1.96 * se, abs=0.3 * se)  # the bootstrap near the normal interval
    assert r["effect_hi"] == pytest.approx(0.2 + 1.96 * se, abs=0.3 * se)
    assert paired_effect(d, seed=3) == r  # seeded
    assert r["p"] < 1e-6  # n = 32 > 16: z = sum d / sqrt(sum d^2) = about 5.3
    # the exact sign-flip distribution for n <= 16: all of 10 positive -> only the observed pattern ties
    assert sign_flip_p(np.full(10, 0.3)) == pytest.approx(2.0**-10)
    assert sign_flip_p(np.array([0.3, 0.2, -0.1])) == pytest.approx(2 / 8)  # sums >= 0.4: (+,+,-) and (+,+,+)
    assert sign_flip_p(np.zeros(12)) == 1.0 and sign_flip_p(-np.full(10, 0.3)) == 1.0
    sym = np.concatenate([d - 0.2, 0.2 - d])  # symmetric about 0: p about one half
    assert 0.3 < sign_flip_p(sym) < 0.7
    # fewer than two images: only the mean, no interval and no p
    one = paired_effect([0.4])
    assert one["effect"] == 0.4 and all(np.isnan(one[k]) for k in ("effect_lo", "effect_hi", "p"))
    assert np.isnan(paired_effect([])["effect"])


def test_bh_across_candidates_and_the_flagging_rule():
    stats = pd.DataFrame({
        "class": ["a", "a", "a", "b", "b", "c"], "word": [1, 2, 3, 1, 4, 5], "rank": [1, 2, 3, 1, 2, 1],
        "effect": [0.30, 0.02, 0.20, 0.40, 0.10, np.nan],
        "p": [0.001, 0.0001, 0.04, 0.02, np.nan, np.nan]})
    decide(stats, alpha=0.05, min_effect=0.05)
    np.testing.assert_allclose(stats["q"][:4], bh_qvalues([0.001, 0.0001, 0.04, 0.02]))
    np.testing.assert_allclose(stats["q"][:4], [0.002, 0.0004, 0.04, 0.02 * 4 / 3])
    assert stats["q"][4:].isna().all()
    # q < alpha and effect >= min_effect: word 2 is significant but too small; untested rows are never flagged
    assert stats["flagged"].tolist() == [True, False, True, True, False, False]
    v = verdicts(stats, ["a", "b", "c", "d"])
    assert v["a"] == {"verdict": "shortcut found", "flagged": [1, 3], "tested": 3}
    assert v["c"]["verdict"] == v["d"]["verdict"] == "no shortcut found" and v["c"]["flagged"] == []
    decide(stats, alpha=0.01, min_effect=0.05)
    assert stats["flagged"].tolist() == [True, False, False, False, False, False]


def test_insert_and_both_decide_on_their_own_columns():
    stats = pd.DataFrame({
        "class": ["a", "a", "b"], "word": [1, 2, 3], "rank": [1, 2, 1],
        "effect": [0.30, 0.30, 0.01], "p": [0.001, 0.001, 0.001],
        "insert_effect": [0.20, 0.01, 0.40], "insert_p": [0.002, 0.001, 0.5]})
    occl = decide(stats.copy(), 0.05, 0.05, "occlude")
    assert occl["flagged"].tolist() == [True, True, False]
    ins = decide(stats.copy(), 0.05, 0.05, "insert")
    np.testing.assert_allclose(ins["q"], bh_qvalues([0.002, 0.001, 0.5]))
    assert ins["flagged"].tolist() == [True, False, False]  # word 2's insertion is too small, word 3's not significant
    both = decide(stats.copy(), 0.05, 0.05, "both")
    np.testing.assert_allclose(both["q"], np.maximum(bh_qvalues([0.001] * 3), bh_qvalues([0.002, 0.001, 0.5])))
    assert both["flagged"].tolist() == [True, False, False]
    assert both["flagged"].tolist() == (occl["flagged"] & ins["flagged"]).tolist()


def test_cross_confirms_occlusion_flags_as_a_second_family():
    """cross: occlusion flags words 1, 2 and 4 (word 3's effect is too small); the confirmation's BH runs over those
    three cross p-values only, and word 2's cross effect is too small, word 4's not significant."""
    stats = pd.DataFrame({
        "class": ["a", "a", "b", "b"], "word": [1, 2, 3, 4], "rank": [1, 2, 1, 2],
        "effect": [0.30, 0.30, 0.01, 0.20], "p": [0.001, 0.001, 0.001, 0.002],
        "cross_effect": [0.20, 0.01, 0.40, 0.10], "cross_p": [0.01, 0.001, 0.0001, 0.3]})
    out = decide(stats.copy(), 0.05, 0.05, "cross")
    np.testing.assert_allclose(out["q"], bh_qvalues([0.001, 0.001, 0.001, 0.002]))  # occlusion's q, unchanged
    np.testing.assert_allclose(out["cross_q"].to_numpy()[[0, 1, 3]], bh_qvalues([0.01, 0.001, 0.3]))
    assert np.isnan(out["cross_q"][2])
    assert out["flagged"].tolist() == [True, False, False, False]


def test_region_words_can_need_a_larger_effect():
    stats = pd.DataFrame({
        "class": ["a", "a", "a"], "word": [1, 300, 301], "source": ["sift", "region", "region"], "rank": [1, 2, 3],
        "effect": [0.08, 0.08, 0.12], "p": [0.001, 0.001, 0.001]})
    assert decide(stats.copy(), 0.05, 0.05)["flagged"].tolist() == [True, True, True]
    assert decide(stats.copy(), 0.05, 0.05, region_min_effect=0.1)["flagged"].tolist() == [True, False, True]
    # never a lower bar than --min-effect
    assert decide(stats.copy(), 0.05, 0.1, region_min_effect=0.02)["flagged"].tolist() == [False, False, True]


def test_flag_rule_uses_flagged_words_only():
    import torch

    vocab = Vocabulary(torch.zeros(4, 128), ["a", "b"], {"a": [3, 1, 2], "b": [0, 2]},
                       {"a": [1.0, 0.5, 0.1], "b": [0.8, 0.7]}, flagged={"a": [1, 2], "b": []},
                       flagged_scores={"a": [0.5, 0.1]})
    assert word_sets(vocab, 1) == [{1}]  # a's best flagged word; b (no shortcut found) adds nothing
    assert word_sets(vocab, 5, 0.25, ["a", "b"]) == [{1}, set()]  # ratio of a's best *flagged* score
    assert word_sets(vocab, 1, flagged_only=False) == [{3, 0}]  # the rule before flagging
    old = Vocabulary(torch.zeros(4, 128), ["a"], {"a": [3]})
    with pytest.raises(CandidatesError, match="predates flagging"):
        word_sets(old, 1)
    assert word_sets(old, 1, flagged_only=False) == [{3}]
