"""The one-map reductions of :func:`siftlens.core.reductions.layer_sums` as one functional graph for
``torch.compile``: the accelerators' path (issue 26 item 3).

On a GPU the eager path is a dozen kernel launches per chunk of images and one host sync per layer (the check for
a query row without attention to patches). Here the same sums are written without ``out=`` buffers, chunks or
Python branches on tensor values, so that inductor fuses the passes over the (B, h, N, N) attention into a few
kernels and nothing waits on the host: a row that sums to 0 is made uniform by a ``where`` (what the eager path's
:func:`~siftlens.core.reductions.renormalise` rerun gives it, to float32 rounding) instead of by a branch. The
attention is read in its own dtype (bf16 or fp16 under ``--precision``) and upcast to float32 inside the graph, so
no float32 copy of a layer's attention is made before the reductions.

Outputs are those of :func:`siftlens.core.fused.layer_sums`: float32 ``rowsum`` and ``colsum`` of ``Y = Bt - c``,
``diag``, ``dist``, ``ent`` (B, h, N); ``qk`` (B, h * N, R); float64 ``xx`` and ``xxt`` of ``Y`` (B, h + 1), slot
h the head mean's (float32 row sums added in float64, as the eager path and the kernel do). Numbers equal the
eager path's within float32 rounding (only the summation order differs; ``tests/test_compiled.py``).

``SIFTLENS_COMPILE``: ``auto`` (default) compiles on CUDA only; ``1`` on every device (the tests run it on the
CPU); ``0`` never. Where ``torch.compile`` is missing or fails (no Triton, no C++ compiler), one warning says so
and the eager path serves from then on.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

COMPILE_ENV = "SIFTLENS_COMPILE"
_failed: list[str] = []  # why compiling failed, once it has (the eager path serves from then on)


def wanted(device: torch.device) -> bool:
    """Whether the compiled path is to serve tensors on ``device`` (see ``SIFTLENS_COMPILE`` above)."""
    v = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if v in ("0", "off", "no", "false") or _failed or not hasattr(torch, "compile"):
        return False
    if v in ("1", "on", "yes", "true"):
        return True
    return device.type == "cuda"


def dense_sums(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor, c: float,
               pattern: bool) -> dict[str, torch.Tensor]:
    """The reductions of one layer, uncompiled (what :func:`layer_sums` compiles): patch_attn (B, h, N, N) in any
    floating dtype and strides; lhs (B, R, N) and dmat (N, N) float32; c: :func:`siftlens.core.fused.centre`."""
    pa = patch_attn.float()
    bsz, nh, n, _ = pa.shape
    s = pa.sum(-1, keepdim=True)
    ok = s > 0
    # a query row without attention to patches: uniform (the row of c's, divided by its sum n c)
    bt = torch.where(ok, pa, c) / torch.where(ok, s, n * c)
    y = bt - c
    p = bt * torch.log(bt)  # 0 log 0 = NaN, skipped by nansum: 0
    out = {"rowsum": y.sum(-1), "colsum": y.sum(-2), "diag": torch.diagonal(bt, dim1=-2, dim2=-1),
           "dist": (bt * dmat).sum(-1), "ent": -torch.nansum(p, -1),
           "qk": torch.matmul(bt.reshape(bsz, nh * n, n), lhs.transpose(1, 2))}
    if pattern:
        hs = y.sum(1)  # (B, N, N): the head mean's Y times h
        h2 = float(nh * nh)
        out["xx"] = torch.cat([_total(y * y), _total(hs * hs)[:, None] / h2], 1)
        out["xxt"] = torch.cat([_total(y * y.transpose(-1, -2)), _total(hs * hs.transpose(-1, -2))[:, None] / h2], 1)
    return out


def _total(x: torch.Tensor) -> torch.Tensor:
    """Float32 row sums of ``x`` (..., N, N) added in float64 (as :func:`siftlens.core.reductions._total`)."""
    return torch.sum(x.sum(-1), -1, dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(dense_sums, dynamic=None)


def layer_sums(patch_attn: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor, c: float,
               pattern: bool) -> dict[str, torch.Tensor] | None:
    """:func:`dense_sums` compiled, or None (after one warning) where ``torch.compile`` fails here."""
    try:
        return _compiled()(patch_attn, lhs.float(), dmat.to(patch_attn.device, torch.float32), c, pattern)
    except Exception as e:  # noqa: BLE001 - no Triton, no C++ compiler, an unsupported op: the eager path serves
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        _failed.append(reason)
        warnings.warn(f"torch.compile of the attention reductions failed ({type(e).__name__}: {reason}); the eager "
                      f"path serves (set {COMPILE_ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=2)
        return None


def reset() -> None:
    """Forget a failed compile and the compiled function (tests)."""
    _failed.clear()
    _compiled.cache_clear()
