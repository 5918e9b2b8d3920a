"""One self-contained HTML page: findings, run card, figures with reading guides, top cells, glossary.

Images are embedded as base64 data URIs and the CSS is inline: the page has no external reference
and opens offline. Every piece of text that comes from data (names, reasons, parameters) is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from .findings import (
    DEFAULT_ALPHA,
    DEFAULT_MIN_EFFECT,
    DEFAULT_MIN_RHO,
    ReportDataError,
    bare,
    check_summary,
    fmt_q,
    fmt_z,
    level_names,
    num_layers,
)
from .page import CSS, page  # noqa: F401 - CSS: the comparison page imports it from here

MAX_SKIPPED_LISTED = 500
TOP_CELLS = 15

CAPTIONS = {
    "layer_curves": (
        "Attention to keypoint-rich patches, layer by layer",
        "Each panel is one metric; the horizontal axis is the transformer layer (0 = first). The "
        "vertical axis is a ratio to what attention that ignores keypoints would give, so the dashed "
        "line at 1.0 means <em>no preference</em> (for Spearman ρ the no-effect line is 0). The thick "
        "line is the mean over heads, with its 95% bootstrap confidence interval as the coloured band; "
        "thin faint lines are individual heads. The <strong>grey band</strong> is the null model: the "
        "95% range (null mean ± 1.96 null sd) of the dataset mean when every image's keypoint map is "
        "shuffled over the patch positions. A layer whose line leaves the grey band treats keypoint-rich patches "
        "differently from chance; filled dots survive multiple-testing correction (q &lt; 0.05), hollow "
        "ones do not. The red diamond at the right, when present, is attention rollout over all layers.",
    ),
    "head_heatmap": (
        "Every head, every layer: SAL",
        "One cell per (layer, head). Red cells give keypoint-rich patches more attention than uniform "
        "attention would (SAL above 1.0), blue cells less, white cells about the same. The colour "
        "scale is symmetric in ratio (0.5x is as blue as 2x is red). A star marks a cell whose "
        "difference from the shuffled-keypoint null survives Benjamini–Hochberg correction "
        "(q &lt; 0.05).",
    ),
    "level_matrices": (
        "Who attends to whom: level interrelation R",
        "One small matrix per layer (mean over heads). Patches are grouped into semantic levels by their "
        "keypoint weight ('none' = no keypoints, higher levels = more keypoints). Rows are the level of "
        "the query patch, columns the level of the key patch. Each number is the attention the "
        "query level gives to all patches of the key level, divided by that level's share of patches: "
        "1.0 is exactly its fair share, 2.0 twice it, 0.5 half. A high value on the bottom-right "
        "cell means keypoint-rich patches attend mostly to each other. Grey cells had no patches of "
        "that level.",
    ),
    "distance_entropy": (
        "How far and how focused attention is, per semantic level",
        "One line per semantic level (mean over heads); coloured bands are 95% confidence intervals. "
        "Left: relative attention distance, i.e. how far a query patch looks on average divided by how "
        "far uniform attention would look from the same patches: 1.0 (dashed line) is as far as "
        "uniform attention, below 1.0 is more local. Compare levels on this panel; the grey band is "
        "the range it takes when the keypoint maps are shuffled. Middle: attention entropy in nats; "
        "lower means attention is concentrated on fewer patches, and the dotted grey line is the "
        "entropy of perfectly uniform attention (ln N for N patches). Right: the raw distance in pixels "
        "of the model input. Do not read its gaps between levels as an attention effect: patches near "
        "the image centre, where keypoints tend to be, are close to all other patches, so they look "
        "less far even when attention is uniform.",
    ),
    "overlay": (
        "Example image",
        "Left: the pixels the model sees (small inputs are enlarged without smoothing), the patch "
        "grid in white, SIFT keypoints as cyan circles (radius = keypoint size / 2) and each patch's "
        "keypoint weight as a warm tint. Right: where the CLS token looks in the first, middle and last "
        "layer (mean over heads; brighter = more attention; the colour scale is set per panel, and "
        "the title gives the brightest patch's share of all attention next to the share every patch "
        "would get under uniform attention). Cyan dots repeat the keypoint centres for comparison.",
    ),
}

GLOSSARY = [
    ("Keypoint weight", "The number of SIFT keypoints whose centre falls in a patch (or, with other "
     "schemes, their summed response or Gaussian footprint). Patches with more keypoints are "
     "'semantic-rich'."),
    ("SAL", "Semantic attention lift. For each query patch, the keypoint weight of the patches it "
     "attends to, averaged over queries and divided by the average weight. 1.0: attention ignores "
     "keypoints; 2.0: attention lands on patches with twice the average keypoint weight."),
    ("WI", "Weighted interrelation: attention between pairs of patches weighted by the keypoint "
     "weight of both ends, relative to uniform attention. Above 1.0: rich patches attend to rich "
     "patches. (SAL with queries weighted by their own keypoint weight is algebraically the same "
     "number, so it is reported once, as WI.)"),
    ("CLS lift", "As SAL, for the CLS token's attention over the patches (models without a CLS token "
     "use the mean over query rows). Above 1.0: the classifier token looks at keypoint-rich patches."),
    ("ρ (rho)", "Spearman rank correlation between the CLS token's attention and the keypoint weight, "
     "per image. 0: unrelated; 1: the ranking of attention equals the ranking of weight."),
    ("R", "Level interrelation matrix: the attention queries of one level give to keys of another, "
     "divided by the key level's share of patches. 1.0 is the fair share."),
    ("Distance", "Mean attention distance: the attention-weighted average distance, in pixels of the "
     "model input, between a query patch and the patches it attends to. It depends on where the "
     "patch sits: a central patch is near everything, so its distance is small even under uniform "
     "attention. Use relative distance to compare levels."),
    ("Relative distance", "Mean attention distance divided by the distance uniform attention would give "
     "the same query patches. 1.0: attention looks as far as uniform attention; 0.8: 20% less far "
     "(more local); 0: every patch attends only to itself. Unlike the raw distance, it does not "
     "favour patches near the image centre."),
    ("Entropy", "Shannon entropy of a query's attention over the patches, in nats. Uniform attention "
     "over N patches gives ln N; attention on a single patch gives 0."),
    ("Null model", "What each metric looks like when attention is unrelated to keypoints: each "
     "image's keypoint map is re-assigned to the patch positions at random (every permutation, or "
     "every cyclic shift, equally likely). Its mean and variance per image are computed exactly "
     "(closed forms, or all shifts enumerated; Monte Carlo with --null M); the dataset's null mean is "
     "their mean and its variance the sum of the per-image variances over n². The grey bands show "
     "null mean ± 1.96 null sd of the dataset mean. Exact for every metric but the relative distance: "
     "dist_rel is a ratio, and its null moments come from the delta method (its null sd is off by up to "
     "about 3% at 64 patches, 2% at 196, and more on grids of fewer than 10 patches)."),
    ("z", "How many null standard deviations the dataset mean lies from the null mean; p is "
     "two-sided from the normal distribution, so strong effects are told apart (z = 3 gives "
     "p = 0.0027, z = 10 gives p ≈ 1.5e-23) instead of all reading as 'below 1/(M+1)'."),
    ("95% CI", "Bootstrap 95% confidence interval of the mean over images: the range the mean would "
     "plausibly take with another sample of images of the same kind."),
    ("q", "The p-value against the null after Benjamini–Hochberg correction across all (layer, head) "
     "cells of a metric: the expected share of false discoveries among cells called significant. "
     "q &lt; 0.05 is the threshold used here. p and q below 1e-12 print as “&lt; 1e-12”: the normal "
     "approximation is not accurate that far into the tail, so z is the measure of strength there."),
    ("No variation", "A cell whose null variance is zero, or too small for float32 arithmetic to resolve "
     "(null sd within 16 float32 epsilons of the null mean, or within the rounding of the attention sums "
     "it is computed from), as with exactly or nearly uniform attention. Its z, p and q are left empty: "
     "any z there would measure rounding, not attention. It is never counted as significant."),
    ("Rollout", "Attention rollout (Abnar and Zuidema, 2020): attention multiplied through all layers, "
     "with the residual connection, giving one map for the whole network."),
]

_MODEL_KEYS = [
    ("backend", "Backend"), ("source", "Source"), ("class", "Class"), ("patch_size", "Patch size (px)"),
    ("grid", "Patch grid (rows × cols)"), ("prefix_tokens", "Prefix tokens"), ("layers", "Layers"),
    ("heads", "Heads per layer"), ("input_size", "Input size (H × W px)"), ("has_cls", "CLS token"),
    ("num_classes", "Classes"),
]


def _e(value) -> str:
    return html.escape(str(value), quote=True)


_SIZE_KEYS = {"grid", "input_size", "Patch grid (rows × cols)", "Input size (H × W px)"}


def _fmt_value(value, key: str | None = None) -> str:
    """A manifest value as short plain text (before escaping); sizes as 'a × b'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, list | tuple) and all(isinstance(v, int | float | str) for v in value):
        if key in _SIZE_KEYS:
            return " × ".join(str(v) for v in value)
        return ", ".join(_fmt_value(v) for v in value) if value else "—"
    if isinstance(value, dict):
        return "; ".join(f"{k} = {_fmt_value(v, str(k))}" for k, v in value.items()) or "—"
    if isinstance(value, list | tuple):
        return json.dumps(value, default=str)
    if value is None or value == "":
        return "—"
    return str(value)


def _kv_table(rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt_value(v, k))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _image_bytes(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        return Path(src).read_bytes()
    raise ReportDataError(f"a figure must be a PNG path or PNG bytes, got {type(src).__name__}")


def data_uri(src) -> str:
    """A PNG/JPEG file path or its bytes as a base64 data URI."""
    data = _image_bytes(src)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        mime = "image/png"
    elif data[:3] == b"\xff\xd8\xff":
        mime = "image/jpeg"
    else:
        raise ReportDataError("a figure is neither PNG nor JPEG data; pass the paths save_figures returns")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _run_card(manifest: Mapping) -> str:
    model = manifest.get("model") or {}
    images = manifest.get("images") or {}
    params = manifest.get("params") or {}
    timing = manifest.get("timing") or {}
    versions = manifest.get("versions") or {}
    known = {k for k, _ in _MODEL_KEYS}
    mrows = [(label, model[k]) for k, label in _MODEL_KEYS if k in model]
    mrows += [(k, v) for k, v in model.items() if k not in known]
    irows = [("Image source", images.get("source")), ("Images analysed", images.get("analysed")),
             ("Images skipped", images.get("skipped", len(images.get("skipped_reasons") or []))),
             ("Analysed, but no keypoints", images.get("no_keypoints"))]
    irows += [(k, v) for k, v in images.items()
              if k not in {"source", "analysed", "skipped", "no_keypoints", "skipped_reasons"}]
    if manifest.get("level_names"):
        irows.append(("Semantic levels", ", ".join(str(x) for x in manifest["level_names"])))
    trows = []
    if manifest.get("created"):
        trows.append(("Created", manifest["created"]))
    if isinstance(timing.get("seconds"), int | float):
        sec = float(timing["seconds"])
        trows.append(("Wall time", f"{sec:.1f} s" if sec < 120 else f"{sec / 60:.1f} min"))
    elif "seconds" in timing:
        trows.append(("Wall time", timing["seconds"]))
    if isinstance(timing.get("images_per_s"), int | float):
        trows.append(("Throughput", f"{float(timing['images_per_s']):.3g} images/s"))
    elif "images_per_s" in timing:
        trows.append(("Throughput", timing["images_per_s"]))
    trows += [(k, v) for k, v in timing.items() if k not in {"seconds", "images_per_s"}]
    parts = [
        f"<div><h3>Model</h3>{_kv_table(mrows)}</div>",
        f"<div><h3>Images</h3>{_kv_table(irows)}</div>",
        f"<div><h3>Parameters</h3>{_kv_table(list(params.items()))}</div>",
        f"<div><h3>Timing</h3>{_kv_table(trows)}<h3>Versions</h3>{_kv_table(list(versions.items()))}</div>",
    ]
    return '<div class="card">' + "".join(parts) + "</div>"


def _skipped(manifest: Mapping) -> str:
    images = manifest.get("images") or {}
    reasons = list(images.get("skipped_reasons") or [])
    n = int(images.get("skipped", len(reasons)) or 0)
    if not reasons:
        text = "No image was skipped." if n == 0 else f"{n} images were skipped (no reasons recorded)."
        return f'<p class="muted">{text}</p>'
    items = "".join(
        f"<li><code>{_e(r.get('name', '?'))}</code>: {_e(r.get('reason', ''))}</li>"
        for r in reasons[:MAX_SKIPPED_LISTED]
    )
    if len(reasons) > MAX_SKIPPED_LISTED:
        items += f"<li class=\"muted\">… and {len(reasons) - MAX_SKIPPED_LISTED} more</li>"
    return (f"<details><summary>Skipped images ({max(n, len(reasons))}), with reasons</summary>"
            f"<ul>{items}</ul></details>")


def _top_table(s: pd.DataFrame, n_layers: int, alpha: float) -> str:
    sal = s[(s["metric"] == "sal") & (s["level_a"] < 0) & (s["level_b"] < 0) & (s["layer"] < n_layers)]
    cells = sal[sal["head"] >= 0]
    if cells.empty:
        cells = sal[sal["head"] < 0]
    if cells.empty:
        return '<p class="muted">The summary holds no SAL rows.</p>'
    top = cells.sort_values("mean", ascending=False).head(TOP_CELLS)
    head = ("<tr><th class=num>#</th><th class=num>Layer</th><th class=num>Head</th><th class=num>SAL</th>"
            "<th class=num>95% CI</th><th class=num>Null 95% range</th><th class=num>z</th>"
            "<th class=num>q</th><th class=num>Images</th></tr>")
    rows = []
    for i, r in enumerate(top.itertuples(index=False), 1):
        cls = ' class="sig"' if r.q < alpha else ""
        head_txt = "mean" if r.head < 0 else str(r.head)
        rows.append(
            f"<tr{cls}><td class=num>{i}</td><td class=num>{r.layer}</td><td class=num>{_e(head_txt)}</td>"
            f"<td class=num><strong>{r.mean:.2f}</strong></td><td class=num>{r.ci_lo:.2f}–{r.ci_hi:.2f}</td>"
            f"<td class=num>{r.null_lo:.2f}–{r.null_hi:.2f}</td>"
            f"<td class=num>{_e(bare(fmt_z(r.z)))}</td>"
            f"<td class=num>{_e(bare(fmt_q(r.q)))}</td>"
            f"<td class=num>{int(r.n)}</td></tr>"
        )
    note = (f'<p class="muted">Highlighted rows depart from the null (q &lt; {alpha:g}). '
            f"{len(cells)} cells in all; sorted by SAL, highest first.</p>")
    return f'<table class="top">{head}{"".join(rows)}</table>{note}'


def _figures_html(figures: Mapping[str, object]) -> str:
    order = [n for n in CAPTIONS if n in figures and n != "overlay"]
    order += [n for n in figures if n not in order and not n.startswith("overlay")]
    overlays = sorted(n for n in figures if n.startswith("overlay"))
    out = []
    for name in order:
        title, text = CAPTIONS.get(name, (_e(name.replace("_", " ").capitalize()), ""))
        out.append(_figure_block(figures[name], title, text, name))
    if overlays:
        out.append("<h3>Example images</h3>")
        title, text = CAPTIONS["overlay"]
        out.append(f"<p>{text}</p>")
        for name in overlays:
            out.append(_figure_block(figures[name], "", "", name))
    return "".join(out)


def _figure_block(src, title: str, text: str, name: str) -> str:
    # titles and captions above are the module's own trusted HTML; names come from callers: escaped
    cap = ""
    if title or text:
        cap = f'<figcaption><strong class="title">{title}</strong>{text}</figcaption>'
    return (f'<figure id="{_e(name)}"><img src="{data_uri(src)}" alt="{_e(title or name)}">'
            f'{cap}</figure>')


def render_html(summary: pd.DataFrame, manifest: Mapping | None, figures: Mapping[str, object],
                findings: Sequence[str], alpha: float = DEFAULT_ALPHA, min_effect: float = DEFAULT_MIN_EFFECT,
                min_rho: float = DEFAULT_MIN_RHO, explore: str = "") -> str:
    """The whole report as one HTML string; ``figures`` maps name -> PNG path or PNG bytes.

    ``alpha``, ``min_effect`` and ``min_rho`` only describe, in the text, the rule the findings used.
    ``explore``: the viewer's section (:func:`~siftlens.report.viewer.render_explore`), placed after the figures.
    """
    s = check_summary(summary)
    manifest = manifest or {}
    n_layers = num_layers(s, manifest)
    model = manifest.get("model") or {}
    images = manifest.get("images") or {}
    who = model.get("class") or model.get("source") or "model"
    sub = []
    if images.get("analysed") is not None:
        sub.append(f"{images['analysed']} images analysed")
    if model.get("layers") is not None and model.get("heads") is not None:
        sub.append(f"{model['layers']} layers × {model['heads']} heads")
    if model.get("grid"):
        sub.append(f"{_fmt_value(model['grid'], 'grid')} patches of {model.get('patch_size', '?')} px")
    if model.get("source") and model.get("source") != who:
        sub.append(f"source {model['source']}")
    n_lev = len(manifest.get("level_names") or []) or int((manifest.get("params") or {}).get("n_levels") or 0)
    levels = ", ".join(f"'{x}'" for x in level_names(manifest, n_lev)) if n_lev else ""
    fnd = "".join(f"<li>{_e(x)}</li>" for x in findings) or "<li>No findings were computed.</li>"
    level_note = (f"<p class=\"muted\">Semantic levels, from fewest to most keypoints: {_e(levels)}. "
                  "Layers and heads are numbered from 0.</p>" if levels else "")
    glossary = "".join(f"<dt>{t}</dt><dd>{d}</dd>" for t, d in GLOSSARY)
    return page(f"siftlens report — {_e(who)}", f"""<h1>Where does {_e(who)} look? Attention and SIFT keypoints</h1>
<p class="subtitle">{_e(" · ".join(sub))}</p>
<h2 id="findings">What we found</h2>
<ul class="findings">{fnd}</ul>
<p class="muted">Each sentence is computed from the summary table. 'Departs from the null' means
q &lt; {alpha:g} after Benjamini–Hochberg correction <em>and</em> a difference from the null of at least
{min_effect:.0%} (for Spearman ρ: {min_rho:g}); smaller but significant differences are called negligible.
The glossary at the end explains every metric.</p>
{level_note}
<h2 id="run">Run card</h2>
{_run_card(manifest)}
<h3>Skipped images</h3>
{_skipped(manifest)}
<h2 id="figures">Figures</h2>
{_figures_html(figures)}
{explore}
<h2 id="top">Top {TOP_CELLS} (layer, head) cells by SAL</h2>
{_top_table(s, n_layers, alpha)}
<h2 id="glossary">How to read these metrics</h2>
<dl class="glossary">{glossary}</dl>
<footer>Made by siftlens from the run's summary table and manifest. This page is self-contained:
it loads nothing from the network.</footer>""")
