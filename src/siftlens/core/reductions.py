"""The O(h N^2) reductions of one layer's attention: the only work of the analysis whose cost grows like the
attention itself. Everything else (metrics, null moments) is computed from their O(h N) outputs.

Notation as in :mod:`siftlens.core.metrics`: ``c`` images of a chunk, ``h`` heads, ``N`` patches, ``K`` weight maps
per image, ``L`` levels, ``R = K (L + 1)`` contraction rows per image (per map the weight row and the L
one-hot level rows). ``Bt`` is the row-renormalised patch block of the attention.

With one map per image (the exact null, the default) on an x86-64 CPU, :mod:`siftlens.core.fused` computes all of
it in one pass over each query row (a small C kernel, compiled on first use). Elsewhere (many maps, an
accelerator, no C compiler), per chunk of images, each pass over ``Bt`` is one large vectorised or BLAS call:

1. ``Bt = P / rowsum(P)``, written once into a contiguous buffer, and the centred ``Y = Bt - c`` (``c`` = 1/N
   as a float32, :func:`siftlens.core.fused.centre`) into another.
2. the contraction with the maps' rows ``[w | one-hot]`` by one BLAS matmul, and one more small matmul for
   every ``[w | one-hot] Bt [w | one-hot]^T``. One map (the exact null): the keys side ``Bt [w | one-hot]^T``
   first; many maps (Monte Carlo): the query side first (in a layout that splits into maps without a copy).
3. row and column sums of ``Y``, the distance row sums ``sum_j Bt_ij D_ij`` and the entropy
   ``-sum_j Bt_ij log Bt_ij``
   (``log 0 = -inf`` makes ``0 log 0`` NaN, and ``nansum`` skips it: 0, with no clamping pass). The diagonal
   and the small contractions are taken once per layer, not per chunk.
   A query row of the patch block that sums to 0 (all its attention on prefix tokens) makes the whole layer
   run again on :func:`renormalise`'d attention, where such a row is uniform.
4. only for the exact null (``pattern=True``): each head's ``sum Y^2`` and ``sum Y * Y^T`` (two elementwise
   products, one of them with the transpose), and the same two sums of the head-mean matrix, from the sum of
   ``Y`` over the heads (a pass that writes only N^2); their row sums are float32, added across rows in
   float64, as in the kernel.

Why ``Y``: the null variance of the quadratic statistics takes differences of nearly equal numbers near uniform
attention, where every entry of ``Bt`` is close to 1/N (a randomly initialised model). Sums of ``Y`` are sums
of the small deviations, so their float32 rounding is relative to the deviations, not to 1/N; ``Y = Bt - c``
is itself exact where ``Bt`` is within a factor 2 of ``c``. The row sums, column sums, ``sum Bt^2`` and
``sum Bt * Bt^T`` are then ``Y``'s plus their constant parts, added in float64 (:func:`_uncentre`), from one
total ``sum Y`` (the row sums'), so that every sum describes the same matrix to that rounding.

Chunks are a few images, one image, or for a large image a group of its heads (about :data:`_CHUNK_ELEMS`
attention elements on a CPU), so that a chunk's buffers stay in the CPU's cache between passes; on an
accelerator they are 64 times larger, as there every operation is a kernel launch. The buffers are allocated
once per layer and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import compiled, fused

# images per chunk: about this many elements of (h, N, N) at a time (1 MB of float32), so that the
# chunk's Bt, its log and its transpose stay in a core's L2 cache between passes
_CHUNK_ELEMS = 1 << 18
# on an accelerator there is no such cache to stay in, and every operation is a kernel launch: large chunks
_CHUNK_ELEMS_ACCELERATOR = 1 << 24


@dataclass
class LayerSums:
    """The outputs of :func:`layer_sums` for ``B`` images: ``rowsum``, ``colsum``, ``xx`` and ``xxt`` float64
    (from float32 sums of the centred ``Bt - 1/N``, see the module docstring; :data:`EPS` is their rounding
    unit), the others float32.

    ``rowsum``, ``colsum``, ``diag``, ``dist``, ``ent``: (B, h, N) per-query row sums of ``Bt`` (1 to
    float32 rounding), column sums, diagonal, ``sum_j Bt_ij D_ij`` and ``-sum_j Bt_ij log Bt_ij``;
    ``pairs``: (B * K, L + 1, h, L + 1), ``[w | one-hot] Bt [w | one-hot]^T`` per map and head;
    ``xx``, ``xxt``: (B, h + 1) ``sum Bt^2`` and ``sum Bt * Bt^T`` per head and, in slot h, of the head-mean
    matrix (only with ``pattern``).
    """

    #: the unit roundoff the sums behind the null variance carry, relative to the deviations of ``Bt`` from
    #: 1/N (float32 sums of ``Bt - 1/N``, added in float64): what :func:`siftlens.core.stats.qap_rounding_bound`
    #: takes as ``eps``
    EPS: ClassVar[float] = float(torch.finfo(torch.float32).eps)

    rowsum: torch.Tensor
    colsum: torch.Tensor
    diag: torch.Tensor
    dist: torch.Tensor
    ent: torch.Tensor
    pairs: torch.Tensor
    xx: torch.Tensor | None = None
    xxt: torch.Tensor | None = None


def chunk_elements(device: torch.device) -> int:
    """About how many attention elements one chunk holds on ``device``."""
    return _CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_ACCELERATOR


def chunk_images(h: int, n: int, limit: int) -> int:
    """Images per chunk for ``h`` heads of ``n`` patches, about ``limit`` elements."""
    return max(1, limit // max(1, h * n * n))


def chunk_heads(h: int, n: int, limit: int) -> int:
    """Heads per chunk: all of them, or for a large image (ViT-B at 224 on a CPU: 12 heads of 196 x 196) as many
    as fit in ``limit`` elements, so that the chunk still stays in cache; that chunk holds one image."""
    return h if h * n * n <= limit else max(1, limit // (n * n))


def layer_sums(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor, n_levels: int,
               pattern: bool = False) -> LayerSums:
    """Every O(h N^2) reduction of one layer (see the module docstring).

    patch_attn: (B, h, N, N) patch block of the post-softmax attention, any strides; lhs: (B, R, N) float32
    contraction rows per image, ``R = K (L + 1)``, map by map (``[w, one-hot(level 0 .. L-1)]``); dmat:
    (N, N) float32 patch-centre distances; ``pattern``: also ``sum X^2`` and ``sum X * X^T`` of the exact null.
    Shapes that do not fit raise a one-line ValueError. Every buffer has an explicit dtype, whatever torch's
    default dtype.
    """
    fused.check_shapes(patch_attn, lhs, dmat, max_rows=None)
    bsz, nh, n, _ = patch_attn.shape
    rows, l1 = lhs.shape[1], n_levels + 1
    if rows % l1:
        raise ValueError(f"layer_sums: {rows} contraction rows are not whole maps of {l1} rows ({n_levels} levels)")
    k_maps = rows // l1
    if k_maps == 1 and compiled.wanted(patch_attn.device):  # an accelerator (or SIFTLENS_COMPILE=1)
        got = compiled.layer_sums(patch_attn, lhs, dmat, fused.centre(n), pattern)
        if got is not None:
            return _sums_of_kernel(got, lhs, n_levels, pattern)
    if k_maps == 1 and rows <= fused.MAX_ROWS and fused.available(patch_attn.device):
        return _fused_layer_sums(patch_attn, lhs, dmat, n_levels, pattern)
    patch_attn = patch_attn.float()  # bf16 / fp16 attention of the compiled path's callers (float32: itself)
    f32 = {"dtype": torch.float32, "device": patch_attn.device}
    f64 = {"dtype": torch.float64, "device": patch_attn.device}
    lhs = lhs.to(**f32)
    c = fused.centre(n)
    sums = torch.empty(bsz, nh, n, 1, **f32)  # row sums of the patch block
    ysums = torch.empty(2, bsz, nh, n, **f32)  # row and column sums of Y = Bt - c
    out = LayerSums(torch.empty(bsz, nh, n, **f64), torch.empty(bsz, nh, n, **f64),
                    *(torch.empty(bsz, nh, n, **f32) for _ in range(3)), torch.empty(bsz * k_maps, l1, nh, l1, **f32))
    if pattern:  # sum Y^2 and sum Y * Y^T until _uncentre
        out.xx, out.xxt = torch.empty(bsz, nh + 1, **f64), torch.empty(bsz, nh + 1, **f64)
    one_map = k_maps == 1
    limit = chunk_elements(patch_attn.device)
    g = chunk_heads(nh, n, limit) if one_map else nh
    c_img = min(bsz, chunk_images(nh, n, limit)) if g == nh else 1
    # one map (the exact null): Bt contiguous per head, as the sums of squares need, and the keys side first
    # into a small per-layer buffer; many maps (Monte Carlo): Bt laid out (image, query, head, key), so that
    # the query side of every map and head is one matmul whose result splits into maps without a copy
    shape = (3, c_img, g, n, n) if one_map else (3, c_img, n, g, n)
    bt, yt, scratch = torch.empty(shape, **f32) if one_map else torch.empty(shape, **f32).transpose(2, 3)
    qk = torch.empty(bsz, nh * n, l1, **f32) if one_map else None
    head_sum = torch.empty(c_img, n, n, **f32) if pattern else None  # sum of Y over an image's heads
    dvec = dmat.to(patch_attn.device, torch.float32)
    for s, e, h0, h1 in _chunks(bsz, nh, c_img, g):
        b, y = bt[:e - s, :h1 - h0], yt[:e - s, :h1 - h0]  # (c, heads, N, N), views in either layout
        pa = patch_attn[s:e, h0:h1]
        torch.div(pa, torch.sum(pa, -1, keepdim=True, out=sums[s:e, h0:h1]), out=b)
        torch.sub(b, c, out=y)
        torch.sum(y, -1, out=ysums[0, s:e, h0:h1])
        torch.sum(y, -2, out=ysums[1, s:e, h0:h1])
        if one_map:
            torch.bmm(b.view(e - s, (h1 - h0) * n, n), lhs[s:e].transpose(1, 2), out=qk[s:e, h0 * n:h1 * n])
        else:
            _contract_many_maps(b, lhs[s:e], l1, out, s, e)
        _chunk_sums(b, y, dvec, scratch[:e - s, :h1 - h0], out, s, e, h0, h1)
        if pattern:  # the head mean's squares from the sum over heads (split over chunks for a large image)
            hs = head_sum[:e - s]
            if h0 == 0:
                torch.sum(y, 1, out=hs)
            else:
                hs.add_(y.sum(1))
            if h1 == nh:
                _head_mean_squares(hs, nh, scratch[:e - s, 0], out, s, e)
    if not bool((sums > 0).all()):  # 0/0: a query without attention to patches; uniform, as renormalise() does
        return layer_sums(renormalise(patch_attn), lhs, dmat, n_levels, pattern)
    if one_map:
        _contract_one_map(qk, lhs, l1, out)
    torch.div(patch_attn.diagonal(dim1=-2, dim2=-1), sums[..., 0], out=out.diag)
    _uncentre(out, ysums[0], ysums[1], out.xx, out.xxt, c)
    return out


def _fused_layer_sums(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor, n_levels: int,
                      pattern: bool) -> LayerSums:
    """:func:`layer_sums` of one map per image by the fused CPU kernel (:mod:`siftlens.core.fused`)."""
    got = fused.layer_sums(patch_attn, lhs, dmat, pattern)
    if got is None:  # a query row without attention to patches: uniform, as renormalise() makes it
        return layer_sums(renormalise(patch_attn), lhs, dmat, n_levels, pattern)
    return _sums_of_kernel(got, lhs, n_levels, pattern)


def _sums_of_kernel(got: dict[str, torch.Tensor], lhs: torch.Tensor, n_levels: int, pattern: bool) -> LayerSums:
    """The :class:`LayerSums` of the fused kernel's or the compiled path's outputs (the sums of the centred ``Y``,
    :func:`siftlens.core.fused.layer_sums`), on their device."""
    bsz, nh, n = got["colsum"].shape
    f32, f64 = torch.float32, torch.float64
    dev = got["colsum"].device
    out = LayerSums(torch.empty(bsz, nh, n, dtype=f64, device=dev), torch.empty(bsz, nh, n, dtype=f64, device=dev),
                    got["diag"], got["dist"], got["ent"],
                    torch.empty(bsz, n_levels + 1, nh, n_levels + 1, dtype=f32, device=dev))
    _contract_one_map(got["qk"], lhs, n_levels + 1, out)
    _uncentre(out, got["rowsum"], got["colsum"], got["xx"] if pattern else None, got["xxt"] if pattern else None,
              fused.centre(n))
    return out


def _uncentre(out: LayerSums, rows: torch.Tensor, cols: torch.Tensor, xx: torch.Tensor | None,
              xxt: torch.Tensor | None, c: float) -> None:
    """The sums of ``Bt = Y + c`` into ``out`` from those of ``Y``, in float64: rows, cols (B, h, N) float32 row
    and column sums of Y; xx, xxt (B, h + 1) float64 ``sum Y^2`` and ``sum Y * Y^T`` (slot h: the head mean),
    or None. Everything is built on one total ``sum Y`` (the row sums'): the column sums are shifted by the
    difference of the two float32 totals spread over the N columns (within their rounding), so that the row sums,
    the column sums and the sums of squares add up to one matrix, as the centring of the null variance
    (:func:`siftlens.core.stats.centred_at_least_sums`) assumes."""
    n = rows.shape[-1]
    torch.add(rows, n * c, out=out.rowsum)  # float32 rows into the float64 buffer
    total = out.rowsum.sum(-1) - n * n * c  # (B, h): sum Y, in float64
    cols64 = cols.to(torch.float64)
    torch.add(cols64, ((total - cols64.sum(-1)) / n + n * c)[..., None], out=out.colsum)
    if xx is not None:
        total = torch.cat([total, total.mean(1, keepdim=True)], 1)  # the head mean's Y is the mean of the heads'
        const = 2 * c * total + n * n * c * c  # sum (Y + c)^2 = sum Y^2 + 2 c sum Y + N^2 c^2; likewise with Y^T
        out.xx, out.xxt = xx + const, xxt + const


def _contract_one_map(qk: torch.Tensor, lhs: torch.Tensor, l1: int, out: LayerSums) -> None:
    """``[w | one-hot] Bt [w | one-hot]^T`` of one map per image, from the keys side qk = ``Bt [w | one-hot]^T``:
    (B, h * N, L + 1) and the rows lhs: (B, L + 1, N)."""
    bsz, _, n = lhs.shape
    per_q = qk.view(bsz, -1, n, l1)  # (B, h, N, L + 1)
    out.pairs.copy_(torch.matmul(lhs[:, None], per_q).transpose(1, 2))  # (B, L + 1, h, L + 1)


def _contract_many_maps(bt: torch.Tensor, lhs: torch.Tensor, l1: int, out: LayerSums, s: int, e: int) -> None:
    """Every map's ``[w | one-hot] Bt [w | one-hot]^T`` of images ``s:e``: bt (c, h, N, N), a view of a
    contiguous (c, N, h, N) buffer; lhs (c, K (L + 1), N)."""
    c, nh, n, _ = bt.shape
    k_maps = lhs.shape[1] // l1
    q = torch.bmm(lhs, bt.transpose(1, 2).reshape(c, n, nh * n))  # (c, K (L + 1), h * N): the query side
    pairs = out.pairs[s * k_maps:e * k_maps].view(c * k_maps, l1 * nh, l1)
    torch.bmm(q.view(c * k_maps, l1 * nh, n), lhs.view(c * k_maps, l1, n).transpose(1, 2), out=pairs)


def _chunks(bsz: int, nh: int, c: int, g: int):
    """(first image, end image, first head, end head) of every chunk, images outer, heads inner."""
    for s in range(0, bsz, c):
        for h0 in range(0, nh, g):
            yield s, min(bsz, s + c), h0, min(nh, h0 + g)


def _chunk_sums(bt: torch.Tensor, y: torch.Tensor, dmat: torch.Tensor, scratch: torch.Tensor, out: LayerSums,
                s: int, e: int, h0: int, h1: int) -> None:
    """The passes over ``bt`` (c, heads, N, N) of images ``s:e``, heads ``h0:h1``, and over its centred ``y``
    (``bt - c``), that do not involve the maps, into ``out``; ``scratch`` (same shape) is overwritten."""
    torch.sum(torch.mul(bt, dmat, out=scratch), -1, out=out.dist[s:e, h0:h1])  # sum_j Bt_ij D_ij
    # entropy -sum_j p log p with 0 log 0 = 0: log 0 = -inf makes 0 * log 0 NaN, which nansum skips (one pass
    # fewer than clamping first; torch's xlogy and entr give the same values but are not vectorised)
    torch.log(bt, out=scratch).mul_(bt)
    torch.nansum(scratch, -1, out=out.ent[s:e, h0:h1]).neg_()
    if out.xx is not None:  # each head's sum Y^2 and sum Y * Y^T
        out.xx[s:e, h0:h1] = _total(torch.mul(y, y, out=scratch))
        out.xxt[s:e, h0:h1] = _total(torch.mul(y, y.transpose(-1, -2), out=scratch))


def _total(x: torch.Tensor) -> torch.Tensor:
    """The sum over the last two dimensions of float32 ``x`` (..., N, N), float64: row sums in float32, added
    in float64 (the rounding of a row's N terms, not of all N^2)."""
    return torch.sum(x.sum(-1), -1, dtype=torch.float64)


def _head_mean_squares(head_sum: torch.Tensor, nh: int, scratch: torch.Tensor, out: LayerSums, s: int,
                       e: int) -> None:
    """sum Y^2 and sum Y * Y^T of the head mean's Y = head_sum / h (head_sum: (c, N, N), the sum of the heads'
    Y), into slot h; ``scratch`` (c, N, N) is overwritten."""
    out.xx[s:e, nh] = _total(torch.mul(head_sum, head_sum, out=scratch)) / nh**2
    out.xxt[s:e, nh] = _total(torch.mul(head_sum, head_sum.transpose(-1, -2), out=scratch)) / nh**2


def renormalise(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` (..., N) scaled to sum to 1; a row with zero sum becomes uniform ``1/N`` (never NaN).

    ``out``: optional tensor of ``x``'s shape (any strides) to write into.
    """
    s = x.sum(-1, keepdim=True)
    ok = s > 0
    # the common case: one division, no temporaries of x's size (on an accelerator always the where below, the
    # same values without a host sync)
    if x.device.type == "cpu" and bool(ok.all()):
        return torch.div(x, s, out=out)
    return _renormalise_rows(x, s, ok, out)


def _renormalise_rows(x: torch.Tensor, s: torch.Tensor, ok: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """:func:`renormalise` without a branch: ``x / s`` where the row sum ``s`` is positive (``ok``), else 1/N."""
    return torch.where(ok, x / torch.where(ok, s, torch.ones_like(s)), torch.full_like(x, 1.0 / x.shape[-1]),
                       out=out)
