"""The model a training run starts from: a new one of the config's shape, or a saved siftlens model to
fine-tune (a ViT for ``train``, an MAE for ``pretrain``).

A saved model brings its own shape and preprocessing (input size, patch size, channel mean and std): the
images are decoded at its input size and normalised with its statistics, so its weights see what they
were trained on. ``train`` keeps its classifier head when its class names are those of the data, else
starts a new head (initialised from the run's seed); ``pretrain`` from a ViT starts a new decoder.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models import builtin_dir
from ..models.mae import MAE, MAEConfig, load_mae
from ..models.vit import ViT, ViTConfig, load_vit

StartModel = ViT | MAE | str | os.PathLike | None


def load_start(model: StartModel) -> ViT | MAE | None:
    """``model`` as a module: None, a siftlens ViT or MAE, or a folder written by ``save_vit`` / ``save_mae``
    (or a built-in name such as ``default``)."""
    if model is None or isinstance(model, (ViT, MAE)):
        return model
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not folder.is_dir():
            try:
                folder = builtin_dir(str(model))
            except KeyError:
                raise ConfigError(f"cannot start training from {model}: pass a siftlens model folder") from None
        cfg = folder / "config.json"
        if cfg.exists() and '"siftlens_model": "mae"' in cfg.read_text():
            return load_mae(folder)
        return load_vit(folder)
    raise ConfigError(f"cannot start training from a {type(model).__name__}: pass a siftlens ViT, MAE or its "
                      "folder")


def input_size(start: ViT | MAE | None, img_size: int) -> tuple[int, int]:
    """The size (H, W) the run decodes its images at: the starting model's, else ``img_size``."""
    if start is None:
        return (img_size, img_size)
    enc = start.encoder if isinstance(start, MAE) else start
    return tuple(enc.cfg.img_size)


def start_vit(start: ViT | MAE | None, cfg: ViTConfig, seed: int) -> ViT:
    """The ViT a supervised run trains: a new one of ``cfg`` (built under ``seed``), or ``start``'s weights
    (an MAE's encoder) with ``cfg``'s classes and drop-path rate; its head is kept when the class names
    match ``cfg.class_names``, else new."""
    torch.manual_seed(seed)
    if start is None:
        return ViT(cfg)
    src = start.encoder if isinstance(start, MAE) else start
    same = src.cfg.num_classes == cfg.num_classes and list(src.cfg.class_names) == list(cfg.class_names)
    model = ViT(replace(src.cfg, num_classes=cfg.num_classes, class_names=list(cfg.class_names),
                        drop_path=cfg.drop_path))
    state = {k: v for k, v in src.state_dict().items() if same or not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    return model


def start_mae(start: ViT | MAE | None, enc: ViTConfig, dec: MAEConfig, seed: int) -> MAE:
    """The MAE a pre-training run trains: a new one (``enc``, ``dec``, built under ``seed``), ``start`` itself
    (a copy; its decoder's masking and loss settings from ``dec``), or a ViT ``start`` as the encoder of a
    new decoder ``dec``. A started encoder keeps its shape and statistics; it gets ``enc``'s classes and
    pooling, and no classifier head."""
    torch.manual_seed(seed)
    if start is None:
        return MAE(enc, dec)
    src = start.encoder if isinstance(start, MAE) else start
    enc = replace(src.cfg, num_classes=0, class_names=list(enc.class_names), pool=enc.pool)
    if isinstance(start, MAE):
        dec = replace(start.cfg, mask_ratio=dec.mask_ratio, norm_pix=dec.norm_pix, loss=dec.loss)
    model = MAE(enc, dec)
    if isinstance(start, MAE):
        model.load_state_dict(start.state_dict())
    else:
        state = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
        model.encoder.load_state_dict(state, strict=False)
    return model
