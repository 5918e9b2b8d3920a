"""The visual vocabulary: k-means (k-means++ initialisation, seeded, batched in torch) over RootSIFT
descriptors, nearest-word assignment, and the vocabulary read back from a discovery output (for prompting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import CandidatesError, ConfigError
from ...io import read_json
from ...progress import progress_bar
from .config import DiscoveryConfig


def rootsift(desc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(M, 128) SIFT descriptors -> RootSIFT (L1-normalise, square root), float32; L2 then = Hellinger."""
    d = torch.as_tensor(np.asarray(desc), dtype=torch.float32)
    return torch.sqrt(d / d.sum(1, keepdim=True).clamp_min(1e-12))


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]).clamp_min(0)


def assign(x: torch.Tensor, centers: torch.Tensor, batch: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every row. x: (M, d), centers: (k, d) -> (words (M,) int64, squared dist (M,))."""
    words = torch.empty(len(x), dtype=torch.int64)
    dist = torch.empty(len(x), dtype=torch.float32)
    for s in range(0, len(x), batch):
        d = _sq_dists(x[s : s + batch], centers)
        dist[s : s + batch], words[s : s + batch] = d.min(1)
    return words, dist


def kmeans(
    x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, batch: int = 16384, on_iter=None
) -> torch.Tensor:
    """k-means with k-means++ initialisation (seeded); x: (M, d) float -> centers (k, d).

    Lloyd iterations stop early when no assignment changes; an empty cluster is re-seeded at the point
    farthest from its centre. ``on_iter()`` is called after every Lloyd iteration (progress bars).
    """
    x = x.float()
    M = len(x)
    if M < k:
        raise ConfigError(f"only {M} SIFT descriptors for a vocabulary of {k} words; lower --vocab or add images")
    g = torch.Generator().manual_seed(seed)
    centers = torch.empty((k, x.shape[1]))
    centers[0] = x[torch.randint(M, (1,), generator=g)]
    d2 = _assign_dist(x, centers[:1], batch)
    for j in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: pick uniformly
            idx = torch.randint(M, (1,), generator=g)
        else:
            idx = torch.multinomial(d2 / total, 1, generator=g)
        centers[j] = x[idx]
        d2 = torch.minimum(d2, _assign_dist(x, centers[j : j + 1], batch))
    words = None
    for _ in range(iters):
        new_words, dist = assign(x, centers, batch)
        if words is not None and torch.equal(new_words, words):
            break
        words = new_words
        sums = torch.zeros_like(centers).index_add_(0, words, x)
        counts = torch.bincount(words, minlength=k).float()
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = torch.argsort(dist, descending=True)[: int(empty.sum())]
            centers[empty] = x[far]
        if on_iter is not None:
            on_iter()
    return centers


def _assign_dist(x: torch.Tensor, c: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([_sq_dists(x[s : s + batch], c).min(1).values for s in range(0, len(x), batch)])


def build_vocabulary(desc: np.ndarray, cfg: DiscoveryConfig, progress: bool = False) -> torch.Tensor:
    """k-means centres (k, 128) in RootSIFT space over a seeded sample of at most ``vocab_sample`` rows."""
    rng = np.random.default_rng(cfg.run.seed)
    sample = desc if len(desc) <= cfg.vocab_sample else desc[rng.choice(len(desc), cfg.vocab_sample, replace=False)]
    with progress_bar(progress) as pb:
        task = pb.add_task("k-means", total=cfg.kmeans_iters, info=f"{len(sample)} descriptors")
        return kmeans(rootsift(sample), cfg.vocab_size, cfg.kmeans_iters, cfg.run.seed,
                      on_iter=lambda: pb.advance(task))


@dataclass
class Vocabulary:
    """Discovered words: RootSIFT centres and, per class, the ranked candidate words and the flagged ones (rank
    order; ``flagged`` None: the discovery output predates flagging)."""

    centers: torch.Tensor
    classes: list[str]
    ranked: dict[str, list[int]]
    scores: dict[str, list[float]] = field(default_factory=dict)
    regions: torch.Tensor | None = None  # (R, D) region-word centres (ids len(centers)..), or None
    region_layer: int = -1
    flagged: dict[str, list[int]] | None = None
    flagged_scores: dict[str, list[float]] = field(default_factory=dict)

    def flagged_regions(self, flagged) -> list[int]:
        """The region words among ``flagged`` ids, as indices into :attr:`regions`."""
        K = len(self.centers)
        return sorted(int(w) - K for w in flagged if int(w) >= K)

    def words_of(self, desc: np.ndarray) -> np.ndarray:
        if len(desc) == 0:
            return np.zeros(0, np.int64)
        return assign(rootsift(desc), self.centers)[0].numpy()


def discovery_path(path: str | Path) -> Path:
    """``discovery.json`` given itself or the folder holding it."""
    p = Path(path)
    return p / "discovery.json" if p.is_dir() else p


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read ``discovery.json`` (or the folder holding it); raises CandidatesError with a one-line reason."""
    p = discovery_path(path)
    raw = read_json(p, "discovery output of `siftlens discover`", error=CandidatesError)
    if not isinstance(raw, dict) or raw.get("kind") != "siftlens-discovery":
        raise CandidatesError(f"{p} is not a discovery output of `siftlens discover`")
    try:
        centers = torch.tensor(raw["vocabulary"]["centers"], dtype=torch.float32)
        ranked = {c: [int(r["word"]) for r in rows] for c, rows in raw["top"].items()}
        scores = {c: [float(r.get("score") or 0.0) for r in rows] for c, rows in raw["top"].items()}
        classes = list(raw["classes"])
        dec = raw.get("decision")
        fl = None if dec is None else {c: d.get("candidates", []) for c, d in dec["classes"].items()}
        flagged = None if fl is None else {c: [int(r["word"]) for r in rows] for c, rows in fl.items()}
        fscores = {} if fl is None else {c: [float(r.get("score") or 0.0) for r in rows] for c, rows in fl.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CandidatesError(f"{p} lacks the vocabulary or ranked candidates ({e})") from e
    flags = {"flagged": flagged, "flagged_scores": fscores}
    if centers.ndim != 2 or centers.shape[1] != 128:
        raise CandidatesError(f"{p}: vocabulary centres must be (k, 128), got {tuple(centers.shape)}")
    reg = raw.get("regions")
    if reg:
        try:
            return Vocabulary(centers, classes, ranked, scores, torch.tensor(reg["centers"], dtype=torch.float32),
                              int(reg["layer"]), **flags)
        except (KeyError, TypeError, ValueError) as e:
            raise CandidatesError(f"{p} has malformed region centres ({e})") from e
    return Vocabulary(centers, classes, ranked, scores, **flags)
