"""The O(h N^2) reductions of one layer's attention: the only work of the analysis whose cost grows like the
attention itself. Everything else (metrics, null moments) is computed from their O(h N) outputs.

Notation as in :mod:`siftlens.metrics`: ``c`` images of a chunk, ``h`` heads, ``N`` patches, ``K`` weight maps
per image, ``L`` levels, ``R = K (L + 1)`` contraction rows per image (per map the weight row and the L
one-hot level rows). ``Bt`` is the row-renormalised patch block of the attention.

Per chunk of images, each pass over ``Bt`` is one large vectorised or BLAS call:

1. ``Bt = P / rowsum(P)``, written once into a contiguous buffer.
2. ``Bt [w | one-hot]^T`` by one BLAS matmul: per query, the attention mass on each level and on the
   weights; its level columns of map 0 add up to the row sums, and one more small matmul with the query
   side gives every ``[w | one-hot] Bt [w | one-hot]^T``.
3. column sums, the distance row sums ``sum_j Bt_ij D_ij`` and the entropy ``-sum_j Bt_ij log Bt_ij``
   (``log 0 = -inf`` makes ``0 log 0`` NaN, and ``nansum`` skips it: 0, with no clamping pass). The diagonal
   and the small contractions are taken once per layer, not per chunk.
   A query row of the patch block that sums to 0 (all its attention on prefix tokens) makes the whole layer
   run again on :func:`renormalise`'d attention, where such a row is uniform.
4. only for the exact null (``pattern=True``): the Gram matrices ``<Bt_g, Bt_g'>`` and ``<Bt_g, Bt_g'^T>``
   over the heads ``g, g'`` of each image (two BLAS matmuls and one transposed copy). Their diagonals are
   each head's ``sum X^2`` and ``sum X * X^T``; their totals over ``h^2`` are the same sums of the head-mean
   matrix, so the head mean never has to be formed.

Chunks are one image or a few (about :data:`_CHUNK_ELEMS` attention elements), so that a chunk's buffers
stay in the CPU's cache between passes; the buffers are allocated once per layer and reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# images per chunk: about this many elements of (h, N, N) at a time (1 MB of float32), so that the
# chunk's Bt, its log and its transpose stay in a core's L2 cache between passes
_CHUNK_ELEMS = 1 << 18


@dataclass
class LayerSums:
    """The outputs of :func:`layer_sums` for ``B`` images, all float32.

    ``rowsum``, ``colsum``, ``diag``, ``dist``, ``ent``: (B, h, N) per-query row sums of ``Bt`` (1 to
    float32 rounding), column sums, diagonal, ``sum_j Bt_ij D_ij`` and ``-sum_j Bt_ij log Bt_ij``;
    ``pairs``: (B * K, L + 1, h, L + 1), ``[w | one-hot] Bt [w | one-hot]^T`` per map and head;
    ``gram``, ``gram_t``: (B, h, h) ``<Bt_g, Bt_g'>`` and ``<Bt_g, Bt_g'^T>`` (only with ``pattern``).
    """

    rowsum: torch.Tensor
    colsum: torch.Tensor
    diag: torch.Tensor
    dist: torch.Tensor
    ent: torch.Tensor
    pairs: torch.Tensor
    gram: torch.Tensor | None = None
    gram_t: torch.Tensor | None = None


def chunk_images(h: int, n: int) -> int:
    """Images per chunk for ``h`` heads of ``n`` patches."""
    return max(1, _CHUNK_ELEMS // max(1, h * n * n))


def layer_sums(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor, n_levels: int,
               pattern: bool = False) -> LayerSums:
    """Every O(h N^2) reduction of one layer (see the module docstring).

    patch_attn: (B, h, N, N) patch block of the post-softmax attention, any strides; lhs: (B, R, N) float32
    contraction rows per image, ``R = K (L + 1)``, map by map (``[w, one-hot(level 0 .. L-1)]``); dmat:
    (N, N) float32 patch-centre distances; ``pattern``: also the Gram matrices of the exact null.
    """
    bsz, nh, n, _ = patch_attn.shape
    rows, l1 = lhs.shape[1], n_levels + 1
    k_maps = rows // l1
    f32 = {"dtype": torch.float32, "device": patch_attn.device}
    sums = torch.empty(bsz, nh, n, 1, **f32)  # row sums of the patch block
    out = LayerSums(*(torch.empty(bsz, nh, n, **f32) for _ in range(5)), torch.empty(bsz * k_maps, l1, nh, l1, **f32))
    if pattern:
        out.gram, out.gram_t = torch.empty(bsz, nh, nh, **f32), torch.empty(bsz, nh, nh, **f32)
    c = min(bsz, chunk_images(nh, n))
    bt, scratch = torch.empty(2, c, nh, n, n, **f32)  # one chunk's Bt and a buffer for log Bt, then Bt^T
    # per query, the mass on every map's weights and levels; small for one map, so it is contracted once per
    # layer (fewer small operations), else once per chunk (with 100 null maps it would be 100 times larger)
    per_layer = k_maps == 1
    qk = torch.empty(bsz if per_layer else c, nh * n, rows, **f32)
    dvec = dmat.to(patch_attn.device, torch.float32)
    for s in range(0, bsz, c):
        e = min(bsz, s + c)
        q = qk[s:e] if per_layer else qk[:e - s]
        _chunk_sums(patch_attn[s:e], sums[s:e], lhs[s:e], q, dvec, bt[:e - s], scratch[:e - s], out, s, e)
        if not per_layer:
            _contract(q, lhs[s:e], l1, out, s, e)
    if not bool((sums > 0).all()):  # a query without attention to patches: uniform, as renormalise() does
        return layer_sums(renormalise(patch_attn), lhs, dmat, n_levels, pattern)
    if per_layer:
        _contract(qk, lhs, l1, out, 0, bsz)
    torch.div(patch_attn.diagonal(dim1=-2, dim2=-1), sums[..., 0], out=out.diag)
    return out


def _contract(qk: torch.Tensor, lhs: torch.Tensor, l1: int, out: LayerSums, s: int, e: int) -> None:
    """Row sums and ``[w | one-hot] Bt [w | one-hot]^T`` of images ``s:e`` from their per-query contraction
    qk: (c, h * N, R) and their rows lhs: (c, R, N)."""
    c, rows, n = lhs.shape
    k_maps, nh = rows // l1, qk.shape[1] // n
    per_q = qk.view(c, nh, n, k_maps, l1)
    torch.sum(per_q[:, :, :, 0, 1:], -1, out=out.rowsum[s:e])  # the level columns of map 0 cover every key
    # query side: pairs[(image, map), a, head, b] = sum_i lhs[image, map, a, i] per_q[image, head, i, map, b]
    q_maps = per_q.permute(0, 3, 2, 1, 4).reshape(c * k_maps, n, nh * l1)
    pairs = out.pairs[s * k_maps:e * k_maps].view(c * k_maps, l1, nh * l1)
    torch.bmm(lhs.reshape(c * k_maps, l1, n), q_maps, out=pairs)


def _chunk_sums(pa: torch.Tensor, sums: torch.Tensor, lhs: torch.Tensor, qk: torch.Tensor, dmat: torch.Tensor,
                bt: torch.Tensor, scratch: torch.Tensor, out: LayerSums, s: int, e: int) -> None:
    """The passes over images ``s:e``: pa (c, h, N, N) their patch block; sums (c, h, N, 1), qk (c, h * N, R),
    bt and scratch (c, h, N, N) are written; the rest of the results go into ``out`` at ``s:e``."""
    c, nh, n, _ = pa.shape
    torch.div(pa, torch.sum(pa, -1, keepdim=True, out=sums), out=bt)  # 0/0 = NaN rows are redone by the caller
    torch.bmm(bt.view(c, nh * n, n), lhs.transpose(1, 2), out=qk)
    torch.sum(bt, -2, out=out.colsum[s:e])
    torch.sum(torch.mul(bt, dmat, out=scratch), -1, out=out.dist[s:e])  # sum_j Bt_ij D_ij
    # entropy -sum_j p log p with 0 log 0 = 0: log 0 = -inf makes 0 * log 0 NaN, which nansum skips (one pass
    # fewer than clamping first; torch's xlogy and entr give the same values but are not vectorised)
    torch.log(bt, out=scratch).mul_(bt)
    torch.nansum(scratch, -1, out=out.ent[s:e]).neg_()
    if out.gram is not None:
        x = bt.view(c, nh, n * n)
        torch.bmm(x, x.transpose(1, 2), out=out.gram[s:e])
        scratch.copy_(bt.transpose(-1, -2))
        torch.bmm(x, scratch.view(c, nh, n * n).transpose(1, 2), out=out.gram_t[s:e])


def renormalise(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` (..., N) scaled to sum to 1; a row with zero sum becomes uniform ``1/N`` (never NaN).

    ``out``: optional tensor of ``x``'s shape (any strides) to write into.
    """
    s = x.sum(-1, keepdim=True)
    ok = s > 0
    if bool(ok.all()):  # the common case: one division, no temporaries of x's size
        return torch.div(x, s, out=out)
    return torch.where(ok, x / torch.where(ok, s, torch.ones_like(s)), torch.full_like(x, 1.0 / x.shape[-1]),
                       out=out)
