"""Process groups under torchrun: one rank per process, gloo on CPU, NCCL on GPU, one device per rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when they are absent)."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> tuple[DistInfo, str]:
    """Join torchrun's process group if there is one; returns this rank's info and device
    (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    info = DistInfo.from_env()
    if not info.active:
        return info, device
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.active and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown(info: DistInfo) -> None:
    if info.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
