"""Masked autoencoder (He et al. 2021) on the project's own ViT.

Shapes: ``B`` batch, ``C`` channels, ``H x W`` pixels, ``P`` patch size, ``N = g_h * g_w`` patches,
``K = N - M`` visible patches, ``M`` masked patches, ``T`` prefix tokens of the encoder (CLS,
registers), ``D`` encoder width, ``Dd`` decoder width.

The encoder *is* a :class:`~siftlens.models.vit.ViT` run on the visible patches only
(``forward_features(x, keep_idx)``); after pre-training it is saved as an ordinary siftlens ViT and can
be analysed like any other model. The decoder is a few of the same :class:`Block` s on all ``N``
positions: encoded visible tokens plus a shared learned mask token, each with a decoder position
embedding. Which patches are hidden is decided by a per-patch *score* (``(B, N)``): the ``K`` lowest
scores stay visible, the ``M`` highest are masked, exactly MAE's ``random_masking`` when the score is
uniform noise. Masking policies (random, SIFT-guided) only change the score.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from ..io import read_json
from .vit import Block, ViT, ViTConfig

LOSSES = ("mse", "l1")


@dataclass
class MAEConfig:
    """Decoder and objective. ``norm_pix``: targets are each patch's pixels normalised by its own mean
    and variance (He et al. 2021, section 3). ``loss``: per-pixel error, ``mse`` (MAE) or ``l1`` (SimMIM)."""

    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    mask_ratio: float = 0.75
    norm_pix: bool = False
    loss: str = "mse"

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be strictly between 0 and 1, got {self.mask_ratio}")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"decoder width {self.decoder_dim} is not divisible by {self.decoder_heads} heads")


class MAE(nn.Module):
    """ViT encoder on visible patches + light Transformer decoder predicting every patch's pixels."""

    def __init__(self, encoder_cfg: ViTConfig, cfg: MAEConfig = MAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViT(encoder_cfg)
        n = encoder_cfg.grid_size[0] * encoder_cfg.grid_size[1]
        self.num_keep = int(n * (1.0 - cfg.mask_ratio))
        if not 0 < self.num_keep < n:
            raise ConfigError(f"mask ratio {cfg.mask_ratio} leaves {self.num_keep} of {n} patches visible; "
                              "choose a ratio that keeps at least one and masks at least one")
        Dd, P = cfg.decoder_dim, encoder_cfg.patch_size
        self.decoder_embed = nn.Linear(encoder_cfg.dim, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos = nn.Parameter(torch.zeros(1, n, Dd))
        self.decoder_blocks = nn.ModuleList(
            Block(Dd, cfg.decoder_heads, cfg.decoder_mlp_ratio) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred = nn.Linear(Dd, P * P * encoder_cfg.in_chans)
        for p in (self.mask_token, self.decoder_pos):
            nn.init.trunc_normal_(p, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.decoder_pos.shape[1]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, N, P*P*C), row-major patches, pixels ordered (row, col, channel)."""
        B, C, H, W = x.shape
        P = self.encoder.patch_size
        x = x.reshape(B, C, H // P, P, W // P, P)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B, N, P*P*C) -> (B, C, H, W); inverse of :meth:`patchify`."""
        (gh, gw), P, C = self.encoder.grid_size, self.encoder.patch_size, self.encoder.cfg.in_chans
        t = t.reshape(t.shape[0], gh, gw, P, P, C)
        return t.permute(0, 5, 1, 3, 2, 4).reshape(t.shape[0], C, gh * P, gw * P)

    def masking(self, scores: torch.Tensor, keep_scores: torch.Tensor | None = None, n_encode: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """scores: (B, N) -> keep_idx (B, K), mask (B, N) float (1 = masked), ids_restore (B, N).

        The ``num_keep`` lowest scores are visible (MAE's ``random_masking`` with ``noise = scores``).
        Token dropping: with ``keep_scores`` (B, N), the encoder sees only the ``n_encode`` visible patches
        with the highest keep scores (K = n_encode); the other visible patches reach the decoder as mask
        tokens but stay out of the loss, whose ``mask`` is still the masked set.
        """
        ids_shuffle = torch.argsort(scores, dim=1)
        k = self.num_keep
        if keep_scores is not None:
            visible = ids_shuffle[:, :k]
            order = torch.gather(keep_scores, 1, visible).argsort(dim=1, descending=True)
            ids_shuffle = torch.cat([torch.gather(visible, 1, order), ids_shuffle[:, k:]], dim=1)
            k = n_encode if n_encode is not None else k
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones_like(scores)
        mask[:, : self.num_keep] = 0
        return ids_shuffle[:, :k], torch.gather(mask, 1, ids_restore), ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (B, T + K, D) encoder output; ids_restore: (B, N) -> pred (B, N, P*P*C)."""
        T = self.encoder.num_prefix_tokens
        t = self.decoder_embed(latent)  # (B, T + K, Dd)
        B, N = ids_restore.shape
        patches = torch.cat([t[:, T:], self.mask_token.expand(B, N - (t.shape[1] - T), -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        t = torch.cat([t[:, :T], patches + self.decoder_pos], dim=1)  # (B, T + N, Dd)
        for blk in self.decoder_blocks:
            t = blk(t)
        return self.decoder_pred(self.decoder_norm(t))[:, T:]

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> reconstruction targets (B, N, P*P*C), per-patch normalised if ``norm_pix``."""
        target = self.patchify(x)
        if self.cfg.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean error over masked patches only: sum_p m_p a_p e_p / sum_p m_p (over the batch).

        x: (B, C, H, W); pred: (B, N, P*P*C); mask: (B, N), 1 = masked; weights a: (B, N) or None (1).
        e_p is the mean per-pixel squared (or absolute) error of patch p. Every image masks the same
        number of patches, so this is also the mean over images of their own masked-patch means.
        """
        diff = pred - self.targets(x)
        err = (diff**2 if self.cfg.loss == "mse" else diff.abs()).mean(dim=-1)  # (B, N)
        w = mask if weights is None else mask * weights
        return (err * w).sum() / mask.sum()

    def forward(self, x: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor | None = None,
                keep_scores: torch.Tensor | None = None, n_encode: int | None = None):
        """x: (B, C, H, W) normalised pixels; scores: (B, N); weights: (B, N) or None; keep_scores and
        n_encode: token dropping among the visible patches (see :meth:`masking`).

        Returns ``(loss, pred (B, N, P*P*C), mask (B, N))``."""
        keep_idx, mask, ids_restore = self.masking(scores, keep_scores, n_encode)
        latent = self.encoder.forward_features(x, keep_idx)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(x, pred, mask, weights), pred, mask


# -- persistence -----------------------------------------------------------------------------------
def save_mae(model: MAE, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (encoder and MAE configs) and ``model.safetensors`` atomically."""
    from safetensors.torch import save_file

    from ..io import atomic_path, write_json

    d = Path(directory)
    write_json(d / "config.json", {"siftlens_model": "mae", "encoder": asdict(model.encoder.cfg),
                                   "mae": asdict(model.cfg)})
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    return d


def load_mae(directory: str | os.PathLike, map_location: str = "cpu") -> MAE:
    """Load a model written by :func:`save_mae`."""
    from safetensors.torch import load_file

    p = Path(directory) / "config.json"
    raw = read_json(p, "config of a siftlens MAE folder", error=ModelLoadError)
    try:
        model = MAE(ViTConfig(**raw["encoder"]), MAEConfig(**raw["mae"]))
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{p} does not describe a siftlens MAE ({e})") from e
    wpath = Path(directory) / "model.safetensors"
    if not wpath.exists():
        raise ModelLoadError(f"no model.safetensors in {directory}")
    model.load_state_dict(load_file(str(wpath), device=map_location))
    return model.eval()
