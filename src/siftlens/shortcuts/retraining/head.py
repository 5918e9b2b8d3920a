"""Label-free repair, beyond prompting: retrain the classification head (DFR-style, Kirichenko et al. 2022,
arXiv 2204.02937), and with ``blocks > 0`` the last blocks too, on features computed with the discovered
shortcut's tokens dropped, over a set re-weighted from discovery alone.

1. Every image of ``images`` is flagged by :func:`~siftlens.shortcuts.flags.flag_patches`, the rule prompting
   uses, with one word set per class (each class's best candidates) and by default the ``footprint`` extent
   (SIFT words by their keypoints' footprint, region words by their patches: ``prompt --policy drop --extent
   footprint`` with the same ``--top-words``, ``--score-ratio`` and ``--dilate`` flags the same patches), and
   its pooled features are computed with the flagged tokens removed.
2. Pseudo-groups without group labels: an image's *shortcut class* is the class whose candidates cover
   most of its flagged patches (none when nothing is flagged); the group is (label, shortcut class ==
   label or none) -> "aligned", else "conflicting". ``groups="sidecar"`` uses a SpuriousCIFAR sidecar's
   true groups instead (the oracle *reference*, not a method).
3. Every non-empty group gets the same total weight; a new linear head (weight decay ``l2``) is fitted by
   full-batch L-BFGS on the weighted cross-entropy. The model with the new head is saved as a normal
   siftlens model folder.

``pool`` chooses the features: the model's own pooling, the CLS token, or the mean of the kept patch tokens; the
saved model then pools the same way. ``images`` may be a held-out split (SpuriousCIFAR ``holdout``) rather than the
training images, as DFR does.

4. With ``blocks = K > 0`` the repair retrains more than the head: after the head-only fit (or from the old head,
   ``head_start``), the last K transformer blocks, the final norm and the head are fine-tuned together on the same
   images with the same tokens dropped and the same weights (:mod:`siftlens.shortcuts.retraining.blocks`).
5. ``dilate = R`` grows the flags of step 1 by R patches, so that the tokens left hold none of a marker that the
   candidates cover only in part. With every block retrained this is what meets the glyph benchmark's targets
   (docs/spurious.md).
6. Nothing to repair: with ``groups="discovery"`` and no class holding a flagged candidate (discovery's "no shortcut
   found" for every class), the model is returned as it is, with no drop and ``record["unchanged"]``; a head refitted
   on a model with no shortcut can only cost it accuracy (docs/spurious.md, section 2b).
7. The repaired model is one artefact: :meth:`RepairResult.save` writes, into the model folder, the drop the network
   was fitted for (:mod:`siftlens.shortcuts.artefact`: the discovery output, the flag and SIFT options), and
   ``load_backend`` of that folder applies it in the model's forward, as ``prompt --policy drop`` with the same
   ``--top-words``, ``--score-ratio``, ``--extent`` and ``--dilate`` would. A repaired folder given as ``model`` is
   repaired from its network (its old drop is replaced by this repair's).

``record`` reports the accuracy on the fitting images with the flagged tokens dropped, overall, per group and, when
the images hold a groups file (a SpuriousCIFAR ``markers.json``), aligned beside conflicting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...data import ImageSource
from ...errors import ConfigError
from ...io import write_json
from ...keypoints import SiftOptions, sift_params
from ...loading import KeypointDataset, make_loader, one_cv2_thread_per_worker
from ...models import load_backend
from ...models.backend import Backend, keep_groups
from ...models.vit import save_vit
from ...options import RunOptions, group, option
from ...progress import progress_bar
from ..artefact import save_drop
from ..discovery.features import model_labels
from ..discovery.vocabulary import Vocabulary, load_vocabulary
from ..dropping import network_backend
from ..flags import FlagOptions, flag_patches, word_sets
from ..groups import by_alignment, find_sidecar, group_accuracy, image_groups, read_sidecar
from ..record import config_record
from .blocks import POOLS, TuneSettings, finetune, frozen_tokens, tuned_predictions

GROUPINGS = ("discovery", "sidecar", "none")
UNCHANGED = "discovery flagged no candidate in any class (no shortcut found): the model is left unchanged"
STARTS = ("fit", "old")


@dataclass
class RepairConfig:
    """Every parameter of a repair (all of it goes into repair.json); every field with ``cli`` is an option of
    ``siftlens repair``."""

    candidates: str = option("", "discovery.json (or its folder) from `siftlens discover`.")
    flags: FlagOptions = group(FlagOptions, helps={
        "top_words": "Flag each class's this many best-ranked (flagged) candidates.",
        "score_ratio": "...scoring at least this share of the class's best."},
        top_words=5, score_ratio=0.25, extent="footprint")
    groups: str = option("discovery", "discovery (label-free pseudo-groups) | sidecar (the markers.json's true "
                                      "groups: an oracle reference) | none.")
    l2: float = option(1e-3, "Weight decay of the new head.")
    pool: str = option("model", "Features: model (its pooling) | cls | mean (patch tokens).")
    iters: int = option(200, "L-BFGS iterations.")
    head_start: str = option("fit", "--blocks > 0: start from the head-only fit (fit) or the old head.")
    blocks: int = option(0, "Also fine-tune the last K transformer blocks, the final norm and the head (AdamW, "
                            "flagged tokens dropped); 0 = the head only.")
    epochs: int = option(3, "--blocks > 0: fine-tuning epochs.")
    lr: float = option(1e-4, "--blocks > 0: peak learning rate (cosine decay to 0).")
    run: RunOptions = group(RunOptions, helps={
        "batch_size": "Images per forward pass (and per fine-tuning step).",
        "seed": "Seed of the fine-tuning's minibatch order (--blocks > 0)."}, batch_size=128)
    sift: SiftOptions = group(SiftOptions)

    def validate(self) -> None:
        if not self.candidates:
            raise ConfigError("repair needs --candidates (the discovery.json of `siftlens discover`)")
        if self.groups not in GROUPINGS:
            raise ConfigError(f"--groups must be one of {', '.join(GROUPINGS)}, not {self.groups!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, not {self.pool!r}")
        self.flags.validate()
        if self.l2 < 0 or self.iters < 1 or self.run.batch_size < 1 or self.run.workers < 0:
            raise ConfigError("--l2 must be >= 0, --iters and --batch-size >= 1, --workers >= 0")
        if self.blocks < 0 or self.epochs < 1 or self.lr <= 0 or self.head_start not in STARTS:
            raise ConfigError(f"--blocks must be >= 0, --epochs >= 1, --lr > 0, --head-start in {', '.join(STARTS)}")

    def tune_settings(self) -> TuneSettings:
        return TuneSettings(blocks=self.blocks, epochs=self.epochs, lr=self.lr, l2=self.l2, pool=self.pool,
                            batch_size=self.run.batch_size, seed=self.run.seed, device=self.run.device)


@dataclass
class RepairResult:
    """What :func:`repair` returns: the repaired ``model`` (a siftlens ViT, on the CPU, the network without its drop),
    ``record``, the whole repair.json (config, images, cells, flagged share, accuracy on the fitting images with the
    flagged tokens dropped, overall, per group and aligned beside conflicting, fine-tuning losses with
    ``blocks > 0``, seconds), and ``config``, whose candidates, flag and SIFT options :meth:`save` stores as the
    model's drop (none when no class flags a candidate: ``record["drop"]`` False, or ``record["unchanged"]`` with
    ``groups="discovery"``, where the model is as it was)."""

    model: torch.nn.Module
    record: dict = field(repr=False)
    config: RepairConfig | None = field(default=None, repr=False)

    @property
    def summary(self) -> pd.DataFrame:
        """One row: images, flagged_share, train_accuracy_dropped, aligned_ and conflicting_accuracy_dropped (with a
        groups file) and seconds of the repair."""
        keys = ("images", "flagged_share", "train_accuracy_dropped", "seconds")
        row = {k: self.record[k] for k in keys if k in self.record}
        for kind, v in (self.record.get("alignment_dropped") or {}).items():
            row[f"{kind}_accuracy_dropped"] = v["accuracy"] if v else None
        return pd.DataFrame([row])

    @property
    def cells(self) -> pd.DataFrame:
        """One row per (label, group) cell of the re-weighting: label index, group (0 aligned or unflagged, 1
        conflicting; with ``groups="sidecar"`` 1 is aligned; with ``none`` 0), images, and the weight each image
        of the cell had (equal total weight per cell)."""
        cells = self.record["cells"]
        total = sum(cells.values())
        rows = [{"label": int(k.split("|")[0]), "group": int(k.split("|")[1]), "images": n,
                 "weight": total / len(cells) / n} for k, n in cells.items()]
        return pd.DataFrame(rows, columns=["label", "group", "images", "weight"])

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write ``out/model`` (a siftlens model folder with, from ``config``, its drop: ``shortcut_drop.json`` and
        ``shortcut_discovery.json``, written first) and ``out/repair.json``; returns their paths."""
        out = Path(out)
        if self.config is not None and not self.record.get("unchanged"):
            save_drop(out / "model", self.config.candidates, self.config.flags, self.config.sift)
        save_vit(self.model.cpu(), out / "model", extra={"repair": {k: self.record[k] for k in ("config", "cells")}})
        return {"model": out / "model", "json": write_json(out / "repair.json", self.record)}


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, x: torch.Tensor, drop: torch.Tensor, pool: str = "model") -> torch.Tensor:
    """Pooled features (B, D) of a siftlens ViT on the normalised batch ``x`` with the patches where ``drop (B, N)``
    is True removed (one forward per number of kept tokens; an image whose every patch is flagged keeps them all).

    pool: ``model`` (the model's own pooling), ``cls`` (the CLS token) or ``mean`` (mean of the kept patch tokens
    after the final norm)."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    f = torch.empty((x.shape[0], model.head.in_features))
    for rows, keep in keep_groups(drop):
        tokens = model.forward_features(x[rows.to(x.device)], keep.to(x.device))
        f[rows] = model.pool(tokens, how=pool).float().cpu()
    return f


@torch.no_grad()
def flagged_batches(backend: Backend, source: ImageSource, vocab: Vocabulary, cfg: RepairConfig,
                    progress: bool = True) -> Iterator[dict]:
    """Per batch of readable images: ``x`` (B, 3, H, W) normalised, ``flag`` (B, N) bool (the tokens to drop),
    ``shortcut`` (B,) the shortcut class (-1: none) and ``index`` (B,) the images' indices in ``source``."""
    if backend.kind != "native":
        raise ConfigError("repair retrains a siftlens ViT (native backend) only")
    per_class = class_word_sets(backend, vocab, cfg)
    ds = KeypointDataset(source, backend, None, sift_params(backend.input_size, cfg.sift), descriptors=True)
    with progress_bar(progress) as pb, one_cv2_thread_per_worker(cfg.run.workers):
        task = pb.add_task("repair features", total=len(source), info="")
        for batch in make_loader(ds, cfg.run):
            items = [it for it in batch if "skip" not in it]
            pb.update(task, advance=len(batch))
            if not items:
                continue
            x = backend.normalize(torch.from_numpy(np.stack([it["pixels"] for it in items])))
            fl = flag_patches(backend, x, items, vocab, per_class, cfg.flags.extent, cfg.flags.dilate)
            flag, cnt = fl.patches, fl.by_set.sum(2)  # (B, N), (B, C) flagged patches per class
            yield {"x": x, "flag": flag & ~flag.all(1, keepdim=True), "index": np.array([it["index"] for it in items]),
                   "shortcut": np.where(cnt.max(1) > 0, cnt.argmax(1), -1)}


def class_word_sets(backend: Backend, vocab: Vocabulary, cfg: RepairConfig) -> list[set[int]]:
    """The words each of the model's classes flags (one set per class, in the model's order; empty: no shortcut)."""
    classes = list(backend.class_names or vocab.classes)
    return word_sets(vocab, cfg.flags.top_words, cfg.flags.score_ratio, classes, cfg.flags.flagged_only)


@torch.no_grad()
def dropped_features(backend: Backend, source: ImageSource, vocab: Vocabulary, cfg: RepairConfig,
                     progress: bool = True) -> dict:
    """Pooled features (n, D) with flagged tokens dropped, the shortcut class per image (-1: none), the images'
    indices; with ``cfg.blocks > 0`` also ``tokens``: n tensors (T + k_i, D) entering the first fine-tuned block."""
    feats, short, idx, tokens = [], [], [], []
    for b in flagged_batches(backend, source, vocab, cfg, progress):
        feats.append(pooled_features(backend.model, b["x"], b["flag"], cfg.pool).clone())
        if cfg.blocks:
            tokens += frozen_tokens(backend.model, b["x"], b["flag"], cfg.blocks)
        short.append(b["shortcut"])
        idx.append(b["index"])
    if not idx:
        raise ConfigError(f"no image of {source.spec!s} could be read")
    return {"features": torch.cat(feats), "shortcut": np.concatenate(short), "index": np.concatenate(idx),
            "tokens": tokens}


def group_weights(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, dict]:
    """Equal total weight per (label, group) cell that has members; weights sum to n. Returns weights and
    the cell sizes."""
    key = np.array([f"{y}|{g}" for y, g in zip(labels, groups, strict=True)])
    cells, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    w = (len(key) / len(cells)) / counts[inv]
    return w, {str(c): int(n) for c, n in zip(cells, counts, strict=True)}


def fit_head(feats: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n_classes: int, l2: float, iters: int,
             init: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """A linear head fitted by L-BFGS on the weighted cross-entropy + l2 * ||W||^2 (features standardised by
    nothing: the ViT's features are already layer-normed)."""
    head = torch.nn.Linear(feats.shape[1], n_classes)
    if init is not None:
        head.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")
    w = w / w.sum()

    def closure():
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(head(feats), y, reduction="none") * w).sum()
        loss = loss + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def retrain(model: torch.nn.Module, d: dict, y: np.ndarray, w: np.ndarray, cfg: RepairConfig,
            progress: bool = True) -> tuple[dict, np.ndarray]:
    """Refit ``model`` in place on the dropped features ``d`` (of :func:`dropped_features`), labels ``y`` (n,) and
    weights ``w`` (n,): the head alone, then with ``cfg.blocks > 0`` the last blocks, norm and head. Returns the
    accuracy on the fitting images (flagged tokens dropped) with the fine-tuning's losses, and the predictions (n,)
    on those images."""
    yt, wt = torch.from_numpy(y), torch.from_numpy(w).float()
    if cfg.blocks == 0 or cfg.head_start == "fit":
        head = fit_head(d["features"], yt, wt, model.head.out_features, cfg.l2, cfg.iters, init=model.head)
        model.head.load_state_dict(head.state_dict())
    if cfg.blocks == 0:
        with torch.no_grad():
            pred = model.head(d["features"]).argmax(1).numpy()
        return {"train_accuracy_dropped": float((pred == y).mean())}, pred
    t0 = time.time()
    out = finetune(model, d["tokens"], yt, wt, cfg.tune_settings(), progress)
    pred = tuned_predictions(model, d["tokens"], cfg.blocks, cfg.pool, device=cfg.run.device)
    return {"train_accuracy_dropped": float((pred == y).mean()), "finetune": {
        **out, "seconds": round(time.time() - t0, 2)}}, pred


def repair(model: str | Backend, images, config: RepairConfig | None = None, *, progress: bool = True) -> RepairResult:
    """Retrain the head (and with ``blocks > 0`` the last blocks) of the siftlens ViT ``model`` with the flagged
    tokens of ``config.candidates`` dropped; returns the repaired model and its record, and writes nothing (see
    :meth:`RepairResult.save`). A ``Backend`` given as ``model`` is repaired in place."""
    cfg = config or RepairConfig()
    cfg.validate()
    t0 = time.time()
    backend = network_backend(model if isinstance(model, Backend) else load_backend(model, cfg.run.device))
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.run.limit)
    labels = model_labels(source, backend)
    if source.labels is None or (labels < 0).any():
        raise ConfigError(f"{source.spec!s}: repair needs labelled images named as the model's classes")
    vocab = load_vocabulary(cfg.candidates)
    flagged = any(class_word_sets(backend, vocab, cfg))
    if cfg.groups == "discovery" and not flagged:
        return _unchanged(backend, cfg, t0)
    d = dropped_features(backend, source, vocab, cfg, progress)
    y = labels[d["index"]]
    w, cells = group_weights(y, _groups(cfg, source, d, y))
    fit, pred = retrain(backend.model, d, y, w, cfg, progress)
    if cfg.pool != "model":  # the new head reads these features, so the saved model pools this way
        backend.model.cfg = replace(backend.model.cfg, pool=cfg.pool)
    record = {"kind": "siftlens-repair", "config": config_record(cfg), "images": int(len(y)), "cells": cells,
              "flagged_share": float((d["shortcut"] >= 0).mean()), **fit,
              **_accuracy_record(backend, source, d["index"], pred == y, y), "drop": flagged,
              "seconds": round(time.time() - t0, 2)}
    # with no class flagging a word there is nothing to drop: the saved model is the refitted network alone
    return RepairResult(backend.model.cpu(), record, cfg if flagged else None)


def _unchanged(backend: Backend, cfg: RepairConfig, t0: float) -> RepairResult:
    """The repair of a model in which discovery flagged nothing: the network as it is, without a drop."""
    record = {"kind": "siftlens-repair", "config": config_record(cfg), "unchanged": True, "reason": UNCHANGED,
              "images": 0, "cells": {}, "flagged_share": 0.0, "seconds": round(time.time() - t0, 2)}
    return RepairResult(backend.model.cpu(), record, cfg)


def _accuracy_record(backend: Backend, source: ImageSource, index: np.ndarray, correct: np.ndarray,
                     y: np.ndarray) -> dict:
    """Accuracy on the fitting images with the flagged tokens dropped, per group: the groups of the images'
    markers.json (``<class>|aligned`` / ``<class>|conflicting``, and aligned beside conflicting over every class), else
    the classes."""
    side = find_sidecar(source.spec) if isinstance(source.spec, (str, Path)) else None
    names = [source.names[i] for i in index]
    classes = list(backend.class_names or [str(c) for c in range(int(y.max()) + 1)])
    groups = image_groups(names, [classes[c] for c in y], read_sidecar(side) if side is not None else None)
    acc = group_accuracy(correct, groups)
    return {"groups_from": str(side) if side is not None else "class", "accuracy_dropped": acc,
            "alignment_dropped": by_alignment(acc)}


def _groups(cfg: RepairConfig, source: ImageSource, d: dict, y: np.ndarray) -> np.ndarray:
    if cfg.groups == "none":
        return np.zeros(len(y), np.int64)
    if cfg.groups == "sidecar":
        side = find_sidecar(source.spec) if isinstance(source.spec, (str, Path)) else None
        if side is None:
            raise ConfigError(f"--groups sidecar needs a markers.json inside {source.spec}")
        recs = read_sidecar(side)["images"]
        names = source.names
        return np.array([bool(recs[names[i]]["aligned"]) for i in d["index"]], dtype=np.int64)
    return pseudo_conflicting(d["shortcut"], y).astype(np.int64)


def pseudo_conflicting(shortcut: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Discovery's label-free groups: (n,) True where an image's shortcut class (of :func:`flagged_batches`, -1:
    none) is a class other than its label ``y`` (n,), i.e. it carries another class's flagged candidates."""
    return (shortcut >= 0) & (shortcut != y)
