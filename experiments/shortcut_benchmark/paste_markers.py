"""How far does a whole planted marker move another class's image? (the insertion test's ceiling, issue 25)

For a model of the benchmark and its train build: among the images predicted as their marker's class c (the
donors, up to ``--donors``), paste the donor's whole marker box (sidecar ``markers.json``) into a recipient predicted
as another class, at the same place, and record the rise of p(c). The comparison pastes a box of the same size from
elsewhere in the donor into the same place of the same recipient. ``discover --causal-test insert`` pastes only one
word's patches, so this bounds what insertion can show on that model.

    python experiments/shortcut_benchmark/paste_markers.py runs/shortcut-bench-validation-seed0/watermark shortcut
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siftlens.models import load_backend


def class_probs(backend, pixels: np.ndarray) -> np.ndarray:
    """pixels (B, H, W, 3) uint8 -> softmax (B, C)."""
    with torch.inference_mode():
        return backend.forward(backend.normalize(torch.from_numpy(pixels))).float().softmax(-1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind_dir", help="a kind's working folder of run.py (holds erm-<side>/ and <side>-data/)")
    ap.add_argument("side", choices=("shortcut", "control"))
    ap.add_argument("--images", type=int, default=600, help="train images read (spread over the split)")
    ap.add_argument("--donors", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    kind = Path(a.kind_dir)
    backend = load_backend(str(kind / f"erm-{a.side}" / "model"), "cpu")
    root = kind / f"{a.side}-data" / "train"
    sidecar = json.loads((root / "markers.json").read_text())["images"]
    names = list(sidecar)[:: max(1, len(sidecar) // a.images)]
    px = np.stack([np.asarray(Image.open(root / n).convert("RGB")) for n in names])
    index = {c: i for i, c in enumerate(backend.class_names)}
    marker = np.array([index[sidecar[n]["marker"]] for n in names])
    base = class_probs(backend, px)
    pred = base.argmax(1)
    rng = np.random.default_rng(a.seed)
    H, W = px.shape[1:3]
    rise, other = [], []
    for i in np.flatnonzero(pred == marker)[: a.donors]:
        c, r = marker[i], rng.choice(np.flatnonzero(pred != marker[i]))
        x0, y0, x1, y1 = sidecar[names[i]]["box"]
        h, w = y1 - y0, x1 - x0
        ys, xs = (y0 + H // 2) % (H - h + 1), (x0 + W // 2) % (W - w + 1)  # the same size, half an image away
        pasted, moved = px[r].copy(), px[r].copy()
        pasted[y0:y1, x0:x1] = px[i, y0:y1, x0:x1]
        moved[y0:y1, x0:x1] = px[i, ys : ys + h, xs : xs + w]
        p = class_probs(backend, np.stack([pasted, moved]))[:, c]
        rise.append(p[0] - base[r, c])
        other.append(p[1] - base[r, c])
    rise, other = np.array(rise), np.array(other)
    print(json.dumps({"model": str(kind / f"erm-{a.side}"), "donors": len(rise),
                      "marker_rise": round(float(rise.mean()), 4), "other_box_rise": round(float(other.mean()), 4),
                      "difference": round(float((rise - other).mean()), 4),
                      "recipients_moved_over_half": round(float(np.mean(rise > 0.5)), 4)}))


if __name__ == "__main__":
    main()
