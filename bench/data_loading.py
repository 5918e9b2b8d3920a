"""Data loading: images/s through the analysis dataset, from a folder and from a zip, with 0, 1 and 2
workers; and the share of a real analysis run that the model spends waiting for data.

    python bench/data_loading.py [--quick]

Throughput: a subset of the CIFAR-10 test split, read from the zip and from a folder the same files were
extracted to (a temporary directory), through exactly the analysis' data path:
:class:`siftlens.loading.KeypointDataset` (decode, the default model's preprocessing, SIFT with
the run's settings from ``sift_params``, u = 4, weight map and levels) in the analysis' own DataLoader
(``loading.make_loader``: batch 32, fresh worker processes per pass, as ``analyze`` does). One
pass over the subset per configuration and round, configurations side by side with the order rotated per
round; the speedups of 1 and 2 workers are per-round ratios against 0 workers on the same source.

Waiting share: a real ``siftlens.analyze`` run (default model, CIFAR-10 test images) with the exact null
(the default, ``null="exact"``) and with the Monte Carlo reference (``null=100``), with the DataLoader
class in :mod:`siftlens.loading` (the one ``make_loader`` builds) replaced by a subclass that
times every ``next()`` on its iterator. ``wait`` = time the analysis loop spent waiting for the next batch
(with 0 workers this is all of decoding and SIFT); ``loop`` = the whole batch loop (waiting + model +
metrics + writing each part).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import _common as C


class _Timed:
    """Wraps siftlens.loading.DataLoader so that time spent in next() is counted."""

    wait = 0.0  # seconds in next()
    work = 0.0  # seconds the consumer spent on the batches (model + metrics + parts)
    batches = 0

    @classmethod
    def make(cls, base):
        class TimedLoader(base):
            def __iter__(self):
                it = super().__iter__()
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        cls.wait += time.perf_counter() - t0
                        return
                    cls.wait += time.perf_counter() - t0
                    cls.batches += 1
                    t1 = time.perf_counter()
                    yield batch
                    cls.work += time.perf_counter() - t1

        return TimedLoader


def throughput(backend, n: int, rounds: int, tmp: Path) -> dict:
    from siftlens.analysis.config import AnalysisConfig, configure
    from siftlens.data import ImageSource
    from siftlens.keypoints import sift_params
    from siftlens.loading import KeypointDataset, make_loader, one_cv2_thread_per_worker

    zsrc = C.image_source("cifar", n)
    with zipfile.ZipFile(C.CIFAR_ZIP) as zf:
        for e in zsrc.entries:
            target = tmp / e.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(e.path))
    fsrc = ImageSource(str(tmp))
    assert fsrc.names == zsrc.names, "the folder must hold exactly the zip subset"
    sift = sift_params(backend.input_size, AnalysisConfig().sift)

    def make(src, workers):
        cfg = configure(None, workers=workers)

        def run():
            with one_cv2_thread_per_worker(workers):
                for _ in make_loader(KeypointDataset(src, backend, cfg, sift), cfg.run):
                    pass

        return run

    fns = {f"{kind}_w{w}": make(src, w) for kind, src in (("zip", zsrc), ("folder", fsrc)) for w in (0, 1, 2)}
    t = C.side_by_side(fns, rounds=rounds, warmup=0)
    summ = C.summary(t)
    out = {"images": len(zsrc), "images_per_s": {k: len(zsrc) / v["wall"]["median_s"] for k, v in summ.items()},
           "timings": summ}
    for kind in ("zip", "folder"):
        for w in (1, 2):
            out[f"{kind}_speedup_w{w}_vs_w0"] = C.ratio(t, f"{kind}_w0", f"{kind}_w{w}")
    out["zip_vs_folder_w0"] = C.ratio(t, "folder_w0", "zip_w0")  # > 1: zip faster
    return out


def waiting_share(backend, n: int, workers: int, null: int | str) -> dict:
    import siftlens.loading as D
    from siftlens.analysis import analyze

    base = D.DataLoader
    _Timed.wait, _Timed.batches, _Timed.work = 0.0, 0, 0.0
    D.DataLoader = _Timed.make(base)  # make_loader looks the class up in its module on every call
    try:
        t0 = time.perf_counter()
        res = analyze(backend, C.image_source("cifar", n), workers=workers, null=null, progress=False, n_boot=200)
        total = time.perf_counter() - t0
    finally:
        D.DataLoader = base
    loop = _Timed.wait + _Timed.work
    return {"workers": workers, "null": null, "images": int(res.manifest["images"]["total"]),
            "batches": _Timed.batches, "wait_s": _Timed.wait, "loop_s": loop, "analyze_s": total,
            "wait_share_of_loop": _Timed.wait / loop, "images_per_s": res.manifest["images"]["total"] / total}


def _wait_label(key: str) -> str:
    """``exact_workers_2`` -> ``workers 2, exact null``; ``null_100_workers_0`` -> ``workers 0, null 100``."""
    tag, w = key.rsplit("_workers_", 1)
    return f"workers {w}, {'exact null' if tag == 'exact' else tag.replace('_', ' ')}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few images, one round")
    a = ap.parse_args(argv)
    C.be_nice()
    import torch

    torch.set_num_threads(1)
    backend, desc = C.default_backend()
    n, rounds, n_an = (128, 1, 64) if a.quick else (1000, 3, 512)
    tmp = Path(tempfile.mkdtemp(prefix="siftlens-bench-"))
    try:
        tp = throughput(backend, n, rounds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # the exact null (the default) and the Monte Carlo reference with 100 null maps per image
    nulls = {"exact": "exact", "null_100": 100}
    waits = {f"{tag}_workers_{w}": waiting_share(backend, n_an, w, null) for tag, null in nulls.items()
             for w in (0, 2)}
    res = {"model": desc, "settings": {"torch_threads": 1, "batch_size": 32, "null": list(nulls.values())},
           "throughput": tp, "waiting": waits}
    ips = tp["images_per_s"]
    res["checks"] = [
        *(C.check(f"data: images/s, {k.replace('_w', ', workers ')}", v, None) for k, v in ips.items()),
        C.check("data: zip 2 workers vs 0 workers", tp["zip_speedup_w2_vs_w0"], None),
        *(C.check(f"data: model waits for data, share of loop, {_wait_label(k)}", v["wait_share_of_loop"], None)
          for k, v in waits.items()),
    ]
    path = C.write_result("data_loading", res, a.quick)
    print(C.format_table(res["checks"]))
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main()
