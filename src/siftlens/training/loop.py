"""The parts every training loop shares: where it runs (:class:`Run`: process group, device, output
folder) and the model in training (:class:`Loop`: optimiser, schedule, the per-epoch generator, one
optimiser step, resume and the end-of-epoch checkpoint).

Under ``torchrun`` (DistributedDataParallel: gloo on CPU, NCCL on GPU) every rank draws the whole batch
from the same generator and takes its own slice (:meth:`Run.shard`), so the ranks together see what one
process sees; only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..devices import DistInfo, init_distributed, shutdown
from ..errors import ConfigError
from .checkpoint import check_fresh, load_checkpoint, save_checkpoint
from .optim import Schedule


@dataclass(frozen=True)
class Run:
    """This process's part of a run: its rank (``dist``), its ``device`` and the output folder ``out``."""

    dist: DistInfo
    device: str
    out: Path

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    def shard(self, *batch: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """This rank's slice of each whole-batch tensor (dim 0); None stays None."""
        d = self.dist
        return tuple(t if t is None or not d.active else t[d.rank :: d.world] for t in batch)


def start_run(device: str, out: str | Path, resume: bool, threads: int | None, batch_size: int) -> Run:
    """Join torchrun's process group (if any), set torch's CPU threads, refuse to overwrite a checkpoint."""
    world = DistInfo.from_env().world
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} must be divisible by the {world} processes")
    info, device = init_distributed(device)
    if threads:
        torch.set_num_threads(threads)
    run = Run(info, device, Path(out))
    check_fresh(run.checkpoint, resume)
    return run


def end_run(run: Run) -> None:
    shutdown(run.dist)


def epoch_range(start: int, epochs: int, stop_after: int | None) -> range:
    """The epochs this invocation runs: from ``start`` to ``epochs``, at most ``stop_after`` of them."""
    return range(start, epochs if stop_after is None else min(epochs, start + stop_after))


@dataclass
class Loop:
    """A model in training: ``model`` (``ddp``, its DistributedDataParallel wrapper or itself, runs the
    forward), ``opt`` and ``sched``; ``seed`` seeds every epoch's generator."""

    run: Run
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Schedule
    seed: int
    ddp: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        active = self.run.dist.active
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if active else self.model

    def epoch_batches(self, epoch: int, n: int) -> tuple[torch.Generator, list[tuple[int, torch.Tensor]]]:
        """The generator of ``epoch`` (seeded by ``(seed, epoch)``; it has drawn the shuffle) and its batches
        as (global step, image indices (B,)) over ``n`` images."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        B, S = self.sched.batch_size, self.sched.steps_per_epoch
        return gen, [(epoch * S + s, order[s * B : (s + 1) * B]) for s in range(S)]

    def set_lr(self, step: int) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.sched.lr_at(step)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA; nothing elsewhere."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.run.device.startswith("cuda"))

    def step(self, loss: torch.Tensor, clip: float = 1.0) -> None:
        """Backward, clip the gradient norm, one optimiser step."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()

    def resume(self, history: dict, resume: bool) -> tuple[dict, int]:
        """With ``resume`` and a checkpoint: restore it and return its history and next epoch; else
        ``(history, 0)``."""
        if resume and self.run.checkpoint.exists():
            return load_checkpoint(self.run.checkpoint, self.model, self.opt, self.run.device)
        return history, 0

    def end_epoch(self, epoch: int, rec: dict, history: dict) -> None:
        """Append the epoch's record; rank 0 prints it (one JSON line on stderr) and writes the checkpoint."""
        history["epochs"].append(rec)
        if self.run.is_main:
            print(json.dumps(rec), file=sys.stderr, flush=True)
            save_checkpoint(self.run.checkpoint, self.model, self.opt, epoch, history)

    def ticker(self, pb, name: str, start_epoch: int) -> Callable[[str], None]:
        """A progress-bar task over all steps of the run; each call advances it by one step."""
        task = pb.add_task(name, total=self.sched.total, completed=start_epoch * self.sched.steps_per_epoch,
                           info="")
        return lambda info: pb.update(task, advance=1, info=info)


class EpochHistory:
    """What the results of :func:`~siftlens.training.train` and :func:`~siftlens.training.pretrain` share:
    ``history`` and ``complete`` read from their ``record`` (the whole history.json) and ``config.optim``."""

    record: dict
    config: object

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch."""
        return pd.DataFrame(self.record["epochs"])

    @property
    def complete(self) -> bool:
        """Whether every epoch has run (else continue with ``resume``)."""
        return len(self.record["epochs"]) >= self.config.optim.epochs
