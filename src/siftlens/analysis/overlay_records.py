"""A few images drawn in the report: pixels, keypoints, weight map and the CLS attention of three layers.

Made after the run from the first analysed images (by name), with one extra forward, so they do not
depend on batching, shards or resumption.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..attention import capture, patch_rows
from ..data import ImageSource
from ..keypoints import SiftParams
from ..loading import KeypointDataset
from ..models import Backend
from .config import AnalysisConfig


@torch.inference_mode()
def collect_overlays(backend: Backend, source: ImageSource, images: pd.DataFrame, cfg: AnalysisConfig,
                     sift: SiftParams, layers: list[int]) -> list[dict]:
    """Overlays of the first ``cfg.overlays`` images with keypoints (``images``: the run's image table)."""
    ok = images[images["status"] == "ok"].sort_values("name")
    picks = ok["index"].head(cfg.overlays).tolist() if "index" in ok else []
    if not picks:
        return []
    items = [KeypointDataset(source, backend, cfg, sift, indices=picks)[j] for j in range(len(picks))]
    show = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    T, (gh, gw) = backend.num_prefix_tokens, backend.grid_size
    cls_maps: dict[int, torch.Tensor] = {}

    def on_attention(layer: int, attn: torch.Tensor) -> None:
        row = patch_rows(attn.float(), T, backend.has_cls)[:, :, 0].mean(1)  # (B, N): CLS row, mean over heads
        cls_maps[layer] = (row / row.sum(-1, keepdim=True).clamp_min(1e-12)).reshape(-1, gh, gw).cpu()

    pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))
    with capture(backend, on_attention, show):
        logits = backend.forward(backend.normalize(pixels))
    names, classes = source.names, backend.class_names
    out = []
    for j, it in enumerate(items):
        i = it["index"]
        pred = None if logits is None else int(logits[j].argmax())
        out.append({
            "name": names[i], "pixels": it["pixels"], "keypoints_xy": it["xy"], "keypoint_size": it["size"],
            "weights": it["weights"].reshape(gh, gw), "levels": it["levels"].reshape(gh, gw),
            "cls_attention": {layer: cls_maps[layer][j].numpy() for layer in cls_maps},
            "label": folder_label(source, i),
            "prediction": class_name(pred, classes),
        })
    return out


def folder_label(source: ImageSource, i: int) -> str | None:
    """Image ``i``'s label as the source's own class name (its folder), None for an unlabelled source.
    Never the model's class names: the folder's label index means nothing to the model."""
    if source.labels is None:
        return None
    k = source.labels[i]
    classes = getattr(source, "classes", None) or []
    return str(classes[k]) if 0 <= k < len(classes) else str(k)


def class_name(k: int | None, classes: list[str] | None) -> str | None:
    """The model's class ``k`` (a prediction) as the model's class name (its number when the model has no
    names)."""
    if k is None:
        return None
    return classes[k] if classes and 0 <= k < len(classes) else str(k)
