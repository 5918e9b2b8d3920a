"""Image sources at scale (issue 24 item 4): WebDataset tar shards, Hugging Face datasets (save_to_disk, parquet,
hub ids), CSV/parquet manifests. Tiny sources built in tmp_path; nothing reaches the network."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_run_integrity import Interrupted, interrupt_at
from torch.utils.data import DataLoader, Dataset

from siftlens.data import ImageSource
from siftlens.errors import ConfigError, ImageSourceError
from siftlens.jobs import demo_images_dir
from siftlens.sources import expand_braces, parse_hf

DEMO = demo_images_dir()


def png(i: int, size=(9, 7)) -> bytes:
    rng = np.random.default_rng(i)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path) -> tuple[str, dict[str, bytes]]:
    """Two shards: .png + .cls in the first; .jpg + .json (label and y keys), a sample with no image, and a key
    in a sub-folder in the second. Returns the brace spec and the identity -> image bytes."""
    images = {f"train-00.tar/{k:06d}": png(k) for k in range(3)}
    make_tar(tmp_path / "sh" / "train-00.tar", {m: d for k in range(3) for m, d in (
        (f"{k:06d}.png", images[f"train-00.tar/{k:06d}"]), (f"{k:06d}.cls", f"{k % 2}\n".encode()))})
    second = {}
    for k in (3, 4):
        images[f"train-01.tar/{k:06d}"] = png(k)
        second[f"{k:06d}.jpg"] = png(k)
        second[f"{k:06d}.json"] = json.dumps({"label": 7, "y": "cat" if k == 3 else "dog"}).encode()
    second["000005.json"] = b'{"label": 1}'  # no image: not a sample
    images["train-01.tar/sub/000006"] = png(6)
    second["sub/000006.jpg"] = png(6)
    second["sub/000006.cls"] = b"1"
    make_tar(tmp_path / "sh" / "train-01.tar", second)
    return str(tmp_path / "sh" / "train-{00..01}.tar"), images


# -- WebDataset tar shards -------------------------------------------------------------------------------------
def test_brace_expansion():
    assert expand_braces("s/train-{0000..0002}.tar") == [f"s/train-{k:04d}.tar" for k in range(3)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("x-{8..10}") == ["x-8", "x-9", "x-10"]
    assert expand_braces("{literal}/a-{0..1}") == ["{literal}/a-0", "{literal}/a-1"]


def test_tar_shards_identities_labels_and_bytes(shards):
    spec, images = shards
    src = ImageSource(spec)
    assert src.names == list(images)  # shard order, then member order; the image-less sample is not one
    assert [src.read_bytes(i) for i in range(len(src))] == list(images.values())
    # .cls as a text int, else the .json's "label": classes are the sorted distinct values as strings
    assert src.classes == ["0", "1", "7"]
    assert [src.classes[y] for y in src.labels] == ["0", "1", "0", "7", "7", "1"]
    assert src.load(0).size == (9, 7)
    by_key = ImageSource(spec, label_key="y")  # only the .json's key: the .cls samples have none
    assert by_key.labels is None
    one = ImageSource(spec.replace("{00..01}", "01"), label_key="y")
    assert one.names == ["train-01.tar/000003", "train-01.tar/000004", "train-01.tar/sub/000006"]
    assert one.labels is None  # sub/000006 has no .json
    png_only = ImageSource(spec, image_column="png")
    assert len(png_only) == 3 and png_only.names[0] == "train-00.tar/000000"


def test_tar_shards_by_glob_list_and_limit(shards, tmp_path):
    spec, images = shards
    files = sorted(str(p) for p in (tmp_path / "sh").glob("*.tar"))
    assert ImageSource(str(tmp_path / "sh" / "*.tar")).names == list(images)
    assert ImageSource(files).names == list(images)
    lim = ImageSource(spec, limit=3)  # spread over the classes 0, 1, 7
    assert sorted(lim.classes[y] for y in lim.labels) == ["0", "1", "7"]
    with pytest.raises(ImageSourceError, match="tar shard not found: .*train-02.tar"):
        ImageSource(spec.replace("{00..01}", "{00..02}"))
    with pytest.raises(ImageSourceError, match="compressed tar"):
        ImageSource(str(tmp_path / "x.tar.gz"))


def test_tar_fingerprint_covers_shards_and_labels(shards, tmp_path):
    spec, _ = shards
    before = ImageSource(spec).fingerprint()
    assert ImageSource(spec).fingerprint() == before
    shard = tmp_path / "sh" / "train-01.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert ImageSource(spec).fingerprint() != before


# -- Hugging Face datasets: save_to_disk, parquet, hub ids ---------------------------------------------------------
try:
    import datasets
except ImportError:  # the 'data' extra (part of 'dev'); tars and manifests need only the standard library
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="the 'datasets' package (siftlens[data]) is absent")


def hf_dataset(n=5, split="validation"):
    feats = datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "emu"]),
                               "uid": datasets.Value("string")})
    data = {"picture": [{"bytes": png(k), "path": None} for k in range(n)], "label": [k % 3 for k in range(n)],
            "uid": [f"u{k}" for k in range(n)]}
    return datasets.Dataset.from_dict(data, features=feats, split=split)


@needs_datasets
def test_hf_save_to_disk(tmp_path):
    hf_dataset().save_to_disk(tmp_path / "ds")
    src = ImageSource(str(tmp_path / "ds"))
    assert src.names == [f"validation/{k}" for k in range(5)]
    assert src.classes == ["cat", "dog", "emu"] and src.labels == [0, 1, 2, 0, 1]  # ClassLabel names
    assert [src.read_bytes(k) for k in range(5)] == [png(k) for k in range(5)]
    assert ImageSource(f"hf:{tmp_path / 'ds'}", id_column="uid").names == [f"validation/u{k}" for k in range(5)]
    assert ImageSource(str(tmp_path / "ds")).fingerprint() == src.fingerprint()
    datasets.DatasetDict({"train": hf_dataset(2, "train"), "test": hf_dataset(3, "test")}).save_to_disk(
        tmp_path / "dd")
    with pytest.raises(ImageSourceError, match="splits train, test; choose one"):
        ImageSource(str(tmp_path / "dd"))
    assert ImageSource(f"hf:{tmp_path / 'dd'}:test").names == ["test/0", "test/1", "test/2"]
    with pytest.raises(ImageSourceError, match="no column 'pixels'"):
        ImageSource(str(tmp_path / "ds"), image_column="pixels")


@needs_datasets
def test_hf_parquet_files_with_row_groups(tmp_path):
    table = hf_dataset(7).with_format("arrow")[:]
    pq.write_table(table, tmp_path / "validation-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(hf_dataset(2).with_format("arrow")[:], tmp_path / "validation-00001-of-00002.parquet")
    src = ImageSource(str(tmp_path / "*.parquet"))
    assert src.names == [f"validation/{k}" for k in range(9)]
    assert src.classes == ["cat", "dog", "emu"] and src.labels == [0, 1, 2, 0, 1, 2, 0, 0, 1]
    want = [png(k) for k in range(7)] + [png(0), png(1)]
    assert [src.read_bytes(k) for k in (8, 0, 3, 2, 7, 1, 4, 5, 6)] == [want[k] for k in (8, 0, 3, 2, 7, 1, 4, 5, 6)]
    one = ImageSource(f"hf:{tmp_path / 'validation-00001-of-00002.parquet'}:val", id_column="uid")
    assert one.names == ["val/u0", "val/u1"]
    hf_dataset(3).to_parquet(str(tmp_path / "sub" / "x.parquet"))  # datasets' own writer: its metadata
    assert ImageSource(str(tmp_path / "sub" / "x.parquet")).classes == ["cat", "dog", "emu"]


@needs_datasets
def test_hub_ids_are_parsed_and_offline_is_one_line(tmp_path):
    assert parse_hf("org/name:validation") == ("org/name", None, "validation")
    assert parse_hf("org/name:cfg:train") == ("org/name", "cfg", "train")
    assert parse_hf("org/name") == ("org/name", None, None)
    with pytest.raises(ImageSourceError, match="name the split"):
        ImageSource("hf:org/name")
    code = ("from siftlens.data import ImageSource\n"
            "try:\n    ImageSource('hf:org/name:validation')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ImageSourceError hf:org/name:validation: the dataset is not in the local cache")
    assert "HF_HOME" in out and "HF_DATASETS_OFFLINE" in out and out.count("\n") == 1


@needs_datasets
def test_hub_ids_go_to_load_dataset_streaming_only_with_a_limit(tmp_path, monkeypatch):
    hf_dataset().save_to_disk(tmp_path / "ds")
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):  # stands in for the hub
        calls.append((name, config, split, streaming))
        ds = datasets.load_from_disk(str(tmp_path / "ds"))
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    whole = ImageSource("hf:org/name:validation")
    assert whole.names == [f"validation/{k}" for k in range(5)] and whole.classes == ["cat", "dog", "emu"]
    part = ImageSource("hf:org/name:cfg:validation", limit=3)  # streams the first 3 rows only
    assert calls == [("org/name", None, "validation", False), ("org/name", "cfg", "validation", True)]
    assert part.names == ["validation/0", "validation/1", "validation/2"] and part.labels == [0, 1, 2]
    assert [part.read_bytes(k) for k in range(3)] == [png(k) for k in range(3)]  # the stored bytes, not re-encoded
    assert ImageSource("hf:org/name:cfg:validation", limit=3).fingerprint() == part.fingerprint()


# -- manifests -------------------------------------------------------------------------------------------------
def test_csv_and_parquet_manifests(tmp_path):
    for k, rel in enumerate(["a/x.png", "b/x.png", "c.png"]):
        (tmp_path / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / rel).write_bytes(png(k))
    (tmp_path / "imgs" / "m.csv").write_text("file,label\na/x.png,dog\nb/x.png,cat\nc.png,dog\n")
    src = ImageSource(str(tmp_path / "imgs" / "m.csv"))
    assert src.names == ["a/x.png", "b/x.png", "c.png"]  # the paths as written, relative to the manifest
    assert src.classes == ["cat", "dog"] and src.labels == [1, 0, 1]
    assert [src.read_bytes(k) for k in range(3)] == [png(k) for k in range(3)]
    pq.write_table(pa.table({"where": [str(tmp_path / "imgs" / "c.png"), "a/x.png"], "y": [4, 2]}),
                   tmp_path / "imgs" / "m.parquet")
    src = ImageSource(str(tmp_path / "imgs" / "m.parquet"), image_column="where", label_column="y")
    assert src.names == [str(tmp_path / "imgs" / "c.png"), "a/x.png"]
    assert src.classes == ["2", "4"] and src.labels == [1, 0] and src.read_bytes(1) == png(0)
    before = src.fingerprint()
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(png(9))
    assert ImageSource(str(tmp_path / "imgs" / "m.parquet"), image_column="where", label_column="y"
                       ).fingerprint() != before
    (tmp_path / "imgs" / "dup.csv").write_text("path\nc.png\nc.png\n")
    with pytest.raises(ImageSourceError, match="twice"):
        ImageSource(str(tmp_path / "imgs" / "dup.csv"))
    with pytest.raises(ImageSourceError, match="--label-key do not apply to manifests"):
        ImageSource(str(tmp_path / "imgs" / "m.csv"), label_key="y")
    with pytest.raises(ImageSourceError, match="--image-column apply to tar shards"):
        ImageSource(str(tmp_path / "imgs" / "a"), image_column="x")


# -- per-process handles: pickled, forked into DataLoader workers --------------------------------------------------
class Bytes(Dataset):
    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return i, self.src.read_bytes(i)


@pytest.mark.parametrize("kind", ["tar", pytest.param("parquet", marks=needs_datasets),
                                  pytest.param("save_to_disk", marks=needs_datasets), "manifest"])
def test_sources_read_the_same_bytes_in_dataloader_workers(tmp_path, shards, kind):
    spec, _ = shards
    if kind == "parquet":
        pq.write_table(hf_dataset(6).with_format("arrow")[:], tmp_path / "d.parquet", row_group_size=2)
        spec = str(tmp_path / "d.parquet")
    elif kind == "save_to_disk":
        hf_dataset(6).save_to_disk(tmp_path / "ds")
        spec = str(tmp_path / "ds")
    elif kind == "manifest":
        for k in range(4):
            (tmp_path / f"{k}.png").write_bytes(png(k))
        (tmp_path / "m.csv").write_text("path\n" + "".join(f"{k}.png\n" for k in range(4)))
        spec = str(tmp_path / "m.csv")
    src = ImageSource(spec)
    want = [src.read_bytes(i) for i in range(len(src))]  # the parent holds open handles now
    again = pickle.loads(pickle.dumps(src))
    assert [again.read_bytes(i) for i in range(len(src))] == want and again.fingerprint() == src.fingerprint()
    got = {}
    for batch in DataLoader(Bytes(src), batch_size=2, num_workers=2, collate_fn=list):
        got.update(batch)
    assert [got[i] for i in range(len(src))] == want


# -- end to end: a tar source through analyze: two shards merged equal one run; resume after a kill --------------
FAST = {"progress": False, "n_boot": 50, "null": "exact", "explore": 0, "overlays": 0, "batch_size": 4,
        "part_size": 4}


@pytest.fixture(scope="module")
def demo_tars(tmp_path_factory) -> str:
    """12 demo images (3 classes) in two WebDataset shards, labelled by .cls."""
    root = tmp_path_factory.mktemp("wds")
    classes = ["cat", "dog", "ship"]
    for s in range(2):
        members = {}
        for k in range(6):
            c = (k + s) % 3
            members[f"{s}{k:05d}.jpg"] = (DEMO / classes[c] / f"000{k}.jpg").read_bytes()
            members[f"{s}{k:05d}.cls"] = str(c).encode()
        make_tar(root / f"demo-{s:04d}.tar", members)
    return str(root / "demo-{0000..0001}.tar")


def test_tar_source_shards_merge_and_resume_equal_one_run(demo_tars, tmp_path, monkeypatch):
    from siftlens.analysis import analyze, merge

    whole = analyze("default", demo_tars, out=tmp_path / "whole", **FAST)
    assert whole.images["name"].str.match(r"demo-000[01]\.tar/[01]\d{5}$").all() and len(whole.images) == 12
    assert set(whole.images["label"]) == {"0", "1", "2"} and whole.summary["n"].max() == 12
    for i in range(2):
        assert analyze("default", demo_tars, out=tmp_path / f"s{i}", shard=(i, 2), **FAST) is None
    merged = merge(tmp_path / "merged", [tmp_path / "s0", tmp_path / "s1"], progress=False)
    pd.testing.assert_frame_equal(merged.summary, whole.summary)
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_at(m, out, 3)  # run.json, the first part's metrics and images: killed before the second part
        with pytest.raises(Interrupted):
            analyze("default", demo_tars, out=out, **FAST)
    resumed = analyze("default", demo_tars, out=out, resume=True, **FAST)
    assert (out / "summary.csv").read_bytes() == (tmp_path / "whole" / "summary.csv").read_bytes()
    assert resumed.manifest["images"]["analysed"] == 12
    with pytest.raises(ConfigError, match="images differ from the run"):  # other options: another run
        analyze("default", ImageSource(demo_tars, image_column="jpg"), out=out, resume=True, **FAST)


def test_cli_column_options_reach_the_source(demo_tars, tmp_path):
    from typer.testing import CliRunner

    from siftlens.cli import app

    args = ["analyze", "--model", "default", "--images", demo_tars, "--out", str(tmp_path / "cli"), "--no-report",
            "--no-progress", "--limit", "3", "--bootstrap", "50", "--explore", "0", "--overlays", "0",
            "--image-column", "jpg"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    images = pd.read_csv(tmp_path / "cli" / "images.csv")
    assert len(images) == 3 and sorted(images["label"]) == [0, 1, 2]  # --limit spreads over the .cls classes
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["images"]["options"] == {"image_column": "jpg"}
    res = CliRunner().invoke(app, [*args[:-1], "png", "--out", str(tmp_path / "none")])
    assert res.exit_code != 0 and "no images found" in str(res.exception)
