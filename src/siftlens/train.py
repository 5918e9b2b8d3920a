"""Supervised training of the project's ViT on an ImageFolder (folder or zip).

Short by design (in the spirit of MAE's engine_pretrain.py): images are decoded once into memory at
the model's input size, augmented in batches on the training device (random crop with padding,
horizontal flip), and fed to AdamW with linear warm-up, cosine decay and label smoothing.

Resumable: a checkpoint is written atomically after every epoch; the augmentation and shuffling of
epoch ``e`` are drawn from a generator seeded by ``(seed, e)``, so a resumed run repeats exactly what
an uninterrupted one would have done. Works under ``torchrun`` (DistributedDataParallel): each rank
takes its own slice of every batch; only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageSource, load_labelled_array
from .errors import ConfigError
from .io import atomic_path, write_json
from .models.vit import ViT, ViTConfig, save_vit
from .progress import progress_bar


@dataclass
class TrainConfig:
    train: str
    val: str | None = None
    out: str = "runs/train"
    img_size: int = 32
    patch_size: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    num_registers: int = 0
    epochs: int = 25
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    pad: int = 4
    drop_path: float = 0.0
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    limit: int | None = None
    val_limit: int | None = None
    progress: bool = True
    resume: bool = False
    stop_after: int | None = None
    extra: dict = field(default_factory=dict)


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip. x: (B, C, H, W) float -> same shape."""
    B, C, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        rows = (dy[:, None] + torch.arange(H)[None]).to(x.device)  # (B, H)
        cols = (dx[:, None] + torch.arange(W)[None]).to(x.device)  # (B, W)
        bidx = torch.arange(B, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(B, generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised."""
    x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(t, 1.0)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, cfg: ViTConfig,
             device: str, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, H, W, 3)."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(images[i : i + batch_size]).to(device), cfg.mean, cfg.std)
        pred = model(x).argmax(-1).cpu().numpy()
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(tc: TrainConfig) -> dict:
    """Train a ViT; returns the history dict (also written to ``out/history.json``)."""
    rank, world = _dist_info()
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if tc.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if tc.device.startswith("cuda"):
            tc.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(tc.out)
    is_main = rank == 0
    src = ImageSource(tc.train, limit=tc.limit)
    if src.classes is None:
        raise ConfigError(f"{tc.train} is not in ImageFolder layout (root/<class>/<image>)")
    size = (tc.img_size, tc.img_size)
    with progress_bar(tc.progress and is_main) as pb:
        task = pb.add_task("decode train", total=len(src), info="")
        xtr, ytr, skipped = load_labelled_array(src, size, progress=lambda n: pb.advance(task, n))
        xva = yva = None
        if tc.val:
            vsrc = ImageSource(tc.val, limit=tc.val_limit)
            if vsrc.classes != src.classes:
                raise ConfigError(f"class folders of {tc.val} differ from those of {tc.train}")
            vt = pb.add_task("decode val", total=len(vsrc), info="")
            xva, yva, vskipped = load_labelled_array(vsrc, size, progress=lambda n: pb.advance(vt, n))
            skipped += vskipped
    mean = tuple(float(m) for m in (xtr.reshape(-1, 3).mean(0) / 255.0))
    std = tuple(float(s) for s in (xtr.reshape(-1, 3).std(0) / 255.0))
    cfg = ViTConfig(
        img_size=size, patch_size=tc.patch_size, num_classes=len(src.classes), dim=tc.dim, depth=tc.depth,
        heads=tc.heads, mlp_ratio=tc.mlp_ratio, num_registers=tc.num_registers, drop_path=tc.drop_path,
        mean=mean, std=std, class_names=list(src.classes),
    )
    torch.manual_seed(tc.seed)
    model = ViT(cfg).to(tc.device)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(xtr) // tc.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch size {tc.batch_size} exceeds the {len(xtr)} training images")
    total = steps_per_epoch * tc.epochs
    warmup = int(tc.warmup_epochs * steps_per_epoch)
    history = {"config": asdict(tc), "model": asdict(cfg), "epochs": [], "skipped": skipped}
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not tc.resume:
        raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose a new --out")
    if tc.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=tc.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        history = ck["history"]
        start_epoch = ck["epoch"] + 1
    use_amp = tc.device.startswith("cuda")
    xtr_t = torch.from_numpy(xtr)
    ytr_t = torch.from_numpy(ytr)
    t_start = time.time() - sum(e["seconds"] for e in history["epochs"])
    with progress_bar(tc.progress and is_main) as pb:
        task = pb.add_task("train", total=total, completed=start_epoch * steps_per_epoch, info="")
        end_epoch = tc.epochs if tc.stop_after is None else min(tc.epochs, start_epoch + tc.stop_after)
        for epoch in range(start_epoch, end_epoch):
            t0 = time.time()
            model.train()
            gen = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
            order = torch.randperm(len(xtr), generator=gen)
            seen = correct = 0
            loss_sum = 0.0
            for s in range(steps_per_epoch):
                step = epoch * steps_per_epoch + s
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warmup, tc.lr, tc.min_lr)
                idx = order[s * tc.batch_size : (s + 1) * tc.batch_size]
                xb = normalize(xtr_t[idx].to(tc.device), cfg.mean, cfg.std)
                xb = augment(xb, tc.pad, gen)
                yb = ytr_t[idx].to(tc.device)
                if world > 1:  # every rank consumes the same RNG stream, then takes its slice
                    xb, yb = xb[rank::world], yb[rank::world]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = ddp_model(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=tc.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                seen += len(yb)
                correct += int((logits.argmax(-1) == yb).sum())
                loss_sum += float(loss.detach()) * len(yb)
                pb.update(task, advance=1, info=f"ep {epoch + 1}/{tc.epochs} loss {loss_sum / seen:.3f} "
                          f"acc {correct / seen:.3f}")
            rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "lr": opt.param_groups[0]["lr"], "seconds": time.time() - t0}
            if xva is not None and is_main:
                rec["val_acc"] = evaluate(model, xva, yva, cfg, tc.device)
            history["epochs"].append(rec)
            if is_main:
                print(json.dumps(rec), file=sys.stderr, flush=True)
                out.mkdir(parents=True, exist_ok=True)
                with atomic_path(ckpt_path) as tmp:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch,
                                "history": history}, tmp)
    history["wall_seconds"] = time.time() - t_start
    finished = len(history["epochs"]) >= tc.epochs
    if is_main and finished:
        final = {k: v for k, v in (history["epochs"][-1] if history["epochs"] else {}).items()}
        save_vit(model.cpu().eval(), out / "model", extra={"train": final})
        write_json(out / "history.json", history)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return history


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the weights of a (possibly unfinished) training checkpoint as a model folder.

    The folder's config records the epochs completed and the last evaluation, so an interim model is
    never mistaken for a finished one.
    """
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ViTConfig(**ck["history"]["model"])
    model = ViT(cfg)
    model.load_state_dict(ck["model"])
    epochs = ck["history"]["epochs"]
    planned = ck["history"]["config"]["epochs"]
    extra = {"train": epochs[-1] if epochs else {}, "epochs_completed": len(epochs), "epochs_planned": planned}
    return save_vit(model.eval(), out_dir, extra=extra)
