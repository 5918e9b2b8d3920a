"""Plain-English findings computed from the summary table, plus the small helpers the report shares.

Every sentence is built from numbers in ``summary`` (nothing is hard-coded), names the cell it is
about, and carries the estimate, its 95% CI and the corrected q-value, so a reader can check it
against the table. Layers are named with the indices used in the table; the value ``num_layers``
in the ``layer`` column is attention rollout and ``head == -1`` is the mean over heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import SiftlensError

REQUIRED_COLUMNS = ("layer", "head", "metric", "level_a", "level_b", "n", "mean", "ci_lo", "ci_hi",
                    "null_mean", "null_lo", "null_hi", "z", "p", "q")
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_EFFECT = 0.05  # ratio metrics: a 5% lift is the smallest difference worth a sentence
DEFAULT_MIN_RHO = 0.1  # Spearman rho: the conventional 'small' correlation


class ReportDataError(SiftlensError):
    """The summary table or manifest given to the report lacks what the report needs."""


# ---------------------------------------------------------------- shared helpers (also used by figures/html)

def check_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Validate the summary table's columns; return a copy with integer index columns."""
    if not isinstance(summary, pd.DataFrame):
        raise ReportDataError(f"summary must be a pandas DataFrame, got {type(summary).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in summary.columns]
    if missing:
        raise ReportDataError(f"summary table lacks columns {missing}; pass the runner's summary table "
                              "(one row per layer, head, metric, level_a, level_b)")
    s = summary.copy()
    for c in ("layer", "head", "level_a", "level_b"):
        s[c] = s[c].astype(np.int64)
    s["metric"] = s["metric"].astype(str)
    return s


def num_layers(summary: pd.DataFrame, manifest: Mapping | None) -> int:
    """Number of transformer layers; ``layer == num_layers`` in the summary means rollout."""
    model = (manifest or {}).get("model") or {}
    if model.get("layers") is not None:
        return int(model["layers"])
    return int(summary["layer"].max()) + 1 if len(summary) else 0


def level_names(manifest: Mapping | None, n: int) -> list[str]:
    """Names of the ``n`` semantic levels (``manifest['level_names']``, else 'level 0'...)."""
    names = list((manifest or {}).get("level_names") or [])
    return [str(names[i]) if i < len(names) else f"level {i}" for i in range(n)]


def cell_name(layer: int, head: int, n_layers: int) -> str:
    """'layer 2 head 1', 'layer 2 (mean over heads)' or 'attention rollout'."""
    if layer >= n_layers:
        return "attention rollout"
    return f"layer {layer} head {head}" if head >= 0 else f"layer {layer} (mean over heads)"


#: p and q below this print as "< 1e-12": the normal approximation is not accurate further into the tail,
#: and z (printed beside them) stays the measure of strength.
P_FLOOR = 1e-12
NO_VARIATION = "no variation"


def fmt_p(p: float, name: str = "p") -> str:
    """'p=0.0031', 'p < 1e-12', or 'no variation' for a cell without a p (its null has no variation)."""
    if p is None or not np.isfinite(p):
        return NO_VARIATION
    return f"{name} < {P_FLOOR:g}" if p < P_FLOOR else f"{name}={p:.2g}"


def fmt_q(q: float) -> str:
    """q with two significant digits, 'q < 1e-12' below that, 'no variation' where the cell has no q."""
    return fmt_p(q, "q")


def fmt_z(z: float) -> str:
    """'z=3.1', 'z=42', or 'no variation' where the cell has no z."""
    if z is None or not np.isfinite(z):
        return NO_VARIATION
    return f"z={z:.0f}" if abs(z) >= 10 else f"z={z:.1f}"


def bare(text: str) -> str:
    """A formatted z, p or q without its name, for a table column: 'z=3.1' -> '3.1', 'q < 1e-12' -> '< 1e-12'."""
    for name in ("z", "p", "q"):
        if text.startswith(name + "=") or text.startswith(name + " "):
            return text[len(name):].removeprefix("=").strip()
    return text


def strength(z: float) -> float:
    """|z| for ranking findings; 0.0 for a cell with no variation (no z)."""
    return abs(float(z)) if z is not None and np.isfinite(z) else 0.0


def fmt_num(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def join_words(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def layer_list(layers: Sequence[int]) -> str:
    """'layer 3', 'layers 0, 2 and 5', 'layers 1–4 and 7' (runs of three or more are ranges)."""
    xs = sorted({int(x) for x in layers})
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    parts: list[str] = []
    for r in runs:
        parts += [f"{r[0]}–{r[-1]}"] if len(r) >= 3 else [str(x) for x in r]
    return ("layer " if len(xs) == 1 else "layers ") + join_words(parts)


def _count(n: int, verb: str) -> str:
    """'1 favours', '3 favour'."""
    return f"{n} {verb}s" if n == 1 else f"{n} {verb}"


@dataclass(frozen=True)
class Rule:
    """When a cell counts as departing from the null: q < alpha and a large enough difference."""

    alpha: float = DEFAULT_ALPHA
    min_effect: float = DEFAULT_MIN_EFFECT  # for ratio metrics (SAL, WI, CLS lift, R): |mean - null| >= this
    min_rho: float = DEFAULT_MIN_RHO  # for Spearman rho

    def margin(self, metric: str) -> float:
        return self.min_rho if metric == "cls_rho" else self.min_effect

    def significant(self, df: pd.DataFrame) -> pd.Series:
        return df["q"] < self.alpha

    def departs(self, df: pd.DataFrame) -> pd.Series:
        """q < alpha and |mean - null_mean| at least the metric's margin."""
        if df.empty:
            return pd.Series(False, index=df.index)
        margin = df["metric"].map(lambda m: self.margin(str(m))).astype(float)
        return self.significant(df) & ((df["mean"] - df["null_mean"]).abs() >= margin)


def _ci(row) -> str:
    return f"95% CI {fmt_num(row['ci_lo'])}–{fmt_num(row['ci_hi'])}"


def _stats(row) -> str:
    if not np.isfinite(row["z"]):
        return NO_VARIATION
    return f"{fmt_z(row['z'])}, {fmt_q(row['q'])}"


# ---------------------------------------------------------------- findings

def findings(summary: pd.DataFrame, manifest: Mapping | None = None, alpha: float = DEFAULT_ALPHA,
             min_effect: float = DEFAULT_MIN_EFFECT, min_rho: float = DEFAULT_MIN_RHO,
             max_sentences: int = 8) -> list[str]:
    """Checkable sentences about the run: the headline first, then the rest strongest first.

    A cell *departs from the null* when its BH-corrected q-value is below ``alpha`` **and** its mean
    differs from the null mean by at least ``min_effect`` (ratio metrics: 0.05 = 5%) or ``min_rho``
    (Spearman rho), so that a tiny but precisely measured difference is not sold as a finding; such
    cells are counted as 'negligible'. The direction is the sign of ``mean - null_mean``. Strength,
    which orders the sentences after the headline, is the |z| of the cell a sentence rests on.
    """
    s = check_summary(summary)
    n_layers = num_layers(s, manifest)
    rule = Rule(alpha, min_effect, min_rho)
    lead, scored = _sal_findings(s, n_layers, rule)
    scored += _trend(s, n_layers, rule)
    scored += _cls(s, n_layers, rule, manifest)
    scored += _interrelation(s, n_layers, rule, manifest)
    scored += _distance(s, n_layers, manifest, rule)
    scored.sort(key=lambda t: -t[0])
    return (lead + [t[1] for t in scored])[:max_sentences]


def _sal_findings(s: pd.DataFrame, n_layers: int, rule: Rule) -> tuple[list[str], list[tuple[float, str]]]:
    """Headline sentences (strongest head; counts and null layers) and scored SAL sentences."""
    sal = s[(s["metric"] == "sal") & (s["level_a"] < 0) & (s["level_b"] < 0)]
    if sal.empty:
        return ["The summary holds no SAL rows, so it says nothing about attention to keypoint-rich "
                "patches."], []
    alpha, eff = rule.alpha, f"{rule.min_effect:.0%}"
    heads = sal[(sal["head"] >= 0) & (sal["layer"] < n_layers)]
    means = sal[(sal["head"] < 0) & (sal["layer"] < n_layers)]
    rollout = sal[(sal["layer"] >= n_layers) & (sal["head"] < 0)]
    cells = heads if len(heads) else means
    if cells.empty:
        cells = rollout
    unit, unit1 = (("(layer, head) cells", "(layer, head) cell") if len(heads)
                   else ("layers (mean over heads)", "layer (mean over heads)"))
    dep = cells[rule.departs(cells)]
    up = dep[dep["mean"] > dep["null_mean"]].sort_values("mean", ascending=False)
    down = dep[dep["mean"] < dep["null_mean"]].sort_values("mean")
    n_sig = int(rule.significant(cells).sum())
    n_small = n_sig - len(dep)  # significant, but smaller than the margin
    n_null = len(cells) - n_sig
    lead: list[str] = []
    scored: list[tuple[float, str]] = []
    if not (len(dep) or rule.departs(means).any() or rule.departs(rollout).any()):
        top = cells.loc[(cells["mean"] - cells["null_mean"]).abs().idxmax()]
        where = cell_name(top["layer"], top["head"], n_layers)
        if n_sig == 0 and not rule.significant(means).any():
            lead.append(
                f"No layer or head departs from the null: in all {len(cells)} {unit}, SAL is within what "
                f"attention that ignores keypoints would give (all q ≥ {alpha:g}; the largest difference "
                f"is {fmt_num(top['mean'], 3)}x at {where}, {fmt_q(top['q'])})."
            )
        else:
            lead.append(
                f"No layer or head departs from the null by {eff} or more: the largest difference is "
                f"SAL {fmt_num(top['mean'], 3)}x at {where} ({fmt_q(top['q'])}); {n_sig} of {len(cells)} "
                f"{unit} differ significantly but negligibly, and {n_null} are indistinguishable from it."
            )
        return lead, scored
    if len(up):
        r = up.iloc[0]
        lead.append(
            f"{_cap(cell_name(r['layer'], r['head'], n_layers))} favours keypoint-rich patches most: it "
            f"gives them {fmt_num(r['mean'])}x the attention they would get if attention ignored "
            f"keypoints ({_ci(r)}; shuffled-keypoint null {fmt_num(r['null_lo'])}–"
            f"{fmt_num(r['null_hi'])}; {_stats(r)})."
        )
        if len(up) > 1:
            more = [f"{cell_name(x['layer'], x['head'], n_layers)} ({fmt_num(x['mean'])}x, {fmt_q(x['q'])})"
                    for _, x in up.iloc[1:4].iterrows()]
            scored.append((strength(up.iloc[1]["z"]), f"Next strongest: {join_words(more)}."))
    else:
        lead.append(f"No {unit1} favours keypoint-rich patches (none has SAL above the null by {eff} or "
                    f"more with q < {alpha:g}).")
    if len(down):
        r = down.iloc[0]
        scored.append((strength(r["z"]),
                       f"{_cap(cell_name(r['layer'], r['head'], n_layers))} avoids keypoint-rich patches "
                       f"most: it gives them only {fmt_num(r['mean'])}x the attention they would get if "
                       f"attention ignored keypoints ({_ci(r)}; {_stats(r)})."))
    counts = (len(up), len(down), n_small, n_null, len(cells))
    lead.append(_count_sentence(counts, unit, means if len(heads) else means.iloc[:0], rule))
    if len(rollout):
        scored.append(_rollout_sentence(rollout.iloc[:1], rule))
    return lead, scored


def _count_sentence(counts: tuple[int, ...], unit: str, means: pd.DataFrame, rule: Rule) -> str:
    """'Of n cells, u favour keypoint-rich patches, d avoid them, ...; averaged over heads, ...'."""
    n_up, n_down, n_small, n_null, n_cells = counts
    eff = f"{rule.min_effect:.0%}"
    parts = [f"{_count(n_up, 'favour')} keypoint-rich patches", f"{_count(n_down, 'avoid')} them"]
    if n_small:
        parts.append(f"{n_small} differ{'s' if n_small == 1 else ''} from the null by less than {eff}")
    parts.append(f"{n_null} {'is' if n_null == 1 else 'are'} indistinguishable from it (q ≥ {rule.alpha:g})")
    text = f"Of {n_cells} {unit}, {join_words(parts)}"
    if len(means):
        ok = rule.departs(means)
        ms, flat = means[ok].sort_values("layer"), means[~ok].sort_values("layer")
        if len(ms):
            text += (f"; averaged over heads, {layer_list(ms['layer'])} "
                     f"{'departs' if len(ms) == 1 else 'depart'} from the null")
            if len(flat):
                text += f" and {layer_list(flat['layer'])} {'does' if len(flat) == 1 else 'do'} not"
        else:
            text += f"; averaged over heads, no layer departs from the null by {eff} or more"
    return text + "."


def _rollout_sentence(row: pd.DataFrame, rule: Rule) -> tuple[float, str]:
    """The scored sentence on attention rollout's SAL (``row``: its one summary row)."""
    r = row.iloc[0]
    if rule.departs(row).iloc[0]:
        verdict = "departs from the null"
    elif r["q"] < rule.alpha:
        verdict = f"differs from the null by less than {rule.min_effect:.0%}"
    else:
        verdict = "is indistinguishable from the null"
    return (strength(r["z"]), f"Attention rollout across all layers gives keypoint-rich patches "
            f"{fmt_num(r['mean'])}x ({_ci(r)}, {fmt_q(r['q'])}) and {verdict}.")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _layer_means(s: pd.DataFrame, metric: str, n_layers: int) -> pd.DataFrame:
    """Per-layer head-mean rows of ``metric`` (falls back to averaging the head rows)."""
    m = s[(s["metric"] == metric) & (s["layer"] < n_layers)]
    hm = m[m["head"] < 0]
    if len(hm):
        return hm.sort_values("layer")
    if m.empty:
        return m
    return (m.groupby("layer", as_index=False)[["mean", "ci_lo", "ci_hi", "null_mean"]].mean()
            .sort_values("layer"))


def _trend(s: pd.DataFrame, n_layers: int, rule: Rule) -> list[tuple[float, str]]:
    lm = _layer_means(s[(s["level_a"] < 0) & (s["level_b"] < 0)], "sal", n_layers)
    if len(lm) < 2:
        return []
    k = max(1, len(lm) // 3)
    early, late = lm.iloc[:k], lm.iloc[-k:]
    e, l = float(early["mean"].mean()), float(late["mean"].mean())
    half = float(((pd.concat([early, late])["ci_hi"] - pd.concat([early, late])["ci_lo"]) / 2).mean())
    tol = max(half, rule.min_effect)
    peak = lm.loc[lm["mean"].idxmax()]

    def span(df):
        a, b = int(df["layer"].iloc[0]), int(df["layer"].iloc[-1])
        return f"layer {a}" if a == b else f"layers {a}–{b}"

    if abs(l - e) > tol:
        text = (f"Across depth, SAL (mean over heads) {'rises' if l > e else 'falls'} from {fmt_num(e)}x "
                f"in the early {span(early)} to {fmt_num(l)}x in the late {span(late)}")
        extreme = peak if l > e else lm.loc[lm["mean"].idxmin()]
        text += (f", {'peaking' if l > e else 'bottoming out'} at layer {int(extreme['layer'])} "
                 f"({fmt_num(extreme['mean'])}x)")
    else:
        text = (f"Across depth, SAL (mean over heads) stays flat: {fmt_num(e)}x in the early "
                f"{span(early)} and {fmt_num(l)}x in the late {span(late)}")
        if abs(peak["mean"] - peak["null_mean"]) > tol:
            text += f", with a peak of {fmt_num(peak['mean'])}x at layer {int(peak['layer'])}"
    return [(abs(l - e) / tol, text + ".")]


def _cls(s: pd.DataFrame, n_layers: int, rule: Rule, manifest) -> list[tuple[float, str]]:
    has_cls = ((manifest or {}).get("model") or {}).get("has_cls", True)
    who = ("The CLS token's attention" if has_cls
           else "The mean query's attention (this model has no CLS token)")
    rho = s[(s["metric"] == "cls_rho") & (s["head"] < 0)]
    lift = s[(s["metric"] == "cls_lift") & (s["head"] < 0)]
    if rho.empty and lift.empty:
        return []
    base = rho if len(rho) else lift
    dep = base[rule.departs(base)]
    if dep.empty:
        margin = f"|rho| ≥ {rule.min_rho:g}" if len(rho) else f"a lift of {rule.min_effect:.0%}"
        what = "correlated with" if len(rho) else "drawn to"
        return [(0.5, f"{who} is not {what} keypoint weight in any layer (none reaches {margin} with "
                      f"q < {rule.alpha:g}).")]
    r = dep.loc[(dep["mean"] - dep["null_mean"]).abs().idxmax()]
    where = "in attention rollout" if r["layer"] >= n_layers else f"in layer {int(r['layer'])}"
    if len(rho):
        verb = "follows" if r["mean"] > r["null_mean"] else "runs against"
        text = (f"{who} {verb} keypoint weight most {where}: Spearman rho = {fmt_num(r['mean'])} "
                f"({_ci(r)}, {fmt_q(r['q'])}); rho departs from the null in "
                f"{int((dep['layer'] < n_layers).sum())} of {int((base['layer'] < n_layers).sum())} layers")
        lr = lift[lift["layer"] == r["layer"]]
        if len(lr):
            text += f", and CLS lift {where} is {fmt_num(lr.iloc[0]['mean'])}x"
    else:
        text = (f"{who} gives keypoint-rich patches {fmt_num(r['mean'])}x their uniform share {where} "
                f"({_ci(r)}, {fmt_q(r['q'])})")
    return [(strength(r["z"]), text + ".")]


def _interrelation(s: pd.DataFrame, n_layers: int, rule: Rule, manifest) -> list[tuple[float, str]]:
    R = s[(s["metric"] == "R") & (s["head"] < 0) & (s["layer"] < n_layers)]
    if R.empty:
        return []
    hi = int(max(R["level_a"].max(), R["level_b"].max()))
    if hi < 1:
        return []
    names = level_names(manifest, hi + 1)
    hh = R[(R["level_a"] == hi) & (R["level_b"] == hi)].set_index("layer")
    h0 = R[(R["level_a"] == hi) & (R["level_b"] == 0)].set_index("layer")
    both = hh.index.intersection(h0.index)
    if len(both) == 0:
        return []
    hh, h0 = hh.loc[both], h0.loc[both]
    best = int(hh["mean"].idxmax())
    a, b = hh.loc[best], h0.loc[best]
    a_departs = bool(rule.departs(hh.loc[[best]].reset_index()).iloc[0])
    n_pref = int((hh["mean"] - h0["mean"] >= rule.min_effect).sum())
    hn, zn = f"'{names[hi]}'", f"'{names[0]}'"
    if a_departs and a["mean"] - b["mean"] >= rule.min_effect:
        text = (f"Keypoint-rich patches attend mostly to each other: in layer {best}, {hn} queries give "
                f"{hn} patches {fmt_num(a['mean'])}x their share under uniform attention ({fmt_q(a['q'])}) "
                f"against {fmt_num(b['mean'])}x for {zn} patches; {hn}→{hn} exceeds {hn}→{zn} by "
                f"{rule.min_effect:g} or more in {n_pref} of {len(both)} layers.")
    else:
        note = fmt_q(a["q"]) if a_departs else f"not a departure from the null, {fmt_q(a['q'])}"
        text = (f"Keypoint-rich patches show no clear preference for each other: the largest {hn}→{hn} "
                f"value is {fmt_num(a['mean'])}x in layer {best} ({note}), against "
                f"{fmt_num(b['mean'])}x for {hn}→{zn}.")
    return [(strength(a["z"]), text)]


def _distance(s: pd.DataFrame, n_layers: int, manifest, rule: Rule) -> list[tuple[float, str]]:
    """How far and how focused attention is: a descriptive sentence, placed after the tested findings.

    Levels are compared with the relative distance ``dist_rel`` only (1.0 = as far as uniform attention
    would look from the same query patches). Raw distance in pixels is confounded by geometry: patches
    near the image centre, where keypoints tend to be, are close to all other patches, so they look less
    far even under uniform attention, and a raw gap between levels is no evidence of an attention effect.
    Raw pixels appear only in the depth trend, where every layer has the same queries.
    """
    def head_means(metric: str) -> pd.DataFrame:
        return s[(s["metric"] == metric) & (s["head"] < 0) & (s["layer"] < n_layers) & (s["level_a"] >= 0)]

    rel, raw = head_means("dist_rel"), head_means("dist")
    parts: list[str] = []
    score = 0.1  # descriptive: after the tested findings
    base = rel if len(rel) else raw
    if base["layer"].nunique() >= 2:
        per_layer = base.groupby("layer")["mean"].mean().sort_index()
        first, last = int(per_layer.index[0]), int(per_layer.index[-1])
        d0, d1 = float(per_layer.iloc[0]), float(per_layer.iloc[-1])
        change = (d1 - d0) / max(abs(d0), 1e-9)
        score += min(abs(change), 0.3)
        verb = "grows" if change > 0.05 else "shrinks" if change < -0.05 else None
        if len(rel):
            px = ""
            if raw["layer"].nunique() >= 2:
                rl = raw.groupby("layer")["mean"].mean()
                if first in rl.index and last in rl.index:
                    px = f" (raw distance {fmt_num(rl.loc[first], 1)} px to {fmt_num(rl.loc[last], 1)} px)"
            if verb:
                parts.append(f"Relative to uniform attention, mean attention distance (averaged over levels) "
                             f"{verb} from {fmt_num(d0)}x in layer {first} to {fmt_num(d1)}x in layer "
                             f"{last}{px}")
            else:
                parts.append(f"Relative to uniform attention, mean attention distance (averaged over levels) "
                             f"stays near {fmt_num((d0 + d1) / 2)}x from layer {first} to layer {last}{px}")
        elif verb:
            parts.append(f"Mean attention distance (averaged over levels) {verb} from {fmt_num(d0, 1)} px in "
                         f"layer {first} to {fmt_num(d1, 1)} px in layer {last}")
        else:
            parts.append(f"Mean attention distance (averaged over levels) stays near "
                         f"{fmt_num((d0 + d1) / 2, 1)} px from layer {first} to layer {last}")
    if len(rel):
        last = int(rel["layer"].max())
        lv = rel[rel["layer"] == last].set_index("level_a").sort_index()
        if len(lv) >= 2:
            hi, lo = int(lv.index.max()), int(lv.index.min())
            names = level_names(manifest, hi + 1)
            h, z = lv.loc[hi], lv.loc[lo]
            text = (f"in layer {last}, '{names[hi]}' patches attend {fmt_num(h['mean'])}x as far as uniform "
                    f"attention would ({_ci(h)}), '{names[lo]}' patches {fmt_num(z['mean'])}x ({_ci(z)})")
            null = f"({fmt_num(h['null_mean'])}x, {fmt_q(h['q'])})"
            if rule.departs(lv.loc[[hi]].reset_index()).iloc[0]:
                text += f"; for '{names[hi]}' patches that departs from the shuffled-keypoint null {null}"
            elif h["q"] < rule.alpha:
                text += (f"; for '{names[hi]}' patches that differs from the shuffled-keypoint null by less "
                         f"than {rule.min_effect:.0%} {null}")
            else:
                text += f"; for '{names[hi]}' patches that is within what shuffled keypoints give {null}"
            parts.append(text if parts else _cap(text))
    elif len(raw) and parts:
        parts.append("levels are not compared, because raw distances also reflect where the patches sit "
                     "(central patches are near everything); this summary has no relative distance "
                     "'dist_rel' to compare them with")
    e = s[(s["metric"] == "entropy") & (s["head"] < 0) & (s["layer"] < n_layers)]
    if parts and e["layer"].nunique() >= 2:
        pe = e.groupby("layer")["mean"].mean().sort_index()
        text = f"attention entropy goes from {fmt_num(pe.iloc[0])} to {fmt_num(pe.iloc[-1])} nats"
        grid = ((manifest or {}).get("model") or {}).get("grid")
        if grid:
            text += f" (uniform attention: {fmt_num(float(np.log(int(grid[0]) * int(grid[1]))))} nats)"
        parts.append(text)
    if not parts:
        return []
    return [(score, "; ".join(parts) + ".")]
