"""The project's own :class:`~siftlens.models.vit.ViT` as a :class:`~siftlens.models.backend.Backend`.

The ViT takes token drop (``keep_idx``) and an attention bias as forward arguments, so interventions
need no hooks; attention is observed on each block's ``attn.probe``.
"""

from __future__ import annotations

import contextlib

import torch

from .backend import Backend
from .vit import ViT


class NativeBackend(Backend):
    """The project's own :class:`~siftlens.models.vit.ViT`."""

    kind = "native"

    def __init__(self, model: ViT, device: str | torch.device = "cpu", source: str = ""):
        super().__init__(model, device)
        cfg = model.cfg
        self.source = source
        self.patch_size = model.patch_size
        self.grid_size = tuple(model.grid_size)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.num_layers = len(model.blocks)
        self.num_heads = model.blocks[0].attn.heads
        self.input_size = tuple(cfg.img_size)
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        self.class_names = list(cfg.class_names) or None
        self.has_cls = cfg.cls_token
        self.check_geometry()

    def probes(self):
        """Per block: ``attn.probe``, whose output is attn (B, h, S, S) in the eager path."""
        return [(blk.attn.probe, _probe_output) for blk in self.model.blocks]

    @contextlib.contextmanager
    def eager(self):
        prev = [blk.attn.fused for blk in self.model.blocks]
        self.model.set_fused(False)
        try:
            yield
        finally:
            for blk, f in zip(self.model.blocks, prev, strict=True):
                blk.attn.fused = f

    def forward(self, x):
        if self.model.cfg.num_classes > 0:
            return self.model(x)
        self.model.forward_features(x)
        return None

    def _forward_intervened(self, x, keep_idx, bias, layers):
        """Drop and bias are arguments of the ViT; with a bias in every layer, mean pooling skips the keys
        it removed from every softmax (``-inf``)."""
        tokens = self.model.forward_features(x, keep_idx, bias, bias_layers=layers)
        if self.model.cfg.num_classes <= 0:
            return None
        key_mask = None
        if bias is not None and layers is None:
            key_mask = ~torch.isneginf(bias[:, 0, 0])
        return self.model.head(self.model.pool(tokens, key_mask))


def _probe_output(module, args, kwargs, output) -> torch.Tensor:
    return output
