"""Supervised training of the project's ViT on an ImageFolder (folder or zip).

Images are decoded once into memory at the model's input size, augmented in batches on the training
device (random crop with padding, horizontal flip), and fed to AdamW with linear warm-up, cosine decay
and label smoothing. Resumable and ``torchrun``-ready through :mod:`siftlens.training.loop`.

Outputs in ``out/``: ``checkpoint.pt`` (every epoch), and once all epochs are done ``history.json`` and
``model/`` (a siftlens ViT).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..io import write_json
from ..models.vit import ViT, ViTConfig, save_vit
from ..progress import progress_bar
from .augment import augment
from .images import Labelled, channel_stats, load_train_val, normalize
from .loop import Loop, end_run, epoch_range, start_run
from .optim import Schedule, adamw


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


def train_one_epoch(loop: Loop, data: Labelled, tc: TrainConfig, epoch: int, tick: Callable[[str], None]) -> dict:
    """One epoch of shuffled, augmented batches; returns its record (loss and accuracy on this rank's slices)."""
    t0 = time.time()
    model, device, cfg = loop.model, loop.run.device, loop.model.cfg
    model.train()
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen, batches = loop.epoch_batches(epoch, len(data.x))
    seen = correct = 0
    loss_sum = 0.0
    for step, idx in batches:
        loop.set_lr(step)
        xb = augment(normalize(x_all[idx].to(device), cfg.mean, cfg.std), tc.pad, gen)  # (B, 3, H, W)
        xb, yb = loop.run.shard(xb, y_all[idx].to(device))
        with loop.autocast():
            logits = loop.ddp(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=tc.label_smoothing)
        loop.step(loss)
        seen += len(yb)
        correct += int((logits.argmax(-1) == yb).sum())
        loss_sum += float(loss.detach()) * len(yb)
        tick(f"ep {epoch + 1}/{tc.epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": loop.lr,
            "seconds": time.time() - t0}


def train(tc: TrainConfig) -> dict:
    """Train a ViT; returns the history dict (also written to ``out/history.json``)."""
    run = start_run(tc.device, tc.out, tc.resume, tc.threads, tc.batch_size)
    tc = replace(tc, device=run.device)
    size = (tc.img_size, tc.img_size)
    with progress_bar(tc.progress and run.is_main) as pb:
        tr, va = load_train_val(tc.train, tc.val, size, (tc.limit, tc.val_limit), pb)
    mean, std = channel_stats(tr.x)
    cfg = ViTConfig(
        img_size=size, patch_size=tc.patch_size, num_classes=len(tr.classes), dim=tc.dim, depth=tc.depth,
        heads=tc.heads, mlp_ratio=tc.mlp_ratio, num_registers=tc.num_registers, drop_path=tc.drop_path,
        mean=mean, std=std, class_names=tr.classes,
    )
    torch.manual_seed(tc.seed)
    model = ViT(cfg).to(run.device)
    sched = Schedule.for_data(len(tr.x), tc.batch_size, tc.epochs, tc.warmup_epochs, tc.lr, tc.min_lr)
    loop = Loop(run, model, adamw(model, tc.lr, tc.weight_decay, betas=(0.9, 0.999)), sched, tc.seed)
    history = {"config": asdict(tc), "model": asdict(cfg), "epochs": [],
               "skipped": tr.skipped + (va.skipped if va is not None else [])}
    history, start = loop.resume(history, tc.resume)
    t_start = time.time() - sum(e["seconds"] for e in history["epochs"])
    with progress_bar(tc.progress and run.is_main) as pb:
        tick = loop.ticker(pb, "train", start)
        for epoch in epoch_range(start, tc.epochs, tc.stop_after):
            rec = train_one_epoch(loop, tr, tc, epoch, tick)
            if va is not None and run.is_main:
                rec["val_acc"] = evaluate(model, va.x, va.y, cfg, run.device)
            loop.end_epoch(epoch, rec, history)
    history["wall_seconds"] = time.time() - t_start
    if run.is_main and len(history["epochs"]) >= tc.epochs:
        final = history["epochs"][-1] if history["epochs"] else {}
        save_vit(model.cpu().eval(), run.out / "model", extra={"train": dict(final)})
        write_json(run.out / "history.json", history)
    end_run(run)
    return history
