"""Checkpoints: one file, ``out/checkpoint.pt``, written atomically after every epoch.

It holds the model and optimiser state, the last finished epoch, the history so far and the global torch
RNG state (stochastic depth draws from it). Everything else a step draws comes from a generator seeded by
``(seed, epoch)``, so a resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..io import atomic_path


def check_fresh(path: Path, resume: bool) -> None:
    """A run never overwrites another run's checkpoint unless asked to continue it."""
    if path.exists() and not resume:
        raise ConfigError(f"{path.parent} already holds a checkpoint; pass --resume to continue it or choose "
                          "a new --out")


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int,
                    history: dict) -> None:
    """Write the state after 0-based ``epoch`` (atomically: an interrupted write leaves the old file)."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "history": history,
                    "rng": torch.get_rng_state()}, tmp)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, device: str
                    ) -> tuple[dict, int]:
    """Restore model, optimiser and RNG state in place; returns the history and the epoch to start with."""
    ck = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    if "rng" in ck:  # absent in checkpoints of supervised runs written before it was recorded
        torch.set_rng_state(ck["rng"].cpu())  # map_location may have moved it to the GPU
    return ck["history"], ck["epoch"] + 1
