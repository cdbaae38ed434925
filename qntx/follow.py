"""Following jobs live over the server's event stream.

One SUB socket per bus connection subscribes to every ``job.`` event and keeps
the final record of each watched job it sees, so waiting for thousands of jobs
costs one socket. Events are fast but not guaranteed (PUB drops for slow readers,
and a subscription takes a moment to reach the server), so a follower also asks
the server for the record now and then: a missed event costs latency, never a
hang. ``EventBook`` is the bookkeeping; ``JobFollower`` and ``AsyncJobFollower``
only differ in how they wait.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import zmq
import zmq.asyncio

from qntx.bus.codec import Decoder
from qntx.bus.security import PLAIN, Security
from qntx.errors import Timeout
from qntx.protocol import FINAL_STATUSES, Event, Job, JobChanged, JobOutput, JobProgressed

RECHECK_S = 0.5
# Once an event of the job has arrived the subscription demonstrably works, so the
# server is asked far less often (thousands of jobs followed at once stay cheap).
RECHECK_AFTER_EVENT_S = 2.0
# The first ask waits this long: an event usually arrives well before, and asking
# at once would add a round trip to every wait.
FIRST_CHECK_S = 0.05
# Final records kept for jobs nobody watches yet (a batch submitted before waiting).
FINAL_KEPT = 100_000

JobEvent = JobChanged | JobProgressed | JobOutput


class EventBook:
    """Job events received so far, kept only for the jobs someone watches."""

    def __init__(self):
        self._decoder = Decoder(Event)
        self._final: OrderedDict[str, Job] = OrderedDict()
        self._backlog: dict[str, list[JobEvent]] = {}
        self._watching: dict[str, int] = {}

    def watch(self, job_id: str) -> None:
        self._watching[job_id] = self._watching.get(job_id, 0) + 1

    def unwatch(self, job_id: str) -> None:
        left = self._watching.get(job_id, 1) - 1
        if left:
            self._watching[job_id] = left
            return
        self._watching.pop(job_id, None)
        self._final.pop(job_id, None)
        self._backlog.pop(job_id, None)

    def forget(self, job_id: str) -> None:
        """Drop what is known of a job's outcome (it was retried: a new one is coming)."""
        self._final.pop(job_id, None)
        self._backlog.pop(job_id, None)

    def ingest(self, frames: list[bytes]) -> str | None:
        """Take one event in; the id of the job it is about (None: not a job event)."""
        if len(frames) != 2:
            return None
        event = self._decoder.decode(frames[1])
        if isinstance(event, JobChanged):
            job_id = event.job.id
        elif isinstance(event, JobProgressed | JobOutput):
            job_id = event.job_id
        else:
            return None
        if isinstance(event, JobChanged) and event.job.status in FINAL_STATUSES:
            self._final[job_id] = event.job
            if len(self._final) > FINAL_KEPT:
                self._final.popitem(last=False)
        if job_id in self._watching:
            self._backlog.setdefault(job_id, []).append(event)
        return job_id

    def take(self, job_id: str) -> tuple[list[JobEvent], bool]:
        """Events since the last take (ending with the final one, if the job is done)."""
        events = self._backlog.pop(job_id, [])
        final = self._final.get(job_id)
        if final is None:
            return events, False
        if not events or not isinstance(events[-1], JobChanged) or events[-1].job is not final:
            events.append(JobChanged(job=final))
        return events, True


def subscriber(context: zmq.Context, endpoint: str, security: Security, topic: bytes = b"job.") -> zmq.Socket:
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    security.connect(sock, endpoint)
    return sock


class _Clock:
    """When to re-ask the server, and when to give up."""

    def __init__(self, job_id: str, timeout: float | None):
        self.job_id = job_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.next_check = time.monotonic() + FIRST_CHECK_S

    def due(self) -> bool:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise Timeout(f"job {self.job_id} did not finish within {self.timeout:g}s")
        if now >= self.next_check:
            self.next_check = now + RECHECK_S
            return True
        return False

    def saw_event(self) -> None:
        self.next_check = max(self.next_check, time.monotonic() + RECHECK_AFTER_EVENT_S)

    def wait_s(self) -> float:
        end = self.next_check if self.deadline is None else min(self.next_check, self.deadline)
        return max(0.0, end - time.monotonic())


class JobFollower:
    def __init__(self, endpoint: str, context: zmq.Context | None = None, security: Security = PLAIN):
        self._socket = subscriber(context or zmq.Context.instance(), endpoint, security)
        self.book = EventBook()

    def _pump(self, wait_s: float) -> None:
        if self._socket.poll(wait_s * 1000):
            while True:
                try:
                    self.book.ingest(self._socket.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    return

    def follow(self, job_id: str, timeout: float | None, fetch: Callable[[str], Job]) -> Iterator[JobEvent]:
        clock = _Clock(job_id, timeout)
        self.book.watch(job_id)
        self._pump(0)  # events already here save a round trip to the server
        try:
            while True:
                events, final = self.book.take(job_id)
                yield from events
                if final:
                    return
                if events:
                    clock.saw_event()
                if clock.due():
                    job = fetch(job_id)
                    if job.status in FINAL_STATUSES:
                        yield JobChanged(job=job)
                        return
                self._pump(clock.wait_s())
        finally:
            self.book.unwatch(job_id)

    def close(self) -> None:
        self._socket.close(0)


class AsyncJobFollower:
    """One reader task feeds the book; any number of coroutines wait on it.

    (Several coroutines reading one socket would steal each other's events.)
    """

    def __init__(self, endpoint: str, context: zmq.asyncio.Context, security: Security = PLAIN):
        self._socket = subscriber(context, endpoint, security)
        self.book = EventBook()
        self._reader: asyncio.Task | None = None
        self._waiters: dict[str, list[asyncio.Future]] = {}  # job id -> who waits for its events

    async def _read(self) -> None:
        while True:
            job_id = self.book.ingest(await self._socket.recv_multipart())
            for waiter in self._waiters.pop(job_id, ()):  # wake only who follows that job
                if not waiter.done():
                    waiter.set_result(None)

    def start(self) -> None:
        """Start reading events (before a job is submitted, so none is missed)."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _wait(self, job_id: str, wait_s: float) -> None:
        self.start()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, wait_s)
        except TimeoutError:
            waiters = self._waiters.get(job_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[job_id]

    async def follow(
        self, job_id: str, timeout: float | None, fetch: Callable[[str], Awaitable[Job]]
    ) -> AsyncIterator[JobEvent]:
        clock = _Clock(job_id, timeout)
        self.book.watch(job_id)
        try:
            while True:
                events, final = self.book.take(job_id)
                for event in events:
                    yield event
                if final:
                    return
                if events:
                    clock.saw_event()
                if clock.due():
                    job = await fetch(job_id)
                    if job.status in FINAL_STATUSES:
                        yield JobChanged(job=job)
                        return
                await self._wait(job_id, clock.wait_s())
        finally:
            self.book.unwatch(job_id)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._socket.close(0)
