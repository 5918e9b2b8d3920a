"""The analysis options are declared once (AnalysisConfig's fields): the command line shows each with its help
text and builds the same config as the Python API; recorded params are read nested and flat."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from siftlens.analysis.comparison import setting_differences
from siftlens.analysis.config import AnalysisConfig, configure, flat_params
from siftlens.cli import app
from siftlens.errors import ConfigError
from siftlens.keypoints import SiftOptions
from siftlens.options import flat_options


def _help(command: str) -> str:
    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"}).output
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)
    return re.sub(r"[\s│]+", " ", out)  # help text wrapped over lines reads as one line


def test_every_cli_field_is_in_the_help_with_its_text():
    text = _help("analyze")
    opts = flat_options(AnalysisConfig)
    assert {o.flag for o in opts} >= {"levels", "bootstrap", "batch-size", "upsample", "contrast-threshold", "seed"}
    for o in opts:
        assert f"--{o.flag} " in text, o.flag
        assert " ".join(o.help.split()) in text, o.flag
    hidden = {o.flag for o in flat_options(AnalysisConfig, cli_only=False)} - {o.flag for o in opts}
    assert hidden == {"thresholds", "max-pixels"}
    for flag in hidden:
        assert f"--{flag}" not in text


@pytest.fixture
def captured(monkeypatch):
    """What `siftlens analyze` hands the job: its config and arguments (no analysis runs)."""
    import siftlens.jobs as jobs

    got = {}

    def fake(model, images, out, config, options, **kw):
        got.update(model=model, images=images, config=config, options=options, **kw)
        return None, {}

    monkeypatch.setattr(jobs, "run_analysis", fake)
    return got


@pytest.mark.parametrize("args, overrides", [
    ([], {}),
    (["--levels", "4", "--bootstrap", "200", "--batch-size", "8", "--null", "200"],
     {"n_levels": 4, "n_boot": 200, "batch_size": 8, "null": 200}),
    (["--upsample", "2", "--contrast-threshold", "0.02", "--layers", "0,-1", "--seed", "3", "--limit", "10",
      "--rollout", "--null-kind", "shift"],
     {"upsample": 2.0, "contrast_threshold": 0.02, "layers": [0, -1], "seed": 3, "limit": 10, "rollout": True,
      "null_kind": "shift"}),
])
def test_the_cli_builds_the_config_the_python_api_builds(captured, tmp_path, args, overrides):
    r = CliRunner().invoke(app, ["analyze", "--model", "default", "--images", "imgs", "--out", str(tmp_path / "o"),
                                 "--weights", "w.pth", "--revision", "main", "--shard", "1/2", "--no-progress", *args])
    assert r.exit_code == 0, r.output
    assert captured["config"] == configure(None, **overrides)
    assert captured["model"] == "default" and captured["images"] == "imgs" and captured["revision"] == "main"
    assert captured["shard"] == "1/2" and captured["options"].weights == "w.pth"
    assert captured["options"].progress is False and captured["options"].report is True


def test_overrides_go_by_field_or_flag_name_into_the_groups():
    a = configure(None, n_levels=4, batch_size=8, upsample=2.0, n_boot=100)
    assert a == configure(None, levels=4, batch_size=8, upsample=2.0, bootstrap=100)
    assert (a.n_levels, a.run.batch_size, a.sift.upsample, a.n_boot) == (4, 8, 2.0, 100)
    assert configure(a, sift=SiftOptions(upsample=3.0)).sift == SiftOptions(upsample=3.0)
    assert a.run.batch_size == 8  # the config given is copied, not changed
    with pytest.raises(ConfigError, match="unknown analysis option"):
        configure(None, null_permutations=3)
    with pytest.raises(ConfigError, match="--null must be"):
        configure(None, null=3)


def test_identity_leaves_out_the_runtime_options_and_params_read_nested_and_flat():
    cfg = configure(None, batch_size=8, workers=1, seed=2, upsample=4.0, explore=0)
    ident = cfg.identity()
    assert ident["run"] == {"seed": 2, "limit": None} and ident["sift"]["upsample"] == 4.0
    assert "explore" not in ident and "part_size" not in ident and "overlays" not in ident
    flat = flat_params(ident)  # as runs written before the groups recorded it
    assert "run" not in flat and "sift" not in flat and flat["seed"] == 2 and "batch_size" not in flat
    assert AnalysisConfig.from_params(flat).identity() == AnalysisConfig.from_params(ident).identity()
    assert flat_params(ident)["upsample"] == 4.0 and flat_params(flat)["seed"] == 2
    old, new = {"params": flat}, {"params": configure(None, upsample=2.0, seed=2).identity()}
    assert setting_differences([old, new]) == {"upsample": [4.0, 2.0]}  # a flat run against a nested one
    assert setting_differences([old, {"params": ident}]) == {}
