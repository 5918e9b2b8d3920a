"""The option groups of the training jobs (train and pretrain): the ViT's shape, the optimiser, and token
dropping. Each is a nested config (:func:`siftlens.options.group`), declared once with its help text."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import option


@dataclass
class ModelShape:
    """The shape of the project's ViT; the defaults are the built-in default model's (docs/model_card.md)."""

    img_size: int = option(32, "Input size; images are resized to it once.")
    patch_size: int = option(4, "Patch size P; must divide img-size.")
    dim: int = option(128, "Width D.")
    depth: int = option(6, "Number of blocks.")
    heads: int = option(4, "Attention heads.")
    mlp_ratio: float = option(2.0, "MLP hidden width / D.")
    num_registers: int = option(0, "Register tokens after CLS.", flag="registers")


@dataclass
class OptimOptions:
    """AdamW with linear warm-up and cosine decay (:mod:`siftlens.training.optim`)."""

    epochs: int = option(25, "Epochs.")
    lr: float = option(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.05, "AdamW weight decay (never on norms, biases and position embeddings).")
    warmup_epochs: float = option(2.0, "Linear warm-up, in epochs.")


@dataclass
class KeepOptions:
    """Token dropping during training (docs/method.md, "Guided training")."""

    keep_rate: float = option(1.0, "Token dropping: training steps see this share r of the patch tokens (pretrain: "
                                   "of the visible ones); evaluation uses all; 1 = none.")
    keep_policy: str = option("random", "Which tokens a step keeps: random, or sift (probability ~ (w + eps)^tau, "
                                        "w = keypoints in the patch).")
    keep_tau: float = option(1.0, "sift keep policy: tau > 0 keeps keypoint-rich patches.")
    keep_eps: float = option(1.0, "sift keep policy: added to the keypoint count.")
