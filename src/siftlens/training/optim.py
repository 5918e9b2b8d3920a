"""AdamW with the one weight-decay rule, and the learning-rate schedule.

Weight decay applies to the weight matrices only. No decay for biases and norm parameters (``ndim < 2``),
position embeddings (``pos_embed``, ``cls_pos``, the MAE's ``decoder_pos``), and the learned tokens
(``cls_token``, ``registers``, the MAE's ``mask_token``): the rule of MAE, DeiT and timm's ``no_weight_decay``.

Schedule, by optimiser step: linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``min_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import ConfigError

NO_DECAY_KEYS = ("pos", "token", "registers")  # matched against a parameter's own name (after the last dot)


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` (as in ``named_parameters``) gets weight decay."""
    own = name.rsplit(".", 1)[-1]
    return p.ndim >= 2 and not any(k in own for k in NO_DECAY_KEYS)


def param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Optimiser groups over ``named`` (name, parameter) pairs: the decayed parameters, then the rest (weight
    decay 0)."""
    named = list(named)
    return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over every parameter of ``model`` in the two groups of :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model.named_parameters(), weight_decay), lr=lr, betas=betas)


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(t, 1.0)))


@dataclass(frozen=True)
class Schedule:
    """Batches and learning rate of a run: ``steps_per_epoch`` batches of ``batch_size`` (the last partial
    batch of an epoch is dropped), ``warmup`` steps of linear warm-up, cosine decay from ``lr`` to ``min_lr``."""

    batch_size: int
    steps_per_epoch: int
    epochs: int
    warmup: int
    lr: float
    min_lr: float

    @classmethod
    def for_data(cls, n: int, batch_size: int, epochs: int, warmup_epochs: float, lr: float,
                 min_lr: float) -> Schedule:
        """The schedule of ``epochs`` epochs over ``n`` images; a one-line error if not one batch fits."""
        steps = n // batch_size
        if steps == 0:
            raise ConfigError(f"batch size {batch_size} exceeds the {n} training images")
        return cls(batch_size, steps, epochs, int(warmup_epochs * steps), lr, min_lr)

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.lr, self.min_lr)
