"""The project's own Vision Transformer: small, readable, nanoGPT-sized.

Shapes: ``B`` batch, ``C`` channels, ``H x W`` input pixels, ``P`` patch size, ``N = g_h * g_w`` patch
tokens, ``T`` prefix tokens (CLS and registers), ``S = T + N`` sequence length, ``D`` width, ``h`` heads.

Attention runs fused (``scaled_dot_product_attention``) for speed. ``set_fused(False)`` switches every
layer to the eager path, which materialises the post-softmax attention and passes it through
``Attention.probe`` (an ``nn.Identity``): a forward hook on the probe sees ``attn: (B, h, S, S)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, GeometryError, ModelLoadError
from ..io import read_json
from .layers import resolve_layers

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
POOLS = ("cls", "mean")


@dataclass
class ViTConfig:
    """Architecture and preprocessing of a siftlens ViT.

    ``img_size`` is ``(H, W)``; it need not be square, but ``patch_size`` must divide both sides.
    ``mean``/``std`` are the per-channel normalisation applied to pixels in [0, 1].
    """

    img_size: tuple[int, int] = (32, 32)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    cls_token: bool = True
    num_registers: int = 0
    pool: str = "cls"  # "cls" or "mean" (mean over patch tokens)
    drop_path: float = 0.0
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            self.img_size = (self.img_size, self.img_size)
        self.img_size = tuple(int(s) for s in self.img_size)
        self.mean = tuple(self.mean)
        self.std = tuple(self.std)
        h, w = self.img_size
        if h % self.patch_size or w % self.patch_size:
            raise GeometryError(
                f"patch size {self.patch_size} does not divide the input {h}x{w}; choose a patch size "
                "that divides both sides"
            )
        if self.dim % self.heads:
            raise GeometryError(f"width {self.dim} is not divisible by {self.heads} heads")
        if self.pool not in POOLS:
            raise GeometryError(f"pool must be 'cls' or 'mean', not {self.pool!r}")
        if self.pool == "cls" and not self.cls_token:
            raise GeometryError("pool='cls' needs cls_token=True")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token) + self.num_registers


class Attention(nn.Module):
    """Multi-head self-attention with a fused and an eager path."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused = True
        self.probe = nn.Identity()  # hook point: input/output is attn (B, h, S, S)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D); attn_bias: additive on the logits, broadcastable to (B, h, S, S)."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, S, S)
            if attn_bias is not None:
                logits = logits + attn_bias
            attn = self.probe(logits.softmax(dim=-1))
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x), attn_bias))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """A plain ViT classifier: patch embedding, prefix tokens, pre-norm blocks, head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, D, kernel_size=P, stride=P)
        n = cfg.grid_size[0] * cfg.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, D))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.cls_token else None
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, D)) if cfg.num_registers else None
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, D)) if cfg.cls_token else None
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, dpr[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.pos_embed, self.cls_token, self.registers, self.cls_pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # -- geometry, read by backends -------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    def set_fused(self, fused: bool) -> None:
        """Switch every layer between fused attention and the eager path that feeds ``probe``."""
        for blk in self.blocks:
            blk.attn.fused = fused

    # -- forward --------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) normalised pixels -> tokens (B, T + K, D).

        keep_idx: (B, K) long indices of the patch tokens to keep (MAE encoder, token drop); the
        kept tokens keep their own position embeddings. None keeps all N.
        """
        if tuple(x.shape[-2:]) != self.cfg.img_size:
            raise GeometryError(
                f"input is {x.shape[-2]}x{x.shape[-1]} but the model expects "
                f"{self.cfg.img_size[0]}x{self.cfg.img_size[1]}"
            )
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        if keep_idx is not None:
            t = torch.gather(t, 1, keep_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        prefix = []
        B = t.shape[0]
        if self.cls_token is not None:
            prefix.append((self.cls_token + self.cls_pos).expand(B, -1, -1))
        if self.registers is not None:
            prefix.append(self.registers.expand(B, -1, -1))
        return torch.cat(prefix + [t], dim=1) if prefix else t

    def forward_features(
        self,
        x: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        bias_layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) -> normed tokens (B, T + K, D). attn_bias: broadcastable to (B, h, S, S).

        bias_layers: indices of the blocks that receive ``attn_bias`` (negative from the end); None = all.
        """
        t = self.embed(x, keep_idx)
        chosen = None
        if attn_bias is not None and bias_layers is not None:
            chosen = set(resolve_layers(bias_layers, len(self.blocks)))
        for i, blk in enumerate(self.blocks):
            t = blk(t, attn_bias if chosen is None or i in chosen else None)
        return self.norm(t)

    @torch.no_grad()
    def last_cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention from the CLS token to every patch token, mean over heads:
        x (B, C, H, W) -> (B, N), each row summing to at most 1 (the rest goes to the prefix tokens).

        The attention is the block's own (:class:`Attention`'s eager path, read at its ``probe``); the last
        block's MLP is not run."""
        if self.cls_token is None:
            raise ConfigError("this model has no CLS token, so it has no CLS attention")
        t = self.embed(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        last = self.blocks[-1]
        seen: list[torch.Tensor] = []
        hook = last.attn.probe.register_forward_hook(lambda module, args, attn: seen.append(attn))
        fused, last.attn.fused = last.attn.fused, False
        try:
            last.attn(last.norm1(t))
        finally:
            last.attn.fused = fused
            hook.remove()
        return seen[0].mean(dim=1)[:, 0, self.num_prefix_tokens :].float()  # attn (B, h, S, S)

    def pool(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None, how: str = "model") -> torch.Tensor:
        """tokens: (B, S, D) -> (B, D). key_mask: (B, S) bool of tokens that count for mean pooling.

        how: ``model`` (the model's own pooling, ``cfg.pool``), ``cls`` (the CLS token) or ``mean`` (the mean of
        the patch tokens)."""
        if how not in ("model", *POOLS):
            raise ConfigError(f"pool must be one of model, {', '.join(POOLS)}, not {how!r}")
        how = self.cfg.pool if how == "model" else how
        if how == "cls":
            if self.cls_token is None:
                raise ConfigError("pool 'cls' needs a model with a CLS token")
            return tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens :]
        if key_mask is None:
            return patches.mean(1)
        m = key_mask[:, self.num_prefix_tokens :].to(patches.dtype).unsqueeze(-1)
        return (patches * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(
        self,
        x: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        attn_bias: torch.Tensor | None = None,
        bias_layers: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.pool(self.forward_features(x, keep_idx, attn_bias, bias_layers)))


# -- persistence -----------------------------------------------------------------------------------
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_vit(model: ViT, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` atomically into ``directory``."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = asdict(model.cfg)
    cfg["siftlens_model"] = "vit"
    if extra:
        cfg["extra"] = extra
    with atomic_path(d / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(d / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp))
    return d


def load_config(directory: str | os.PathLike) -> ViTConfig:
    p = Path(directory) / CONFIG_NAME
    raw = read_json(p, "config of a siftlens model folder", error=ModelLoadError)
    raw.pop("siftlens_model", None)
    raw.pop("extra", None)
    try:
        return ViTConfig(**raw)
    except TypeError as e:
        raise ModelLoadError(f"{p} does not describe a siftlens ViT: {e}") from e


def load_vit(directory: str | os.PathLike, map_location: str = "cpu") -> ViT:
    """Load a model written by :func:`save_vit`."""
    from safetensors.torch import load_file

    cfg = load_config(directory)
    model = ViT(cfg)
    wpath = Path(directory) / WEIGHTS_NAME
    if not wpath.exists():
        raise ModelLoadError(f"no {WEIGHTS_NAME} in {directory}")
    state = load_file(str(wpath), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {wpath} do not match its config (missing {len(missing)}, unexpected {len(unexpected)})"
        )
    return model.eval()
