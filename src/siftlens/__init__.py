"""siftlens: explain Vision Transformer self-attention in terms of SIFT keypoints.

Public API (imported lazily, so ``import siftlens`` stays light)::

    analyze, AnalysisConfig, AnalysisResult        dataset-level analysis returning tables
    merge                                           the shards of one analysis combined into one run
    write_report                                    figures + self-contained report.html from those tables
    keypoint_map, detect, SiftParams, KeypointMap   SIFT on the model's pixels, patch weight maps
    capture, Rollout                                per-layer attention capture, attention rollout
    image_metrics, null_indices, with_null          the metrics and the null model, batched torch
    load_backend, Backend                           one interface over native, Hugging Face and timm models
    ViT, ViTConfig, load_vit, save_vit              the project's own ViT
    ImageSource                                     folders, zips, globs and file lists of images
    train, TrainConfig, TrainResult                 supervised training (or fine-tuning) of the project's ViT
    pretrain, PretrainConfig, PretrainResult        masked-autoencoder pre-training (siftlens.training)
    MAE, MAEConfig                                  the project's masked autoencoder
    SiftlensError                                   base class of every user-facing error
    build_spurious, SpuriousConfig                  the SpuriousCIFAR builder (siftlens.benchmarks)
    discover, DiscoveryConfig, DiscoveryResult      shortcut discovery with SIFT visual words (siftlens.shortcuts)
    prompt, PromptConfig, PromptResult              inference-time token interventions and their evaluation
    repair, RepairConfig, RepairResult              retraining the head (or last blocks) with the shortcut dropped
    compare, CompareConfig, Comparison              differences between analysis runs, with bootstrap CIs and q
    reference                                       the whole method in plain float64, one image at a time (a module)

Every job has one shape: ``fn(model, images, config=None, *, weights=None, progress=True) -> Result``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "analyze": "analysis", "AnalysisConfig": "analysis", "AnalysisResult": "analysis", "merge": "analysis",
    "write_report": "report",
    "keypoint_map": "keypoints", "detect": "keypoints", "SiftParams": "keypoints", "KeypointMap": "keypoints",
    "capture": "attention", "Rollout": "attention",
    "image_metrics": "core.metrics", "null_indices": "core.nullmodel", "with_null": "core.nullmodel",
    "load_backend": "models", "Backend": "models",
    "ViT": "models.vit", "ViTConfig": "models.vit", "load_vit": "models.vit", "save_vit": "models.vit",
    "ImageSource": "data",
    "SiftlensError": "errors",
    "TrainConfig": "training", "train": "training", "TrainResult": "training",
    "PretrainConfig": "training", "pretrain": "training", "PretrainResult": "training",
    "MAE": "models.mae", "MAEConfig": "models.mae",
    "compare": "analysis", "CompareConfig": "analysis", "Comparison": "analysis",
    "SpuriousConfig": "benchmarks.spurious_cifar",
    "discover": "shortcuts", "DiscoveryConfig": "shortcuts", "DiscoveryResult": "shortcuts",
    "prompt": "shortcuts", "PromptConfig": "shortcuts", "PromptResult": "shortcuts",
    "repair": "shortcuts", "RepairConfig": "shortcuts", "RepairResult": "shortcuts",
}
_ALIASES = {"build_spurious": ("benchmarks.spurious_cifar", "build")}

__all__ = sorted([*_EXPORTS, *_ALIASES, "reference"]) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _ALIASES:
        mod, attr = _ALIASES[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name == "reference":  # the method in one readable file, a module of its own
        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module 'siftlens' has no attribute {name!r}")
