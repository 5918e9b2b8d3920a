"""The causal check: occlude a candidate's patches (drop their tokens, or fill them with the image's mean
colour) and record the fall of p(class), against a control that occludes as many other patches of the same
image *matched on texture*: each candidate patch is paired with a patch outside the candidate holding the
same number of SIFT keypoints (the closest count when none is left; ties in a seeded random order).

A random control (``control="random"``, the old rule) mostly occludes empty background on small images, so
it rewards any keypoint-rich candidate; the matched control removes that advantage, and a texture the model
does not need for the class scores about zero.

The insertion test (``causal_test`` ``insert`` or ``both``) asks the converse question of the same patches:
pasted at the same places into an image the model predicts as *another* class (a recipient drawn at random,
seeded), how much do they raise p(class), against the same matched control patches pasted into the same
recipient? Occlusion is weak for a fine-tuned encoder whose core features also predict the class: on an
aligned image, removing the marker leaves the object, and p(class) barely moves. Insertion measures the marker
where nothing else supports the class, and a word the model does not use for the class raises it no more
than its control.

The cross-class test (``causal_test`` ``cross``) occludes the same way, on images *labelled* as another class
that hold the word, and records the fall of p(class) there against the same kind of matched control (a flag
needs it as well as occlusion; :mod:`~siftlens.shortcuts.discovery.decision`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ...data import ImageSource
from ...errors import ConfigError
from ...keypoints import keypoint_patches
from ...models.backend import Backend
from ...progress import progress_bar
from ..interventions import forward_drop
from .config import DiscoveryConfig
from .decision import CROSS_COLUMNS, EXCESS_COLUMNS, INSERT_COLUMNS, paired_effect, tests_of
from .features import Features, load_pixels


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


def paste_patches(dst: np.ndarray, src: np.ndarray, flags: np.ndarray, P: int, grid: tuple[int, int]) -> np.ndarray:
    """``dst`` with ``src``'s flagged patches pasted at the same places. dst, src (B, H, W, 3) uint8, flags (B, N)
    bool over the (gh, gw) patch grid -> (B, H, W, 3) uint8."""
    gh, gw = grid
    mask = flags.reshape(len(flags), gh, gw).repeat(P, 1).repeat(P, 2)
    out = dst.copy()
    out[:, : gh * P, : gw * P][mask] = src[:, : gh * P, : gw * P][mask]
    return out


def class_probs(backend: Backend, pixels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """p(class) of the plain forward: pixels (B, H, W, 3) uint8, classes (B,) -> (B,) float."""
    logits = backend.forward(backend.normalize(torch.from_numpy(pixels)))
    if logits is None:
        raise ConfigError("the causal check needs a classifier: this model has no classification head")
    p = logits.float().softmax(-1).cpu().numpy()
    return p[np.arange(len(p)), classes]


def occlude_probs(
    backend: Backend, pixels: np.ndarray, flags: np.ndarray, classes: np.ndarray, occlude: str = "drop",
    drop_mode: str = "group",
) -> np.ndarray:
    """p(class) after occluding the flagged patches. pixels (B, H, W, 3) uint8, flags (B, N) bool,
    classes (B,) -> (B,) float. ``drop`` removes the tokens; ``mean`` fills the patches with the image's
    mean colour."""
    if occlude == "mean":
        mean = pixels.reshape(len(pixels), -1, 3).mean(1).round().astype(np.uint8)
        filled = np.broadcast_to(mean[:, None, None, :], pixels.shape)
        return class_probs(backend, paste_patches(pixels, filled, flags, backend.patch_size, backend.grid_size),
                           classes)
    x = backend.normalize(torch.from_numpy(pixels))
    p = forward_drop(backend, x, torch.from_numpy(flags), drop_mode).float().softmax(-1).cpu().numpy()
    return p[np.arange(len(p)), classes]


@dataclass
class Job:
    """One image of one checked candidate: the candidate's row label, its class, the image (a feature row holding
    the word: predicted as the class, or with ``cross`` labelled as another class), the word's patches and their
    matched control (N,) bool, and the recipient of the insertion test (a feature row predicted as another class;
    -1 when not inserting)."""

    label: object
    cls: int
    image: int
    word: np.ndarray
    control: np.ndarray
    recipient: int = -1
    cross: bool = False


def plan_jobs(f: Features, cands: pd.DataFrame, cfg: DiscoveryConfig, counts: np.ndarray,
              geometry: tuple[int, tuple[int, int]]) -> list[Job]:
    """Up to ``cfg.causal_images`` donor images per candidate, each with its matched control and, when the
    decision needs the insertion test, a random recipient predicted as another class; with the cross-class test
    also up to ``cfg.causal_images`` images labelled as another class that hold the word. counts (n, N):
    keypoints per patch for the matched control; geometry: the model's patch size and (g_h, g_w) grid."""
    rngs = (np.random.default_rng(cfg.run.seed + 7),  # donors and their controls
            np.random.default_rng(cfg.run.seed + 11),  # recipients: a stream of their own, occlusion's is unchanged
            np.random.default_rng(cfg.run.seed + 13))  # the cross-class images: likewise
    jobs = []
    for lab, r in cands.iterrows():
        jobs += _candidate_jobs(f, lab, int(r["class_index"]), int(r["word"]), cfg, counts, geometry, rngs)
    return jobs


def _candidate_jobs(f: Features, lab, c: int, v: int, cfg: DiscoveryConfig, counts: np.ndarray,
                    geometry: tuple[int, tuple[int, int]], rngs: tuple[np.random.Generator, ...]) -> list[Job]:
    """The jobs of one candidate (class ``c``, word ``v``; row label ``lab``): see :func:`plan_jobs`."""
    rng, pick, xrng = rngs
    tests = tests_of(cfg.causal_test)
    kps = np.flatnonzero(f.words == v)
    holding = np.unique(f.kp_image[kps])
    others = np.flatnonzero(f.preds != c)

    def job(i: int, r: np.random.Generator, **kw) -> Job:
        k = kps[f.kp_image[kps] == i]  # a region word's pseudo-keypoint: its patch's centre, size P (one patch)
        word = keypoint_patches(f.kp_xy[k], f.kp_size[k], *geometry, cfg.causal_extent)
        return Job(lab, c, int(i), word, matched_control(word, counts[i], r, cfg.control), **kw)

    jobs = []
    for i in _sample(holding[f.preds[holding] == c], cfg.causal_images, rng):
        recipient = int(pick.choice(others)) if "insert" in tests and len(others) else -1
        jobs.append(job(i, rng, recipient=recipient))
    if "cross" in tests:
        labelled = holding[(f.labels[holding] >= 0) & (f.labels[holding] != c)]
        if cfg.cross_select == "pulled":  # the images the model leans most towards c
            picked = np.sort(labelled[np.argsort(-f.probs[labelled, c], kind="stable")[: cfg.causal_images]])
        else:
            picked = _sample(labelled, cfg.causal_images, xrng)
        jobs += [job(i, xrng, cross=True) for i in picked]
    return jobs


def _sample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` of ``rows``, drawn without replacement and sorted (all of them when there are no more)."""
    return np.sort(rng.choice(rows, n, replace=False)) if len(rows) > n else rows


@torch.inference_mode()
def causal_check(
    backend: Backend, source: ImageSource, f: Features, cands: pd.DataFrame, cfg: DiscoveryConfig,
    progress: bool = True, texture: Features | None = None, reference: Backend | None = None,
) -> pd.DataFrame:
    """``f``: the features whose words are the candidates (SIFT words, or patch regions); ``texture``: the
    features whose keypoints count for the matched control (default ``f``); ``reference``: a model with the same
    classes and patch grid, whose own paired differences are occluded alongside (the reference test). Adds
    ``causal``, ``drop_fall``, ``control_fall``, ``halved_rate`` (share of the images whose p(class) fell below
    half its value), ``causal_images`` and, from the per-image paired differences, ``effect``,
    ``effect_lo``, ``effect_hi`` and ``p`` (:func:`~siftlens.shortcuts.discovery.decision.paired_effect`) to
    ``cands`` rows; with the insertion test also ``insert_rise``, ``insert_control_rise`` (mean rises of
    p(class) in the recipients) and ``insert_effect``, ``insert_lo``, ``insert_hi``, ``insert_p``; with a
    ``reference`` also ``reference_effect`` and ``excess``, ``excess_lo``, ``excess_hi``, ``excess_p``."""
    N = f.attention.shape[1]
    jobs = plan_jobs(f, cands, cfg, patch_counts(f if texture is None else texture, N),
                     (backend.patch_size, tuple(backend.grid_size)))
    res: dict = {lab: {k: [] for k in ("w", "c", "flip", "iw", "ic", "xw", "xc", "r")} for lab in cands.index}
    bs = max(1, cfg.run.batch_size // 2)
    cache: dict[int, np.ndarray] = {}

    def pixels(rows: list[int]) -> np.ndarray:
        for i in rows:
            if i not in cache:
                cache[i] = load_pixels(backend, source, int(f.indices[i]))
        return np.stack([cache[i] for i in rows])

    with progress_bar(progress) as pb:
        task = pb.add_task("causal check", total=len(jobs), info="")
        for s in range(0, len(jobs), bs):
            chunk = jobs[s : s + bs]
            px = pixels([j.image for j in chunk])
            cls = np.array([j.cls for j in chunk])
            flags = np.stack([j.word for j in chunk] + [j.control for j in chunk])
            p = occlude_probs(backend, np.concatenate([px, px]), flags, np.concatenate([cls, cls]),
                              cfg.occlude, cfg.drop_mode)
            if reference is not None:
                reference_differences(reference, chunk, px, flags, cfg, res)
            for k, j in enumerate(chunk):
                base = float(f.probs[j.image, j.cls])
                w, c = ("xw", "xc") if j.cross else ("w", "c")
                res[j.label][w].append(base - p[k])
                res[j.label][c].append(base - p[len(chunk) + k])
                if not j.cross:
                    res[j.label]["flip"].append(p[k] < 0.5 * base)
            insert_rises(backend, f, [(k, j) for k, j in enumerate(chunk) if j.recipient >= 0], px, pixels, res)
            if len(cache) > 4096:
                cache.clear()
            pb.update(task, advance=len(chunk))
    return summarise(cands, res, cfg.run.seed)


def reference_differences(reference: Backend, chunk: list[Job], px: np.ndarray, flags: np.ndarray,
                          cfg: DiscoveryConfig, res: dict) -> None:
    """The reference test of a batch: the same images (px (B, H, W, 3) uint8) with each job's word patches, then its
    control patches (flags (2B, N) bool), occluded in the ``reference`` model; appends, per job predicted as its
    class, the reference's paired difference (word occluded - control occluded falls of p(class), which is p with
    the control occluded minus p with the word occluded) to ``res``."""
    cls = np.array([j.cls for j in chunk])
    p = occlude_probs(reference, np.concatenate([px, px]), flags, np.concatenate([cls, cls]), cfg.occlude,
                      cfg.drop_mode)
    for k, j in enumerate(chunk):
        if not j.cross:
            res[j.label]["r"].append(p[len(chunk) + k] - p[k])


def insert_rises(backend: Backend, f: Features, chunk: list[tuple[int, Job]], donors: np.ndarray, pixels,
                 res: dict) -> None:
    """The insertion test of a batch: each job's word patches, then its control patches, pasted from its donor
    (``donors[k]``, (B, H, W, 3) uint8) into its recipient; appends the rises of p(class) to ``res``."""
    if not chunk:
        return
    rec = pixels([j.recipient for _, j in chunk])
    src = donors[[k for k, _ in chunk]]
    grid = backend.grid_size
    pasted = np.concatenate([
        paste_patches(rec, src, np.stack([j.word for _, j in chunk]), backend.patch_size, grid),
        paste_patches(rec, src, np.stack([j.control for _, j in chunk]), backend.patch_size, grid)])
    cls = np.array([j.cls for _, j in chunk])
    p = class_probs(backend, pasted, np.concatenate([cls, cls]))
    for k, (_, j) in enumerate(chunk):
        base = float(f.probs[j.recipient, j.cls])
        res[j.label]["iw"].append(p[k] - base)
        res[j.label]["ic"].append(p[len(chunk) + k] - base)


def summarise(cands: pd.DataFrame, res: dict, seed: int) -> pd.DataFrame:
    """``cands`` with the causal columns of each row from its per-image falls (``w`` word, ``c`` control), rises
    (``iw``, ``ic``), cross-class falls (``xw``, ``xc``) and the reference's paired differences (``r``) in
    ``res``."""
    out = cands.copy()
    for k, lab in enumerate(cands.index):
        w, c = np.asarray(res[lab]["w"]), np.asarray(res[lab]["c"])
        out.loc[lab, "causal_images"] = len(w)
        out.loc[lab, "drop_fall"] = w.mean() if len(w) else np.nan
        out.loc[lab, "control_fall"] = c.mean() if len(c) else np.nan
        out.loc[lab, "causal"] = (w - c).mean() if len(w) else np.nan
        out.loc[lab, "halved_rate"] = np.mean(res[lab]["flip"]) if len(w) else np.nan
        for col, v in paired_effect(w - c, seed=seed + 1000 + 2 * k, alpha=0.05).items():
            out.loc[lab, col] = v
        iw, ic = np.asarray(res[lab]["iw"]), np.asarray(res[lab]["ic"])
        if len(iw):
            out.loc[lab, "insert_rise"] = iw.mean()
            out.loc[lab, "insert_control_rise"] = ic.mean()
            _put(out, lab, INSERT_COLUMNS, paired_effect(iw - ic, seed=seed + 1001 + 2 * k, alpha=0.05))
        r = np.asarray(res[lab]["r"])
        if len(r):
            out.loc[lab, "reference_effect"] = r.mean()
            _put(out, lab, EXCESS_COLUMNS, paired_effect((w - c) - r, seed=seed + 7000 + k, alpha=0.05))
        xw, xc = np.asarray(res[lab]["xw"]), np.asarray(res[lab]["xc"])
        if len(xw):
            out.loc[lab, "cross_fall"] = xw.mean()
            out.loc[lab, "cross_control_fall"] = xc.mean()
            # a control that raises p(class) removed the label's own evidence, not the class's: it counts as no fall
            _put(out, lab, CROSS_COLUMNS, paired_effect(xw - np.maximum(xc, 0.0), seed=seed + 5000 + k, alpha=0.05))
    return out


def _put(out: pd.DataFrame, lab, names: tuple[str, ...], eff: dict) -> None:
    """A second test's :func:`~siftlens.shortcuts.discovery.decision.paired_effect` into row ``lab`` under its own
    column ``names`` (effect, lower, upper, p)."""
    for col, name in zip(("effect", "effect_lo", "effect_hi", "p"), names, strict=True):
        out.loc[lab, name] = eff[col]
