"""A network and the inference-time drop it was fitted for, run as one model: what ``load_backend`` returns for a
repaired model folder (:mod:`siftlens.shortcuts.artefact` reads the folder).

- :class:`DropRule`: the rule of prompting's ``drop`` policy with fixed settings (a discovery's vocabulary, the
  flag options, the SIFT options, the drop mode). For a normalised batch ``x: (B, 3, H, W)`` it recovers the
  pixels the model sees (``Backend.normalize`` inverted, rounded to uint8), detects SIFT keypoints on them with
  the stored options, and flags patches with :func:`~siftlens.shortcuts.flags.flag_patches`, the global word set
  of :func:`~siftlens.shortcuts.flags.word_sets`: the patches ``prompt --policy drop`` flags with the same options.
- :class:`DroppedModel`: an ``nn.Module`` around the network. Calling it runs ``x -> logits (B, C)`` with the
  flagged tokens removed (:func:`~siftlens.shortcuts.interventions.forward_drop`); every other attribute (``cfg``,
  ``blocks``, ``head``, ``forward_features``, ...) is the network's own, and its parameters are the network's.
- :class:`DroppedBackend`: the Backend of that model. ``forward`` and ``model(x)`` give the same logits;
  ``forward_intervened`` removes a patch when the request or the rule removes it (removing a patch twice removes it
  once, so ``prompt --policy drop`` with the folder's own flags changes nothing); geometry, preprocessing and
  attention probes are the network's. While attention is observed (inside :meth:`DroppedBackend.eager`, as
  ``analyze`` and ``discover`` capture it) the drop runs in ``mask`` mode, every flagged key at ``-inf`` in every
  layer: the attention maps keep the full grid (a dropped patch gets exactly zero attention) and the logits are
  those of the model as used.

Exactness: the pixels are recovered exactly from float32 or float16 inputs (an error under 0.5 grey level before
rounding); a bfloat16 input can be one level off, and SIFT may then differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..keypoints import SiftOptions, descriptor_bytes, detect, sift_params
from ..models.backend import Backend, check_keep_idx
from .discovery.vocabulary import Vocabulary
from .flags import FlagOptions, flag_patches, word_sets
from .interventions import DROP_MODES, forward_drop

_COPIED = ("patch_size", "grid_size", "num_prefix_tokens", "num_layers", "num_heads", "input_size", "mean", "std",
            "class_names", "has_cls", "kind", "source")


@dataclass
class DropRule:
    """Which patches to drop and how: ``vocab`` (a discovery's), ``flags`` and ``sift`` (the options of ``prompt``),
    ``mode`` (``group``: exact removal; ``mask``: ``-inf`` keys). ``words``: the flagged word ids they give."""

    vocab: Vocabulary
    flags: FlagOptions
    sift: SiftOptions
    mode: str = "group"
    words: set[int] = field(init=False)

    def __post_init__(self):
        self.flags.validate()
        if self.mode not in DROP_MODES:
            raise ConfigError(f"drop mode must be one of {', '.join(DROP_MODES)}, not {self.mode!r}")
        f = self.flags
        self.words = word_sets(self.vocab, f.top_words, f.score_ratio, flagged_only=f.flagged_only)[0]

    def patches(self, backend: Backend, x: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: the patches of ``x (B, 3, H, W)`` (normalised by ``backend``) that the rule flags."""
        sift_words = any(w < len(self.vocab.centers) for w in self.words)
        if sift_words:
            items = keypoint_items(model_pixels(backend, x), backend.input_size, self.sift)
        else:  # no SIFT word to find: the keypoints do not matter
            items = [{"xy": np.zeros((0, 2), np.float32), "size": np.zeros(0, np.float32)}] * len(x)
        f = self.flags
        return flag_patches(backend, x, items, self.vocab, [self.words], f.extent, f.dilate).patches

    def describe(self) -> dict:
        """The rule for a manifest: flag and SIFT options, drop mode, flagged words."""
        return {"flags": asdict(self.flags), "sift": asdict(self.sift), "drop_mode": self.mode,
                "words": sorted(self.words)}


def model_pixels(backend: Backend, x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised -> (B, H, W, 3) uint8: the pixels :meth:`Backend.normalize` was given."""
    mean = torch.tensor(backend.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(backend.std, dtype=torch.float32).view(1, -1, 1, 1)
    p = (x.detach().float().cpu() * std + mean) * 255.0
    return p.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def keypoint_items(pixels: np.ndarray, input_size: tuple[int, int], sift: SiftOptions) -> list[dict]:
    """Per image of ``pixels (B, H, W, 3)``: SIFT ``xy``, ``size`` and ``desc`` as a
    :class:`~siftlens.loading.KeypointDataset` item holds them."""
    params = sift_params(input_size, sift)
    out = []
    for px in pixels:
        kp = detect(px, params, descriptors=True)
        out.append({"xy": kp.xy, "size": kp.size, "desc": descriptor_bytes(kp.desc)})
    return out


class DroppedModel(nn.Module):
    """The network of ``backend`` with ``rule``'s drop: ``model(x)`` -> logits (B, C) with the flagged tokens
    removed. Every attribute it does not define is the network's (``net``)."""

    def __init__(self, backend: Backend, rule: DropRule):
        super().__init__()
        self.net = backend.model
        self.network = backend  # the Backend of the network alone (not a module)
        self.rule = rule
        self.observing = False  # set by DroppedBackend.eager: drop in mask mode, so attention keeps the grid

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: the patches of ``x`` the rule drops."""
        return self.rule.patches(self.network, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised -> logits (B, C), the flagged tokens removed."""
        return forward_drop(self.network, x, self.flags(x), "mask" if self.observing else self.rule.mode)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("net", "_modules"):
                raise
            return getattr(self.net, name)


class DroppedBackend(Backend):
    """A Backend whose model is ``network``'s with ``rule``'s drop (see the module's docstring); ``inner`` is the
    network's own Backend."""

    def __init__(self, network: Backend, rule: DropRule):
        super().__init__(DroppedModel(network, rule), network.device)
        self.inner = network
        self.rule = rule
        for name in _COPIED:
            setattr(self, name, getattr(network, name))

    def preprocess(self, img):
        return self.inner.preprocess(img)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner.normalize(pixels)

    def probes(self):
        return self.inner.probes()

    @contextlib.contextmanager
    def eager(self):
        """The network's eager attention, and the drop as ``-inf`` keys, so that attention covers every patch."""
        prev = self.model.observing
        self.model.observing = True
        try:
            with self.inner.eager():
                yield
        finally:
            self.model.observing = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_intervened(self, x, keep_idx=None, key_bias=None, layers=None):
        """:meth:`Backend.forward_intervened` on top of the drop: a patch is removed when ``keep_idx`` leaves it out
        or the rule flags it (where both together would remove every patch, only the request's are removed);
        ``key_bias`` still indexes the N patches. Tokens are removed exactly (``group``), also inside eager()."""
        if keep_idx is None and key_bias is None:
            return self.forward(x)
        asked = torch.zeros((x.shape[0], self.num_patches), dtype=torch.bool)
        if keep_idx is not None:
            check_keep_idx(keep_idx, x.shape[0], self.num_patches)
            asked = ~asked.scatter(1, keep_idx.cpu().long(), True)
        drop = asked | self.model.flags(x)
        drop = torch.where(drop.all(1, keepdim=True), asked, drop)
        return forward_drop(self.inner, x, drop, "group", key_bias=key_bias, layers=layers)

    def describe(self) -> dict:
        return {**self.inner.describe(), "shortcut_drop": self.rule.describe()}


def network_backend(backend: Backend) -> Backend:
    """The Backend of the network alone: ``backend.inner`` for a :class:`DroppedBackend`, else ``backend``."""
    return backend.inner if isinstance(backend, DroppedBackend) else backend
