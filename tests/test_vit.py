"""The project's ViT: fused == eager, capture lifecycle, geometry, persistence."""

from __future__ import annotations

import pytest
import torch
from _hub import offline_hub

from siftlens.attention import Rollout, capture
from siftlens.errors import AttentionBackendError, GeometryError, ModelLoadError
from siftlens.models import load_backend
from siftlens.models.native import NativeBackend
from siftlens.models.vit import ViT, ViTConfig, load_vit, save_vit


def test_fused_and_eager_agree(tiny_vit):
    x = torch.randn(3, 3, 24, 32)
    with torch.no_grad():
        a = tiny_vit(x)
        tiny_vit.set_fused(False)
        b = tiny_vit(x)
        tiny_vit.set_fused(True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def manual_attention(model: ViT, x: torch.Tensor) -> list[torch.Tensor]:
    """Recompute every layer's softmax attention by hand from the weights."""
    out = []
    t = model.embed(x)
    for blk in model.blocks:
        h = blk.norm1(t)
        B, S, D = h.shape
        q, k, _ = blk.attn.qkv(h).view(B, S, 3, blk.attn.heads, -1).permute(2, 0, 3, 1, 4)
        out.append(((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1))
        t = blk(t)
    return out


def test_capture_matches_manual_attention_for_the_whole_batch(tiny_vit):
    be = NativeBackend(tiny_vit)
    assert be.grid_size == (3, 4) and be.num_prefix_tokens == 2 and be.patch_size == 8
    x = torch.randn(3, 3, 24, 32)
    got = {}
    with torch.no_grad(), capture(be, lambda l, a: got.__setitem__(l, a.clone())) as cap:
        be.forward(x)
    cap.check()
    with torch.no_grad():
        ref = manual_attention(tiny_vit, x)
    assert sorted(got) == [0, 1]
    for l in range(2):
        assert got[l].shape == (3, 4, 14, 14)
        torch.testing.assert_close(got[l], ref[l], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[l].sum(-1), torch.ones(3, 4, 14))
    assert all(blk.attn.fused for blk in tiny_vit.blocks), "fused mode restored"


def test_hooks_are_removed_even_when_the_body_raises(tiny_vit):
    be = NativeBackend(tiny_vit)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(be, lambda l, a: None):
            raise RuntimeError("boom")
    assert all(not blk.attn.probe._forward_hooks for blk in tiny_vit.blocks)
    assert all(blk.attn.fused for blk in tiny_vit.blocks)
    with pytest.raises(ValueError, match="from callback"):
        with capture(be, lambda l, a: (_ for _ in ()).throw(ValueError("from callback"))):
            be.forward(torch.randn(1, 3, 24, 32))
    assert all(not blk.attn.probe._forward_hooks for blk in tiny_vit.blocks)


def test_selected_layers_and_missing_attention_is_loud(tiny_vit):
    be = NativeBackend(tiny_vit)
    seen = []
    with capture(be, lambda l, a: seen.append(l), layers=[-1]) as cap:
        be.forward(torch.randn(2, 3, 24, 32))
    assert seen == [1]
    with pytest.raises(AttentionBackendError):
        with capture(be, lambda l, a: None, layers=[5]):
            pass
    with capture(be, lambda l, a: None) as cap:
        pass  # no forward ran: nothing observed
    with pytest.raises(AttentionBackendError):
        cap.check()


def test_rollout_of_captured_attention_follows_the_layers_in_order(tiny_vit):
    with torch.no_grad():  # peaked attention, so that layers do not commute
        for blk in tiny_vit.blocks:
            blk.attn.qkv.weight.mul_(8.0)
    be = NativeBackend(tiny_vit)
    x = torch.randn(2, 3, 24, 32)
    r = Rollout()
    with torch.no_grad(), capture(be, lambda l, a: r.update(a)):
        be.forward(x)
    with torch.no_grad():
        a1, a2 = manual_attention(tiny_vit, x)  # (B, h, S, S) of block 0 and block 1
    eye = torch.eye(14)

    def mixed(a):  # 0.5 * head mean + 0.5 * I; rows of a sum to 1 already
        return 0.5 * a.mean(1) + 0.5 * eye

    assert r.result.shape == (2, 14, 14)
    torch.testing.assert_close(r.result, mixed(a2) @ mixed(a1), atol=1e-5, rtol=1e-5)
    assert (r.result - mixed(a1) @ mixed(a2)).abs().max() > 0.01, "the layer order matters here"
    torch.testing.assert_close(r.result.sum(-1), torch.ones(2, 14))


def test_rollout_matches_a_hand_computed_three_layer_example():
    # S = 2 tokens, h = 2 heads. Per layer A' = rownorm(0.5 * mean_heads(A) + 0.5 * I); R = A3' A2' A1'.
    # layer 1: head mean [[.5, .5], [1, 0]]       -> A1' = [[.75, .25], [.5, .5]]
    # layer 2: head mean [[0, 1], [0, 1]]          -> A2' = [[.5, .5], [0, 1]]
    # layer 3: head mean [[2, 2], [0, 1]]          -> [[1.5, 1], [0, 1]], rows renormalised: [[.6, .4], [0, 1]]
    # A2' A1' = [[.625, .375], [.5, .5]];  A3' A2' A1' = [[.575, .425], [.5, .5]]
    layers = [
        torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]),
        torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]]),
        torch.tensor([[[4.0, 0.0], [0.0, 1.0]], [[0.0, 4.0], [0.0, 1.0]]]),
    ]
    swap = torch.tensor([1, 0])  # batch item 1: the same layers with the two tokens swapped
    r = Rollout(residual=0.5)
    for a in layers:
        r.update(torch.stack([a, a[:, swap][:, :, swap]]))  # (B=2, h=2, S=2, S=2)
    expected = torch.tensor([[[0.575, 0.425], [0.5, 0.5]], [[0.5, 0.5], [0.425, 0.575]]])
    torch.testing.assert_close(r.result, expected, atol=1e-6, rtol=0)


def test_geometry_errors_and_persistence(tmp_path, tiny_vit, monkeypatch):
    with pytest.raises(GeometryError):
        ViTConfig(img_size=(30, 32), patch_size=8)
    with pytest.raises(GeometryError):
        tiny_vit(torch.randn(1, 3, 32, 32))
    save_vit(tiny_vit, tmp_path / "m")
    back = load_vit(tmp_path / "m")
    x = torch.randn(2, 3, 24, 32)
    torch.testing.assert_close(back(x), tiny_vit(x))
    be = load_backend(str(tmp_path / "m"))
    assert isinstance(be, NativeBackend) and be.input_size == (24, 32)
    with pytest.raises(ModelLoadError, match="not found"):
        load_backend(str(tmp_path / "nothing-here"))
    offline_hub(tmp_path / "hf", monkeypatch)  # an empty cache, offline: nothing reaches the network
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_backend("google/vit-base-patch16-224")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{nope")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_backend(str(tmp_path / "bad"))


def test_last_cls_attention_is_the_blocks_own_attention(tiny_vit):
    """last_cls_attention reads the last block's own attention (its eager path, at its probe), leaves the block
    fused with no hook behind, and equals what siftlens.attention.capture sees."""
    x = torch.randn(2, 3, 24, 32)
    got = tiny_vit.last_cls_attention(x)
    last = tiny_vit.blocks[-1].attn
    assert last.fused and not last.probe._forward_hooks
    seen = []
    be = NativeBackend(tiny_vit)
    with capture(be, lambda layer, attn: seen.append(attn), [-1]), torch.no_grad():
        be.forward(x)
    torch.testing.assert_close(got, seen[0].mean(1)[:, 0, tiny_vit.num_prefix_tokens :].float())
    assert got.shape == (2, 12) and bool((got.sum(1) <= 1 + 1e-6).all())
