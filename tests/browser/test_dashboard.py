"""The dashboard in headless Chromium against a real bus: what a person would see and do.

Each test leaves a marker on the page's window first: if it is still there at the
end, what changed came live, without a reload. Each saves a screenshot of the
page under its temp dir.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from qntx.stored_handlers import handler_attestation
from tests.browser.conftest import not_reloaded, open_page, rows, texts, until

pytestmark = pytest.mark.timeout(60)

TICKER = """
import time
for i in range(200):
    print(f"tick {i}", flush=True)
    progress(i + 1, 200)
    time.sleep(0.1)
_result = {"ticks": 200}
"""


def test_overview_shows_every_actor_healthy(browser, dashboard, tmp_path):
    open_page(browser, dashboard, "#/")
    wanted = {"ats", "server", "worker-1", "plugin:python"}
    def healthy(text: str) -> bool:
        return "healthy" in text and "unhealthy" not in text

    actors = until(  # (on a loaded machine an actor may still be starting: wait for it)
        browser,
        lambda d: (r := rows(d, "#actors tr[data-actor]", "data-actor"))
        and wanted <= set(r)
        and all(healthy(t) for t in r.values())
        and r,
        what="every actor, healthy",
    )
    assert all(healthy(text) for text in actors.values()), actors
    pids = {actor.name: actor.pid for actor in dashboard.api.status().actors}
    assert all(str(pids[name]) in actors[name] for name in wanted)
    workers = rows(browser, "#workers tr[data-worker]", "data-worker")
    assert list(workers) == ["plugin-python", "worker-1"]  # the plugin's own session too
    assert "idle" in workers["worker-1"] or "JB-" in workers["worker-1"]

    done = [dashboard.api.submit("builtin.echo", n) for n in range(20)]
    done += [dashboard.api.submit("builtin.fail", n, max_attempts=1) for n in range(2)]
    for handle in done:
        handle.wait(timeout=20)
    counts = dashboard.api.status().queue
    queue = f"{counts['completed']}\ncompleted"
    until(
        browser,
        lambda d: queue in rows(d, "#queue div[data-status]", "data-status")["completed"],
        what="the queue",
    )
    charted = [f"completed {counts['completed']}", f"failed {counts['failed']}"]
    until(browser, lambda d: texts(d, ".legend span") == charted, what="the chart's counts")
    assert not_reloaded(browser)
    browser.save_screenshot(str(tmp_path / "overview.png"))


def test_submitted_jobs_appear_and_complete_without_a_reload(browser, dashboard, tmp_path):
    open_page(browser, dashboard, "#/jobs")
    handles = [dashboard.api.submit("builtin.echo", n) for n in range(5)]
    ids = [h.id for h in handles]
    for handle in handles:
        handle.result(timeout=20)

    def all_completed(d):
        statuses = rows(d, "#job-table tr[data-job]", "data-job")
        return all("completed" in statuses.get(i, "") for i in ids)

    until(browser, all_completed, what="five completed rows")
    assert not_reloaded(browser)
    browser.save_screenshot(str(tmp_path / "jobs.png"))


def test_a_burst_of_jobs_shows_the_newest_page_without_a_reload(browser, dashboard, tmp_path):
    open_page(browser, dashboard, "#/jobs")
    handles = [dashboard.api.submit("builtin.echo", n) for n in range(600)]
    for handle in handles:
        handle.result(timeout=30)
    newest = [h.id for h in reversed(handles[-25:])]

    def shows_newest(d):
        shown = rows(d, "#job-table tr[data-job]", "data-job")
        # (rows that came live after the page's last fetch extend it past 25)
        return list(shown)[:25] == newest and all("completed" in text for text in shown.values())

    until(browser, shows_newest, what="the newest 25 jobs, completed")
    assert not_reloaded(browser)


def test_a_running_job_streams_output_and_progress_and_is_cancelled_from_the_page(
    browser, dashboard, tmp_path
):
    dashboard.api.attest_many([handler_attestation("ticker", TICKER)])
    until(
        browser,
        lambda d: "python.ticker" in dashboard.api.status().handlers,
        what="ticker registered",
    )
    handle = dashboard.api.submit("python.ticker", None, max_attempts=1)
    until(browser, lambda d: handle.record().status == "running", what="the job running")
    open_page(browser, dashboard, f"#/jobs/{handle.id}")
    until(browser, lambda d: "tick" in d.find_element(By.ID, "output").text, what="live output")
    first = browser.find_element(By.ID, "output").text.count("tick")

    def progress(d) -> float:
        bars = d.find_elements(By.CSS_SELECTOR, "#job-progress .progress")
        return float(bars[0].get_attribute("data-current")) if bars else 0.0

    seen = until(browser, progress, what="progress")
    until(browser, lambda d: progress(d) > seen, what="progress advancing")
    until(
        browser,
        lambda d: d.find_element(By.ID, "output").text.count("tick") > first,
        what="more output",
    )
    browser.save_screenshot(str(tmp_path / "job-running.png"))

    until(
        browser,
        lambda d: d.find_element(By.ID, "action-cancel").click() or True,
        what="the cancel button",
    )
    until(
        browser,
        lambda d: d.find_element(By.ID, "job-status").text == "cancelled",
        what="cancelled on the page",
    )
    assert handle.record().status == "cancelled"
    assert not_reloaded(browser)
    browser.save_screenshot(str(tmp_path / "job-cancelled.png"))


def test_a_failed_job_shows_its_error_and_traceback(browser, dashboard, tmp_path):
    dashboard.api.attest_many(
        [handler_attestation("broken", "def f():\n    raise ValueError('no luck')\nf()\n")]
    )
    until(
        browser,
        lambda d: "python.broken" in dashboard.api.status().handlers,
        what="broken registered",
    )
    handle = dashboard.api.submit("python.broken", None, max_attempts=1)
    handle.wait(timeout=20)
    open_page(browser, dashboard, f"#/jobs/{handle.id}")
    error = until(browser, lambda d: d.find_element(By.ID, "job-error").text, what="the error")
    assert "no luck" in error and "Traceback" in error and "line 2" in error
    assert not browser.find_element(By.ID, "action-cancel").is_enabled()
    browser.save_screenshot(str(tmp_path / "job-failed.png"))

    until(
        browser,
        lambda d: d.find_element(By.ID, "action-retry").click() or True,
        what="the retry button",
    )
    until(
        browser,
        lambda d: handle.record().runs == 2 and handle.record().status == "failed",
        what="the second run",
    )
    until(
        browser,
        lambda d: "runs 2" in d.find_element(By.ID, "job").text,
        what="the second run shown",
    )


def test_an_ax_query_shows_rows_and_a_bad_query_its_error_in_place(browser, dashboard, tmp_path):
    made = [dashboard.api.attest("ada", "wrote", "notes", attributes={"n": n}) for n in range(3)]
    open_page(browser, dashboard, "#/attestations")
    box = browser.find_element(By.ID, "ax")
    box.clear()
    box.send_keys("ada is wrote of notes", Keys.ENTER)
    until(
        browser,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ax-table tr[data-asid]")) == 3,
        what="three rows",
    )
    shown = list(rows(browser, "#ax-table tr[data-asid]", "data-asid"))
    assert shown == [r.id for r in reversed(made)]  # newest first
    browser.save_screenshot(str(tmp_path / "attestations.png"))

    box.clear()
    box.send_keys("ada is of notes", Keys.ENTER)
    carets = until(browser, lambda d: d.find_elements(By.ID, "ax-caret"), what="the error caret")
    caret = carets[0].text
    query_line, marker_line = caret.split("\n")
    assert query_line == "ada is of notes"
    assert marker_line == " " * 4 + "^"  # under the "is" that has no predicate after it
    assert "position 4" in browser.find_element(By.ID, "ax-message").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#ax-table tr[data-asid]")
    browser.save_screenshot(str(tmp_path / "attestations-error.png"))


def test_a_handler_created_while_the_page_is_open_appears(browser, dashboard, tmp_path):
    open_page(browser, dashboard, "#/handlers")
    until(browser, lambda d: d.find_elements(By.ID, "handler-table"), what="the handler table")
    assert "fresh" not in rows(browser, "#handler-table tr[data-handler]", "data-handler")
    result = dashboard.bus.run("handler", "create", "fresh", "--code", "_result = 1")
    assert result.returncode == 0, result.stderr
    until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-handler="fresh"]'),
        what="the new handler",
    )
    until(
        browser,
        lambda d: "healthy" in d.find_element(By.CSS_SELECTOR, 'tr[data-handler="fresh"]').text,
        what="the new handler registered",
    )
    assert not_reloaded(browser)
    browser.save_screenshot(str(tmp_path / "handlers.png"))

    until(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, 'tr[data-handler="fresh"] a').click() or True,
        what="a link",
    )
    code = until(
        browser, lambda d: d.find_elements(By.ID, "handler-code"), what="the handler page"
    )[0].text
    assert code == "_result = 1"

    assert dashboard.api.submit("python.fresh", None).result(timeout=20) == 1
    dashboard.api.attest_many([handler_attestation("fresh", "_result = 2")])
    results = []
    until(
        browser,
        lambda d: (
            results.append(dashboard.api.submit("python.fresh", None).result(timeout=20))
            or results[-1] == 2
        ),
        what="v2 live",
    )
    browser.refresh()  # counts are read when the page opens
    # newest version first; each job counts for the version it was pinned to and ran
    want = [f"completed {results.count(2)}", f"completed {1 + results.count(1)}"]
    until(
        browser, lambda d: texts(d, "#versions tr td:last-child") == want, what="jobs per version"
    )
    browser.save_screenshot(str(tmp_path / "handler.png"))


def test_bulk_retry_of_a_filtered_list(browser, dashboard, tmp_path):
    handles = [dashboard.api.submit("builtin.fail", f"bulk {n}", max_attempts=1) for n in range(40)]
    for handle in handles:
        assert handle.wait(timeout=20).status == "failed"
    open_page(browser, dashboard, "#/jobs?status=failed&handler=builtin.fail")
    until(browser, lambda d: len(rows(d, "#job-table tbody tr[data-job]", "data-job")) >= 25, what="the failed jobs")
    browser.find_element(By.ID, "bulk-retry").click()
    alert = until(browser, lambda d: d.switch_to.alert, what="the confirmation")
    assert "Retry every job that matches (failed, handler builtin.fail)" in alert.text
    alert.accept()
    info = until(browser, lambda d: d.find_element(By.ID, "bulk-info").text, what="the count")
    assert info.startswith("retried ") and int(info.split()[1]) >= 40
    until(browser, lambda d: all(h.record().runs == 2 for h in handles), what="every job run again")
    assert all(h.wait(timeout=20).runs == 2 for h in handles)  # once each
    assert not_reloaded(browser)
    browser.save_screenshot(str(tmp_path / "bulk-retry.png"))
