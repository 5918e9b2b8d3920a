"""The run folder, written as the run goes, so that a crash loses at most the images of one part.

Layout of ``OUT``::

    run.json              what decides every number (parameters, model, images): checked on --resume
    metrics.parquet/      the tidy per-image table, one part file per group of images
    images.parts/         one part per metrics part, written after it: a part counts only when both exist
    summary.csv images.csv manifest.json report.html   written when the run (or a merge) finishes

Part files are named ``part-SSSS-NNNNNN.parquet`` by shard S and sequence N, so ranks, shards and
resumed runs never write the same name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..io import atomic_path, read_json, write_json
from .engine import BatchValues

RUN_FILE = "run.json"
METRICS_DIR = "metrics.parquet"
IMAGES_DIR = "images.parts"
MANIFEST = "manifest.json"
Z_CLIP = 1e6
LONG_COLUMNS = ["image", "layer", "head", "metric", "level_a", "level_b", "value", "null_mean", "null_sd", "z"]


def parse_shard(spec: str) -> tuple[int, int]:
    """'i/K' -> (i, K) with 0 <= i < K."""
    try:
        i, k = (int(t) for t in spec.split("/"))
    except ValueError as e:
        raise ConfigError(f"--shard takes i/K, e.g. 0/4 for the first of four shards, not {spec!r}") from e
    if not 0 <= i < k:
        raise ConfigError(f"--shard {spec}: need 0 <= i < K")
    return i, k


class RunStore:
    """Parts of one shard of a run in ``root`` (shard ``(i, K)``: images ``i, i + K, i + 2K, ...``)."""

    def __init__(self, root: str | Path, shard: tuple[int, int] = (0, 1)):
        self.root = Path(root)
        self.shard = shard
        self._seq = 0

    # -- opening ------------------------------------------------------------------------------------
    def open(self, run: dict, resume: bool) -> None:
        """Start a new run, or check that ``run`` is the one in the folder and continue it."""
        old = self.read_run()
        if old is None:
            if self.part_files():
                raise ConfigError(f"{self.root} holds analysis parts but no {RUN_FILE}; choose an empty --out")
            write_json(self.root / RUN_FILE, run)
        elif not resume:
            state = "a finished analysis" if (self.root / MANIFEST).exists() else "an interrupted analysis"
            raise ConfigError(f"{self.root} already holds {state}; add --resume to continue it, "
                              "or choose another --out")
        else:
            diff = sorted(k for k in set(old) | set(run) if k != "shard" and old.get(k) != run.get(k))
            if diff:
                raise ConfigError(f"--resume: {', '.join(diff)} differ from the run in {self.root}; "
                                  "use the same options, or another --out")
        self._clean_orphans()
        self._seq = 1 + max((int(p.stem.split("-")[2]) for p in self.part_files(IMAGES_DIR)
                             if int(p.stem.split("-")[1]) == self.shard[0]), default=-1)

    def read_run(self) -> dict | None:
        p = self.root / RUN_FILE
        return read_json(p, what="run description") if p.exists() else None

    def part_files(self, kind: str = METRICS_DIR) -> list[Path]:
        d = self.root / kind
        return sorted(d.glob("part-*.parquet")) if d.exists() else []

    def _clean_orphans(self) -> None:
        """Delete metrics parts whose images part never landed (the run died between the two)."""
        committed = {p.name for p in self.part_files(IMAGES_DIR)}
        for p in self.part_files(METRICS_DIR):
            if p.name not in committed:
                p.unlink()

    def done_indices(self) -> set[int]:
        """Source indices already in committed parts, of every shard."""
        done: set[int] = set()
        for p in self.part_files(IMAGES_DIR):
            done.update(pd.read_parquet(p, columns=["index"])["index"].tolist())
        return done

    # -- writing ------------------------------------------------------------------------------------
    def write_part(self, long: pd.DataFrame, images: pd.DataFrame) -> None:
        """One part: the metrics rows first, then the images rows that commit it."""
        name = f"part-{self.shard[0]:04d}-{self._seq:06d}.parquet"
        with atomic_path(self.root / METRICS_DIR / name) as tmp:
            long.to_parquet(tmp, index=False)
        with atomic_path(self.root / IMAGES_DIR / name) as tmp:
            images.to_parquet(tmp, index=False)
        self._seq += 1

    def adopt(self, other: Path) -> None:
        """Bring every committed part of the run folder ``other`` into this one (for merge): a hard link
        where both folders share a file system (no second copy of a large run), else a copy."""
        src = RunStore(other)
        committed = {p.name for p in src.part_files(IMAGES_DIR)}
        for kind in (METRICS_DIR, IMAGES_DIR):
            (self.root / kind).mkdir(parents=True, exist_ok=True)
            for p in src.part_files(kind):
                if p.name in committed:
                    _link_or_copy(p, self.root / kind / p.name)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def long_rows(v: BatchValues, names: list[str], layer_ids: list[int], heads: int,
              cells: list[tuple[str, int, int]]) -> pd.DataFrame:
    """The tidy rows of a batch: one per (image, layer, head, cell) that exists; head -1 is the mean over
    heads, layer ``num_layers`` rollout. NaN entries (excluded images, empty levels) are dropped."""
    obs = v.obs
    keep = ~np.isnan(obs)
    ii, li, hi, ci = np.nonzero(keep)
    mean, var = v.null_mean[keep], np.clip(v.null_var[keep], 0, None)
    sd = np.sqrt(var)
    diff = obs[keep] - mean
    noise = 1e-9 * np.maximum(1.0, np.abs(mean))
    z = np.where(np.abs(diff) <= noise, 0.0, np.clip(diff / np.maximum(sd, 1e-12), -Z_CLIP, Z_CLIP))
    return pd.DataFrame({
        "image": np.asarray(names, dtype=object)[ii],
        "layer": np.asarray(layer_ids, np.int16)[li],
        "head": np.where(hi == heads, -1, hi).astype(np.int16),
        "metric": np.asarray([c[0] for c in cells], dtype=object)[ci],
        "level_a": np.asarray([c[1] for c in cells], np.int8)[ci],
        "level_b": np.asarray([c[2] for c in cells], np.int8)[ci],
        "value": obs[keep].astype(np.float32),
        "null_mean": mean.astype(np.float32),
        "null_sd": sd.astype(np.float32),
        "z": z.astype(np.float32),
    })
