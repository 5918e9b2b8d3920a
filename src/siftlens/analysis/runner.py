"""The dataset-level runner: images -> parts on disk -> summary, with resume, shards and torchrun.

``analyze`` streams batches through :func:`~siftlens.analysis.engine.analyse_batch` and writes each
group of images as a part (:mod:`~siftlens.analysis.store`) before going on, so memory does not grow
with the number of images and an interrupted run continues with ``resume=True``. Under torchrun every
rank analyses its own images into the same folder and rank 0 builds the summary; with ``shard=(i, K)``
one process writes shard i, and :func:`merge` combines shard folders. Everything returned is data.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..data import ImageSource
from ..devices import DistInfo, barrier, check_precision, init_distributed
from ..errors import ConfigError
from ..io import atomic_path, fsync_dir, read_json, write_json
from ..keypoints import SiftParams, sift_params
from ..loading import KeypointDataset, make_loader, one_cv2_thread_per_worker
from ..models import Backend, load_backend
from ..models.hub import with_revision
from ..progress import progress_bar
from .config import AnalysisConfig, cells, configure, level_names
from .engine import RunPlan, analyse_batch
from .overlay_records import collect_overlays
from .prefetch import Prefetcher, default_workers, pace_note
from .store import IMAGES_DIR, LONG_COLUMNS, MANIFEST, METRICS_DIR, RUN_FILE, RunStore, long_rows
from .summary import SummaryAccumulator, summary_table
from .viewer_records import collect_explore, kept_records


@dataclass
class AnalysisResult:
    """The outputs of a finished run, in ``out``.

    summary: per (layer, head, metric, level_a, level_b): n, mean, ci_lo, ci_hi, null_mean, null_sd,
    null_lo, null_hi, z, p, q (head -1 = mean over heads; layer == num_layers = rollout);
    images: per image (index, name, label, prediction, keypoints, status, reason);
    long: the tidy per-image table (image, layer, head, metric, level_a, level_b, value, null_mean,
    null_sd, z), read from ``out/metrics.parquet`` when first asked for;
    overlays: a few images with pixels, keypoints, weights and CLS attention maps for figures;
    explore: the first ``explore`` images with every analysed layer's attention rows, for the report's
    viewer (see :mod:`~siftlens.analysis.viewer_records`).
    """

    out: Path
    summary: pd.DataFrame
    images: pd.DataFrame
    manifest: dict
    overlays: list[dict] = field(default_factory=list)
    explore: list[dict] = field(default_factory=list)
    _tmp: object = None  # keeps a temporary output folder alive as long as the result

    @property
    def long(self) -> pd.DataFrame:
        return read_long(self.out)

    def _repr_html_(self) -> str:
        """Jupyter's view: the per-layer curves and the significant cells (:mod:`siftlens.report.notebook`)."""
        from ..report.notebook import analysis_html  # matplotlib only when a notebook asks

        return analysis_html(self.summary, self.manifest, out=self.out)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Copy the tables and the manifest into ``out_dir`` (a no-op for the run's own folder)."""
        dst = Path(out_dir)
        dst.mkdir(parents=True, exist_ok=True)
        if dst.resolve() != self.out.resolve():
            for name in ("summary.csv", "images.csv", MANIFEST, RUN_FILE):
                shutil.copy2(self.out / name, dst / name)
            for sub in (METRICS_DIR, IMAGES_DIR):
                shutil.copytree(self.out / sub, dst / sub, dirs_exist_ok=True)
        return output_paths(dst)


def output_paths(out: Path) -> dict[str, Path]:
    return {"metrics": out / METRICS_DIR, "summary": out / "summary.csv", "images": out / "images.csv",
            "manifest": out / MANIFEST}


def read_long(out: str | Path) -> pd.DataFrame:
    """The per-image table of a run folder, all parts (this one does hold everything in memory)."""
    parts = RunStore(out).part_files()
    if not parts:
        return pd.DataFrame(columns=["image", "layer", "head", "metric", "level_a", "level_b", "value"])
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def _run_identity(model: str, weights: str | None, backend: Backend, source: ImageSource, cfg: AnalysisConfig,
                  plan: RunPlan) -> dict:
    return {"params": cfg.identity(), "model": {"spec": model, "weights": weights, **backend.describe()},
            "images": {"source": str(source.spec), **({"options": source.options} if getattr(source, "options", None)
                                                      else {}),
                       "count": len(source), "fingerprint": source.fingerprint()},
            "layer_ids": plan.layer_ids,
            "heads": backend.num_heads, "n_levels": cfg.n_levels}


def analyze(
    model: str | Backend,
    images: str | Path | list | ImageSource,
    config: AnalysisConfig | None = None,
    *,
    weights: str | None = None,
    revision: str | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    **overrides,
) -> AnalysisResult | None:
    """Analyse ``model`` over ``images`` into the folder ``out`` (a temporary one if None), streaming: each
    part of the per-image values is on disk before the next is computed.

    ``model``: a Backend or anything :func:`~siftlens.models.load_backend` accepts (``weights``: a weights file
    for ``timm:<name>``; ``revision``: the hub revision of a hub id or of timm's weights, as ``ORG/NAME@REV``).
    ``config``: an :class:`AnalysisConfig`; ``overrides`` set its options by name, flat (the groups' fields too), e.g.
    ``analyze("default", "imgs/", null=200, batch_size=8, upsample=2)``.
    ``resume``: continue the interrupted run in ``out``. ``shard=(i, K)``: analyse only images
    ``i, i + K, ...`` and stop before the summary (combine shards with :func:`merge`); returns None then.
    Under torchrun, ranks split the images and rank 0 returns the result (other ranks return None).
    """
    cfg = configure(config, **overrides)
    if revision is not None:
        model = with_revision(str(model), revision)
    dist, cfg.run.device = init_distributed(cfg.run.device)
    check_precision(cfg.run.device, cfg.precision)
    if cfg.run.workers is None:  # the free cores on a GPU (SIFT off the forward's path), 0 on the CPU
        cfg.run.workers = default_workers(cfg.run.device, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world)))
    tmp = tempfile.TemporaryDirectory(prefix="siftlens-") if out is None else None
    out = Path(tmp.name if tmp else out)
    backend = model if isinstance(model, Backend) else load_backend(model, cfg.run.device, weights=weights)
    source = images if isinstance(images, ImageSource) else ImageSource(images, limit=cfg.run.limit)
    plan = RunPlan.build(backend, cfg)
    sift = sift_params(backend.input_size, cfg.sift)
    part = shard or (dist.rank, dist.world)
    store = RunStore(out, part)
    run = _run_identity(str(model) if isinstance(model, (str, os.PathLike)) else backend.source,
                        weights, backend, source, cfg, plan)
    if dist.rank == 0:
        store.open(run, resume)  # also cleans up after an interrupted run, before any other rank writes
    barrier(dist)
    if dist.rank != 0:
        store.open(run, resume=True, clean=False)
    kept = _analyse_parts(plan, source, store, sift, progress and dist.rank == 0)
    barrier(dist)
    if shard is not None:
        write_json(out / f"shard-{shard[0]:04d}.json", {"shard": list(shard), "complete": True})
        return None
    if dist.rank != 0:
        return None
    return _finish(out, run, cfg, dist, backend, source, kept, _tmp=tmp)


def _analyse_parts(plan: RunPlan, source: ImageSource, store: RunStore, sift: SiftParams,
                   progress: bool) -> dict[int, dict]:
    """Analyse this shard's images that no committed part holds yet, one part at a time; returns the viewer
    records (by source index) of the first ``cfg.explore`` images among them."""
    i, k = store.shard
    done = store.done_indices()
    todo = [j for j in range(i, len(source), k) if j not in done]
    names, labels, classes = source.names, source.labels, plan.backend.class_names
    loader = make_loader(KeypointDataset(source, plan.backend, plan.cfg, sift, indices=todo), plan.cfg.run)
    batches = Prefetcher(loader, plan.backend.device)  # on CUDA: pixels pinned and copied ahead
    longs, rows, kept, t0 = [], [], {}, time.perf_counter()
    busy, n_batches = 0.0, 0
    with progress_bar(progress) as pb, one_cv2_thread_per_worker(plan.cfg.run.workers):
        before = f"{len(done)} done before" if done else ""
        task = pb.add_task("analyse", total=len(todo), info=before)
        for batch in batches:
            t_busy = time.perf_counter()
            items = batch.items
            good = [it for it in items if "skip" not in it]
            rows += [_image_row(it["index"], names, labels, classes, "skipped", reason=it["skip"])
                     for it in items if "skip" in it]
            if good:
                bnames = [names[it["index"]] for it in good]
                keep = [j for j, it in enumerate(good) if it["index"] < plan.cfg.explore]
                v = analyse_batch(plan, good, bnames, keep, pixels=batch.pixels)
                kept.update(kept_records(v, good, source, plan.backend, plan.layers))
                longs.append(long_rows(v, bnames, plan.layer_ids, plan.backend.num_heads, plan.cells))
                rows += [_image_row(it["index"], names, labels, classes, "skipped", reason=v.errors[j])
                         if j in v.errors else
                         _image_row(it["index"], names, labels, classes, "ok" if v.valid[j] else "no_keypoints",
                                    pred=v.preds[j], n_kp=len(it["xy"])) for j, it in enumerate(good)]
            if len(rows) >= plan.cfg.part_size:
                _flush(store, longs, rows, time.perf_counter() - t0)
                longs, rows, t0 = [], [], time.perf_counter()
            busy, n_batches = busy + time.perf_counter() - t_busy, n_batches + 1
            note = pace_note(batches.wait_s, busy, n_batches, plan.cfg.run.workers)
            pb.update(task, advance=len(items), info="; ".join(x for x in (before, note) if x))
    if rows:
        _flush(store, longs, rows, time.perf_counter() - t0)
    return kept


def _flush(store: RunStore, longs: list[pd.DataFrame], rows: list[dict], seconds: float) -> None:
    images = pd.DataFrame(rows)
    images["seconds"] = seconds / len(rows)
    long = pd.concat(longs, ignore_index=True) if longs else long_rows_empty()
    store.write_part(long, images)


def long_rows_empty() -> pd.DataFrame:
    """A part with no metric rows (every image of it was skipped), with the table's columns."""
    return pd.DataFrame({c: pd.Series(dtype="float32" if c in ("value", "null_mean", "null_sd", "z") else
                                      "object" if c in ("image", "metric", "note") else "int16") for c in LONG_COLUMNS})


def _image_row(i, names, labels, classes, status, reason="", pred=None, n_kp=0) -> dict:
    label = labels[i] if labels is not None else None
    if status == "no_keypoints":
        reason = "no SIFT keypoints: excluded from metrics"
    return {"index": int(i), "name": names[i], "label": "" if label is None else str(label),
            "prediction": "" if pred is None else (classes[pred] if classes else str(pred)),
            "keypoints": int(n_kp), "status": status, "reason": reason}


# -- the summary pass -------------------------------------------------------------------------------
def summarize(out: str | Path, run: dict, n_boot: int, seed: int) -> pd.DataFrame:
    """The summary of every committed part in ``out``, in one streaming pass (see :mod:`.summary`)."""
    acc = accumulate(out, run, n_boot, seed)
    return summary_table(acc.statistics(), run["layer_ids"], run["heads"], cells(run["n_levels"]))


def accumulate(out: str | Path, run: dict, n_boot: int, seed: int) -> SummaryAccumulator:
    """Running sums (and Poisson-bootstrap sums) over every committed part of the run in ``out``; the
    grid is ``(len(run["layer_ids"]), run["heads"] + 1, len(cells))``, flattened."""
    layer_ids, heads, cell_list = run["layer_ids"], run["heads"], cells(run["n_levels"])
    shape = (len(layer_ids), heads + 1, len(cell_list))
    acc = SummaryAccumulator(int(np.prod(shape)), n_boot, seed)
    cell_index = pd.MultiIndex.from_tuples(cell_list, names=["metric", "level_a", "level_b"])
    layer_pos = {layer: i for i, layer in enumerate(layer_ids)}
    store = RunStore(out)
    for name in store.committed_parts():
        p = store.root / METRICS_DIR / name
        df = pd.read_parquet(p) if p.exists() else pd.DataFrame()
        if not len(df):
            continue
        names, img = np.unique(df["image"].astype(str).to_numpy(), return_inverse=True)
        c = cell_index.get_indexer(pd.MultiIndex.from_arrays([df["metric"].astype(str), df["level_a"].astype(int),
                                                              df["level_b"].astype(int)]))
        h = df["head"].to_numpy().astype(int)
        flat = ((df["layer"].map(layer_pos).to_numpy() * shape[1] + np.where(h < 0, heads, h)) * shape[2] + c)
        arrays = []
        for col in ("value", "null_mean", "null_sd"):
            a = np.full((len(names), acc.count.size), np.nan)
            a[img, flat] = df[col].to_numpy(np.float64)
            arrays.append(a)
        acc.add(list(names), arrays[0], arrays[1], np.square(arrays[2]))
    return acc


def read_images(out: str | Path) -> pd.DataFrame:
    parts = RunStore(out).part_files(IMAGES_DIR)
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame(
        columns=["index", "name", "label", "prediction", "keypoints", "status", "reason", "seconds"])
    return df.sort_values("name", kind="stable").reset_index(drop=True)


def _finish(out: Path, run: dict, cfg: AnalysisConfig, dist: DistInfo, backend: Backend | None = None,
            source: ImageSource | None = None, kept: dict[int, dict] | None = None, _tmp=None) -> AnalysisResult:
    """Summary, images table, manifest, overlays and the viewer's images (when the model is at hand) of the
    parts in ``out``; ``kept``: viewer records the run already captured, by source index."""
    sift = sift_params(run["model"]["input_size"], cfg.sift)
    layers = [x for x in run["layer_ids"] if x < run["model"]["layers"]]
    images = read_images(out)
    if not (images["status"] != "skipped").any():
        raise ConfigError(f"no image of {run['images']['source']} could be analysed (all {len(images)} were skipped)")
    summary = summarize(out, run, cfg.n_boot, cfg.run.seed)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / "images.csv") as tmp:
        images.drop(columns=["seconds"]).to_csv(tmp, index=False)
    manifest = _manifest(run, cfg, sift, images, layers, dist)
    write_json(out / MANIFEST, manifest)
    overlays = collect_overlays(backend, source, images, cfg, sift, layers) if backend and source else []
    explore = collect_explore(backend, source, images, cfg, sift, layers, kept) if backend and source else []
    return AnalysisResult(out, summary, images.drop(columns=["seconds"]), manifest, overlays, explore, _tmp=_tmp)


def _manifest(run: dict, cfg: AnalysisConfig, sift: SiftParams, images: pd.DataFrame, layers: list[int],
              dist: DistInfo) -> dict:
    import cv2

    counts = images["status"].value_counts()
    seconds = float(images["seconds"].sum())
    skipped = images[images["status"] == "skipped"]
    return {
        "siftlens_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": True,
        "model": run["model"],
        "images": {"source": run["images"]["source"], "total": len(images), "analysed": int(counts.get("ok", 0)),
                   "no_keypoints": int(counts.get("no_keypoints", 0)), "skipped": int(counts.get("skipped", 0)),
                   "skipped_reasons": [{"name": n, "reason": r}
                                       for n, r in zip(skipped["name"], skipped["reason"], strict=True)]},
        "params": {**asdict(cfg), "upsample_used": sift.upsample, "layers_analysed": layers, "sift_used": asdict(sift),
                   "preprocessing": "model's own resize/crop; SIFT before normalisation",
                   "null_method": _null_method(cfg), "bootstrap": "online Poisson(1), keyed by image"},
        "level_names": level_names(cfg.n_levels),
        "timing": {"seconds": round(seconds, 3), "images_per_s": round(len(images) / seconds, 3) if seconds else None,
                   "processes": dist.world},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "opencv": cv2.__version__, "pandas": pd.__version__, "siftlens": __version__},
    }


def _null_method(cfg: AnalysisConfig) -> str:
    if cfg.null_samples is not None:
        return f"Monte Carlo, {cfg.null_samples} {cfg.null_kind} maps per image"
    if cfg.null_kind == "shift":
        return ("cyclic 2-D shifts: all enumerated (exact) up to 256 patches, else 256 sampled per image "
                "(keyed by image)")
    return "exact: closed-form permutation moments (linear, Mantel / quadratic assignment, delta method)"


def merge(out: str | Path, shard_dirs: list[str | Path], progress: bool = True) -> AnalysisResult:
    """Combine the shard folders written with ``shard=(i, K)`` into ``out``: the same tables as one run.

    Every check (each shard of one run exactly once, no damaged part, ``out`` free) comes before anything is
    written; the merged run is built in a temporary folder beside ``out`` and renamed into place, so a merge
    that fails leaves no half-written ``out`` and can simply be run again."""
    out = Path(out)
    dirs = [Path(d) for d in shard_dirs]
    run = _check_shards(out, dirs)
    _check_merge_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        res = _merge_into(tmp, run, dirs)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    res.out = out
    return res


def _merge_into(folder: Path, run: dict, dirs: list[Path]) -> AnalysisResult:
    """Write the merged run of the (checked) shard folders ``dirs`` into the empty ``folder``."""
    write_json(folder / RUN_FILE, run)
    store = RunStore(folder)
    for d in dirs:
        store.adopt(d)
    cfg = AnalysisConfig.from_params(run["params"])
    try:
        backend = load_backend(run["model"]["spec"], "cpu", weights=run["model"].get("weights"))
        source = ImageSource(run["images"]["source"], limit=cfg.run.limit, **run["images"].get("options", {}))
    except Exception:  # noqa: BLE001 - overlays are optional; the tables never need the model
        backend = source = None
    return _finish(folder, run, cfg, DistInfo(), backend, source)


def _check_shards(out: Path, dirs: list[Path]) -> dict:
    """The common run description of the shard folders ``dirs``; a one-line ConfigError when a folder is
    given twice or is ``out``, is not an analysis, belongs to another run, repeats or misses a shard, or
    holds a damaged part."""
    seen: dict[Path, Path] = {}
    for d in dirs:
        key = d.resolve()
        if key == out.resolve():
            raise ConfigError(f"merge: {d} is both a shard and the output; merge into a new folder")
        if key in seen:
            raise ConfigError(f"merge: the shard folder {d} is given twice; give each shard once")
        seen[key] = d
    runs = [RunStore(d).read_run() for d in dirs]
    missing = [str(d) for d, r in zip(dirs, runs, strict=True) if r is None]
    if missing:
        raise ConfigError(f"not a siftlens analysis folder (no {RUN_FILE}): {', '.join(missing)}")
    differ = sorted({k for r in runs[1:] for k in set(r) | set(runs[0]) if r.get(k) != runs[0].get(k)})
    if differ:
        raise ConfigError(f"the shards were run with different {', '.join(differ)}; merge only shards of one run")
    k = _check_each_shard_once(dirs)
    for d, i in _shard_of_folder(dirs).items():
        _check_shard_parts(d, (i, k), runs[0])
    return runs[0]


def _check_shard_parts(d: Path, shard: tuple[int, int], run: dict) -> None:
    """The folder ``d`` of ``shard`` (i, K) must hold intact parts with each of its images exactly once."""
    store = RunStore(d)
    damaged = store.damaged_parts()
    if damaged:
        name, why = next(iter(damaged.items()))
        raise ConfigError(f"merge: {d} holds a damaged part {name} ({why}); run that shard again with --resume, "
                          "then merge")
    i, k = shard
    want = set(range(i, run["images"]["count"], k))
    have = store.image_indices()
    if len(have) != len(want) or set(have) != want:
        raise ConfigError(f"merge: {d} holds {len(set(have) & want)} of the {len(want)} images of shard {i} "
                          f"(a part is missing); run that shard again with --resume, then merge")


def _shard_markers(dirs: list[Path]) -> list[tuple[Path, dict]]:
    return [(d, read_json(p, "shard marker")) for d in dirs for p in sorted(d.glob("shard-*.json"))]


def _shard_of_folder(dirs: list[Path]) -> dict[Path, int]:
    """The finished shard each folder holds (checked by :func:`_check_each_shard_once`)."""
    return {d: m["shard"][0] for d, m in _shard_markers(dirs) if m.get("complete")}


def _check_each_shard_once(dirs: list[Path]) -> int:
    """Every finished shard 0..K-1 of one K exactly once among the folders' shard markers; returns K."""
    marks = _shard_markers(dirs)
    k = {m["shard"][1] for _, m in marks}
    finished: dict[int, list[Path]] = {}
    for d, m in marks:
        if m.get("complete"):
            finished.setdefault(m["shard"][0], []).append(d)
    twice = {i: ds for i, ds in finished.items() if len(ds) > 1}
    if twice:
        i, ds = min(twice.items())
        raise ConfigError(f"merge: shard {i} is in more than one folder ({', '.join(map(str, ds))}); give each "
                          "shard once")
    if len(k) != 1 or set(finished) != set(range(next(iter(k)))):
        want = next(iter(k)) if len(k) == 1 else "?"
        raise ConfigError(f"merge needs every finished shard 0..{want}-1 once; found finished shards "
                          f"{sorted(finished)}")
    return next(iter(k))


def _check_merge_target(out: Path) -> None:
    """``out`` must be absent or an empty folder (the merged run is renamed onto it)."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        what = "an analysis" if (out / RUN_FILE).exists() or (out / MANIFEST).exists() else "files"
        raise ConfigError(f"{out} already holds {what}; choose an empty folder to merge into")
