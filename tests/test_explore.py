"""The report's attention viewer: capture during the run, quantisation, packing, budget and the page.

(The browser side is in test_browser.py.)
"""

from __future__ import annotations

import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from siftlens.analysis import analyze
from siftlens.analysis.runner import read_images
from siftlens.analysis.viewer_records import collect_explore
from siftlens.attention import capture, patch_rows
from siftlens.errors import ConfigError
from siftlens.jobs import demo_images_dir
from siftlens.keypoints import sift_params
from siftlens.report import write_report
from siftlens.report.viewer import (
    QUANT_LEVELS,
    bits_for,
    explore_payload,
    pack,
    pack_all,
    pack_bits,
    quantize,
    read_payload,
    render_explore,
    unpack,
)

DEMO = str(demo_images_dir())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("explore") / "run"
    res = analyze("default", DEMO, out=out, limit=6, explore=3, rollout=True, n_boot=20, batch_size=4,
                  progress=False)
    return res


def test_patch_rows_are_the_cls_row_and_patch_rows_over_patch_keys():
    a = torch.rand(2, 3, 7, 7).softmax(-1)  # 2 prefix tokens, 5 patches
    r = patch_rows(a, 2, has_cls=True)
    assert r.shape == (2, 3, 6, 5)
    assert torch.equal(r[:, :, 0], a[:, :, 0, 2:]) and torch.equal(r[:, :, 1:], a[:, :, 2:, 2:])
    r = patch_rows(a, 2, has_cls=False)
    assert torch.allclose(r[:, :, 0], a[:, :, 2:, 2:].mean(2))


def test_run_keeps_the_first_images_attention_without_a_second_pass(run):
    ex = run.explore
    assert [r["index"] for r in ex] == [0, 1, 2]
    names = read_images(run.out).set_index("index")["name"]
    assert [r["name"] for r in ex] == [names[i] for i in range(3)]
    r = ex[0]
    assert r["attention"].shape == (6, 4, 65, 64) and r["attention"].dtype == np.float16
    assert r["rollout"].shape == (65, 64) and r["layers"] == list(range(6))
    assert r["weights"].shape == (8, 8) and r["pixels"].shape == (32, 32, 3)
    sums = r["attention"].astype(np.float32).sum(-1)
    assert (sums <= 1.01).all() and (sums > 0.3).all()  # rows over patch keys: the rest went to CLS
    # the rows kept during the run are what one forward of the same images gives afterwards
    cfg = run.manifest["params"]
    from siftlens.analysis.config import AnalysisConfig
    from siftlens.data import ImageSource
    from siftlens.models import load_backend

    c = AnalysisConfig.from_params(cfg)
    b = load_backend("default")
    again = collect_explore(b, ImageSource(DEMO, limit=6), read_images(run.out), c,
                            sift_params(b.input_size, c.sift), list(range(6)), have=None)
    for x, y in zip(ex, again, strict=True):
        np.testing.assert_allclose(x["attention"].astype(np.float32), y["attention"].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(x["rollout"].astype(np.float32), y["rollout"].astype(np.float32), atol=2e-3)
        assert x["prediction"] == y["prediction"]


def test_kept_rows_equal_the_models_own_attention(run):
    from siftlens.data import ImageSource
    from siftlens.models import load_backend

    b = load_backend("default")
    img = b.preprocess(ImageSource(DEMO, limit=6).load(0))
    seen = {}
    with torch.inference_mode(), capture(b, lambda layer, a: seen.__setitem__(layer, a.float()), [3]):
        b.forward(b.normalize(torch.from_numpy(img[None].copy())))
    want = patch_rows(seen[3], b.num_prefix_tokens, b.has_cls)[0]
    np.testing.assert_allclose(run.explore[0]["attention"][3].astype(np.float32), want.numpy(), atol=2e-3)


def test_quantize_and_pack_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    rows = rng.dirichlet(np.full(20, 0.3), size=(3, 2, 21)).astype(np.float32)  # (layers, heads, 1 + N, N)
    rec = {"attention": rows, "rollout": None}
    for levels in QUANT_LEVELS:
        back = unpack(pack(rec, levels), 6, 20, levels).reshape(rows.shape)
        step = rows.max(-1, keepdims=True) / levels
        assert np.abs(back - rows).max() <= (0.5 * step * 1.001 + 1e-6).max()
        assert np.all(np.abs(back - rows) <= 0.5 * step * 1.001 + 1e-7)
    q, e = quantize(rows, 255)
    assert q.max() == 255 and q.dtype == np.uint8 and e.dtype == np.uint16


def test_bits_are_packed_first_value_lowest():
    q = np.array([1, 2, 3, 0, 1], np.uint8)
    assert bits_for(3) == 2 and bits_for(1) == 1 and bits_for(15) == 4 and bits_for(255) == 8
    assert pack_bits(q, 2).tolist() == [1 | 2 << 2 | 3 << 4, 1]


def test_a_small_budget_gives_coarser_levels_then_fewer_images(run):
    blobs, fine = pack_all(run.explore, 10_000_000)
    assert fine == 255 and len(blobs) == 3
    one = len(blobs[0])
    blobs, coarse = pack_all(run.explore, int(one * 1.5))
    assert coarse < 255 and len(blobs) == 3
    blobs, coarsest = pack_all(run.explore, 5)
    assert coarsest == QUANT_LEVELS[-1] and blobs == []


def test_payload_carries_geometry_keypoints_and_decodable_attention(run):
    p = explore_payload(run.explore, run.manifest)
    assert p["grid"] == [8, 8] and p["input"] == [32, 32] and p["heads"] == 4 and p["rollout"]
    assert p["level_names"] == ["none", "low", "high"] and len(p["images"]) == 3
    img = p["images"][1]
    rec = run.explore[1]
    assert len(img["keypoints"]) == len(rec["keypoints_xy"]) and img["pixels"].startswith("data:image/png;base64,")
    assert img["weights"] == pytest.approx(rec["weights"].reshape(-1).tolist(), abs=1e-3)
    import base64

    back = unpack(base64.b64decode(img["attn"]), 6 * 4 + 1, 64, p["levels"])
    want = np.concatenate([rec["attention"].reshape(-1, 65, 64), rec["rollout"][None]]).astype(np.float32)
    assert np.abs(back - want).max() <= want.max() / p["levels"]


def test_report_embeds_the_viewer_offline_and_readable_without_js(run, tmp_path):
    page = write_report(tmp_path, run.summary, run.manifest, run.overlays, explore=run.explore).read_text()
    assert page.count('id="sl-explore"') == 1 and "<noscript>" in page and "DecompressionStream" in page
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]+)', markup, flags=re.I)
    assert all(r.startswith(("data:", "#")) for r in refs)
    code = scripts[-1]  # the viewer loads nothing: no URL, request or module import
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|fetch\(|XMLHttpRequest|import\(|WebSocket", code)
    assert len(read_payload(page)["images"]) == 3
    plain = write_report(tmp_path / "plain", run.summary, run.manifest, run.overlays).read_text()
    assert "sl-explore" not in plain and "<script" not in plain
    assert render_explore([], run.manifest) == ""


def test_data_text_cannot_close_the_script(run):
    evil = dict(run.explore[0], name="</script><script>alert(1)</script>")
    html = render_explore([evil], run.manifest)
    assert "</script><script>alert(1)" not in html and "\\u003c/script>\\u003cscript>alert(1)" in html


def test_explore_zero_disables_and_bad_values_fail_in_one_line(tmp_path):
    res = analyze("default", DEMO, out=tmp_path / "a", limit=3, explore=0, n_boot=10, progress=False)
    assert res.explore == []
    with pytest.raises(ConfigError, match="--explore must be between 0"):
        analyze("default", DEMO, out=tmp_path / "b", limit=3, explore=-1, progress=False)
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "analyze", "--model", "default", "--images", DEMO,
                        "--out", str(tmp_path / "c"), "--explore", "999"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--explore" in r.stderr


def test_resumed_run_captures_the_missing_viewer_images(tmp_path):
    """A run whose first images were analysed by an earlier invocation gets them by one extra forward."""
    out = tmp_path / "r"
    analyze("default", DEMO, out=out, limit=4, explore=2, n_boot=10, part_size=2, batch_size=2, progress=False,
            shard=(0, 1))
    (out / "shard-0000.json").unlink()
    res = analyze("default", DEMO, out=out, limit=4, explore=2, n_boot=10, batch_size=2, resume=True,
                  progress=False)
    assert [r["index"] for r in res.explore] == [0, 1]
    assert res.explore[0]["attention"].shape == (6, 4, 65, 64)


def test_zlib_stream_is_what_the_browser_inflates(run):
    blob = pack(run.explore[0], 15)
    raw = zlib.decompress(blob)  # DecompressionStream('deflate') reads exactly this (RFC 1950) format
    m, n = 6 * 4 + 1, 64
    assert len(raw) == 2 * m * (n + 1) + m * (n + 1) * n // 2


def test_non_square_grid_with_registers(tiny_vit, tmp_path):
    """Geometry comes from the model: a 3 x 4 grid behind CLS + 1 register, 2 layers of 4 heads."""
    from siftlens.models.native import NativeBackend

    b = NativeBackend(tiny_vit, source="tiny")
    res = analyze(b, DEMO, out=tmp_path / "t", limit=3, explore=2, n_boot=10, progress=False)
    r = res.explore[1]
    assert r["attention"].shape == (2, 4, 13, 12) and r["weights"].shape == (3, 4)
    assert r["pixels"].shape == (24, 32, 3)
    p = explore_payload(res.explore, res.manifest)
    assert p["grid"] == [3, 4] and p["input"] == [24, 32] and p["heads"] == 4 and not p["rollout"]
    sums = r["attention"].astype(np.float32).sum(-1)
    assert (sums < 0.999).any()  # the register and CLS keys are not among the patch keys
