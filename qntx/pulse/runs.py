"""The life of a run in Pulse's core: dispatch, reports, expiry, lost sessions. No I/O.

Part of ``PulseCore`` (``qntx.pulse.core``), which composes the parts this uses:
the queue, the sessions and leases, the limits, the registry and the ledger.

Dispatch costs the same however many sessions and handlers there are: the routes
with a free session come from the free-credit index (one per plugin that runs
sessions, plus plain workers), and each route's best ready job from its heap of
handlers (``qntx.pulse.queue``). A plugin's jobs go to the sessions that plugin runs
for itself and nowhere else: there is no forwarding through a plain worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from qntx.obs.tally import bump
from qntx.protocol import (
    RUNNING_STATUSES,
    TIMED_OUT,
    CancelRunning,
    Dispatch,
    Job,
    JobChanged,
    JobError,
    JobProgressed,
    Progress,
)
from qntx.pulse.commands import (
    CancelAtPlugin,
    ClosePipe,
    Log,
    OpenPipe,
    Publish,
    SendControl,
    SendJob,
)
from qntx.pulse.events import (
    Finished,
    Instant,
    OutputWritten,
    Progressed,
    RunClaimed,
    Started,
    Turn,
    Undeliverable,
    WorkerSeen,
)
from qntx.pulse.history import claim_run, end_run, forget_run, late_logs, start_run
from qntx.pulse.ledger import BIG_PAYLOAD_BYTES, public
from qntx.pulse.registry import BUILTIN_HANDLERS
from qntx.pulse.rules import MAX_LOST_RUNS, backoff_ms, bound_logs, lease_ms
from qntx.pulse.sessions import Lease, Session

if TYPE_CHECKING:
    from qntx.pulse.core import PulseCore as _Core
else:
    _Core = object


class Runs(_Core):
    # ---------------------------------------------------------------- leases

    def _add_lease(self, lease: Lease) -> None:
        self.leases_.add(lease)
        self.limits_.lease_added(self.jobs[lease.job_id].handler)

    def _end_lease(self, lease: Lease, *, taken_back: bool) -> None:
        """The lease is over for Pulse. ``taken_back``: its worker was not told by its
        own report, so it may still run it (it holds a slot until it stops saying so)."""
        self.leases_.remove(lease)
        self.limits_.lease_ended(self.jobs[lease.job_id].handler)
        session = self.sessions_.get(lease.session)
        if session is not None:
            session.leases.discard(lease.id)
            if taken_back:
                session.foreign.add(lease.id)
                self.leases_.taken_back[lease.id] = session.id
            self.sessions_.index(session)

    def _stop_run(self, lease: Lease, reason: str) -> None:
        """Take a lease back from a worker that may still be running it, and tell it."""
        if lease.session is not None:
            self._out.append(SendControl(lease.session, CancelRunning(lease=lease.id, job_id=lease.job_id)))
        if lease.plugin is not None:
            self._out.append(CancelAtPlugin(lease.plugin, lease.job_id, lease.id))
        self._end_lease(lease, taken_back=True)

    def _close_run(self, job: Job, lease_id: int, outcome: str, wall: int, error: JobError | None = None, logs: str | None = None) -> None:
        """Record how the run under ``lease_id`` ended in the job's history; without
        logs of its own (it did not report) it keeps what it streamed."""
        streamed = self._tails.take(lease_id)
        job.logs = bound_logs(logs or streamed)
        end_run(job, lease_id, outcome, wall, error=error, logs=job.logs)

    def _requeue_without_attempt(self, job: Job, wall: int, why: str) -> None:
        """The run was lost to infrastructure: queue it again at once, no attempt used."""
        job.attempts = max(0, job.attempts - 1)
        job.lost += 1
        lost = job.lost
        bump(self.tally, ("lost", job.handler))
        deleted = self.registry.unroutable(job.handler)
        if lost > MAX_LOST_RUNS or deleted:
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
        if self.registry.unroutable(job.handler):
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

    def _current_lease(self, job_id: str, lease_id: int) -> tuple[Job, Lease] | None:
        job = self.jobs.get(job_id)
        lease = self.leases.get(lease_id)
        if job is None or lease is None or lease.job_id != job_id or job.lease != lease_id:
            return None
        return job, lease

    # ---------------------------------------------------------------- sessions

    def _worker_seen(self, event: WorkerSeen, now: Instant) -> None:
        message = event.message
        session = self.sessions_.get(event.session)
        if session is None:
            other = self.sessions_.named(message.worker)
            if other is not None:  # the same worker, restarted: the old one is gone
                self._release(other, f"worker {other.name} restarted", now)
            session = self.sessions_.join(event.session, message.worker, message.pid, now.mono)
            self._out.append(OpenPipe(event.session))
            self._log("INFO", f"worker {message.worker} (pid {message.pid}) joined with capacity {message.credit}")
        session.credit = max(0, message.credit) if isinstance(message.credit, int) else 0
        session.pid = message.pid
        session.plugin = message.plugin
        session.host = message.host if isinstance(message.host, str) else ""
        session.last_seen = now.mono
        session.ready = event.pipe_ready
        reported = set(message.leases)
        taken_back = self.leases_.taken_back
        for lease_id in session.foreign - reported:  # it stopped running them: their slots are free
            if taken_back.get(lease_id) == session.id:
                del taken_back[lease_id]
        session.foreign &= reported
        for lease_id in sorted(reported - session.leases):
            lease = self.leases.get(lease_id)
            if lease is not None and lease.session is None:
                self._claim(lease, session, now)
            elif lease_id in session.foreign or lease is not None or lease_id not in self.leases_.ended_by_report:
                # A run Pulse took back (expired, cancelled, its session given up for
                # dead) or never knew: stop it, and ask again while it is still listed.
                session.foreign.add(lease_id)
                self._out.append(SendControl(session.id, CancelRunning(lease=lease_id)))
            # else: it ended with its JobDone; the heartbeat was sent before that arrived
        self.sessions_.index(session)

    def _run_claimed(self, event: RunClaimed, now: Instant) -> None:
        lease, session = self.leases.get(event.lease), self.sessions_.get(event.session)
        if lease is not None and session is not None and lease.session is None:
            self._claim(lease, session, now)

    def _claim(self, lease: Lease, session: Session, now: Instant) -> None:
        """A worker still runs a lease a crashed server left: it is its again."""
        job = self.jobs[lease.job_id]
        lease.session = session.id
        self.leases_.extend(lease, now.mono + lease_ms(job.timeout_s))
        session.leases.add(lease.id)
        self.sessions_.index(session)
        if job.handler not in BUILTIN_HANDLERS:
            lease.plugin = self.registry.route_of(job.handler)
        if job.worker != session.name:
            job.worker = session.name
            self._touch(job)
        claim_run(job, lease.id, session.name, session.host)
        self._log("INFO", f"worker {session.name} still runs job {job.id} (lease {lease.id}): adopted")

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
        taken_back = self.leases_.taken_back
        for lease_id in [i for i in session.foreign if taken_back.get(i) == session.id]:
            del taken_back[lease_id]
        self.sessions_.leave(session)
        self._out.append(ClosePipe(session.id))
        self._log("WARNING", f"{reason}; its {count} job(s) went back to the queue" if count else reason)

    # ---------------------------------------------------------------- reports

    def _finished(self, event: Finished, now: Instant) -> None:
        done = event.message
        current = self._current_lease(done.job_id, done.lease)
        if current is None:
            session_id = self.leases_.taken_back.pop(done.lease, None)
            session = self.sessions_.get(session_id)
            if session is not None:
                session.foreign.discard(done.lease)
                self.sessions_.index(session)
            job = self.jobs.get(done.job_id)
            if job is not None and late_logs(job, done.lease, bound_logs(done.logs)):
                self._touch(job)  # an ended run's own logs, come after it was taken back
            self._log("DEBUG", f"discarded the result of job {done.job_id} lease {done.lease}: not its current run")
            return
        job, lease = current
        self._end_lease(lease, taken_back=False)
        self.leases_.ended_by_report[lease.id] = now.mono
        if done.progress is not None:
            job.progress = done.progress
        if done.interrupted:
            why = done.error.message if done.error is not None else "interrupted"
            self._close_run(job, lease.id, "lost", now.wall, JobError(message=why), done.logs)
            self._requeue_without_attempt(job, now.wall, "interrupted")
            return
        if job.status == "dispatched" and done.started_at > 0:  # ended before it said it started
            job.started_at = min(done.started_at, now.wall)
            self._set_status(job, "running")  # (queued -> running -> its end, as every run goes)
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

    def _undeliverable(self, event: Undeliverable, now: Instant) -> None:
        lease = self.leases.get(event.lease)
        if lease is None:
            return
        session = self.sessions_.get(lease.session)
        if session is not None:
            session.ready = False  # until its next heartbeat says it is connected
            self.sessions_.index(session)
        job = self.jobs[lease.job_id]
        self._end_lease(lease, taken_back=False)
        self._tails.take(lease.id)
        forget_run(job, lease.id)
        self.limits_.unstarted(job.handler)  # it never started: it does not count against a rate
        job.runs -= 1  # it never left: not a run at all
        job.lost -= 1
        self._requeue_without_attempt(job, now.wall, "undeliverable")

    # ---------------------------------------------------------------- turns

    def _turn(self, event: Turn, now: Instant) -> None:
        stalled = now.mono - self._last_turn - self.config.dead_after_ms // 2
        if stalled > 0:  # the loop itself was blind meanwhile: nobody is late for that
            self.sessions_.stalled(stalled)
        self._last_turn = now.mono
        self.leases_.forget_reports(now.mono)
        self._expire(now)
        for session in self.sessions_.silent(now.mono):
            self._release(session, f"worker {session.name} stopped responding", now)
        self._fire_schedules(now)
        self._dispatch(now)
        for job_id, job in self._changed.items():
            self._out.append(Publish(b"job." + job_id.encode(), JobChanged(job=public(job))))
        self._changed.clear()

    def _expire(self, now: Instant) -> None:
        for lease in self.leases_.expired(now.mono):
            if self.leases.get(lease.id) is not lease:
                continue  # ended meanwhile
            job = self.jobs[lease.job_id]
            if lease.session is None:  # left by a crash and claimed by no worker
                self._end_lease(lease, taken_back=False)
                self._close_run(job, lease.id, "lost", now.wall, JobError(message="its worker did not come back after a server restart"))
                self._requeue_without_attempt(job, now.wall, "its worker did not come back")
                self._out.append(Log("INFO", f"job {job.id}: no worker claimed lease {lease.id} after the restart; queued again", job))
                continue
            self._stop_run(lease, "expired")
            bump(self.tally, ("expired", job.handler))
            error = JobError(message=f"{TIMED_OUT} {job.timeout_s:g}s (lease {lease.id} expired)")
            self._close_run(job, lease.id, "timed out", now.wall, error)
            self._attempt_failed(job, error, now.wall)

    def _open_routes(self) -> list[str]:
        """The routes a job can go to now: each with a ready session that has a free
        slot (an index lookup per route) and, for a plugin's, the plugin up."""
        return [r for r in self.queue.routes() if self.registry.is_up(r) and self.sessions_.best(r) is not None]

    def _dispatch(self, now: Instant) -> None:
        queue, leases, limits = self.queue, self.leases_, self.limits_
        queue.promote(now.wall)  # due ones leave the delayed heap even if nothing can go now
        queue.unpark()
        limited = lambda handler: limits.limited(handler, now.mono)  # noqa: E731
        routes = self._open_routes()
        while routes:
            if not leases.can_issue():
                return  # waiting for the next block of lease ids to be durable
            found = queue.pop_best(routes, limited)
            if found is None:
                return
            job_id, route = found
            session = self.sessions_.best(route)
            self._send(self.jobs[job_id], session, route or None, now)
            if session.free <= 0 and self.sessions_.best(route) is None:
                routes.remove(route)

    def _send(self, job: Job, session: Session, plugin_name: str | None, now: Instant) -> None:
        lease_id, reserve = self.leases_.issue()
        self.ledger.meta_dirty = self.ledger.meta_dirty or reserve
        lease = Lease(lease_id, job.id, session.id, now.mono + lease_ms(job.timeout_s), plugin_name)
        self._add_lease(lease)
        session.leases.add(lease.id)
        self.sessions_.index(session)
        self.limits_.started(job.handler, now.mono)
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
        # disk syncs; any other handler only once its run is on disk. So does a big
        # payload: its encoding for the worker is made once the commit's own copy of
        # it (the store's pages being written) is gone, never beside it.
        durable = job.handler not in BUILTIN_HANDLERS or len(job.payload) > BIG_PAYLOAD_BYTES
        sent = msgspec.structs.replace(job, history=[])  # the worker needs none of the earlier runs
        self._out.append(SendJob(session.id, Dispatch(lease=lease.id, job=sent), durable))
