"""Frozen-feature evaluation of a pre-trained encoder: k-NN accuracy and a linear probe.

Features: the encoder (a siftlens ViT) on the whole un-augmented image, pooled by its own
``cfg.pool`` -- ``mean`` (default for pre-training: mean of the final-normed patch tokens, as MAE's
``global_pool``) or ``cls`` (the CLS token, which no MAE loss trains directly).

k-NN (DINO's ``knn_classifier``, Caron et al. 2021): L2-normalised features, cosine similarity, the
k = 20 nearest training features each vote for their label with weight exp(similarity / T), T = 0.07;
the class with the largest summed vote wins.

Linear probe: multinomial logistic regression on standardised frozen features (MAE's linear probe puts
a BatchNorm without affine before the linear layer; here the training-set mean and std), full-batch
L-BFGS with weight decay; deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..models.vit import ViT
from .images import normalize


@torch.no_grad()
def extract_features(encoder: ViT, images: np.ndarray, device: str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """uint8 images (M, H, W, 3) -> pooled features (M, D) float32 on the CPU."""
    encoder.eval()
    cfg = encoder.cfg
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(images[i : i + batch_size]).to(device), cfg.mean, cfg.std)
        out.append(encoder.pool(encoder.forward_features(x)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, cfg.dim)


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN. train_f: (Mt, D), train_y: (Mt,) long, test_f: (Mq, D) -> predictions (Mq,) long."""
    train_f = F.normalize(train_f.float(), dim=1)
    k = min(k, len(train_f))
    preds = []
    for i in range(0, len(test_f), chunk):
        sim = F.normalize(test_f[i : i + chunk].float(), dim=1) @ train_f.T  # (q, Mt)
        top, idx = sim.topk(k, dim=1)  # (q, k)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of :func:`knn_predict` (shapes as there; test_y: (Mq,) long)."""
    pred = knn_predict(train_f, train_y, test_f, num_classes, k, temperature)
    return float((pred == test_y).float().mean()) if len(test_y) else float("nan")


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, steps: int = 100, weight_decay: float = 1e-4) -> dict:
    """Logistic regression on frozen features (Mt, D) -> {"train_acc", "test_acc"}; L-BFGS, ``steps`` iterations."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    lin = torch.nn.Linear(xtr.shape[1], num_classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {"train_acc": float((lin(xtr).argmax(1) == train_y).float().mean()),
                "test_acc": float((lin(xte).argmax(1) == test_y).float().mean())}
