"""Pulse: the job scheduler inside the server actor.

Owns the durable ``JobQueue`` and the ``WorkerPool`` and decides what runs where.
The server hands it job messages; each loop turn ends with ``end_turn``, which
leases ready jobs to workers with free credit (dispatching them at once, so
they run while the commit syncs), commits every change of the turn in one
synced transaction, and only then lets replies and events out: nobody hears
"accepted" or "completed" before it is on disk. Nothing polls: a timer is armed for the next backoff expiry or lease
deadline, and new work or freed credit triggers dispatch in the same turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from qntx.bus.actor import Request
from qntx.protocol import (
    CancelRunning,
    Dispatch,
    Job,
    JobChanged,
    JobDone,
    JobError,
    JobOutput,
    JobProgressed,
    JobReply,
    Submit,
    WorkerReady,
)
from qntx.pulse.queue import JobQueue
from qntx.pulse.workers import WorkerPool, WorkerState

BUILTIN_HANDLERS = ("builtin.echo", "builtin.fail", "builtin.sleep")


@dataclass(frozen=True)
class Route:
    """Where a plugin handler runs and how many jobs its plugin takes at once (0: any)."""

    plugin: str
    endpoint: str
    capacity: int = 0


class Pulse:
    def __init__(
        self,
        queue: JobQueue,
        *,
        dead_after_s: float,
        send_to_worker: Callable[[bytes, object], None],
        publish: Callable[[bytes, object], None],
        route: Callable[[str], Route | None],
        cancel_at_plugin: Callable[[str, str], None],
        call_later: Callable[[float, Callable[[], None]], object],
    ):
        self.queue = queue
        self.workers = WorkerPool(dead_after_s)
        self._send_to_worker = send_to_worker
        self._publish = publish
        self._route = route
        self._cancel_at_plugin = cancel_at_plugin
        self._plugin_load: dict[str, int] = {}  # plugin -> its jobs in flight
        # job id -> (worker identity, attempt, plugin or None) of each attempt out there
        self._inflight: dict[str, tuple[bytes, int, str | None]] = {}
        self._removed: set[str] = set()  # handlers a plugin deleted while up
        self._announced: dict[str, set[str]] = {}  # plugin -> the handlers it last announced
        self._call_later = call_later
        self._replies: list[tuple[Request, Job]] = []
        self._outbox: list[tuple[bytes, object]] = []
        self._changed: dict[str, Job] = {}
        self._wakeup_timer = None
        self._wakeup_at: int | None = None

    # ---------------------------------------------------------------- requests

    def handler_available(self, handler: str) -> bool:
        return handler in BUILTIN_HANDLERS or self._route(handler) is not None

    def _can_take(self, handler: str) -> bool:
        """A job of ``handler`` may be dispatched now: flow control reaches through
        to the plugin, so jobs never pile up waiting inside it."""
        if handler in BUILTIN_HANDLERS:
            return True
        route = self._route(handler)
        if route is None:
            return False
        return not route.capacity or self._plugin_load.get(route.plugin, 0) < route.capacity

    def _settle(self, job_id: str, reporter: bytes | None = None, attempt: int | None = None) -> bool:
        """The attempt of ``job_id`` ended (reported, expired, released): free its
        worker slot and plugin slot. A report (``reporter`` and ``attempt`` given)
        settles only the attempt that worker holds; a stale one returns False."""
        held = self._inflight.get(job_id)
        if held is None:
            return reporter is None
        identity, held_attempt, plugin = held
        if reporter is not None and (identity != reporter or held_attempt != attempt):
            return False
        del self._inflight[job_id]
        self.workers.finish(job_id)
        if plugin is not None:
            self._plugin_load[plugin] -= 1
        return True

    def submit(self, message: Submit, request: Request) -> None:
        job, created = self.queue.submit(message)
        if created:
            self._changed[job.id] = job

        self._replies.append((request, job))

    def cancel(self, job_id: str) -> Job:
        holder = self.workers.holder(job_id)
        job = self.queue.cancel(job_id)
        self._changed[job.id] = job
        if holder is not None:
            self._outbox.append((holder.identity, CancelRunning(job_id=job_id)))
            self._settle(job_id)
        return job

    def handlers_announced(self, plugin: str, names: list[str]) -> None:
        """A plugin said which handlers it has (on initialise or a change). What it
        no longer has was deleted, not merely unreachable: waiting jobs of those
        can never run. The first announcement since this server started is
        compared with the jobs waiting for that plugin's handlers (``<plugin>.*``)."""
        now = set(names)
        before = self._announced.get(plugin)
        if before is None:
            before = {h for h in self.queue.waiting_handlers() if h.startswith(plugin + ".")}
        for name in before - now:
            self.handler_removed(name)
        for name in now:
            self._removed.discard(name)
        self._announced[plugin] = now

    def handler_removed(self, handler: str) -> None:
        """A plugin deleted ``handler``: fail its waiting jobs now, and its running
        ones when they end, instead of leaving them queued for ever."""
        self._removed.add(handler)
        for job in self.queue.fail_queued(handler, f"handler {handler} was deleted"):
            self._changed[job.id] = job

    def change(self, job: Job) -> Job:
        """Record a change made directly on the queue (retry, pause...) for the turn's events."""
        self._changed[job.id] = job
        return job

    def output(self, message: JobOutput) -> None:
        """Relay a running job's output to its followers (its logs keep it all)."""
        if message.job_id in self._inflight:
            self._publish(b"job." + message.job_id.encode(), message)

    def progress(self, job_id: str, current: float, total: float, attempt: int = 0) -> None:
        if self.queue.progress(job_id, current, total, attempt) is not None:
            self._publish(b"job." + job_id.encode(), JobProgressed(job_id=job_id, current=current, total=total))

    # ---------------------------------------------------------------- workers

    def worker_ready(self, identity: bytes, message: WorkerReady) -> None:
        if not self.workers.known(identity):
            # A restarted worker comes back under a new identity: whatever the old
            # process held is lost with it, so give it back to the queue now.
            for worker in self.workers.all():
                if worker.name == message.worker and worker.identity != identity:
                    self._release(worker, f"worker {worker.name} restarted")
            logger.info("worker {} (pid {}) joined with capacity {}", message.worker, message.pid, message.credit)
        self.workers.seen(identity, message.worker, message.pid, message.credit, message.running)

    def job_done(self, identity: bytes, message: JobDone) -> None:
        self.workers.touch(identity)
        if not self._settle(message.job_id, identity, message.attempt):
            self.workers.drop_foreign(identity, message.job_id)
            return  # a stale report: that attempt was taken back from this worker
        if message.interrupted:
            job = self.queue.give_back(message.job_id, message.attempt)
            if job is not None:
                self._changed[job.id] = job
            return
        if message.progress is not None:
            # Progress notices travel another path and may arrive after this.
            self.queue.progress(message.job_id, message.progress.current, message.progress.total, message.attempt)
        if message.success:
            job = self.queue.complete(message.job_id, message.attempt, message.result, message.logs)
        else:
            error = message.error or JobError(message="failed")
            job = self.queue.fail_attempt(message.job_id, message.attempt, error, message.logs)
            if job is not None and job.status == "queued" and job.handler in self._removed:
                self.handler_removed(job.handler)
                job = self.queue.get(job.id)
            elif job is not None and job.status == "queued":
                logger.info("job {} attempt {} failed: {}; retrying", job.id, message.attempt, error.message)
        if job is not None:
            self._changed[job.id] = job

    def reap_workers(self) -> None:
        for worker in self.workers.reap():
            self._release(worker, f"worker {worker.name} stopped responding")

    def _release(self, worker: WorkerState, reason: str) -> None:
        for job_id in list(worker.assigned):
            plugin = self._inflight.get(job_id, (None, None, None))[2]
            if plugin is not None:  # its plugin may still run it for a requester that is gone
                self._cancel_at_plugin(plugin, job_id)
            self._settle(job_id)
        self.workers.remove(worker.identity)
        for job in self.queue.release_worker(worker.name, reason):
            self._changed[job.id] = job
        logger.warning("{}; its jobs went back to the queue", reason)

    # ---------------------------------------------------------------- the turn

    def _dispatch(self) -> None:
        while self.workers.has_free() and self.queue.ready_count():
            worker = self.workers.pick()
            job = self.queue.lease(worker.name, accept=self._can_take)
            if job is None:
                return
            self.workers.assign(worker, job.id)
            endpoint = plugin = None
            if job.handler not in BUILTIN_HANDLERS:
                route = self._route(job.handler)
                endpoint, plugin = route.endpoint, route.plugin
                self._plugin_load[plugin] = self._plugin_load.get(plugin, 0) + 1
            self._inflight[job.id] = (worker.identity, job.attempts, plugin)
            # Sent now, before this turn's commit: the worker runs the job while
            # the commit syncs, which halves a job's latency. If the server dies
            # inside that window the submitter never got its acknowledgement (so
            # the job was never accepted) even though the handler may have
            # started; a resubmission can then run it again, as at-least-once
            # allows. A lost lease alone just means the job runs again.
            self._send_to_worker(worker.identity, Dispatch(job=job, plugin_endpoint=endpoint))
            self._changed[job.id] = job

    def end_turn(self) -> None:
        for job in self.queue.expire_leases():
            holder = self.workers.holder(job.id)
            if holder is not None:  # it may still be running there: stop it
                self._outbox.append((holder.identity, CancelRunning(job_id=job.id)))
            self._settle(job.id)
            self._changed[job.id] = job
        self._dispatch()
        if not (self._replies or self._outbox or self._changed):
            return
        self.queue.flush()  # durable before anyone hears about it
        replies, self._replies = self._replies, []
        outbox, self._outbox = self._outbox, []
        changed, self._changed = self._changed, {}
        for request, job in replies:
            request.reply(JobReply(job=job))
        for identity, message in outbox:
            self._send_to_worker(identity, message)
        for job in changed.values():
            self._publish(b"job." + job.id.encode(), JobChanged(job=job))
        self._arm_wakeup()

    def _arm_wakeup(self) -> None:
        """A timer for the next retry backoff or lease deadline; no polling tick."""
        at = self.queue.next_wakeup_ms()
        if at is None or at == self._wakeup_at:
            return
        if self._wakeup_timer is not None:
            self._wakeup_timer.cancel()
        self._wakeup_at = at
        delay = max(0.0, at / 1000 - time.time()) + 0.001
        self._wakeup_timer = self._call_later(delay, self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._wakeup_at = None
        self._wakeup_timer = None
        self.end_turn()
        self._arm_wakeup()

    def get(self, job_id: str) -> Job:
        return self.queue.get(job_id)
