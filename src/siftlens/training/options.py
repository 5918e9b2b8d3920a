"""The option groups of the training jobs (train and pretrain): the ViT's shape, the optimiser, token
dropping, and pre-training's own MAE decoder, masking and evaluation. Each is a nested config
(:func:`siftlens.options.group`), declared once with its help text."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.vit import ViTConfig
from ..options import flat_options, option


@dataclass
class ModelShape:
    """The shape of the project's ViT; the defaults are the built-in default model's (docs/model_card.md)."""

    img_size: int = option(ViTConfig.img_size[0], "Input size; images are resized to it once.")
    patch_size: int = option(ViTConfig.patch_size, "Patch size P; must divide img-size.")
    dim: int = option(ViTConfig.dim, "Width D.")
    depth: int = option(ViTConfig.depth, "Number of blocks.")
    heads: int = option(ViTConfig.heads, "Attention heads.")
    mlp_ratio: float = option(ViTConfig.mlp_ratio, "MLP hidden width / D.")
    num_registers: int = option(ViTConfig.num_registers, "Register tokens after CLS.", flag="registers")


@dataclass
class OptimOptions:
    """AdamW with linear warm-up and cosine decay (:mod:`siftlens.training.optim`)."""

    epochs: int = option(25, "Epochs.")
    lr: float = option(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = option(0.05, "AdamW weight decay (never on norms, biases and position embeddings).")
    warmup_epochs: float = option(2.0, "Linear warm-up, in epochs.")
    min_lr: float = option(1e-5, "Learning rate at the end of the cosine decay.", cli=False)


@dataclass
class KeepOptions:
    """Token dropping during training (docs/method.md, "Guided training")."""

    keep_rate: float = option(1.0, "Token dropping: training steps see this share r of the patch tokens (pretrain: "
                                   "of the visible ones); evaluation uses all; 1 = none.")
    keep_policy: str = option("random", "Which tokens a step keeps: random, or sift (probability ~ (w + eps)^tau, "
                                        "w = keypoints in the patch).")
    keep_tau: float = option(1.0, "sift keep policy: tau > 0 keeps keypoint-rich patches.")
    keep_eps: float = option(1.0, "sift keep policy: added to the keypoint count.")


@dataclass
class DecoderOptions:
    """The MAE decoder (:class:`siftlens.models.mae.MAEConfig`)."""

    decoder_dim: int = option(128, "Decoder width.")
    decoder_depth: int = option(2, "Decoder blocks.")
    decoder_heads: int = option(4, "Decoder attention heads.")


@dataclass
class MaskingOptions:
    """Which patches a pre-training step hides, and how their reconstruction error counts
    (:mod:`siftlens.training.masking`)."""

    policy: str = option("random", "Masking policy: random | sift | sift-curriculum | kamim | attmask (the "
                                   "encoder's own CLS attention as the guide).")
    tau: float = option(1.0, "sift: mask patches with probability ~ (w + eps)^tau (w = keypoints in the patch); "
                             "tau > 0 hides keypoint-rich patches.")
    tau_max: float = option(1.0, "sift-curriculum: tau ramps linearly from 0 to this.")
    eps: float = option(1.0, "Added to the keypoint count before ^tau.")
    lam: float = option(0.0, "Loss weight of a masked patch: 1 + lam * N * c_p (c_p: its share of the image's "
                             "keypoints); 0 = plain MAE loss.")
    kamim_temp: float = option(0.25, "kamim: temperature T of the weights exp(density / T).")
    mask_ratio: float = option(0.75, "Fraction of patches masked.")
    norm_pix: bool = option(False, "Targets: each patch's pixels normalised by its own mean and variance.")
    loss: str = option("mse", "Per-pixel error: mse (MAE) or l1 (SimMIM / KAMIM).")


@dataclass
class EvalOptions:
    """How pre-training measures its encoder on the held-out images (:mod:`siftlens.training.mae_eval`)."""

    feature: str = option("mean", "Encoder feature for k-NN and probe: mean (patch tokens) or cls.")
    eval_every: int = option(1, "Evaluate on --val every this many epochs (and at the end).")
    knn_k: int = option(20, "k-NN: neighbours that vote.")
    knn_temp: float = option(0.07, "k-NN: temperature of the neighbours' similarity weights.")
    knn_train_limit: int | None = option(5000, "Training images in the k-NN memory bank and the probe's "
                                               "training set.")
    probe: bool = option(True, "Also fit a linear probe on the frozen features at every evaluation.")


def flat_values(config) -> dict:
    """A config's values by option name, its groups flattened (``{"dim": 128, "policy": "sift", ...}``): the
    form a run's history.json records."""
    out = {}
    for o in flat_options(type(config), cli_only=False):
        value = config
        for name in o.path:
            value = getattr(value, name)
        out[o.name] = value
    return out


@dataclass
class SessionOptions:
    """How one training run is carried out, apart from what it learns: threads, how many held-out images,
    where the keypoints are cached, and stopping and resuming (train and pretrain alike)."""

    threads: int | None = option(None, "CPU threads for torch.")
    val_limit: int | None = option(None, "Use at most this many held-out images.")
    keypoint_cache: str | None = option(None, "Keypoint cache (.npz) shared between runs on the same images; "
                                              "default out/keypoints.npz.")
    resume: bool = option(False, "Continue from out/checkpoint.pt (exactly: the same batches, masks and weights).")
    stop_after: int | None = option(None, "Stop after this many epochs in this invocation; continue later with "
                                          "--resume.")
