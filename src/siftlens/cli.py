"""The ``siftlens`` command line. Thin: it parses options, calls a job of :mod:`siftlens.jobs`, and prints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import cli_options as opt
from .errors import SiftlensError, one_line_warnings
from .models.layers import parse_layers

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Explain what Vision Transformer self-attention does, in terms of SIFT keypoints.",
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"siftlens {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print siftlens's version and exit.")] = False):
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
    keep_rate: opt.KeepRate = 1.0,
    keep_policy: opt.KeepPolicy = "random",
    keep_tau: opt.KeepTau = 1.0,
    keep_eps: opt.KeepEps = 1.0,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u for the sift keep policy; 0 = "
                                                 "automatic.")] = 0.0,
    keypoint_cache: Annotated[str | None, typer.Option(help="Keypoint cache (.npz) shared between runs on the "
                                                            "same images; default out/keypoints.npz.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt.")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many epochs in this invocation; "
                                                        "continue later with --resume.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Train the project's ViT (supervised); weights are saved as safetensors with a JSON config."""
    from .training.supervised import TrainConfig
    from .training.supervised import train as run_train

    cfg = TrainConfig(
        train=train, val=val, out=str(out), img_size=img_size, patch_size=patch_size, dim=dim, depth=depth,
        heads=heads, mlp_ratio=mlp_ratio, num_registers=registers, epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        pad=pad, drop_path=drop_path, seed=seed, device=device, threads=threads, limit=limit,
        val_limit=val_limit, keep_rate=keep_rate, keep_policy=keep_policy, keep_tau=keep_tau, keep_eps=keep_eps,
        upsample=upsample, keypoint_cache=keypoint_cache, resume=resume, stop_after=stop_after, progress=progress,
    )
    hist = run_train(cfg)
    last = hist["epochs"][-1] if hist["epochs"] else {}
    if len(hist["epochs"]) < epochs:
        typer.echo(f"stopped after epoch {len(hist['epochs'])}/{epochs}; continue with --resume. last: {last}")
    else:
        typer.echo(f"model saved to {out / 'model'}; final {last}")


@app.command()
def pretrain(
    train: Annotated[str, typer.Option(help="Training images in ImageFolder layout (folder, zip, or "
                                            "archive.zip/inner/folder); labels are used only for evaluation.")],
    out: Annotated[Path, typer.Option(help="Output folder: checkpoint.pt, history.json, curves.png, encoder/, "
                                           "mae/, keypoints.npz.")],
    val: Annotated[str | None, typer.Option(help="Held-out images (same class folders) for the reconstruction "
                                                 "loss, k-NN accuracy and the linear probe.")] = None,
    policy: Annotated[str, typer.Option(help="Masking policy: random | sift | sift-curriculum | kamim | "
                                             "attmask (the encoder's own CLS attention as the guide).")] = "random",
    tau: Annotated[float, typer.Option(help="sift: mask patches with probability ~ (w + eps)^tau (w = keypoints "
                                            "in the patch); tau > 0 hides keypoint-rich patches.")] = 1.0,
    tau_max: Annotated[float, typer.Option(help="sift-curriculum: tau ramps linearly from 0 to this.")] = 1.0,
    eps: Annotated[float, typer.Option(help="Added to the keypoint count before ^tau.")] = 1.0,
    lam: Annotated[float, typer.Option(help="Loss weight of a masked patch: 1 + lam * N * c_p (c_p: its share "
                                            "of the image's keypoints); 0 = plain MAE loss.")] = 0.0,
    kamim_temp: Annotated[float, typer.Option(help="kamim: temperature T of the weights exp(density / T).")]
    = 0.25,
    mask_ratio: Annotated[float, typer.Option(help="Fraction of patches masked.")] = 0.75,
    norm_pix: Annotated[bool, typer.Option(help="Targets: each patch's pixels normalised by its own mean and "
                                                "variance.")] = False,
    loss: Annotated[str, typer.Option(help="Per-pixel error: mse (MAE) or l1 (SimMIM / KAMIM).")] = "mse",
    img_size: Annotated[int, typer.Option(help="Input size; images are resized to it once.")] = 32,
    patch_size: Annotated[int, typer.Option(help="Patch size P; must divide img-size.")] = 4,
    dim: Annotated[int, typer.Option(help="Encoder width D.")] = 128,
    depth: Annotated[int, typer.Option(help="Encoder blocks.")] = 6,
    heads: Annotated[int, typer.Option(help="Encoder attention heads.")] = 4,
    decoder_dim: Annotated[int, typer.Option(help="Decoder width.")] = 128,
    decoder_depth: Annotated[int, typer.Option(help="Decoder blocks.")] = 2,
    feature: Annotated[str, typer.Option(help="Encoder feature for k-NN and probe: mean (patch tokens) or cls.")]
    = "mean",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 20,
    batch_size: Annotated[int, typer.Option(help="Global batch size.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, betas 0.9/0.95).")] = 1e-3,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up, in epochs.")] = 2.0,
    pad: Annotated[int, typer.Option(help="Random-crop padding in pixels (0: no crop).")] = 4,
    eval_every: Annotated[int, typer.Option(help="Evaluate on --val every this many epochs (and at the end).")]
    = 1,
    knn_train_limit: Annotated[int, typer.Option(help="Training images in the k-NN memory bank and the probe's "
                                                      "training set.")] = 5000,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u; 0 = automatic (128 / img-size, at "
                                                 "least 1).")] = 0.0,
    keypoint_cache: Annotated[str | None, typer.Option(help="Keypoint cache (.npz) shared between runs on the "
                                                            "same images; default out/keypoints.npz.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, shuffling, augmentation and masks.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use at most this many training images.")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Use at most this many held-out images.")] = None,
    keep_rate: opt.KeepRate = 1.0,
    keep_policy: opt.KeepPolicy = "random",
    keep_tau: opt.KeepTau = 1.0,
    keep_eps: opt.KeepEps = 1.0,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt (exactly).")] = False,
    stop_after: Annotated[int | None, typer.Option(help="Stop after this many epochs in this invocation; "
                                                        "continue later with --resume.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Masked-autoencoder pre-training of the project's ViT with random or SIFT-guided masking."""
    from .pretrain.engine import PretrainConfig
    from .pretrain.engine import pretrain as run_pretrain

    cfg = PretrainConfig(
        train=train, val=val, out=str(out), policy=policy, tau=tau, tau_max=tau_max, eps=eps, lam=lam,
        kamim_temp=kamim_temp, mask_ratio=mask_ratio, norm_pix=norm_pix, loss=loss, img_size=img_size,
        patch_size=patch_size, dim=dim, depth=depth, heads=heads, decoder_dim=decoder_dim,
        decoder_depth=decoder_depth, feature=feature, epochs=epochs, batch_size=batch_size, lr=lr,
        warmup_epochs=warmup_epochs, pad=pad, eval_every=eval_every, knn_train_limit=knn_train_limit,
        upsample=upsample, keypoint_cache=keypoint_cache, seed=seed, device=device, threads=threads, limit=limit,
        val_limit=val_limit, keep_rate=keep_rate, keep_policy=keep_policy, keep_tau=keep_tau, keep_eps=keep_eps,
        resume=resume, stop_after=stop_after, progress=progress,
    )
    hist = run_pretrain(cfg)
    last = hist["epochs"][-1] if hist["epochs"] else {}
    if len(hist["epochs"]) < epochs:
        typer.echo(f"stopped after epoch {len(hist['epochs'])}/{epochs}; continue with --resume. last: {last}")
    else:
        typer.echo(f"encoder saved to {out / 'encoder'}; final {last}")


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
    from . import jobs
    from .analysis import AnalysisConfig
    from .analysis.store import parse_shard
    from .models.hub import with_revision

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
    from .data import ImageSource

    return ImageSource(src, limit=limit, **columns)


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="Output folder for the combined tables and report.")],
    shard_dirs: Annotated[list[Path], typer.Argument(help="The folders written by 'analyze --shard i/K'.")],
    report: Annotated[bool, typer.Option(help="Render figures/ and report.html.")] = True,
):
    """Combine the shards of one analysis (written with --shard i/K) into the outputs of a single run."""
    from . import jobs

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
    from . import jobs

    c, paths = jobs.run_compare(run_dirs, out, labels=label, force=force)
    typer.echo(jobs.compare_outcome(c, paths))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Analyse the built-in default model on the bundled CIFAR-10 sample, offline, and print the report path."""
    from . import jobs

    res, paths = jobs.run_demo(out, progress=progress)
    typer.echo(jobs.analysis_outcome(res, paths))


@app.command("make-spurious")
def make_spurious(
    cifar: Annotated[str, typer.Option(help="CIFAR-10 root with train/ and test/ class folders (or cifar10/ "
                                            "holding them): a folder, cifar10-jpg.zip or a folder inside a zip.")],
    out: Annotated[Path, typer.Option(help="Output folder: train/, aligned/, conflicting/ (ImageFolder PNGs, each "
                                           "with markers.json), markers/, manifest.json.")],
    marker_size: Annotated[int, typer.Option(help="Marker side in pixels.")] = 8,
    rho: Annotated[float, typer.Option(help="Share of training images that carry their own class's marker.")]
    = 0.95,
    placement: Annotated[str, typer.Option(help="random | top-left | top-right | bottom-left | bottom-right.")]
    = "random",
    seed: Annotated[int, typer.Option(help="Seed: the build is a deterministic function of it.")] = 0,
    markers: Annotated[str | None, typer.Option(help="Folder with one marker image per class, named <class>.png "
                                                     "(any size); default: the built-in glyphs.")] = None,
    limit_per_class: Annotated[int | None, typer.Option(help="Use at most this many images per class and split "
                                                             "(a subset of the full build).")] = None,
    splits: Annotated[str, typer.Option(help="Splits to write (also: holdout).")] = "train,aligned,conflicting",
    holdout_start: Annotated[int, typer.Option(help="holdout: test images from this index per class on.")] = 500,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Build SpuriousCIFAR: CIFAR-10 images with a class-correlated marker glyph planted in each."""
    from . import jobs
    from .benchmarks.spurious_cifar import SpuriousConfig

    cfg = SpuriousConfig(cifar=cifar, out=str(out), marker_size=marker_size, rho=rho, placement=placement, seed=seed,
                         markers=markers, limit_per_class=limit_per_class,
                         splits=tuple(s.strip() for s in splits.split(",") if s.strip()),
                         holdout_start=holdout_start, progress=progress)
    typer.echo(jobs.spurious_outcome(jobs.make_spurious(cfg), out))


@app.command()
def discover(
    model: Annotated[str, typer.Option(help="A local siftlens or Hugging Face classifier folder, a hub id "
                                            "ORG/NAME, a built-in name, or timm:<name> (pretrained or --weights).")],
    images: Annotated[str, typer.Option(help="Images: a folder, a zip, archive.zip/inner/folder or a glob.")],
    out: Annotated[Path, typer.Option(help="Output folder: candidates.csv, discovery.json, keypoints.parquet, "
                                           "report.html.")],
    weights: Annotated[str | None, typer.Option(help="Weights file for timm:<name>.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of a hub id or of "
                                                     "timm's pretrained weights; the manifest records the commit.")]
    = None,
    vocab: Annotated[int, typer.Option(help="Visual words K (k-means clusters of SIFT descriptors).")] = 256,
    vocab_sample: Annotated[int, typer.Option(help="Descriptors sampled for k-means.")] = 100_000,
    attention: Annotated[str, typer.Option(help="last (CLS attention of the last layer, mean over heads) or "
                                                "rollout.")] = "last",
    boxes: Annotated[str | None, typer.Option(help="JSON of object boxes per image name, [x0, y0, x1, y1] in the "
                                                   "original image's pixels: adds the off-object share.")] = None,
    occlude: Annotated[str, typer.Option(help="Causal check: drop (remove tokens) or mean (fill patches with the "
                                              "image's mean colour).")] = "drop",
    causal_top: Annotated[int, typer.Option(help="Candidates per class checked by occlusion.")] = 10,
    causal_images: Annotated[int, typer.Option(help="Images per checked candidate.")] = 32,
    control: Annotated[str, typer.Option(help="Causal check's control patches: matched (same keypoint counts as the "
                                              "candidate's patches) or random.")] = "matched",
    regions: Annotated[int, typer.Option(help="Region words R (k-means of the model's patch tokens), ranked with "
                                              "the SIFT words; 0 = SIFT words only.")] = 128,
    region_layer: Annotated[int, typer.Option(help="Block whose output tokens are clustered (0 = patch "
                                                   "embedding, -1 = last).")] = 0,
    min_images: Annotated[int, typer.Option(help="Rank a (class, word) only when seen in this many images "
                                                 "predicted as the class.")] = 5,
    top: Annotated[int, typer.Option(help="Candidates per class kept in discovery.json and the report.")] = 10,
    gallery: Annotated[int, typer.Option(help="Example patches per top candidate in the report.")] = 12,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u; 0 = automatic.")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of k-means, sampling and the occlusion control.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use at most this many images (spread over classes).")] = None,
    evaluate: Annotated[bool | None, typer.Option(help="Score the ranking against a SpuriousCIFAR markers.json in "
                                                       "--images (default: when present).")] = None,
    report: Annotated[bool, typer.Option(help="Write report.html.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Find visual words the model attends to, that come with a class, and that its predictions depend on."""
    from . import jobs
    from .models.hub import with_revision
    from .shortcuts.discovery.config import DiscoveryConfig

    model = with_revision(model, revision)
    cfg = DiscoveryConfig(vocab_size=vocab, vocab_sample=vocab_sample, attention=attention, upsample=upsample,
                          batch_size=batch_size, workers=workers, device=device, seed=seed, limit=limit,
                          min_images=min_images, causal_top=causal_top, causal_images=causal_images, occlude=occlude,
                          control=control, regions=regions, region_layer=region_layer, top=top, gallery=gallery)
    opts = jobs.JobOptions(weights=weights, report=report, progress=progress)
    res, paths = jobs.run_discovery(model, images, out, cfg, boxes=boxes, evaluate=evaluate, options=opts)
    typer.echo(jobs.discovery_outcome(res, paths))


@app.command()
def prompt(
    model: Annotated[str, typer.Option(help="A local siftlens or Hugging Face classifier folder, a hub id "
                                            "ORG/NAME, a built-in name, or timm:<name> (pretrained or --weights).")],
    images: Annotated[str, typer.Option(help="Labelled images in ImageFolder layout (folder, zip, "
                                             "archive.zip/inner/folder).")],
    out: Annotated[Path, typer.Option(help="Output folder: prompting.json, predictions.csv.")],
    policy: Annotated[str, typer.Option(help="drop | keep-top | bias | none.")] = "drop",
    candidates: Annotated[str | None, typer.Option(help="discovery.json (or its folder) from `siftlens discover`: "
                                                        "its top words flag patches.")] = None,
    top_words: Annotated[int, typer.Option(help="Flag each class's this many best-ranked words.")] = 1,
    score_ratio: Annotated[float, typer.Option(help="...of those, only words scoring at least this fraction of the "
                                                    "class's best score.")] = 0.0,
    extent: Annotated[str, typer.Option(help="Flag the patch of each flagged keypoint's centre (center) or every "
                                             "patch its footprint touches (footprint).")] = "center",
    dilate: opt.Dilate = 0,
    q: Annotated[float, typer.Option(help="keep-top: fraction of patches kept.")] = 0.5,
    beta: Annotated[float, typer.Option(help="bias: strength of the semantic prior beta * log(eps + c_j).")] = 1.0,
    eps: Annotated[float, typer.Option(help="bias: eps in log(eps + c_j).")] = 1e-3,
    flag_bias: Annotated[float, typer.Option(help="bias: added to the logits of flagged keys.")] = -1e4,
    layers: Annotated[str | None, typer.Option(help="bias: comma-separated layers (negative from the end); "
                                                    "default all.")] = None,
    drop_mode: Annotated[str, typer.Option(help="group (exact removal, one forward per kept count) or mask "
                                                "(-inf key mask).")] = "group",
    scheme: Annotated[str, typer.Option(help="Semantic weight per patch: count | response | footprint.")] = "count",
    groups: Annotated[str | None, typer.Option(help="SpuriousCIFAR markers.json for groups (default: the one in "
                                                    "--images, else groups are classes).")] = None,
    weights: Annotated[str | None, typer.Option(help="Weights file for timm:<name>.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit) of a hub id or of "
                                                     "timm's pretrained weights; the manifest records the commit.")]
    = None,
    upsample: Annotated[float, typer.Option(help="SIFT upsampling factor u; 0 = automatic.")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of tie-breaking in keep-top.")] = 0,
    limit: Annotated[int | None, typer.Option(help="Use at most this many images (spread over classes).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Intervene on patch tokens at inference (no retraining) and report accuracy before and after."""
    from . import jobs
    from .models.hub import with_revision
    from .shortcuts.prompting import PromptConfig

    model = with_revision(model, revision)
    cfg = PromptConfig(policy=policy, candidates=candidates, top_words=top_words, score_ratio=score_ratio,
                       extent=extent, dilate=dilate, q=q, beta=beta,
                       eps=eps, flag_bias=flag_bias, layers=parse_layers(layers), drop_mode=drop_mode, scheme=scheme,
                       upsample=upsample, batch_size=batch_size, workers=workers, device=device, seed=seed,
                       limit=limit, groups=groups)
    res, paths = jobs.run_prompt(model, images, out, cfg, jobs.JobOptions(weights=weights, progress=progress))
    typer.echo(jobs.prompt_outcome(res, paths))


@app.command()
def repair(
    model: Annotated[str, typer.Option(help="A siftlens model folder (its head, or more, is retrained).")],
    images: Annotated[str, typer.Option(help="Labelled training images in ImageFolder layout.")],
    candidates: Annotated[str, typer.Option(help="discovery.json (or its folder) from `siftlens discover`.")],
    out: Annotated[Path, typer.Option(help="Output folder: model/ (a normal siftlens model) and repair.json.")],
    top_words: Annotated[int, typer.Option(help="Flag each class's this many best-ranked candidates.")] = 5,
    score_ratio: Annotated[float, typer.Option(help="...scoring at least this share of the class's best.")] = 0.25,
    groups: opt.RepairGroups = "discovery",
    l2: Annotated[float, typer.Option(help="Weight decay of the new head.")] = 1e-3,
    pool: Annotated[str, typer.Option(help="Features: model (its pooling) | cls | mean (patch tokens).")] = "model",
    iters: Annotated[int, typer.Option(help="L-BFGS iterations.")] = 200, head_start: opt.RepairStart = "fit",
    blocks: opt.RepairBlocks = 0, epochs: opt.RepairEpochs = 3, lr: opt.RepairLr = 1e-4, dilate: opt.Dilate = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (and per fine-tuning step).")] = 128,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    limit: Annotated[int | None, typer.Option(help="Use at most this many images (spread over classes).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
):
    """Retrain the classification head (with --blocks also the last blocks) with the shortcut's tokens dropped."""
    from . import jobs
    from .shortcuts.retraining.head import RepairConfig

    cfg = RepairConfig(candidates=candidates, top_words=top_words, score_ratio=score_ratio, groups=groups, l2=l2,
                       pool=pool, iters=iters, blocks=blocks, epochs=epochs, lr=lr, head_start=head_start,
                       dilate=dilate, batch_size=batch_size, device=device, limit=limit)
    typer.echo(jobs.repair_outcome(jobs.run_repair(model, images, out, cfg, progress), out))


def main() -> None:
    one_line_warnings()
    try:
        app()
    except SiftlensError as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
