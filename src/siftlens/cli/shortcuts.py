"""The shortcut commands: make-spurious, discover, prompt, repair, retrain, and the anchors anchor-jtt, anchor-afr,
anchor-dfr.

Their options are generated from the fields of :class:`~siftlens.benchmarks.spurious_cifar.SpuriousConfig`,
:class:`~siftlens.shortcuts.DiscoveryConfig`, :class:`~siftlens.shortcuts.PromptConfig`,
:class:`~siftlens.shortcuts.RepairConfig` and :class:`~siftlens.shortcuts.RetrainConfig`
(:func:`~siftlens.cli.generate.config_command`); the job arguments that are not config fields (the model, the
images, the output folder ...) are declared here."""

from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path

import typer

from .. import jobs
from ..benchmarks.spurious_cifar import DEFAULT_SPLITS, SpuriousConfig
from ..shortcuts.anchors import AFRConfig, DFRConfig, JTTConfig, anchor
from ..shortcuts.discovery.config import DiscoveryConfig
from ..shortcuts.prompting import PromptConfig
from ..shortcuts.retraining.head import RepairConfig
from ..shortcuts.retraining.retrain import RetrainConfig
from ._app import app
from .generate import config_command, param

MODEL_HELP = ("A local siftlens or Hugging Face classifier folder, a hub id ORG/NAME, a built-in name, or "
              "timm:<name> (pretrained or --weights).")
WEIGHTS = param("weights", str | None, "Weights file for timm:<name>.", None)
REVISION = param("revision", str | None, "Hub revision (branch, tag or commit) of a hub id or of timm's pretrained "
                                         "weights; the manifest records the commit.", None)
PROGRESS = param("progress", bool, "Show a progress bar.", True)


def _make_spurious(cfg: SpuriousConfig) -> None:
    typer.echo(jobs.spurious_outcome(jobs.make_spurious(cfg), cfg.out))


def _discover(cfg: DiscoveryConfig, *, model: str, images: str, out: Path, weights: str | None,
              revision: str | None, boxes: str | None, evaluate: bool | None, report: bool, progress: bool) -> None:
    opts = jobs.JobOptions(weights=weights, report=report, progress=progress)
    res, paths = jobs.run_discovery(model, images, out, cfg, boxes=boxes, evaluate=evaluate, options=opts,
                                    revision=revision)
    typer.echo(jobs.discovery_outcome(res, paths))


def _prompt(cfg: PromptConfig, *, model: str, images: str, out: Path, weights: str | None, revision: str | None,
            progress: bool) -> None:
    res, paths = jobs.run_prompt(model, images, out, cfg, jobs.JobOptions(weights=weights, progress=progress),
                                 revision=revision)
    typer.echo(jobs.prompt_outcome(res, paths))


def _repair(cfg: RepairConfig, *, model: str, images: str, out: Path, progress: bool) -> None:
    res, paths = jobs.run_repair(model, images, out, cfg, progress=progress)
    typer.echo(jobs.repair_outcome(res, paths))


config_command(
    app, SpuriousConfig, _make_spurious, name="make-spurious",
    doc="Build SpuriousCIFAR: CIFAR-10 images with a class-correlated marker glyph planted in each.",
    defaults={"splits": ",".join(DEFAULT_SPLITS)},  # the command line takes them comma-separated
)

config_command(
    app, DiscoveryConfig, _discover, name="discover",
    doc="Find visual words the model attends to, that come with a class, and that its predictions depend on.",
    before=[param("model", str, MODEL_HELP),
            param("images", str, "Images: a folder, a zip, archive.zip/inner/folder or a glob."),
            param("out", Path, "Output folder: candidates.csv, discovery.json, keypoints.parquet, report.html."),
            WEIGHTS, REVISION],
    after=[param("boxes", str | None, "JSON of object boxes per image name, [x0, y0, x1, y1] in the original "
                                      "image's pixels: adds the off-object share.", None),
           param("evaluate", bool | None, "Score the ranking against a SpuriousCIFAR markers.json in --images "
                                          "(default: when present).", None),
           param("report", bool, "Write report.html.", True),
           PROGRESS],
)

config_command(
    app, PromptConfig, _prompt, name="prompt",
    doc="Intervene on patch tokens at inference (no retraining) and report accuracy before and after.",
    before=[param("model", str, MODEL_HELP),
            param("images", str, "Labelled images in ImageFolder layout (folder, zip, archive.zip/inner/folder)."),
            param("out", Path, "Output folder: prompting.json, predictions.csv."),
            WEIGHTS, REVISION],
    after=[PROGRESS],
)

config_command(
    app, RepairConfig, _repair, name="repair",
    doc="Retrain the classification head (with --blocks also the last blocks) with the shortcut's tokens dropped.",
    before=[param("model", str, "A siftlens model folder (its head, or more, is retrained)."),
            param("images", str, "Labelled training images in ImageFolder layout."),
            param("out", Path, "Output folder: model/ (the repaired model, which carries the drop it was fitted "
                               "for: use it as it is) and repair.json.")],
    after=[PROGRESS],
    defaults={"candidates": MISSING},  # required on the command line
)


def _retrain(cfg: RetrainConfig, *, model: str, images: str, out: Path, progress: bool) -> None:
    res, paths = jobs.run_retrain(model, images, out, cfg, progress=progress)
    typer.echo(jobs.retrain_outcome(res, paths))


config_command(
    app, RetrainConfig, _retrain, name="retrain",
    doc="Train again from the pre-trained start with the shortcut's tokens never seen (repair at training time); "
        "the model carries the drop it was trained with.",
    before=[param("model", str, "The pre-trained start the ERM model was fine-tuned from (a siftlens model folder)."),
            param("images", str, "The labelled training images of the ERM model, in ImageFolder layout."),
            param("out", Path, "Output folder: model/ (it drops the shortcut's tokens itself: use it as it is) and "
                               "retrain.json.")],
    after=[PROGRESS],
    defaults={"candidates": MISSING},  # required on the command line
)


def _anchor(method: str):
    def run(cfg, *, model: str | None, images: str, out: Path, progress: bool) -> None:
        res = anchor(method, model, images, cfg, progress=progress)
        paths = res.save(out)
        typer.echo(f"{method}: {res.summary.to_dict('records')[0]} -> {paths['model']}")
    return run


ERM_MODEL = param("model", str, "The ERM model (a siftlens model folder); not changed.")
ANCHORS = {  # method: (config, doc, model parameter, images help)
    "jtt": (JTTConfig, "JTT (arXiv 2107.09044), label-free: train again with the errors of a short ERM run "
                       "upweighted.",
            param("model", str | None, "Where both trainings start: a siftlens model folder (fine-tuned); none: a new "
                                       "ViT.", None), "Labelled training images in ImageFolder layout."),
    "afr": (AFRConfig, "AFR (arXiv 2306.11074), label-free: refit the ERM model's head with weights "
                       "exp(-gamma p(y|x)).", ERM_MODEL, "Held-out labelled training images in ImageFolder layout."),
    "dfr": (DFRConfig, "DFR (arXiv 2204.02937) with the TRUE groups of markers.json: an upper reference, not "
                       "label-free.", ERM_MODEL, "Held-out labelled images in ImageFolder layout with a markers.json."),
}
for _method, (_cls, _doc, _model, _images) in ANCHORS.items():
    config_command(app, _cls, _anchor(_method), name=f"anchor-{_method}", doc=_doc,
                   before=[_model, param("images", str, _images),
                           param("out", Path, "Output folder: model/ (a siftlens model), anchor.json, weights.csv.")],
                   after=[PROGRESS])
