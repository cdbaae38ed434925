"""Pulse's core: every live job, every lease, every worker session. No I/O.

``PulseCore.handle(event, now) -> commands`` is the whole interface (events and
commands are in ``qntx.pulse.events``); the server feeds it what its sockets and
timers observed, commits what ``changes()`` lists, then carries the commands out.
Requests that are wrong raise a ``QntxError``, which the loop answers.

Runs have identities. Every dispatch makes a **lease**: an id that only grows
(reserved in blocks, durably, before use), the job, the worker session holding it
and a deadline on the monotonic clock. Only a job's current lease may complete it,
report its progress or stream its output; anything for an older lease is dropped
(and logged). A lease ends when its ``JobDone`` arrives, when it expires (a timeout:
that uses an attempt), when its job is cancelled, or when its session dies or gives
it back (infrastructure: no attempt used). On start, jobs a crash left ``running``
keep their leases for a grace period; a worker that reports holding one adopts it,
and only leases nobody claims go back to the queue.

Live state is in memory: every non-final job (and final ones until saved), a ready
heap per handler keyed by (-priority, seq), a delayed heap keyed by (run_after,
seq) and a lease heap keyed by deadline. Heaps delete lazily: an entry counts only
while its token (or deadline) is still current.

Nothing the core does per job or per heartbeat grows with the number of worker
sessions: the freest ready session is found in an index of free credit
(``qntx.pulse.credit``), liveness is a heap of deadlines with one entry per session
(an entry whose session was heard from since is pushed again when it comes due),
and a restarted worker's old session is found by its name.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from qntx.errors import Conflict, Invalid, NotFound, QntxError
from qntx.obs.tally import bump
from qntx.protocol import (
    FINAL_STATUSES,
    JOB_STATUSES,
    NIL,
    RUNNING_STATUSES,
    TIMED_OUT,
    CancelRunning,
    Dispatch,
    Job,
    JobChanged,
    JobError,
    JobProgressed,
    JobReply,
    Progress,
    Submit,
)
from qntx.pulse.credit import FreeCredit
from qntx.pulse.directives import FIRINGS_KEPT, MISSED_AFTER_MS, Limit, Schedule, firing_id
from qntx.pulse.events import (
    CancelAtPlugin,
    Changes,
    ClosePipe,
    DirectivesSet,
    Finished,
    HandlersAnnounced,
    Instant,
    Log,
    OpenPipe,
    OutputWritten,
    PluginDown,
    PluginUp,
    Progressed,
    Publish,
    Reply,
    Saved,
    SendControl,
    SendJob,
    Started,
    Steer,
    Submitted,
    Turn,
    Undeliverable,
    WorkerSeen,
)
from qntx.pulse.history import OutputTails, claim_run, end_run, forget_run, late_logs, start_run
from qntx.pulse.rules import MAX_LOST_RUNS, backoff_ms, bound_logs, check_submit, lease_ms

BUILTIN_HANDLERS = ("builtin.echo", "builtin.fail", "builtin.sleep")
WAITING_STATUSES = ("queued", "paused", "waiting")  # not running yet, not ended
LEASE_BLOCK = 100_000  # lease ids reserved on disk at a time
FINISHED_KEPT_MS = 10_000  # how long a lease that ended with its JobDone is remembered
LIVENESS_BATCHES = 30  # liveness wakeups may come this fraction of dead_after_ms late


@dataclass(slots=True)
class Lease:
    id: int
    job_id: str
    session: bytes | None  # None: left by a crashed server, waiting for its worker to claim it
    deadline: int  # monotonic ms
    plugin: str | None = None


@dataclass(slots=True)
class Session:
    id: bytes
    name: str
    pid: int
    credit: int
    last_seen: int  # monotonic ms
    plugin: str = ""  # the plugin whose jobs it takes itself ("": a plain worker)
    host: str = ""
    ready: bool = False  # connected to its jobs pipe
    leases: set[int] = field(default_factory=set)
    # Leases taken back from it that it still reports running: they hold slots
    # until it stops listing them.
    foreign: set[int] = field(default_factory=set)
    order: int = 0  # join order: among sessions equally free, the first to join goes first

    @property
    def free(self) -> int:
        return self.credit - len(self.leases) - len(self.foreign)


@dataclass(slots=True)
class Plugin:
    name: str
    endpoint: str = ""
    capacity: int = 0
    handlers: set[str] = field(default_factory=set)
    up: bool = False
    load: int = 0  # its jobs out on leases


@dataclass(frozen=True, slots=True)
class Config:
    dead_after_ms: int = 3_000  # a session silent this long is gone
    adopt_grace_ms: int = 5_000  # how long leases left by a crash wait for their worker
    max_payload_bytes: int = 15 << 20


def public(job: Job) -> Job:
    """The job as events, listings and waits carry it: without its payload and its
    history (GetJob has them)."""
    return msgspec.structs.replace(job, payload=NIL, history=[])


class PulseCore:
    def __init__(self, config: Config, now: Instant):
        self.config = config
        self._last_turn = now.mono
        self.jobs: dict[str, Job] = {}  # live jobs, and final ones until saved
        self._seq: dict[str, int] = {}
        self._on_disk: dict[str, str] = {}  # status on disk of each saved job in jobs
        self._version: dict[str, int] = {}
        self._saved_version: dict[str, int] = {}
        self._dirty: set[str] = set()  # changed since the last changes()
        self._unsaved: set[str] = set()  # newest version not on disk yet
        self._writing: set[str] = set()  # handed to the commit in flight
        self._keys: dict[str, str] = {}  # idempotency key -> id, for jobs in memory
        self._counts = dict.fromkeys(JOB_STATUSES, 0)
        self._revived: dict[str, str] | None = None  # while a prune runs: stored jobs steered back, their stored status
        # (what happened, handler) -> how often since start: submitted, started, completed,
        # failed, cancelled, retried, lost, expired (qntx.obs.metrics exports them).
        self.tally: dict[tuple[str, str], int] = {}
        self._next_seq = 0
        self._meta_dirty = True
        self._wall, self._mono = now.wall, now.mono

        self._token = itertools.count()
        self._tokens: dict[str, int] = {}  # queued id -> token of its live heap entry
        self._ready: dict[str, list[tuple[int, int, int, str]]] = {}  # handler -> heap
        self._ready_count = 0
        self._delayed: list[tuple[int, int, int, str]] = []  # (run_after, seq, token, id)

        self.leases: dict[int, Lease] = {}
        self._tails = OutputTails()  # what running runs streamed: kept in their history when they end
        self._deadlines: list[tuple[int, int]] = []  # (deadline, lease id), lazy
        self._taken_back: dict[int, bytes] = {}  # ended leases whose worker may still run them
        # Leases that ended with their own JobDone lately: a heartbeat sent before that
        # arrived may still list them, and that is no reason to cancel anything.
        self._ended_by_report: dict[int, int] = {}  # lease id -> monotonic ms it ended
        self._next_lease = 1
        self._ceiling = 1  # leases below this are durably reserved
        self._wanted_ceiling = 1 + LEASE_BLOCK

        self.sessions: dict[bytes, Session] = {}
        self._free = FreeCredit()  # ready sessions by free slots, per group
        self._liveness: list[tuple[int, int, bytes]] = []  # (deadline, order, session): one entry each
        self._named: dict[str, bytes] = {}  # worker name -> its session
        self._session_order = itertools.count(1)
        self.plugins: dict[str, Plugin] = {}
        self._routes: dict[str, str] = {}  # handler -> the plugin that announced it
        self._plugin_names: set[str] = set()  # every plugin that ever registered (on disk)
        self._removed: set[str] = set()  # handlers their plugin deleted
        self._versions: dict[str, str] = {}  # handler -> its current version (pinned by new jobs)

        self._limits: dict[str, Limit] = {}
        self._running: dict[str, int] = {}  # handler -> leases out (limits count these)
        self._starts: dict[str, deque[int]] = {}  # handler -> monotonic ms of its recent starts
        self._pending: dict[str, set[str]] = {}  # waiting job -> the jobs it still waits for
        self._dependents: dict[str, set[str]] = {}  # job -> waiting jobs that run after it
        self._ended: list[Job] = []  # jobs that just ended, whose dependents must hear of it
        self._schedules: dict[str, Schedule] = {}
        self._fired: dict[str, list] = {}  # name -> [last due fired (wall ms), [[due, job id], ...]]
        self._schedules_dirty = False
        self._limits_dirty = False
        self._versions_dirty = False
        self._due_cache: dict[str, tuple[int, int]] = {}  # name -> (last handled, next due)
        # Jobs to publish at the end of the turn (the objects: a final one may have
        # left memory by then, saved by a commit that ran in between).
        self._changed: dict[str, Job] = {}
        self._out: list[Any] = []

        self._handlers = {
            Submitted: self._submit,
            WorkerSeen: self._worker_seen,
            Finished: self._finished,
            Progressed: self._progressed,
            Started: self._started,
            OutputWritten: self._output,
            Steer: self._steer,
            PluginUp: self._plugin_up,
            PluginDown: self._plugin_down,
            HandlersAnnounced: self._handlers_announced,
            Undeliverable: self._undeliverable,
            DirectivesSet: self._directives_set,
            Saved: self._saved,
            Turn: self._turn,
        }

    # ================================================================= the interface

    def handle(self, event: Any, now: Instant) -> list[Any]:
        """Apply one event; the commands it calls for, in order."""
        self._out = []
        self._wall, self._mono = now.wall, now.mono
        self._handlers[type(event)](event, now)
        self._settle_dependents(now.wall)
        out, self._out = self._out, []
        return out

    def restore(
        self,
        jobs: list[tuple[int, Job]],
        next_seq: int,
        counts: dict[str, int],
        lease_ceiling: int,
        now: Instant,
        plugins: list[str] = (),
        ended: dict[str, str] | None = None,
        schedules: dict[str, list] | None = None,
        limits: dict[str, list] | None = None,
        handler_versions: dict[str, str] | None = None,
    ) -> None:
        """Take over what a previous server left on disk (before any event). ``ended``:
        the stored status of each job a waiting job runs after that is not live;
        ``schedules``: what each schedule fired last."""
        self._plugin_names = set(plugins)
        self._fired = {name: _schedule_state(state) for name, state in (schedules or {}).items()}
        # The limits last read from ATS apply from the first dispatch on; ATS's current set follows.
        # A rate limit's recent starts (wall ms) hold its window across the restart.
        self._limits = {}
        for handler, (c, r, p, *rest) in (limits or {}).items():
            self._limits[handler] = Limit(concurrency=c, rate=r, per_ms=p)
            starts = sorted(min(now.mono, now.mono - (now.wall - wall)) for wall in (rest[0] if rest else ()))
            if starts and r is not None:
                self._starts[handler] = deque(starts)
        self._versions = dict(handler_versions or {})
        self._next_seq = next_seq
        self._counts.update(counts)
        self._next_lease = self._ceiling = max(lease_ceiling, 1)
        self._wanted_ceiling = self._ceiling + LEASE_BLOCK
        self._meta_dirty = True  # the first commit reserves the first block
        for seq, job in jobs:
            self._adopt_record(seq, job)
            if job.status == "queued":
                self._enqueue(job, now.wall)
            elif job.status in RUNNING_STATUSES:
                self._add_lease(Lease(job.lease, job.id, None, now.mono + self.config.adopt_grace_ms))
            self._saved_version[job.id] = self._version[job.id] = 0
        for _, job in jobs:
            if job.status == "waiting":
                self._start_waiting(job, self._after_statuses(job.after, ended or {}, strict=False), now.wall)

    def _versions_snapshot(self) -> dict[str, str] | None:
        if not self._versions_dirty:
            return None
        self._versions_dirty = False
        return dict(self._versions)

    def _limits_snapshot(self) -> dict[str, list] | None:
        if not self._limits_dirty:
            return None
        self._limits_dirty = False
        # Each rate limit with its starts in the window, as wall ms (the monotonic clock
        # of this process means nothing to the next).
        return {
            h: [limit.concurrency, limit.rate, limit.per_ms, [self._wall - (self._mono - m) for m in self._starts.get(h, ())]]
            for h, limit in self._limits.items()
        }

    def _fired_snapshot(self) -> dict[str, list] | None:
        if not self._schedules_dirty:
            return None
        self._schedules_dirty = False
        return {name: _schedule_state(state) for name, state in self._fired.items()}

    def changes(self) -> Changes | None:
        """Everything changed since the last call, for one commit (None: nothing)."""
        if not (self._dirty or self._meta_dirty or self._schedules_dirty or self._limits_dirty or self._versions_dirty):
            return None
        dirty, self._dirty = [i for i in self._dirty if i in self.jobs], set()
        self._writing = set(dirty)
        self._meta_dirty = False
        # Snapshots: the commit encodes them on another thread while these jobs move on.
        rows = [(self._seq[i], msgspec.structs.replace(self.jobs[i]), self._on_disk.get(i)) for i in dirty]
        # (history lists are replaced, never changed in place: a shallow copy is a snapshot)
        return Changes(
            rows=rows,
            versions={job.id: (self._version[job.id], job.status) for _, job, _ in rows},
            next_seq=self._next_seq,
            counts=dict(self._counts),
            lease_ceiling=self._wanted_ceiling,
            plugins=sorted(self._plugin_names),
            schedules=self._fired_snapshot(),
            limits=self._limits_snapshot(),
            handler_versions=self._versions_snapshot(),
        )

    @property
    def urgent(self) -> bool:
        """A commit is needed now: dispatching waits for the next block of lease ids."""
        return self._wanted_ceiling != self._ceiling and self._next_lease + LEASE_BLOCK // 4 >= self._ceiling

    def has_changes(self) -> bool:
        return self._meta_dirty or self._schedules_dirty or self._limits_dirty or self._versions_dirty or bool(self._dirty)

    def commit_failed(self) -> None:
        """The last ``changes()`` did not reach the disk: write them again next time."""
        self._meta_dirty = self._schedules_dirty = self._limits_dirty = self._versions_dirty = True
        self._dirty |= self._writing

    def prune_started(self) -> None:
        """A prune batch is about to run on the writer thread: from now until
        ``pruned``, note each stored job a retry brings back (it may be deleted by
        that batch, and its status was counted out by the retry already)."""
        self._revived = {}

    def pruned(self, deleted: dict[str, list[str]]) -> None:
        """Finished jobs were deleted from the store (retention): count them out,
        except those a retry took back meanwhile (in memory now, or brought back
        from that status during the batch): the retry counted them out of it."""
        revived, self._revived = self._revived or {}, None
        for status, ids in deleted.items():
            gone = [i for i in ids if i not in self.jobs and revived.get(i) != status]
            self._counts[status] -= len(gone)
            self._meta_dirty = self._meta_dirty or bool(gone)

    def get(self, job_id: str) -> Job | None:
        """A job in memory (live, or final and not yet saved); None: read the store."""
        job = self.jobs.get(job_id)
        return None if job is None else msgspec.structs.replace(job)

    def running_or_due(self, ids: set[str]) -> set[str]:
        """Which of ``ids`` are jobs held in memory that have not ended, or whose end
        is announced at the end of this loop turn."""
        jobs, changed = self.jobs, self._changed
        return {i for i in jobs.keys() & ids if i in changed or jobs[i].status not in FINAL_STATUSES}

    def unsaved(self) -> dict[str, Job]:
        """Jobs whose newest state is not on disk yet (listings merge them in)."""
        return {i: self.jobs[i] for i in self._unsaved}

    def seq_of(self, job_id: str) -> int:
        return self._seq[job_id]

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def handler_known(self, handler: str, now: Instant) -> bool:
        """Whether a job of ``handler`` may be accepted: a built-in, a handler some
        plugin announced, or any handler of a known plugin that is down now (it may
        come back with it; if not, the job fails then)."""
        if handler in BUILTIN_HANDLERS or handler in self._routes:
            return True
        name = handler.split(".", 1)[0]
        plugin = self.plugins.get(name)
        return (plugin is None or not plugin.up) and name in self._plugin_names

    def known_handlers(self) -> list[str]:
        return sorted({*BUILTIN_HANDLERS, *self._routes})

    def next_wakeup(self, now: Instant) -> int | None:
        """Monotonic ms of the next backoff end or lease deadline (None: none)."""
        times = []
        while self._delayed and self._tokens.get(self._delayed[0][3]) != self._delayed[0][2]:
            heapq.heappop(self._delayed)
        if self._delayed:
            times.append(now.mono + max(0, self._delayed[0][0] - now.wall))
        while self._deadlines and not self._deadline_current(*self._deadlines[0]):
            heapq.heappop(self._deadlines)
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._liveness:  # may be early (heard from since): that turn pushes it on
            # A little late on purpose: one wakeup judges every session due by then,
            # instead of one wakeup per session.
            times.append(self._liveness[0][0] + max(1, self.config.dead_after_ms // LIVENESS_BATCHES))
        for handler in self._starts:  # a rate window that frees a start for a waiting job
            if self._ready.get(handler) and self._rate_full(handler, now.mono):
                times.append(self._starts[handler][0] + self._limits[handler].per_ms)
        for name, schedule in self._schedules.items():
            if not schedule.paused:
                times.append(now.mono + max(0, self._due(name) - now.wall))
        return min(times) if times else None

    def liveness_due(self, now: Instant) -> bool:
        """Whether the next turn may judge a session's liveness (its input must be read first)."""
        return bool(self._liveness) and self._liveness[0][0] < now.mono

    def session_named(self, name: str) -> Session | None:
        """The live session of the worker called ``name``."""
        return self.sessions.get(self._named.get(name, b""))

    def dependents(self, job_id: str) -> list[str]:
        """The jobs waiting for ``job_id`` now (the store knows the rest, once saved)."""
        return sorted(self._dependents.get(job_id, ()))

    def limits(self) -> dict[str, Limit]:
        """The limits applied now, by handler."""
        return dict(self._limits)

    def schedule_states(self) -> dict[str, tuple[Schedule, int | None, int | None, list]]:
        """name -> (schedule, last due fired, next due, [[due, job id], ...] newest last)."""
        out = {}
        for name, schedule in self._schedules.items():
            last, firings = self._fired.get(name, [None, []])[:2]
            out[name] = (schedule, last, None if schedule.paused else self._due(name), [list(f) for f in firings])
        return out

    # ================================================================= bookkeeping

    def _adopt_record(self, seq: int, job: Job) -> None:
        self.jobs[job.id] = job
        self._seq[job.id] = seq
        self._on_disk[job.id] = job.status
        if job.idempotency_key is not None:
            self._keys[job.idempotency_key] = job.id

    def _touch(self, job: Job) -> None:
        self._version[job.id] = self._version.get(job.id, 0) + 1
        self._dirty.add(job.id)
        self._unsaved.add(job.id)
        self._changed[job.id] = job

    def _set_status(self, job: Job, status: str) -> None:
        if job.id in self._version or job.id in self._on_disk:
            self._counts[job.status] -= 1
        self._counts[status] += 1
        job.status = status
        if status == "running" or status in FINAL_STATUSES:
            bump(self.tally, ("started" if status == "running" else status, job.handler))
        self._touch(job)
        if status in FINAL_STATUSES and job.id in self._dependents:
            self._ended.append(job)  # its dependents hear of it at the end of the event

    def _add_lease(self, lease: Lease) -> None:
        self.leases[lease.id] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))
        handler = self.jobs[lease.job_id].handler
        self._running[handler] = self._running.get(handler, 0) + 1

    def _enqueue(self, job: Job, wall: int) -> None:
        token = next(self._token)
        self._tokens[job.id] = token
        entry = (-job.priority, self._seq[job.id], token, job.id)
        if job.run_after <= wall:
            heapq.heappush(self._ready.setdefault(job.handler, []), entry)
            self._ready_count += 1
        else:
            heapq.heappush(self._delayed, (job.run_after, self._seq[job.id], token, job.id))

    def _dequeue(self, job_id: str) -> None:
        """Take a queued job out of the heaps (lazily: its entries go stale)."""
        self._tokens.pop(job_id, None)
        entries = sum(len(h) for h in self._ready.values()) + len(self._delayed)
        if entries > 2 * len(self._tokens) + 64:  # mostly dead entries: rebuild
            live, self._tokens = self._tokens, {}
            self._ready, self._delayed, self._ready_count = {}, [], 0
            for queued_id in live:
                self._enqueue(self.jobs[queued_id], self._wall)

    def _promote(self, wall: int) -> None:
        while self._delayed and self._delayed[0][0] <= wall:
            _, seq, token, job_id = heapq.heappop(self._delayed)
            if self._tokens.get(job_id) == token:
                job = self.jobs[job_id]
                heapq.heappush(self._ready.setdefault(job.handler, []), (-job.priority, seq, token, job_id))
                self._ready_count += 1

    def _deadline_current(self, deadline: int, lease_id: int) -> bool:
        lease = self.leases.get(lease_id)
        return lease is not None and lease.deadline == deadline

    def _new_lease_id(self) -> int | None:
        if self._next_lease >= self._ceiling:
            return None  # the next block is not durable yet: wait for the commit
        lease_id = self._next_lease
        self._next_lease += 1
        if self._next_lease + LEASE_BLOCK // 2 > self._wanted_ceiling:
            self._wanted_ceiling += LEASE_BLOCK
            self._meta_dirty = True
        return lease_id

    def _end_lease(self, lease: Lease, *, taken_back: bool) -> None:
        """The lease is over for Pulse. ``taken_back``: its worker was not told by its
        own report, so it may still run it (it holds a slot until it stops saying so)."""
        del self.leases[lease.id]
        handler = self.jobs[lease.job_id].handler
        self._running[handler] -= 1
        if not self._running[handler]:
            del self._running[handler]
        session = self.sessions.get(lease.session) if lease.session is not None else None
        if session is not None:
            session.leases.discard(lease.id)
            if taken_back:
                session.foreign.add(lease.id)
                self._taken_back[lease.id] = session.id
            self._index(session)
        if lease.plugin is not None and lease.session is not None:
            plugin = self.plugins.get(lease.plugin)
            if plugin is not None:
                plugin.load -= 1

    def _stop_run(self, lease: Lease, reason: str) -> None:
        """Take a lease back from a worker that may still be running it, and tell it."""
        if lease.session is not None:
            self._out.append(SendControl(lease.session, CancelRunning(lease=lease.id, job_id=lease.job_id)))
        if lease.plugin is not None:
            self._out.append(CancelAtPlugin(lease.plugin, lease.job_id, lease.id))
        self._end_lease(lease, taken_back=True)

    def _close_run(self, job: Job, lease_id: int, outcome: str, wall: int, error: JobError | None = None, logs: str | None = None) -> None:
        """Record how the run under ``lease_id`` ended in the job's history; without
        logs of its own (it did not report) it keeps what it streamed. ``job.logs``
        holds the last run's."""
        streamed = self._tails.take(lease_id)
        job.logs = bound_logs(logs or streamed)
        end_run(job, lease_id, outcome, wall, error=error, logs=job.logs)

    def _requeue_without_attempt(self, job: Job, wall: int, why: str) -> None:
        """The run was lost to infrastructure: queue it again at once, no attempt used."""
        job.attempts = max(0, job.attempts - 1)
        job.lost += 1
        lost = job.lost
        bump(self.tally, ("lost", job.handler))
        if lost > MAX_LOST_RUNS or self._unroutable(job.handler):
            deleted = self._unroutable(job.handler)
            reason = f"handler {job.handler} was deleted" if deleted else f"lost {lost} runs to crashes ({why}); giving up"
            job.error = JobError(message=reason)
            job.finished_at = wall
            self._set_status(job, "failed")
            return
        # The first loss goes again at once; repeated ones (a plugin still restarting)
        # wait a little longer each time instead of spinning.
        job.worker, job.run_after = None, 0 if lost <= 1 else wall + backoff_ms(lost - 1, 250, 5_000)
        self._set_status(job, "queued")
        self._enqueue(job, wall)

    def _attempt_failed(self, job: Job, error: JobError, wall: int) -> None:
        job.error = error
        if self._unroutable(job.handler):
            job.error = JobError(message=f"handler {job.handler} was deleted")
            job.finished_at = wall
            self._set_status(job, "failed")
        elif job.attempts < job.max_attempts:
            bump(self.tally, ("retried", job.handler))
            job.run_after = wall + backoff_ms(job.attempts)
            job.worker = None
            self._set_status(job, "queued")
            self._enqueue(job, wall)
        else:
            job.finished_at = wall
            self._set_status(job, "failed")  # kept: the dead-letter view lists it

    def _unroutable(self, handler: str) -> bool:
        """Its plugin deleted it, or is up and does not have it: it can never run."""
        if handler in self._removed:
            return True
        if handler in BUILTIN_HANDLERS or handler in self._routes:
            return False
        plugin = self.plugins.get(handler.split(".", 1)[0])
        return plugin is not None and plugin.up

    def _current_lease(self, job_id: str, lease_id: int) -> tuple[Job, Lease] | None:
        job = self.jobs.get(job_id)
        lease = self.leases.get(lease_id)
        if job is None or lease is None or lease.job_id != job_id or job.lease != lease_id:
            return None
        return job, lease

    # ================================================================= events

    def _submit(self, event: Submitted, now: Instant) -> None:
        spec = event.spec
        check_submit(spec, self.config.max_payload_bytes)
        existing_id = spec.id if spec.id in self.jobs else self._keys.get(spec.idempotency_key or "")
        if existing_id is not None or event.existing is not None:
            # A resubmission: the same job, durable once its first submission is.
            job = self.jobs[existing_id] if existing_id is not None else event.existing
            if job.id == spec.id and spec.idempotency_key is None and (
                job.handler != spec.handler or job.payload != spec.payload
            ):
                raise Conflict(f"job id {spec.id} is taken by another job (a different handler or payload)")
            durable = job.id in self._unsaved
            self._out.append(Reply(event.reply_to, JobReply(job=public(job)), durable=durable))
            return
        if not self.handler_known(spec.handler, now):
            raise NotFound(f"unknown handler {spec.handler!r} (known handlers: {', '.join(self.known_handlers())})")
        if spec.id is not None and spec.id in spec.after:
            raise Invalid(f"job {spec.id} cannot run after itself")
        statuses = self._after_statuses(spec.after, event.ended, strict=True)
        job = self._create(spec, now)
        # Its acceptance is the reply; the first event is its dispatch (or a later change).
        if job.after:
            self._start_waiting(job, statuses, now.wall)
        else:
            self._set_status(job, "queued")
            self._enqueue(job, now.wall)
            del self._changed[job.id]
        self._out.append(Reply(event.reply_to, JobReply(job=public(job))))

    def _create(self, spec: Submit, now: Instant, schedule: str | None = None) -> Job:
        job_id = spec.id or _new_job_id(spec.handler, self.jobs)
        bump(self.tally, ("submitted", spec.handler))
        job = Job(
            id=job_id, handler=spec.handler, payload=spec.payload, priority=spec.priority,
            max_attempts=spec.max_attempts, timeout_s=spec.timeout_s, created_at=now.wall,
            parent_id=spec.parent_id, idempotency_key=spec.idempotency_key, run_after=spec.run_at or 0,
            after=list(dict.fromkeys(spec.after)), after_policy=spec.after_policy, schedule=schedule, trace=spec.trace,
            version=spec.version or self._versions.get(spec.handler),
        )  # fmt: skip
        self.jobs[job_id] = job
        self._seq[job_id] = self._next_seq
        self._next_seq += 1
        if spec.idempotency_key is not None:
            self._keys[spec.idempotency_key] = job_id
        return job

    # ------------------------------------------------------------ dependencies

    def _after_statuses(self, after: list[str], ended: dict[str, str], *, strict: bool) -> dict[str, str]:
        """The status of each job in ``after``: live ones from memory, the rest as
        the loop read them from the store. ``strict``: an unknown one is an error
        (else it counts as gone, which a dependent that needs it completed fails on)."""
        statuses = {}
        for dep in after:
            other = self.jobs.get(dep)
            status = other.status if other is not None else ended.get(dep)
            if status is None:
                if strict:
                    raise NotFound(f"no job {dep} to run after")
                # Pruned since: it ended, and well enough, or its dependent would have
                # failed with it then.
                status = "completed"
            statuses[dep] = status
        return statuses

    def _start_waiting(self, job: Job, statuses: dict[str, str], wall: int) -> None:
        """Queue ``job`` once the jobs it runs after have ended (now, if they have)."""
        pending = {dep for dep, status in statuses.items() if status not in FINAL_STATUSES}
        failed = [(dep, status) for dep, status in statuses.items() if dep not in pending and status != "completed"]
        if failed and job.after_policy == "completed":
            self._after_failed(job, *failed[0], wall)
        elif pending:
            self._pending[job.id] = pending
            for dep in pending:
                self._dependents.setdefault(dep, set()).add(job.id)
            if job.status != "waiting":
                self._set_status(job, "waiting")
        else:
            self._set_status(job, "queued")
            self._enqueue(job, wall)

    def _after_failed(self, job: Job, dep: str, status: str, wall: int) -> None:
        job.error = JobError(message=f"job {dep}, which it runs after, {status}")
        job.finished_at = wall
        self._set_status(job, "failed")

    def _stop_waiting(self, job: Job) -> None:
        for dep in self._pending.pop(job.id, ()):
            waiting = self._dependents.get(dep)
            if waiting is not None:
                waiting.discard(job.id)
                if not waiting:
                    del self._dependents[dep]

    def _settle_dependents(self, wall: int) -> None:
        """Jobs that ended this event: start (or fail) what waited for them. A failure
        spreads down a chain one job at a time, without recursion."""
        while self._ended:
            done = self._ended.pop()
            for job_id in sorted(self._dependents.pop(done.id, ())):
                job, pending = self.jobs.get(job_id), self._pending.get(job_id)
                if job is None or pending is None or job.status != "waiting":
                    continue
                pending.discard(done.id)
                if done.status != "completed" and job.after_policy == "completed":
                    self._stop_waiting(job)
                    self._after_failed(job, done.id, done.status, wall)
                elif not pending:
                    del self._pending[job_id]
                    self._set_status(job, "queued")
                    self._enqueue(job, wall)

    def _steer(self, event: Steer, now: Instant) -> None:
        job = self.jobs.get(event.job_id)
        if job is None:
            if event.stored is None:
                raise NotFound(f"no job {event.job_id}")
            if event.action != "retry" or event.stored.status not in ("failed", "cancelled"):
                verb = "retried" if event.action == "retry" else "cancelled" if event.action == "cancel" else f"{event.action}d"
                raise Conflict(f"job {event.job_id} is already {event.stored.status}; it cannot be {verb}")
            job = msgspec.structs.replace(event.stored)
            if self._revived is not None:
                self._revived[job.id] = job.status
            self._adopt_record(event.stored_seq, job)
            self._saved_version[job.id] = self._version[job.id] = 0
        if event.action == "retry":
            self._retry(job, now, event.ended, event.latest)
        else:
            getattr(self, f"_{event.action}")(job, now)
        # The job as GetJob has it (with its payload), unless the asker steers many.
        reply = public(job) if event.brief else msgspec.structs.replace(job)
        self._out.append(Reply(event.reply_to, JobReply(job=reply)))

    def _cancel(self, job: Job, now: Instant) -> None:
        if job.status in FINAL_STATUSES:
            raise Conflict(f"job {job.id} is already {job.status}")
        if job.status == "queued":
            self._dequeue(job.id)
        elif job.status == "waiting":
            self._stop_waiting(job)
        elif job.status in RUNNING_STATUSES:
            lease = self.leases.get(job.lease)
            if lease is not None:
                self._stop_run(lease, "cancelled")
                self._close_run(job, lease.id, "cancelled", now.wall, JobError(message="cancelled"))
        job.finished_at, job.error = now.wall, None  # an earlier attempt's error is not why it ended
        self._set_status(job, "cancelled")

    def _retry(self, job: Job, now: Instant, ended: dict[str, str], latest: bool) -> None:
        if job.status not in ("failed", "cancelled"):
            raise Conflict(f"only failed or cancelled jobs can be retried; {job.id} is {job.status}")
        statuses = self._after_statuses(job.after, ended, strict=False)
        bump(self.tally, ("retried", job.handler))
        job.attempts, job.lost, job.error, job.run_after, job.result, job.logs = 0, 0, None, 0, NIL, ""
        job.started_at = job.finished_at = job.worker = job.progress = None
        if latest:
            job.version = self._versions.get(job.handler)
        if job.after:  # it waits again for what it runs after (or fails again on it)
            self._start_waiting(job, statuses, now.wall)
        else:
            self._set_status(job, "queued")
            self._enqueue(job, now.wall)

    def _pause(self, job: Job, now: Instant) -> None:
        if job.status != "queued":
            raise Conflict(f"only queued jobs can be paused; {job.id} is {job.status}")
        self._dequeue(job.id)
        self._set_status(job, "paused")

    def _resume(self, job: Job, now: Instant) -> None:
        if job.status != "paused":
            raise Conflict(f"only paused jobs can be resumed; {job.id} is {job.status}")
        self._set_status(job, "queued")
        self._enqueue(job, now.wall)

    def _worker_seen(self, event: WorkerSeen, now: Instant) -> None:
        message = event.message
        session = self.sessions.get(event.session)
        if session is None:
            other = self.session_named(message.worker)
            if other is not None:  # the same worker, restarted: the old one is gone
                self._release(other, f"worker {other.name} restarted", now)
            session = Session(event.session, message.worker, message.pid, 0, now.mono, order=next(self._session_order))
            self.sessions[event.session] = session
            self._named[session.name] = session.id
            heapq.heappush(self._liveness, (now.mono + self.config.dead_after_ms, session.order, session.id))
            self._out.append(OpenPipe(event.session))
            self._out.append(Log("INFO", f"worker {message.worker} (pid {message.pid}) joined with capacity {message.credit}"))
        session.credit = max(0, message.credit) if isinstance(message.credit, int) else 0
        session.pid = message.pid
        session.plugin = message.plugin
        session.host = message.host if isinstance(message.host, str) else ""
        session.last_seen = now.mono
        session.ready = event.pipe_ready
        reported = set(message.leases)
        for lease_id in session.foreign - reported:  # it stopped running them: their slots are free
            if self._taken_back.get(lease_id) == session.id:
                del self._taken_back[lease_id]
        session.foreign &= reported
        for lease_id in sorted(reported - session.leases):
            lease = self.leases.get(lease_id)
            if lease is not None and lease.session is None:
                self._claim(lease, session, now)
            elif lease_id in session.foreign or lease is not None or lease_id not in self._ended_by_report:
                # A run Pulse took back (expired, cancelled, its session given up for
                # dead) or never knew: stop it, and ask again while it is still listed.
                session.foreign.add(lease_id)
                self._out.append(SendControl(session.id, CancelRunning(lease=lease_id)))
            # else: it ended with its JobDone; the heartbeat was sent before that arrived
        self._index(session)

    def _claim(self, lease: Lease, session: Session, now: Instant) -> None:
        """A worker still runs a lease a crashed server left: it is its again."""
        job = self.jobs[lease.job_id]
        lease.session = session.id
        lease.deadline = now.mono + lease_ms(job.timeout_s)
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))
        session.leases.add(lease.id)
        self._index(session)
        if job.handler not in BUILTIN_HANDLERS:
            name = self._routes.get(job.handler, job.handler.split(".", 1)[0])
            lease.plugin = name
            self.plugins.setdefault(name, Plugin(name)).load += 1
        if job.worker != session.name:
            job.worker = session.name
            self._touch(job)
        claim_run(job, lease.id, session.name, session.host)
        self._out.append(Log("INFO", f"worker {session.name} still runs job {job.id} (lease {lease.id}): adopted"))

    def _release(self, session: Session, reason: str, now: Instant) -> None:
        """A session is gone: its runs go back to the queue without using an attempt."""
        count = len(session.leases)
        for lease_id in sorted(session.leases):
            lease = self.leases[lease_id]
            job = self.jobs[lease.job_id]
            if lease.plugin is not None:  # its plugin may still run it for nobody
                self._out.append(CancelAtPlugin(lease.plugin, lease.job_id, lease.id))
            self._end_lease(lease, taken_back=False)
            self._close_run(job, lease.id, "lost", now.wall, JobError(message=reason))
            self._requeue_without_attempt(job, now.wall, reason)
        for lease_id in [i for i, s in self._taken_back.items() if s == session.id]:
            del self._taken_back[lease_id]
        del self.sessions[session.id]
        self._free.remove(session.id)
        if self._named.get(session.name) == session.id:
            del self._named[session.name]
        self._out.append(ClosePipe(session.id))
        self._out.append(Log("WARNING", f"{reason}; its {count} job(s) went back to the queue" if count else reason))

    def _finished(self, event: Finished, now: Instant) -> None:
        done = event.message
        current = self._current_lease(done.job_id, done.lease)
        if current is None:
            session_id = self._taken_back.pop(done.lease, None)
            if session_id is not None and session_id in self.sessions:
                self.sessions[session_id].foreign.discard(done.lease)
                self._index(self.sessions[session_id])
            job = self.jobs.get(done.job_id)
            if job is not None and late_logs(job, done.lease, bound_logs(done.logs)):
                self._touch(job)  # an ended run's own logs, come after it was taken back
            self._out.append(Log("DEBUG", f"discarded the result of job {done.job_id} lease {done.lease}: not its current run"))
            return
        job, lease = current
        self._end_lease(lease, taken_back=False)
        self._ended_by_report[lease.id] = now.mono
        if done.progress is not None:
            job.progress = done.progress
        if done.interrupted:
            why = done.error.message if done.error is not None else "interrupted"
            self._close_run(job, lease.id, "lost", now.wall, JobError(message=why), done.logs)
            self._requeue_without_attempt(job, now.wall, "interrupted")
            return
        error = None if done.success else done.error or JobError(message="failed")
        self._close_run(job, lease.id, "completed" if done.success else "failed", now.wall, error, done.logs)
        if done.success:
            job.result, job.error, job.finished_at = done.result, None, now.wall
            self._set_status(job, "completed")
        else:
            self._attempt_failed(job, error, now.wall)
            if job.status == "queued":
                self._out.append(Log("INFO", f"job {job.id} attempt {job.attempts} failed: {job.error.message}; retrying", job))

    def _current_run(self, job_id: str, lease: int, wall: int) -> Job | None:
        """The job whose current run sent a message about itself (None: an earlier
        run's, which is not an error). Output or progress also says its code started."""
        job = self.jobs.get(job_id)
        if job is None or job.status not in RUNNING_STATUSES or (lease and lease != job.lease):
            return None
        if job.status == "dispatched":
            job.started_at = wall
            self._set_status(job, "running")
        return job

    def _started(self, event: Started, now: Instant) -> None:
        self._current_run(event.message.job_id, event.message.lease, now.wall)

    def _progressed(self, event: Progressed, now: Instant) -> None:
        message = event.message
        job = self._current_run(message.job_id, message.lease, now.wall)
        if job is None:
            return  # late progress of an earlier run is not an error
        job.progress = Progress(current=message.current, total=message.total)
        self._out.append(
            Publish(b"job." + job.id.encode(), JobProgressed(job_id=job.id, current=message.current, total=message.total))
        )

    def _output(self, event: OutputWritten, now: Instant) -> None:
        message = event.message
        job = self._current_run(message.job_id, message.lease, now.wall)
        if job is None:
            return
        if isinstance(message.text, str):
            self._tails.wrote(job.lease, message.stream, message.text)
        self._out.append(Publish(b"job." + job.id.encode(), message))

    def _plugin_up(self, event: PluginUp, now: Instant) -> None:
        if event.name not in self._plugin_names:
            self._plugin_names.add(event.name)
            self._meta_dirty = True
        plugin = self.plugins.setdefault(event.name, Plugin(event.name))
        first = not plugin.up and not plugin.handlers
        plugin.endpoint, plugin.capacity, plugin.up = event.endpoint, max(0, event.capacity), True
        self._set_versions(event.name, event.versions)
        before = plugin.handlers
        if first:  # compare with the jobs waiting for it (e.g. across a server restart)
            before = {j.handler for j in self.jobs.values() if j.status in WAITING_STATUSES}
            before = {h for h in before if h.startswith(event.name + ".")}
        self._set_handlers(plugin, set(event.handlers), before, now)

    def _plugin_down(self, event: PluginDown, now: Instant) -> None:
        plugin = self.plugins.get(event.name)
        if plugin is not None:
            plugin.up = False  # its handlers stay known: jobs for them wait

    def _handlers_announced(self, event: HandlersAnnounced, now: Instant) -> None:
        plugin = self.plugins.setdefault(event.name, Plugin(event.name))
        self._set_versions(event.name, event.versions)
        self._set_handlers(plugin, set(event.handlers), plugin.handlers, now)

    def _set_versions(self, plugin: str, versions: tuple[tuple[str, str], ...]) -> None:
        prefix = plugin + "."
        current = {h: v for h, v in self._versions.items() if not h.startswith(prefix)}
        current.update(versions)
        if current != self._versions:
            self._versions, self._versions_dirty = current, True

    def _set_handlers(self, plugin: Plugin, now_set: set[str], before: set[str], now: Instant) -> None:
        for handler in plugin.handlers - now_set:
            if self._routes.get(handler) == plugin.name:
                del self._routes[handler]
        for handler in now_set:
            self._routes.setdefault(handler, plugin.name)
        plugin.handlers = now_set
        self._removed -= now_set
        # Also jobs accepted for a handler it never had (it was down then).
        waiting = {j.handler for j in self.jobs.values() if j.status in WAITING_STATUSES}
        before = before | {h for h in waiting if h.startswith(plugin.name + ".")}
        for handler in before - now_set:
            self._removed.add(handler)
            for job in list(self.jobs.values()):
                if job.handler == handler and job.status in WAITING_STATUSES:
                    if job.status == "queued":
                        self._dequeue(job.id)
                    elif job.status == "waiting":
                        self._stop_waiting(job)
                    job.error = JobError(message=f"handler {handler} was deleted")
                    job.finished_at = now.wall
                    self._set_status(job, "failed")

    def _undeliverable(self, event: Undeliverable, now: Instant) -> None:
        lease = self.leases.get(event.lease)
        if lease is None:
            return
        session = self.sessions.get(lease.session) if lease.session else None
        if session is not None:
            session.ready = False  # until its next heartbeat says it is connected
            self._index(session)
        job = self.jobs[lease.job_id]
        self._end_lease(lease, taken_back=False)
        self._tails.take(lease.id)
        forget_run(job, lease.id)
        starts = self._starts.get(job.handler)
        if starts:  # it never started: its start does not count against a rate limit
            starts.pop()
        job.runs -= 1  # it never left: not a run at all
        job.lost -= 1
        self._requeue_without_attempt(job, now.wall, "undeliverable")

    def _saved(self, event: Saved, now: Instant) -> None:
        self._ceiling = max(self._ceiling, event.lease_ceiling)
        for job_id, (version, status) in event.versions.items():
            job = self.jobs.get(job_id)
            if job is None:
                continue
            self._saved_version[job_id] = version
            self._on_disk[job_id] = status  # what the index on disk now says
            if self._version.get(job_id) != version:
                continue  # changed again since: the next commit writes it
            self._unsaved.discard(job_id)
            if job.status in FINAL_STATUSES:  # durable now: memory keeps only live jobs
                for table in (self.jobs, self._seq, self._on_disk, self._version, self._saved_version):
                    table.pop(job_id, None)
                if job.idempotency_key is not None and self._keys.get(job.idempotency_key) == job_id:
                    del self._keys[job.idempotency_key]

    def _directives_set(self, event: DirectivesSet, now: Instant) -> None:
        if event.limits != self._limits:
            self._limits_dirty = True
        self._limits = dict(event.limits)
        for handler in [h for h in self._starts if h not in self._limits or self._limits[h].rate is None]:
            del self._starts[handler]
        for name in [n for n in self._fired if n not in event.schedules]:
            del self._fired[name]  # deleted: a schedule made again under its name starts afresh
            self._schedules_dirty = True
        for name, schedule in event.schedules.items():
            state = self._fired.get(name)
            if state is None:  # new: its first firing is its first due time from now on
                self._fired[name] = [now.wall, [], schedule.paused, []]
            elif state[2] and not schedule.paused:  # resumed: what fell due while paused is skipped
                state[0], state[2] = max(state[0], now.wall), False
            elif schedule.paused and not state[2]:
                state[2] = True  # saved: a resume seen only after a restart still skips
            else:
                continue
            self._schedules_dirty = True
        self._schedules = dict(event.schedules)
        self._due_cache.clear()

    def _due(self, name: str) -> int:
        """The schedule's next due time after the last one handled (cached: cron
        arithmetic is too slow for every turn)."""
        last = self._fired[name][0]
        cached = self._due_cache.get(name)
        if cached is None or cached[0] != last:
            cached = self._due_cache[name] = (last, self._schedules[name].next_due(last))
        return cached[1]

    def _fire_schedules(self, now: Instant) -> None:
        """Enqueue each firing that fell due. A firing's job id is derived from the
        schedule and its due time, and the last due fired is saved in the same commit
        as the job: a firing is enqueued once, whatever restarts or clock steps."""
        for name, schedule in self._schedules.items():
            if schedule.paused:
                continue
            state = self._fired[name]
            if state[0] > now.wall + MISSED_AFTER_MS:
                # The wall clock went back (it had jumped ahead): go on from now, but
                # never fire again a due time fired while it was ahead.
                state[3] = sorted({*state[3], *(due for due, _ in state[1] if due > now.wall)})
                self._out.append(Log("WARNING", f"schedule {name}: the clock went back; firing from now on"))
                state[0] = now.wall
                self._schedules_dirty = True
            due = self._due(name)
            if due > now.wall:
                continue
            if now.wall - due > MISSED_AFTER_MS:  # missed (the bus was down): by its policy
                latest = schedule.latest_due(due, now.wall)
                if schedule.missed == "skip":
                    self._out.append(Log("INFO", f"schedule {name}: skipped the firings missed since {state[0]}"))
                else:
                    self._fire(schedule, latest, now)
                state[0] = now.wall  # whatever fell due up to now is handled
            else:
                self._fire(schedule, due, now)
                state[0] = due
            state[3] = [ahead for ahead in state[3] if ahead > state[0]]
            self._schedules_dirty = True

    def _fire(self, schedule: Schedule, due: int, now: Instant) -> None:
        job_id = firing_id(schedule.name, due)
        firings = self._fired[schedule.name][1]
        if job_id in self.jobs or due in self._fired[schedule.name][3]:
            return  # fired already
        if not self.handler_known(schedule.handler, now):
            self._out.append(Log("WARNING", f"schedule {schedule.name}: unknown handler {schedule.handler!r}; firing skipped"))
            return
        spec = Submit(
            handler=schedule.handler, payload=msgspec.Raw(schedule.payload), priority=schedule.priority,
            max_attempts=schedule.max_attempts, timeout_s=schedule.timeout_s, id=job_id,
        )  # fmt: skip
        try:
            check_submit(spec, self.config.max_payload_bytes)
        except QntxError as exc:
            self._out.append(Log("WARNING", f"schedule {schedule.name}: firing skipped: {exc}"))
            return
        job = self._create(spec, now, schedule=schedule.name)
        job.due = due
        self._set_status(job, "queued")
        self._enqueue(job, now.wall)
        firings.append([due, job_id])
        del firings[:-FIRINGS_KEPT]
        self._out.append(Log("INFO", f"schedule {schedule.name} fired job {job_id} (due {due})"))

    def _turn(self, event: Turn, now: Instant) -> None:
        stalled = now.mono - self._last_turn - self.config.dead_after_ms // 2
        if stalled > 0:  # the loop itself was blind meanwhile: nobody is late for that
            for session in self.sessions.values():
                session.last_seen += stalled
        self._last_turn = now.mono
        while self._ended_by_report and next(iter(self._ended_by_report.values())) < now.mono - FINISHED_KEPT_MS:
            self._ended_by_report.pop(next(iter(self._ended_by_report)))
        self._expire(now)
        self._reap_silent(now)
        self._fire_schedules(now)
        self._dispatch(now)
        for job_id, job in self._changed.items():
            self._out.append(Publish(b"job." + job_id.encode(), JobChanged(job=public(job))))
        self._changed.clear()

    def _expire(self, now: Instant) -> None:
        while self._deadlines and self._deadlines[0][0] <= now.mono:
            deadline, lease_id = heapq.heappop(self._deadlines)
            if not self._deadline_current(deadline, lease_id):
                continue
            lease = self.leases[lease_id]
            job = self.jobs[lease.job_id]
            if lease.session is None:  # left by a crash and claimed by no worker
                self._end_lease(lease, taken_back=False)
                self._close_run(job, lease_id, "lost", now.wall, JobError(message="its worker did not come back after a server restart"))
                self._requeue_without_attempt(job, now.wall, "its worker did not come back")
                self._out.append(Log("INFO", f"job {job.id}: no worker claimed lease {lease_id} after the restart; queued again", job))
                continue
            self._stop_run(lease, "expired")
            bump(self.tally, ("expired", job.handler))
            error = JobError(message=f"{TIMED_OUT} {job.timeout_s:g}s (lease {lease_id} expired)")
            self._close_run(job, lease_id, "timed out", now.wall, error)
            self._attempt_failed(job, error, now.wall)

    def _reap_silent(self, now: Instant) -> None:
        """Release the sessions silent for longer than ``dead_after_ms``. Each session
        has one entry in the liveness heap; one heard from since its entry was pushed
        gets a new one at its new deadline, so a turn looks only at what came due."""
        dead_after = self.config.dead_after_ms
        while self._liveness and self._liveness[0][0] < now.mono:
            _, order, session_id = heapq.heappop(self._liveness)
            session = self.sessions.get(session_id)
            if session is None or session.order != order:
                continue  # ended (or replaced by a new session under the same id)
            if now.mono - session.last_seen > dead_after:
                self._release(session, f"worker {session.name} stopped responding", now)
            else:
                heapq.heappush(self._liveness, (session.last_seen + dead_after, order, session_id))

    def _index(self, session: Session) -> None:
        """Tell the free-credit index what the session can take now."""
        free = session.free
        self._free.set(session.id, session.plugin, session.order, free, session.ready and free > 0)

    def _targets(self) -> tuple[Session | None, dict[str, Session | None]]:
        """Where jobs can go now: the plain worker session with the most free slots,
        and for each plugin that runs sessions of its own, its freest one (the first
        to join among equals). An index lookup, not a scan of the sessions."""
        plain = self.sessions.get(self._free.best("") or b"")
        own = {group: self.sessions.get(self._free.best(group) or b"") for group in self._free.plugin_groups()}
        return plain, own

    def _target(self, handler: str, plain: Session | None, own: dict[str, Session | None]):
        """(session, plugin or None) a job of ``handler`` can go to now, or None. A
        plugin with sessions of its own gets its jobs directly, never forwarded."""
        if handler in BUILTIN_HANDLERS:
            return None if plain is None else (plain, None)
        plugin = self.plugins.get(self._routes.get(handler, ""))
        if plugin is None or not plugin.up:
            return None
        if plugin.name in own:  # its sessions' credit is exact, on every host it runs on
            session = own[plugin.name]
        elif plugin.capacity and plugin.load >= plugin.capacity:
            return None
        else:
            session = plain
        return None if session is None else (session, plugin.name)

    def _limited(self, handler: str, mono: int) -> bool:
        """Whether ``handler`` is at its concurrency or rate limit now."""
        limit = self._limits.get(handler)
        if limit is None:
            return False
        if limit.concurrency is not None and self._running.get(handler, 0) >= limit.concurrency:
            return True
        return self._rate_full(handler, mono)

    def _rate_full(self, handler: str, mono: int) -> bool:
        """Whether ``handler`` made as many starts as its rate allows in the last period."""
        limit, starts = self._limits.get(handler), self._starts.get(handler)
        if limit is None or limit.rate is None or not starts:
            return False
        while starts and starts[0] <= mono - limit.per_ms:
            starts.popleft()
        return len(starts) >= limit.rate

    def _next_ready(self, now: Instant, plain: Session | None, own: dict[str, Session | None]):
        """Pop the best job that can go out now (highest priority, then oldest), with
        where it goes; None if nothing can. Jobs of a handler at its limit wait here."""
        self._promote(now.wall)
        best = best_heap = best_target = None
        for handler, heap in list(self._ready.items()):
            while heap and self._tokens.get(heap[0][3]) != heap[0][2]:
                heapq.heappop(heap)  # a job that left the queue meanwhile
                self._ready_count -= 1
            if not heap:
                del self._ready[handler]
                continue
            if (best is None or heap[0] < best) and not self._limited(handler, now.mono):
                target = self._target(handler, plain, own)
                if target is not None:
                    best, best_heap, best_target = heap[0], heap, target
        if best is None:
            return None
        heapq.heappop(best_heap)
        self._ready_count -= 1
        del self._tokens[best[3]]
        return self.jobs[best[3]], best_target

    def _dispatch(self, now: Instant) -> None:
        self._promote(now.wall)  # due ones leave the delayed heap even if nothing can go now
        while self._ready_count or self._delayed:
            if self._next_lease >= self._ceiling:
                return  # waiting for the next block of lease ids to be durable
            plain, own = self._targets()
            if plain is None and not any(own.values()):
                return
            found = self._next_ready(now, plain, own)
            if found is None:
                return
            job, (session, plugin_name) = found
            lease = Lease(self._new_lease_id(), job.id, session.id, now.mono + lease_ms(job.timeout_s), plugin_name)
            self._add_lease(lease)
            session.leases.add(lease.id)
            self._index(session)
            limit = self._limits.get(job.handler)
            if limit is not None and limit.rate is not None:
                self._starts.setdefault(job.handler, deque()).append(now.mono)
                self._limits_dirty = True  # saved with the limit: a restart keeps its window
            endpoint = None
            if plugin_name is not None:
                plugin = self.plugins[plugin_name]
                plugin.load += 1
                if not session.plugin:  # a plain worker forwards it to the plugin
                    endpoint = plugin.endpoint
            job.attempts += 1
            job.runs += 1
            job.lease = lease.id
            # A built-in runs at once; a plugin's handler may wait there for an
            # interpreter, and runs once the plugin says its code started.
            started = plugin_name is None
            job.started_at, job.finished_at = (now.wall if started else None), None
            job.worker, job.progress = session.name, None
            start_run(job, lease.id, session.name, session.host, plugin_name, now.wall)
            self._set_status(job, "running" if started else "dispatched")
            # A built-in (no side effects) goes before the commit and runs while the
            # disk syncs; any other handler only once its run is on disk.
            durable = job.handler not in BUILTIN_HANDLERS
            sent = msgspec.structs.replace(job, history=[])  # the worker needs none of the earlier runs
            self._out.append(SendJob(session.id, Dispatch(lease=lease.id, job=sent, plugin_endpoint=endpoint), durable))


def _schedule_state(state: list) -> list:
    """A schedule's saved state, completed: [last due handled (wall ms), [[due, job
    id], ...], paused as Pulse last saw it, [due times fired while the clock was ahead]]."""
    last, firings, *rest = state
    paused, ahead = (list(rest) + [False, []][len(rest) :])[:2]
    return [last, [list(f) for f in firings], bool(paused), list(ahead)]


def _new_job_id(handler: str, taken: dict[str, Job]) -> str:
    from qntx.asid import new_asid

    while True:
        job_id = new_asid(handler, "_", "_", prefix="JB")
        if job_id not in taken:
            return job_id

