"""The MAE pre-training loop with a choice of masking policy (in the spirit of MAE's engine_pretrain.py).

Images are decoded once into memory; SIFT runs once on the originals (cached in ``keypoints.npz``).
Each step draws one crop + flip per image and the mask noise from the epoch's generator (seeded by
``(seed, epoch)``, so ``--resume`` repeats an uninterrupted run exactly), moves the cached keypoints
with the crop and flip, and lets the policy turn noise and keypoint counts into the mask. Every policy
consumes the same random numbers, so runs that differ only in the policy see the same images, crops,
flips and noise. Under ``torchrun`` each rank takes its slice of every batch (DistributedDataParallel:
gloo on CPU, NCCL on GPU); only rank 0 evaluates and writes files.

Outputs in ``out/``: ``checkpoint.pt`` (every epoch), ``history.json``, ``curves.png``, ``encoder/`` (a
siftlens ViT), ``mae/`` (encoder + decoder), ``keypoints.npz`` (guided policies).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError
from ..io import write_json
from ..models.mae import MAE, MAEConfig, save_mae
from ..models.vit import ViTConfig, save_vit
from ..progress import progress_bar
from ..training.augment import apply_augment, draw_augment
from ..training.guidance import augmented_counts, check_keep, guided_scores, keep_count
from ..training.images import Labelled, channel_stats, load_train_val, normalize
from ..training.keypoints import KeypointBank, cached_keypoints
from ..training.loop import Loop, Run, end_run, epoch_range, start_run
from ..training.optim import Schedule, adamw
from .evaluate import extract_features, knn_accuracy, linear_probe
from .masking import (
    attention_weights,
    check_policy,
    kamim_density,
    kamim_weights,
    keypoint_loss_weights,
    mask_scores,
    needs_keypoints,
    tau_at,
)
from .plots import plot_curves


@dataclass
class PretrainConfig:
    train: str
    val: str | None = None
    out: str = "runs/pretrain"
    img_size: int = 32
    patch_size: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    num_registers: int = 0
    feature: str = "mean"  # encoder features for k-NN / probe: "mean" patch token or "cls"
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mask_ratio: float = 0.75
    norm_pix: bool = False
    loss: str = "mse"
    policy: str = "random"
    tau: float = 1.0
    tau_max: float = 1.0
    eps: float = 1.0
    lam: float = 0.0
    kamim_temp: float = 0.25
    keep_rate: float = 1.0  # token dropping: the encoder sees this share of the visible patches
    keep_policy: str = "random"
    keep_tau: float = 1.0
    keep_eps: float = 1.0
    upsample: float = 0.0  # SIFT upsampling; 0 = automatic (128 / shorter side, at least 1)
    keypoint_cache: str | None = None  # default out/keypoints.npz
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    pad: int = 4
    eval_every: int = 1
    knn_k: int = 20
    knn_temp: float = 0.07
    knn_train_limit: int | None = 5000  # training images in the k-NN memory bank / probe training set
    probe: bool = True
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    limit: int | None = None
    val_limit: int | None = None
    progress: bool = True
    resume: bool = False
    stop_after: int | None = None


def build_mae(pc: PretrainConfig, data: Labelled) -> MAE:
    """The MAE of ``pc``, normalising by ``data``'s channel statistics, initialised from ``pc.seed``."""
    mean, std = channel_stats(data.x)
    enc = ViTConfig(img_size=(pc.img_size, pc.img_size), patch_size=pc.patch_size, num_classes=0, dim=pc.dim,
                    depth=pc.depth, heads=pc.heads, mlp_ratio=pc.mlp_ratio, num_registers=pc.num_registers,
                    pool=pc.feature, mean=mean, std=std, class_names=data.classes)
    dec = MAEConfig(decoder_dim=pc.decoder_dim, decoder_depth=pc.decoder_depth, decoder_heads=pc.decoder_heads,
                    mask_ratio=pc.mask_ratio, norm_pix=pc.norm_pix, loss=pc.loss)
    torch.manual_seed(pc.seed)
    return MAE(enc, dec).to(pc.device)


@dataclass
class Batch:
    """One MAE batch: augmented pixels ``x`` (B, C, H, W), mask ``scores`` (B, N), loss ``weights`` (B, N)
    or None, token-dropping ``keep_scores`` (B, N) or None, the seconds spent on guidance (keypoints,
    attention, scores; CPU timing) and the tokens its guidance forward processed (attmask)."""

    x: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor | None
    keep_scores: torch.Tensor | None
    prep_seconds: float
    guide_tokens: int


def needs_bank(pc: PretrainConfig) -> bool:
    """Whether the run needs SIFT keypoints: a keypoint policy, loss weights, or sift token dropping."""
    return needs_keypoints(pc.policy, pc.lam) or (pc.keep_rate < 1 and pc.keep_policy == "sift")


def batch_inputs(pc: PretrainConfig, model: MAE, x_u8: torch.Tensor, idx: torch.Tensor, bank: KeypointBank | None,
                 gen: torch.Generator, tau: float) -> Batch:
    """One batch of images ``idx`` (B,) from all training images ``x_u8`` (M, H, W, 3) uint8, normalised with
    the encoder's own mean and std. Draws, in order: crop and flip, mask noise, and (token dropping only)
    keep noise, so r = 1 consumes exactly the random numbers it always did."""
    cfg, enc = model.encoder.cfg, model.encoder
    xb = normalize(x_u8[idx].to(pc.device), cfg.mean, cfg.std)
    aug = draw_augment(len(idx), pc.pad, gen)
    xb = apply_augment(xb, aug, pc.pad)
    u = torch.rand(len(idx), model.num_patches, generator=gen).to(pc.device)
    u_keep = torch.rand(len(idx), model.num_patches, generator=gen).to(pc.device) if pc.keep_rate < 1 else None
    t0 = time.perf_counter()
    kxy = valid = counts = weights = guide = None
    if bank is not None:
        kxy, valid, counts = augmented_counts(bank, idx, aug, pc.pad, cfg.img_size, enc.patch_size, enc.grid_size,
                                              pc.device)
    if pc.policy == "kamim":
        dens = kamim_density(kxy, valid, cfg.img_size, enc.patch_size, max(1, round(bank.params.upsample)))
        weights = kamim_weights(dens, pc.kamim_temp)
    elif pc.lam > 0:
        weights = keypoint_loss_weights(counts, pc.lam)
    if pc.policy == "attmask":
        guide = attention_weights(enc, xb)
    scores = mask_scores(pc.policy, u, guide if pc.policy == "attmask" else counts, tau, pc.eps)
    keep_scores = None
    if u_keep is not None:
        keep_scores = u_keep if pc.keep_policy == "random" else guided_scores(u_keep, counts, pc.keep_tau,
                                                                                 pc.keep_eps)
    guide_tokens = len(idx) * (model.num_patches + enc.num_prefix_tokens) if guide is not None else 0
    return Batch(xb, scores, weights, keep_scores, time.perf_counter() - t0, guide_tokens)


def train_one_epoch(loop: Loop, x_u8: torch.Tensor, bank: KeypointBank | None, pc: PretrainConfig, epoch: int,
                    tick: Callable[[str], None]) -> dict:
    """One epoch of MAE steps with ``pc.policy``'s masks; returns its record, with the encoder tokens it
    trained on (``train_tokens``, forward + backward) and those its guidance forward processed
    (``guide_tokens``, attmask)."""
    t0, prep, loss_sum = time.time(), 0.0, 0.0
    model = loop.model
    loop.model.train()
    gen, batches = loop.epoch_batches(epoch, len(x_u8))
    n_encode = keep_count(pc.keep_rate, model.num_keep)
    train_tokens = guide_tokens = 0
    for s, (step, idx) in enumerate(batches):
        loop.set_lr(step)
        tau = tau_at(pc.policy, step, loop.sched.total, pc.tau, pc.tau_max)
        b = batch_inputs(pc, model, x_u8, idx, bank, gen, tau)
        prep += b.prep_seconds
        guide_tokens += b.guide_tokens
        train_tokens += len(idx) * (n_encode + model.encoder.num_prefix_tokens)
        xb, scores, weights, keep_scores = loop.run.shard(b.x, b.scores, b.weights, b.keep_scores)
        with loop.autocast():
            loss = loop.ddp(xb, scores, weights, keep_scores, n_encode)[0]
        loop.step(loss)
        loss_sum += float(loss.detach())
        tick(f"ep {epoch + 1}/{pc.epochs} loss {loss_sum / (s + 1):.4f}")
    steps = loop.sched.steps_per_epoch
    return {"epoch": epoch + 1, "train_loss": loss_sum / steps, "lr": loop.lr, "tau": tau,
            "seconds": time.time() - t0, "prep_seconds": prep, "steps": steps, "train_tokens": train_tokens,
            "guide_tokens": guide_tokens}


def eval_data(pc: PretrainConfig, tr: Labelled, va: Labelled) -> dict:
    """What evaluation needs: held-out images and labels, and an evenly spaced subset of at most
    ``pc.knn_train_limit`` training images for the k-NN memory bank and the probe's training set."""
    m = len(tr.x)
    kn = np.unique(np.linspace(0, m - 1, min(pc.knn_train_limit or m, m)).astype(int))
    return {"xva": va.x, "yva": torch.from_numpy(va.y), "xkn": tr.x[kn], "ykn": torch.from_numpy(tr.y[kn]),
            "classes": len(tr.classes)}


@torch.no_grad()
def evaluate(pc: PretrainConfig, model: MAE, data: dict) -> dict:
    """Held-out reconstruction loss (random masks, fixed seed, unweighted) and k-NN accuracy."""
    model.eval()
    cfg = model.encoder.cfg
    gen = torch.Generator().manual_seed(pc.seed * 100_003 + 99_991)
    loss_sum, n = 0.0, 0
    for i in range(0, len(data["xva"]), 256):
        xb = normalize(torch.from_numpy(data["xva"][i : i + 256]).to(pc.device), cfg.mean, cfg.std)
        u = torch.rand(len(xb), model.num_patches, generator=gen).to(pc.device)
        loss_sum += float(model(xb, u)[0]) * len(xb)
        n += len(xb)
    ftr = extract_features(model.encoder, data["xkn"], pc.device)
    fva = extract_features(model.encoder, data["xva"], pc.device)
    acc = knn_accuracy(ftr, data["ykn"], fva, data["yva"], data["classes"], pc.knn_k, pc.knn_temp)
    model.train()
    return {"val_loss": loss_sum / max(n, 1), "knn_acc": acc, "_features": (ftr, fva)}


def evaluate_epoch(pc: PretrainConfig, model: MAE, data: dict) -> dict:
    """:func:`evaluate`, plus the linear probe (the primary MAE measure), and the seconds it all took."""
    t0 = time.time()
    ev = evaluate(pc, model, data)
    ftr, fva = ev.pop("_features")
    if pc.probe:
        ev["probe"] = linear_probe(ftr, data["ykn"], fva, data["yva"], data["classes"])
    ev["eval_seconds"] = time.time() - t0
    return ev


def _save(pc: PretrainConfig, run: Run, model: MAE, history: dict) -> None:
    if run.is_main and history["epochs"]:
        plot_curves({pc.policy: history["epochs"]}, run.out / "curves.png")
        if len(history["epochs"]) >= pc.epochs:
            save_vit(model.encoder.cpu().eval(), run.out / "encoder", extra={"pretrain": history["epochs"][-1]})
            save_mae(model.cpu().eval(), run.out / "mae")
    if os.environ.get("SIFTLENS_RANK_WEIGHTS"):  # debugging / tests: every rank writes its own weights
        from safetensors.torch import save_file

        run.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(run.out / f"rank{run.dist.rank}.safetensors"))


def pretrain(pc: PretrainConfig) -> dict:
    """Pre-train an MAE with masking policy ``pc.policy``; returns the history (also ``out/history.json``)."""
    check_policy(pc.policy, pc.eps, pc.lam)
    check_keep(pc.keep_rate, pc.keep_policy, pc.keep_eps)
    if pc.feature not in ("mean", "cls"):
        raise ConfigError(f"--feature must be 'mean' or 'cls', not {pc.feature!r}")
    run = start_run(pc.device, pc.out, pc.resume, pc.threads, pc.batch_size)
    pc = replace(pc, device=run.device)
    with progress_bar(pc.progress and run.is_main) as pb:
        tr, va = load_train_val(pc.train, pc.val, (pc.img_size, pc.img_size), (pc.limit, pc.val_limit), pb)
        cache = pc.keypoint_cache or run.out / "keypoints.npz"
        bank, sift_seconds = (cached_keypoints(tr.x, pc.upsample, cache, run.dist, pb) if needs_bank(pc)
                              else (None, 0.0))
    model = build_mae(pc, tr)
    sched = Schedule.for_data(len(tr.x), pc.batch_size, pc.epochs, pc.warmup_epochs, pc.lr, pc.min_lr)
    loop = Loop(run, model, adamw(model, pc.lr, pc.weight_decay, betas=(0.9, 0.95)), sched, pc.seed)
    history = {"config": asdict(pc), "encoder": asdict(model.encoder.cfg), "mae": asdict(model.cfg), "epochs": [],
               "skipped": tr.skipped + (va.skipped if va is not None else []), "sift_seconds": sift_seconds,
               "world_size": run.dist.world}
    history, start = loop.resume(history, pc.resume)
    data = eval_data(pc, tr, va) if va is not None else None
    x_u8 = torch.from_numpy(tr.x)
    with progress_bar(pc.progress and run.is_main) as pb:
        tick = loop.ticker(pb, "pretrain", start)
        for epoch in epoch_range(start, pc.epochs, pc.stop_after):
            rec = train_one_epoch(loop, x_u8, bank, pc, epoch, tick)
            last = epoch + 1 == pc.epochs
            if run.is_main and data is not None and ((epoch + 1) % pc.eval_every == 0 or last):
                rec.update(evaluate_epoch(pc, model, data))
            loop.end_epoch(epoch, rec, history)
            if run.is_main:
                write_json(run.out / "history.json", history)
    _save(pc, run, model, history)
    end_run(run)
    return history
