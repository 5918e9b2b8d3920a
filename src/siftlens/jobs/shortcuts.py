"""The shortcut jobs: build SpuriousCIFAR, discover, prompt, repair."""

from __future__ import annotations

from pathlib import Path

from ..benchmarks.spurious_cifar import SpuriousConfig, build, find_sidecar, read_sidecar
from ..benchmarks.spurious_cifar_eval import evaluate_markers, evaluate_patches
from ..errors import SpuriousDataError
from ..shortcuts.discovery.config import DiscoveryConfig
from ..shortcuts.discovery.report import write_discovery_report
from ..shortcuts.discovery.run import DiscoveryResult, discover
from ..shortcuts.prompting import PromptConfig, PromptResult, format_summary, prompt
from ..shortcuts.retraining.head import RepairConfig, repair
from ._options import JobOptions


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
