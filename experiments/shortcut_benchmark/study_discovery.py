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

``--study reference`` (session 20) asks whether discovery should flag only what the fine-tuning taught: the
reference test (``discover --causal-test reference --reference <encoder>``) also occludes each candidate's patches in
the encoder the models were fine-tuned from, and a flag needs the fall's excess over the encoder's to pass the same
test. One discovery per model computes both tests, so the current rule (occlusion, region words at 0.1) is read off
the same candidates. Run on seeds 0 and 1 (full scale, footprint extent); the second run prints and writes the
decision over both (:func:`adopt_reference`, written before the runs):

    python experiments/shortcut_benchmark/study_discovery.py --encoder experiments/shortcut_benchmark/encoder/model \
        --study reference --scale full --causal-extent footprint --seed 0
    python experiments/shortcut_benchmark/study_discovery.py --encoder experiments/shortcut_benchmark/encoder/model \
        --study reference --scale full --causal-extent footprint --seed 1

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
# the current rule first, the candidate second (README, "The reference test"); then both without the region minimum
REFERENCE_RULES = [("occlude", 0.05, 0.1), ("reference", 0.05, 0.1), ("occlude", 0.05), ("reference", 0.05)]
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
                            "cross": f"study-cross-confirm-{side}.json", "region": f"study-region-{side}.json",
                            "reference": f"study-reference-{side}.json"}[study]
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
        elif study == "reference":  # the fine-tuned model against the encoder it was fine-tuned from
            res = discover_on(kind, erm, images, f"study-reference-{side}", causal_test="reference",
                              reference=kind.a.encoder, **extent)
            out[side] = counts_per_rule(res, sidecar, REFERENCE_RULES)
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


def adopt_reference(tables: list[dict]) -> str:
    """The session-20 rule, written before its runs: the reference test (with the region minimum) if its score summed
    over the validation seeds is at least the current rule's minus 2. The validation controls have no flag under the
    current rule, so only the test's price in marker classes can show there; 2 classes is the price set in advance,
    as for the cross test (the finals' large controls had 1 to 2 flagged classes in each of runs 5 to 7)."""
    current, candidate = (rule_name(*r) for r in REFERENCE_RULES[:2])
    total = {name: sum(score(t[name]) for t in tables) for name in (current, candidate)}
    return candidate if total[candidate] >= total[current] - 2 else current


def reference_decision(scale: str) -> dict | None:
    """The reference study's decision over seeds 0 and 1 (:func:`adopt_reference`) once both seeds' results exist."""
    prefix = "" if scale == "full" else f"{scale}-"
    files = [HERE / "results" / f"discovery-reference-{prefix}seed{s}.json" for s in (0, 1)]
    if not all(f.exists() for f in files):
        return None
    tables = [json.loads(f.read_text())["table"] for f in files]
    return {"seeds": [0, 1], "scores": {n: [score(t[n]) for t in tables] for n in tables[0]},
            "adopted": adopt_reference(tables), "files": [str(f.relative_to(ROOT)) for f in files]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--study", choices=("rules", "checks", "cross", "region", "reference"), default="rules",
                    help="rules: the decision rule (causal test, minimum effect); checks: the occlusion check (extent, "
                         "images per candidate); cross: the cross-class test on pulled images; region: a higher "
                         "minimum effect for region words; reference: the reference test against the encoder")
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
    elif a.study == "reference":
        names = [rule_name(*r) for r in REFERENCE_RULES]
        table = summary(per_kind, names, lambda side, name: side["rules"][name])
        what = "the reference test (excess over the encoder) against the current rule on validation builds (issue 25)"
    elif a.study == "rules":
        names = [rule_name(*r) for r in RULES]
        table = summary(per_kind, names, lambda side, name: side["rules"][name])
        what = "discovery's decision rule on validation builds (issue 25)"
    else:
        names = [check_name(*c) for c in CHECKS]
        table = summary(per_kind, names, lambda side, name: side[name]["rules"][rule_name("occlude", 0.05)])
        what = "discovery's occlusion check (extent, images per candidate) on validation builds (issue 25)"
    chosen = {"cross": adopt_cross, "reference": lambda t: adopt_reference([t])}.get(a.study, choose)(table)
    prefix = {"rules": "discovery-study", "checks": "discovery-checks", "cross": "discovery-cross",
              "region": "discovery-region", "reference": "discovery-reference"}[a.study]
    out = Path(a.out or HERE / "results" / f"{prefix}-{tag}.json")
    write(out, {"study": what, "seed": a.seed, "scale": a.scale, "encoder": a.encoder,
                "encoder_clean_acc": encoder_accuracy(a.encoder), "checks" if a.study == "checks" else "rules": names,
                "chosen": chosen, "table": table, "per_kind": per_kind})
    for name, per in table.items():
        print(f"{name:14s} " + "  ".join(f"{k} {v['shortcut_rank1']}/{v['control_flagged']}" for k, v in per.items()))
    print(f"chosen: {chosen}\nresults: {out}")
    if a.study == "reference" and (decision := reference_decision(a.scale)):
        write(HERE / "results" / f"discovery-reference-{'' if a.scale == 'full' else a.scale + '-'}decision.json",
              decision)
        print(f"over seeds 0 and 1: {decision['scores']}; adopted: {decision['adopted']}")


if __name__ == "__main__":
    main()
