"""Whole jobs built from the steps: analyse a dataset, save its tables, render its report.

This is the one place that joins :mod:`siftlens.analysis` (data) and :mod:`siftlens.report` (rendering);
the CLI calls these functions and nothing else.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .analysis import AnalysisConfig, AnalysisResult, analyze


def demo_images_dir() -> Path:
    """The CIFAR-10 test sample that ships inside the package (ImageFolder layout)."""
    return Path(str(files("siftlens") / "assets" / "demo_images"))


def run_analysis(
    model: str,
    images,
    out: str | Path,
    config: AnalysisConfig | None = None,
    weights: str | None = None,
    report: bool = True,
    progress: bool = True,
) -> tuple[AnalysisResult, dict[str, Path]]:
    """Analyse, write tables and manifest into ``out``, and (optionally) the figures and report.html."""
    res = analyze(model, images, config or AnalysisConfig(), progress=progress, weights=weights)
    out = Path(out)
    paths = res.save(out)
    if report:
        from .report import write_report

        paths["report"] = write_report(out, res.summary, res.manifest, res.overlays)
    return res, paths


def run_demo(out: str | Path = "runs/demo", progress: bool = True, **overrides):
    """The main job on the embedded default model and bundled images, fully offline."""
    cfg = AnalysisConfig(**overrides)
    return run_analysis("default", str(demo_images_dir()), out, cfg, progress=progress)
