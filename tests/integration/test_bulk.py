"""Bulk steering: retry or cancel every job a filter chooses, each exactly once, in
pages, with a count; a confirmation on a terminal unless --yes."""

from __future__ import annotations

import os
import pty
import subprocess

import pytest

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(180)

FAILED = 500


def test_bulk_retry_retries_each_failed_job_once(bus):
    bus.start_up("--workers", "1")
    with bus.connect() as api:
        handles = [api.submit("builtin.fail", f"boom {n}", max_attempts=1) for n in range(FAILED)]
        other = api.submit("builtin.fail", "other", max_attempts=1, id="JB-OTHER-HANDLER")
        for handle in handles:
            assert handle.wait(60).status == "failed"
        assert other.wait(60).status == "failed"
        api.flush()
        ids = {h.id for h in handles}
        # a failed job of another handler is not chosen
        assert set(api.matching_jobs(status="failed", handler="builtin.fail")) == ids | {other.id}
    done = bus.run("pulse", "retry", "--status", "failed", "--handler", "builtin.fail", "--yes", timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"retried {FAILED + 1} job(s)" in done.stdout
    with bus.connect() as api:
        jobs = [api.wait(i, timeout=60) for i in ids]
        assert all(j.status == "failed" and j.runs == 2 and j.attempts == 1 for j in jobs)  # once each
        newest = max(j.created_at for j in [*jobs, api.wait(other.id, timeout=60)])  # (other came last)
        again = api.retry_jobs(status="failed", handler="builtin.fail", since=newest + 1)
        assert len(again) == 0  # nothing created since then


def test_bulk_cancel_of_queued_jobs_and_the_terminal_prompt(bus):
    bus.start_up("--workers", "1")
    with bus.connect() as api:
        later = [api.submit("builtin.echo", n, delay_s=600) for n in range(30)]
        api.flush()
        ids = [h.id for h in later]
    answered_no = run_on_terminal(bus, ["pulse", "cancel", "--handler", "builtin.echo", "--status", "queued"], "n\n")
    assert "Cancelled 30 queued jobs of builtin.echo? [y/N]" in answered_no and "nothing done" in answered_no
    with bus.connect() as api:
        assert {api.job(i).status for i in ids} == {"queued"}
    answered_yes = run_on_terminal(bus, ["pulse", "cancel", "--handler", "builtin.echo", "--status", "queued"], "y\n")
    assert "cancelled 30 job(s)" in answered_yes
    with bus.connect() as api:
        wait_for(lambda: {api.job(i).status for i in ids} == {"cancelled"}, 10, what="all cancelled")
    none_left = bus.run("pulse", "cancel", "--handler", "builtin.echo", "--status", "queued")
    assert none_left.returncode == 0 and "no queued jobs of builtin.echo to cancel" in none_left.stdout
    both = bus.run("pulse", "cancel", ids[0], "--status", "queued")
    assert both.returncode == 2 and "not both" in both.stderr


def run_on_terminal(bus, argv: list[str], answer: str) -> str:
    """Run a command with a terminal for its stdin and stdout; type ``answer``."""
    parent, child = pty.openpty()
    process = subprocess.Popen(bus.qntx_argv(*argv), stdin=child, stdout=child, stderr=child, env=bus.env)
    os.close(child)
    output = b""
    try:
        while b"[y/N]" not in output:
            output += os.read(parent, 4096)
        os.write(parent, answer.encode())
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # the command ended and closed the terminal
                break
            if not chunk:
                break
            output += chunk
        process.wait(60)
    finally:
        os.close(parent)
        if process.poll() is None:
            process.kill()
    return output.decode(errors="replace")
