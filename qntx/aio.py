"""The asyncio scripting API: ``await qntx.aio.connect()`` returns an ``AsyncBus``.

The same calls as ``qntx.Bus`` as coroutines, for code that runs many requests
concurrently (each call is one in-flight request; gather them). It always talks
to running actors: start ``qntx up`` first (``Unavailable`` otherwise).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq.asyncio

from qntx.api import ax_filter, make_filter, new_attestation, split_address, with_local_actors
from qntx.asid import new_asid
from qntx.ats.store import next_page
from qntx.bus.client import PIPELINE_WINDOW, AsyncClient
from qntx.bus.codec import Decoder
from qntx.errors import Invalid, QntxError
from qntx.follow import AsyncJobFollower, JobEvent, subscriber
from qntx.handles import (
    Acceptance,
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
    MAX_PAGE,
    AtsReply,
    Attest,
    Attestation,
    CancelJob,
    Event,
    Filter,
    GetAttestation,
    GetJob,
    GetStatus,
    Job,
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
)
from qntx.settings import Settings, load_settings


class AsyncJobHandle:
    """A submitted job: ``.id``, ``await .accepted()``, ``await .result(timeout)``."""

    def __init__(self, bus: AsyncBus, job_id: str, reply: asyncio.Future):
        self.bus = bus
        self.id = job_id  # with an idempotency key, ``(await accepted()).id`` names the job
        self._reply = reply
        self._acceptance = Acceptance(job_id)

    async def accepted(self, timeout: float | None = None) -> Job:
        """Wait until the server has durably accepted the job; its record then."""
        if not self._acceptance.settled:
            try:
                self._acceptance.settle(await self.bus.server.take(self._reply, timeout))
            except QntxError as exc:
                self._acceptance.fail(unconfirmed(self.id, exc))
        return self._acceptance.outcome()

    async def record(self) -> Job:
        return await self.bus.job(self.id)

    async def wait(self, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        job_id = (await self.accepted(timeout)).id  # an idempotency key may name an older job
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await self.bus.wait(job_id, timeout=left)

    async def result(self, timeout: float | None = None) -> Any:
        return result_of(await self.wait(timeout))

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.id!r})"


class AsyncBus:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.context = zmq.asyncio.Context()
        timeout = settings.request_timeout_s
        security = settings.security
        self.ats = AsyncClient(settings.ats_endpoint, AtsReply, timeout_s=timeout, context=self.context, security=security)
        self.server = AsyncClient(
            settings.server_endpoint, ServerReply, timeout_s=timeout, context=self.context, security=security
        )
        self.follower = AsyncJobFollower(self.server, timeout)
        self._submitted: list[AsyncJobHandle] = []
        self._prune_at = 1024

    async def ping(self) -> Pong:
        return await self.ats.request(Ping())

    async def attest(
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
        item = new_attestation(subjects, predicates, contexts, actors, attributes, timestamp, source, id)
        return (await self.ats.request(Attest(items=[item]))).records[0]

    async def attest_many(self, items: Iterable[dict[str, Any] | NewAttestation]) -> list[Attestation]:
        batch = [i if isinstance(i, NewAttestation) else new_attestation(**i) for i in items]
        return (await self.ats.request(Attest(items=batch))).records

    async def query(self, **fields: Any) -> list[Attestation]:
        """Keyword arguments as ``Bus.query`` (subjects=, predicates=, ..., limit=)."""
        return await self.query_filter(make_filter(**fields))

    async def query_filter(self, flt: Filter) -> list[Attestation]:
        """Every match (up to the filter's limit), page after page."""
        out: list[Attestation] = []
        current = flt
        while current is not None:
            page = await self.ats.request(Query(filter=current))
            out += page.records
            current = next_page(flt, page.cursor, len(out))
        return out

    async def query_page(self, flt: Filter) -> tuple[list[Attestation], str | None]:
        """One page of matches, newest first, and the cursor of the next (None: no more);
        pass it back as the filter's ``cursor``."""
        page = await self.ats.request(Query(filter=flt))
        return page.records, page.cursor

    async def ax(self, text: str, *, limit: int | None = None) -> list[Attestation]:
        return await self.query_filter(ax_filter(text, limit))

    async def stats(self) -> StatsReply:
        return await self.ats.request(Stats())

    async def get(self, id: str) -> Attestation:
        return (await self.ats.request(GetAttestation(id=id))).record

    async def submit(self, handler: str, payload: Any = None, *, id: str | None = None, **options: Any) -> AsyncJobHandle:
        """Enqueue a job; returns once it is sent (``await handle.accepted()`` waits for
        the server's durable acceptance). Options as ``Bus.submit``: priority,
        max_attempts, timeout_s, idempotency_key, parent_id."""
        job_id = id or new_asid(handler if isinstance(handler, str) else "_", prefix="JB")
        message = submit_message(handler, encode_payload(payload, self.settings.max_payload_bytes), job_id, **options)
        handle = AsyncJobHandle(self, job_id, await self.server.send(message))
        self._submitted.append(handle)
        if len(self._submitted) > self._prune_at:  # settle what has been answered; keep what flush must see
            for done in self._submitted:
                if done._reply.done() and not done._reply.cancelled() and not done._acceptance.settled:
                    done._acceptance.settle(done._reply.result())
            self._submitted = [h for h in self._submitted if not h._acceptance.settled or h._acceptance.error]
            self._prune_at = max(1024, 2 * len(self._submitted))  # amortised: no rescan per submit
        return handle

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every submission so far is accepted or refused; raise the first refusal."""
        handles, self._submitted = self._submitted, []
        failures = []
        for handle in handles:
            try:
                await handle.accepted(timeout)
            except QntxError as exc:
                failures.append((handle.id, exc))
        if failures:
            raise first_failure(failures)

    async def job(self, id: str) -> Job:
        return decoded((await self.server.request(GetJob(id=id))).job)

    async def dependents(self, id: str) -> list[str]:
        """The ids of the jobs that run after job ``id``."""
        return (await self.server.request(GetJob(id=id))).dependents

    async def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        return [decoded(j) for j in (await self.server.request(ListJobs(status=status, limit=limit))).jobs]

    async def jobs_page(
        self, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """One page of jobs, newest first (without payloads), and the cursor of the next
        page (None: no more)."""
        reply = await self.server.request(ListJobs(status=status, limit=limit, cursor=cursor))
        return [decoded(j) for j in reply.jobs], reply.cursor

    async def status(self) -> StatusReply:
        """Every actor with pid/endpoint/health, queue depth by status, registered handlers."""
        reply = await self.server.request(GetStatus())
        try:
            pong = await self.ats.request(Ping())
        except QntxError:
            pong = None
        return with_local_actors(self.settings, reply, pong)

    async def pause(self, id: str) -> Job:
        """Hold a queued job (it keeps its place) until ``resume``."""
        return decoded((await self.server.request(PauseJob(id=id))).job)

    async def resume(self, id: str) -> Job:
        return decoded((await self.server.request(ResumeJob(id=id))).job)

    async def cancel(self, id: str) -> Job:
        return decoded((await self.server.request(CancelJob(id=id))).job)

    async def matching_jobs(
        self, *, status: str | None = None, handler: str | None = None, since: int | datetime | None = None
    ) -> list[str]:
        """As ``Bus.matching_jobs``: the ids of the jobs that match, newest first."""
        selection = JobSelection(status, handler, since)
        ids: list[str] = []
        page = ListJobs(status=status, limit=MAX_PAGE)
        while True:
            reply = await self.server.request(page)
            ids += selection.ids(reply.jobs)
            if reply.cursor is None or selection.past(reply.jobs):
                return ids
            page = ListJobs(status=status, limit=MAX_PAGE, cursor=reply.cursor)

    async def retry_jobs(
        self, *, status: str = "failed", handler: str | None = None, since: int | datetime | None = None,
        latest: bool = False,
    ) -> Steered:  # fmt: skip
        """As ``Bus.retry_jobs``: retry every job that matches, each once."""
        return await self.retry_many(await self.matching_jobs(status=status, handler=handler, since=since), latest=latest)

    async def cancel_jobs(
        self, *, status: str | None = None, handler: str | None = None, since: int | datetime | None = None
    ) -> Steered:
        """As ``Bus.cancel_jobs``: cancel every job that matches, each once."""
        if status is None and handler is None and since is None:
            raise Invalid("cancel_jobs needs a status, a handler or a time to choose the jobs")
        return await self.cancel_many(await self.matching_jobs(status=status, handler=handler, since=since))

    async def retry_many(self, ids: Iterable[str], *, latest: bool = False) -> Steered:
        """Retry each of ``ids`` once, pipelined; what was skipped (not failed or
        cancelled any more, say) is in ``Steered.skipped``."""
        return await self._steer_each(list(dict.fromkeys(ids)), lambda i: RetryJob(id=i, latest=latest, brief=True))

    async def cancel_many(self, ids: Iterable[str]) -> Steered:
        """Cancel each of ``ids`` once, pipelined (final ones are skipped)."""
        return await self._steer_each(list(dict.fromkeys(ids)), lambda i: CancelJob(id=i, brief=True))

    async def _steer_each(self, ids: list[str], message: Callable[[str], Any]) -> Steered:
        steered = Steered()
        for start in range(0, len(ids), PIPELINE_WINDOW):
            chunk = ids[start : start + PIPELINE_WINDOW]
            futures = [await self.server.send(message(i)) for i in chunk]
            for job_id, future in zip(chunk, futures, strict=True):
                steered.count(job_id, await self.server.take(future))
        return steered

    async def retry(self, id: str, *, latest: bool = False) -> Job:
        return decoded((await self.server.request(RetryJob(id=id, latest=latest))).job)

    async def follow(self, id: str, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """Job ``id``'s output, progress and state as they happen (asked for over this
        connection), ending with its final JobChanged."""
        async for event in self.follower.follow(id, timeout):
            yield decoded_event(event)

    async def events(self) -> AsyncIterator[Event]:
        """Every notice of the bus as it happens: the server's (a job changed, handlers
        registered) and the ATS's (attestations created). Notices carry no results,
        output or bodies (``job``, ``follow`` and ``get`` have those); they are fast,
        not guaranteed (a slow reader's are dropped): who needs the state asks."""
        endpoints = [e for e in (self.settings.events_endpoint, self.settings.ats_events_endpoint) if e]
        sockets = [subscriber(self.context, e, self.settings.security, b"") for e in endpoints]
        poller = zmq.asyncio.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        decoder = Decoder(Event)
        try:
            while True:
                for sock, _ in await poller.poll():
                    frames = await sock.recv_multipart()
                    if len(frames) != 2:
                        continue
                    try:
                        event = decoder.decode(frames[1])
                    except QntxError:
                        continue  # an event of a newer version: not ours to read
                    yield decoded_event(event)
        finally:
            for sock in sockets:
                sock.close(0)

    async def wait(self, id: str, *, timeout: float | None = None) -> Job:
        """Wait until job ``id`` is final and return its record (with its result)."""
        return decoded(await self.follower.outcome(id, timeout))

    async def close(self) -> None:
        """Flush the submissions still waiting for their reply (raising the first
        refusal), then close the connections."""
        try:
            await self.flush()
        finally:
            self._close_sockets()

    def _close_sockets(self) -> None:
        self.ats.close()
        self.server.close()
        self.context.destroy(linger=0)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
            return
        try:  # an exception is already on its way: report, do not replace it
            await self.close()
        except QntxError as error:
            print(f"qntx: submitted job(s) were refused or not confirmed: {error}", file=sys.stderr)


async def connect(home: str | Path | None = None, **settings: Any) -> AsyncBus:
    """Connect to the running bus of ``home`` ($QNTX_HOME, default ~/.qntx), or of
    another host through its server's address: ``connect("tcp://HOST:PORT")``."""
    home, settings = split_address(home, settings)
    resolved = load_settings(home, **settings)
    if resolved.connect:
        from qntx.join import join

        resolved = await asyncio.to_thread(join, resolved)
    return AsyncBus(resolved)
