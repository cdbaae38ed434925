"""The job calls: submit and chain, read (every page), steer one or many, status.

Besides effects, a call uses three things of its driver: ``settings``,
``_server_up()`` (False only for the blocking API on a home whose server is not
running: it then reads Pulse's store itself) and ``_forget_outcome(id)`` (a job
retried: an outcome held for it is stale)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from qntx.asid import new_asid
from qntx.calls.effects import ATS, SERVER, Ask, AskEach, Enqueue, call, read_pages
from qntx.calls.local import read_pulse, stored_job, with_local_actors
from qntx.errors import Invalid, QntxError
from qntx.handles import JobSelection, Steered, decoded, encode_payload, submit_message
from qntx.protocol import (
    JOB_STATUSES,
    MAX_PAGE,
    CancelJob,
    GetJob,
    GetStatus,
    Job,
    ListJobs,
    PauseJob,
    Ping,
    Prune,
    ResumeJob,
    RetryJob,
    StatusReply,
)
from qntx.pulse.directives import seconds_to_ms


@call
def submit(
    self,
    handler: str,
    payload: Any = None,
    *,
    priority: int = 0,
    max_attempts: int = 3,
    timeout_s: float = 300.0,
    idempotency_key: str | None = None,
    parent_id: str | None = None,
    id: str | None = None,
    run_at: int | datetime | None = None,
    delay_s: float | None = None,
    after: Any = None,
    after_policy: str = "completed",
    version: str | None = None,
) -> Any:
    """Enqueue a job and return its handle at once; ``handle.accepted()`` waits for
    the server's durable acceptance, ``handle.result()`` for the outcome. ``id``
    (default: a fresh ``JB-`` ASID) makes a resubmission safe; with an
    ``idempotency_key``, the handle's ``id`` is the job the key names.

    ``run_at`` (Unix ms or an aware datetime) or ``delay_s`` delays the job; it
    waits in Pulse's store. ``after`` (job ids or handles) makes it wait until
    those jobs ended: it runs if they all completed, and fails if one failed or
    was cancelled (``after_policy="always"``: it runs anyway). ``version`` pins a
    handler version (default: the one current now, which it keeps)."""
    job_id = id or new_asid(handler if isinstance(handler, str) else "_", prefix="JB")
    message = submit_message(
        handler, encode_payload(payload, self.settings.max_payload_bytes), job_id,
        priority=priority, max_attempts=max_attempts, timeout_s=timeout_s,
        idempotency_key=idempotency_key, parent_id=parent_id, run_at=run_at, delay_s=delay_s,
        after=after, after_policy=after_policy, version=version,
    )  # fmt: skip
    return (yield Enqueue(job_id, message, idempotency_key is not None))


@call
def chain(self, *steps: str | tuple | dict) -> list:
    """Submit jobs that run one after the other: each waits for the one before
    (and fails if it fails), and names it as its parent. A step is a handler
    name, ``(handler, payload)`` or a dict of ``submit`` arguments."""
    read: list[dict] = []
    for step in steps:
        if isinstance(step, str):
            step = {"handler": step}
        elif isinstance(step, tuple):
            step = dict(zip(("handler", "payload"), step, strict=False))
        elif not isinstance(step, dict):
            raise Invalid(f"a chain step is a handler, (handler, payload) or a dict, got {step!r}")
        _SUBMIT.bind(self, **step)  # a misspelt argument in any step: TypeError before the first is sent
        read.append(step)
    handles: list = []
    for step in read:
        if handles:  # after the one before (and whatever else the step names)
            extra = step.get("after")
            extra = [] if extra is None else [extra] if isinstance(extra, str) or hasattr(extra, "id") else list(extra)
            step = {"parent_id": handles[-1].id, **step, "after": [handles[-1].id, *extra]}
        handles.append((yield from submit(self, **step)))
    return handles


_SUBMIT = inspect.signature(submit)


@call
def job(self, id: str) -> Job:
    if not self._server_up():
        return decoded(read_pulse(self.settings, lambda store: stored_job(store, id), empty=lambda: stored_job(None, id)))
    return decoded((yield Ask(SERVER, GetJob(id=id))).job)


@call
def dependents(self, id: str) -> list[str]:
    """The ids of the jobs that run after job ``id`` (waiting for it, or run since)."""
    if not self._server_up():
        def read(store) -> list[str]:
            stored_job(store, id)  # NotFound for no such job
            return store.dependents(id)

        return read_pulse(self.settings, read, empty=lambda: stored_job(None, id))
    return (yield Ask(SERVER, GetJob(id=id))).dependents


def _check_listing(status: str | None, limit: int) -> None:
    if status is not None and status not in JOB_STATUSES:
        raise Invalid(f"unknown status {status!r} (one of {', '.join(JOB_STATUSES)})")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        raise Invalid(f"limit must be a positive whole number, got {limit!r}")


@call
def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
    """Jobs newest first (without payloads), up to ``limit``, page after page. With
    no server running, read from the store (read-only)."""
    _check_listing(status, limit)
    if not self._server_up():
        newest = lambda store: [decoded(job) for _, _, job in store.newest(status, limit)]  # noqa: E731
        return read_pulse(self.settings, newest, empty=list)
    found: list[Job] = []

    def take(reply) -> ListJobs | None:
        found.extend(decoded(job) for job in reply.jobs)
        if reply.cursor is None or len(found) >= limit:
            return None
        return ListJobs(status=status, limit=min(limit - len(found), MAX_PAGE), cursor=reply.cursor)

    yield from read_pages(SERVER, ListJobs(status=status, limit=min(limit, MAX_PAGE)), take)
    return found[:limit]


@call
def jobs_page(self, status: str | None = None, limit: int = 50, cursor: str | None = None) -> tuple[list[Job], str | None]:
    """One page of jobs, newest first (without payloads), and the cursor of the next
    page (None: no more); ``limit`` at most MAX_PAGE."""
    _check_listing(status, limit)
    reply = yield Ask(SERVER, ListJobs(status=status, limit=limit, cursor=cursor))
    return [decoded(job) for job in reply.jobs], reply.cursor


@call
def prune(self, older_than_s: float | None = None) -> dict[str, int]:
    """Delete finished jobs now: those past their retention (``keep_completed_s``,
    ``keep_failed_s``, ``keep_completed_max``), or every one that finished more
    than ``older_than_s`` ago. The server also does this in the background.
    Returns how many of each status went."""
    older_ms = None
    if older_than_s is not None:
        older_ms = 0 if older_than_s == 0 else seconds_to_ms(older_than_s, "older_than_s")
    timeout_s = max(60.0, self.settings.request_timeout_s)
    return (yield Ask(SERVER, Prune(older_than_ms=older_ms), timeout_s)).deleted


@call
def cancel(self, id: str) -> Job:
    return decoded((yield Ask(SERVER, CancelJob(id=id))).job)


@call
def retry(self, id: str, *, latest: bool = False) -> Job:
    """Run a failed or cancelled job again, with the handler version it ran
    (``latest=True``: the current one)."""
    job = decoded((yield Ask(SERVER, RetryJob(id=id, latest=latest))).job)
    self._forget_outcome(id)  # its old final record is not its outcome now
    return job


@call
def pause(self, id: str) -> Job:
    """Hold a queued job (it keeps its place) until ``resume``."""
    return decoded((yield Ask(SERVER, PauseJob(id=id))).job)


@call
def resume(self, id: str) -> Job:
    return decoded((yield Ask(SERVER, ResumeJob(id=id))).job)


@call
def matching_jobs(
    self, *, status: str | None = None, handler: str | None = None, since: int | datetime | None = None
) -> list[str]:
    """The ids of the jobs with ``status``, of ``handler``, created at or after
    ``since`` (Unix ms or an aware datetime), newest first: read page by page, once."""
    selection = JobSelection(status, handler, since)
    ids: list[str] = []

    def take(reply) -> ListJobs | None:
        ids.extend(selection.ids(reply.jobs))
        if reply.cursor is None or selection.past(reply.jobs):
            return None
        return ListJobs(status=status, limit=MAX_PAGE, cursor=reply.cursor)

    yield from read_pages(SERVER, ListJobs(status=status, limit=MAX_PAGE), take)
    return ids


@call
def retry_jobs(
    self, *, status: str = "failed", handler: str | None = None, since: int | datetime | None = None,
    latest: bool = False,
) -> Steered:  # fmt: skip
    """Retry every job that matches (``status`` failed or cancelled), each once."""
    ids = yield from matching_jobs(self, status=status, handler=handler, since=since)
    return (yield from retry_many(self, ids, latest=latest))


@call
def cancel_jobs(
    self, *, status: str | None = None, handler: str | None = None, since: int | datetime | None = None
) -> Steered:
    """Cancel every job that matches (and is not final yet), each once."""
    if status is None and handler is None and since is None:
        raise Invalid("cancel_jobs needs a status, a handler or a time to choose the jobs")
    ids = yield from matching_jobs(self, status=status, handler=handler, since=since)
    return (yield from cancel_many(self, ids))


@call
def retry_many(self, ids: Iterable[str], *, latest: bool = False) -> Steered:
    """Retry each of ``ids`` once, pipelined; what was skipped (not failed or
    cancelled any more, say) is in ``Steered.skipped``."""
    return (yield from _steer_each(self, ids, lambda i: RetryJob(id=i, latest=latest, brief=True)))


@call
def cancel_many(self, ids: Iterable[str]) -> Steered:
    """Cancel each of ``ids`` once, pipelined (final ones are skipped)."""
    return (yield from _steer_each(self, ids, lambda i: CancelJob(id=i, brief=True)))


def _steer_each(self, ids: Iterable[str], message: Callable[[str], Any]):
    unique = list(dict.fromkeys(ids))
    replies = yield AskEach(SERVER, [message(i) for i in unique])
    steered = Steered()
    for job_id, reply in zip(unique, replies, strict=True):
        steered.count(job_id, reply)
        self._forget_outcome(job_id)
    return steered


@call
def status(self) -> StatusReply:
    """Every actor with pid/endpoint/health, queue depth by status, registered handlers."""
    reply = yield Ask(SERVER, GetStatus())
    pong = None
    if not self.embedded:
        try:
            pong = yield Ask(ATS, Ping())
        except QntxError:
            pass
    return with_local_actors(self.settings, reply, pong)

