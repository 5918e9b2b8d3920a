"""Step 1 of discovery, per image: the prediction, the CLS attention over patches (last layer, mean over
heads, or attention rollout), normalised to sum 1, and SIFT keypoints with descriptors on the model's own
pixels (with, given object boxes, whether each keypoint lies inside the object).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...attention import Rollout, capture
from ...data import ImageSource
from ...errors import ConfigError
from ...io import read_json
from ...keypoints import SiftParams, patch_index
from ...loading import KeypointDataset, make_loader, one_cv2_thread_per_worker
from ...models.backend import Backend
from ...progress import progress_bar
from .config import DiscoveryConfig


def read_boxes(path: str | Path) -> dict:
    """Object boxes JSON -> {image name: list of [x0, y0, x1, y1]}; raises ConfigError when malformed."""
    p = Path(path)
    raw = read_json(p, "boxes file", error=ConfigError)
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
    loader = make_loader(KeypointDataset(source, backend, None, sift, descriptors=True, boxes=boxes), cfg.run)
    layers = None if cfg.attention == "rollout" else [-1]
    n_done = 0
    with progress_bar(progress) as pb, one_cv2_thread_per_worker(cfg.run.workers):
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
    all_names = source.names
    return Features(
        names=[all_names[i] for i in idx], indices=idx, labels=labels_all[idx],
        preds=np.concatenate(rows["pred"]).astype(np.int64), probs=np.concatenate(rows["prob"]),
        attention=np.concatenate(rows["attn"]),
        kp_image=_cat(kp["img"], np.int64), kp_xy=_cat(kp["xy"], np.float32, (0, 2)),
        kp_size=_cat(kp["size"], np.float32), kp_patch=_cat(kp["patch"], np.int64),
        kp_desc=_cat(kp["desc"], np.uint8, (0, 128)),
        kp_inside=_cat(kp["inside"], bool) if boxes is not None else None, skipped=skipped,
    )


def load_pixels(backend: Backend, source: ImageSource, i: int) -> np.ndarray:
    """Image ``i`` of ``source`` through the model's own preprocessing: (H, W, 3) uint8."""
    return backend.preprocess(source.load(i))


def _cat(parts: list, dtype, empty_shape=(0,)) -> np.ndarray:
    parts = [np.asarray(p) for p in parts if len(p)]
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


def word_patches(f: Features, K: int, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (image, word, patch) triples: three (U,) int64 arrays."""
    assert f.words is not None
    key = (f.kp_image * K + f.words) * N + f.kp_patch
    u = np.unique(key)
    return u // (K * N), (u // N) % K, u % N
