"""Token drop and attention bias on timm ViTs, checked against a forward built from timm's own modules.

timm needs torchvision, which does not work with the CPU torch of the main venv: these tests run in the
separate ``.venv-timm`` made by ``make test-timm``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytestmark = pytest.mark.timm

timm = pytest.importorskip("timm", reason="timm not installed (needs torchvision); run `make test-timm`")

from siftlens.models.timm import TimmBackend  # noqa: E402
from siftlens.shortcuts.interventions import forward_bias, forward_drop, semantic_bias  # noqa: E402

B = 3
MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64, depth=2)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2)),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=(56, 42), depth=2, embed_dim=64,
                                                                num_heads=4, init_values=1.0, num_classes=5)),
}


def make(key: str) -> TimmBackend:
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    return TimmBackend.load(name, **kwargs)


def manual(be: TimmBackend, x: torch.Tensor, keep=None, bias=None, layers=()) -> torch.Tensor:
    """timm's forward, step by step: gather kept tokens after norm_pre, attn_mask in ``layers``."""
    m = be.model
    T = be.num_prefix_tokens
    t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    if keep is not None:
        t = torch.cat([t[:, :T], torch.gather(t[:, T:], 1, keep[..., None].expand(-1, -1, t.shape[-1]))], 1)
    full = None
    if bias is not None:
        kb = bias if keep is None else torch.gather(bias, 1, keep)
        full = torch.cat([torch.zeros(B, T), kb], 1)[:, None, None]
    for i, blk in enumerate(m.blocks):
        t = blk(t, attn_mask=full) if full is not None and i in layers else blk(t)
    return m.forward_head(m.norm(t))


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("eager", [False, True])
def test_timm_interventions_match_a_manual_forward(key, eager):
    be = make(key)
    H, W = be.input_size
    x = torch.randn(B, 3, H, W)
    N = be.num_patches
    g = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(N, generator=g)[: N // 2].sort().values for _ in range(B)])
    ctx = be.eager() if eager else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        plain = be.forward(x)
        torch.testing.assert_close(be.forward_intervened(x), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=torch.arange(N).expand(B, N)), plain,
                                   atol=1e-5, rtol=1e-5)
        dropped = be.forward_intervened(x, keep_idx=keep)
        torch.testing.assert_close(dropped, manual(be, x, keep=keep), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dropped, plain, atol=1e-4)
        # drop == -inf key mask (these models pool prefix tokens only)
        mask = torch.full((B, N), float("-inf")).scatter(1, keep, 0.0)
        torch.testing.assert_close(be.forward_intervened(x, key_bias=mask), dropped, atol=1e-5, rtol=1e-5)
        m = torch.zeros(B, N, dtype=torch.bool)
        m[1, :3] = True
        m[2, 2:9] = True
        torch.testing.assert_close(forward_drop(be, x, m, "group"), forward_drop(be, x, m, "mask"),
                                   atol=1e-5, rtol=1e-5)
        bias = torch.randn(B, N, generator=g) * 2
        torch.testing.assert_close(be.forward_intervened(x, key_bias=bias, layers=[-1]),
                                   manual(be, x, bias=bias, layers=(len(be.model.blocks) - 1,)), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(be.forward_intervened(x, keep_idx=keep, key_bias=bias),
                                   manual(be, x, keep=keep, bias=bias, layers=range(len(be.model.blocks))),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(forward_bias(be, x, semantic_bias(torch.rand(B, N), beta=0.0)), plain,
                                   atol=1e-5, rtol=1e-5)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in be.model.modules())
