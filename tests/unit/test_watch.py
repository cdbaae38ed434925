"""The result path's bookkeeping: who waits for which job (``JobWatch``), the trail of
a running job's output, and the order ``follow`` yields what an answer brings."""

from __future__ import annotations

import msgspec
import pytest

from qntx.errors import NotFound, Unavailable
from qntx.follow import events_of
from qntx.protocol import Job, JobChanged, JobOutput, JobProgressed, JobUpdate, Progress, WaitJob
from qntx.pulse import watch as watch_module
from qntx.pulse.watch import JobWatch

pytestmark = pytest.mark.timeout(30)


class Asker:
    """Stands in for one request's connection: what it was answered."""

    def __init__(self):
        self.replies: list = []
        self.errors: list = []

    def reply(self, message) -> None:
        self.replies.append(message)

    def fail(self, error) -> None:
        self.errors.append(error)


@pytest.fixture
def jobs():
    return {"a": Job(id="a", handler="h", status="running", payload=b"\x01", lease=5, attempts=1)}


@pytest.fixture
def watch(jobs):
    def lookup(job_id):
        if job_id not in jobs:
            raise NotFound(f"no job {job_id}")
        return jobs[job_id]

    return JobWatch(lookup, lambda job: Job(**{**{f: getattr(job, f) for f in job.__struct_fields__}, "payload": b"\xc0"}))


def end(jobs, watch, status="completed"):
    jobs["a"] = Job(id="a", handler="h", status=status, result=b"\x07", lease=5, attempts=1, progress=Progress(current=2, total=2))
    watch.changed(jobs["a"])


def test_an_outcome_waiter_is_answered_once_at_the_end_without_the_payload(jobs, watch):
    asker = Asker()
    assert watch.wait(WaitJob(id="a"), asker, now=0) is None and watch.waiting == 1
    watch.wrote(jobs["a"], JobOutput(job_id="a", stream="stdout", text="x", lease=5))  # not for an outcome waiter
    watch.progressed(jobs["a"], Progress(current=1, total=2))
    assert asker.replies == []
    end(jobs, watch)
    assert len(asker.replies) == 1 and watch.waiting == 0
    assert asker.replies[0].job.status == "completed" and asker.replies[0].job.payload == b"\xc0"
    end(jobs, watch)  # announced again: nobody waits any more
    assert len(asker.replies) == 1


def wire(update: JobUpdate) -> JobUpdate:
    """The answer as the asker decodes it (a final record may be sent as encoded bytes)."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(update), type=JobUpdate)


def test_a_final_job_is_answered_at_once(jobs, watch):
    end(jobs, watch, "failed")
    update = wire(watch.wait(WaitJob(id="a"), Asker(), now=0))
    assert update.job.status == "failed" and update.job.lease == 5 and watch.waiting == 0
    jobs["a"] = Job(id="a", handler="h", status="queued", attempts=0)  # retried: the ended record is stale
    watch.changed(jobs["a"])
    assert watch.wait(WaitJob(id="a", timeout_ms=0), Asker(), now=0).job.status == "queued"


def test_live_waiters_get_output_from_their_cursor_and_late_ones_the_output_so_far(jobs, watch):
    watch.wrote(jobs["a"], JobOutput(job_id="a", stream="stdout", text="one", lease=5))
    late = watch.wait(WaitJob(id="a", output=0), Asker(), now=0)
    assert [c.text for c in late.output] == ["one"]
    asker = Asker()
    assert watch.wait(WaitJob(id="a", output=late.next), asker, now=0) is None
    watch.wrote(jobs["a"], JobOutput(job_id="a", stream="stderr", text="two", lease=5))
    (update,) = asker.replies
    assert [(c.stream, c.text) for c in update.output] == [("stderr", "two")] and update.next > late.next
    again = Asker()
    watch.wait(WaitJob(id="a", output=update.next), again, now=0)
    end(jobs, watch)
    (final,) = again.replies
    assert final.job.status == "completed" and final.progress == Progress(current=2, total=2)
    assert "a" not in watch.trails  # the trail ends with its job


def test_a_cursor_from_an_earlier_trail_starts_from_the_beginning(jobs, watch):
    watch.wrote(jobs["a"], JobOutput(job_id="a", stream="stdout", text="after a restart", lease=5))
    update = watch.wait(WaitJob(id="a", output=99), Asker(), now=0)
    assert [c.text for c in update.output] == ["after a restart"]


def test_deadlines_answer_with_the_job_as_it_is(jobs, watch):
    asker = Asker()
    watch.wait(WaitJob(id="a", timeout_ms=500), asker, now=10.0)
    watch.expire(10.4)
    assert asker.replies == []
    watch.expire(10.5)
    assert asker.replies[0].job.status == "running" and watch.waiting == 0
    assert watch.wait(WaitJob(id="a", timeout_ms=0), Asker(), now=11).job.status == "running"


def test_a_job_pruned_while_waited_for_is_an_error_to_the_asker(jobs, watch):
    asker = Asker()
    watch.wait(WaitJob(id="a", timeout_ms=100), asker, now=0)
    del jobs["a"]
    watch.expire(1)
    assert isinstance(asker.errors[0], NotFound) and watch.waiting == 0
    with pytest.raises(NotFound):
        watch.wait(WaitJob(id="a"), Asker(), now=0)


def test_waiters_and_trails_are_bounded(jobs, watch, monkeypatch):
    monkeypatch.setattr(watch_module, "MAX_WAITERS", 3)
    for _ in range(3):
        watch.wait(WaitJob(id="a"), Asker(), now=0)
    with pytest.raises(Unavailable):
        watch.wait(WaitJob(id="a"), Asker(), now=0)
    monkeypatch.setattr(watch_module, "TRAIL_BYTES", 10)
    for n in range(20):
        watch.wrote(jobs["a"], JobOutput(job_id="a", stream="stdout", text=f"{n:04d}", lease=5))
    trail = watch.trails["a"]
    assert trail.bytes <= 10 and [c.text for _, c in trail.output][-1] == "0019"


def test_follow_yields_a_start_before_its_output_and_the_end_after_it():
    running = Job(id="a", handler="h", status="running", attempts=2, lease=9)
    update = JobUpdate(job=running, output=[JobOutput(job_id="a", stream="stdout", text="hi")], next=1)
    kinds = [type(e).__name__ for e in events_of(update, Job(id="a", handler="h", status="queued", attempts=1))]
    assert kinds == ["JobChanged", "JobOutput"]
    done = Job(id="a", handler="h", status="completed", attempts=2, lease=9)
    update = JobUpdate(job=done, output=[JobOutput(job_id="a", stream="stdout", text="bye")], progress=Progress(current=1, total=1))
    events = events_of(update, running)
    assert [type(e) for e in events] == [JobOutput, JobProgressed, JobChanged] and events[-1].job.status == "completed"
    assert events_of(JobUpdate(job=running), running) == []  # nothing new


def test_ended_jobs_are_told_in_one_answer_without_reading_the_store(jobs, watch):
    lookups = []
    watch._lookup = lambda job_id: lookups.append(job_id) or jobs[job_id]
    assert watch.ended(["a", "nope"]) == []  # running, and unknown: left out
    end(jobs, watch)
    (record,) = watch.ended(["nope", "a", 7])
    assert msgspec.msgpack.decode(record, type=Job).status == "completed" and lookups == []


def test_the_deadline_heap_stays_bounded_by_the_live_waiters(jobs, watch):
    """Answered waiters leave the heap lazily; it is rebuilt before it outgrows the
    live ones, so a steady rate of answered waits costs no memory."""
    for _ in range(20_000):
        watch.wait(WaitJob(id="a", timeout_ms=60_000), Asker(), now=0)
        end(jobs, watch)  # answered at once
        jobs["a"] = Job(id="a", handler="h", status="running", lease=5, attempts=1)
        watch.changed(jobs["a"])
    assert watch.waiting == 0 and len(watch._deadlines) <= 1024 + 2


def batch_watch(live_ids):
    """A watch whose memory holds the jobs ``live_ids`` (running)."""
    jobs = {i: Job(id=i, handler="h", status="running", lease=1, attempts=1) for i in live_ids}
    watch = JobWatch(lambda i: jobs[i], lambda job: job, lambda ids: jobs.keys() & ids)
    return jobs, watch


def finish(jobs, watch, job_id):
    jobs[job_id] = Job(id=job_id, handler="h", status="completed", lease=1, attempts=1)
    watch.changed(jobs[job_id])


def test_a_waiting_ended_jobs_is_answered_once_per_turn_with_all_that_ended_in_it():
    jobs, watch = batch_watch(["a", "b", "c"])
    asker = Asker()
    assert watch.ended_or_wait(["a", "b", "c"], 5_000, asker, now=0) is None and watch.waiting == 1
    finish(jobs, watch, "b")
    finish(jobs, watch, "a")
    assert asker.replies == []  # not before the turn ends
    watch.flush()
    assert [sorted(j.id for j in r.jobs) for r in asker.replies] == [["a", "b"]] and watch.waiting == 0
    finish(jobs, watch, "c")  # answered already: nothing more to it
    watch.flush()
    assert len(asker.replies) == 1
    # asked again for what is left: answered at once from what ended lately
    again = watch.ended_or_wait(["c"], 5_000, Asker(), now=1)
    assert [msgspec.msgpack.decode(j, type=Job).id for j in again.jobs] == ["c"]


def test_a_waiting_ended_jobs_answers_empty_at_its_deadline_and_at_once_for_gone_ids():
    jobs, watch = batch_watch(["a"])
    asker = Asker()
    assert watch.ended_or_wait(["a"], 1_000, asker, now=0) is None
    watch.expire(0.5)
    assert asker.replies == []
    watch.expire(1.0)
    assert len(asker.replies) == 1 and asker.replies[0].jobs == [] and watch.waiting == 0
    gone = watch.ended_or_wait(["a", "nosuch"], 1_000, Asker(), now=2)
    assert gone.gone == ["nosuch"] and gone.jobs == []
    assert watch.ended_or_wait(["a"], 0, Asker(), now=2).jobs == []  # no wait: at once


def test_answered_batches_leave_the_index_bounded():
    ids = [[f"j{turn}.{n}" for n in range(500)] for turn in range(100)]
    jobs, watch = batch_watch([i for turn in ids for i in turn])
    for turn, batch in enumerate(ids):  # each turn a batch of 500 jobs, answered by one's end
        assert watch.ended_or_wait(batch, 5_000, Asker(), now=turn) is None
        finish(jobs, watch, batch[0])
        watch.flush()
    assert watch.waiting == 0
    assert len(watch._batches) <= 4096 + 2 * 500  # not the 49,900 that stayed unanswered


def test_waiting_ended_jobs_are_bounded_by_the_ids_they_hold(monkeypatch):
    monkeypatch.setattr(watch_module, "MAX_BATCHED_IDS", 1_000)
    ids = [f"j{n}" for n in range(1_500)]
    _, watch = batch_watch(ids)
    assert watch.ended_or_wait(ids[:800], 5_000, Asker(), now=0) is None
    with pytest.raises(Unavailable):
        watch.ended_or_wait(ids[800:], 5_000, Asker(), now=0)  # 1,500 ids past the 1,000
    assert watch.ended_or_wait(ids[800:1_000], 5_000, Asker(), now=0) is None  # 1,000: room yet


def test_an_end_told_later_is_answered_only_when_told_even_past_the_deadline(jobs):
    """A big result is told once its commit is on disk: a WaitJob asked meanwhile, or
    whose deadline passes meanwhile, gets nothing before (no copy of the result is
    encoded beside the commit's), then the end."""
    later = set()
    watch = JobWatch(lambda job_id: jobs[job_id], lambda job: job, later=lambda job_id: job_id in later)
    early = Asker()
    assert watch.wait(WaitJob(id="a", timeout_ms=50), early, now=0) is None
    jobs["a"] = Job(id="a", handler="h", status="completed", result=b"\x07", lease=5, attempts=1)  # ended, not told
    later.add("a")
    meanwhile = Asker()
    assert watch.wait(WaitJob(id="a", timeout_ms=0), meanwhile, now=0.01) is None  # held, though it asks for now
    watch.expire(now=1.0)
    watch.expire(now=2.0)
    assert early.replies == meanwhile.replies == [] and watch.waiting == 2
    later.discard("a")
    watch.changed(jobs["a"])  # told: both get the end
    assert [r.job.status for r in early.replies + meanwhile.replies] == ["completed", "completed"]
    assert watch.waiting == 0
