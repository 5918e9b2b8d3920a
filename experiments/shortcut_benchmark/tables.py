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
    "repair": ("repair", "after", True),
}


def _accuracies(path: Path, side: str) -> dict:
    """{"aligned"| "conflicting": overall, "worst": worst group} of one split's file."""
    acc = json.loads(Path(path).read_text())[side]
    return {"overall": acc["overall"], "worst": acc["worst_group"]["accuracy"], "n": acc["n"]}


def _method(files: dict, step: str, side: str) -> dict | None:
    if step not in files:
        return None
    return {s: _accuracies(files[step][s], side) for s in ("aligned", "conflicting")}


def _mean(acc: dict) -> float:
    return (acc["aligned"]["overall"] + acc["conflicting"]["overall"]) / 2


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
    ctl_erm = _method(files["control"], "erm", "before")
    for name, (step, side, label_free) in METHODS.items():
        sc, ctl = _method(files["shortcut"], step, side), _method(files["control"], step, side)
        if sc is None:
            continue
        methods[name] = {
            "aligned": sc["aligned"]["overall"], "conflicting": sc["conflicting"]["overall"],
            "worst_group": sc["conflicting"]["worst"],
            "control_cost": None if ctl is None else round(100 * (_mean(ctl_erm) - _mean(ctl)), 2),
            "label_free": label_free,
            "control": None if ctl is None else {"aligned": ctl["aligned"]["overall"],
                                                  "conflicting": ctl["conflicting"]["overall"]},
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
