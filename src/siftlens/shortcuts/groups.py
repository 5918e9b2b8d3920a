"""Groups of images and their accuracy: reading a groups file, per-image groups, and overall, per-group and
worst-group accuracy (prompting and repair).

A groups file (``markers.json``, the sidecar that a benchmark such as SpuriousCIFAR writes into each split
folder) maps every image name (``cat/0012.png``) to a record with at least ``label`` and ``aligned`` (whether the
image carries its own class's shortcut); SpuriousCIFAR's records also hold the marker's class and box. The
shortcut tools read it here; the benchmark only writes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, SpuriousDataError
from ..io import read_json

SIDECAR = "markers.json"


def find_sidecar(images: str | os.PathLike) -> Path | None:
    """``<images>/markers.json`` when ``images`` is a folder that holds one, else None."""
    p = Path(images)
    if p.is_dir() and (p / SIDECAR).is_file():
        return p / SIDECAR
    return None


def read_sidecar(path: str | os.PathLike) -> dict:
    """Load a groups file (a SpuriousCIFAR sidecar); raises SpuriousDataError with a one-line reason."""
    p = Path(path)
    raw = read_json(p, "sidecar", error=SpuriousDataError)
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), dict):
        raise SpuriousDataError(f"{p} is not a SpuriousCIFAR sidecar (no 'images' mapping)")
    return raw


def group_accuracy(correct: np.ndarray, groups: list[str] | np.ndarray) -> dict:
    """Accuracy overall, per group and of the worst group. correct: (n,) bool; groups: (n,) names."""
    correct = np.asarray(correct, bool)
    groups = np.asarray(groups, dtype=object)
    if len(correct) != len(groups):
        raise ConfigError(f"{len(correct)} results but {len(groups)} group names")
    per = {}
    for g in sorted(set(groups.tolist())):
        m = groups == g
        per[str(g)] = {"n": int(m.sum()), "accuracy": float(correct[m].mean())}
    worst = min(per.items(), key=lambda kv: (kv[1]["accuracy"], kv[0])) if per else None
    return {
        "n": int(len(correct)),
        "overall": float(correct.mean()) if len(correct) else float("nan"),
        "groups": per,
        "worst_group": {"name": worst[0], **worst[1]} if worst else None,
    }


def image_groups(names: list[str], labels: list[str], sidecar: dict | None) -> list[str]:
    """``<class>|aligned`` / ``<class>|conflicting`` from a sidecar, else the class name."""
    if sidecar is None:
        return list(labels)
    recs = sidecar["images"]
    out = []
    for n, y in zip(names, labels, strict=True):
        r = recs.get(n)
        out.append(y if r is None else f"{r['label']}|{'aligned' if r['aligned'] else 'conflicting'}")
    return out


def by_alignment(acc: dict) -> dict | None:
    """Aligned and conflicting accuracy over every class, from a :func:`group_accuracy` dict whose groups are
    ``<class>|aligned`` / ``<class>|conflicting``: ``{"aligned": {"n", "accuracy"} or None, "conflicting": ...}``
    (None for a kind without images); None when its groups are classes (no groups file)."""
    out = {}
    for kind in ("aligned", "conflicting"):
        gs = [g for name, g in acc["groups"].items() if name.endswith(f"|{kind}")]
        n = sum(g["n"] for g in gs)
        out[kind] = {"n": n, "accuracy": sum(g["accuracy"] * g["n"] for g in gs) / n} if n else None
    return out if any(out.values()) else None


def format_alignment(al: dict | None) -> str:
    """``aligned 0.950 (n 855), conflicting 0.400 (n 45)`` from :func:`by_alignment` ('' for None)."""
    if al is None:
        return ""
    return ", ".join(f"{k} {v['accuracy']:.3f} (n {v['n']})" if v else f"{k} - (n 0)" for k, v in al.items())
