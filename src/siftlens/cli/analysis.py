"""The analysis commands: analyze, merge, compare, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..models.layers import parse_layers
from ._app import app


@app.command()
def analyze(
    model: Annotated[str, typer.Option(help="Built-in name (default), a local siftlens or Hugging Face model "
                                            "folder, a Hugging Face hub id ORG/NAME (read from the cache in "
                                            "HF_HOME, downloaded when online), or timm:<name> (timm's pretrained "
                                            "weights, or --weights).")],
    images: Annotated[list[str], typer.Option(help="Images: a folder, a zip, archive.zip/inner/folder, a glob "
                                                   "(quote it), files (repeat the option), tar shards, HF datasets, "
                                                   "manifests: docs/data.md.")],
    out: Annotated[Path, typer.Option(help="Output folder: report.html, summary.csv, metrics.parquet, "
                                           "manifest.json, figures/.")],
    image_column: Annotated[str | None, typer.Option(help="Image column (HF data), path column (manifest) or "
                                                          "image extension (tar); default: detected.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column (HF data, manifest); default: label, "
                                                          "labels.")] = None,
    label_key: Annotated[str | None, typer.Option(help="Tar shards: the .json key of the label (else .cls).")] = None,
    id_column: Annotated[str | None, typer.Option(help="HF data: a stable id column (names split/<id>).")] = None,
    weights: Annotated[str | None, typer.Option(help="Weights file for timm:<name> (.safetensors or .pth).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of a hub id or of "
                                                     "timm's pretrained weights; the manifest records the commit.")]
    = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
    workers: Annotated[int, typer.Option(help="Data-loading worker processes (decode + SIFT in parallel).")] = 0,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layer indices (negative from the end); "
                                                    "default all.")] = None,
    scheme: Annotated[str, typer.Option(help="Patch weight: count | response | footprint.")] = "count",
    levels: Annotated[int, typer.Option(help="Semantic levels L (level 0 = no keypoints).")] = 3,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u; 0 = automatic (4 for 32x32 "
                                                 "inputs, 1 for 224).")] = 0.0,
    null: Annotated[str, typer.Option(help="Null model: 'exact' (closed-form permutation moments, or every "
                                           "cyclic shift) or an integer M >= 20 of Monte Carlo maps per image "
                                           "(the slower reference).")] = "exact",
    null_kind: Annotated[str, typer.Option(help="permute (shuffle patch weights) or shift (cyclic 2-D shifts, "
                                                "keeps spatial structure).")] = "permute",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% confidence intervals.")] = 1000,
    rollout: Annotated[bool, typer.Option(help="Also analyse attention rollout (reported as layer = depth).")]
    = False,
    seed: Annotated[int, typer.Option(help="Seed of the Monte Carlo null and the bootstrap (draws are keyed by "
                                           "image, so batch size, workers and shards do not change results).")] = 0,
    limit: Annotated[int | None, typer.Option(help="Analyse at most this many images (spread over classes).")]
    = None,
    overlays: Annotated[int, typer.Option(help="Images drawn with keypoints and attention in the report.")] = 4,
    explore: Annotated[int, typer.Option(help="The first this many images go into the report's interactive "
                                              "attention viewer (0: no viewer).")] = 8,
    part_size: Annotated[int, typer.Option(help="Images per part file of metrics.parquet; an interrupted run "
                                                "loses at most one part.")] = 256,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out (same options; batch size, "
                                              "workers and device may change).")] = False,
    shard: Annotated[str | None, typer.Option(help="i/K: analyse only shard i of K (images i, i+K, ...) into --out, "
                                                   "for SLURM arrays; combine with 'siftlens merge'.")] = None,
    report: Annotated[bool, typer.Option(help="Render figures/ and report.html.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Measure how attention treats keypoint-rich versus keypoint-poor patches, per layer and head.

    Per-image values are written to OUT/metrics.parquet as the run goes, so memory does not grow with the
    number of images, and an interrupted run continues with --resume. Under torchrun
    (torchrun --nproc_per_node K -m siftlens.cli analyze ...) the ranks split the images and rank 0 writes the
    summary and report."""
    from .. import jobs
    from ..analysis import AnalysisConfig
    from ..analysis.store import parse_shard
    from ..models.hub import with_revision

    model = with_revision(model, revision)
    cfg = AnalysisConfig(
        scheme=scheme, n_levels=levels, upsample=upsample, layers=parse_layers(layers), batch_size=batch_size,
        workers=workers, device=device, null=null, null_kind=null_kind, n_boot=bootstrap,
        seed=seed, limit=limit, rollout=rollout, overlays=overlays, part_size=part_size, explore=explore,
    )
    src = images[0] if len(images) == 1 else images
    src = _with_columns(src, limit, image_column=image_column, label_column=label_column, label_key=label_key,
                        id_column=id_column)
    part = parse_shard(shard) if shard else None
    opts = jobs.JobOptions(weights=weights, report=report, progress=progress)
    res, paths = jobs.run_analysis(model, src, out, cfg, opts, resume=resume, shard=part)
    if part is not None:
        typer.echo(jobs.shard_outcome(part, out))
    elif res is not None:
        typer.echo(jobs.analysis_outcome(res, paths))


def _with_columns(src, limit: int | None, **columns):
    """The source as an ImageSource when a column or key option is given (docs/data.md), else as given."""
    columns = {k: v for k, v in columns.items() if v is not None}
    if not columns:
        return src
    from ..data import ImageSource

    return ImageSource(src, limit=limit, **columns)


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
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Finished analysis folders; differences are against the "
                                                        "first.")],
    out: Annotated[Path, typer.Option(help="Output folder: differences.csv, summaries.csv, runs.csv, findings.txt, "
                                           "compare_curves.png.")],
    label: Annotated[list[str] | None, typer.Option(help="A name per run, in order (default: folder names).")] = None,
    force: Annotated[bool, typer.Option(help="Compare runs made with different settings (scheme, levels, u, "
                                             "null ...); the differences are printed.")] = False,
):
    """Compare analyses of several models or image sets: per-layer differences with bootstrap CIs (paired on
    the images the runs share), z, p and Benjamini-Hochberg q, and findings in words."""
    from .. import jobs

    c, paths = jobs.run_compare(run_dirs, out, labels=label, force=force)
    typer.echo(jobs.compare_outcome(c, paths))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Analyse the built-in default model on the bundled CIFAR-10 sample, offline, and print the report path."""
    from .. import jobs

    res, paths = jobs.run_demo(out, progress=progress)
    typer.echo(jobs.analysis_outcome(res, paths))
