"""The published baselines a shortcut repair is compared with, run on the same encoder and data as siftlens's own
methods (docs/spurious.md, "Label-free anchors"):

- :func:`jtt`, Just Train Twice (Liu et al. 2021, arXiv 2107.09044), label-free: a short ERM run (the first
  ``erm_epochs`` epochs of the full schedule, or a given ERM model) names its misclassified training images; the
  model is trained again from the same starting point on the training images with each error repeated
  ``lambda_up`` times (JTT's own upsampling: weight ``lambda_up`` for an error, 1 for the rest), by
  :func:`siftlens.training.train` with the same configuration. ``error_set="discovery"`` is siftlens's own variant,
  still label-free: the upweighted images are those that carry another class's flagged candidates of a discovery
  output (:func:`flagged_conflicting`, repair's pseudo-groups), not the identifier's errors.
- :func:`afr`, Automatic Feature Reweighting (Qiu et al. 2023, arXiv 2306.11074), label-free: the ERM model's
  features are frozen; on held-out training images the head is refitted from ERM's, full batch (L-BFGS), on the
  cross-entropy weighted by ``exp(-gamma * p_ERM(y|x))`` (normalised to sum 1), plus ``pull`` times the squared
  L2 distance of the head's weight and bias from ERM's (the paper's code: ``reg_coeff * ||theta - theta_ERM||^2``).
  ``gamma = 0`` and ``pull = 0`` is the plain refit.
- :func:`dfr`, Deep Feature Reweighting (Kirichenko et al. 2022, arXiv 2204.02937) with the TRUE groups of the
  images' ``markers.json``: a new head fitted on a group-balanced held-out set (by default DFR's own: equal-size
  random subsets of every (class, group) cell, the heads of ``draws`` subsets averaged). It needs group labels, so
  it is the upper reference, never a label-free method (``label_free: false`` in its record).

Every function has the shortcut jobs' shape ``fn(model, images, config=None, *, progress=True) -> AnchorResult``
and writes nothing; :meth:`AnchorResult.save` writes a normal siftlens model folder, ``anchor.json`` and the
per-image weights (``weights.csv``). Hyper-parameters are chosen on validation builds by the benchmark; the
defaults here are the papers' (see each config).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data import ImageSource, load_labelled_array
from ..errors import ConfigError
from ..io import write_json
from ..models import load_backend
from ..models.backend import Backend
from ..models.vit import ViT, load_vit, save_vit
from ..options import RunOptions, group, option
from ..training import TrainConfig, train
from ..training.images import normalize
from ..training.options import flat_values
from .discovery.vocabulary import load_vocabulary
from .dropping import DroppedBackend
from .flags import FlagOptions
from .groups import find_sidecar, read_sidecar
from .retraining.head import (
    RepairConfig,
    fit_head,
    flagged_batches,
    group_weights,
    pooled_features,
    pseudo_conflicting,
)

METHODS = ("jtt", "afr", "dfr")
ERROR_SETS = ("errors", "discovery")
DFR_GROUPS = ("aligned", "marker")
DFR_BALANCE = ("subsample", "weights")


@dataclass
class JTTConfig:
    """Just Train Twice. Defaults: ``lambda_up`` 50 and ``erm_epochs`` 1, JTT's CelebA setting (its Waterbirds
    setting is 100 and 60 epochs: a full ERM run; the text tasks' 6 and 1-2)."""

    lambda_up: int = option(50, "Weight of each error of the identification run: it appears this many times in "
                                "the second run's training set (JTT's upsampling); the rest appear once.")
    erm_epochs: int = option(1, "Identification run: the first T epochs of the training schedule (T >= epochs: "
                                "the full ERM run).")
    identifier: str | None = option(None, "A trained ERM model (folder) whose errors are upweighted, instead of "
                                          "the identification run.")
    error_set: str = option("errors", "Which images are upweighted: errors (JTT: those the identifier "
                                      "misclassifies) | discovery (siftlens, label-free: those carrying another "
                                      "class's flagged candidates of --candidates, found on --identifier).")
    candidates: str = option("", "--error-set discovery: the discovery.json of `siftlens discover` on --identifier.")
    flags: FlagOptions = group(FlagOptions, helps={
        "top_words": "--error-set discovery: each class's this many best-ranked (flagged) candidates.",
        "score_ratio": "...scoring at least this share of the class's best."},
        top_words=5, score_ratio=0.25, extent="footprint")
    train: TrainConfig = group(TrainConfig)

    def validate(self) -> None:
        if self.lambda_up < 1 or self.erm_epochs < 1:
            raise ConfigError("--lambda-up and --erm-epochs must be >= 1")
        if self.error_set not in ERROR_SETS:
            raise ConfigError(f"--error-set must be one of {', '.join(ERROR_SETS)}, not {self.error_set!r}")
        if self.error_set == "discovery" and not (self.candidates and self.identifier):
            raise ConfigError("--error-set discovery needs --candidates and --identifier (the ERM model discovery "
                              "ran on)")
        self.flags.validate()
        if self.train.session.resume or self.train.session.stop_after is not None:
            raise ConfigError("jtt runs its trainings to the end: --resume and --stop-after do not apply")


@dataclass
class AFRConfig:
    """Automatic Feature Reweighting, last-layer stage. Defaults: ``gamma`` 14 and ``pull`` 0.2, AFR's Waterbirds
    setting (its CelebA setting is 1.8 and 0)."""

    gamma: float = option(14.0, "Weights exp(-gamma * p_ERM(true class)), normalised; 0 = equal weights.")
    pull: float = option(0.2, "Squared-L2 pull of the new head's weight and bias towards the ERM head's (AFR's "
                              "reg_coeff); 0 = none.")
    balance_classes: bool = option(False, "Also give every class the same total weight (AFR's rebalance option).")
    iters: int = option(200, "L-BFGS iterations (full batch, from the ERM head).")
    run: RunOptions = group(RunOptions, helps={"batch_size": "Images per forward pass."}, batch_size=128)

    def validate(self) -> None:
        if self.gamma < 0 or self.pull < 0 or self.iters < 1:
            raise ConfigError("--gamma and --pull must be >= 0, --iters >= 1")


@dataclass
class DFRConfig:
    """Deep Feature Reweighting with the true groups (an upper reference: it reads the images' markers.json). The
    head is a logistic regression with an L2 penalty fitted by L-BFGS (DFR's own uses L1 on standardised
    features)."""

    groups: str = option("aligned", "True groups from markers.json: aligned (class x aligned/conflicting) | "
                                    "marker (class x the marker's class).")
    balance: str = option("subsample", "subsample (DFR: every (class, group) cell drawn down to the smallest, "
                                        "--draws times, the heads averaged) | weights (every image, equal total "
                                        "weight per cell).")
    draws: int = option(10, "subsample: balanced subsets drawn (DFR: 10).")
    l2: float = option(1e-3, "Weight decay of the new head.")
    iters: int = option(200, "L-BFGS iterations.")
    run: RunOptions = group(RunOptions, helps={"batch_size": "Images per forward pass.",
                                               "seed": "Seed of the subsets and the new heads."}, batch_size=128)

    def validate(self) -> None:
        if self.groups not in DFR_GROUPS or self.balance not in DFR_BALANCE:
            raise ConfigError(f"--groups must be one of {', '.join(DFR_GROUPS)} and --balance one of "
                              f"{', '.join(DFR_BALANCE)}")
        if self.draws < 1 or self.l2 < 0 or self.iters < 1:
            raise ConfigError("--draws and --iters must be >= 1, --l2 >= 0")


@dataclass
class AnchorResult:
    """What an anchor returns: the new ``model`` (a siftlens ViT on the CPU), ``record`` (anchor.json: method,
    ``label_free``, config, counts, seconds) and ``table``, one row per fitting image (``name``, ``label``,
    ``weight``, and the method's own columns: JTT ``error``, AFR ``p_erm``, DFR ``group``)."""

    model: ViT
    record: dict = field(repr=False)
    table: pd.DataFrame = field(repr=False)

    @property
    def summary(self) -> pd.DataFrame:
        keys = ("method", "label_free", "images", "errors", "upsampled_images", "train_accuracy", "seconds")
        return pd.DataFrame([{k: self.record[k] for k in keys if k in self.record}])

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``out/model`` (a siftlens model folder), ``out/anchor.json`` and ``out/weights.csv``."""
        out = Path(out)
        extra = {"anchor": {k: self.record[k] for k in ("method", "label_free", "config")}}
        save_vit(self.model.cpu(), out / "model", extra=extra)
        self.table.to_csv(out / "weights.csv", index=False)
        return {"model": out / "model", "json": write_json(out / "anchor.json", self.record),
                "weights": out / "weights.csv"}


# -- shared pieces -------------------------------------------------------------------------------------------------

def _vit(model, device: str) -> ViT:
    """A siftlens ViT from a folder, a ViT or a native Backend, in eval mode on ``device``."""
    if isinstance(model, ViT):
        return model.eval().to(device)
    backend = model if isinstance(model, Backend) else load_backend(model, device)
    if isinstance(backend, DroppedBackend):
        raise ConfigError(f"{backend.source or 'this model'} is a repaired model that drops a shortcut's tokens; the "
                          "anchors start from the model before repair (an ERM model)")
    if backend.kind != "native":
        raise ConfigError("the anchors retrain a siftlens ViT (native backend) only")
    return backend.model.eval().to(device)


def _labelled(source: ImageSource, model: ViT) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The readable images of ``source`` decoded at the model's input size (n, H, W, 3) uint8, their labels as
    the model's class indices (matched by name) and their names."""
    if source.labels is None or source.classes is None:
        raise ConfigError(f"{source.spec!s} is not in ImageFolder layout (root/<class>/<image>)")
    classes = list(model.cfg.class_names or source.classes)
    lut = np.array([classes.index(c) if c in classes else -1 for c in source.classes])
    x, y, skipped = load_labelled_array(source, tuple(model.cfg.img_size))
    bad = {s.split(": ", 1)[0] for s in skipped}
    names = [n for n in source.names if n not in bad]
    y = lut[y]
    if (y < 0).any():
        raise ConfigError(f"{source.spec!s}: class folders {sorted(set(source.classes) - set(classes))} are not "
                          "classes of the model")
    return x, y, names


@torch.no_grad()
def frozen_features(model: ViT, x: np.ndarray, batch_size: int, device: str) -> torch.Tensor:
    """Pooled features (n, D) on the CPU of uint8 images ``x`` (n, H, W, 3), with the model's own pooling."""
    out = []
    n_patches = model.grid_size[0] * model.grid_size[1]
    for s in range(0, len(x), batch_size):
        xb = normalize(torch.from_numpy(x[s : s + batch_size]).to(device), model.cfg.mean, model.cfg.std)
        out.append(pooled_features(model, xb, torch.zeros(len(xb), n_patches, dtype=torch.bool)))
    return torch.cat(out)


def _source(images, limit: int | None) -> ImageSource:
    return images if isinstance(images, ImageSource) else ImageSource(images, limit=limit)


def _record(method: str, cfg, **rest) -> dict:
    return {"kind": "siftlens-anchor", "method": method, "label_free": method != "dfr", "config": flat_values(cfg),
            **rest}


# -- JTT -----------------------------------------------------------------------------------------------------------

def upsampled_folder(source: ImageSource, names: list[str], repeats: np.ndarray, dest: str | os.PathLike) -> int:
    """Write ``dest`` as an ImageFolder holding image ``names[i]`` of ``source`` ``repeats[i]`` times (the first as
    itself, the copies as hard links named ``<stem>~jtt<k><suffix>`` beside it); returns the number of files."""
    dest = Path(dest)
    index = {n: i for i, n in enumerate(source.names)}
    total = 0
    for name, r in zip(names, repeats, strict=True):
        first = dest / name
        first.parent.mkdir(parents=True, exist_ok=True)
        first.write_bytes(source.read_bytes(index[name]))
        for k in range(1, int(r)):
            os.link(first, first.with_name(f"{first.stem}~jtt{k}{first.suffix}"))
        total += int(r)
    return total


def jtt(model, images, config: JTTConfig | None = None, *, progress: bool = True) -> AnchorResult:
    """Just Train Twice on the labelled ImageFolder ``images``; ``model`` is where both trainings start (None: a
    new ViT of ``config.train.shape``; a siftlens ViT or its folder: fine-tuned, as ``train`` does). No group
    labels are read."""
    cfg = config or JTTConfig()
    cfg.validate()
    t0 = time.time()
    tc = cfg.train
    source = _source(images, tc.run.limit)
    if cfg.identifier:
        ident = load_vit(cfg.identifier)
        ident_record = {"identifier": str(cfg.identifier)}
    else:
        short = replace(tc, session=replace(tc.session, stop_after=min(cfg.erm_epochs, tc.optim.epochs)))
        first = train(model, source.spec, short, progress=progress)
        ident = first.model
        ident_record = {"identifier": f"first {len(first.record['epochs'])} epoch(s)",
                        "identification_epochs": first.record["epochs"]}
    ident = _vit(ident, tc.run.device)
    x, y, names = _labelled(source, ident)
    if cfg.error_set == "discovery":
        error = flagged_conflicting(cfg, source, names, y, progress)
    else:
        with torch.no_grad():
            pred = ident.head(frozen_features(ident, x, tc.run.batch_size, tc.run.device).to(tc.run.device))
        error = pred.argmax(1).cpu().numpy() != y
    weight = np.where(error, cfg.lambda_up, 1)
    with tempfile.TemporaryDirectory(prefix="siftlens-jtt-") as tmp:
        n_up = upsampled_folder(source, names, weight, tmp)
        second = train(model, tmp, replace(tc, run=replace(tc.run, limit=None)), progress=progress)
    record = _record("jtt", cfg, error_set=cfg.error_set, images=len(y), errors=int(error.sum()),
                     error_rate=float(error.mean()), upsampled_images=n_up, **ident_record,
                     epochs=second.record["epochs"], seconds=round(time.time() - t0, 2))
    table = pd.DataFrame({"name": names, "label": y, "error": error, "weight": weight})
    return AnchorResult(second.model.eval().cpu(), record, table)


def flagged_conflicting(cfg: JTTConfig, source: ImageSource, names: list[str], y: np.ndarray,
                        progress: bool = True) -> np.ndarray:
    """JTT's error set from discovery instead of errors: (n,) True for the images ``names`` (labels ``y`` (n,), the
    identifier's class indices) that carry flagged candidates of a class other than their own (repair's
    pseudo-groups, flagged by the rule of ``prompt`` and ``repair`` on ``cfg.identifier``'s patch grid)."""
    backend = load_backend(cfg.identifier, cfg.train.run.device)
    flag_cfg = RepairConfig(candidates=cfg.candidates, flags=cfg.flags, sift=cfg.train.sift, run=cfg.train.run)
    shortcut = dict.fromkeys(names, -1)
    for b in flagged_batches(backend, source, load_vocabulary(cfg.candidates), flag_cfg, progress):
        shortcut.update(zip((source.names[i] for i in b["index"]), b["shortcut"].tolist(), strict=True))
    return pseudo_conflicting(np.array([shortcut[n] for n in names]), y)


# -- AFR -----------------------------------------------------------------------------------------------------------

def afr_weights(p_true: torch.Tensor, y: torch.Tensor, gamma: float, balance_classes: bool = False) -> torch.Tensor:
    """AFR's weights: ``exp(-gamma * p_true)`` (times n / n_class with ``balance_classes``), summing to 1."""
    w = torch.exp(-gamma * p_true.double())
    if balance_classes:
        counts = torch.bincount(y).double()
        w = w * len(y) / counts[y]
    return (w / w.sum()).float()


def fit_pulled_head(feats: torch.Tensor, y: torch.Tensor, w: torch.Tensor, start: torch.nn.Linear, pull: float,
                    iters: int) -> torch.nn.Linear:
    """A copy of ``start`` refitted by full-batch L-BFGS on ``sum_i w_i CE_i + pull * ||theta - theta_start||^2``
    (weight and bias; ``w`` sums to 1)."""
    head = torch.nn.Linear(start.in_features, start.out_features)
    head.load_state_dict(start.state_dict())
    anchor = [p.detach().clone() for p in start.parameters()]
    params = list(head.parameters())
    solver = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def objective():
        solver.zero_grad()
        fit = F.cross_entropy(head(feats), y, reduction="none").mul(w).sum()
        total = fit + pull * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
        total.backward()
        return total

    with torch.enable_grad():
        solver.step(objective)
    return head.requires_grad_(False)


def afr(model, images, config: AFRConfig | None = None, *, progress: bool = True) -> AnchorResult:
    """AFR's last-layer stage on held-out training images ``images`` (labelled ImageFolder) for the ERM ``model``
    (a siftlens ViT, its folder or native Backend; not changed). No group labels are read."""
    cfg = config or AFRConfig()
    cfg.validate()
    t0 = time.time()
    erm = _vit(model, cfg.run.device)
    x, y, names = _labelled(_source(images, cfg.run.limit), erm)
    feats, yt = frozen_features(erm, x, cfg.run.batch_size, cfg.run.device), torch.from_numpy(y)
    head = erm.head.cpu()
    with torch.no_grad():
        erm_logits = head(feats)
    p = erm_logits.softmax(1).gather(1, yt[:, None])[:, 0]
    w = afr_weights(p, yt, cfg.gamma, cfg.balance_classes)
    new = fit_pulled_head(feats, yt, w, head, cfg.pull, cfg.iters)
    acc = float((new(feats).argmax(1) == yt).float().mean())
    record = _record("afr", cfg, images=len(y), erm_accuracy=float((erm_logits.argmax(1) == yt).float().mean()),
                     train_accuracy=acc, weight_max_over_mean=float(w.max() * len(w)),
                     seconds=round(time.time() - t0, 2))
    table = pd.DataFrame({"name": names, "label": y, "p_erm": p.numpy(), "weight": w.numpy()})
    return AnchorResult(_copy_with_head(erm, new), record, table)


def _copy_with_head(model: ViT, head: torch.nn.Linear) -> ViT:
    """A CPU copy of ``model`` with ``head``'s weights."""
    out = ViT(model.cfg)
    out.load_state_dict(model.state_dict())
    out.head.load_state_dict(head.state_dict())
    return out.eval()


# -- DFR with the true groups ---------------------------------------------------------------------------------------

def true_groups(source: ImageSource, names: list[str], how: str) -> np.ndarray:
    """Per image of ``names``: its group from ``source``'s markers.json, 1/0 for aligned/conflicting
    (``aligned``) or the marker's class name (``marker``)."""
    side = find_sidecar(source.spec) if isinstance(source.spec, (str, os.PathLike)) else None
    if side is None:
        raise ConfigError(f"dfr needs the true groups: no markers.json inside {source.spec!s}")
    recs = read_sidecar(side)["images"]
    missing = [n for n in names if n not in recs]
    if missing:
        raise ConfigError(f"{side}: no record for {len(missing)} image(s), e.g. {missing[0]}")
    key = "aligned" if how == "aligned" else "marker"
    return np.array([int(recs[n][key]) if how == "aligned" else str(recs[n][key]) for n in names])


def balanced_draws(cells: np.ndarray, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` index sets, each with the same number of images from every cell (the smallest cell's size)."""
    members = [np.flatnonzero(cells == c) for c in np.unique(cells)]
    m = min(len(ix) for ix in members)
    return [np.sort(np.concatenate([rng.choice(ix, m, replace=False) for ix in members])) for _ in range(draws)]


def dfr(model, images, config: DFRConfig | None = None, *, progress: bool = True) -> AnchorResult:
    """DFR with the true groups of ``images``' markers.json (a held-out labelled ImageFolder) for the ERM
    ``model`` (not changed): the upper reference, not a label-free method."""
    cfg = config or DFRConfig()
    cfg.validate()
    t0 = time.time()
    erm = _vit(model, cfg.run.device)
    source = _source(images, cfg.run.limit)
    x, y, names = _labelled(source, erm)
    groups = true_groups(source, names, cfg.groups)
    feats, yt = frozen_features(erm, x, cfg.run.batch_size, cfg.run.device), torch.from_numpy(y)
    cells = np.array([f"{a}|{g}" for a, g in zip(y, groups, strict=True)])
    n_classes = erm.head.out_features
    torch.manual_seed(cfg.run.seed)
    if cfg.balance == "weights":
        w, sizes = group_weights(y, groups)
        heads = [fit_head(feats, yt, torch.from_numpy(w).float(), n_classes, cfg.l2, cfg.iters)]
        per_cell = {c: float(w[cells == c].sum()) for c in sizes}
    else:
        subsets = balanced_draws(cells, cfg.draws, np.random.default_rng(cfg.run.seed))
        heads = [fit_head(feats[s], yt[s], torch.ones(len(s)), n_classes, cfg.l2, cfg.iters) for s in subsets]
        w = np.bincount(np.concatenate(subsets), minlength=len(y)) / cfg.draws
        sizes = {c: int((cells == c).sum()) for c in np.unique(cells)}
        per_cell = {c: int(np.isin(subsets[0], np.flatnonzero(cells == c)).sum()) for c in sizes}
    head = torch.nn.Linear(feats.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.stack([h.weight for h in heads]).mean(0))
        head.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))
    record = _record("dfr", cfg, images=len(y), cells=sizes, per_cell=per_cell,
                     train_accuracy=float((head(feats).argmax(1) == yt).float().mean()),
                     seconds=round(time.time() - t0, 2))
    table = pd.DataFrame({"name": names, "label": y, "group": groups, "weight": w})
    return AnchorResult(_copy_with_head(erm, head), record, table)


def anchor(method: str, model, images, config=None, *, progress: bool = True) -> AnchorResult:
    """Run the anchor ``method`` (jtt, afr or dfr) with its config."""
    fns = {"jtt": jtt, "afr": afr, "dfr": dfr}
    if method not in fns:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    return fns[method](model, images, config, progress=progress)
