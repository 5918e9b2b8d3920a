"""The reports in a real browser (headless chromium through selenium): the attention viewer of report.html
reacts to the mouse and decodes the same numbers Python wrote, the page reads without JavaScript, and
compare.html renders; the console stays free of errors. ``make test-browser`` runs only these."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch
from _browser import chrome, console_errors, missing_reason

from siftlens.analysis import analyze, configure
from siftlens.jobs import JobOptions, demo_images_dir, run_analysis, run_compare
from siftlens.models import load_backend
from siftlens.report.viewer import read_payload, unpack

pytestmark = pytest.mark.browser
DEMO = str(demo_images_dir())
SETTINGS = {"limit": 6, "rollout": True, "n_boot": 20}


@pytest.fixture(scope="module")
def driver():
    reason, skip = missing_reason()
    if reason:
        (pytest.skip if skip else pytest.fail)(reason)
    d = chrome()
    yield d
    d.quit()


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A real analysis of the built-in model with its report, a random-init copy, and their comparison."""
    root = tmp_path_factory.mktemp("browser")
    run_analysis("default", DEMO, root / "trained", configure(None, explore=3, **SETTINGS), JobOptions(progress=False))
    b = load_backend("default")
    torch.manual_seed(0)
    for m in b.model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    analyze(b, DEMO, out=root / "random", explore=0, progress=False, **SETTINGS)
    _, paths = run_compare([root / "trained", root / "random"], root / "compare", labels=["trained", "random"])
    return {"report": root / "trained" / "report.html", "compare": paths["report"]}


def _open(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 20).until(
        lambda d: d.find_element("id", "sl-explore").get_attribute("data-ready") in ("1", "error"))
    root = driver.find_element("id", "sl-explore")
    assert root.get_attribute("data-ready") == "1", root.text
    return root, read_payload(path.read_text(encoding="utf-8"))


def _centres(driver, canvas, meta) -> np.ndarray:
    """(N, 3) RGB of every patch's centre pixel on ``canvas``."""
    return np.array(driver.execute_script("""
        var c = arguments[0], gh = arguments[1], gw = arguments[2], ctx = c.getContext('2d'), out = [];
        for (var r = 0; r < gh; r++) for (var k = 0; k < gw; k++) {
          var x = Math.floor((k + 0.5) * c.width / gw), y = Math.floor((r + 0.5) * c.height / gh);
          var d = ctx.getImageData(x, y, 1, 1).data;
          out.push([d[0], d[1], d[2]]);
        }
        return out;""", canvas, *meta["grid"]))


def _hover(driver, canvas, meta, patch: int, click: bool = False) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    gh, gw = meta["grid"]
    w, h = canvas.size["width"], canvas.size["height"]
    x, y = ((patch % gw) + 0.5) * w / gw - w / 2, ((patch // gw) + 0.5) * h / gh - h / 2
    chain = ActionChains(driver).move_to_element_with_offset(canvas, int(x), int(y))
    (chain.click() if click else chain).perform()


def _select(root, label: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    sel = next(s for s in root.find_elements("tag name", "label") if s.text.startswith(label))
    Select(sel.find_element("tag name", "select")).select_by_value(value)


def test_hovering_a_patch_redraws_its_heatmap_and_decodes_pythons_numbers(driver, reports):
    root, meta = _open(driver, reports["report"])
    assert len(meta["images"]) == 3 and meta["rollout"]
    next(x for x in root.find_elements("tag name", "label") if "keypoints" in x.text).click()  # plain heatmap
    main, cls, roll = (root.find_element("css selector", f"canvas.{c}") for c in ("sl-main", "sl-cls", "sl-rollout"))
    n = meta["grid"][0] * meta["grid"][1]
    _hover(driver, main, meta, 0)
    assert root.get_attribute("data-patch") == "0"
    first, cls_first, roll_first = (_centres(driver, c, meta) for c in (main, cls, roll))
    _hover(driver, main, meta, n - 1)
    assert root.get_attribute("data-patch") == str(n - 1)
    last = _centres(driver, main, meta)
    assert (np.abs(first - last).sum(1) > 10).sum() >= n // 4  # the heatmap follows the hovered patch
    assert (np.abs(_centres(driver, roll, meta) - roll_first).sum(1) > 10).any()
    np.testing.assert_array_equal(_centres(driver, cls, meta), cls_first)  # the CLS panel does not
    w = meta["images"][0]["weights"][n - 1]
    info = root.find_element("class name", "sl-info").text
    assert f"Patch (row {(n - 1) // meta['grid'][1]}, column {meta['grid'][1] - 1}): keypoint weight {w:g}," in info
    # the CLS share the page prints is what Python packed: last layer, mean over heads, row 0
    att = unpack(base64.b64decode(meta["images"][0]["attn"]), len(meta["layers"]) * meta["heads"] + 1, n,
                 meta["levels"])
    want = 100 * att[(len(meta["layers"]) - 1) * meta["heads"]:len(meta["layers"]) * meta["heads"], 0].mean(0).sum()
    shown = float(re.search(r"Middle, .*?all patches together ([\d.]+)%", info).group(1))
    assert shown == pytest.approx(want, abs=0.06)
    _select(root, "Head", "0")
    assert (np.abs(_centres(driver, cls, meta) - cls_first).sum(1) > 10).any()
    _hover(driver, main, meta, 1, click=True)  # pinned: moving away keeps the patch
    _hover(driver, main, meta, n - 2)
    assert root.get_attribute("data-patch") == "1"
    assert console_errors(driver) == []


def test_choosing_another_image_and_layer_loads_it(driver, reports):
    root, meta = _open(driver, reports["report"])
    main = root.find_element("css selector", "canvas.sl-main")
    before = _centres(driver, main, meta)
    _select(root, "Image", "2")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: meta["images"][2]["name"] in root.text)
    assert root.get_attribute("data-ready") == "1"
    assert (np.abs(_centres(driver, main, meta) - before).sum(1) > 10).any()
    _select(root, "Layer", "0")
    assert "layer 0" in root.find_element("class name", "sl-info").text
    assert console_errors(driver) == []


def test_the_report_reads_without_javascript(reports):
    reason, skip = missing_reason()
    if reason:
        (pytest.skip if skip else pytest.fail)(reason)
    d = chrome(javascript=False)
    try:
        d.get(reports["report"].as_uri())
        body = d.find_element("tag name", "body").text
        assert "What we found" in body and "Top 15" in body and "How to read these metrics" in body
        assert "The interactive viewer needs JavaScript" in body
        assert d.find_element("id", "sl-explore").text == ""
        imgs = d.find_elements("tag name", "img")
        assert imgs and all(d.execute_script("return arguments[0].naturalWidth", i) > 0 for i in imgs)
    finally:
        d.quit()


def test_the_compare_report_renders(driver, reports):
    driver.get(reports["compare"].as_uri())
    body = driver.find_element("tag name", "body").text
    assert "How do these runs differ?" in body and "random" in body and "trained" in body
    img = driver.find_element("css selector", "#curves + figure img")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 100
    rows = driver.find_elements("css selector", "table.top tbody tr")
    assert len(rows) >= 6 and all(len(r.find_elements("tag name", "td")) == 9 for r in rows)
    assert console_errors(driver) == []


def test_a_non_square_grid_maps_the_mouse_to_the_right_patch(driver, tiny_vit, tmp_path):
    """A 3 x 4 grid behind CLS + 1 register (24 x 32 input): row and column come from the model."""
    from siftlens.models.native import NativeBackend
    from siftlens.report import write_report

    res = analyze(NativeBackend(tiny_vit, source="tiny"), DEMO, out=tmp_path / "t", limit=2, explore=1, n_boot=10,
                  progress=False)
    root, meta = _open(driver, write_report(tmp_path / "t", res.summary, res.manifest, explore=res.explore))
    assert meta["grid"] == [3, 4] and meta["input"] == [24, 32]
    main = root.find_element("css selector", "canvas.sl-main")
    assert main.size["width"] > main.size["height"]
    for patch in (3, 4, 11):  # last of row 0, first of row 1, last patch
        _hover(driver, main, meta, patch)
        assert root.get_attribute("data-patch") == str(patch)
    assert "Patch (row 2, column 3)" in root.find_element("class name", "sl-info").text
    assert console_errors(driver) == []
