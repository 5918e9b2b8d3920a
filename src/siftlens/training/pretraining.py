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
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..io import write_json
from ..keypoints import SiftOptions, sift_params
from ..models.mae import MAE, MAEConfig, save_mae
from ..models.vit import ViT, ViTConfig, save_vit
from ..options import RunOptions, group, option
from ..progress import progress_bar
from .augment import apply_augment, draw_augment
from .curves import plot_curves
from .guidance import augmented_counts, check_keep, guided_scores, keep_count
from .images import Labelled, channel_stats, load_train_val, normalize
from .keypoint_bank import KeypointBank, cached_keypoints
from .loop import EpochHistory, Loop, Run, end_run, epoch_range, start_run
from .mae_eval import extract_features, knn_accuracy, linear_probe
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
from .optim import Schedule, adamw
from .options import (
    DecoderOptions,
    EvalOptions,
    KeepOptions,
    MaskingOptions,
    ModelShape,
    OptimOptions,
    SessionOptions,
    flat_values,
)
from .start import StartModel, input_size, load_start, start_mae


@dataclass
class PretrainConfig:
    """MAE pre-training of the project's ViT; every field is an option of ``siftlens pretrain``."""

    val: str | None = option(None, "Held-out images (same class folders) for the reconstruction loss, k-NN "
                                   "accuracy and the linear probe.")
    masking: MaskingOptions = group(MaskingOptions)
    shape: ModelShape = group(ModelShape, helps={"dim": "Encoder width D.", "depth": "Encoder blocks.",
                                                 "heads": "Encoder attention heads."})
    decoder: DecoderOptions = group(DecoderOptions)
    evaluation: EvalOptions = group(EvalOptions)
    optim: OptimOptions = group(OptimOptions, helps={"lr": "Peak learning rate (AdamW, betas 0.9/0.95)."}, epochs=20)
    run: RunOptions = group(RunOptions, helps={"batch_size": "Global batch size (split over torchrun ranks)."},
                            batch_size=256)
    pad: int = option(4, "Random-crop padding in pixels (0: no crop).")
    keep: KeepOptions = group(KeepOptions)
    sift: SiftOptions = group(SiftOptions)
    session: SessionOptions = group(SessionOptions)


@dataclass
class PretrainResult(EpochHistory):
    """What :func:`pretrain` returns: the pre-trained ``model`` (an MAE; ``encoder`` is its ViT), ``history``
    (one row per epoch: train_loss, lr, tau, seconds, token counts and, on evaluation epochs, val_loss,
    knn_acc and probe) and ``record``, the whole history.json."""

    model: MAE
    config: PretrainConfig
    record: dict = field(repr=False)

    @property
    def encoder(self) -> ViT:
        return self.model.encoder

    def save(self, out: str | os.PathLike) -> Path:
        """Write ``out/history.json``, ``out/curves.png``, ``out/encoder/`` (a siftlens ViT) and ``out/mae/``
        (encoder + decoder); returns ``out``."""
        out = Path(out)
        write_json(out / "history.json", self.record)
        _save_model(self, out)
        return out


def _save_model(result: PretrainResult, out: Path) -> None:
    epochs = result.record["epochs"]
    if epochs:
        plot_curves({result.config.masking.policy: epochs}, out / "curves.png")
        save_vit(result.model.encoder.cpu().eval(), out / "encoder", extra={"pretrain": epochs[-1]})
        save_mae(result.model.cpu().eval(), out / "mae")


def build_mae(pc: PretrainConfig, data: Labelled, start: ViT | MAE | None = None) -> MAE:
    """The MAE of ``pc``, normalising by ``data``'s channel statistics, initialised from ``pc.run.seed``; or
    ``start`` to continue from (:func:`siftlens.training.start.start_mae`)."""
    mean, std = channel_stats(data.x)
    s, d, m = pc.shape, pc.decoder, pc.masking
    enc = ViTConfig(img_size=(s.img_size, s.img_size), patch_size=s.patch_size, num_classes=0, dim=s.dim,
                    depth=s.depth, heads=s.heads, mlp_ratio=s.mlp_ratio, num_registers=s.num_registers,
                    pool=pc.evaluation.feature, mean=mean, std=std, class_names=data.classes)
    dec = MAEConfig(decoder_dim=d.decoder_dim, decoder_depth=d.decoder_depth, decoder_heads=d.decoder_heads,
                    mask_ratio=m.mask_ratio, norm_pix=m.norm_pix, loss=m.loss)
    return start_mae(start, enc, dec, pc.run.seed).to(pc.run.device)


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
    keep = pc.keep
    return needs_keypoints(pc.masking.policy, pc.masking.lam) or (keep.keep_rate < 1 and keep.keep_policy == "sift")


def batch_inputs(pc: PretrainConfig, model: MAE, x_u8: torch.Tensor, idx: torch.Tensor, bank: KeypointBank | None,
                 gen: torch.Generator, tau: float) -> Batch:
    """One batch of images ``idx`` (B,) from all training images ``x_u8`` (M, H, W, 3) uint8, normalised with
    the encoder's own mean and std. Draws, in order: crop and flip, mask noise, and (token dropping only)
    keep noise, so r = 1 consumes exactly the random numbers it always did."""
    cfg, enc = model.encoder.cfg, model.encoder
    xb = normalize(x_u8[idx].to(pc.run.device), cfg.mean, cfg.std)
    aug = draw_augment(len(idx), pc.pad, gen)
    xb = apply_augment(xb, aug, pc.pad)
    u = torch.rand(len(idx), model.num_patches, generator=gen).to(pc.run.device)
    u_keep = torch.rand(len(idx), model.num_patches, generator=gen).to(pc.run.device) if pc.keep.keep_rate < 1 else None
    t0 = time.perf_counter()
    kxy = valid = counts = weights = guide = None
    if bank is not None:
        kxy, valid, counts = augmented_counts(bank, idx, aug, pc.pad, cfg.img_size, enc.patch_size, enc.grid_size,
                                              pc.run.device)
    if pc.masking.policy == "kamim":
        dens = kamim_density(kxy, valid, cfg.img_size, enc.patch_size, max(1, round(bank.params.upsample)))
        weights = kamim_weights(dens, pc.masking.kamim_temp)
    elif pc.masking.lam > 0:
        weights = keypoint_loss_weights(counts, pc.masking.lam)
    if pc.masking.policy == "attmask":
        guide = attention_weights(enc, xb)
    scores = mask_scores(pc.masking.policy, u, guide if pc.masking.policy == "attmask" else counts, tau, pc.masking.eps)
    keep_scores = None
    if u_keep is not None:
        keep_scores = u_keep if pc.keep.keep_policy == "random" else guided_scores(u_keep, counts, pc.keep.keep_tau,
                                                                                 pc.keep.keep_eps)
    guide_tokens = len(idx) * (model.num_patches + enc.num_prefix_tokens) if guide is not None else 0
    return Batch(xb, scores, weights, keep_scores, time.perf_counter() - t0, guide_tokens)


def train_one_epoch(loop: Loop, x_u8: torch.Tensor, bank: KeypointBank | None, pc: PretrainConfig, epoch: int,
                    tick: Callable[[str], None]) -> dict:
    """One epoch of MAE steps with ``pc.masking.policy``'s masks; returns its record, with the encoder tokens it
    trained on (``train_tokens``, forward + backward) and those its guidance forward processed
    (``guide_tokens``, attmask)."""
    t0, prep, loss_sum = time.time(), 0.0, 0.0
    model = loop.model
    loop.model.train()
    gen, batches = loop.epoch_batches(epoch, len(x_u8))
    n_encode = keep_count(pc.keep.keep_rate, model.num_keep)
    train_tokens = guide_tokens = 0
    for s, (step, idx) in enumerate(batches):
        loop.set_lr(step)
        tau = tau_at(pc.masking.policy, step, loop.sched.total, pc.masking.tau, pc.masking.tau_max)
        b = batch_inputs(pc, model, x_u8, idx, bank, gen, tau)
        prep += b.prep_seconds
        guide_tokens += b.guide_tokens
        train_tokens += len(idx) * (n_encode + model.encoder.num_prefix_tokens)
        xb, scores, weights, keep_scores = loop.run.shard(b.x, b.scores, b.weights, b.keep_scores)
        with loop.autocast():
            loss = loop.ddp(xb, scores, weights, keep_scores, n_encode)[0]
        loop.step(loss)
        loss_sum += float(loss.detach())
        tick(f"ep {epoch + 1}/{pc.optim.epochs} loss {loss_sum / (s + 1):.4f}")
    steps = loop.sched.steps_per_epoch
    return {"epoch": epoch + 1, "train_loss": loss_sum / steps, "lr": loop.lr, "tau": tau,
            "seconds": time.time() - t0, "prep_seconds": prep, "steps": steps, "train_tokens": train_tokens,
            "guide_tokens": guide_tokens}


def eval_data(pc: PretrainConfig, tr: Labelled, va: Labelled) -> dict:
    """What evaluation needs: held-out images and labels, and an evenly spaced subset of at most
    ``pc.evaluation.knn_train_limit`` training images for the k-NN memory bank and the probe's training set."""
    m = len(tr.x)
    kn = np.unique(np.linspace(0, m - 1, min(pc.evaluation.knn_train_limit or m, m)).astype(int))
    return {"xva": va.x, "yva": torch.from_numpy(va.y), "xkn": tr.x[kn], "ykn": torch.from_numpy(tr.y[kn]),
            "classes": len(tr.classes)}


@torch.no_grad()
def evaluate(pc: PretrainConfig, model: MAE, data: dict) -> dict:
    """Held-out reconstruction loss (random masks, fixed seed, unweighted) and k-NN accuracy."""
    model.eval()
    cfg = model.encoder.cfg
    gen = torch.Generator().manual_seed(pc.run.seed * 100_003 + 99_991)
    loss_sum, n = 0.0, 0
    for i in range(0, len(data["xva"]), 256):
        xb = normalize(torch.from_numpy(data["xva"][i : i + 256]).to(pc.run.device), cfg.mean, cfg.std)
        u = torch.rand(len(xb), model.num_patches, generator=gen).to(pc.run.device)
        loss_sum += float(model(xb, u)[0]) * len(xb)
        n += len(xb)
    ftr = extract_features(model.encoder, data["xkn"], pc.run.device)
    fva = extract_features(model.encoder, data["xva"], pc.run.device)
    acc = knn_accuracy(ftr, data["ykn"], fva, data["yva"], data["classes"], pc.evaluation.knn_k, pc.evaluation.knn_temp)
    model.train()
    return {"val_loss": loss_sum / max(n, 1), "knn_acc": acc, "_features": (ftr, fva)}


def evaluate_epoch(pc: PretrainConfig, model: MAE, data: dict) -> dict:
    """:func:`evaluate`, plus the linear probe (the primary MAE measure), and the seconds it all took."""
    t0 = time.time()
    ev = evaluate(pc, model, data)
    ftr, fva = ev.pop("_features")
    if pc.evaluation.probe:
        ev["probe"] = linear_probe(ftr, data["ykn"], fva, data["yva"], data["classes"])
    ev["eval_seconds"] = time.time() - t0
    return ev


def _save(result: PretrainResult, run: Run, history: dict) -> None:
    if run.is_main and history["epochs"]:
        plot_curves({result.config.masking.policy: history["epochs"]}, run.out / "curves.png")
        if result.complete:
            _save_model(result, run.out)
    if os.environ.get("SIFTLENS_RANK_WEIGHTS"):  # debugging / tests: every rank writes its own weights
        from safetensors.torch import save_file

        run.out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
                  str(run.out / f"rank{run.dist.rank}.safetensors"))


def pretrain(model: StartModel, images: str, config: PretrainConfig | None = None, *, progress: bool = True,
             out: str | os.PathLike | None = None) -> PretrainResult:
    """Pre-train an MAE on ``images`` (an ImageFolder; labels are used only for evaluation) with masking
    policy ``config.masking.policy``: a new one when ``model`` is None, else continue from ``model`` (a
    siftlens MAE, or a ViT as the encoder of a new decoder, or their folders).

    With ``out``, checkpoints and history.json stream there every epoch (``config.session.resume`` continues from
    them) and the finished encoder and MAE are saved there; without, checkpoints go to a temporary folder.
    """
    pc = config or PretrainConfig()
    check_policy(pc.masking.policy, pc.masking.eps, pc.masking.lam)
    check_keep(pc.keep.keep_rate, pc.keep.keep_policy, pc.keep.keep_eps)
    if pc.evaluation.feature not in ("mean", "cls"):
        raise ConfigError(f"--feature must be 'mean' or 'cls', not {pc.evaluation.feature!r}")
    if out is None and pc.session.resume:
        raise ConfigError("resume needs the output folder of the run to continue (out)")
    with tempfile.TemporaryDirectory(prefix="siftlens-pretrain-") as tmp:
        return _pretrain(load_start(model), images, pc, progress, Path(out) if out is not None else None,
                         Path(tmp))


def _pretrain(start, images: str, pc: PretrainConfig, progress: bool, out: Path | None, tmp: Path
              ) -> PretrainResult:
    run = start_run(pc.run.device, out or tmp, pc.session.resume, pc.session.threads, pc.run.batch_size)
    pc = replace(pc, run=replace(pc.run, device=run.device))
    size = input_size(start, pc.shape.img_size)
    with progress_bar(progress and run.is_main) as pb:
        tr, va = load_train_val(images, pc.val, size, (pc.run.limit, pc.session.val_limit), pb)
        cache = pc.session.keypoint_cache or run.out / "keypoints.npz"
        bank, sift_seconds = (cached_keypoints(tr.x, sift_params(size, pc.sift), cache, run.dist, pb, pc.run.workers)
                              if needs_bank(pc) else (None, 0.0))
    model = build_mae(pc, tr, start)
    o = pc.optim
    sched = Schedule.for_data(len(tr.x), pc.run.batch_size, o.epochs, o.warmup_epochs, o.lr, o.min_lr)
    loop = Loop(run, model, adamw(model, o.lr, o.weight_decay, betas=(0.9, 0.95)), sched, pc.run.seed)
    history = {"config": {"train": images, "out": None if out is None else str(out), **flat_values(pc)},
               "encoder": asdict(model.encoder.cfg), "mae": asdict(model.cfg), "epochs": [],
               "skipped": tr.skipped + (va.skipped if va is not None else []), "sift_seconds": sift_seconds,
               "world_size": run.dist.world}
    history, start_epoch = loop.resume(history, pc.session.resume)
    data = eval_data(pc, tr, va) if va is not None else None
    x_u8 = torch.from_numpy(tr.x)
    with progress_bar(progress and run.is_main) as pb:
        tick = loop.ticker(pb, "pretrain", start_epoch)
        for epoch in epoch_range(start_epoch, o.epochs, pc.session.stop_after):
            rec = train_one_epoch(loop, x_u8, bank, pc, epoch, tick)
            last = epoch + 1 == o.epochs
            if run.is_main and data is not None and ((epoch + 1) % pc.evaluation.eval_every == 0 or last):
                rec.update(evaluate_epoch(pc, model, data))
            loop.end_epoch(epoch, rec, history)
            if run.is_main and out is not None:
                write_json(out / "history.json", history)
    result = PretrainResult(model, pc, history)
    if out is not None:
        _save(result, run, history)
    end_run(run)
    model.eval()
    return result
