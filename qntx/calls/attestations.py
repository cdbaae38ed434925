"""The attestation calls: store, query (every page), get, stats, ax."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from qntx.ats.store import next_page
from qntx.calls.args import make_filter, new_attestation, parse_query, split_action
from qntx.calls.effects import ATS, Ask, call, read_pages
from qntx.calls.jobs import submit
from qntx.protocol import (
    Attest,
    Attestation,
    Filter,
    GetAttestation,
    NewAttestation,
    Ping,
    Pong,
    Query,
    StatsReply,
)
from qntx.protocol import Stats as StatsRequest


@call
def ping(self) -> Pong:
    return (yield Ask(ATS, Ping()))


@call
def attest(
    self,
    subjects: str | Sequence[str],
    predicates: str | Sequence[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    actors: str | Sequence[str] | None = None,
    attributes: dict[str, Any] | None = None,
    timestamp: int | None = None,
    source: str | None = None,
    id: str | None = None,
) -> Attestation:
    """Store one attestation durably and return the stored record."""
    item = new_attestation(subjects, predicates, contexts, actors, attributes, timestamp, source, id)
    return (yield Ask(ATS, Attest(items=[item]))).records[0]


@call
def attest_many(self, items: Iterable[dict[str, Any] | NewAttestation]) -> list[Attestation]:
    """Store many attestations in one durable transaction (all or nothing)."""
    batch = [item if isinstance(item, NewAttestation) else new_attestation(**item) for item in items]
    return (yield Ask(ATS, Attest(items=batch))).records


@call
def query(
    self,
    subjects: str | Sequence[str] | None = None,
    predicates: str | Sequence[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    actors: str | Sequence[str] | None = None,
    time_start: int | None = None,
    time_end: int | None = None,
    source: str | None = None,
    limit: int | None = None,
) -> list[Attestation]:
    """Attestations matching the filter, newest first."""
    flt = make_filter(subjects, predicates, contexts, actors, time_start, time_end, source, limit)
    return (yield from query_filter(self, flt))


@call
def query_filter(self, flt: Filter) -> list[Attestation]:
    """Every match of ``flt`` (up to its limit), newest first, page after page."""
    found: list[Attestation] = []

    def take(page) -> Query | None:
        found.extend(page.records)
        following = next_page(flt, page.cursor, len(found))
        return None if following is None else Query(filter=following)

    yield from read_pages(ATS, Query(filter=flt), take)
    return found


@call
def query_page(self, flt: Filter) -> tuple[list[Attestation], str | None]:
    """One page of matches, newest first, and the cursor of the next (None: no more);
    pass it back as the filter's ``cursor``."""
    page = yield Ask(ATS, Query(filter=flt))
    return page.records, page.cursor


@call
def ax(self, text: str, *, limit: int | None = None, so: str | None = None, args: Sequence[str] = ()) -> list:
    """Run an ax query (``"alice is knows of work since '3 days ago'"``): its matches.

    With an action (``so="tagger"`` or ``"... so tagger ARGS"`` in the text), enqueue
    one job of that handler per match, whose payload holds the match as
    ``attestation`` and the arguments as ``args``, and return their handles."""
    flt, action = parse_query(text, limit)
    if so is not None:
        action = shlex.join([so, *args])
    if action is not None:
        handler, action_args = split_action(action)  # (a bad action is refused before the query)
    records = yield from query_filter(self, flt)
    if action is None:
        return records
    handles = []
    for record in records:
        payload = {"attestation": msgspec.to_builtins(record), "args": action_args}
        handles.append((yield from submit(self, handler, payload)))
    return handles


@call
def get(self, id: str) -> Attestation:
    return (yield Ask(ATS, GetAttestation(id=id))).record


@call
def stats(self) -> StatsReply:
    return (yield Ask(ATS, StatsRequest()))
