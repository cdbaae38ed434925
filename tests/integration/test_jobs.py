"""Pulse job semantics against a real `qntx up`: timeouts, retries, cancel, idempotency, garbage.

Every test here shares one `qntx up` (module scope): each tells its own jobs and
handlers apart by id and name, and a test that changes the bus (deletes a handler)
does it to a handler of its own."""

from __future__ import annotations

import os
import time

import msgspec
import pytest

import qntx
from qntx.bus.client import Client
from qntx.errors import NotFound
from qntx.protocol import PLUGIN_DEPTH, Ping, PluginReply, Pong, ServerReply
from tests.integration.conftest import wait_for
from tests.integration.fuzz import hammer

pytestmark = pytest.mark.timeout(120)

HANDLERS = {
    "forever": "while True:\n    pass\n",
    "sleepy": "import time\ntime.sleep(float(args[0]) if args else 30)\n_result = 'woke'",
    "raiser": "def inner():\n    raise RuntimeError('nope ' + str(len(args)))\ninner()\n",
    "progressive": "for i in range(3):\n    progress(i + 1, 3)\n_result = 'done'",
    "attester": "rec = attest(['job-made'], ['is'], ['test'], attributes={'n': len(args)})\n_result = rec['id']",
    "bulk": (
        "recs, early = [], None\n"
        "for i in range(int(args[0])):\n"
        "    recs.append(attest([f'bulk{i}'], ['bulk-made'], ['test'], attributes={'i': i}))\n"
        "    if i == 600:\n"
        "        early = dict(recs[5])  # read in the middle of the loop\n"
        "try:\n"
        "    attest([''], ['bulk-made'], ['test'])\n"
        "except Exception as exc:\n"
        "    caught = f'{type(exc).__name__}: {exc}'\n"
        "_result = {'ids': [r['id'] for r in recs[:1000]], 'early': early, 'caught': caught}\n"
    ),
    # Text that is not valid UTF-8 (a lone surrogate, as os.listdir gives for a name
    # in another encoding), printed early, streamed live, printed last and raised.
    "surrogates": (
        "import time\n"
        "name = b'caf\\xe9'.decode('utf-8', 'surrogateescape')\n"
        "print('first', name)\n"
        "time.sleep(0.5)\n"
        "print('last', name)\n"
        "if args:\n"
        "    raise ValueError(name)\n"
        "_result = 'fine'\n"
    ),
}


@pytest.fixture
def bus(shared):
    return shared


@pytest.fixture
def up(shared):
    return shared.up


def test_timeout_kills_an_endless_loop(bus, up):
    with qntx.connect(bus.home) as b:
        handle = b.submit("python.forever", {"args": []}, timeout_s=1, max_attempts=1)
        job = handle.wait(timeout=30)
        assert job.status == "failed"
        assert "timed out after 1s" in job.error.message
        # The interpreter was replaced: the pool still runs jobs.
        assert b.submit("python.sleepy", {"args": ["0"]}).result(timeout=30) == "woke"


def test_raising_handler_fails_after_its_retries_with_the_traceback(bus, up):
    with qntx.connect(bus.home) as b:
        handle = b.submit("python.raiser", {"args": [1, 2]}, max_attempts=2)
        with pytest.raises(qntx.JobFailed) as failed:
            handle.result(timeout=30)
        job = failed.value.job
        assert job.status == "failed" and job.attempts == 2
        assert "RuntimeError: nope 2" in job.error.message
        assert "<handler raiser>" in job.error.traceback and "line 2" in job.error.traceback
        assert job.id in [j.id for j in b.jobs(status="failed")]
        # retry gives it fresh attempts
        again = b.retry(job.id)
        assert again.status == "queued" and again.attempts == 0


def test_cancel_a_running_job_kills_it(bus, up):
    with qntx.connect(bus.home) as b:
        handle = b.submit("python.sleepy", {"args": ["60"]})
        for _ in range(500):
            if b.job(handle.id).status == "running":
                break
            time.sleep(0.02)
        started = time.monotonic()
        assert b.cancel(handle.id).status == "cancelled"
        assert b.wait(handle.id, timeout=10).status == "cancelled"
        # The interpreter was killed, so the pool is free again quickly.
        assert b.submit("python.sleepy", {"args": ["0"]}).result(timeout=20) == "woke"
        assert time.monotonic() - started < 15
        cancelled = b.submit("builtin.sleep", {"seconds": 0}, priority=-5)
        b.wait(cancelled.id, timeout=10)
        with pytest.raises(qntx.QntxError):
            b.cancel(cancelled.id)  # a finished job cannot be cancelled


def test_idempotency_key_returns_the_same_job(bus, up):
    with qntx.connect(bus.home) as b:
        first = b.submit("builtin.echo", {"n": 1}, idempotency_key="order-42")
        second = b.submit("builtin.echo", {"n": 2}, idempotency_key="order-42")
        assert first.id == second.id
        assert second.result(timeout=10) == {"n": 1}


def test_progress_attest_and_unknown_ids(bus, up):
    with qntx.connect(bus.home) as b:
        handle = b.submit("python.progressive", {"args": []})
        events = list(b.follow(handle.id, timeout=20))
        assert events[-1].job.status == "completed" and events[-1].job.result == "done"
        assert b.job(handle.id).progress.current == 3
        made = b.submit("python.attester", {"args": ["a"]}).result(timeout=20)
        assert b.get(made).attributes == {"n": 1}
        with pytest.raises(NotFound):
            b.job("JB-NOPE---22222222")


def test_a_handler_attesting_in_a_loop_has_every_record_stored_and_returned(bus, up):
    """Handler attests go out in batches; each returns its stored record (read in
    the middle of the loop or at the end), a bad one raises at its own call, and the
    job completes only with every attestation stored."""
    with qntx.connect(bus.home) as b:
        result = b.submit("python.bulk", {"args": ["1234"]}).result(timeout=60)
        ids = result["ids"]  # the records it read; the last 234 it never looked at
        assert len(ids) == len(set(ids)) == 1000
        stored = {r.id: r for r in b.query(predicates="bulk-made", limit=2000)}
        assert len(stored) == 1234 and set(ids) <= set(stored)
        assert {r.attributes["i"] for r in stored.values()} == set(range(1234))
        assert result["early"] == msgspec.to_builtins(stored[ids[5]])
        assert stored[ids[7]].attributes == {"i": 7} and stored[ids[7]].subjects == ["bulk7"]
        assert result["caught"].startswith("Invalid: subjects value must be a non-empty string")


def test_ix_streams_progress(bus, up):
    ran = bus.run("ix", "progressive")
    assert ran.returncode == 0, ran.stderr
    assert '"done"' in ran.stdout


def test_server_and_plugin_survive_garbage(bus, up):
    settings = bus.settings
    with Client(settings.server_endpoint, ServerReply) as c:
        server_pid = c.request(Ping()).pid
    plugin_endpoint = settings.plugin_endpoint("python")
    with Client(plugin_endpoint, PluginReply) as c:
        plugin_pid = c.request(Ping()).pid
    hammer(settings.server_endpoint, rounds=200)
    hammer(plugin_endpoint, rounds=200)
    hammer(settings.workers_endpoint, rounds=100)
    with Client(settings.server_endpoint, ServerReply) as c:
        pong = c.request(Ping())
        assert isinstance(pong, Pong) and pong.pid == server_pid
    with Client(plugin_endpoint, PluginReply) as c:
        assert c.request(Ping()).pid == plugin_pid
    os.kill(server_pid, 0)
    with qntx.connect(bus.home) as b:
        assert b.submit("builtin.echo", "still").result(timeout=10) == "still"
        assert b.submit("python.sleepy", {"args": ["0"]}).result(timeout=20) == "woke"


def test_asyncio_client(bus, up):
    import asyncio

    import qntx.aio

    async def scenario():
        async with await qntx.aio.connect(bus.home) as b:
            assert (await b.ping()).actor == "ats"
            record = await b.attest("async", "works")
            assert (await b.query(subjects="async"))[0].id == record.id
            assert (await b.ax("async is works"))[0].id == record.id
            handles = await asyncio.gather(*(b.submit("builtin.echo", n) for n in range(50)))
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            assert results == list(range(50))
            failing = await b.submit("python.raiser", {"args": []}, max_attempts=1)
            with pytest.raises(qntx.JobFailed):
                await failing.result(timeout=30)

    asyncio.run(scenario())


def test_a_plain_loop_of_submits_is_pipelined(bus, up):
    with qntx.connect(bus.home) as b:
        handles = [b.submit("builtin.echo", n) for n in range(500)]
        assert [h.result(timeout=30) for h in handles] == list(range(500))
        refused = b.submit("no.such", 1)  # returns at once; the refusal comes with the reply
        with pytest.raises(NotFound, match="unknown handler 'no.such'"):
            refused.accepted(timeout=10)
        with pytest.raises(NotFound):
            refused.result(timeout=10)
        again = b.submit("builtin.echo", 0, id=handles[0].id)  # a resubmission: the same job
        assert again.id == handles[0].id and again.result(timeout=10) == 0
        clash = b.submit("builtin.echo", "another job", id=handles[0].id)  # not the same job
        with pytest.raises(qntx.Conflict, match="taken by another job"):
            clash.accepted(timeout=10)
        other = b.submit("no.such", 2)
        with pytest.raises(NotFound) as flushed:
            b.flush()
        assert [job_id for job_id, _ in flushed.value.failures] == [other.id]
        unseen = b.submit("no.such", 3)
        # Its refusal comes back: settled on the way if it was quick (then already
        # noted for flush), otherwise waiting, unread, in the connection.
        wait_for(lambda: b._unreported or b.server._socket.poll(0) or b.server._arrived, 30, what="the refusal's reply")
        b.submit("builtin.echo", "x")  # settles the refusal on the way: flush still reports it
        with pytest.raises(NotFound) as flushed:
            b.flush()
        assert [job_id for job_id, _ in flushed.value.failures] == [unseen.id]
        # A retried job's old outcome is not its outcome.
        slow = b.submit("builtin.sleep", {"seconds": 0.5})
        wait_for_status(b, slow.id, "running")
        b.cancel(slow.id)
        assert b.wait(slow.id, timeout=10).status == "cancelled"
        b.retry(slow.id)
        assert b.wait(slow.id, timeout=10).status == "completed"


def test_results_asked_together_in_any_order_and_with_short_timeouts(bus, up):
    """The client asks for many outcomes in one waiting request: results taken in
    reverse order, a short timeout on a long job while others are asked with it, and
    dropped handles all behave as one request per job would."""
    with qntx.connect(bus.home) as b:
        handles = [b.submit("builtin.echo", n) for n in range(300)]
        assert [h.result(timeout=30) for h in reversed(handles)] == list(range(299, -1, -1))
        long = b.submit("builtin.sleep", 30, max_attempts=1)
        quick = [b.submit("builtin.sleep", 0.2) for _ in range(3)]
        started = time.monotonic()
        with pytest.raises(qntx.errors.Timeout):
            long.result(timeout=0.5)  # asked together with the quick ones: still its own timeout
        assert time.monotonic() - started < 3
        assert [h.result(timeout=30) for h in quick] == [{"slept": 0.2}] * 3
        dropped = [b.submit("builtin.echo", "x" * 1000).id for n in range(3000)]  # handles not kept
        b.flush()  # accepted: nothing refers to their handles now
        kept = b.submit("builtin.echo", "kept")
        assert kept.result(timeout=60) == "kept"
        assert b.wait(dropped[-1], timeout=30).status == "completed"
        # what came ahead for handles dropped meanwhile is let go (3,000 results of 1 KB came)
        assert b._follower.outcomes._held_bytes < 64 << 10
        b.cancel(long.id)


def wait_for_status(b, job_id: str, status: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while b.job(job_id).status != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        time.sleep(0.02)


def test_pause_and_resume_a_queued_job(bus, up):
    with qntx.connect(bus.home) as b:
        # Fill every worker slot (2 workers x capacity 8) so the next job waits.
        blockers = [b.submit("builtin.sleep", {"seconds": 1.5}) for _ in range(16)]
        waiting = b.submit("builtin.echo", "later")
        assert b.pause(waiting.id).status == "paused"
        for h in blockers:
            h.result(timeout=30)
        assert b.job(waiting.id).status == "paused"  # held although workers are free
        assert b.resume(waiting.id).status in ("queued", "running", "completed")
        assert waiting.result(timeout=10) == "later"


def test_oversized_results_and_payloads_fail_fast(bus, up):
    assert bus.run("handler", "create", "huge", "--code", "_result = 'y' * (20 << 20)").returncode == 0
    up.wait_output("handler=python.huge")
    with qntx.connect(bus.home) as b:
        started = time.monotonic()
        job = b.submit("python.huge", {"args": []}, max_attempts=1).wait(timeout=60)
        assert job.status == "failed" and "result too large" in job.error.message
        assert time.monotonic() - started < 30  # not a lease expiry
        with pytest.raises(qntx.QntxError) as refused:
            b.submit("builtin.echo", "x" * (17 << 20))
        assert refused.value.code == "too_large"
        assert b.submit("builtin.echo", "fine").result(timeout=10) == "fine"


def test_deleting_a_handler_fails_its_waiting_jobs(bus, up):
    bus.create_handler(up, "doomed", HANDLERS["sleepy"])  # its own: the other tests go on using sleepy
    with qntx.connect(bus.home) as b:
        # The bus is shared: what the other tests left has drained before this one counts.
        wait_for(lambda: b.status().queue["queued"] == 0, 30, what="an empty queue")
        # More than the plugin takes at once, so some jobs of `doomed` wait in the queue.
        handles = [b.submit("python.doomed", {"args": ["1"]}) for _ in range(4 * PLUGIN_DEPTH)]
        b.flush()
        assert bus.run("handler", "delete", "doomed").returncode == 0
        up.wait_output("Unregistering plugin async handler plugin=python handler=python.doomed", timeout=5)
        jobs = [b.wait(h.id, timeout=60) for h in handles]
        assert all(j.status in ("completed", "failed") for j in jobs)
        failed = [j for j in jobs if j.status == "failed"]
        assert failed and all("doomed was deleted" in j.error.message for j in failed)
        assert b.status().queue["queued"] == 0


def test_jobs_wait_in_pulse_not_in_the_plugin(bus, up):
    """Flow control reaches the plugin: jobs beyond its capacity stay queued, so a
    short timeout still covers each job's own run."""
    with qntx.connect(bus.home) as b:
        handles = [b.submit("python.sleepy", {"args": ["0.8"]}, timeout_s=1.5, max_attempts=1) for _ in range(10)]
        own = {h.id for h in handles}  # the bus is shared: count these jobs only

        def running() -> set[str]:
            return {j.id for j in b.jobs(status="running", limit=10_000)} & own

        wait_for_running = time.monotonic() + 10
        while not running() and time.monotonic() < wait_for_running:
            time.sleep(0.02)
        assert len(running()) <= 2 * PLUGIN_DEPTH  # 2 interpreters
        for h in handles:
            assert h.result(timeout=60) == "woke"


def test_pulse_commands(bus, up):
    ran = bus.run("ix", "sleepy", "30", "--no-wait")
    job_id = ran.stdout.strip()
    cancelled = bus.run("pulse", "cancel", job_id)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"✓ Job {job_id} cancelled"
    again = bus.run("pulse", "cancel", job_id)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    retried = bus.run("pulse", "retry", job_id)
    assert retried.returncode == 0 and "queued" in retried.stdout
    assert bus.run("pulse", "cancel", job_id).returncode == 0
    unknown = bus.run("pulse", "show", "JB-NOPE---22222222")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: ")
    listed = bus.run("pulse", "jobs", "--status", "cancelled")
    assert job_id in listed.stdout
    bad = bus.run("pulse", "jobs", "--status", "sleeping")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_worker_takes_a_burst_of_dispatches_larger_than_one_loop_turn_reads(bus, up):
    """A worker reads at most JOBS_PER_TURN dispatches per loop turn and takes the
    rest in the next: a burst past that (jobs due at one instant, a wide worker)
    runs whole, none left unread in the pipe until the next dispatch comes."""
    from qntx.pulse.worker import JOBS_PER_TURN

    wide = bus.start("worker", "--name", "wide", "--capacity", "400")
    jobs = 3 * JOBS_PER_TURN
    try:
        with qntx.connect(bus.home) as b:
            wait_for(lambda: any(a.name == "wide" for a in b.status().actors), 30, what="the wide worker")
            due = int(time.time() * 1000) + 1500  # all due together: dispatched in one burst
            handles = [b.submit("builtin.sleep", 0.2, run_at=due) for _ in range(jobs)]
            assert [h.result(timeout=30) for h in handles] == [{"slept": 0.2}] * jobs
            workers = [b.job(h.id).worker for h in handles]
        assert sum(1 for w in workers if w == "wide") > JOBS_PER_TURN, workers
    finally:
        wide.stop()


def test_output_and_errors_that_are_not_valid_utf8_reach_the_client_replaced(bus, up):
    """A lone surrogate in printed text or an exception message is sent as U+FFFD;
    the run ends as the handler did (its result, or its own error), with its output."""
    with bus.connect() as b:
        ok = b.submit("python.surrogates", {"args": []})
        lines = [e.text for e in b.follow(ok.id, timeout=60) if getattr(e, "text", None)]
        job = ok.wait(timeout=60)
        assert job.status == "completed" and job.result == "fine", job.error
        assert "first caf\ufffd" in "".join(lines) and "last caf\ufffd" in job.logs
        failed = b.submit("python.surrogates", {"args": [1]}, max_attempts=1).wait(timeout=60)
        assert failed.status == "failed" and failed.error.message == "ValueError: caf\ufffd", failed.error
        assert "last caf\ufffd" in failed.logs
