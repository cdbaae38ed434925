"""Pulse's core (qntx.pulse.core): every transition, with no sockets and no clock."""

from __future__ import annotations

import msgspec
import pytest

from qntx.errors import Conflict, NotFound, TooLarge
from qntx.protocol import (
    CancelRunning,
    Dispatch,
    JobChanged,
    JobDone,
    JobError,
    JobOutput,
    Submit,
    WorkerReady,
)
from qntx.pulse.commands import (
    CancelAtPlugin,
    ClosePipe,
    Log,
    OpenPipe,
    Publish,
    Reply,
    SendControl,
    SendJob,
)
from qntx.pulse.core import Config, PulseCore
from qntx.pulse.events import (
    Finished,
    HandlersAnnounced,
    Instant,
    OutputWritten,
    PluginDown,
    PluginUp,
    Saved,
    Steer,
    Submitted,
    Turn,
    Undeliverable,
    WorkerSeen,
)
from qntx.pulse.rules import lease_ms
from qntx.pulse.sessions import LEASE_BLOCK

LIVE = ("queued", "dispatched", "running", "paused", "waiting")
CONFIG = Config(dead_after_ms=3_000, adopt_grace_ms=5_000, max_payload_bytes=1_000)


def raw(value) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(value))


class Disk:
    """What a JobStore would hold: enough to restart a core from."""

    def __init__(self):
        self.jobs: dict[str, tuple[int, object]] = {}
        self.next_seq, self.counts, self.ceiling, self.plugins = 0, {}, 1, []
        self.schedules, self.limits, self.versions = {}, {}, {}

    def write(self, changes) -> None:
        for seq, job, _ in changes.rows:
            self.jobs[job.id] = (seq, msgspec.structs.replace(job))
        self.next_seq, self.counts, self.ceiling = changes.next_seq, changes.counts, changes.lease_ceiling
        self.plugins = changes.plugins
        if changes.schedules is not None:
            self.schedules = changes.schedules
        if changes.limits is not None:
            self.limits = changes.limits
        if changes.handler_versions is not None:
            self.versions = changes.handler_versions


class Harness:
    def __init__(self, disk: Disk | None = None, wall: int = 1_000_000, mono: int = 50_000):
        self.disk = disk or Disk()
        self.wall, self.mono = wall, mono
        self.core = PulseCore(CONFIG, self.now)
        live = [(seq, msgspec.structs.replace(job)) for seq, job in self.disk.jobs.values() if job.status in LIVE]
        ended = {job.id: job.status for _, job in self.disk.jobs.values() if job.status not in LIVE}
        self.core.restore(
            live, self.disk.next_seq, self.disk.counts, self.disk.ceiling, self.now, self.disk.plugins,
            ended=ended, schedules=self.disk.schedules, limits=self.disk.limits, handler_versions=self.disk.versions,
        )  # fmt: skip
        self.commit()

    @property
    def now(self) -> Instant:
        return Instant(self.wall, self.mono)

    def tick(self, ms: int) -> None:
        self.wall += ms
        self.mono += ms

    def __call__(self, event) -> list:
        return self.core.handle(event, self.now)

    def commit(self) -> list:
        changes = self.core.changes()
        if changes is None:
            return []
        self.disk.write(changes)
        return self(Saved(changes.versions, changes.lease_ceiling))

    def submit(self, handler="builtin.echo", payload=None, **fields):
        out = self(Submitted(Submit(handler=handler, payload=raw(payload), **fields), "client"))
        [reply] = [c for c in out if isinstance(c, Reply)]
        return reply.message.job

    def hello(self, session=b"s1", credit=4, leases=(), ready=True, name=None, plugin=""):
        message = WorkerReady(
            worker=name or session.decode(), credit=credit, leases=list(leases), session=session.decode(), plugin=plugin
        )
        return self(WorkerSeen(session, message, ready))

    def turn(self) -> list:
        return self(Turn())

    def idle(self, ms: int) -> list:
        """Let ``ms`` pass with the loop turning as it does when idle (every 0.2 s)."""
        out = []
        for _ in range(ms // 200 + 1):
            self.tick(min(200, ms))
            out += self.turn()
        return out

    def dispatched(self, commands) -> list[Dispatch]:
        return [c.message for c in commands if isinstance(c, SendJob)]

    def done(self, dispatch: Dispatch, success=True, result=None, **fields):
        return self(Finished(JobDone(job_id=dispatch.job.id, lease=dispatch.lease, success=success, result=raw(result), **fields)))

    def job(self, job_id: str):
        return self.core.jobs.get(job_id) or self.disk.jobs[job_id][1]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_submit_is_replied_after_the_commit_and_dispatched_to_a_ready_session(h):
    out = h(Submitted(Submit(handler="builtin.echo", payload=raw({"n": 1})), "client"))
    [reply] = out
    assert reply.durable and reply.reply_to == "client"  # answered only after the commit
    job = reply.message.job
    assert job.status == "queued" and job.id.startswith("JB-")
    assert h.dispatched(h.turn()) == []  # no worker yet
    assert OpenPipe(b"s1") in h.hello()
    [sent] = h.dispatched(h.turn())
    assert sent.job.id == job.id and h.core.jobs[job.id].status == "running"
    assert h.dispatched(h.turn()) == []  # sent once only


def test_a_session_gets_jobs_only_once_connected_and_never_past_its_credit(h):
    ids = [h.submit(payload=n).id for n in range(5)]
    h.hello(credit=2, ready=False)
    assert h.dispatched(h.turn()) == []
    h.hello(credit=2, ready=True)
    sent = h.dispatched(h.turn())
    assert [d.job.id for d in sent] == ids[:2]  # FIFO
    assert [d.lease for d in sent] == [1, 2]
    assert msgspec.msgpack.decode(sent[0].job.payload) == 0  # the payload travels raw
    assert h.dispatched(h.turn()) == []
    h.done(sent[0])
    assert [d.job.id for d in h.dispatched(h.turn())] == [ids[2]]


def test_priority_first_then_fifo(h):
    order = {}
    for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1), ("f", -1)]:
        order[h.submit(payload=name, priority=priority).id] = name
    h.hello(credit=10)
    assert [order[d.job.id] for d in h.dispatched(h.turn())] == ["b", "d", "e", "a", "c", "f"]


def test_only_the_current_lease_completes_a_job(h):
    job = h.submit()
    h.hello()
    [first] = h.dispatched(h.turn())
    out = h(Finished(JobDone(job_id=job.id, lease=first.lease + 7, success=True, result=raw("forged"))))
    assert any(isinstance(c, Log) for c in out) and h.core.jobs[job.id].status == "running"
    out = h.done(first, result={"ok": 1})
    final = h.core.jobs[job.id]
    assert final.status == "completed" and msgspec.msgpack.decode(final.result) == {"ok": 1}
    published = [c.message for c in h.turn() if isinstance(c, Publish)]
    assert [m.job.status for m in published if isinstance(m, JobChanged)] == ["completed"]
    assert published[0].job.payload == raw(None)  # events do not carry payloads


def test_an_expired_lease_counts_an_attempt_is_cancelled_and_its_late_result_discarded(h):
    job = h.submit(timeout_s=1, max_attempts=2)
    h.hello(credit=1)
    [first] = h.dispatched(h.turn())
    h.tick(lease_ms(1) + 1)
    h.hello(credit=1, leases=[first.lease])  # still alive, still running it
    out = h.turn()
    assert SendControl(b"s1", CancelRunning(lease=first.lease, job_id=job.id)) in out
    record = h.core.jobs[job.id]
    assert record.status == "queued" and record.attempts == 1 and "lease 1 expired" in record.error.message
    h.done(first, result="stale")  # the stale run reports after all
    assert h.core.jobs[job.id].status == "queued"
    h.tick(600)  # past the backoff
    h.hello(credit=1)  # it stopped listing the stale run: its slot is free again
    [second] = h.dispatched(h.turn())
    assert second.lease > first.lease and second.job.attempts == 2
    h.done(second, result="fresh")
    assert msgspec.msgpack.decode(h.core.jobs[job.id].result) == "fresh"


def test_a_taken_back_run_holds_its_slot_until_the_worker_stops_listing_it(h):
    job = h.submit()
    h.hello(credit=1)
    [run] = h.dispatched(h.turn())
    h(Steer("cancel", job.id, "client"))
    other = h.submit()
    h.hello(credit=1, leases=[run.lease])
    assert h.dispatched(h.turn()) == []  # the cancelled run still occupies the worker
    h.hello(credit=1, leases=[])
    assert [d.job.id for d in h.dispatched(h.turn())] == [other.id]


def test_a_dead_session_gives_its_runs_back_without_using_attempts(h):
    h(PluginUp("python", ("python.x",)))
    job = h.submit(handler="python.x", max_attempts=1)
    h.hello(b"s1", credit=1, plugin="python")
    [run] = h.dispatched(h.turn())
    out = h.idle(CONFIG.dead_after_ms + 1)
    assert ClosePipe(b"s1") in out and CancelAtPlugin("python", job.id, run.lease) in out
    record = h.core.jobs[job.id]
    assert record.status == "queued" and record.attempts == 0 and record.runs == 1
    h.hello(b"s2", credit=1, plugin="python")
    [again] = h.dispatched(h.turn())
    assert again.lease > run.lease
    h.done(again, result=1)
    assert h.core.jobs[job.id].status == "completed"


def test_an_interrupted_run_is_queued_again_as_it_was(h):
    job = h.submit(max_attempts=1)
    h.hello()
    [run] = h.dispatched(h.turn())
    h.done(run, success=False, interrupted=True, error=JobError(message="plugin went away"))
    record = h.core.jobs[job.id]
    assert record.status == "queued" and record.attempts == 0
    [again] = h.dispatched(h.turn())
    h.done(again, success=False, error=JobError(message="boom"))
    assert h.core.jobs[job.id].status == "failed" and h.core.jobs[job.id].attempts == 1


def test_failures_back_off_then_fail_for_good(h):
    job = h.submit(max_attempts=2)
    h.hello()
    [run] = h.dispatched(h.turn())
    h.done(run, success=False, error=JobError(message="no"))
    assert h.core.jobs[job.id].run_after == h.wall + 500
    assert h.dispatched(h.turn()) == []
    h.tick(500)
    [run] = h.dispatched(h.turn())
    h.done(run, success=False, error=JobError(message="no again"))
    assert h.core.jobs[job.id].status == "failed" and h.core.jobs[job.id].error.message == "no again"


def test_a_restarted_server_lets_workers_claim_their_runs(h):
    kept, lost = h.submit(payload="kept", max_attempts=1), h.submit(payload="lost", max_attempts=1)
    h.hello(b"s1", credit=2)
    runs = {d.job.id: d for d in h.dispatched(h.turn())}
    h.commit()
    h2 = Harness(h.disk, wall=h.wall + 100, mono=h.mono + 100)  # kill -9 and a new server
    h2.hello(b"s1", credit=2, leases=[runs[kept.id].lease])  # still running this one
    assert h2.core.jobs[kept.id].status == "running"
    h2.done(runs[kept.id], result="mine")
    assert h2.core.jobs[kept.id].status == "completed" and h2.core.jobs[kept.id].attempts == 1
    for _ in range(CONFIG.adopt_grace_ms // 1000 + 1):  # its heartbeats go on
        h2.idle(1000)
        h2.hello(b"s1", credit=2)
    h2.turn()
    record = h2.core.jobs[lost.id]
    assert record.status == "running" and record.attempts == 1 and record.runs == 2  # queued again, dispatched
    assert record.lease > max(d.lease for d in runs.values())


def test_lease_ids_are_never_reused_across_restarts(h):
    h.hello(credit=1000)
    for n in range(3):
        h.submit(payload=n)
    top = max(d.lease for d in h.dispatched(h.turn()))
    h.commit()
    h2 = Harness(h.disk)
    h2.submit()
    h2.hello(credit=10)
    [run] = h2.dispatched(h2.turn())
    assert run.lease >= LEASE_BLOCK > top


def test_lease_ids_wait_for_their_block_to_be_durable(h):
    h.core.leases_.next_id = h.core.leases_.ceiling - 1  # the last id of the durable block
    h.hello(credit=10)
    for n in range(3):
        h.submit(payload=n)
    assert len(h.dispatched(h.turn())) == 1
    assert h.dispatched(h.turn()) == []  # nothing past the durable ceiling
    h.commit()
    assert len(h.dispatched(h.turn())) == 2


def test_cancel_then_retry_a_running_job(h):
    h(PluginUp("python", ("python.x",)))
    job = h.submit(handler="python.x")
    h.hello(plugin="python")
    [run] = h.dispatched(h.turn())
    out = h(Steer("cancel", job.id, "client"))
    assert SendControl(b"s1", CancelRunning(lease=run.lease, job_id=job.id)) in out
    assert CancelAtPlugin("python", job.id, run.lease) in out
    with pytest.raises(Conflict):
        h(Steer("cancel", job.id, "client"))
    h(Steer("retry", job.id, "client"))
    h.hello(leases=[], plugin="python")
    [again] = h.dispatched(h.turn())
    assert again.lease != run.lease and again.job.attempts == 1
    old_output = h(OutputWritten(JobOutput(job_id=job.id, stream="stdout", text="old", lease=run.lease)))
    assert old_output == []  # the abandoned run's output never reaches the new one's followers
    new_output = h(OutputWritten(JobOutput(job_id=job.id, stream="stdout", text="new", lease=again.lease)))
    assert [c.message.text for c in new_output] == ["new"]


def test_retry_of_a_stored_job_and_steering_errors(h):
    job = h.submit(max_attempts=1)
    h.hello()
    [run] = h.dispatched(h.turn())
    h.done(run, success=False, error=JobError(message="x"))
    h.commit()
    assert job.id not in h.core.jobs  # final and saved: out of memory
    stored = h.disk.jobs[job.id]
    with pytest.raises(Conflict):
        h(Steer("pause", job.id, "c", stored[1], stored[0]))
    with pytest.raises(NotFound):
        h(Steer("cancel", "JB-NOPE", "c"))
    h(Steer("retry", job.id, "c", stored[1], stored[0]))
    record = h.core.jobs[job.id]
    assert record.status == "queued" and record.attempts == 0 and record.error is None
    h(Steer("pause", job.id, "c"))
    assert h.dispatched(h.turn()) == []
    h(Steer("resume", job.id, "c"))
    assert len(h.dispatched(h.turn())) == 1


def test_a_plugins_jobs_go_to_its_own_sessions_only_and_wait_while_it_restarts(h):
    h(PluginUp("python", ("python.a",)))
    ids = [h.submit(handler="python.a", payload=n).id for n in range(4)]
    h.hello(credit=10)
    assert h.dispatched(h.turn()) == []  # a plain worker never takes a plugin's job
    h.hello(b"own", credit=2, plugin="python")
    sent = h.dispatched(h.turn())
    assert len(sent) == 2 and h.core.jobs[sent[0].job.id].worker == "own"
    h(PluginDown("python"))
    late = h.submit(handler="python.a")  # accepted while the plugin restarts
    h.done(sent[0], success=False, interrupted=True)
    assert h.dispatched(h.turn()) == []  # nobody can run them now
    h(PluginUp("python", ("python.a",)))
    again = h.dispatched(h.turn())
    assert len(again) == 1
    assert h.core.jobs[ids[0]].attempts == 1  # the interrupted run used none
    assert late.id in h.core.jobs


def test_plugin_sessions_on_several_hosts_share_its_jobs_with_exact_credit(h):
    # The plugin announced capacity 2 (its own host's); its sessions' credit is what
    # bounds it: two hosts' sessions of 3 each take 6 at once, never a plain worker.
    h(PluginUp("python", ("python.a",)))
    for n in range(8):
        h.submit(handler="python.a", payload=n)
    h.hello(b"plain", credit=10)
    for session in (b"here", b"there"):
        message = WorkerReady(worker=session.decode(), credit=3, session=session.decode(), plugin="python")
        h(WorkerSeen(session, message, True))
    sent = [c for c in h.turn() if isinstance(c, SendJob)]
    assert sorted(c.session for c in sent) == [b"here"] * 3 + [b"there"] * 3


def test_handlers_of_a_known_plugin_are_accepted_while_it_is_down(h):
    with pytest.raises(NotFound, match="unknown handler 'python.early'"):
        h.submit(handler="python.early")  # no plugin named python was ever seen
    h(PluginUp("python", ("python.a",)))
    with pytest.raises(NotFound, match="unknown handler 'python.zzz'.*python.a"):
        h.submit(handler="python.zzz")
    h.commit()
    h2 = Harness(h.disk)  # a restarted server, before the plugin registers again
    waiting = h2.submit(handler="python.new")  # maybe created while it was down
    with pytest.raises(NotFound):
        h2.submit(handler="other.thing")
    h2(PluginUp("python", ("python.a",)))
    record = h2.core.jobs[waiting.id]
    assert record.status == "failed" and "python.new" in record.error.message


def test_a_removed_handler_fails_its_waiting_jobs(h):
    h(PluginUp("python", ("python.gone", "python.kept")))
    gone, kept = h.submit(handler="python.gone"), h.submit(handler="python.kept")
    h(HandlersAnnounced("python", ("python.kept",)))
    assert h.core.jobs[gone.id].status == "failed" and "was deleted" in h.core.jobs[gone.id].error.message
    assert h.core.jobs[kept.id].status == "queued"


def test_a_stalled_loop_does_not_kill_live_workers(h):
    h.submit()
    h.hello(credit=1)
    h.turn()
    h.tick(7_000)  # e.g. a huge listing held the loop
    h.hello(credit=1)  # its heartbeat was waiting to be read
    out = h.turn()
    assert not [c for c in out if isinstance(c, ClosePipe)]
    assert b"s1" in h.core.sessions


def test_stall_compensation_without_a_pending_heartbeat(h):
    h.hello(credit=1)
    h.turn()
    h.tick(7_000)
    assert not [c for c in h.turn() if isinstance(c, ClosePipe)]  # blind, not dead
    assert [c for c in h.idle(CONFIG.dead_after_ms + 1) if isinstance(c, ClosePipe)]


def test_resubmission_with_the_same_id_or_key_returns_the_same_job(h):
    first = h.submit(id="JB-CLIENT-MADE-1", idempotency_key="order-1")
    again = h.submit(id="JB-CLIENT-MADE-1")
    by_key = h.submit(idempotency_key="order-1")
    assert first.id == again.id == by_key.id == "JB-CLIENT-MADE-1"
    assert sum(h.core.counts().values()) == 1


def test_payload_limit_and_undeliverable_dispatches(h):
    with pytest.raises(TooLarge):
        h.submit(payload="x" * 2_000)
    job = h.submit()
    h.hello()
    [run] = h.dispatched(h.turn())
    h(Undeliverable(run.lease))
    record = h.core.jobs[job.id]
    assert record.status == "queued" and record.attempts == 0 and record.runs == 0
    assert h.dispatched(h.turn()) == []  # not ready until its next heartbeat
    h.hello()
    assert len(h.dispatched(h.turn())) == 1


def test_changes_are_written_once(h):
    h.submit()
    assert h.core.changes() is not None
    h.commit()
    assert h.core.changes() is None


def test_a_change_during_a_commit_goes_into_the_next_with_the_status_on_disk(h):
    job = h.submit()
    h.commit()
    h.hello()
    h.dispatched(h.turn())  # queued -> running
    first = h.core.changes()
    assert [(row[1].status, row[2]) for row in first.rows] == [("running", "queued")]
    lease = h.core.jobs[job.id].lease
    h(Finished(JobDone(job_id=job.id, lease=lease, success=True, result=raw(1))))  # during the commit
    assert first.rows[0][1].status == "running"  # the commit's snapshot did not move
    h.disk.write(first)
    h(Saved(first.versions, first.lease_ceiling))
    assert job.id in h.core.jobs  # completed, but that is not on disk yet
    second = h.core.changes()
    assert [(row[1].status, row[2]) for row in second.rows] == [("completed", "running")]
    h.disk.write(second)
    h(Saved(second.versions, second.lease_ceiling))
    assert job.id not in h.core.jobs and h.core.changes() is None


def test_a_final_job_saved_before_the_turn_ends_is_still_published(h):
    job = h.submit()
    h.hello()
    [run] = h.dispatched(h.turn())
    h.done(run, result="x")
    h.commit()  # e.g. the lazy commit's timer ran between the result and the turn
    assert job.id not in h.core.jobs
    published = [c.message for c in h.turn() if isinstance(c, Publish)]
    assert [m.job.status for m in published] == ["completed"]


def test_a_run_lost_after_its_handler_was_deleted_fails_instead_of_waiting(h):
    h(PluginUp("python", ("python.gone",)))
    job = h.submit(handler="python.gone")
    h.hello(b"s1")
    h.dispatched(h.turn())
    h(HandlersAnnounced("python", ()))  # deleted while it runs
    h.idle(CONFIG.dead_after_ms + 1)  # and then its worker dies
    record = h.core.jobs[job.id]
    assert record.status == "failed" and "was deleted" in record.error.message


def test_a_handler_its_plugin_does_not_have_fails_when_the_plugin_comes_back(h):
    h(PluginUp("python", ("python.a",)))
    h(PluginDown("python"))
    job = h.submit(handler="python.nope")  # accepted while the plugin is down
    h(PluginUp("python", ("python.a",)))
    record = h.core.jobs[job.id]
    assert record.status == "failed" and "python.nope" in record.error.message


def test_a_worker_given_up_for_dead_is_told_to_stop_its_old_run(h):
    job = h.submit()
    h.hello(credit=1)
    [run] = h.dispatched(h.turn())
    h.idle(CONFIG.dead_after_ms + 1)  # silent (SIGSTOP): its run goes back
    assert h.core.jobs[job.id].status == "queued"
    out = h.hello(credit=1, leases=[run.lease])  # it wakes up, still running it
    assert SendControl(b"s1", CancelRunning(lease=run.lease)) in out
    again = h.hello(credit=1, leases=[run.lease])  # asked again while it is still listed
    assert SendControl(b"s1", CancelRunning(lease=run.lease)) in again
    assert h.dispatched(h.turn()) == []  # and it holds the slot meanwhile
    h.hello(credit=1, leases=[])
    assert len(h.dispatched(h.turn())) == 1


def test_a_run_that_reported_is_not_cancelled_by_a_heartbeat_sent_before_its_report(h):
    h.submit()
    h.hello(credit=1)
    [run] = h.dispatched(h.turn())
    h.done(run)
    out = h.hello(credit=1, leases=[run.lease])  # written before its JobDone went out
    assert not [c for c in out if isinstance(c, SendControl)]
    assert h.core.sessions[b"s1"].free == 1


def test_an_id_taken_by_another_job_is_a_conflict(h):
    h.submit(id="JB-SAME---22222222", payload=1)
    with pytest.raises(Conflict, match="taken"):
        h.submit(id="JB-SAME---22222222", payload=2)
    assert h.submit(id="JB-SAME---22222222", payload=1).id == "JB-SAME---22222222"


def test_a_refused_retry_of_a_stored_job_leaves_nothing_behind(h):
    job = h.submit()
    h.hello()
    [run] = h.dispatched(h.turn())
    h.done(run)
    h.commit()
    seq, stored = h.disk.jobs[job.id]
    with pytest.raises(Conflict):
        h(Steer("retry", job.id, "c", stored, seq))
    assert job.id not in h.core.jobs


def test_a_big_payload_leaves_the_core_once_on_disk_and_out_on_a_lease():
    """Over 1 MiB: its dispatch waits for the commit that writes it (never encoded
    beside the commit's copy); once saved and running, the core holds ``STORED`` in
    its place, and its next dispatch carries that for the shell to read back."""
    from qntx.pulse.ledger import BIG_PAYLOAD_BYTES, STORED

    h = Harness()
    h.core.config = Config(max_payload_bytes=4 << 20)
    h.hello()
    big = "x" * (BIG_PAYLOAD_BYTES + 1)
    job = h.submit(payload=big, max_attempts=2)
    [command] = [c for c in h.turn() if isinstance(c, SendJob)]
    assert command.durable and bytes(command.message.job.payload) == bytes(raw(big))
    assert h.core.jobs[job.id].payload is not STORED  # not on disk yet
    h.commit()
    assert h.core.jobs[job.id].payload is STORED and bytes(h.disk.jobs[job.id][1].payload) == bytes(raw(big))
    h.done(command.message, success=False, error=JobError(message="once more"))
    h.tick(60_000)
    [again] = h.dispatched(h.turn())
    assert again.job.payload is STORED  # the shell reads it back from the store
    small = h.submit(payload="small")
    [sent] = [c for c in h.turn() if isinstance(c, SendJob)]
    h.commit()
    assert not sent.durable and h.core.jobs[small.id].payload == raw("small")  # small ones stay
