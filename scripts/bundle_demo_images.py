"""Copy the bundled demo sample out of CIFAR-10's test split (run once; the result is committed).

    python scripts/bundle_demo_images.py ../shared/data/cifar10-jpg.zip --per-class 20

Writes src/siftlens/assets/demo_images/<class>/<nnnn>.jpg: the first ``per-class`` test images of every
class, byte for byte (no re-encoding). The default model never saw them: it trains on the train split.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / "src" / "siftlens" / "assets" / "demo_images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zip", help="cifar10-jpg.zip")
    ap.add_argument("--per-class", type=int, default=20)
    a = ap.parse_args()
    with zipfile.ZipFile(a.zip) as z:
        names = sorted(n for n in z.namelist() if n.startswith("cifar10/test/") and n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for n in names:
            by_class.setdefault(n.split("/")[2], []).append(n)
        total = 0
        for cls, members in sorted(by_class.items()):
            for n in members[: a.per_class]:
                out = DEST / cls / Path(n).name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(n))
                total += out.stat().st_size
    print(f"wrote {sum(len(v[: a.per_class]) for v in by_class.values())} images, {total / 1024:.0f} KiB, to {DEST}")


if __name__ == "__main__":
    main()
