"""Pulse's core: every live job, every lease, every worker session. No I/O.

``PulseCore.handle(event, now) -> commands`` is the whole interface (events and
commands in ``qntx.pulse.events`` and ``qntx.pulse.commands``); the server feeds it what its sockets and
timers observed, commits what ``changes()`` lists, then carries the commands out.
Requests that are wrong raise a ``QntxError``, which the loop answers. The shell
reads the core only through commands and the query methods below.

The core composes one part per concern, each in a module of its own:

* ``qntx.pulse.ledger``: the jobs in memory, their numbers, counts and what of them
  is on disk (what a commit writes, what a prune counts out);
* ``qntx.pulse.queue``: ready and delayed jobs, by route and handler;
* ``qntx.pulse.sessions``: worker sessions (free credit, liveness) and leases;
* ``qntx.pulse.limits``, ``qntx.pulse.deps``, ``qntx.pulse.schedules``: handler
  limits, jobs that run after others, schedules;
* ``qntx.pulse.registry``: the one registry of handlers -> plugin.

The life of a run (dispatch, reports, expiry, lost sessions) is in
``qntx.pulse.runs``; this module takes requests (submit, steer), plugins and
directives, and answers queries.

Runs have identities. Every dispatch makes a **lease**; only a job's current lease
may complete it, report its progress or stream its output; anything for an older
lease is dropped (and logged). A lease ends when its ``JobDone`` arrives, when it
expires (a timeout: that uses an attempt), when its job is cancelled, or when its
session dies or gives it back (infrastructure: no attempt used). On start, jobs a
crash left ``running`` keep their leases for a grace period; a worker that reports
holding one adopts it, and only leases nobody claims go back to the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import msgspec

from qntx.errors import QntxError
from qntx.obs.tally import bump
from qntx.protocol import (
    FINAL_STATUSES,
    RUNNING_STATUSES,
    HandlersRegistered,
    Job,
    JobError,
    Submit,
)
from qntx.pulse.commands import Changes, Log, Publish
from qntx.pulse.deps import Dependencies
from qntx.pulse.directives import FIRINGS_KEPT, Limit, Schedule, firing_id
from qntx.pulse.events import (
    DirectivesSet,
    Finished,
    HandlersAnnounced,
    Instant,
    OutputWritten,
    PluginDown,
    PluginUp,
    Progressed,
    RunClaimed,
    Saved,
    Started,
    Steer,
    Submitted,
    Turn,
    Undeliverable,
    WorkerSeen,
)
from qntx.pulse.history import OutputTails
from qntx.pulse.ledger import WAITING_STATUSES, Ledger, public
from qntx.pulse.limits import Limits
from qntx.pulse.queue import JobQueue
from qntx.pulse.registry import BUILTIN_HANDLERS, Plugin, Registry
from qntx.pulse.requests import Requests
from qntx.pulse.rules import check_submit
from qntx.pulse.runs import Runs
from qntx.pulse.schedules import Schedules
from qntx.pulse.sessions import Lease, Leases, Session, Sessions

__all__ = ["BUILTIN_HANDLERS", "WAITING_STATUSES", "Config", "Lease", "Plugin", "PrunePlan", "PulseCore", "Session", "public"]


@dataclass(frozen=True, slots=True)
class Config:
    dead_after_ms: int = 3_000  # a session silent this long is gone
    adopt_grace_ms: int = 5_000  # how long leases left by a crash wait for their worker
    max_payload_bytes: int = 15 << 20
    # Retention of finished jobs (the core decides what a prune deletes).
    keep_completed_ms: int = 7 * 24 * 3600 * 1000
    keep_failed_ms: int = 30 * 24 * 3600 * 1000
    keep_completed_max: int | None = None


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What one prune batch deletes: finished jobs of each status in ``cutoffs`` that
    ended before it (wall ms), the oldest completed past ``max_completed``; never the
    jobs in ``keep``: those in memory (live, or not saved in their final state yet),
    now and while the batch runs (a read-only view: a retry may bring one back)."""

    cutoffs: dict[str, int]
    max_completed: int | None
    keep: Mapping[str, Job]


class PulseCore(Requests, Runs):
    def __init__(self, config: Config, now: Instant):
        self.config = config
        self._last_turn = now.mono
        self._wall, self._mono = now.wall, now.mono
        self.ledger = Ledger()
        self.queue = JobQueue()
        self.sessions_ = Sessions(config.dead_after_ms)
        self.leases_ = Leases()
        self.limits_ = Limits()
        self.deps = Dependencies()
        self.schedules = Schedules()
        self.registry = Registry()
        self._tails = OutputTails()  # what running runs streamed: kept in their history when they end
        # (what happened, handler) -> how often since start: submitted, started, completed,
        # failed, cancelled, retried, lost, expired (qntx.obs.metrics exports them).
        self.tally: dict[tuple[str, str], int] = {}
        # Jobs to publish at the end of the turn (the objects: a final one may have
        # left memory by then, saved by a commit that ran in between).
        self._changed: dict[str, Job] = {}
        self._out: list[Any] = []
        # The parts' tables, for the core's own tests (the shell uses the queries).
        self.jobs = self.ledger.jobs
        self.leases = self.leases_.by_id
        self.sessions = self.sessions_.by_id
        self.plugins = self.registry.plugins

        self._handlers = {
            Submitted: self._submit,
            WorkerSeen: self._worker_seen,
            RunClaimed: self._run_claimed,
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
        if self.deps.ended:
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
        self.registry.restore(plugins, handler_versions or {})
        self.schedules.restore(schedules or {})
        # The limits last read from ATS apply from the first dispatch on; ATS's current set follows.
        self.limits_.restore(limits or {}, now.wall, now.mono)
        self.ledger.restore_counts(counts, next_seq)
        self.leases_.restore(lease_ceiling)
        self.ledger.meta_dirty = True  # the first commit reserves the first block
        for seq, job in jobs:
            self.ledger.adopt(seq, job)
            if job.status == "queued":
                self._enqueue(job, now.wall)
            elif job.status in RUNNING_STATUSES:
                self._add_lease(Lease(job.lease, job.id, None, now.mono + self.config.adopt_grace_ms))
        for _, job in jobs:
            if job.status == "waiting":
                statuses = self.deps.statuses(job.after, self.jobs.get, ended or {}, strict=False)
                self._start_waiting(job, statuses, now.wall)

    def changes(self) -> Changes | None:
        """Everything changed since the last call, for one commit (None: nothing)."""
        if not self.has_changes():
            return None
        rows, versions = self.ledger.rows()
        return Changes(
            rows=rows,
            versions=versions,
            next_seq=self.ledger.next_seq,
            counts=self.ledger.counts(),
            lease_ceiling=self.leases_.wanted_ceiling,
            plugins=sorted(self.registry.names),
            schedules=self.schedules.snapshot(),
            limits=self.limits_.snapshot(self._wall, self._mono),
            handler_versions=self.registry.versions_snapshot(),
        )

    @property
    def urgent(self) -> bool:
        """A commit is needed now: dispatching waits for the next block of lease ids."""
        return self.leases_.urgent

    def has_changes(self) -> bool:
        return (
            self.ledger.has_changes() or self.schedules.dirty or self.limits_.dirty or self.registry.versions_dirty
        )

    def commit_failed(self) -> None:
        """The last ``changes()`` did not reach the disk: write them again next time."""
        self.ledger.commit_failed()
        self.schedules.dirty = self.limits_.dirty = self.registry.versions_dirty = True

    # ---------------------------------------------------------------- retention

    def prune_plan(self, wall: int, older_than_ms: int | None = None) -> PrunePlan:
        """What the next prune batch deletes (by retention, or everything finished
        older than ``older_than_ms``); from now until ``pruned`` the core notes each
        stored job a retry brings back (that batch may delete it)."""
        if older_than_ms is not None:
            cutoffs, cap = dict.fromkeys(FINAL_STATUSES, wall - older_than_ms), None
        else:
            cutoffs = {
                "completed": wall - self.config.keep_completed_ms,
                "failed": wall - self.config.keep_failed_ms,
                "cancelled": wall - self.config.keep_failed_ms,
            }
            cap = self.config.keep_completed_max
        self.ledger.prune_started()
        return PrunePlan(cutoffs, cap, MappingProxyType(self.jobs))

    def pruned(self, deleted: dict[str, list[str]]) -> None:
        """Finished jobs were deleted from the store: count them out, except those a
        retry took back meanwhile (the retry counted them out of that status)."""
        self.ledger.pruned(deleted)

    def prune_started(self) -> None:  # (kept for the core's tests: prune_plan does it)
        self.ledger.prune_started()

    # ---------------------------------------------------------------- queries

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
        return self.ledger.unsaved()

    def live_jobs(self) -> Mapping[str, Job]:
        """The jobs in memory, read-only and not copied (a listing reads them at once
        instead of decoding them from the store; never keep it)."""
        return MappingProxyType(self.jobs)

    def seq_of(self, job_id: str) -> int:
        return self.ledger.seq_of(job_id)

    def counts(self) -> dict[str, int]:
        return self.ledger.counts()

    def known_handlers(self) -> list[str]:
        return self.registry.known_handlers()

    def live_handlers(self) -> list[str]:
        """Built-ins and the handlers of the plugins up now (what status lists)."""
        return self.registry.live_handlers()

    def plugins_up(self) -> int:
        return sum(1 for p in self.registry.plugins.values() if p.up)

    def session_list(self) -> list[Session]:
        """The sessions joined, by name (read them, never change them)."""
        return sorted(self.sessions.values(), key=lambda s: s.name)

    def has_session(self, session_id: bytes) -> bool:
        return session_id in self.sessions

    def lease_holder(self, lease_id: int, job_id: str) -> tuple[bool, bytes | None]:
        """(whether ``lease_id`` is a current run of ``job_id``, the session holding it:
        None for one left by a crashed server that nobody claimed yet)."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.job_id != job_id:
            return False, None
        return True, lease.session

    def run_started_at(self, job_id: str, lease_id: int) -> tuple[str, int] | None:
        """(handler, when its code started) of the running run under ``lease_id``."""
        job = self.jobs.get(job_id)
        if job is None or job.lease != lease_id or job.status != "running" or not job.started_at:
            return None
        return job.handler, job.started_at

    def next_wakeup(self, now: Instant) -> int | None:
        """Monotonic ms of the next backoff end, lease deadline, liveness check, rate
        window or schedule (None: none)."""
        times = []
        due = self.queue.next_due()
        if due is not None:
            times.append(now.mono + max(0, due - now.wall))
        deadline = self.leases_.next_deadline()
        if deadline is not None:
            times.append(deadline)
        liveness = self.sessions_.next_liveness()
        if liveness is not None:  # may be early (heard from since): that turn pushes it on
            # A little late on purpose: one wakeup judges every session due by then.
            times.append(liveness + max(1, self.config.dead_after_ms // LIVENESS_BATCHES))
        times += self.limits_.rate_wakeups(now.mono, self.queue.has_ready)
        times += self.schedules.wakeups(now.wall, now.mono)
        return min(times) if times else None

    def liveness_due(self, now: Instant) -> bool:
        """Whether the next turn may judge a session's liveness (its input must be read first)."""
        at = self.sessions_.next_liveness()
        return at is not None and at < now.mono

    def session_known(self, session_id: bytes) -> bool:
        """Whether ``session_id`` is a live session."""
        return self.sessions_.get(session_id) is not None

    def session_named(self, name: str) -> Session | None:
        """The live session of the worker called ``name``."""
        return self.sessions_.named(name)

    def dependents(self, job_id: str) -> list[str]:
        """The jobs waiting for ``job_id`` now (the store knows the rest, once saved)."""
        return self.deps.dependents(job_id)

    def limits(self) -> dict[str, Limit]:
        """The limits applied now, by handler."""
        return self.limits_.current()

    def schedule_states(self) -> dict[str, tuple[Schedule, int | None, int | None, list]]:
        return self.schedules.states()

    # ================================================================= bookkeeping

    def _touch(self, job: Job) -> None:
        self.ledger.touch(job)
        self._changed[job.id] = job

    def _set_status(self, job: Job, status: str) -> None:
        self.ledger.set_status(job, status)
        self._changed[job.id] = job
        if status == "running" or status in FINAL_STATUSES:
            bump(self.tally, ("started" if status == "running" else status, job.handler))
            if status != "running":
                self.deps.note_ended(job)  # its dependents hear of it at the end of the event

    def _enqueue(self, job: Job, wall: int) -> None:
        handler = job.handler
        route = "" if handler in BUILTIN_HANDLERS else self.registry.route_of(handler)
        self.queue.add(job.id, handler, route, job.priority, self.ledger.seq[job.id], job.run_after, wall)

    def _log(self, level: str, text: str) -> None:
        self._out.append(Log(level, text))

    # ================================================================= plugins

    def _plugin_up(self, event: PluginUp, now: Instant) -> None:
        plugin, new = self.registry.register(event.name)
        self.ledger.meta_dirty = self.ledger.meta_dirty or new
        was_up, plugin.up = plugin.up, True
        self.registry.set_versions(event.name, event.versions)
        self._announce(plugin, list(event.handlers), fresh=not was_up, now=now)

    def _plugin_down(self, event: PluginDown, now: Instant) -> None:
        plugin = self.plugins.get(event.name)
        if plugin is None or not plugin.up:
            return
        plugin.up = False  # its handlers stay known: jobs for them wait
        for handler in plugin.handlers:
            self._log("INFO", f"Unregistering plugin async handler plugin={plugin.name} handler={handler}")
        self._out.append(Publish(b"handlers", HandlersRegistered(plugin=plugin.name, handler_names=[])))

    def _handlers_announced(self, event: HandlersAnnounced, now: Instant) -> None:
        plugin, _ = self.registry.register(event.name)
        self.registry.set_versions(event.name, event.versions)
        self._announce(plugin, list(event.handlers), fresh=False, now=now)

    def _announce(self, plugin: Plugin, names: list[str], *, fresh: bool, now: Instant) -> None:
        """``plugin`` has these handlers now. Jobs waiting for one it no longer has (or
        never had: they were accepted while it was down) fail: it was deleted. Costs
        the plugin's handlers and the jobs that fail, not every job."""
        before = set(plugin.handlers)
        wanted, lost, refused = self.registry.announce(plugin, names)
        for name in refused:
            owner = self.registry.owner_of(name)
            self._log("ERROR", f"plugin {plugin.name} announced {name} which plugin {owner} owns; ignored")
        for name in lost if not fresh else ():
            self._log("INFO", f"Unregistering plugin async handler plugin={plugin.name} handler={name}")
        for name in wanted:
            if fresh or name not in before:
                self._log("INFO", f"Registering plugin async handler plugin={plugin.name} handler={name}")
        self._out.append(Publish(b"handlers", HandlersRegistered(plugin=plugin.name, handler_names=wanted)))
        gone = (before | self.ledger.waiting_handlers(plugin.name)) - set(wanted)
        for handler in sorted(gone):
            self.registry.remove(handler)
            for job in self.ledger.waiting_jobs(handler):
                if job.status == "queued":
                    self.queue.remove(job.id)
                elif job.status == "waiting":
                    self.deps.stop(job.id)
                job.error = JobError(message=f"handler {handler} was deleted")
                job.finished_at = now.wall
                self._set_status(job, "failed")

    # ================================================================= directives

    def _directives_set(self, event: DirectivesSet, now: Instant) -> None:
        self.limits_.set(event.limits)
        self.schedules.set(event.schedules, now.wall)

    def _fire_schedules(self, now: Instant) -> None:
        self.schedules.fire_due(now.wall, lambda schedule, due: self._fire(schedule, due, now), self._log)

    def _fire(self, schedule: Schedule, due: int, now: Instant) -> None:
        job_id = firing_id(schedule.name, due)
        if job_id in self.jobs or self.schedules.fired_already(schedule.name, due):
            return  # fired already
        if not self.registry.known(schedule.handler):
            self._log("WARNING", f"schedule {schedule.name}: unknown handler {schedule.handler!r}; firing skipped")
            return
        spec = Submit(
            handler=schedule.handler, payload=msgspec.Raw(schedule.payload), priority=schedule.priority,
            max_attempts=schedule.max_attempts, timeout_s=schedule.timeout_s, id=job_id,
        )  # fmt: skip
        try:
            check_submit(spec, self.config.max_payload_bytes)
        except QntxError as exc:
            self._log("WARNING", f"schedule {schedule.name}: firing skipped: {exc}")
            return
        job = self._create(spec, now, schedule=schedule.name)
        job.due = due
        self._set_status(job, "queued")
        self._enqueue(job, now.wall)
        self.schedules.record(schedule.name, due, job_id, FIRINGS_KEPT)
        self._log("INFO", f"schedule {schedule.name} fired job {job_id} (due {due})")

    def _saved(self, event: Saved, now: Instant) -> None:
        self.leases_.ceiling = max(self.leases_.ceiling, event.lease_ceiling)
        self.ledger.saved(event.versions)


LIVENESS_BATCHES = 30  # liveness wakeups may come this fraction of dead_after_ms late
