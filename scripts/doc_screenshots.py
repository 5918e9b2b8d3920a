"""Screenshots for docs/compare.md, taken with the system's headless chromium through selenium.

    python scripts/doc_screenshots.py --compare runs/compare/compare.html \\
        --viewer runs/trained/report.html --viewer runs/random/report.html \\
        --name trained --name random --layer 2 --out docs/figures/compare

For every ``--viewer`` report: the viewer of its first image, at ``--layer`` (mean over heads), with the
mouse on the first image's most keypoint-rich patch (``viewer_<name>.png``). For ``--compare``: the top of
compare.html, findings and curves (``compare_page.png``). PNGs are reduced to a 128-colour palette to stay
small. Needs Debian's chromium and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

from siftlens.report.viewer import read_payload

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _browser import chrome, console_errors, missing_reason  # noqa: E402


def save_small(png: bytes, path: Path, crop_height: int | None = None) -> Path:
    """A screenshot as a 128-colour PNG, optionally cut to its top ``crop_height`` pixels."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if crop_height:
        img = img.crop((0, 0, img.width, min(img.height, crop_height)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def viewer_shot(driver, report: Path, layer: int, out: Path) -> Path:
    """The viewer of ``report`` at ``layer``, mean over heads, hovering the richest patch of the first image."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(report.resolve().as_uri())
    root = driver.find_element("id", "sl-explore")
    WebDriverWait(driver, 30).until(lambda d: root.get_attribute("data-ready") == "1")
    meta = read_payload(report.read_text(encoding="utf-8"))
    label = next(x for x in root.find_elements("tag name", "label") if x.text.startswith("Layer"))
    Select(label.find_element("tag name", "select")).select_by_value(str(meta["layers"].index(layer)))
    weights = meta["images"][0]["weights"]
    patch = max(range(len(weights)), key=lambda i: weights[i])
    gh, gw = meta["grid"]
    canvas = root.find_element("css selector", "canvas.sl-main")
    w, h = canvas.size["width"], canvas.size["height"]
    x, y = ((patch % gw) + 0.5) * w / gw - w / 2, ((patch // gw) + 0.5) * h / gh - h / 2
    ActionChains(driver).move_to_element_with_offset(canvas, int(x), int(y)).perform()
    driver.execute_script("arguments[0].scrollIntoView()", root)
    if console_errors(driver):
        raise SystemExit(f"console errors in {report}: {console_errors(driver)}")
    return save_small(root.screenshot_as_png, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", type=Path, required=True)
    ap.add_argument("--viewer", type=Path, action="append", default=[])
    ap.add_argument("--name", action="append", default=[])
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/figures/compare"))
    a = ap.parse_args()
    reason, _ = missing_reason()
    if reason:
        raise SystemExit(reason)
    driver = chrome(width=1100, height=1400)
    try:
        for report, name in zip(a.viewer, a.name or [p.parent.name for p in a.viewer], strict=True):
            print(viewer_shot(driver, report, a.layer, a.out / f"viewer_{name}.png"))
        driver.get(a.compare.resolve().as_uri())
        print(save_small(driver.get_screenshot_as_png(), a.out / "compare_page.png", crop_height=1400))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
