"""The asyncio scripting API: ``await qntx.aio.connect()`` returns an ``AsyncBus``.

The same calls as ``qntx.Bus`` as coroutines, for code that runs many requests
concurrently (each call is one in-flight request; gather them). It always talks
to running actors: start ``qntx up`` first (``Unavailable`` otherwise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import zmq.asyncio

from qntx.api import JobFailed, ax_filter, make_filter, new_attestation
from qntx.bus.client import AsyncClient
from qntx.follow import AsyncJobFollower, JobEvent
from qntx.protocol import (
    AtsReply,
    Attest,
    Attestation,
    CancelJob,
    Filter,
    GetAttestation,
    GetJob,
    Job,
    JobChanged,
    ListJobs,
    NewAttestation,
    Ping,
    Pong,
    Query,
    RetryJob,
    ServerReply,
    Submit,
)
from qntx.settings import Settings, load_settings


class AsyncJobHandle:
    def __init__(self, bus: AsyncBus, job: Job):
        self.bus = bus
        self.id = job.id
        self.submitted = job

    async def record(self) -> Job:
        return await self.bus.job(self.id)

    async def wait(self, timeout: float | None = None) -> Job:
        return await self.bus.wait(self.id, timeout=timeout)

    async def result(self, timeout: float | None = None) -> Any:
        job = await self.wait(timeout)
        if job.status != "completed":
            raise JobFailed(job)
        return job.result


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
        self.follower = AsyncJobFollower(settings.events_endpoint, self.context, security)

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
        return (await self.ats.request(Query(filter=flt))).records

    async def ax(self, text: str, *, limit: int | None = None) -> list[Attestation]:
        return await self.query_filter(ax_filter(text, limit))

    async def get(self, id: str) -> Attestation:
        return (await self.ats.request(GetAttestation(id=id))).record

    async def submit(self, handler: str, payload: Any = None, **options: Any) -> AsyncJobHandle:
        """Options as ``Bus.submit``: priority, max_attempts, timeout_s, idempotency_key, parent_id."""
        reply = await self.server.request(Submit(handler=handler, payload=payload, **options))
        return AsyncJobHandle(self, reply.job)

    async def job(self, id: str) -> Job:
        return (await self.server.request(GetJob(id=id))).job

    async def jobs(self, status: str | None = None, limit: int = 50) -> list[Job]:
        return (await self.server.request(ListJobs(status=status, limit=limit))).jobs

    async def cancel(self, id: str) -> Job:
        return (await self.server.request(CancelJob(id=id))).job

    async def retry(self, id: str) -> Job:
        return (await self.server.request(RetryJob(id=id))).job

    async def follow(self, id: str, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        async for event in self.follower.follow(id, timeout, self.job):
            yield event

    async def wait(self, id: str, *, timeout: float | None = None) -> Job:
        last = None
        async for event in self.follow(id, timeout):
            if isinstance(event, JobChanged):
                last = event.job
        return last

    async def close(self) -> None:
        self.ats.close()
        self.server.close()
        self.follower.close()
        self.context.destroy(linger=0)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(home: str | Path | None = None, **settings: Any) -> AsyncBus:
    """Connect to the running bus of ``home`` ($QNTX_HOME, default ~/.qntx)."""
    return AsyncBus(load_settings(home, **settings))
