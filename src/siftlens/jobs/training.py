"""The training jobs: train (supervised) and pretrain (MAE), and the line the CLI prints about each."""

from __future__ import annotations

from pathlib import Path

from ..training import PretrainConfig, PretrainResult, TrainConfig, TrainResult, pretrain, train


def run_train(images: str, out: str | Path, config: TrainConfig | None = None, *, model=None,
              progress: bool = True) -> TrainResult:
    """Train (or, with ``model``, fine-tune) a ViT on ``images``; checkpoints, history.json and model/ go to
    ``out``."""
    return train(model, images, config, progress=progress, out=out)


def run_pretrain(images: str, out: str | Path, config: PretrainConfig | None = None, *, model=None,
                 progress: bool = True) -> PretrainResult:
    """MAE pre-training on ``images``; checkpoints, history.json, curves.png, encoder/ and mae/ go to ``out``."""
    return pretrain(model, images, config, progress=progress, out=out)


def train_outcome(result: TrainResult, out: str | Path) -> str:
    """What the CLI prints when ``siftlens train`` returns."""
    return _outcome(result.record["epochs"], result.config.optim.epochs, f"model saved to {Path(out) / 'model'}")


def pretrain_outcome(result: PretrainResult, out: str | Path) -> str:
    """What the CLI prints when ``siftlens pretrain`` returns."""
    return _outcome(result.record["epochs"], result.config.optim.epochs,
                    f"encoder saved to {Path(out) / 'encoder'}")


def _outcome(epochs: list[dict], total: int, saved: str) -> str:
    last = epochs[-1] if epochs else {}
    if len(epochs) < total:
        return f"stopped after epoch {len(epochs)}/{total}; continue with --resume. last: {last}"
    return f"{saved}; final {last}"
