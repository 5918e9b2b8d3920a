"""The shortcut jobs: build SpuriousCIFAR, discover, prompt, repair."""

from __future__ import annotations

from pathlib import Path

from ..benchmarks.spurious_cifar import SpuriousConfig, build
from ..benchmarks.spurious_cifar_eval import evaluate_markers, evaluate_patches
from ..errors import SpuriousDataError
from ..models.hub import with_revision
from ..shortcuts.discovery.config import DiscoveryConfig
from ..shortcuts.discovery.decision import claim_text, tests_of
from ..shortcuts.discovery.pipeline import DiscoveryResult, discover
from ..shortcuts.discovery.report import write_discovery_report
from ..shortcuts.groups import find_sidecar, format_alignment, read_sidecar
from ..shortcuts.prompting import PromptConfig, PromptResult, format_summary, prompt
from ..shortcuts.retraining.head import RepairConfig, RepairResult, repair
from ..shortcuts.retraining.retrain import RetrainConfig, RetrainResult, retrain
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
    revision: str | None = None,
) -> tuple[DiscoveryResult, dict[str, Path]]:
    """Discover, optionally score against a SpuriousCIFAR sidecar, save tables/JSON and the report.

    evaluate: None = when ``<images>/markers.json`` exists; True requires it; revision: the hub revision of a hub
    id or of timm's pretrained weights. Returns (result, paths).
    """
    opt = options or JobOptions()
    side = find_sidecar(images) if isinstance(images, (str, Path)) else None
    if evaluate and side is None:
        raise SpuriousDataError(f"--evaluate needs a SpuriousCIFAR sidecar markers.json inside {images}")
    res = discover(with_revision(model, revision), images, config, boxes=boxes, weights=opt.weights,
                   progress=opt.progress)
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
    """What the CLI prints after discovery: per class "no shortcut found" or its flagged words with effect, 95% CI and
    q (and its best-ranked word), the evaluation, the files written."""
    lines = []
    d = res.decision
    if d:
        test = d.get("causal_test", "occlude")
        lines.append(f"flagged: q < {d['alpha']:g} (BH over {d['tested']} tested candidates) and effect >= "
                     f"{d['min_effect']:g} ({' and '.join(tests_of(test))} test)")
    for c, rows in res.top.items():
        best = rows[0] if rows else None
        head = f"  {c:12s} " + (f"best word {best['word']:4d} score {best['score']:.3g}" if best else "no candidate")
        if d:
            fl = res.flagged(c)
            head += " | " + ("; ".join(f"flagged {r['word']}: {claim_text(r, test)} q {r['q']:.2g}" for r in fl[:3])
                             + (f" (+{len(fl) - 3} more)" if len(fl) > 3 else "") if fl else res.verdict(c))
        lines.append(head)
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
               options: JobOptions | None = None, revision: str | None = None) -> tuple[PromptResult, dict[str, Path]]:
    """:func:`~siftlens.shortcuts.prompt`, then write ``prompting.json`` and ``predictions.csv`` into ``out``."""
    opt = options or JobOptions()
    res = prompt(with_revision(model, revision), images, config, weights=opt.weights, progress=opt.progress)
    return res, res.save(out)


def prompt_outcome(res: PromptResult, paths: dict[str, Path]) -> str:
    return "\n".join([format_summary(res.summary), *(f"  {k:11s} {p}" for k, p in paths.items())])


def run_repair(model, images, out: str | Path, config: RepairConfig | None = None, *,
               progress: bool = True) -> tuple[RepairResult, dict[str, Path]]:
    """:func:`~siftlens.shortcuts.repair`, then write ``out/model`` and ``out/repair.json``."""
    res = repair(model, images, config, progress=progress)
    return res, res.save(out)


def repair_outcome(res: RepairResult, paths: dict[str, Path]) -> str:
    """What the CLI prints after repair: what was retrained, the accuracy on the fitting images with the shortcut
    dropped (aligned beside conflicting when they hold a markers.json) and the model folder, which carries its drop."""
    s = res.record
    if s.get("unchanged"):
        return f"{s['reason']}\nmodel (no drop): {paths['model']}"
    what = f"head and last {s['config']['blocks']} block(s)" if s["config"].get("blocks") else "head"
    al = format_alignment(s.get("alignment_dropped"))
    return (f"{what} retrained on {s['images']} images ({s['flagged_share']:.0%} with flagged patches; "
            f"groups {s['config']['groups']}, {len(s['cells'])} cells); "
            f"accuracy with the shortcut dropped {s['train_accuracy_dropped']:.3f}" + (f" ({al})" if al else "") + "\n"
            + _model_line(s, paths["model"]))


def _model_line(record: dict, model: Path) -> str:
    """Where the repaired model is, and whether it carries a drop (none when no class flags a candidate)."""
    if not record.get("drop", True):
        return f"repaired model: {model} (no drop: no class has a flagged candidate)"
    return (f"repaired model: {model} (it drops the shortcut's tokens itself: load_backend and every command use it "
            "as it is)")


def run_retrain(model, images, out: str | Path, config: RetrainConfig | None = None, *,
                progress: bool = True) -> tuple[RetrainResult, dict[str, Path]]:
    """:func:`~siftlens.shortcuts.retraining.retrain.retrain`, then write ``out/model`` and ``out/retrain.json``."""
    res = retrain(model, images, config, progress=progress)
    return res, res.save(out)


def retrain_outcome(res: RetrainResult, paths: dict[str, Path]) -> str:
    """What the CLI prints after retrain: the drop it trained with (or why none), the last epoch, the model."""
    s = res.record
    last = s["epochs"][-1] if s["epochs"] else {}
    fit = f"last epoch: loss {last['train_loss']:.3f}, accuracy {last['train_acc']:.3f}" if last else "no epoch run"
    if res.rule is None:
        return f"{s['reason']}; {fit}\nmodel (no drop): {paths['model']}"
    return (f"trained with {len(s['words'])} flagged word(s) dropped ({s['flagged_share']:.0%} of the images had a "
            f"flagged patch); {fit}\n" + _model_line(s, paths["model"]))
