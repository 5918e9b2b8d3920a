"""Figures of the report, made from the summary table, the manifest and a few per-image overlays.

Every function takes data and returns a :class:`matplotlib.figure.Figure` drawn on the Agg canvas.
pyplot is never used, so nothing is shown, no global figure state is kept and figures are freed
with their last reference (:mod:`siftlens.report.overlay` draws the per-image figure,
:mod:`siftlens.report.saving` writes them all as PNG files, atomically).

Conventions of the summary table (see :mod:`siftlens.report.findings`): ``head == -1`` is the mean
over heads, ``layer == num_layers`` is attention rollout, ``level_a``/``level_b`` are -1 where a
metric has no level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .findings import DEFAULT_ALPHA, ReportDataError, check_summary, level_names, num_layers

DPI = 110
CURVE_METRICS = ("sal", "wi", "cls_lift", "cls_rho")
# metric -> (panel title, y-axis label)
METRIC_LABELS = {
    "sal": ("SAL: attention to keypoint-rich patches", "SAL (× uniform attention)"),
    "wi": ("WI: keypoint-weighted patch-to-patch attention", "WI (× uniform attention)"),
    "cls_lift": ("CLS lift: CLS attention to keypoint-rich patches", "CLS lift (× uniform attention)"),
    "cls_rho": ("CLS alignment: Spearman ρ(CLS attention, weight)", "Spearman ρ (0 = unrelated)"),
    "R": ("R: level interrelation", "R (× fair share)"),
}
REFERENCE = {"cls_rho": 0.0}  # the 'no effect' value; 1.0 for every other metric
MAIN = "tab:blue"
ROLLOUT = "tab:red"
NULL_GREY = "0.55"


# ---------------------------------------------------------------- small helpers

def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plain(s: pd.DataFrame) -> pd.DataFrame:
    """Rows of metrics that have no level."""
    return s[(s["level_a"] < 0) & (s["level_b"] < 0)]


def _text(value, limit: int = 70) -> str:
    """Data text made safe for matplotlib (no mathtext from '$') and shortened in the middle."""
    t = str(value)
    if len(t) > limit:
        t = t[: limit // 2 - 1] + "…" + t[-(limit // 2) + 1:]
    return t.replace("$", r"\$")


def _layer_ticks(ax, layers: Sequence[int], n_layers: int, rollout: bool) -> None:
    layers = sorted(int(x) for x in layers)
    step = 1 if len(layers) <= 16 else 2
    ticks = layers[::step]
    labels = [str(x) for x in ticks]
    if rollout:
        ticks.append(n_layers)
        labels.append("rollout")
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels)


def _ratio_norm(values: np.ndarray, floor: float = 1.05, cap: float = 100.0) -> TwoSlopeNorm:
    """A diverging norm centred at 1.0, symmetric in ratio (0.5x as strong as 2x)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    r = floor
    if v.size:
        r = max(r, float(v.max()), 1.0 / float(v.min()))
    r = min(r, cap)
    return TwoSlopeNorm(vcenter=1.0, vmin=1.0 / r, vmax=r)


def _cell_format(values: np.ndarray, digits: int = 2) -> str:
    """Format for values near 1.0: one more decimal when every value is within 0.05 of 1."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size and np.abs(v - 1.0).max() < 0.05:
        digits += 1
    return "{:." + str(digits) + "f}"


def _level_colours(n: int) -> list:
    """Level 0 (no keypoints) grey, higher levels ever deeper orange-red."""
    warm = colormaps["YlOrRd"](np.linspace(0.45, 0.9, max(n - 1, 1)))
    return ["0.45"] + [tuple(c) for c in warm[: n - 1]]


def _model(manifest: Mapping | None) -> Mapping:
    return (manifest or {}).get("model") or {}


# ---------------------------------------------------------------- a) per-layer curves

def layer_curves(summary: pd.DataFrame, manifest: Mapping | None = None,
                 metrics: Sequence[str] = CURVE_METRICS, alpha: float = DEFAULT_ALPHA) -> Figure:
    """One panel per metric: head-mean vs layer with its 95% CI, the null band, heads and rollout."""
    s = check_summary(summary)
    n_layers = num_layers(s, manifest)
    s = _plain(s)
    present = [m for m in metrics if (s["metric"] == m).any()]
    if not present:
        raise ReportDataError(f"the summary has no rows for any of {list(metrics)}; nothing to plot")
    ncols = 1 if len(present) == 1 else 2
    nrows = math.ceil(len(present) / ncols)
    fig = _figure(5.6 * ncols, 3.2 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    handles: dict[str, object] = {}
    for ax, metric in zip(axes.flat, present, strict=False):
        _curve_panel(ax, s[s["metric"] == metric], metric, n_layers, alpha)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab.startswith("no effect"):
                lab = "no effect (1.0; 0 for ρ)" if "cls_rho" in present else lab
            handles.setdefault(lab, h)
    for ax in axes.flat[len(present):]:
        ax.set_visible(False)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside upper center",
               ncol=min(len(handles), 4), fontsize=9, frameon=False)
    return fig


def _curve_panel(ax, d: pd.DataFrame, metric: str, n_layers: int, alpha: float) -> None:
    ref = REFERENCE.get(metric, 1.0)
    per = d[d["layer"] < n_layers]
    roll = d[(d["layer"] >= n_layers) & (d["head"] < 0)]
    heads = per[per["head"] >= 0]
    for i, (_, g) in enumerate(heads.groupby("head")):
        g = g.sort_values("layer")
        ax.plot(g["layer"], g["mean"], color=MAIN, lw=0.7, alpha=0.28,
                label="individual heads" if i == 0 else "_nolegend_")
    hm = per[per["head"] < 0].sort_values("layer")
    if len(hm):
        x = hm["layer"].to_numpy()
        ax.fill_between(x, hm["null_lo"], hm["null_hi"], color=NULL_GREY, alpha=0.35, lw=0,
                        label="null 95% range (keypoints shuffled)")
        ax.fill_between(x, hm["ci_lo"], hm["ci_hi"], color=MAIN, alpha=0.25, lw=0,
                        label="95% CI of the mean")
        ax.plot(x, hm["mean"], color=MAIN, lw=2, label="mean over heads")
        sig = (hm["q"] < alpha).to_numpy()
        ax.scatter(x[sig], hm["mean"].to_numpy()[sig], color=MAIN, s=26, zorder=3,
                   label=f"q < {alpha:g} (filled)")
        ax.scatter(x[~sig], hm["mean"].to_numpy()[~sig], facecolor="white", edgecolor=MAIN, s=26,
                   zorder=3, label=f"q ≥ {alpha:g} (hollow)")
    ax.axhline(ref, ls="--", color="black", lw=1, label=f"no effect ({ref:g})")
    if len(roll):
        r = roll.iloc[0]
        ax.axvline(n_layers - 0.5, color="0.8", lw=0.8)
        ax.vlines(n_layers, r["null_lo"], r["null_hi"], color=NULL_GREY, lw=9, alpha=0.35)
        ax.errorbar([n_layers], [r["mean"]], yerr=[[r["mean"] - r["ci_lo"]], [r["ci_hi"] - r["mean"]]],
                    fmt="D", color=ROLLOUT, ms=6, capsize=3, label="attention rollout (mean, 95% CI)")
    layers = sorted(per["layer"].unique())
    if layers or len(roll):
        _layer_ticks(ax, layers, n_layers, bool(len(roll)))
    title, ylabel = METRIC_LABELS.get(metric, (metric, metric))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("layer (transformer block, 0 = first)")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="0.92", lw=0.6)


# ---------------------------------------------------------------- b) per-head heatmap

def head_heatmap(summary: pd.DataFrame, manifest: Mapping | None = None, metric: str = "sal",
                 alpha: float = DEFAULT_ALPHA) -> Figure:
    """Layers x heads heatmap of ``metric``'s mean, diverging around 1.0; '*' marks q < alpha."""
    s = check_summary(summary)
    n_layers = num_layers(s, manifest)
    d = _plain(s)
    d = d[(d["metric"] == metric) & (d["head"] >= 0) & (d["layer"] < n_layers)]
    if d.empty:
        raise ReportDataError(f"the summary has no per-head rows of '{metric}'; cannot draw the head heatmap")
    layers = sorted(int(x) for x in d["layer"].unique())
    heads = sorted(int(x) for x in d["head"].unique())
    li = {v: i for i, v in enumerate(layers)}
    hi = {v: i for i, v in enumerate(heads)}
    M = np.full((len(layers), len(heads)), np.nan)
    Q = np.full_like(M, np.nan)
    for row in d.itertuples(index=False):
        M[li[row.layer], hi[row.head]] = row.mean
        Q[li[row.layer], hi[row.head]] = row.q
    fig = _figure(max(6.0, 0.62 * len(heads) + 2.6), max(3.4, 0.42 * len(layers) + 1.7))
    ax = fig.add_subplot()
    norm = _ratio_norm(M)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    annotate = M.size <= 256
    fs = 8 if len(heads) <= 12 else 6
    fmt = _cell_format(M)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v, q = M[i, j], Q[i, j]
            if not np.isfinite(v):
                continue
            star = "*" if q < alpha else ""
            text = f"{fmt.format(v)}{star}" if annotate else star
            if text:
                strong = abs(norm(v) - 0.5) > 0.33
                ax.text(j, i, text, ha="center", va="center", fontsize=fs,
                        color="white" if strong else "black")
    ax.set_xticks(range(len(heads)))
    ax.set_xticklabels([str(h) for h in heads])
    step = 1 if len(layers) <= 24 else 2
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([str(x) for x in layers[::step]])
    ax.set_xlabel("head")
    ax.set_ylabel("layer (0 = first)")
    title = METRIC_LABELS.get(metric, (metric.upper(),))[0].split(":")[0]
    ax.set_title(f"{title} per layer and head\n"
                 f"(* = q < {alpha:g}; red = more attention to keypoint-rich patches)", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"{title} (1.0 = no preference)", shrink=0.9)
    return fig


# ---------------------------------------------------------------- c) level interrelation matrices

def level_matrices(summary: pd.DataFrame, manifest: Mapping | None = None, metric: str = "R") -> Figure:
    """One small L x L matrix of ``metric`` (head mean) per layer, shared colour scale centred at 1."""
    s = check_summary(summary)
    n_layers = num_layers(s, manifest)
    d = s[(s["metric"] == metric) & (s["head"] < 0) & (s["level_a"] >= 0) & (s["level_b"] >= 0)]
    if d.empty:
        raise ReportDataError(f"the summary has no head-mean rows of '{metric}' with levels; "
                              "cannot draw the level matrices")
    n_lev = int(max(d["level_a"].max(), d["level_b"].max())) + 1
    n_lev = max(n_lev, int(((manifest or {}).get("params") or {}).get("n_levels") or 0))
    names = [_text(x, 12) for x in level_names(manifest, n_lev)]
    layers = sorted(int(x) for x in d["layer"].unique())
    ncols = min(len(layers), 4 if n_lev <= 4 else 3)
    nrows = math.ceil(len(layers) / ncols)
    side = 1.0 + 0.42 * n_lev
    fig = _figure(ncols * side + 1.3, nrows * (side + 0.35) + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    norm = _ratio_norm(d["mean"].to_numpy(), floor=1.1)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.88")
    fs = 8 if n_lev <= 4 else 6
    fmt = _cell_format(d["mean"].to_numpy(), 2 if n_lev <= 4 else 1)
    im = None
    for k, layer in enumerate(layers):
        ax = axes.flat[k]
        M = np.full((n_lev, n_lev), np.nan)
        g = d[d["layer"] == layer]
        M[g["level_a"].to_numpy(), g["level_b"].to_numpy()] = g["mean"].to_numpy()
        im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, norm=norm, interpolation="nearest")
        for i in range(n_lev):
            for j in range(n_lev):
                v = M[i, j]
                txt = fmt.format(v) if np.isfinite(v) else "–"
                white = np.isfinite(v) and abs(norm(v) - 0.5) > 0.33
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs, color="white" if white else "black")
        ax.set_title("rollout" if layer >= n_layers else f"layer {layer}", fontsize=9)
        ax.set_xticks(range(n_lev))
        ax.set_yticks(range(n_lev))
        ax.set_xticklabels(names, fontsize=7, rotation=45 if max(map(len, names)) > 4 else 0,
                           ha="right" if max(map(len, names)) > 4 else "center")
        ax.set_yticklabels(names if k % ncols == 0 else [], fontsize=7)
        if k % ncols == 0:
            ax.set_ylabel("query level", fontsize=8)
        if k + ncols >= len(layers):
            ax.set_xlabel("key level", fontsize=8)
    for ax in axes.flat[len(layers):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, shrink=0.85, label="R (× fair share; 1.0 = uniform)")
    fig.suptitle("Level interrelation R per layer (mean over heads): row level → column level", fontsize=10)
    return fig


# ---------------------------------------------------------------- d) distance and entropy per level

DISTANCE_METRICS = ("dist_rel", "entropy", "dist")  # panel order: relative distance first, raw pixels last
DISTANCE_LABELS = {
    "dist_rel": ("Attention distance relative to uniform attention",
                 "distance ÷ uniform attention's\n(1.0 = uniform; lower = more local)"),
    "entropy": ("Attention entropy per level", "entropy (nats; lower = more focused)"),
    "dist": ("Raw attention distance (includes patch geometry)", "distance (pixels of model input)"),
}


def distance_entropy(summary: pd.DataFrame, manifest: Mapping | None = None) -> Figure:
    """Relative attention distance, attention entropy (nats) and raw distance (pixels) vs layer, per level.

    ``dist_rel`` is the panel to compare levels on: raw distance is smaller for central patches even under
    uniform attention, so its level gaps mix geometry with attention. The relative panel has a dashed line
    at 1.0 (uniform attention) and the shuffled-keypoint null band (the 2.5–97.5% range, widest over levels).
    """
    s = check_summary(summary)
    n_layers = num_layers(s, manifest)
    d = s[s["metric"].isin(DISTANCE_METRICS) & (s["head"] < 0) & (s["layer"] < n_layers)]
    present = [m for m in DISTANCE_METRICS if (d["metric"] == m).any()]
    if not present:
        raise ReportDataError("the summary has no head-mean 'dist_rel', 'dist' or 'entropy' rows; nothing to plot")
    n_lev = int(max(d["level_a"].max(), 0)) + 1
    names = [_text(x, 20) for x in level_names(manifest, n_lev)]
    colours = _level_colours(n_lev)
    fig = _figure((5.6 if len(present) < 3 else 4.7) * len(present), 4.0)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    handles: dict[str, object] = {}
    for ax, metric in zip(axes, present, strict=True):
        m = d[d["metric"] == metric]
        if metric == "dist_rel":
            band = m[m["level_a"] >= 0].groupby("layer").agg(lo=("null_lo", "min"), hi=("null_hi", "max"))
            if len(band):
                # hatched, so it does not read as the CI band of the (grey) 'none' level
                ax.fill_between(band.index, band["lo"], band["hi"], facecolor="none", edgecolor="0.72",
                                hatch="////", lw=0, label="shuffled-keypoint null (2.5–97.5%)")
            ax.axhline(1.0, ls="--", color=NULL_GREY, lw=1, label="uniform attention (1.0)")
        for lev, g in m.groupby("level_a"):
            g = g.sort_values("layer")
            lev = int(lev)
            colour, label = ("black", "all patches") if lev < 0 else (colours[lev], f"level '{names[lev]}'")
            ax.fill_between(g["layer"], g["ci_lo"], g["ci_hi"], color=colour, alpha=0.18, lw=0)
            ax.plot(g["layer"], g["mean"], marker="o", ms=3.5, lw=1.8, color=colour, label=label,
                    ls="--" if lev < 0 else "-")
        grid = _model(manifest).get("grid")
        if metric == "entropy" and grid:
            h_uni = float(np.log(int(grid[0]) * int(grid[1])))
            ax.axhline(h_uni, ls=":", color=NULL_GREY, lw=1.2, label=f"uniform attention entropy (ln N = {h_uni:.2f})")
        _layer_ticks(ax, m["layer"].unique(), n_layers, False)
        ax.set_xlabel("layer (transformer block, 0 = first)")
        title, ylabel = DISTANCE_LABELS[metric]
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, **({"fontsize": 9} if metric == "dist_rel" else {}))
        ax.grid(axis="y", color="0.92", lw=0.6)
        ax.ticklabel_format(axis="y", useOffset=False)
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
               ncol=min(len(handles), 4), fontsize=9, frameon=False)
    return fig
