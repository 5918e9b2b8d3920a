"""Size of report.html with the interactive viewer: a random-init Hugging Face ViT-B/16 at 224, 8 images.

    python bench/explore_size.py [--quick]

Runs ``siftlens analyze --model bench/.cache/hf-vit-b16 --images imagenet-samples-dev.zip --limit 8
--explore 8`` (the model is written once by scripts/make_random_hf_vit.py --size b), then measures the
report with and without the viewer, the viewer's embedded attention, the quantisation levels chosen and the
time to pack it. Check: report.html <= 10 MB (10,000,000 bytes) with 8 viewer images of 12 layers x 12
heads x 197 x 197 attention. A random-init ViT is the hard case: its attention is close to uniform noise
and compresses worst; trained models' peaky attention keeps more levels in the same budget.
``--quick``: the built-in model on 8 bundled CIFAR-10 images (a smoke run of the machinery).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as C

BUDGET_BYTES = 10_000_000


def viewer_stats(page: str) -> dict:
    """Bytes of the viewer section, of its embedded attention strings, and the levels the page declares."""
    start = page.index('<h2 id="explore">')
    end = page.index("</script>", page.index('<script>', page.index('id="sl-explore-data"'))) + len("</script>")
    from siftlens.report.viewer import read_payload

    data = read_payload(page)
    return {"viewer_bytes": len(page[start:end].encode()), "images": len(data["images"]),
            "left_out": data["left_out"], "levels": data["levels"], "heads": data["heads"],
            "layers": len(data["layers"]), "patches": data["grid"][0] * data["grid"][1],
            "attention_chars": sum(len(e["attn"]) for e in data["images"]),
            "pixels_chars": sum(len(e["pixels"]) for e in data["images"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    C.be_nice()
    from siftlens.analysis import analyze
    from siftlens.report import write_report

    if a.quick:
        model, images, what = "default", str(Path(C.ROOT / "src/siftlens/assets/demo_images")), "built-in default"
    else:
        C.hf_backend("b")  # writes bench/.cache/hf-vit-b16 once
        model, images, what = str(C.CACHE / "hf-vit-b16"), str(C.IMAGENET_ZIP), "random HF ViT-B/16"
    with tempfile.TemporaryDirectory(prefix="siftlens-explore-") as tmp:
        t0 = time.perf_counter()
        res = analyze(model, images, out=tmp, limit=8, explore=8, progress=False)
        t_analyse = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = write_report(tmp, res.summary, res.manifest, res.overlays, explore=res.explore)
        t_report = time.perf_counter() - t0
        size = path.stat().st_size
        stats = viewer_stats(path.read_text(encoding="utf-8"))
        plain = write_report(Path(tmp) / "plain", res.summary, res.manifest, res.overlays).stat().st_size
    checks = [C.check("report.html with the viewer, MB", size / 1e6, BUDGET_BYTES / 1e6, "<=",
                      f"{stats['images']} images, attention q in 0..{stats['levels']} per row"),
              C.check("report.html without the viewer, MB", plain / 1e6, None),
              C.check("viewer section, MB", stats["viewer_bytes"] / 1e6, None)]
    payload = {"model": what, "images": images, "limit": 8, "explore": 8, "report_bytes": size,
               "report_without_viewer_bytes": plain, **stats, "seconds_analyse": round(t_analyse, 2),
               "seconds_report": round(t_report, 2), "checks": checks}
    out = C.write_result("explore_size", payload, a.quick)
    print(C.format_table(checks))
    print(f"written {out}")


if __name__ == "__main__":
    main()
