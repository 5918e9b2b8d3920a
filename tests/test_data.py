"""Image sources and robust decoding of awkward files."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from siftlens.data import ImageSource, decode_image
from siftlens.errors import ImageSourceError, SkipImage


def png_bytes(img: Image.Image, fmt="PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt)
    return b.getvalue()


def test_modes_are_converted_to_rgb():
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 255, (10, 12, 4), dtype=np.uint8), "RGBA")
    pal = grey.convert("P")
    arr16 = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)
    i16 = Image.fromarray(arr16)
    for img in (grey, rgba, pal, i16):
        out = decode_image(png_bytes(img))
        assert out.mode == "RGB" and out.size == (12, 10)
    # 16-bit values are scaled into 8 bits, not clipped: the maximum maps near 255
    out16 = np.asarray(decode_image(png_bytes(i16)))
    assert out16.max() == round(arr16.max() / 65535 * 255)
    assert len(np.unique(out16[..., 0])) > 50


def test_bad_files_raise_skip_with_reason():
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    good = png_bytes(Image.fromarray(noise), "JPEG")
    with pytest.raises(SkipImage, match="not an image"):
        decode_image(b"hello, I am text")
    with pytest.raises(SkipImage, match="corrupt or truncated"):
        decode_image(good[: len(good) // 2])
    with pytest.raises(SkipImage, match="too large"):
        decode_image(good, max_pixels=100)


def make_tree(root):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_folder_source_with_labels_and_limit(tmp_path):
    make_tree(tmp_path)
    src = ImageSource(tmp_path)
    assert len(src) == 6 and src.classes == ["cat", "dog"]
    assert src.labels == [0, 0, 0, 1, 1, 1]
    lim = ImageSource(tmp_path, limit=2)
    assert sorted(lim.labels) == [0, 1], "a limit keeps every class"
    assert src.load(0).size == (8, 8)


def test_zip_source_inner_folder_glob_and_files(tmp_path):
    make_tree(tmp_path / "tree")
    zp = tmp_path / "set.zip"
    with zipfile.ZipFile(zp, "w") as z:
        for f in sorted((tmp_path / "tree").rglob("*.png")):
            z.write(f, "root/split/" + f.relative_to(tmp_path / "tree").as_posix())
    src = ImageSource(f"{zp}/root/split")
    assert len(src) == 6 and src.classes == ["cat", "dog"]
    assert np.asarray(src.load(5)).shape == (8, 8, 3)
    assert len(ImageSource(zp)) == 6
    assert len(ImageSource(str(tmp_path / "tree" / "*" / "*.png"))) == 6
    assert len(ImageSource([tmp_path / "tree" / "cat" / "0.png"])) == 1
    with pytest.raises(ImageSourceError):
        ImageSource(f"{zp}/nowhere")
    with pytest.raises(ImageSourceError):
        ImageSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError):
        ImageSource(tmp_path / "empty")


def test_zip_source_survives_pickling(tmp_path):
    import pickle

    make_tree(tmp_path / "tree")
    zp = tmp_path / "set.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.write(tmp_path / "tree" / "cat" / "0.png", "cat/0.png")
    src = ImageSource(zp)
    src.load(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone.load(0).size == (8, 8)
