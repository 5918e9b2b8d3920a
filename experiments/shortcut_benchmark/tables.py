"""The results block of one kind, in the schema of issue 25 item 6, from the files the benchmark's steps wrote.

    kinds.<kind> = {"encoder_clean_acc", "discovery": {"shortcut_rank1", "control_flagged", ...},
                    "methods": {name: {"aligned", "conflicting", "worst_group", "control_cost", "label_free"}}}

Accuracies are fractions on the evaluation splits (the first images of each class of ``aligned`` and
``conflicting``); ``worst_group`` is the worst class of the conflicting split (its groups are ``class|conflicting``);
``control_cost`` is the points (x100) the method loses on the control model, over its aligned and conflicting images
together (the mean of the two, which have the same size); negative is a gain.
"""

from __future__ import annotations

import json
from pathlib import Path

# method -> (the step whose files hold it, which side of the file: the model as it is or after its intervention,
# label-free or not)
METHODS = {
    "erm": ("erm", "before", True),
    "jtt": ("jtt", "before", True),
    "afr": ("afr", "before", True),
    "dfr_groups": ("dfr", "before", False),
    "oracle_drop": ("erm", "after", False),
    "prompt_drop": ("drop", "after", True),
    "prompt_drop_dilate1": ("drop-dilate1", "after", True),
    "repair": ("repair", "before", True),  # the repaired folder as it is: it carries its drop
    "repair_blocks": ("repair-blocks", "before", True),
    "jtt_discovery": ("jtt-discovery", "before", True),
    "retrain": ("retrain", "before", True),  # the retrained folder as it is: it carries its drop
}


def _accuracies(path: Path, side: str) -> dict:
    """{"aligned"| "conflicting": overall, "worst": worst group} of one split's file."""
    acc = json.loads(Path(path).read_text())[side]
    return {"overall": acc["overall"], "worst": acc["worst_group"]["accuracy"], "n": acc["n"]}


def method_accuracies(files: dict, step: str, side: str) -> dict | None:
    """{"aligned"| "conflicting": ``_accuracies``} of one step's files (step -> split -> file); None: not run."""
    if step not in files:
        return None
    return {s: _accuracies(files[step][s], side) for s in ("aligned", "conflicting")}


def control_entry(erm: dict, method: dict | None) -> dict:
    """A method's control side: its overall accuracy per split and ``control_cost``, the points (x100) it loses
    against ``erm`` over the aligned and conflicting images together (both None: not run on the control)."""
    if method is None:
        return {"control_cost": None, "control": None}
    mean = {name: (acc["aligned"]["overall"] + acc["conflicting"]["overall"]) / 2
            for name, acc in (("erm", erm), ("method", method))}
    return {"control_cost": round(100 * (mean["erm"] - mean["method"]), 2),
            "control": {s: method[s]["overall"] for s in ("aligned", "conflicting")}}


def discovery_counts(shortcut_json: Path, control_json: Path) -> dict:
    """``shortcut_rank1``: classes (of 10) whose first flagged candidate lies on the class's marker (the patch rule);
    ``control_flagged``: classes with any flagged candidate on the control; and the per-class detail."""
    s, c = (json.loads(Path(p).read_text()) for p in (shortcut_json, control_json))
    pr = s.get("evaluation", {}).get("patch_rule", {})
    flagged_first = pr.get("flagged_first_on_marker", {})
    ctl = {k: len(v.get("candidates", [])) for k, v in ((c.get("decision") or {}).get("classes") or {}).items()}
    sc = {k: len(v.get("candidates", [])) for k, v in ((s.get("decision") or {}).get("classes") or {}).items()}
    return {"shortcut_rank1": int(sum(bool(v) for v in flagged_first.values())),
            "control_flagged": int(sum(n > 0 for n in ctl.values())),
            "shortcut_flagged": int(sum(n > 0 for n in sc.values())),
            "shortcut_marker_rank1_any": pr.get("rank1_count"),
            "flagged_first_on_marker": flagged_first, "shortcut_flags_per_class": sc, "control_flags_per_class": ctl}


def results_block(files: dict[str, dict], encoder_acc: float | None) -> dict:
    """files: build (``shortcut``, ``control``) -> step -> split -> result file (run.py's ``Kind.side``)."""
    methods = {}
    ctl_erm = method_accuracies(files["control"], "erm", "before")
    for name, (step, side, label_free) in METHODS.items():
        sc = method_accuracies(files["shortcut"], step, side)
        if sc is None:
            continue
        methods[name] = {
            "aligned": sc["aligned"]["overall"], "conflicting": sc["conflicting"]["overall"],
            "worst_group": sc["conflicting"]["worst"], "label_free": label_free,
            **control_entry(ctl_erm, method_accuracies(files["control"], step, side)),
            "images": sc["conflicting"]["n"]}
    found = discovery_counts(files["shortcut"]["discovery"]["json"], files["control"]["discovery"]["json"])
    return {"encoder_clean_acc": encoder_acc, "discovery": found, "methods": methods}


def method_row(block: dict) -> str:
    """One line per kind for the terminal."""
    if "error" in block:
        return f"FAILED: {block['error']}"
    m, d = block["methods"], block["discovery"]
    parts = [f"{k} {v['aligned']:.3f}/{v['conflicting']:.3f}/{v['worst_group']:.3f}" for k, v in m.items()]
    return (f"rank1 {d['shortcut_rank1']}/10, control flagged {d['control_flagged']}/10; "
            "aligned/conflicting/worst: " + "; ".join(parts))


SIFTLENS = ("prompt_drop", "prompt_drop_dilate1", "repair", "repair_blocks", "jtt_discovery", "retrain")


def _cheap(method: dict) -> bool:
    """The method was run on the control and cost it at most 1 point."""
    return method["control_cost"] is not None and method["control_cost"] <= 1


def choose(validation: dict) -> dict:
    """siftlens's best label-free method on the validation results (the rule of the README, fixed before they ran):
    the highest mean worst-group conflicting accuracy over the kinds among the methods whose control cost is <= 1
    point on every kind; if none qualifies, the smallest mean control cost."""
    kinds = [k for k in validation["kinds"].values() if "methods" in k]
    if not kinds:
        raise ValueError("the validation results hold no finished kind")

    def mean(method: str, key: str) -> float:
        vals = [k["methods"][method][key] for k in kinds]
        return sum(vals) / len(vals)

    ran = [m for m in SIFTLENS if all(m in k["methods"] for k in kinds)]  # a method added later: where it ran
    ok = [m for m in ran if all(_cheap(k["methods"][m]) for k in kinds)]
    if ok:
        best = max(ok, key=lambda m: mean(m, "worst_group"))
        why = "highest mean worst-group conflicting accuracy among those costing the control <= 1 point"
    else:
        best = min(ran, key=lambda m: mean(m, "control_cost"))
        why = "no method cost the control <= 1 point on every kind: the smallest mean control cost"
    return {"method": best, "rule": why, "kinds": len(kinds),
            "candidates": {m: {"worst_group": round(mean(m, "worst_group"), 4),
                               "control_cost": round(mean(m, "control_cost"), 2)} for m in ran}}


def targets(block: dict, chosen: str) -> dict:
    """Issue 25's targets for one kind, each True or False."""
    m, d = block["methods"], block["discovery"]
    erm, best, oracle = m["erm"], m[chosen], m["oracle_drop"]
    anchors = [m[a]["worst_group"] for a in ("jtt", "afr") if a in m]
    return {
        "encoder_clean_acc >= 0.70": (block["encoder_clean_acc"] or 0) >= 0.70,
        "shortcut learned (aligned - conflicting >= 0.30)": erm["aligned"] - erm["conflicting"] >= 0.30,
        "marker flagged and first for >= 9/10 classes": d["shortcut_rank1"] >= 9,
        "control: <= 1/10 classes flagged": d["control_flagged"] <= 1,
        "control: prompt drop costs <= 1 point": _cheap(m["prompt_drop"]),
        # None: not evaluated (an anchor did not run)
        f"{chosen} beats JTT and AFR on the worst group": best["worst_group"] > max(anchors) if len(anchors) == 2
        else None,
        f"{chosen} reaches >= 80% of the oracle's conflicting accuracy":
            best["conflicting"] >= 0.8 * oracle["conflicting"],
        f"{chosen} costs the control <= 1 point": _cheap(best),
    }


LABELS = {"erm": "ERM", "jtt": "JTT", "afr": "AFR", "dfr_groups": "DFR, true groups (reference)",
          "prompt_drop": "siftlens prompt: drop", "prompt_drop_dilate1": "siftlens prompt: drop, grown 1 patch",
          "repair": "siftlens repair (+ its drop)", "repair_blocks": "siftlens repair, every block (+ its drop)",
          "jtt_discovery": "siftlens JTT, discovery's error set", "oracle_drop": "oracle drop (reference)",
          "retrain": "siftlens retrain: trained again, flagged tokens never seen (+ its drop)"}


def markdown(results: dict) -> str:
    """The write-up's tables: one per kind (aligned, conflicting, worst group, control cost), discovery beneath."""
    chosen = (results.get("chosen") or {}).get("method")
    out = []
    for kind, block in results["kinds"].items():
        if "methods" not in block:
            out.append(f"**{kind}**: not finished ({block.get('error', 'no methods')}).\n")
            continue
        d, m = block["discovery"], block["methods"]
        n = next(iter(m.values()))["images"]
        enc = block["encoder_clean_acc"]
        out.append(f"**{kind}** (encoder clean accuracy {'unknown' if enc is None else format(enc, '.3f')}; {n} "
                   "images per split)\n")
        out.append("| method | label-free | aligned | conflicting | worst group | control cost (points) |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for name in LABELS:
            if name in m:
                v = m[name]
                cost = "not run" if v["control_cost"] is None else f"{v['control_cost']:+.2f}"
                mark = " (chosen on validation)" if name == chosen else ""
                mark += " (added after the run was seen)" if v.get("added") else ""
                out.append(f"| {LABELS[name]}{mark} | {'yes' if v['label_free'] else 'no'} | {v['aligned']:.3f} | "
                           f"{v['conflicting']:.3f} | {v['worst_group']:.3f} | {cost} |")
        out.append(f"\nDiscovery: marker flagged and first for {d['shortcut_rank1']}/10 classes of the shortcut model "
                   f"({d['shortcut_flagged']}/10 with any flag); control: {d['control_flagged']}/10 classes flagged.")
        if "targets" in block:
            missed = [t for t, ok in block["targets"].items() if ok is False]
            unknown = [t for t, ok in block["targets"].items() if ok is None]
            out.append("Targets missed: " + ("; ".join(missed) if missed else "none") + "."
                       + (f" Not evaluated: {'; '.join(unknown)}." if unknown else ""))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
