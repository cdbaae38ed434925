"""The scripting API: ``qntx.connect()`` and the ``Bus`` it returns.

The CLI is a thin layer over this module, so a script gets exactly what the
commands do. Attestation calls go to the ATS actor when ``qntx up`` runs, and
straight to the embedded LMDB store when it does not; job calls need the server.
"""

from __future__ import annotations

import atexit
import shlex
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from qntx.asid import new_asid
from qntx.ats.ax import duration_ms
from qntx.ats.current import latest
from qntx.ats.store import next_page
from qntx.bus.client import Client
from qntx.bus.pidlock import lock_holder
from qntx.errors import Invalid, InvalidQuery, NotFound, QntxError, Timeout
from qntx.handles import (
    Acceptance,
    JobFailed,
    JobSelection,
    Steered,
    decoded,
    decoded_event,
    encode_payload,
    first_failure,
    result_of,
    submit_message,
    unconfirmed,
)
from qntx.protocol import (
    JOB_STATUSES,
    MAX_PAGE,
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
    JobOutput,
    JobProgressed,
    ListJobs,
    ListSchedules,
    NewAttestation,
    PauseJob,
    Ping,
    Pong,
    Prune,
    Query,
    ResumeJob,
    RetryJob,
    ScheduleState,
    ServerReply,
    Stats,
    StatsReply,
    StatusReply,
)
from qntx.pulse.directives import (
    CONTEXT as DIRECTIVE_CONTEXT,
)
from qntx.pulse.directives import (
    DIRECTIVES_FILTER,
    LIMIT,
    SCHEDULE,
    Directives,
    Limit,
    check_directive_name,
    directive_attestation,
    parse_limit,
    parse_schedule,
    schedule_state,
    seconds_to_ms,
)
from qntx.pulse.directives import resolve as resolve_directives
from qntx.settings import Settings, load_settings
from qntx.values import as_list, now_ms

# Submissions a Bus lets wait for their reply before it waits for the oldest.
SUBMIT_WINDOW = 10_000


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
        subjects=as_list(subjects, "subjects"),
        predicates=as_list(predicates, "predicates") or ["_"],
        contexts=as_list(contexts, "contexts") or ["_"],
        actors=as_list(actors, "actors"),
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
        subjects=as_list(subjects, "subjects"),
        predicates=as_list(predicates, "predicates"),
        contexts=as_list(contexts, "contexts"),
        actors=as_list(actors, "actors"),
        time_start=time_start,
        time_end=time_end,
        source=source,
        limit=limit,
    )


def parse_query(text: str, limit: int | None = None) -> tuple[Filter, str | None]:
    """The Filter of an ax query and its ``so`` action (None if it has none); a
    syntax error is Invalid with its position."""
    from qntx.ats.ax import AxSyntaxError, parse_ax

    try:
        query = parse_ax(text)
    except AxSyntaxError as exc:
        raise InvalidQuery(f"ax: {exc}", exc.position) from None
    flt = query.filter
    if limit is not None:
        flt = msgspec.structs.replace(flt, limit=limit)
    return flt, query.action


def ax_filter(text: str, limit: int | None = None) -> Filter:
    return parse_query(text, limit)[0]


def handler_for(name: str) -> str:
    """A handler as users type it: ``tagger`` is ``python.tagger``; a name with a dot is as is."""
    return name if "." in name else f"python.{name}"


def split_action(action: str) -> tuple[str, list[str]]:
    """``so HANDLER ARGS...`` as (handler, args)."""
    try:
        words = shlex.split(action)
    except ValueError as exc:
        raise Invalid(f"ax: the so action cannot be read: {exc}") from None
    if not words:
        raise Invalid("ax: so needs a handler")
    return handler_for(words[0]), words[1:]


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
        """Every match (up to the filter's limit), page after page."""
        out: list[Attestation] = []
        current = flt
        while current is not None:
            page = self.client.request(Query(filter=current))
            out += page.records
            current = next_page(flt, page.cursor, len(out))
        return out

    def get(self, id: str) -> Attestation:
        return self.client.request(GetAttestation(id=id)).record

    def stats(self) -> StatsReply:
        return self.client.request(Stats())

    def close(self) -> None:
        self.client.close()


class _EmbeddedAts:
    """The store the settings name (LMDB in the home, or PostgreSQL), opened in this
    process (no actor running)."""

    embedded = True

    def __init__(self, settings: Settings):
        from qntx.ats.backend import open_store

        settings.home.mkdir(parents=True, exist_ok=True)
        self.store = open_store(settings)

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


def _stored_job(store, job_id: str) -> Job:
    stored = store.get(job_id) if store is not None else None
    if stored is None:
        raise NotFound(f"no job {job_id}")
    return stored.job


__all__ = ["Bus", "JobFailed", "JobHandle", "connect"]


class JobHandle:
    """A submitted job: ``.id``, ``.accepted()``, ``.record()``, ``.result(timeout)``."""

    def __init__(self, bus: Bus, job_id: str, correlation: bytes | None, *, keyed: bool = False):
        self.bus = bus
        self._id = job_id
        self._keyed = keyed  # an idempotency key may name an older job: the reply says which
        self._correlation = correlation
        self._acceptance = Acceptance(job_id)

    @property
    def id(self) -> str:
        """The job's id: the one it was submitted with, or, with an idempotency key,
        the id of the job the key names (known once the server has answered)."""
        if self._keyed:
            try:
                return self.accepted().id
            except QntxError:
                pass
        return self._id

    def accepted(self, timeout: float | None = None) -> Job:
        """Wait until the server has durably accepted the job; its record then.
        Raises the refusal (e.g. an unknown handler) or a Timeout if no answer came."""
        if not self._acceptance.settled:
            self.bus._settle(self, timeout)
        if self._acceptance.error is not None:  # raised here: flush need not report it again
            self.bus._unreported = [(i, e) for i, e in self.bus._unreported if i != self._id]
        return self._acceptance.outcome()

    @property
    def submitted(self) -> Job:
        return self.accepted()

    def record(self) -> Job:
        return self.bus.job(self.id)

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the job is final; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._keyed and not self._acceptance.settled and len(self.bus._accepting) <= 1:
            # asked while its acceptance comes (with more submissions pending, one batch asks for them all)
            self.bus._ensure_follower().outcomes.prefetch(self._id)
        try:
            self.accepted(timeout)
        except QntxError:
            if self.bus._follower is not None:
                self.bus._follower.outcomes.forget(self._id)
            raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self.bus.wait(self.id, timeout=left)

    def result(self, timeout: float | None = None) -> Any:
        """The job's result; raises the refusal of its submission, or JobFailed if it
        failed or was cancelled."""
        return result_of(self.wait(timeout))

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"


class Bus:
    """A connection to one QNTX home: attestations, queries and (with `up`) jobs."""

    def __init__(self, settings: Settings, *, embedded: bool | None = None):
        if settings.connect:  # a bus on another host: its endpoints, asked of its server
            from qntx.join import join

            settings, embedded = join(settings), False
        self.settings = settings
        if embedded is None:
            embedded = not ats_is_up(settings)
        self._ats = _EmbeddedAts(settings) if embedded else _RemoteAts(settings)
        self._server: Client | None = None
        self._follower = None
        self._accepting: dict[bytes, JobHandle] = {}  # submissions waiting for their reply
        self._unreported: list[tuple[str, QntxError]] = []  # refusals settled on the way, not yet raised
        self._closed = False
        _open_buses.add(self)

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

    def ax(
        self, text: str, *, limit: int | None = None, so: str | None = None, args: Sequence[str] = ()
    ) -> list[Attestation] | list[JobHandle]:
        """Run an ax query (``"alice is knows of work since '3 days ago'"``).

        With an action (``so="tagger"`` or ``"... so tagger ARGS"`` in the text), enqueue
        one job of that handler per match, whose payload holds the match as
        ``attestation`` and the arguments as ``args``, and return their handles."""
        flt, action = parse_query(text, limit)
        if so is not None:
            action = shlex.join([so, *args])
        records = self.query_filter(flt)
        if action is None:
            return records
        handler, action_args = split_action(action)
        return [
            self.submit(handler, {"attestation": msgspec.to_builtins(record), "args": action_args}) for record in records
        ]

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
        id: str | None = None,
        run_at: int | datetime | None = None,
        delay_s: float | None = None,
        after: str | JobHandle | Sequence[str | JobHandle] | None = None,
        after_policy: str = "completed",
        version: str | None = None,
    ) -> JobHandle:
        """Enqueue a job and return at once; ``handle.accepted()`` waits for the
        server's durable acceptance, ``handle.result()`` for the outcome. ``id``
        (default: a fresh ``JB-`` ASID) makes a resubmission safe.

        ``run_at`` (Unix ms or an aware datetime) or ``delay_s`` delays the job; it
        waits in Pulse's store. ``after`` (job ids or handles) makes it wait until
        those jobs ended: it runs if they all completed, and fails if one failed or
        was cancelled (``after_policy="always"``: it runs anyway). ``version`` pins a
        handler version (default: the one current now, which it keeps)."""
        job_id = id or new_asid(handler if isinstance(handler, str) else "_", prefix="JB")
        message = submit_message(
            handler, encode_payload(payload, self.settings.max_payload_bytes), job_id,
            priority=priority, max_attempts=max_attempts, timeout_s=timeout_s,
            idempotency_key=idempotency_key, parent_id=parent_id, run_at=run_at, delay_s=delay_s,
            after=after, after_policy=after_policy, version=version,
        )  # fmt: skip
        correlation = self.server.send(message)
        handle = JobHandle(self, job_id, correlation, keyed=idempotency_key is not None)
        self._accepting[correlation] = handle
        if idempotency_key is None:  # (a key may name an older job: its id is known later)
            self._ensure_follower().outcomes.submitted(job_id, handle)
        if len(self._accepting) >= SUBMIT_WINDOW:  # keep the server's queues bounded
            oldest = next(iter(self._accepting.values()))
            self._settle(oldest, None)
            self._note_refusal(oldest)
        else:
            self._collect()
        return handle

    def chain(self, *steps: str | tuple | dict) -> list[JobHandle]:
        """Submit jobs that run one after the other: each waits for the one before
        (and fails if it fails), and names it as its parent. A step is a handler
        name, ``(handler, payload)`` or a dict of ``submit`` arguments."""
        handles: list[JobHandle] = []
        for step in steps:
            if isinstance(step, str):
                step = {"handler": step}
            elif isinstance(step, tuple):
                step = dict(zip(("handler", "payload"), step, strict=False))
            elif not isinstance(step, dict):
                raise Invalid(f"a chain step is a handler, (handler, payload) or a dict, got {step!r}")
            if handles:  # after the one before (and whatever else the step names)
                extra = step.get("after")
                extra = [] if extra is None else [extra] if isinstance(extra, str) or hasattr(extra, "id") else list(extra)
                step = {"parent_id": handles[-1].id, **step, "after": [handles[-1].id, *extra]}
            handles.append(self.submit(**step))
        return handles

    def _collect(self, wait_s: float = 0.0) -> None:
        """Settle every submission whose reply is already here."""
        for correlation, reply in self.server.arrived(wait_s).items():
            handle = self._accepting.pop(correlation, None)
            if handle is not None:
                handle._acceptance.settle(reply)
                self._note_refusal(handle)
            elif self._follower is not None and self._follower.outcomes.owns(correlation):
                self._follower.outcomes.deliver(correlation, reply)  # an outcome asked for ahead

    def _settle(self, handle: JobHandle, timeout: float | None) -> None:
        """Wait for the reply to one submission."""
        correlation = handle._correlation
        try:
            reply = self.server.take(correlation, timeout)
        except QntxError as exc:
            handle._acceptance.fail(unconfirmed(handle._id, exc))
        else:
            handle._acceptance.settle(reply)
        finally:
            self._accepting.pop(correlation, None)

    def _note_refusal(self, handle: JobHandle) -> None:
        """A submission settled on the way (nobody asked yet): flush() reports it."""
        if handle._acceptance.error is not None:
            self._unreported.append((handle._id, handle._acceptance.error))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submission so far is accepted or refused; raise the first
        refusal (its ``failures`` lists every refused or unconfirmed job id)."""
        failures, self._unreported = self._unreported, []
        deadline = None if timeout is None else time.monotonic() + timeout  # for all of them together
        for handle in list(self._accepting.values()):
            self._settle(handle, None if deadline is None else max(0.0, deadline - time.monotonic()))
            if handle._acceptance.error is not None:
                failures.append((handle._id, handle._acceptance.error))
        if failures:
            raise first_failure(failures)

    def job(self, id: str) -> Job:
        if not self._server_is_up():
            return decoded(self._read_pulse(lambda store: _stored_job(store, id), empty=lambda: _stored_job(None, id)))
        return decoded(self.server.request(GetJob(id=id)).job)

    def dependents(self, id: str) -> list[str]:
        """The ids of the jobs that run after job ``id`` (waiting for it, or run since)."""
        if not self._server_is_up():
            def read(store) -> list[str]:
                _stored_job(store, id)  # NotFound for no such job
                return store.dependents(id)

            return self._read_pulse(read, empty=lambda: _stored_job(None, id))
        return self.server.request(GetJob(id=id)).dependents

    def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """Jobs newest first (without payloads), up to ``limit``, page after page. With
        no server running, read from the store (read-only)."""
        if not self._server_is_up():
            if status is not None and status not in JOB_STATUSES:
                raise Invalid(f"unknown status {status!r} (one of {', '.join(JOB_STATUSES)})")
            if limit <= 0:
                raise Invalid("limit must be positive")
            return self._read_pulse(
                lambda store: [decoded(job) for _, _, job in store.newest(status, limit)],
                empty=list,
            )
        found: list[Job] = []
        page = ListJobs(status=status, limit=limit)
        while True:
            reply = self.server.request(page)
            found += (decoded(job) for job in reply.jobs)
            if reply.cursor is None or len(found) >= limit:
                return found[:limit]
            page = ListJobs(status=status, limit=min(limit - len(found), MAX_PAGE), cursor=reply.cursor)

    def _server_is_up(self) -> bool:
        if not self.settings.server_endpoint.startswith("ipc://"):
            return True
        return lock_holder(self.settings.lock_path("server")) is not None

    def _read_pulse(self, work, *, empty):
        """Read the job store directly, for when no server runs (nothing is changed)."""
        from qntx.pulse.jobstore import open_job_store

        store = open_job_store(self.settings, readonly=True)
        if store is None:
            return empty()
        try:
            return work(store)
        finally:
            store.close()

    def prune(self, older_than_s: float | None = None) -> dict[str, int]:
        """Delete finished jobs now: those past their retention (``keep_completed_s``,
        ``keep_failed_s``, ``keep_completed_max``), or every one that finished more
        than ``older_than_s`` ago. The server also does this in the background.
        Returns how many of each status went."""
        older_ms = None
        if older_than_s is not None:
            older_ms = 0 if older_than_s == 0 else seconds_to_ms(older_than_s, "older_than_s")
        return self.server.request(Prune(older_than_ms=older_ms), timeout_s=max(60.0, self.settings.request_timeout_s)).deleted

    def cancel(self, id: str) -> Job:
        return decoded(self.server.request(CancelJob(id=id)).job)

    def retry(self, id: str, *, latest: bool = False) -> Job:
        """Run a failed or cancelled job again, with the handler version it ran
        (``latest=True``: the current one)."""
        job = decoded(self.server.request(RetryJob(id=id, latest=latest)).job)
        if self._follower is not None:
            self._follower.outcomes.forget(id)  # its old final record is not its outcome now
        return job

    def pause(self, id: str) -> Job:
        """Hold a queued job (it keeps its place) until ``resume``."""
        return decoded(self.server.request(PauseJob(id=id)).job)

    def matching_jobs(
        self, *, status: str | None = None, handler: str | None = None, since: int | datetime | None = None
    ) -> list[str]:
        """The ids of the jobs with ``status``, of ``handler``, created at or after
        ``since`` (Unix ms or an aware datetime), newest first: read page by page, once."""
        selection = JobSelection(status, handler, since)
        ids: list[str] = []
        page = ListJobs(status=status, limit=MAX_PAGE)
        while True:
            reply = self.server.request(page)
            ids += selection.ids(reply.jobs)
            if reply.cursor is None or selection.past(reply.jobs):
                return ids
            page = ListJobs(status=status, limit=MAX_PAGE, cursor=reply.cursor)

    def retry_jobs(
        self, *, status: str = "failed", handler: str | None = None, since: int | datetime | None = None,
        latest: bool = False,
    ) -> Steered:  # fmt: skip
        """Retry every job that matches (``status`` failed or cancelled), each once."""
        return self.retry_many(self.matching_jobs(status=status, handler=handler, since=since), latest=latest)

    def cancel_jobs(
        self, *, status: str | None = None, handler: str | None = None, since: int | datetime | None = None
    ) -> Steered:
        """Cancel every job that matches (and is not final yet), each once."""
        if status is None and handler is None and since is None:
            raise Invalid("cancel_jobs needs a status, a handler or a time to choose the jobs")
        return self.cancel_many(self.matching_jobs(status=status, handler=handler, since=since))

    def retry_many(self, ids: Iterable[str], *, latest: bool = False) -> Steered:
        """Retry each of ``ids`` once, pipelined; what was skipped (not failed or
        cancelled any more, say) is in ``Steered.skipped``."""
        return self._steer_each(list(dict.fromkeys(ids)), lambda i: RetryJob(id=i, latest=latest, brief=True))

    def cancel_many(self, ids: Iterable[str]) -> Steered:
        """Cancel each of ``ids`` once, pipelined (final ones are skipped)."""
        return self._steer_each(list(dict.fromkeys(ids)), lambda i: CancelJob(id=i, brief=True))

    def _steer_each(self, ids: list[str], message: Callable[[str], Any]) -> Steered:
        steered = Steered()
        for job_id, reply in zip(ids, self.server.request_many(message(i) for i in ids), strict=True):
            steered.count(job_id, reply)
            if self._follower is not None:
                self._follower.outcomes.forget(job_id)
        return steered

    def resume(self, id: str) -> Job:
        return decoded(self.server.request(ResumeJob(id=id)).job)

    def status(self) -> StatusReply:
        """Every actor with pid/endpoint/health, queue depth by status, registered handlers."""
        reply = self.server.request(GetStatus())
        try:
            pong = _RemoteAts(self.settings).ping() if not self.embedded else None
        except QntxError:
            pong = None
        return with_local_actors(self.settings, reply, pong)

    # ---------------------------------------------------------------- schedules and limits

    def schedule_add(
        self,
        name: str,
        handler: str,
        *,
        every: float | str | None = None,
        cron: str | None = None,
        payload: Any = None,
        tz: str = "UTC",
        missed: str = "once",
        priority: int = 0,
        max_attempts: int = 3,
        timeout_s: float = 300.0,
    ) -> ScheduleState:
        """Fire a job of ``handler`` periodically: ``every`` (seconds, or a duration
        like ``"5 minutes"``) or ``cron`` ("m h dom mon dow", in ``tz``). Firings
        missed while the bus was down run once (``missed="once"``) or not ("skip").
        Stored as an attestation; a running bus picks it up at once."""
        every_ms = None
        if every is not None:
            every_ms = duration_ms(every, "every") if isinstance(every, str) else seconds_to_ms(every, "every")
        attributes = {
            "handler": handler, "every_ms": every_ms, "cron": cron, "payload": payload, "tz": tz,
            "missed": missed, "priority": priority, "max_attempts": max_attempts, "timeout_s": timeout_s,
        }  # fmt: skip
        attributes = {k: v for k, v in attributes.items() if v is not None or k == "payload"}
        check_directive_name(name, "schedule")
        schedule = parse_schedule(name, attributes, now_ms())  # the same reading as Pulse's
        if self._server_is_up() and handler not in self.status().handlers:
            raise NotFound(f"unknown handler {handler!r}")
        self._ats.attest([directive_attestation(SCHEDULE, name, attributes)])
        self._until_pulse_sees(lambda states: name in states and states[name].every_ms == schedule.every_ms and states[name].cron == schedule.cron)
        return schedule_state(schedule, now_ms())

    def schedules(self) -> list[ScheduleState]:
        """Every schedule with its next due time and (with the bus up) past firings."""
        if self._server_is_up():
            return self.server.request(ListSchedules()).schedules
        return [schedule_state(s, now_ms()) for s in self._directives().schedules.values()]

    def schedule(self, name: str) -> ScheduleState:
        for state in self.schedules():
            if state.name == name:
                return state
        raise NotFound(f"no schedule {name!r}")

    def schedule_pause(self, name: str) -> None:
        self._restate(name, paused=True)
        self._until_pulse_sees(lambda states: name not in states or states[name].paused)

    def schedule_resume(self, name: str) -> None:
        self._restate(name, paused=False)
        self._until_pulse_sees(lambda states: name not in states or not states[name].paused)

    def schedule_delete(self, name: str) -> None:
        self._restate(name, deleted=True)
        self._until_pulse_sees(lambda states: name not in states)

    def _until_pulse_sees(self, seen, timeout: float = 5.0, *, limits: bool = False) -> None:
        """With the bus up, return once Pulse has taken a change in (it follows ATS
        live, within milliseconds), so the caller's next step sees it. ``seen`` gets
        the schedules by name, or (``limits``) the limits Pulse applies by handler."""
        if not self._server_is_up():
            return
        deadline = time.monotonic() + timeout

        def known() -> dict:
            reply = self.server.request(ListSchedules())
            return reply.limits if limits else {s.name: s for s in reply.schedules}

        while not seen(known()):
            if time.monotonic() > deadline:
                raise Timeout("the server did not pick up the change (is ATS up?)")
            time.sleep(0.01)

    def _restate(self, name: str, **changes: Any) -> None:
        current = latest(self.query_filter(Filter(subjects=[name], predicates=[SCHEDULE], contexts=[DIRECTIVE_CONTEXT])))
        if current is None or current.attributes.get("deleted"):
            raise NotFound(f"no schedule {name!r}")
        # Keeps its anchor: pausing does not move the due times of an `every` schedule.
        attributes = {**current.attributes, "anchor": current.attributes.get("anchor", current.timestamp), **changes}
        self._ats.attest([directive_attestation(SCHEDULE, name, attributes)])

    def limit(
        self, handler: str, *, concurrency: int | None = None, rate: int | None = None, per_s: float = 1.0
    ) -> Limit | None:
        """Limit ``handler``: at most ``concurrency`` running at once (across every
        worker and host) and at most ``rate`` starts per ``per_s`` seconds. Jobs over
        a limit wait in Pulse. Both None removes the limit. Stored as an attestation."""
        attributes = {"concurrency": concurrency, "rate": rate, "per_ms": seconds_to_ms(per_s, "per_s")}
        if concurrency is None and rate is None:
            attributes = {"deleted": True}
        limit = parse_limit(attributes)
        self._ats.attest([directive_attestation(LIMIT, handler, attributes)])
        wanted = None if limit is None else [limit.concurrency, limit.rate, limit.per_ms]
        self._until_pulse_sees(lambda applied: applied.get(handler) == wanted, limits=True)  # the next submit meets it
        return limit

    def limits(self) -> dict[str, Limit]:
        return self._directives().limits

    def _directives(self) -> Directives:
        return resolve_directives(self.query_filter(DIRECTIVES_FILTER))

    def follow(self, id: str, timeout: float | None = None) -> Iterable[JobChanged | JobProgressed | JobOutput]:
        """Job ``id``'s output, progress and state as they happen (asked for over this
        connection), ending with its final JobChanged."""
        for event in self._ensure_follower().follow(id, timeout):
            yield decoded_event(event)

    def wait(self, id: str, *, timeout: float | None = None) -> Job:
        """Block until job ``id`` is final and return its record (with its result)."""
        return decoded(self._ensure_follower().outcome(id, timeout))

    def _ensure_follower(self):
        if self._follower is None:
            from qntx.follow import JobFollower

            self._follower = JobFollower(self.server, self.settings.request_timeout_s)
        return self._follower

    def close(self) -> None:
        """Flush the submissions still waiting for their reply (raising the first
        refusal), then close the connections."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            _open_buses.discard(self)
            self._ats.close()
            if self._server is not None:
                self._server.close()
            if self._follower is not None:
                self._follower.outcomes.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already on its way: report, do not replace it
            self.close()
        except QntxError as error:
            _warn_unsettled(error)


def _warn_unsettled(error: QntxError) -> None:
    failures = getattr(error, "failures", [])
    print(f"qntx: {len(failures) or 1} submitted job(s) were refused or not confirmed: {error}", file=sys.stderr)


_open_buses: weakref.WeakSet[Bus] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """At interpreter exit, submissions still unconfirmed are settled, and reported."""
    for bus in list(_open_buses):
        try:
            bus.close()
        except QntxError as error:
            _warn_unsettled(error)
        except Exception:  # sockets may already be gone this late
            pass


def connect(home: str | Path | None = None, *, embedded: bool | None = None, **settings: Any) -> Bus:
    """Connect to the bus of ``home`` ($QNTX_HOME, default ~/.qntx), or to the bus of
    another host through its server's address: ``connect("tcp://HOST:PORT")`` (this
    home's keys authenticate; a bus that does not answer raises Unavailable)."""
    home, settings = split_address(home, settings)
    return Bus(load_settings(home, **settings), embedded=embedded)


def split_address(home: str | Path | None, settings: dict[str, Any]) -> tuple[str | Path | None, dict[str, Any]]:
    """``connect("tcp://…")`` names a server, not a home."""
    if isinstance(home, str) and home.startswith("tcp://"):
        return None, {**settings, "connect": home}
    return home, settings
