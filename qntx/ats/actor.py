"""The ATS actor: owns the attestation store and serves it on the bus.

Answers ``Ping``, ``Attest``, ``Query``, ``GetAttestation`` and ``Stats``; publishes
one notice per group commit on its events socket: ``AttestationsStored`` (topic
``att.<first subject>`` when the group stored one attestation, ``att.`` when it
stored several), which says what was stored (ids, predicates, contexts), never the
attestations' attributes.

Writes use group commit into the store's journal: every ``Attest`` that arrives
while the loop is busy is held, then all of them are validated, numbered and
written as one journal entry with one ``fdatasync``, and only then does each
writer get its reply. Many concurrent writers thus share one sync, and no reply
ever says "stored" before the data is durable.

The indexes (LMDB) are written behind the journal on the writer thread, in big
transactions: once ``APPLY_AT`` records wait, or once no group has come for
``APPLY_IDLE_S``. A read (query, get, stats) that arrives while acknowledged records are
not yet indexed waits for them, so a query right after an acknowledgement sees
it. A crash between the two loses nothing: the store replays the journal on open.

With ``store = "postgresql://..."`` (``qntx.ats.backend``) the same calls reach the
PostgreSQL store: a group is one transaction, committed before any writer hears
"stored", and nothing waits behind it, so reads are answered at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger

from qntx import __version__
from qntx.ats.backend import open_store
from qntx.bus.actor import Actor, Offloader, Publisher, Request, Timer
from qntx.bus.pidlock import PidLock
from qntx.errors import NotFound, QntxError, Unavailable
from qntx.lmdbenv import READER_CHECK_S, clear_stale_readers_logged
from qntx.obs.metrics import ats_families, export
from qntx.obs.tally import BATCH_BOUNDS, COMMIT_BOUNDS, Buckets
from qntx.protocol import (
    ATS_EVENT_ROLES,
    ATS_ROLES,
    AtsRequest,
    Attest,
    Attestation,
    AttestationReply,
    AttestationsStored,
    Attested,
    GetAttestation,
    NewAttestation,
    Ping,
    Pong,
    Query,
    QueryResult,
    Stats,
    StatsReply,
    StoredNotice,
)
from qntx.settings import Settings

# Journaled records that start an index write behind, and the quiet time that does.
APPLY_AT = 5_000
APPLY_IDLE_S = 0.05
INDEX_RETRY_S = 1.0  # after a failed index write (a full disk)


MAX_TOPIC_SUBJECT = 256  # a longer subject is not put in the topic of its notice


class AtsActor(Actor):
    name = "ats"
    label = "ATS"

    def __init__(self, settings: Settings):
        super().__init__(max_message_bytes=settings.max_message_bytes, security=settings.security)
        self.settings = settings
        self._pending: list[tuple[Request, list[NewAttestation]]] = []
        self._applying = False
        self._idle_timer: Timer | None = None
        # Reads waiting for the indexes to reach the last record acknowledged before them.
        self._reads: list[tuple[int, Callable[[], None]]] = []
        self._index_error: QntxError | None = None  # the last index write failed
        self._last_group = 0.0  # monotonic time of the last group commit
        # For qntx.obs.metrics: each group commit's journal write and size, records stored.
        self.commit_seconds, self.commit_size = Buckets(COMMIT_BOUNDS), Buckets(BATCH_BOUNDS)
        self.written = 0

    def setup(self) -> None:
        self.settings.ensure_dirs()
        self.lock = PidLock(self.settings.lock_path(self.name))
        if not self.lock.acquire():
            raise Unavailable(f"another ATS actor already owns {self.settings.ats_path}")
        self.store = open_store(self.settings, journal=True)
        self.events = Publisher(
            self, self.settings.ats_events_endpoint, self.settings.public("ats_events_endpoint"), topics=ATS_EVENT_ROLES
        )
        self.writer = Offloader(self, "ats-writer")
        self.every(READER_CHECK_S, lambda: clear_stale_readers_logged(self.store, "the attestation store"))
        export(self, self.settings.run_dir, lambda: ats_families(self))
        self.service = self.serve(
            self.settings.ats_endpoint,
            AtsRequest,
            {
                Ping: self.on_ping,
                Attest: self.on_attest,
                Query: self.on_query,
                GetAttestation: self.on_get,
                Stats: self.on_stats,
            },
            roles=ATS_ROLES,
            also=self.settings.public("ats_endpoint"),
        )
        logger.info("ATS serving {} (store {}, {} attestations)", self.settings.ats_endpoint, self.store.location, self.store.count())

    def teardown(self) -> None:
        self.writer.close()  # finishes an index write in flight
        if self._pending:  # never drop writes that were already received
            self._log_group()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self.store.close()  # indexes what is only journaled
        self.lock.release()

    def on_ping(self, message: Ping, request: Request) -> Pong:
        return Pong(actor=self.name, pid=self.pid, version=__version__)

    def on_attest(self, message: Attest, request: Request) -> None:
        self._pending.append((request, message.items))
        return None  # answered in after_batch, once durable

    def after_batch(self) -> None:
        """Commit the group as soon as the loop has drained its sockets."""
        if self._pending:
            self._log_group()

    def _log_group(self) -> None:
        pending, self._pending = self._pending, []
        try:
            if self._index_error is not None and not self._applying:
                # Acknowledge no more than the indexes can take: catch up first.
                self._indexed(self._apply_now())
            if self._index_error is not None:
                raise self._index_error
            began = time.perf_counter()
            outcomes = self.store.log_batches([items for _, items in pending])
            self.commit_seconds.observe(time.perf_counter() - began)
        except Exception as exc:  # the journal refused the group: every writer is told
            if isinstance(exc, QntxError):  # a full disk
                logger.error("group commit of {} requests failed: {}", len(pending), exc)
                error = exc
            else:
                logger.opt(exception=exc).error("group commit of {} requests failed", len(pending))
                error = QntxError(f"store write failed: {exc}")
            for request, _ in pending:
                request.fail(error)
            return
        stored: list[Attestation] = []
        for (request, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, QntxError):
                request.fail(outcome)
            else:
                # The records go out as the bytes they were journaled as (a Raw in
                # place of the list: the same MessagePack), not encoded again.
                request.reply(Attested(records=msgspec.Raw(outcome.encoded)))
                stored += outcome.records
        self.commit_size.observe(len(stored))
        self.written += len(stored)
        if stored:  # one notice for the group: what was stored, never the bodies
            subject = stored[0].subjects[0].encode() if len(stored) == 1 else b""
            topic = b"att." + subject if len(subject) <= MAX_TOPIC_SUBJECT else b"att."  # (a notice has 2 KiB in all)
            notices = [StoredNotice(id=r.id, predicates=r.predicates, contexts=r.contexts, seq=r.seq) for r in stored]
            self.events.publish(topic, AttestationsStored(stored=notices))
        self._last_group = time.monotonic()
        self._index_behind()

    # ------------------------------------------------------------------ indexes behind

    def _index_behind(self, *, now: bool = False) -> None:
        """Start an index write when enough waits (or ``now``), else arm the idle timer."""
        if self._applying or not self.store.logged:
            return
        if now or self._reads or self.store.logged >= APPLY_AT:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self._applying = True
            self.writer.submit(self.store.apply_logged, self._indexed)
        elif self._idle_timer is None:
            self._idle_timer = self.call_later(APPLY_IDLE_S, self._on_idle)

    def _apply_now(self) -> int | BaseException:
        try:
            return self.store.apply_logged()
        except Exception as exc:  # handed to _indexed, like the writer thread's outcome
            return exc

    def _on_idle(self) -> None:
        """Write the indexes once no group has come for APPLY_IDLE_S: while writers keep
        coming, the journal takes them and the indexes wait for APPLY_AT records."""
        self._idle_timer = None
        quiet = time.monotonic() - self._last_group
        if quiet < APPLY_IDLE_S and self._index_error is None:
            self._idle_timer = self.call_later(APPLY_IDLE_S - quiet, self._on_idle)
            return
        self._index_behind(now=True)

    def _indexed(self, outcome) -> None:
        self._applying = False
        if isinstance(outcome, BaseException):
            # The journal keeps the records. Until the indexes can take them (a full
            # disk), reads answer from the indexes as they are and new writes are
            # refused (_log_group); the write is retried now and then.
            if self._index_error is None:
                log = logger.error if isinstance(outcome, QntxError) else logger.opt(exception=outcome).error
                log("writing the indexes behind the journal failed: {}", outcome)
            self._index_error = outcome if isinstance(outcome, QntxError) else QntxError(f"store write failed: {outcome}")
            waiting, self._reads = self._reads, []
            for _, answer in waiting:
                answer()
            if self._idle_timer is None:
                self._idle_timer = self.call_later(INDEX_RETRY_S, self._on_idle)
            return
        if self._index_error is not None:
            logger.info("the indexes caught up with the journal again")
            self._index_error = None
        ready = self.store.indexed_seq
        waiting, self._reads = self._reads, []
        for needed, answer in waiting:
            if needed <= ready:
                answer()
            else:
                self._reads.append((needed, answer))
        self._index_behind()

    def _read(self, request: Request, answer: Callable[[], Any]) -> Any:
        """``answer()`` now when the indexes hold every acknowledged record, else once
        they do (its reply, or its error, goes to ``request`` then)."""
        needed = self.store.logged_seq
        if needed <= self.store.indexed_seq or self._index_error is not None:
            return answer()

        def deferred() -> None:
            try:
                request.reply(answer())
            except QntxError as exc:
                request.fail(exc)
            except Exception as exc:
                logger.opt(exception=exc).error("read failed")
                request.fail(QntxError(f"read failed: {exc}"))

        self._reads.append((needed, deferred))
        self._index_behind(now=True)
        return None

    # ------------------------------------------------------------------ reads

    def on_query(self, message: Query, request: Request) -> QueryResult | None:
        return self._read(request, lambda: self._query(message))

    def _query(self, message: Query) -> QueryResult:
        records, cursor = self.store.query_page(message.filter)
        return QueryResult(records=records, cursor=cursor)

    def on_get(self, message: GetAttestation, request: Request) -> AttestationReply | None:
        return self._read(request, lambda: self._get(message))

    def _get(self, message: GetAttestation) -> AttestationReply:
        record = self.store.get(message.id)
        if record is None:
            raise NotFound(f"no attestation {message.id}")
        return AttestationReply(record=record)

    def on_stats(self, message: Stats, request: Request) -> StatsReply | None:
        return self._read(request, lambda: StatsReply(**self.store.stats()))


def run_ats(settings: Settings) -> None:
    AtsActor(settings).run()



