"""Fine-tuning the last blocks of a siftlens ViT for ``siftlens repair --blocks K``.

Shapes: ``B`` batch, ``N`` patch tokens, ``k`` kept patch tokens, ``T`` prefix tokens, ``D`` width, ``C``
classes, ``n`` fitting images.

The model is split at block ``depth - K``: the blocks before it are frozen and run once, under ``no_grad``,
on each image's kept tokens (:func:`frozen_tokens`); the last ``K`` blocks, the final norm and the head are
trained by minibatch AdamW on the weighted cross-entropy (:func:`finetune`). An image keeps its own number of
tokens, so every minibatch holds images with the same number of kept tokens (no padding, no masks): the
trained model computes exactly what it computes at inference with the same tokens dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...models.backend import keep_groups
from ...models.vit import POOLS as VIT_POOLS
from ...progress import progress_bar
from ...training.optim import lr_at, param_groups

POOLS = ("model", *VIT_POOLS)  # repair's --pool: the model's own pooling, or one of the ViT's


def split_at(model: torch.nn.Module, blocks: int) -> int:
    """The index of the first trained block when the last ``blocks`` are fine-tuned."""
    depth = len(model.blocks)
    if not 0 < blocks <= depth:
        raise ConfigError(f"--blocks must be between 1 and the model's depth {depth}, not {blocks}")
    return depth - blocks


@torch.no_grad()
def frozen_tokens(model: torch.nn.Module, x: torch.Tensor, drop: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """x (B, C, H, W) normalised, drop (B, N) bool -> B tensors (T + k_i, D) on the CPU: each image's kept tokens
    as they enter the first fine-tuned block (the frozen blocks run once, here)."""
    start = split_at(model, blocks)
    out: list[torch.Tensor] = [torch.empty(0)] * x.shape[0]
    for rows, keep in keep_groups(drop):
        t = model.embed(x[rows.to(x.device)], keep.to(x.device))
        for blk in model.blocks[:start]:
            t = blk(t)
        for r, ti in zip(rows.tolist(), t.float().cpu(), strict=True):
            out[r] = ti
    return out


def tuned_logits(model: torch.nn.Module, tokens: torch.Tensor, blocks: int, pool: str) -> torch.Tensor:
    """tokens (b, T + k, D) entering the first fine-tuned block -> logits (b, C): the last ``blocks`` blocks,
    the final norm, the pooling and the head."""
    for blk in model.blocks[split_at(model, blocks) :]:
        tokens = blk(tokens)
    return model.head(model.pool(model.norm(tokens), how=pool))


def trainable(model: torch.nn.Module, blocks: int) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze every parameter except those of the last ``blocks`` blocks, the final norm and the head; returns those,
    named as in ``model.named_parameters()``."""
    model.requires_grad_(False)
    for part in [*model.blocks[split_at(model, blocks) :], model.norm, model.head]:
        part.requires_grad_(True)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def minibatches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index arrays of at most ``batch_size`` images that share a sequence length; shuffled within and across."""
    out = []
    for n in np.unique(lengths):
        idx = rng.permutation(np.flatnonzero(lengths == n))
        out += [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


@dataclass
class TuneSettings:
    blocks: int = 2
    epochs: int = 3
    lr: float = 1e-4
    l2: float = 1e-3  # on the head's weights, as in the head-only fit
    weight_decay: float = 0.01  # AdamW's, by training.optim's rule: weight matrices only, not norms and biases
    warmup: float = 0.1  # share of the steps with a linear warm-up
    pool: str = "model"
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"


def _step_loss(model, tokens, y, w, s: TuneSettings) -> torch.Tensor:
    """Weighted cross-entropy of one minibatch (weights of mean 1 over the fitting set) + l2 * ||W_head||^2."""
    t = torch.stack(tokens).to(s.device)
    ce = F.cross_entropy(tuned_logits(model, t, s.blocks, s.pool), y.to(s.device), reduction="none")
    return (ce * w.to(s.device)).mean() + s.l2 * model.head.weight.pow(2).sum()


def finetune(model: torch.nn.Module, tokens: list[torch.Tensor], y: torch.Tensor, w: torch.Tensor, s: TuneSettings,
             progress: bool = True) -> dict:
    """Train the last ``s.blocks`` blocks, the final norm and the head in place: AdamW with the project's one
    weight-decay rule (:mod:`siftlens.training.optim`: no decay for biases and norms), a linear warm-up over the
    first ``s.warmup`` of the steps, then cosine decay from ``s.lr`` to 0 over ``s.epochs`` epochs. tokens: n tensors
    (T + k_i, D) from :func:`frozen_tokens`; y (n,) labels; w (n,) weights. Returns the mean loss per epoch."""
    opt = torch.optim.AdamW(param_groups(trainable(model, s.blocks), s.weight_decay), lr=s.lr)
    rng = np.random.default_rng(s.seed)
    lengths = np.array([len(t) for t in tokens])
    w = w.float() * (len(w) / w.float().sum())
    plan = [minibatches(lengths, s.batch_size, rng) for _ in range(s.epochs)]
    total, step, losses = sum(map(len, plan)), 0, []
    warm = max(1, round(s.warmup * total))
    model.eval()  # no stochastic depth: the trained blocks compute what inference computes
    with torch.enable_grad(), progress_bar(progress) as pb:
        task = pb.add_task(f"repair: fine-tune {s.blocks} block(s)", total=total, info="")
        for epoch in plan:
            run = 0.0
            for idx in epoch:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, warm, s.lr, 0.0)
                loss = _step_loss(model, [tokens[i] for i in idx], y[idx], w[idx], s)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run += float(loss.detach()) * len(idx)
                step += 1
                pb.update(task, advance=1, info=f"loss {float(loss.detach()):.3f}")
            losses.append(round(run / len(tokens), 5))
    model.requires_grad_(False)
    return {"epoch_loss": losses, "steps": total}


@torch.no_grad()
def tuned_predictions(model: torch.nn.Module, tokens: list[torch.Tensor], blocks: int, pool: str,
                      batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """(n,) predicted classes of the images whose frozen-part tokens are ``tokens`` (n tensors (T + k_i, D))."""
    pred = np.empty(len(tokens), np.int64)
    for idx in minibatches(np.array([len(t) for t in tokens]), batch_size, np.random.default_rng(0)):
        t = torch.stack([tokens[i] for i in idx]).to(device)
        pred[idx] = tuned_logits(model, t, blocks, pool).argmax(1).cpu().numpy()
    return pred
