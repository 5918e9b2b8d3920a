"""One batch of images: keypoint maps + one forward with attention captured -> per-image values.

For every analysed layer (and rollout), every head and the head mean, and every metric cell, each image
gets its observed value and the mean and variance of that value under the null model. Nothing here is
kept across batches: the caller writes each batch to disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..attention import Rollout, capture, patch_rows, resolve_layers
from ..core import compiled
from ..core.metrics import (
    LayerRaw,
    WeightMaps,
    attention_terms,
    finish_terms,
    layer_raw,
    metrics_from_terms,
    prepare_maps,
    tile_maps,
)
from ..core.nullmodel import (
    MapSums,
    all_shifts,
    exact_moments,
    image_key,
    keyed_null_indices,
    map_sums,
    tile_sums,
    with_null,
)
from ..devices import autocast
from ..models import Backend
from .config import LEVEL_METRICS, SCALAR_METRICS, AnalysisConfig, cells

# the cyclic-shift null enumerates its N shifts up to this many patches (a 16 x 16 grid), else samples
SHIFT_ENUMERATE_MAX = 256
SHIFT_SAMPLES = 256


@dataclass
class RunPlan:
    """What is fixed for a whole run: the model, the parameters, the layers and the metric cells."""

    backend: Backend
    cfg: AnalysisConfig
    layers: list[int]  # analysed layers, in model order
    cells: list[tuple[str, int, int]]
    pos: torch.Tensor  # (N, 2) patch centres in input pixels, on the model's device

    @classmethod
    def build(cls, backend: Backend, cfg: AnalysisConfig) -> RunPlan:
        return cls(backend, cfg, resolve_layers(cfg.layers, backend.num_layers), cells(cfg.n_levels),
                   backend.patch_centers().to(backend.device))

    @property
    def layer_ids(self) -> list[int]:
        """Row labels of the layer axis: the analysed layers, then ``num_layers`` for rollout."""
        return self.layers + ([self.backend.num_layers] if self.cfg.rollout else [])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, heads + 1, cells) of one image's values."""
        return len(self.layer_ids), self.backend.num_heads + 1, len(self.cells)


@dataclass
class BatchValues:
    """Per-image results of one batch. ``obs``, ``null_mean``, ``null_var``: (B, rows, h + 1, C) float64,
    NaN where a cell does not exist (empty level, image without keypoints, per-head slots of rollout) and
    for every cell of an image in ``errors`` (e.g. non-finite attention: skipped, not measured)."""

    index: list[int]
    valid: np.ndarray  # (B,) bool: the image has keypoints
    obs: np.ndarray
    null_mean: np.ndarray
    null_var: np.ndarray
    preds: list[int | None]
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # batch position -> (layers, h, 1 + N, N) float16
    kept_rollout: dict[int, np.ndarray] = field(default_factory=dict)  # batch position -> (1 + N, N) float16
    errors: dict[int, str] = field(default_factory=dict)  # batch position -> why the image was not measured


class NonFiniteLayers:
    """The first layer in which each image's attention holds a NaN or an infinity, tracked on the model's
    device as the layers go by (no host sync per layer; one when :meth:`errors` is read)."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, images: int, device):
        self.first = torch.full((images,), self.NONE, dtype=torch.int64, device=device)

    def check(self, layer: int, attn: torch.Tensor) -> None:
        """attn: (B, h, S, S) of ``layer``. A NaN or an infinity anywhere in an image's attention makes the sum
        of all of it non-finite (softmax rows sum to 1, so the sum itself stays small): one read of the
        attention, about 20x cheaper than an elementwise ``isfinite`` and its all-reduce (measured on the CPU)."""
        bad = ~torch.isfinite(torch.sum(attn.flatten(1), 1, dtype=torch.float32))
        self.first = torch.where(bad & (self.first == self.NONE), layer, self.first)

    def errors(self) -> dict[int, str]:
        """Batch position -> 'non-finite attention in layer L' for every image with such a layer."""
        first = self.first.cpu().tolist()
        return {j: f"non-finite attention in layer {x}" for j, x in enumerate(first) if x != self.NONE}


def flatten_cells(res: dict[str, torch.Tensor]) -> torch.Tensor:
    """Metric dict (scalars (B, h, K), R (B, h, K, L, L), levels (B, h, K, L)) -> (B, h, K, C), float64,
    in the order of :func:`~siftlens.analysis.config.cells`."""
    B, h, K = res["sal"].shape
    parts = [res[m].unsqueeze(-1) for m in SCALAR_METRICS]
    parts.append(res["R"].reshape(B, h, K, -1))
    parts += [res[m] for m in LEVEL_METRICS]
    return torch.cat([p.double() for p in parts], dim=-1)


def _with_head_mean(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, v.mean(1, keepdim=True)], 1)


def _sampled_moments(flat: torch.Tensor, ddof: int) -> tuple[torch.Tensor, ...]:
    """(B, h, 1 + M, C) values of the observed map and M null maps -> obs, mean, var (B, h + 1, C)."""
    v = _with_head_mean(flat)
    null = v[:, :, 1:]
    return v[:, :, 0], null.mean(2), null.var(2, correction=ddof)


def _raw(attn: torch.Tensor, plan: RunPlan, maps: WeightMaps) -> LayerRaw:
    b = plan.backend
    return layer_raw(attn, b.num_prefix_tokens, maps, has_cls=b.has_cls, pattern=True)


def _exact_values(raws: list[LayerRaw], maps: WeightMaps, ms: MapSums) -> tuple[torch.Tensor, ...]:
    """obs, null mean, null var, each (r, B, h + 1, C), of r layers measured against the same maps: the
    layers are stacked into one batch, so the O(h N) work runs once per batch, not once per layer."""
    r = len(raws)
    t = finish_terms(raws, maps.n_levels)
    m, s = (maps, ms) if r == 1 else (tile_maps(maps, r), tile_sums(ms, r))
    obs = _with_head_mean(flatten_cells(metrics_from_terms(t, m)))[:, :, 0]
    mom = exact_moments(t, m, s, sums_eps=_sums_eps(raws[0]))
    mean = flatten_cells({k: v[0].unsqueeze(2) for k, v in mom.items()})[:, :, 0]
    var = flatten_cells({k: v[1].unsqueeze(2) for k, v in mom.items()})[:, :, 0]
    return tuple(v.view(r, -1, *v.shape[1:]) for v in (obs, mean, var))


def _sums_eps(raw: LayerRaw) -> float:
    """The rounding unit of the sums behind the exact null variance (row and column sums, ``sum Bt^2`` and
    ``sum Bt * Bt^T``), relative to the deviations of ``Bt`` from 1/N: they are float32 sums of ``Bt - 1/N``
    added in float64, whatever their dtype (:attr:`~siftlens.core.reductions.LayerSums.EPS`). What
    :func:`exact_moments` can resolve, through :func:`~siftlens.core.stats.qap_rounding_bound`."""
    return raw.sums.EPS


def _null_maps(plan: RunPlan, w: torch.Tensor, lv: torch.Tensor, names: list[str]) -> tuple[WeightMaps, int | None]:
    """The weight maps every layer is measured against, and the ddof of their sampled moments (None:
    exact closed forms, K = 1)."""
    cfg, dev = plan.cfg, plan.backend.device
    B, N = w.shape
    grid = tuple(plan.backend.grid_size)
    if cfg.null_samples is None and cfg.null_kind == "permute":  # checked on the host, then moved: no sync
        return prepare_maps(w[:, None], lv[:, None], cfg.n_levels, plan.pos, device=dev), None
    w, lv = w.to(dev), lv.to(dev)
    if cfg.null_samples is None and N <= SHIFT_ENUMERATE_MAX:  # every cyclic shift: exact over the group
        idx, ddof = all_shifts(grid).expand(B, N, N), 0
    else:  # Monte Carlo, or shifts sampled where the group is too large to enumerate
        m = cfg.null_samples or SHIFT_SAMPLES
        idx, ddof = keyed_null_indices([image_key(n) for n in names], N, m, grid, cfg.null_kind, cfg.run.seed), 1
    idx = idx.to(dev)
    wk, lk = with_null(w, lv, idx)
    return prepare_maps(wk, lk, cfg.n_levels, plan.pos, null_index=idx), ddof


@torch.inference_mode()
def analyse_batch(plan: RunPlan, items: list[dict], names: list[str], keep: Sequence[int] = (),
                  pixels: torch.Tensor | None = None) -> BatchValues:
    """Values of the good ``items`` of one batch (see :class:`BatchValues`); ``names`` are theirs.

    ``keep``: batch positions whose attention rows (:func:`~siftlens.attention.patch_rows`, every analysed
    layer, and rollout when computed) are kept, as float16, for the report's viewer (``kept``).
    ``pixels``: the items' pixels (B, H, W, 3) already staged on the device (:mod:`.prefetch`), else stacked here.
    The forward runs under ``cfg.precision``; the attention is reduced in float32 (:mod:`siftlens.core.compiled`)."""
    backend, cfg = plan.backend, plan.cfg
    dev, H = backend.device, backend.num_heads
    if pixels is None:
        pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))
    w = torch.from_numpy(np.stack([it["weights"] for it in items]))  # (B, N), on the host until _null_maps
    lv = torch.from_numpy(np.stack([it["levels"] for it in items]))  # (B, N)
    B = w.shape[0]
    valid = (w.sum(1) > 0).numpy()
    maps, ddof = _null_maps(plan, w, lv, names)
    ms = map_sums(maps) if ddof is None else None
    rows, h1, C = plan.shape
    # results stay on the model's device until the batch ends: one transfer, no sync per layer
    out = torch.full((3, B, rows, h1, C), float("nan"), dtype=torch.float64, device=dev)
    slot = {layer: i for i, layer in enumerate(plan.layers)}
    rollout = Rollout() if cfg.rollout else None
    keep = list(keep)
    kept: list[torch.Tensor] = []

    exact: list[tuple[int, LayerRaw]] = []  # exact null: each layer's terms, measured after the forward

    finite = NonFiniteLayers(B, dev)

    keep_dtype = compiled.wanted(dev)  # the compiled reductions read bf16 / fp16 attention as it is
    def on_attention(layer: int, attn: torch.Tensor) -> None:
        if not keep_dtype:
            attn = attn.float()
        finite.check(layer, attn)
        if layer in slot:
            if ddof is None:
                exact.append((slot[layer], _raw(attn, plan, maps)))
            else:
                for k, v in enumerate(_sampled_moments(flatten_cells(_image_metrics(attn, backend, maps)), ddof)):
                    out[k, :, slot[layer]] = v
            if keep:
                kept.append(patch_rows(attn[keep], backend.num_prefix_tokens, backend.has_cls).half())
        if rollout is not None:
            rollout.update(attn)

    # rollout multiplies every layer, whatever subset is analysed
    captured = list(range(backend.num_layers)) if rollout is not None else plan.layers
    with capture(backend, on_attention, captured) as cap, autocast(dev, cfg.precision):
        logits = backend.forward(backend.normalize(pixels))
    cap.check()
    if exact:
        rows_of = [i for i, _ in exact]
        # the analysed layers fill rows 0..r-1 in order: a slice (an index list is one more copy to the device)
        at = slice(0, len(rows_of)) if rows_of == list(range(len(rows_of))) else rows_of
        for k, v in enumerate(_exact_values([t for _, t in exact], maps, ms)):
            out[k, :, at] = v.transpose(0, 1)
    if rollout is not None:  # head-averaged: only the head-mean slot is filled
        attn = rollout.result.unsqueeze(1)
        if ddof is None:
            values = [v[0] for v in _exact_values([_raw(attn, plan, maps)], maps, ms)]
        else:
            values = _sampled_moments(flatten_cells(_image_metrics(attn, backend, maps)), ddof)
        for k, v in enumerate(values):
            out[k, :, -1, H] = v[:, -1]
    out = out.cpu().numpy()
    errors = finite.errors()
    valid[list(errors)] = False
    out[:, ~valid] = np.nan
    preds = logits.argmax(-1).tolist() if logits is not None else [None] * B
    v = BatchValues([it["index"] for it in items], valid, out[0], out[1], out[2], preds, errors=errors)
    if keep:
        stacked = torch.stack(kept, 1).cpu().numpy()  # (k, layers, h, 1 + N, N)
        v.kept = {j: stacked[i] for i, j in enumerate(keep)}
        if rollout is not None:
            rows = patch_rows(rollout.result[keep], backend.num_prefix_tokens, backend.has_cls).half().cpu()
            v.kept_rollout = {j: rows[i].numpy() for i, j in enumerate(keep)}
    return v


def _image_metrics(attn: torch.Tensor, backend: Backend, maps: WeightMaps) -> dict[str, torch.Tensor]:
    t = attention_terms(attn, backend.num_prefix_tokens, maps, has_cls=backend.has_cls)
    return metrics_from_terms(t, maps)
