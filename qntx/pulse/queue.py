"""Pulse's job queue: the durable state machine of every job (SPEC §4.1, §4.2).

Owns job state, nothing else: no sockets, no dispatching, no on-disk layout (that is
``qntx.pulse.jobstore``) and no clock of its own (``now_ms`` is injected so tests
control time). The Pulse server wraps it: in one loop turn it calls the mutating
methods as messages arrive, then ``flush()`` once, and only then sends replies and
dispatches. So a job is accepted only once it is committed, and a busy turn costs one
synced transaction (group commit).

Live state is in memory: every non-final job (plus final ones until they are flushed),
a ready heap keyed by (-priority, seq), a delayed heap keyed by (run_after, seq) and a
lease heap keyed by deadline. Heaps delete lazily: an entry counts only while its token
(or deadline) is still the job's current one. Final jobs are read back from disk.

``seq`` is given once per job at submit: it makes lease order FIFO within a priority
(across restarts, and a retried job keeps its place) and breaks created_at ties.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from qntx.asid import new_asid
from qntx.errors import Conflict, Invalid, NotFound
from qntx.protocol import (
    FINAL_STATUSES,
    JOB_STATUSES,
    PLUGIN_DEPTH,
    Job,
    JobError,
    Progress,
    Submit,
)
from qntx.pulse.jobstore import MAX_KEY_BYTES, JobStore, StoredJob

LEASE_GRACE_MS = 5_000  # a worker gets this long past timeout_s to report before we give up
MAX_LOG_BYTES = 64 << 10
INTERRUPTED = "interrupted (the actor running it stopped)"
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: past that a job is a service, not a job
MAX_PRIORITY = 2**62
MAX_ATTEMPTS = 1000
LIVE_STATUSES = ("queued", "running", "paused")


def _real_now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bound_logs(text: str, limit: int = MAX_LOG_BYTES) -> str:
    """``text`` if it fits in ``limit`` bytes, else its tail behind a marker line."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    tail = data[-(limit - 100) :].decode("utf-8", "ignore")  # 100 bytes leave room for the marker
    dropped = len(data) - len(tail.encode())
    return f"[... {dropped} bytes of earlier output dropped ...]\n{tail}"


def lease_ms(timeout_s: float) -> int:
    """How long a worker may hold an attempt before it counts as lost: a plugin may
    hold the job behind others that each run to their timeout (``PLUGIN_DEPTH``),
    plus a grace for reporting back."""
    return int(timeout_s * 1000 * PLUGIN_DEPTH) + LEASE_GRACE_MS


def _check_submit(spec: Submit) -> None:
    if not isinstance(spec, Submit):
        raise Invalid(f"expected a Submit, got {type(spec).__name__}")
    if not isinstance(spec.handler, str) or not spec.handler.strip():
        raise Invalid(f"handler must be a non-empty string, got {spec.handler!r}")
    if not _is_int(spec.priority) or abs(spec.priority) > MAX_PRIORITY:
        raise Invalid(f"priority must be an integer within ±{MAX_PRIORITY}, got {spec.priority!r}")
    if not _is_int(spec.max_attempts) or not 1 <= spec.max_attempts <= MAX_ATTEMPTS:
        raise Invalid(f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS}, got {spec.max_attempts!r}")
    timeout = spec.timeout_s
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not (0 < timeout <= MAX_TIMEOUT_S and math.isfinite(timeout))
    ):
        raise Invalid(f"timeout_s must be a number of seconds > 0 and <= {MAX_TIMEOUT_S}, got {timeout!r}")
    key = spec.idempotency_key
    if key is not None and (
        not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES
    ):
        raise Invalid(
            f"idempotency_key must be a non-empty string of at most {MAX_KEY_BYTES} bytes"
        )
    if spec.parent_id is not None and not isinstance(spec.parent_id, str):
        raise Invalid(f"parent_id must be a string, got {spec.parent_id!r}")


class JobQueue:
    """Every job of one Pulse home: in memory for speed, in LMDB once ``flush()`` says so."""

    def __init__(
        self,
        path: str | Path,
        *,
        map_size: int = 256 << 20,
        sync: bool = True,
        now_ms: Callable[[], int] | None = None,
        backoff_base_ms: int = 500,
        backoff_max_ms: int = 60_000,
    ):
        self.path = Path(path)
        self._now = now_ms or _real_now_ms
        self._backoff_base_ms = backoff_base_ms
        self._backoff_max_ms = backoff_max_ms
        self._store = JobStore(self.path, map_size=map_size, sync=sync)

        self._jobs: dict[str, Job] = {}  # every non-final job, and final ones until flushed
        self._seq: dict[str, int] = {}  # seq of each job in _jobs
        self._stored: dict[str, str] = {}  # status on disk of each job in _jobs (absent: new)
        self._dirty: dict[str, None] = {}  # ids changed since the last flush (ordered set)
        self._new_keys: dict[str, str] = {}  # idempotency key -> id, not yet flushed
        self._counts = dict.fromkeys(JOB_STATUSES, 0)
        self._next_seq = 0

        self._token = itertools.count()
        self._tokens: dict[str, int] = {}  # queued id -> token of its one live heap entry
        # One ready heap per handler, so jobs whose handler cannot run now (its
        # plugin is down or at capacity) cost nothing when leasing the others.
        self._ready: dict[str, list[tuple[int, int, int, str]]] = {}  # handler -> (-priority, seq, token, id)
        self._ready_ids: set[str] = set()
        self._delayed: list[tuple[int, int, int, str]] = []  # (run_after, seq, token, id)
        self._deadlines: dict[str, int] = {}  # running id -> lease deadline (ms)
        self._leases: list[tuple[int, str]] = []  # (deadline, id)
        self._by_worker: dict[str, set[str]] = {}
        self._load()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> None:
        """Bring every live job into memory and recover the ones a crash left running."""
        saved = self._store.load(LIVE_STATUSES)
        self._next_seq = saved.next_seq
        self._counts.update(saved.counts)
        now = self._now()
        for stored in saved.jobs:
            job = stored.job
            self._adopt(stored)
            if job.status == "queued":
                self._enqueue(job, now)
            elif job.status == "running":
                # Whoever ran it is gone with the old process; the attempt stays counted.
                self._fail(job, JobError(message=INTERRUPTED), backoff=False)
        self.flush()

    def _adopt(self, stored: StoredJob) -> None:
        self._jobs[stored.job.id] = stored.job
        self._seq[stored.job.id] = stored.seq
        self._stored[stored.job.id] = stored.job.status

    # ------------------------------------------------------------------ persistence

    def flush(self) -> int:
        """Write every job changed since the last flush in one synced transaction."""
        if not self._dirty:
            return 0
        rows = [
            (StoredJob(seq=self._seq[i], job=self._jobs[i]), self._stored.get(i))
            for i in self._dirty
        ]
        self._store.save(rows, self._next_seq, self._counts)
        for stored, _ in rows:
            job = stored.job
            if job.status in FINAL_STATUSES:  # durable now: memory keeps only live jobs
                del self._jobs[job.id], self._seq[job.id]
                self._stored.pop(job.id, None)
            else:
                self._stored[job.id] = job.status
        self._dirty.clear()
        self._new_keys.clear()
        return len(rows)

    def _find(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            stored = self._store.get(job_id)
            if stored is None:
                raise NotFound(f"no job {job_id}")
            job = stored.job
        return job

    # ------------------------------------------------------------------ state changes

    def _set_status(self, job: Job, status: str) -> None:
        self._counts[job.status] -= 1
        self._counts[status] += 1
        job.status = status
        self._dirty[job.id] = None

    def _enqueue(self, job: Job, now: int) -> None:
        token = next(self._token)
        self._tokens[job.id] = token
        if job.run_after <= now:
            heapq.heappush(self._ready.setdefault(job.handler, []), (-job.priority, self._seq[job.id], token, job.id))
            self._ready_ids.add(job.id)
        else:
            heapq.heappush(self._delayed, (job.run_after, self._seq[job.id], token, job.id))

    def _dequeue(self, job_id: str) -> None:
        del self._tokens[job_id]
        self._ready_ids.discard(job_id)
        entries = sum(len(heap) for heap in self._ready.values()) + len(self._delayed)
        if entries > 2 * len(self._tokens) + 64:
            # Mostly dead entries (cancelled or paused jobs): rebuild from the live ones.
            self._ready, self._delayed, tokens = {}, [], self._tokens
            self._tokens, now = {}, self._now()
            self._ready_ids.clear()
            for queued_id in tokens:
                self._enqueue(self._jobs[queued_id], now)

    def _promote(self, now: int) -> None:
        """Move delayed jobs whose backoff has passed onto the ready heap."""
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, token, job_id = heapq.heappop(self._delayed)
            if self._tokens.get(job_id) == token:
                job = self._jobs[job_id]
                heapq.heappush(self._ready.setdefault(job.handler, []), (-job.priority, seq, token, job_id))
                self._ready_ids.add(job_id)

    def _end_lease(self, job: Job) -> None:
        self._deadlines.pop(job.id, None)
        running = self._by_worker.get(job.worker or "")
        if running is not None:
            running.discard(job.id)
            if not running:
                del self._by_worker[job.worker]
        if len(self._leases) > 2 * len(self._deadlines) + 64:  # finished jobs leave dead entries
            self._leases = [(deadline, i) for i, deadline in self._deadlines.items()]
            heapq.heapify(self._leases)

    def _fail(self, job: Job, error: JobError, *, backoff: bool = True) -> None:
        """End a running attempt that did not succeed: queue it again or give up."""
        self._end_lease(job)
        job.error = error
        now = self._now()
        if job.attempts < job.max_attempts:
            exponent = min(max(job.attempts - 1, 0), 30)
            delay = min(self._backoff_base_ms * 2**exponent, self._backoff_max_ms)
            job.run_after = now + (delay if backoff else 0)
            job.worker = None
            self._set_status(job, "queued")
            self._enqueue(job, now)
        else:
            job.finished_at = now
            self._set_status(job, "failed")  # kept: the dead-letter view lists it

    def _running_attempt(self, job_id: str, attempt: int) -> Job | None:
        # A result for an attempt that was already re-queued (lease expired, worker
        # declared dead) must not overwrite the newer attempt.
        job = self._jobs.get(job_id)
        if job is None or job.status != "running" or job.attempts != attempt:
            return None
        return job

    # ------------------------------------------------------------------ requests

    def submit(self, spec: Submit) -> tuple[Job, bool]:
        """Accept a job (durable after the next flush); ``created`` is False for a known key."""
        _check_submit(spec)
        key = spec.idempotency_key
        if key is not None:
            existing = self._new_keys.get(key) or self._store.job_id_for_key(key)
            if existing is not None:
                return msgspec.structs.replace(self._find(existing)), False
        job_id = new_asid(spec.handler, "_", "_", prefix="JB")
        while job_id in self._jobs or self._store.get(job_id) is not None:
            job_id = new_asid(spec.handler, "_", "_", prefix="JB")
        job = Job(
            id=job_id, handler=spec.handler, payload=spec.payload, priority=spec.priority,
            max_attempts=spec.max_attempts, timeout_s=spec.timeout_s, created_at=self._now(),
            parent_id=spec.parent_id, idempotency_key=key,
        )  # fmt: skip
        self._jobs[job_id] = job
        self._seq[job_id] = self._next_seq
        self._next_seq += 1
        self._counts["queued"] += 1
        self._dirty[job_id] = None
        if key is not None:
            self._new_keys[key] = job_id
        self._enqueue(job, job.created_at)
        return msgspec.structs.replace(job), True

    def lease(self, worker: str, *, accept: Callable[[str], bool] | None = None) -> Job | None:
        """The next ready job (highest priority, then oldest), now running on ``worker``.

        ``accept(handler)`` lets the caller pass over jobs nobody can run yet (their
        plugin is not up): those stay queued in their place for a later lease.
        """
        now = self._now()
        self._promote(now)
        best: tuple[int, int, int, str] | None = None
        best_heap: list | None = None
        for handler, heap in list(self._ready.items()):
            while heap and self._tokens.get(heap[0][3]) != heap[0][2]:
                heapq.heappop(heap)  # a job that left the queue meanwhile
            if not heap:
                del self._ready[handler]
                continue
            if (best is None or heap[0] < best) and (accept is None or accept(handler)):
                best, best_heap = heap[0], heap
        if best is None:
            return None
        heapq.heappop(best_heap)
        job_id = best[3]
        job = self._jobs[job_id]
        self._dequeue(job_id)
        job.attempts += 1
        job.started_at, job.finished_at = now, None
        job.worker, job.progress = worker, None
        self._set_status(job, "running")
        deadline = now + lease_ms(job.timeout_s)
        self._deadlines[job_id] = deadline
        heapq.heappush(self._leases, (deadline, job_id))
        self._by_worker.setdefault(worker, set()).add(job_id)
        return msgspec.structs.replace(job)

    def complete(self, job_id: str, attempt: int, result: Any, logs: str = "") -> Job | None:
        job = self._running_attempt(job_id, attempt)
        if job is None:
            return None
        self._end_lease(job)
        job.result, job.error, job.logs = result, None, bound_logs(logs)
        job.finished_at = self._now()
        self._set_status(job, "completed")
        return msgspec.structs.replace(job)

    def fail_attempt(
        self, job_id: str, attempt: int, error: JobError | None, logs: str = ""
    ) -> Job | None:
        job = self._running_attempt(job_id, attempt)
        if job is None:
            return None
        job.logs = bound_logs(logs)  # the last attempt's output, next to its error
        self._fail(job, error or JobError(message="the attempt failed without an error"))
        return msgspec.structs.replace(job)

    def give_back(self, job_id: str, attempt: int) -> Job | None:
        """A worker stopping gracefully returns an unfinished attempt: queued again
        at once, and the attempt does not count (it was interrupted, not failed)."""
        job = self._running_attempt(job_id, attempt)
        if job is None:
            return None
        self._end_lease(job)
        job.attempts -= 1
        job.worker = None
        job.run_after = 0
        now = self._now()
        self._set_status(job, "queued")
        self._enqueue(job, now)
        self._dirty[job.id] = None
        return msgspec.structs.replace(job)

    def waiting_handlers(self) -> set[str]:
        """Handlers that queued or paused jobs wait for."""
        return {job.handler for job in self._jobs.values() if job.status in ("queued", "paused")}

    def fail_queued(self, handler: str, reason: str) -> list[Job]:
        """Fail every queued or paused job of ``handler`` (it no longer exists)."""
        failed = []
        now = self._now()
        for job in list(self._jobs.values()):
            if job.handler == handler and job.status in ("queued", "paused"):
                if job.id in self._tokens:  # a paused job is already out of the heaps
                    self._dequeue(job.id)
                job.error = JobError(message=reason)
                job.finished_at = now
                self._set_status(job, "failed")
                self._dirty[job.id] = None
                failed.append(msgspec.structs.replace(job))
        return failed

    def release_worker(self, worker: str, reason: str) -> list[Job]:
        """Every job ``worker`` was running counts as a failed attempt (it died)."""
        changed = []
        for job_id in sorted(self._by_worker.get(worker, ())):
            job = self._jobs[job_id]
            self._fail(job, JobError(message=reason))
            changed.append(msgspec.structs.replace(job))
        return changed

    def expire_leases(self) -> list[Job]:
        """Running jobs past their lease deadline count as failed (timed out) attempts."""
        now, expired = self._now(), []
        while self._leases and self._leases[0][0] <= now:
            deadline, job_id = heapq.heappop(self._leases)
            if self._deadlines.get(job_id) != deadline:
                continue
            job = self._jobs[job_id]
            self._fail(job, JobError(message=f"timed out after {job.timeout_s:g}s"))
            expired.append(msgspec.structs.replace(job))
        return expired

    def cancel(self, job_id: str) -> Job:
        """Cancel a live job; the caller kills it if the returned job has a ``worker``."""
        job = self._find(job_id)
        if job.status in FINAL_STATUSES:
            raise Conflict(f"job {job_id} is already {job.status}")
        if job.status == "queued":
            self._dequeue(job_id)
        elif job.status == "running":
            self._end_lease(job)
        job.finished_at = self._now()
        self._set_status(job, "cancelled")
        return msgspec.structs.replace(job)

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again with a fresh set of attempts."""
        job = self._find(job_id)
        if job.status not in ("failed", "cancelled"):
            raise Conflict(
                f"only failed or cancelled jobs can be retried; {job_id} is {job.status}"
            )
        if job_id not in self._jobs:
            self._adopt(self._store.get(job_id))
            job = self._jobs[job_id]
        job.attempts, job.error, job.run_after = 0, None, 0
        job.started_at = job.finished_at = job.worker = job.progress = None
        self._set_status(job, "queued")
        self._enqueue(job, self._now())
        return msgspec.structs.replace(job)

    def pause(self, job_id: str) -> Job:
        job = self._find(job_id)
        if job.status != "queued":
            raise Conflict(f"only queued jobs can be paused; {job_id} is {job.status}")
        self._dequeue(job_id)
        self._set_status(job, "paused")
        return msgspec.structs.replace(job)

    def resume(self, job_id: str) -> Job:
        job = self._find(job_id)
        if job.status != "paused":
            raise Conflict(f"only paused jobs can be resumed; {job_id} is {job.status}")
        self._set_status(job, "queued")
        self._enqueue(job, self._now())
        return msgspec.structs.replace(job)

    def progress(self, job_id: str, current: float, total: float, attempt: int = 0) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.status != "running" or (attempt and attempt != job.attempts):
            return None  # late progress of an earlier attempt is not an error
        job.progress = Progress(current=current, total=total)
        self._dirty[job_id] = None
        return msgspec.structs.replace(job)

    # ------------------------------------------------------------------ views

    def get(self, job_id: str) -> Job:
        return msgspec.structs.replace(self._find(job_id))

    def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """Newest first; ``status`` walks that status's index, never the whole store."""
        if status is not None and status not in JOB_STATUSES:
            raise Invalid(f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}")
        if not _is_int(limit) or limit < 1:
            raise Invalid(f"limit must be an integer >= 1, got {limit!r}")
        # Jobs changed since the last flush are current in memory and stale on disk.
        changed = (self._jobs[i] for i in self._dirty)
        found = [
            (job.created_at, self._seq[job.id], job)
            for job in changed
            if status is None or job.status == status
        ]
        # The rest from disk; a clean job in memory is the same as on disk, so not decoded.
        found += self._store.newest(status, limit, skip=self._dirty, cached=self._jobs)
        found.sort(key=lambda row: row[:2], reverse=True)
        return [msgspec.structs.replace(job) for _, _, job in found[:limit]]

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def ready_count(self) -> int:
        self._promote(self._now())
        return len(self._ready_ids)

    def running(self) -> list[Job]:
        return [msgspec.structs.replace(self._jobs[i]) for i in self._deadlines]

    def next_wakeup_ms(self) -> int | None:
        """When a backoff ends or a lease expires next, whichever is first (None: never)."""
        self._promote(self._now())
        delayed, leases = self._delayed, self._leases
        while delayed and self._tokens.get(delayed[0][3]) != delayed[0][2]:
            heapq.heappop(delayed)
        while leases and self._deadlines.get(leases[0][1]) != leases[0][0]:
            heapq.heappop(leases)
        times = [heap[0][0] for heap in (delayed, leases) if heap]
        return min(times) if times else None
