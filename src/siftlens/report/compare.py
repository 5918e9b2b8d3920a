"""The comparison figure: each run's per-layer curves (mean over heads) with their CIs and null bands."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

from .figures import CURVE_METRICS, METRIC_LABELS, NULL_GREY, REFERENCE, _figure
from .findings import ReportDataError


def compare_curves(summaries: pd.DataFrame, labels: Sequence[str], depth: int | None = None,
                   metrics: Sequence[str] = CURVE_METRICS) -> Figure:
    """One panel per metric; one line per run (``summaries`` has a ``run`` column holding ``labels``), with
    its 95% bootstrap CI as a band and its null band as dotted lines. Layers >= ``depth`` (rollout) are
    left out."""
    s = summaries[(summaries["head"] == -1) & (summaries["level_a"] < 0) & (summaries["level_b"] < 0)]
    if depth is not None:
        s = s[s["layer"] < depth]
    present = [m for m in metrics if (s["metric"] == m).any()]
    if not present:
        raise ReportDataError(f"the summaries have no head-mean rows for any of {list(metrics)}")
    ncols = 1 if len(present) == 1 else 2
    fig = _figure(5.6 * ncols, 3.2 * math.ceil(len(present) / ncols) + 0.6)
    axes = fig.subplots(math.ceil(len(present) / ncols), ncols, squeeze=False)
    for ax, metric in zip(axes.flat, present, strict=False):
        for i, label in enumerate(labels):
            d = s[(s["metric"] == metric) & (s["run"] == label)].sort_values("layer")
            colour = f"C{i}"
            ax.plot(d["layer"], d["mean"], "-o", color=colour, ms=3, lw=1.6, label=label)
            ax.fill_between(d["layer"], d["ci_lo"], d["ci_hi"], color=colour, alpha=0.2, lw=0)
            ax.plot(d["layer"], d["null_lo"], ":", color=colour, lw=0.8)
            ax.plot(d["layer"], d["null_hi"], ":", color=colour, lw=0.8)
        ax.axhline(REFERENCE.get(metric, 1.0), color=NULL_GREY, lw=0.8, ls="--")
        title, ylabel = METRIC_LABELS.get(metric, (metric, metric))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel, fontsize=9)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncol=min(len(names), 4), fontsize=9, frameon=False)
    return fig
