"""JTT's control cost for a finished full-scale run whose working folder is gone (``run.py --jtt-control`` resumes
one that is not).

For each kind, ``run.py``'s own steps with the run's seed rebuild the control's build, its ERM model and JTT's
retraining (identifier: that ERM model), and score both on the aligned and conflicting splits. The rebuilt ERM
control must equal the run's (``methods.erm.control`` in its results, to the printed digit), else nothing is written;
then ``methods.jtt`` of each kind gains ``control``, ``control_cost`` and ``control_from``, written atomically.
About 2,000 s per kind on one core (JTT retrains on ERM's errors repeated 20 times); steps resume like ``run.py``'s,
so ``--work`` set to the run's own working folder, where it survives, reuses its build and ERM control.
``--kinds`` (default: the kinds whose JTT has no control cost yet); ``--threads`` as the run's (the rebuilt ERM
control is compared with the run's, and torch's sums depend on the thread count).

    python experiments/shortcut_benchmark/jtt_control.py --encoder experiments/shortcut_benchmark/encoder/model \\
        --results experiments/shortcut_benchmark/results/final-seed5-run5.json
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import run
from tables import control_entry, method_accuracies


def control_scores(kind: str, a: argparse.Namespace, cfg: dict, env: dict) -> dict[str, dict]:
    """ERM's and JTT's accuracies on the control model: {"erm"|"jtt": ``tables.method_accuracies``}."""
    k = run.Kind(kind, a, cfg, env)
    d = k.build()
    erm = k.finetune("control", d["control/train"])
    jtt = k.finetune("control", d["control/train"], ("--identifier", erm, *run.flags(cfg["jtt"])),
                     anchor="jtt-control")
    files = {m: {s: k.score(model, s, f"{m}-control", d) for s in ("aligned", "conflicting")}
             for m, model in (("erm", erm), ("jtt", jtt))}
    return {m: method_accuracies(files, m, "before") for m in files}


def fill(results: dict, scores: dict[str, dict], source: str) -> None:
    """Add JTT's control accuracy and cost to ``results``; refuses when a rebuilt ERM control differs from the run's."""
    for kind, acc in scores.items():
        methods = results["kinds"][kind]["methods"]
        rebuilt = control_entry(acc["erm"], acc["erm"])["control"]
        if rebuilt != methods["erm"]["control"]:
            raise SystemExit(f"{kind}: the rebuilt ERM control {rebuilt} is not the run's "
                             f"{methods['erm']['control']}: nothing written")
        methods["jtt"].update(**control_entry(acc["erm"], acc["jtt"]), control_from=source)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="the run's encoder (a siftlens model folder)")
    ap.add_argument("--results", required=True, help="the finished run's results JSON (full scale)")
    ap.add_argument("--work", default=None, help="working folder (default runs/jtt-control-seed<seed>)")
    ap.add_argument("--jobs", type=int, default=2, help="kinds run in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--kinds", default=None, help="comma-separated kinds (default: those whose JTT has no control "
                                                  "cost yet)")
    args = ap.parse_args()
    out = Path(args.results)
    results = json.loads(out.read_text())
    if results.get("scale") != "full":
        raise SystemExit(f"{out}: a full-scale run's results are needed, not {results.get('scale')!r}")
    seed, extent = results["seed"], results["config"]["discover"].get("causal_extent")
    work = Path(args.work or run.ROOT / "runs" / f"jtt-control-seed{seed}").resolve()
    a = argparse.Namespace(encoder=args.encoder, seed=seed, threads=args.threads, device="cpu", without=set(),
                           work=str(work), cifar=str(run.DATA / "cifar10-jpg.zip"),
                           imagenet=str(run.DATA / "imagenet-samples-dev.zip"))
    a.cifar_root, a.kind_options = f"{a.cifar}/cifar10", dict(run.KINDS)
    cfg = run.with_check(run.SCALES["full"], extent, None)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(run.ROOT / "src")}
    kinds = args.kinds.split(",") if args.kinds else [
        k for k, v in results["kinds"].items() if k in run.KINDS and v["methods"]["jtt"].get("control") is None]
    unknown = [k for k in kinds if k not in results["kinds"] or k not in run.KINDS]
    if unknown:
        raise SystemExit(f"{out} has no results for kinds {unknown}")
    if "imagenet" in kinds:
        run.imagenet_markers(a.imagenet, Path(a.work) / "imagenet-markers", seed)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        scores = dict(zip(kinds, pool.map(lambda k: control_scores(k, a, cfg, env), kinds), strict=True))
    fill(results, scores, f"jtt_control.py in {work.name}/: JTT on the control with run.py's steps and seed {seed}; "
                          f"the ERM control it retrains from scores as the run's")
    run.write(out, results)
    print(json.dumps({k: v["methods"]["jtt"]["control_cost"] for k, v in results["kinds"].items()}))


if __name__ == "__main__":
    main()
