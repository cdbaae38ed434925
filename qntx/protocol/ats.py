"""The ATS socket's requests and replies."""

from __future__ import annotations

from qntx.bus.messages import ErrorReply, Message, Ping, Pong
from qntx.protocol.records import Attestation, Filter, NewAttestation


class Attest(Message):
    """Store attestations; the reply comes only after they are durably committed."""

    items: list[NewAttestation]


class Attested(Message):
    records: list[Attestation]


class Query(Message):
    filter: Filter


class QueryResult(Message):
    """One page: at most MAX_PAGE records, and work bounded per request. ``cursor``
    set: there may be more; ask again with it in the filter. A page may hold fewer
    records than asked for (even none) and still have a cursor."""

    records: list[Attestation]
    cursor: str | None = None


class GetAttestation(Message):
    id: str


class AttestationReply(Message):
    record: Attestation


class Stats(Message):
    pass


class StatsReply(Message):
    attestations: int
    map_size: int
    used_bytes: int
    path: str


AtsRequest = Ping | Attest | Query | GetAttestation | Stats
AtsReply = Pong | Attested | QueryResult | AttestationReply | StatsReply | ErrorReply
