"""Spurious-correlation discovery with SIFT visual words (METHOD.md section 4).

For a classifier and a set of images:

1. Per image: the prediction, the CLS attention over patches (last layer, mean over heads, or attention
   rollout), normalised to sum 1, and SIFT keypoints with descriptors on the model's own pixels.
2. A visual vocabulary: k-means (k-means++ initialisation, seeded, batched in torch) over a sample of
   RootSIFT descriptors; every keypoint gets its nearest word and the attention of its patch.
3. Per (class c, word v), over the images *predicted* c:

   - ``share`` S_cv: mean over those images of the CLS attention on the patches holding v (0 when v is
     absent), i.e. the fraction of the CLS token's attention that class-c images spend on v;
   - ``lift``: attention on v's patches relative to uniform attention over the same patches;
   - ``assoc``: log-odds of v being present in images predicted c minus that in the other images, with
     ``smoothing`` (0.5) added to every count;
   - ``off_object`` (only with ``boxes``: object boxes per image): share of v's keypoints outside the box.
4. Causal check, for the ``causal_top`` candidates per class with the largest ``S_cv * max(assoc, 0)``: in
   up to ``causal_images`` images predicted c that hold v, the patches holding v are occluded (their tokens
   dropped, or filled with the image's mean colour) and the fall of p(c) is recorded; the same number of
   random patches without v is occluded as a control. ``causal`` = mean fall - mean control fall.
5. Score (higher = more suspicious): ``score = S_cv * max(assoc, 0) * (max(causal, 0) + 0.01)``, times
   ``off_object`` when boxes are given. Candidates without a causal check count ``causal = 0`` (they all
   rank below the checked ones with a positive effect). Only (c, v) seen in at least ``min_images``
   images predicted c are ranked.

Everything is returned as data (:class:`DiscoveryResult`); :meth:`DiscoveryResult.save` writes
``candidates.csv``, ``discovery.json`` (with the vocabulary, so prompting can assign words to new images)
and ``keypoints.parquet``; :mod:`siftlens.spurious_report` renders the HTML report.

Boxes file (``boxes``): JSON ``{"<image name>": [x0, y0, x1, y1] | [[x0, y0, x1, y1], ...]}`` of *object*
boxes in the original image's pixels (x1, y1 exclusive); they are pushed through the model's own
preprocessing, so resizing and cropping are accounted for exactly. A SpuriousCIFAR sidecar marks the
spurious marker, not the object, and is used only by :func:`evaluate_markers` (never by the ranking).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .attention import Rollout, capture
from .data import ImageSource
from .errors import CandidatesError, ConfigError, SkipImage
from .interventions import forward_drop
from .io import atomic_path, write_json
from .keypoints import SiftParams, detect, patch_index
from .models.backends import Backend, load_backend
from .progress import progress_bar

ATTENTION_KINDS = ("last", "rollout")
OCCLUDE_KINDS = ("drop", "mean")
CAUSAL_FLOOR = 0.01


@dataclass
class DiscoveryConfig:
    """Every parameter of a discovery run (all of it goes into the JSON output)."""

    vocab_size: int = 256
    vocab_sample: int = 100_000
    kmeans_iters: int = 50
    attention: str = "last"
    upsample: float = 0.0  # 0: automatic (4 for 32x32 inputs, 1 for 224)
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    limit: int | None = None
    min_images: int = 5
    smoothing: float = 0.5
    causal_top: int = 10
    causal_images: int = 32
    occlude: str = "drop"
    drop_mode: str = "group"
    top: int = 10
    gallery: int = 12

    def validate(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, not {self.attention!r}")
        if self.occlude not in OCCLUDE_KINDS:
            raise ConfigError(f"--occlude must be one of {', '.join(OCCLUDE_KINDS)}, not {self.occlude!r}")
        if self.drop_mode not in ("group", "mask"):
            raise ConfigError(f"--drop-mode must be 'group' or 'mask', not {self.drop_mode!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"--vocab must be at least 2 words, got {self.vocab_size}")
        if self.batch_size < 1 or self.workers < 0 or self.min_images < 1:
            raise ConfigError("--batch-size and --min-images must be >= 1, --workers >= 0")
        if self.smoothing <= 0:
            raise ConfigError(f"smoothing must be > 0, got {self.smoothing}")
        if self.upsample < 0:
            raise ConfigError(f"--upsample must be > 0 (or 0 for automatic), got {self.upsample}")


# -- visual vocabulary -----------------------------------------------------------------------------
def rootsift(desc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(M, 128) SIFT descriptors -> RootSIFT (L1-normalise, square root), float32; L2 then = Hellinger."""
    d = torch.as_tensor(np.asarray(desc), dtype=torch.float32)
    return torch.sqrt(d / d.sum(1, keepdim=True).clamp_min(1e-12))


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]).clamp_min(0)


def assign(x: torch.Tensor, centers: torch.Tensor, batch: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every row. x: (M, d), centers: (k, d) -> (words (M,) int64, squared dist (M,))."""
    words = torch.empty(len(x), dtype=torch.int64)
    dist = torch.empty(len(x), dtype=torch.float32)
    for s in range(0, len(x), batch):
        d = _sq_dists(x[s : s + batch], centers)
        dist[s : s + batch], words[s : s + batch] = d.min(1)
    return words, dist


def kmeans(
    x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, batch: int = 16384, on_iter=None
) -> torch.Tensor:
    """k-means with k-means++ initialisation (seeded); x: (M, d) float -> centers (k, d).

    Lloyd iterations stop early when no assignment changes; an empty cluster is re-seeded at the point
    farthest from its centre. ``on_iter()`` is called after every Lloyd iteration (progress bars).
    """
    x = x.float()
    M = len(x)
    if M < k:
        raise ConfigError(f"only {M} SIFT descriptors for a vocabulary of {k} words; lower --vocab or add images")
    g = torch.Generator().manual_seed(seed)
    centers = torch.empty((k, x.shape[1]))
    centers[0] = x[torch.randint(M, (1,), generator=g)]
    d2 = _assign_dist(x, centers[:1], batch)
    for j in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: pick uniformly
            idx = torch.randint(M, (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=g)
        centers[j] = x[idx]
        d2 = torch.minimum(d2, _assign_dist(x, centers[j : j + 1], batch))
    words = None
    for _ in range(iters):
        new_words, dist = assign(x, centers, batch)
        if words is not None and torch.equal(new_words, words):
            break
        words = new_words
        sums = torch.zeros_like(centers).index_add_(0, words, x)
        counts = torch.bincount(words, minlength=k).float()
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = torch.argsort(dist, descending=True)[: int(empty.sum())]
            centers[empty] = x[far]
        if on_iter is not None:
            on_iter()
    return centers


def _assign_dist(x: torch.Tensor, c: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([_sq_dists(x[s : s + batch], c).min(1).values for s in range(0, len(x), batch)])


# -- per-image data --------------------------------------------------------------------------------
class KeypointDataset(Dataset):
    """Decode, preprocess with the model's own transform, detect SIFT with descriptors.

    Yields dicts with ``pixels (H, W, 3) uint8``, ``xy (K, 2)``, ``size (K,)``, ``desc (K, 128) uint8`` and,
    with ``boxes``, ``inside (K,) bool`` (keypoint inside the image's object box); a bad image yields its
    ``skip`` reason instead.
    """

    def __init__(self, source: ImageSource, backend: Backend, sift: SiftParams, boxes: dict | None = None):
        self.source = source
        self.preprocess = backend.preprocess
        self.sift = sift
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            img = self.source.load(i)
            pixels = self.preprocess(img)
            kp = detect(pixels, self.sift, descriptors=True)
        except SkipImage as e:
            return {"index": i, "skip": e.reason}
        item = {"index": i, "pixels": pixels, "xy": kp.xy, "size": kp.size,
                "desc": np.clip(np.rint(kp.desc), 0, 255).astype(np.uint8)}
        if self.boxes is not None:
            item["inside"] = _inside_object(img, self.boxes.get(self.source.names[i]), self.preprocess, kp.xy)
        return item


def collate_list(items: list[dict]) -> list[dict]:
    return items


def _inside_object(img: Image.Image, boxes, preprocess, xy: np.ndarray) -> np.ndarray:
    """Keypoints (K, 2) inside the object boxes given in original-image pixels (all False without boxes)."""
    if not boxes:
        return np.zeros(len(xy), bool)
    if isinstance(boxes[0], (int, float)):
        boxes = [boxes]
    mask = np.zeros((img.height, img.width), np.uint8)
    for b in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 255
    m = preprocess(Image.fromarray(mask).convert("RGB"))[..., 0] > 127
    h, w = m.shape
    cx = np.clip(np.rint(xy[:, 0]).astype(int), 0, w - 1)
    cy = np.clip(np.rint(xy[:, 1]).astype(int), 0, h - 1)
    return m[cy, cx]


def read_boxes(path: str | Path) -> dict:
    """Object boxes JSON -> {image name: list of [x0, y0, x1, y1]}; raises ConfigError when malformed."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"boxes file {p} not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"boxes file {p} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"boxes file {p} must map image names to [x0, y0, x1, y1] boxes")
    return raw


def model_labels(source: ImageSource, backend: Backend) -> np.ndarray:
    """Folder labels mapped to the model's class indices by name: (n,) int64, -1 where unknown."""
    n = len(source)
    if source.labels is None or source.classes is None:
        return np.full(n, -1, np.int64)
    if backend.class_names:
        index = {c: i for i, c in enumerate(backend.class_names)}
        lut = np.array([index.get(c, -1) for c in source.classes], np.int64)
    else:
        lut = np.arange(len(source.classes), dtype=np.int64)
    return lut[np.asarray(source.labels, np.int64)]


def cls_attention(attn: torch.Tensor, T: int, has_cls: bool) -> torch.Tensor:
    """attn (B, h, S, S) or (B, S, S) -> CLS attention over patches (B, N), mean over heads, rows sum 1.

    Without a CLS token: the mean over patch queries.
    """
    a = attn.float()
    if a.ndim == 4:
        a = a.mean(1)
    row = a[:, 0, T:] if has_cls else a[:, T:, T:].mean(1)
    return row / row.sum(-1, keepdim=True).clamp_min(1e-12)


@dataclass
class Features:
    """Per-image predictions and attention, per-keypoint geometry, descriptors and words.

    names, indices (source index), labels (model class index or -1), preds, probs (n, C), attention (n, N);
    kp_image (M,) row into the per-image arrays, kp_xy (M, 2), kp_size (M,), kp_patch (M,), kp_desc (M, 128)
    uint8, kp_inside (M,) bool or None; words (M,) int64 once a vocabulary is applied.
    """

    names: list[str]
    indices: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    attention: np.ndarray
    kp_image: np.ndarray
    kp_xy: np.ndarray
    kp_size: np.ndarray
    kp_patch: np.ndarray
    kp_desc: np.ndarray
    kp_inside: np.ndarray | None = None
    words: np.ndarray | None = None
    skipped: list[dict] = field(default_factory=list)


@torch.inference_mode()
def extract_features(
    backend: Backend, source: ImageSource, cfg: DiscoveryConfig, sift: SiftParams, boxes: dict | None = None,
    progress: bool = True,
) -> Features:
    """Step 1 of discovery over the whole source (batched; optional DataLoader workers)."""
    T, P, grid = backend.num_prefix_tokens, backend.patch_size, tuple(backend.grid_size)
    labels_all = model_labels(source, backend)
    rows: dict[str, list] = {k: [] for k in ("idx", "pred", "prob", "attn")}
    kp: dict[str, list] = {k: [] for k in ("img", "xy", "size", "patch", "desc", "inside")}
    skipped: list[dict] = []
    loader = DataLoader(KeypointDataset(source, backend, sift, boxes), batch_size=cfg.batch_size,
                        num_workers=cfg.workers, collate_fn=collate_list,
                        prefetch_factor=4 if cfg.workers else None)
    layers = None if cfg.attention == "rollout" else [-1]
    n_done = 0
    with progress_bar(progress) as pb:
        task = pb.add_task("features", total=len(source), info="")
        for items in loader:
            good = [it for it in items if "skip" not in it]
            skipped += [{"name": source.names[it["index"]], "reason": it["skip"]} for it in items if "skip" in it]
            if good:
                x = backend.normalize(torch.from_numpy(np.stack([it["pixels"] for it in good])))
                holder: dict[str, torch.Tensor] = {}
                roll = Rollout() if cfg.attention == "rollout" else None

                def on_attention(layer: int, attn: torch.Tensor, holder=holder, roll=roll) -> None:
                    if roll is not None:
                        roll.update(attn)
                    else:
                        holder["a"] = cls_attention(attn, T, backend.has_cls)

                with capture(backend, on_attention, layers) as cap:
                    logits = backend.forward(x)
                cap.check()
                if logits is None:
                    raise ConfigError("discovery needs a classifier: this model has no classification head")
                a = cls_attention(roll.result, T, backend.has_cls) if roll is not None else holder["a"]
                probs = logits.float().softmax(-1).cpu().numpy()
                for k, it in enumerate(good):
                    row = n_done + k
                    rows["idx"].append(it["index"])
                    nk = len(it["xy"])
                    kp["img"].append(np.full(nk, row, np.int64))
                    kp["xy"].append(it["xy"])
                    kp["size"].append(it["size"])
                    kp["patch"].append(patch_index(it["xy"], P, grid))
                    kp["desc"].append(it["desc"])
                    if boxes is not None:
                        kp["inside"].append(it["inside"])
                rows["pred"].append(probs.argmax(1))
                rows["prob"].append(probs.astype(np.float32))
                rows["attn"].append(a.cpu().numpy().astype(np.float32))
                n_done += len(good)
            pb.update(task, advance=len(items), info=f"{n_done} images")
    if n_done == 0:
        raise ConfigError(f"no image of {source.spec!s} could be read (all {len(skipped)} were skipped)")
    idx = np.asarray(rows["idx"], np.int64)
    return Features(
        names=[source.names[i] for i in idx], indices=idx, labels=labels_all[idx],
        preds=np.concatenate(rows["pred"]).astype(np.int64), probs=np.concatenate(rows["prob"]),
        attention=np.concatenate(rows["attn"]),
        kp_image=_cat(kp["img"], np.int64), kp_xy=_cat(kp["xy"], np.float32, (0, 2)),
        kp_size=_cat(kp["size"], np.float32), kp_patch=_cat(kp["patch"], np.int64),
        kp_desc=_cat(kp["desc"], np.uint8, (0, 128)),
        kp_inside=_cat(kp["inside"], bool) if boxes is not None else None, skipped=skipped,
    )


def _cat(parts: list, dtype, empty_shape=(0,)) -> np.ndarray:
    parts = [np.asarray(p) for p in parts if len(p)]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def build_vocabulary(desc: np.ndarray, cfg: DiscoveryConfig, progress: bool = False) -> torch.Tensor:
    """k-means centres (k, 128) in RootSIFT space over a seeded sample of at most ``vocab_sample`` rows."""
    rng = np.random.default_rng(cfg.seed)
    sample = desc if len(desc) <= cfg.vocab_sample else desc[rng.choice(len(desc), cfg.vocab_sample, replace=False)]
    with progress_bar(progress) as pb:
        task = pb.add_task("k-means", total=cfg.kmeans_iters, info=f"{len(sample)} descriptors")
        return kmeans(rootsift(sample), cfg.vocab_size, cfg.kmeans_iters, cfg.seed, on_iter=lambda: pb.advance(task))


def word_patches(f: Features, K: int, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (image, word, patch) triples: three (U,) int64 arrays."""
    assert f.words is not None
    key = (f.kp_image * K + f.words) * N + f.kp_patch
    u = np.unique(key)
    return u // (K * N), (u // N) % K, u % N


# -- statistics -------------------------------------------------------------------------------------
def class_word_stats(f: Features, K: int, n_classes: int, smoothing: float = 0.5) -> pd.DataFrame:
    """Per (class, word) over images predicted class: share, lift, assoc, support (and off_object)."""
    n, N = f.attention.shape
    ti, tv, tp = word_patches(f, K, N)
    A = np.zeros((n, K))  # attention on word v's patches
    np.add.at(A, (ti, tv), f.attention[ti, tp])
    C = np.zeros((n, K))  # number of patches holding v
    np.add.at(C, (ti, tv), 1.0)
    present = C > 0
    kp_count = np.zeros((n, K))
    np.add.at(kp_count, (f.kp_image, f.words), 1.0)
    off = None
    if f.kp_inside is not None:
        off = np.zeros((n, K))
        np.add.at(off, (f.kp_image, f.words), (~f.kp_inside).astype(float))
    out = []
    a = smoothing
    for c in range(n_classes):
        mc = f.preds == c
        m1, m0 = int(mc.sum()), int((~mc).sum())
        if m1 == 0:
            continue
        n1 = present[mc].sum(0)
        n0 = present[~mc].sum(0)
        p1 = (n1 + a) / (m1 + 2 * a)
        p0 = (n0 + a) / (m0 + 2 * a)
        assoc = np.log(p1 / (1 - p1)) - np.log(p0 / (1 - p0))
        share = A[mc].sum(0) / m1
        cover = C[mc].sum(0) / N
        lift = np.where(cover > 0, A[mc].sum(0) / np.maximum(cover, 1e-12), np.nan)
        kpc = kp_count[mc].sum(0)
        df = pd.DataFrame({
            "class_index": c, "word": np.arange(K), "support": n1.astype(int), "images_predicted": m1,
            "present_in_class": n1 / m1, "present_elsewhere": n0 / max(m0, 1), "share": share, "lift": lift,
            "assoc": assoc, "keypoints": kpc.astype(int),
        })
        if off is not None:
            df["off_object"] = np.where(kpc > 0, off[mc].sum(0) / np.maximum(kpc, 1), np.nan)
        out.append(df)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def pre_score(df: pd.DataFrame) -> pd.Series:
    s = df["share"] * df["assoc"].clip(lower=0)
    if "off_object" in df:
        s = s * df["off_object"].fillna(0)
    return s


def final_score(df: pd.DataFrame) -> pd.Series:
    return pre_score(df) * (df["causal"].fillna(0).clip(lower=0) + CAUSAL_FLOOR)


# -- causal check -----------------------------------------------------------------------------------
def _load_pixels(backend: Backend, source: ImageSource, i: int) -> np.ndarray:
    return backend.preprocess(source.load(i))


def occlude_probs(
    backend: Backend, pixels: np.ndarray, flags: np.ndarray, classes: np.ndarray, occlude: str = "drop",
    drop_mode: str = "group",
) -> np.ndarray:
    """p(class) after occluding the flagged patches. pixels (B, H, W, 3) uint8, flags (B, N) bool,
    classes (B,) -> (B,) float. ``drop`` removes the tokens; ``mean`` fills the patches with the image's
    mean colour."""
    P, gw = backend.patch_size, backend.grid_size[1]
    if occlude == "mean":
        px = pixels.copy()
        mean = pixels.reshape(len(pixels), -1, 3).mean(1).round().astype(np.uint8)
        for b, p in zip(*np.nonzero(flags), strict=True):
            r, c = divmod(int(p), gw)
            px[b, r * P : (r + 1) * P, c * P : (c + 1) * P] = mean[b]
        logits = backend.forward(backend.normalize(torch.from_numpy(px)))
        if logits is None:
            raise ConfigError("occlusion needs a classifier: this model has no classification head")
    else:
        x = backend.normalize(torch.from_numpy(pixels))
        logits = forward_drop(backend, x, torch.from_numpy(flags), drop_mode)
    p = logits.float().softmax(-1).cpu().numpy()
    return p[np.arange(len(p)), classes]


@torch.inference_mode()
def causal_check(
    backend: Backend, source: ImageSource, f: Features, cands: pd.DataFrame, K: int, cfg: DiscoveryConfig,
    progress: bool = True,
) -> pd.DataFrame:
    """Adds ``causal``, ``drop_fall``, ``control_fall``, ``flip_rate``, ``causal_images`` to ``cands`` rows."""
    n, N = f.attention.shape
    ti, tv, tp = word_patches(f, K, N)
    rng = np.random.default_rng(cfg.seed + 7)
    jobs = []  # (candidate row label, feature row, flags word, flags control)
    for lab, r in cands.iterrows():
        c, v = int(r["class_index"]), int(r["word"])
        sel = tv == v
        imgs = np.unique(ti[sel])
        imgs = imgs[f.preds[imgs] == c]
        if len(imgs) > cfg.causal_images:
            imgs = np.sort(rng.choice(imgs, cfg.causal_images, replace=False))
        for i in imgs:
            flag = np.zeros(N, bool)
            flag[tp[sel & (ti == i)]] = True
            others = np.flatnonzero(~flag)
            ctrl = np.zeros(N, bool)
            ctrl[rng.choice(others, min(int(flag.sum()), len(others)), replace=False)] = True
            jobs.append((lab, int(i), flag, ctrl))
    res: dict = {lab: {"w": [], "c": [], "flip": []} for lab in cands.index}
    bs = max(1, cfg.batch_size // 2)
    cache: dict[int, np.ndarray] = {}
    with progress_bar(progress) as pb:
        task = pb.add_task("occlusion", total=len(jobs), info="")
        for s in range(0, len(jobs), bs):
            chunk = jobs[s : s + bs]
            for _, i, _, _ in chunk:
                if i not in cache:
                    cache[i] = _load_pixels(backend, source, int(f.indices[i]))
            px = np.stack([cache[i] for _, i, _, _ in chunk])
            cls = np.array([int(cands.loc[lab, "class_index"]) for lab, _, _, _ in chunk])
            flags = np.concatenate([np.stack([j[2] for j in chunk]), np.stack([j[3] for j in chunk])])
            p = occlude_probs(backend, np.concatenate([px, px]), flags, np.concatenate([cls, cls]),
                              cfg.occlude, cfg.drop_mode)
            m = len(chunk)
            for k, (lab, i, _, _) in enumerate(chunk):
                base = float(f.probs[i, cls[k]])
                res[lab]["w"].append(base - p[k])
                res[lab]["c"].append(base - p[m + k])
                res[lab]["flip"].append(p[k] < 0.5 * base)
            if len(cache) > 4096:
                cache.clear()
            pb.update(task, advance=len(chunk))
    out = cands.copy()
    for lab in cands.index:
        w, c = np.asarray(res[lab]["w"]), np.asarray(res[lab]["c"])
        out.loc[lab, "causal_images"] = len(w)
        out.loc[lab, "drop_fall"] = w.mean() if len(w) else np.nan
        out.loc[lab, "control_fall"] = c.mean() if len(c) else np.nan
        out.loc[lab, "causal"] = (w - c).mean() if len(w) else np.nan
        out.loc[lab, "halved_rate"] = np.mean(res[lab]["flip"]) if len(w) else np.nan
    return out


# -- result -----------------------------------------------------------------------------------------
@dataclass
class DiscoveryResult:
    """candidates: one row per (class, word) (ranked where eligible); top: per class the best rows as
    dicts; vocabulary: (k, 128) RootSIFT centres; features: per-image and per-keypoint data; galleries:
    per (class, word) a few example crops for the report; manifest: parameters, model, counts, timing."""

    candidates: pd.DataFrame
    top: dict[str, list[dict]]
    vocabulary: np.ndarray
    features: Features
    class_names: list[str]
    galleries: dict[tuple[str, int], list[dict]]
    manifest: dict
    evaluation: dict | None = None

    def to_json(self) -> dict:
        return {
            "kind": "siftlens-discovery",
            "siftlens_version": __version__,
            "classes": self.class_names,
            "score": "share * max(assoc, 0) * (max(causal, 0) + 0.01)" + (
                " * off_object" if "off_object" in self.candidates else ""),
            "top": self.top,
            "vocabulary": {"transform": "rootsift", "k": int(len(self.vocabulary)),
                           "centers": np.round(self.vocabulary, 6).tolist()},
            "manifest": self.manifest,
            "evaluation": self.evaluation,
        }

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write candidates.csv, discovery.json and keypoints.parquet atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        with atomic_path(out / "candidates.csv") as tmp:
            self.candidates.to_csv(tmp, index=False, float_format="%.6g")
        paths["candidates"] = out / "candidates.csv"
        paths["json"] = write_json(out / "discovery.json", self.to_json())
        f = self.features
        assert f.words is not None
        kdf = pd.DataFrame({
            "image": np.asarray(f.names, dtype=object)[f.kp_image] if len(f.kp_image) else np.array([], object),
            "x": f.kp_xy[:, 0], "y": f.kp_xy[:, 1], "size": f.kp_size, "patch": f.kp_patch, "word": f.words,
        })
        with atomic_path(out / "keypoints.parquet") as tmp:
            kdf.to_parquet(tmp, index=False)
        paths["keypoints"] = out / "keypoints.parquet"
        return paths


def discover(
    model: str | Backend,
    images: str | Path | list | ImageSource,
    config: DiscoveryConfig | None = None,
    boxes: str | Path | dict | None = None,
    progress: bool = True,
    weights: str | None = None,
) -> DiscoveryResult:
    """Run the whole discovery; returns data and writes nothing (see :meth:`DiscoveryResult.save`)."""
    from .keypoints import auto_upsample

    cfg = config or DiscoveryConfig()
    cfg.validate()
    t0 = time.time()
    backend = model if isinstance(model, Backend) else load_backend(str(model), cfg.device, weights=weights)
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.limit)
    if isinstance(boxes, (str, Path)):
        boxes = read_boxes(boxes)
    u = cfg.upsample or auto_upsample(backend.input_size)
    sift = SiftParams(upsample=u, contrast_threshold=cfg.contrast_threshold, edge_threshold=cfg.edge_threshold)
    f = extract_features(backend, source, cfg, sift, boxes, progress)
    if len(f.kp_desc) == 0:
        raise ConfigError("no SIFT keypoints in any image; discovery needs keypoints (try a larger --upsample)")
    k = cfg.vocab_size
    if len(f.kp_desc) < k:
        raise ConfigError(f"only {len(f.kp_desc)} SIFT descriptors for {k} words; lower --vocab")
    centers = build_vocabulary(f.kp_desc, cfg, progress)
    f.words, _ = assign(rootsift(f.kp_desc), centers)
    f.words = f.words.numpy()
    n_classes = f.probs.shape[1]
    class_names = list(backend.class_names or [str(i) for i in range(n_classes)])
    stats = class_word_stats(f, k, n_classes, cfg.smoothing)
    stats["eligible"] = stats["support"] >= cfg.min_images
    stats["pre_score"] = pre_score(stats)
    for col in ("causal", "drop_fall", "control_fall", "halved_rate", "causal_images"):
        stats[col] = np.nan
    checked = (stats[stats["eligible"]].sort_values(["class_index", "pre_score"], ascending=[True, False])
               .groupby("class_index", sort=False).head(cfg.causal_top))
    if cfg.causal_top > 0 and len(checked):
        upd = causal_check(backend, source, f, checked, k, cfg, progress)
        stats.loc[upd.index, upd.columns] = upd
    stats["score"] = final_score(stats)
    stats["rank"] = np.nan
    elig = stats[stats["eligible"]].sort_values(["class_index", "score", "pre_score"], ascending=[True, False, False])
    stats.loc[elig.index, "rank"] = elig.groupby("class_index").cumcount() + 1
    stats.insert(0, "class", [class_names[c] for c in stats["class_index"]])
    stats = stats.sort_values(["class_index", "rank", "word"], na_position="last").reset_index(drop=True)
    top = {}
    for c in class_names:
        rows = stats[(stats["class"] == c) & stats["rank"].notna()].head(cfg.top)
        top[c] = [_row_dict(r) for _, r in rows.iterrows()]
    galleries = _galleries(backend, source, f, stats, k, cfg)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(cfg), "model": backend.describe(),
        "sift": {**asdict(sift), "upsample_used": u},
        "images": {"source": str(source.spec), "total": len(source), "analysed": len(f.names),
                   "skipped": len(f.skipped), "skipped_reasons": f.skipped[:500],
                   "keypoints": int(len(f.kp_desc)),
                   "accuracy": float((f.preds == f.labels).mean()) if (f.labels >= 0).all() else None},
        "boxes": boxes is not None,
        "timing": {"seconds": round(time.time() - t0, 3)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    return DiscoveryResult(stats, top, centers.numpy(), f, class_names, galleries, manifest)


def _row_dict(r: pd.Series) -> dict:
    keys = ("word", "rank", "score", "share", "lift", "assoc", "causal", "drop_fall", "control_fall", "support",
            "present_in_class", "present_elsewhere", "off_object")
    out = {}
    for k in keys:
        if k in r:
            v = r[k]
            out[k] = None if pd.isna(v) else (int(v) if k in ("word", "rank", "support") else float(v))
    return out


def _galleries(backend, source, f: Features, stats: pd.DataFrame, K: int, cfg: DiscoveryConfig) -> dict:
    """For each class's top candidates: up to ``gallery`` example crops around the word's keypoints."""
    if cfg.gallery <= 0:
        return {}
    P = backend.patch_size
    H, W = backend.input_size
    half = max(3 * P, 12) // 2
    n, N = f.attention.shape
    out = {}
    cache: dict[int, np.ndarray] = {}
    assert f.words is not None
    for _, r in stats[stats["rank"].notna() & (stats["rank"] <= min(cfg.top, 5))].iterrows():
        c, v = int(r["class_index"]), int(r["word"])
        sel = np.flatnonzero((f.words == v) & (f.preds[f.kp_image] == c))
        if not len(sel):
            continue
        # one keypoint per image, the images where v's patch draws the most attention first
        att = f.attention[f.kp_image[sel], f.kp_patch[sel]]
        order = sel[np.argsort(-att, kind="stable")]
        _, first = np.unique(f.kp_image[order], return_index=True)
        picks = order[np.sort(first)][: cfg.gallery]
        ex = []
        for m in picks:
            i = int(f.kp_image[m])
            if i not in cache:
                cache[i] = _load_pixels(backend, source, int(f.indices[i]))
            x, y = f.kp_xy[m]
            x0 = int(np.clip(round(float(x)) - half, 0, max(0, W - 2 * half)))
            y0 = int(np.clip(round(float(y)) - half, 0, max(0, H - 2 * half)))
            crop = cache[i][y0 : y0 + 2 * half, x0 : x0 + 2 * half]
            same = np.flatnonzero((f.kp_image == i) & (f.words == v))
            kps = [(float(f.kp_xy[j, 0] - x0), float(f.kp_xy[j, 1] - y0), float(f.kp_size[j])) for j in same]
            ex.append({"name": f.names[i], "crop": crop, "keypoints": kps,
                       "attention": float(f.attention[i, f.kp_patch[m]] * N)})
        out[(r["class"], v)] = ex
    return out


# -- loading a discovery output (for prompting) -------------------------------------------------------
@dataclass
class Vocabulary:
    """Discovered words: RootSIFT centres and, per class, the ranked candidate words."""

    centers: torch.Tensor
    classes: list[str]
    ranked: dict[str, list[int]]
    scores: dict[str, list[float]] = field(default_factory=dict)

    def flagged(self, top_words: int = 1, score_ratio: float = 0.0) -> list[int]:
        """Union over classes of each class's ``top_words`` best-ranked words whose score is at least
        ``score_ratio`` times that class's best score (sorted)."""
        out = set()
        for c, ws in self.ranked.items():
            sc = self.scores.get(c) or [1.0] * len(ws)
            best = max(sc[:1] or [0.0])
            out |= {w for w, s in zip(ws[:top_words], sc[:top_words], strict=False) if s >= score_ratio * best}
        return sorted(out)

    def words_of(self, desc: np.ndarray) -> np.ndarray:
        if len(desc) == 0:
            return np.zeros(0, np.int64)
        return assign(rootsift(desc), self.centers)[0].numpy()


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read ``discovery.json`` (or the folder holding it); raises CandidatesError with a one-line reason."""
    p = Path(path)
    if p.is_dir():
        p = p / "discovery.json"
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise CandidatesError(f"discovery output {p} not found; run `siftlens discover` first") from e
    except json.JSONDecodeError as e:
        raise CandidatesError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(raw, dict) or raw.get("kind") != "siftlens-discovery":
        raise CandidatesError(f"{p} is not a discovery output of `siftlens discover`")
    try:
        centers = torch.tensor(raw["vocabulary"]["centers"], dtype=torch.float32)
        ranked = {c: [int(r["word"]) for r in rows] for c, rows in raw["top"].items()}
        scores = {c: [float(r.get("score") or 0.0) for r in rows] for c, rows in raw["top"].items()}
        classes = list(raw["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CandidatesError(f"{p} lacks the vocabulary or ranked candidates ({e})") from e
    if centers.ndim != 2 or centers.shape[1] != 128:
        raise CandidatesError(f"{p}: vocabulary centres must be (k, 128), got {tuple(centers.shape)}")
    return Vocabulary(centers, classes, ranked, scores)


# -- evaluation against a SpuriousCIFAR sidecar (never used for ranking) ---------------------------------
def word_marker_purity(f: Features, sidecar: dict, K: int) -> pd.DataFrame:
    """Per word: its keypoints' share inside each marker class's boxes; ``marker`` = the majority marker
    class when that share is at least 0.5, else ''."""
    assert f.words is not None
    recs = sidecar["images"]
    classes = list(sidecar.get("classes") or sorted({r["marker"] for r in recs.values()}))
    cidx = {c: i for i, c in enumerate(classes)}
    n_img = len(f.names)
    mk = np.full(n_img, -1, np.int64)
    box = np.zeros((n_img, 4), np.float64)
    for i, name in enumerate(f.names):
        r = recs.get(name)
        if r is not None:
            mk[i] = cidx.get(r["marker"], -1)
            box[i] = r["box"]
    b = box[f.kp_image]
    x, y = f.kp_xy[:, 0], f.kp_xy[:, 1]
    inside = ((x >= b[:, 0] - 0.5) & (x < b[:, 2] - 0.5) & (y >= b[:, 1] - 0.5) & (y < b[:, 3] - 0.5)
              & (mk[f.kp_image] >= 0))
    counts = np.zeros((K, len(classes) + 1))
    col = np.where(inside, mk[f.kp_image], len(classes))
    np.add.at(counts, (f.words, col), 1.0)
    total = counts.sum(1)
    share = counts[:, :-1] / np.maximum(total, 1)[:, None]
    best = share.argmax(1)
    purity = share[np.arange(K), best]
    return pd.DataFrame({"word": np.arange(K), "keypoints": total.astype(int),
                         "marker": [classes[g] if p >= 0.5 else "" for g, p in zip(best, purity, strict=True)],
                         "purity": purity, "outside_markers": counts[:, -1] / np.maximum(total, 1)})


def evaluate_markers(result: DiscoveryResult, sidecar: dict) -> dict:
    """Rank of each class's own marker among its candidates: the best rank of a word attributed to it.

    Returns ``{"ranks": {class: rank or None}, "words": {class: word or None}, "mean_rank": float,
    "rank1": share of classes with rank 1, "purity": per-word table as records}``.
    """
    K = len(result.vocabulary)
    pur = word_marker_purity(result.features, sidecar, K)
    attributed = dict(zip(pur["word"], pur["marker"], strict=True))
    ranks, words = {}, {}
    for c in result.class_names:
        rows = result.candidates[(result.candidates["class"] == c) & result.candidates["rank"].notna()]
        mine = np.array([attributed.get(int(w)) == c for w in rows["word"]], dtype=bool)
        hit = rows.loc[mine].sort_values("rank")
        ranks[c] = None if hit.empty else int(hit["rank"].iloc[0])
        words[c] = None if hit.empty else int(hit["word"].iloc[0])
    got = [r for r in ranks.values() if r is not None]
    return {
        "ranks": ranks, "words": words,
        "rank1": float(np.mean([r == 1 for r in ranks.values()])) if ranks else 0.0,
        "mean_rank_found": float(np.mean(got)) if got else None,
        "missing": [c for c, r in ranks.items() if r is None],
        "marker_words": {c: sorted(int(w) for w, m in attributed.items() if m == c) for c in result.class_names},
    }
