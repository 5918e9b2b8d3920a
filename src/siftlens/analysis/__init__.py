"""The dataset-level analysis: keypoint maps + attention -> per-image values on disk -> summary.

``config`` (parameters, metric cells) -> :mod:`siftlens.loading` (decode + SIFT) -> ``engine`` (one batch: metrics
and null moments) -> ``store`` (parts, resume) -> ``summary`` (streaming statistics) -> ``runner``
(analyze, shards, torchrun, merge) -> ``comparison`` (differences between runs). ``overlay_records`` and
``viewer_records`` pick the images of the report's figures and of its viewer.
"""

from .comparison import CompareConfig, Comparison, compare
from .config import LEVEL_METRICS, MATRIX_METRICS, SCALAR_METRICS, AnalysisConfig, cells, configure, level_names
from .runner import AnalysisResult, analyze, merge, read_long

__all__ = ["LEVEL_METRICS", "MATRIX_METRICS", "SCALAR_METRICS", "AnalysisConfig", "AnalysisResult", "CompareConfig",
           "Comparison", "analyze", "cells", "compare", "configure", "level_names", "merge", "read_long"]
