"""What a result shows in Jupyter: its headline figure and its table of significant cells, as HTML.

``AnalysisResult._repr_html_`` calls :func:`analysis_html` and ``Comparison._repr_html_`` calls
:func:`comparison_html`; :func:`viewer_html` puts a run's interactive attention viewer into a notebook
cell. Like the rest of :mod:`siftlens.report`, these only receive tables, a manifest and viewer records.
The fragments carry their own small stylesheet, scoped to ``.sl-nb``, and no script (the viewer's
script runs inside its own ``<iframe>``).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .comparison_page import compare_curves
from .figures import METRIC_LABELS, layer_curves
from .findings import DEFAULT_ALPHA, ReportDataError, bare, check_summary, fmt_q, fmt_z, level_names, num_layers
from .html import CSS, data_uri
from .viewer import MIN_VIEWER_BUDGET, render_explore

#: rows of the significant-cells table shown in a notebook (the strongest by |z|)
MAX_ROWS = 20
NOTEBOOK_DPI = 80  # the headline figure's resolution inline: sharp on screen, small in the .ipynb

_STYLE = """<style>
.sl-nb table { border-collapse: collapse; font-size: 0.9em; margin: 0.4em 0; }
.sl-nb th, .sl-nb td { padding: 2px 8px; border-bottom: 1px solid #dde2e8; text-align: left; }
.sl-nb td.num, .sl-nb th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.sl-nb img { max-width: 100%; height: auto; border: 1px solid #dde2e8; }
.sl-nb .muted { color: #5b6470; }
</style>"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def figure_png(fig: Figure, dpi: int = NOTEBOOK_DPI) -> bytes:
    """``fig`` as PNG bytes (white background), for a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def significant_cells(table: pd.DataFrame, alpha: float = DEFAULT_ALPHA, limit: int | None = MAX_ROWS) -> pd.DataFrame:
    """The rows of a summary (or differences) table with ``q < alpha``, strongest first (largest |z|), at most
    ``limit`` of them. Cells with no variation (no z, p or q: NaN) are never significant."""
    if table.empty or "q" not in table.columns:
        return table.iloc[:0]
    q = pd.to_numeric(table["q"], errors="coerce")
    sig = table[q.lt(alpha).to_numpy()]
    order = pd.to_numeric(sig["z"], errors="coerce").abs().sort_values(ascending=False, na_position="last").index
    sig = sig.loc[order]
    return sig if limit is None else sig.head(limit)


def _where(layer: int, head: int, n_layers: int | None) -> tuple[str, str]:
    lay = "rollout" if n_layers is not None and layer >= n_layers else str(layer)
    return lay, ("mean" if head < 0 else str(head))


def _metric(metric: str, a: int, b: int, names: Sequence[str]) -> str:
    short = METRIC_LABELS.get(metric, (metric,))[0].split(":")[0]

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else f"level {i}"

    if a >= 0 and b >= 0:
        return f"{short} {name(a)} → {name(b)}"
    return f"{short} ({name(a)})" if a >= 0 else short


def _num(x, fmt: str = "{:.3f}") -> str:
    """A number for a table cell; '—' where there is none (NaN); no '-0.000'."""
    if x is None or not np.isfinite(x):
        return "—"
    text = fmt.format(x)
    return text if text.strip("-+0.") else fmt.format(0.0)


def _counts(table: pd.DataFrame, alpha: float, shown: int) -> str:
    q = pd.to_numeric(table["q"], errors="coerce") if len(table) else pd.Series(dtype=float)
    n_sig = int(q.lt(alpha).sum())
    no_var = int(q.isna().sum())
    text = f"{n_sig} of {len(table)} cells have q &lt; {alpha:g}"
    if no_var:
        text += f" ({no_var} have no variation: no z, p or q, never significant)"
    if n_sig > shown:
        text += f"; the {shown} with the largest |z| are shown"
    return f'<p class="muted">{text}.</p>'


def _figure_tag(make, alt: str) -> str:
    try:
        fig = make()
    except ReportDataError as e:
        return f'<p class="muted">No figure: {_e(e)}</p>'
    return f'<img alt="{_e(alt)}" src="{data_uri(figure_png(fig))}">'


def analysis_html(summary: pd.DataFrame, manifest: Mapping | None = None, out=None, alpha: float = DEFAULT_ALPHA,
                  limit: int = MAX_ROWS) -> str:
    """An analysis as a notebook cell shows it: a title line (``out``: the run's folder), the per-layer curves
    (the report's headline figure) as an inline PNG and the table of significant cells (q < ``alpha``, by
    |z|, at most ``limit``)."""
    s = check_summary(summary)
    manifest = manifest or {}
    n_layers = num_layers(s, manifest)
    model = manifest.get("model") or {}
    images = manifest.get("images") or {}
    n_lev = int(max(s["level_a"].max(), s["level_b"].max(), -1) + 1) if len(s) else 0
    names = level_names(manifest, n_lev)
    who = model.get("class") or model.get("spec") or model.get("source") or "model"
    sub = [f"{images['analysed']} images" if images.get("analysed") is not None else "",
           f"{model['layers']} layers × {model['heads']} heads" if model.get("heads") is not None
           and model.get("layers") is not None else ""]
    top = significant_cells(s, alpha, limit)
    rows = []
    for r in top.itertuples(index=False):
        lay, head = _where(int(r.layer), int(r.head), n_layers)
        rows.append(
            f"<tr><td class=num>{lay}</td><td class=num>{head}</td>"
            f"<td>{_e(_metric(r.metric, int(r.level_a), int(r.level_b), names))}</td>"
            f"<td class=num>{_num(r.mean)}</td><td class=num>{_num(r.ci_lo)} to {_num(r.ci_hi)}</td>"
            f"<td class=num>{_num(r.null_mean)}</td><td class=num>{_e(bare(fmt_z(r.z)))}</td>"
            f"<td class=num>{_e(bare(fmt_q(r.q)))}</td><td class=num>{int(r.n)}</td></tr>")
    table = ('<table class="sl-significant"><thead><tr><th class=num>layer</th><th class=num>head</th>'
             "<th>metric</th><th class=num>mean</th><th class=num>95% CI</th><th class=num>null mean</th>"
             "<th class=num>z</th><th class=num>q</th><th class=num>images</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>" if rows else "")
    where = f" in <code>{_e(out)}</code>" if out is not None else ""
    return (f'{_STYLE}<div class="sl-nb"><h3>siftlens analysis: {_e(who)}</h3>'
            f'<p class="muted">{_e(" · ".join(x for x in sub if x))}{where}</p>'
            f"{_figure_tag(lambda: layer_curves(s, manifest), 'per-layer curves')}"
            f"<h4>Significant cells</h4>{_counts(s, alpha, len(rows))}{table}</div>")


def comparison_html(differences: pd.DataFrame, summaries: pd.DataFrame, labels: Sequence[str],
                    depth: int | None = None, alpha: float = DEFAULT_ALPHA, limit: int = MAX_ROWS) -> str:
    """A comparison as a notebook cell shows it: every run's per-layer curves (the headline figure of
    compare.html) and the table of cells that differ from the first run (q < ``alpha``, by |z|)."""
    labels = list(labels)
    top = significant_cells(differences, alpha, limit)
    rows = []
    for r in top.itertuples(index=False):
        lay, head = _where(int(r.layer), int(r.head), depth)
        rows.append(
            f"<tr><td>{_e(r.run)}</td><td class=num>{lay}</td><td class=num>{head}</td>"
            f"<td>{_e(_metric(r.metric, int(r.level_a), int(r.level_b), []))}</td>"
            f"<td class=num>{_num(r.mean_base)}</td><td class=num>{_num(r.mean)}</td>"
            f"<td class=num>{_num(r.diff, '{:+.3f}')}</td>"
            f"<td class=num>{_num(r.ci_lo, '{:+.3f}')} to {_num(r.ci_hi, '{:+.3f}')}</td>"
            f"<td class=num>{_e(bare(fmt_z(r.z)))}</td><td class=num>{_e(bare(fmt_q(r.q)))}</td></tr>")
    base = _e(labels[0]) if labels else "the first run"
    table = ('<table class="sl-significant"><thead><tr><th>run</th><th class=num>layer</th><th class=num>head</th>'
             f"<th>metric</th><th class=num>{base}</th><th class=num>run</th><th class=num>difference</th>"
             "<th class=num>95% CI</th><th class=num>z</th><th class=num>q</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>" if rows else "")
    counts = (_counts(differences, alpha, len(rows)) if len(differences) and "q" in differences.columns
              else '<p class="muted">No differences were computed.</p>')
    return (f'{_STYLE}<div class="sl-nb"><h3>siftlens comparison: {_e(", ".join(labels))}</h3>'
            f'<p class="muted">Differences are against {base}.</p>'
            f"{_figure_tag(lambda: compare_curves(summaries, labels, depth), 'per-layer curves of every run')}"
            f"<h4>Cells that differ from {base}</h4>{counts}{table}</div>")


def viewer_html(records: Sequence[Mapping], manifest: Mapping, height: int = 760,
                budget: int = MIN_VIEWER_BUDGET) -> str:
    """The report's interactive attention viewer for a notebook cell (``IPython.display.HTML``): a page of its
    own in an ``<iframe srcdoc>``, so its script runs and its ids and styles stay apart from the notebook's.
    ``records``: ``AnalysisResult.explore``; ``budget``: characters of attention data (a smaller budget
    stores attention in coarser steps)."""
    if not records:
        raise ReportDataError("no viewer images: run the analysis with explore > 0 (the default is 8)")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><style>{CSS}</style></head>'
            f'<body><div class="container">{render_explore(records, manifest, budget)}</div></body></html>')
    return (f'<iframe class="sl-viewer" title="siftlens attention viewer" srcdoc="{_e(page)}" '
            f'style="width: 100%; height: {math.ceil(height)}px; border: 1px solid #dde2e8;"></iframe>')
