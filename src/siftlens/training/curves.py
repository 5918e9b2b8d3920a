"""Figures of pre-training curves (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_path


def plot_curves(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                keys: Sequence[str] = ("probe_acc", "knn_acc", "val_loss", "train_loss")) -> Path:
    """One panel per key, one line per run. runs: label -> list of per-epoch records ({"epoch", key...}).

    ``probe_acc`` reads the linear probe's test accuracy (``record["probe"]["test_acc"]``), the primary MAE
    measure. Records without a key (epochs between evaluations) are skipped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"train_loss": "training loss (policy's own)", "val_loss": "held-out loss (random masks)",
              "knn_acc": "k-NN accuracy (k = 20)", "probe_acc": "linear probe accuracy (held out)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, recs in runs.items():
            pts = [(r["epoch"], v) for r in recs if (v := _value(r, key)) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
        ax.set_title(titles.get(key, key), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path


def _value(rec: Mapping, key: str) -> float | None:
    if key == "probe_acc":
        return (rec.get("probe") or {}).get("test_acc")
    return rec.get(key)
