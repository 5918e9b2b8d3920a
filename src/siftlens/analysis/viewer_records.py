"""The images of the report's interactive viewer: pixels, keypoints, weight map and every attention row.

The viewer shows the first ``cfg.explore`` images of the source (by index; an image that could not be
decoded is left out). Their attention is kept by the analysis itself as their batch goes through the
model (:func:`~siftlens.analysis.engine.analyse_batch` with ``keep``), so a plain run needs no second
forward pass; only images the run did not see in this process (a resumed run, a merge, other torchrun
ranks) are captured afterwards, in one extra forward of just those images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..attention import Rollout, capture, patch_rows
from ..data import ImageSource
from ..keypoints import SiftParams
from ..loading import KeypointDataset
from ..models import Backend
from .config import AnalysisConfig
from .engine import BatchValues
from .overlay_records import class_name, folder_label


def explore_record(item: dict, source: ImageSource, backend: Backend, pred: int | None, attention: np.ndarray,
                   layers: list[int], rollout: np.ndarray | None) -> dict:
    """One viewer image. ``attention``: (len(layers), h, 1 + N, N) float16, row 0 the CLS token's (see
    :func:`~siftlens.attention.patch_rows`); ``rollout``: (1 + N, N) or None. Weights and levels: (gh, gw)."""
    i, (gh, gw) = item["index"], backend.grid_size
    return {
        "index": int(i), "name": source.names[i], "pixels": item["pixels"], "keypoints_xy": item["xy"],
        "keypoint_size": item["size"], "weights": item["weights"].reshape(gh, gw),
        "levels": item["levels"].reshape(gh, gw), "attention": attention, "layers": list(layers),
        "rollout": rollout, "label": folder_label(source, i),
        "prediction": class_name(pred, backend.class_names),
    }


def kept_records(v: BatchValues, items: list[dict], source: ImageSource, backend: Backend,
                 layers: list[int]) -> dict[int, dict]:
    """The viewer records of the images of one analysed batch whose attention it kept, by source index."""
    return {items[j]["index"]: explore_record(items[j], source, backend, v.preds[j], a, layers,
                                              v.kept_rollout.get(j))
            for j, a in v.kept.items()}


def collect_explore(backend: Backend, source: ImageSource, images: pd.DataFrame, cfg: AnalysisConfig,
                    sift: SiftParams, layers: list[int], have: dict[int, dict] | None = None) -> list[dict]:
    """The viewer records of the first ``cfg.explore`` source images that were analysed (``images``: the
    run's image table), in source order: those in ``have`` as they are, the others captured now."""
    have = dict(have or {})
    done = images[images["status"] != "skipped"]
    picks = sorted(int(i) for i in done["index"] if int(i) < cfg.explore)
    missing = [i for i in picks if i not in have]
    for start in range(0, len(missing), cfg.run.batch_size):
        have.update(_capture_now(backend, source, cfg, sift, layers, missing[start:start + cfg.run.batch_size]))
    return [have[i] for i in picks if i in have]


@torch.inference_mode()
def _capture_now(backend: Backend, source: ImageSource, cfg: AnalysisConfig, sift: SiftParams, layers: list[int],
                 indices: list[int]) -> dict[int, dict]:
    """One forward of ``indices`` with every layer's attention rows kept (rollout too when ``cfg.rollout``)."""
    ds = KeypointDataset(source, backend, cfg, sift, indices=indices)
    items = [it for it in (ds[j] for j in range(len(indices))) if "skip" not in it]
    if not items:
        return {}
    rows: dict[int, torch.Tensor] = {}
    rollout = Rollout() if cfg.rollout else None
    T, cls = backend.num_prefix_tokens, backend.has_cls

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        if layer in layers:
            rows[layer] = patch_rows(attn.float(), T, cls).half().cpu()
        if rollout is not None:
            rollout.update(attn)

    captured = list(range(backend.num_layers)) if rollout is not None else layers
    pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))
    with capture(backend, on_attention, captured) as cap:
        logits = backend.forward(backend.normalize(pixels))
    cap.check()
    att = torch.stack([rows[layer] for layer in layers], 1).numpy()  # (B, layers, h, 1 + N, N)
    roll = patch_rows(rollout.result, T, cls).half().cpu().numpy() if rollout is not None else None
    return {it["index"]: explore_record(it, source, backend, None if logits is None else int(logits[j].argmax()),
                                        att[j], layers, None if roll is None else roll[j])
            for j, it in enumerate(items)}
