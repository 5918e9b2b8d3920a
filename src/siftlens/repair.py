"""Label-free repair, beyond prompting: retrain only the classification head (DFR-style, Kirichenko et al.
2022, arXiv 2204.02937) on features computed with the discovered shortcut's tokens dropped, over a set
re-weighted from discovery alone.

1. Every image of ``images`` is flagged as in prompting's ``drop`` policy (each class's best candidates:
   SIFT words by their keypoints' footprint, region words by their patches) and its pooled features are
   computed with the flagged tokens removed.
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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .data import ImageSource
from .errors import ConfigError
from .interventions import dilate
from .io import write_json
from .keypoints import sift_params
from .models import load_backend
from .models.backend import Backend
from .models.vit import save_vit
from .progress import progress_bar
from .prompting.masks import footprint_patches
from .spurious.data import find_sidecar, read_sidecar
from .spurious.features import KeypointDataset, model_labels
from .spurious.regions import region_words
from .spurious.vocabulary import Vocabulary, load_vocabulary

GROUPINGS = ("discovery", "sidecar", "none")
POOLS = ("model", "cls", "mean")


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
        if self.l2 < 0 or self.iters < 1 or self.top_words < 1:
            raise ConfigError("--l2 must be >= 0, --iters and --top-words >= 1")


def class_flags(it: dict, vocab: Vocabulary, per_class: list[set[int]], rwords: np.ndarray | None, P: int,
                grid: tuple[int, int]) -> np.ndarray:
    """(C, N) bool: the patches flagged by each class's candidates in one image."""
    N = grid[0] * grid[1]
    out = np.zeros((len(per_class), N), bool)
    words = vocab.words_of(it["desc"]) if len(it["xy"]) else np.zeros(0, np.int64)
    K = len(vocab.centers)
    for c, ids in enumerate(per_class):
        fl = np.isin(words, [w for w in ids if w < K])
        if fl.any():
            out[c] |= footprint_patches(it["xy"][fl], it["size"][fl], P, grid)
        if rwords is not None:
            out[c] |= np.isin(rwords, [w - K for w in ids if w >= K])
    return out


def _per_class(vocab: Vocabulary, classes: list[str], top: int, ratio: float) -> list[set[int]]:
    out = []
    for c in classes:
        ws, sc = vocab.ranked.get(c, []), vocab.scores.get(c) or []
        best = max(sc[:1] or [0.0])
        out.append({w for w, s in zip(ws[:top], sc[:top], strict=False) if s >= ratio * best})
    return out


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, x: torch.Tensor, drop: torch.Tensor, pool: str = "model") -> torch.Tensor:
    """Pooled features (B, D) of a siftlens ViT on the normalised batch ``x`` with the patches where ``drop (B, N)``
    is True removed (one forward per number of kept tokens; an image whose every patch is flagged keeps them all).

    pool: ``model`` (the model's own pooling), ``cls`` (the CLS token) or ``mean`` (mean of the kept patch tokens
    after the final norm)."""
    if pool not in POOLS:
        raise ConfigError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
    drop = drop.to(torch.bool).cpu()
    drop = drop & ~drop.all(1, keepdim=True)
    keep_counts = (~drop).sum(1)
    f = torch.empty((x.shape[0], model.head.in_features))
    T = model.num_prefix_tokens
    for k in keep_counts.unique().tolist():
        rows = (keep_counts == k).nonzero().flatten()
        keep = (~drop[rows]).nonzero()[:, 1].view(len(rows), k).to(x.device)
        tokens = model.forward_features(x[rows.to(x.device)], keep)
        if pool == "model":
            out = model.pool(tokens)
        elif pool == "cls":
            if model.cls_token is None:
                raise ConfigError("pool 'cls' needs a model with a CLS token")
            out = tokens[:, 0]
        else:
            out = tokens[:, T:].mean(1)
        f[rows] = out.float().cpu()
    return f


@torch.inference_mode()
def dropped_features(backend: Backend, source: ImageSource, vocab: Vocabulary, cfg: RepairConfig,
                     progress: bool = True) -> dict:
    """Pooled features (n, D) with flagged tokens dropped, the shortcut class per image (-1: none), names."""
    model = backend.model
    if backend.kind != "native":
        raise ConfigError("repair retrains the head of a siftlens ViT (native backend) only")
    classes = list(backend.class_names or vocab.classes)
    per_class = _per_class(vocab, classes, cfg.top_words, cfg.score_ratio)
    P, grid = backend.patch_size, tuple(backend.grid_size)
    ds = KeypointDataset(source, backend, sift_params(backend.input_size, cfg))
    feats, short, idx = [], [], []
    with progress_bar(progress) as pb:
        task = pb.add_task("repair features", total=len(source), info="")
        for s in range(0, len(source), cfg.batch_size):
            items = [it for it in (ds[i] for i in range(s, min(len(source), s + cfg.batch_size))) if "skip" not in it]
            if not items:
                continue
            x = backend.normalize(torch.from_numpy(np.stack([it["pixels"] for it in items])))
            rw = region_words(backend, x, vocab.regions, vocab.region_layer) if vocab.regions is not None else None
            cf = np.stack([class_flags(it, vocab, per_class, None if rw is None else rw[k], P, grid)
                           for k, it in enumerate(items)])  # (B, C, N)
            flag = dilate(torch.from_numpy(cf.any(1)), grid, cfg.dilate)
            flag = flag & ~flag.all(1, keepdim=True)
            cnt = cf.sum(2)
            short.append(np.where(cnt.max(1) > 0, cnt.argmax(1), -1))
            feats.append(pooled_features(model, x, flag, cfg.pool))
            idx += [it["index"] for it in items]
            pb.update(task, advance=len(items))
    if not idx:
        raise ConfigError(f"no image of {source.spec!s} could be read")
    return {"features": torch.cat(feats), "shortcut": np.concatenate(short), "index": np.asarray(idx)}


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


def repair(model: str | Backend, images, out: str | Path, config: RepairConfig, progress: bool = True) -> dict:
    """Retrain the head and save the repaired model into ``out/model``; returns the summary (repair.json)."""
    cfg = config
    cfg.validate()
    t0 = time.time()
    backend = model if isinstance(model, Backend) else load_backend(str(model), cfg.device)
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.limit)
    labels = model_labels(source, backend)
    if source.labels is None or (labels < 0).any():
        raise ConfigError(f"{source.spec!s}: repair needs labelled images named as the model's classes")
    vocab = load_vocabulary(cfg.candidates)
    d = dropped_features(backend, source, vocab, cfg, progress)
    d["features"] = d["features"].clone()  # a normal tensor (made in inference mode), so autograd can use it
    y = labels[d["index"]]
    groups = _groups(cfg, source, d, y)
    w, cells = group_weights(y, groups)
    old = backend.model.head
    head = fit_head(d["features"], torch.from_numpy(y), torch.from_numpy(w).float(), old.out_features, cfg.l2,
                    cfg.iters, init=old)
    with torch.no_grad():
        train_acc = float((head(d["features"]).argmax(1).numpy() == y).mean())
    backend.model.head.load_state_dict(head.state_dict())
    if cfg.pool != "model":  # the new head reads these features, so the saved model pools this way
        backend.model.cfg = replace(backend.model.cfg, pool=cfg.pool)
    summary = {"kind": "siftlens-repair", "config": asdict(cfg), "images": int(len(y)), "cells": cells,
               "flagged_share": float((d["shortcut"] >= 0).mean()), "train_accuracy_dropped": train_acc,
               "seconds": round(time.time() - t0, 2)}
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
