"""Supervised training of the project's ViT on an ImageFolder (folder or zip).

Images are decoded once into memory at the model's input size, augmented in batches on the training
device (random crop with padding, horizontal flip), and fed to AdamW with linear warm-up, cosine decay
and label smoothing. Resumable and ``torchrun``-ready through :mod:`siftlens.training.loop`.

Token dropping (METHOD.md section 5): with ``keep_rate`` r < 1 every training step runs on
``K = round(r * N)`` patch tokens per image (plus the prefix tokens), with their own position embeddings;
``keep_policy`` ``random`` keeps them uniformly (PatchDropout), ``sift`` with probability proportional to
``(w_p + eps) ** tau`` where ``w_p`` is the patch's SIFT keypoint count in the augmented image (cached
keypoints moved with the crop and flip). Evaluation always uses all tokens. r = 1 draws no extra random
numbers, so it reproduces training without dropping exactly.

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
from .augment import apply_augment, draw_augment
from .guidance import augmented_counts, check_keep, keep_count, keep_indices
from .images import Labelled, channel_stats, load_train_val, normalize
from .keypoints import KeypointBank, cached_keypoints
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
    keep_rate: float = 1.0
    keep_policy: str = "random"
    keep_tau: float = 1.0
    keep_eps: float = 1.0
    upsample: float = 0.0  # SIFT upsampling for the sift keep policy; 0 = automatic
    keypoint_cache: str | None = None  # default out/keypoints.npz
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


def kept_tokens(tc: TrainConfig, model: ViT, bank: KeypointBank | None, idx: torch.Tensor, aug,
                gen: torch.Generator) -> torch.Tensor | None:
    """The patch tokens each image of the batch ``idx`` (B,) trains on: (B, K) long, or None (all; r = 1,
    no random numbers drawn)."""
    if tc.keep_rate >= 1:
        return None
    n = model.grid_size[0] * model.grid_size[1]
    u = torch.rand(len(idx), n, generator=gen).to(tc.device)
    counts = None
    if tc.keep_policy == "sift":
        counts = augmented_counts(bank, idx, aug, tc.pad, model.cfg.img_size, model.patch_size, model.grid_size,
                                  tc.device)[2]
    return keep_indices(u, keep_count(tc.keep_rate, n), counts, tc.keep_tau, tc.keep_eps)


def train_one_epoch(loop: Loop, data: Labelled, bank: KeypointBank | None, tc: TrainConfig, epoch: int,
                    tick: Callable[[str], None]) -> dict:
    """One epoch of shuffled, augmented batches; returns its record (loss and accuracy on this rank's slices,
    and ``train_tokens``: the tokens the steps processed, prefix tokens included)."""
    t0 = time.time()
    model, device, cfg = loop.model, loop.run.device, loop.model.cfg
    model.train()
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    gen, batches = loop.epoch_batches(epoch, len(data.x))
    seen = correct = tokens = 0
    loss_sum = 0.0
    for step, idx in batches:
        loop.set_lr(step)
        aug = draw_augment(len(idx), tc.pad, gen)
        xb = apply_augment(normalize(x_all[idx].to(device), cfg.mean, cfg.std), aug, tc.pad)  # (B, 3, H, W)
        keep = kept_tokens(tc, model, bank, idx, aug, gen)  # (B, K) or None
        tokens += len(idx) * (model.num_prefix_tokens + (keep.shape[1] if keep is not None else
                                                          model.grid_size[0] * model.grid_size[1]))
        xb, yb, keep = loop.run.shard(xb, y_all[idx].to(device), keep)
        with loop.autocast():
            logits = loop.ddp(xb, keep)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=tc.label_smoothing)
        loop.step(loss)
        seen += len(yb)
        correct += int((logits.argmax(-1) == yb).sum())
        loss_sum += float(loss.detach()) * len(yb)
        tick(f"ep {epoch + 1}/{tc.epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": loop.lr,
            "seconds": time.time() - t0, "train_tokens": tokens}


def train(tc: TrainConfig) -> dict:
    """Train a ViT; returns the history dict (also written to ``out/history.json``)."""
    check_keep(tc.keep_rate, tc.keep_policy, tc.keep_eps)
    run = start_run(tc.device, tc.out, tc.resume, tc.threads, tc.batch_size)
    tc = replace(tc, device=run.device)
    size = (tc.img_size, tc.img_size)
    bank = None
    with progress_bar(tc.progress and run.is_main) as pb:
        tr, va = load_train_val(tc.train, tc.val, size, (tc.limit, tc.val_limit), pb)
        if tc.keep_rate < 1 and tc.keep_policy == "sift":
            bank = cached_keypoints(tr.x, tc.upsample, tc.keypoint_cache or run.out / "keypoints.npz", run.dist,
                                    pb)[0]
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
            rec = train_one_epoch(loop, tr, bank, tc, epoch, tick)
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
