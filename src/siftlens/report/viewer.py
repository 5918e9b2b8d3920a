"""The report's interactive viewer: attention rows quantised and compressed into the page, and its HTML.

Each viewer image (a record of :func:`siftlens.analysis.viewer_records.collect_explore`, or any dict with the same
keys) carries ``attention`` (layers, h, 1 + N, N): for every analysed layer and head, the CLS token's row
(row 0) and each patch's row (row 1 + i) over the N patch keys. The page holds, per image, one base64
string of zlib-compressed bytes:

    M * (1 + N) uint16, little-endian    e = round(-log2(row max) * 2048): row max = 2 ** (-e / 2048)
    M * (1 + N) * N values of b bits     q = round(value / row max * levels), 0..levels, packed little-end
                                         first: value k sits in byte k // (8 / b), bits (k % (8 / b)) * b

with M = layers * h matrices in (layer, head) order, then the rollout matrix when it was computed, and
b = 1, 2, 4 or 8, the fewest bits that hold ``levels``. The browser inflates it with
``DecompressionStream('deflate')`` and reads value = q / levels * row max. The number of ``levels`` is the
finest of :data:`QUANT_LEVELS` that keeps every image within the viewer's budget (characters); if even the
coarsest does not, the images that do not fit are left out (the page says so).
"""

from __future__ import annotations

import base64
import io
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from importlib.resources import files

import numpy as np
from PIL import Image

from .findings import ReportDataError, level_names

QUANT_LEVELS = (255, 63, 15, 7, 5, 3, 2, 1)
EXP_SCALE = 2048  # the row max is stored as round(-log2(max) * EXP_SCALE) in a uint16: 0.03% precision
REPORT_BUDGET = 10_000_000  # bytes of report.html the viewer may fill up to (it gets what the rest leaves)
MIN_VIEWER_BUDGET = 2_000_000  # the viewer's budget however large the rest of the report is
SMALL_IMAGE = 64  # inputs up to this side are embedded as PNG (exact pixels), larger ones as JPEG


def matrices(record: Mapping) -> np.ndarray:
    """A record's attention as (M, 1 + N, N) float32: (layer, head) matrices, then rollout if present."""
    att = np.asarray(record["attention"], dtype=np.float32)
    if att.ndim != 4 or att.shape[-2] != att.shape[-1] + 1:
        raise ReportDataError(f"a viewer image's attention must be (layers, heads, 1 + N, N), got {att.shape}")
    m = att.reshape(-1, *att.shape[-2:])
    if record.get("rollout") is not None:
        m = np.concatenate([m, np.asarray(record["rollout"], dtype=np.float32)[None]])
    return m


def bits_for(levels: int) -> int:
    """Bits per stored value: the fewest of 1, 2, 4, 8 that hold 0..levels."""
    return next(b for b in (1, 2, 4, 8) if levels < 2 ** b)


def quantize(rows: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """rows (..., N) >= 0 -> (q (..., N) uint8 in 0..levels relative to the row max, e (...) uint16)."""
    top = np.maximum(rows.max(-1), 2.0 ** -31)
    e = np.clip(np.rint(-np.log2(top) * EXP_SCALE), 0, 65535).astype(np.uint16)
    scale = np.exp2(-e.astype(np.float64) / EXP_SCALE)[..., None]
    q = np.clip(np.rint(rows / scale * levels), 0, levels).astype(np.uint8)
    return q, e


def dequantize(q: np.ndarray, e: np.ndarray, levels: int) -> np.ndarray:
    """The inverse of :func:`quantize` (what the browser computes): (..., N) float32."""
    return (q.astype(np.float32) / levels * np.exp2(-e.astype(np.float32) / EXP_SCALE)[..., None]).astype(np.float32)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Values < 2**bits as bytes, 8 / bits per byte, the first value in the lowest bits."""
    per = 8 // bits
    flat = np.concatenate([q.reshape(-1), np.zeros(-q.size % per, np.uint8)]).reshape(-1, per)
    return np.bitwise_or.reduce(flat << (bits * np.arange(per, dtype=np.uint8)), axis=1).astype(np.uint8)


def pack(record: Mapping, levels: int, effort: int = 9) -> bytes:
    """One image's attention as the zlib stream described in the module docstring."""
    q, e = quantize(matrices(record), levels)
    return zlib.compress(e.astype("<u2").tobytes() + pack_bits(q, bits_for(levels)).tobytes(), effort)


def unpack(blob: bytes, m: int, n: int, levels: int) -> np.ndarray:
    """Decode :func:`pack`'s bytes back to (m, 1 + n, n) float32 (tests and notebooks)."""
    raw = zlib.decompress(blob)
    e = np.frombuffer(raw, "<u2", m * (n + 1)).reshape(m, n + 1)
    bits, count = bits_for(levels), m * (n + 1) * n
    packed = np.frombuffer(raw, np.uint8, offset=2 * m * (n + 1))
    q = (packed[:, None] >> (bits * np.arange(8 // bits, dtype=np.uint8))) & (2 ** bits - 1)
    return dequantize(q.reshape(-1)[:count].reshape(m, n + 1, n), e, levels)


def pack_all(records: Sequence[Mapping], budget: int) -> tuple[list[str], int]:
    """Base64 strings of the images that fit in ``budget`` characters, and the levels used: the finest of
    :data:`QUANT_LEVELS` that fits every image, else the coarsest with as many images as fit. Levels whose
    quick estimate (the first image, fast compression) is clearly too large are not tried in full."""
    for levels in QUANT_LEVELS[:-1]:
        if records and len(pack(records[0], levels, 1)) * 4 / 3 * len(records) * 0.8 > budget:
            continue
        out = _fit(records, levels, budget)
        if len(out) == len(records):
            return out, levels
    return _fit(records, QUANT_LEVELS[-1], budget), QUANT_LEVELS[-1]


def _fit(records: Sequence[Mapping], levels: int, budget: int) -> list[str]:
    """The packed images, in order, until the next one would pass ``budget`` characters."""
    out, total = [], 0
    for r in records:
        s = base64.b64encode(pack(r, levels)).decode("ascii")
        total += len(s)
        if total > budget:
            break
        out.append(s)
    return out


def image_uri(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB as a data URI: PNG for small inputs, JPEG (quality 92) for larger ones."""
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    buf = io.BytesIO()
    small = max(img.size) <= SMALL_IMAGE
    img.save(buf, format="PNG" if small else "JPEG", quality=92)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_entry(record: Mapping) -> dict:
    xy = np.asarray(record["keypoints_xy"], dtype=np.float64).reshape(-1, 2)
    size = np.asarray(record["keypoint_size"], dtype=np.float64).reshape(-1)
    return {
        "name": str(record["name"]), "label": record.get("label"), "prediction": record.get("prediction"),
        "pixels": image_uri(record["pixels"]),
        "keypoints": np.round(np.column_stack([xy, size]), 1).tolist(),
        "weights": np.round(np.asarray(record["weights"], dtype=np.float64).reshape(-1), 3).tolist(),
        "levels": np.asarray(record["levels"]).reshape(-1).astype(int).tolist(),
    }


def viewer_budget(page_without_viewer: str) -> int:
    """Characters the viewer may add to a page: what :data:`REPORT_BUDGET` leaves, at least
    :data:`MIN_VIEWER_BUDGET`."""
    return max(MIN_VIEWER_BUDGET, REPORT_BUDGET - len(page_without_viewer.encode("utf-8")))


def explore_payload(records: Sequence[Mapping], manifest: Mapping, budget: int = REPORT_BUDGET) -> dict:
    """Everything the viewer script reads, as a JSON-able dict: the geometry, and per image its pixels,
    keypoints (x, y, size in input pixels), weights and levels (N,) and packed attention (``attn``), with
    the whole section within ``budget`` characters (images that do not fit are left out)."""
    if not records:
        raise ReportDataError("the viewer needs at least one image record")
    model = manifest.get("model") or {}
    first = records[0]
    entries = [_image_entry(r) for r in records]
    fixed = len(json.dumps(entries)) + len(_asset("explore.js")) + len(_asset("explore.css")) + 4000
    blobs, levels = pack_all(records, budget - fixed)
    n_lev = len(manifest.get("level_names") or []) or int((manifest.get("params") or {}).get("n_levels") or 0)
    return {
        "version": 1, "grid": list(np.shape(first["weights"])), "input": list(np.shape(first["pixels"])[:2]),
        "patch": model.get("patch_size"), "has_cls": bool(model.get("has_cls", True)),
        "layers": [int(x) for x in first["layers"]], "heads": int(np.shape(first["attention"])[1]),
        "rollout": first.get("rollout") is not None, "levels": levels, "bits": bits_for(levels),
        "exp_scale": EXP_SCALE, "level_names": level_names(manifest, n_lev) if n_lev else [],
        "left_out": len(records) - len(blobs),
        "images": [{**e, "attn": b} for e, b in zip(entries, blobs, strict=False)],
    }


def read_payload(page: str) -> dict:
    """The viewer's data (see :func:`explore_payload`) back from a report page's HTML."""
    m = re.search(r'<script type="application/json" id="sl-explore-data">(.*?)</script>', page, re.S)
    if m is None:
        raise ReportDataError("the page has no attention viewer (was it written with explore images?)")
    return json.loads(m.group(1))


def _asset(name: str) -> str:
    return (files("siftlens") / "assets" / "viewer" / name).read_text(encoding="utf-8")


def render_explore(records: Sequence[Mapping], manifest: Mapping, budget: int = REPORT_BUDGET) -> str:
    """The viewer's HTML section (heading, reading guide, no-script note, data and script) within about
    ``budget`` characters; '' without images."""
    if not records:
        return ""
    payload = explore_payload(records, manifest, budget)
    if not payload["images"]:
        return ('<h2 id="explore">Explore: attention patch by patch</h2><p class="muted">No image fits in the '
                "viewer's size budget.</p>")
    data = json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")  # no '</script>' or '<!--' in it
    shown = len(payload["images"])
    note = ("" if not payload["left_out"] else
            f" {payload['left_out']} more images were left out to keep the page within its size budget.")
    return f"""<h2 id="explore">Explore: attention patch by patch</h2>
<p>The first {shown} analysed images, as the model sees them, with the patch grid and the SIFT keypoints
(cyan circles). Choose a layer and a head (or the mean over heads), then hover over a patch to see where
that patch looks: the left panel colours every patch by the attention the chosen patch gives it (brighter =
more; the colour scale is set per panel). Click to pin a patch, click again to release it. The middle panel
is {"the CLS token's" if payload["has_cls"] else "the mean over patch queries'"} attention in the same layer
and head{", the right one attention rollout over all layers" if payload["rollout"] else ""}. To keep this page
small, attention is stored in {payload["levels"] + 1} steps per row, from 0 to the row's largest value
(coarser steps when the page would otherwise grow past its budget).{note}</p>
<noscript><p class="muted">The interactive viewer needs JavaScript. Everything else in this report reads
without it; the example images above show the CLS attention of three layers.</p></noscript>
<style>{_asset("explore.css")}</style>
<div id="sl-explore" class="sl-explore"></div>
<script type="application/json" id="sl-explore-data">{data}</script>
<script>{_asset("explore.js")}</script>
"""
