"""Every run of a job kept, against a real `qntx up`: what a cancelled or timed-out run
wrote, the first attempt's error after a retry, `pulse show` and the steering replies.
The tests that need no `up` of their own share one with HANDLERS (``shared``)."""

from __future__ import annotations

import json

import pytest

import qntx
from qntx.protocol import JobOutput
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(120)

HANDLERS = {
    # Writes six lines (and one to stderr), then waits to be cancelled or timed out.
    "chatty": (
        "import sys, time\n"
        "for i in range(6):\n"
        "    print(f'line {i}', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "time.sleep(float(args[0]) if args else 60)\n"
    ),
    "flaky": "print('attempt output')\nraise RuntimeError('flaky ' + str(len(args)))\n",
}


def _wait_for_output(b, job_id: str, text: str) -> None:
    """Follow the job until ``text`` was streamed."""
    seen = ""
    for event in b.follow(job_id, timeout=30):
        if isinstance(event, JobOutput):
            seen += event.text
            if text in seen:
                return
    raise AssertionError(f"the job ended before writing {text!r}: {seen!r}")


def test_a_cancelled_run_keeps_what_it_wrote_and_a_retry_keeps_it_too(shared):
    with qntx.connect(shared.home) as b:
        handle = b.submit("python.chatty", {"args": ["60"]}, max_attempts=1)
        _wait_for_output(b, handle.id, "to stderr")
        cancelled = b.cancel(handle.id)
        assert cancelled.status == "cancelled"
        assert cancelled.payload == {"args": ["60"]}  # the steering reply carries the payload
        job = b.job(handle.id)
        assert "line 0\n" in job.logs and "line 5\n" in job.logs and "to stderr" in job.logs
        [run] = job.history
        assert run.outcome == "cancelled" and run.logs == job.logs and run.attempt == 1
        assert run.worker and run.started_at <= run.finished_at

        again = b.retry(handle.id)
        assert again.payload == {"args": ["60"]} and again.status == "queued"
        _wait_for_output(b, handle.id, "line 5")
        assert b.pause(b.submit("builtin.echo", {"n": 1}, delay_s=60).id).payload == {"n": 1}
        b.cancel(handle.id)
        runs = b.job(handle.id).history
        assert [r.outcome for r in runs] == ["cancelled", "cancelled"]
        assert "line 5" in runs[0].logs and "line 5" in runs[1].logs

        shown = shared.run("pulse", "show", handle.id)
        assert shown.returncode == 0, shown.stderr
        assert "History (2 runs)" in shown.stdout and shown.stdout.count("cancelled") >= 3
        assert "line 5" in shown.stdout.split("History")[1]


def test_a_retried_job_keeps_the_first_attempts_error_and_a_timeout_its_output(shared):
    with qntx.connect(shared.home) as b:
        failed = b.submit("python.flaky", {"args": [1]}, max_attempts=2).wait(timeout=30)
        assert failed.status == "failed"
        b.retry(failed.id)
        assert b.wait(failed.id, timeout=30).status == "failed"
        runs = b.job(failed.id).history
        assert [r.outcome for r in runs] == ["failed"] * 4
        assert all("RuntimeError: flaky 1" in r.error.message and "<handler flaky>" in r.error.traceback for r in runs)
        assert all(r.logs == "attempt output\n" for r in runs)
        assert [r.attempt for r in runs] == [1, 2, 1, 2]

        timed = b.submit("python.chatty", {"args": ["60"]}, timeout_s=2, max_attempts=1).wait(timeout=30)
        [run] = b.job(timed.id).history
        assert run.outcome == "timed out" and "line 5" in run.logs and "timed out after 2s" in run.error.message


def test_the_asyncio_api_returns_payloads_from_steering_and_the_history(shared):
    import asyncio

    import qntx.aio

    async def main():
        async with await qntx.aio.connect(shared.home) as api:
            submitted = await api.submit("builtin.echo", {"n": 2}, delay_s=60)
            await submitted.accepted()
            assert (await api.pause(submitted.id)).payload == {"n": 2}
            assert (await api.resume(submitted.id)).payload == {"n": 2}
            assert (await api.cancel(submitted.id)).payload == {"n": 2}
            retried = await api.retry(submitted.id)
            assert retried.payload == {"n": 2} and retried.status == "queued"
            failed = await api.submit("python.flaky", {"args": []}, max_attempts=1)
            for _ in range(600):
                job = await api.job(failed.id)
                if job.status == "failed":
                    break
                await asyncio.sleep(0.05)
            [run] = job.history
            assert run.outcome == "failed" and "RuntimeError: flaky 0" in run.error.message

    asyncio.run(main())


def test_a_job_waiting_inside_the_plugin_is_dispatched_not_running(bus):
    """Two interpreters, three python jobs out at once: the third waits in the plugin
    and reads dispatched (no started_at) until its code starts."""
    code = "import time\ntime.sleep(float(args[0]))\n_result = [job.id, job.attempt, job.due, job.handler]"
    assert bus.run("handler", "create", "nap", "--code", code).returncode == 0
    bus.start_up("--workers", "1", "--python-pool", "2").wait_output("handler=python.nap")
    with qntx.connect(bus.home) as b:
        slots = [a.credit for a in b.status().actors if a.name == "worker-1"][0]
        assert slots >= 3
        long = [b.submit("python.nap", {"args": ["4"]}) for _ in range(2)]
        wait_for(lambda: all(b.job(h.id).status == "running" for h in long), 20, what="two naps running")
        quick = b.submit("python.nap", {"args": ["0"]}, max_attempts=2)
        waiting = wait_for(lambda: (j := b.job(quick.id)).status != "queued" and j, 20, what="the quick one handed out")
        assert waiting.status == "dispatched" and waiting.started_at is None and waiting.worker
        assert quick.id in [j.id for j in b.jobs(status="dispatched")]
        listed = bus.run("pulse", "jobs", "--status", "dispatched")
        assert quick.id in listed.stdout and "dispatched" in listed.stdout
        result = quick.result(timeout=30)
        assert result == [quick.id, 1, None, "python.nap"]  # the job context its code sees
        record = b.job(quick.id)
        # A run this short never sends JobStarted: its result says when its code began.
        assert waiting.history[0].started_at <= record.started_at <= record.finished_at


def test_pulse_show_lists_what_runs_after_a_job(bus):
    up = bus.start_up()
    with qntx.connect(bus.home) as b:
        first = b.submit("builtin.sleep", {"seconds": 0.5})
        waiting = b.submit("builtin.echo", "then", after=[first])
        anyway = b.submit("builtin.echo", "anyway", after=[first], after_policy="always")
        waiting.accepted(), anyway.accepted()
        assert b.dependents(first.id) == sorted([waiting.id, anyway.id])  # waiting for it now
        assert waiting.result(timeout=30) == "then" and anyway.result(timeout=30) == "anyway"
        assert b.dependents(first.id) == sorted([waiting.id, anyway.id])  # and after they ran
        assert b.dependents(waiting.id) == []
    shown = bus.run("pulse", "show", first.id)
    assert shown.returncode == 0 and f"Then:     {', '.join(sorted([waiting.id, anyway.id]))}" in shown.stdout, shown.stdout
    up.stop()
    offline = bus.run("pulse", "show", first.id, "--json")  # read from the store, no server
    assert offline.returncode == 0 and json.loads(offline.stdout)["dependents"] == sorted([waiting.id, anyway.id])
    missing = bus.run("pulse", "show", "JB-NO-SUCH-JOB")  # well formed, but no such job
    assert missing.returncode == 1 and missing.stderr == "error: no job JB-NO-SUCH-JOB\n", missing.stderr
    for bad in ("", " ", "x" * 600):  # not a job id at all: bad input
        shown = bus.run("pulse", "show", bad)
        assert shown.returncode == 2 and shown.stderr.startswith("error: not a job id") and shown.stderr.count("\n") == 1
