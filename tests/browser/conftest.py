"""A real bus, a real ``qntx ui`` and headless Chromium, shared by one test module.

The browser is Debian's ``chromium`` driven through its ``chromedriver`` (Selenium
is told where both are, so it never looks for a driver elsewhere). Without them
these tests are skipped with one line, unless ``QNTX_REQUIRE_BROWSER=1`` (set by
CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
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


def start_ui(bus: Bus, *args: str) -> str:
    """Start ``qntx ui`` on a free port; its address."""
    ui = bus.start("ui", "--port", "0", *args)
    ui.wait_output("Dashboard: http://", timeout=20)
    return re.search(r"Dashboard: (http://\S+/)", ui.output()).group(1)


@contextlib.contextmanager
def running_dashboard():
    """A bus with one worker (and the python plugin) in a temp home, and its dashboard."""
    home = Path(tempfile.mkdtemp(prefix="qx-", dir="/tmp"))
    bus = Bus(home)
    try:
        bus.start_up("--workers", "1")
        board = Dashboard(bus, start_ui(bus))
        try:
            yield board
        finally:
            board.api.close()
    finally:
        bus.stop_all()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def dashboard(_browser_available):
    with running_dashboard() as board:
        yield board


@contextlib.contextmanager
def chromium(*flags: str):
    """Headless Chromium with the flags every test uses and ``flags``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qx-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(_browser_available):
    with chromium() as driver:
        yield driver


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


def open_page(browser, dashboard, fragment: str, url: str | None = None) -> None:
    """Open ``fragment`` of the dashboard (or of ``url``) and wait for its live events."""
    from selenium.webdriver.common.by import By

    browser.get("about:blank")  # a page already there would only change its #fragment
    browser.get((url or dashboard.url) + fragment)
    until(
        browser,
        lambda d: d.find_element(By.ID, "live").text == "live",
        what="the live event stream",
    )
    browser.execute_script("window.qntxMarker = 'no reload';")


def not_reloaded(browser) -> bool:
    return browser.execute_script("return window.qntxMarker;") == "no reload"


def texts(browser, css: str) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText);", css
    )


def rows(browser, css: str, key: str) -> dict[str, str]:
    """The rows matching ``css`` by their ``key`` attribute, with their text, read at
    once (the page repaints live: elements found one by one can go stale between)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(r => [r.getAttribute(arguments[1]), r.innerText]);"
    return dict(browser.execute_script(script, css, key))
