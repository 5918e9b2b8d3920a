"""Label-free repair, beyond prompting: retrain the classification head (DFR-style, Kirichenko et al. 2022,
arXiv 2204.02937), and with ``blocks > 0`` the last blocks too, on features computed with the discovered
shortcut's tokens dropped, over a set re-weighted from discovery alone.

1. Every image of ``images`` is flagged by :func:`~siftlens.shortcuts.flags.flag_patches`, the rule prompting
   uses, with one word set per class (each class's best candidates) and the ``footprint`` extent (SIFT words by
   their keypoints' footprint, region words by their patches: ``prompt --policy drop --extent footprint`` with
   the same ``--top-words``, ``--score-ratio`` and ``--dilate`` flags the same patches), and its pooled features
   are computed with the flagged tokens removed.
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
   candidates cover only in part; the repaired model is then used with ``prompt --policy drop --dilate R``. With
   every block retrained this is what meets the glyph benchmark's targets (docs/spurious.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ...benchmarks.spurious_cifar import find_sidecar, read_sidecar
from ...data import ImageSource
from ...errors import ConfigError
from ...io import write_json
from ...keypoints import sift_params
from ...loading import KeypointDataset
from ...models import load_backend
from ...models.backend import Backend
from ...models.vit import save_vit
from ...progress import progress_bar
from ..discovery.features import model_labels
from ..discovery.vocabulary import Vocabulary, load_vocabulary
from ..flags import flag_patches, word_sets
from ..interventions import keep_groups
from .blocks import POOLS, TuneSettings, finetune, frozen_tokens, tuned_predictions

GROUPINGS = ("discovery", "sidecar", "none")
EXTENT = "footprint"  # a flagged keypoint flags every patch its footprint touches (prompt's --extent footprint)
STARTS = ("fit", "old")


@dataclass
class RepairConfig:
    candidates: str = ""
    top_words: int = 5
    score_ratio: float = 0.25
    dilate: int = 0
    groups: str = "discovery"  # discovery | sidecar (oracle reference) | none (plain re-fit)
    l2: float = 1e-3
    iters: int = 200
    pool: str = "model"  # model (the model's own) | cls | mean (mean of the kept patch tokens); saved with the head
    batch_size: int = 128
    blocks: int = 0  # 0: the head only (L-BFGS); K > 0: then fine-tune the last K blocks, final norm and head
    epochs: int = 3  # fine-tuning (blocks > 0): AdamW epochs ...
    lr: float = 1e-4  # ... peak learning rate (cosine decay to 0)
    head_start: str = "fit"  # fine-tuning starts from the head-only fit, or from the model's old head
    seed: int = 0  # fine-tuning's minibatch order
    device: str = "cpu"
    limit: int | None = None
    upsample: float = 0.0
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0

    def validate(self) -> None:
        if not self.candidates:
            raise ConfigError("repair needs --candidates (the discovery.json of `siftlens discover`)")
        if self.groups not in GROUPINGS:
            raise ConfigError(f"--groups must be one of {', '.join(GROUPINGS)}, not {self.groups!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, not {self.pool!r}")
        if self.l2 < 0 or self.dilate < 0 or self.iters < 1 or self.top_words < 1:
            raise ConfigError("--l2 and --dilate must be >= 0, --iters and --top-words >= 1")
        if self.blocks < 0 or self.epochs < 1 or self.lr <= 0 or self.head_start not in STARTS:
            raise ConfigError(f"--blocks must be >= 0, --epochs >= 1, --lr > 0, --head-start in {', '.join(STARTS)}")

    def tune_settings(self) -> TuneSettings:
        return TuneSettings(blocks=self.blocks, epochs=self.epochs, lr=self.lr, l2=self.l2, pool=self.pool,
                            batch_size=self.batch_size, seed=self.seed, device=self.device)


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
    classes = list(backend.class_names or vocab.classes)
    per_class = word_sets(vocab, cfg.top_words, cfg.score_ratio, classes)
    ds = KeypointDataset(source, backend, None, sift_params(backend.input_size, cfg), descriptors=True)
    with progress_bar(progress) as pb:
        task = pb.add_task("repair features", total=len(source), info="")
        for s in range(0, len(source), cfg.batch_size):
            items = [it for it in (ds[i] for i in range(s, min(len(source), s + cfg.batch_size))) if "skip" not in it]
            pb.update(task, advance=min(len(source), s + cfg.batch_size) - s)
            if not items:
                continue
            x = backend.normalize(torch.from_numpy(np.stack([it["pixels"] for it in items])))
            fl = flag_patches(backend, x, items, vocab, per_class, EXTENT, cfg.dilate)
            flag, cnt = fl.patches, fl.by_set.sum(2)  # (B, N), (B, C) flagged patches per class
            yield {"x": x, "flag": flag & ~flag.all(1, keepdim=True), "index": np.array([it["index"] for it in items]),
                   "shortcut": np.where(cnt.max(1) > 0, cnt.argmax(1), -1)}


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
            progress: bool = True) -> dict:
    """Refit ``model`` in place on the dropped features ``d`` (of :func:`dropped_features`), labels ``y`` (n,) and
    weights ``w`` (n,): the head alone, then with ``cfg.blocks > 0`` the last blocks, norm and head. Returns the
    accuracy on the fitting images (flagged tokens dropped) and the fine-tuning's losses."""
    yt, wt = torch.from_numpy(y), torch.from_numpy(w).float()
    if cfg.blocks == 0 or cfg.head_start == "fit":
        head = fit_head(d["features"], yt, wt, model.head.out_features, cfg.l2, cfg.iters, init=model.head)
        model.head.load_state_dict(head.state_dict())
    if cfg.blocks == 0:
        with torch.no_grad():
            return {"train_accuracy_dropped": float((model.head(d["features"]).argmax(1).numpy() == y).mean())}
    t0 = time.time()
    out = finetune(model, d["tokens"], yt, wt, cfg.tune_settings(), progress)
    pred = tuned_predictions(model, d["tokens"], cfg.blocks, cfg.pool, device=cfg.device)
    return {"train_accuracy_dropped": float((pred == y).mean()), "finetune": {
        **out, "seconds": round(time.time() - t0, 2)}}


def repair(model: str | Backend, images, out: str | Path, config: RepairConfig, progress: bool = True) -> dict:
    """Retrain the head (and with ``blocks > 0`` the last blocks) and save the repaired model into ``out/model``;
    returns the summary (repair.json)."""
    cfg = config
    cfg.validate()
    t0 = time.time()
    backend = model if isinstance(model, Backend) else load_backend(model, cfg.device)
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.limit)
    labels = model_labels(source, backend)
    if source.labels is None or (labels < 0).any():
        raise ConfigError(f"{source.spec!s}: repair needs labelled images named as the model's classes")
    vocab = load_vocabulary(cfg.candidates)
    d = dropped_features(backend, source, vocab, cfg, progress)
    y = labels[d["index"]]
    w, cells = group_weights(y, _groups(cfg, source, d, y))
    fit = retrain(backend.model, d, y, w, cfg, progress)
    if cfg.pool != "model":  # the new head reads these features, so the saved model pools this way
        backend.model.cfg = replace(backend.model.cfg, pool=cfg.pool)
    summary = {"kind": "siftlens-repair", "config": asdict(cfg), "images": int(len(y)), "cells": cells,
               "flagged_share": float((d["shortcut"] >= 0).mean()), **fit, "seconds": round(time.time() - t0, 2)}
    save_vit(backend.model.cpu(), Path(out) / "model", extra={"repair": {k: summary[k] for k in ("config", "cells")}})
    write_json(Path(out) / "repair.json", summary)
    return summary


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
    s = d["shortcut"]
    return ((s >= 0) & (s != y)).astype(np.int64)
