"""Every parameter of an analysis run, its checks, and the flat list of metric cells a layer produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data import DEFAULT_MAX_PIXELS
from ..errors import ConfigError
from ..keypoints import SCHEMES

SCALAR_METRICS = ("sal", "wi", "cls_lift", "cls_rho")
LEVEL_METRICS = ("dist", "dist_rel", "entropy")  # per query level a
MATRIX_METRICS = ("R",)  # per level pair (a, b)
NULL_KINDS = ("permute", "shift")
# parameters that may differ between a run and its resumption (they do not change any number)
RUNTIME_FIELDS = ("batch_size", "workers", "device", "overlays", "part_size", "explore")
MAX_EXPLORE = 64  # images in the report's viewer (each holds every layer's and head's attention)


@dataclass
class AnalysisConfig:
    """Every parameter of a run; all of it goes into the manifest.

    null: ``"exact"`` (closed-form permutation moments, or all cyclic shifts for ``null_kind="shift"``)
    or an integer M >= 20 of Monte Carlo null maps per image (the reference).
    upsample: SIFT upsampling factor u, or 0 for automatic (u = 128 / shorter input side, at least 1).
    """

    scheme: str = "count"
    n_levels: int = 3
    thresholds: list[float] | None = None
    upsample: float = 0.0
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    layers: list[int] | None = None
    batch_size: int = 32
    workers: int = 0
    device: str = "cpu"
    null: str | int = "exact"
    null_kind: str = "permute"
    n_boot: int = 1000
    seed: int = 0
    limit: int | None = None
    rollout: bool = False
    overlays: int = 4
    max_pixels: int = DEFAULT_MAX_PIXELS
    part_size: int = 256  # images per part file of metrics.parquet (a crash loses at most one part)
    explore: int = 8  # the first this many images go into the report's interactive viewer (0: no viewer)

    def __post_init__(self):
        if isinstance(self.null, str) and self.null.strip().isdigit():
            self.null = int(self.null)

    @property
    def null_samples(self) -> int | None:
        """M for Monte Carlo, None for the exact null."""
        return None if self.null == "exact" else int(self.null)

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown weight scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.n_levels < 2:
            raise ConfigError(f"--levels must be at least 2 (none / some keypoints), got {self.n_levels}")
        if self.null != "exact" and not (isinstance(self.null, int) and self.null >= 20):
            raise ConfigError(f"--null must be 'exact' or an integer of at least 20 Monte Carlo maps, "
                              f"got {self.null!r}")
        if self.null_kind not in NULL_KINDS:
            raise ConfigError(f"--null-kind must be 'permute' or 'shift', not {self.null_kind!r}")
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
        if self.upsample < 0:
            raise ConfigError(f"--upsample must be > 0 (or 0 for automatic), got {self.upsample}")
        if self.part_size < 1:
            raise ConfigError(f"--part-size must be at least 1 image, got {self.part_size}")
        if not 0 <= self.explore <= MAX_EXPLORE:
            raise ConfigError(f"--explore must be between 0 (no viewer) and {MAX_EXPLORE} images, got {self.explore}")
        if self.n_boot < 10:
            raise ConfigError(f"--bootstrap must be at least 10 resamples, got {self.n_boot}")

    def identity(self) -> dict:
        """The parameters that decide every number of a run (all but the runtime ones)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}


def cells(n_levels: int) -> list[tuple[str, int, int]]:
    """The flat list of (metric, level_a, level_b) cells every layer produces."""
    out = [(m, -1, -1) for m in SCALAR_METRICS]
    out += [("R", a, b) for a in range(n_levels) for b in range(n_levels)]
    out += [(m, a, -1) for m in LEVEL_METRICS for a in range(n_levels)]
    return out


def level_names(n_levels: int) -> list[str]:
    """Human names of the semantic levels: none / low / high for 3, none / q1.. for more."""
    if n_levels == 2:
        return ["none", "some"]
    if n_levels == 3:
        return ["none", "low", "high"]
    return ["none"] + [f"q{i}" for i in range(1, n_levels)]
