"""Accuracy bookkeeping of prompting: per-image groups and overall, per-group and worst-group accuracy."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError


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
