"""Requests to Pulse's core: submit a job, and steer one (cancel, retry, pause,
resume); and what waits for other jobs to end. No I/O.

Part of ``PulseCore`` (``qntx.pulse.core``): it uses the ledger, the queue and the
dependencies the core composes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from qntx.errors import Conflict, Invalid, NotFound
from qntx.obs.tally import bump
from qntx.protocol import FINAL_STATUSES, NIL, RUNNING_STATUSES, Job, JobError, JobReply, Submit
from qntx.pulse.commands import Reply
from qntx.pulse.events import Instant, Steer, Submitted
from qntx.pulse.ledger import STORED, public
from qntx.pulse.rules import check_submit

if TYPE_CHECKING:
    from qntx.pulse.core import PulseCore as _Core
else:
    _Core = object


class Requests(_Core):
    def _submit(self, event: Submitted, now: Instant) -> None:
        spec = event.spec
        check_submit(spec, self.config.max_payload_bytes)
        existing_id = spec.id if spec.id in self.jobs else self.ledger.owner_of_key(spec.idempotency_key)
        if existing_id is not None or event.existing is not None:
            # A resubmission: the same job, durable once its first submission is.
            job = self.jobs[existing_id] if existing_id is not None else event.existing
            payload = job.payload
            if payload is STORED and event.existing is not None:  # let go: the shell read it back
                payload = event.existing.payload
            if job.id == spec.id and spec.idempotency_key is None and (
                job.handler != spec.handler or payload != spec.payload
            ):
                raise Conflict(f"job id {spec.id} is taken by another job (a different handler or payload)")
            durable = self.ledger.is_unsaved(job.id)
            self._out.append(Reply(event.reply_to, JobReply(job=public(job)), durable=durable))
            return
        if not self.registry.known(spec.handler):
            raise NotFound(f"unknown handler {spec.handler!r} (known handlers: {', '.join(self.known_handlers())})")
        if spec.id is not None and spec.id in spec.after:
            raise Invalid(f"job {spec.id} cannot run after itself")
        statuses = self.deps.statuses(spec.after, self.jobs.get, event.ended, strict=True) if spec.after else {}
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
            version=spec.version or self.registry.version_of(spec.handler),
        )  # fmt: skip
        self.ledger.add(job)
        return job

    def _start_waiting(self, job: Job, statuses: dict[str, str], wall: int) -> None:
        """Queue ``job`` once the jobs it runs after have ended (now, if they have)."""
        pending, failed = self.deps.split(statuses)
        if failed and job.after_policy == "completed":
            self._after_failed(job, *failed[0], wall)
        elif pending:
            self.deps.wait(job.id, pending)
            if job.status != "waiting":
                self._set_status(job, "waiting")
        else:
            self._set_status(job, "queued")
            self._enqueue(job, wall)

    def _after_failed(self, job: Job, dep: str, status: str, wall: int) -> None:
        job.error = JobError(message=f"job {dep}, which it runs after, {status}")
        job.finished_at = wall
        self._set_status(job, "failed")

    def _settle_dependents(self, wall: int) -> None:
        """Jobs that ended this event: start (or fail) what waited for them. A failure
        spreads down a chain one job at a time, without recursion."""
        while (found := self.deps.next_ended()) is not None:
            done, waiting = found
            for job_id in waiting:
                job = self.jobs.get(job_id)
                if job is None or job.status != "waiting":
                    continue
                pending = self.deps.arrived(job_id, done.id)
                if pending is None:
                    continue
                if done.status != "completed" and job.after_policy == "completed":
                    self.deps.stop(job.id)
                    self._after_failed(job, done.id, done.status, wall)
                elif not pending:
                    self.deps.done_waiting(job_id)
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
            self.ledger.adopt(event.stored_seq, job)
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
            self.queue.remove(job.id)
        elif job.status == "waiting":
            self.deps.stop(job.id)
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
        statuses = self.deps.statuses(job.after, self.jobs.get, ended, strict=False)
        bump(self.tally, ("retried", job.handler))
        job.attempts, job.lost, job.error, job.run_after, job.result, job.logs = 0, 0, None, 0, NIL, ""
        job.started_at = job.finished_at = job.worker = job.progress = None
        if latest:
            job.version = self.registry.version_of(job.handler)
        if job.after:  # it waits again for what it runs after (or fails again on it)
            self._start_waiting(job, statuses, now.wall)
        else:
            self._set_status(job, "queued")
            self._enqueue(job, now.wall)

    def _pause(self, job: Job, now: Instant) -> None:
        if job.status != "queued":
            raise Conflict(f"only queued jobs can be paused; {job.id} is {job.status}")
        self.queue.remove(job.id)
        self._set_status(job, "paused")

    def _resume(self, job: Job, now: Instant) -> None:
        if job.status != "paused":
            raise Conflict(f"only paused jobs can be resumed; {job.id} is {job.status}")
        self._set_status(job, "queued")
        self._enqueue(job, now.wall)


def _new_job_id(handler: str, taken: dict[str, Job]) -> str:
    from qntx.asid import new_asid

    while True:
        job_id = new_asid(handler, "_", "_", prefix="JB")
        if job_id not in taken:
            return job_id
