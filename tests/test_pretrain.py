"""SIFT-guided MAE pre-training: model, masking policies, keypoint-consistent augmentation, evaluation,
exact resume and torchrun (gloo, 2 processes)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from _dist import torchrun
from PIL import Image

from siftlens.errors import ConfigError
from siftlens.keypoints import Keypoints, SiftParams, detect, weight_map
from siftlens.models.mae import MAE, MAEConfig, load_mae, save_mae
from siftlens.models.vit import ViTConfig, load_vit
from siftlens.options import build
from siftlens.training import PretrainConfig, PretrainResult, pretrain
from siftlens.training.augment import AugParams, apply_augment, augment, draw_augment
from siftlens.training.guidance import gumbel
from siftlens.training.keypoint_bank import KeypointBank, patch_counts, transform_keypoints
from siftlens.training.mae_eval import knn_accuracy, linear_probe
from siftlens.training.masking import kamim_density, kamim_weights, keypoint_loss_weights, mask_scores, tau_at


def tiny_mae(**kw) -> MAE:
    torch.manual_seed(0)
    enc = ViTConfig(img_size=(16, 24), patch_size=4, num_classes=0, dim=32, depth=2, heads=2, num_registers=1)
    return MAE(enc, MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw))


# -- model -------------------------------------------------------------------------------------------
def test_mae_shapes_and_loss_counts_only_masked_patches(tmp_path):
    model = tiny_mae()
    B, N = 3, 4 * 6
    x = torch.randn(B, 3, 16, 24)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    assert model.patchify(x).shape == (B, N, 4 * 4 * 3)
    torch.testing.assert_close(model.patchify(x)[:, 7].view(B, 4, 4, 3), x[:, :, 4:8, 4:8].permute(0, 2, 3, 1))
    scores = torch.rand(B, N, generator=torch.Generator().manual_seed(1))
    loss, pred, mask = model(x, scores)
    assert pred.shape == (B, N, 48) and mask.shape == (B, N) and loss.ndim == 0
    assert (mask.sum(1) == N - model.num_keep).all() and model.num_keep == 6
    # the kept patches are those with the lowest scores
    assert torch.equal(mask.bool(), scores > scores.sort(1).values[:, model.num_keep - 1 : model.num_keep])
    # the loss is the mean squared error over masked patches only: changing visible predictions changes nothing
    err = ((pred - model.patchify(x)) ** 2).mean(-1)
    torch.testing.assert_close(loss, (err * mask).sum() / mask.sum())
    other = pred.detach().clone()
    other[~mask.bool()] += 5.0
    torch.testing.assert_close(model.forward_loss(x, other, mask), model.forward_loss(x, pred.detach(), mask))
    other[mask.bool()] += 1.0
    assert model.forward_loss(x, other, mask) > model.forward_loss(x, pred.detach(), mask) + 0.5
    # normalised pixel targets: every patch has mean 0 and variance 1
    t = tiny_mae(norm_pix=True).targets(x)
    torch.testing.assert_close(t.mean(-1), torch.zeros(B, N), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(B, N), atol=1e-3, rtol=0)
    save_mae(model, tmp_path / "mae")
    again = load_mae(tmp_path / "mae")
    torch.testing.assert_close(again(x, scores)[0], model.eval()(x, scores)[0])
    with pytest.raises(ConfigError):
        MAEConfig(mask_ratio=1.0)


# -- masking policies --------------------------------------------------------------------------------
def test_random_policy_is_argsort_of_noise_with_exact_count():
    model = tiny_mae(mask_ratio=0.75)
    B, N = 64, model.num_patches
    u = torch.rand(B, N, generator=torch.Generator().manual_seed(3))
    keep_idx, mask, _ = model.masking(mask_scores("random", u))
    ref_keep = torch.argsort(torch.rand(B, N, generator=torch.Generator().manual_seed(3)), dim=1)[:, : model.num_keep]
    assert torch.equal(keep_idx, ref_keep)  # MAE's random_masking
    assert (mask.sum(1) == N - int(N * (1 - 0.75))).all()
    assert torch.equal(mask.gather(1, keep_idx), torch.zeros_like(keep_idx, dtype=mask.dtype))


def test_sift_with_tau_zero_equals_random_and_counts_are_exact():
    model = tiny_mae()
    B, N = 32, model.num_patches
    u = torch.rand(B, N, generator=torch.Generator().manual_seed(0))
    counts = torch.randint(0, 5, (B, N)).float()
    m_random = model.masking(mask_scores("random", u))[1]
    m_sift0 = model.masking(mask_scores("sift", u, counts, tau=0.0))[1]
    assert torch.equal(m_random, m_sift0)
    m_sift = model.masking(mask_scores("sift", u, counts, tau=2.0))[1]
    assert (m_sift.sum(1) == N - model.num_keep).all()


def test_sift_masks_keypoint_rich_patches_more_often():
    """8 of 24 patches hold 4 keypoints. Random masking hides each patch with probability 0.75; sift with
    tau = 1, eps = 1 should hide the rich ones far more often (exact expectation > 0.95)."""
    model = tiny_mae()
    draws, N = 4000, model.num_patches
    counts = torch.zeros(draws, N)
    rich = torch.arange(0, N, 3)
    counts[:, rich] = 4.0
    u = torch.rand(draws, N, generator=torch.Generator().manual_seed(7))
    freq_random = model.masking(mask_scores("random", u))[1][:, rich].mean().item()
    freq_sift = model.masking(mask_scores("sift", u, counts, tau=1.0))[1][:, rich].mean().item()
    freq_poor = model.masking(mask_scores("sift", u, counts, tau=-1.0))[1][:, rich].mean().item()
    assert abs(freq_random - 0.75) < 0.02
    assert freq_sift > 0.93 and freq_poor < 0.55


def test_gumbel_top1_samples_proportional_to_weights():
    """The first draw of the Gumbel-top-k race is a categorical draw with p ~ (w + eps)^tau."""
    w = torch.tensor([0.0, 1.0, 3.0, 7.0])
    tau, eps, draws = 1.5, 1.0, 40000
    u = torch.rand(draws, 4, generator=torch.Generator().manual_seed(11))
    top = mask_scores("sift", u, w.expand(draws, 4), tau=tau, eps=eps).argmax(1)
    freq = torch.bincount(top, minlength=4).float() / draws
    p = (w + eps) ** tau / ((w + eps) ** tau).sum()
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert torch.isfinite(gumbel(torch.zeros(3))).all()


def test_curriculum_tau_ramps_linearly():
    total = 11
    taus = [tau_at("sift-curriculum", s, total, tau=9.0, tau_max=2.0) for s in range(total)]
    assert taus[0] == 0.0 and taus[-1] == pytest.approx(2.0)
    assert np.allclose(np.diff(taus), 0.2)
    assert tau_at("sift", 5, total, 1.3, 2.0) == 1.3
    assert tau_at("random", 5, total, 1.3, 2.0) == 0.0 and tau_at("kamim", 5, total, 1.3, 2.0) == 0.0


def test_keypoint_loss_weighting_by_hand():
    counts = torch.tensor([[2.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    w = keypoint_loss_weights(counts, lam=0.5)  # 1 + 0.5 * 4 * c, c = (0.5, 0, 0.25, 0.25)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.5, 1.5], [1.0, 1.0, 1.0, 1.0]]))
    # in the loss: masked patches weighted, normalised by the number of masked patches
    model = tiny_mae()
    x = torch.zeros(1, 3, 16, 24)
    pred = torch.zeros(1, 24, 48)
    pred[0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]  # squared errors 1, 4, 9, 16
    mask = torch.zeros(1, 24)
    mask[0, [0, 2, 3]] = 1.0
    weights = torch.ones(1, 24)
    weights[0, :4] = w[0]
    expected = (2.0 * 1 + 1.5 * 9 + 1.5 * 16) / 3
    assert model.forward_loss(x, pred, mask, weights).item() == pytest.approx(expected)


def _kamim_reference(xy, size, patch, scale, temperature):
    """Plain loops: binary image of drawn keypoints (annulus 1.5 < d < 4.4 px around the centre rounded to
    1/16 px, as OpenCV draws), patch means, exp(d/T)/min."""
    H, W = size[0] * scale, size[1] * scale
    F = np.zeros((H, W))
    for x, y in xy:
        xs, ys = (round(((v + 0.5) * scale - 0.5) * 16) / 16 for v in (x, y))
        for r in range(H):
            for c in range(W):
                if 1.5 < math.hypot(c - xs, r - ys) < 4.4:
                    F[r, c] = 1.0
    P = patch * scale
    dens = np.array([[F[i * P : (i + 1) * P, j * P : (j + 1) * P].mean() for j in range(size[1] // patch)]
                     for i in range(size[0] // patch)]).ravel()
    w = np.exp(np.clip(dens / temperature, -20, 20))
    return dens, w / w.min()


@pytest.mark.parametrize("scale", [1, 2])
def test_kamim_weighting_by_hand(scale):
    xy = [(3.0, 4.0), (10.3, 2.6), (7.7, 12.2), (15.4, 15.4)]
    dens = kamim_density(torch.tensor([xy]), torch.ones(1, 4, dtype=torch.bool), (16, 20), 4, scale)
    ref_d, ref_w = _kamim_reference(xy, (16, 20), 4, scale, 0.25)
    np.testing.assert_allclose(dens[0].numpy(), ref_d, atol=1e-6)
    np.testing.assert_allclose(kamim_weights(dens, 0.25)[0].numpy(), ref_w, rtol=1e-5)
    assert kamim_weights(dens, 0.25).min() == pytest.approx(1.0)  # the least dense patch weighs 1, as SimMIM
    # a dropped (invalid) keypoint draws nothing
    none = kamim_density(torch.tensor([xy]), torch.zeros(1, 4, dtype=torch.bool), (16, 20), 4, scale)
    assert none.sum() == 0 and torch.equal(kamim_weights(none, 0.25), torch.ones(1, 20))


@pytest.mark.parametrize("scale", [1, 3])
def test_kamim_density_at_and_beyond_the_borders(scale):
    """Circles cut by the image edge, centres outside the image (still touching it, or too far to), in a
    batch: each image's density equals the per-image reference, and images do not leak into each other."""
    pts = [[(-0.5, 7.0), (19.4, 0.0), (-3.2, -2.9), (22.0, 8.0)],  # on the edges, outside but touching
           [(-40.0, 3.0), (9.5, 60.0), (10.0, 7.5), (19.9, 15.9)]]  # far outside (draw nothing), corners
    dens = kamim_density(torch.tensor(pts), torch.ones(2, 4, dtype=torch.bool), (16, 20), 4, scale)
    for b in range(2):
        ref_d, _ = _kamim_reference(pts[b], (16, 20), 4, scale, 0.25)
        np.testing.assert_allclose(dens[b].numpy(), ref_d, atol=1e-6)
    assert dens[0].sum() > 0 and dens[1].sum() > 0


def test_kamim_density_matches_opencv_draw_keypoints():
    """KAMIM draws keypoints with cv2.drawKeypoints; the vectorised annulus reproduces its patch densities."""
    rng = np.random.default_rng(1)
    xy = rng.uniform(-0.5, 31.5, (20, 30, 2)).astype(np.float32)
    ours = kamim_density(torch.from_numpy(xy), torch.ones(20, 30, dtype=torch.bool), (32, 32), 4, 4).numpy()
    ref = []
    for pts in xy:
        kps = [cv2.KeyPoint(float((x + 0.5) * 4 - 0.5), float((y + 0.5) * 4 - 0.5), 3.0) for x, y in pts]
        drawn = cv2.drawKeypoints(np.zeros((128, 128, 3), np.uint8), kps, None, color=(255, 0, 0))[:, :, 0] > 0
        ref.append(drawn.reshape(8, 16, 8, 16).mean((1, 3)).ravel())
    ref = np.array(ref)
    assert np.abs(ours - ref).mean() < 0.01 and np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99


# -- keypoints follow the augmentation ----------------------------------------------------------------
def test_draw_augment_draws_crops_then_flips_and_augment_applies_them():
    """The order of the draws is part of every run's random stream (resume, DDP, policies that see the same
    crops): dy and dx (only when pad > 0), then the flips; ``augment`` is ``apply_augment(draw_augment(...))``."""
    x = torch.randn(5, 3, 8, 12)
    for pad in (0, 2):
        g, ref, g_aug = (torch.Generator().manual_seed(4) for _ in range(3))
        aug = draw_augment(5, pad, g)
        if pad:
            assert torch.equal(aug.dy, torch.randint(0, 2 * pad + 1, (5,), generator=ref))
            assert torch.equal(aug.dx, torch.randint(0, 2 * pad + 1, (5,), generator=ref))
        else:
            assert aug.dy is None and aug.dx is None
        assert torch.equal(aug.flip, torch.rand(5, generator=ref) < 0.5)
        assert torch.equal(g.get_state(), ref.get_state())
        assert torch.equal(augment(x, pad, g_aug), apply_augment(x, aug, pad))
        assert torch.equal(g_aug.get_state(), ref.get_state())


def test_keypoint_map_follows_crop_and_flip_by_hand():
    """W = H = 16, P = 4, pad = 2, crop offsets dy = 3, dx = 0, flip: x' = 15 - (x + 2), y' = y - 1."""
    kp = Keypoints(np.array([[1.2, 5.0], [6.4, 1.3], [13.9, 9.6], [4.0, 0.2], [3.0, 15.2]], np.float32),
                   *(np.ones(5, np.float32) for _ in range(3)))
    aug = AugParams(torch.tensor([3]), torch.tensor([0]), torch.tensor([True]))
    xy, valid = transform_keypoints(torch.from_numpy(kp.xy)[None], torch.ones(1, 5, dtype=torch.bool), aug, 2,
                                    (16, 16))
    # (1.2, 5.0) -> (11.8, 4.0): row 1 col 3; (6.4, 1.3) -> (6.6, 0.3): row 0 col 1;
    # (13.9, 9.6) -> (-0.9, 8.6): left the image; (4.0, 0.2) -> (9.0, -0.8): left the image;
    # (3.0, 15.2) -> (10.0, 14.2): row 3 col 2
    torch.testing.assert_close(xy[0, [0, 1, 4]], torch.tensor([[11.8, 4.0], [6.6, 0.3], [10.0, 14.2]]))
    assert valid.tolist() == [[True, True, False, False, True]]
    expected = np.zeros((4, 4))
    expected[1, 3] = expected[0, 1] = expected[3, 2] = 1
    counts = patch_counts(xy, valid, 4, (4, 4))[0].numpy().reshape(4, 4)
    np.testing.assert_array_equal(counts, expected)
    moved = Keypoints(xy[0][valid[0]].numpy(), *(np.ones(3, np.float32) for _ in range(3)))
    np.testing.assert_array_equal(counts.ravel(), weight_map(moved, 4, (4, 4)))  # same as the library's map
    # the pixels move the same way: a single bright pixel at (x=1, y=5) lands on (x=12, y=4)
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 5, 1] = 1.0
    assert apply_augment(img, aug, 2)[0, 0].nonzero().tolist() == [[4, 12]]


def _blob_image(centres, size=32, sigma=1.2, amp=220.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    img = np.zeros((size, size))
    for cx, cy in centres:
        img += amp * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(img, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("flip", [False, True])
def test_moved_keypoints_agree_with_sift_on_the_augmented_image(flip):
    """Four bright blobs; crop (pad 4, dy = 6, dx = 1) and optionally flip.

    The map from the moved cached keypoints equals the map of SIFT run on the augmented image itself.
    Where the two may differ, and why (not exercised here, the blobs sit away from the borders):
    near the image border the crop replaces content by zero padding, which SIFT's Gaussian support
    sees (new edges, lost structure), and a keypoint moved out of the image is dropped. Positions agree
    to 0.2 px rather than exactly under a flip, because OpenCV reports coarser octaves on their
    subsampled grid, half a pixel of that octave off the mirrored one.
    """
    centres = [(7.5, 10.5), (19.5, 10.5), (7.5, 22.5), (19.5, 22.5)]
    img = _blob_image(centres)
    params = SiftParams(upsample=4.0)
    bank = KeypointBank.detect(img[None], params)
    aug = AugParams(torch.tensor([6]), torch.tensor([1]), torch.tensor([flip]))
    xy, valid = transform_keypoints(*bank.batch(torch.tensor([0])), aug, 4, (32, 32))
    ours = patch_counts(xy, valid, 4, (8, 8))[0].numpy()
    # by hand: each blob centre moves by (+3, -2), then x -> 31 - x when flipped; its patch holds keypoints
    for cx, cy in centres:
        mx, my = (28 - cx if flip else cx + 3), cy - 2
        assert ours[int((my + 0.5) // 4) * 8 + int((mx + 0.5) // 4)] > 0
    aug_img = apply_augment(torch.from_numpy(img).permute(2, 0, 1)[None].float(), aug, 4)
    direct = detect(aug_img[0].permute(1, 2, 0).round().byte().numpy(), params)
    np.testing.assert_array_equal(ours, weight_map(direct, 4, (8, 8)))
    moved = xy[0][valid[0]].numpy()
    dist = np.abs(moved[:, None] - direct.xy[None]).max(-1)
    assert dist.min(1).max() < (0.2 if flip else 1e-3) and dist.min(0).max() < (0.2 if flip else 1e-3)


# -- evaluation --------------------------------------------------------------------------------------
def test_knn_and_linear_probe_on_toy_features():
    """Three well separated clusters on the sphere: k-NN and the probe are perfect; one query sitting
    between classes 0 and 1 but nearer to 1 goes to class 1."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    train_y = torch.arange(3).repeat_interleave(30)
    train_f = centres[train_y] + 0.3 * torch.randn(90, 3, generator=g)
    test_y = torch.arange(3).repeat_interleave(10)
    test_f = centres[test_y] + 0.3 * torch.randn(30, 3, generator=g)
    assert knn_accuracy(train_f, train_y, test_f, test_y, 3) == 1.0
    assert knn_accuracy(train_f, train_y, torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([1]), 3) == 1.0
    # with k = 20 over 90 points the 20 neighbours of a clean class-2 query are all class 2
    assert knn_accuracy(train_f, train_y, centres[2:], torch.tensor([2]), 3, k=20) == 1.0
    probe = linear_probe(train_f, train_y, test_f, test_y, 3)
    assert probe["train_acc"] == 1.0 and probe["test_acc"] == 1.0


# -- training ----------------------------------------------------------------------------------------
def make_folder(root, n=16, size=16):
    """Two classes: a bright square in the top or the bottom half (corners give SIFT keypoints)."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("bottom", "top")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            y0 = rng.integers(0, size // 2 - 5) + (1 - c) * size // 2
            x0 = rng.integers(0, size - 7)
            img[y0 : y0 + 5, x0 : x0 + 7] = 250
            Image.fromarray(img).save(root / cls / f"{i:03d}.png")


def pcfg(tmp_path, **kw) -> PretrainConfig:
    """A small PretrainConfig from flat option names (``policy="sift"``, ``dim=32`` ...)."""
    base = dict(val=str(tmp_path / "data"), img_size=16, patch_size=4, dim=32, depth=2, heads=2, decoder_dim=32,
                decoder_depth=1, decoder_heads=2, epochs=3, batch_size=8, lr=2e-3, warmup_epochs=0.5, pad=2,
                seed=5, keypoint_cache=str(tmp_path / "kp.npz"), upsample=4.0)
    base.update(kw)
    return build(PretrainConfig, base)


def prun(tmp_path, out, model=None, **kw) -> PretrainResult:
    """Pre-train on tmp_path/data into tmp_path/out; returns the result."""
    return pretrain(model, str(tmp_path / "data"), pcfg(tmp_path, **kw), progress=False, out=tmp_path / out)


def test_resume_continues_exactly(tmp_path):
    make_folder(tmp_path / "data")
    kw = dict(policy="sift-curriculum", tau_max=2.0, lam=0.5, norm_pix=True)
    full = prun(tmp_path, "full", **kw).record
    part = prun(tmp_path, "part", stop_after=1, **kw).record
    assert len(part["epochs"]) == 1 and not (tmp_path / "part" / "encoder").exists()
    with pytest.raises(ConfigError, match="--resume"):
        prun(tmp_path, "part", **kw)
    resumed = prun(tmp_path, "part", resume=True, **kw).record
    for key in ("train_loss", "val_loss", "knn_acc", "tau", "probe"):
        assert [e[key] for e in resumed["epochs"]] == [e[key] for e in full["epochs"]]
    a = load_mae(tmp_path / "full" / "mae").state_dict()
    b = load_mae(tmp_path / "part" / "mae").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    enc = load_vit(tmp_path / "full" / "encoder")
    assert enc.cfg.pool == "mean" and enc.cfg.class_names == ["bottom", "top"]
    last = full["epochs"][-1]
    # the curriculum ends at tau_max; val is the training folder, so a probe really fitted on the final
    # encoder's features (32 images, 32 dims: separable) scores every image
    assert last["tau"] == pytest.approx(2.0) and last["probe"] == {"train_acc": 1.0, "test_acc": 1.0}
    assert (tmp_path / "full" / "curves.png").stat().st_size > 0 and (tmp_path / "full" / "history.json").exists()


@pytest.mark.parametrize("policy", ["random", "kamim"])
def test_other_policies_train(tmp_path, policy):
    make_folder(tmp_path / "data", n=8)
    hist = prun(tmp_path, policy, policy=policy, epochs=1, loss="l1", probe=False).record
    assert math.isfinite(hist["epochs"][0]["train_loss"])
    assert (tmp_path / "kp.npz").exists() == (policy == "kamim")  # random masking never needs SIFT


def test_pretrain_continues_from_a_saved_mae_or_vit(tmp_path):
    """pretrain(model, ...) starts from model's weights (at learning rate 0 they stay as saved); a ViT becomes
    the encoder of a new decoder. Without out, nothing is written; .save(out) writes encoder/ and mae/."""
    make_folder(tmp_path / "data", n=8)
    prun(tmp_path, "base", epochs=1, probe=False)
    saved = load_mae(tmp_path / "base" / "mae")
    frozen = dict(epochs=1, lr=0.0, min_lr=0.0, probe=False)
    res = pretrain(tmp_path / "base" / "mae", str(tmp_path / "data"), pcfg(tmp_path, dim=64, heads=4, **frozen),
                   progress=False)
    assert res.encoder.cfg.dim == 32 and res.history["train_loss"].notna().all()
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k].cpu(), v, rtol=0, atol=0)
    enc = load_vit(tmp_path / "base" / "encoder")
    from_vit = pretrain(enc, str(tmp_path / "data"), pcfg(tmp_path, **frozen), progress=False)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(from_vit.encoder.state_dict()[k].cpu(), v, rtol=0, atol=0)
    assert not (tmp_path / "out").exists()
    from_vit.save(tmp_path / "out")
    assert (tmp_path / "out" / "encoder").is_dir() and (tmp_path / "out" / "mae").is_dir()


def test_config_errors_are_siftlens_errors(tmp_path):
    make_folder(tmp_path / "data", n=4)
    with pytest.raises(ConfigError, match="--policy"):
        prun(tmp_path, "o", policy="sift-random")
    with pytest.raises(ConfigError, match="--lam"):
        prun(tmp_path, "o", policy="kamim", lam=1.0)
    # a keypoint cache is only ever used for the images and SIFT parameters it was made from
    imgs = np.zeros((2, 16, 16, 3), np.uint8)
    imgs[:, 4:9, 5:11] = 250
    KeypointBank.detect(imgs, SiftParams(upsample=4.0)).save(tmp_path / "c.npz")
    assert KeypointBank.load(tmp_path / "c.npz", SiftParams(upsample=4.0), imgs).count.sum() > 0
    with pytest.raises(ConfigError, match="keypoint cache"):
        KeypointBank.load(tmp_path / "c.npz", SiftParams(upsample=4.0), imgs[:, ::-1])
    with pytest.raises(ConfigError, match="keypoint cache"):
        KeypointBank.load(tmp_path / "c.npz", SiftParams(upsample=2.0), imgs)
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "pretrain", "--train", str(tmp_path / "data"), "--out",
                        str(tmp_path / "o"), "--policy", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def test_torchrun_two_processes_hold_identical_weights(tmp_path):
    """DDP with gloo, 2 ranks each on half of every batch: both ranks end with identical weights, and
    those equal a single process on the whole batches."""
    make_folder(tmp_path / "data", n=8)
    common = ["--train", str(tmp_path / "data"), "--img-size", "16", "--patch-size", "4", "--dim", "32", "--depth",
              "1", "--heads", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--epochs", "2", "--batch-size",
              "8", "--warmup-epochs", "0.5", "--pad", "2", "--policy", "sift", "--tau", "1.0", "--lam", "0.5",
              "--upsample", "4", "--no-progress", "--threads", "1"]
    env = {**os.environ, "SIFTLENS_RANK_WEIGHTS": "1", "OMP_NUM_THREADS": "1"}
    r = torchrun(["pretrain", "--out", str(tmp_path / "ddp"), *common], tmp_path / "logs", env)
    assert r.returncode == 0, r.stderr
    r1 = subprocess.run([sys.executable, "-m", "siftlens.cli", "pretrain", "--out", str(tmp_path / "one"), *common],
                        capture_output=True, text=True, timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr[-2000:]
    from safetensors.torch import load_file

    w0, w1, one = (load_file(str(tmp_path / d / f"rank{r}.safetensors")) for d, r in (("ddp", 0), ("ddp", 1),
                                                                                       ("one", 0)))
    assert w0.keys() == w1.keys() == one.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
        torch.testing.assert_close(w0[k], one[k], rtol=1e-4, atol=1e-5)
