"""Running a siftlens command under ``torchrun --nproc_per_node 2`` (gloo) for the multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], logs: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 -m siftlens.cli *args`` on a free local port.

    Each rank's output goes to ``logs``. A launch in which a rank dies from a signal (gloo aborts the process
    when a peer connection drops, rarely and never reproducibly on a loaded machine) is retried once on a new
    port; a second failure, or a failure with an exit code of its own, fails the caller's assertion with
    every rank's output in the message."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for attempt in range(2):
        log_dir = logs / f"attempt{attempt}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3",
               "-m", "siftlens.cli", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        if r.returncode == 0 or "Signal" not in r.stderr:
            break
    if r.returncode != 0:
        logs_ = sorted(log_dir.rglob("*.log"))
        ranks = "\n".join(f"--- {p.relative_to(log_dir)}\n{p.read_text()[-3000:]}" for p in logs_)
        r.stderr = f"{r.stderr[-2000:]}\n{ranks}"
    return r
