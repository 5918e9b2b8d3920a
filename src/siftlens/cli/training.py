"""The training commands: train (supervised) and pretrain (MAE), generated from their configs."""

from __future__ import annotations

from pathlib import Path

import typer

from .. import jobs
from ..training import PretrainConfig, TrainConfig
from ._app import app
from .generate import config_command, param

PROGRESS = param("progress", bool, "Show a progress bar.", True)
START = param("model", str | None, "Fine-tune this siftlens model folder (or built-in name): it brings its own "
                                   "shape and preprocessing, and keeps its head when the class names match; none: a "
                                   "new model of the shape options.", None)


def _train(config: TrainConfig, train: str, out: Path, model: str | None, progress: bool) -> None:
    result = jobs.run_train(train, out, config, model=model, progress=progress)
    typer.echo(jobs.train_outcome(result, out))


def _pretrain(config: PretrainConfig, train: str, out: Path, model: str | None, progress: bool) -> None:
    result = jobs.run_pretrain(train, out, config, model=model, progress=progress)
    typer.echo(jobs.pretrain_outcome(result, out))


config_command(
    app, TrainConfig, _train, name="train",
    doc="Train the project's ViT (supervised); weights are saved as safetensors with a JSON config.",
    before=[param("train", str, "Training images in ImageFolder layout: a folder, a zip, or a folder inside a zip "
                                "(archive.zip/inner/folder)."),
            param("out", Path, "Output folder: checkpoint.pt, history.json, model/.")],
    after=[START, PROGRESS],
)

config_command(
    app, PretrainConfig, _pretrain, name="pretrain",
    doc="Masked-autoencoder pre-training of the project's ViT with random or SIFT-guided masking.",
    before=[param("train", str, "Training images in ImageFolder layout (folder, zip, or archive.zip/inner/folder); "
                                "labels are used only for evaluation."),
            param("out", Path, "Output folder: checkpoint.pt, history.json, curves.png, encoder/, mae/, "
                               "keypoints.npz.")],
    after=[START, PROGRESS],
)
