"""Whole jobs: load, run, save, report. The command line calls these functions and nothing else.

This is the one module that joins the steps with each other and with their rendering: the analysis with
:mod:`siftlens.report`, discovery with :mod:`siftlens.shortcuts.discovery.report`, the SpuriousCIFAR evaluation with
discovery, prompting with its output files. Nothing in the library imports it (only ``cli.py`` and the
lazy public names ``siftlens.run_analysis`` and ``siftlens.run_demo``). Each job returns its result and
the paths it wrote; the ``*_outcome`` functions give the few lines the CLI prints about them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .analysis import AnalysisConfig, AnalysisResult, analyze, merge
from .analysis.run import output_paths
from .benchmarks.spurious_cifar import SpuriousConfig, build, find_sidecar, read_sidecar
from .benchmarks.spurious_cifar_eval import evaluate_markers, evaluate_patches
from .comparison import Comparison, compare, compare_findings
from .errors import ConfigError, SpuriousDataError
from .io import write_text
from .shortcuts.discovery.config import DiscoveryConfig
from .shortcuts.discovery.report import write_discovery_report
from .shortcuts.discovery.run import DiscoveryResult, discover
from .shortcuts.prompting import PromptConfig, PromptResult, format_summary, prompt
from .shortcuts.retraining.head import RepairConfig, repair


@dataclass
class JobOptions:
    """How a job runs, apart from what it computes.

    weights: a weights file for ``timm:<name>`` models; report: also render the job's HTML report (the
    analysis and discovery jobs have one); progress: show progress bars.
    """

    weights: str | None = None
    report: bool = True
    progress: bool = True


# -- analysis ---------------------------------------------------------------------------------------
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
    shard: tuple[int, int] | None = None,
) -> tuple[AnalysisResult | None, dict[str, Path]]:
    """Analyse into ``out`` (tables and manifest as the run goes), then the figures and report.html.

    Returns ``(None, {})`` on torchrun ranks other than 0 and for a single shard (``shard=(i, K)``),
    whose folder :func:`run_merge` combines with the others."""
    opt = options or JobOptions()
    res = analyze(model, images, config or AnalysisConfig(), out=out, resume=resume, shard=shard,
                  progress=opt.progress, weights=opt.weights)
    return res, (_finish_report(res, opt.report) if res is not None else {})


def run_merge(out: str | Path, shard_dirs: list[str | Path], report: bool = True,
              progress: bool = True) -> tuple[AnalysisResult, dict[str, Path]]:
    """Combine shard folders into ``out``: the same tables and report as one run over all images."""
    res = merge(out, shard_dirs, progress=progress)
    return res, _finish_report(res, report)


def _finish_report(res: AnalysisResult, report: bool) -> dict[str, Path]:
    paths = output_paths(res.out)
    if report:
        from .report import write_report  # matplotlib is imported only when a report is asked for

        paths["report"] = write_report(res.out, res.summary, res.manifest, res.overlays, explore=res.explore)
    return paths


DEMO_MARKER = ".siftlens-demo"


def run_demo(out: str | Path = "runs/demo", progress: bool = True, **overrides):
    """The main job on the embedded default model and bundled images, fully offline. The demo folder is
    rebuilt on every call; only a folder that is absent, empty, or marked by an earlier demo
    (:data:`DEMO_MARKER`) is used, so a user's own folder is never deleted."""
    out = _fresh_demo_folder(Path(out))
    cfg = AnalysisConfig(**overrides)
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


def shard_outcome(shard: tuple[int, int], out: str | Path) -> str:
    return f"shard {shard[0]}/{shard[1]} written to {out}; combine all shards with 'siftlens merge'"


# -- spurious correlations and prompting ------------------------------------------------------------
def make_spurious(cfg: SpuriousConfig) -> dict:
    """Build SpuriousCIFAR into ``cfg.out``; returns its manifest."""
    return build(cfg)


def spurious_outcome(manifest: dict, out: str | Path) -> str:
    lines = [f"  {split:12s} {st['images']} images ({st['aligned']} aligned, {st['conflicting']} conflicting)"
             for split, st in manifest["splits"].items()]
    lines.append(f"SpuriousCIFAR written to {out}")
    return "\n".join(lines)


def run_discovery(
    model,
    images,
    out: str | Path,
    config: DiscoveryConfig | None = None,
    boxes=None,
    evaluate: bool | None = None,
    options: JobOptions | None = None,
) -> tuple[DiscoveryResult, dict[str, Path]]:
    """Discover, optionally score against a SpuriousCIFAR sidecar, save tables/JSON and the report.

    evaluate: None = when ``<images>/markers.json`` exists; True requires it. Returns (result, paths).
    """
    opt = options or JobOptions()
    side = find_sidecar(images) if isinstance(images, (str, Path)) else None
    if evaluate and side is None:
        raise SpuriousDataError(f"--evaluate needs a SpuriousCIFAR sidecar markers.json inside {images}")
    res = discover(model, images, config, boxes=boxes, progress=opt.progress, weights=opt.weights)
    if side is not None and evaluate is not False:
        sc = read_sidecar(side)
        pt = res.manifest["patches"]
        res.evaluation = {"sidecar": str(side), **evaluate_markers(res, sc),
                          "patch_rule": evaluate_patches(res, sc, pt["size"], tuple(pt["grid"]))}
    paths = res.save(out)
    if opt.report:
        paths["report"] = write_discovery_report(out, res)
    return res, paths


def discovery_outcome(res: DiscoveryResult, paths: dict[str, Path]) -> str:
    """What the CLI prints after discovery: each class's best word, the evaluation, the files written."""
    lines = []
    for c, rows in res.top.items():
        best = rows[0] if rows else None
        lines.append(f"  {c:12s} " + (f"word {best['word']:4d} score {best['score']:.3g}" if best else "no candidate"))
    if res.evaluation:
        ev = res.evaluation
        lines.append(f"own marker ranked first for {ev['rank1']:.0%} of classes (word-purity rule); ranks: "
                     f"{ev['ranks']}")
        if "patch_rule" in ev:
            pr = ev["patch_rule"]
            lines.append(f"own marker ranked first for {pr['rank1']:.0%} of classes (patch rule); ranks: "
                         f"{pr['ranks']}")
    lines += [f"  {k:10s} {p}" for k, p in paths.items()]
    return "\n".join(lines)


def run_prompt(model, images, out: str | Path, config: PromptConfig | None = None,
               options: JobOptions | None = None) -> tuple[PromptResult, dict[str, Path]]:
    """:func:`~siftlens.shortcuts.prompt`, then write ``prompting.json`` and ``predictions.csv`` into ``out``."""
    opt = options or JobOptions()
    res = prompt(model, images, config, progress=opt.progress, weights=opt.weights)
    return res, res.save(out)


def prompt_outcome(res: PromptResult, paths: dict[str, Path]) -> str:
    return "\n".join([format_summary(res.summary), *(f"  {k:11s} {p}" for k, p in paths.items())])


def run_repair(model, images, out: str | Path, config: RepairConfig, progress: bool = True) -> dict:
    """:func:`~siftlens.shortcuts.repair`: writes ``out/model`` and ``out/repair.json``; returns the summary."""
    return repair(model, images, out, config, progress)


def repair_outcome(summary: dict, out: str | Path) -> str:
    what = f"head and last {summary['config']['blocks']} block(s)" if summary["config"].get("blocks") else "head"
    return (f"{what} retrained on {summary['images']} images ({summary['flagged_share']:.0%} with flagged patches; "
            f"groups {summary['config']['groups']}, {len(summary['cells'])} cells); "
            f"accuracy with the shortcut dropped {summary['train_accuracy_dropped']:.3f}\n"
            f"repaired model: {Path(out) / 'model'}")


def run_compare(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None,
                force: bool = False) -> tuple[Comparison, dict[str, Path]]:
    """Compare finished analyses and write differences.csv, summaries.csv, runs.csv, findings.txt,
    compare_curves.png and the self-contained compare.html into ``out``."""
    from .io import atomic_path, write_text
    from .report.compare import compare_curves, render_compare_html
    from .report.saving import save_figure

    c = compare(run_dirs, labels=labels, force=force)
    out = Path(out)
    paths = {}
    for name, df in (("differences", c.differences), ("summaries", c.summaries), ("runs", c.runs)):
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
        paths[name] = out / f"{name}.csv"
    paths["findings"] = write_text(out / "findings.txt", "\n".join(compare_findings(c)) + "\n")
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
