"""The run folder, written as the run goes, so that a crash loses at most the images of one part.

Layout of ``OUT``::

    run.json              what decides every number (parameters, model, images): checked on --resume
    metrics.parquet/      the tidy per-image table, one part file per group of images
    images.parts/         one part per metrics part, written after it: a part counts only when both exist
    summary.csv images.csv manifest.json report.html   written when the run (or a merge) finishes

Part files are named ``part-SSSS-NNNNNN.parquet`` by shard S and sequence N, so ranks, shards and
resumed runs never write the same name. The images part records the SHA-256 of its metrics part and a
digest of its own rows (parquet key-value metadata), so ``--resume`` and ``merge`` recognise a truncated,
emptied, corrupted or half-missing part (:meth:`RunStore.part_problem`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.stats import z_scores
from ..errors import ConfigError
from ..io import atomic_path, read_json, write_json
from .config import AnalysisConfig
from .engine import BatchValues

RUN_FILE = "run.json"
METRICS_DIR = "metrics.parquet"
IMAGES_DIR = "images.parts"
MANIFEST = "manifest.json"
META_METRICS_SHA = b"siftlens.metrics_sha256"  # in the images part: the SHA-256 of its metrics part
META_ROWS_SHA = b"siftlens.rows_sha256"  # in the images part: the digest of its own rows (table_digest)
ORPHAN = "metrics part without its images part"  # what a run killed between the two writes leaves
LONG_COLUMNS = ["image", "layer", "head", "metric", "level_a", "level_b", "value", "null_mean", "null_sd", "z",
                "note"]


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
    def open(self, run: dict, resume: bool, clean: bool = True) -> None:
        """Start a new run, or check that ``run`` is the one in the folder and continue it.

        ``clean``: first remove what an interrupted or damaged run left (:meth:`repair`). Under torchrun only
        rank 0 cleans, before the other ranks open, so no rank deletes another's part in flight."""
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
            _check_same_run(_nested_params(old), run, self.root)
        if clean:
            self.repair()
        self._seq = 1 + max((int(p.stem.split("-")[2]) for p in self.part_files(IMAGES_DIR)
                             if int(p.stem.split("-")[1]) == self.shard[0]), default=-1)

    def read_run(self) -> dict | None:
        p = self.root / RUN_FILE
        return read_json(p, what="run description") if p.exists() else None

    def part_files(self, kind: str = METRICS_DIR) -> list[Path]:
        d = self.root / kind
        return sorted(d.glob("part-*.parquet")) if d.exists() else []

    def part_names(self) -> list[str]:
        """Every part name with at least one of its two halves on disk."""
        return sorted({p.name for kind in (METRICS_DIR, IMAGES_DIR) for p in self.part_files(kind)})

    def part_problem(self, name: str) -> str | None:
        """Why the part ``name`` cannot be used (None when both halves are there and intact).

        A missing half, an unreadable file (truncated, emptied) and a file that does not match the checksums
        the images part carries are found; parts written before the checksums only get the readability check."""
        metrics, images = self.root / METRICS_DIR / name, self.root / IMAGES_DIR / name
        if not images.exists():
            return ORPHAN
        if not metrics.exists():
            return "images part without its metrics part"
        try:
            table = pq.read_table(images)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise, it is damaged
            return f"images part unreadable ({_first_line(e)})"
        meta = table.schema.metadata or {}
        if META_ROWS_SHA not in meta:
            return _readable(metrics)
        if meta[META_ROWS_SHA].decode() != table_digest(table):
            return "images part does not match its checksum"
        if meta.get(META_METRICS_SHA, b"").decode() != file_sha256(metrics):
            return "metrics part does not match its checksum"
        return None

    def damaged_parts(self) -> dict[str, str]:
        """Parts other than a run's ordinary leftover (a metrics part whose images part never landed) that
        cannot be used, with the reason: what ``merge`` refuses and ``--resume`` redoes."""
        found = {name: self.part_problem(name) for name in self.part_names()}
        return {name: why for name, why in found.items() if why not in (None, ORPHAN)}

    def repair(self) -> None:
        """Leave only whole, intact parts: remove temporary files of interrupted writes, a metrics part whose
        images part never landed (silently: a kill between the two writes leaves it), and any part with a
        missing, unreadable or corrupted half, with one warning line each. Their images are analysed again."""
        self._remove_temporary_files()
        for name in self.part_names():
            why = self.part_problem(name)
            if why is None:
                continue
            if why != ORPHAN:
                warnings.warn(f"{self.root}: part {name} is damaged ({why}); its images will be analysed again",
                              stacklevel=2)
            for kind in (METRICS_DIR, IMAGES_DIR):
                (self.root / kind / name).unlink(missing_ok=True)

    def _remove_temporary_files(self) -> None:
        """The temporary files of writes a kill interrupted (atomic_path names them ``.<name>.<random>.part``)."""
        found = [p for kind in (METRICS_DIR, IMAGES_DIR) for p in (self.root / kind).glob(".part-*.part")]
        found += [p for name in (RUN_FILE, MANIFEST, "summary.csv", "images.csv")
                  for p in self.root.glob(f".{name}.*.part")]
        for p in found:
            p.unlink(missing_ok=True)

    def image_indices(self) -> list[int]:
        """The source index of every image in a committed part (with repeats, if a part was doubled)."""
        tables = [pq.read_table(p, columns=["index"]) for p in self.part_files(IMAGES_DIR)]
        return [i for t in tables for i in t["index"].to_pylist()]

    def committed_parts(self) -> list[str]:
        """The names of the parts whose images part landed, ordered by the first image each holds, so a part
        analysed again after damage sums into the summary where the original did."""
        first = {p.name: int(pq.read_table(p, columns=["index"])["index"].to_numpy().min(initial=2**62))
                 for p in self.part_files(IMAGES_DIR)}
        return sorted(first, key=lambda name: (first[name], name))

    def done_indices(self) -> set[int]:
        """Source indices already in committed parts, of every shard."""
        done: set[int] = set()
        for p in self.part_files(IMAGES_DIR):
            done.update(pd.read_parquet(p, columns=["index"])["index"].tolist())
        return done

    # -- writing ------------------------------------------------------------------------------------
    def write_part(self, long: pd.DataFrame, images: pd.DataFrame) -> None:
        """One part: the metrics rows first, then the images rows that commit it (with the checksums)."""
        name = f"part-{self.shard[0]:04d}-{self._seq:06d}.parquet"
        with atomic_path(self.root / METRICS_DIR / name) as tmp:
            long.to_parquet(tmp, index=False)
            metrics_sha = file_sha256(tmp)
        table = pa.Table.from_pandas(images, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_METRICS_SHA: metrics_sha,
                                               META_ROWS_SHA: table_digest(table)})
        with atomic_path(self.root / IMAGES_DIR / name) as tmp:
            pq.write_table(table, tmp)
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


def _nested_params(run: dict) -> dict:
    """``run`` with its params nested as this version records them (a run started before the option groups
    recorded them flat)."""
    if "params" not in run or isinstance(run["params"].get("run"), dict):
        return run
    return {**run, "params": AnalysisConfig.from_params(run["params"]).identity()}


def _check_same_run(old: dict, run: dict, root: Path) -> None:
    """Refuse, in one line, to resume into ``root`` a run whose settings or images differ from ``old``."""
    if old.get("images", {}).get("source") == run["images"]["source"] and "fingerprint" not in old["images"]:
        raise ConfigError(f"--resume: the run in {root} was started by an older siftlens that did not record its "
                          "images; start it again in another --out")
    if old.get("images", {}).get("source") == run["images"]["source"] and \
            old["images"].get("fingerprint") != run["images"].get("fingerprint"):
        raise ConfigError(f"--resume: the images of {run['images']['source']} changed since the run in {root} "
                          "began (a file added, removed, renamed or modified); restore them, or use another --out")
    diff = sorted(k for k in set(old) | set(run) if k != "shard" and old.get(k) != run.get(k))
    if diff:
        raise ConfigError(f"--resume: {', '.join(diff)} differ from the run in {root}; "
                          "use the same options, or another --out")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def table_digest(table: pa.Table) -> str:
    """SHA-256 of a table's fields, types, key-value metadata (but the checksums) and values: what a reader
    gets back from the file, equal after a parquet round trip."""
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()
            if k not in (META_METRICS_SHA, META_ROWS_SHA)}
    content = {"fields": [[f.name, str(f.type)] for f in table.schema], "metadata": meta,
               "rows": {name: table.column(name).to_pylist() for name in table.column_names}}
    return hashlib.sha256(json.dumps(content, default=str, sort_keys=True).encode()).hexdigest()


def _readable(path: Path) -> str | None:
    try:
        pq.read_metadata(path)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise, it is damaged
        return f"{path.parent.name} part unreadable ({_first_line(e)})"
    return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def long_rows(v: BatchValues, names: list[str], layer_ids: list[int], heads: int,
              cells: list[tuple[str, int, int]]) -> pd.DataFrame:
    """The tidy rows of a batch: one per (image, layer, head, cell) that exists; head -1 is the mean over
    heads, layer ``num_layers`` rollout. NaN entries (excluded images, empty levels) are dropped.

    ``z`` is empty (null) and ``note`` reads "no variation" where the cell's null variance is zero or below
    float32 resolution (:func:`siftlens.core.stats.z_scores`); ``note`` is "" elsewhere."""
    obs = v.obs
    keep = ~np.isnan(obs)
    ii, li, hi, ci = np.nonzero(keep)
    mean, var = v.null_mean[keep], np.clip(v.null_var[keep], 0, None)
    z, note = z_scores(obs[keep], mean, var)
    return pd.DataFrame({
        "image": np.asarray(names, dtype=object)[ii],
        "layer": np.asarray(layer_ids, np.int16)[li],
        "head": np.where(hi == heads, -1, hi).astype(np.int16),
        "metric": np.asarray([c[0] for c in cells], dtype=object)[ci],
        "level_a": np.asarray([c[1] for c in cells], np.int8)[ci],
        "level_b": np.asarray([c[2] for c in cells], np.int8)[ci],
        "value": obs[keep].astype(np.float32),
        "null_mean": mean.astype(np.float32),
        "null_sd": np.sqrt(var).astype(np.float32),
        "z": z.astype(np.float32),
        "note": note,
    })
