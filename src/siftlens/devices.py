"""Devices and processes: ``--device`` checked with a one-line error, and process groups under torchrun
(one rank per process, gloo on CPU, NCCL on GPU, one device per rank)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


def resolve_device(spec: str | torch.device) -> torch.device:
    """``--device`` -> a ``torch.device`` this machine can run on, or a one-line :class:`ConfigError`.

    Accepts ``cpu``, ``cuda``, ``cuda:<index>``, ``mps`` and ``xpu[:<index>]`` (case and surrounding spaces
    ignored). A malformed string (``gpu``), a device type that cannot run a model (``meta``), an
    accelerator torch was not built with or cannot find, and a CUDA index beyond the visible GPUs are
    all reported before any model is loaded, instead of as torch's assertion traceback on first use.
    """
    if isinstance(spec, torch.device):
        dev, shown = spec, str(spec)
    else:
        shown = str(spec).strip()
        try:
            dev = torch.device(shown.lower())
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(
                f"device {shown!r} is not a device name; use cpu, cuda, cuda:<index> or mps"
            ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no GPU found" if torch.backends.cuda.is_built() else "torch has no CUDA"
            raise ConfigError(f"device {shown!r} is not available here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"device {shown!r} is not available here (only {count} CUDA device(s): cuda:0 to "
                f"cuda:{count - 1}); use --device cuda:0 or --device cpu"
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            why = "no Apple GPU found" if torch.backends.mps.is_built() else "torch has no MPS"
            raise ConfigError(f"device {shown!r} is not available here ({why}); use --device cpu")
        return dev
    if dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ConfigError(f"device {shown!r} is not available here (no XPU found); use --device cpu")
        return dev
    raise ConfigError(f"device {shown!r} cannot run a model here; use cpu, cuda, cuda:<index> or mps")


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
    resolve_device(device)
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


# -- precision of the forward ------------------------------------------------------------------------------------
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(device: str | torch.device, precision: str) -> None:
    """A one-line ConfigError unless ``--precision`` can run on ``device``: fp32 everywhere; bf16 and fp16 by
    autocast on CUDA; bf16 on the CPU (its autocast); not fp16 on the CPU (where torch's half-precision
    matrix products are either missing or many times slower than float32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = torch.device(device) if isinstance(device, str) else device
    if precision == "fp32":
        return
    if dev.type == "cpu" and precision == "fp16":
        raise ConfigError("--precision fp16 is not supported on the CPU; use bf16 (CPU autocast) or fp32")
    if not torch.amp.is_autocast_available(dev.type):
        raise ConfigError(f"--precision {precision} needs autocast, which torch does not offer on {dev.type}; "
                          "use fp32")


def autocast(device: str | torch.device, precision: str):
    """The context the forward runs in: nothing for fp32 (the model's own dtype), else torch's autocast to bf16 /
    fp16 on ``device`` (checked by :func:`check_precision`)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    dev = torch.device(device) if isinstance(device, str) else device
    return torch.autocast(device_type=dev.type, dtype=dtype)
