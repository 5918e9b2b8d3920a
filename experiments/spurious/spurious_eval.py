"""Helpers of experiments/spurious/spurious.py: the oracle reference (run as a script) and the per-kind summary tables.

    python experiments/spurious/spurious_eval.py --model M --split DIR --out oracle.json [--limit n] [--device cuda]

drops every patch the marker overlaps (the sidecar's boxes) and writes accuracy before and after; it is a
reference, not a method.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REFERENCE = "oracle-drop (reference)"


def marker_patches(names: list[str], side: dict, P: int, grid: tuple[int, int]):
    """(n, N) bool: every patch the marker's sidecar box overlaps, per image name (the oracle's mask)."""
    import numpy as np

    gh, gw = grid
    drop = np.zeros((len(names), gh, gw), bool)
    for k, n in enumerate(names):
        x0, y0, x1, y1 = side["images"][n]["box"]
        drop[k, y0 // P : (y1 - 1) // P + 1, x0 // P : (x1 - 1) // P + 1] = True
    return drop.reshape(len(names), gh * gw)


def oracle_drop(model: str, split: Path, limit: int | None, device: str = "cpu") -> dict:
    """Accuracy before and after dropping every patch the marker overlaps (sidecar boxes)."""
    import numpy as np
    import torch

    from siftlens.data import ImageSource
    from siftlens.models import load_backend
    from siftlens.shortcuts import group_accuracy, image_groups, read_sidecar
    from siftlens.shortcuts.interventions import forward_drop

    be = load_backend(model, device)
    side = read_sidecar(split / "markers.json")
    src = ImageSource(str(split), limit=limit)
    P, (gh, gw) = be.patch_size, be.grid_size
    before, after, labels = [], [], []
    with torch.inference_mode():
        for s in range(0, len(src), 256):
            names = src.names[s : s + 256]
            px = np.stack([be.preprocess(src.load(i)) for i in range(s, s + len(names))])
            drop = marker_patches(names, side, P, (gh, gw))
            x = be.normalize(torch.from_numpy(px))
            before.append(be.forward(x).argmax(1).cpu().numpy())
            after.append(forward_drop(be, x, torch.from_numpy(drop)).argmax(1).cpu().numpy())
            labels += [side["images"][n]["label"] for n in names]
    y = np.array([be.class_names.index(c) for c in labels])
    groups = image_groups(src.names, labels, side)
    b = group_accuracy(np.concatenate(before) == y, groups)
    a = group_accuracy(np.concatenate(after) == y, groups)
    return {"before": b, "after": a, "images": b["n"], "uses_oracle_boxes": True}


def _acc(before: dict, after: dict) -> dict:
    return {"before": before["overall"], "after": after["overall"],
            "worst_before": before["worst_group"]["accuracy"], "worst_after": after["worst_group"]["accuracy"],
            "worst_group_after": after["worst_group"]["name"], "images": before["n"]}


def _tables(prompts: dict[str, str]) -> dict:
    """Per split: one row per method (policies, oracle, repairs), before -> after. A repaired model's run gives
    two rows: ``repair`` (the repaired model as it is) and ``repair+drop`` (with the flagged tokens dropped),
    both against the original model's accuracy."""
    loaded = {k: json.loads(Path(p).read_text()) for k, p in prompts.items()}
    base = {k.split("/")[0]: s["before"] for k, s in loaded.items() if k.split("/")[1] == "base"}
    out: dict[str, dict] = {}
    for key, s in loaded.items():
        split, *rest = key.split("/")
        row = out.setdefault(split, {})
        if rest == ["oracle"]:
            row[REFERENCE] = _acc(s["before"], s["after"])
        elif rest[0] == "base":
            row[rest[1]] = _acc(s["before"], s["after"])
        else:
            label = "repair" if rest[0] == "repair-discovery" else "repair-oracle-groups (reference)"
            row[label] = _acc(base[split], s["before"])
            row[f"{label}+drop"] = _acc(base[split], s["after"])
    return out


def _oracle_share(rows: dict) -> None:
    ref = rows.get(REFERENCE)
    gain = None if ref is None else ref["after"] - ref["before"]
    for name, v in rows.items():
        v["oracle_share"] = (None if gain is None or gain < 0.01 or name == REFERENCE
                             else round((v["after"] - v["before"]) / gain, 4))


def summarise(discovery: Path, prompts: dict[str, str], repairs: dict[str, str]) -> dict:
    """The per-model block of the results: discovery's evaluation and the accuracy tables."""
    disc = json.loads(Path(discovery).read_text())
    ev = disc["evaluation"]
    pr = ev["patch_rule"]
    top1 = {c: (rows[0] if rows else None) for c, rows in disc["top"].items()}
    out = {"discovery": {
        "images": disc["manifest"]["images"]["analysed"],
        "ranks_patch_rule": pr["ranks"], "rank1_patch_rule": pr["rank1_count"],
        "ranks_word_rule": ev["ranks"], "rank1_word_rule": int(sum(r == 1 for r in ev["ranks"].values())),
        "precision_at": pr["precision_at"], "on_marker_top5": pr["on_marker"],
        "top1": {c: None if t is None else {k: t.get(k) for k in ("word", "source", "score", "causal", "assoc")}
                 for c, t in top1.items()},
        "seconds": disc["manifest"]["timing"]["seconds"]}}
    out.update(_tables(prompts))
    for rows in out.values():
        if isinstance(rows, dict) and REFERENCE in rows:
            _oracle_share(rows)
    out["repair"] = {g: {k: s[k] for k in ("images", "cells", "flagged_share", "train_accuracy_dropped", "seconds")}
                     for g, p in repairs.items() for s in [json.loads(Path(p).read_text())]}
    if "repair" in out.get("aligned", {}):  # the accuracy the repair costs, mean of the two test splits
        out["repair_cost"] = {"discovery": round(sum(out[s]["repair"]["after"] - out[s]["repair"]["before"]
                                                     for s in ("aligned", "conflicting")) / 2, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    res = oracle_drop(a.model, Path(a.split), a.limit, a.device)
    tmp = Path(a.out + ".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
