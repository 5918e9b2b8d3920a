"""Writing the report's figures as PNG files, atomically."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ..io import atomic_path
from .figures import (
    CURVE_METRICS,
    DISTANCE_METRICS,
    DPI,
    _plain,
    distance_entropy,
    head_heatmap,
    layer_curves,
    level_matrices,
)
from .findings import check_summary, num_layers
from .overlay import overlay_figure


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return Path(path)


def available_figures(summary: pd.DataFrame, manifest: Mapping | None = None) -> list[str]:
    """Names of the summary figures the table has data for, in report order."""
    s = check_summary(summary)
    n_layers = num_layers(s, manifest)
    plain = _plain(s)
    out = []
    if plain["metric"].isin(CURVE_METRICS).any():
        out.append("layer_curves")
    if ((plain["metric"] == "sal") & (plain["head"] >= 0) & (plain["layer"] < n_layers)).any():
        out.append("head_heatmap")
    if ((s["metric"] == "R") & (s["head"] < 0) & (s["level_a"] >= 0) & (s["level_b"] >= 0)).any():
        out.append("level_matrices")
    if (s["metric"].isin(DISTANCE_METRICS) & (s["head"] < 0) & (s["layer"] < n_layers)).any():
        out.append("distance_entropy")
    return out


SUMMARY_FIGURES: dict[str, Callable[[pd.DataFrame, Mapping | None], Figure]] = {
    "layer_curves": layer_curves,
    "head_heatmap": head_heatmap,
    "level_matrices": level_matrices,
    "distance_entropy": distance_entropy,
}


def save_figures(summary: pd.DataFrame, manifest: Mapping | None, overlays: Sequence[Mapping] = (),
                 out_dir: str | Path = ".", dpi: int = DPI) -> dict[str, Path]:
    """Write every figure the data allows to ``out_dir/<name>.png``; return {name: path}.

    Names: layer_curves, head_heatmap, level_matrices, distance_entropy (each only when the table has
    its rows), then overlay_00, overlay_01... one per overlay, in the given order.
    """
    s = check_summary(summary)
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for name in available_figures(s, manifest):
        paths[name] = save_figure(SUMMARY_FIGURES[name](s, manifest), out / f"{name}.png", dpi)
    for i, ov in enumerate(overlays or ()):
        name = f"overlay_{i:02d}"
        paths[name] = save_figure(overlay_figure(ov, manifest), out / f"{name}.png", dpi)
    return paths
