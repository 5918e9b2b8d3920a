"""siftlens compare on real runs of the built-in model: a run against itself, against a random-init copy,
refused settings, and the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import siftlens
from siftlens.analysis import analyze
from siftlens.errors import ConfigError
from siftlens.jobs import demo_images_dir
from siftlens.models import load_backend

DEMO = str(demo_images_dir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    analyze("default", DEMO, out=root / "trained", limit=40, progress=False)
    b = load_backend("default")
    torch.manual_seed(0)
    for m in b.model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    analyze(b, DEMO, out=root / "random", limit=40, progress=False)
    analyze("default", DEMO, out=root / "response", limit=40, progress=False, scheme="response")
    return root


def test_a_run_against_itself_differs_by_exactly_zero(runs):
    c = siftlens.compare([runs / "trained", runs / "trained"], labels=["a", "b"])
    d = c.differences
    assert len(d) > 100 and (d["diff"] == 0).all() and (d["ci_lo"] == 0).all() and (d["ci_hi"] == 0).all()
    assert (d["q"] == 1).all()


def test_random_init_differs_with_paired_bootstrap(runs):
    c = siftlens.compare([runs / "trained", runs / "random"], labels=["trained", "random"])
    assert c.runs.set_index("run").loc["random", "shared_with_first"] == 40
    sal = c.differences.query("metric == 'sal' and head == -1").set_index("layer")
    summ = c.summaries.query("metric == 'sal' and head == -1 and level_a < 0")
    for layer, row in sal.iterrows():  # the difference is the difference of the two runs' means
        means = summ[summ["layer"] == layer].set_index("run")["mean"]
        assert row["diff"] == pytest.approx(means["random"] - means["trained"], abs=1e-9)
        assert row["ci_lo"] <= row["diff"] <= row["ci_hi"]
    assert (sal["q"] < 0.05).sum() >= 3  # a random network does not attend like the trained one
    # paired on shared images: the CI of a difference is narrower than the two runs' CIs combined
    widths = summ.groupby("layer").apply(lambda g: (g["ci_hi"] - g["ci_lo"]).sum(), include_groups=False)
    assert (sal["ci_hi"] - sal["ci_lo"]).median() < widths.median()
    text = siftlens.analysis.comparison.compare_findings(c)
    assert any("SAL" in t and "paired on all 40 shared images" in t for t in text)


def test_different_settings_are_refused_unless_forced(runs):
    with pytest.raises(ConfigError, match="scheme: count vs response.*--force"):
        siftlens.compare([runs / "trained", runs / "response"])
    c = siftlens.compare([runs / "trained", runs / "response"], force=True)
    assert c.setting_differences == {"scheme": ["count", "response"]}
    with pytest.raises(ConfigError, match="at least two"):
        siftlens.compare([runs / "trained"])


def test_cli_writes_tables_figure_and_findings(runs, tmp_path):
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "compare", str(runs / "trained"), str(runs / "random"),
                        "--out", str(out), "--label", "trained", "--label", "random"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "random vs trained, SAL" in r.stdout
    d = pd.read_csv(out / "differences.csv")
    assert not d.isna().any().any() and set(d["run"]) == {"random"}
    assert (out / "compare_curves.png").stat().st_size > 10_000
    page = (out / "compare.html").read_text()
    assert "random vs trained, SAL" in page and "data:image/png;base64," in page and "http" not in page
    bad = subprocess.run([sys.executable, "-m", "siftlens.cli", "compare", str(runs / "trained"),
                          str(runs / "response"), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--force" in bad.stderr
    assert np.isfinite(d["z"]).all()
