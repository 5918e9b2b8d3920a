"""Rendering: figures, plain-English findings and a self-contained HTML report.

This package only receives data (the summary table, the run manifest and a few per-image overlays)
and never imports the analysis; every function here can be called from a notebook on saved tables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from ..io import write_text
from .figures import DPI, distance_entropy, head_heatmap, layer_curves, level_matrices
from .findings import ReportDataError, findings
from .html import render_html
from .notebook import analysis_html, comparison_html, viewer_html
from .overlay import overlay_figure
from .saving import save_figure, save_figures
from .viewer import render_explore, viewer_budget

__all__ = [
    "ReportDataError",
    "analysis_html",
    "comparison_html",
    "distance_entropy",
    "findings",
    "head_heatmap",
    "layer_curves",
    "level_matrices",
    "overlay_figure",
    "render_explore",
    "render_html",
    "save_figure",
    "save_figures",
    "viewer_html",
    "write_report",
]


def write_report(out_dir: str | os.PathLike, summary: pd.DataFrame, manifest: Mapping,
                 overlays: Sequence[Mapping] = (), dpi: int = DPI, explore: Sequence[Mapping] = ()) -> Path:
    """Save figures to ``out_dir/figures/``; write ``out_dir/report.html`` atomically; return its path.

    ``explore``: the images of the interactive viewer (``AnalysisResult.explore``); none, no viewer."""
    out = Path(out_dir)
    figures = save_figures(summary, manifest, overlays, out / "figures", dpi=dpi)
    text = findings(summary, manifest)
    page = render_html(summary, manifest, figures, text)
    if explore:  # the viewer fills what the rest of the page leaves of the size budget
        page = render_html(summary, manifest, figures, text,
                           explore=render_explore(explore, manifest, viewer_budget(page)))
    return write_text(out / "report.html", page)
