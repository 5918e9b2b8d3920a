"""The discovery pipeline (:func:`discover`): features, vocabulary, statistics, causal check and ranking;
returns data."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ... import __version__
from ...data import ImageSource
from ...errors import ConfigError
from ...io import atomic_path, write_json
from ...keypoints import sift_params
from ...models import load_backend
from ...models.backend import Backend
from ..record import config_record
from .causal import causal_check, patch_counts
from .config import DiscoveryConfig
from .decision import NO_SHORTCUT, TEST, decide, verdicts
from .features import Features, extract_features, load_pixels, read_boxes, word_patches
from .regions import merge_features, region_features
from .scoring import candidate_stats, causal_candidates, rank, row_dict
from .vocabulary import assign, build_vocabulary, rootsift


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
    regions: np.ndarray | None = None  # (R, D) centres of the region words (ids K..K+R-1), or None
    decision: dict | None = None  # the flagging rule, and per class its verdict and flagged words (rank order)

    def verdict(self, c: str) -> str:
        """'shortcut found' or 'no shortcut found' for class ``c``."""
        return ((self.decision or {}).get("classes", {}).get(c) or {}).get("verdict", NO_SHORTCUT)

    def flagged(self, c: str) -> list[dict]:
        """Class ``c``'s flagged candidates as dicts (rank order), with effect, CI, p and q."""
        rows = self.candidates[(self.candidates["class"] == c) & self.candidates["flagged"].astype(bool)]
        return [row_dict(r) for _, r in rows.sort_values(["rank", "word"], na_position="last").iterrows()]

    def to_json(self) -> dict:
        return {
            "kind": "siftlens-discovery",
            "siftlens_version": __version__,
            "classes": self.class_names,
            "score": "share * max(assoc, 0) * (max(causal, 0) + 0.01)" + (
                " * off_object" if "off_object" in self.candidates else ""),
            "top": self.top,
            "decision": None if self.decision is None else {
                **{k: v for k, v in self.decision.items() if k != "classes"},
                "classes": {c: {**d, "candidates": self.flagged(c)} for c, d in self.decision["classes"].items()}},
            "vocabulary": {"transform": "rootsift", "k": int(len(self.vocabulary)),
                           "centers": np.round(self.vocabulary, 6).tolist()},
            "regions": None if self.regions is None else {
                "k": int(len(self.regions)), "offset": int(len(self.vocabulary)),
                "layer": int(self.manifest["config"]["region_layer"]),
                "centers": np.round(self.regions, 6).tolist()},
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
    *,
    boxes: str | Path | dict | None = None,
    weights: str | None = None,
    progress: bool = True,
) -> DiscoveryResult:
    """Run the whole discovery; returns data and writes nothing (see :meth:`DiscoveryResult.save`).

    boxes: object boxes per image name (a JSON file or its mapping; see the module's docstring); weights: a weights
    file for ``timm:<name>``."""
    cfg = config or DiscoveryConfig()
    cfg.validate()
    t0 = time.time()
    backend = model if isinstance(model, Backend) else load_backend(model, cfg.run.device, weights=weights)
    reference = load_reference(cfg, backend)  # checked before the long feature pass
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.run.limit)
    if isinstance(boxes, (str, Path)):
        boxes = read_boxes(boxes)
    sift = sift_params(backend.input_size, cfg.sift)
    f = extract_features(backend, source, cfg, sift, boxes, progress)
    if cfg.causal_test == "cross" and not (f.labels >= 0).any():
        raise ConfigError("--causal-test cross needs labelled images (class folders, or a dataset with labels) "
                          "named as the model's classes")
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
    sift_f, region_centers, total = f, None, k
    if cfg.regions > 0:
        rf, region_centers = region_features(backend, source, f, cfg, k)
        f, total = merge_features(f, rf), k + cfg.regions
    stats = candidate_stats(f, total, n_classes, cfg.smoothing, cfg.min_images)
    stats.insert(2, "source", np.where(stats["word"] < k, "sift", "region"))
    tex = texture_per_patch(f, sift_f, total, n_classes)
    stats["kp_per_patch"] = tex[stats["class_index"].to_numpy(int) * total + stats["word"].to_numpy(int)]
    checked = causal_candidates(stats, cfg.causal_top)
    if cfg.causal_top > 0 and len(checked):
        upd = causal_check(backend, source, f, checked, cfg, progress, texture=sift_f, reference=reference)
        stats.loc[upd.index, upd.columns] = upd
    decide(stats, cfg.alpha, cfg.min_effect, cfg.causal_test, cfg.region_min_effect)
    stats, top = rank(stats, class_names, cfg.top)
    decision = {"test": TEST[cfg.causal_test], "causal_test": cfg.causal_test, "alpha": cfg.alpha,
                "min_effect": cfg.min_effect, "region_min_effect": cfg.region_min_effect,
                "tested": int(stats["p"].notna().sum()), "flagged": int(stats["flagged"].sum()),
                "classes": verdicts(stats, class_names)}
    galleries = _galleries(backend, source, f, stats, total, cfg, k)
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config_record(cfg), "model": backend.describe(),
        "patches": {"size": int(backend.patch_size), "grid": [int(g) for g in backend.grid_size]},
        "sift": {**asdict(sift), "upsample_used": sift.upsample},
        "images": {"source": str(source.spec), "total": len(source), "analysed": len(f.names),
                   "skipped": len(f.skipped), "skipped_reasons": f.skipped[:500],
                   "keypoints": int(len(f.kp_desc)),
                   "accuracy": float((f.preds == f.labels).mean()) if (f.labels >= 0).all() else None},
        "boxes": boxes is not None,
        "timing": {"seconds": round(time.time() - t0, 3)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    return DiscoveryResult(stats, top, centers.numpy(), f, class_names, galleries, manifest,
                           regions=None if region_centers is None else region_centers.numpy(), decision=decision)


def load_reference(cfg: DiscoveryConfig, backend: Backend) -> Backend | None:
    """The reference test's model (``cfg.reference``), checked against the checked model: the same classes in the
    same order, and the same input size and patch grid (the occluded patches are the checked model's); None without
    the reference test."""
    if cfg.reference is None:
        return None
    ref = load_backend(cfg.reference, cfg.run.device)
    if list(ref.class_names or []) != list(backend.class_names or []):
        raise ConfigError(f"--reference {cfg.reference} has classes {ref.class_names}, not the model's "
                          f"{backend.class_names}")
    if (ref.patch_size, tuple(ref.grid_size), tuple(ref.input_size)) != (
            backend.patch_size, tuple(backend.grid_size), tuple(backend.input_size)):
        raise ConfigError(f"--reference {cfg.reference} sees {tuple(ref.input_size)} pixels in patches of "
                          f"{ref.patch_size}, not the model's {tuple(backend.input_size)} in patches of "
                          f"{backend.patch_size}")
    return ref


def texture_per_patch(f: Features, sift_f: Features, K: int, n_classes: int) -> np.ndarray:
    """(n_classes * K,) indexed by class * K + word: mean SIFT keypoints per patch of the word's patches in the
    images predicted as the class (0 where it never occurs)."""
    n, N = f.attention.shape
    ti, tv, tp = word_patches(f, K, N)
    counts = patch_counts(sift_f, N)[ti, tp]
    key = f.preds[ti] * K + tv
    tot = np.bincount(key, minlength=n_classes * K)
    s = np.bincount(key, weights=counts, minlength=n_classes * K)
    return np.where(tot > 0, s / np.maximum(tot, 1), 0.0)


def _galleries(backend, source, f: Features, stats: pd.DataFrame, K: int, cfg: DiscoveryConfig,
               sift_k: int | None = None) -> dict:
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
                cache[i] = load_pixels(backend, source, int(f.indices[i]))
            x, y = f.kp_xy[m]
            x0 = int(np.clip(round(float(x)) - half, 0, max(0, W - 2 * half)))
            y0 = int(np.clip(round(float(y)) - half, 0, max(0, H - 2 * half)))
            crop = cache[i][y0 : y0 + 2 * half, x0 : x0 + 2 * half]
            same = np.flatnonzero((f.kp_image == i) & (f.words == v))
            if sift_k is not None and v >= sift_k:  # a region word: draw the SIFT keypoints inside its patches
                on = np.isin(f.kp_patch, f.kp_patch[same])
                same = np.flatnonzero((f.kp_image == i) & on & (f.words < sift_k))
            kps = [(float(f.kp_xy[j, 0] - x0), float(f.kp_xy[j, 1] - y0), float(f.kp_size[j])) for j in same]
            ex.append({"name": f.names[i], "crop": crop, "keypoints": kps,
                       "attention": float(f.attention[i, f.kp_patch[m]] * N)})
        out[(r["class"], v)] = ex
    return out
