"""Submitted jobs as a script sees them: acceptance, failure, decoded records.

Submitting is pipelined. ``submit`` makes the job's id itself (a ``JB-`` ASID),
sends the ``Submit`` and returns a handle at once; the server's reply arrives
later and settles the handle's **acceptance**. A job is *accepted* once the server
has committed it to its store (a synced LMDB commit) and said so: from then on
it survives any crash. Until then it may be lost with the server, and
``accepted()`` is how a script waits for the promise, the way a producer waits
for its acknowledgements. A resubmission with the same id is safe: the server
returns the job it already has.

The sync (``qntx.api``) and asyncio (``qntx.aio``) handles share this state and
these helpers; they differ only in how they wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from qntx.bus.codec import raise_if_error
from qntx.errors import Invalid, QntxError, TooLarge
from qntx.obs.trace import current_traceparent
from qntx.protocol import JOB_STATUSES, NIL, ErrorReply, Job, JobChanged, JobError, JobReply, Submit
from qntx.values import now_ms

_encoder = msgspec.msgpack.Encoder()


def encode_payload(payload: Any, limit: int) -> msgspec.Raw:
    """A payload as the raw MessagePack it travels as (refused here if it cannot go)."""
    try:
        raw = msgspec.Raw(_encoder.encode(payload))
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise Invalid(f"the payload cannot be encoded as MessagePack: {exc}") from None
    if len(raw) > limit:
        raise TooLarge(f"payload of {len(raw)} bytes exceeds max_payload_bytes ({limit})")
    return raw


def _value(raw: msgspec.Raw | Any) -> Any:
    if not isinstance(raw, msgspec.Raw):
        return raw
    return None if len(raw) == 0 else msgspec.msgpack.decode(raw)


def decoded(job: Job) -> Job:
    """``job`` with its payload and result as Python values (they travel raw)."""
    return msgspec.structs.replace(job, payload=_value(job.payload), result=_value(job.result))


def decoded_event(event: Any) -> Any:
    if isinstance(event, JobChanged):
        return JobChanged(job=decoded(event.job))
    return event


def submit_message(
    handler: str,
    payload: msgspec.Raw,
    job_id: str,
    *,
    run_at: int | datetime | None = None,
    delay_s: float | None = None,
    after: Any = None,
    **options: Any,
) -> Submit:
    """The Submit for one job. ``run_at`` (Unix ms or an aware datetime) or ``delay_s``
    delays it; ``after`` (job ids or handles) makes it wait for other jobs."""
    if delay_s is not None:
        if run_at is not None:
            raise Invalid("give run_at or delay_s, not both")
        if not isinstance(delay_s, int | float) or isinstance(delay_s, bool) or not 0 <= delay_s < 1e10:
            raise Invalid(f"delay_s must be a number of seconds >= 0, got {delay_s!r}")
        run_at = now_ms() + int(delay_s * 1000)
    run_at = unix_ms(run_at, "run_at")
    if after is None:
        after_ids = []
    else:
        items = [after] if isinstance(after, str) or hasattr(after, "id") else list(after)
        after_ids = [getattr(item, "id", item) for item in items]
    trace = current_traceparent()  # the caller's span, if it uses OpenTelemetry
    return Submit(handler=handler, payload=payload, id=job_id, run_at=run_at, after=after_ids, trace=trace, **options)


class JobFailed(QntxError):
    """A job ended failed or cancelled; ``job`` is its final record."""

    code = "job_failed"

    def __init__(self, job: Job):
        error = job.error or JobError(message=job.status)
        super().__init__(f"job {job.id} {job.status}: {error.message}")
        self.job = job
        self.error = error


def result_of(job: Job) -> Any:
    """The result of a final (decoded) job record; JobFailed unless it completed."""
    if job.status != "completed":
        raise JobFailed(job)
    return job.result


class Acceptance:
    """Where one submission stands: waiting for its reply, accepted, or refused."""

    __slots__ = ("job_id", "_accepted", "_record", "error")

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._accepted: Job | None = None  # the job as accepted, as it came (decoded when asked for)
        self._record: Job | None = None
        self.error: QntxError | None = None

    @property
    def record(self) -> Job | None:
        """The job as accepted (without its payload); None until then. A plain loop
        of submits never asks: its records are not decoded."""
        if self._record is None and self._accepted is not None:
            self._record = decoded(self._accepted)
        return self._record

    @property
    def settled(self) -> bool:
        return self._accepted is not None or self.error is not None

    def settle(self, reply: Any) -> None:
        try:
            reply = raise_if_error(reply)
            if not isinstance(reply, JobReply):
                raise QntxError(f"unexpected reply to Submit: {type(reply).__name__}")
            self._accepted = reply.job
        except QntxError as exc:
            self.error = exc

    def fail(self, error: QntxError) -> None:
        if not self.settled:
            self.error = error

    def outcome(self) -> Job:
        if self.error is not None:
            raise self.error
        assert self._accepted is not None
        return self.record


def unconfirmed(job_id: str, error: QntxError) -> QntxError:
    """The error of a submission whose reply never came."""
    return type(error)(
        f"submission of job {job_id} was not confirmed ({error}); it may or may not have been "
        "accepted: submit it again with the same id to find out"
    )


def first_failure(failures: list[tuple[str, QntxError]]) -> QntxError:
    """One error for a flush that found refused or unconfirmed submissions."""
    job_id, error = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    combined = type(error)(f"job {job_id}: {error}{more}")
    combined.failures = failures  # every (job id, error)
    return combined


__all__ = ["NIL", "Acceptance", "JobFailed", "decoded", "encode_payload", "result_of"]


def unix_ms(value: int | datetime | None, name: str) -> int | None:
    """A time given as Unix ms or an aware datetime, as Unix ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise Invalid(f"{name} must be an aware datetime (with a time zone) or Unix ms")
        return int(value.timestamp() * 1000)
    return value


@dataclass(frozen=True)
class JobSelection:
    """Which jobs a bulk action takes: by status, handler and creation time."""

    status: str | None = None
    handler: str | None = None
    since: int | datetime | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in JOB_STATUSES:
            raise Invalid(f"unknown status {self.status!r} (one of {', '.join(JOB_STATUSES)})")
        object.__setattr__(self, "since", unix_ms(self.since, "since"))

    def ids(self, jobs: list[Job]) -> list[str]:
        return [
            job.id for job in jobs
            if (self.handler is None or job.handler == self.handler) and (self.since is None or job.created_at >= self.since)
        ]  # fmt: skip

    def past(self, jobs: list[Job]) -> bool:
        """Pages come newest first: once one ends before ``since``, no later page matches."""
        return self.since is not None and bool(jobs) and jobs[-1].created_at < self.since


@dataclass
class Steered:
    """What a bulk action did: the jobs it steered, and the ones it skipped (a job
    that changed meanwhile, say) with the reason."""

    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def count(self, job_id: str, reply: Any) -> None:
        if isinstance(reply, ErrorReply):
            self.skipped[job_id] = reply.message
        else:
            self.done.append(job_id)

    def __len__(self) -> int:
        return len(self.done)
