"""Inference-time prompting: per-image token interventions built from keypoints, with no retraining.

Policies (METHOD.md section 4):

- ``drop``: remove the patch tokens *flagged* by a discovery output, i.e. the patches holding a keypoint
  whose visual word is among each class's ``top_words`` best candidates (union over classes), optionally
  grown by ``dilate`` patches; kept tokens keep their position embeddings;
- ``keep-top``: keep only the ``ceil(q * N)`` patches with the largest semantic weight (keypoints per
  patch, ``scheme``); with a discovery output, keypoints of flagged words do not count;
- ``bias``: add ``beta * log(eps + c_j)`` to the attention logits of patch key j (``c_j`` the keypoint
  concentration, flagged keypoints excluded; shifted by its value at uniform concentration, see
  :func:`~siftlens.interventions.semantic_bias`) and, with a discovery output, ``flag_bias`` to flagged
  keys, in the blocks ``layers`` (None = all).

Every image is classified before and after; :func:`group_accuracy` gives overall, per-group and worst-group
accuracy. Groups come from a SpuriousCIFAR sidecar (``<class>|aligned`` or ``<class>|conflicting``) when
the image folder holds one (or ``groups`` names it), else the true class.

Modules: ``masks`` (flagged patches and semantic weights per image), ``groups`` (group accuracy), ``run``
(:class:`PromptConfig`, :func:`prompt`, :class:`PromptResult`). The token interventions themselves are
:mod:`siftlens.interventions`, shared with discovery's causal check (which comes before prompting, so
they cannot live here). The names below are imported lazily.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "footprint_patches": "masks", "patch_masks": "masks",
    "group_accuracy": "groups", "image_groups": "groups",
    "POLICIES": "run", "PromptConfig": "run", "PromptResult": "run", "format_summary": "run", "prompt": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
