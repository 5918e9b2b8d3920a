"""The parameters of a discovery run (:func:`siftlens.shortcuts.discover`), shared by its steps."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

ATTENTION_KINDS = ("last", "rollout")
OCCLUDE_KINDS = ("drop", "mean")
CONTROL_KINDS = ("matched", "random")


@dataclass
class DiscoveryConfig:
    """Every parameter of a discovery run (all of it goes into the JSON output)."""

    vocab_size: int = 256
    vocab_sample: int = 100_000
    kmeans_iters: int = 50
    attention: str = "last"
    upsample: float = 0.0  # 0: automatic (4 for 32x32 inputs, 1 for 224)
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    batch_size: int = 64
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    limit: int | None = None
    min_images: int = 5
    smoothing: float = 0.5
    causal_top: int = 10
    causal_images: int = 32
    occlude: str = "drop"
    drop_mode: str = "group"
    regions: int = 128  # region words (k-means of the model's patch tokens); 0: SIFT words only
    region_layer: int = 0  # block whose output tokens are clustered (0: patch embedding; -1: last)
    control: str = "matched"  # causal check's control patches: matched on keypoint count, or random
    top: int = 10
    gallery: int = 12

    def validate(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, not {self.attention!r}")
        if self.occlude not in OCCLUDE_KINDS:
            raise ConfigError(f"--occlude must be one of {', '.join(OCCLUDE_KINDS)}, not {self.occlude!r}")
        if self.control not in CONTROL_KINDS:
            raise ConfigError(f"--control must be one of {', '.join(CONTROL_KINDS)}, not {self.control!r}")
        if self.drop_mode not in ("group", "mask"):
            raise ConfigError(f"--drop-mode must be 'group' or 'mask', not {self.drop_mode!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"--vocab must be at least 2 words, got {self.vocab_size}")
        if self.batch_size < 1 or self.workers < 0 or self.min_images < 1:
            raise ConfigError("--batch-size and --min-images must be >= 1, --workers >= 0")
        if self.smoothing <= 0:
            raise ConfigError(f"smoothing must be > 0, got {self.smoothing}")
        if self.upsample < 0:
            raise ConfigError(f"--upsample must be > 0 (or 0 for automatic), got {self.upsample}")
