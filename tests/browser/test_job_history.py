"""A job's runs as a timeline on its dashboard page, in headless Chromium against a real bus."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from qntx.protocol import JobOutput
from qntx.stored_handlers import handler_attestation
from tests.browser.conftest import until

pytestmark = pytest.mark.timeout(60)

WOBBLY = "import time\nprint('wobble', args, flush=True)\nif args[0] == 'hang':\n    time.sleep(60)\nraise RuntimeError('wobbly')\n"


def test_the_job_page_shows_every_run_as_a_timeline(browser, dashboard, tmp_path):
    api = dashboard.api
    api.attest_many([handler_attestation("wobbly", WOBBLY)])
    until(browser, lambda d: "python.wobbly" in api.status().handlers, what="wobbly registered")
    failed = api.submit("python.wobbly", {"args": ["fail"]}, max_attempts=2)
    assert failed.wait(timeout=30).status == "failed"
    hanging = api.submit("python.wobbly", {"args": ["hang"]}, max_attempts=1)
    for event in api.follow(hanging.id, timeout=30):  # until its run wrote something
        if isinstance(event, JobOutput):
            break
    api.cancel(hanging.id)

    browser.get(dashboard.url + f"#/jobs/{failed.id}")
    runs = until(browser, lambda d: timeline(d) if len(timeline(d)) == 2 else None, what="the timeline")
    assert [r["outcome"] for r in runs] == ["failed", "failed"]
    assert "History (2 runs)" in browser.find_element(By.ID, "job").text
    assert all("RuntimeError: wobbly" in r["error"] for r in runs)
    assert "attempt 1" in runs[0]["text"] and "attempt 2" in runs[1]["text"]
    assert all("wobble ['fail']" in r["logs"] for r in runs)
    browser.save_screenshot(str(tmp_path / "job-history.png"))

    browser.get(dashboard.url + f"#/jobs/{hanging.id}")
    [run] = until(browser, lambda d: timeline(d) or None, what="the cancelled run")
    assert run["outcome"] == "cancelled" and "wobble ['hang']" in run["logs"]


def timeline(browser) -> list[dict]:
    """The runs on the job page, read at once (the page repaints live: elements found
    one by one can go stale between)."""
    return browser.execute_script(
        """return [...document.querySelectorAll('#job-history li.run')].map(r => ({
            outcome: r.dataset.outcome, text: r.querySelector('.run-head').textContent,
            error: (r.querySelector('.run-error') || {}).textContent || '',
            logs: (r.querySelector('.run-logs') || {}).textContent || ''}));"""
    )
