"""Image sources and robust decoding.

An *image source* is a folder (searched recursively), a zip archive, a folder inside a zip written as
``archive.zip/inner/folder``, a glob pattern, or an explicit list of files. When the images sit in
class sub-folders (ImageFolder layout: ``root/<class>/<file>``) the source also carries labels.
At scale it is also WebDataset tar shards (``shards/train-{0000..0099}.tar``), a Hugging Face dataset (a
``save_to_disk`` folder, parquet files, ``hf:ORG/NAME:SPLIT``) or a CSV/parquet manifest of paths: see
:mod:`siftlens.sources` for their identities and labels.

Every image has a *name*, its identity within a run, unique and stable: the path relative to the source
root. The root is the folder itself; the folder inside the zip; for a glob, the folder before the first
component with a wildcard (``data/*/0*.jpg`` -> ``data``, names ``cat/01.jpg``); for a list of files, their
deepest common folder (``a/x.jpg`` and ``b/x.jpg`` -> ``a/x.jpg``, ``b/x.jpg``; one file or files of one
folder keep their base names). The tables, the report and every random draw keyed by image use it.

Decoding never crashes a run: a file that is not a readable image raises :class:`SkipImage` with a
reason that the caller counts and lists in the manifest.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import ImageSourceError, SkipImage
from .sources import IMAGE_EXTS, Entry, check_no_options, open_source, source_labels

__all__ = ["IMAGE_EXTS", "ImageSource", "decode_image", "load_labelled_array", "to_rgb"]
DEFAULT_MAX_PIXELS = 100_000_000  # larger images are skipped (decompression-bomb guard)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


_Entry = Entry  # name: what reports show (path relative to the source root); path: file, or member in the zip


def _split_zip(spec: str) -> tuple[str, str] | None:
    """``a/b.zip/c/d`` -> (``a/b.zip``, ``c/d``) when ``a/b.zip`` is a file; else None."""
    p = Path(spec)
    for parent in [p, *p.parents]:
        if parent.suffix.lower() == ".zip" and parent.is_file():
            inner = p.relative_to(parent).as_posix()
            return str(parent), "" if inner == "." else inner
    return None


class ImageSource:
    """A list of images with optional labels (ImageFolder layout, or a tar's, dataset's or manifest's own);
    reads raw bytes by index.

    The zip file (tar shard, parquet file) is opened once per process, so it is safe to use from DataLoader
    workers. ``image_column``, ``label_column``, ``label_key`` and ``id_column`` choose what a tar sample, a
    dataset row or a manifest row holds (see :mod:`siftlens.sources`); ``options`` records the ones given.
    """

    def __init__(self, spec: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None, *,
                 image_column: str | None = None, label_column: str | None = None, label_key: str | None = None,
                 id_column: str | None = None):
        self.spec = spec if isinstance(spec, str | os.PathLike) else [str(s) for s in spec]
        self.options = {k: v for k, v in (("image_column", image_column), ("label_column", label_column),
                                          ("label_key", label_key), ("id_column", id_column)) if v is not None}
        self._zip_path: str | None = None
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        where = str(spec) if isinstance(spec, str | os.PathLike) else "the file list"
        opened = open_source(spec, self.options, limit)
        self._reader = None if opened is None else opened[1]
        if opened is None:
            check_no_options(self.options, spec)
            entries = sorted(self._enumerate(spec), key=lambda e: e.name)
            label_of = _imagefolder_labels
        else:
            entries = opened[0]  # in the source's own order: shards and members, rows
            label_of = lambda es: source_labels(es, self._reader.class_names)  # noqa: E731
        if not entries:
            raise ImageSourceError(f"no images found in {spec!s}; give a folder, zip, glob or image files")
        _check_unique(entries, where)
        self.classes, labels = label_of(entries)
        if limit is not None and limit < len(entries):
            entries = _spread(entries, limit, labels)
            self.classes, labels = label_of(entries)
        self.entries = entries
        self.labels = labels

    # -- enumeration ---------------------------------------------------------------------------
    def _enumerate(self, spec) -> list[_Entry]:
        if not isinstance(spec, str | os.PathLike):
            return _file_list_entries([str(s) for s in spec])
        spec = str(spec)
        z = _split_zip(spec)
        if z is not None:
            self._zip_path, inner = z
            prefix = inner.strip("/") + "/" if inner.strip("/") else ""
            with zipfile.ZipFile(self._zip_path) as zf:
                names = [n for n in zf.namelist() if n.startswith(prefix) and _is_image_name(n)]
            if prefix and not names:
                raise ImageSourceError(f"no images under '{inner}' inside {self._zip_path}")
            return [_Entry(n[len(prefix) :], n) for n in names]
        p = Path(spec)
        if p.is_dir():
            files = [f for f in p.rglob("*") if f.is_file() and _is_image_name(f.name)]
            return [_Entry(f.relative_to(p).as_posix(), str(f)) for f in files]
        if p.is_file():
            return [_Entry(p.name, str(p))]
        if _glob.has_magic(spec):
            files = sorted({f for f in _glob.glob(spec, recursive=True) if Path(f).is_file()})
            base = _glob_base(spec)
            return [_Entry(Path(os.path.relpath(f, base)).as_posix(), f) for f in files]
        raise ImageSourceError(f"image source not found: {spec}")

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def fingerprint(self) -> str:
        """A digest of every image's name, size and modification time (for a zip member: size and CRC; a tar
        member: its shard's size and time, offset and size; a dataset: its fingerprint and files; and the label
        of a tar, dataset or manifest image): equal exactly when the run would read the same files under the
        same names."""
        h = hashlib.sha256()
        if self._reader is not None:
            h.update(f"{self._reader.header()}\n".encode())
        for e, stamp in zip(self.entries, self._stamps(), strict=True):
            h.update(f"{e.name}\0{stamp}\n".encode())
        return h.hexdigest()

    def _stamps(self) -> list[str]:
        if self._reader is not None:
            return self._reader.stamps(self.entries)
        if self._zip_path is not None:
            with zipfile.ZipFile(self._zip_path) as zf:
                return [f"{i.file_size}:{i.CRC:08x}" for i in map(zf.getinfo, (e.path for e in self.entries))]
        return [_file_stamp(e.path) for e in self.entries]

    def read_bytes(self, i: int) -> bytes:
        e = self.entries[i]
        if self._reader is not None:
            return self._reader.read(e)
        if self._zip_path is not None:
            if self._zip is None or self._zip_pid != os.getpid():
                self._zip = zipfile.ZipFile(self._zip_path)
                self._zip_pid = os.getpid()
            return self._zip.read(e.path)
        with open(e.path, "rb") as f:
            return f.read()

    def load(self, i: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode image ``i`` as RGB; raises SkipImage with a reason for a bad file."""
        try:
            data = self.read_bytes(i)
        except OSError as e:
            raise SkipImage(f"cannot read file: {e}") from e
        return decode_image(data, max_pixels=max_pixels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"] = None
        return state


def _file_stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _file_list_entries(paths: list[str]) -> list[_Entry]:
    """Entries of an explicit file list, named relative to the files' deepest common folder."""
    for s in paths:
        if not Path(s).is_file():
            raise ImageSourceError(f"image file not found: {s}")
    if not paths:
        return []
    full = [os.path.abspath(s) for s in paths]
    base = os.path.commonpath([os.path.dirname(f) for f in full])
    return [_Entry(Path(os.path.relpath(f, base)).as_posix(), s) for f, s in zip(full, paths, strict=True)]


def _glob_base(pattern: str) -> str:
    """The folder before the first path component with a wildcard: the root that names are relative to."""
    parts = Path(pattern).parts
    plain = next(i for i, part in enumerate(parts) if _glob.has_magic(part))
    return str(Path(*parts[:plain])) if plain else "."


def _check_unique(entries: list[_Entry], where: str) -> None:
    """Two entries with one name would be counted as one image: refuse the source instead."""
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ImageSourceError(f"{where} holds the image {e.name} twice; list each file once")
        seen.add(e.name)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTS)


def _imagefolder_labels(entries: list[_Entry]) -> tuple[list[str] | None, list[int] | None]:
    """Labels from the first path component when every image sits in a class folder."""
    names = [e.name for e in entries]
    if not names or any("/" not in n for n in names):
        return None, None
    tops = [n.split("/", 1)[0] for n in names]
    classes = sorted(set(tops))
    if len(classes) < 2:
        return None, None
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[t] for t in tops]


def _spread(entries: list[_Entry], limit: int, labels: list[int] | None) -> list[_Entry]:
    """Take ``limit`` entries, round-robin over classes when labelled, so a limit keeps every class; in the
    source's order."""
    if limit >= len(entries):
        return entries
    if labels is None:
        return entries[:limit]
    by_class: dict[int, list[int]] = {}
    for j, y in enumerate(labels):
        by_class.setdefault(y, []).append(j)
    out: list[int] = []
    k = 0
    while len(out) < limit:
        for y in sorted(by_class):
            if k < len(by_class[y]) and len(out) < limit:
                out.append(by_class[y][k])
        k += 1
    return [entries[j] for j in sorted(out)]


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image. Greyscale, palette, RGBA, CMYK and 16-bit images are converted.

    Raises SkipImage for files that are not images, are truncated or corrupt, or exceed
    ``max_pixels`` (checked from the header, before decoding).
    """
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as e:
        raise SkipImage("not an image file (unrecognised format)") from e
    w, h = img.size
    if w * h > max_pixels:
        raise SkipImage(f"image too large ({w}x{h} > {max_pixels} pixels)")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SkipImage(f"corrupt or truncated image ({type(e).__name__})") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High bit-depth images are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            lo, hi2 = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / max(hi2 - lo, 1e-12) * 255.0
        else:
            arr = arr / hi * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_labelled_array(
    source: ImageSource, size: tuple[int, int], progress=None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a labelled source into memory, each image resized to ``size`` = (H, W).

    Returns ``images: (N, H, W, 3) uint8``, ``labels: (N,) int64`` and the list of skip reasons.
    Intended for small images (CIFAR-scale), where decoding once beats re-decoding every epoch.
    """
    if source.labels is None:
        raise ImageSourceError(f"{source.spec!s} is not in ImageFolder layout (root/<class>/<image>)")
    H, W = size
    out = np.empty((len(source), H, W, 3), dtype=np.uint8)
    keep = np.zeros(len(source), dtype=bool)
    skipped = []
    for i in range(len(source)):
        try:
            img = source.load(i)
        except SkipImage as e:
            skipped.append(f"{source.names[i]}: {e.reason}")
            continue
        if img.size != (W, H):
            img = img.resize((W, H), Image.BICUBIC)
        out[i] = np.asarray(img)
        keep[i] = True
        if progress is not None:
            progress(1)
    labels = np.asarray(source.labels, dtype=np.int64)
    return out[keep], labels[keep], skipped
