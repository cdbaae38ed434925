"""What the PUB sockets carry: small notices, never results or bodies."""

from __future__ import annotations

import msgspec

from qntx.bus.messages import Message
from qntx.protocol.records import Job


class StoredNotice(msgspec.Struct, kw_only=True):
    """What the ATS events socket says of one stored attestation: what it is about,
    never its subjects' claims in full or its attributes (GetAttestation has those)."""

    id: str
    predicates: list[str]
    contexts: list[str]
    seq: int = 0


class AttestationsStored(Message):
    """One group commit's attestations, as notices, in commit order."""

    stored: list[StoredNotice]


class JobChanged(msgspec.Struct, kw_only=True):
    """A job's new state, as ``follow`` yields it to the one who asked (with its
    result, error and logs). Not a wire message: WaitJob's JobUpdate carries it."""

    job: Job


def job_bytes(job: Job) -> int:
    """About what one job's record costs to hold: its result, logs and error, plus its fields."""
    error = len(job.error.message) + len(job.error.traceback) if job.error else 0
    return 512 + len(job.result) + len(job.logs) + error


class JobNotice(Message):
    """What the events socket says of a job that changed: its identity and state,
    never its payload, result, error or logs (WaitJob or GetJob has those)."""

    id: str
    handler: str
    status: str
    lease: int = 0
    attempts: int = 0
    max_attempts: int = 0
    priority: int = 0
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None
    run_after: int = 0
    worker: str | None = None


class JobProgressed(msgspec.Struct, kw_only=True):
    """A job's progress, as ``follow`` yields it (from WaitJob's JobUpdate)."""

    job_id: str
    current: float
    total: float


class HandlersRegistered(Message):
    plugin: str
    handler_names: list[str]


Event = AttestationsStored | JobNotice | HandlersRegistered


def stored_notices(event: object) -> list[StoredNotice]:
    """What an ATS event says was stored (nothing for any other event)."""
    return event.stored if isinstance(event, AttestationsStored) else []
