"""The metrics of docs/method.md ("Metrics") as batched torch functions (null models: :mod:`siftlens.core.nullmodel`).

Notation (shapes): ``B`` images, ``h`` heads, ``T`` prefix tokens (CLS, distillation, registers) that come
first, ``N`` patch tokens, ``S = T + N``, ``K`` weight maps per image (index 0 = the observed map, 1..K-1 =
null-model resamplings of it), ``L`` semantic levels, ``M`` null samples.

Per image, head and weight map (:func:`image_metrics`), with ``Bt`` the row-renormalised patch block of the
attention and ``a`` the renormalised CLS row:

- ``sal``: semantic attention lift ``mean_i sum_j Bt_ij w_j / mean_j w_j``;
- ``wi``: weighted interrelation ``sum_ij w_i w_j Bt_ij / (sum_i w_i * sum_j w_j / N)``;
- ``cls_lift``: ``sum_j a_j w_j / mean_j w_j``; ``cls_rho``: Spearman rank correlation of ``a`` and ``w``;
- ``R``: level interrelation matrix; ``dist``: mean attention distance per query level (pixels);
  ``dist_rel``: ``dist`` divided by the mean distance uniform attention would give the same queries
  (1.0 = as far as uniform attention, below 1 = more local); ``entropy``: mean attention entropy per
  query level (nats).

The query-weighted lift ``sum_i c_i sum_j Bt_ij w_j / mean_j w_j`` (``c = w / sum w``) is algebraically
``wi``, so it is reported once, as ``wi``. All ratio metrics (``dist_rel`` included) are 1.0 (``cls_rho``:
0.0) under uniform attention. An image whose weights are all zero gets the neutral 1.0 for the weighted
metrics and 0.0 for ``cls_rho``; the caller flags and excludes it.

Precision: every O(h N^2) reduction over the attention (the contraction ``Bt @ [w, one-hot(levels)]``,
row and column sums, distances, entropies, and the sums of squares the exact null needs) runs in float32,
in the fused CPU kernel of :mod:`siftlens.core.fused` or on BLAS (on CUDA the matmul follows the global TF32 setting
of ``torch.backends.cuda.matmul``); the
cheap O(B h N) and O(B K N) steps (column means, CLS terms, ranks, level means, weight sums, null moments)
run in float64. Uniform attention therefore gives the neutral values to float32 rounding (about 1e-7).
Outputs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..errors import ConfigError, GeometryError
from . import compiled
from .reductions import LayerSums, layer_sums, renormalise
from .stats import sums_from_features

METRICS = ("sal", "wi", "cls_lift", "cls_rho", "R", "dist", "dist_rel", "entropy")


# ----------------------------------------------------------------------------------------------------
# per-image metrics


def average_ranks(x: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
    """1-based ranks along the last axis of ``x`` (..., N), ties sharing their average rank; float64.

    ``rank = (#{x_j < x_i} + #{x_j <= x_i} + 1) / 2``: from one sort, the first and last sorted position of
    each run of equal values (``less`` and ``leq - 1``), scattered back to the original order.

    ``tol`` (>= 0): neighbours in sorted order with ``x_(k+1) - x_(k) <= tol * max(|x_(k)|, |x_(k+1)|)``
    are one run of ties, so values that differ only by float noise (a few ulps of their own size) share
    their rank while values that differ by more stay apart, however small they are. Runs are chains:
    ``a ~ b`` and ``b ~ c`` put ``a, b, c`` in one run even where ``c - a`` is above the threshold.
    ``tol = 0`` is exact equality. With ``tol > 0``, NaNs sort last and form one run among themselves.
    """
    if tol < 0:
        raise ConfigError(f"tie tolerance must be >= 0, got {tol}")
    x = x.contiguous()
    if x.device.type != "cpu":
        return _device_ranks(x, tol)
    if tol == 0 and x.is_floating_point() and bool(x.isnan().any()):  # NaN breaks runs: count directly
        srt = x.sort(-1).values
        less = torch.searchsorted(srt, x, side="left")
        leq = torch.searchsorted(srt, x, side="right")
        return (less + leq + 1).double() / 2.0
    srt, order = _sort(x)
    starts = _run_starts(srt, tol)
    # without ties (the rule for continuous values) the rank is the sorted position; rows with ties are redone
    ranks = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device).expand(srt.shape).contiguous()
    tied = ~starts.all(-1)  # (...,) rows with at least one run of ties
    if bool(tied.any()):
        ranks[tied] = _tied_ranks(starts[tied])
    return torch.empty(ranks.shape, dtype=torch.float64, device=x.device).scatter_(-1, order, ranks)


def _device_ranks(x: torch.Tensor, tol: float) -> torch.Tensor:
    """:func:`average_ranks` on an accelerator, with the same values and no host sync (no branch on a tensor's
    value): with ``tol = 0`` by counting (``less + leq + 1) / 2`` for every row, the CPU path's value whether or not
    a row has ties or NaNs; with ``tol > 0`` every row through :func:`_tied_ranks` (a row without ties gets its
    sorted position, as on the CPU path)."""
    srt, order = x.sort(-1)
    if tol == 0:
        less = torch.searchsorted(srt, x, side="left")
        leq = torch.searchsorted(srt, x, side="right")
        return (less + leq + 1).double() / 2.0
    ranks = _tied_ranks(_run_starts(srt, tol, sync=False))
    return torch.empty(ranks.shape, dtype=torch.float64, device=x.device).scatter_(-1, order, ranks)


def _tied_ranks(starts: torch.Tensor) -> torch.Tensor:
    """(m, N) float64 average ranks in sorted order, from where each run of ties starts (m, N) bool."""
    n = starts.shape[-1]
    idx = torch.arange(n, device=starts.device).expand(starts.shape)
    ends = torch.ones_like(starts)  # a run ends here
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, idx, 0).cummax(-1).values  # = #{x_j < x_i}
    last = torch.where(ends, idx, n - 1).flip(-1).cummin(-1).values.flip(-1)  # = #{x_j <= x_i} - 1
    return (first + last + 2).double() / 2.0


def _run_starts(srt: torch.Tensor, tol: float, sync: bool = True) -> torch.Tensor:
    """(..., N) bool: where a run of tied values starts in ``srt`` (sorted along the last axis), for
    :func:`average_ranks`; ``sync=False``: no branch on whether there are NaNs (same result)."""
    a, b = srt[..., :-1], srt[..., 1:]  # neighbours in sorted order: a <= b, NaNs last
    if tol == 0:
        tied = b == a
    else:  # max(|a|, |b|) = max(b, -a) for a <= b; False where either side is NaN
        tied = (b - a) <= tol * torch.maximum(b, -a)
        nan = b.isnan()
        if not sync or bool(nan.any()):
            tied |= nan & a.isnan()
    starts = torch.ones(srt.shape, dtype=torch.bool, device=srt.device)
    starts[..., 1:] = ~tied
    return starts


def _sort(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.sort(-1)`` (values, indices) for a contiguous ``x``; on the CPU by numpy's vectorised argsort, 5 to 6
    times faster than torch's for many short rows (the order within a run of ties may differ, which the
    average ranks do not see)."""
    if x.device.type != "cpu":
        return x.sort(-1)
    order = torch.from_numpy(np.argsort(x.numpy(), axis=-1))
    return torch.take_along_dim(x, order, -1), order


def _check_maps(weights, levels, n_levels, pos):
    """The checks of the inputs that do not involve attention."""
    if weights.ndim != 3 or levels.shape != weights.shape:
        raise GeometryError(
            f"weights and levels must both have shape (B, K, N); got {tuple(weights.shape)} and "
            f"{tuple(levels.shape)}"
        )
    n = weights.shape[-1]
    if n < 1:
        raise GeometryError("need at least one patch token")
    if tuple(pos.shape) != (n, 2):
        raise GeometryError(f"patch positions must have shape ({n}, 2), got {tuple(pos.shape)}")
    if n_levels < 1:
        raise ConfigError(f"n_levels must be >= 1, got {n_levels}")
    if levels.dtype.is_floating_point or levels.dtype == torch.bool:
        raise ConfigError(f"levels must be an integer tensor, got {levels.dtype}")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= n_levels):
        raise ConfigError(f"levels must lie in [0, {n_levels}); got values in "
                          f"[{int(levels.min())}, {int(levels.max())}]")


def _check_attention(attn, num_prefix, maps, n_levels, has_cls):
    """The checks that involve attention, against prepared maps."""
    if n_levels != maps.n_levels:
        raise ConfigError(f"the maps were prepared for {maps.n_levels} levels, not {n_levels}")
    _check_attention_geometry(attn, num_prefix, maps.shape[0], maps.shape[2], has_cls)


def _check_attention_geometry(attn, num_prefix, b, n, has_cls):
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise GeometryError(f"attention must have shape (B, h, S, S), got {tuple(attn.shape)}")
    if attn.shape[0] != b:
        raise GeometryError(f"attention holds {attn.shape[0]} images but the weight maps hold {b}")
    if num_prefix < 0 or attn.shape[-1] != num_prefix + n:
        raise GeometryError(
            f"attention has {attn.shape[-1]} tokens but {num_prefix} prefix tokens + {n} patches were given; "
            "check the model's grid and prefix-token count"
        )
    if has_cls and num_prefix < 1:
        raise ConfigError("has_cls=True needs at least one prefix token; pass has_cls=False for models "
                          "without a CLS token")


def _check_inputs(attn, num_prefix, weights, levels, n_levels, pos, has_cls):
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise GeometryError(f"attention must have shape (B, h, S, S), got {tuple(attn.shape)}")
    _check_maps(weights, levels, n_levels, pos)
    _check_attention_geometry(attn, num_prefix, weights.shape[0], weights.shape[-1], has_cls)


@dataclass
class WeightMaps:
    """Everything :func:`image_metrics` needs that depends on the weight maps, levels and patch positions but
    not on attention: computed once per batch by :func:`prepare_maps` and shared by every layer.

    Shapes: ``B`` images, ``K`` maps, ``N`` patches, ``L`` levels; float64 unless noted.
    """

    n_levels: int
    w64: torch.Tensor  # (B, K, N)
    has_w: torch.Tensor  # (B, K) bool: the map has a non-zero weight
    wmean: torch.Tensor  # (B, K) mean weight, 1 where has_w is False
    wsq: torch.Tensor  # (B, K) (sum w)^2 / N, 1 where has_w is False
    rw: torch.Tensor  # (B, K, N) centred average ranks of w
    rw_norm: torch.Tensor  # (B, K) their Euclidean norm
    lhs: torch.Tensor  # (B, K * (L + 1), N) float32: per map, the rows w and one-hot(level 0 .. L-1)
    ohT: torch.Tensor  # (B, K * L, N) one-hot levels, for level means
    cnt_safe: torch.Tensor  # (B, K, L) patches per level, 1 where the level is empty
    present: torch.Tensor  # (B, K, L) bool: the level is not empty
    both: torch.Tensor  # (B, 1, K, L, L) bool: both levels of a pair are present
    dmat: torch.Tensor  # (N, N) patch-centre distances in pixels (float32 values, float64 tensor)
    dmat32: torch.Tensor  # (N, N) the same, float32
    u_lvl: torch.Tensor  # (B, K, L) level means of u_i = mean_j dmat_ij, the distance of uniform attention
    has_u: torch.Tensor  # (B, K, L) bool: u is positive there

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.w64.shape)


def prepare_maps(
    weights: torch.Tensor, levels: torch.Tensor, n_levels: int, pos: torch.Tensor, device=None,
    null_index: torch.Tensor | None = None,
) -> WeightMaps:
    """The attention-independent part of :func:`image_metrics` for weights, levels: (B, K, N), pos: (N, 2);
    on ``device`` (default: that of ``weights``).

    ``null_index``: the (B, K - 1, N) indices that made ``weights``, ``levels`` with :func:`with_null`, if
    so: every null map is then a permutation of the observed one, and its ranks are gathered instead of
    sorted again (checked; without it, or if the maps are not those permutations, all are ranked).
    """
    _check_maps(weights, levels, n_levels, pos)
    return _prepare_maps(weights, levels, n_levels, pos, device, null_index)


def _map_ranks(w64: torch.Tensor, null_index: torch.Tensor | None) -> torch.Tensor:
    """average_ranks of every map (B, K, N); gathered from map 0 when the others are its permutations."""
    b, k, n = w64.shape
    if null_index is not None and k > 1 and tuple(null_index.shape) == (b, k - 1, n):
        idx = null_index.to(w64.device)
        if torch.equal(torch.gather(w64[:, :1].expand(b, k - 1, n), 2, idx), w64[:, 1:]):
            r0 = average_ranks(w64[:, :1])  # (B, 1, N)
            return torch.cat([r0, torch.gather(r0.expand(b, k - 1, n), 2, idx)], 1)
    return average_ranks(w64)


def _prepare_maps(weights, levels, n_levels, pos, device=None, null_index=None) -> WeightMaps:
    dev = weights.device if device is None else torch.device(device)
    b, k, n = weights.shape
    L = n_levels
    w32 = weights.to(dev, torch.float32)  # (B, K, N)
    w64 = weights.to(dev, torch.float64)
    onehot = levels.to(dev)[..., None] == torch.arange(L, device=dev)  # (B, K, N, L) bool

    # weight sums; an all-zero map gets neutral 1.0 through a unit denominator and a where() below
    wsum = w64.sum(-1)  # (B, K)
    has_w = wsum > 0
    wmean = torch.where(has_w, wsum / n, torch.ones_like(wsum))  # (B, K)
    wsq = torch.where(has_w, wsum * wsum / n, torch.ones_like(wsum))  # (B, K)
    rw = _map_ranks(w64, null_index) - (n + 1) / 2.0  # (B, K, N), centred
    rw_norm = rw.square().sum(-1).sqrt()

    # per map, the rows [w, one-hot(levels)] that the attention is contracted with on both sides
    lhs = torch.cat([w32[:, :, None, :], onehot.transpose(2, 3).float()], 2).reshape(b, k * (L + 1), n)

    # level counts; n_a = 0 marks a missing level
    cnt = onehot.sum(-2).double()  # (B, K, L)
    present = cnt > 0
    cnt_safe = torch.where(present, cnt, torch.ones_like(cnt))
    both = present[:, None, :, :, None] & present[:, None, :, None, :]
    ohT = onehot.transpose(2, 3).double().reshape(b, k * L, n)

    # relative distance denominator: level means of u_i = mean_j ||pos_i - pos_j||, the distance uniform
    # attention gives the same queries (same float32 distances as the attention distances, summed in float64)
    pos64 = pos.to(dev, torch.float64)
    dmat = torch.cdist(pos64, pos64).float().double()  # (N, N) pixels
    u_lvl = (ohT @ dmat.mean(-1)).view(b, k, L) / cnt_safe  # (B, K, L)
    return WeightMaps(L, w64, has_w, wmean, wsq, rw, rw_norm, lhs, ohT, cnt_safe, present, both, dmat,
                      dmat.float(), u_lvl, u_lvl > 0)


def repeat_rows(x: torch.Tensor | None, r: int) -> torch.Tensor | None:
    """``r`` copies of ``x`` stacked along its first axis (copy k's row b at k * len(x) + b)."""
    return None if x is None else x.repeat(r, *([1] * (x.ndim - 1)))


def tile_maps(m: WeightMaps, r: int) -> WeightMaps:
    """The maps of ``r`` stacked copies of the batch: image b of copy k at row ``k * B + b``. With
    :func:`stack_terms`, r layers are turned into metrics and null moments in one call."""
    shared = ("n_levels", "dmat", "dmat32")
    return WeightMaps(**{f.name: getattr(m, f.name) if f.name in shared else repeat_rows(getattr(m, f.name), r)
                         for f in fields(m)})


def image_metrics(
    attn: torch.Tensor,
    num_prefix: int,
    weights: torch.Tensor,
    levels: torch.Tensor,
    n_levels: int,
    pos: torch.Tensor,
    has_cls: bool = True,
    maps: WeightMaps | None = None,
) -> dict[str, torch.Tensor]:
    """All per-image metrics of docs/method.md ("Metrics") for one layer, batched over images, heads and maps.

    Args:
        attn: (B, h, S, S) post-softmax attention, ``S = num_prefix + N``, prefix tokens first.
        num_prefix: T, the number of prefix tokens (CLS, distillation, registers).
        weights: (B, K, N) semantic weights; ``[:, 0]`` observed, ``[:, 1:]`` null resamplings.
        levels: (B, K, N) integer semantic levels in ``[0, n_levels)``, resampled like ``weights``.
        n_levels: L.
        pos: (N, 2) patch centres in model-input pixels (for distances).
        has_cls: token 0 is a CLS token; otherwise the "CLS row" is the mean over query rows of ``Bt``.
        maps: ``prepare_maps(weights, levels, n_levels, pos)``, to compute the parts that do not depend on
            attention once per batch instead of once per layer; ``weights``, ``levels`` and ``pos`` are
            then not read again.

    Returns float32 tensors on ``attn``'s device:
        ``sal``, ``wi``, ``cls_lift``, ``cls_rho``: (B, h, K);
        ``R``: (B, h, K, L, L), NaN where level a (queries) or level b (keys) is empty;
        ``dist`` (pixels), ``dist_rel`` (ratio) and ``entropy`` (nats): (B, h, K, L), NaN where level a
        is empty.

    ``dist_rel`` removes the geometry from ``dist`` (a central query is near every patch even under uniform
    attention): ``dist_rel_a = dist_a / mean_{i in a} u_i`` with ``u_i = mean_j ||pos_i - pos_j||``. It is 1.0
    under uniform attention, 0.0 when every query attends only to itself, and the neutral 1.0 where ``u`` is 0.
    """
    if maps is None:
        _check_inputs(attn, num_prefix, weights, levels, n_levels, pos, has_cls)
        maps = _prepare_maps(weights, levels, n_levels, pos, device=attn.device)
    return metrics_from_terms(attention_terms(attn, num_prefix, maps, has_cls), maps)


@dataclass
class AttentionTerms:
    """The attention-side reductions of one layer, from which every metric and its exact null follow.

    Shapes: ``B`` images, ``h`` heads, ``N`` patches, ``K`` maps, ``L`` levels; float64 unless noted.
    """

    colmean: torch.Tensor  # (B, h, N) column means of Bt
    dist_q: torch.Tensor  # (B, h, N) per-query attention distance (pixels)
    ent_q: torch.Tensor  # (B, h, N) per-query attention entropy (nats)
    pairs: torch.Tensor  # (B, K, L + 1, h, L + 1) float32: [w | one-hot] Bt [w | one-hot]^T per map and head
    cls: torch.Tensor  # (B, h, N) the renormalised CLS row (or colmean without CLS)
    ranks_a: torch.Tensor  # (B, h, N) centred average ranks of cls
    psums: torch.Tensor | None = None  # (B, h + 1, 15) pattern sums of Bt per head and of the head mean
    psum2: torch.Tensor | None = None  # (B, h + 1, 2) [trace, off-diagonal sum] of the same


@dataclass
class LayerRaw:
    """What one layer's attention leaves behind once it is gone: its O(h N^2) reductions and its CLS row
    ((B, h, N) float32, None without CLS). :func:`finish_terms` turns one or several of them into terms."""

    sums: LayerSums
    cls_row: torch.Tensor | None


def layer_raw(attn: torch.Tensor, num_prefix: int, maps: WeightMaps, has_cls: bool = True,
              pattern: bool = False) -> LayerRaw:
    """The O(h N^2) work of one layer (:func:`siftlens.core.reductions.layer_sums`, in chunks of images so that
    Bt is never kept whole). attn: (B, h, S, S); maps: :func:`prepare_maps` of the same images. ``pattern``:
    also the sums the exact quadratic-assignment null moments need."""
    _check_attention(attn, num_prefix, maps, maps.n_levels, has_cls)
    t = num_prefix
    block = attn[:, :, t:, t:]
    # the compiled path (accelerators) reads bf16 / fp16 attention as it is and reduces it in float32
    sums = layer_sums(block if compiled.wanted(block.device) else block.float(), maps.lhs, maps.dmat32,
                      maps.n_levels, pattern)
    # a copy: a view would keep the layer's whole attention alive until the batch ends
    return LayerRaw(sums, attn[:, :, 0, t:].to(torch.float32, copy=True) if has_cls else None)


def attention_terms(
    attn: torch.Tensor, num_prefix: int, maps: WeightMaps, has_cls: bool = True, pattern: bool = False,
) -> AttentionTerms:
    """The terms of one layer: :func:`finish_terms` of :func:`layer_raw`."""
    return finish_terms([layer_raw(attn, num_prefix, maps, has_cls, pattern)], maps.n_levels)


def finish_terms(raws: list[LayerRaw], n_levels: int) -> AttentionTerms:
    """The O(h N) terms of r layers measured against the same maps, as one batch, layer after layer (row
    ``k * B + b`` is image b of layer k; pair it with :func:`tile_maps`). Doing this once for all layers of
    a batch instead of once per layer removes most of its fixed cost per operation."""
    r = raws[0].sums if len(raws) == 1 else LayerSums(**{
        f.name: None if getattr(raws[0].sums, f.name) is None else torch.cat([getattr(x.sums, f.name) for x in raws])
        for f in fields(LayerSums)})
    bsz, nh, n = r.colsum.shape
    rowsum, colsum = r.rowsum.double(), r.colsum.double()
    colmean = colsum / n
    # sum_j Bt_ij D_ij / sum_j Bt_ij: dividing by the row sum (1 up to float32 rounding) makes uniform
    # attention give u_i, so dist_rel is 1.0 there to float32 rounding
    d_q = r.dist.double() / rowsum
    has_cls = raws[0].cls_row is not None
    a = renormalise(torch.cat([x.cls_row for x in raws]).double()) if has_cls else colmean  # (B, h, N)
    # attention values within 4 float32 epsilons of each other (relative to their size) are float noise: ties
    ra = average_ranks(a, tol=4 * torch.finfo(torch.float32).eps) - (n + 1) / 2.0  # (B, h, N), centred
    pairs = r.pairs.view(bsz, -1, n_levels + 1, nh, n_levels + 1)
    terms = AttentionTerms(colmean, d_q, r.ent.double(), pairs, a, ra)
    if r.xx is not None:
        terms.psums, terms.psum2 = _pattern_terms(r, rowsum, colsum)
    return terms


def _pattern_terms(r: LayerSums, rowsum: torch.Tensor, colsum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pattern and pair sums of ``Bt`` per head and of its head mean (slot h), (B, h + 1, 15) and (B, h + 1, 2),
    from the row and column sums, the diagonal and the sums of squares of :class:`LayerSums` (rowsum, colsum:
    (B, h, N) float64). The head mean's row, column and diagonal sums are the means of the heads'."""
    nh = rowsum.shape[1]
    diag = r.diag.double()
    feats = []
    for rs, cs, d, xx, xxt in (
        (rowsum, colsum, diag, r.xx[:, :nh], r.xxt[:, :nh]),
        (rowsum.mean(1, keepdim=True), colsum.mean(1, keepdim=True), diag.mean(1, keepdim=True),
         r.xx[:, nh:], r.xxt[:, nh:]),
    ):
        feats.append({"S": rs.sum(-1), "t": d.sum(-1), "rr": rs.square().sum(-1), "cc": cs.square().sum(-1),
                      "rc": (rs * cs).sum(-1), "XX": xx.double(), "XXt": xxt.double(), "dr": (d * rs).sum(-1),
                      "dc": (d * cs).sum(-1), "dd": d.square().sum(-1)})
    both = {k: torch.cat([feats[0][k], feats[1][k]], 1) for k in feats[0]}
    return sums_from_features(both), torch.stack([both["t"], both["S"] - both["t"]], -1)


def metrics_from_terms(t: AttentionTerms, m: WeightMaps) -> dict[str, torch.Tensor]:
    """Every metric of :func:`image_metrics` from the terms of one layer and the maps they were made with."""
    colmean, pairs, a, ra = t.colmean, t.pairs, t.cls, t.ranks_a
    dev = colmean.device
    bsz, nh, n = colmean.shape
    L = m.n_levels

    def neutral(x: torch.Tensor) -> torch.Tensor:  # x: (B, h, K)
        return torch.where(m.has_w[:, None, :], x, torch.ones_like(x)).float()

    # SAL: (column means of Bt) . w
    sal = torch.einsum("bhj,bkj->bhk", colmean, m.w64) / m.wmean[:, None]

    # WI = sum_i w_i (Bt w)_i / (sum w)^2 * N
    wi = pairs[:, :, 0, :, 0].transpose(1, 2).double() / m.wsq[:, None]

    cls_lift = torch.einsum("bhj,bkj->bhk", a, m.w64) / m.wmean[:, None]

    # Spearman rho from average ranks (constant a or w -> 0)
    num = torch.einsum("bhn,bkn->bhk", ra, m.rw)
    den = ra.square().sum(-1).sqrt()[..., None] * m.rw_norm[:, None, :]
    rho = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))
    rho = rho.clamp(-1.0, 1.0)
    nan = torch.tensor(float("nan"), device=dev, dtype=torch.float64)

    # R_ab = mean_{i in a} sum_{j in b} Bt_ij / (n_b / N)
    r_sum = pairs[:, :, 1:, :, 1:].permute(0, 3, 1, 2, 4).double()  # (B, h, K, L, L)
    r = r_sum / m.cnt_safe[:, None, :, :, None] / (m.cnt_safe[:, None, :, None, :] / n)
    r = torch.where(m.both, r, nan)

    # level means of the per-query distance and entropy (computed once for all K maps)
    k_maps = m.shape[1]
    per_q = torch.stack([t.dist_q, t.ent_q], -1).permute(0, 2, 1, 3).reshape(bsz, n, nh * 2)  # (B, N, h * 2)
    lvl = torch.bmm(m.ohT, per_q).view(bsz, k_maps, L, nh, 2).permute(0, 3, 1, 2, 4)
    lvl = lvl / m.cnt_safe[:, None, :, :, None]
    lvl = torch.where(m.present[:, None, :, :, None], lvl, nan)  # (B, h, K, L, 2)

    # relative distance: level mean of d_q over the level mean of u_i (see prepare_maps)
    dist_rel = lvl[..., 0] / torch.where(m.has_u, m.u_lvl, torch.ones_like(m.u_lvl))[:, None]
    dist_rel = torch.where(m.has_u[:, None], dist_rel, torch.ones_like(dist_rel))  # coincident positions
    dist_rel = torch.where(m.present[:, None], dist_rel, nan)  # (B, h, K, L)

    return {
        "sal": neutral(sal),
        "wi": neutral(wi),
        "cls_lift": neutral(cls_lift),
        "cls_rho": torch.where(m.has_w[:, None, :], rho, torch.zeros_like(rho)).float(),
        "R": r.float(),
        "dist": lvl[..., 0].float(),
        "dist_rel": dist_rel.float(),
        "entropy": lvl[..., 1].float(),
    }
