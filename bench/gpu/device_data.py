"""Pack the subsets of ../shared/data that the GPU runs need into ``.devdata/`` (ignored by git), small
enough to travel with the working tree to a borrowed GPU machine (64 MiB in all).

    python bench/gpu/device_data.py [--shared ../shared/data] [--out .devdata]

- ``cifar10-sub.zip``: ``cifar10/train`` = the first 2,000 training images of each class, ``cifar10/pilotval``
  = the next 200 of each class (a validation split carved from *training* images, for choosing policies
  without looking at the test split), ``cifar10/test`` = the first 1,000 test images of each class.
- ``imagenet-sub.zip``: the first 64 ImageNet sample photos (sorted by name).
"""

from __future__ import annotations

import argparse
import zipfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pack_cifar(src: Path, dst: Path, train: int = 2000, pilot: int = 200, test: int = 1000) -> dict:
    counts: dict[str, int] = defaultdict(int)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst.with_suffix(".tmp"), "w", zipfile.ZIP_STORED) as zout:
        seen: dict[tuple[str, str], int] = defaultdict(int)
        for info in sorted(zin.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if info.is_dir() or len(parts) != 4:
                continue
            _, split, cls, name = parts
            k = seen[(split, cls)]
            seen[(split, cls)] += 1
            if split == "train" and k < train:
                target = "train"
            elif split == "train" and k < train + pilot:
                target = "pilotval"
            elif split == "test" and k < test:
                target = "test"
            else:
                continue
            zout.writestr(f"cifar10/{target}/{cls}/{name}", zin.read(info))
            counts[target] += 1
    dst.with_suffix(".tmp").replace(dst)
    return dict(counts)


def pack_imagenet(src: Path, dst: Path, n: int = 64) -> int:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst.with_suffix(".tmp"), "w", zipfile.ZIP_STORED) as zout:
        members = sorted(i.filename for i in zin.infolist() if not i.is_dir())[:n]
        for m in members:
            zout.writestr(m, zin.read(m))
    dst.with_suffix(".tmp").replace(dst)
    return len(members)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / ".devdata")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("cifar10-sub.zip:", pack_cifar(args.shared / "cifar10-jpg.zip", args.out / "cifar10-sub.zip"))
    print("imagenet-sub.zip:", pack_imagenet(args.shared / "imagenet-samples-dev.zip", args.out / "imagenet-sub.zip"))


if __name__ == "__main__":
    main()
