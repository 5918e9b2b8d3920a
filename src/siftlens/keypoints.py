"""SIFT keypoints on the model's own pixels, and their semantic weight map on the patch grid.

Detection runs on the greyscale version of the image *after* the model's resize/crop and *before*
normalisation. Small inputs may be upsampled by a factor ``u`` before detection; positions and sizes
are divided by ``u`` afterwards so they are in model-input pixels.

Weight schemes for patch ``p`` (grid ``g_h x g_w``, patch size ``P``, ``N = g_h * g_w``):

- ``count``: number of keypoints whose centre falls in ``p`` (default);
- ``response``: sum of the SIFT responses of those keypoints;
- ``footprint``: each keypoint spreads unit mass as an isotropic Gaussian with sigma = size / 2,
  truncated to the square ``[x - 3 sigma, x + 3 sigma] x [y - 3 sigma, y + 3 sigma]`` and renormalised
  to mass 1 on that square (each 1-D factor divided by ``Phi(3) - Phi(-3)``, about 0.9973); ``w_p`` is
  the mass of the square inside ``p`` (separable: a product of two 1-D truncated-CDF differences). The
  part of the square outside the image is dropped, so a keypoint near the border gives less than 1 in
  all. A patch that no keypoint's square overlaps (touching an edge is not overlapping) gets exactly 0,
  so level 0 ("none") keeps its meaning under this scheme; without the truncation every patch would get
  some positive Gaussian tail.

Levels: level 0 holds patches with zero weight; levels 1..L-1 are per-image quantile bins of the
non-zero weights (``levels="quantile"``), or bins by fixed global thresholds.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from .errors import ConfigError, GeometryError
from .options import option

SCHEMES = ("count", "response", "footprint")
EXTENTS = ("center", "footprint")  # which patches a keypoint marks: its centre's, or every one its square touches


@dataclass(frozen=True)
class SiftParams:
    """Parameters passed to ``cv2.SIFT_create`` plus the upsampling factor ``u``."""

    upsample: float = 1.0
    n_features: int = 0
    n_octave_layers: int = 3
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6

    def __post_init__(self):
        if self.upsample <= 0:
            raise ConfigError(f"upsampling factor u must be > 0, got {self.upsample}")


@dataclass
class Keypoints:
    """Keypoints of one image, in model-input pixel coordinates.

    xy: (K, 2) float32 (x, y); size, response, angle: (K,) float32; desc: (K, 128) float32 or None.
    """

    xy: np.ndarray
    size: np.ndarray
    response: np.ndarray
    angle: np.ndarray
    desc: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)

    @staticmethod
    def empty(with_desc: bool = False) -> Keypoints:
        z = np.zeros(0, np.float32)
        return Keypoints(np.zeros((0, 2), np.float32), z, z.copy(), z.copy(),
                         np.zeros((0, 128), np.float32) if with_desc else None)


_SIFT_CACHE: dict[SiftParams, cv2.SIFT] = {}


def _sift(params: SiftParams):
    s = _SIFT_CACHE.get(params)
    if s is None:
        s = cv2.SIFT_create(
            nfeatures=params.n_features, nOctaveLayers=params.n_octave_layers,
            contrastThreshold=params.contrast_threshold, edgeThreshold=params.edge_threshold,
            sigma=params.sigma,
        )
        _SIFT_CACHE[params] = s
    return s


def to_gray(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 RGB -> (H, W) uint8 greyscale (OpenCV's BT.601 weights)."""
    if img.ndim == 2:
        return np.ascontiguousarray(img, dtype=np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(img, dtype=np.uint8), cv2.COLOR_RGB2GRAY)


def detect(img: np.ndarray, params: SiftParams = SiftParams(), descriptors: bool = False) -> Keypoints:
    """Detect SIFT keypoints on an RGB or grey uint8 image (H, W[, 3]) exactly as the model sees it."""
    gray = to_gray(img)
    u = params.upsample
    if u != 1.0:
        h, w = gray.shape
        gray = cv2.resize(gray, (max(1, round(w * u)), max(1, round(h * u))), interpolation=cv2.INTER_CUBIC)
    sift = _sift(params)
    if descriptors:
        kps, desc = sift.detectAndCompute(gray, None)
    else:
        kps, desc = sift.detect(gray, None), None
    if not kps:
        return Keypoints.empty(descriptors)
    # cv2 pixel centres sit at integer coordinates; map upsampled coords back: x = (x_u + 0.5)/u - 0.5
    xy = cv2.KeyPoint_convert(kps)  # (K, 2) float32, read in C; then (x_u + 0.5) / u - 0.5 in place
    xy += 0.5
    xy /= u
    xy -= 0.5
    size, resp, ang = np.array([(k.size, k.response, k.angle) for k in kps], np.float32).T.copy()
    size /= u
    if descriptors:
        desc = np.zeros((0, 128), np.float32) if desc is None else desc.astype(np.float32)
    return Keypoints(xy, size, resp, ang, desc)


def descriptor_bytes(desc: np.ndarray) -> np.ndarray:
    """(K, 128) float SIFT descriptors -> uint8, rounded and clipped: how every job stores and compares them."""
    return np.clip(np.rint(desc), 0, 255).astype(np.uint8)


def patch_index(xy: np.ndarray, patch: int, grid: tuple[int, int]) -> np.ndarray:
    """(K, 2) pixel (x, y) -> (K,) flat patch index in row-major order; centres clipped to the grid."""
    gh, gw = grid
    cr = np.floor((xy + 0.5) / patch).astype(np.int64)  # (K, 2) column, row
    np.maximum(cr, 0, out=cr)  # clip to the grid (the ufuncs: np.clip's Python wrapper costs more here)
    np.minimum(cr, (gw - 1, gh - 1), out=cr)
    return cr[:, 1] * gw + cr[:, 0]


def footprint_patches(xy: np.ndarray, size: np.ndarray, P: int, grid: tuple[int, int]) -> np.ndarray:
    """(N,) bool: patches that overlap the square [x - s/2, x + s/2] x [y - s/2, y + s/2] of any keypoint
    (pixel x covers [x - 0.5, x + 0.5); touching a patch's edge does not count)."""
    gh, gw = grid
    m = np.zeros((gh, gw), bool)
    r = size / 2.0
    c0 = np.clip(np.floor((xy[:, 0] - r + 0.5) / P), 0, gw - 1).astype(int)
    c1 = np.clip(np.ceil((xy[:, 0] + r + 0.5) / P) - 1, 0, gw - 1).astype(int)  # half-open on the far side
    r0 = np.clip(np.floor((xy[:, 1] - r + 0.5) / P), 0, gh - 1).astype(int)
    r1 = np.clip(np.ceil((xy[:, 1] + r + 0.5) / P) - 1, 0, gh - 1).astype(int)
    for a, b, c, d in zip(r0, r1, c0, c1, strict=True):
        m[a : b + 1, c : d + 1] = True
    return m.reshape(-1)


def keypoint_patches(xy: np.ndarray, size: np.ndarray, P: int, grid: tuple[int, int], extent: str) -> np.ndarray:
    """(N,) bool: the patches of keypoints ``xy (k, 2)``, ``size (k,)`` by ``extent`` (``center`` or
    ``footprint``)."""
    if extent == "footprint":
        return footprint_patches(xy, size, P, grid)
    if extent != "center":
        raise ConfigError(f"extent must be one of {', '.join(EXTENTS)}, not {extent!r}")
    out = np.zeros(grid[0] * grid[1], bool)
    out[patch_index(xy, P, grid)] = True
    return out


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, elementwise (float64)."""
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, np.float64))).numpy()


_TRUNC = 3.0  # footprint Gaussians are cut at +-3 sigma in x and in y


def weight_map(kp: Keypoints, patch: int, grid: tuple[int, int], scheme: str = "count") -> np.ndarray:
    """Semantic weight of every patch: (g_h * g_w,) float64, row-major.

    Pixel (x, y) covers [x - 0.5, x + 0.5); patch column c covers pixels [c*P - 0.5, (c+1)*P - 0.5).

    ``footprint``: keypoint k (sigma_k = size_k / 2, floored at 1e-3) gives patch (row r, column c) the
    mass ``m_x(c) * m_y(r)`` with ``m_x(c) = (Phi(t(e_{c+1})) - Phi(t(e_c))) / (Phi(3) - Phi(-3))``,
    ``t(e) = clip((e - x_k) / sigma_k, -3, 3)`` and ``e_c`` the column edges (``m_y`` likewise). That is
    the Gaussian truncated to the square ``x_k +- 3 sigma_k, y_k +- 3 sigma_k`` and renormalised so its
    mass on the square is 1; mass of the square outside the image is dropped (not moved to the border
    patches). Patches the square does not overlap get exactly 0.0.
    """
    gh, gw = grid
    n = gh * gw
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown weight scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if len(kp) == 0:
        return np.zeros(n, np.float64)
    if scheme == "count":
        return np.bincount(patch_index(kp.xy, patch, grid), minlength=n).astype(np.float64)
    if scheme == "response":
        return np.bincount(patch_index(kp.xy, patch, grid), weights=kp.response.astype(np.float64),
                           minlength=n)
    # footprint: truncated Gaussian mass per patch, separable in x and y; mass outside the image is dropped.
    # Clipping the standardised edges to [-3, 3] makes every edge beyond the support the same number, so
    # the CDF difference of a patch outside the support is exactly 0 (not a tiny tail).
    sigma = np.maximum(kp.size.astype(np.float64) / 2.0, 1e-3)[:, None]  # (K, 1)
    ex = np.arange(gw + 1) * patch - 0.5  # column edges in pixel coordinates
    ey = np.arange(gh + 1) * patch - 0.5
    zx = np.clip((ex[None] - kp.xy[:, :1].astype(np.float64)) / sigma, -_TRUNC, _TRUNC)  # (K, gw + 1)
    zy = np.clip((ey[None] - kp.xy[:, 1:].astype(np.float64)) / sigma, -_TRUNC, _TRUNC)  # (K, gh + 1)
    lo, hi = _norm_cdf(np.array([-_TRUNC, _TRUNC]))
    mx = np.diff(_norm_cdf(zx), axis=1) / (hi - lo)  # (K, gw): per-axis mass, 1 in all on the support
    my = np.diff(_norm_cdf(zy), axis=1) / (hi - lo)  # (K, gh)
    return np.einsum("kr,kc->rc", my, mx).reshape(n)


def levels_of(weights: np.ndarray, n_levels: int = 3, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Semantic level of each patch: (N,) int64 in [0, L).

    Level 0: weight 0. Levels 1..L-1: quantile bins of this image's non-zero weights (ties go to the
    lower bin), or, with ``thresholds`` (L-2 increasing values), bins ``w <= t_1``, ``t_1 < w <= t_2``...
    """
    if n_levels < 2:
        raise ConfigError(f"need at least 2 levels (none / some), got {n_levels}")
    w = np.asarray(weights, np.float64)
    lv = np.zeros(w.shape, np.int64)
    nz = w > 0
    if not nz.any():
        return lv
    if thresholds is not None:
        t = np.asarray(thresholds, np.float64)
        if len(t) != n_levels - 2:
            raise ConfigError(f"{n_levels} levels need {n_levels - 2} thresholds, got {len(t)}")
        lv[nz] = 1 + np.searchsorted(t, w[nz], side="left")
        return lv
    wnz = w[nz]
    q = _quantile_linear(wnz, _level_quantiles(n_levels))
    lv[nz] = 1 + np.searchsorted(q, wnz, side="left")
    return lv


@functools.lru_cache(maxsize=16)
def _level_quantiles(n_levels: int) -> tuple[float, ...]:
    """The interior quantiles of L levels, ``np.linspace(0, 1, L)[1:-1]`` (computed once per L)."""
    return tuple(float(q) for q in np.linspace(0, 1, n_levels)[1:-1])


def _quantile_linear(x: np.ndarray, q) -> np.ndarray:
    """``np.quantile(x, q)`` (method "linear") of a 1-D float64 array without NaN, bit for bit the same
    numbers (numpy's index and interpolation formulas), without its per-call overhead."""
    s = np.sort(x).tolist()
    n = len(s)
    out = np.empty(len(q))
    for k, qk in enumerate(q):  # L - 2 values: scalar float64 arithmetic, the same IEEE operations
        v = (n - 1) * qk  # virtual index
        if v >= n - 1:  # numpy takes the last value there
            a = b = s[-1]
            t = v + 1.0
        else:
            i = math.floor(v)
            a, b, t = s[i], s[i + 1], v - i
        d = b - a
        out[k] = b - d * (1 - t) if t >= 0.5 else a + d * t
    return out


@dataclass
class KeypointMap:
    """Keypoints of one image laid on the model's patch grid.

    weights: (N,) float64 semantic weight; levels: (N,) int64; keypoints kept for overlays/discovery.
    """

    weights: np.ndarray
    levels: np.ndarray
    grid: tuple[int, int]
    patch: int
    keypoints: Keypoints = field(repr=False)

    @property
    def has_keypoints(self) -> bool:
        return bool(self.weights.sum() > 0)

    @property
    def concentration(self) -> np.ndarray:
        """c_p = w_p / sum_q w_q; all zeros for an image with no keypoints (never NaN)."""
        s = self.weights.sum()
        return self.weights / s if s > 0 else np.zeros_like(self.weights)


def keypoint_map(
    img: np.ndarray,
    patch: int,
    grid: tuple[int, int] | None = None,
    scheme: str = "count",
    n_levels: int = 3,
    params: SiftParams = SiftParams(),
    thresholds: np.ndarray | None = None,
    descriptors: bool = False,
) -> KeypointMap:
    """Detect keypoints on ``img`` (H, W, 3) uint8 (the model's pixels) and build its KeypointMap."""
    h, w = img.shape[:2]
    if grid is None:
        if h % patch or w % patch:
            raise GeometryError(f"patch size {patch} does not divide the image size {h}x{w}")
        grid = (h // patch, w // patch)
    if grid[0] * patch > h or grid[1] * patch > w:
        raise GeometryError(f"grid {grid} of {patch}-pixel patches does not fit a {h}x{w} image")
    kp = detect(img, params, descriptors=descriptors)
    wts = weight_map(kp, patch, grid, scheme)
    return KeypointMap(wts, levels_of(wts, n_levels, thresholds), tuple(grid), patch, kp)


def auto_upsample(input_size: tuple[int, int]) -> float:
    """SIFT upsampling factor u such that SIFT sees at least 128 pixels on the shorter side (u >= 1):
    4 for 32x32 inputs, 1 for 224x224."""
    return float(max(1.0, 128.0 / min(input_size)))


@dataclass
class SiftOptions:
    """The SIFT options a user sets, shared by every job that detects keypoints (a nested config group)."""

    upsample: float = option(0.0, "SIFT upsampling factor u; 0 = automatic (4 for 32x32 inputs, 1 for 224).")
    contrast_threshold: float = option(0.04, "SIFT contrast threshold (OpenCV's contrastThreshold): higher finds "
                                             "fewer, stronger keypoints.")
    edge_threshold: float = option(10.0, "SIFT edge threshold (OpenCV's edgeThreshold): lower rejects more "
                                         "edge-like keypoints.")


def sift_params(input_size: tuple[int, int], options: SiftOptions) -> SiftParams:
    """The SIFT settings of a run: ``options``' thresholds, and its ``upsample`` factor or, when that is 0,
    the automatic one for a model input of ``input_size`` (H, W)."""
    return SiftParams(upsample=options.upsample or auto_upsample(tuple(input_size)),
                      contrast_threshold=options.contrast_threshold, edge_threshold=options.edge_threshold)
