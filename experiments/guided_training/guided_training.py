"""Does SIFT guidance make training pay at equal compute? Two studies (docs/method.md, "Guided training").

    python experiments/guided_training/guided_training.py --scale gpu --device cuda --jobs 12  # the GPU run
    python experiments/guided_training/guided_training.py --scale quick  # CPU pipeline check
    python experiments/guided_training/guided_training.py --scale gpu --analyse-only --runs DIR  # JSON from histories

Studies
- ``mae``: MAE pre-training with random masking (the baseline) against guided masking policies. The primary
  measure is the linear probe on frozen features after every epoch (k-NN and reconstruction loss beside it).
- ``token_drop``: supervised training of the default architecture on r = 0.5 of the patch tokens, kept by
  SIFT (probability ~ (w + eps)^tau) against random dropping at the same r and no dropping. Held-out top-1.
  Runs get equal token budgets: no dropping trains E epochs, r = 0.5 trains 2E.

Protocol (no tuning on the reported split)
1. Pilot, seed 0, evaluated on ``pilotval`` (training images held out of the training split; see
   bench/gpu/device_data.py): MAE tau in {-1, -0.5, 0.5, 1, 2}, --lam in {0.5, 1} with random and sift (tau 1)
   masks, the curriculum, KAMIM and the attention-guided baseline (``attmask``, tau 1 and 2); token dropping
   tau in {-1, 1, 2}.
2. Seeds 1, 2, 3 on the test split: random masking, the two best SIFT-guided pilot policies and the best
   attmask; for token dropping no dropping, random dropping and the best pilot tau. "Best" = the highest
   final pilot accuracy (probe or top-1).

Compute, the x axis of every curve
- ``tokens``: token passes through the encoder, a FLOP proxy: a token in a training step (forward and backward)
  counts 3, a token in a no-grad forward (attmask's guidance pass) counts 1. The MAE decoder is the same for
  every policy and is left out.
- ``seconds``: training seconds per epoch (evaluation excluded), plus the one-time SIFT pass for the runs that
  use keypoints, measured on the same machine in the same run. Runs share the machine (``--jobs`` lanes), so
  seconds carry the noise of whatever ran beside them; tokens do not.

Acceleration, per seed: the best baseline (highest final accuracy among the study's baselines) defines the
target, its own final accuracy; acceleration = compute the baseline needs to first reach the target / compute
the guided policy needs to first reach it (both read at evaluation epochs). A guided run that never reaches it
counts 0. Results: ``experiments/guided_training/results/guided_training[-SCALE].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks' helpers: machine info, atomic JSON results
import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MAE_ARCH = dict(dim=96, depth=4, heads=4, decoder_dim=128, decoder_depth=2, norm_pix=True, lr=1e-3)
SCALES = {
    # 20,000 training images; MAE 17 epochs of batch 128 = 2,652 steps (4.2x the previous benchmark's 625)
    "gpu": dict(limit=20_000, pilot_val=2_000, test_val=5_000, drop_test_val=10_000, knn=5_000,
                mae=dict(epochs=17, batch_size=128, warmup_epochs=2, **MAE_ARCH),
                drop=dict(epochs=12, batch_size=256, warmup_epochs=1, lr=1e-3)),
    "cpu": dict(limit=10_000, pilot_val=1_000, test_val=2_000, drop_test_val=2_000, knn=5_000,
                mae=dict(epochs=16, batch_size=128, warmup_epochs=2, **MAE_ARCH),
                drop=dict(epochs=8, batch_size=256, warmup_epochs=1, lr=1e-3)),
    "quick": dict(limit=400, pilot_val=100, test_val=100, drop_test_val=100, knn=400,
                  mae=dict(epochs=2, batch_size=64, warmup_epochs=0.5, dim=32, depth=1, heads=2, decoder_dim=32,
                           decoder_depth=1, norm_pix=True, lr=1e-3),
                  drop=dict(epochs=2, batch_size=64, warmup_epochs=0.5, lr=1e-3, dim=32, depth=1, heads=2)),
}
MAE_PILOT = {
    "sift_t-1": ["--policy", "sift", "--tau", "-1"],
    "sift_t-0.5": ["--policy", "sift", "--tau", "-0.5"],
    "sift_t0.5": ["--policy", "sift", "--tau", "0.5"],
    "sift_t1": ["--policy", "sift", "--tau", "1"],
    "sift_t2": ["--policy", "sift", "--tau", "2"],
    "random_lam0.5": ["--lam", "0.5"],
    "random_lam1": ["--lam", "1"],
    "sift_t1_lam0.5": ["--policy", "sift", "--tau", "1", "--lam", "0.5"],
    "sift_t1_lam1": ["--policy", "sift", "--tau", "1", "--lam", "1"],
    "curriculum_t1": ["--policy", "sift-curriculum", "--tau-max", "1"],
    "kamim": ["--policy", "kamim"],
    "attmask_t1": ["--policy", "attmask", "--tau", "1"],
    "attmask_t2": ["--policy", "attmask", "--tau", "2"],
}
MAE_BASELINES = {"random": []}
DROP_PILOT = {f"sift_r0.5_t{t}": ["--keep-rate", "0.5", "--keep-policy", "sift", "--keep-tau", t]
              for t in ("-1", "1", "2")}
DROP_BASELINES = {"none": [], "random_r0.5": ["--keep-rate", "0.5", "--keep-policy", "random"]}
PILOT_SEED, SEEDS = 0, (1, 2, 3)
STUDIES = {"mae": ("pretrain", MAE_PILOT, MAE_BASELINES), "token_drop": ("train", DROP_PILOT, DROP_BASELINES)}


# -- running ------------------------------------------------------------------------------------------
def keep_rate(args: list[str]) -> float:
    return float(args[args.index("--keep-rate") + 1]) if "--keep-rate" in args else 1.0


def command(study: str, policy_args: list[str], seed: int, pilot: bool, o: argparse.Namespace, out: Path) -> list[str]:
    """The ``siftlens`` command line of one run."""
    sc = SCALES[o.scale]
    cmd_name = STUDIES[study][0]
    val = f"{o.data}/cifar10/{'pilotval' if pilot else 'test'}"
    n_val = sc["pilot_val"] if pilot else (sc["test_val"] if study == "mae" else sc["drop_test_val"])
    params = dict(sc["mae"] if study == "mae" else sc["drop"])
    if study == "token_drop" and keep_rate(policy_args) < 1:  # equal token budgets
        params["epochs"] = round(params["epochs"] / keep_rate(policy_args))
    argv = [sys.executable, "-m", "siftlens.cli", cmd_name, "--train", f"{o.data}/cifar10/train", "--val", val,
            "--out", str(out), "--limit", str(sc["limit"]), "--val-limit", str(n_val), "--seed", str(seed),
            "--device", o.device, "--threads", "1", "--no-progress", "--keypoint-cache", str(o.runs / "keypoints.npz")]
    if study == "mae":
        argv += ["--knn-train-limit", str(sc["knn"])]
    for k, v in params.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return argv + policy_args


def run_one(study: str, name: str, policy_args: list[str], seed: int, pilot: bool, o: argparse.Namespace,
            deadline: float) -> str:
    """Train (or resume, or skip a finished) run; returns its status."""
    out = o.runs / study / ("pilot" if pilot else "seeds") / f"{name}-s{seed}"
    hist = out / "history.json"
    if hist.exists() and (out / ("mae" if study == "mae" else "model")).exists():
        return "done"
    if time.time() > deadline:
        return "skipped: deadline"
    argv = command(study, policy_args, seed, pilot, o, out)
    if (out / "checkpoint.pt").exists():
        argv.append("--resume")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "log.txt", "a") as log:
        log.write(" ".join(argv) + "\n")
        log.flush()
        rc = subprocess.call(argv, stdout=log, stderr=log, cwd=C.ROOT)
    status = f"rc={rc} in {time.time() - t0:.0f}s"
    print(f"[{time.strftime('%H:%M:%S')}] {study}/{name}-s{seed}{' (pilot)' if pilot else ''}: {status}", flush=True)
    return status


def sift_seconds_per_image(o: argparse.Namespace) -> float:
    """The one-time SIFT pass, timed on up to 500 training images (same machine, same run); also writes the
    keypoint cache every guided run shares when it is missing."""
    from siftlens.data import ImageSource, load_labelled_array
    from siftlens.keypoints import SiftParams, auto_upsample
    from siftlens.training.keypoint_bank import KeypointBank

    sc = SCALES[o.scale]
    x, _, _ = load_labelled_array(ImageSource(f"{o.data}/cifar10/train", limit=sc["limit"]), (32, 32))
    params = SiftParams(upsample=auto_upsample((32, 32)))
    sample = x[:: max(1, len(x) // 500)]
    t0 = time.perf_counter()
    KeypointBank.detect(sample, params)
    per_image = (time.perf_counter() - t0) / len(sample)
    cache = o.runs / "keypoints.npz"
    if not cache.exists():
        KeypointBank.detect(x, params, workers=os.cpu_count() or 1).save(cache)
    return per_image


def final_acc(hist: dict) -> float:
    e = hist["epochs"][-1]
    return e["probe"]["test_acc"] if "probe" in e else e["val_acc"]


def load_history(o: argparse.Namespace, study: str, phase: str, name: str, seed: int) -> dict | None:
    p = o.runs / study / phase / f"{name}-s{seed}" / "history.json"
    if not p.exists():
        return None
    h = json.loads(p.read_text())
    want = h["config"]["epochs"]
    return h if len(h["epochs"]) >= want else None


def choose(o: argparse.Namespace, study: str) -> dict[str, list[str]]:
    """The guided policies the seeds run, chosen on the pilot (pilotval, seed 0) alone."""
    pilot = STUDIES[study][1]
    scores = {n: final_acc(h) for n in pilot if (h := load_history(o, study, "pilot", n, PILOT_SEED))}
    if study == "token_drop":
        best = sorted(scores, key=scores.get, reverse=True)[:1]
    else:
        sift = sorted((n for n in scores if not n.startswith("attmask")), key=scores.get, reverse=True)[:2]
        att = sorted((n for n in scores if n.startswith("attmask")), key=scores.get, reverse=True)[:1]
        best = sift + att
    return {n: pilot[n] for n in best}


def run_all(o: argparse.Namespace) -> None:
    deadline = time.time() + o.budget
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=o.jobs)
    futures = []
    pending = {s: len(STUDIES[s][1]) for s in o.studies}

    def submit(study, name, args_, seed, pilot):
        fut = pool.submit(run_one, study, name, args_, seed, pilot, o, deadline)
        futures.append(fut)
        return fut

    def pilot_done(study):
        def cb(_):
            with lock:
                pending[study] -= 1
                last = pending[study] == 0
            if last:
                chosen = choose(o, study)
                print(f"{study}: pilot chose {list(chosen)}", flush=True)
                for seed in SEEDS:
                    for name, args_ in chosen.items():
                        submit(study, name, args_, seed, False)
        return cb

    for study in o.studies:  # pilots first, so the choice is made early
        for name, args_ in STUDIES[study][1].items():
            submit(study, name, args_, PILOT_SEED, True).add_done_callback(pilot_done(study))
    for seed in SEEDS:
        for study in o.studies:
            for name, args_ in STUDIES[study][2].items():
                submit(study, name, args_, seed, False)
    while True:  # callbacks add the seeds' guided runs while we wait
        time.sleep(2)
        with lock:
            if all(f.done() for f in futures) and all(v == 0 for v in pending.values()):
                break
    pool.shutdown(wait=True)


# -- analysis -----------------------------------------------------------------------------------------
def curve(hist: dict, sift_s: float) -> dict:
    """Per evaluated epoch: accuracy, cumulative token passes and seconds (the SIFT pass counted up front)."""
    cfg = hist["config"]
    tokens, seconds = 0.0, (sift_s * cfg["limit"] if uses_keypoints_cfg(cfg) else 0.0)
    out = {"epoch": [], "acc": [], "tokens": [], "seconds": [], "knn_acc": [], "val_loss": []}
    for e in hist["epochs"]:
        tokens += 3 * e["train_tokens"] + e.get("guide_tokens", 0)
        seconds += e["seconds"]
        acc = e["probe"]["test_acc"] if "probe" in e else e.get("val_acc")
        if acc is None:
            continue
        out["epoch"].append(e["epoch"])
        out["acc"].append(acc)
        out["tokens"].append(tokens)
        out["seconds"].append(seconds)
        out["knn_acc"].append(e.get("knn_acc"))
        out["val_loss"].append(e.get("val_loss"))
    return out


def uses_keypoints_cfg(cfg: dict) -> bool:
    if "policy" in cfg:  # pretrain
        return cfg["policy"] in ("sift", "sift-curriculum", "kamim") or cfg["lam"] > 0 or (
            cfg["keep_rate"] < 1 and cfg["keep_policy"] == "sift")
    return cfg["keep_rate"] < 1 and cfg["keep_policy"] == "sift"


def first_reach(c: dict, target: float, measure: str) -> float | None:
    for acc, x in zip(c["acc"], c[measure], strict=True):
        if acc >= target - 1e-12:
            return x
    return None


def spread(v: list[float]) -> dict:
    if not v:
        return {"n": 0}
    return {"n": len(v), "mean": statistics.fmean(v), "min": min(v), "max": max(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0}


def study_result(o: argparse.Namespace, study: str, sift_s: float) -> dict:
    baselines = list(STUDIES[study][2])
    phase_dir = o.runs / study / "seeds"
    names = sorted({p.name.rsplit("-s", 1)[0] for p in phase_dir.glob("*-s*")}) if phase_dir.exists() else []
    curves = {n: {s: curve(h, sift_s) for s in SEEDS if (h := load_history(o, study, "seeds", n, s))} for n in names}
    pilot = {n: final_acc(h) for n in list(STUDIES[study][1]) + baselines
             if (h := load_history(o, study, "pilot", n, PILOT_SEED))}
    guided = [n for n in names if n not in baselines]
    seeds = [s for s in SEEDS if all(s in curves.get(b, {}) for b in baselines)]
    res = {"baselines": baselines, "seeds": seeds, "pilot_final_acc": pilot, "sift_seconds_per_image": sift_s,
           "final_acc": {n: {str(s): c["acc"][-1] for s, c in curves[n].items()} for n in names},
           "curves": {n: {str(s): c for s, c in curves[n].items()} for n in names}, "acceleration": {}}
    for measure in ("tokens", "seconds"):
        per = {}
        for g in guided:
            rows = []
            for s in seeds:
                if s not in curves[g]:
                    continue
                best = max(baselines, key=lambda b: curves[b][s]["acc"][-1])
                target = curves[best][s]["acc"][-1]
                need_b = first_reach(curves[best][s], target, measure)
                need_g = first_reach(curves[g][s], target, measure)
                rows.append({"seed": s, "baseline": best, "target": target, "baseline_compute": need_b,
                             "guided_compute": need_g, "acceleration": 0.0 if need_g is None else need_b / need_g})
            per[g] = {"per_seed": rows, "acceleration": spread([r["acceleration"] for r in rows])}
        res["acceleration"][measure] = per
    ranked = sorted(guided, key=lambda g: res["acceleration"]["tokens"][g]["acceleration"].get("mean", -1),
                    reverse=True)
    if ranked:
        best = ranked[0]
        rows = res["acceleration"]["tokens"][best]["per_seed"]
        res.update({"baseline": "best of " + " / ".join(baselines) if len(baselines) > 1 else baselines[0],
                    "best_guided": best, "measure": "tokens",
                    "acceleration_per_seed": [r["acceleration"] for r in rows],
                    "acceleration_per_seed_seconds": [r["acceleration"] for r in
                                                      res["acceleration"]["seconds"][best]["per_seed"]]})
    return res


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from siftlens.io import atomic_path

    studies = [s for s in ("mae", "token_drop") if s in result["studies"]]
    fig, axes = plt.subplots(len(studies), 2, figsize=(11, 3.8 * len(studies)), squeeze=False)
    ylab = {"mae": "linear probe top-1 (test)", "token_drop": "top-1 (test)"}
    for row, study in zip(axes, studies, strict=True):
        r = result["studies"][study]
        for ax, measure, xlab in ((row[0], "tokens", "token passes (FLOP proxy)"),
                                  (row[1], "seconds", "training seconds (incl. SIFT pass)")):
            for i, (name, by_seed) in enumerate(sorted(r["curves"].items())):
                for j, c in enumerate(by_seed.values()):
                    ax.plot(c[measure], c["acc"], color=f"C{i}", alpha=0.8, lw=1.2,
                            label=name if j == 0 else None, ls="--" if name in r["baselines"] else "-")
            ax.set_xlabel(xlab)
            ax.set_ylabel(ylab[study])
            ax.set_title(f"{study}: accuracy against {measure} (one line per seed)", fontsize=10)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def step_timing(o: argparse.Namespace, rounds: int, threads: int) -> dict:
    """One supervised training step (forward, backward, AdamW) of the default architecture on a batch of 256
    CIFAR images at r = 1, r = 0.5 random and r = 0.5 sift, side by side on this machine (bench/_common.py):
    where token dropping pays in seconds, and what the sift policy's keypoint work costs."""
    import torch
    import torch.nn.functional as F

    from siftlens.data import ImageSource, load_labelled_array
    from siftlens.keypoints import SiftParams
    from siftlens.models.vit import ViT, ViTConfig
    from siftlens.options import build
    from siftlens.training.augment import apply_augment, draw_augment
    from siftlens.training.images import normalize
    from siftlens.training.keypoint_bank import KeypointBank
    from siftlens.training.supervised import TrainConfig, kept_tokens

    torch.set_num_threads(threads)
    x, y, _ = load_labelled_array(ImageSource(f"{o.data}/cifar10/train", limit=256), (32, 32))
    bank = KeypointBank.detect(x, SiftParams(upsample=4.0))
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=32, patch_size=4, num_classes=10, dim=128, depth=6, heads=4, mlp_ratio=2.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xt, yt, idx = torch.from_numpy(x), torch.from_numpy(y), torch.arange(len(x))

    def step_fn(rate: float, policy: str):
        tc = build(TrainConfig, {"keep_rate": rate, "keep_policy": policy, "keep_tau": -1.0})
        gen = torch.Generator().manual_seed(0)

        def run() -> None:
            aug = draw_augment(len(idx), 4, gen)
            xb = apply_augment(normalize(xt, model.cfg.mean, model.cfg.std), aug, 4)
            keep = kept_tokens(tc, model, bank, idx, aug, gen)
            loss = F.cross_entropy(model(xb, keep), yt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    t = C.side_by_side({"r1": step_fn(1.0, "random"), "r0.5_random": step_fn(0.5, "random"),
                        "r0.5_sift": step_fn(0.5, "sift")}, rounds=rounds)
    return {"rounds": rounds, "threads": threads, "batch": len(idx), "timings": C.summary(t),
            "step_ratio_random_over_full": C.ratio(t, "r0.5_random", "r1"),
            "step_ratio_sift_over_full": C.ratio(t, "r0.5_sift", "r1"),
            "step_ratio_sift_over_random": C.ratio(t, "r0.5_sift", "r0.5_random"), "machine": C.machine_info()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--studies", default="mae,token_drop")
    ap.add_argument("--data", default=str(C.ROOT / ".devdata" / "cifar10-sub.zip"),
                    help="zip with cifar10/{train,pilotval,test} (bench/gpu/device_data.py)")
    ap.add_argument("--runs", type=Path, default=None, help="run folder (default runs/guided/SCALE)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which no new run starts")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--results", type=Path, default=None,
                    help="JSON path (default experiments/guided_training/results/...)")
    ap.add_argument("--step-timing", type=int, default=0, metavar="ROUNDS",
                    help="only time one training step at r = 1 / 0.5 random / 0.5 sift on this machine, side by "
                         "side, for ROUNDS rounds (experiments/guided_training/results/token_drop_step.json)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for --step-timing")
    o = ap.parse_args()
    if o.step_timing:
        from siftlens.io import write_json

        res = step_timing(o, o.step_timing, o.threads)
        print(json.dumps({k: v for k, v in res.items() if k.startswith("step_ratio")}, indent=1))
        write_json(o.results or RESULTS / "token_drop_step.json", res)
        return
    o.studies = o.studies.split(",")
    o.runs = o.runs or C.ROOT / "runs" / "guided" / o.scale
    o.runs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    sift_file = o.runs / "sift_seconds_per_image.json"
    if not sift_file.exists() or not (o.runs / "keypoints.npz").exists():
        per_image = sift_seconds_per_image(o)
        if not sift_file.exists():
            sift_file.write_text(json.dumps(per_image))
    sift_s = json.loads(sift_file.read_text())
    if not o.analyse_only:
        run_all(o)
    suffix = "" if o.scale == "gpu" else f"-{o.scale}"
    result = {"benchmark": "guided_training", "scale": o.scale, "config": SCALES[o.scale], "device": o.device,
              "jobs": o.jobs, "machine": C.machine_info(), "wall_seconds": time.time() - t0,
              "studies": {s: study_result(o, s, sift_s) for s in o.studies}}
    try:
        import torch

        if o.device.startswith("cuda") and torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    path = o.results or RESULTS / f"guided_training{suffix}.json"
    from siftlens.io import write_json

    write_json(path, result)
    figure(result, path.with_suffix(".png"))
    for s, r in result["studies"].items():
        print(s, "best guided:", r.get("best_guided"), "acceleration per seed (tokens):",
              r.get("acceleration_per_seed"), "(seconds):", r.get("acceleration_per_seed_seconds"))


if __name__ == "__main__":
    main()
