"""Comparing analysis runs: per-cell differences with bootstrap CIs, z, p and BH q, and findings in words.

Every run is re-accumulated from its parts with one bootstrap seed. The Poisson(1) weights of an image
depend only on that seed and the image's name (:mod:`siftlens.analysis.summary`), so images that two runs
share get the same weights in both: the bootstrap of a difference is *paired* on the shared images and
*unpaired* (independent weights) on the rest, with no special case. Memory stays bounded as in the
analysis itself. Runs made with different settings (scheme, levels, upsampling, null...) are refused
unless ``force=True``.

``compare(runs, config=None, *, labels=None, progress=True) -> Comparison``, the shape of every job;
:meth:`Comparison.save` writes the tables and the findings (the figure and the HTML page are rendering:
:mod:`siftlens.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.stats import bh_qvalues, normal_two_sided_p
from ..errors import ConfigError
from ..io import atomic_path, write_text
from ..options import option
from ..progress import progress_bar
from .config import cells, flat_params
from .runner import accumulate, read_images
from .store import RunStore
from .summary import nan_percentiles, summary_table

KEY = ["layer", "head", "metric", "level_a", "level_b"]
# parameters that change what a number means: runs that differ in them are not comparable
SETTINGS = ("scheme", "n_levels", "thresholds", "upsample", "contrast_threshold", "edge_threshold", "null",
            "null_kind", "max_pixels")


@dataclass
class CompareConfig:
    """The options of a comparison."""

    force: bool = option(False, "Compare runs made with different settings (scheme, levels, u, null ...); the "
                                "differences are printed.")
    n_boot: int | None = option(None, "Bootstrap resamples of the differences (default: the first run's).",
                                cli=False)
    seed: int | None = option(None, "Seed of the bootstrap of the differences (default: the first run's).",
                              cli=False)


@dataclass
class Comparison:
    """summaries: every run's summary with a ``run`` column (its label); differences: per ``run`` (not the
    first) and cell, ``diff = mean(run) - mean(first run)`` with ``ci_lo``, ``ci_hi``, ``z``, ``p``, ``q``;
    runs: per run its label, folder, model, images and the images it shares with the first run."""

    labels: list[str]
    summaries: pd.DataFrame
    differences: pd.DataFrame
    runs: pd.DataFrame
    setting_differences: dict[str, list] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """Jupyter's view: every run's per-layer curves and the cells that differ (:mod:`siftlens.report.notebook`)."""
        from ..report.notebook import comparison_html  # matplotlib only when a notebook asks

        depth = int(self.runs["depth"].min()) if "depth" in self.runs else None
        return comparison_html(self.differences, self.summaries, self.labels, depth)

    def findings(self) -> list[str]:
        """The comparison in words (:func:`compare_findings`)."""
        return compare_findings(self)

    def save(self, out: str | Path) -> dict[str, Path]:
        """Write differences.csv, summaries.csv, runs.csv and findings.txt into ``out``; returns their paths."""
        out = Path(out)
        paths = {}
        for name, df in (("differences", self.differences), ("summaries", self.summaries), ("runs", self.runs)):
            with atomic_path(out / f"{name}.csv") as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g")
            paths[name] = out / f"{name}.csv"
        paths["findings"] = write_text(out / "findings.txt", "\n".join(self.findings()) + "\n")
        return paths


def setting_differences(runs: list[dict]) -> dict[str, list]:
    """{parameter: [value per run]} for every comparability setting that is not the same in all runs; the
    params are read nested (the SIFT options under ``sift``) or flat (runs written before the groups)."""
    params = [flat_params(r["params"]) for r in runs]
    out = {}
    for k in SETTINGS:
        vals = [p.get(k) for p in params]
        if any(v != vals[0] for v in vals[1:]):
            out[k] = vals
    return out


def _load_runs(run_dirs: list[str | Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        run = RunStore(d).read_run()
        if run is None or not (Path(d) / "manifest.json").exists():
            raise ConfigError(f"{d} is not a finished siftlens analysis (no run.json / manifest.json)")
        runs.append(run)
    return runs


def _cell_frame(run: dict, stats: dict[str, np.ndarray], boot: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """The run's cells (KEY columns, n, mean) that exist, and their bootstrap replicate means (n_boot, cells)."""
    table = summary_table(stats, run["layer_ids"], run["heads"], _cells(run))
    grid = pd.MultiIndex.from_frame(_all_cells(run))
    cols = grid.get_indexer(pd.MultiIndex.from_frame(table[KEY]))
    return table[KEY + ["n", "mean"]].reset_index(drop=True), boot[:, cols]


def _cells(run: dict) -> list[tuple[str, int, int]]:
    return cells(run["n_levels"])


def _all_cells(run: dict) -> pd.DataFrame:
    """Every (layer, head, metric, level_a, level_b) of the run's flat accumulator grid, in its order."""
    c = _cells(run)
    heads = list(range(run["heads"])) + [-1]
    rows = [(layer, h, m, a, b) for layer in run["layer_ids"] for h in heads for (m, a, b) in c]
    return pd.DataFrame(rows, columns=KEY)


def _difference(base: tuple[pd.DataFrame, np.ndarray], other: tuple[pd.DataFrame, np.ndarray]) -> pd.DataFrame:
    """Per cell both runs have: the difference of means, its bootstrap CI and se, z and the normal p."""
    (ta, ba), (tb, bb) = base, other
    m = ta.reset_index().merge(tb.reset_index(), on=KEY, suffixes=("_a", "_b"))
    boot = bb[:, m["index_b"].to_numpy()] - ba[:, m["index_a"].to_numpy()]  # (n_boot, cells)
    diff = (m["mean_b"] - m["mean_a"]).to_numpy()
    lo, hi = nan_percentiles(boot, (2.5, 97.5))
    with np.errstate(invalid="ignore"):
        se = np.nanstd(boot, axis=0, ddof=1)
        z = np.where(np.abs(diff) <= 1e-12, 0.0, diff / np.maximum(se, 1e-300))
    out = m[KEY].copy()
    out["n_base"], out["n"], out["mean_base"], out["mean"] = m["n_a"], m["n_b"], m["mean_a"], m["mean_b"]
    out["diff"], out["ci_lo"], out["ci_hi"], out["se"], out["z"] = diff, lo, hi, se, np.clip(z, -1e6, 1e6)
    out["p"] = normal_two_sided_p(out["z"].to_numpy())
    return out.dropna(subset=["diff", "ci_lo", "ci_hi", "se", "z", "p"])


def _with_q(df: pd.DataFrame) -> pd.DataFrame:
    """BH q across (layer, head) within each run, metric/level family, head means apart."""
    df = df.copy()
    df["q"] = 1.0
    for _, ix in df.groupby(["run", "metric", "level_a", "level_b", df["head"] == -1], sort=False).groups.items():
        df.loc[ix, "q"] = bh_qvalues(df.loc[ix, "p"].to_numpy())
    return df.reset_index(drop=True)


def compare(run_dirs: list[str | Path], config: CompareConfig | None = None, *, labels: list[str] | None = None,
            progress: bool = True, **overrides) -> Comparison:
    """Compare finished analysis folders; differences are against the first. ``config``: a
    :class:`CompareConfig`; ``overrides`` set its fields by name (``force=True``, ``n_boot=2000``)."""
    unknown = set(overrides) - {f.name for f in fields(CompareConfig)}
    if unknown:
        raise ConfigError(f"unknown compare option(s): {', '.join(sorted(unknown))}")
    cfg = replace(config or CompareConfig(), **overrides)
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two analysis folders")
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        raise ConfigError(f"give one distinct --label per run ({len(run_dirs)} runs, labels {labels})")
    runs = _load_runs(run_dirs)
    differ = setting_differences(runs)
    if differ and not cfg.force:
        what = "; ".join(f"{k}: {' vs '.join(map(str, v))}" for k, v in differ.items())
        raise ConfigError(f"the runs were made with different settings ({what}); pass --force to compare anyway")
    first = flat_params(runs[0]["params"])
    n_boot = cfg.n_boot or first["n_boot"]
    seed = first["seed"] if cfg.seed is None else cfg.seed
    cellsets, summaries, infos = [], [], []
    names0 = set(read_images(run_dirs[0])["name"])
    with progress_bar(progress) as pb:
        task = pb.add_task("compare", total=len(runs), info="")
        for d, run, label in zip(run_dirs, runs, labels, strict=True):
            acc = accumulate(d, run, n_boot, seed)
            stats = acc.statistics()
            cellsets.append(_cell_frame(run, stats, acc.boot_means()))
            summaries.append(summary_table(stats, run["layer_ids"], run["heads"], _cells(run)).assign(run=label))
            names = set(read_images(d)["name"])
            infos.append({"run": label, "folder": str(d), "model": run["model"].get("spec"),
                          "depth": run["model"]["layers"], "images": run["images"]["source"],
                          "analysed": len(names), "shared_with_first": len(names & names0)})
            pb.update(task, advance=1)
    diffs = [_difference(cellsets[0], cs).assign(run=label)
             for cs, label in zip(cellsets[1:], labels[1:], strict=True)]
    differences = _with_q(pd.concat(diffs, ignore_index=True)) if diffs else pd.DataFrame()
    return Comparison(labels, pd.concat(summaries, ignore_index=True), differences, pd.DataFrame(infos), differ)


def compare_findings(c: Comparison, alpha: float = 0.05, min_effect: float = 0.05) -> list[str]:
    """Sentences on the head-mean SAL, WI and CLS lift of each run against the first, from the tables."""
    out = []
    base = c.labels[0]
    for label in c.labels[1:]:
        d = c.differences[(c.differences["run"] == label) & (c.differences["head"] == -1)
                          & (c.differences["level_a"] < 0)]
        info = c.runs.set_index("run").loc[label]
        pairing = (f"paired on all {info['shared_with_first']} shared images" if info["shared_with_first"]
                   else "unpaired (no shared images)")
        for metric, name in (("sal", "SAL"), ("wi", "WI"), ("cls_lift", "CLS lift")):
            m = d[d["metric"] == metric].sort_values("layer")
            if m.empty:
                continue
            big = m[(m["q"] < alpha) & (m["diff"].abs() >= min_effect)]
            top = m.loc[m["diff"].abs().idxmax()]
            where = "rollout" if top["layer"] >= info["depth"] else f"layer {int(top['layer'])}"
            out.append(
                f"{label} vs {base}, {name} (mean over heads): {len(big)} of {len(m)} layers differ by "
                f"{min_effect:g} or more with q < {alpha:g}; the largest difference is {top['diff']:+.3f} at "
                f"{where} ({top['mean_base']:.3f} -> {top['mean']:.3f}, 95% CI {top['ci_lo']:+.3f} to "
                f"{top['ci_hi']:+.3f}, q={top['q']:.2g}; bootstrap {pairing})."
            )
    return out
