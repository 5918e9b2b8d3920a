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

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import ImageSource, load_labelled_array
from ..errors import ConfigError
from ..io import atomic_path, write_json
from ..keypoints import SiftParams
from ..models.mae import MAE, MAEConfig, save_mae
from ..models.vit import ViTConfig, save_vit
from ..progress import progress_bar
from ..train import lr_at, normalize
from .augment import KeypointBank, apply_augment, draw_augment, patch_counts, transform_keypoints
from .evaluate import extract_features, knn_accuracy, linear_probe
from .masking import (
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


def _load(spec: str, limit: int | None, size: tuple[int, int], pb, what: str):
    src = ImageSource(spec, limit=limit)
    if src.classes is None:
        raise ConfigError(f"{spec} is not in ImageFolder layout (root/<class>/<image>)")
    task = pb.add_task(f"decode {what}", total=len(src), info="")
    x, y, skipped = load_labelled_array(src, size, progress=lambda n: pb.advance(task, n))
    return src.classes, x, y, skipped


def _keypoints(pc: PretrainConfig, x: np.ndarray, rank: int, world: int, pb) -> tuple[KeypointBank, float]:
    """SIFT on every cached original once (rank 0; other ranks wait and read the cache)."""
    u = pc.upsample or float(max(1.0, 128.0 / pc.img_size))
    params = SiftParams(upsample=u)
    path = Path(pc.keypoint_cache or Path(pc.out) / "keypoints.npz")
    t0 = time.time()
    if rank == 0 and not path.exists():
        task = pb.add_task("SIFT", total=len(x), info=f"u = {u:g}")
        KeypointBank.detect(x, params, progress=lambda n: pb.advance(task, n)).save(path)
    if world > 1:
        torch.distributed.barrier()
    return KeypointBank.load(path, params, x), time.time() - t0


def batch_inputs(pc: PretrainConfig, model: MAE, x_u8: torch.Tensor, idx: torch.Tensor, bank: KeypointBank | None,
                 gen: torch.Generator, tau: float, mean, std):
    """One batch: augmented pixels (B, C, H, W), mask scores (B, N), loss weights (B, N) or None, and the
    seconds spent on keypoints and masking (the policy's overhead over plain random masking; CPU timing)."""
    H, W = model.encoder.cfg.img_size
    xb = normalize(x_u8[idx].to(pc.device), mean, std)
    aug = draw_augment(len(idx), pc.pad, gen)
    xb = apply_augment(xb, aug, pc.pad)
    u = torch.rand(len(idx), model.num_patches, generator=gen).to(pc.device)
    t0 = time.perf_counter()
    counts = weights = None
    if bank is not None:
        kxy, valid = bank.batch(idx, pc.device)
        kxy, valid = transform_keypoints(kxy, valid, aug, pc.pad, (H, W))
        counts = patch_counts(kxy, valid, model.encoder.patch_size, model.encoder.grid_size)
        if pc.policy == "kamim":
            dens = kamim_density(kxy, valid, (H, W), model.encoder.patch_size, max(1, round(bank.params.upsample)))
            weights = kamim_weights(dens, pc.kamim_temp)
        elif pc.lam > 0:
            weights = keypoint_loss_weights(counts, pc.lam)
    scores = mask_scores(pc.policy, u, counts, tau, pc.eps)
    return xb, scores, weights, time.perf_counter() - t0


@torch.no_grad()
def evaluate(pc: PretrainConfig, model: MAE, data: dict, classes: int) -> dict:
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
    acc = knn_accuracy(ftr, data["ykn"], fva, data["yva"], classes, pc.knn_k, pc.knn_temp)
    model.train()
    return {"val_loss": loss_sum / max(n, 1), "knn_acc": acc, "_features": (ftr, fva)}


def pretrain(pc: PretrainConfig) -> dict:
    """Pre-train an MAE with masking policy ``pc.policy``; returns the history (also ``out/history.json``)."""
    check_policy(pc.policy, pc.eps, pc.lam)
    if pc.feature not in ("mean", "cls"):
        raise ConfigError(f"--feature must be 'mean' or 'cls', not {pc.feature!r}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if pc.batch_size % world:
        raise ConfigError(f"--batch-size {pc.batch_size} must be divisible by the {world} processes")
    if world > 1:
        torch.distributed.init_process_group("nccl" if pc.device.startswith("cuda") else "gloo")
        if pc.device.startswith("cuda"):
            pc.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(pc.device)
    if pc.threads:
        torch.set_num_threads(pc.threads)
    out, is_main = Path(pc.out), rank == 0
    size = (pc.img_size, pc.img_size)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not pc.resume:
        raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose a new --out")
    with progress_bar(pc.progress and is_main) as pb:
        classes, xtr, ytr, skipped = _load(pc.train, pc.limit, size, pb, "train")
        data = {}
        if pc.val:
            vclasses, data["xva"], yva, vskipped = _load(pc.val, pc.val_limit, size, pb, "val")
            if vclasses != classes:
                raise ConfigError(f"class folders of {pc.val} differ from those of {pc.train}")
            kn = np.unique(np.linspace(0, len(xtr) - 1, min(pc.knn_train_limit or len(xtr), len(xtr))).astype(int))
            data.update(yva=torch.from_numpy(yva), xkn=xtr[kn], ykn=torch.from_numpy(ytr[kn]))
            skipped += vskipped
        bank, sift_seconds = (_keypoints(pc, xtr, rank, world, pb) if needs_keypoints(pc.policy, pc.lam)
                              else (None, 0.0))
    mean = tuple(float(m) for m in (xtr.reshape(-1, 3).mean(0) / 255.0))
    std = tuple(float(s) for s in (xtr.reshape(-1, 3).std(0) / 255.0))
    enc_cfg = ViTConfig(img_size=size, patch_size=pc.patch_size, num_classes=0, dim=pc.dim, depth=pc.depth,
                        heads=pc.heads, mlp_ratio=pc.mlp_ratio, num_registers=pc.num_registers, pool=pc.feature,
                        mean=mean, std=std, class_names=list(classes))
    mae_cfg = MAEConfig(decoder_dim=pc.decoder_dim, decoder_depth=pc.decoder_depth, decoder_heads=pc.decoder_heads,
                        mask_ratio=pc.mask_ratio, norm_pix=pc.norm_pix, loss=pc.loss)
    torch.manual_seed(pc.seed)
    model = MAE(enc_cfg, mae_cfg).to(pc.device)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    def decays(n: str, p: torch.Tensor) -> bool:  # no decay on biases, norms, positions, tokens, registers
        return p.ndim >= 2 and not any(k in n for k in ("pos", "token", "registers"))

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=pc.lr, betas=(0.9, 0.95))
    steps_per_epoch = len(xtr) // pc.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {pc.batch_size} exceeds the {len(xtr)} training images")
    total = steps_per_epoch * pc.epochs
    warmup = int(pc.warmup_epochs * steps_per_epoch)
    history = {"config": asdict(pc), "encoder": asdict(enc_cfg), "mae": asdict(mae_cfg), "epochs": [],
               "skipped": skipped, "sift_seconds": sift_seconds, "world_size": world}
    start_epoch = 0
    if pc.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=pc.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        history, start_epoch = ck["history"], ck["epoch"] + 1
    use_amp = pc.device.startswith("cuda")
    xtr_t = torch.from_numpy(xtr)
    with progress_bar(pc.progress and is_main) as pb:
        task = pb.add_task("pretrain", total=total, completed=start_epoch * steps_per_epoch, info="")
        end_epoch = pc.epochs if pc.stop_after is None else min(pc.epochs, start_epoch + pc.stop_after)
        for epoch in range(start_epoch, end_epoch):
            t0, prep, loss_sum = time.time(), 0.0, 0.0
            model.train()
            gen = torch.Generator().manual_seed(pc.seed * 100_003 + epoch)
            order = torch.randperm(len(xtr), generator=gen)
            for s in range(steps_per_epoch):
                step = epoch * steps_per_epoch + s
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warmup, pc.lr, pc.min_lr)
                tau = tau_at(pc.policy, step, total, pc.tau, pc.tau_max)
                idx = order[s * pc.batch_size : (s + 1) * pc.batch_size]
                xb, scores, weights, dt = batch_inputs(pc, model, xtr_t, idx, bank, gen, tau, mean, std)
                prep += dt
                if world > 1:  # every rank drew the whole batch from the same stream; take this rank's slice
                    xb, scores = xb[rank::world], scores[rank::world]
                    weights = None if weights is None else weights[rank::world]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    loss = ddp_model(xb, scores, weights)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                loss_sum += float(loss.detach())
                pb.update(task, advance=1, info=f"ep {epoch + 1}/{pc.epochs} loss {loss_sum / (s + 1):.4f}")
            rec = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
                   "tau": tau, "seconds": time.time() - t0, "prep_seconds": prep, "steps": steps_per_epoch}
            last = epoch + 1 == pc.epochs
            if is_main and pc.val and ((epoch + 1) % pc.eval_every == 0 or last):
                t1 = time.time()
                ev = evaluate(pc, model, data, len(classes))
                feats = ev.pop("_features")
                if last and pc.probe:
                    ev["probe"] = linear_probe(feats[0], data["ykn"], feats[1], data["yva"], len(classes))
                rec.update(ev, eval_seconds=time.time() - t1)
            history["epochs"].append(rec)
            if is_main:
                print(json.dumps(rec), file=sys.stderr, flush=True)
                with atomic_path(ckpt_path) as tmp:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                                "history": history, "rng": torch.get_rng_state()}, tmp)
                write_json(out / "history.json", history)
    if is_main and history["epochs"]:
        plot_curves({pc.policy: history["epochs"]}, out / "curves.png")
        if len(history["epochs"]) >= pc.epochs:
            save_vit(model.encoder.cpu().eval(), out / "encoder", extra={"pretrain": history["epochs"][-1]})
            save_mae(model.cpu().eval(), out / "mae")
    if os.environ.get("SIFTLENS_RANK_WEIGHTS"):  # debugging / tests: every rank writes its own weights
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / f"rank{rank}.safetensors"))
    if world > 1:
        torch.distributed.destroy_process_group()
    return history
