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

from qntx.bus.client import Client
from qntx.bus.codec import raise_if_error
from qntx.bus.pidlock import lock_holder
from qntx.errors import Invalid, NotFound, QntxError
from qntx.protocol import (
    FINAL_STATUSES,
    JOB_STATUSES,
    ActorStatus,
    AtsReply,
    Attest,
    Attestation,
    CancelJob,
    Filter,
    GetAttestation,
    GetJob,
    GetStatus,
    Job,
    JobChanged,
    JobError,
    JobProgressed,
    ListJobs,
    NewAttestation,
    PauseJob,
    Ping,
    Pong,
    Query,
    ResumeJob,
    RetryJob,
    ServerReply,
    Stats,
    StatsReply,
    StatusReply,
    Submit,
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


def make_filter(
    subjects: str | Sequence[str] | None = None,
    predicates: str | Sequence[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    actors: str | Sequence[str] | None = None,
    time_start: int | None = None,
    time_end: int | None = None,
    source: str | None = None,
    limit: int | None = None,
) -> Filter:
    return Filter(
        subjects=_as_list(subjects, "subjects"),
        predicates=_as_list(predicates, "predicates"),
        contexts=_as_list(contexts, "contexts"),
        actors=_as_list(actors, "actors"),
        time_start=time_start,
        time_end=time_end,
        source=source,
        limit=limit,
    )


def ax_filter(text: str, limit: int | None = None) -> Filter:
    """The Filter of an ax query; a syntax error is Invalid with its position."""
    from qntx.ats.ax import AxSyntaxError, parse_ax

    try:
        flt = parse_ax(text).filter
    except AxSyntaxError as exc:
        raise Invalid(f"ax: {exc}") from None
    if limit is not None:
        flt = msgspec.structs.replace(flt, limit=limit)
    return flt


class _RemoteAts:
    """The ATS actor over the bus."""

    embedded = False

    def __init__(self, settings: Settings):
        self.client = Client(
            settings.ats_endpoint,
            AtsReply,
            timeout_s=settings.request_timeout_s,
            security=settings.security,
            max_message_bytes=settings.max_message_bytes,
        )

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
    return lock_holder(settings.lock_path("ats")) is not None


def _stored_job(store, job_id: str) -> Job:
    stored = store.get(job_id) if store is not None else None
    if stored is None:
        raise NotFound(f"no job {job_id}")
    return stored.job


class JobFailed(QntxError):
    """A job ended failed or cancelled; ``job`` is its final record."""

    code = "job_failed"

    def __init__(self, job: Job):
        error = job.error or JobError(message=job.status)
        super().__init__(f"job {job.id} {job.status}: {error.message}")
        self.job = job
        self.error = error


class JobHandle:
    """A submitted job: ``.id``, ``.record()``, ``.result(timeout)``."""

    def __init__(self, bus: Bus, job: Job):
        self.bus = bus
        self.id = job.id
        self.submitted = job

    def record(self) -> Job:
        return self.bus.job(self.id)

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the job is final; return its record."""
        return self.bus.wait(self.id, timeout=timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The job's result; raises JobFailed if it failed or was cancelled."""
        job = self.wait(timeout)
        if job.status != "completed":
            raise JobFailed(job)
        return job.result

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"


class Bus:
    """A connection to one QNTX home: attestations, queries and (with `up`) jobs."""

    def __init__(self, settings: Settings, *, embedded: bool | None = None):
        self.settings = settings
        if embedded is None:
            embedded = not ats_is_up(settings)
        self._ats = _EmbeddedAts(settings) if embedded else _RemoteAts(settings)
        self._server: Client | None = None
        self._follower = None

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
            make_filter(subjects, predicates, contexts, actors, time_start, time_end, source, limit)
        )

    def query_filter(self, flt: Filter) -> list[Attestation]:
        return self._ats.query(flt)

    def ax(self, text: str, *, limit: int | None = None) -> list[Attestation]:
        """Run an ax query (``"alice is knows of work since '3 days ago'"``)."""
        return self.query_filter(ax_filter(text, limit))

    def get(self, id: str) -> Attestation:
        return self._ats.get(id)

    def stats(self) -> StatsReply:
        return self._ats.stats()

    # ---------------------------------------------------------------- jobs

    @property
    def server(self) -> Client:
        if self._server is None:
            self._server = Client(
                self.settings.server_endpoint,
                ServerReply,
                timeout_s=self.settings.request_timeout_s,
                security=self.settings.security,
                max_message_bytes=self.settings.max_message_bytes,
            )
        return self._server

    def submit(
        self,
        handler: str,
        payload: Any = None,
        *,
        priority: int = 0,
        max_attempts: int = 3,
        timeout_s: float = 300.0,
        idempotency_key: str | None = None,
        parent_id: str | None = None,
    ) -> JobHandle:
        """Enqueue a job; returns once it is durably accepted."""
        message = Submit(
            handler=handler,
            payload=payload,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            idempotency_key=idempotency_key,
            parent_id=parent_id,
        )
        self._ensure_follower()  # subscribe before the job can finish
        return JobHandle(self, self.server.request(message).job)

    def submit_many(
        self,
        handler: str,
        payloads: Iterable[Any],
        *,
        priority: int = 0,
        max_attempts: int = 3,
        timeout_s: float = 300.0,
    ) -> list[JobHandle]:
        """Enqueue many jobs at once (pipelined; they share durable commits).

        Every returned handle is accepted. If some submissions were refused, the
        first refusal is raised after the others were sent, with the accepted
        handles on the exception as ``accepted``.
        """
        messages = [
            Submit(handler=handler, payload=p, priority=priority, max_attempts=max_attempts, timeout_s=timeout_s)
            for p in payloads
        ]
        self._ensure_follower()
        handles: list[JobHandle] = []
        first_error: QntxError | None = None
        for reply in self.server.request_many(messages):
            try:
                handles.append(JobHandle(self, raise_if_error(reply).job))
            except QntxError as exc:
                first_error = first_error or exc
        if first_error is not None:
            first_error.accepted = handles
            raise first_error
        return handles

    def job(self, id: str) -> Job:
        if not self._server_is_up():
            return self._read_pulse(lambda store: _stored_job(store, id), empty=lambda: _stored_job(None, id))
        return self.server.request(GetJob(id=id)).job

    def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """Jobs newest first. With no server running, read from the store (read-only)."""
        if not self._server_is_up():
            if status is not None and status not in JOB_STATUSES:
                raise Invalid(f"unknown status {status!r} (one of {', '.join(JOB_STATUSES)})")
            if limit <= 0:
                raise Invalid("limit must be positive")
            return self._read_pulse(
                lambda store: [job for _, _, job in store.newest(status, limit, skip=(), cached={})],
                empty=list,
            )
        return self.server.request(ListJobs(status=status, limit=limit)).jobs

    def _server_is_up(self) -> bool:
        if not self.settings.server_endpoint.startswith("ipc://"):
            return True
        return lock_holder(self.settings.lock_path("server")) is not None

    def _read_pulse(self, work, *, empty):
        """Read the job store directly, for when no server runs (nothing is changed)."""
        from qntx.pulse.jobstore import JobStore

        if not (self.settings.pulse_path / "data.mdb").exists():
            return empty()
        store = JobStore(self.settings.pulse_path, readonly=True)
        try:
            return work(store)
        finally:
            store.close()

    def cancel(self, id: str) -> Job:
        return self.server.request(CancelJob(id=id)).job

    def retry(self, id: str) -> Job:
        return self.server.request(RetryJob(id=id)).job

    def pause(self, id: str) -> Job:
        """Hold a queued job (it keeps its place) until ``resume``."""
        return self.server.request(PauseJob(id=id)).job

    def resume(self, id: str) -> Job:
        return self.server.request(ResumeJob(id=id)).job

    def status(self) -> StatusReply:
        """Every actor with pid/endpoint/health, queue depth by status, registered handlers."""
        reply = self.server.request(GetStatus())
        try:
            pong = _RemoteAts(self.settings).ping() if not self.embedded else None
            ats = ActorStatus(name="ats", pid=pong.pid if pong else None, endpoint=self.settings.ats_endpoint, healthy=pong is not None)
        except QntxError:
            ats = ActorStatus(name="ats", endpoint=self.settings.ats_endpoint, healthy=False)
        reply.actors.insert(0, ats)
        return reply

    def follow(self, id: str, timeout: float | None = None) -> Iterable[JobChanged | JobProgressed]:
        """Job events for ``id`` as they happen, ending with the final JobChanged."""
        follower = self._ensure_follower()
        yield from follower.follow(id, timeout, fetch=self.job)

    def wait(self, id: str, *, timeout: float | None = None) -> Job:
        """Block until job ``id`` is final and return its record."""
        last = None
        for event in self.follow(id, timeout):
            if isinstance(event, JobChanged):
                last = event.job
        assert last is not None and last.status in FINAL_STATUSES
        return last

    def _ensure_follower(self):
        if self._follower is None:
            from qntx.follow import JobFollower

            self._follower = JobFollower(self.settings.events_endpoint, security=self.settings.security)
        return self._follower

    def close(self) -> None:
        self._ats.close()
        if self._server is not None:
            self._server.close()
        if self._follower is not None:
            self._follower.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(home: str | Path | None = None, *, embedded: bool | None = None, **settings: Any) -> Bus:
    """Connect to the bus of ``home`` ($QNTX_HOME, default ~/.qntx)."""
    return Bus(load_settings(home, **settings), embedded=embedded)
