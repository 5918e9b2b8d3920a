"""Repair at training time: train again from the pre-trained start model with discovery's flagged tokens dropped.

``repair`` refits a head (and with ``blocks`` the last blocks) of the ERM model on a held-out set. The ERM model
learnt the shortcut from its first steps, and its features hold less of the core task than a model that never saw
the shortcut (the oracle drop of the benchmark shows it). :func:`retrain` is that model's training run done again,
from the same start (the pre-trained encoder) with the same recipe (:class:`~siftlens.training.TrainConfig`), on
the same training images, where no step sees a flagged token:

1. The drop is prompting's and repair's rule (:class:`~siftlens.shortcuts.dropping.DropRule`: the global set of
   each class's flagged candidates, :func:`~siftlens.shortcuts.flags.flag_patches` with ``flags``), applied to
   every training image as it is before augmentation; :func:`siftlens.training.train` moves it with each crop and
   flip and removes those tokens from every step.
2. No class with a flagged candidate (discovery's "no shortcut found" everywhere): the run is plain training
   (``token_drop`` None), so with the ERM model's seed and recipe it gives the ERM model again, with no drop.
3. The result is one artefact (:mod:`siftlens.shortcuts.artefact`): the model folder carries the drop it was trained
   with, and ``load_backend`` applies it, so the model is used as it was trained.

No group labels are read. ``retrain.json`` records the config, the flagged words, the share of training images
with a flagged patch (before augmentation), the epochs and the seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...data import ImageSource
from ...errors import ConfigError
from ...io import write_json
from ...models.native import NativeBackend
from ...models.vit import ViT, save_vit
from ...options import group, option
from ...training import TrainConfig, train
from ...training.options import flat_values
from ..artefact import save_drop
from ..discovery.vocabulary import load_vocabulary
from ..dropping import DropRule
from ..flags import FlagOptions

NO_SHORTCUT = "discovery flagged no candidate in any class (no shortcut found): trained without a drop"


@dataclass
class RetrainConfig:
    """Every parameter of a training-time repair (all of it goes into retrain.json); every field is an option of
    ``siftlens retrain``."""

    candidates: str = option("", "discovery.json (or its folder) from `siftlens discover` on the ERM model.")
    flags: FlagOptions = group(FlagOptions, helps={
        "top_words": "Drop each class's this many best-ranked (flagged) candidates.",
        "score_ratio": "...scoring at least this share of the class's best."},
        top_words=5, score_ratio=0.25, extent="footprint")
    train: TrainConfig = group(TrainConfig)

    def validate(self) -> None:
        if not self.candidates:
            raise ConfigError("retrain needs --candidates (the discovery.json of `siftlens discover`)")
        self.flags.validate()


@dataclass
class RetrainResult:
    """What :func:`retrain` returns: the trained ``model`` (a siftlens ViT on the CPU, the network without its
    drop), ``rule`` (the drop it was trained with; None when nothing was flagged) and ``record`` (retrain.json)."""

    model: ViT
    rule: DropRule | None
    record: dict = field(repr=False)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``out/model`` (the network and, first, the drop it was trained with) and ``out/retrain.json``."""
        out = Path(out)
        if self.rule is not None:
            save_drop(out / "model", self.record["config"]["candidates"], self.rule.flags, self.rule.sift)
        save_vit(self.model.cpu(), out / "model", extra={"retrain": {"drop": self.rule is not None}})
        return {"model": out / "model", "json": write_json(out / "retrain.json", self.record)}


class ShortcutTokens:
    """``token_drop`` for :func:`siftlens.training.train`: the patches ``rule`` flags in a normalised batch of the
    model in training, on that model's geometry and normalisation. ``seen`` / ``flagged``: images seen and those
    with a flagged patch."""

    def __init__(self, rule: DropRule):
        self.rule = rule
        self.backend: NativeBackend | None = None
        self.seen = self.flagged = 0

    def __call__(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) normalised -> (B, N) bool."""
        if self.backend is None or self.backend.model is not model:
            self.backend = NativeBackend(model, x.device)  # puts the model in eval mode: train() restores it
        drop = self.rule.patches(self.backend, x)
        self.seen += len(x)
        self.flagged += int(drop.any(1).sum())
        return drop


def retrain(model, images: str, config: RetrainConfig | None = None, *, progress: bool = True) -> RetrainResult:
    """Train ``model`` (the pre-trained start: a siftlens ViT or its folder) on the labelled ImageFolder ``images``
    with ``config.train``'s recipe, the tokens the discovery ``config.candidates`` flags never seen."""
    cfg = config or RetrainConfig()
    cfg.validate()
    if isinstance(images, ImageSource):
        images = str(images.spec)
    t0 = time.time()
    rule = DropRule(load_vocabulary(cfg.candidates), cfg.flags, cfg.train.sift, "group")
    drop = ShortcutTokens(rule) if rule.words else None
    result = train(model, images, cfg.train, progress=progress, token_drop=drop)
    record = {"kind": "siftlens-retrain", "label_free": True, "config": flat_values(cfg),
              "words": sorted(rule.words), "epochs": result.record["epochs"], "seconds": round(time.time() - t0, 2)}
    if drop is None:
        record["reason"] = NO_SHORTCUT
    else:  # of every image the drop was asked about: each training and validation image once, before augmentation
        record["flagged_share"] = round(drop.flagged / drop.seen, 4) if drop.seen else 0.0
    return RetrainResult(result.model.eval().cpu(), rule if drop is not None else None, record)
