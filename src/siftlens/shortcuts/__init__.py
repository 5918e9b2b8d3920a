"""Shortcuts (spurious correlations): find them, flag them in an image, and act on them, in one home.

The flow, each step in one place:

- ``discovery/``: :func:`discover` ranks (class, visual word) candidates a classifier attends to, that come
  with a class and that its predictions depend on (:class:`DiscoveryConfig`, :class:`DiscoveryResult`);
- ``flags``: the one rule that says which patches of an image a discovery output flags
  (:func:`~siftlens.shortcuts.flags.flag_patches`), used by prompting and repair alike;
- ``interventions``: drop, keep-top and attention-bias forwards for any backend, grouping by kept-token count,
  growing a patch mask;
- ``prompting``: :func:`prompt` classifies images before and after an intervention at inference
  (:class:`PromptConfig`, :class:`PromptResult`); ``groups``: reading a groups file (the ``markers.json`` a
  benchmark writes), overall, per-group and worst-group accuracy;
- ``retraining/``: :func:`repair` retrains the head (``head``) and with ``blocks > 0`` the last blocks
  (``blocks``) with the flagged tokens dropped (:class:`RepairConfig`, :class:`RepairResult`); :func:`retrain`
  trains again from the pre-trained start with the flagged tokens never seen (``retrain``: :class:`RetrainConfig`,
  :class:`RetrainResult`);
- ``artefact``, ``dropping``: the repaired model is one artefact: its folder holds the drop it was fitted for
  (``artefact``: the files), and ``load_backend`` of the folder runs the network with that drop (``dropping``).

Every job has one shape, ``fn(model, images, config=None, *, weights=None, progress=True) -> Result`` (repair
takes no ``weights``: it retrains a siftlens ViT), and the result's ``save(out)`` writes its files.

The SpuriousCIFAR benchmark that plants known shortcuts, and its evaluation of a discovery, live in
:mod:`siftlens.benchmarks`, which imports this package (never the reverse). The names below are imported lazily.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "discover": "discovery.pipeline", "DiscoveryConfig": "discovery.config", "DiscoveryResult": "discovery.pipeline",
    "prompt": "prompting", "PromptConfig": "prompting", "PromptResult": "prompting", "POLICIES": "prompting",
    "format_summary": "prompting",
    "repair": "retraining.head", "RepairConfig": "retraining.head", "RepairResult": "retraining.head",
    "retrain": "retraining.retrain", "RetrainConfig": "retraining.retrain", "RetrainResult": "retraining.retrain",
    "group_accuracy": "groups", "image_groups": "groups", "find_sidecar": "groups", "read_sidecar": "groups",
    "flag_patches": "flags", "word_sets": "flags", "Flags": "flags", "FlagOptions": "flags",
    "jtt": "anchors", "afr": "anchors", "dfr": "anchors", "JTTConfig": "anchors", "AFRConfig": "anchors",
    "DFRConfig": "anchors", "AnchorResult": "anchors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
