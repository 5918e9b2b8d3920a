"""A headless chromium driven by selenium, for the browser tests and the docs' screenshots.

Only the system's browser is used (Debian: ``apt-get install chromium chromium-driver``); nothing is
downloaded, selenium's own driver manager included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)
DRIVER_PATHS = ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
PACKAGE_MANAGERS = ("apt-get", "dnf", "yum", "apk", "pacman", "zypper", "brew")


def find_browser() -> tuple[str | None, str | None]:
    """Paths of a chromium executable and its chromedriver (None where absent)."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = next((p for p in map(shutil.which, DRIVERS) if p), None)
    driver = driver or next((p for p in DRIVER_PATHS if Path(p).is_file() and os.access(p, os.X_OK)), None)
    return browser, driver


def missing_reason() -> tuple[str | None, bool]:
    """(why the browser tests cannot run, whether that is a reason to skip rather than fail); (None, _) when
    they can. They skip only where no browser can be had: no package manager, or CI tried and failed to
    install one (``SIFTLENS_BROWSER_SKIP`` says why)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]' (or '.[browser]')", False
    browser, driver = find_browser()
    if browser and driver:
        return None, False
    what = " and ".join(x for x, have in (("chromium", browser), ("chromedriver", driver)) if not have)
    if os.environ.get("SIFTLENS_BROWSER_SKIP"):
        return f"no {what}: {os.environ['SIFTLENS_BROWSER_SKIP']}", True
    if not any(shutil.which(p) for p in PACKAGE_MANAGERS):
        return f"no {what} found and no package manager to install it", True
    return (f"no {what} found: install Debian's chromium and chromium-driver (apt-get install -y chromium "
            "chromium-driver; .ci/run does this)"), False


def chrome(width: int = 1280, height: int = 1600, javascript: bool = True):
    """A headless chromium (selenium WebDriver) that records the browser console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    if not javascript:
        opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def console_errors(driver) -> list[str]:
    """Messages of level SEVERE the page wrote to the console (errors, uncaught exceptions, failed loads)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
