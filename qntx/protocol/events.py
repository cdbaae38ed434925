"""What the PUB sockets carry: small notices, never results or bodies.

Every notice an events socket sends fits in NOTICE_MAX_BYTES (its topic and body
together): one that would not is sent in pieces or as its ids only (``fitted``). Each
carries ``seq``, its number in its topic family on that socket (1, 2, 3, ... from the
actor's start), so a subscriber of a whole family can tell what it missed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
    partial: bool = False  # its predicates and contexts were left out (too big): ask the store


class AttestationsStored(Message):
    """One group commit's attestations, as notices, in commit order."""

    stored: list[StoredNotice]
    seq: int = 0  # this notice's number in its topic family (``att.``); 0 from an older actor


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
    seq: int = 0  # this notice's number in its topic family (``job.``); 0 from an older actor
    partial: bool = False  # its handler and worker were left out (too big): ask GetJob


class JobProgressed(msgspec.Struct, kw_only=True):
    """A job's progress, as ``follow`` yields it (from WaitJob's JobUpdate)."""

    job_id: str
    current: float
    total: float


class HandlersRegistered(Message):
    plugin: str
    handler_names: list[str]
    seq: int = 0  # this notice's number in its topic family (``handlers``)
    partial: bool = False  # its names were left out (too many): ask GetStatus


Event = AttestationsStored | JobNotice | HandlersRegistered


def stored_notices(event: object) -> list[StoredNotice]:
    """What an ATS event says was stored (nothing for any other event)."""
    return event.stored if isinstance(event, AttestationsStored) else []


# The most one notice may take on the wire (topic and body). An id, a subject or a
# name is at most 511 bytes, so a notice's ids alone always fit.
NOTICE_MAX_BYTES = 2048


def fitted(
    topic: bytes, event: Event, encode: Callable[[object], bytes], next_seq: Callable[[], int]
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The ``[topic, body]`` messages that say what ``event`` says, each within
    NOTICE_MAX_BYTES and numbered by ``next_seq``, and whether that is the event
    whole. The event itself when it fits; an AttestationsStored that does not, in
    pieces (its notices in order, each piece numbered); anything else, and a single
    attestation's notice too big alone, as its ids only (``partial``). A message
    whose ids alone do not fit is left out: its number is used all the same, so
    subscribers see the gap and read the store. (``event.seq`` is set.)"""
    event.seq = next_seq()
    body = encode(event)
    if len(topic) + len(body) <= NOTICE_MAX_BYTES:
        return [(topic, body)], True
    if isinstance(event, AttestationsStored):
        pieces = list(_pieces(topic, event.stored, encode))
        numbered = [AttestationsStored(stored=piece, seq=event.seq if n == 0 else next_seq()) for n, piece in enumerate(pieces)]
        return [message for piece in numbered for message in _within(topic, piece, encode)], False
    if isinstance(event, JobNotice):
        event = msgspec.structs.replace(event, handler="", worker=None, partial=True)
    elif isinstance(event, HandlersRegistered):
        event = msgspec.structs.replace(event, handler_names=[], partial=True)
    return _within(topic, event, encode), False


_SEQ_ROOM = 9  # the most a number takes in MessagePack


def _pieces(topic: bytes, notices: list[StoredNotice], encode: Callable[[object], bytes]) -> Iterator[list[StoredNotice]]:
    """``notices`` in order, in groups whose AttestationsStored fits (a notice too big
    alone keeps its id only)."""
    empty = len(topic) + len(encode(AttestationsStored(stored=[]))) + _SEQ_ROOM + 8  # (+ "seq" and a list header)
    group: list[StoredNotice] = []
    size = empty
    for notice in notices:
        one = len(encode(notice))
        if empty + one > NOTICE_MAX_BYTES:
            notice = msgspec.structs.replace(notice, predicates=[], contexts=[], partial=True)
            one = len(encode(notice))
        if group and size + one > NOTICE_MAX_BYTES:
            yield group
            group, size = [], empty
        group.append(notice)
        size += one
    if group:
        yield group


def _within(topic: bytes, event: Event, encode: Callable[[object], bytes]) -> list[tuple[bytes, bytes]]:
    body = encode(event)
    return [(topic, body)] if len(topic) + len(body) <= NOTICE_MAX_BYTES else []
