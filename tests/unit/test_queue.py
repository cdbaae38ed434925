"""JobQueue: Pulse's durable job state machine (qntx.pulse.queue)."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from qntx.asid import is_asid
from qntx.errors import Conflict, Invalid, NotFound
from qntx.protocol import JOB_STATUSES, JobError, Submit
from qntx.pulse.queue import INTERRUPTED, MAX_LOG_BYTES, JobQueue, lease_ms

pytestmark = pytest.mark.timeout(60)

START_MS = 1_700_000_000_000


class Clock:
    """A hand-driven ms clock, so backoffs and leases are deterministic."""

    def __init__(self, now: int = START_MS):
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def open_queue(tmp_path, clock):
    """Open (and later close) queues on one directory; reopening is how tests restart."""
    opened: list[JobQueue] = []

    def opener(**kwargs) -> JobQueue:
        kwargs.setdefault("backoff_base_ms", 100)
        queue = JobQueue(tmp_path / "pulse", now_ms=clock, **kwargs)
        opened.append(queue)
        return queue

    yield opener
    for queue in opened:
        queue.close()  # closing twice is harmless in lmdb


def submit(queue: JobQueue, handler: str = "python.echo", **fields):
    job, created = queue.submit(Submit(handler=handler, **fields))
    assert created
    return job


def restart(queue: JobQueue, open_queue, *, flush: bool = True) -> JobQueue:
    if flush:
        queue.flush()
    queue.close()
    return open_queue()


# --------------------------------------------------------------------- basics


def test_submit_lease_complete_is_durable(open_queue, clock):
    queue = open_queue()
    job = submit(queue, payload={"n": 1}, priority=2, max_attempts=4, timeout_s=9)
    assert is_asid(job.id) and job.id.startswith("JB-PYTHONEC-")
    assert (job.status, job.attempts, job.created_at, job.payload) == (
        "queued",
        0,
        START_MS,
        {"n": 1},
    )
    assert queue.ready_count() == 1

    clock.now += 10
    leased = queue.lease("w1")
    assert leased.id == job.id
    assert (leased.status, leased.attempts, leased.worker, leased.started_at) == (
        "running",
        1,
        "w1",
        START_MS + 10,
    )
    assert [j.id for j in queue.running()] == [job.id]
    assert queue.lease("w1") is None

    clock.now += 5
    done = queue.complete(job.id, 1, {"answer": 42}, logs="hello\n")
    assert (done.status, done.result, done.finished_at, done.logs) == (
        "completed",
        {"answer": 42},
        START_MS + 15,
        "hello\n",
    )
    assert queue.running() == []
    assert queue.flush() == 1
    assert queue.flush() == 0  # nothing changed since

    queue = restart(queue, open_queue)
    again = queue.get(job.id)
    assert again == done
    assert queue.counts() == {**dict.fromkeys(JOB_STATUSES, 0), "completed": 1}


def test_returned_jobs_are_snapshots(open_queue):
    queue = open_queue()
    job = submit(queue)
    queue.lease("w")
    assert job.status == "queued"  # the caller's copy does not change under it


def test_priority_first_then_fifo_also_after_reopen(open_queue, clock):
    queue = open_queue()
    ids = {}
    for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 1), ("f", -1)]:
        clock.now += 1
        ids[submit(queue, payload=name, priority=priority).id] = name
    queue = restart(queue, open_queue)
    order = [ids[queue.lease("w").id] for _ in range(6)]
    assert order == ["b", "d", "e", "a", "c", "f"]
    assert queue.lease("w") is None


def test_lease_passes_over_handlers_the_caller_cannot_run(open_queue):
    queue = open_queue()
    blocked = submit(queue, "plugin.down", priority=9)
    first, second = submit(queue, "python.a"), submit(queue, "python.b")
    asked = []

    def accept(handler: str) -> bool:
        asked.append(handler)
        return handler != "plugin.down"

    assert queue.lease("w", accept=accept).id == first.id
    assert queue.lease("w", accept=lambda handler: handler == "nothing") is None
    assert queue.get(blocked.id).status == "queued" and queue.ready_count() == 2
    assert asked == ["plugin.down", "python.a"]
    # Once its plugin is up, the skipped job is still first in line.
    assert queue.lease("w").id == blocked.id
    assert queue.lease("w", accept=accept).id == second.id


def test_idempotency_key_returns_the_same_job_also_after_reopen(open_queue):
    queue = open_queue()
    first = submit(queue, idempotency_key="order-7")
    same, created = queue.submit(Submit(handler="python.echo", idempotency_key="order-7"))
    assert not created and same.id == first.id
    assert queue.counts()["queued"] == 1

    queue = restart(queue, open_queue)
    same, created = queue.submit(Submit(handler="other", idempotency_key="order-7"))
    assert not created and same.id == first.id

    # Even once the job is finished (and gone from memory) the key still finds it.
    leased = queue.lease("w")
    queue.complete(leased.id, leased.attempts, "ok")
    queue.flush()
    same, created = queue.submit(Submit(handler="python.echo", idempotency_key="order-7"))
    assert not created and (same.id, same.status, same.result) == (first.id, "completed", "ok")
    assert sum(queue.counts().values()) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"handler": ""},
        {"handler": "  "},
        {"handler": 7},
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"timeout_s": 0},
        {"timeout_s": -1.0},
        {"timeout_s": float("inf")},
        {"timeout_s": True},
        {"priority": "high"},
        {"idempotency_key": ""},
        {"idempotency_key": "k" * 1000},
    ],
)
def test_submit_rejects_bad_specs(open_queue, fields):
    queue = open_queue()
    spec = Submit(**{"handler": "python.echo", **fields})
    with pytest.raises(Invalid):
        queue.submit(spec)
    assert sum(queue.counts().values()) == 0 and queue.flush() == 0


# --------------------------------------------------------------------- attempts


def test_stale_attempt_results_are_ignored(open_queue, clock):
    queue = open_queue()
    job = submit(queue, timeout_s=1)
    queue.lease("w1")
    clock.now += lease_ms(1)
    assert [j.id for j in queue.expire_leases()] == [job.id]
    clock.now += 1_000  # past the backoff
    second = queue.lease("w2")
    assert second.attempts == 2

    assert queue.complete(job.id, 1, "late") is None
    assert queue.fail_attempt(job.id, 1, JobError(message="late")) is None
    assert queue.progress(job.id, 1, 2).progress.current == 1
    assert queue.get(job.id).status == "running"
    assert queue.complete(job.id, 2, "fresh").result == "fresh"
    assert queue.complete(job.id, 2, "twice") is None
    assert queue.progress(job.id, 2, 2) is None  # only running jobs report progress
    assert queue.complete("JB-NOPE-22222222", 1, "x") is None


def test_retries_back_off_exponentially_then_fail_as_dead_letter(open_queue, clock):
    queue = open_queue(backoff_base_ms=100)
    job = submit(queue, max_attempts=3)
    for attempt, backoff in [(1, 100), (2, 200)]:
        leased = queue.lease("w")
        assert leased.attempts == attempt
        failed = queue.fail_attempt(job.id, attempt, JobError(message=f"boom {attempt}"), "out")
        assert (failed.status, failed.run_after, failed.worker) == (
            "queued",
            clock.now + backoff,
            None,
        )
        assert failed.error.message == f"boom {attempt}"
        # Not leasable during the backoff, and the server knows when to look again.
        assert queue.lease("w") is None and queue.ready_count() == 0
        assert queue.next_wakeup_ms() == clock.now + backoff
        clock.now += backoff - 1
        assert queue.lease("w") is None
        clock.now += 1
        assert queue.ready_count() == 1

    queue.lease("w")
    error = JobError(message="boom 3", traceback="Traceback...\nValueError: boom 3")
    dead = queue.fail_attempt(job.id, 3, error, logs="last words")
    assert (dead.status, dead.attempts, dead.error, dead.finished_at, dead.logs) == (
        "failed",
        3,
        error,
        clock.now,
        "last words",
    )
    assert queue.lease("w") is None and queue.next_wakeup_ms() is None

    queue = restart(queue, open_queue)
    [listed] = queue.jobs(status="failed")
    assert (listed.id, listed.error) == (job.id, error)


def test_backoff_is_capped(open_queue, clock):
    queue = open_queue(backoff_base_ms=1_000, backoff_max_ms=3_000)
    job = submit(queue, max_attempts=10)
    delays = []
    for attempt in range(1, 6):
        queue.lease("w")
        delays.append(queue.fail_attempt(job.id, attempt, None).run_after - clock.now)
        clock.now += 3_000
    assert delays == [1_000, 2_000, 3_000, 3_000, 3_000]
    assert queue.get(job.id).error.message  # a failure without an error still says so


def test_release_worker_fails_its_attempts(open_queue):
    queue = open_queue(backoff_base_ms=0)
    a, b = submit(queue), submit(queue, max_attempts=1)
    c = submit(queue)
    assert [queue.lease(w).id for w in ("w1", "w1", "w2")] == [a.id, b.id, c.id]

    changed = {j.id: j for j in queue.release_worker("w1", "worker w1 stopped answering")}
    assert set(changed) == {a.id, b.id}
    assert (changed[a.id].status, changed[a.id].attempts) == ("queued", 1)
    assert changed[b.id].status == "failed"  # out of attempts: dead letter
    assert {j.error.message for j in changed.values()} == {"worker w1 stopped answering"}
    assert [j.id for j in queue.running()] == [c.id]
    assert queue.release_worker("w1", "again") == []
    assert queue.lease("w3").id == a.id


def test_expire_leases_times_out_running_jobs(open_queue, clock):
    queue = open_queue()
    slow = submit(queue, timeout_s=2)
    fast = submit(queue, timeout_s=60)
    queue.lease("w")
    queue.lease("w")
    deadline = START_MS + lease_ms(2)
    assert queue.next_wakeup_ms() == deadline
    clock.now = deadline - 1
    assert queue.expire_leases() == []
    clock.now = deadline
    [expired] = queue.expire_leases()
    assert (expired.id, expired.status, expired.error.message) == (
        slow.id,
        "queued",
        "timed out after 2s",
    )
    assert [j.id for j in queue.running()] == [fast.id]
    # Next: the expired job's backoff ends before the other lease does.
    assert queue.next_wakeup_ms() == deadline + 100


# --------------------------------------------------------------------- restarts


def test_crash_recovery_requeues_interrupted_jobs(open_queue):
    queue = open_queue()
    job = submit(queue)
    last_chance = submit(queue, max_attempts=1)
    queue.lease("w")
    queue.lease("w")
    queue = restart(queue, open_queue)  # the jobs were never completed

    again = queue.get(job.id)
    assert (again.status, again.attempts, again.worker, again.error.message) == (
        "queued",
        1,
        None,
        INTERRUPTED,
    )
    dead = queue.get(last_chance.id)
    assert (dead.status, dead.attempts, dead.error.message) == ("failed", 1, INTERRUPTED)
    assert queue.counts() == {**dict.fromkeys(JOB_STATUSES, 0), "queued": 1, "failed": 1}
    assert queue.lease("w").attempts == 2

    # Recovery was written at once: a second crash right away does not undo it.
    queue.close()
    queue = open_queue()
    assert queue.get(last_chance.id).status == "failed"
    assert queue.get(job.id).status == "queued"  # the un-flushed second lease is lost


def test_unflushed_changes_are_not_durable(open_queue):
    queue = open_queue()
    kept = submit(queue)
    queue.flush()
    lost = submit(queue, idempotency_key="k")
    queue = restart(queue, open_queue, flush=False)
    assert queue.get(kept.id).status == "queued"
    with pytest.raises(NotFound):
        queue.get(lost.id)
    assert queue.counts()["queued"] == 1
    assert submit(queue, idempotency_key="k").id != lost.id


# --------------------------------------------------------------------- commands


def test_cancel(open_queue):
    queue = open_queue()
    running, queued, other = submit(queue), submit(queue), submit(queue)
    assert queue.lease("w").id == running.id
    cancelled = queue.cancel(running.id)
    assert (cancelled.status, cancelled.worker) == ("cancelled", "w")  # the caller kills it there
    assert cancelled.finished_at is not None
    assert queue.complete(running.id, 1, "too late") is None
    assert queue.running() == []

    assert queue.cancel(queued.id).status == "cancelled"
    assert queue.lease("w").id == other.id  # the cancelled one is skipped
    with pytest.raises(Conflict):
        queue.cancel(queued.id)
    queue.flush()  # final jobs leave memory; the disk still knows them
    with pytest.raises(Conflict):
        queue.cancel(queued.id)
    with pytest.raises(NotFound):
        queue.cancel("JB-NOPE-22222222")
    assert queue.counts()["cancelled"] == 2


def test_retry(open_queue):
    queue = open_queue()
    job = submit(queue, max_attempts=1)
    queue.lease("w")
    queue.fail_attempt(job.id, 1, JobError(message="boom"))
    queue = restart(queue, open_queue)

    retried = queue.retry(job.id)
    assert (retried.status, retried.attempts, retried.error, retried.run_after) == (
        "queued",
        0,
        None,
        0,
    )
    with pytest.raises(Conflict):
        queue.retry(job.id)  # queued
    assert queue.lease("w").attempts == 1
    queue.complete(job.id, 1, "ok")
    queue.flush()
    with pytest.raises(Conflict):
        queue.retry(job.id)  # completed
    with pytest.raises(NotFound):
        queue.retry("JB-NOPE-22222222")

    cancelled = submit(queue)
    queue.cancel(cancelled.id)
    assert queue.retry(cancelled.id).status == "queued"
    queue = restart(queue, open_queue)
    assert queue.jobs(status="failed") == [] and queue.counts()["queued"] == 1


def test_pause_and_resume(open_queue):
    queue = open_queue()
    first, second = submit(queue), submit(queue)
    assert queue.pause(first.id).status == "paused"
    with pytest.raises(Conflict):
        queue.pause(first.id)
    with pytest.raises(Conflict):
        queue.resume(second.id)
    assert queue.ready_count() == 1
    queue = restart(queue, open_queue)
    assert queue.get(first.id).status == "paused"
    assert queue.lease("w").id == second.id
    assert queue.lease("w") is None
    with pytest.raises(Conflict):
        queue.pause(second.id)  # running
    assert queue.resume(first.id).status == "queued"
    assert queue.lease("w").id == first.id


# --------------------------------------------------------------------- views


def test_jobs_newest_first_by_status_with_limit(open_queue, clock):
    queue = open_queue()
    ids = []
    for n in range(6):
        clock.now = START_MS + n // 2  # pairs share a created_at: seq breaks the tie
        ids.append(submit(queue, payload=n).id)
    queue.flush()
    for job_id in ids[:3]:
        leased = queue.lease("w")
        assert leased.id == job_id
        queue.complete(job_id, 1, None)
    # Some of this is flushed, some only in memory: the listing must not care.
    queue.flush()
    queue.cancel(ids[4])
    newest = submit(queue, payload=6).id

    assert [j.id for j in queue.jobs()] == [newest, *reversed(ids)]
    assert [j.id for j in queue.jobs(limit=2)] == [newest, ids[5]]
    assert [j.id for j in queue.jobs("completed", limit=2)] == [ids[2], ids[1]]
    assert [j.id for j in queue.jobs("queued")] == [newest, ids[5], ids[3]]
    assert [j.id for j in queue.jobs("cancelled")] == [ids[4]]
    assert queue.jobs("running") == []
    with pytest.raises(Invalid):
        queue.jobs("done")
    with pytest.raises(Invalid):
        queue.jobs(limit=0)
    queue = restart(queue, open_queue)
    assert [j.id for j in queue.jobs("queued")] == [newest, ids[5], ids[3]]
    assert [j.status for j in queue.jobs()][:3] == ["queued", "queued", "cancelled"]


def test_jobs_by_rare_status_reads_only_that_status(open_queue):
    queue = open_queue(backoff_base_ms=0)
    for _ in range(300):
        submit(queue)
    rare = submit(queue, max_attempts=1)
    for _ in range(301):
        leased = queue.lease("w")
        if leased.id == rare.id:
            queue.fail_attempt(rare.id, 1, JobError(message="x"))
        else:
            queue.complete(leased.id, 1, None)
    queue.flush()

    decoded = 0
    real_decoder = queue._store._decoder

    class CountingDecoder:
        def decode(self, raw):
            nonlocal decoded
            decoded += 1
            return real_decoder.decode(raw)

    queue._store._decoder = CountingDecoder()
    assert [j.id for j in queue.jobs("failed")] == [rare.id]
    assert decoded == 1


def test_counts_cover_every_status(open_queue):
    queue = open_queue()
    assert queue.counts() == dict.fromkeys(JOB_STATUSES, 0)
    jobs = [submit(queue) for _ in range(4)]
    queue.lease("w")
    queue.pause(jobs[1].id)
    queue.cancel(jobs[2].id)
    expected = {**dict.fromkeys(JOB_STATUSES, 0), "running": 1, "paused": 1, "cancelled": 1}
    assert queue.counts() == {**expected, "queued": 1}
    queue = restart(queue, open_queue)  # the running one is recovered to queued
    assert queue.counts() == {**expected, "running": 0, "queued": 2}


def test_logs_are_bounded_to_their_tail(open_queue):
    queue = open_queue()
    job = submit(queue)
    queue.lease("w")
    logs = "".join(f"line {n}\n" for n in range(40_000))  # ~390 KB
    done = queue.complete(job.id, 1, None, logs=logs)
    assert len(done.logs.encode()) <= MAX_LOG_BYTES
    marker, rest = done.logs.split("\n", 1)
    dropped = int(marker.split()[1])
    assert "dropped" in marker and dropped == len(logs) - len(rest)
    assert logs.endswith(rest) and rest.endswith("line 39999\n")
    queue = restart(queue, open_queue)
    assert queue.get(job.id).logs == done.logs


def test_map_grows_when_full(open_queue):
    queue = open_queue(map_size=64 << 10)
    payload = "x" * 20_000
    ids = [submit(queue, payload=payload).id for _ in range(100)]  # ~2 MB into a 64 KB map
    assert queue.flush() == 100
    queue = restart(queue, open_queue)
    assert queue.counts()["queued"] == 100
    assert all(queue.get(job_id).payload == payload for job_id in ids)


# --------------------------------------------------------------------- model


@dataclass
class ModelJob:
    priority: int
    order: int
    max_attempts: int
    status: str = "queued"
    attempts: int = 0


class QueueAgainstModel(RuleBasedStateMachine):
    """Random operations against a dict of jobs: lease order and statuses must agree."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qntx-queue-")
        self.clock = Clock()
        self.queue = self._open()
        self.model: dict[str, ModelJob] = {}
        self.durable: dict[str, ModelJob] = {}  # the model as of the last flush
        self.order = 0

    def _open(self) -> JobQueue:
        return JobQueue(self.dir, sync=False, now_ms=self.clock, backoff_base_ms=0)

    def teardown(self):
        self.queue.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(priority=st.integers(-2, 2), max_attempts=st.integers(1, 3))
    def submit(self, priority, max_attempts):
        job = submit(self.queue, priority=priority, max_attempts=max_attempts)
        self.model[job.id] = ModelJob(priority, self.order, max_attempts)
        self.order += 1

    @rule()
    def lease(self):
        job = self.queue.lease("w")
        queued = [(-m.priority, m.order, i) for i, m in self.model.items() if m.status == "queued"]
        if not queued:
            assert job is None
            return
        expected = self.model[min(queued)[2]]
        assert job is not None and self.model[job.id] is expected
        expected.status, expected.attempts = "running", expected.attempts + 1
        assert job.attempts == expected.attempts

    @rule(data=st.data(), success=st.booleans())
    def finish(self, data, success):
        # In submit order, not id order: ids are random, and hypothesis must be able to
        # replay a draw against the same job.
        running = [i for i, m in self.model.items() if m.status == "running"]
        if not running:
            return
        job_id = data.draw(st.sampled_from(running))
        m = self.model[job_id]
        assert self.queue.complete(job_id, m.attempts - 1, "stale") is None
        if success:
            assert self.queue.complete(job_id, m.attempts, "ok").status == "completed"
            m.status = "completed"
        else:
            job = self.queue.fail_attempt(job_id, m.attempts, JobError(message="boom"))
            m.status = "queued" if m.attempts < m.max_attempts else "failed"
            assert job.status == m.status

    @rule(data=st.data())
    def cancel(self, data):
        if not self.model:
            return
        job_id = data.draw(st.sampled_from(list(self.model)))  # submit order, as above
        m = self.model[job_id]
        if m.status in ("completed", "failed", "cancelled"):
            with pytest.raises(Conflict):
                self.queue.cancel(job_id)
        else:
            assert self.queue.cancel(job_id).status == "cancelled"
            m.status = "cancelled"

    @rule()
    def flush(self):
        self.queue.flush()
        self.durable = copy.deepcopy(self.model)

    @rule(flush_first=st.booleans())
    def reopen(self, flush_first):
        if flush_first:
            self.flush()
        self.queue.close()
        self.model = copy.deepcopy(self.durable)  # un-flushed changes are gone, by contract
        for m in self.model.values():
            if m.status == "running":
                m.status = "queued" if m.attempts < m.max_attempts else "failed"
        self.queue = self._open()
        self.durable = copy.deepcopy(self.model)  # recovery is flushed on open

    @invariant()
    def agrees_with_model(self):
        expected = Counter(m.status for m in self.model.values())
        assert self.queue.counts() == {s: expected[s] for s in JOB_STATUSES}
        assert self.queue.ready_count() == expected["queued"]
        listed = {j.id: j.status for j in self.queue.jobs(limit=10_000)}
        assert listed == {i: m.status for i, m in self.model.items()}  # nothing lost or doubled
        for status in JOB_STATUSES:
            assert {j.id for j in self.queue.jobs(status, limit=10_000)} == {
                i for i, m in self.model.items() if m.status == status
            }


QueueAgainstModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_queue_against_model = QueueAgainstModel.TestCase


def test_give_back_requeues_without_counting_the_attempt(tmp_path):
    q = JobQueue(tmp_path / "q")
    job, _ = q.submit(Submit(handler="h", max_attempts=1))
    leased = q.lease("w1")
    assert leased.attempts == 1
    back = q.give_back(job.id, 1)
    assert back.status == "queued" and back.attempts == 0 and back.worker is None
    assert q.give_back(job.id, 1) is None  # not running any more
    again = q.lease("w2")
    assert again.id == job.id and again.attempts == 1
    q.close()


def test_fail_queued_fails_the_jobs_of_a_removed_handler(tmp_path):
    q = JobQueue(tmp_path / "q")
    a, _ = q.submit(Submit(handler="gone"))
    b, _ = q.submit(Submit(handler="gone"))
    c, _ = q.submit(Submit(handler="kept"))
    q.pause(b.id)
    failed = q.fail_queued("gone", "handler gone was deleted")
    assert {j.id for j in failed} == {a.id, b.id}
    assert all(j.status == "failed" and j.error.message == "handler gone was deleted" for j in failed)
    assert q.lease("w").id == c.id and q.lease("w") is None
    q.flush()
    q.close()
    reopened = JobQueue(tmp_path / "q")
    assert reopened.get(a.id).status == "failed"
    reopened.close()


@pytest.mark.parametrize(
    "field, value",
    [("timeout_s", 1e308), ("timeout_s", float("nan")), ("priority", 2**63), ("max_attempts", 10**9)],
)
def test_submit_rejects_values_out_of_range(tmp_path, field, value):
    q = JobQueue(tmp_path / "q")
    with pytest.raises(Invalid):
        q.submit(Submit(handler="h", **{field: value}))
    q.close()


def test_lease_passes_over_handlers_that_cannot_run_without_losing_their_order(tmp_path):
    q = JobQueue(tmp_path / "q")
    blocked = [q.submit(Submit(handler="python.busy", priority=5))[0] for _ in range(3)]
    low, _ = q.submit(Submit(handler="builtin.echo", priority=1))
    high, _ = q.submit(Submit(handler="builtin.echo", priority=2))
    asked: list[str] = []

    def accept(handler: str) -> bool:
        asked.append(handler)
        return handler != "python.busy"

    assert [q.lease("w", accept=accept).id for _ in range(2)] == [high.id, low.id]
    assert q.lease("w", accept=accept) is None
    assert asked.count("python.busy") <= 3  # asked per lease, not per waiting job
    # Once it can run again, its jobs come back in their own order.
    assert [q.lease("w").id for _ in range(3)] == [j.id for j in blocked]
    q.close()


def test_progress_of_an_earlier_attempt_is_ignored(tmp_path):
    q = JobQueue(tmp_path / "q", backoff_base_ms=0)
    job, _ = q.submit(Submit(handler="h"))
    q.lease("w")
    q.fail_attempt(job.id, 1, JobError(message="boom"))
    q.lease("w")
    assert q.progress(job.id, 5, 10, attempt=1) is None  # from the abandoned first attempt
    assert q.progress(job.id, 1, 10, attempt=2).progress.current == 1
    assert q.progress(job.id, 2, 10).progress.current == 2  # attempt unknown: the running one
    q.close()
