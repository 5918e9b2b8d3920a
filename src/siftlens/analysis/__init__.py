"""The dataset-level analysis: keypoint maps + attention -> per-image values on disk -> summary.

``config`` (parameters, metric cells) -> ``dataset`` (decode + SIFT) -> ``engine`` (one batch: metrics
and null moments) -> ``store`` (parts, resume) -> ``summary`` (streaming statistics) -> ``run``
(analyze, shards, torchrun, merge). ``overlays`` picks a few images for the report.
"""

from .config import LEVEL_METRICS, MATRIX_METRICS, SCALAR_METRICS, AnalysisConfig, cells, level_names
from .run import AnalysisResult, analyze, merge, read_long

__all__ = ["LEVEL_METRICS", "MATRIX_METRICS", "SCALAR_METRICS", "AnalysisConfig", "AnalysisResult", "analyze",
           "cells", "level_names", "merge", "read_long"]
