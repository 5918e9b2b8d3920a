"""Notebooks (issue 24 item 5): results show themselves in Jupyter, and examples/quickstart.ipynb runs in a real
kernel (nbclient + ipykernel, the test's own Python) and shows the result, a figure and the viewer."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import make_manifest, make_overlays, make_summary

from siftlens.analysis.comparison import Comparison
from siftlens.analysis.runner import AnalysisResult
from siftlens.report import ReportDataError, analysis_html, comparison_html, viewer_html
from siftlens.report.notebook import MAX_ROWS, significant_cells
from siftlens.report.viewer import read_payload

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"')


def _rows(page: str) -> int:
    m = re.search(r'<table class="sl-significant">.*?</table>', page, re.S)
    return 0 if m is None else m.group(0).count("<tr>") - 1  # minus the header row


def test_significant_cells_sorted_by_abs_z_capped_and_no_variation_never_significant():
    s = make_summary(effect="realistic")
    s["note"] = ""
    s.loc[s.index[:5], ["z", "p", "q"]] = np.nan  # cells with no variation: empty z, p, q
    s.loc[s.index[:5], "note"] = "no variation"
    top = significant_cells(s, 0.05, None)
    assert len(top) == int((s["q"] < 0.05).sum()) and not top.index.isin(s.index[:5]).any()
    z = top["z"].abs().to_numpy()
    assert (np.diff(z) <= 0).all()
    assert len(significant_cells(s)) == min(MAX_ROWS, len(top))


def test_analysis_result_shows_the_headline_figure_and_the_significant_cells(tmp_path):
    s = make_summary(effect="realistic")
    s["note"] = ""
    s.loc[s.index[:3], ["z", "p", "q"]] = np.nan
    s.loc[s.index[:3], "note"] = "no variation"
    res = AnalysisResult(tmp_path, s, pd.DataFrame(), make_manifest())
    page = res._repr_html_()
    assert IMG.search(page), "no inline PNG of the headline figure"
    n_sig = int((s["q"] < 0.05).sum())
    assert n_sig > MAX_ROWS and _rows(page) == MAX_ROWS
    assert f"{n_sig} of {len(s)} cells have q &lt; 0.05 (3 have no variation" in page
    assert not re.search(r"\bnan\b", re.sub(r"base64,[^\"]+", "", page), re.I)
    first = significant_cells(s).iloc[0]
    assert f"<td class=num>{first['mean']:.3f}</td>" in page  # the strongest cell is the table's first row
    # nothing significant, and a table with no curve metrics: a note, no table, no error
    quiet = s.assign(q=1.0)
    page = analysis_html(quiet[quiet["metric"] == "R"], make_manifest())
    assert "0 of" in page and 'class="sl-significant"' not in page and "No figure" in page


def test_comparison_shows_every_runs_curves_and_the_cells_that_differ():
    a, b = make_summary(effect="realistic", seed=0), make_summary(effect="realistic", seed=1)
    summaries = pd.concat([a.assign(run="base"), b.assign(run="other")], ignore_index=True)
    key = ["layer", "head", "metric", "level_a", "level_b"]
    d = a[key].copy()
    d["run"], d["mean_base"], d["mean"] = "other", a["mean"], b["mean"]
    d["diff"] = d["mean"] - d["mean_base"]
    d["ci_lo"], d["ci_hi"] = d["diff"] - 0.05, d["diff"] + 0.05
    d["z"] = d["diff"] / 0.025
    d["p"] = np.nan
    d["q"] = np.where(d["z"].abs() > 2, 0.001, 0.5)
    d.loc[d.index[:2], ["z", "q"]] = np.nan
    runs = pd.DataFrame({"run": ["base", "other"], "depth": [4, 4]})
    page = Comparison(["base", "other"], summaries, d, runs)._repr_html_()
    assert IMG.search(page)
    assert _rows(page) == min(MAX_ROWS, int((d["q"] < 0.05).sum())) > 0
    assert "Differences are against base" in page
    assert "No differences were computed" in comparison_html(pd.DataFrame(), summaries, ["base", "other"], 4)


def test_viewer_html_is_the_reports_viewer_in_an_iframe():
    m = make_manifest()
    records = []
    for ov in make_overlays(2):
        n = int(np.prod(np.shape(ov["weights"])))
        att = np.random.default_rng(0).random((2, 3, 1 + n, n)).astype(np.float32)
        records.append({**ov, "attention": att / att.sum(-1, keepdims=True), "layers": [0, 1],
                        "levels": np.zeros(n, int)})
    frame = viewer_html(records, m)
    assert frame.startswith("<iframe") and 'srcdoc="' in frame
    import html

    page = html.unescape(re.search(r'srcdoc="(.*?)"', frame, re.S).group(1))
    assert len(read_payload(page)["images"]) == 2 and 'id="sl-explore"' in page
    with pytest.raises(ReportDataError, match="explore"):
        viewer_html([], m)


# -- the quickstart notebook in a real kernel -----------------------------------------------------------------
def _kernel_of_this_python(root: Path) -> str:
    """A kernelspec that starts this test's own Python (``sys.executable -m ipykernel_launcher``), first on
    JUPYTER_PATH, so no other 'python3' kernel installed on the machine is picked instead."""
    spec = root / "kernels" / "siftlens-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "siftlens test", "language": "python"}))
    return "siftlens-test"


def _html(outputs: list) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in outputs)


def test_quickstart_notebook_runs_in_a_real_kernel(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebook]' (or '.[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebook]' (or '.[dev]')")
    pytest.importorskip("ipykernel", reason="pip install -e '.[notebook]' (or '.[dev]')")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"  # what a user's Jupyter opens it with
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    kernel = _kernel_of_this_python(tmp_path / "jupyter")
    t = time.perf_counter()
    nbclient.NotebookClient(nb, kernel_name=kernel, timeout=240,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    took = time.perf_counter() - t
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # the kernel ran this Python with this siftlens: the first cell prints the bundled images' folder
    from siftlens.jobs import demo_images_dir

    assert str(demo_images_dir()) in "".join(o.get("text", "") for o in code[0].outputs), code[0].outputs
    result = next(c for c in code if c.source.strip() == "res")
    page = _html(result.outputs)
    assert 'class="sl-significant"' in page and _rows(page) == MAX_ROWS, page[:500]
    assert IMG.search(page) and "cells have q &lt; 0.05" in page
    figure = next(c for c in code if "head_heatmap(" in c.source)
    assert any("image/png" in o.get("data", {}) for o in figure.outputs), figure.outputs
    viewer = next(c for c in code if "viewer_html(" in c.source)
    frame = _html(viewer.outputs)
    assert frame.startswith("<iframe") and "sl-explore-data" in frame
    assert took < 120, f"the notebook took {took:.0f} s"
