"""The attestation store's interface, and the backend a home's settings choose.

``AtsStore`` is what the ATS actor and the embedded API use, no more. Two backends
implement it: LMDB in the home (``qntx.ats.store``, the default: embedded, nothing to
run) and PostgreSQL (``qntx.ats.store_pg``, ``store = "postgresql://..."``), with the
same records, the same query results in the same order, the same page cursors and the
same commit sequence numbers (tests/unit/test_store.py runs on both).

The actor's write path is the journal's on either: ``log_batches`` makes a group
durable and numbered, ``apply_logged`` brings the indexes up to it (on PostgreSQL the
commit does both, so there is never anything to apply).
"""

from __future__ import annotations

from typing import Protocol

from qntx import db
from qntx.ats.filters import next_page
from qntx.ats.records import Stored
from qntx.errors import QntxError
from qntx.protocol import Attestation, Filter, NewAttestation
from qntx.settings import Settings


class AtsStore(Protocol):
    location: str  # where the store is, for logs and stats (a URL without its password)
    last_query_scanned: int

    def put_many(self, items: list[NewAttestation], *, now_ms: int | None = None) -> list[Attestation]: ...

    def put_batches(
        self, batches: list[list[NewAttestation]], *, now_ms: int | None = None
    ) -> list[list[Attestation] | QntxError]: ...

    def log_batches(
        self, batches: list[list[NewAttestation]], *, now_ms: int | None = None
    ) -> list[Stored | QntxError]: ...

    def apply_logged(self) -> int: ...

    @property
    def logged(self) -> int: ...

    @property
    def logged_seq(self) -> int: ...

    @property
    def indexed_seq(self) -> int: ...

    def get(self, id: str) -> Attestation | None: ...

    def count(self) -> int: ...

    def stats(self) -> dict: ...

    def query(self, flt: Filter) -> list[Attestation]: ...

    def query_page(self, flt: Filter, *, page: int = ..., max_scan: int = ..., max_seeks: int = ...) -> tuple[list[Attestation], str | None]: ...

    def clear_stale_readers(self) -> int: ...

    def close(self) -> None: ...


class StoreCommon:
    """What both backends do the same way on top of ``put_batches`` and ``query_page``."""

    last_query_scanned = 0

    def put_many(self, items: list[NewAttestation], *, now_ms: int | None = None) -> list[Attestation]:
        """Store ``items`` durably, all or nothing; raise the batch's error if any."""
        outcome = self.put_batches([items], now_ms=now_ms)[0]
        if isinstance(outcome, QntxError):
            raise outcome
        return outcome

    def query(self, flt: Filter) -> list[Attestation]:
        """Every attestation matching ``flt`` (up to its limit), newest first (SPEC
        §3.3), page by page (an actor serves single pages instead);
        ``last_query_scanned`` sums the pages'."""
        out: list[Attestation] = []
        scanned, current = 0, flt
        while current is not None:
            records, cursor = self.query_page(current)
            out += records
            scanned += self.last_query_scanned
            current = next_page(flt, cursor, len(out))
        self.last_query_scanned = scanned
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(settings: Settings, *, journal: bool = False, readonly: bool = False) -> AtsStore:
    """The store ``settings`` name: PostgreSQL when ``store`` is a URL (it must be at
    this version's schema: ``qntx db upgrade``), else LMDB under the home (``journal``
    for the ATS actor, its one writer)."""
    if db.is_database_url(settings.store):
        from qntx.ats.store_pg import PgAttestationStore
        from qntx.leader import epoch_from_env

        return PgAttestationStore(settings.store, readonly=readonly, epoch=epoch_from_env())
    from qntx.ats.store import AttestationStore

    return AttestationStore(
        settings.ats_path, map_size=settings.ats_map_size, max_map_size=settings.ats_max_map_size,
        readonly=readonly, journal=journal,
    )  # fmt: skip
