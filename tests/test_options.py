"""Options declared once (siftlens.options) and the typer commands generated from them (siftlens.cli.generate)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from siftlens.cli.generate import config_command, param
from siftlens.errors import ConfigError
from siftlens.options import build, flat_options, group, option


def _layers(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


@dataclass
class Run:
    device: str = option("cpu", "Where the forward runs.")
    batch_size: int = option(32, "Images per forward pass.")


@dataclass
class Job:
    n_levels: int = option(3, "Semantic levels.", flag="levels")
    layers: list[int] | None = option(None, "Comma-separated layers.", parse=_layers)
    rollout: bool = option(False, "Also rollout.")
    limit: int | None = option(None, "At most this many images.")
    hidden: float = option(0.5, "Set from Python only.", cli=False)
    run: Run = group(Run, helps={"device": "Where this job runs."}, batch_size=64)  # this job's own default


def test_flat_options_flatten_groups_and_rename_flags():
    opts = {o.flag: o for o in flat_options(Job)}
    assert list(opts) == ["levels", "layers", "rollout", "limit", "device", "batch-size"]
    assert opts["batch-size"].path == ("run", "batch_size") and opts["batch-size"].default == 64
    assert opts["device"].default == "cpu" and Job().run == Run(batch_size=64)
    assert opts["device"].help == "Where this job runs." and opts["batch-size"].help == "Images per forward pass."
    assert opts["levels"].path == ("n_levels",) and opts["levels"].help == "Semantic levels."
    assert "hidden" in {o.flag for o in flat_options(Job, cli_only=False)}


def test_build_makes_the_nested_config_and_parses_text():
    cfg = build(Job, {"levels": 5, "layers": "0,-1", "batch_size": 8})
    assert cfg == Job(n_levels=5, layers=[0, -1], run=Run(batch_size=8))
    assert build(Job, {"device": "cuda"}).run == Run(device="cuda", batch_size=64)  # the job's group default stays
    assert build(Job, {}) == Job()
    with pytest.raises(ConfigError, match="unknown Job option"):
        build(Job, {"colour": "red"})


def test_a_flag_declared_twice_is_refused():
    @dataclass
    class Clash:
        device: str = option("cuda", "Another device.")
        run: Run = group(Run)

    with pytest.raises(ConfigError, match="--device is declared twice"):
        flat_options(Clash)


def test_the_generated_command_takes_every_field_with_its_help_and_builds_the_config():
    app = typer.Typer()
    got = {}

    def run(cfg: Job, model: str, progress: bool) -> None:
        got.update(cfg=cfg, model=model, progress=progress)

    config_command(app, Job, run, name="job", doc="Run the job.",
                   before=[param("model", str, "The model.")], after=[param("progress", bool, "Bar.", True)])
    app.command("other")(lambda: None)  # two commands, so typer keeps the command name
    runner = CliRunner()
    r = runner.invoke(app, ["job", "--model", "m", "--levels", "4", "--layers", "1,2", "--rollout",
                            "--batch-size", "16", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert got == {"cfg": Job(n_levels=4, layers=[1, 2], rollout=True, run=Run(batch_size=16)), "model": "m",
                   "progress": False}
    r = runner.invoke(app, ["job", "--model", "m"])
    assert r.exit_code == 0 and got["cfg"] == Job() and got["progress"] is True
    helptext = runner.invoke(app, ["job", "--help"], env={"COLUMNS": "200"}).output
    for text in ("Run the job.", "Semantic levels.", "Images per forward pass.", "--no-rollout", "--batch-size"):
        assert text in helptext
    assert "--hidden" not in helptext and "Set from Python only" not in helptext
    r = runner.invoke(app, ["job"])  # --model is required
    assert r.exit_code == 2 and "--model" in r.output
