"""Every parameter of an analysis run, its checks, and the flat list of metric cells a layer produces."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

from ..data import DEFAULT_MAX_PIXELS
from ..devices import PRECISIONS
from ..errors import ConfigError
from ..keypoints import SCHEMES, SiftOptions
from ..models.layers import parse_layers
from ..options import RunOptions, flat_options, group, is_group, option

SCALAR_METRICS = ("sal", "wi", "cls_lift", "cls_rho")
LEVEL_METRICS = ("dist", "dist_rel", "entropy")  # per query level a
MATRIX_METRICS = ("R",)  # per level pair (a, b)
NULL_KINDS = ("permute", "shift")
# parameters that may differ between a run and its resumption (they do not change any number), as paths
# through the config's groups
RUNTIME_FIELDS = (("run", "batch_size"), ("run", "workers"), ("run", "device"), ("overlays",), ("part_size",),
                  ("explore",))
MAX_EXPLORE = 64  # images in the report's viewer (each holds every layer's and head's attention)


@dataclass
class AnalysisConfig:
    """Every parameter of a run; all of it goes into the manifest (``params``, nested as here: the SIFT
    options under ``sift``, the run options under ``run``).

    null: ``"exact"`` (closed-form permutation moments, or all cyclic shifts for ``null_kind="shift"``)
    or an integer M >= 20 of Monte Carlo null maps per image (the reference).
    sift.upsample: SIFT upsampling factor u, or 0 for automatic (u = 128 / shorter input side, at least 1).
    """

    scheme: str = option("count", "Patch weight: count | response | footprint.")
    n_levels: int = option(3, "Semantic levels L (level 0 = no keypoints).", flag="levels")
    thresholds: list[float] | None = option(None, "Fixed global weight thresholds of levels 1..L-1 (default: "
                                                  "per-image quantiles).", cli=False)
    layers: list[int] | None = option(None, "Comma-separated layer indices (negative from the end); default all.",
                                      parse=parse_layers)
    null: str | int = option("exact", "Null model: 'exact' (closed-form permutation moments, or every cyclic "
                                      "shift) or an integer M >= 20 of Monte Carlo maps per image (the slower "
                                      "reference).", cli_type=str)
    null_kind: str = option("permute", "permute (shuffle patch weights) or shift (cyclic 2-D shifts, keeps spatial "
                                       "structure).")
    n_boot: int = option(1000, "Bootstrap resamples for 95% confidence intervals.", flag="bootstrap")
    rollout: bool = option(False, "Also analyse attention rollout (reported as layer = depth).")
    overlays: int = option(4, "Images drawn with keypoints and attention in the report.")
    explore: int = option(8, "The first this many images go into the report's interactive attention viewer "
                             "(0: no viewer).")
    part_size: int = option(256, "Images per part file of metrics.parquet; an interrupted run loses at most one "
                                 "part.")
    precision: str = option("fp32", "Precision of the forward: fp32, bf16 or fp16 (autocast; bf16 also on the CPU, "
                                    "fp16 only on a GPU); the attention is reduced in float32 (docs/performance.md).")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Skip images with more pixels than this (decompression bombs).",
                             cli=False)
    sift: SiftOptions = group(SiftOptions)
    run: RunOptions = group(RunOptions, batch_size=32, workers=None, helps={
        "batch_size": "Images per forward pass.",
        "workers": "Data-loading worker processes (decode + SIFT in parallel); default: the free cores when the "
                   "device is a GPU, else 0 (SIFT in the main process).",
        "seed": "Seed of the Monte Carlo null and the bootstrap (draws are keyed by image, so batch size, workers and "
                "shards do not change results).",
        "limit": "Analyse at most this many images (spread over classes)."})

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
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.run.batch_size < 1 or (self.run.workers is not None and self.run.workers < 0):
            raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
        if self.sift.upsample < 0:
            raise ConfigError(f"--upsample must be > 0 (or 0 for automatic), got {self.sift.upsample}")
        if self.part_size < 1:
            raise ConfigError(f"--part-size must be at least 1 image, got {self.part_size}")
        if not 0 <= self.explore <= MAX_EXPLORE:
            raise ConfigError(f"--explore must be between 0 (no viewer) and {MAX_EXPLORE} images, got {self.explore}")
        if self.n_boot < 10:
            raise ConfigError(f"--bootstrap must be at least 10 resamples, got {self.n_boot}")

    def identity(self) -> dict:
        """The parameters that decide every number of a run (all but the runtime ones), nested as the config."""
        d = asdict(self)
        if d["precision"] == "fp32":  # recorded only when it is not the default, so runs from before it resume
            del d["precision"]
        for path in RUNTIME_FIELDS:
            node = d
            for key in path[:-1]:
                node = node[key]
            node.pop(path[-1], None)
        return d

    @classmethod
    def from_params(cls, params: dict) -> AnalysisConfig:
        """The config of a run's recorded ``params`` (run.json or the manifest): nested, or flat as runs written
        before the groups recorded them; keys that are not options (``upsample_used`` ...) are ignored."""
        flat = flat_params(params)
        paths = _option_paths()
        return configure(None, **{k: v for k, v in flat.items() if k in paths}, _check=False)


_GROUP_NAMES = frozenset(f.name for f in fields(AnalysisConfig) if is_group(f))


def flat_params(params: dict) -> dict:
    """A run's recorded parameters by field name with the groups (``sift``, ``run``) flattened:
    ``{"n_levels": 3, "upsample": 0.0, "seed": 0 ...}``. Reads the nested params of this version and the flat
    params of runs written before the groups (whose manifest's ``sift`` held the SIFT settings used)."""
    if not isinstance(params.get("run"), dict):  # flat: written before the groups
        return dict(params)
    out = {}
    for k, v in params.items():
        if k in _GROUP_NAMES and isinstance(v, dict):
            out.update(v)
        else:
            out[k] = v
    return out


def _option_paths() -> dict[str, tuple]:
    """Every name an option goes by in Python (its field name and its command-line name) -> its path."""
    paths: dict[str, tuple] = {}
    for o in flat_options(AnalysisConfig, cli_only=False):
        paths[o.path[-1]] = o.path
        paths[o.name] = o.path
    return paths


def configure(config: AnalysisConfig | None = None, _check: bool = True, **overrides) -> AnalysisConfig:
    """A copy of ``config`` (default: the defaults) with ``overrides`` set by option name, flat: a field's name
    or its command-line name (``n_levels=4`` or ``levels=4``, ``batch_size=8``, ``upsample=2``), or a whole group
    (``sift=SiftOptions(...)``); checked. Text is parsed as on the command line (``layers="0,-1"``)."""
    cfg = copy.deepcopy(config) if config is not None else AnalysisConfig()
    paths = _option_paths()
    parse = {o.path: o.parse for o in flat_options(AnalysisConfig, cli_only=False)}
    for k, v in overrides.items():
        if k in _GROUP_NAMES:
            setattr(cfg, k, copy.deepcopy(v))
            continue
        if k not in paths:
            raise ConfigError(f"unknown analysis option {k!r}")
        path = paths[k]
        node = cfg
        for key in path[:-1]:
            node = getattr(node, key)
        setattr(node, path[-1], parse[path](v) if parse[path] is not None and isinstance(v, str) else v)
    cfg.__post_init__()
    if _check:
        cfg.validate()
    return cfg


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
