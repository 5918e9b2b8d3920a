"""Which causal test should discovery decide on? A study on the validation builds only (issue 25, item 2).

On the final run, discovery's decision (occlusion: q < 0.05 and effect >= 0.05) flags the marker first for too few
classes of the shortcut models and still flags some classes of the controls. This script asks, on the seed-0
builds (never the final's seed), how each decision rule does: ``--causal-test`` occlude, insert or both, at each
``--min-effect`` of :data:`MIN_EFFECTS`. Discovery runs once per model with ``--causal-test both`` (which computes
both tests); every rule is then applied to the same candidates, and the patch rule (sidecar boxes) says whether
each class's first flagged candidate lies on its marker.

The rule is chosen by :func:`choose`, written before the study ran: the largest sum over kinds of (classes with
the marker flagged first on the shortcut model) minus (classes flagged on the control); ties go to fewer control
flags, then to the rule listed first (the current default first).

Outcome (README, "Status"): the insertion test flags nothing on any validation model, so ``choose`` picks a rule
that never flags (the score counts saying nothing as break-even); it was not adopted.

``--study checks`` (session 13) asks a second question with the same score and :func:`choose`, written before it
ran: which occlusion check, with the default decision (occlude, q < 0.05, effect >= 0.05)? On the final builds the
patch rule puts the marker first for most classes, but for the large marker few of them pass the decision: a SIFT
word's keypoints sit in one or two of the marker's nine patches, so occluding them leaves the rest of the marker,
and the effects sit near 0.05 with q just above it on 32 images. The checks are ``--causal-extent`` center (the
default) or footprint (every patch the keypoints' squares touch, repair's extent) by ``--causal-images`` 32 (the
default) or 128: one discovery run per check and model, listed default first. Outcome
(``results/discovery-checks-validation-seed0.json``; flagged first / control flagged for glyphs, imagenet, large,
watermark): center x 32 0/5, 1/0, 1/1, 3/2 (score -3); center x 128 score -11; footprint x 32 3/1, 1/0, 4/3, 4/0
(score 8, chosen); footprint x 128 score -5. More images per check flag more control classes: they find the
features the controls really use.

    python experiments/shortcut_benchmark/study_discovery.py --encoder experiments/shortcut_benchmark/encoder/model
    python experiments/shortcut_benchmark/study_discovery.py --encoder experiments/shortcut_benchmark/encoder/model \
        --study checks

``--study region`` (session 16, after the cross-class test): the default rule against one where a region word also
needs an occlusion effect of at least 0.1 (``discover --region-min-effect 0.1``), on both validation seeds (0 and 1),
from one occlusion discovery per model. The rule, written before the run: adopted if its score summed over the two
seeds is strictly larger than the default's.

``--study cross`` (session 16) asks whether the cross-class test (``discover --causal-test cross``) with its
images chosen as ``--cross-select pulled`` should decide, with the same score and rule as run.py's session-16
validation (README, "The cross-class test"): adopted if its score is at least occlusion's minus 2. One discovery
per model computes both; occlusion is read off the same candidates. It runs on run.py's full-scale seed-0 folder:

    python experiments/shortcut_benchmark/study_discovery.py --encoder experiments/shortcut_benchmark/encoder/model \
        --study cross --scale full --work runs/cf-validation-seed0-full --causal-extent footprint

The builds and ERM models are run.py's (same work folder, so either script reuses the other's steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import RHO, ROOT, SCALES, Kind, encoder_accuracy, write  # noqa: E402
from spurious import KINDS  # noqa: E402

from siftlens.benchmarks.spurious_cifar_eval import evaluate_patches  # noqa: E402
from siftlens.jobs._options import JobOptions  # noqa: E402
from siftlens.jobs.shortcuts import run_discovery  # noqa: E402
from siftlens.shortcuts.discovery.config import DiscoveryConfig  # noqa: E402
from siftlens.shortcuts.discovery.decision import decide  # noqa: E402
from siftlens.shortcuts.groups import find_sidecar, read_sidecar  # noqa: E402

RULES = [(test, m) for test in ("occlude", "insert", "both") for m in (0.05, 0.02, 0.1)]
CROSS_RULES = [("occlude", 0.05), ("cross", 0.05)]
REGION_RULES = [("occlude", 0.05), ("occlude", 0.05, 0.1)]  # (test, min effect, region words' min effect)
CHECKS = [(extent, images) for extent in ("center", "footprint") for images in (32, 128)]


def check_name(extent: str, images: int) -> str:
    return f"{extent}x{images}"


def rule_name(test: str, min_effect: float, region_min_effect: float = 0.0) -> str:
    return f"{test}@{min_effect:g}" + (f"/region@{region_min_effect:g}" if region_min_effect else "")


def counts_per_rule(res, sidecar: dict, rules: list[tuple] = RULES) -> dict:
    """``rank1_any`` (classes whose best-ranked marker candidate is first: the ranking, the same for every rule) and,
    for every rule, per class whether the first flagged candidate is on the class's marker (None: no flag)."""
    pt = res.manifest["patches"]
    out: dict = {"rank1_any": None, "rules": {}}
    for rule in rules:
        test, min_effect, *region = rule
        cands = decide(res.candidates.copy(), 0.05, min_effect, test, *region)
        ev = evaluate_patches(dataclasses.replace(res, candidates=cands), sidecar, pt["size"], tuple(pt["grid"]))
        out["rank1_any"] = ev["rank1_count"]
        out["rules"][rule_name(*rule)] = ev["flagged_first_on_marker"]
    return out


def discover_on(kind: Kind, erm: Path, images: Path, folder: str, **config):
    """One discovery run (no report) on a build's training images with the benchmark's settings and ``config``."""
    c = kind.cfg["discover"]
    cfg = DiscoveryConfig(**{"vocab_size": c["vocab"], "causal_top": c["causal_top"],
                             "causal_images": c["causal_images"], **config})
    cfg.run.limit, cfg.run.seed = c["limit"], kind.a.seed
    res, _ = run_discovery(str(erm), str(images), kind.work / folder, cfg, evaluate=False,
                           options=JobOptions(report=False, progress=False))
    return res


def study_kind(kind: Kind, study: str, extent: dict | None = None) -> dict:
    """Per side (shortcut model, control): ``rules``, discovery once with both tests and every rule applied to its
    candidates; ``checks``, one discovery per check of :data:`CHECKS` under the default rule; ``cross``, discovery
    once with the cross-class test on pulled images, and occlusion alone and the cross rule applied to its
    candidates. ``extent``: ``{"causal_extent": ...}`` where given."""
    extent = extent or {}
    d = kind.build()
    out = {}
    for side in RHO:
        done = kind.work / {"rules": f"study-{side}.json", "checks": f"study-checks-{side}.json",
                            "cross": f"study-cross-confirm-{side}.json", "region": f"study-region-{side}.json"}[study]
        if done.exists():
            out[side] = json.loads(done.read_text())
            continue
        images = d[f"{side}/train"]
        erm = kind.finetune(side, images)
        sidecar = read_sidecar(find_sidecar(images))
        if study == "rules":
            res = discover_on(kind, erm, images, f"study-discover-{side}", causal_test="both")
            out[side] = counts_per_rule(res, sidecar)
        elif study == "cross":
            res = discover_on(kind, erm, images, f"study-cross-confirm-{side}", causal_test="cross",
                              cross_select="pulled", **extent)
            out[side] = counts_per_rule(res, sidecar, CROSS_RULES)
        elif study == "region":
            res = discover_on(kind, erm, images, f"study-region-{side}", **extent)
            out[side] = counts_per_rule(res, sidecar, REGION_RULES)
        else:
            out[side] = {}
            for extent, n in CHECKS:
                res = discover_on(kind, erm, images, f"study-checks-{side}-{check_name(extent, n)}",
                                  causal_extent=extent, causal_images=n)
                out[side][check_name(extent, n)] = counts_per_rule(res, sidecar, [("occlude", 0.05)])
        write(done, out[side])
        print(f"[{kind.kind}] {side}: done", flush=True)
    return out


def summary(per_kind: dict, names: list[str], per_class) -> dict:
    """name -> kind -> {shortcut_rank1, control_flagged}; ``per_class(side's result, name)``: class -> whether its
    first flagged candidate is on its marker (None: no flag)."""
    table = {}
    for name in names:
        table[name] = {k: {"shortcut_rank1": sum(bool(v) for v in per_class(b["shortcut"], name).values()),
                           "control_flagged": sum(v is not None for v in per_class(b["control"], name).values())}
                       for k, b in per_kind.items()}
    return table


def choose(table: dict) -> str:
    """The rule with the largest sum of (shortcut_rank1 - control_flagged) over kinds; ties: fewer control flags,
    then the order of :data:`RULES`."""
    def key(item):
        i, (_, per) = item
        gain = sum(v["shortcut_rank1"] - v["control_flagged"] for v in per.values())
        return (-gain, sum(v["control_flagged"] for v in per.values()), i)
    return min(enumerate(table.items()), key=key)[1][0]


def score(per: dict) -> int:
    """Sum over kinds of (classes flagged first on the marker) minus (control classes flagged)."""
    return sum(v["shortcut_rank1"] - v["control_flagged"] for v in per.values())


def adopt_cross(table: dict) -> str:
    """The session-16 rule, written before its runs: the cross rule if its score is at least occlusion's minus 2 (the
    seed-0 controls have no occlusion flag to remove; 2 classes is the price set for the finals' false flags)."""
    occl, cross = (rule_name(*r) for r in CROSS_RULES)
    return cross if score(table[cross]) >= score(table[occl]) - 2 else occl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--study", choices=("rules", "checks", "cross", "region"), default="rules",
                    help="rules: the decision rule (causal test, minimum effect); checks: the occlusion check (extent, "
                         "images per candidate); cross: the cross-class test on pulled images; region: a higher "
                         "minimum effect for region words")
    ap.add_argument("--work", default=None, help="working folder (default runs/shortcut-bench-<scale>-seed<seed>)")
    ap.add_argument("--causal-extent", choices=("center", "footprint"), default=None)
    ap.add_argument("--seed", type=int, default=0, help="the validation seed (never the final's)")
    ap.add_argument("--scale", choices=SCALES, default="validation")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.seed == 2:
        raise SystemExit("seed 2 is the final run's: study on a validation seed")
    torch.set_num_threads(a.threads)
    tag = f"{'' if a.scale == 'full' else a.scale + '-'}seed{a.seed}"
    a.work = str(Path(a.work).resolve() if a.work else ROOT / "runs" / f"shortcut-bench-{tag}")
    a.cifar = str(ROOT.parent / "shared" / "data" / "cifar10-jpg.zip")
    a.cifar_root, a.device, a.jobs = f"{a.cifar}/cifar10", "cpu", 1
    a.kind_options = KINDS
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if "imagenet" in a.kinds.split(","):
        from spurious import imagenet_markers
        imagenet_markers(str(ROOT.parent / "shared" / "data" / "imagenet-samples-dev.zip"),
                         Path(a.work) / "imagenet-markers", a.seed)
    extent = {"causal_extent": a.causal_extent} if a.causal_extent else {}
    per_kind = {k: study_kind(Kind(k, a, SCALES[a.scale], env), a.study, extent) for k in a.kinds.split(",")}
    if a.study == "cross":
        names = [rule_name(*r) for r in CROSS_RULES]
        table = summary(per_kind, names, lambda side, name: side["rules"][name])
        what = "the cross-class test (pulled images) against occlusion alone on validation builds (issue 25)"
    elif a.study == "region":
        names = [rule_name(*r) for r in REGION_RULES]
        table = summary(per_kind, names, lambda side, name: side["rules"][name])
        what = "a region words' minimum effect of 0.1 against occlusion's default on validation builds (issue 25)"
    elif a.study == "rules":
        names = [rule_name(*r) for r in RULES]
        table = summary(per_kind, names, lambda side, name: side["rules"][name])
        what = "discovery's decision rule on validation builds (issue 25)"
    else:
        names = [check_name(*c) for c in CHECKS]
        table = summary(per_kind, names, lambda side, name: side[name]["rules"][rule_name("occlude", 0.05)])
        what = "discovery's occlusion check (extent, images per candidate) on validation builds (issue 25)"
    chosen = adopt_cross(table) if a.study == "cross" else choose(table)
    prefix = {"rules": "discovery-study", "checks": "discovery-checks", "cross": "discovery-cross",
              "region": "discovery-region"}[a.study]
    out = Path(a.out or HERE / "results" / f"{prefix}-{tag}.json")
    write(out, {"study": what, "seed": a.seed, "scale": a.scale, "encoder": a.encoder,
                "encoder_clean_acc": encoder_accuracy(a.encoder), "checks" if a.study == "checks" else "rules": names,
                "chosen": chosen, "table": table, "per_kind": per_kind})
    for name, per in table.items():
        print(f"{name:14s} " + "  ".join(f"{k} {v['shortcut_rank1']}/{v['control_flagged']}" for k, v in per.items()))
    print(f"chosen: {chosen}\nresults: {out}")


if __name__ == "__main__":
    main()
