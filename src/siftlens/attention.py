"""Capturing post-softmax attention one layer at a time, and attention rollout.

:func:`capture` is a context manager: it switches the backend to its eager attention path, registers one
forward hook per selected layer, and removes every hook (and restores the fused path) on exit, also when
the body raises. It never swallows an exception. Each hook calls ``on_attention(layer, attn)`` with
``attn: (B, h, S, S)`` as soon as the layer has computed it, so only one layer's attention is alive at a
time unless the callback keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from .errors import AttentionBackendError
from .models.layers import resolve_layers

if TYPE_CHECKING:
    from .models.backend import Backend

OnAttention = Callable[[int, torch.Tensor], None]


class Capture:
    """Handle returned by :func:`capture`; ``seen`` lists the layers observed so far in the block."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.seen: list[int] = []

    def check(self) -> None:
        """Raise if a selected layer produced no attention (e.g. a fused kernel was still active)."""
        missing = [l for l in self.layers if l not in self.seen]
        if missing:
            raise AttentionBackendError(
                f"no attention was observed for layers {missing}: the model did not run its eager "
                "attention path (a fused kernel such as SDPA or flash attention is still active)"
            )


@contextlib.contextmanager
def capture(
    backend: Backend, on_attention: OnAttention, layers: Sequence[int] | None = None
) -> Iterator[Capture]:
    """Call ``on_attention(layer, attn (B, h, S, S))`` for each selected layer during forwards in the block."""
    sel = resolve_layers(layers, backend.num_layers)
    cap = Capture(sel)
    probes = backend.probes()
    handles = []

    def make_hook(layer: int, extract):
        def hook(module, args, kwargs, output):
            attn = extract(module, args, kwargs, output)
            if attn is None:
                raise AttentionBackendError(
                    f"layer {layer} returned no attention weights; the backend's eager path is not active"
                )
            cap.seen.append(layer)
            on_attention(layer, attn)

        return hook

    with backend.eager():
        try:
            for layer in sel:
                module, extract = probes[layer]
                handles.append(module.register_forward_hook(make_hook(layer, extract), with_kwargs=True))
            yield cap
        finally:
            for h in handles:
                h.remove()


def patch_rows(attn: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """The rows a viewer draws over the image: ``attn (..., S, S)`` -> ``(..., 1 + N, N)`` over the N patch keys.

    Row 0 is the CLS token's attention (the mean over patch queries for a model without CLS); row
    ``1 + i`` is patch i's. Attention to prefix tokens is left out, so rows sum to at most 1.
    """
    keys = attn[..., num_prefix:]
    first = keys[..., :1, :] if has_cls else keys[..., num_prefix:, :].mean(-2, keepdim=True)
    return torch.cat([first, keys[..., num_prefix:, :]], -2)


class Rollout:
    """Attention rollout (Abnar and Zuidema 2020), accumulated one layer at a time.

    For each layer: ``A' = (1 - r) * mean_heads(A) + r * I`` (rows renormalised; ``r`` = residual weight,
    0.5 in the paper), then ``R <- A' @ R``. ``result``: (B, S, S).
    """

    def __init__(self, residual: float = 0.5):
        self.residual = residual
        self.result: torch.Tensor | None = None

    def update(self, attn: torch.Tensor) -> None:
        """attn: (B, h, S, S) of the next layer (layers must arrive in order)."""
        a = attn.float().mean(1)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = (1 - self.residual) * a + self.residual * eye
        a = a / a.sum(-1, keepdim=True)
        self.result = a if self.result is None else a @ self.result
