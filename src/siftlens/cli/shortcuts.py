"""The shortcut commands: make-spurious, discover, prompt, repair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import cli_options as opt
from ..models.layers import parse_layers
from ._app import app


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
    from .. import jobs
    from ..benchmarks.spurious_cifar import SpuriousConfig

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
    from .. import jobs
    from ..models.hub import with_revision
    from ..shortcuts.discovery.config import DiscoveryConfig

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
    from .. import jobs
    from ..models.hub import with_revision
    from ..shortcuts.prompting import PromptConfig

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
    from .. import jobs
    from ..shortcuts.retraining.head import RepairConfig

    cfg = RepairConfig(candidates=candidates, top_words=top_words, score_ratio=score_ratio, groups=groups, l2=l2,
                       pool=pool, iters=iters, blocks=blocks, epochs=epochs, lr=lr, head_start=head_start,
                       dilate=dilate, batch_size=batch_size, device=device, limit=limit)
    typer.echo(jobs.repair_outcome(jobs.run_repair(model, images, out, cfg, progress), out))
