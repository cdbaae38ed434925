"""A real bus, a real ``qntx ui`` and headless Chromium, shared by one test module.

The browser is Debian's ``chromium`` driven through its ``chromedriver`` (Selenium
is told where both are, so it never looks for a driver elsewhere). Without them
these tests are skipped with one line, unless ``QNTX_REQUIRE_BROWSER=1`` (set by
CI) makes that a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import Bus, wait_for

CHROMIUM = os.environ.get("QNTX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("QNTX_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return (
                f"no {path}: install Debian's chromium and chromium-driver to run the browser tests"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


MISSING = _missing()
REQUIRED = os.environ.get("QNTX_REQUIRE_BROWSER") == "1"

if MISSING and not REQUIRED:
    # not collected at all: one notice below instead of a line per test
    collect_ignore_glob = ["test_*.py"]


def pytest_terminal_summary(terminalreporter):
    if MISSING and not REQUIRED:
        terminalreporter.write_line(f"browser tests skipped: {MISSING}")


@pytest.fixture(scope="session", autouse=True)
def _browser_available():
    if MISSING:
        pytest.fail(f"browser tests required (QNTX_REQUIRE_BROWSER=1) but {MISSING}")


class Dashboard:
    """A running bus and its dashboard."""

    def __init__(self, bus: Bus, url: str):
        self.bus = bus
        self.url = url
        self.api = bus.connect()


@pytest.fixture(scope="module")
def dashboard(_browser_available):
    home = Path(tempfile.mkdtemp(prefix="qx-", dir="/tmp"))
    bus = Bus(home)
    try:
        bus.start_up("--workers", "1")
        ui = bus.start("ui", "--port", "0")
        ui.wait_output("Dashboard: http://", timeout=20)
        url = re.search(r"Dashboard: (http://\S+/)", ui.output()).group(1)
        board = Dashboard(bus, url)
        try:
            yield board
        finally:
            board.api.close()
    finally:
        bus.stop_all()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(_browser_available):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qx-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(driver, condition, timeout: float = 15.0, what: str = "the page"):
    """Wait for ``condition(driver)`` to be truthy (polling the page, not sleeping blindly).
    An element the page repainted meanwhile (stale) or has not drawn yet counts as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def check():
        try:
            return condition(driver)
        except (StaleElementReferenceException, NoSuchElementException):
            return None

    return wait_for(check, timeout=timeout, interval=0.05, what=what)
