"""The analysis jobs: analyze (with its report), merge, compare, and the demo."""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from ..analysis import AnalysisConfig, AnalysisResult, analyze, merge
from ..analysis.comparison import CompareConfig, Comparison, compare, compare_findings
from ..analysis.config import configure
from ..analysis.runner import output_paths
from ..analysis.store import parse_shard
from ..errors import ConfigError
from ..io import write_text
from ._options import JobOptions


def demo_images_dir() -> Path:
    """The CIFAR-10 test sample that ships inside the package (ImageFolder layout)."""
    return Path(str(files("siftlens") / "assets" / "demo_images"))


def run_analysis(
    model: str,
    images,
    out: str | Path,
    config: AnalysisConfig | None = None,
    options: JobOptions | None = None,
    resume: bool = False,
    shard: tuple[int, int] | str | None = None,
    revision: str | None = None,
) -> tuple[AnalysisResult | None, dict[str, Path]]:
    """Analyse into ``out`` (tables and manifest as the run goes), then the figures and report.html.

    ``images``: what :class:`~siftlens.data.ImageSource` takes, or a list of such (one item is used as it is);
    ``shard``: ``(i, K)`` or ``"i/K"``. Returns ``(None, {})`` on torchrun ranks other than 0 and for a single
    shard, whose folder :func:`run_merge` combines with the others."""
    opt = options or JobOptions()
    if isinstance(images, list | tuple) and len(images) == 1:
        images = images[0]
    part = parse_shard(shard) if isinstance(shard, str) else shard
    res = analyze(model, images, config or AnalysisConfig(), weights=opt.weights, revision=revision,
                  progress=opt.progress, out=out, resume=resume, shard=part)
    return res, (_finish_report(res, opt.report) if res is not None else {})


def image_source(images, limit: int | None, **columns):
    """``images`` as an ImageSource when a column or key option is given (``image_column``, ``label_column``,
    ``label_key``, ``id_column``: docs/data.md), else as given."""
    columns = {k: v for k, v in columns.items() if v is not None}
    if isinstance(images, list | tuple) and len(images) == 1:
        images = images[0]
    if not columns:
        return images
    from ..data import ImageSource

    return ImageSource(images, limit=limit, **columns)


def run_merge(out: str | Path, shard_dirs: list[str | Path], report: bool = True,
              progress: bool = True) -> tuple[AnalysisResult, dict[str, Path]]:
    """Combine shard folders into ``out``: the same tables and report as one run over all images."""
    res = merge(out, shard_dirs, progress=progress)
    return res, _finish_report(res, report)


def _finish_report(res: AnalysisResult, report: bool) -> dict[str, Path]:
    paths = output_paths(res.out)
    if report:
        from ..report import write_report  # matplotlib is imported only when a report is asked for

        paths["report"] = write_report(res.out, res.summary, res.manifest, res.overlays, explore=res.explore)
    return paths


DEMO_MARKER = ".siftlens-demo"


def run_demo(out: str | Path = "runs/demo", progress: bool = True, **overrides):
    """The main job on the embedded default model and bundled images, fully offline. The demo folder is
    rebuilt on every call; only a folder that is absent, empty, or marked by an earlier demo
    (:data:`DEMO_MARKER`) is used, so a user's own folder is never deleted."""
    out = _fresh_demo_folder(Path(out))
    cfg = configure(None, **overrides)
    return run_analysis("default", str(demo_images_dir()), out, cfg, JobOptions(progress=progress))


def _fresh_demo_folder(out: Path) -> Path:
    """Empty ``out`` for the demo and mark it as the demo's; refuse (ConfigError) a folder the demo did not make."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"demo --out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise ConfigError(f"demo --out {out} is not empty and was not made by 'siftlens demo'; "
                              "give an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / DEMO_MARKER, "made by 'siftlens demo', which rebuilds this folder on every run\n")
    return out


def analysis_outcome(res: AnalysisResult, paths: dict[str, Path]) -> str:
    """What the CLI prints after an analysis: counts, speed and the files written."""
    m = res.manifest
    im = m["images"]
    lines = [
        f"analysed {im['analysed']} images ({im['no_keypoints']} without keypoints, {im['skipped']} skipped) "
        f"in {m['timing']['seconds']:.1f} s ({m['timing']['images_per_s'] or 0:.1f} images/s)"
    ]
    lines += [f"  {k:9s} {paths[k]}" for k in ("metrics", "summary", "manifest")]
    if "report" in paths:
        lines.append(f"report: {paths['report']}")
    return "\n".join(lines)


def shard_outcome(shard: tuple[int, int] | str, out: str | Path) -> str:
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    return f"shard {shard[0]}/{shard[1]} written to {out}; combine all shards with 'siftlens merge'"


def run_compare(run_dirs: list[str | Path], out: str | Path, config: CompareConfig | None = None, *,
                labels: list[str] | None = None, progress: bool = False,
                **overrides) -> tuple[Comparison, dict[str, Path]]:
    """Compare finished analyses and write differences.csv, summaries.csv, runs.csv, findings.txt
    (:meth:`Comparison.save`), compare_curves.png and the self-contained compare.html into ``out``."""
    from ..report.comparison_page import compare_curves, render_compare_html
    from ..report.saving import save_figure

    c = compare(run_dirs, config, labels=labels, progress=progress, **overrides)
    out = Path(out)
    paths = c.save(out)
    depth = int(c.runs["depth"].min())
    paths["figure"] = save_figure(compare_curves(c.summaries, c.labels, depth), out / "compare_curves.png")
    page = render_compare_html(c.differences, c.runs, paths["figure"], compare_findings(c), c.setting_differences)
    paths["report"] = write_text(out / "compare.html", page)
    return c, paths


def compare_outcome(c: Comparison, paths: dict[str, Path]) -> str:
    lines = [f"compared {len(c.labels)} runs ({', '.join(c.labels)}); differences against {c.labels[0]}"]
    if c.setting_differences:
        lines.append("settings differ (--force): " + "; ".join(f"{k}: {v}" for k, v in c.setting_differences.items()))
    lines += compare_findings(c)
    lines += [f"  {k:11s} {p}" for k, p in paths.items()]
    return "\n".join(lines)
