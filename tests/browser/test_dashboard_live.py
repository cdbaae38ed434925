"""The dashboard's live parts in headless Chromium against a real bus: the jobs pager
while rows arrive, times that tick, a running job's output from its start, the
throughput chart's axes and scale, the plugin's session among the workers, a bus that
stops, and actions through a real TLS proxy.

The tests of this module share one bus and run in order (the pager test first, on a
bus with no jobs yet).
"""

from __future__ import annotations

import re
import time

import pytest
from selenium.webdriver.common.by import By

from qntx.stored_handlers import handler_attestation
from tests.browser.conftest import (
    REQUIRED,
    chromium,
    not_reloaded,
    open_page,
    rows,
    running_dashboard,
    start_ui,
    texts,
    until,
)
from tests.browser.tls_proxy import TlsProxy, openssl_missing, self_signed

pytestmark = pytest.mark.timeout(90)

SLEEPER = "import time\ntime.sleep(60)\n_result = 1\n"
# prints 30 numbered lines at once, then runs on until cancelled
CHATTY = """
import time
for i in range(30):
    print(f"line {i}", flush=True)
progress(30, 30)
time.sleep(60)
"""


def register(dashboard, name: str, code: str) -> None:
    dashboard.api.attest_many([handler_attestation(name, code)])
    until(
        None,
        lambda _: f"python.{name}" in dashboard.api.status().handlers,
        what=f"{name} registered",
    )


def shown_ids(browser) -> list[str]:
    return list(rows(browser, "#job-table tr[data-job]", "data-job"))


def every_page(browser) -> list[str]:
    """The ids of every job the pager shows, from the page on screen through "Older"."""
    seen = shown_ids(browser)
    page = 1
    while browser.find_element(By.ID, "next").is_enabled():
        browser.find_element(By.ID, "next").click()
        page += 1
        until(browser, lambda d, n=page: d.find_element(By.CSS_SELECTOR, ".pager .muted").text == f"page {n}", what=f"page {page}")
        seen += shown_ids(browser)
    return seen


def svg_texts(browser, css: str) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent);", css
    )


def all_ids(dashboard) -> list[str]:
    return [job.id for job in dashboard.api.jobs(limit=1000)]  # newest first


def test_live_rows_and_the_pager_agree(browser, dashboard):
    assert all_ids(dashboard) == []
    open_page(browser, dashboard, "#/jobs")
    # 30 jobs onto an open page that had none: none of them is out of reach
    handles = [dashboard.api.submit("builtin.echo", n) for n in range(30)]
    for handle in handles:
        handle.result(timeout=20)
    newest = [h.id for h in reversed(handles[-25:])]
    until(browser, lambda d: shown_ids(d)[:25] == newest, what="the newest jobs shown live")
    assert not_reloaded(browser)
    assert every_page(browser) == all_ids(dashboard)

    # a full first page (and an older one), then 5 new jobs: "Older" skips nothing
    open_page(browser, dashboard, "#/jobs")
    until(browser, lambda d: len(shown_ids(d)) == 25, what="a full page")
    assert browser.find_element(By.ID, "next").is_enabled()
    fresh = [dashboard.api.submit("builtin.echo", n) for n in range(5)]
    for handle in fresh:
        handle.result(timeout=20)
    until(browser, lambda d: {h.id for h in fresh} <= set(shown_ids(d)), what="the 5 new jobs")
    assert shown_ids(browser)[:5] == [h.id for h in reversed(fresh)]
    assert not_reloaded(browser)
    assert every_page(browser) == all_ids(dashboard)


def test_relative_times_tick(browser, dashboard):
    handle = dashboard.api.submit("builtin.echo", "tick")
    handle.result(timeout=20)
    open_page(browser, dashboard, "#/jobs")
    cell = f'tr[data-job="{handle.id}"] td[data-ago]'
    first = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, cell).text, what="the row")
    assert re.fullmatch(r"\d+s ago", first), first
    later = until(
        browser,
        lambda d: (t := d.find_element(By.CSS_SELECTOR, cell).text) != first and t,
        timeout=5,
        what="the created time ticking",
    )
    assert int(later.split("s")[0]) > int(first.split("s")[0])
    assert not_reloaded(browser)


def test_a_running_jobs_page_starts_with_the_output_so_far(browser, dashboard):
    register(dashboard, "chatty", CHATTY)
    handle = dashboard.api.submit("python.chatty", None, max_attempts=1)
    until(
        None,
        lambda _: (p := handle.record().progress) is not None and p.current == 30,
        what="all 30 lines written",
    )
    open_page(browser, dashboard, f"#/jobs/{handle.id}")
    until(browser, lambda d: "line 29" in d.find_element(By.ID, "output").text, what="the output")
    output = browser.find_element(By.ID, "output").text
    assert output.splitlines() == [f"line {i}" for i in range(30)]
    assert handle.record().status == "running"
    dashboard.api.cancel(handle.id)


def test_the_chart_has_axes_and_a_burst_does_not_flatten_the_rest(browser, dashboard, tmp_path):
    # 200: a burst split between two buckets of the chart still has 100 in one of them
    burst = [dashboard.api.submit("builtin.echo", n) for n in range(200)]
    lone = dashboard.api.submit("builtin.fail", "one", max_attempts=1)
    for handle in [*burst, lone]:
        handle.wait(timeout=30)
    open_page(browser, dashboard, "#/")
    counts = dashboard.api.status().queue
    until(
        browser,
        lambda d: texts(d, ".legend span") == [f"completed {counts['completed']}", f"failed {counts['failed']}"],
        what="the chart with every job",
    )

    def bars(d) -> dict[str, float]:
        """The tallest bar of each kind (completed, failed), in chart units."""
        script = """return [...document.querySelectorAll('svg.chart rect')].map(
            r => [r.dataset.key, Number(r.getAttribute('height'))]);"""
        tallest: dict[str, float] = {}
        for key, height in d.execute_script(script):
            tallest[key] = max(tallest.get(key, 0.0), height)
        return tallest

    tallest = bars(browser)
    assert tallest["failed"] >= 0.1 * tallest["completed"], tallest  # one job still reads
    # read in the page at once: the live chart may be redrawn between a find and a read
    scale = browser.execute_script("return document.querySelector('svg.chart').getAttribute('data-scale');")
    assert scale == "log"
    counts_axis = svg_texts(browser, "svg.chart .axis-y text")
    assert counts_axis[:3] == ["0", "1", "10"] and "100" in counts_axis, counts_axis
    times = svg_texts(browser, "svg.chart .axis-x text[data-at]")
    assert len(times) >= 4 and all(re.fullmatch(r"\d\d:\d\d", t) for t in times), times
    now = time.gmtime()
    newest = int(times[-1][:2]) * 60 + int(times[-1][3:])
    assert (now.tm_hour * 60 + now.tm_min - newest) % 1440 <= 2, (times, now)
    browser.save_screenshot(str(tmp_path / "chart-log.png"))

    # a linear scale when asked for: the burst then dwarfs the lone failure
    until(  # (the overview repaints live: a click may meet a select just replaced)
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "#chart-scale option[value=linear]").click() or True,
        what="the scale menu",
    )
    until(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "svg.chart").get_attribute("data-scale") == "linear",
        what="the linear scale",
    )
    linear = bars(browser)
    assert linear["failed"] < 0.1 * linear["completed"], linear
    assert svg_texts(browser, "svg.chart .axis-y text")[0] == "0"
    browser.save_screenshot(str(tmp_path / "chart-linear.png"))


def test_the_plugins_own_session_is_a_worker_with_its_slots(browser, dashboard):
    register(dashboard, "sleeper", SLEEPER)
    slots = next(a.credit for a in dashboard.api.status().actors if a.name == "plugin-python")
    assert slots > 0
    open_page(browser, dashboard, "#/")
    # (a run cancelled by an earlier test may hold its slot a moment longer)
    until(
        browser,
        lambda d: (r := rows(d, "#workers tr[data-worker]", "data-worker").get("plugin-python"))
        and r.split("\t")[2:4] == [str(slots), str(slots)]
        and "idle" in r,
        what="the plugin's session among the workers, every slot free",
    )
    handle = dashboard.api.submit("python.sleeper", None, max_attempts=1)
    until(None, lambda _: handle.record().status == "running", what="the job running")
    busy = until(
        browser,
        lambda d: (r := rows(d, "#workers tr[data-worker]", "data-worker")["plugin-python"])
        and handle.id in r
        and r,
        what="the job on the plugin's session",
    )
    assert busy.split("\t")[2:4] == [str(slots), str(slots - 1)], busy
    dashboard.api.cancel(handle.id)


def test_actions_work_through_a_tls_proxy(dashboard, tmp_path):
    missing = openssl_missing()
    if missing:  # CI installs it: there a missing one fails
        (pytest.fail if REQUIRED else pytest.skip)(missing)
    cert, key = self_signed(tmp_path, "localhost")
    with TlsProxy(cert, key) as proxy:
        public = f"https://localhost:{proxy.port}"
        proxy.target = int(re.search(r":(\d+)/$", start_ui(dashboard.bus, "--public-url", public)).group(1))
        register(dashboard, "sleeper", SLEEPER)
        handle = dashboard.api.submit("python.sleeper", None, max_attempts=1)
        until(None, lambda _: handle.record().status == "running", what="the job running")
        with chromium("--ignore-certificate-errors") as browser:
            open_page(browser, dashboard, f"#/jobs/{handle.id}", url=public + "/")
            assert browser.execute_script("return location.protocol;") == "https:"
            until(
                browser,
                lambda d: d.find_element(By.ID, "action-cancel").is_enabled(),
                what="the cancel button",
            )
            browser.find_element(By.ID, "action-cancel").click()
            until(
                browser,
                lambda d: d.find_element(By.ID, "job-status").text == "cancelled",
                what="cancelled through the proxy",
            )
            assert browser.find_element(By.ID, "banner").text == ""
            browser.save_screenshot(str(tmp_path / "through-proxy.png"))
        assert handle.record().status == "cancelled"
        assert proxy.connections > 0


def test_a_bus_that_stops_greys_the_actors_and_the_badge(browser, tmp_path):
    with running_dashboard() as board:
        open_page(browser, board, "#/")
        until(
            browser,
            lambda d: len(r := rows(d, "#actors tr[data-actor]", "data-actor")) >= 4
            and all("healthy" in t and "unhealthy" not in t for t in r.values()),
            what="every actor healthy",
        )
        up = board.bus.processes[0]
        assert up.argv[-3] == "up"
        up.stop()
        stopped = time.monotonic()

        def greyed(d) -> bool:
            badge = d.find_element(By.ID, "live")
            actors = rows(d, "#actors tr[data-actor]", "data-actor")
            return (
                badge.text == "bus down"
                and "down" in badge.get_attribute("class")
                and "down" in d.find_element(By.ID, "overview").get_attribute("class")
                and all("unknown" in t for t in actors.values())
            )

        until(browser, greyed, timeout=5, what="the actors and the badge greyed")
        print(f"greyed {time.monotonic() - stopped:.2f}s after the bus stopped")
        browser.save_screenshot(str(tmp_path / "bus-down.png"))
        assert not_reloaded(browser)

        board.bus.start_up("--workers", "1")
        until(
            browser,
            lambda d: d.find_element(By.ID, "live").text == "live"
            and all("healthy" in t and "unhealthy" not in t for t in rows(d, "#actors tr[data-actor]", "data-actor").values()),
            timeout=30,
            what="live again once the bus is back",
        )
