"""A real Hugging Face hub cache, built offline: ``HF_HOME/hub/models--org--name/{refs,snapshots,blobs}``.

The files of a saved model folder become blobs named by their sha256, linked from ``snapshots/<commit>/``, with
``refs/main`` holding the commit: the layout ``huggingface_hub`` writes when it downloads. ``offline_hub`` points
this process (huggingface_hub reads its settings at import, so the module constants are patched too) and any
subprocess (the environment) at such a cache, with ``HF_HUB_OFFLINE=1``: nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT = "5e1f7a3c0d9b8e6f4a2c1b0d9e8f7a6b5c4d3e2f"
OTHER = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def publish(folder: Path, hf_home: Path, repo_id: str, commit: str = COMMIT, ref: str | None = "main") -> Path:
    """Put the files of ``folder`` into the hub cache under ``hf_home`` as ``repo_id`` at ``commit``; the
    branch ``ref`` (None: none) points at it. Returns the snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def offline_hub(hf_home: Path, monkeypatch) -> dict:
    """Point huggingface_hub (in this process and in subprocesses) at ``hf_home``, offline. Returns the env."""
    from huggingface_hub import constants

    hf_home.mkdir(parents=True, exist_ok=True)
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return {**os.environ, **env}
