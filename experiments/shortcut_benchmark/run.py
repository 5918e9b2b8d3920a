"""The shortcut benchmark on a pre-trained encoder (issue 25): every method on the same encoder and data.

Per kind of marker (glyphs, imagenet, large, watermark; ``--markers-dir`` adds a user's), from one seed:

1. builds (``siftlens make-spurious``): the fine-tuning images are CIFAR-10 train images 2500.. of each class (the
   half the encoder never saw, ``--train-start 2500``), marked at rho = 0.95 (``shortcut``) and at rho = 0.1
   (``control``: the same images and positions, each marker independent of the class); ``holdout`` (test images
   500.., marked like train) is where the last-layer methods fit; ``aligned`` / ``conflicting`` (test images
   0..499) are where everything is scored;
2. ERM: ``siftlens train --model ENCODER`` on each train split (the shortcut model and the control);
3. siftlens, label-free: ``discover`` (its decision flags), ``prompt --policy drop`` with the flags (and grown by
   one patch), ``repair`` (a new head on the holdout images with the flagged tokens dropped, pseudo-groups from
   discovery; the repaired folder carries the drop);
   Two training-time candidates (session 12): ``repair-blocks`` (the same repair with every block fine-tuned) and
   ``jtt-discovery`` (``anchor-jtt --error-set discovery``: JTT's retraining with discovery's pseudo-conflicting
   training images upweighted in place of ERM's errors); ``--without repair-blocks,jtt-discovery`` skips them;
   ``retrain`` (session 18): ERM's fine-tuning from the encoder done again with the flagged tokens (grown by one
   patch, as repair's) never seen; the retrained folder carries the drop;
4. anchors: ``anchor-afr`` and ``anchor-dfr`` (true groups: the upper reference) on the holdout images,
   ``anchor-jtt`` (errors of the ERM model upweighted, trained again from the encoder);
5. the oracle: every patch the marker overlaps dropped (sidecar boxes), on the ERM model.

Every method runs on the shortcut build and on the control build; ``control_cost`` is the points the method loses
on the control (aligned and conflicting images together). Every step is a ``siftlens`` subprocess whose output file
marks it done, so a run resumes where it stopped. Kinds run in parallel (``--jobs``); after each kind the results
file is rewritten, so a stopped run keeps what it finished, and a pass over some kinds (``--kinds``) keeps the other
kinds an earlier pass of the same run wrote there.

    python experiments/shortcut_benchmark/run.py --encoder runs/encoder-half/model --seed 0 --scale validation
    python experiments/shortcut_benchmark/run.py --encoder runs/encoder-half/model --seed 2     # the final table
    python experiments/shortcut_benchmark/run.py --scale quick --encoder default --seed 0    # checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "experiments" / "spurious"))
from spurious import KINDS, Runner, flags, imagenet_markers  # noqa: E402
from tables import choose, method_row, results_block, targets  # noqa: E402

DATA = Path(os.environ.get("SIFTLENS_DATA", ROOT.parent / "shared" / "data"))
FULL = dict(train_start=2500, train_per_class=2500, eval_per_class=500, holdout_start=500,
            finetune=dict(epochs=2, lr=5e-4, warmup_epochs=0.2, batch_size=256),
            discover=dict(limit=5000, vocab=256, causal_top=10, causal_images=32),
            eval_limit=2000, holdout_limit=5000, jtt=dict(lambda_up=20))
# the validation builds (seed 0), smaller so that they and the final run fit one session on two CPU cores: 500
# fine-tuning images per class instead of 2,500, 1,000 images per evaluation split instead of 2,000, discovery and
# the holdout fits on 2,000 images
VALIDATION = {**FULL, "train_per_class": 500, "eval_limit": 1000, "holdout_limit": 2000,
              "discover": {**FULL["discover"], "limit": 2000}}
QUICK = dict(train_start=20, train_per_class=20, eval_per_class=10, holdout_start=10,
             finetune=dict(epochs=1, lr=5e-4, warmup_epochs=0.2, batch_size=50),
             discover=dict(limit=200, vocab=64, causal_top=3, causal_images=8),
             eval_limit=100, holdout_limit=100, jtt=dict(lambda_up=5))
SCALES = {"full": FULL, "validation": VALIDATION, "quick": QUICK}
RHO = {"shortcut": 0.95, "control": 0.1}
DROP = ["--policy", "drop", "--extent", "footprint"]
POLICIES = {"drop": DROP, "drop-dilate1": [*DROP, "--dilate", "1"]}
REPAIR = ["--groups", "discovery", "--extent", "footprint", "--dilate", "1"]
RETRAIN = ["--extent", "footprint", "--dilate", "1"]  # repair's flags
LOCK = threading.Lock()


class Kind:
    """One kind's folders and steps; ``run`` returns its block of the results."""

    def __init__(self, kind: str, a, cfg: dict, env: dict):
        self.kind, self.a, self.cfg = kind, a, cfg
        self.work = Path(a.work) / kind
        self.run_ = Runner(self.work, env, a.device)
        self.extra = [x.replace("{imagenet_markers}", str(Path(a.work) / "imagenet-markers"))
                      for x in a.kind_options[kind]]

    def sh(self, stage: str, args: list[str], done: Path, module: str = "siftlens.cli") -> Path:
        self.run_.sh(stage, [str(x) for x in args], done, module)
        return done

    def build(self) -> dict[str, Path]:
        c, seed = self.cfg, str(self.a.seed)
        common = ["make-spurious", "--cifar", self.a.cifar_root, "--seed", seed, "--no-progress", *self.extra]
        ev = self.work / "eval"
        self.sh("build", [*common, "--out", ev, "--splits", "aligned,conflicting",
                          "--limit-per-class", c["eval_per_class"]], ev / "manifest.json")
        out = {"aligned": ev / "aligned", "conflicting": ev / "conflicting"}
        for name, rho in RHO.items():
            d = self.work / f"{name}-data"
            self.sh("build", [*common, "--out", d, "--rho", rho, "--splits", "train,holdout",
                              "--train-start", c["train_start"], "--holdout-start", c["holdout_start"],
                              "--limit-per-class", c["train_per_class"]], d / "manifest.json")
            out[f"{name}/train"], out[f"{name}/holdout"] = d / "train", d / "holdout"
        return out

    def finetune(self, name: str, data: Path, extra: tuple = (), anchor: str | None = None) -> Path:
        """ERM from the encoder on ``data`` (``anchor`` None), or JTT (``anchor``: its folder, ``jtt-<build>`` or
        ``jtt-discovery-<build>``, and its step's name)."""
        out = self.work / (anchor or f"erm-{name}")
        cmd = ["anchor-jtt" if anchor else "train", "--model", self.a.encoder, "--images" if anchor
               else "--train", data, "--out", out, "--seed", self.a.seed, "--threads", self.a.threads,
               "--device", self.a.device, "--no-progress", *flags(self.cfg["finetune"]), *extra]
        return self.sh(anchor or "finetune", cmd, out / "model" / "model.safetensors").parent

    def score(self, model: Path, split: str, tag: str, d: dict[str, Path]) -> Path:
        """Plain accuracy (``before``) and the oracle drop (``after``) of ``model`` on ``split``."""
        o = self.work / "scores" / f"{tag}-{split}.json"
        self.sh("score", [str(ROOT / "experiments" / "spurious" / "spurious_eval.py"), "--model", model, "--split",
                          d[split], "--out", o, "--limit", self.cfg["eval_limit"], "--device", self.a.device], o,
                module="")
        return o

    def prompt(self, model: Path, split: str, tag: str, policy: list[str], cand: Path, d: dict[str, Path]) -> Path:
        o = self.work / "prompts" / f"{tag}-{split}"
        self.sh("prompt", ["prompt", "--model", model, "--images", d[split], "--out", o, "--candidates", cand,
                           "--limit", self.cfg["eval_limit"], "--no-progress", "--device", self.a.device, *policy],
                o / "prompting.json")
        return o / "prompting.json"

    def repair(self, step: str, name: str, erm: Path, cand: Path, d: dict[str, Path], extra: tuple = ()
               ) -> dict[str, Path]:
        """``siftlens repair`` of ``erm`` on the build's holdout images into ``<step>-<name>``, then its scores."""
        rep = self.work / f"{step}-{name}"
        self.sh(step, ["repair", "--model", erm, "--images", d[f"{name}/holdout"], "--candidates", cand, "--out", rep,
                       "--limit", self.cfg["holdout_limit"], "--device", self.a.device, "--no-progress", *REPAIR,
                       *extra], rep / "repair.json")
        return {s: self.score(rep / "model", s, f"{step}-{name}", d) for s in ("aligned", "conflicting")}

    def side(self, name: str, erm: Path, d: dict[str, Path]) -> dict[str, dict[str, Path]]:
        """Every method on one build (``shortcut`` or ``control``): method -> split -> result file."""
        dev = ["--device", self.a.device, "--no-progress"]
        disc = self.work / f"discover-{name}"
        self.sh("discover", ["discover", "--model", erm, "--images", d[f"{name}/train"], "--out", disc,
                             "--seed", self.a.seed, *dev, *flags(self.cfg["discover"])], disc / "discovery.json")
        cand = disc / "discovery.json"
        splits = ("aligned", "conflicting")
        res: dict[str, dict[str, Path]] = {"erm": {s: self.score(erm, s, f"erm-{name}", d) for s in splits}}
        res["discovery"] = {"json": cand}
        for pol, args in POLICIES.items():
            res[pol] = {s: self.prompt(erm, s, f"{name}-{pol}", args, cand, d) for s in splits}
        # the repaired folder is one artefact: it applies its drop itself (docs/spurious.md, section 2b)
        res["repair"] = self.repair("repair", name, erm, cand, d)
        if "repair-blocks" not in self.a.without:  # every block retrained, flagged tokens dropped (session 12)
            res["repair-blocks"] = self.repair("repair-blocks", name, erm, cand, d,
                                               ("--blocks", self.a.depth, "--seed", self.a.seed))
        if "jtt-discovery" not in self.a.without:  # JTT's retraining, discovery's pseudo-conflicting images upweighted
            jd = self.finetune(name, d[f"{name}/train"], ("--identifier", erm, "--error-set", "discovery",
                                                          "--candidates", cand, *flags(self.cfg["jtt"])),
                               anchor=f"jtt-discovery-{name}")
            res["jtt-discovery"] = {s: self.score(jd, s, f"jtt-discovery-{name}", d) for s in splits}
        if "retrain" not in self.a.without:  # ERM's fine-tuning again, the flagged tokens never seen (session 18)
            rt = self.work / f"retrain-{name}"
            self.sh("retrain", ["retrain", "--model", self.a.encoder, "--images", d[f"{name}/train"], "--candidates",
                                cand, "--out", rt, "--seed", self.a.seed, "--threads", self.a.threads, *dev,
                                *flags(self.cfg["finetune"]), *RETRAIN], rt / "model" / "model.safetensors")
            res["retrain"] = {s: self.score(rt / "model", s, f"retrain-{name}", d) for s in splits}
        for method in [m for m in ("afr", "dfr") if m not in self.a.without]:
            o = self.work / f"{method}-{name}"
            self.sh(method, [f"anchor-{method}", "--model", erm, "--images", d[f"{name}/holdout"], "--out", o,
                             "--limit", self.cfg["holdout_limit"], "--seed", self.a.seed, *dev],
                    o / "anchor.json")
            res[method] = {s: self.score(o / "model", s, f"{method}-{name}", d) for s in splits}
        if "jtt" not in self.a.without and (name == "shortcut" or self.a.jtt_control):
            jtt = self.finetune(name, d[f"{name}/train"], ("--identifier", erm, *flags(self.cfg["jtt"])),
                                anchor=f"jtt-{name}")
            res["jtt"] = {s: self.score(jtt, s, f"jtt-{name}", d) for s in splits}
        return res

    def run(self) -> dict:
        d = self.build()
        erm = {n: self.finetune(n, d[f"{n}/train"]) for n in RHO}
        files = {n: self.side(n, erm[n], d) for n in RHO}
        man = json.loads((self.work / "shortcut-data" / "manifest.json").read_text())
        block = results_block(files, encoder_acc=self.a.encoder_acc)
        block["build"] = {"options": self.extra, "marker_check": man["marker_check"],
                          "splits": {k: str(v.relative_to(self.work)) for k, v in d.items()}}
        block["erm_train"] = {n: json.loads((erm[n].parent / "history.json").read_text())["epochs"] for n in RHO}
        block["timing"] = self.run_.timing
        return block


def encoder_accuracy(encoder: str) -> float | None:
    """The encoder's clean CIFAR-10 test accuracy: the last epoch's ``val_acc`` of its training history."""
    hist = Path(encoder).parent / "history.json"
    if not hist.exists():
        return None
    return json.loads(hist.read_text())["epochs"][-1].get("val_acc")


def encoder_depth(encoder: str) -> int:
    """The encoder's number of blocks, from its config.json (``repair-blocks`` retrains them all)."""
    conf = Path(encoder) / "config.json"
    if not conf.exists():
        raise SystemExit(f"--encoder {encoder}: no config.json (a siftlens model folder is needed)")
    return int(json.loads(conf.read_text())["depth"])


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", required=True, help="the clean encoder: a siftlens model folder (train_encoder.sh)")
    ap.add_argument("--seed", type=int, required=True, help="build, fine-tuning and discovery seed (0: validation)")
    ap.add_argument("--scale", choices=SCALES, default="full",
                    help="full: the final table; validation: the smaller seed-0 builds methods are chosen on; "
                         "quick: tiny builds that check the pipeline end to end")
    ap.add_argument("--build-only", action="store_true", help="only write the builds (they need no encoder)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)} (and user)")
    ap.add_argument("--markers-dir", default=None,
                    help="a folder of the user's markers, <class>.png: the kind 'user' (added to --kinds)")
    ap.add_argument("--cifar", default=str(DATA / "cifar10-jpg.zip"), help="cifar10-jpg.zip or a folder")
    ap.add_argument("--imagenet", default=str(DATA / "imagenet-samples-dev.zip"), help="photos for the markers")
    ap.add_argument("--work", default=None, help="working folder (default runs/shortcut-bench-seed<seed>)")
    ap.add_argument("--out", default=None, help="results JSON (default experiments/shortcut_benchmark/results/)")
    ap.add_argument("--jobs", type=int, default=2, help="kinds run in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--validation", default=None,
                    help="the validation results: siftlens's best label-free method is chosen on them (README rule) "
                         "and marked, with the targets met, in this run's results")
    ap.add_argument("--annotate", action="store_true",
                    help="run nothing: mark the method chosen on --validation, and the targets met, in --out")
    ap.add_argument("--without", default="", type=lambda t: {x for x in t.split(",") if x},
                    help="methods not to run, comma-separated of jtt, afr, dfr, repair-blocks, jtt-discovery, retrain "
                         "(a later run without it adds them)")
    ap.add_argument("--jtt-control", action="store_true", help="also run JTT on the control (its control cost)")
    ap.add_argument("--causal-extent", choices=("center", "footprint"), default=None,
                    help="discovery's occlusion check (`discover --causal-extent`; default: the scale's, center); "
                         "study_discovery.py --study checks chose it on the validation builds")
    ap.add_argument("--causal-images", type=int, default=None,
                    help="images per checked candidate (`discover --causal-images`; default: the scale's)")
    ap.add_argument("--causal-test", choices=("occlude", "cross", "reference"), default=None,
                    help="what discovery's flags are decided on (`discover --causal-test`; default occlude); cross "
                         "also asks occlusion to lower p(class) in other classes' labelled images (session 16); "
                         "reference, that the fall exceed the same fall in the encoder (`--reference`; session 20)")
    ap.add_argument("--cross-select", choices=("random", "pulled"), default=None,
                    help="the cross-class test's images (`discover --cross-select`; default random)")
    ap.add_argument("--region-min-effect", type=float, default=None,
                    help="region words' minimum occlusion effect (`discover --region-min-effect`; default: the same "
                         "as SIFT words'); study_discovery.py --study region chose 0.1 on seeds 0 and 1 (session 16)")
    return ap.parse_args()


def main() -> None:
    a = parse()
    cfg = with_check(SCALES[a.scale], a.causal_extent, a.causal_images, a.causal_test, a.cross_select,
                     a.region_min_effect, a.encoder if a.causal_test == "reference" else None)
    tag = f"{'' if a.scale == 'full' else a.scale + '-'}seed{a.seed}"
    a.work = str(Path(a.work or ROOT / "runs" / f"shortcut-bench-{tag}").resolve())
    # the final table where issue 25 item 6 reads it; the validation and quick runs beside this script
    final = ROOT / "experiments" / "spurious" / "results.json"
    out = Path(a.out or (final if a.scale == "full" else HERE / "results" / f"benchmark-{tag}.json")).resolve()
    if a.annotate:
        return annotate(out, Path(a.validation))
    a.cifar_root = f"{a.cifar}/cifar10" if a.cifar.endswith(".zip") else a.cifar
    a.encoder_acc = encoder_accuracy(a.encoder)
    a.depth = encoder_depth(a.encoder)
    kinds = a.kinds.split(",") + (["user"] if a.markers_dir and "user" not in a.kinds.split(",") else [])
    a.kind_options = {**KINDS, "user": ["--markers", str(Path(a.markers_dir or ".").resolve())]}
    unknown = [k for k in kinds if k not in a.kind_options or (k == "user" and not a.markers_dir)]
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}: choose from {', '.join(KINDS)}, or give --markers-dir")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if "imagenet" in kinds:
        imagenet_markers(a.imagenet, Path(a.work) / "imagenet-markers", a.seed)
    results = {"benchmark": "shortcut benchmark on a pre-trained encoder (issue 25)", "seed": a.seed,
               "scale": a.scale, "encoder": str(a.encoder), "config": cfg,
               "rho": RHO, "policies": POLICIES, "repair": REPAIR, "kinds": {},
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "jobs": a.jobs,
                           "threads": a.threads, "device": a.device}}
    if a.build_only:
        for kind in kinds:
            Kind(kind, a, cfg, env).build()
        return
    results["kinds"] = earlier_kinds(out, results, kinds)
    chosen = choose(json.loads(Path(a.validation).read_text())) if a.validation else None
    results["chosen"] = chosen and {**chosen, "from": str(a.validation)}
    t0 = time.time()

    def one(kind: str) -> None:
        try:
            block = Kind(kind, a, cfg, env).run()
            if chosen:
                block["targets"] = targets(block, chosen["method"])
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one failed kind must not lose the others
            block = {"error": (str(e).splitlines() or [type(e).__name__])[0]}
        with LOCK:
            results["kinds"][kind] = block
            results["wall_seconds"] = round(time.time() - t0, 1)
            write(out, results)
        print(f"[{kind}] done: {method_row(block)}", flush=True)

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(one, kinds))
    print(f"results: {out}")


def earlier_kinds(out: Path, results: dict, kinds: list[str]) -> dict:
    """The kinds an earlier pass of the same run (seed, scale, encoder and settings) wrote to ``out`` and this pass
    does not run: a pass over some kinds keeps the others. A file of another run is refused, not overwritten."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    same = ("seed", "scale", "encoder", "config")
    diff = [k for k in same if old.get(k) != json.loads(json.dumps(results[k]))]  # as JSON holds them
    if diff:
        raise SystemExit(f"{out} holds another run (different {', '.join(diff)}): give another --out")
    kept = {k: v for k, v in old.get("kinds", {}).items() if k not in kinds}
    if kept:
        print(f"kept from {out}: {', '.join(kept)}", flush=True)
    return kept


def with_check(cfg: dict, extent: str | None, images: int | None, test: str | None = None,
               cross_select: str | None = None, region_min_effect: float | None = None,
               reference: str | None = None) -> dict:
    """The scale's settings with discovery's causal check (extent, images, decision test, cross-class images,
    region words' minimum effect, the reference test's model) overridden where given."""
    check = {k: v for k, v in (("causal_extent", extent), ("causal_images", images), ("causal_test", test),
                               ("cross_select", cross_select), ("region_min_effect", region_min_effect),
                               ("reference", reference)) if v is not None}
    return {**cfg, "discover": {**cfg["discover"], **check}} if check else cfg


def annotate(out: Path, validation: Path) -> None:
    """Mark, in the finished results ``out``, the method chosen on the validation results and the targets met."""
    if not validation.exists() or not out.exists():
        raise SystemExit(f"--annotate needs --validation and --out results: {validation}, {out}")
    results = json.loads(out.read_text())
    chosen = choose(json.loads(validation.read_text()))
    results["chosen"] = {**chosen, "from": str(validation)}
    for block in results["kinds"].values():
        if "methods" in block:
            block["targets"] = targets(block, chosen["method"])
    write(out, results)
    print(f"chosen on {validation}: {chosen['method']} ({chosen['rule']}); targets written to {out}")


def write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.part")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
