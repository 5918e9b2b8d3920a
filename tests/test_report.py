"""The report package: findings from numbers, figures, and a self-contained, escaped HTML page.

Inputs are synthetic but shaped like the analysis runner's outputs: a summary table with one row per
(layer, head, metric, level_a, level_b), a run manifest and a few per-image overlays.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siftlens.report import (
    ReportDataError,
    findings,
    head_heatmap,
    layer_curves,
    level_matrices,
    overlay_figure,
    render_html,
    save_figure,
    save_figures,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATIO_METRICS = ("sal", "wi", "cls_lift")  # the scalar metrics of analysis.config, cls_rho apart


# ---------------------------------------------------------------- synthetic runner outputs

def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values."""
    p = np.asarray(p, float)
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(0, 1)
    out = np.empty_like(q)
    out[order] = q
    return out


def _row(layer, head, metric, la, lb, mean, half, null_mean, null_half, n=64):
    se = max(null_half / 1.96, 1e-6)
    z = (mean - null_mean) / se
    return dict(layer=layer, head=head, metric=metric, level_a=la, level_b=lb, n=n, mean=mean,
                ci_lo=mean - half, ci_hi=mean + half, null_mean=null_mean, null_lo=null_mean - null_half,
                null_hi=null_mean + null_half, z=z, p=max(math.erfc(abs(z) / math.sqrt(2)), 1e-300))


def make_summary(layers: int = 4, heads: int = 3, n_levels: int = 3, effect: str = "planted",
                 rollout: bool = True, grid: tuple[int, int] = (4, 4), patch: int = 8,
                 seed: int = 0) -> pd.DataFrame:
    """A summary table. effect: 'planted' (layer 2 head 1 SAL 2.0, all else null), 'null', 'realistic'."""
    rng = np.random.default_rng(seed)
    rows = []
    depth = np.linspace(0, 1, layers)
    for l in range(layers):
        for metric in RATIO_METRICS + ("cls_rho",):
            ref = 0.0 if metric == "cls_rho" else 1.0
            head_means = []
            for h in range(heads):
                if effect == "realistic" and metric != "cls_rho":
                    mean = 1 + 0.6 * depth[l] * (1 + 0.5 * np.sin(h + l)) + rng.normal(0, 0.02)
                    if h == heads - 1 and l == 1:
                        mean = 0.7
                elif effect == "realistic":
                    mean = 0.35 * depth[l] + rng.normal(0, 0.02)
                else:
                    mean = ref + rng.uniform(-0.01, 0.01)  # |z| < 1: never significant
                if effect == "planted" and metric == "sal" and (l, h) == (2, 1):
                    mean = 2.0
                half = 0.05 if effect != "null" else 0.03
                rows.append(_row(l, h, metric, -1, -1, mean, half, ref, 0.03))
                head_means.append(mean)
            hm = float(np.mean(head_means))
            if effect != "realistic":
                hm = ref + rng.uniform(-0.01, 0.01)
            rows.append(_row(l, -1, metric, -1, -1, hm, 0.02, ref, 0.02))
        for a in range(n_levels):
            for b in range(n_levels):
                if effect == "realistic":
                    v = 1 + 0.5 * depth[l] * (a - 1) * (b - 1) + rng.normal(0, 0.02)
                else:
                    v = 1 + rng.uniform(-0.01, 0.01)
                rows.append(_row(l, -1, "R", a, b, v, 0.04, 1.0, 0.05))
        for a in range(n_levels):
            # raw distance: richer levels look less far, as central patches do under any attention
            d = patch * (1.2 + 2.0 * depth[l] - 0.2 * a) + rng.normal(0, 0.1)
            rows.append(_row(l, -1, "dist", a, -1, d, 0.3, d, 0.5))
            if effect == "realistic":  # attention grows more local with depth, most for rich queries
                rel = 1 - 0.3 * depth[l] * (1 + 0.3 * a) + rng.normal(0, 0.005)
                rows.append(_row(l, -1, "dist_rel", a, -1, rel, 0.02, 1 - 0.39 * depth[l], 0.02))
            else:
                rel = 1 + rng.uniform(-0.005, 0.005)
                rows.append(_row(l, -1, "dist_rel", a, -1, rel, 0.02, 1.0, 0.02))
            e = np.log(grid[0] * grid[1]) * (0.95 - 0.3 * depth[l] - 0.03 * a)
            rows.append(_row(l, -1, "entropy", a, -1, e, 0.05, e, 0.1))
    if rollout:
        for metric in RATIO_METRICS + ("cls_rho",):
            ref = 0.0 if metric == "cls_rho" else 1.0
            mean = ref + (0.4 if effect == "realistic" else rng.uniform(-0.01, 0.01))
            rows.append(_row(layers, -1, metric, -1, -1, mean, 0.04, ref, 0.03))
    df = pd.DataFrame(rows)
    df["q"] = 1.0
    for _, idx in df.groupby(["metric", "level_a", "level_b"]).groups.items():
        df.loc[idx, "q"] = _bh(df.loc[idx, "p"].to_numpy())
    if effect == "planted":
        hit = (df["metric"] == "sal") & (df["layer"] == 2) & (df["head"] == 1)
        df.loc[hit, ["ci_lo", "ci_hi", "q", "p"]] = [1.95, 2.05, 1e-4, 1e-5]
    return df


def make_manifest(layers: int = 4, heads: int = 3, grid: tuple[int, int] = (4, 4), patch: int = 8,
                  n_levels: int = 3, skipped: list | None = None) -> dict:
    skipped = skipped if skipped is not None else [{"name": "broken/cat_17.png", "reason": "cannot decode"}]
    return {
        "model": {"backend": "native", "source": "runs/vit-cifar/model.safetensors", "class": "ViT",
                  "patch_size": patch, "grid": list(grid), "prefix_tokens": 1, "layers": layers,
                  "heads": heads, "input_size": [grid[0] * patch, grid[1] * patch], "has_cls": True,
                  "num_classes": 10},
        "images": {"source": "cifar10-jpg.zip:test", "analysed": 512, "skipped": len(skipped),
                   "skipped_reasons": skipped, "no_keypoints": 7},
        "params": {"scheme": "count", "n_levels": n_levels, "upsample": 4.0, "null": "exact",
                   "null_kind": "permute", "seed": 0, "batch_size": 64, "device": "cpu"},
        "versions": {"siftlens": "0.1.0", "torch": "2.x", "opencv": "4.x", "python": "3.11"},
        "timing": {"seconds": 93.4, "images_per_s": 5.48},
        "level_names": ["none", "low", "high"] if n_levels == 3 else [f"L{i}" for i in range(n_levels)],
    }


def make_overlays(count: int = 2, layers: int = 4, grid: tuple[int, int] = (4, 4), patch: int = 8,
                  seed: int = 0, names: list[str] | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    gh, gw = grid
    H, W = gh * patch, gw * patch
    out = []
    for i in range(count):
        px = np.zeros((H, W, 3), np.uint8)
        px[:] = rng.integers(40, 120, 3)
        for _ in range(4):  # a few coloured blocks: corners that SIFT would like
            y, x = rng.integers(0, H - 6), rng.integers(0, W - 6)
            px[y:y + rng.integers(3, 9), x:x + rng.integers(3, 9)] = rng.integers(0, 256, 3)
        k = int(rng.integers(3, 12))
        xy = np.column_stack([rng.uniform(0, W - 1, k), rng.uniform(0, H - 1, k)])
        size = rng.uniform(1.5, 6.0, k)
        col = np.clip(np.floor((xy[:, 0] + 0.5) / patch).astype(int), 0, gw - 1)
        row = np.clip(np.floor((xy[:, 1] + 0.5) / patch).astype(int), 0, gh - 1)
        weights = np.zeros(grid)
        np.add.at(weights, (row, col), 1.0)
        levels = np.where(weights == 0, 0, np.where(weights > np.median(weights[weights > 0]), 2, 1))
        cls = {}
        for layer in range(layers + 1):  # the last key is rollout
            logits = rng.normal(0, 0.3 + 0.4 * layer, grid) + 0.5 * layer * weights
            a = np.exp(logits - logits.max())
            cls[layer] = a / a.sum()
        out.append({"name": names[i] if names else f"test/{i:04d}.png", "pixels": px, "keypoints_xy": xy,
                    "keypoint_size": size, "weights": weights, "levels": levels, "cls_attention": cls,
                    "label": "cat", "prediction": "dog" if i % 2 else "cat"})
    return out


# ---------------------------------------------------------------- findings

def test_findings_name_the_planted_cell_with_its_numbers():
    out = findings(make_summary(effect="planted"), make_manifest())
    assert 1 <= len(out) <= 8 and all(isinstance(x, str) and x.endswith(".") for x in out)
    first = out[0]
    assert "layer 2 head 1" in first.lower()
    assert "2.00x" in first and "1.95–2.05" in first and "q=0.0001" in first
    text = " ".join(out)
    assert "indistinguishable from the null" in text
    assert "No layer or head departs" not in text
    # the other 11 cells are null, so exactly one favours
    assert "1 favours keypoint-rich patches, 0 avoid them and 11 are indistinguishable" in text


def test_findings_all_null_say_nothing_departs():
    out = findings(make_summary(effect="null"), make_manifest())
    assert out[0].startswith("No layer or head departs from the null")
    text = " ".join(out)
    assert "favours keypoint-rich patches most" not in text
    assert "is not correlated with keypoint weight" in text
    assert "no clear preference" in text


def test_findings_realistic_cover_trend_cls_levels_and_distance():
    s = make_summary(layers=6, heads=4, effect="realistic")
    out = findings(s, make_manifest(layers=6, heads=4))
    text = " ".join(out)
    top = s[(s["metric"] == "sal") & (s["head"] >= 0)].sort_values("mean").iloc[-1]
    assert f"layer {top['layer']} head {top['head']} favours" in out[0].lower()
    assert f"{top['mean']:.2f}x" in out[0]
    assert "SAL (mean over heads) rises" in text
    assert "Spearman rho" in text
    assert "attend mostly to each other" in text and "'high'" in text
    assert "avoids keypoint-rich patches" in text  # the planted 0.7 head
    assert len(out) <= 8


def _distance_sentence(out: list[str]) -> str:
    hits = [x for x in out if "distance" in x]
    assert len(hits) == 1, out
    return hits[0]


def test_findings_compare_levels_by_relative_distance():
    s = make_summary(layers=6, heads=4, effect="realistic")
    text = _distance_sentence(findings(s, make_manifest(layers=6, heads=4), max_sentences=20))
    rel = s[(s["metric"] == "dist_rel") & (s["layer"] == 5)].set_index("level_a")["mean"]
    assert f"in layer 5, 'high' patches attend {rel[2]:.2f}x as far as uniform attention would" in text
    assert f"'none' patches {rel[0]:.2f}x" in text
    assert "Relative to uniform attention, mean attention distance (averaged over levels) shrinks" in text
    rel0 = s[(s["metric"] == "dist_rel") & (s["layer"] == 0)]["mean"].mean()
    assert f"from {rel0:.2f}x in layer 0" in text
    # 'high' in the last layer is 0.48x against a null of 0.61x: a departure, with its q-value
    assert "departs from the shuffled-keypoint null" in text
    # raw pixels appear only for the depth trend, never as a gap between levels
    assert "px away" not in text and not re.search(r"'\w+' patches [^;]*px", text)


def test_raw_distance_gaps_from_geometry_are_not_findings():
    # a random model: raw distances differ by level (central patches are near everything) but relative
    # distance is 1.0 for every level; findings must not turn the raw gap into an attention effect
    s = make_summary(layers=4, heads=3, effect="null")
    raw = s[(s["metric"] == "dist") & (s["layer"] == 3)].set_index("level_a")["mean"]
    assert raw[0] - raw[2] > 3  # the confound is in the table
    text = _distance_sentence(findings(s, make_manifest(), max_sentences=20))
    assert re.search(r"in layer 3, 'high' patches attend 1\.00x as far as uniform attention would", text)
    assert "'none' patches 1.00x" in text
    assert "within what shuffled keypoints give" in text
    assert f"{raw[2]:.1f} px" not in text and f"{raw[0]:.1f} px" not in text
    # without relative distance (an old summary), levels are not compared at all
    old = findings(s[s["metric"] != "dist_rel"], make_manifest(), max_sentences=20)
    text = _distance_sentence(old)
    assert "levels are not compared" in text and "'high'" not in text


def test_findings_without_head_rows_or_optional_metrics():
    s = make_summary(effect="planted")
    s = s[(s["metric"] == "sal") & (s["head"] < 0)]
    out = findings(s, None)
    assert out and "departs from the null" in out[0]


def test_bad_summary_raises_a_clear_error():
    with pytest.raises(ReportDataError, match="lacks columns"):
        findings(pd.DataFrame({"layer": [0], "mean": [1.0]}), make_manifest())


# ---------------------------------------------------------------- figures

def test_figure_functions_return_figures_and_skip_missing_data(tmp_path):
    from matplotlib.figure import Figure

    s, m = make_summary(effect="realistic"), make_manifest()
    for fn in (layer_curves, head_heatmap, level_matrices):
        assert isinstance(fn(s, m), Figure)
    assert isinstance(overlay_figure(make_overlays(1)[0], m), Figure)
    with pytest.raises(ReportDataError):
        level_matrices(s[s["metric"] != "R"], m)
    paths = save_figures(s[s["metric"] != "R"], m, [], tmp_path)
    assert set(paths) == {"layer_curves", "head_heatmap", "distance_entropy"}
    assert not list(tmp_path.glob("*.part"))


def test_save_figure_is_atomic_and_writes_png(tmp_path):
    fig = layer_curves(make_summary(), make_manifest())
    p = save_figure(fig, tmp_path / "sub" / "x.png")
    assert p.read_bytes()[:8] == PNG_MAGIC
    assert [f.name for f in p.parent.iterdir()] == ["x.png"]


# ---------------------------------------------------------------- HTML

def test_write_report_is_self_contained(tmp_path):
    s, m = make_summary(effect="planted"), make_manifest()
    path = write_report(tmp_path, s, m, make_overlays(2))
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    figs = sorted((tmp_path / "figures").glob("*.png"))
    names = {f.stem for f in figs}
    assert names == {"layer_curves", "head_heatmap", "level_matrices", "distance_entropy",
                     "overlay_00", "overlay_01"}
    for f in figs:
        data = f.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    assert page.count('src="data:image/png;base64,') == len(figs)
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', page, flags=re.I)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs)
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page, flags=re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    for needle in ("What we found", "Run card", "How to read these metrics", "Layer 2 head 1 favours",
                   "Skipped images", "cannot decode", "Top 15"):
        assert needle in page
    assert not list(tmp_path.glob("*.part")) and not list((tmp_path / "figures").glob("*.part"))


def test_html_escapes_text_from_data(tmp_path):
    evil = '<script>alert("x")</script>'
    m = make_manifest(skipped=[{"name": evil, "reason": "<b>bad</b> & worse"}])
    m["model"]["class"] = "<img src=x onerror=alert(1)>"
    m["params"]["note"] = evil
    s = make_summary(effect="planted")
    ov = make_overlays(1, names=[evil + "$x$"])
    figs = save_figures(s, m, ov, tmp_path)
    png = figs["overlay_00"].read_bytes()
    page = render_html(s, m, {"overlay_00": png, "head_heatmap": figs["head_heatmap"], evil: png},
                       [f"finding about {evil}"])
    assert "<script" not in page.lower()
    assert "<img src=x" not in page and "<b>bad</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; worse" in page
    with pytest.raises(ReportDataError):
        render_html(s, m, {"x": b"not an image"}, [])


def _siftlens_imports(path: Path, package: str) -> set[str]:
    """The absolute ``siftlens...`` modules a file of ``package`` imports, relative imports resolved, local
    (function-level) imports included; ``from . import x`` counts as ``package.x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "siftlens" or m.startswith("siftlens.")}


def test_report_imports_only_the_ground_floor():
    """report/ renders tables and arrays it is given: it imports only itself, errors and io (never the
    analysis, the comparison, the models or the shortcut work, which come after it or beside it)."""
    pkg = Path(__file__).resolve().parents[1] / "src" / "siftlens" / "report"
    allowed = ("siftlens.report", "siftlens.errors", "siftlens.io")
    for f in pkg.glob("*.py"):
        for mod in _siftlens_imports(f, "siftlens.report"):
            assert mod.startswith(allowed), f"report/{f.name} imports {mod}"
    # the resolver itself sees what a module higher up imports
    jobs = _siftlens_imports(pkg.parent / "jobs" / "analysis.py", "siftlens.jobs")
    assert {"siftlens.analysis", "siftlens.analysis.comparison"} <= jobs


def test_degenerate_inputs_still_render(tmp_path):
    cols = list(make_summary().columns)
    empty = pd.DataFrame(columns=cols)
    assert "no SAL rows" in findings(empty, make_manifest())[0]
    ov = make_overlays(1)[0]
    ov["cls_attention"] = {str(k): v.ravel() for k, v in ov["cls_attention"].items()}  # JSON-style keys
    ov["weights"] = ov["weights"].ravel()
    ov["keypoints_xy"], ov["keypoint_size"] = np.zeros((0, 2)), np.zeros(0)
    m = make_manifest()
    m["model"]["has_cls"] = False
    path = write_report(tmp_path, empty, m, [ov, {**ov, "cls_attention": {}}])
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "The summary holds no SAL rows" in page


def test_tiny_but_significant_differences_are_not_findings():
    s = make_summary(effect="null")
    sal = s["metric"] == "sal"
    s.loc[sal, "mean"] = s.loc[sal, "null_mean"] + 0.01  # precisely measured, practically nothing
    s.loc[sal, "q"] = 0.001
    out = findings(s, make_manifest())
    assert out[0].startswith("No layer or head departs from the null by 5% or more")
    assert "differ significantly but negligibly" in out[0]
    out = findings(s, make_manifest(), min_effect=0.005)  # the margin is a parameter
    assert "favours keypoint-rich patches most" in out[0]
