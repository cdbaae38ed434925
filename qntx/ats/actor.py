"""The ATS actor: owns the attestation store and serves it on the bus.

Answers ``Ping``, ``Attest``, ``Query``, ``GetAttestation`` and ``Stats``; publishes
``AttestationCreated`` on its PUB socket (topic ``att.<first subject>``) for each
attestation it stores.

Writes use group commit: every ``Attest`` that arrives while the previous commit
is syncing is held, then all of them are written in one synced LMDB transaction,
and only then does each writer get its reply. Many concurrent writers thus share
one fsync, and no reply ever says "stored" before the data is durable.

Where the commit runs depends on its size. A small one (the usual case: a few
single attestations) runs right on the loop, as soon as the loop has drained its
sockets: handing it to a thread and waking the loop again afterwards costs more
than the fsync the loop would wait out (measured by ``bin/bench ats``), and what
arrives meanwhile waits in the socket and forms the next group. A big one (more
than ``INLINE_COMMIT_ITEMS``) runs on a writer thread, so the loop keeps
answering queries for the milliseconds it takes.
"""

from __future__ import annotations

from loguru import logger

from qntx import __version__
from qntx.ats.store import AttestationStore
from qntx.bus.actor import Actor, Offloader, Publisher, Request
from qntx.bus.pidlock import PidLock
from qntx.errors import NotFound, QntxError, Unavailable
from qntx.lmdbenv import READER_CHECK_S, clear_stale_readers_logged
from qntx.protocol import (
    ATS_EVENT_ROLES,
    ATS_ROLES,
    AtsRequest,
    Attest,
    AttestationCreated,
    AttestationReply,
    Attested,
    GetAttestation,
    NewAttestation,
    Ping,
    Pong,
    Query,
    QueryResult,
    Stats,
    StatsReply,
)
from qntx.settings import Settings

# Commits of at most this many attestations run on the loop; bigger ones on the writer thread.
INLINE_COMMIT_ITEMS = 256


class AtsActor(Actor):
    name = "ats"
    label = "ATS"

    def __init__(self, settings: Settings):
        super().__init__(max_message_bytes=settings.max_message_bytes, security=settings.security)
        self.settings = settings
        self._pending: list[tuple[Request, list[NewAttestation]]] = []
        self._committing = False
        self._closing = False

    def setup(self) -> None:
        self.settings.ensure_dirs()
        self.lock = PidLock(self.settings.lock_path(self.name))
        if not self.lock.acquire():
            raise Unavailable(f"another ATS actor already owns {self.settings.ats_path}")
        self.store = AttestationStore(
            self.settings.ats_path,
            map_size=self.settings.ats_map_size,
            max_map_size=self.settings.ats_max_map_size,
        )
        self.events = Publisher(
            self, self.settings.ats_events_endpoint, self.settings.public("ats_events_endpoint"), topics=ATS_EVENT_ROLES
        )
        self.writer = Offloader(self, "ats-writer")
        self.every(READER_CHECK_S, lambda: clear_stale_readers_logged(self.store, "the attestation store"))
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
        logger.info("ATS serving {} (store {}, {} attestations)", self.settings.ats_endpoint, self.settings.ats_path, self.store.count())

    def teardown(self) -> None:
        self._closing = True  # from here on commits run here, not on the writer thread
        self.writer.close()  # finishes (and answers) a commit in flight
        if self._pending:  # never drop writes that were already received
            pending, self._pending = self._pending, []
            self._committed(pending, self._commit(pending))
        self.store.close()
        self.lock.release()

    def on_ping(self, message: Ping, request: Request) -> Pong:
        return Pong(actor=self.name, pid=self.pid, version=__version__)

    def on_attest(self, message: Attest, request: Request) -> None:
        self._pending.append((request, message.items))
        return None  # answered in after_batch, once committed

    def after_batch(self) -> None:
        """Start the next group commit as soon as the loop has drained its sockets."""
        if not self._pending or self._committing or self._closing:
            return  # the batch grows until the commit in flight is done
        pending, self._pending = self._pending, []
        self._committing = True
        if sum(len(items) for _, items in pending) <= INLINE_COMMIT_ITEMS:
            try:
                outcome = self._commit(pending)
            except Exception as exc:  # handed to _committed, which answers every writer
                outcome = exc
            self._committed(pending, outcome)
        else:
            self.writer.submit(lambda: self._commit(pending), lambda outcome: self._committed(pending, outcome))

    def _commit(self, pending: list[tuple[Request, list[NewAttestation]]]):
        return self.store.put_batches([items for _, items in pending])

    def _committed(self, pending: list[tuple[Request, list[NewAttestation]]], outcomes) -> None:
        self._committing = False
        if isinstance(outcomes, BaseException):  # the whole transaction failed
            if isinstance(outcomes, QntxError):  # a full disk: the writers are told, nothing more
                logger.error("group commit of {} requests failed: {}", len(pending), outcomes)
                error = outcomes
            else:
                logger.opt(exception=outcomes).error("group commit of {} requests failed", len(pending))
                error = QntxError(f"store write failed: {outcomes}")
            for request, _ in pending:
                request.fail(error)
        else:
            for (request, _), outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, QntxError):
                    request.fail(outcome)
                    continue
                request.reply(Attested(records=outcome))
                for record in outcome:
                    self.events.publish(b"att." + record.subjects[0].encode(), AttestationCreated(record=record))
        self.after_batch()  # what arrived meanwhile goes next

    def on_query(self, message: Query, request: Request) -> QueryResult:
        records, cursor = self.store.query_page(message.filter)
        return QueryResult(records=records, cursor=cursor)

    def on_get(self, message: GetAttestation, request: Request) -> AttestationReply:
        record = self.store.get(message.id)
        if record is None:
            raise NotFound(f"no attestation {message.id}")
        return AttestationReply(record=record)

    def on_stats(self, message: Stats, request: Request) -> StatsReply:
        return StatsReply(**self.store.stats())


def run_ats(settings: Settings) -> None:
    AtsActor(settings).run()



