"""Who waits for which job, and what running jobs wrote: the result path.

Results, errors, logs, output and progress go only to whoever asked for that job,
over its own request connection (``WaitJob``); the events socket carries notices
(``JobNotice``). ``JobWatch`` keeps:

* the waiting requests, per job: *outcome* waiters (answered when the job is final)
  and *live* waiters (answered at the job's next output, progress or status), each
  with a deadline after which it is answered with the job as it is;
* the waiting ``EndedJobs`` requests (*batch* waiters): one request for many jobs,
  answered once at the end of the loop turn in which the first of them ended, with
  every one of them that ended in that turn: a client that follows many jobs costs
  a request per turn, not one per job;
* a *trail* per running job: its recent output (the last TRAIL_BYTES of it) and its
  latest progress, numbered, so a live waiter that comes back with the number it
  was given continues where it left off, and one that comes late starts with the
  output so far.

Everything is bounded: MAX_WAITERS requests in all and MAX_BATCHED_IDS job ids held
by waiting EndedJobs (past either, the request gets ``unavailable``), TRAIL_BYTES per
trail; a trail ends with its job.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from qntx.bus.actor import Request
from qntx.errors import Unavailable
from qntx.protocol import (
    FINAL_STATUSES,
    EndedJobsReply,
    Job,
    JobNotice,
    JobOutput,
    JobUpdate,
    Progress,
    WaitJob,
    job_bytes,
)

_encode = msgspec.msgpack.Encoder().encode
MAX_WAIT_MS = 60_000
MAX_WAITERS = 100_000
# Job ids held by waiting EndedJobs requests, all together (about 100 bytes each in the
# index): past it a waiting EndedJobs gets ``unavailable`` like a WaitJob past MAX_WAITERS.
MAX_BATCHED_IDS = 1_000_000
TRAIL_BYTES = 256 << 10  # the most output kept of one running job
TRAILS_BYTES = 64 << 20  # … and of every running job together: each gets its share
TRAIL_MIN_BYTES = 4 << 10
# The records of jobs that ended lately, encoded once when they ended: an outcome
# asked for after the end (a loop of submits, then of results) is answered from here
# instead of the job store.
ENDED_BYTES = 16 << 20
ENDED_ONE_BYTES = 1 << 20


@dataclass(slots=True)
class Waiter:
    request: Request
    job_id: str
    deadline: float  # monotonic s
    cursor: int  # -1: the outcome only
    done: bool = False


@dataclass(slots=True)
class BatchWaiter:
    """A waiting ``EndedJobs``: answered with ``found`` at the end of a loop turn."""

    request: Request
    deadline: float  # monotonic s
    registered: int  # how many ids it was indexed under
    found: list = field(default_factory=list)
    done: bool = False


@dataclass(slots=True)
class Trail:
    """A running job's recent output and progress; ``seq`` numbers every change."""

    output: deque[tuple[int, JobOutput]] = field(default_factory=deque)
    bytes: int = 0
    seq: int = 0
    progress: Progress | None = None
    progress_seq: int = 0

    def since(self, cursor: int) -> tuple[list[JobOutput], Progress | None]:
        output = [chunk for seq, chunk in self.output if seq > cursor]
        progress = self.progress if self.progress_seq > cursor else None
        return output, progress


def notice(job: Job) -> JobNotice:
    return JobNotice(
        id=job.id, handler=job.handler, status=job.status, lease=job.lease, attempts=job.attempts,
        max_attempts=job.max_attempts, priority=job.priority, created_at=job.created_at,
        started_at=job.started_at, finished_at=job.finished_at, run_after=job.run_after, worker=job.worker,
    )  # fmt: skip


class JobWatch:
    def __init__(
        self, lookup: Callable[[str], Job], strip: Callable[[Job], Job], live: Callable[[set[str]], set[str]] | None = None,
        later: Callable[[str], bool] | None = None,
    ):  # fmt: skip
        self._lookup = lookup  # a job's current record (raises NotFound)
        self._strip = strip  # the record without its payload
        self._live = live or (lambda ids: set())  # which of these ids are jobs in memory, not yet ended
        # Whether a job's end is told later by ``changed`` (a big result, once its commit
        # is on disk): who waits for it is answered then, never before, not even at its
        # deadline (so no answer encodes the result while the commit holds a copy).
        self._later = later or (lambda job_id: False)
        self._waiters: dict[str, list[Waiter]] = {}
        self._deadlines: list[tuple[float, int, Waiter | BatchWaiter]] = []
        # job id -> the batch waiter indexed under it (the latest; answered ones are
        # dropped lazily: when the job ends, or when the index is rebuilt)
        self._batches: dict[str, BatchWaiter] = {}
        self._batched = 0  # ids indexed by batch waiters not answered yet (about)
        self._ready: list[BatchWaiter] = []  # found something this turn
        self._order = itertools.count()
        self._count = 0
        self.trails: dict[str, Trail] = {}
        # job id -> (its final record, encoded once asked for; what it costs, about)
        self._ended: OrderedDict[str, tuple[Job | msgspec.Raw, int]] = OrderedDict()
        self._ended_bytes = 0

    @property
    def waiting(self) -> int:
        return self._count

    def wait(self, message: WaitJob, request: Request, now: float) -> JobUpdate | None:
        """Answer at once if there is something to say, else hold the request."""
        cursor = message.output if isinstance(message.output, int) and message.output >= 0 else -1
        if cursor < 0:
            entry = self._ended.get(message.id)
            if entry is not None:
                ended, size = entry
                if not isinstance(ended, msgspec.Raw):  # encoded once, when first asked for
                    ended = msgspec.Raw(_encode(ended))
                    self._ended[message.id] = (ended, size)
                return JobUpdate(job=ended)  # (a Raw in place of the Job: the same bytes)
        job = self._lookup(message.id)
        timeout_ms = message.timeout_ms if isinstance(message.timeout_ms, int) else 0
        timeout_s = min(max(timeout_ms, 0), MAX_WAIT_MS) / 1000
        if not self._later(job.id):
            update = self._update_if_news(job, cursor)
            if update is not None or timeout_s == 0:
                return update or self._update(job, cursor)
        if self._count >= MAX_WAITERS:
            raise Unavailable(f"the server holds {MAX_WAITERS} waiting requests already; ask again later")
        waiter = Waiter(request, job.id, now + timeout_s, cursor)
        self._waiters.setdefault(job.id, []).append(waiter)
        self._hold(waiter)
        return None

    def _hold(self, waiter: Waiter | BatchWaiter) -> None:
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._order), waiter))
        self._count += 1
        if len(self._deadlines) > 2 * self._count + 1024:
            # Answered waiters leave the heap lazily, at their deadline: past twice the
            # live ones, it is rebuilt, so it stays bounded by MAX_WAITERS, not by the rate.
            self._deadlines = [entry for entry in self._deadlines if not entry[2].done]
            heapq.heapify(self._deadlines)

    def ended(self, ids: list[str] | set[str]) -> list[Job | msgspec.Raw]:
        """The final records of those of ``ids`` that ended lately (or are final in
        memory), encoded once; the rest are left out, without reading the store."""
        found: list[Job | msgspec.Raw] = []
        for job_id in self._ended.keys() & (ids if isinstance(ids, set) else set(ids)):
            ended, size = self._ended[job_id]
            if not isinstance(ended, msgspec.Raw):
                ended = msgspec.Raw(_encode(ended))
                self._ended[job_id] = (ended, size)
            found.append(ended)
        return found

    def ended_or_wait(self, ids: list[str], wait_ms: int, request: Request, now: float) -> EndedJobsReply | None:
        """``EndedJobs``: those of ``ids`` that ended lately; with ``wait_ms``, if
        none did, hold the request until one does (answered at the turn's end by
        ``flush``) or the time passes. Ids that are neither running nor lately ended
        make it answer at once, named in ``gone``."""
        asked = set(ids)
        found = self.ended(asked)
        if found or wait_ms <= 0:
            return EndedJobsReply(jobs=found)
        live = self._live(asked)
        if len(live) < len(asked):
            return EndedJobsReply(gone=[i for i in ids if i not in live])
        if self._count >= MAX_WAITERS or self._batched + len(live) > MAX_BATCHED_IDS:
            raise Unavailable("the server holds as many waiting requests as it may already; ask again later")
        waiter = BatchWaiter(request, now + min(wait_ms, MAX_WAIT_MS) / 1000, len(live))
        self._batches.update(dict.fromkeys(live, waiter))
        self._batched += len(live)
        if len(self._batches) > 2 * self._batched + 4096:  # mostly answered ones: rebuild
            self._batches = {i: w for i, w in self._batches.items() if not w.done}
        self._hold(waiter)
        return None

    def flush(self) -> None:
        """End of a loop turn: answer the batch waiters whose jobs ended in it."""
        ready, self._ready = self._ready, []
        for waiter in ready:
            self._finish(waiter)
            waiter.request.reply(EndedJobsReply(jobs=waiter.found))

    def _update_if_news(self, job: Job, cursor: int) -> JobUpdate | None:
        if job.status in FINAL_STATUSES:
            return self._update(job, cursor)
        trail = self.trails.get(job.id)
        if cursor < 0 or trail is None:
            return None
        if cursor > trail.seq:  # numbered by an earlier trail (a server restart): from the start
            return self._update(job, 0)
        return self._update(job, cursor) if trail.seq > cursor else None

    def _update(self, job: Job, cursor: int) -> JobUpdate:
        trail = self.trails.get(job.id)
        if cursor < 0 or trail is None:
            progress = job.progress if cursor >= 0 else None
            return JobUpdate(job=self._strip(job), progress=progress, next=trail.seq if trail else 0)
        output, progress = trail.since(cursor)
        if job.status in FINAL_STATUSES and job.progress is not None:
            progress = job.progress  # the last progress the run reported comes with its end
        return JobUpdate(job=self._strip(job), output=output, progress=progress, next=trail.seq)

    # ------------------------------------------------------------------ what happens

    def changed(self, job: Job) -> None:
        """A job's state changed: wake its live waiters, and on its end every waiter."""
        final = job.status in FINAL_STATUSES
        trail = self.trails.get(job.id)
        if trail is not None and not final:
            trail.seq += 1  # a status change is news to a live waiter
        self._forget_ended(job.id)
        self._wake(job, final=final)
        if final:
            self.trails.pop(job.id, None)
            self._remember_ended(job)
            if self._batches:
                batch = self._batches.pop(job.id, None)
                if batch is not None and not batch.done:
                    if not batch.found:
                        self._ready.append(batch)
                    batch.found.append(job)

    def _remember_ended(self, job: Job) -> None:
        """``job`` as announced (without its payload); encoded only if someone asks.
        A record over ENDED_ONE_BYTES is not kept: who asks later reads the store."""
        size = job_bytes(job)
        if size > ENDED_ONE_BYTES:
            return
        self._ended[job.id] = (job, size)
        self._ended_bytes += size
        while self._ended_bytes > ENDED_BYTES:
            _, (_, dropped) = self._ended.popitem(last=False)
            self._ended_bytes -= dropped

    def _forget_ended(self, job_id: str) -> None:
        dropped = self._ended.pop(job_id, None)
        if dropped is not None:
            self._ended_bytes -= dropped[1]

    def progressed(self, job: Job, progress: Progress) -> None:
        trail = self.trails.setdefault(job.id, Trail())
        trail.seq += 1
        trail.progress, trail.progress_seq = progress, trail.seq
        self._wake(job, final=False)

    def wrote(self, job: Job, chunk: JobOutput) -> None:
        trail = self.trails.setdefault(job.id, Trail())
        trail.seq += 1
        trail.output.append((trail.seq, chunk))
        trail.bytes += len(chunk.text)
        cap = min(TRAIL_BYTES, max(TRAIL_MIN_BYTES, TRAILS_BYTES // len(self.trails)))
        while trail.bytes > cap and len(trail.output) > 1:
            _, dropped = trail.output.popleft()
            trail.bytes -= len(dropped.text)
        self._wake(job, final=False)

    def _wake(self, job: Job, *, final: bool) -> None:
        waiters = self._waiters.get(job.id)
        if not waiters:
            return
        keep = []
        for waiter in waiters:
            if waiter.done:
                continue
            if final or waiter.cursor >= 0:
                self._answer(waiter, self._update(job, waiter.cursor))
            else:
                keep.append(waiter)
        if keep:
            self._waiters[job.id] = keep
        else:
            del self._waiters[job.id]

    def expire(self, now: float) -> None:
        """Answer the waiters whose deadline passed with the job as it is."""
        later = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self._deadlines)
            if waiter.done:
                continue
            if type(waiter) is BatchWaiter:
                if not waiter.found:  # (one that found something is answered at the turn's end)
                    self._finish(waiter)
                    waiter.request.reply(EndedJobsReply())
                continue
            if self._later(waiter.job_id):  # answered by ``changed`` in a moment
                later.append(waiter)  # (or, should the job change again first, at the next check)
                continue
            try:
                job = self._lookup(waiter.job_id)
            except Exception as exc:  # pruned meanwhile: the asker learns it
                self._finish(waiter)
                waiter.request.fail(exc)
                continue
            self._answer(waiter, self._update(job, waiter.cursor))
            waiters = self._waiters.get(waiter.job_id)
            if waiters is not None:
                waiters = [w for w in waiters if not w.done]
                if waiters:
                    self._waiters[waiter.job_id] = waiters
                else:
                    del self._waiters[waiter.job_id]
        for waiter in later:
            heapq.heappush(self._deadlines, (now, next(self._order), waiter))

    def _answer(self, waiter: Waiter, update: JobUpdate) -> None:
        self._finish(waiter)
        waiter.request.reply(update)

    def _finish(self, waiter: Waiter | BatchWaiter) -> None:
        waiter.done = True
        self._count -= 1
        if type(waiter) is BatchWaiter:
            self._batched -= waiter.registered
