"""Image sources at scale, behind :class:`siftlens.data.ImageSource`: WebDataset tar shards, Hugging Face
datasets (a ``save_to_disk`` folder, parquet files, a hub id) and CSV or parquet manifests of paths.

Each reader enumerates its images once, as :class:`Entry` rows (identity, location, raw label), and then
reads one image's bytes by its location: a tar member by its offset in the shard, a parquet cell by its row
group, a dataset row by its index. Open files are per process (a reader carried into a DataLoader worker or
a torchrun rank reopens them there), so every form works with sharding, ``--resume``, torchrun and workers.
``stamps`` gives what the resume fingerprint covers: sizes and modification times of the files behind each
image (and its label), or a dataset's own fingerprint.

Identities, unique within a run:

- tar shards: ``<shard file name>/<sample key>``, the key being the member path up to the first dot of its
  base name (``000123.jpg``, ``000123.cls``, ``000123.json`` are one sample, ``000123``);
- HF datasets and parquet files: ``<split>/<row index>``, or ``<split>/<id>`` with an id column;
- manifests: each path as written in the manifest (relative to the manifest's folder when not absolute).
"""

from __future__ import annotations

import glob as _glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageSourceError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OPTIONS = ("image_column", "label_column", "label_key", "id_column")
MANIFEST_PATH_COLUMNS = ("path", "file", "filename", "filepath", "file_path", "image_path", "image", "img")
LABEL_COLUMNS = ("label", "labels")
MAX_OPEN_SHARDS = 16


@dataclass(frozen=True)
class Entry:
    name: str  # the image's identity within a run
    path: str  # the file that holds it: an image file, a tar shard, a parquet file
    ref: tuple = ()  # where in that file (reader-specific): (shard, offset, size), (file, row group, row), (row,)
    label: object = None  # raw label (int or str) before classes are assigned


# -- which form is the spec -------------------------------------------------------------------------------------
def open_source(spec, options: dict, limit: int | None = None):
    """``(entries, reader)`` for a tar, HF dataset or manifest spec; None for the folder/zip/glob/list forms."""
    if not isinstance(spec, str | os.PathLike):
        paths = [str(s) for s in spec]
        if paths and all(p.lower().endswith(".tar") for p in paths):
            return TarShards.open(paths, options)
        if paths and all(p.lower().endswith(".parquet") for p in paths):
            return open_parquet(paths, options, split=None)
        return None
    spec = str(spec)
    if spec.startswith("hf:"):
        return open_hf(spec[3:], options, limit)
    low = spec.lower()
    if low.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise ImageSourceError(f"{spec}: compressed tar shards cannot be read by offset; use uncompressed .tar "
                               "shards (the WebDataset convention: the images inside are already compressed)")
    if low.endswith(".tar"):
        return TarShards.open(_expand_paths(spec, "tar shard"), options)
    if low.endswith(".parquet"):
        return open_parquet(_expand_paths(spec, "parquet file"), options, split=None)
    if low.endswith(".csv"):
        if not Path(spec).is_file():
            raise ImageSourceError(f"manifest not found: {spec}")
        return open_manifest(spec, _read_csv_columns(spec), options)
    p = Path(spec)
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        return open_hf(spec, options, limit)
    return None


def check_no_options(options: dict, spec) -> None:
    if options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise ImageSourceError(f"{flags} apply to tar shards, HF datasets and manifests, not to {spec!s} "
                               "(a folder, zip, glob or file list)")


def expand_braces(s: str) -> list[str]:
    """Shell-style brace expansion: ``a-{00..02}.tar`` -> a-00.tar, a-01.tar, a-02.tar; ``{x,y}`` -> x, y.
    Zero-padded ranges keep their width; a brace with neither ``..`` nor ``,`` is literal."""
    start = 0
    while True:
        m = re.compile(r"\{([^{}]*)\}").search(s, start)
        if m is None:
            return [s]
        body = m.group(1)
        r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
        if r:
            a, b = int(r.group(1)), int(r.group(2))
            padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-").startswith("0") for g in r.groups())
            width = max(len(g) for g in r.groups()) if padded else 0
            step = 1 if b >= a else -1
            items = [str(k).zfill(width) for k in range(a, b + step, step)]
        elif "," in body:
            items = body.split(",")
        else:
            start = m.end()
            continue
        head, tail = s[: m.start()], s[m.end():]
        return [out for it in items for out in expand_braces(head + it + tail)]


def _expand_paths(spec: str, what: str) -> list[str]:
    """Brace-expand, then glob each part; every path must exist."""
    out: list[str] = []
    for part in expand_braces(spec) if not Path(spec).exists() else [spec]:
        if _glob.has_magic(part):
            hits = sorted(f for f in _glob.glob(part, recursive=True) if Path(f).is_file())
            if not hits:
                raise ImageSourceError(f"no {what} matches {part}")
            out += hits
        elif Path(part).is_file():
            out.append(part)
        else:
            raise ImageSourceError(f"{what} not found: {part}" + (f" (expanded from {spec})" if part != spec else ""))
    return list(dict.fromkeys(out))


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _with_label(stamp: str, e: Entry) -> str:
    return stamp if e.label is None else f"{stamp}:{e.label!r}"


class _PerProcess:
    """Open handles that belong to one process: dropped when pickled, reopened after a fork."""

    def _handles(self) -> dict:
        if getattr(self, "_pid", None) != os.getpid():
            self._open, self._pid = {}, os.getpid()
        return self._open

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_open", None)
        state.pop("_pid", None)
        return state


# -- WebDataset tar shards --------------------------------------------------------------------------------------
class TarShards(_PerProcess):
    """Samples of WebDataset shards: members grouped by key, the image read by its offset in the shard."""

    class_names = None

    def __init__(self, shards: list[str]):
        self.shards = shards

    @classmethod
    def open(cls, shards: list[str], options: dict):
        _only(options, ("image_column", "label_key"), "tar shards")
        entries: list[Entry] = []
        for k, shard in enumerate(shards):
            entries += _index_shard(k, shard, options.get("image_column"), options.get("label_key"))
        return entries, cls(shards)

    def read(self, e: Entry) -> bytes:
        k, offset, size = e.ref
        handles = self._handles()
        f = handles.get(k)
        if f is None:
            if len(handles) >= MAX_OPEN_SHARDS:
                handles.pop(next(iter(handles))).close()
            f = handles[k] = open(self.shards[k], "rb")  # noqa: SIM115 - kept open for the next reads
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[k]} ends inside {e.name} (the shard was truncated)")
        return data

    def header(self) -> str:
        return "webdataset"

    def stamps(self, entries: list[Entry]) -> list[str]:
        shard = [_stat(s) for s in self.shards]
        return [_with_label(f"{shard[e.ref[0]]}:{e.ref[1]}:{e.ref[2]}", e) for e in entries]


def _index_shard(k: int, shard: str, image_ext: str | None, label_key: str | None) -> list[Entry]:
    """One pass over the shard's headers: each sample's image member (offset, size) and its label."""
    import tarfile

    samples: dict[str, dict[str, tuple[int, int]]] = {}
    labels: dict[str, dict[str, object]] = {"cls": {}, "json": {}}
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                folder, _, base = m.name.rpartition("/")
                if not m.isfile() or base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
                samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
                if ext in labels and m.size < 1 << 20:
                    labels[ext][key] = _tar_label(ext, tf.extractfile(m).read(), label_key, shard, m.name)
    except (tarfile.TarError, OSError) as e:
        raise ImageSourceError(f"cannot read the tar shard {shard}: {e}") from e
    # the .cls member, else the .json's label; with --label-key, that key of the .json
    label_of = labels["json"] if label_key else {**labels["json"], **{k: v for k, v in labels["cls"].items()
                                                                      if v is not None}}
    name = Path(shard).name
    out = []
    for key, members in samples.items():
        ext = _image_member(members, image_ext)
        if ext is not None:
            out.append(Entry(f"{name}/{key}", shard, (k, *members[ext]), label_of.get(key)))
    return out


def _tar_label(ext: str, data: bytes, label_key: str | None, shard: str, member: str):
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "cls":
        return _scalar(text)
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ImageSourceError(f"{shard}: {member} is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        return None
    for key in (label_key,) if label_key else ("label", "cls"):
        if key in meta:
            return _scalar(meta[key])
    return None


def _image_member(members: dict[str, tuple[int, int]], image_ext: str | None) -> str | None:
    if image_ext is not None:
        return image_ext.lower().lstrip(".") if image_ext.lower().lstrip(".") in members else None
    for ext in (e.lstrip(".") for e in IMAGE_EXTS):
        if ext in members:
            return ext
    return None


def _scalar(v):
    """A label value: an int when it reads as one, else a string; None for lists, dicts, None."""
    if hasattr(v, "item") and not isinstance(v, list | dict | str | bytes):
        v = v.item()  # a numpy scalar (a pandas column)
    if isinstance(v, bool) or v is None or isinstance(v, list | dict) or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    s = str(v).strip()
    return int(s) if re.fullmatch(r"-?\d+", s) else (s or None)


def _only(options: dict, allowed: tuple[str, ...], what: str) -> None:
    extra = [k for k in options if k not in allowed]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise ImageSourceError(f"{flags} do not apply to {what}")


# -- tables: parquet files, HF datasets -------------------------------------------------------------------------
def _hf_features(schema) -> dict:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        return json.loads(meta).get("info", {}).get("features", {}) or {}
    except ValueError:
        return {}


def _image_column(schema, features: dict, given: str | None, where: str) -> str | None:
    """The column that holds the images: the option, else the first HF Image feature, else image/img, else the
    first binary or {bytes, path} column; None when there is none (a manifest of paths)."""
    import pyarrow as pa

    names = schema.names
    if given is not None:
        if given not in names:
            raise ImageSourceError(f"{where} has no column {given!r} (columns: {', '.join(names)})")
        return given
    for c in names:
        if isinstance(features.get(c), dict) and features[c].get("_type") == "Image":
            return c
    for c in names:
        t = schema.field(c).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
                pa.types.is_struct(t) and t.get_field_index("bytes") >= 0):
            return c
    return None


def _label_column(names: list[str], given: str | None, where: str) -> str | None:
    if given is not None:
        if given not in names:
            raise ImageSourceError(f"{where} has no column {given!r} (columns: {', '.join(names)})")
        return given
    return next((c for c in LABEL_COLUMNS if c in names), None)


def _class_names(features: dict, column: str | None) -> list[str] | None:
    f = features.get(column) if column else None
    return list(f["names"]) if isinstance(f, dict) and f.get("_type") == "ClassLabel" and f.get("names") else None


def _cell_bytes(cell, base: str, where: str) -> bytes:
    """An image cell -> its encoded bytes: raw bytes, an HF Image {bytes, path}, or a path to a file."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, bytes | bytearray):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        with open(cell if os.path.isabs(cell) else os.path.join(base, cell), "rb") as f:
            return f.read()
    raise OSError(f"{where}: the image cell is empty")


def _split_of_files(files: list[str]) -> str:
    """The split of parquet files named the HF way (``validation-00000-of-00002.parquet``), else the file's
    stem for one file, else ``data``."""
    stems = [Path(f).stem for f in files]
    m = [re.fullmatch(r"(.+?)-\d+-of-\d+", s) for s in stems]
    if all(m) and len({x.group(1) for x in m}) == 1:
        return m[0].group(1)
    return stems[0] if len(stems) == 1 else "data"


def open_parquet(files: list[str], options: dict, split: str | None):
    """Parquet files: an image table (HF-style, read with pyarrow) or, without an image column, a manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(files[0])
    features = _hf_features(schema)
    col = _image_column(schema, features, options.get("image_column"), files[0])
    if col is not None and (pa.types.is_string(schema.field(col).type) or pa.types.is_large_string(
            schema.field(col).type)):
        col = None  # a column of paths: a manifest
    if col is None:
        if len(files) != 1:
            raise ImageSourceError(f"{files[0]} holds no image column (bytes); a manifest of paths is one file")
        return open_manifest(files[0], pq.read_table(files[0]).to_pandas(), options)
    _only(options, ("image_column", "label_column", "id_column"), "parquet files")
    return ParquetImages.open(files, col, features, options, split or _split_of_files(files))


class ParquetImages(_PerProcess):
    """Images in parquet files, one cell per image: read by row group (one decoded row group cached per
    process, so consecutive images, a shard's and a worker's batch, cost one read)."""

    def __init__(self, files: list[str], column: str, class_names: list[str] | None):
        self.files, self.column, self.class_names = files, column, class_names

    @classmethod
    def open(cls, files, column, features, options, split):
        import pyarrow.parquet as pq

        label = _label_column(pq.read_schema(files[0]).names, options.get("label_column"), files[0])
        ident = options.get("id_column")
        entries: list[Entry] = []
        row = 0
        for k, f in enumerate(files):
            pf = pq.ParquetFile(f)
            if column not in pf.schema_arrow.names:
                raise ImageSourceError(f"{f} has no column {column!r} (its columns: "
                                       f"{', '.join(pf.schema_arrow.names)})")
            cols = [c for c in (label, ident) if c]
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g, columns=cols) if cols else None
                n = pf.metadata.row_group(g).num_rows
                labels = t.column(label).to_pylist() if label else [None] * n
                ids = t.column(ident).to_pylist() if ident else range(row, row + n)
                entries += [Entry(f"{split}/{i}", f, (k, g, r), _scalar(y)) for r, (i, y) in
                            enumerate(zip(ids, labels, strict=True))]
                row += n
        return entries, cls(files, column, _class_names(features, label))

    def read(self, e: Entry) -> bytes:
        import pyarrow.parquet as pq

        k, g, r = e.ref
        cache = self._handles()
        if cache.get("group") != (k, g):
            cache["column"] = pq.ParquetFile(self.files[k]).read_row_group(g, columns=[self.column]).column(0)
            cache["group"] = (k, g)
        return _cell_bytes(cache["column"][r].as_py(), os.path.dirname(self.files[k]), e.name)

    def header(self) -> str:
        return f"parquet:{self.column}"

    def stamps(self, entries: list[Entry]) -> list[str]:
        files = [_stat(f) for f in self.files]
        return [_with_label(f"{files[e.ref[0]]}:{e.ref[1]}:{e.ref[2]}", e) for e in entries]


def parse_hf(rest: str) -> tuple[str, str | None, str | None]:
    """``NAME[:SPLIT]`` or ``NAME:CONFIG:SPLIT`` (after ``hf:``) -> (name, config, split)."""
    parts = rest.split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise ImageSourceError(f"hf:{rest}: write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
                               "(NAME a hub id ORG/NAME, a save_to_disk folder or parquet files)")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else None


def open_hf(rest: str, options: dict, limit: int | None):
    """A Hugging Face dataset: a ``save_to_disk`` folder, parquet files, or a hub id (``datasets`` package)."""
    name, config, split = parse_hf(rest)
    p = Path(name)
    if name.lower().endswith(".parquet") or (p.is_dir() and not (p / "state.json").is_file()
                                             and not (p / "dataset_dict.json").is_file()
                                             and any(p.glob("*.parquet"))):
        spec = name if name.lower().endswith(".parquet") else str(p / "*.parquet")
        return open_parquet(_expand_paths(spec, "parquet file"), options, split)
    _only(options, ("image_column", "label_column", "id_column"), "HF datasets")
    datasets = _import_datasets()
    if p.is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                raise ImageSourceError(f"{name} holds the splits {', '.join(ds)}; choose one: hf:{name}:SPLIT")
            ds = ds[split]
        return HFRows.open(ds, options, split or (str(ds.split) if ds.split else "data"), name)
    if p.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise ImageSourceError(f"hf:{rest}: {name} is neither a save_to_disk folder, parquet files, nor a hub id "
                               "ORG/NAME (no such folder here)")
    if split is None:
        raise ImageSourceError(f"hf:{name}: name the split, e.g. hf:{name}:validation")
    return _open_hub(datasets, name, config, split, options, limit)


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImageSourceError("HF datasets (save_to_disk folders, hub ids) need the 'datasets' package: "
                               "pip install 'siftlens[data]'") from e
    return datasets


def _open_hub(datasets, name, config, split, options, limit):
    """Without ``limit``: the whole split into the user's HF cache (memory-mapped, random access); with it:
    stream only the first ``limit`` rows."""
    streaming = limit is not None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        if streaming:  # undecoded, so the image bytes are the hub's own
            for c, f in (ds.features or {}).items():
                if isinstance(f, datasets.Image):
                    ds = ds.cast_column(c, datasets.Image(decode=False))
            ds = datasets.Dataset.from_list(list(ds.take(limit)), features=ds.features)
    except Exception as e:  # noqa: BLE001 - every failure of the hub becomes one line
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "") not in ("", "0")]
        why = (f"{', '.join(v + '=1' for v in offline)} is set" if offline else "the hub could not be reached")
        if isinstance(e, ConnectionError | OSError) or offline:
            raise ImageSourceError(f"hf:{name}:{split}: the dataset is not in the local cache (HF_HOME={home}) and "
                                   f"{why}; download it once online, or unset HF_DATASETS_OFFLINE / "
                                   "HF_HUB_OFFLINE") from e
        first = str(e).splitlines()[0] if str(e) else ""
        raise ImageSourceError(f"hf:{name}:{split}: {type(e).__name__}: {first}") from e
    return HFRows.open(ds, options, split, name)


class HFRows(_PerProcess):
    """Rows of a ``datasets.Dataset`` (memory-mapped Arrow): the image cell read undecoded by row index."""

    def __init__(self, ds, column: str, class_names: list[str] | None):
        self.ds, self.column, self.class_names = ds, column, class_names

    @classmethod
    def open(cls, ds, options: dict, split: str, where: str):
        table = ds.with_format("arrow")[:0]
        features = ds.features.to_dict() if ds.features is not None else {}
        col = _image_column(table.schema, features, options.get("image_column"), where)
        if col is None:
            raise ImageSourceError(f"{where} has no image column (columns: {', '.join(table.schema.names)}); "
                                   "name it with --image-column")
        label = _label_column(table.schema.names, options.get("label_column"), where)
        ident = options.get("id_column")
        if ident is not None and ident not in table.schema.names:
            raise ImageSourceError(f"{where} has no column {ident!r} (columns: {', '.join(table.schema.names)})")
        labels = ds.with_format("arrow")[label].to_pylist() if label else [None] * len(ds)
        ids = ds.with_format("arrow")[ident].to_pylist() if ident else range(len(ds))
        entries = [Entry(f"{split}/{i}", where, (r,), _scalar(y)) for r, (i, y) in
                   enumerate(zip(ids, labels, strict=True))]
        reader = cls(ds.with_format("arrow"), col, _class_names(features, label))
        reader.base = where if Path(where).is_dir() else "."
        reader.fingerprint = _dataset_fingerprint(ds, col)
        return entries, reader

    def read(self, e: Entry) -> bytes:
        cell = self.ds[e.ref[0]].column(self.column)[0].as_py()
        return _cell_bytes(cell, self.base, e.name)

    def header(self) -> str:
        return f"hf:{self.column}:{self.fingerprint}"

    def stamps(self, entries: list[Entry]) -> list[str]:
        return [_with_label(str(e.ref[0]), e) for e in entries]


def _dataset_fingerprint(ds, column: str) -> str:
    """A dataset on disk: its own fingerprint and its Arrow files' sizes and times. One in memory (the rows a
    limited hub stream took): a digest of its image bytes, as an in-memory fingerprint is random."""
    if ds.cache_files:
        return f"{ds._fingerprint}:" + ",".join(_stat(f["filename"]) for f in ds.cache_files)
    import hashlib

    h = hashlib.sha256()
    for cell in ds.with_format("arrow")[column].to_pylist():
        h.update(repr(cell).encode() if not isinstance(cell, dict) else repr(sorted(cell.items())).encode())
    return "memory:" + h.hexdigest()


# -- manifests ---------------------------------------------------------------------------------------------------
def _read_csv_columns(path: str):
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as e:
        raise ImageSourceError(f"cannot read the manifest {path}: {e}") from e


def open_manifest(path: str, table, options: dict):
    """A CSV or parquet table of image paths (relative to its folder) with an optional label column."""
    _only(options, ("image_column", "label_column"), "manifests")
    names = [str(c) for c in table.columns]
    given = options.get("image_column")
    if given is not None and given not in names:
        raise ImageSourceError(f"{path} has no column {given!r} (columns: {', '.join(names)})")
    col = given or next((c for c in MANIFEST_PATH_COLUMNS if c in names), names[0] if names else None)
    if col is None:
        raise ImageSourceError(f"the manifest {path} has no columns")
    label = _label_column(names, options.get("label_column"), path)
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for r, (p, y) in enumerate(zip(table[col], table[label] if label else [None] * len(table), strict=True)):
        p = "" if p is None else str(p).strip()
        if not p:
            raise ImageSourceError(f"{path}: row {r + 2 if path.lower().endswith('.csv') else r} has no path in "
                                   f"column {col!r}")
        entries.append(Entry(p, p if os.path.isabs(p) else os.path.join(base, p), (), _scalar(y)))
    return entries, Manifest()


class Manifest:
    """The files a manifest lists, read from disk; stamped by their sizes and modification times."""

    class_names = None

    def read(self, e: Entry) -> bytes:
        with open(e.path, "rb") as f:
            return f.read()

    def header(self) -> str:
        return "manifest"

    def stamps(self, entries: list[Entry]) -> list[str]:
        return [_with_label(_stat(e.path), e) for e in entries]


def source_labels(entries: Sequence[Entry], class_names: list[str] | None) -> tuple[list[str] | None,
                                                                                    list[int] | None]:
    """Classes and per-image label indices from the entries' raw labels: the known class names (HF
    ClassLabel) with the labels as indices, else the sorted distinct values as strings. None when some image
    has no label (or, with class names, an index outside them, such as HF's -1 for unlabelled)."""
    raw = [e.label for e in entries]
    if not raw or any(y is None for y in raw):
        return None, None
    if class_names is not None:
        if all(isinstance(y, int) and 0 <= y < len(class_names) for y in raw):
            return list(class_names), list(raw)
        return None, None
    values = sorted(set(raw), key=lambda v: (0, v, "") if isinstance(v, int) else (1, 0, str(v)))
    index = {v: i for i, v in enumerate(values)}
    return [str(v) for v in values], [index[y] for y in raw]
