"""The scripting API: ``qntx.connect()`` and the ``Bus`` it returns.

The CLI is a thin layer over this module, so a script gets exactly what the
commands do. Attestation calls go to the ATS actor when ``qntx up`` runs, and
straight to the embedded LMDB store when it does not; job calls need the server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from qntx.ats.actor import ats_lock_path
from qntx.bus.client import Client
from qntx.bus.pidlock import lock_holder
from qntx.errors import Invalid
from qntx.protocol import (
    AtsReply,
    Attest,
    Attestation,
    Filter,
    GetAttestation,
    NewAttestation,
    Ping,
    Pong,
    Query,
    Stats,
    StatsReply,
)
from qntx.settings import Settings, load_settings


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not all(isinstance(v, str) for v in value):
        raise Invalid(f"{name} must be strings")
    return list(value)


def new_attestation(
    subjects: str | Sequence[str],
    predicates: str | Sequence[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    actors: str | Sequence[str] | None = None,
    attributes: dict[str, Any] | None = None,
    timestamp: int | None = None,
    source: str | None = None,
    id: str | None = None,
) -> NewAttestation:
    """Build a NewAttestation from friendly arguments (a str stands for a one-item list)."""
    return NewAttestation(
        subjects=_as_list(subjects, "subjects"),
        predicates=_as_list(predicates, "predicates") or ["_"],
        contexts=_as_list(contexts, "contexts") or ["_"],
        actors=_as_list(actors, "actors"),
        attributes=dict(attributes or {}),
        timestamp=timestamp,
        source=source or "python",
        id=id,
    )


class _RemoteAts:
    """The ATS actor over the bus."""

    embedded = False

    def __init__(self, settings: Settings):
        self.client = Client(settings.ats_endpoint, AtsReply, timeout_s=settings.request_timeout_s)

    def ping(self) -> Pong:
        return self.client.request(Ping())

    def attest(self, items: list[NewAttestation]) -> list[Attestation]:
        return self.client.request(Attest(items=items)).records

    def query(self, flt: Filter) -> list[Attestation]:
        return self.client.request(Query(filter=flt)).records

    def get(self, id: str) -> Attestation:
        return self.client.request(GetAttestation(id=id)).record

    def stats(self) -> StatsReply:
        return self.client.request(Stats())

    def close(self) -> None:
        self.client.close()


class _EmbeddedAts:
    """The LMDB store opened in this process (no actor running)."""

    embedded = True

    def __init__(self, settings: Settings):
        from qntx.ats.store import AttestationStore

        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = AttestationStore(settings.ats_path, map_size=settings.ats_map_size)

    def ping(self) -> Pong:
        import os

        return Pong(actor="embedded", pid=os.getpid())

    def attest(self, items: list[NewAttestation]) -> list[Attestation]:
        return self.store.put_many(items)

    def query(self, flt: Filter) -> list[Attestation]:
        return self.store.query(flt)

    def get(self, id: str) -> Attestation:
        from qntx.errors import NotFound

        record = self.store.get(id)
        if record is None:
            raise NotFound(f"no attestation {id}")
        return record

    def stats(self) -> StatsReply:
        return StatsReply(**self.store.stats())

    def close(self) -> None:
        self.store.close()


def ats_is_up(settings: Settings) -> bool:
    """True when an ATS actor serves this home (or the endpoint is remote)."""
    if not settings.ats_endpoint.startswith("ipc://"):
        return True
    return lock_holder(ats_lock_path(settings)) is not None


class Bus:
    """A connection to one QNTX home: attestations, queries and (with `up`) jobs."""

    def __init__(self, settings: Settings, *, embedded: bool | None = None):
        self.settings = settings
        if embedded is None:
            embedded = not ats_is_up(settings)
        self._ats = _EmbeddedAts(settings) if embedded else _RemoteAts(settings)

    @property
    def embedded(self) -> bool:
        """True when attestations go straight to the store (no ATS actor running)."""
        return self._ats.embedded

    # ---------------------------------------------------------------- attestations

    def ping(self) -> Pong:
        return self._ats.ping()

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
        return self._ats.attest([item])[0]

    def attest_many(self, items: Iterable[dict[str, Any] | NewAttestation]) -> list[Attestation]:
        """Store many attestations in one durable transaction (all or nothing)."""
        batch = [
            item if isinstance(item, NewAttestation) else new_attestation(**item) for item in items
        ]
        return self._ats.attest(batch)

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
        return self.query_filter(
            Filter(
                subjects=_as_list(subjects, "subjects"),
                predicates=_as_list(predicates, "predicates"),
                contexts=_as_list(contexts, "contexts"),
                actors=_as_list(actors, "actors"),
                time_start=time_start,
                time_end=time_end,
                source=source,
                limit=limit,
            )
        )

    def query_filter(self, flt: Filter) -> list[Attestation]:
        return self._ats.query(flt)

    def ax(self, text: str, *, limit: int | None = None) -> list[Attestation]:
        """Run an ax query (``"alice is knows of work since '3 days ago'"``)."""
        from qntx.ats.ax import AxSyntaxError, parse_ax

        try:
            flt = parse_ax(text).filter
        except AxSyntaxError as exc:
            raise Invalid(f"ax: {exc}") from None
        if limit is not None:
            flt = msgspec.structs.replace(flt, limit=limit)
        return self.query_filter(flt)

    def get(self, id: str) -> Attestation:
        return self._ats.get(id)

    def stats(self) -> StatsReply:
        return self._ats.stats()

    def close(self) -> None:
        self._ats.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(home: str | Path | None = None, *, embedded: bool | None = None, **settings: Any) -> Bus:
    """Connect to the bus of ``home`` ($QNTX_HOME, default ~/.qntx)."""
    return Bus(load_settings(home, **settings), embedded=embedded)
