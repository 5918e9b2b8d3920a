"""Does SIFT-guided masking accelerate MAE pre-training? Random masking against each guided policy.

    python experiments/pretrain_acceleration/pretrain_acceleration.py [--quick] [--seeds 0,1,2] \
        [--policies random,sift,sift-curriculum,kamim]

Data: CIFAR-10 from ``../shared/data/cifar10-jpg.zip`` (train split for pre-training and the k-NN memory
bank, test split held out). Every policy trains the same MAE (same architecture, budget, learning-rate
schedule and seeds; every policy consumes the same random numbers, so a seed fixes the images, crops,
flips and mask noise of each step) and is evaluated after every epoch: held-out reconstruction loss
(random masks), k-NN accuracy (k = 20, cosine, DINO's weighted vote) of mean-pooled encoder features, and a
linear probe at the end.

Acceleration, per seed s: the random baseline's final k-NN accuracy is the target; E_random = the first
epoch at which random reaches it, E_policy = the first epoch at which the guided policy does; acceleration =
E_random / E_policy (> 1: the guided policy gets there sooner). A policy that never reaches the target
within the budget has acceleration < E_random / epochs, reported as such. Mean, std, min and max over seeds.

Per-step overhead: one full training step (batch assembly, keypoints moved with the crop and flip, mask,
forward, backward, AdamW) of each guided policy against random masking, timed side by side in alternating
order on the same batches; ratio = median over rounds (bench/_common.py). Target: < 3 %. Because the
machine is shared, the policy's own extra work (moving keypoints, counts, mask scores, loss weights; timed
inside the step) divided by random's step time is reported beside it: the same quantity without the noise of
the whole step. The one-time SIFT pass over the training images is reported separately (``sift_seconds``).

Augmentation agreement: on held-out images, the patch keypoint counts from the cached keypoints moved
with a random crop and flip against SIFT run on the augmented image itself (see docs/pretraining.md for
why they differ at all).

Full mode (about 3 hours on 2 cores): 10,000 training images (1,000 per class), 2,000 held-out, a ViT of
width 96 and depth 4 (patch 4, 64 tokens), decoder 128 x 2, 30 epochs of batch 256, 3 seeds, 4 policies.
Runs are resumable: an interrupted benchmark continues where it stopped (``runs/bench_pretrain/``).
``--quick`` runs a few epochs of a tiny model on 600 images to prove the pipeline end to end; its numbers
mean nothing about acceleration.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmarks' helpers: machine info, atomic JSON results
import _common as C  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SCALES = {
    "full": dict(limit=10_000, val_limit=2_000, knn_train_limit=5_000, epochs=30, batch_size=256, dim=96, depth=4,
                 heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4, lr=1e-3, warmup_epochs=3.0),
    # what fits in under two hours of one CPU core: half the images, 16 epochs of batch 128 (625 steps)
    "medium": dict(limit=5_000, val_limit=1_000, knn_train_limit=5_000, epochs=16, batch_size=128, dim=96, depth=4,
                   heads=4, decoder_dim=128, decoder_depth=2, decoder_heads=4, lr=1e-3, warmup_epochs=2.0),
    "quick": dict(limit=600, val_limit=200, knn_train_limit=600, epochs=3, batch_size=64, dim=64, depth=2, heads=4,
                  decoder_dim=64, decoder_depth=1, decoder_heads=4, lr=1e-3, warmup_epochs=1.0),
}
OVERHEAD_TARGET = 0.03


def policy_kwargs(policy: str, args) -> dict:
    return {"random": {}, "sift": {"tau": args.tau}, "sift-curriculum": {"tau_max": args.tau_max},
            "kamim": {"kamim_temp": args.kamim_temp}}[policy]


def run_one(policy: str, seed: int, scale: dict, args, runs: Path) -> dict:
    """Train (or resume, or just read) one run; returns its history."""
    import json

    from siftlens import PretrainConfig, pretrain
    from siftlens.options import build

    out = runs / f"{policy}-s{seed}"
    if (out / "history.json").exists():
        hist = json.loads((out / "history.json").read_text())
        if len(hist["epochs"]) >= scale["epochs"]:
            return hist
    pc = build(PretrainConfig, dict(val=f"{C.CIFAR_ZIP}/cifar10/test", policy=policy, seed=seed, norm_pix=True,
                                    eval_every=1, threads=args.threads, keypoint_cache=str(runs / "keypoints.npz"),
                                    resume=(out / "checkpoint.pt").exists(), **scale, **policy_kwargs(policy, args)))
    return pretrain(None, f"{C.CIFAR_ZIP}/cifar10/train", pc, progress=args.progress, out=out).record


def epochs_to_reach(recs: list[dict], target: float) -> int | None:
    for r in recs:
        if r.get("knn_acc") is not None and r["knn_acc"] >= target - 1e-12:
            return r["epoch"]
    return None


def spread(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values)}


def acceleration(hists: dict, policies: list[str], seeds: list[int], epochs: int) -> dict:
    out = {}
    for p in policies:
        if p == "random":
            continue
        per_seed = []
        for s in seeds:
            rnd, gd = hists[("random", s)]["epochs"], hists[(p, s)]["epochs"]
            target = rnd[-1]["knn_acc"]
            e_r, e_g = epochs_to_reach(rnd, target), epochs_to_reach(gd, target)
            per_seed.append({"seed": s, "target_knn_acc": target, "epochs_random": e_r, "epochs_policy": e_g,
                             "acceleration": None if e_g is None else e_r / e_g,
                             "acceleration_below": e_r / epochs if e_g is None else None,
                             "final_knn_acc_gain": gd[-1]["knn_acc"] - target,
                             "probe_acc_gain": gd[-1]["probe"]["test_acc"] - rnd[-1]["probe"]["test_acc"]})
        out[p] = {"per_seed": per_seed,
                  "acceleration": spread([r["acceleration"] for r in per_seed if r["acceleration"] is not None]),
                  "reached": f"{sum(r['acceleration'] is not None for r in per_seed)}/{len(per_seed)}",
                  "final_knn_acc_gain": spread([r["final_knn_acc_gain"] for r in per_seed]),
                  "probe_acc_gain": spread([r["probe_acc_gain"] for r in per_seed])}
    return out


def step_overhead(scale: dict, policies: list[str], args, runs: Path, rounds: int) -> dict:
    """Side-by-side timing of one whole training step per policy on the same batches."""
    import numpy as np
    import torch

    from siftlens.data import ImageSource, load_labelled_array
    from siftlens.keypoints import SiftParams
    from siftlens.models.mae import MAE, MAEConfig
    from siftlens.models.vit import ViTConfig
    from siftlens.options import build
    from siftlens.training.keypoint_bank import KeypointBank
    from siftlens.training.pretraining import PretrainConfig, batch_inputs

    n = min(scale["limit"], 4 * scale["batch_size"])
    x, _, _ = load_labelled_array(ImageSource(f"{C.CIFAR_ZIP}/cifar10/train", limit=n), (32, 32))
    bank = KeypointBank.detect(x, SiftParams(upsample=4.0))
    mean = tuple(float(v) for v in x.reshape(-1, 3).mean(0) / 255.0)
    std = tuple(float(v) for v in x.reshape(-1, 3).std(0) / 255.0)
    torch.manual_seed(0)
    model = MAE(ViTConfig(img_size=32, patch_size=4, num_classes=0, dim=scale["dim"], depth=scale["depth"],
                          heads=scale["heads"], mean=mean, std=std),
                MAEConfig(decoder_dim=scale["decoder_dim"], decoder_depth=scale["decoder_depth"],
                          decoder_heads=scale["decoder_heads"], norm_pix=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xt = torch.from_numpy(x)
    batches = [torch.from_numpy(np.random.default_rng(i).choice(n, scale["batch_size"], replace=False))
               for i in range(rounds + 1)]
    prep: dict[str, list[float]] = {p: [] for p in policies}

    def step_fn(policy: str):
        pc = build(PretrainConfig, dict(policy=policy, **policy_kwargs(policy, args)))
        it = iter(range(10**9))

        def run() -> None:
            i = next(it)
            gen = torch.Generator().manual_seed(i)
            tau = pc.masking.tau if policy == "sift" else pc.masking.tau_max / 2
            b = batch_inputs(pc, model, xt, batches[i % len(batches)], None if policy == "random" else bank, gen,
                             tau)
            prep[policy].append(b.prep_seconds)
            loss = model(b.x, b.scores, b.weights)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run

    t = C.side_by_side({p: step_fn(p) for p in policies}, rounds=rounds)
    out = {"rounds": rounds, "batch_size": scale["batch_size"], "timings": C.summary(t), "overhead": {},
           "prep_ms_median": {p: 1000 * statistics.median(v) for p, v in prep.items()}}
    step_random = statistics.median(t["random"]["wall"])
    out["prep_overhead"] = {}  # the policy's own extra work (keypoints, mask, weights) / random's step time
    for p in policies:
        if p != "random":
            out["overhead"][p] = C.ratio(t, p, "random") - 1.0
            out["prep_overhead"][p] = (statistics.median(prep[p]) - statistics.median(prep["random"])) / step_random
    return out


def augmentation_agreement(n: int, seed: int = 0) -> dict:
    """Moved cached keypoints vs SIFT on the augmented image, patch by patch (pad 4 crop + flip)."""
    import numpy as np
    import torch

    from siftlens.data import ImageSource, load_labelled_array
    from siftlens.keypoints import SiftParams, detect, weight_map
    from siftlens.training.augment import apply_augment, draw_augment
    from siftlens.training.keypoint_bank import KeypointBank, patch_counts, transform_keypoints

    x, _, _ = load_labelled_array(ImageSource(f"{C.CIFAR_ZIP}/cifar10/test", limit=n), (32, 32))
    params = SiftParams(upsample=4.0)
    bank = KeypointBank.detect(x, params)
    aug = draw_augment(len(x), 4, torch.Generator().manual_seed(seed))
    xa = apply_augment(torch.from_numpy(x).permute(0, 3, 1, 2).float(), aug, 4)
    xa = xa.permute(0, 2, 3, 1).round().byte().numpy()
    moved = patch_counts(*transform_keypoints(*bank.batch(torch.arange(len(x))), aug, 4, (32, 32)), 4, (8, 8))
    moved = moved.numpy().reshape(-1, 8, 8)
    direct = np.stack([weight_map(detect(im, params), 4, (8, 8)) for im in xa]).reshape(-1, 8, 8)
    inner = (slice(None), slice(1, 7), slice(1, 7))
    border = np.ones((8, 8), bool)
    border[1:-1, 1:-1] = False
    flip = aug.flip.numpy()
    return {"images": len(x), "patches_equal": float((moved == direct).mean()),
            "interior_patches_equal": float((moved[inner] == direct[inner]).mean()),
            "border_patches_equal": float((moved == direct)[:, border].mean()),
            "flipped_images_patches_equal": float((moved[flip] == direct[flip]).mean()),
            "unflipped_images_patches_equal": float((moved[~flip] == direct[~flip]).mean()),
            "support_equal": float(((moved > 0) == (direct > 0)).mean()),
            "correlation": float(np.corrcoef(moved.ravel(), direct.ravel())[0, 1])}


def figure(hists: dict, policies: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from siftlens.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "knn_acc", "k-NN accuracy (k = 20), CIFAR-10 test"),
                           (axes[1], "val_loss", "held-out reconstruction loss (random masks)")):
        for p in policies:
            curves = np.array([[r[key] for r in hists[(p, s)]["epochs"]] for s in seeds])
            ep = np.arange(1, curves.shape[1] + 1)
            ax.plot(ep, curves.mean(0), marker="o", ms=3, label=p)
            ax.fill_between(ep, curves.min(0), curves.max(0), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=f"mean, min-max over {len(seeds)} seeds", title_fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny run proving the pipeline end to end")
    ap.add_argument("--scale", choices=sorted(SCALES), default=None,
                    help="full (about 6 core-hours), medium (under 2 core-hours) or quick; default full")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0,1)")
    ap.add_argument("--policies", default="random,sift,sift-curriculum,kamim")
    ap.add_argument("--tau", type=float, default=1.0, help="sift: tau")
    ap.add_argument("--tau-max", type=float, default=1.0, help="sift-curriculum: final tau")
    ap.add_argument("--kamim-temp", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="overhead timing rounds (default 20; quick: 10)")
    ap.add_argument("--fresh", action="store_true", help="delete this mode's earlier runs first")
    ap.add_argument("--progress", action="store_true", help="progress bars for every run")
    args = ap.parse_args()
    C.be_nice()
    import torch

    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else (args.scale or "full")
    scale = SCALES[mode]
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    policies = args.policies.split(",")
    if "random" not in policies:
        raise SystemExit("--policies must include random, the baseline")
    runs = C.ROOT / "runs" / "bench_pretrain" / mode
    if args.fresh and runs.exists():
        shutil.rmtree(runs)
    t0 = time.time()
    hists = {}
    for s in seeds:
        for p in policies:
            t1 = time.time()
            hists[(p, s)] = h = run_one(p, s, scale, args, runs)
            last = h["epochs"][-1]
            print(f"{p:16s} seed {s}: k-NN {last['knn_acc']:.4f}  probe {last['probe']['test_acc']:.4f}  "
                  f"val loss {last['val_loss']:.4f}  ({time.time() - t1:.0f} s)", flush=True)
    acc = acceleration(hists, policies, seeds, scale["epochs"])
    overhead = step_overhead(scale, policies, args, runs, args.rounds or (10 if args.quick else 20))
    agreement = augmentation_agreement(100 if args.quick else 1000)
    checks = [C.check(f"step overhead {p} vs random", v, OVERHEAD_TARGET, "<=", "median per-round ratio - 1")
              for p, v in overhead["overhead"].items()]
    checks += [C.check(f"keypoint+mask work {p} / random step", v, OVERHEAD_TARGET, "<=", "median prep time")
               for p, v in overhead["prep_overhead"].items()]
    runs_summary = {f"{p}/seed{s}": {"final": h["epochs"][-1], "curve": [
        {k: r.get(k) for k in ("epoch", "train_loss", "val_loss", "knn_acc", "tau", "seconds", "prep_seconds")}
        for r in h["epochs"]], "sift_seconds": h.get("sift_seconds")} for (p, s), h in hists.items()}
    payload = {"mode": mode, "scale_name": mode, "scale": scale, "seeds": seeds, "policies": policies,
               "policy_params": {p: policy_kwargs(p, args) for p in policies}, "norm_pix": True,
               "acceleration": acc, "overhead": overhead, "augmentation_agreement": agreement, "checks": checks,
               "runs": runs_summary, "wall_seconds": time.time() - t0}
    path = C.write_result("pretrain_acceleration", payload, args.quick, RESULTS)
    fig = path.with_suffix(".png")
    figure(hists, policies, seeds, fig)
    print()
    for p, a in acc.items():
        sp = a["acceleration"]
        txt = (f"{sp['mean']:.2f} +- {sp['std']:.2f} (min {sp['min']:.2f}, max {sp['max']:.2f})" if sp["n"]
               else "n/a")
        print(f"acceleration {p:16s} {txt}  reached {a['reached']}  "
              f"final k-NN gain {a['final_knn_acc_gain']['mean']:+.4f}")
    print(f"augmentation agreement: {agreement['patches_equal']:.3f} of patches equal "
          f"(interior {agreement['interior_patches_equal']:.3f}), correlation {agreement['correlation']:.3f}")
    print(C.format_table(checks))
    print(f"results: {path}\nfigure:  {fig}\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
