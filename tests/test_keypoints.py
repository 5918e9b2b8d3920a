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


def test_footprint_map_by_hand():
    # one keypoint at the border x = 3.5 between columns 0 and 1 (1 row): sigma = size/2 = 1
    k = kps([[3.5, 1.5]], size=[2.0])
    w = weight_map(k, 4, (1, 2), "footprint")
    # x: column 0 covers [-0.5, 3.5), column 1 [3.5, 7.5); y: row 0 covers [-0.5, 3.5)
    wy = Phi((3.5 - 1.5) / 1) - Phi((-0.5 - 1.5) / 1)
    expect = [(Phi(0) - Phi(-4)) * wy, (Phi(4) - Phi(0)) * wy]
    np.testing.assert_allclose(w, expect, rtol=1e-9)
    # a tiny keypoint in the middle of a patch puts (almost) all its unit mass there
    w2 = weight_map(kps([[5.5, 1.5]], size=[0.01]), 4, (1, 2), "footprint")
    np.testing.assert_allclose(w2, [0.0, 1.0], atol=1e-9)


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
    from siftlens.models.backends import resize_center_crop

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
