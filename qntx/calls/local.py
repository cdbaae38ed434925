"""What the blocking API does without actors: the embedded attestation store,
read-only reads of Pulse's store, and the parts of a status the server does not
watch. The asyncio API always talks to running actors and never comes here."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from qntx.bus.pidlock import lock_holder
from qntx.errors import NotFound, QntxError
from qntx.protocol import (
    ActorStatus,
    Attest,
    AttestationReply,
    Attested,
    GetAttestation,
    Job,
    Ping,
    Pong,
    Query,
    QueryResult,
    Stats,
    StatsReply,
    StatusReply,
)
from qntx.settings import Settings


class EmbeddedAts:
    """The home's store (LMDB, or the PostgreSQL database ``store`` names) opened in
    this process, answering the ATS actor's requests."""

    def __init__(self, settings: Settings):
        from qntx.ats.backend import open_store

        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = open_store(settings)
        self._answers: dict[type, Callable[[Any], Any]] = {
            Ping: lambda _: Pong(actor="embedded", pid=os.getpid()),
            Attest: lambda m: Attested(records=self.store.put_many(m.items)),
            Query: self._query,
            GetAttestation: self._get,
            Stats: lambda _: StatsReply(**self.store.stats()),
        }

    def request(self, message: Any, *, timeout_s: float | None = None) -> Any:
        answer = self._answers.get(type(message))
        if answer is None:
            raise QntxError(f"the embedded store does not answer {type(message).__name__}")
        return answer(message)

    def _query(self, message: Query) -> QueryResult:
        records, cursor = self.store.query_page(message.filter)
        return QueryResult(records=records, cursor=cursor)

    def _get(self, message: GetAttestation) -> AttestationReply:
        record = self.store.get(message.id)
        if record is None:
            raise NotFound(f"no attestation {message.id}")
        return AttestationReply(record=record)

    def close(self) -> None:
        self.store.close()


def ats_is_up(settings: Settings) -> bool:
    """True when an ATS actor serves this home (or the endpoint is remote)."""
    if not settings.ats_endpoint.startswith("ipc://"):
        return True
    return lock_holder(settings.lock_path("ats")) is not None


def server_is_up(settings: Settings) -> bool:
    """True when a server serves this home (or the endpoint is remote)."""
    if not settings.server_endpoint.startswith("ipc://"):
        return True
    return lock_holder(settings.lock_path("server")) is not None


def stored_job(store, job_id: str) -> Job:
    stored = store.get(job_id) if store is not None else None
    if stored is None:
        raise NotFound(f"no job {job_id}")
    return stored.job


def read_pulse(settings: Settings, work: Callable[[Any], Any], *, empty: Callable[[], Any]) -> Any:
    """Read the job store directly, for when no server runs (nothing is changed)."""
    from qntx.pulse.jobstore import open_job_store

    store = open_job_store(settings, readonly=True)
    if store is None:
        return empty()
    try:
        return work(store)
    finally:
        store.close()


def ats_actor_status(settings: Settings, pong: Pong | None) -> ActorStatus:
    """The ATS line of a status listing (the server does not watch ATS): healthy if it answered."""
    local = settings.ats_endpoint.startswith("ipc://")
    return ActorStatus(
        name="ats", pid=pong.pid if pong else None, endpoint=settings.ats_endpoint, healthy=pong is not None,
        host=socket.gethostname() if pong is not None and local else "",
    )  # fmt: skip


def with_local_actors(settings: Settings, reply: StatusReply, pong: Pong | None) -> StatusReply:
    """Complete the server's status with what it does not watch: ATS, and any worker
    ``qntx up`` runs on this home that the server does not hear from (unhealthy)."""
    from qntx.supervisor import supervised_actors

    reply.actors.insert(0, ats_actor_status(settings, pong))
    if settings.connect:  # the bus of another host: this home's `up` is not part of it
        return reply
    listed = {actor.name for actor in reply.actors}
    for name, pid in supervised_actors(settings).items():
        if name.startswith("worker") and name not in listed:
            reply.actors.append(ActorStatus(name=name, pid=pid, endpoint=settings.workers_endpoint, healthy=False))
    return reply
