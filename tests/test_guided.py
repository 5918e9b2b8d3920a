"""Guided training (docs/method.md, "Guided training"): token dropping in supervised training and in the MAE encoder,
the attention-guided (AttMask-style) masking baseline, and the linear probe at every evaluation epoch."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pretrain import make_folder as make_mae_folder
from test_pretrain import prun, tiny_mae
from test_train import make_folder
from test_train import run as train_run

from siftlens.errors import ConfigError
from siftlens.keypoints import SiftParams
from siftlens.models.vit import ViT, ViTConfig, load_vit
from siftlens.training import supervised
from siftlens.training.augment import augment
from siftlens.training.guidance import keep_count, keep_indices
from siftlens.training.images import normalize
from siftlens.training.keypoint_bank import KeypointBank
from siftlens.training.masking import attention_weights, mask_scores


def old_train_one_epoch(loop, data, bank, tc, epoch, tick, drops=None):
    """The supervised epoch as it was before token dropping existed (frozen here as the reference; a run without a
    given drop passes it None)."""
    assert drops is None
    t0 = time.time()
    model, device, mcfg = loop.model, loop.run.device, loop.model.cfg
    model.train()
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen, batches = loop.epoch_batches(epoch, len(data.x))
    seen, loss_sum = 0, 0.0
    for step, idx in batches:
        loop.set_lr(step)
        xb = augment(normalize(x_all[idx].to(device), mcfg.mean, mcfg.std), tc.pad, gen)
        logits = loop.ddp(xb)
        loss = F.cross_entropy(logits.float(), y_all[idx], label_smoothing=tc.label_smoothing)
        loop.step(loss)
        seen += len(idx)
        loss_sum += float(loss.detach()) * len(idx)
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 0.0, "lr": loop.lr,
            "seconds": time.time() - t0}


def test_keep_rate_one_reproduces_training_without_dropping(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", n=12)
    new = train_run(tmp_path, "new", epochs=2, keep_rate=1.0, keep_policy="sift").record
    monkeypatch.setattr(supervised, "train_one_epoch", old_train_one_epoch)
    old = train_run(tmp_path, "old", epochs=2).record
    assert [e["train_loss"] for e in new["epochs"]] == [e["train_loss"] for e in old["epochs"]]
    a, b = load_vit(tmp_path / "new" / "model").state_dict(), load_vit(tmp_path / "old" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not (tmp_path / "new" / "keypoints.npz").exists()  # r = 1 never needs SIFT
    steps, n_tokens = 3, 16 + 1  # 24 images / batch 8; 4 x 4 patches + CLS
    assert new["epochs"][0]["train_tokens"] == steps * 8 * n_tokens


@pytest.mark.parametrize("policy", ["random", "sift"])
def test_token_dropping_trains_on_exactly_k_tokens(tmp_path, monkeypatch, policy):
    make_folder(tmp_path / "data", n=12)
    seen, evaluated = [], []
    forward = ViT.forward

    def spy(self, x, keep_idx=None, *a, **kw):
        (seen if self.training else evaluated).append(keep_idx)
        return forward(self, x, keep_idx, *a, **kw)

    monkeypatch.setattr(ViT, "forward", spy)
    hist = train_run(tmp_path, policy, epochs=1, keep_rate=0.5, keep_policy=policy, upsample=4.0).record
    assert len(seen) == 3 and all(k is not None and k.shape == (8, 8) for k in seen)
    for k in seen:  # distinct, sorted patch positions in [0, 16)
        assert (k.diff(dim=1) > 0).all() and k.min() >= 0 and k.max() < 16
    assert hist["epochs"][0]["train_tokens"] == 3 * 8 * (8 + 1)
    assert (tmp_path / policy / "keypoints.npz").exists() == (policy == "sift")
    assert evaluated and all(k is None for k in evaluated)  # evaluation runs on all tokens


def test_sift_keep_policy_draws_in_proportion_to_weights():
    """k = 1: the kept token is a categorical draw with p ~ (w + eps)^tau; k > 1: richer patches are kept
    more often, poorer ones with tau < 0, and tau = 0 is random dropping."""
    w = torch.tensor([0.0, 1.0, 3.0, 7.0])
    draws = 40000
    u = torch.rand(draws, 4, generator=torch.Generator().manual_seed(5))
    kept = keep_indices(u, 1, w.expand(draws, 4), tau=1.5, eps=1.0)[:, 0]
    p = (w + 1.0) ** 1.5 / ((w + 1.0) ** 1.5).sum()
    torch.testing.assert_close(torch.bincount(kept, minlength=4).float() / draws, p, atol=0.01, rtol=0)
    counts = torch.zeros(draws, 16)
    counts[:, :4] = 5.0
    u = torch.rand(draws, 16, generator=torch.Generator().manual_seed(6))

    def rich_share(**kw):
        k = keep_indices(u, 8, **kw)
        return (k < 4).float().sum(1).mean().item() / 4  # how often a rich patch is kept

    assert abs(rich_share() - 0.5) < 0.01
    assert rich_share(counts=counts, tau=1.0) > 0.85 and rich_share(counts=counts, tau=-1.0) < 0.2
    assert torch.equal(keep_indices(u, 8, counts, tau=0.0), keep_indices(u, 8))
    assert keep_count(0.5, 64) == 32 and keep_count(0.01, 10) == 1 and keep_count(1.0, 7) == 7


def test_keep_errors_are_one_line(tmp_path):
    make_folder(tmp_path / "data", n=4)
    with pytest.raises(ConfigError, match="--keep-rate"):
        train_run(tmp_path, "o", keep_rate=0.0)
    with pytest.raises(ConfigError, match="--keep-policy"):
        train_run(tmp_path, "o", keep_rate=0.5, keep_policy="attention")
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "train", "--train", str(tmp_path / "data"), "--out",
                        str(tmp_path / "o"), "--keep-rate", "1.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_mae_token_dropping_encodes_a_subset_of_the_visible_patches():
    model = tiny_mae(mask_ratio=0.5)  # 24 patches, 12 visible
    B, N = 16, model.num_patches
    u = torch.rand(B, N, generator=torch.Generator().manual_seed(1))
    keep_scores = torch.rand(B, N, generator=torch.Generator().manual_seed(2))
    full_keep, full_mask, _ = model.masking(u)
    keep_idx, mask, ids_restore = model.masking(u, keep_scores, n_encode=5)
    assert keep_idx.shape == (B, 5) and torch.equal(mask, full_mask)  # the loss still covers the masked set
    for b in range(B):
        visible = set(full_keep[b].tolist())
        assert set(keep_idx[b].tolist()) <= visible
        # the encoder keeps the visible patches with the highest keep scores
        best = sorted(visible, key=lambda p: -keep_scores[b, p].item())[:5]
        assert set(keep_idx[b].tolist()) == set(best)
    x = torch.randn(B, 3, 16, 24)
    loss, pred, m = model(x, u, None, keep_scores, 5)
    assert pred.shape == (B, N, 48) and torch.isfinite(loss) and torch.equal(m, full_mask)
    assert torch.equal(model.masking(u, None, 5)[0], full_keep)  # no keep scores: no dropping


def test_last_cls_attention_equals_the_captured_attention(tiny_vit):
    x = torch.randn(3, 3, 24, 32)
    got = tiny_vit.last_cls_attention(x)
    captured = []
    tiny_vit.set_fused(False)
    handle = tiny_vit.blocks[-1].attn.probe.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            tiny_vit(x)
    finally:
        handle.remove()
        tiny_vit.set_fused(True)
    ref = captured[0].mean(1)[:, 0, tiny_vit.num_prefix_tokens :]
    torch.testing.assert_close(got, ref)
    w = attention_weights(tiny_vit, x)
    torch.testing.assert_close(w.mean(1), torch.ones(3))
    # attmask hides a patch that holds a large share of the attention far more often than random masking
    draws, n = 2000, w.shape[1]
    share = torch.ones(n)
    share[3] = 6.0
    u = torch.rand(draws, n, generator=torch.Generator().manual_seed(0))
    hide_att = mask_scores("attmask", u, share.expand(draws, -1), tau=2.0).topk(6, dim=1).indices
    hide_rnd = mask_scores("random", u).topk(6, dim=1).indices
    assert (hide_att == 3).any(1).float().mean() > (hide_rnd == 3).any(1).float().mean() + 0.3


def test_no_cls_token_means_no_attmask():
    model = ViT(ViTConfig(img_size=16, patch_size=4, dim=16, depth=1, heads=2, cls_token=False, pool="mean"))
    with pytest.raises(ConfigError, match="CLS"):
        model.last_cls_attention(torch.zeros(1, 3, 16, 16))


def test_pretrain_probes_every_evaluation_epoch_and_counts_tokens(tmp_path):
    make_mae_folder(tmp_path / "data", n=8)
    hist = prun(tmp_path, "att", policy="attmask", tau=2.0, epochs=2, keep_rate=0.5, keep_policy="sift").record
    assert len(hist["epochs"]) == 2
    for e in hist["epochs"]:
        # val is the training folder itself, and 16 distinct images of 32-dim features are linearly separable:
        # a probe really fitted on this epoch's features and tested on the same images scores every one
        assert e["probe"]["train_acc"] == 1.0 and e["probe"]["test_acc"] == 1.0
        # 16 images / batch 8 = 2 steps; 16 patches, 4 visible, 2 encoded, + CLS; guidance sees all 16 + CLS
        assert e["train_tokens"] == 2 * 8 * (2 + 1) and e["guide_tokens"] == 2 * 8 * (16 + 1)
    assert (tmp_path / "kp.npz").exists()  # the sift keep policy needs keypoints, attmask itself does not


def test_keypoint_bank_in_worker_processes_equals_one_process():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 60, (12, 16, 16, 3), dtype=np.uint8)
    imgs[:, 4:10, 3:12] = 240
    imgs[::3, 9:14, 8:15] = 10
    params = SiftParams(upsample=4.0)
    one, many = KeypointBank.detect(imgs, params), KeypointBank.detect(imgs, params, workers=2)
    assert one.count.sum() > 0 and np.array_equal(one.count, many.count)
    assert np.array_equal(one.xy, many.xy) and np.array_equal(one.size, many.size)
    assert one.fingerprint == many.fingerprint
