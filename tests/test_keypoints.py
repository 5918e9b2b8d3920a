"""Keypoint maps: exact maps from hand-placed keypoints, and real OpenCV output on real photos."""

from __future__ import annotations

import io
import math
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image

from siftlens.errors import ConfigError, GeometryError
from siftlens.keypoints import (
    Keypoints,
    SiftParams,
    detect,
    keypoint_map,
    levels_of,
    patch_index,
    weight_map,
)


def kps(xy, size=None, resp=None) -> Keypoints:
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    k = len(xy)
    size = np.full(k, 2.0, np.float32) if size is None else np.asarray(size, np.float32)
    resp = np.ones(k, np.float32) if resp is None else np.asarray(resp, np.float32)
    return Keypoints(xy, size, resp, np.zeros(k, np.float32))


def Phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_count_and_response_maps_by_hand():
    # 8x12 image, patch 4 -> grid 2x3. Pixel (x, y) lies in column x // 4, row y // 4.
    k = kps([[0, 0], [3, 3], [4, 0], [11, 7], [11.4, 7.4], [5, 6]], resp=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    grid = (2, 3)
    np.testing.assert_array_equal(patch_index(k.xy, 4, grid), [0, 0, 1, 5, 5, 4])
    np.testing.assert_array_equal(weight_map(k, 4, grid, "count"), [2, 1, 0, 0, 1, 2])
    np.testing.assert_allclose(weight_map(k, 4, grid, "response"), [0.3, 0.3, 0, 0, 0.6, 0.9], rtol=1e-6)


def test_keypoint_on_patch_border_goes_to_the_patch_its_pixel_belongs_to():
    # pixel 3 is the last of patch 0, pixel 4 the first of patch 1; x = 3.49 still rounds into pixel 3
    k = kps([[3.49, 0], [3.5, 0]])
    np.testing.assert_array_equal(patch_index(k.xy, 4, (1, 2)), [0, 1])


Z3 = Phi(3) - Phi(-3)  # mass of a standard normal inside +-3: footprint Gaussians are cut there


def Phi3(z):
    """The CDF of a standard normal truncated to [-3, 3]."""
    return (Phi(min(max(z, -3.0), 3.0)) - Phi(-3)) / Z3


def test_footprint_map_by_hand():
    # one keypoint at the border x = 3.5 between columns 0 and 1 (1 row): sigma = size/2 = 1
    k = kps([[3.5, 1.5]], size=[2.0])
    w = weight_map(k, 4, (1, 2), "footprint")
    # x: column 0 covers [-0.5, 3.5), column 1 [3.5, 7.5); y: row 0 covers [-0.5, 3.5); the support is
    # x in [0.5, 6.5], y in [-1.5, 4.5], so y loses the truncated mass below -0.5 and above 3.5
    wy = Phi3((3.5 - 1.5) / 1) - Phi3((-0.5 - 1.5) / 1)
    expect = [(Phi3(0) - Phi3(-4)) * wy, (Phi3(4) - Phi3(0)) * wy]
    np.testing.assert_allclose(w, expect, rtol=1e-9)
    np.testing.assert_allclose(w, [0.5 * wy, 0.5 * wy], rtol=1e-9)
    # a tiny keypoint in the middle of a patch puts all its unit mass there
    w2 = weight_map(kps([[5.5, 1.5]], size=[0.01]), 4, (1, 2), "footprint")
    np.testing.assert_allclose(w2, [0.0, 1.0], atol=1e-9)
    # a keypoint on the image's left edge x = -0.5: the half of its square outside the image is dropped,
    # not moved into the image
    w3 = weight_map(kps([[-0.5, 3.5]], size=[2.0]), 4, (2, 2), "footprint")
    np.testing.assert_allclose(w3.sum(), 0.5, rtol=1e-12)
    np.testing.assert_allclose(w3, [0.25, 0.0, 0.25, 0.0], rtol=1e-12)


def test_footprint_is_exactly_zero_outside_the_three_sigma_square():
    # grid 1x4 of 8-pixel patches: columns [-0.5, 7.5), [7.5, 15.5), [15.5, 23.5), [23.5, 31.5)
    # sigma = 1: the keypoint at x = 4 covers x in [1, 7], inside column 0 only; column 1 starts 3.5
    # sigma away (a plain Gaussian puts about 2e-4 there)
    w = weight_map(kps([[4.0, 3.5]], size=[2.0]), 8, (1, 4), "footprint")
    assert w[0] > 0.99
    assert w[1] == 0.0 and w[2] == 0.0 and w[3] == 0.0
    # far to the right: the lower tail of a plain Gaussian is tiny but positive, here it is 0.0
    w = weight_map(kps([[27.5, 3.5]], size=[2.0]), 8, (1, 4), "footprint")
    assert w[0] == 0.0 and w[1] == 0.0 and w[2] == 0.0 and w[3] > 0.99
    assert levels_of(w, 3).tolist() == [0, 0, 0, 1]
    # a patch touched only at the edge of the square gets 0 too: x = 4.5, sigma = 1 -> support ends at 7.5
    assert weight_map(kps([[4.5, 3.5]], size=[2.0]), 8, (1, 4), "footprint")[1] == 0.0


def test_footprint_mass_of_an_inner_keypoint_is_one():
    # sigma = 2.5: the square x in [0.1, 15.1], y in [0.5, 15.5] lies inside the 32x32 image, although
    # the plain Gaussian would lose about 1e-3 of its mass beyond the left and top edges
    for xy, size in (([7.6, 8.0], 5.0), ([15.3, 16.1], 5.0), ([20.2, 9.9], 3.3), ([3.0, 28.0], 1.0)):
        w = weight_map(kps([xy], size=[size]), 8, (4, 4), "footprint")
        assert abs(w.sum() - 1.0) < 1e-9, (xy, size, w.sum())
    # several keypoints: each brings its own unit mass
    w = weight_map(kps([[7.6, 8.0], [15.3, 16.1], [20.2, 9.9]], size=[5.0, 5.0, 3.3]), 8, (4, 4), "footprint")
    assert abs(w.sum() - 3.0) < 1e-9


def test_footprint_level_zero_on_bundled_cifar_images():
    """On real (32x32 CIFAR) photos, "no keypoint mass" is common under footprint, as under count.

    Measured on these 30 images (3 per class), u = 4, patch 4: count has 997 level-0 patches of 1920,
    footprint 194 (0.19 of count's); the untruncated Gaussian had 12 (0.012).
    """
    from importlib.resources import files

    root = files("siftlens") / "assets" / "demo_images"
    paths = sorted(p for c in root.iterdir() if c.is_dir() for p in c.iterdir()
                   if p.name.endswith(".jpg") and int(p.name[:4]) < 3)
    assert len(paths) == 30
    zero_count = zero_fp = 0
    for p in paths:
        with Image.open(str(p)) as im:
            px = np.asarray(im.convert("RGB"))
        params = SiftParams(upsample=4.0)
        km = keypoint_map(px, patch=4, scheme="count", params=params)
        fp = keypoint_map(px, patch=4, scheme="footprint", params=params)
        zero_count += int((km.levels == 0).sum())
        zero_fp += int((fp.levels == 0).sum())
        assert np.array_equal(fp.levels == 0, fp.weights == 0)
        assert ((fp.levels == 0) <= (km.levels == 0)).all()  # a patch holding a centre has mass
    assert zero_count > 500
    assert zero_fp >= 0.15 * zero_count


def test_footprint_level_zero_on_a_real_photo(imagenet_zip):
    """One ImageNet photo (the tench) at 224, patch 16: count has 151 level-0 patches of 196, footprint
    72 (0.48 of count's); the untruncated Gaussian had 0."""
    from siftlens.models.backend import resize_center_crop

    with zipfile.ZipFile(imagenet_zip) as z:
        name = sorted(z.namelist())[0]
        photo = Image.open(io.BytesIO(z.read(name))).convert("RGB")
    px = resize_center_crop(photo, (224, 224))
    count0 = int((keypoint_map(px, patch=16).levels == 0).sum())
    fp = keypoint_map(px, patch=16, scheme="footprint")
    fp0 = int((fp.levels == 0).sum())
    assert count0 > 100
    assert fp0 >= 0.35 * count0
    assert fp.weights.sum() <= len(fp.keypoints) + 1e-9


def test_levels_quantile_and_thresholds():
    w = np.array([0, 1, 2, 3, 4, 0, 2], float)
    # non-zero weights 1,2,3,4,2: median 2 -> weights <= 2 low (1), above high (2)
    np.testing.assert_array_equal(levels_of(w, 3), [0, 1, 1, 2, 2, 0, 1])
    np.testing.assert_array_equal(levels_of(w, 2), [0, 1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(levels_of(w, 3, thresholds=[2.5]), [0, 1, 1, 2, 2, 0, 1])
    np.testing.assert_array_equal(levels_of(np.zeros(5), 3), np.zeros(5))
    with pytest.raises(ConfigError):
        levels_of(w, 4, thresholds=[1.0])
    with pytest.raises(ConfigError):
        levels_of(w, 1)


def blob_image(h=64, w=96, cx=60, cy=20, s=3.0):
    yy, xx = np.mgrid[0:h, 0:w]
    g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    img = (30 + 200 * g).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, 2)


def test_sift_finds_a_planted_blob_in_its_patch():
    img = blob_image()
    km = keypoint_map(img, patch=16)
    assert km.grid == (4, 6)
    assert km.has_keypoints
    d = np.hypot(km.keypoints.xy[:, 0] - 60, km.keypoints.xy[:, 1] - 20)
    assert d.min() < 1.0, "the blob centre must be detected"
    assert km.weights[1 * 6 + 3] >= 1  # pixel (60, 20) -> row 1, column 3
    assert km.weights.sum() == len(km.keypoints)


def test_upsampling_maps_coordinates_back_to_model_pixels():
    img = blob_image(h=32, w=48, cx=30.0, cy=10.0, s=1.5)
    k = detect(img, SiftParams(upsample=4.0))
    assert len(k) > 0
    d = np.hypot(k.xy[:, 0] - 30, k.xy[:, 1] - 10)
    assert d.min() < 0.75
    assert (k.xy >= -0.5).all() and (k.xy[:, 0] < 48).all() and (k.xy[:, 1] < 32).all()


def test_image_without_keypoints_is_kept_and_flagged():
    km = keypoint_map(np.full((32, 32, 3), 128, np.uint8), patch=4)
    assert not km.has_keypoints
    assert km.weights.shape == (64,) and km.weights.sum() == 0
    assert np.all(km.concentration == 0) and not np.isnan(km.concentration).any()
    assert np.all(km.levels == 0)


def test_geometry_errors():
    with pytest.raises(GeometryError):
        keypoint_map(np.zeros((30, 32, 3), np.uint8), patch=4)
    with pytest.raises(ConfigError):
        weight_map(kps([[1, 1]]), 4, (1, 1), "nope")


def test_real_photos_match_raw_opencv(imagenet_zip):
    """On real photos, the map counts exactly the keypoints raw cv2.SIFT finds on the same pixels."""
    from siftlens.models.backend import resize_center_crop

    with zipfile.ZipFile(imagenet_zip) as z:
        names = sorted(z.namelist())[:6]
        photos = [Image.open(io.BytesIO(z.read(n))).convert("RGB") for n in names]
    sift = cv2.SIFT_create()
    for photo in photos:
        px = resize_center_crop(photo, (224, 224))
        raw = sift.detect(cv2.cvtColor(px, cv2.COLOR_RGB2GRAY), None)
        km = keypoint_map(px, patch=16)
        assert len(raw) > 20, "a real photo has many SIFT keypoints"
        assert km.weights.sum() == len(raw)
        expected = np.zeros(196)
        for kp in raw:
            expected[min(int((kp.pt[1] + 0.5) // 16), 13) * 14 + min(int((kp.pt[0] + 0.5) // 16), 13)] += 1
        np.testing.assert_array_equal(km.weights, expected)
        fp = keypoint_map(px, patch=16, scheme="footprint").weights
        assert 0 < fp.sum() <= len(raw) + 1e-6
        assert set(np.unique(km.levels)) <= {0, 1, 2}
