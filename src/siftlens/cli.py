"""The ``siftlens`` command line. Thin: it parses options, then calls the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import SiftlensError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Explain what Vision Transformer self-attention does, in terms of SIFT keypoints.",
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False):
    _state["debug"] = debug


@app.command()
def train(
    train: Annotated[str, typer.Option(help="Training images in ImageFolder layout: a folder, a zip, or "
                                            "a folder inside a zip (archive.zip/inner/folder).")],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoint.pt, history.json, model/.")],
    val: Annotated[str | None, typer.Option(help="Held-out images (same class folders), evaluated every "
                                                 "epoch.")] = None,
    img_size: Annotated[int, typer.Option(help="Input size; images are resized to it once.")] = 32,
    patch_size: Annotated[int, typer.Option(help="Patch size P; must divide img-size.")] = 4,
    dim: Annotated[int, typer.Option(help="Width D.")] = 128,
    depth: Annotated[int, typer.Option(help="Number of blocks.")] = 6,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    mlp_ratio: Annotated[float, typer.Option(help="MLP hidden width / D.")] = 2.0,
    registers: Annotated[int, typer.Option(help="Register tokens after CLS.")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 25,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up, in epochs.")] = 2.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.1,
    pad: Annotated[int, typer.Option(help="Random-crop padding in pixels (0: no crop).")] = 4,
    drop_path: Annotated[float, typer.Option(help="Stochastic depth rate.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many training images.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Use at most this many held-out images.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many epochs in this invocation; "
                                                        "continue later with --resume.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train the project's ViT (supervised); weights are saved as safetensors with a JSON config."""
    from .train import TrainConfig
    from .train import train as run_train

    cfg = TrainConfig(
        train=train, val=val, out=str(out), img_size=img_size, patch_size=patch_size, dim=dim, depth=depth,
        heads=heads, mlp_ratio=mlp_ratio, num_registers=registers, epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        pad=pad, drop_path=drop_path, seed=seed, device=device, threads=threads, limit=limit,
        val_limit=val_limit, resume=resume, stop_after=stop_after, progress=progress,
    )
    hist = run_train(cfg)
    last = hist["epochs"][-1] if hist["epochs"] else {}
    if len(hist["epochs"]) < epochs:
        typer.echo(f"stopped after epoch {len(hist['epochs'])}/{epochs}; continue with --resume. last: {last}")
    else:
        typer.echo(f"model saved to {out / 'model'}; final {last}")


def _layers(spec: str | None) -> list[int] | None:
    if spec is None or spec.strip() in ("", "all"):
        return None
    try:
        return [int(t) for t in spec.split(",") if t.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"--layers takes comma-separated integers like 0,5,-1, not {spec!r}") from e


def _print_outcome(res, paths) -> None:
    m = res.manifest
    im = m["images"]
    typer.echo(
        f"analysed {im['analysed']} images ({im['no_keypoints']} without keypoints, {im['skipped']} skipped) "
        f"in {m['timing']['seconds']:.1f} s ({m['timing']['images_per_s']:.1f} images/s)"
    )
    for k in ("metrics", "summary", "manifest"):
        typer.echo(f"  {k:9s} {paths[k]}")
    if "report" in paths:
        typer.echo(f"report: {paths['report']}")


@app.command()
def analyze(
    model: Annotated[str, typer.Option(help="Built-in name (default), a local siftlens or Hugging Face model "
                                            "folder, or timm:<name> (with --weights).")],
    images: Annotated[list[str], typer.Option(help="Images: a folder, a zip, archive.zip/inner/folder, a glob "
                                                   "(quote it), or files; repeat the option for several files.")],
    out: Annotated[Path, typer.Option(help="Output folder: report.html, summary.csv, metrics.parquet, "
                                           "manifest.json, figures/.")],
    weights: Annotated[str | None, typer.Option(help="Weights file for timm:<name> (.safetensors or .pth).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
    workers: Annotated[int, typer.Option(help="Data-loading worker processes (decode + SIFT in parallel).")] = 0,
    layers: Annotated[str | None, typer.Option(help="Comma-separated layer indices (negative from the end); "
                                                    "default all.")] = None,
    scheme: Annotated[str, typer.Option(help="Patch weight: count | response | footprint.")] = "count",
    levels: Annotated[int, typer.Option(help="Semantic levels L (level 0 = no keypoints).")] = 3,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u; 0 = automatic (4 for 32x32 "
                                                 "inputs, 1 for 224).")] = 0.0,
    null: Annotated[int, typer.Option(help="Null-model resamplings per image (>= 20).")] = 100,
    null_kind: Annotated[str, typer.Option(help="permute (shuffle patch weights) or shift (cyclic 2-D shifts, "
                                                "keeps spatial structure).")] = "permute",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% confidence intervals.")] = 1000,
    rollout: Annotated[bool, typer.Option(help="Also analyse attention rollout (reported as layer = depth).")]
    = False,
    seed: Annotated[int, typer.Option(help="Seed of the null model and bootstrap.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Analyse at most this many images (spread over classes).")]
    = None,
    overlays: Annotated[int, typer.Option(help="Images drawn with keypoints and attention in the report.")] = 4,
    report: Annotated[bool, typer.Option(help="Render figures/ and report.html.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Measure how attention treats keypoint-rich versus keypoint-poor patches, per layer and head."""
    from .analysis import AnalysisConfig
    from .pipeline import run_analysis

    cfg = AnalysisConfig(
        scheme=scheme, n_levels=levels, upsample=upsample, layers=_layers(layers), batch_size=batch_size,
        workers=workers, device=device, null_permutations=null, null_kind=null_kind, n_boot=bootstrap,
        seed=seed, limit=limit, rollout=rollout, overlays=overlays,
    )
    src = images[0] if len(images) == 1 else images
    res, paths = run_analysis(model, src, out, cfg, weights=weights, report=report, progress=progress)
    _print_outcome(res, paths)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Analyse the built-in default model on the bundled CIFAR-10 sample, offline, and print the report path."""
    from .pipeline import run_demo

    res, paths = run_demo(out, progress=progress)
    _print_outcome(res, paths)


def main() -> None:
    try:
        app()
    except SiftlensError as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
