"""Masking policies and loss weights for masked-image-modelling pre-training (docs/method.md, "Guided training").

Every policy turns one batch of uniform noise ``u: (B, N)`` in [0, 1) into a per-patch *score*; the MAE
masks the ``M`` patches with the highest scores (:meth:`siftlens.models.mae.MAE.masking`).

- ``random``: score = u, MAE's ``random_masking``.
- ``sift``: score = tau * log(w_p + eps) + g, g = -log(-log u) Gumbel noise. Taking the top M of
  log-weight + Gumbel draws M patches *without replacement* with probability proportional to
  ``(w_p + eps) ** tau`` at every draw (Gumbel-top-k trick; Kool et al. 2019, the "exponential race"),
  in one vectorised argsort. tau > 0 hides keypoint-rich patches, tau < 0 keypoint-poor ones, and
  tau = 0 gives *the same* mask as ``random`` (g is an increasing function of u).
- ``sift-curriculum``: ``sift`` with tau ramped linearly from 0 (first step) to tau_max (last step).
- ``kamim``: random masks, loss weighted by keypoint density (:func:`kamim_weights`).
- ``attmask``: the model's own attention as the guide, not SIFT (AttMask, Kakogeorgiou et al. 2022, "hide
  the most attended"): the current encoder's last-layer CLS attention over the patches of the augmented
  image (mean over heads; a no-grad forward on all tokens, where AttMask uses its EMA teacher), scaled to
  mean 1 (``w_p = N a_p / sum_q a_q``), replaces the keypoint counts in the ``sift`` sampler. tau > 0 hides
  the most attended patches; large tau approaches AttMask-High's deterministic top-attended mask.

``w_p`` is the keypoint count of patch ``p`` in the augmented image (``count`` scheme).

Loss weights (:func:`keypoint_loss_weights`): a masked patch counts ``1 + lambda * N * c_p`` with
``c_p = w_p / sum_q w_q``; the weights average ``1 + lambda`` over an image with keypoints and are all 1
on an image without.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .guidance import guided_scores

POLICIES = ("random", "sift", "sift-curriculum", "kamim", "attmask")
GUIDED = ("sift", "sift-curriculum", "attmask")  # policies that sample masks with (w + eps) ** tau

# Pixels touched by OpenCV's ``drawKeypoints`` (an anti-aliased circle of radius 3 px, 1 px thick) are,
# within about 10 % of the pixels (all on the ring's inner and outer edge), the annulus 1.5 < d < 4.4.
KAMIM_RING = (1.5, 4.4)


def check_policy(policy: str, eps: float, lam: float) -> None:
    """Raise ConfigError for an unknown policy or inconsistent parameters."""
    if policy not in POLICIES:
        raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if eps <= 0 and policy in GUIDED:
        raise ConfigError(f"--eps must be > 0 (patches without keypoints need a weight), got {eps}")
    if lam < 0:
        raise ConfigError(f"--lam must be >= 0, got {lam}")
    if policy == "kamim" and lam > 0:
        raise ConfigError("--lam does not combine with --policy kamim, which has its own loss weighting")


def needs_keypoints(policy: str, lam: float) -> bool:
    return policy not in ("random", "attmask") or lam > 0


def tau_at(policy: str, step: int, total_steps: int, tau: float, tau_max: float) -> float:
    """The temperature of step ``step`` (0-based) of ``total_steps``: tau, or the curriculum's ramp."""
    if policy == "sift-curriculum":
        return tau_max * step / max(total_steps - 1, 1)
    return tau if policy in ("sift", "attmask") else 0.0


def mask_scores(policy: str, u: torch.Tensor, weights: torch.Tensor | None = None, tau: float = 0.0,
                eps: float = 1.0) -> torch.Tensor:
    """u: (B, N) uniform noise; weights: (B, N) keypoint counts (sift policies) or attention shares
    (attmask) -> scores (B, N); the MAE hides the highest."""
    if policy in ("random", "kamim"):
        return u
    if weights is None:
        raise ConfigError(f"policy {policy!r} needs per-patch weights")
    return guided_scores(u, weights, tau, eps)


def attention_weights(encoder, x: torch.Tensor) -> torch.Tensor:
    """``attmask``'s patch weights: the encoder's last-layer CLS attention (mean over heads) of each
    augmented image x (B, C, H, W), scaled to mean 1 over its patches: (B, N)."""
    a = encoder.last_cls_attention(x)
    return a * (a.shape[1] / a.sum(dim=1, keepdim=True).clamp_min(1e-12))


def keypoint_loss_weights(counts: torch.Tensor, lam: float) -> torch.Tensor:
    """counts: (B, N) -> loss weights 1 + lambda * N * c_p, (B, N); c = counts / counts.sum (0 if none)."""
    total = counts.sum(dim=1, keepdim=True)
    c = counts / total.clamp_min(1e-12)
    return 1.0 + lam * counts.shape[1] * c


def _ring_stamps(ring: tuple[float, float], q: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets of the annulus ``ring`` for every centre offset (fx, fy) / q in [0, 1)^2 from a pixel.

    Returns ``offsets (q * q, L, 2)`` long (dx, dy) and ``ok (q * q, L)`` bool (padding is not ok);
    stamp ``fy * q + fx``. OpenCV draws with 4 fractional bits, i.e. centres on a 1/16-pixel grid."""
    r = int(ring[1]) + 2
    o = torch.arange(-r, r + 1, dtype=torch.float64)
    dy, dx = torch.meshgrid(o, o, indexing="ij")
    stamps = []
    for fy in range(q):
        for fx in range(q):
            d = torch.hypot(dx - fx / q, dy - fy / q)
            on = (d > ring[0]) & (d < ring[1])
            stamps.append(torch.stack([dx[on], dy[on]], dim=-1).long())
    L = max(len(st) for st in stamps)
    offsets = torch.zeros(q * q, L, 2, dtype=torch.long)
    ok = torch.zeros(q * q, L, dtype=torch.bool)
    for i, st in enumerate(stamps):
        offsets[i, : len(st)] = st
        ok[i, : len(st)] = True
    return offsets, ok


# ring -> (offsets, ok) of _ring_stamps; (ring, canvas width, device) -> (linear offsets, ok) on that canvas
_STAMPS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def kamim_density(xy: torch.Tensor, valid: torch.Tensor, size: tuple[int, int], patch: int, scale: int = 1,
                  ring: tuple[float, float] = KAMIM_RING) -> torch.Tensor:
    """KAMIM's keypoint density of every patch: (B, K, 2), (B, K) -> (B, g_h * g_w) in [0, 1].

    As KAMIM (Krishna & Subramanyam 2024, ``per_patch_importance``) does on the image its detector saw:
    draw every keypoint as OpenCV's ``drawKeypoints`` does into a binary image F, then average F over
    each patch (their ``w_ps`` = our model patch size). SIFT here sees the image upsampled ``scale``
    times (``SiftParams.upsample``), so F has ``scale * H x scale * W`` pixels and the circles their
    OpenCV radius of 3 pixels of that image. A circle is the annulus ``ring`` (see ``KAMIM_RING``)
    around the centre rounded to 1/16 pixel, stamped from a precomputed table (vectorised).
    xy are model-input pixels (pixel centres at integers).

    Implementation: F lives on a canvas padded by twice the stamp radius on every side, so every stamp
    pixel has an address without bounds checks; a stamp's padding entries and keypoints too far outside
    the image to touch it write to one spare cell past the end. Pixels drawn off the image land in the
    padding, which is cropped before the patch sums.
    """
    if ring not in _STAMPS:
        _STAMPS[ring] = _ring_stamps(ring)
    offsets, ok = _STAMPS[ring]
    r = int(offsets.abs().max())  # a stamp reaches at most r pixels from its centre
    H, W = size[0] * scale, size[1] * scale
    pad = 2 * r  # centres up to r outside the image can still touch it; their stamps stay on the canvas
    Hp, Wp = H + 2 * pad, W + 2 * pad
    B = valid.shape[0]
    key = (ring, Wp, str(xy.device))
    if key not in _STAMPS:  # linear offsets on this canvas
        _STAMPS[key] = ((offsets[..., 1] * Wp + offsets[..., 0]).to(xy.device), ok.to(xy.device))
    lin_off, lin_ok = _STAMPS[key]
    b, k = valid.nonzero(as_tuple=True)  # only the V valid keypoints are drawn
    c16 = torch.round(((xy[b, k] + 0.5) * scale - 0.5) * 16).long()  # (V, 2) centres in 1/16 pixel
    base, frac = torch.div(c16, 16, rounding_mode="floor"), c16 % 16
    inside = (base[:, 0] >= -r) & (base[:, 0] < W + r) & (base[:, 1] >= -r) & (base[:, 1] < H + r)
    spare = B * Hp * Wp
    centre = torch.where(inside, b * (Hp * Wp) + (base[:, 1] + pad) * Wp + base[:, 0] + pad, spare)  # (V,)
    fi = frac[:, 1] * 16 + frac[:, 0]
    addr = torch.where(lin_ok[fi] & inside[:, None], centre[:, None] + lin_off[fi], spare)  # (V, L)
    canvas = torch.zeros(spare + 1, dtype=torch.uint8, device=xy.device)
    canvas[addr.flatten()] = 1
    img = canvas[:spare].view(B, Hp, Wp)[:, pad : pad + H, pad : pad + W]
    P = patch * scale
    rows = img.reshape(B * (H // P), P, W).sum(dim=1, dtype=torch.int16)  # (B * g_h, W)
    covered = rows.view(B, H // P, W // P, P).sum(dim=3, dtype=torch.int32)
    return covered.flatten(1).float() / (P * P)


def kamim_weights(density: torch.Tensor, temperature: float) -> torch.Tensor:
    """KAMIM's patch weights: exp(clip(density / T, -20, 20)), divided by each image's minimum (so the
    least dense patch weighs 1, as in SimMIM). density: (B, N) -> (B, N)."""
    if temperature <= 0:
        raise ConfigError(f"--kamim-temp must be > 0, got {temperature}")
    w = torch.exp(torch.clamp(density / temperature, -20.0, 20.0))
    return w / w.min(dim=1, keepdim=True).values
