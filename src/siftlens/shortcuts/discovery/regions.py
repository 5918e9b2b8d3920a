"""Region candidates: every patch gets a *region word*, the nearest of R centres (k-means) of the model's own
patch tokens, so a candidate covers the whole shortcut, weakly textured parts included, not only the
patches where SIFT fires.

Patch tokens: the output of block ``layer`` (``0``: the patch embedding before position embeddings, i.e.
pure appearance; ``-1``: the last block), L2-normalised, for the project's own ViT (native backend).

Region words join the SIFT words in one candidate space: word ids ``0..K-1`` are SIFT words, ``K..K+R-1``
regions. Each patch of each image becomes one pseudo-keypoint at the patch centre with that id, so the
same statistics, causal check, ranking, galleries and evaluation apply to both kinds.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data import ImageSource
from ...errors import ConfigError
from ...models.backend import Backend
from .config import DiscoveryConfig
from .features import Features, load_pixels
from .vocabulary import assign, kmeans


def _blocks(backend: Backend):
    model = backend.model
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed") and backend.kind == "native"):
        raise ConfigError("region candidates need a siftlens ViT (native backend); pass --regions 0")
    return model


@torch.inference_mode()
def patch_tokens(backend: Backend, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """x: (B, 3, H, W) normalised -> L2-normalised patch tokens (B, N, D) after block ``layer`` (0: patch
    embedding, no position)."""
    model = _blocks(backend)
    T = backend.num_prefix_tokens
    if layer == 0:
        t = model.patch_embed(x).flatten(2).transpose(1, 2)
    else:
        li = layer - 1 if layer > 0 else len(model.blocks) + layer
        got: dict[str, torch.Tensor] = {}
        h = model.blocks[li].register_forward_hook(lambda m, a, out: got.__setitem__("t", out))
        try:
            model.forward_features(x)  # the network's blocks on every patch (no head: a model's call may do more)
        finally:
            h.remove()
        t = got["t"][:, T:]
    return torch.nn.functional.normalize(t.float(), dim=-1)


def region_words(backend: Backend, x: torch.Tensor, centers: torch.Tensor, layer: int) -> np.ndarray:
    """(B, N) int64: the nearest region centre of every patch."""
    t = patch_tokens(backend, x, layer).cpu()
    B, N, D = t.shape
    return assign(t.reshape(-1, D), centers)[0].view(B, N).numpy()


@torch.inference_mode()
def region_features(
    backend: Backend, source: ImageSource, f: Features, cfg: DiscoveryConfig, K: int
) -> tuple[Features, torch.Tensor]:
    """Pseudo-keypoint features of the region words (ids offset by ``K``) and the centres (R, D)."""
    N = backend.num_patches
    toks = []
    for s in range(0, len(f.names), cfg.run.batch_size):
        idx = f.indices[s : s + cfg.run.batch_size]
        px = np.stack([load_pixels(backend, source, int(i)) for i in idx])
        x = backend.normalize(torch.from_numpy(px))
        toks.append(patch_tokens(backend, x, cfg.region_layer).cpu().half())
    t = torch.cat(toks).float()
    n, _, D = t.shape
    flat = t.reshape(-1, D)
    rng = np.random.default_rng(cfg.run.seed + 11)
    sample = flat if len(flat) <= cfg.vocab_sample else flat[torch.from_numpy(
        np.sort(rng.choice(len(flat), cfg.vocab_sample, replace=False)))]
    centers = kmeans(sample, cfg.regions, cfg.kmeans_iters, cfg.run.seed)
    words = assign(flat, centers)[0].numpy() + K
    centres_xy = backend.patch_centers().numpy().astype(np.float32)  # (N, 2) x, y in pixels
    rf = Features(
        names=f.names, indices=f.indices, labels=f.labels, preds=f.preds, probs=f.probs, attention=f.attention,
        kp_image=np.repeat(np.arange(n), N), kp_xy=np.tile(centres_xy, (n, 1)),
        kp_size=np.full(n * N, float(backend.patch_size), np.float32), kp_patch=np.tile(np.arange(N), n),
        kp_desc=np.zeros((0, 128), np.uint8), words=words,
    )
    return rf, centers


def merge_features(f: Features, rf: Features) -> Features:
    """SIFT keypoints followed by the region pseudo-keypoints (same images)."""
    assert f.words is not None and rf.words is not None
    cat = np.concatenate
    inside = None
    if f.kp_inside is not None:
        inside = cat([f.kp_inside, np.zeros(len(rf.kp_image), bool)])
    return Features(
        names=f.names, indices=f.indices, labels=f.labels, preds=f.preds, probs=f.probs, attention=f.attention,
        kp_image=cat([f.kp_image, rf.kp_image]), kp_xy=cat([f.kp_xy, rf.kp_xy]),
        kp_size=cat([f.kp_size, rf.kp_size]), kp_patch=cat([f.kp_patch, rf.kp_patch]), kp_desc=f.kp_desc,
        kp_inside=inside, words=cat([f.words, rf.words]), skipped=f.skipped,
    )
