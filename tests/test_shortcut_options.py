"""The shortcut commands are generated from their configs: every command-line field of SpuriousConfig,
DiscoveryConfig, PromptConfig and RepairConfig (their groups included) is an option of its command, with the field's
help text and default, and the Python API takes one shape."""

from __future__ import annotations

import inspect
import re

import pytest
import typer
from typer.testing import CliRunner

from siftlens.benchmarks.spurious_cifar import SpuriousConfig
from siftlens.cli import app
from siftlens.options import build, flat_options
from siftlens.shortcuts import DiscoveryConfig, FlagOptions, PromptConfig, RepairConfig, discover, prompt, repair

COMMANDS = {"make-spurious": SpuriousConfig, "discover": DiscoveryConfig, "prompt": PromptConfig,
            "repair": RepairConfig}


def _words(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_config_option_is_in_the_command_help_with_its_help_text(name):
    cls = COMMANDS[name]
    out = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "3000", "NO_COLOR": "1"}, terminal_width=3000)
    assert out.exit_code == 0, out.output
    text = _words(out.output)
    params = {p.name: p for p in typer.main.get_command(app).commands[name].params}
    options = flat_options(cls)
    assert options, name
    for o in options:
        assert f"--{o.flag}" in text, (name, o.flag)
        assert _words(o.help) in text, (name, o.flag, o.help)
        assert params[o.name].help == o.help, (name, o.flag)
    # the fields kept out of the command line (cli=False) are not options
    hidden = {o.name for o in flat_options(cls, cli_only=False)} - {o.name for o in options}
    assert not hidden & set(params), hidden


def test_the_shared_flag_group_keeps_each_command_s_defaults():
    assert (PromptConfig().flags.top_words, PromptConfig().flags.extent) == (1, "center")
    r = RepairConfig()
    assert (r.flags.top_words, r.flags.score_ratio, r.flags.extent, r.run.batch_size) == (5, 0.25, "footprint", 128)
    assert isinstance(r.flags, FlagOptions) and type(PromptConfig().flags) is FlagOptions
    assert build(RepairConfig, {"dilate": 2, "workers": 1}).flags.dilate == 2


@pytest.mark.parametrize("fn", [discover, prompt, repair])
def test_the_jobs_take_one_shape(fn):
    ps = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in ps[:3]] == ["model", "images", "config"] and ps[2].default is None
    kw = {p.name: p.default for p in ps if p.kind is p.KEYWORD_ONLY}
    assert kw["progress"] is True and kw.get("weights", None) is None
