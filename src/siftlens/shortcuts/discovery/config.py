"""The parameters of a discovery run (:func:`siftlens.shortcuts.discover`), shared by its steps."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ...keypoints import EXTENTS, SiftOptions
from ...options import RunOptions, group, option
from .decision import CAUSAL_TESTS

ATTENTION_KINDS = ("last", "rollout")
OCCLUDE_KINDS = ("drop", "mean")
CONTROL_KINDS = ("matched", "random")
CROSS_SELECT = ("random", "pulled")


@dataclass
class DiscoveryConfig:
    """Every parameter of a discovery run (all of it goes into the JSON output); every field with ``cli`` is an
    option of ``siftlens discover``."""

    vocab_size: int = option(256, "Visual words K (k-means clusters of SIFT descriptors).", flag="vocab")
    vocab_sample: int = option(100_000, "Descriptors sampled for k-means.")
    kmeans_iters: int = option(50, "k-means iterations.", cli=False)
    attention: str = option("last", "last (CLS attention of the last layer, mean over heads) or rollout.")
    sift: SiftOptions = group(SiftOptions)
    run: RunOptions = group(RunOptions, helps={"batch_size": "Images per forward pass.",
                                               "seed": "Seed of k-means, sampling and the occlusion control."},
                            batch_size=64)
    min_images: int = option(5, "Rank a (class, word) only when seen in this many images predicted as the class.")
    smoothing: float = option(0.5, "Added to every count of the association's log-odds.", cli=False)
    causal_top: int = option(10, "Candidates per class checked by occlusion.")
    causal_images: int = option(32, "Images per checked candidate.")
    causal_extent: str = option("center", "Causal check's patches of a SIFT word: those holding its keypoints' "
                                          "centres (center) or every patch their squares of side = size touch "
                                          "(footprint, what repair drops). Region words: their own patches.")
    occlude: str = option("drop", "Causal check: drop (remove tokens) or mean (fill patches with the image's mean "
                                  "colour).")
    drop_mode: str = option("group", "Causal check's token removal: group (exact, one forward per kept count) or "
                                     "mask.", cli=False)
    regions: int = option(128, "Region words R (k-means of the model's patch tokens), ranked with the SIFT words; "
                               "0 = SIFT words only.")
    region_layer: int = option(0, "Block whose output tokens are clustered (0 = patch embedding, -1 = last).")
    causal_test: str = option("occlude", "What a flag is decided on: occlude (the fall of p(class) with the "
                                         "candidate's patches occluded, against matched control patches), insert "
                                         "(the rise of p(class) with them pasted into images predicted as other "
                                         "classes, against pasted control patches), both (a flag needs both) or "
                                         "cross (occlude, confirmed by the same occlusion on the images labelled "
                                         "as other classes that hold the word: a shortcut pulls them to the "
                                         "class, a core feature rarely does; needs labels) or reference (occlude, "
                                         "and the fall must exceed the same fall in --reference: what the "
                                         "fine-tuning taught, not what any model of the task uses).")
    reference: str | None = option(None, "Reference test's model: the model the checked one was fine-tuned from, "
                                          "or any model trained on clean data with the same classes and patch grid "
                                          "(named as --model is: a folder, a hub id ORG/NAME, or timm:<name>).")
    cross_select: str = option("random", "Cross-class test's images, of the other classes' labelled images that "
                                         "hold the word: random, or pulled (those with the highest p(class), "
                                         "where a shortcut shows: a word common in every class is not diluted).")
    control: str = option("matched", "Causal check's control patches: matched (same keypoint counts as the "
                                     "candidate's patches) or random.")
    alpha: float = option(0.05, "Flag a checked candidate only when its Benjamini-Hochberg q (over every candidate "
                                "tested in the run) is below this...")
    min_effect: float = option(0.05, "...and its effect (mean paired fall of p(class), word occluded minus matched "
                                     "control occluded) is at least this.")
    region_min_effect: float = option(0.0, "...and a region word's effect at least this, where larger than "
                                           "--min-effect (0: the same bar as SIFT words).")
    top: int = option(10, "Candidates per class kept in discovery.json and the report.")
    gallery: int = option(12, "Example patches per top candidate in the report.")

    def validate(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, not {self.attention!r}")
        if self.occlude not in OCCLUDE_KINDS:
            raise ConfigError(f"--occlude must be one of {', '.join(OCCLUDE_KINDS)}, not {self.occlude!r}")
        if self.causal_test not in CAUSAL_TESTS:
            raise ConfigError(f"--causal-test must be one of {', '.join(CAUSAL_TESTS)}, not {self.causal_test!r}")
        if self.causal_extent not in EXTENTS:
            raise ConfigError(f"--causal-extent must be one of {', '.join(EXTENTS)}, not {self.causal_extent!r}")
        if (self.causal_test == "reference") != (self.reference is not None):
            raise ConfigError("--causal-test reference needs --reference MODEL, and --reference is used by it only")
        if self.cross_select not in CROSS_SELECT:
            raise ConfigError(f"--cross-select must be one of {', '.join(CROSS_SELECT)}, not {self.cross_select!r}")
        if self.control not in CONTROL_KINDS:
            raise ConfigError(f"--control must be one of {', '.join(CONTROL_KINDS)}, not {self.control!r}")
        if self.drop_mode not in ("group", "mask"):
            raise ConfigError(f"--drop-mode must be 'group' or 'mask', not {self.drop_mode!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"--vocab must be at least 2 words, got {self.vocab_size}")
        if self.run.batch_size < 1 or self.run.workers < 0 or self.min_images < 1:
            raise ConfigError("--batch-size and --min-images must be >= 1, --workers >= 0")
        if self.smoothing <= 0:
            raise ConfigError(f"smoothing must be > 0, got {self.smoothing}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha must be in (0, 1), got {self.alpha}")
        if not 0 <= self.region_min_effect <= 1:
            raise ConfigError(f"--region-min-effect must be in [0, 1], got {self.region_min_effect}")
        if not 0 <= self.min_effect <= 1:
            raise ConfigError(f"--min-effect must be in [0, 1] (a fall in probability), got {self.min_effect}")
        if self.sift.upsample < 0:
            raise ConfigError(f"--upsample must be > 0 (or 0 for automatic), got {self.sift.upsample}")
