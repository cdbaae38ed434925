"""Every run of a job kept in its history (qntx.pulse.core with qntx.pulse.history)."""

from __future__ import annotations

import functools

import msgspec

from qntx.protocol import HISTORY_KEPT, NIL, STDERR_MARK, JobChanged, JobError, JobOutput
from qntx.pulse.commands import Publish, Reply
from qntx.pulse.events import OutputWritten, PluginUp, Steer, Undeliverable
from qntx.pulse.rules import MAX_LOG_BYTES, lease_ms
from tests.unit.test_core import CONFIG, Harness, raw


def wrote(h: Harness, job_id: str, lease: int, text: str, stream: str = "stdout") -> None:
    h(OutputWritten(JobOutput(job_id=job_id, stream=stream, text=text, lease=lease)))


def python_harness() -> Harness:
    """A core with plugin python up; ``hello`` joins that plugin's own sessions (its jobs go nowhere else)."""
    h = Harness()
    h(PluginUp("python", ("python.x",)))
    h.hello = functools.partial(h.hello, plugin="python")
    return h


def test_every_run_is_kept_with_how_it_ended_and_what_it_wrote():
    h = python_harness()
    job = h.submit(handler="python.x", max_attempts=3, timeout_s=1)
    h.hello(b"s1", credit=1)
    [first] = h.dispatched(h.turn())
    h.done(first, success=False, error=JobError(message="boom", traceback="Traceback: boom"), logs="one\n")
    h.tick(600)
    [second] = h.dispatched(h.turn())
    wrote(h, job.id, second.lease, "slow start\n")
    h.tick(lease_ms(1) + 1)
    h.hello(b"s1", credit=1, leases=[second.lease])
    h.turn()  # the lease expires: timed out, with what it streamed
    h.tick(2_000)
    h.hello(b"s1", credit=1)
    [third] = h.dispatched(h.turn())
    wrote(h, job.id, third.lease, "going\n")
    h.idle(CONFIG.dead_after_ms * 3)  # its worker goes silent: the run is lost
    h.hello(b"s2", credit=1)
    [fourth] = h.dispatched(h.turn())
    wrote(h, job.id, fourth.lease, "partial\n")
    wrote(h, job.id, fourth.lease, "warn\n", stream="stderr")
    h(Steer("cancel", job.id, "client"))

    record = h.core.jobs[job.id]
    runs = record.history
    assert [r.outcome for r in runs] == ["failed", "timed out", "lost", "cancelled"]
    assert [r.lease for r in runs] == [first.lease, second.lease, third.lease, fourth.lease]
    assert [r.attempt for r in runs] == [1, 2, 3, 3]  # a lost run uses no attempt
    assert [r.worker for r in runs] == ["s1", "s1", "s1", "s2"]
    assert runs[0].error.message == "boom" and runs[0].error.traceback == "Traceback: boom"
    assert runs[0].logs == "one\n"
    assert "expired" in runs[1].error.message and runs[1].logs == "slow start\n"
    assert "stopped responding" in runs[2].error.message and runs[2].logs == "going\n"
    assert runs[3].logs == "partial\n" + STDERR_MARK + "warn\n"
    assert record.logs == runs[3].logs  # the job's logs: its last run's, cancelled or not
    assert all(r.finished_at is not None and r.started_at <= r.finished_at for r in runs)

    h(Steer("retry", job.id, "client"))  # a retry keeps the earlier runs and their errors
    h.hello(b"s2", credit=1, leases=[])
    [fifth] = h.dispatched(h.turn())
    assert fifth.job.history == []  # the worker is not sent the earlier runs
    h.done(fifth, result="ok", logs="fine\n")
    runs = h.core.jobs[job.id].history
    assert [r.outcome for r in runs] == ["failed", "timed out", "lost", "cancelled", "completed"]
    assert runs[0].error.message == "boom" and runs[-1].logs == "fine\n" and runs[-1].error is None


def test_the_history_survives_a_restart_and_events_and_listings_leave_it_out():
    h = python_harness()
    job = h.submit(handler="python.x", max_attempts=2)
    h.hello(b"s1", credit=1)
    [first] = h.dispatched(h.turn())
    h.done(first, success=False, error=JobError(message="first error"))
    published = [c.message for c in h.turn() if isinstance(c, Publish) and isinstance(c.message, JobChanged)]
    assert published and all(m.job.history == [] for m in published)
    h.commit()
    restarted = Harness(h.disk, wall=h.wall + 1_000, mono=h.mono + 1_000)
    assert [r.error.message for r in restarted.core.jobs[job.id].history] == ["first error"]


def test_a_run_the_worker_never_got_is_no_run_at_all():
    h = Harness()
    job = h.submit()
    h.hello()
    [run] = h.dispatched(h.turn())
    h(Undeliverable(run.lease))
    assert h.core.jobs[job.id].history == []


def test_history_and_output_are_bounded():
    h = python_harness()
    job = h.submit(handler="python.x", max_attempts=HISTORY_KEPT + 5)
    h.hello(b"s1", credit=1)
    for n in range(HISTORY_KEPT + 5):
        h.tick(70_000)  # past any backoff
        h.hello(b"s1", credit=1)
        [run] = h.dispatched(h.turn())
        if n == HISTORY_KEPT + 4:
            for i in range(200):  # 200 KiB streamed, then cancelled
                wrote(h, job.id, run.lease, f"{i:04d}" + "x" * 1020 + "\n")
            h(Steer("cancel", job.id, "client"))
        else:
            h.done(run, success=False, error=JobError(message=f"error {n}"))
    record = h.core.jobs[job.id]
    assert len(record.history) == HISTORY_KEPT and record.history_dropped == 5
    assert record.history[0].error.message == "error 5"  # the oldest five went
    last = record.history[-1].logs
    assert len(last.encode()) <= MAX_LOG_BYTES and last.endswith("0199" + "x" * 1020 + "\n")


def test_steering_replies_carry_the_payload_unless_brief():
    h = Harness()
    job = h.submit(payload={"n": 7})

    def reply(out) -> object:
        [found] = [c for c in out if isinstance(c, Reply)]
        return found.message.job

    assert msgspec.msgpack.decode(reply(h(Steer("pause", job.id, "c"))).payload) == {"n": 7}
    assert msgspec.msgpack.decode(reply(h(Steer("resume", job.id, "c"))).payload) == {"n": 7}
    assert msgspec.msgpack.decode(reply(h(Steer("cancel", job.id, "c"))).payload) == {"n": 7}
    assert msgspec.msgpack.decode(reply(h(Steer("retry", job.id, "c"))).payload) == {"n": 7}
    assert reply(h(Steer("cancel", job.id, "c", brief=True))).payload == NIL
    assert raw({"n": 7}) == h.core.jobs[job.id].payload


def test_a_plugin_job_is_dispatched_until_its_code_starts():
    from qntx.protocol import JobStarted
    from qntx.pulse.events import Started

    h = python_harness()
    job = h.submit(handler="python.x")
    echo = h.submit(handler="builtin.echo")
    h.hello(b"s1", credit=1)
    h.hello(b"plain", credit=1, plugin="")
    sent = {d.job.id: d for d in h.dispatched(h.turn())}
    record = h.core.jobs[job.id]
    assert record.status == "dispatched" and record.started_at is None
    assert h.core.jobs[echo.id].status == "running"  # a built-in runs at once
    assert h.core.counts()["dispatched"] == 1 and h.core.counts()["running"] == 1
    h.tick(5_000)  # it waits in the plugin for an interpreter
    h(Started(JobStarted(job_id=job.id, lease=sent[job.id].lease + 1)))  # not its run: nothing
    assert h.core.jobs[job.id].status == "dispatched"
    h(Started(JobStarted(job_id=job.id, lease=sent[job.id].lease)))
    record = h.core.jobs[job.id]
    assert record.status == "running" and record.started_at == h.wall
    assert h.core.counts()["dispatched"] == 0 and h.core.counts()["running"] == 2

    other = h.submit(handler="python.x")
    h.hello(b"s1", credit=2)
    [again] = h.dispatched(h.turn())
    wrote(h, other.id, again.lease, "hello\n")  # output also says the code started
    assert h.core.jobs[other.id].status == "running"


def test_a_dispatched_job_can_be_cancelled_and_survives_a_restart_with_its_lease():
    h = python_harness()
    job = h.submit(handler="python.x")
    kept = h.submit(handler="python.x")
    h.hello(b"s1", credit=2)
    h.dispatched(h.turn())
    h(Steer("cancel", job.id, "client"))
    assert h.core.jobs[job.id].status == "cancelled"
    assert [r.outcome for r in h.core.jobs[job.id].history] == ["cancelled"]
    h.commit()
    restarted = Harness(h.disk, wall=h.wall + 10, mono=h.mono + 10)
    assert restarted.core.jobs[kept.id].status == "dispatched"
    assert restarted.core.jobs[kept.id].lease in restarted.core.leases  # a worker may claim it
