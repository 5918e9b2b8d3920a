"""Shortcut (spurious-correlation) discovery with SIFT visual words (METHOD.md section 4).

For a classifier and a set of images:

1. Per image: the prediction, the CLS attention over patches (last layer, mean over heads, or attention
   rollout), normalised to sum 1, and SIFT keypoints with descriptors on the model's own pixels.
2. A visual vocabulary: k-means (k-means++ initialisation, seeded, batched in torch) over a sample of
   RootSIFT descriptors; every keypoint gets its nearest word and the attention of its patch.
3. Per (class c, word v), over the images *predicted* c:

   - ``share`` S_cv: mean over those images of the CLS attention on the patches holding v (0 when v is
     absent), i.e. the fraction of the CLS token's attention that class-c images spend on v;
   - ``lift``: attention on v's patches relative to uniform attention over the same patches;
   - ``assoc``: log-odds of v being present in images predicted c minus that in the other images, with
     ``smoothing`` (0.5) added to every count;
   - ``off_object`` (only with ``boxes``: object boxes per image): share of v's keypoints outside the box.
   Region words (``regions`` R > 0): every patch also gets the nearest of R k-means centres of the model's
   own patch tokens (``region_layer``; 0 = the patch embedding), so candidates also cover weakly textured
   shortcuts whole; they share the id space (``K..K+R-1``) and every step below with the SIFT words.
4. Causal check, for the ``causal_top`` candidates per class with the largest ``S_cv * max(assoc, 0)``: in
   up to ``causal_images`` images predicted c that hold v, the patches holding v are occluded (their tokens
   dropped, or filled with the image's mean colour) and the fall of p(c) is recorded; as a control, as many
   other patches of the image *with the same SIFT keypoint counts* are occluded (texture-matched; the old
   random control is ``control="random"``). ``causal`` = mean fall - mean control fall.
5. Score (higher = more suspicious): ``score = S_cv * max(assoc, 0) * (max(causal, 0) + 0.01)``, times
   ``off_object`` when boxes are given. Candidates without a causal check count ``causal = 0`` (they all
   rank below the checked ones with a positive effect). Only (c, v) seen in at least ``min_images``
   images predicted c are ranked.

Everything is returned as data (:class:`DiscoveryResult`); :meth:`DiscoveryResult.save` writes
``candidates.csv``, ``discovery.json`` (with the vocabulary, so prompting can assign words to new images)
and ``keypoints.parquet``; :mod:`siftlens.shortcuts.discovery.report` renders the HTML report.

Boxes file (``boxes``): JSON ``{"<image name>": [x0, y0, x1, y1] | [[x0, y0, x1, y1], ...]}`` of *object*
boxes in the original image's pixels (x1, y1 exclusive); they are pushed through the model's own
preprocessing, so resizing and cropping are accounted for exactly. A SpuriousCIFAR sidecar marks the
spurious marker, not the object, and is used only by the benchmark's evaluation
(:mod:`siftlens.benchmarks.spurious_cifar_eval`), never by the ranking.

Modules, in the order of the flow: ``config`` (:class:`DiscoveryConfig`), ``features`` (step 1),
``vocabulary`` (step 2, and reading it back for prompting), ``regions`` (region words), ``scoring``
(steps 3 and 5), ``causal``
(step 4), ``pipeline`` (:func:`discover`, :class:`DiscoveryResult`) and ``report`` (renders the HTML page
only). The names below are imported lazily.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DiscoveryConfig": "config",
    "Features": "features", "extract_features": "features", "read_boxes": "features",
    "Vocabulary": "vocabulary", "assign": "vocabulary", "build_vocabulary": "vocabulary", "kmeans": "vocabulary",
    "load_vocabulary": "vocabulary", "rootsift": "vocabulary",
    "class_word_stats": "scoring", "rank": "scoring",
    "causal_check": "causal", "occlude_probs": "causal", "matched_control": "causal",
    "patch_tokens": "regions", "region_features": "regions", "region_words": "regions",
    "DiscoveryResult": "pipeline", "discover": "pipeline",
    "discovery_html": "report", "write_discovery_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
