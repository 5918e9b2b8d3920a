"""The causal check: occlude a candidate's patches (drop their tokens, or fill them with the image's mean
colour) and record the fall of p(class), against a control that occludes as many other patches of the same
image *matched on texture*: each candidate patch is paired with a patch outside the candidate holding the
same number of SIFT keypoints (the closest count when none is left; ties in a seeded random order).

A random control (``control="random"``, the old rule) mostly occludes empty background on small images, so
it rewards any keypoint-rich candidate; the matched control removes that advantage, and a texture the model
does not need for the class scores about zero."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ...data import ImageSource
from ...errors import ConfigError
from ...models.backend import Backend
from ...progress import progress_bar
from ..interventions import forward_drop
from .config import DiscoveryConfig
from .decision import paired_effect
from .features import Features, load_pixels, word_patches


def patch_counts(f: Features, N: int) -> np.ndarray:
    """Keypoints per patch of every image: (n, N) float (all keypoints, whatever their word)."""
    counts = np.zeros((len(f.names), N))
    np.add.at(counts, (f.kp_image, f.kp_patch), 1.0)
    return counts


def matched_control(flag: np.ndarray, counts: np.ndarray, rng: np.random.Generator, control: str = "matched"
                    ) -> np.ndarray:
    """Control patches (N,) bool for one image: as many as ``flag`` holds, outside it. ``matched``: every
    flagged patch (visited in a random order) takes the free patch whose keypoint count is closest to its
    own (ties random); ``random``: uniformly drawn free patches."""
    free = np.flatnonzero(~flag)
    m = min(int(flag.sum()), len(free))
    ctrl = np.zeros(len(flag), bool)
    if m == 0:
        return ctrl
    if control == "random":
        ctrl[rng.choice(free, m, replace=False)] = True
        return ctrl
    tie = rng.random(len(free))
    avail = np.ones(len(free), bool)
    for p in rng.permutation(np.flatnonzero(flag))[:m]:
        gap = np.abs(counts[free] - counts[p]) + tie  # tie < 1 never beats a whole keypoint of difference
        gap[~avail] = np.inf
        j = int(np.argmin(gap))
        avail[j] = False
        ctrl[free[j]] = True
    return ctrl


def occlude_probs(
    backend: Backend, pixels: np.ndarray, flags: np.ndarray, classes: np.ndarray, occlude: str = "drop",
    drop_mode: str = "group",
) -> np.ndarray:
    """p(class) after occluding the flagged patches. pixels (B, H, W, 3) uint8, flags (B, N) bool,
    classes (B,) -> (B,) float. ``drop`` removes the tokens; ``mean`` fills the patches with the image's
    mean colour."""
    P, gw = backend.patch_size, backend.grid_size[1]
    if occlude == "mean":
        px = pixels.copy()
        mean = pixels.reshape(len(pixels), -1, 3).mean(1).round().astype(np.uint8)
        for b, p in zip(*np.nonzero(flags), strict=True):
            r, c = divmod(int(p), gw)
            px[b, r * P : (r + 1) * P, c * P : (c + 1) * P] = mean[b]
        logits = backend.forward(backend.normalize(torch.from_numpy(px)))
        if logits is None:
            raise ConfigError("occlusion needs a classifier: this model has no classification head")
    else:
        x = backend.normalize(torch.from_numpy(pixels))
        logits = forward_drop(backend, x, torch.from_numpy(flags), drop_mode)
    p = logits.float().softmax(-1).cpu().numpy()
    return p[np.arange(len(p)), classes]


@torch.inference_mode()
def causal_check(
    backend: Backend, source: ImageSource, f: Features, cands: pd.DataFrame, K: int, cfg: DiscoveryConfig,
    progress: bool = True, texture: Features | None = None,
) -> pd.DataFrame:
    """``f``: the features whose words are the candidates (SIFT words, or patch regions); ``texture``: the
    features whose keypoints count for the matched control (default ``f``). Adds ``causal``, ``drop_fall``,
    ``control_fall``, ``halved_rate`` (share of the images whose p(class)
    fell below half its value), ``causal_images`` and, from the per-image paired differences, ``effect``,
    ``effect_lo``, ``effect_hi`` and ``p`` (:func:`~siftlens.shortcuts.discovery.decision.paired_effect`) to
    ``cands`` rows."""
    n, N = f.attention.shape
    ti, tv, tp = word_patches(f, K, N)
    counts = patch_counts(f if texture is None else texture, N)
    rng = np.random.default_rng(cfg.run.seed + 7)
    jobs = []  # (candidate row label, feature row, flags word, flags control)
    for lab, r in cands.iterrows():
        c, v = int(r["class_index"]), int(r["word"])
        sel = tv == v
        imgs = np.unique(ti[sel])
        imgs = imgs[f.preds[imgs] == c]
        if len(imgs) > cfg.causal_images:
            imgs = np.sort(rng.choice(imgs, cfg.causal_images, replace=False))
        for i in imgs:
            flag = np.zeros(N, bool)
            flag[tp[sel & (ti == i)]] = True
            ctrl = matched_control(flag, counts[i], rng, cfg.control)
            jobs.append((lab, int(i), flag, ctrl))
    res: dict = {lab: {"w": [], "c": [], "flip": []} for lab in cands.index}
    bs = max(1, cfg.run.batch_size // 2)
    cache: dict[int, np.ndarray] = {}
    with progress_bar(progress) as pb:
        task = pb.add_task("occlusion", total=len(jobs), info="")
        for s in range(0, len(jobs), bs):
            chunk = jobs[s : s + bs]
            for _, i, _, _ in chunk:
                if i not in cache:
                    cache[i] = load_pixels(backend, source, int(f.indices[i]))
            px = np.stack([cache[i] for _, i, _, _ in chunk])
            cls = np.array([int(cands.loc[lab, "class_index"]) for lab, _, _, _ in chunk])
            flags = np.concatenate([np.stack([j[2] for j in chunk]), np.stack([j[3] for j in chunk])])
            p = occlude_probs(backend, np.concatenate([px, px]), flags, np.concatenate([cls, cls]),
                              cfg.occlude, cfg.drop_mode)
            m = len(chunk)
            for k, (lab, i, _, _) in enumerate(chunk):
                base = float(f.probs[i, cls[k]])
                res[lab]["w"].append(base - p[k])
                res[lab]["c"].append(base - p[m + k])
                res[lab]["flip"].append(p[k] < 0.5 * base)
            if len(cache) > 4096:
                cache.clear()
            pb.update(task, advance=len(chunk))
    out = cands.copy()
    for k, lab in enumerate(cands.index):
        w, c = np.asarray(res[lab]["w"]), np.asarray(res[lab]["c"])
        out.loc[lab, "causal_images"] = len(w)
        out.loc[lab, "drop_fall"] = w.mean() if len(w) else np.nan
        out.loc[lab, "control_fall"] = c.mean() if len(c) else np.nan
        out.loc[lab, "causal"] = (w - c).mean() if len(w) else np.nan
        out.loc[lab, "halved_rate"] = np.mean(res[lab]["flip"]) if len(w) else np.nan
        for col, v in paired_effect(w - c, seed=cfg.run.seed + 1000 + 2 * k, alpha=0.05).items():
            out.loc[lab, col] = v
    return out
