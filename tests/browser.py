"""A real headless Chromium for the report and web-chat tests, driven through Selenium.

Debian's ``chromium`` and ``chromium-driver`` packages (``make test`` installs them); Selenium is told
where they are, so it never tries to download a browser. A missing browser fails the test: these checks
are part of the suite, not optional.
"""

from __future__ import annotations

import shutil

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _which(names) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def start_chromium(width: int = 1280, height: int = 1600):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _which(BROWSERS), _which(DRIVERS)
    if not binary or not driver:
        pytest.fail("headless Chromium is missing: install Debian's chromium and chromium-driver packages "
                    "(`make test` does: apt-get install -y chromium chromium-driver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def broken_images(browser) -> list[str]:
    """``src`` prefixes of the page's images that did not decode (``naturalWidth == 0``)."""
    return browser.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.src.slice(0, 60));")


def image_count(browser) -> int:
    return browser.execute_script("return document.images.length;")
