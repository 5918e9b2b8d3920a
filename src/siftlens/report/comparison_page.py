"""The comparison figure: each run's per-layer curves (mean over heads) with their CIs and null bands."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from matplotlib.figure import Figure

from .figures import CURVE_METRICS, METRIC_LABELS, NULL_GREY, REFERENCE, _figure
from .findings import ReportDataError, bare, fmt_q, fmt_z


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


def render_compare_html(differences: pd.DataFrame, runs: pd.DataFrame, figure_png: bytes | str,
                        findings: Sequence[str], setting_differences: dict | None = None) -> str:
    """The comparison as one self-contained HTML page: findings, runs, the overlaid curves and the table of
    per-layer head-mean differences (metrics of the curves) with CI and q."""
    from .html import CSS, _e, _kv_table, data_uri

    base = runs["run"].iloc[0]
    rows = differences[(differences["head"] == -1) & (differences["level_a"] < 0)
                       & differences["metric"].isin(CURVE_METRICS)].sort_values(["run", "metric", "layer"])
    sig = ' class="sig"'
    short = {m: METRIC_LABELS.get(m, (m,))[0].split(":")[0] for m in CURVE_METRICS}
    body = "".join(
        f"<tr{sig if r.q < 0.05 else ''}><td>{_e(r.run)}</td><td>{_e(short[r.metric])}"
        f"</td><td class=num>{r.layer}</td><td class=num>{r.mean_base:.3f}</td><td class=num>{r.mean:.3f}</td>"
        f"<td class=num>{r.diff:+.3f}</td><td class=num>{r.ci_lo:+.3f} to {r.ci_hi:+.3f}</td>"
        f"<td class=num>{_e(bare(fmt_z(r.z)))}</td>"
        f"<td class=num>{_e(bare(fmt_q(r.q)))}</td></tr>" for r in rows.itertuples())
    run_rows = [(r.run, f"{r.model} on {r.images}: {r.analysed} images, {r.shared_with_first} shared with {base}")
                for r in runs.itertuples()]
    settings = ("<p class=\"muted\">Compared with --force although these settings differ: "
                + _e("; ".join(f"{k}: {v}" for k, v in setting_differences.items())) + "</p>"
                if setting_differences else "")
    fnd = "".join(f"<li>{_e(x)}</li>" for x in findings) or "<li>No differences were computed.</li>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>siftlens comparison</title><style>{CSS}</style></head>
<body><div class="container">
<h1>How do these runs differ? Attention and SIFT keypoints</h1>
<h2 id="findings">What we found</h2>
<ul class="findings">{fnd}</ul>
<p class="muted">Differences are against {_e(base)}. Each CI is a bootstrap over images whose weights are
keyed by the image's name, so images the runs share are paired; q is Benjamini–Hochberg across layers and
heads within each metric.</p>{settings}
<h2 id="runs">Runs</h2>
{_kv_table(run_rows)}
<h2 id="curves">Per-layer curves (mean over heads)</h2>
<figure><img alt="per-layer curves of every run" src="{data_uri(figure_png)}">
<figcaption>One colour per run: the line is the mean over images with its 95% bootstrap CI as a band; the
dotted lines bound the run's null band (null mean ± 1.96 sd); the dashed line is no effect.</figcaption></figure>
<h2 id="table">Per-layer differences (mean over heads)</h2>
<table class="top"><thead><tr><th>run</th><th>metric</th><th class=num>layer</th><th class=num>{_e(base)}</th>
<th class=num>run</th><th class=num>difference</th><th class=num>95% CI</th><th class=num>z</th><th class=num>q</th>
</tr></thead><tbody>{body}</tbody></table>
<p class="muted">Highlighted rows differ with q &lt; 0.05.</p>
<footer>Made by siftlens compare. This page is self-contained: it loads nothing from the network.</footer>
</div></body></html>
"""
