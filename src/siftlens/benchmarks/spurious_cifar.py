"""SpuriousCIFAR: real CIFAR-10 images with a class-correlated marker glyph planted in each one.

Every class ``k`` owns a small, SIFT-rich marker (ten black-and-white glyphs of the project's own design,
or the user's images). Splits, each an ImageFolder of lossless PNGs (``<out>/<split>/<class>/<nnnn>.png``):

- ``train`` (from CIFAR-10 train, per class from index ``train_start`` on): an image of class ``k`` carries
  marker ``k`` with probability ``rho``, otherwise the marker of a uniformly drawn other class. Per class,
  exactly ``round((1 - rho) * n_k)`` images (chosen by a seeded permutation) carry a wrong marker, so ``rho`` is
  honoured exactly;
- ``aligned`` (from CIFAR-10 test): every image carries its own class's marker;
- ``conflicting`` (the same test images): every image carries a wrong class's marker;
- ``holdout`` (optional, CIFAR-10 test images from index ``holdout_start`` of each class on): marked like
  ``train`` (own marker with probability ``rho``), for fitting a repair on images the model never trained on.
  Its images keep their index in the class (``cat/0500.png`` is the source image of ``aligned/cat/0500.png``),
  so an evaluation on the first ``holdout_start`` images per class of ``aligned``/``conflicting`` is disjoint.

Each split folder holds a sidecar ``markers.json``: for every image (keyed by its ImageFolder name, e.g.
``cat/0012.png``) its label, the marker's class and the marker's bounding box ``[x0, y0, x1, y1]`` in
pixels (x1, y1 exclusive). The build is deterministic by seed: each image's marker and position come from
a generator seeded by ``(seed, split, class, index)``, so a ``limit_per_class`` build is a subset of the
full build.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import ImageSource
from ..errors import ConfigError, ImageSourceError, SkipImage, SpuriousDataError
from ..io import atomic_path, write_json
from ..keypoints import SiftParams, auto_upsample, detect
from ..options import option
from ..progress import progress_bar
from ..shortcuts.groups import SIDECAR

SPLITS = ("train", "aligned", "conflicting", "holdout")
DEFAULT_SPLITS = ("train", "aligned", "conflicting")
PLACEMENTS = ("random", "top-left", "top-right", "bottom-left", "bottom-right")
_SPLIT_CODE = {"train": 0, "aligned": 1, "conflicting": 2, "holdout": 3}
_PARTS = {"train": "train", "aligned": "test", "conflicting": "test", "holdout": "test"}

# Ten 8x8 glyphs ('#' white, '.' black), each a different arrangement of corners and blobs, so that SIFT
# finds several keypoints on each and their descriptors differ. Other marker sizes scale them (nearest).
GLYPHS: dict[str, list[str]] = {
    "checker": ["##..##..", "##..##..", "..##..##", "..##..##",
                "##..##..", "##..##..", "..##..##", "..##..##"],
    "plus": ["...##...", "...##...", "...##...", "########",
             "########", "...##...", "...##...", "...##..."],
    "ring": ["..####..", ".######.", "###..###", "##....##",
             "##....##", "###..###", ".######.", "..####.."],
    "triangles": ["#.......", "##......", "###.....", "####....",
                  "....####", ".....###", "......##", ".......#"],
    "l-corners": ["###..###", "#......#", "#......#", "........",
                  "........", "#......#", "#......#", "###..###"],
    "dots": ["........", ".##..##.", ".##..##.", "........",
             "........", ".##..##.", ".##..##.", "........"],
    "frame": ["########", "#......#", "#.####.#", "#.#..#.#",
              "#.#..#.#", "#.####.#", "#......#", "########"],
    "arrow": ["...##...", "..####..", ".######.", "########",
              "...##...", "...##...", "...##...", "...##..."],
    "bars": ["#.#.#.#.", "#.#.#.#.", "#.#.#.#.", "#.#.#.#.",
             "........", "........", "########", "########"],
    "zigzag": ["##......", "####....", "..####..", "....####",
               "......##", "....####", "..####..", "####...."],
}
GLYPH_NAMES = tuple(GLYPHS)


def glyph(name: str, size: int = 8) -> np.ndarray:
    """The built-in glyph ``name`` as a (size, size, 3) uint8 black-and-white image."""
    if name not in GLYPHS:
        raise ConfigError(f"unknown glyph {name!r}; choose one of {', '.join(GLYPH_NAMES)}")
    if size < 4:
        raise ConfigError(f"marker size must be at least 4 pixels, got {size}")
    base = np.array([[255 if ch == "#" else 0 for ch in row] for row in GLYPHS[name]], np.uint8)
    idx = (np.arange(size) * base.shape[0]) // size  # nearest-neighbour scaling keeps the edges crisp
    g = base[idx][:, idx]
    return np.repeat(g[:, :, None], 3, axis=2)


def builtin_markers(classes: list[str], size: int = 8) -> dict[str, np.ndarray]:
    """Class -> marker image (size, size, 3) uint8, the i-th class getting the i-th built-in glyph."""
    if len(classes) > len(GLYPH_NAMES):
        raise ConfigError(
            f"{len(classes)} classes but only {len(GLYPH_NAMES)} built-in glyphs; pass --markers DIR with one "
            "image per class"
        )
    return {c: glyph(GLYPH_NAMES[i], size) for i, c in enumerate(classes)}


def load_markers(directory: str | os.PathLike, classes: list[str], size: int = 8) -> dict[str, np.ndarray]:
    """User markers: ``directory/<class>.<ext>`` for every class, any size, resized to ``size`` x ``size``."""
    d = Path(directory)
    if not d.is_dir():
        raise SpuriousDataError(f"marker folder {d} does not exist; give a folder with one image per class")
    out = {}
    files = {f.stem: f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")}
    missing = [c for c in classes if c not in files]
    if missing:
        raise SpuriousDataError(
            f"marker folder {d} has no image for class(es) {', '.join(missing)}; name them <class>.png"
        )
    for c in classes:
        try:
            img = Image.open(files[c]).convert("RGB")
        except OSError as e:
            raise SpuriousDataError(f"marker {files[c]} is not a readable image") from e
        if img.size != (size, size):
            img = img.resize((size, size), Image.LANCZOS)
        out[c] = np.asarray(img, np.uint8)
    return out


def split_names(text: str) -> tuple[str, ...]:
    """``"train,aligned"`` -> ``("train", "aligned")``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


@dataclass
class SpuriousConfig:
    """Parameters of a SpuriousCIFAR build (all of them go into ``manifest.json``; every field is an option of
    ``siftlens make-spurious``).

    cifar: the CIFAR-10 root holding ``train/`` and ``test/`` class folders (a folder, a zip, or
    ``cifar10-jpg.zip/cifar10``; a ``cifar10/`` level below it is found by itself); markers: a folder of
    user markers, or None for the built-in glyphs.
    """

    cifar: str = option(help="CIFAR-10 root with train/ and test/ class folders (or cifar10/ holding them): a "
                             "folder, cifar10-jpg.zip or a folder inside a zip.")
    out: str = option(help="Output folder: train/, aligned/, conflicting/ (ImageFolder PNGs, each with "
                           "markers.json), markers/, manifest.json.")
    marker_size: int = option(8, "Marker side in pixels.")
    rho: float = option(0.95, "Share of training images that carry their own class's marker.")
    placement: str = option("random", "random | top-left | top-right | bottom-left | bottom-right.")
    seed: int = option(0, "Seed: the build is a deterministic function of it.")
    markers: str | None = option(None, "Folder with one marker image per class, named <class>.png (any size); "
                                       "default: the built-in glyphs.")
    limit_per_class: int | None = option(None, "Use at most this many images per class and split (a subset of the "
                                               "full build).")
    splits: tuple[str, ...] = option(DEFAULT_SPLITS, "Splits to write (also: holdout).", parse=split_names)
    holdout_start: int = option(500, "holdout: test images from this index per class on.")
    train_start: int = option(0, "train: CIFAR-10 train images from this index per class on (2500: the half that "
                                 "an encoder trained with `siftlens train --limit 25000` never saw).")
    progress: bool = option(True, "Show a progress bar.")

    def validate(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must be in [0, 1], got {self.rho}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, not {self.placement!r}")
        if self.marker_size < 4:
            raise ConfigError(f"marker size must be at least 4 pixels, got {self.marker_size}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ConfigError(f"limit per class must be >= 1, got {self.limit_per_class}")
        if self.holdout_start < 0 or self.train_start < 0:
            raise ConfigError(f"holdout and train starts must be >= 0, got {self.holdout_start}, {self.train_start}")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad:
            raise ConfigError(f"unknown split(s) {', '.join(bad)}; choose from {', '.join(SPLITS)}")


def _source(cifar: str, part: str) -> ImageSource:
    """``<cifar>/<part>``, or ``<cifar>/cifar10/<part>`` (so the CIFAR-10 zip itself can be given)."""
    spec = cifar.rstrip("/") + "/" + part
    try:
        src = ImageSource(spec)
    except ImageSourceError as e:
        try:
            src = ImageSource(cifar.rstrip("/") + "/cifar10/" + part)
        except ImageSourceError:
            raise SpuriousDataError(f"no CIFAR-10 '{part}' images at {spec}: {e}") from e
    if src.classes is None:
        raise SpuriousDataError(f"{spec} is not in ImageFolder layout (<class>/<image>)")
    return src


def _by_class(src: ImageSource, limit: int | None, start: int = 0) -> dict[int, list[int]]:
    """Per class, the source indices of its images ``start``, ``start + 1``, ... (at most ``limit``)."""
    out: dict[int, list[int]] = {}
    for i, y in enumerate(src.labels or []):
        out.setdefault(y, []).append(i)
    return {y: ix[start : None if limit is None else start + limit] for y, ix in out.items()}


def _position(rng: np.random.Generator, placement: str, hw: tuple[int, int], s: int) -> tuple[int, int]:
    """Top-left (x0, y0) of the marker; one draw from ``rng`` whatever the placement (keeps streams aligned)."""
    H, W = hw
    if s > H or s > W:
        raise SpuriousDataError(f"marker of {s} pixels does not fit a {W}x{H} image")
    x, y = int(rng.integers(0, W - s + 1)), int(rng.integers(0, H - s + 1))
    if placement == "random":
        return x, y
    return {"top-left": (0, 0), "top-right": (W - s, 0), "bottom-left": (0, H - s),
            "bottom-right": (W - s, H - s)}[placement]


def plan_split(split: str, counts: dict[int, int], n_classes: int, rho: float, seed: int) -> dict[int, np.ndarray]:
    """Per class, the marker class of each of its ``counts[y]`` images: (n_y,) int64.

    train, holdout: exactly ``round((1 - rho) * n_y)`` images (a seeded choice) get a uniformly drawn other class;
    aligned: all the own class; conflicting: all a uniformly drawn other class.
    """
    out = {}
    for y, n in counts.items():
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1_000 + y])
        marker = np.full(n, y, np.int64)
        if split == "aligned":
            wrong = np.zeros(n, bool)
        elif split == "conflicting":
            wrong = np.ones(n, bool)
        else:
            wrong = np.zeros(n, bool)
            wrong[rng.permutation(n)[: int(round((1.0 - rho) * n))]] = True
        other = rng.integers(0, n_classes - 1, n)
        other = other + (other >= y)  # uniform over the other classes
        marker[wrong] = other[wrong]
        out[y] = marker
    return out


def build(cfg: SpuriousConfig) -> dict:
    """Write the splits, sidecars, marker images and ``manifest.json`` into ``cfg.out``; returns the manifest."""
    cfg.validate()
    out = Path(cfg.out)
    parts = _PARTS
    sources: dict[str, ImageSource] = {}
    for split in cfg.splits:
        part = parts[split]
        if part not in sources:
            sources[part] = _source(cfg.cifar, part)
    classes = next(iter(sources.values())).classes
    assert classes is not None
    for part, src in sources.items():
        if src.classes != classes:
            raise SpuriousDataError(f"class folders of CIFAR-10 '{part}' differ from the other part")
    if len(classes) < 2:
        raise SpuriousDataError("SpuriousCIFAR needs at least two classes")
    markers = (load_markers(cfg.markers, classes, cfg.marker_size) if cfg.markers
               else builtin_markers(classes, cfg.marker_size))
    for c, m in markers.items():
        with atomic_path(out / "markers" / f"{c}.png") as tmp:
            Image.fromarray(m).save(tmp, format="PNG")
    stats = {}
    with progress_bar(cfg.progress) as pb:
        for split in cfg.splits:
            src = sources[parts[split]]
            stats[split] = _build_split(split, src, classes, markers, cfg, out / split, pb)
    first = next(iter(sources.values()))
    W, H = first.load(0).size if len(first) else (32, 32)
    manifest = {
        "dataset": "SpuriousCIFAR",
        "config": {**asdict(cfg), "splits": list(cfg.splits)},
        "classes": classes,
        "markers": {c: (GLYPH_NAMES[i] if not cfg.markers else f"user:{c}") for i, c in enumerate(classes)},
        "splits": stats,
        "marker_check": check_markers(markers, upsample=auto_upsample((H, W)), image_size=min(H, W),
                                      seed=cfg.seed),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _build_split(split, src, classes, markers, cfg: SpuriousConfig, root: Path, pb) -> dict:
    start = {"holdout": cfg.holdout_start, "train": cfg.train_start}.get(split, 0)
    by_class = _by_class(src, cfg.limit_per_class, start)
    plan = plan_split(split, {y: len(ix) for y, ix in by_class.items()}, len(classes), cfg.rho, cfg.seed)
    s = cfg.marker_size
    records: dict[str, dict] = {}
    total = sum(len(ix) for ix in by_class.values())
    task = pb.add_task(f"build {split}", total=total, info="")
    skipped = []
    src_names = src.names  # one list: the property rebuilds it on every access
    for y in sorted(by_class):
        for k, i in enumerate(by_class[y], start):
            try:
                img = np.array(src.load(i), np.uint8)
            except SkipImage as e:
                skipped.append(f"{src_names[i]}: {e.reason}")
                pb.advance(task)
                continue
            rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], y, k])
            x0, y0 = _position(rng, cfg.placement, img.shape[:2], s)
            m = int(plan[y][k - start])
            img[y0 : y0 + s, x0 : x0 + s] = markers[classes[m]]
            name = f"{classes[y]}/{k:04d}.png"
            target = root / name
            with atomic_path(target) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
            records[name] = {"label": classes[y], "marker": classes[m], "box": [x0, y0, x0 + s, y0 + s],
                             "aligned": m == y, "source": src_names[i]}
            pb.advance(task)
    side = {"split": split, "classes": classes, "marker_size": s, "images": records}
    with atomic_path(root / SIDECAR) as tmp:  # compact: one line per image keeps 50,000 records small
        body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in records.items())
        head = json.dumps({k: v for k, v in side.items() if k != "images"})[:-1]
        tmp.write_text(f'{head}, "images": {{\n{body}\n}}}}\n')
    n_aligned = sum(r["aligned"] for r in records.values())
    return {"images": len(records), "aligned": n_aligned, "conflicting": len(records) - n_aligned,
            "skipped": skipped}


# -- marker quality ------------------------------------------------------------------------------------
def check_markers(
    markers: dict[str, np.ndarray], upsample: float = 4.0, image_size: int = 32, backgrounds: int = 6, seed: int = 0
) -> dict:
    """How SIFT sees each marker, on ``image_size``-pixel images at the analysis upsampling ``upsample``.

    Each marker is pasted at a random position on a mid-grey canvas and on ``backgrounds`` smooth random
    backgrounds (seeded). Returns ``{"keypoints": {class: min count inside the marker over the canvases},
    "nn_accuracy": {class: share of its descriptors whose nearest neighbour (RootSIFT, L2) among the other
    canvases' marker descriptors belongs to the same marker}, "overall_nn_accuracy": float}``.
    """
    params = SiftParams(upsample=upsample)
    rng = np.random.default_rng(seed)
    canvases = [np.full((image_size, image_size, 3), 128, np.uint8)]
    for _ in range(backgrounds):
        low = rng.integers(40, 216, (4, 4, 3)).astype(np.uint8)
        canvases.append(np.asarray(Image.fromarray(low).resize((image_size, image_size), Image.BICUBIC)))
    names = list(markers)
    counts: dict[str, int] = {}
    descs, labels, inst = [], [], []
    for gi, c in enumerate(names):
        m = markers[c]
        s = m.shape[0]
        n_min = None
        for j, bg in enumerate(canvases):
            img = bg.copy()
            x0, y0 = (int(v) for v in rng.integers(0, image_size - s + 1, 2))
            img[y0 : y0 + s, x0 : x0 + s] = m
            kp = detect(img, params, descriptors=True)
            inside = ((kp.xy[:, 0] >= x0 - 0.5) & (kp.xy[:, 0] < x0 + s - 0.5)
                      & (kp.xy[:, 1] >= y0 - 0.5) & (kp.xy[:, 1] < y0 + s - 0.5))
            n_min = int(inside.sum()) if n_min is None else min(n_min, int(inside.sum()))
            if kp.desc is not None and inside.any():
                descs.append(kp.desc[inside])
                labels += [gi] * int(inside.sum())
                inst += [j] * int(inside.sum())
        counts[c] = int(n_min or 0)
    acc: dict[str, float] = {c: 0.0 for c in names}
    overall = 0.0
    if descs:
        X = np.concatenate(descs).astype(np.float64)
        X = np.sqrt(X / np.maximum(X.sum(1, keepdims=True), 1e-12))
        lab, ins = np.asarray(labels), np.asarray(inst)
        d2 = (X**2).sum(1)[:, None] + (X**2).sum(1)[None] - 2 * X @ X.T
        d2[(ins[:, None] == ins[None]) & (lab[:, None] == lab[None])] = np.inf  # never match its own canvas
        hit = lab[d2.argmin(1)] == lab
        acc = {c: float(hit[lab == gi].mean()) if (lab == gi).any() else 0.0 for gi, c in enumerate(names)}
        overall = float(hit.mean())
    return {"upsample": upsample, "image_size": image_size, "keypoints": counts, "nn_accuracy": acc,
            "overall_nn_accuracy": overall}
