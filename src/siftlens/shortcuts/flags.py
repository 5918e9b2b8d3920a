"""Which patches of an image a discovery output flags: the one rule, used by prompting and by repair.

A discovery output (:class:`~siftlens.shortcuts.discovery.vocabulary.Vocabulary`) ranks candidate words per class,
SIFT words (ids ``0..K-1``) and region words (``K..``). The rule has three settings:

- the word sets (:func:`word_sets`): a class's ``top_words`` best-ranked *flagged* words (discovery's tested
  claims: q < alpha and effect >= min_effect, see :mod:`siftlens.shortcuts.discovery.decision`) whose score is at
  least ``score_ratio`` times the class's best flagged word's; a class with no flagged word ("no shortcut found")
  contributes nothing. ``flagged_only=False`` takes every ranked candidate instead (the rule before flagging,
  kept to reproduce older runs). Either one global set, the union over the discovery's classes (``prompt``), or
  one set per class (``repair``, which also asks which class's shortcut an image holds);
- ``extent``: a flagged SIFT word flags the patch of each of its keypoints' centres (``center``, prompt's
  default) or every patch the keypoint's square of side = size touches (``footprint``, repair's rule); a
  flagged region word flags its own patch;
- ``dilate``: the union over the sets grows by that many patches on the grid (8-neighbourhood).

:func:`flag_patches` applies it to a batch. Shapes: ``B`` images, ``S`` word sets, ``N = g_h * g_w`` patches,
``k`` keypoints of an image. :class:`FlagOptions` holds the settings, one option group of ``prompt`` and ``repair``
alike (each with its own defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CandidatesError, ConfigError
from ..keypoints import EXTENTS, keypoint_patches
from ..models.backend import Backend
from ..options import option
from .discovery.regions import region_words
from .discovery.vocabulary import Vocabulary
from .interventions import dilate


@dataclass
class FlagOptions:
    """Which patches a discovery output flags (a nested config group of prompt and repair; repair gives it its own
    defaults: 5 words, ratio 0.25, the footprint extent)."""

    flagged_only: bool = option(True, "Use only the candidates discovery flagged (q < --alpha and effect >= "
                                      "--min-effect); a class with none contributes no flags. --no-flagged-only: "
                                      "every ranked candidate (the rule before flagging, to reproduce older runs).")
    top_words: int = option(1, "Flag each class's this many best-ranked (flagged) words.")
    score_ratio: float = option(0.0, "...of those, only words scoring at least this fraction of the class's best "
                                     "score.")
    extent: str = option("center", "Flag the patch of each flagged keypoint's centre (center) or every patch its "
                                   "footprint touches (footprint).")
    dilate: int = option(0, "Grow flagged patches by this many patches (repair: at fitting time; use the same value "
                            "with `prompt --policy drop`).")

    def validate(self) -> None:
        if self.extent not in EXTENTS:
            raise ConfigError(f"--extent must be one of {', '.join(EXTENTS)}, not {self.extent!r}")
        if not 0.0 <= self.score_ratio <= 1.0:
            raise ConfigError(f"--score-ratio must be in [0, 1], got {self.score_ratio}")
        if self.top_words < 1 or self.dilate < 0:
            raise ConfigError(f"--top-words must be >= 1 and --dilate >= 0, got {self.top_words} and {self.dilate}")


def class_words(vocab: Vocabulary, c: str, top_words: int, score_ratio: float, flagged_only: bool = True
                ) -> set[int]:
    """Class ``c``'s ``top_words`` best-ranked flagged words (every ranked word when not ``flagged_only``) scoring
    at least ``score_ratio`` times the best of them (empty for a class without flagged words, or one the discovery
    does not rank)."""
    if flagged_only:
        if vocab.flagged is None:
            raise CandidatesError("this discovery output predates flagging (no 'decision' in discovery.json): run "
                                  "`siftlens discover` again, or pass --no-flagged-only to use its ranked words")
        ws, sc = vocab.flagged.get(c, []), vocab.flagged_scores.get(c, [])
    else:
        ws, sc = vocab.ranked.get(c, []), vocab.scores.get(c, [])
    sc = sc or [1.0] * len(ws)
    best = max(sc[:1] or [0.0])
    return {w for w, s in zip(ws[:top_words], sc[:top_words], strict=False) if s >= score_ratio * best}


def word_sets(vocab: Vocabulary, top_words: int = 1, score_ratio: float = 0.0,
              classes: list[str] | None = None, flagged_only: bool = True) -> list[set[int]]:
    """The flagged word ids: ``[one set]``, the union over the discovery's classes, when ``classes`` is None;
    else one set per class of ``classes`` (in that order)."""
    if classes is None:
        return [set().union(*(class_words(vocab, c, top_words, score_ratio, flagged_only) for c in vocab.ranked))]
    return [class_words(vocab, c, top_words, score_ratio, flagged_only) for c in classes]


@dataclass
class Flags:
    """patches: (B, N) bool, the union over the word sets grown by ``dilate`` (the tokens to drop); by_set:
    (B, S, N) bool, each set's patches before growing; keypoints: per image (k,) bool, the keypoints whose
    word is in some set."""

    patches: torch.Tensor
    by_set: np.ndarray
    keypoints: list[np.ndarray]


def flag_patches(backend: Backend, x: torch.Tensor, items: list[dict], vocab: Vocabulary | None,
                 sets: list[set[int]], extent: str = "center", dilate_by: int = 0) -> Flags:
    """Flag the patches of a batch. items: :class:`~siftlens.loading.KeypointDataset` items with descriptors
    (``xy``, ``size``, ``desc``); x: (B, 3, H, W) the same images normalised (region words read the model's
    tokens); sets: from :func:`word_sets`. Without a vocabulary nothing is flagged."""
    P, grid = backend.patch_size, tuple(backend.grid_size)
    by_set = np.zeros((len(items), len(sets), grid[0] * grid[1]), bool)
    K = len(vocab.centers) if vocab is not None else 0
    sift_sets = [sorted(w for w in s if w < K) for s in sets]
    kp_flags = []
    for b, it in enumerate(items):
        xy, size = it["xy"], it["size"]
        words = vocab.words_of(it["desc"]) if vocab is not None and len(xy) else np.zeros(len(xy), np.int64)
        hit = np.zeros(len(xy), bool)
        for s, ids in enumerate(sift_sets):
            fl = np.isin(words, ids)
            if fl.any():
                by_set[b, s] = keypoint_patches(xy[fl], size[fl], P, grid, extent)
            hit |= fl
        kp_flags.append(hit)
    region_sets = [vocab.flagged_regions(s) for s in sets] if vocab is not None and vocab.regions is not None else []
    if any(region_sets):
        rw = region_words(backend, x, vocab.regions, vocab.region_layer)  # (B, N)
        for s, ids in enumerate(region_sets):
            by_set[:, s] |= np.isin(rw, ids)
    patches = dilate(torch.from_numpy(by_set.any(1)), grid, dilate_by)
    return Flags(patches, by_set, kp_flags)
