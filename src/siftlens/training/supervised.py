"""Supervised training of the project's ViT on an ImageFolder (folder or zip).

Images are decoded once into memory at the model's input size, augmented in batches on the training
device (random crop with padding, horizontal flip), and fed to AdamW with linear warm-up, cosine decay
and label smoothing. Resumable and ``torchrun``-ready through :mod:`siftlens.training.loop`.

Token dropping (docs/method.md, "Guided training"): with ``keep_rate`` r < 1 every training step runs on
``K = round(r * N)`` patch tokens per image (plus the prefix tokens), with their own position embeddings;
``keep_policy`` ``random`` keeps them uniformly (PatchDropout), ``sift`` with probability proportional to
``(w_p + eps) ** tau`` where ``w_p`` is the patch's SIFT keypoint count in the augmented image (cached
keypoints moved with the crop and flip). Evaluation always uses all tokens. r = 1 draws no extra random
numbers, so it reproduces training without dropping exactly.

A given drop (``token_drop``, e.g. a discovered shortcut's tokens, :mod:`siftlens.shortcuts.retraining.retrain`):
``token_drop(model, x)`` names, for each image of a batch as it is before augmentation, the patches the model must
never see. It is asked once per image, before the first epoch (:func:`drop_masks`: the images are in memory and are
the same every epoch, so a drop computed by SIFT costs one pass, not one per epoch); each step moves its images'
masks with their crops and flips (every augmented patch holding any of their pixels) and removes those tokens (each
image its own number of tokens), and the evaluation removes them too. It draws no random numbers: a ``token_drop``
that names no patch reproduces training without it exactly.

``train(None, images, config)`` trains a new ViT of ``config.shape``; ``train(model, images, config)``
fine-tunes a saved siftlens ViT (:mod:`siftlens.training.start`). Outputs in ``out/`` when it is given:
``checkpoint.pt`` (every epoch, so ``resume`` continues), and once all epochs are done ``history.json`` and
``model/`` (a siftlens ViT); :meth:`TrainResult.save` writes the last two anywhere.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..io import write_json
from ..keypoints import SiftOptions, sift_params
from ..models.vit import ViT, ViTConfig, save_vit
from ..options import RunOptions, group, option
from ..progress import progress_bar
from .augment import AugParams, apply_augment, augment_patch_mask, draw_augment
from .guidance import augmented_counts, check_keep, forward_dropping, keep_count, keep_indices
from .images import Labelled, channel_stats, load_train_val, normalize
from .keypoint_bank import KeypointBank, cached_keypoints
from .loop import EpochHistory, Loop, end_run, epoch_range, start_run
from .optim import Schedule, adamw
from .options import KeepOptions, ModelShape, OptimOptions, SessionOptions, flat_values
from .start import StartModel, input_size, load_start, start_vit

# token_drop(model, x) -> drop: x (B, 3, H, W) normalised, not augmented -> (B, N) bool, True: never seen
TokenDrop = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    """Supervised training of the project's ViT; every field is an option of ``siftlens train``."""

    val: str | None = option(None, "Held-out images (same class folders), evaluated every epoch.")
    shape: ModelShape = group(ModelShape)
    optim: OptimOptions = group(OptimOptions)
    run: RunOptions = group(RunOptions, helps={"batch_size": "Global batch size (split over torchrun ranks)."},
                            batch_size=256)
    label_smoothing: float = option(0.1, "Label smoothing.")
    pad: int = option(4, "Random-crop padding in pixels (0: no crop).")
    drop_path: float = option(0.0, "Stochastic depth rate.")
    keep: KeepOptions = group(KeepOptions)
    sift: SiftOptions = group(SiftOptions)
    session: SessionOptions = group(SessionOptions)


@dataclass
class TrainResult(EpochHistory):
    """What :func:`train` returns: the trained ``model``, ``history`` (one row per epoch: train_loss,
    train_acc, lr, seconds, train_tokens and, with held-out images, val_acc) and ``record``, the whole
    history.json (config, model config, epochs, skipped files, wall seconds)."""

    model: ViT
    config: TrainConfig
    record: dict = field(repr=False)

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``out/model/`` (a siftlens ViT) and ``out/history.json``; returns ``out``."""
        out = Path(out)
        final = self.record["epochs"][-1] if self.record["epochs"] else {}
        save_vit(self.model, out / "model", extra={"train": dict(final)})
        write_json(out / "history.json", self.record)
        return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, cfg: ViTConfig,
             device: str, batch_size: int = 512, drop: torch.Tensor | None = None) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, H, W, 3), with ``drop`` (N, P) bool's patches removed if
    given."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(images[i : i + batch_size]).to(device), cfg.mean, cfg.std)
        logits = model(x) if drop is None else forward_dropping(model, x, drop[i : i + batch_size].to(device))
        pred = logits.argmax(-1).cpu().numpy()
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def kept_tokens(tc: TrainConfig, model: ViT, bank: KeypointBank | None, idx: torch.Tensor, aug,
                gen: torch.Generator) -> torch.Tensor | None:
    """The patch tokens each image of the batch ``idx`` (B,) trains on: (B, K) long, or None (all; r = 1,
    no random numbers drawn)."""
    if tc.keep.keep_rate >= 1:
        return None
    n = model.grid_size[0] * model.grid_size[1]
    u = torch.rand(len(idx), n, generator=gen).to(tc.run.device)
    counts = None
    if tc.keep.keep_policy == "sift":
        counts = augmented_counts(bank, idx, aug, tc.pad, model.cfg.img_size, model.patch_size, model.grid_size,
                                  tc.run.device)[2]
    return keep_indices(u, keep_count(tc.keep.keep_rate, n), counts, tc.keep.keep_tau, tc.keep.keep_eps)


def drop_masks(token_drop: TokenDrop | None, model: ViT, images: np.ndarray, device: str, batch_size: int = 512
               ) -> torch.Tensor | None:
    """``token_drop``'s patches of every image of ``images`` (N, H, W, 3) uint8 as it is before augmentation: (N, P)
    bool on the CPU, asked in batches of ``batch_size``; None without a drop. ``model`` is left in its mode."""
    if token_drop is None:
        return None
    mode, cfg = model.training, model.cfg
    masks = [token_drop(model, normalize(torch.from_numpy(images[i : i + batch_size]).to(device), cfg.mean,
                                         cfg.std)).to(torch.bool).cpu()
             for i in range(0, len(images), batch_size)]
    model.train(mode)
    n = model.grid_size[0] * model.grid_size[1]
    return torch.cat(masks) if masks else torch.zeros(0, n, dtype=torch.bool)


def moved_drop(drop: torch.Tensor | None, model: ViT, aug: AugParams, pad: int, device: str | torch.device
               ) -> torch.Tensor | None:
    """A batch's patch masks before augmentation, ``drop`` (B, N) bool, moved with its crops and flips: (B, N) bool
    on ``device``, or None without a drop."""
    if drop is None:
        return None
    gh, gw = model.grid_size
    mask = drop.view(len(drop), gh, gw)
    return augment_patch_mask(mask, aug, pad, model.patch_size).view(len(drop), gh * gw).to(device)


def step_tokens(model: ViT, batch: int, keep: torch.Tensor | None, drop: torch.Tensor | None) -> int:
    """Tokens a training step processes, prefix tokens included: every patch, or ``keep``'s (B, K), or those
    ``drop`` (B, N) leaves (an image that would lose every patch keeps them all)."""
    n = model.grid_size[0] * model.grid_size[1]
    if drop is not None:
        kept = (~drop).sum(1)
        return batch * model.num_prefix_tokens + int(torch.where(kept == 0, n, kept).sum())
    return batch * (model.num_prefix_tokens + (keep.shape[1] if keep is not None else n))


def train_one_epoch(loop: Loop, data: Labelled, bank: KeypointBank | None, tc: TrainConfig, epoch: int,
                    tick: Callable[[str], None], drops: torch.Tensor | None = None) -> dict:
    """One epoch of shuffled, augmented batches (``drops`` (N, P) bool, a mask per training image before
    augmentation: its patches removed, moved with each image's crop and flip); returns its record (loss and
    accuracy on this rank's slices, and ``train_tokens``: the tokens the steps processed, prefix tokens included)."""
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
        x0 = normalize(x_all[idx].to(device), cfg.mean, cfg.std)  # (B, 3, H, W) before augmentation
        xb = apply_augment(x0, aug, tc.pad)
        keep = kept_tokens(tc, model, bank, idx, aug, gen)  # (B, K) or None
        drop = moved_drop(None if drops is None else drops[idx], model, aug, tc.pad, device)  # (B, N) or None
        tokens += step_tokens(model, len(idx), keep, drop)
        xb, yb, keep, drop = loop.run.shard(xb, y_all[idx].to(device), keep, drop)
        with loop.autocast():
            logits = loop.ddp(xb, keep) if drop is None else forward_dropping(loop.ddp, xb, drop)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=tc.label_smoothing)
        loop.step(loss)
        seen += len(yb)
        correct += int((logits.argmax(-1) == yb).sum())
        loss_sum += float(loss.detach()) * len(yb)
        tick(f"ep {epoch + 1}/{tc.optim.epochs} loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen, "lr": loop.lr,
            "seconds": time.time() - t0, "train_tokens": tokens}


def train(model: StartModel, images: str, config: TrainConfig | None = None, *, progress: bool = True,
          out: str | os.PathLike | None = None, token_drop: TokenDrop | None = None) -> TrainResult:
    """Train a ViT on ``images`` (an ImageFolder: a folder, a zip, or a folder inside a zip): a new one of
    ``config.shape`` when ``model`` is None, else fine-tune ``model`` (a siftlens ViT or its folder).

    With ``out``, checkpoints stream there every epoch (``config.session.resume`` continues from them) and the
    finished model and history are saved there; without, the run keeps its checkpoints in a temporary folder.
    ``token_drop``: patches no training step and no evaluation sees (see the module's docstring).
    """
    tc = config or TrainConfig()
    check_keep(tc.keep.keep_rate, tc.keep.keep_policy, tc.keep.keep_eps)
    if token_drop is not None and tc.keep.keep_rate < 1:
        raise ConfigError("a given token drop and --keep-rate < 1 do not combine: train with --keep-rate 1")
    if out is None and tc.session.resume:
        raise ConfigError("resume needs the output folder of the run to continue (out)")
    with tempfile.TemporaryDirectory(prefix="siftlens-train-") as tmp:
        return _train(load_start(model), images, tc, progress, Path(out) if out is not None else None, Path(tmp),
                      token_drop)


def _train(start, images: str, tc: TrainConfig, progress: bool, out: Path | None, tmp: Path,
           token_drop: TokenDrop | None) -> TrainResult:
    run = start_run(tc.run.device, out or tmp, tc.session.resume, tc.session.threads, tc.run.batch_size)
    if token_drop is not None and run.dist.active:
        end_run(run)
        raise ConfigError("a given token drop runs in one process: start it without torchrun")
    tc = replace(tc, run=replace(tc.run, device=run.device))
    size = input_size(start, tc.shape.img_size)
    bank = None
    with progress_bar(progress and run.is_main) as pb:
        tr, va = load_train_val(images, tc.val, size, (tc.run.limit, tc.session.val_limit), pb)
        if tc.keep.keep_rate < 1 and tc.keep.keep_policy == "sift":
            cache = tc.session.keypoint_cache or run.out / "keypoints.npz"
            bank = cached_keypoints(tr.x, sift_params(size, tc.sift), cache, run.dist, pb, tc.run.workers)[0]
    mean, std = channel_stats(tr.x)
    s = tc.shape
    cfg = ViTConfig(
        img_size=size, patch_size=s.patch_size, num_classes=len(tr.classes), dim=s.dim, depth=s.depth,
        heads=s.heads, mlp_ratio=s.mlp_ratio, num_registers=s.num_registers, drop_path=tc.drop_path,
        mean=mean, std=std, class_names=tr.classes,
    )
    model = start_vit(start, cfg, tc.run.seed).to(run.device)
    cfg, o = model.cfg, tc.optim
    drops = drop_masks(token_drop, model, tr.x, run.device)  # (N, P) bool or None, once for every epoch
    val_drops = drop_masks(token_drop, model, va.x, run.device) if va is not None else None
    sched = Schedule.for_data(len(tr.x), tc.run.batch_size, o.epochs, o.warmup_epochs, o.lr, o.min_lr)
    loop = Loop(run, model, adamw(model, o.lr, o.weight_decay, betas=(0.9, 0.999)), sched, tc.run.seed)
    history = {"config": {"train": images, "out": None if out is None else str(out), **flat_values(tc)},
               "model": asdict(cfg), "epochs": [], "skipped": tr.skipped + (va.skipped if va is not None else [])}
    history, start_epoch = loop.resume(history, tc.session.resume)
    t_start = time.time() - sum(e["seconds"] for e in history["epochs"])
    with progress_bar(progress and run.is_main) as pb:
        tick = loop.ticker(pb, "train", start_epoch)
        for epoch in epoch_range(start_epoch, o.epochs, tc.session.stop_after):
            rec = train_one_epoch(loop, tr, bank, tc, epoch, tick, drops)
            if va is not None and run.is_main:
                rec["val_acc"] = evaluate(model, va.x, va.y, cfg, run.device, drop=val_drops)
            loop.end_epoch(epoch, rec, history)
    history["wall_seconds"] = time.time() - t_start
    result = TrainResult(model.eval(), tc, history)
    if run.is_main and out is not None and result.complete:
        result.save(out)
    end_run(run)
    return result
