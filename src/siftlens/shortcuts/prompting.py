"""Inference-time prompting: per-image token interventions built from keypoints, with no retraining;
classify every image before and after the intervention of a policy and return data.

Policies (METHOD.md section 4):

- ``drop``: remove the patch tokens *flagged* by a discovery output, i.e. the patches holding a keypoint
  whose visual word is among each class's ``top_words`` best *flagged* candidates (union over classes; a class
  with no flagged candidate adds nothing, so on a model without a shortcut nothing is dropped), optionally
  grown by ``dilate`` patches; kept tokens keep their position embeddings;
- ``keep-top``: keep only the ``ceil(q * N)`` patches with the largest semantic weight (keypoints per
  patch, ``scheme``); with a discovery output, keypoints of flagged words do not count;
- ``bias``: add ``beta * log(eps + c_j)`` to the attention logits of patch key j (``c_j`` the keypoint
  concentration, flagged keypoints excluded; shifted by its value at uniform concentration, see
  :func:`~siftlens.shortcuts.interventions.semantic_bias`) and, with a discovery output, ``flag_bias`` to flagged
  keys, in the blocks ``layers`` (None = all).

Every image is classified before and after; :func:`group_accuracy` gives overall, per-group and worst-group
accuracy. Groups come from a SpuriousCIFAR sidecar (``<class>|aligned`` or ``<class>|conflicting``) when
the image folder holds one (or ``groups`` names it), else the true class.

On a repaired model folder (one that carries its drop, :mod:`siftlens.shortcuts.artefact`) the policy applies on
top of the folder's own drop: ``before`` is the model as used, with its drop; a patch removed by both is removed
once, so ``drop`` with the folder's own flag options changes nothing.

Which patches are flagged is :func:`siftlens.shortcuts.flags.flag_patches` (global word set, ``extent`` center
by default); group accuracy is :mod:`siftlens.shortcuts.groups`; the token interventions are
:mod:`siftlens.shortcuts.interventions`, shared with discovery's causal check and repair.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..data import ImageSource
from ..errors import ConfigError
from ..io import atomic_path, write_json
from ..keypoints import SCHEMES, Keypoints, SiftOptions, SiftParams, sift_params, weight_map
from ..loading import KeypointDataset, make_loader, one_cv2_thread_per_worker
from ..models import load_backend
from ..models.backend import Backend
from ..models.layers import parse_layers
from ..options import RunOptions, group, option
from ..progress import progress_bar
from .discovery.features import model_labels
from .discovery.vocabulary import Vocabulary, load_vocabulary
from .flags import FlagOptions, flag_patches, word_sets
from .groups import by_alignment, find_sidecar, format_alignment, group_accuracy, image_groups, read_sidecar
from .interventions import DROP_MODES, forward_bias, forward_drop, keep_top_idx, semantic_bias
from .record import config_record

POLICIES = ("none", "drop", "keep-top", "bias")


@dataclass
class PromptConfig:
    """Every parameter of a prompting run (all of it goes into the JSON output); every field with ``cli`` is an
    option of ``siftlens prompt``."""

    policy: str = option("drop", "drop | keep-top | bias | none.")
    candidates: str | None = option(None, "discovery.json (or its folder) from `siftlens discover`: its top words "
                                          "flag patches.")
    flags: FlagOptions = group(FlagOptions)
    q: float = option(0.5, "keep-top: fraction of patches kept.")
    beta: float = option(1.0, "bias: strength of the semantic prior beta * log(eps + c_j).")
    eps: float = option(1e-3, "bias: eps in log(eps + c_j).")
    flag_bias: float = option(-1e4, "bias: added to the logits of flagged keys.")
    layers: list[int] | None = option(None, "bias: comma-separated layers (negative from the end); default all.",
                                      parse=parse_layers)
    drop_mode: str = option("group", "group (exact removal, one forward per kept count) or mask (-inf key mask).")
    scheme: str = option("count", "Semantic weight per patch: count | response | footprint.")
    groups: str | None = option(None, "SpuriousCIFAR markers.json for groups (default: the one in --images, else "
                                      "groups are classes).")
    sift: SiftOptions = group(SiftOptions)
    run: RunOptions = group(RunOptions, helps={"batch_size": "Images per forward pass.",
                                               "seed": "Seed of tie-breaking in keep-top."}, batch_size=64)

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.policy == "drop" and not self.candidates:
            raise ConfigError("--policy drop needs --candidates (the discovery.json of `siftlens discover`)")
        if self.drop_mode not in DROP_MODES:
            raise ConfigError(f"--drop-mode must be one of {', '.join(DROP_MODES)}, not {self.drop_mode!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"--scheme must be one of {', '.join(SCHEMES)}, not {self.scheme!r}")
        if not 0.0 < self.q <= 1.0:
            raise ConfigError(f"--q must be in (0, 1], got {self.q}")
        if self.eps <= 0:
            raise ConfigError(f"--eps must be > 0, got {self.eps}")
        self.flags.validate()
        if self.run.batch_size < 1 or self.run.workers < 0:
            raise ConfigError("--batch-size must be >= 1, --workers >= 0")


@dataclass
class PromptResult:
    """before/after: :func:`group_accuracy` dicts; images: per-image table; summary: the JSON written."""

    before: dict
    after: dict
    images: pd.DataFrame
    summary: dict

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "predictions.csv") as tmp:
            self.images.to_csv(tmp, index=False, float_format="%.6g")
        return {"json": write_json(out / "prompting.json", self.summary), "predictions": out / "predictions.csv"}


@dataclass
class _Inputs:
    """What a prompting run reads before it classifies: the model, the images and their model labels, the
    discovery's vocabulary and flagged words, the group sidecar and the SIFT parameters."""

    backend: Backend
    source: ImageSource
    labels: np.ndarray
    vocab: Vocabulary | None
    flagged: set[int]
    side: Path | None
    sidecar: dict | None
    sift: SiftParams


@torch.inference_mode()
def prompt(
    model: str | Backend,
    images: str | Path | list | ImageSource,
    config: PromptConfig | None = None,
    *,
    weights: str | None = None,
    progress: bool = True,
) -> PromptResult:
    """Classify ``images`` before and after the intervention of ``config.policy``; returns data (see
    :meth:`PromptResult.save`). weights: a weights file for ``timm:<name>``."""
    cfg = config or PromptConfig()
    cfg.validate()
    t0 = time.time()
    inp = _read_inputs(model, images, cfg, weights)
    rows, skipped = _classify(inp, cfg, progress)
    if not rows:
        raise ConfigError(f"no image of {inp.source.spec!s} could be read (all {len(skipped)} were skipped)")
    df = pd.DataFrame(rows)
    df["group"] = image_groups(df["name"].tolist(), df["label"].tolist(), inp.sidecar)
    df["correct_before"] = df["pred_before"] == df["label_index"]
    df["correct_after"] = df["pred_after"] == df["label_index"]
    before_acc = group_accuracy(df["correct_before"].to_numpy(), df["group"].tolist())
    after_acc = group_accuracy(df["correct_after"].to_numpy(), df["group"].tolist())
    summary = _summary(inp, cfg, df, skipped, before_acc, after_acc)
    summary["timing"] = {"seconds": round(time.time() - t0, 3)}
    return PromptResult(before_acc, after_acc, df, summary)


def _read_inputs(model: str | Backend, images, cfg: PromptConfig, weights: str | None) -> _Inputs:
    backend = model if isinstance(model, Backend) else load_backend(model, cfg.run.device, weights=weights)
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.run.limit)
    labels = model_labels(source, backend)
    if source.labels is None:
        raise ConfigError(f"{source.spec!s} is not in ImageFolder layout (<class>/<image>); accuracy needs labels")
    if (labels < 0).any():
        raise ConfigError("some class folders are not classes of the model; name the folders as the model's classes")
    vocab = load_vocabulary(cfg.candidates) if cfg.candidates else None
    flagged = (word_sets(vocab, cfg.flags.top_words, cfg.flags.score_ratio, flagged_only=cfg.flags.flagged_only)[0]
               if vocab is not None else set())
    sidecar = None
    side = Path(cfg.groups) if cfg.groups else (find_sidecar(source.spec) if isinstance(source.spec, (str, Path))
                                                else None)
    if side is not None:
        sidecar = read_sidecar(side)
    sift = sift_params(backend.input_size, cfg.sift)
    return _Inputs(backend, source, labels, vocab, flagged, side, sidecar, sift)


def _classify(inp: _Inputs, cfg: PromptConfig, progress: bool) -> tuple[list[dict], list[dict]]:
    """One row per readable image (predictions and probabilities before and after); the skipped images."""
    backend, source, labels = inp.backend, inp.source, inp.labels
    P, grid = backend.patch_size, tuple(backend.grid_size)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    loader = make_loader(KeypointDataset(source, backend, None, inp.sift, descriptors=True), cfg.run)
    rows = []
    skipped = []
    names = source.names
    cls_names = list(backend.class_names or [str(i) for i in range(int(labels.max()) + 1)])
    with progress_bar(progress) as pb, one_cv2_thread_per_worker(cfg.run.workers):
        task = pb.add_task(f"prompt {cfg.policy}", total=len(source), info="")
        for items in loader:
            good = [it for it in items if "skip" not in it]
            skipped += [{"name": names[it["index"]], "reason": it["skip"]} for it in items if "skip" in it]
            if good:
                x = backend.normalize(torch.from_numpy(np.stack([it["pixels"] for it in good])))
                fl = flag_patches(backend, x, good, inp.vocab, [inp.flagged], cfg.flags.extent, cfg.flags.dilate)
                flag = fl.patches
                w = torch.from_numpy(np.stack([semantic_weights(it, k, P, grid, cfg.scheme)
                                               for it, k in zip(good, fl.keypoints, strict=True)]))
                before = backend.forward(x)
                if before is None:
                    raise ConfigError("prompting needs a classifier: this model has no classification head")
                after, removed = _intervene(backend, x, before, (flag, w), cfg, gen, inp.vocab is not None)
                pb_, pa = before.float().softmax(-1).cpu(), after.float().softmax(-1).cpu()
                for k, it in enumerate(good):
                    i = it["index"]
                    y = int(labels[i])
                    rows.append({"name": names[i], "label": cls_names[y], "label_index": y,
                                 "pred_before": int(pb_[k].argmax()), "pred_after": int(pa[k].argmax()),
                                 "p_true_before": float(pb_[k, y]), "p_true_after": float(pa[k, y]),
                                 "flagged_patches": int(flag[k].sum()), "removed_patches": int(removed[k]),
                                 "keypoints": len(it["xy"])})
            pb.update(task, advance=len(items), info=f"{len(rows)} images")
    return rows, skipped


def semantic_weights(it: dict, flagged: np.ndarray, P: int, grid: tuple[int, int], scheme: str) -> np.ndarray:
    """(N,) semantic weight per patch from the keypoints of item ``it`` (``xy``, ``size``, ``response``) that are
    not ``flagged`` ((k,) bool); scheme: of :func:`~siftlens.keypoints.weight_map`."""
    keep = ~flagged
    kp = Keypoints(it["xy"][keep], it["size"][keep], np.asarray(it["response"], np.float32)[keep],
                   np.zeros(int(keep.sum()), np.float32))
    return weight_map(kp, P, grid, scheme)


def _intervene(
    backend: Backend, x: torch.Tensor, before: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor],
    cfg: PromptConfig, gen: torch.Generator, with_vocab: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) after the intervention of ``cfg.policy`` and the patches removed per image (B,).

    masks: (flag (B, N) bool of flagged patches, semantic weight (B, N)); before: the plain logits."""
    flag, w = masks
    N = flag.shape[1]
    removed = torch.zeros(len(x))
    if cfg.policy == "none":
        after = before
    elif cfg.policy == "drop":
        after = forward_drop(backend, x, flag, cfg.drop_mode)
        removed = (flag & ~flag.all(1, keepdim=True)).sum(1).float()
    elif cfg.policy == "keep-top":
        keep = keep_top_idx(w, cfg.q, gen)
        after = backend.forward_intervened(x, keep_idx=keep.to(x.device))
        removed = torch.full((len(x),), float(N - keep.shape[1]))
    else:
        bias = semantic_bias(w, cfg.beta, cfg.eps)
        if with_vocab:
            bias = bias + flag.float() * cfg.flag_bias
        after = forward_bias(backend, x, bias, cfg.layers)
    return after, removed


def _summary(inp: _Inputs, cfg: PromptConfig, df: pd.DataFrame, skipped: list[dict], before_acc: dict,
             after_acc: dict) -> dict:
    """The JSON written as ``prompting.json`` (its ``timing`` is added by the caller)."""
    backend, sift = inp.backend, inp.sift
    grid = tuple(backend.grid_size)
    return {
        "kind": "siftlens-prompting", "siftlens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config_record(cfg), "model": backend.describe(),
        "sift": {**asdict(sift), "upsample_used": sift.upsample},
        "flagged_words": sorted(inp.flagged),
        "groups_from": str(inp.side) if inp.side is not None else "class",
        "images": {"source": str(inp.source.spec), "evaluated": len(df), "skipped": len(skipped),
                   "skipped_reasons": skipped[:500]},
        "interventions": {"mean_flagged_patches": float(df["flagged_patches"].mean()),
                          "mean_removed_patches": float(df["removed_patches"].mean()),
                          "images_with_flags": int((df["flagged_patches"] > 0).sum()),
                          "patches": grid[0] * grid[1]},
        "before": before_acc, "after": after_acc,
        "delta": {"overall": after_acc["overall"] - before_acc["overall"],
                  "worst_group": (after_acc["worst_group"]["accuracy"] - before_acc["worst_group"]["accuracy"])
                  if before_acc["worst_group"] and after_acc["worst_group"] else None},
    }


def format_summary(s: dict) -> str:
    """A few lines for the terminal: overall and worst-group accuracy before and after."""
    b, a = s["before"], s["after"]
    lines = [f"policy {s['config']['policy']}: {s['images']['evaluated']} images, "
             f"{s['interventions']['mean_removed_patches']:.2f} of {s['interventions']['patches']} patches "
             "removed per image on average"]
    lines.append(f"  accuracy     before {b['overall']:.4f}  after {a['overall']:.4f}  "
                 f"({a['overall'] - b['overall']:+.4f})")
    if b["worst_group"] and a["worst_group"]:
        lines.append(f"  worst group  before {b['worst_group']['accuracy']:.4f} ({b['worst_group']['name']})  "
                     f"after {a['worst_group']['accuracy']:.4f} ({a['worst_group']['name']})")
    if by_alignment(b) is not None:
        lines.append(f"  before       {format_alignment(by_alignment(b))}")
        lines.append(f"  after        {format_alignment(by_alignment(a))}")
    return "\n".join(lines)
