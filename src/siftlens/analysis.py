"""The dataset-level runner: images -> keypoint maps + attention -> metrics -> tables.

Flow per batch: a DataLoader (optionally with worker processes) decodes each image, applies the model's
own preprocessing, and detects SIFT keypoints on exactly those pixels; the main process normalises the
batch, runs the model once with attention captured layer by layer, and computes every metric for the
observed weight map and its null-model resamplings while that layer's attention is alive. Only small
per-image numbers are kept; the null samples are summed over images on the fly.

Everything returned is data (pandas tables, numpy arrays, a manifest dict); rendering lives in
:mod:`siftlens.report` and saving in :meth:`AnalysisResult.save`.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .attention import Rollout, capture, resolve_layers
from .data import DEFAULT_MAX_PIXELS, ImageSource
from .errors import ConfigError, SkipImage
from .io import atomic_path, write_json
from .keypoints import SCHEMES, SiftParams, keypoint_map
from .metrics import bh_qvalues, bootstrap_ci, image_metrics, null_indices, null_stats, prepare_maps, with_null
from .models.backends import Backend, load_backend
from .progress import progress_bar

SCALAR_METRICS = ("sal", "sal_w", "wi", "cls_lift", "cls_rho")
LEVEL_METRICS = ("dist", "dist_rel", "entropy")  # per query level a
MATRIX_METRICS = ("R",)  # per level pair (a, b)


@dataclass
class AnalysisConfig:
    """Every parameter of a run; all of it goes into the manifest.

    upsample: SIFT upsampling factor u, or 0 for automatic (u = 128 / shorter input side, at least 1:
    4 for 32x32 inputs, 1 for 224x224).
    """

    scheme: str = "count"
    n_levels: int = 3
    thresholds: list[float] | None = None
    upsample: float = 0.0
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    layers: list[int] | None = None
    batch_size: int = 32
    workers: int = 0
    device: str = "cpu"
    null_permutations: int = 100
    null_kind: str = "permute"
    n_boot: int = 1000
    seed: int = 0
    limit: int | None = None
    rollout: bool = False
    overlays: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown weight scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.n_levels < 2:
            raise ConfigError(f"--levels must be at least 2 (none / some keypoints), got {self.n_levels}")
        if self.null_permutations < 20:
            raise ConfigError(f"--null must be at least 20 for usable z-scores, got {self.null_permutations}")
        if self.null_kind not in ("permute", "shift"):
            raise ConfigError(f"--null-kind must be 'permute' or 'shift', not {self.null_kind!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
        if self.upsample < 0:
            raise ConfigError(f"--upsample must be > 0 (or 0 for automatic), got {self.upsample}")


def auto_upsample(input_size: tuple[int, int]) -> float:
    """u such that SIFT sees at least 128 pixels on the shorter side (u >= 1)."""
    return float(max(1.0, 128.0 / min(input_size)))


# -- data ---------------------------------------------------------------------------------------------
class _KeypointDataset(Dataset):
    """Decode, preprocess with the model's own transform, detect SIFT; a bad image yields its reason."""

    def __init__(self, source: ImageSource, backend: Backend, cfg: AnalysisConfig, sift: SiftParams):
        self.source = source
        self.preprocess = backend.preprocess
        self.patch = backend.patch_size
        self.grid = tuple(backend.grid_size)
        self.cfg = cfg
        self.sift = sift

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            img = self.source.load(i, max_pixels=self.cfg.max_pixels)
            if min(img.size) < self.patch:
                raise SkipImage(f"image smaller than one {self.patch}-pixel patch ({img.size[0]}x{img.size[1]})")
            pixels = self.preprocess(img)
            km = keypoint_map(pixels, self.patch, self.grid, self.cfg.scheme, self.cfg.n_levels, self.sift,
                              thresholds=self.cfg.thresholds)
        except SkipImage as e:
            return {"index": i, "skip": e.reason}
        return {"index": i, "pixels": pixels, "weights": km.weights.astype(np.float32),
                "levels": km.levels, "xy": km.keypoints.xy, "size": km.keypoints.size}


def _collate(items: list[dict]) -> list[dict]:
    return items


def _make_loader(dataset: Dataset, cfg: AnalysisConfig) -> DataLoader:
    """The analysis' DataLoader: ``cfg.batch_size`` images per batch, ``cfg.workers`` worker processes."""
    return DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=_collate,
                      persistent_workers=False, prefetch_factor=4 if cfg.workers else None)


@contextlib.contextmanager
def _one_cv2_thread_per_worker(workers: int) -> Iterator[None]:
    """With worker processes, make OpenCV single-threaded for the block: the workers are the parallelism
    (each would otherwise start a SIFT thread per core). Set in this process before the workers fork, and
    restored after: calling ``cv2.setNumThreads`` inside a forked worker can hang on the parent's pool."""
    if not workers:
        yield
        return
    import cv2

    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)


# -- result -------------------------------------------------------------------------------------------
@dataclass
class AnalysisResult:
    """Tables and arrays of one run.

    long: tidy per-image table (image, layer, head, metric, level_a, level_b, value, z);
    summary: per (layer, head, metric, level_a, level_b): n, mean, ci_lo, ci_hi, null_mean, null_lo,
    null_hi, z, p, q (head -1 = mean over heads; layer == num_layers = rollout);
    images: per image (name, label, prediction, keypoints, status, reason);
    overlays: a few images with pixels, keypoints, weights and CLS attention maps for figures.
    """

    long: pd.DataFrame
    summary: pd.DataFrame
    images: pd.DataFrame
    manifest: dict
    overlays: list[dict] = field(default_factory=list)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write metrics.parquet, summary.csv, images.csv and manifest.json atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        with atomic_path(out / "metrics.parquet") as tmp:
            self.long.to_parquet(tmp, index=False)
        paths["metrics"] = out / "metrics.parquet"
        for name, df in (("summary.csv", self.summary), ("images.csv", self.images)):
            with atomic_path(out / name) as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g")
            paths[name.split(".")[0]] = out / name
        paths["manifest"] = write_json(out / "manifest.json", self.manifest)
        return paths


class _Accumulator:
    """Per-layer observed values (kept per image) and null sums (summed over images)."""

    def __init__(self, n_layers: int, heads: int, cells: int, m: int):
        self.obs: list[list[np.ndarray]] = [[] for _ in range(n_layers)]  # each (B, h+1, C)
        self.z: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self.null_sum = np.zeros((n_layers, heads + 1, m, cells))
        self.count = np.zeros((n_layers, heads + 1, cells))

    def add(self, li: int, values: torch.Tensor, valid: torch.Tensor) -> None:
        """values: (B, h+1, K, C) with K = 1 + M; valid: (B,) images that count."""
        # (B, h+1, C, K): the K values of a cell contiguous, so the null reductions run along memory
        v = values.transpose(2, 3).to(torch.float64, memory_format=torch.contiguous_format)
        if not bool(valid.all()):
            v[~valid.to(v.device)] = float("nan")
        obs, null = v[..., 0], v[..., 1:]
        mu = null.mean(-1)
        sd = (null - mu[..., None]).square_().mean(-1).sqrt_()  # population std, two-pass (torch.std is slow)
        z = torch.where(sd > 1e-12, (obs - mu) / sd.clamp_min(1e-12), torch.zeros_like(obs)).clamp(-1e6, 1e6)
        self.obs[li].append(obs.float().cpu().numpy())
        self.z[li].append(z.float().cpu().numpy())
        present = ~torch.isnan(obs)  # (B, h+1, C)
        self.null_sum[li] += torch.nan_to_num(null).sum(0).transpose(1, 2).cpu().numpy()  # (h+1, M, C)
        self.count[li] += present.sum(0).cpu().numpy()


def _cells(n_levels: int) -> list[tuple[str, int, int]]:
    """The flat list of (metric, level_a, level_b) cells every layer produces."""
    cells = [(m, -1, -1) for m in SCALAR_METRICS]
    cells += [("R", a, b) for a in range(n_levels) for b in range(n_levels)]
    cells += [(m, a, -1) for m in LEVEL_METRICS for a in range(n_levels)]
    return cells


def _flatten(res: dict[str, torch.Tensor]) -> torch.Tensor:
    """Metric dict -> (B, h, K, C) in the order of :func:`_cells`."""
    parts = [res[m].unsqueeze(-1) for m in SCALAR_METRICS]
    B, h, K = res["sal"].shape
    parts.append(res["R"].reshape(B, h, K, -1))
    parts += [res[m] for m in LEVEL_METRICS]
    return torch.cat([p.float() for p in parts], dim=-1)


def analyze(
    model: str | Backend,
    images: str | Path | list | ImageSource,
    config: AnalysisConfig | None = None,
    progress: bool = True,
    weights: str | None = None,
    **overrides,
) -> AnalysisResult:
    """Run the full analysis of ``model`` over ``images``; returns tables, never writes files.

    ``model``: a Backend, or anything :func:`~siftlens.models.backends.load_backend` accepts.
    ``overrides``: AnalysisConfig fields, e.g. ``analyze("default", "imgs/", null_permutations=200)``.
    """
    cfg = config or AnalysisConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ConfigError(f"unknown analysis option {k!r}")
        setattr(cfg, k, v)
    cfg.validate()
    t0 = time.time()
    backend = model if isinstance(model, Backend) else load_backend(str(model), cfg.device, weights=weights)
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.limit)
    layers = resolve_layers(cfg.layers, backend.num_layers)
    u = cfg.upsample or auto_upsample(backend.input_size)
    sift = SiftParams(upsample=u, contrast_threshold=cfg.contrast_threshold, edge_threshold=cfg.edge_threshold)
    L, M, T, H = cfg.n_levels, cfg.null_permutations, backend.num_prefix_tokens, backend.num_heads
    cells = _cells(L)
    n_rows = len(layers) + int(cfg.rollout)
    acc = _Accumulator(n_rows, H, len(cells), M)
    pos = backend.patch_centers().to(backend.device)
    layer_slot = {l: i for i, l in enumerate(layers)}
    show_layers = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    names = source.names
    labels = source.labels
    class_names = backend.class_names
    img_rows: list[dict] = []
    overlays: list[dict] = []

    loader = _make_loader(_KeypointDataset(source, backend, cfg, sift), cfg)
    with progress_bar(progress) as pb, _one_cv2_thread_per_worker(cfg.workers):
        task = pb.add_task("analyse", total=len(source), info="")
        for bi, items in enumerate(loader):
            good = [it for it in items if "skip" not in it]
            for it in items:
                if "skip" in it:
                    img_rows.append(_image_row(it["index"], names, labels, class_names, status="skipped",
                                               reason=it["skip"]))
            if good:
                _run_batch(backend, good, cfg, L, M, T, H, layers, layer_slot, pos, acc, bi, show_layers,
                           overlays, img_rows, names, labels, class_names)
            done = sum(r["status"] != "skipped" for r in img_rows)
            pb.update(task, advance=len(items), info=f"{done} analysed, {len(img_rows) - done} skipped")
    elapsed = time.time() - t0
    analysed = [r for r in img_rows if r["status"] != "skipped"]
    if not analysed:
        raise ConfigError(f"no image of {source.spec!s} could be analysed (all {len(img_rows)} were skipped)")
    images_df = pd.DataFrame(img_rows).sort_values("name", kind="stable").reset_index(drop=True)
    layer_ids = layers + ([backend.num_layers] if cfg.rollout else [])
    kept_names = [r["name"] for r in img_rows if r["status"] != "skipped"]
    long = _long_table(acc, kept_names, layer_ids, H, cells)
    summary = _summary(acc, layer_ids, H, cells, cfg)
    manifest = _manifest(backend, source, cfg, sift, img_rows, elapsed, layers)
    return AnalysisResult(long, summary, images_df, manifest, overlays)


def _image_row(i, names, labels, class_names, status, reason="", pred=None, n_kp=0) -> dict:
    label = labels[i] if labels is not None else None
    return {
        "name": names[i],
        "label": "" if label is None else str(label),
        "prediction": "" if pred is None else (class_names[pred] if class_names else str(pred)),
        "keypoints": int(n_kp),
        "status": status,
        "reason": reason,
    }


@torch.inference_mode()
def _run_batch(backend, good, cfg, L, M, T, H, layers, layer_slot, pos, acc, bi, show_layers, overlays,
               img_rows, names, labels, class_names):
    dev = backend.device
    pixels = torch.from_numpy(np.stack([it["pixels"] for it in good]))
    w = torch.from_numpy(np.stack([it["weights"] for it in good])).to(dev)  # (B, N)
    lv = torch.from_numpy(np.stack([it["levels"] for it in good])).to(dev)  # (B, N)
    B, N = w.shape
    valid = (w.sum(1) > 0).cpu()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1_000_003 + bi)
    idx = null_indices(B, N, M, grid=tuple(backend.grid_size), kind=cfg.null_kind, generator=gen).to(dev)
    wk, lk = with_null(w, lv, idx)  # (B, K, N)
    maps = prepare_maps(wk, lk, L, pos, null_index=idx)  # all that does not depend on attention, once per batch
    want_overlay = max(0, cfg.overlays - len(overlays))
    ov_ids = [k for k in range(B) if bool(valid[k])][:want_overlay]
    cls_maps: dict[int, torch.Tensor] = {}
    rollout = Rollout() if cfg.rollout else None
    gh, gw = backend.grid_size

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        attn = attn.float()
        res = image_metrics(attn, T, wk, lk, L, pos, has_cls=backend.has_cls, maps=maps)
        flat = _flatten(res)  # (B, h, K, C)
        flat = torch.cat([flat, flat.mean(1, keepdim=True)], dim=1)  # head -1 = mean over heads
        acc.add(layer_slot[layer], flat, valid)
        if ov_ids and layer in show_layers:
            cls = attn[ov_ids][:, :, 0, T:] if backend.has_cls else attn[ov_ids][:, :, T:, T:].mean(2)
            cls = cls.mean(1)
            cls_maps[layer] = (cls / cls.sum(-1, keepdim=True).clamp_min(1e-12)).reshape(-1, gh, gw).cpu()
        if rollout is not None:
            rollout.update(attn)

    x = backend.normalize(pixels)
    with capture(backend, on_attention, layers) as cap:
        logits = backend.forward(x)
    cap.check()
    if rollout is not None:
        res = image_metrics(rollout.result.unsqueeze(1), T, wk, lk, L, pos, has_cls=backend.has_cls, maps=maps)
        flat = _flatten(res)  # (B, 1, K, C): rollout is head-averaged, so only the head -1 slot is filled
        full = torch.full((B, H + 1, *flat.shape[2:]), float("nan"), device=flat.device)
        full[:, H] = flat[:, 0]
        acc.add(len(layers), full, valid)
    preds = logits.argmax(-1).tolist() if logits is not None else [None] * B
    for k, it in enumerate(good):
        status = "ok" if bool(valid[k]) else "no_keypoints"
        img_rows.append(_image_row(it["index"], names, labels, class_names, status=status,
                                   reason="" if status == "ok" else "no SIFT keypoints: excluded from metrics",
                                   pred=preds[k], n_kp=len(it["xy"])))
    for j, k in enumerate(ov_ids):
        it = good[k]
        i = it["index"]
        overlays.append({
            "name": names[i], "pixels": it["pixels"], "keypoints_xy": it["xy"], "keypoint_size": it["size"],
            "weights": it["weights"].reshape(gh, gw), "levels": it["levels"].reshape(gh, gw),
            "cls_attention": {l: cls_maps[l][j].numpy() for l in cls_maps},
            "label": (class_names[labels[i]] if class_names and labels is not None
                      and labels[i] < len(class_names) else (None if labels is None else str(labels[i]))),
            "prediction": None if preds[k] is None else (class_names[preds[k]] if class_names else str(preds[k])),
        })


def _long_table(acc: _Accumulator, names: list[str], layer_ids: list[int], H: int, cells) -> pd.DataFrame:
    """Tidy per-image table; NaN entries (excluded images, empty levels) are dropped, never written."""
    if not acc.obs[0]:
        return pd.DataFrame(columns=["image", "layer", "head", "metric", "level_a", "level_b", "value", "z"])
    obs = np.stack([np.concatenate(o, 0) for o in acc.obs], 1)[:, :, :H]  # (n, layers, h, C)
    z = np.stack([np.concatenate(o, 0) for o in acc.z], 1)[:, :, :H]
    n, nl, h, C = obs.shape
    ii, li, hi, ci = np.meshgrid(np.arange(n), np.arange(nl), np.arange(h), np.arange(C), indexing="ij")
    keep = ~np.isnan(obs)
    cm = np.array([c[0] for c in cells])
    ca = np.array([c[1] for c in cells], np.int8)
    cb = np.array([c[2] for c in cells], np.int8)
    df = pd.DataFrame({
        "image": pd.Categorical.from_codes(ii[keep], categories=pd.Index(names).unique())
        if len(set(names)) == len(names) else np.asarray(names)[ii[keep]],
        "layer": np.asarray(layer_ids, np.int16)[li[keep]],
        "head": hi[keep].astype(np.int16),
        "metric": pd.Categorical(cm[ci[keep]]),
        "level_a": ca[ci[keep]],
        "level_b": cb[ci[keep]],
        "value": obs[keep].astype(np.float32),
        "z": z[keep].astype(np.float32),
    })
    return df


def _summary(acc: _Accumulator, layer_ids: list[int], H: int, cells, cfg: AnalysisConfig) -> pd.DataFrame:
    """Dataset-level table: mean with bootstrap CI, null band, z, empirical p and BH q per cell."""
    obs = np.stack([np.concatenate(o, 0) for o in acc.obs], 1)  # (n, layers, h+1, C)
    n_img = (~np.isnan(obs)).sum(0)  # (layers, h+1, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(np.where(n_img[None] > 0, obs, 0.0), 0)
        null_means = acc.null_sum / np.maximum(acc.count, 1)[:, :, None, :]  # (layers, h+1, M, C)
    lo, hi = bootstrap_ci(obs, n_boot=cfg.n_boot, seed=cfg.seed)
    null_m = np.moveaxis(null_means, 2, 0)  # (M, layers, h+1, C)
    z, p = null_stats(mean, null_m)
    nl, h1, C = mean.shape
    li, hi_, ci = np.meshgrid(np.arange(nl), np.arange(h1), np.arange(C), indexing="ij")
    heads = np.where(hi_ == H, -1, hi_)
    df = pd.DataFrame({
        "layer": np.asarray(layer_ids)[li.ravel()],
        "head": heads.ravel(),
        "metric": [cells[c][0] for c in ci.ravel()],
        "level_a": [cells[c][1] for c in ci.ravel()],
        "level_b": [cells[c][2] for c in ci.ravel()],
        "n": n_img.ravel(),
        "mean": mean.ravel(),
        "ci_lo": np.asarray(lo).ravel(),
        "ci_hi": np.asarray(hi).ravel(),
        "null_mean": null_m.mean(0).ravel(),
        "null_lo": np.percentile(null_m, 2.5, axis=0).ravel(),
        "null_hi": np.percentile(null_m, 97.5, axis=0).ravel(),
        "z": np.asarray(z).ravel(),
        "p": np.asarray(p).ravel(),
    })
    df = df[df["n"] > 0].copy()
    df = df.dropna(subset=["mean", "ci_lo", "ci_hi", "z", "p"])
    # BH across (layer, head) cells within each metric/level family; head means form their own family
    df["q"] = 1.0
    fam = df.groupby(["metric", "level_a", "level_b", df["head"] == -1], sort=False)
    for _, ix in fam.groups.items():
        df.loc[ix, "q"] = bh_qvalues(df.loc[ix, "p"].to_numpy())
    return df.reset_index(drop=True)


def _manifest(backend, source, cfg, sift, img_rows, elapsed, layers) -> dict:
    import cv2

    counts = {s: sum(r["status"] == s for r in img_rows) for s in ("ok", "no_keypoints", "skipped")}
    return {
        "siftlens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": backend.describe(),
        "images": {
            "source": str(source.spec), "total": len(img_rows), "analysed": counts["ok"],
            "no_keypoints": counts["no_keypoints"], "skipped": counts["skipped"],
            "skipped_reasons": [{"name": r["name"], "reason": r["reason"]} for r in img_rows
                                if r["status"] == "skipped"],
        },
        "params": {**asdict(cfg), "upsample_used": sift.upsample, "layers_analysed": layers,
                   "sift": asdict(sift), "preprocessing": "model's own resize/crop; SIFT before normalisation"},
        "level_names": level_names(cfg.n_levels),
        "timing": {"seconds": round(elapsed, 3),
                   "images_per_s": round(len(img_rows) / elapsed, 3) if elapsed > 0 else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "opencv": cv2.__version__, "pandas": pd.__version__, "siftlens": __version__},
    }


def level_names(n_levels: int) -> list[str]:
    """Human names of the semantic levels: none / low / high for 3, none / q1.. for more."""
    if n_levels == 2:
        return ["none", "some"]
    if n_levels == 3:
        return ["none", "low", "high"]
    return ["none"] + [f"q{i}" for i in range(1, n_levels)]


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
