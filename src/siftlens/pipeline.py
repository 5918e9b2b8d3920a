"""Whole jobs built from the steps: analyse a dataset, save its tables, render its report.

This is the one place that joins :mod:`siftlens.analysis` (data) and :mod:`siftlens.report` (rendering);
the CLI calls these functions and nothing else.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .analysis import AnalysisConfig, AnalysisResult, analyze, merge
from .analysis.run import output_paths


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
    resume: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[AnalysisResult | None, dict[str, Path]]:
    """Analyse into ``out`` (tables and manifest as the run goes), then the figures and report.html.

    Returns ``(None, {})`` on torchrun ranks other than 0 and for a single shard (``shard=(i, K)``),
    whose folder :func:`run_merge` combines with the others."""
    res = analyze(model, images, config or AnalysisConfig(), out=out, resume=resume, shard=shard,
                  progress=progress, weights=weights)
    return res, (_finish_report(res, report) if res is not None else {})


def run_merge(out: str | Path, shard_dirs: list[str | Path], report: bool = True,
              progress: bool = True) -> tuple[AnalysisResult, dict[str, Path]]:
    """Combine shard folders into ``out``: the same tables and report as one run over all images."""
    res = merge(out, shard_dirs, progress=progress)
    return res, _finish_report(res, report)


def _finish_report(res: AnalysisResult, report: bool) -> dict[str, Path]:
    paths = output_paths(res.out)
    if report:
        from .report import write_report

        paths["report"] = write_report(res.out, res.summary, res.manifest, res.overlays)
    return paths


def run_demo(out: str | Path = "runs/demo", progress: bool = True, **overrides):
    """The main job on the embedded default model and bundled images, fully offline. The demo folder is
    rebuilt on every call (it holds nothing but the demo's own outputs)."""
    import shutil

    out = Path(out)
    if (out / "run.json").exists():
        shutil.rmtree(out)
    cfg = AnalysisConfig(**overrides)
    return run_analysis("default", str(demo_images_dir()), out, cfg, progress=progress)
