"""The per-image figure: the model's input with patch grid, keypoints and weights, and where the CLS token
looks in the first, middle and last layer (and rollout)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .figures import _figure, _model, _text


def _cls_maps(overlay: Mapping) -> dict[int, np.ndarray]:
    maps = overlay.get("cls_attention") or {}
    return {int(k): np.asarray(v, float) for k, v in maps.items()}


def _pixels(overlay: Mapping) -> np.ndarray:
    """(H, W, 3) uint8 from the overlay's pixels (greyscale repeated, other dtypes clipped)."""
    px = np.asarray(overlay["pixels"])
    if px.ndim == 2:
        px = np.repeat(px[..., None], 3, axis=2)
    return px if px.dtype == np.uint8 else np.clip(px, 0, 255).astype(np.uint8)


def _chosen_layers(maps: Mapping[int, np.ndarray], n_layers: int) -> list[int]:
    """First, middle and last captured layer, then rollout (layer >= n_layers) if present."""
    real = sorted(k for k in maps if not n_layers or k < n_layers)
    chosen = list(dict.fromkeys([real[0], real[len(real) // 2], real[-1]])) if real else []
    return chosen + sorted(k for k in maps if n_layers and k >= n_layers)[:1]


def _layout(n_maps: int) -> tuple[list[list[str]], tuple[float, float]]:
    """Mosaic and size: the image takes a large block on the left, the maps (up to four) a 2 x 2 block."""
    keys = [f"m{i}" for i in range(n_maps)]
    if not keys:
        return [["img"]], (6.0, 5.8)
    if len(keys) == 1:
        return [["img", "m0"]], (2 * 4.4 + 1.0, 4.4 + 1.0)
    if len(keys) == 2:
        return [["img", "img", "m0"], ["img", "img", "m1"]], (3 * 2.5 + 1.0, 2 * 2.5 + 1.1)
    pad = keys + ["."] * (4 - len(keys))
    return [["img", "img", pad[0], pad[1]], ["img", "img", pad[2], pad[3]]], (4 * 2.5 + 1.0, 2 * 2.5 + 1.1)


def _draw_input(fig, ax, px, weights, P, xy, size) -> None:
    """The model input with the weight map, the patch grid and the keypoints (circles of radius size/2)."""
    H, W = px.shape[:2]
    gh, gw = weights.shape
    ax.imshow(px, interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    wmax = float(weights.max()) if weights.size and weights.max() > 0 else 1.0
    wim = ax.imshow(np.ma.masked_where(weights <= 0, weights), cmap="YlOrRd", alpha=0.5, vmin=0, vmax=wmax,
                    interpolation="nearest", extent=(-0.5, gw * P - 0.5, gh * P - 0.5, -0.5))
    ax.vlines(np.arange(gw + 1) * P - 0.5, -0.5, gh * P - 0.5, color="white", lw=0.6, alpha=0.7)
    ax.hlines(np.arange(gh + 1) * P - 0.5, -0.5, gw * P - 0.5, color="white", lw=0.6, alpha=0.7)
    if len(xy):
        circles = [Circle((x, y), max(r / 2.0, 0.4)) for (x, y), r in zip(xy, size, strict=False)]
        ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor="cyan", lw=0.7, alpha=0.9))
        ax.scatter(xy[:, 0], xy[:, 1], s=3, color="cyan", lw=0)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_title(f"model input {H}×{W} px (H×W): {len(xy)} SIFT keypoints (circles),\n"
                 f"{gh}×{gw} patch grid, patch weight (warm = more keypoints)", fontsize=9)
    fig.colorbar(wim, ax=ax, location="bottom", shrink=0.6, fraction=0.05, pad=0.02,
                 label="keypoint weight of the patch")


def _draw_attention(ax, px, att, P, xy, title: str) -> None:
    """One attention map (gh, gw) over the greyscale input, keypoint centres as cyan dots."""
    H, W = px.shape[:2]
    gh, gw = att.shape
    ax.imshow(px.mean(axis=2), cmap="gray", interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    peak = float(att.max()) if att.size else 0.0
    ax.imshow(att, cmap="inferno", alpha=0.6, vmin=0, vmax=peak if peak > 0 else 1.0, interpolation="nearest",
              extent=(-0.5, gw * P - 0.5, gh * P - 0.5, -0.5))
    if len(xy):
        ax.scatter(xy[:, 0], xy[:, 1], s=3, color="cyan", lw=0, alpha=0.8)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_title(f"{title}\n(top patch {peak:.1%}; uniform {1 / att.size:.1%})", fontsize=9)


def overlay_figure(overlay: Mapping, manifest: Mapping | None = None) -> Figure:
    """One image: pixels, patch grid, keypoints, weight map; CLS attention of first/middle/last layer.

    overlay: name, pixels (H, W, 3) uint8, keypoints_xy (K, 2) (x, y) pixels with pixel centres at
    integers, keypoint_size (K,), weights (gh, gw), levels (gh, gw), cls_attention {layer: (gh, gw)},
    label, prediction.
    """
    model = _model(manifest)
    px = _pixels(overlay)
    weights = np.asarray(overlay["weights"], float)
    if weights.ndim == 1 and model.get("grid"):
        weights = weights.reshape(int(model["grid"][0]), int(model["grid"][1]))
    gh, gw = weights.shape
    P = float(model.get("patch_size") or px.shape[0] / gh)
    n_layers = int(model.get("layers") or 0)
    maps = _cls_maps(overlay)
    chosen = _chosen_layers(maps, n_layers)
    mosaic, size_in = _layout(len(chosen))
    fig = _figure(*size_in)
    named = fig.subplot_mosaic(mosaic, empty_sentinel=".")
    xy = np.asarray(overlay.get("keypoints_xy", np.zeros((0, 2))), float).reshape(-1, 2)
    size = np.asarray(overlay.get("keypoint_size", np.ones(len(xy))), float).reshape(-1)
    _draw_input(fig, named["img"], px, weights, P, xy, size)
    who = "CLS" if model.get("has_cls", True) else "mean-query"
    for i, layer in enumerate(chosen):
        att = maps[layer].reshape(gh, gw) if maps[layer].ndim == 1 else maps[layer]
        where = "rollout" if n_layers and layer >= n_layers else f"layer {layer}"
        _draw_attention(named[f"m{i}"], px, att, P, xy, f"{who} attention, {where}")
    for ax in named.values():
        ax.set_xticks([])
        ax.set_yticks([])
    parts = [f"image: {_text(overlay.get('name', '?'))}"]
    if overlay.get("label") not in (None, ""):
        parts.append(f"label: {_text(overlay['label'], 30)}")
    if overlay.get("prediction") not in (None, ""):
        parts.append(f"prediction: {_text(overlay['prediction'], 30)}")
    fig.suptitle("   ·   ".join(parts), fontsize=10)
    return fig
