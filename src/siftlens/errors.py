"""User-facing errors. Each carries a one-line message that says what to do.

The CLI prints ``SiftlensError`` messages without a traceback (``--debug`` shows one), and warnings as one
line each (:func:`one_line_warnings`).
"""

from __future__ import annotations

import sys
import warnings


def one_line_warnings() -> None:
    """Print every warning as ``warning: <message>``, without the file, line and source Python shows."""
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)


class SiftlensError(Exception):
    """Base class for every error a user can cause."""


class ModelLoadError(SiftlensError):
    """A model path, name or weights file could not be loaded."""


class ModelNotCachedError(ModelLoadError):
    """A hub model is not in the local cache and cannot be downloaded (offline, or no network)."""


class GeometryError(SiftlensError):
    """Image size, patch size or grid do not fit together."""


class ImageSourceError(SiftlensError):
    """An image source (folder, zip, glob, file list) is missing or empty."""


class AttentionBackendError(SiftlensError):
    """Attention could not be captured (fused kernel, unsupported model)."""


class ConfigError(SiftlensError):
    """An option value is out of range or inconsistent."""


class LayerIndexError(ConfigError, AttentionBackendError):
    """A layer index outside the model. A ConfigError; also an AttentionBackendError, which capture()
    raised for it before its check and the model's became one."""


class SkipImage(Exception):
    """Raised internally for one bad input; it is counted and listed, never fatal."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SpuriousDataError(SiftlensError):
    """A SpuriousCIFAR build, its markers or its sidecar is missing or invalid."""


class CandidatesError(SiftlensError):
    """A discovery output (candidates JSON) is missing, invalid or does not fit the model."""
