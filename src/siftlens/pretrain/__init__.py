"""SIFT-guided masked-image-modelling pre-training (METHOD.md section 5).

    masking.py    policies (random, sift, sift-curriculum, kamim, attmask) and keypoint loss weights
    evaluate.py   k-NN accuracy and linear probe on frozen encoder features
    engine.py     the MAE epoch and run over :mod:`siftlens.training` (``pretrain(PretrainConfig(...))``,
                  CLI ``siftlens pretrain``)
    plots.py      curves

The crop + flip itself (``AugParams``, ``draw_augment``, ``apply_augment``), the keypoint bank that follows it
(:mod:`siftlens.training.keypoints`) and the guided sampler (:mod:`siftlens.training.guidance`) live in
:mod:`siftlens.training`, shared with supervised token dropping, and are re-exported here.
"""

from __future__ import annotations

from ..training.augment import AugParams, apply_augment, draw_augment
from ..training.guidance import gumbel
from ..training.keypoints import KeypointBank, patch_counts, transform_keypoints
from .engine import PretrainConfig, pretrain
from .evaluate import extract_features, knn_accuracy, knn_predict, linear_probe
from .masking import POLICIES, kamim_density, kamim_weights, keypoint_loss_weights, mask_scores, tau_at
from .plots import plot_curves

__all__ = [
    "AugParams", "KeypointBank", "apply_augment", "draw_augment", "patch_counts", "transform_keypoints",
    "PretrainConfig", "pretrain", "extract_features", "knn_accuracy", "knn_predict", "linear_probe",
    "POLICIES", "gumbel", "kamim_density", "kamim_weights", "keypoint_loss_weights", "mask_scores", "tau_at",
    "plot_curves",
]
