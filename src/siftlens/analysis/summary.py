"""The dataset-level summary, built in one streaming pass over the parts of a run.

Per (layer, head, metric cell) over images: the mean with a 95% bootstrap CI, the null mean and sd of
that mean (docs/method.md, "Null model and dataset statistics": the mean of the per-image null means, and
the square root of the sum of per-image null variances over n), z, a two-sided normal p, and Benjamini-Hochberg q.

Bounded memory: no step holds every image's values. The CI is an *online Poisson bootstrap*: each
image carries ``n_boot`` Poisson(1) weights drawn from a generator keyed by the run seed and the image's
name, and each part adds ``weights^T @ values`` to running sums. It was chosen over a second pass with
the multinomial bootstrap because it needs one pass, its weights depend only on the image (so batch
size, shards, merges and resumption give the same CI), and sums from shards simply add up. For n images
it agrees with the multinomial bootstrap to O(1/sqrt(n)) (tested).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.nullmodel import image_key
from ..core.stats import NO_VARIATION, bh_qvalues, normal_two_sided_p, z_scores


def poisson_weights(names: list[str], n_boot: int, seed: int) -> np.ndarray:
    """(n, n_boot) float64 Poisson(1) bootstrap weights, row i a function of ``seed`` and image i's name."""
    rows = []
    for name in names:
        key = image_key(name)
        rows.append(np.random.default_rng([seed & 0xFFFFFFFF, key & 0xFFFFFFFF, key >> 32, 1]).poisson(1.0, n_boot))
    return np.asarray(rows, np.float64).reshape(len(names), n_boot)


class SummaryAccumulator:
    """Running sums over images for every cell of a (rows, heads + 1, cells) grid, flattened to D."""

    def __init__(self, dim: int, n_boot: int, seed: int):
        self.n_boot, self.seed = n_boot, seed
        self.count = np.zeros(dim)
        self.sum_obs = np.zeros(dim)
        self.sum_null_mean = np.zeros(dim)
        self.sum_null_var = np.zeros(dim)
        self.boot_sum = np.zeros((n_boot, dim))
        self.boot_count = np.zeros((n_boot, dim))

    def add(self, names: list[str], obs: np.ndarray, null_mean: np.ndarray, null_var: np.ndarray) -> None:
        """obs, null_mean, null_var: (n, D) for the images ``names``, NaN where a cell does not exist."""
        present = ~np.isnan(obs)
        x = np.where(present, obs, 0.0)
        pf = present.astype(np.float64)
        self.count += pf.sum(0)
        self.sum_obs += x.sum(0)
        self.sum_null_mean += np.where(present, null_mean, 0.0).sum(0)
        self.sum_null_var += np.where(present, np.clip(null_var, 0, None), 0.0).sum(0)
        w = poisson_weights(names, self.n_boot, self.seed)  # (n, n_boot)
        self.boot_sum += w.T @ x
        self.boot_count += w.T @ pf

    def boot_means(self) -> np.ndarray:
        """(n_boot, D) the mean of every bootstrap replicate; NaN where a replicate holds no image."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.boot_count > 0, self.boot_sum / self.boot_count, np.nan)

    def statistics(self) -> dict[str, np.ndarray]:
        """Per cell (D,): n, mean, ci_lo, ci_hi, null_mean, null_sd, z, p; NaN where n == 0, and z, p NaN
        where the cell has no variation (:func:`dataset_z`)."""
        n = self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum_obs / n
            null_mean = self.sum_null_mean / n
            null_sd = np.sqrt(self.sum_null_var) / n
        lo, hi = nan_percentiles(self.boot_means(), (2.5, 97.5))
        z = dataset_z(mean, null_mean, self.sum_null_var, n)
        return {"n": n, "mean": mean, "ci_lo": lo, "ci_hi": hi, "null_mean": null_mean, "null_sd": null_sd,
                "z": z, "p": normal_two_sided_p(z)}


def dataset_z(mean: np.ndarray, null_mean: np.ndarray, sum_null_var: np.ndarray, n: np.ndarray) -> np.ndarray:
    """z of the mean over n images, (D,) float64: ``(mean - null_mean) / (sqrt(sum_null_var) / n)``, NaN
    where n == 0 or the cell has no variation. "No variation" is judged on the images' root-mean-square null
    sd, ``sqrt(sum_null_var / n)``, against float32 resolution (:func:`siftlens.core.stats.no_variation`): the
    rounding of independent images averages down like the null sd of their mean, so the mean is resolved
    exactly when a typical image is."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z, _ = z_scores(mean, null_mean, sum_null_var / n)  # no variation per image-sized variance
        return np.where(np.isnan(z) | (n <= 0), np.nan, z * np.sqrt(n))


def nan_percentiles(x: np.ndarray, q: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Percentiles over axis 0 ignoring NaN; an all-NaN column gives NaN, silently."""
    srt = np.sort(x, 0)  # NaN last
    k = (~np.isnan(x)).sum(0)
    out = []
    for pct in q:
        pos = np.clip((k - 1) * pct / 100.0, 0, None)
        lo_i, hi_i = np.floor(pos).astype(int), np.ceil(pos).astype(int)
        cols = np.arange(x.shape[1])
        a, b = srt[np.minimum(lo_i, len(x) - 1), cols], srt[np.minimum(hi_i, len(x) - 1), cols]
        out.append(np.where(k > 0, a + (b - a) * (pos - lo_i), np.nan))
    return out[0], out[1]


def summary_table(stats: dict[str, np.ndarray], layer_ids: list[int], heads: int,
                  cells: list[tuple[str, int, int]]) -> pd.DataFrame:
    """The tidy summary: one row per existing (layer, head, metric, level_a, level_b); head -1 = mean over
    heads. BH q runs across (layer, head) within each metric/level family, over the cells that have a p;
    head means form their own family. A cell with no variation keeps its row with z, p and q empty (NaN
    here, an empty field in summary.csv) and ``note`` "no variation"; ``note`` is "" elsewhere."""
    nl, h1, C = len(layer_ids), heads + 1, len(cells)
    li, hi, ci = np.meshgrid(np.arange(nl), np.arange(h1), np.arange(C), indexing="ij")
    df = pd.DataFrame({
        "layer": np.asarray(layer_ids)[li.ravel()],
        "head": np.where(hi == heads, -1, hi).ravel(),
        "metric": [cells[c][0] for c in ci.ravel()],
        "level_a": [cells[c][1] for c in ci.ravel()],
        "level_b": [cells[c][2] for c in ci.ravel()],
        **{k: v.ravel() for k, v in stats.items()},
    })
    df["n"] = df["n"].astype(int)
    df["null_lo"] = df["null_mean"] - 1.959964 * df["null_sd"]
    df["null_hi"] = df["null_mean"] + 1.959964 * df["null_sd"]
    df = df[df["n"] > 0].dropna(subset=["mean", "ci_lo", "ci_hi", "null_mean", "null_sd"]).copy()
    df["note"] = np.where(df["z"].isna(), NO_VARIATION, "")
    df["q"] = np.nan
    tested = df["p"].notna()
    for _, ix in df[tested].groupby(["metric", "level_a", "level_b", df["head"] == -1], sort=False).groups.items():
        df.loc[ix, "q"] = bh_qvalues(df.loc[ix, "p"].to_numpy())
    cols = ["layer", "head", "metric", "level_a", "level_b", "n", "mean", "ci_lo", "ci_hi", "null_mean", "null_sd",
            "null_lo", "null_hi", "z", "p", "q", "note"]
    return df[cols].reset_index(drop=True)
