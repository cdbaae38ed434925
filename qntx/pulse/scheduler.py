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

from loguru import logger

from qntx.bus.actor import Request
from qntx.protocol import (
    CancelRunning,
    Dispatch,
    Job,
    JobChanged,
    JobDone,
    JobError,
    JobProgressed,
    JobReply,
    Submit,
    WorkerReady,
)
from qntx.pulse.queue import JobQueue
from qntx.pulse.workers import WorkerPool, WorkerState

BUILTIN_HANDLERS = ("builtin.echo", "builtin.fail", "builtin.sleep")


class Pulse:
    def __init__(
        self,
        queue: JobQueue,
        *,
        dead_after_s: float,
        send_to_worker: Callable[[bytes, object], None],
        publish: Callable[[bytes, object], None],
        plugin_endpoint: Callable[[str], str | None],
        call_later: Callable[[float, Callable[[], None]], object],
    ):
        self.queue = queue
        self.workers = WorkerPool(dead_after_s)
        self._send_to_worker = send_to_worker
        self._publish = publish
        self._plugin_endpoint = plugin_endpoint
        self._call_later = call_later
        self._replies: list[tuple[Request, Job]] = []
        self._outbox: list[tuple[bytes, object]] = []
        self._changed: dict[str, Job] = {}
        self._wakeup_timer = None
        self._wakeup_at: int | None = None

    # ---------------------------------------------------------------- requests

    def handler_available(self, handler: str) -> bool:
        return handler in BUILTIN_HANDLERS or self._plugin_endpoint(handler) is not None

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
        return job

    def change(self, job: Job) -> Job:
        """Record a change made directly on the queue (retry, pause...) for the turn's events."""
        self._changed[job.id] = job
        return job

    def progress(self, job_id: str, current: float, total: float) -> None:
        if self.queue.progress(job_id, current, total) is not None:
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
        self.workers.seen(identity, message.worker, message.pid, message.credit)

    def job_done(self, identity: bytes, message: JobDone) -> None:
        self.workers.touch(identity)
        self.workers.finish(message.job_id)
        if message.progress is not None:
            # Progress notices travel another path and may arrive after this.
            self.queue.progress(message.job_id, message.progress.current, message.progress.total)
        if message.success:
            job = self.queue.complete(message.job_id, message.attempt, message.result, message.logs)
        else:
            error = message.error or JobError(message="failed")
            job = self.queue.fail_attempt(message.job_id, message.attempt, error, message.logs)
            if job is not None and job.status == "queued":
                logger.info("job {} attempt {} failed: {}; retrying", job.id, message.attempt, error.message)
        if job is not None:
            self._changed[job.id] = job

    def reap_workers(self) -> None:
        for worker in self.workers.reap():
            self._release(worker, f"worker {worker.name} stopped responding")

    def _release(self, worker: WorkerState, reason: str) -> None:
        self.workers.remove(worker.identity)
        for job in self.queue.release_worker(worker.name, reason):
            self._changed[job.id] = job
        logger.warning("{}; its jobs went back to the queue", reason)

    # ---------------------------------------------------------------- the turn

    def _dispatch(self) -> None:
        while self.workers.has_free() and self.queue.ready_count():
            worker = self.workers.pick()
            job = self.queue.lease(worker.name, accept=self.handler_available)
            if job is None:
                return
            self.workers.assign(worker, job.id)
            endpoint = None if job.handler in BUILTIN_HANDLERS else self._plugin_endpoint(job.handler)
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
            self.workers.finish(job.id)
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
