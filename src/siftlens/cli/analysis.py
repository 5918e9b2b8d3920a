"""The analysis commands: analyze, merge, compare, demo.

analyze's and compare's options are generated from the fields of :class:`~siftlens.analysis.AnalysisConfig` and
:class:`~siftlens.analysis.comparison.CompareConfig` (:func:`~siftlens.cli.generate.config_command`); the job
arguments that are not config fields (the model, the images, the output folder ...) are declared here."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from ..analysis.comparison import CompareConfig
from ..analysis.config import AnalysisConfig
from ._app import app
from .generate import config_command, param

ANALYZE_DOC = """Measure how attention treats keypoint-rich versus keypoint-poor patches, per layer and head.

    Per-image values are written to OUT/metrics.parquet as the run goes, so memory does not grow with the
    number of images, and an interrupted run continues with --resume. Under torchrun
    (torchrun --nproc_per_node K -m siftlens.cli analyze ...) the ranks split the images and rank 0 writes the
    summary and report."""

ANALYZE_BEFORE = [
    param("model", str, "Built-in name (default), a local siftlens or Hugging Face model folder, a Hugging Face hub "
                        "id ORG/NAME (read from the cache in HF_HOME, downloaded when online), or timm:<name> "
                        "(timm's pretrained weights, or --weights)."),
    param("images", list[str], "Images: a folder, a zip, archive.zip/inner/folder, a glob (quote it), files (repeat "
                               "the option), tar shards, HF datasets, manifests: docs/data.md."),
    param("out", Path, "Output folder: report.html, summary.csv, metrics.parquet, manifest.json, figures/."),
    param("image_column", str | None, "Image column (HF data), path column (manifest) or image extension (tar); "
                                      "default: detected.", None),
    param("label_column", str | None, "Label column (HF data, manifest); default: label, labels.", None),
    param("label_key", str | None, "Tar shards: the .json key of the label (else .cls).", None),
    param("id_column", str | None, "HF data: a stable id column (names split/<id>).", None),
    param("weights", str | None, "Weights file for timm:<name> (.safetensors or .pth).", None),
    param("revision", str | None, "Hub revision (branch, tag or commit) of a hub id or of timm's pretrained "
                                  "weights; the manifest records the commit.", None),
]
ANALYZE_AFTER = [
    param("resume", bool, "Continue the interrupted run in --out (same options; batch size, workers and device may "
                          "change).", False),
    param("shard", str | None, "i/K: analyse only shard i of K (images i, i+K, ...) into --out, for SLURM arrays; "
                               "combine with 'siftlens merge'.", None),
    param("report", bool, "Render figures/ and report.html.", True),
    param("progress", bool, "Show a progress bar.", True),
]


def _analyze(cfg: AnalysisConfig, *, model: str, images: list[str], out: Path, image_column: str | None,
             label_column: str | None, label_key: str | None, id_column: str | None, weights: str | None,
             revision: str | None, resume: bool, shard: str | None, report: bool, progress: bool) -> None:
    from .. import jobs
    from ..jobs.analysis import image_source

    src = image_source(images, cfg.run.limit, image_column=image_column, label_column=label_column,
                       label_key=label_key, id_column=id_column)
    opts = jobs.JobOptions(weights=weights, report=report, progress=progress)
    res, paths = jobs.run_analysis(model, src, out, cfg, opts, resume=resume, shard=shard, revision=revision)
    if shard is not None:
        typer.echo(jobs.shard_outcome(shard, out))
    elif res is not None:
        typer.echo(jobs.analysis_outcome(res, paths))


config_command(app, AnalysisConfig, _analyze, name="analyze", doc=ANALYZE_DOC, before=ANALYZE_BEFORE,
               after=ANALYZE_AFTER)


def _argument(name: str, annotation: type, help: str) -> inspect.Parameter:
    """A positional command argument (the folders of merge and compare)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[annotation, typer.Argument(help=help)])


def _compare(cfg: CompareConfig, *, run_dirs: list[Path], out: Path, label: list[str] | None) -> None:
    from .. import jobs

    c, paths = jobs.run_compare(run_dirs, out, cfg, labels=label)
    typer.echo(jobs.compare_outcome(c, paths))


config_command(
    app, CompareConfig, _compare, name="compare",
    doc="""Compare analyses of several models or image sets: per-layer differences with bootstrap CIs (paired on
    the images the runs share), z, p and Benjamini-Hochberg q, and findings in words.""",
    before=[_argument("run_dirs", list[Path], "Finished analysis folders; differences are against the first."),
            param("out", Path, "Output folder: differences.csv, summaries.csv, runs.csv, findings.txt, "
                               "compare_curves.png."),
            param("label", list[str] | None, "A name per run, in order (default: folder names).", None)],
)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="Output folder for the combined tables and report.")],
    shard_dirs: Annotated[list[Path], typer.Argument(help="The folders written by 'analyze --shard i/K'.")],
    report: Annotated[bool, typer.Option(help="Render figures/ and report.html.")] = True,
):
    """Combine the shards of one analysis (written with --shard i/K) into the outputs of a single run."""
    from .. import jobs

    res, paths = jobs.run_merge(out, shard_dirs, report=report)
    typer.echo(jobs.analysis_outcome(res, paths))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Analyse the built-in default model on the bundled CIFAR-10 sample, offline, and print the report path."""
    from .. import jobs

    res, paths = jobs.run_demo(out, progress=progress)
    typer.echo(jobs.analysis_outcome(res, paths))
