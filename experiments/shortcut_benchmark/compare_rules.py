"""Discovery's counts under each decision rule, read off one run's saved candidates (session 16).

``discover --causal-test cross`` runs the occlusion check unchanged and adds the cross-class test, so the
occlusion-only rule can be applied to the same candidates (:func:`siftlens.shortcuts.discovery.decision.decide`).
Per kind this prints and writes, for each rule of ``--rules`` (``occlude``, ``cross``, ``region``: occlusion
with region words held to an effect of 0.1, session 16, and ``reference``: the region rule plus the excess over the
reference model, session 20, on a run with ``--causal-test reference``): on the shortcut model, the classes whose first
flagged candidate lies on the class's marker (the patch rule), and on the control, the classes with any flag.

The patch rule needs every candidate's share of patches on its marker, and discovery.json keeps it for the top 5
ranks only (``evaluation.patch_rule.on_marker``) with the best credited rank (``ranks``). A first flag ranked
above the best credited one is off the marker, one at that rank is on it, one in the top 5 is read off
``on_marker``; anything else is counted as unknown (none occurred where it is reported). For the rule the run
decided on (its test and region words' minimum), the result is checked against the run's own evaluation
(``flagged_first_on_marker``).

    python experiments/shortcut_benchmark/compare_rules.py --work runs/cf-validation-seed0-full \
        --out experiments/shortcut_benchmark/results/rules-validation-seed0-cross.json
    python experiments/shortcut_benchmark/compare_rules.py --controls runs/diag-seed5-controls/glyphs \
        runs/diag-seed5-controls/large --out experiments/shortcut_benchmark/results/cross-seed5-controls.json
    python experiments/shortcut_benchmark/compare_rules.py --work runs/shortcut-bench-seed6 --rules occlude,region \
        --out experiments/shortcut_benchmark/results/rules-seed6-region.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import write  # noqa: E402

from siftlens.shortcuts.discovery.decision import decide  # noqa: E402

KINDS = ("glyphs", "imagenet", "large", "watermark")
# name: (test, region min); reference needs a run with the reference test's columns (discover --causal-test reference)
RULES = {"occlude": ("occlude", 0.0), "cross": ("cross", 0.0), "region": ("occlude", 0.1),
         "reference": ("reference", 0.1)}


def first_flag_on_marker(cands: pd.DataFrame, patch_rule: dict) -> dict:
    """class -> True / False (first flagged candidate on / off the class's marker), None (no flag), or "unknown"."""
    out: dict = {}
    for c, rows in cands[cands["rank"].notna()].groupby("class"):
        fl = rows[rows["flagged"].astype(bool)].sort_values("rank")
        if not len(fl):
            out[c] = None
            continue
        r, best = int(fl["rank"].iloc[0]), patch_rule["ranks"].get(c)
        share = patch_rule["on_marker"].get(c, [])
        if best is not None and r <= best:
            out[c] = r == best
        elif r <= len(share):
            out[c] = share[r - 1] >= 0.5
        else:
            out[c] = False if best is None else "unknown"
    return out


def counts(folder: Path, rule: str) -> dict:
    """One discovery folder under ``rule``: flags per class and, where the patch rule was evaluated, on-marker."""
    d = json.loads((folder / "discovery.json").read_text())
    dec = d["decision"]
    cands = decide(pd.read_csv(folder / "candidates.csv"), dec["alpha"], dec["min_effect"], *RULES[rule])
    per = first_flag_on_marker(cands, d["evaluation"]["patch_rule"])
    run_rule = (dec["causal_test"], dec.get("region_min_effect", 0.0))
    if RULES[rule] == run_rule and per != d["evaluation"]["patch_rule"]["flagged_first_on_marker"]:
        raise SystemExit(f"{folder}: the counts read off the candidates differ from the run's own evaluation")
    return {"flagged_classes": sum(v is not None for v in per.values()),
            "first_on_marker": sum(v is True for v in per.values()),
            "unknown": sum(v == "unknown" for v in per.values()), "per_class": per}


def control_flags(folders: list[str], rules: list[str]) -> dict:
    """Control models only (no shortcut side): per folder and rule, the flagged candidates per class."""
    out: dict = {}
    for folder in folders:
        d = json.loads((Path(folder) / "discovery.json").read_text())
        cands = pd.read_csv(Path(folder) / "candidates.csv")
        out[folder] = {}
        for rule in rules:
            fl = decide(cands.copy(), d["decision"]["alpha"], d["decision"]["min_effect"], *RULES[rule])
            per = fl[fl["flagged"].astype(bool)].groupby("class").size().to_dict()
            out[folder][rule] = {"control_flagged": len(per), "flags_per_class": per}
            print(f"{folder}: {rule:8s} {len(per)} classes flagged {per}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="run.py's working folder (discover-shortcut, discover-control)")
    ap.add_argument("--controls", nargs="+", help="instead: discovery folders of control models only")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rules", default="occlude,cross",
                    help=f"comma-separated, of {', '.join(RULES)} (cross needs a run with the cross-class columns)")
    a = ap.parse_args()
    rules = a.rules.split(",")
    if unknown := [r for r in rules if r not in RULES]:
        raise SystemExit(f"unknown rules {unknown}: choose from {', '.join(RULES)}")
    if a.controls:
        return write(Path(a.out), {"controls": control_flags(a.controls, rules)})
    kinds = a.kinds.split(",")
    table: dict = {}
    for rule in rules:
        table[rule] = {}
        for k in kinds:
            s, c = (counts(Path(a.work) / k / f"discover-{side}", rule) for side in ("shortcut", "control"))
            table[rule][k] = {"shortcut_rank1": s["first_on_marker"], "control_flagged": c["flagged_classes"],
                              "unknown": s["unknown"], "shortcut": s["per_class"], "control": c["per_class"]}
        score = sum(v["shortcut_rank1"] - v["control_flagged"] for v in table[rule].values())
        table[rule]["score"] = score
        print(f"{rule:8s} " + "  ".join(f"{k} {table[rule][k]['shortcut_rank1']}/{table[rule][k]['control_flagged']}"
                                        for k in kinds) + f"  score {score}")
    write(Path(a.out), {"work": a.work, "rules": table})


if __name__ == "__main__":
    main()
