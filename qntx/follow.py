"""Following jobs over the bus's own request connection.

A job's outcome, output and progress come only to whoever asks for that job:
``WaitJob`` requests on the same DEALER as every other request (the events socket
carries notices only). ``follow`` asks with an output cursor and yields what each
answer brings (``JobOutput``, ``JobProgressed``, then ``JobChanged`` when the job's
state moved, its final record last); ``outcome`` asks only for the end.

A plain loop of submits and then results would cost a round trip per result, so
``Outcomes`` asks ahead: while one result is awaited, WaitJob requests for the next
jobs submitted on this connection (those whose handles are still referenced) are in
flight too, READ_AHEAD at most, their records held up to HELD_BYTES. A job nobody
holds a handle of costs nothing here.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from qntx.bus.client import Client
from qntx.bus.codec import Decoder, raise_if_error
from qntx.bus.security import Security
from qntx.errors import QntxError, Timeout
from qntx.handles import decoded_event
from qntx.protocol import (
    FINAL_STATUSES,
    EndedJobs,
    Event,
    Job,
    JobChanged,
    JobOutput,
    JobProgressed,
    JobUpdate,
    WaitJob,
    job_bytes,
)

if TYPE_CHECKING:
    from qntx.bus.async_client import AsyncClient
    from qntx.settings import Settings

JobEvent = JobChanged | JobProgressed | JobOutput
READ_AHEAD = 512
MIN_SPAN = 16  # the fewest ids a read-ahead batch asks for
HELD_BYTES = 64 << 20
SWEEP_BYTES = 256 << 10  # past this (and then past twice what a sweep left), records nobody can ask for are dropped


def wait_slice_s(request_timeout_s: float) -> float:
    """How long one WaitJob may wait at the server: well inside the reply timeout."""
    return max(0.05, request_timeout_s / 2)


def _state(job: Job) -> tuple:
    return (job.status, job.attempts, job.lease, job.runs, job.finished_at, job.run_after)


def events_of(update: JobUpdate, last: Job | None) -> list[JobEvent]:
    """What one WaitJob answer brings, in order: a new state (a run started), the
    output and progress, and the final state last, so what a run wrote comes after
    its start and before its end."""
    changed = last is None or _state(update.job) != _state(last)
    final = update.job.status in FINAL_STATUSES
    events: list[JobEvent] = [JobChanged(job=update.job)] if changed and not final else []
    events += update.output
    if update.progress is not None:
        events.append(JobProgressed(job_id=update.job.id, current=update.progress.current, total=update.progress.total))
    if final:
        events.append(JobChanged(job=update.job))
    return events


class _Clock:
    def __init__(self, job_id: str, timeout: float | None, slice_s: float):
        self.job_id, self.timeout, self.slice_s = job_id, timeout, slice_s
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def next_wait_ms(self) -> int:
        """The wait of the next WaitJob; raises Timeout once the caller's time is up."""
        if self.deadline is None:
            return int(self.slice_s * 1000)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"job {self.job_id} did not finish within {self.timeout:g}s")
        return max(1, int(min(left, self.slice_s) * 1000))


class JobFollower:
    """Blocking: follows jobs and fetches outcomes over one ``Client``."""

    def __init__(self, client: Client, request_timeout_s: float):
        self.client = client
        self.slice_s = wait_slice_s(request_timeout_s)
        self.outcomes = Outcomes(self)

    def ask(self, job_id: str, wait_ms: int, output: int = -1) -> bytes:
        return self.client.send(WaitJob(id=job_id, timeout_ms=wait_ms, output=output))

    def take(self, correlation: bytes, wait_ms: int) -> JobUpdate:
        return raise_if_error(self.client.take(correlation, wait_ms / 1000 + self.slice_s))

    def follow(self, job_id: str, timeout: float | None) -> Iterator[JobEvent]:
        clock = _Clock(job_id, timeout, self.slice_s)
        cursor, last = 0, None
        while True:
            wait_ms = clock.next_wait_ms()
            update = self.take(self.ask(job_id, wait_ms, cursor), wait_ms)
            yield from events_of(update, last)
            last, cursor = update.job, update.next
            if last.status in FINAL_STATUSES:
                return

    def outcome(self, job_id: str, timeout: float | None) -> Job:
        return self.outcomes.wait(job_id, _Clock(job_id, timeout, self.slice_s))


class Outcomes:
    """Outcomes of the jobs submitted on one connection, asked for ahead of need.

    While one result is awaited, one waiting ``EndedJobs`` asks for the next jobs
    submitted here (whose handles are still held) together, about twice as many as
    the answer before brought and READ_AHEAD at most: the
    server answers at the end of the loop turn in which the first of them ended,
    with every one of them that ended by then. A loop of results so costs one
    request per answer, and an answer carries what ended in a turn, not one job.
    Their records are held up to HELD_BYTES. A job not in the batch (waited for out
    of order, or unknown to the server's memory) is asked for with ``WaitJob``."""

    def __init__(self, follower: JobFollower):
        self._follower = follower
        self._submitted: OrderedDict[str, weakref.ref] = OrderedDict()  # not asked for yet
        self._prune_at = 4 * READ_AHEAD  # handles dropped unasked are forgotten at this many
        self._asked: dict[str, bytes] = {}  # job id -> its WaitJob in flight (prefetch)
        self._in_flight: set[bytes] = set()  # the correlations in _asked and of the batch
        self._answers: dict[bytes, Any] = {}  # answers the bus collected on the way
        self._batch: _Batch | None = None  # the EndedJobs in flight
        # Asked for in a batch and not answered, or left over from a narrower batch:
        # first in the next (ordered: taken from the front, given back to the front).
        self._carry: OrderedDict[str, weakref.ref] = OrderedDict()
        self._span = READ_AHEAD  # how many ids the next batch asks for (see _settle_batch)
        self._held: dict[str, Job] = {}  # final records that came ahead of need
        self._held_refs: dict[str, weakref.ref] = {}  # … and the handles they are for
        self._held_bytes = 0
        self._sweep_at = SWEEP_BYTES

    def submitted(self, job_id: str, handle: object) -> None:
        self._submitted[job_id] = weakref.ref(handle)
        if len(self._submitted) >= self._prune_at:  # (twice what a pruning left: linear overall)
            for dead in [i for i, ref in self._submitted.items() if ref() is None]:
                del self._submitted[dead]
            self._prune_at = max(4 * READ_AHEAD, 2 * len(self._submitted))

    def owns(self, correlation: bytes) -> bool:
        return correlation in self._in_flight

    def deliver(self, correlation: bytes, reply: Any) -> None:
        """An answer the bus collected on the way (see Bus._collect)."""
        self._answers[correlation] = reply

    def forget(self, job_id: str) -> None:
        """Its outcome changes (it was retried): what was asked or held is stale."""
        correlation = self._asked.pop(job_id, None)
        if correlation is not None:
            self._in_flight.discard(correlation)
            self._follower.client.forget(correlation)
            self._answers.pop(correlation, None)
        held = self._held.pop(job_id, None)
        if held is not None:
            self._held_bytes -= job_bytes(held)
            self._held_refs.pop(job_id, None)
        if self._batch is not None:
            self._batch.ids.pop(job_id, None)
        self._carry.pop(job_id, None)

    def prefetch(self, job_id: str) -> None:
        """Ask for ``job_id``'s outcome now (before its acceptance is known, say):
        the answer comes as soon as it can, one round trip saved."""
        if job_id not in self._asked and job_id not in self._held:
            self._submitted.pop(job_id, None)
            self._carry.pop(job_id, None)
            correlation = self._follower.ask(job_id, int(self._follower.slice_s * 1000))
            self._asked[job_id] = correlation
            self._in_flight.add(correlation)

    def wait(self, job_id: str, clock: _Clock) -> Job:
        ref = self._carry.pop(job_id, None) or self._submitted.pop(job_id, None)
        while job_id not in self._held and job_id not in self._asked:
            batch = self._batch
            if batch is None:
                if ref is None or not self._read_ahead(job_id, ref, clock):
                    break
            elif job_id in batch.ids:
                if not self._settle_batch(job_id, clock):
                    break
            else:
                break
        if job_id in self._held:
            return self._take_held(job_id)
        follower = self._follower
        while True:
            wait_ms = clock.next_wait_ms()
            correlation = self._asked.pop(job_id, None)
            if correlation is None:
                correlation = follower.ask(job_id, wait_ms)
                self._in_flight.add(correlation)
            try:
                update = self._answer(correlation, wait_ms)
            finally:
                self._in_flight.discard(correlation)
            if update.job.status in FINAL_STATUSES:
                return update.job

    def _take_held(self, job_id: str) -> Job:
        job = self._held.pop(job_id)
        self._held_refs.pop(job_id, None)
        self._held_bytes -= job_bytes(job)
        if job_id in self._asked:  # a prefetch no longer needed
            correlation = self._asked.pop(job_id)
            self._in_flight.discard(correlation)
            self._follower.client.forget(correlation)
        return job

    def _answer(self, correlation: bytes, wait_ms: int) -> Any:
        if correlation in self._answers:
            return raise_if_error(self._answers.pop(correlation))
        return self._follower.take(correlation, wait_ms)

    def _read_ahead(self, first: str, ref: weakref.ref, clock: _Clock) -> bool:
        """Ask for ``first`` and the next jobs together (one waiting EndedJobs);
        False if no more records may be held now."""
        if self._held_bytes >= HELD_BYTES:
            return False
        ids = {first: ref}
        span, carry = self._span, self._carry
        while carry and len(ids) < span:  # (the answer before left them: they come first)
            job_id, other = carry.popitem(last=False)
            ids[job_id] = other
        while self._submitted and len(ids) < span:
            job_id, other = self._submitted.popitem(last=False)
            if other() is not None and job_id not in self._asked and job_id not in self._held:
                ids[job_id] = other
        wait_ms = clock.next_wait_ms()
        correlation = self._follower.client.send(EndedJobs(ids=list(ids), wait_ms=wait_ms))
        self._batch = _Batch(correlation, ids, wait_ms)
        self._in_flight.add(correlation)
        return True

    def _settle_batch(self, job_id: str, clock: _Clock) -> bool:
        """Take the batch's answer; hold what ended and give the rest back to be
        asked for again. False if ``job_id`` is better asked for alone: it is gone
        from the server's memory, or the batch's wait passed with nothing."""
        batch, self._batch = self._batch, None
        reply = None
        try:
            reply = self._answer(batch.correlation, min(batch.wait_ms, clock.next_wait_ms()))
        except Timeout:
            pass
        except QntxError:  # an error answer (an older server): ask one by one
            pass
        finally:
            self._in_flight.discard(batch.correlation)
            self._follower.client.forget(batch.correlation)
            if reply is not None:
                # Ask next for about twice what ended by this answer: every id asked costs
                # encoding here and a lookup at the server, and those not ended are asked again.
                self._span = min(READ_AHEAD, max(MIN_SPAN, 2 * len(reply.jobs)))
                for job in reply.jobs:
                    held = batch.ids.pop(job.id, None)
                    # kept only while someone holds its handle (the one awaited does)
                    if held is not None and (held() is not None or job.id == job_id) and job.status in FINAL_STATUSES:
                        self._held[job.id] = job
                        self._held_refs[job.id] = held
                        self._held_bytes += job_bytes(job)
                if self._held_bytes > self._sweep_at:
                    self._sweep()
            gone = set(reply.gone) if reply is not None else set()
            ref = batch.ids.pop(job_id, None)
            for other in gone:
                batch.ids.pop(other, None)  # asked for alone when their turn comes
            for unanswered in reversed(batch.ids):  # asked for again, first in line
                self._carry[unanswered] = batch.ids[unanswered]
                self._carry.move_to_end(unanswered, last=False)
        if job_id in self._held:
            return True
        if reply is None or job_id in gone or not (reply.jobs or reply.gone):
            clock.next_wait_ms()  # (raises Timeout if the caller's time is up)
            return False
        return self._read_ahead(job_id, ref, clock)

    def _sweep(self) -> None:
        """Drop the records held for handles nobody holds any more (their job ids
        can still be waited for: they are asked for again then)."""
        for job_id in [i for i, ref in self._held_refs.items() if ref() is None]:
            del self._held_refs[job_id]
            self._held_bytes -= job_bytes(self._held.pop(job_id))
        self._sweep_at = max(SWEEP_BYTES, 2 * self._held_bytes)

    def close(self) -> None:
        for correlation in self._in_flight:
            self._follower.client.forget(correlation)
        self._asked.clear()
        self._in_flight.clear()
        self._answers.clear()
        self._batch = None
        self._carry = OrderedDict()


@dataclass(slots=True)
class _Batch:
    correlation: bytes
    ids: dict[str, weakref.ref]  # asked for, not answered yet
    wait_ms: int


class AsyncJobFollower:
    """asyncio: any number of coroutines follow jobs over one ``AsyncClient``."""

    def __init__(self, client: AsyncClient, request_timeout_s: float):
        self.client = client
        self.slice_s = wait_slice_s(request_timeout_s)
        self.outcomes = AsyncOutcomes(self)

    async def ask(self, job_id: str, wait_ms: int, output: int = -1) -> JobUpdate:
        message = WaitJob(id=job_id, timeout_ms=wait_ms, output=output)
        return await self.client.request(message, timeout_s=wait_ms / 1000 + self.slice_s)

    async def follow(self, job_id: str, timeout: float | None) -> AsyncIterator[JobEvent]:
        clock = _Clock(job_id, timeout, self.slice_s)
        cursor, last = 0, None
        while True:
            update = await self.ask(job_id, clock.next_wait_ms(), cursor)
            for event in events_of(update, last):
                yield event
            last, cursor = update.job, update.next
            if last.status in FINAL_STATUSES:
                return

    async def outcome(self, job_id: str, timeout: float | None) -> Job:
        return await self.outcomes.wait(job_id, _Clock(job_id, timeout, self.slice_s))


class AsyncOutcomes:
    """The outcomes that coroutines await, asked for together: the jobs awaited and
    not in a request yet go out in waiting ``EndedJobs`` of up to READ_AHEAD ids
    (several in flight), each answered when the first of its jobs ends with all
    that have; what is still awaited is asked for again. A ``gather`` of many
    results so costs a request per answer, not one per job. A job the server does
    not hold in memory (``gone``) is asked for alone, with ``WaitJob``."""

    def __init__(self, follower: AsyncJobFollower):
        self._follower = follower
        self._waiting: dict[str, list] = {}  # job id -> its waiters (futures)
        self._unasked: dict[str, None] = {}  # awaited, in no request in flight
        self._tasks: set = set()  # batches and lone waits in flight
        self._soon = False  # a call of _ask_unasked is scheduled

    async def wait(self, job_id: str, clock: _Clock) -> Job:
        import asyncio  # (here: a blocking client never pays for importing it)

        future = asyncio.get_running_loop().create_future()
        if job_id not in self._waiting:
            self._waiting[job_id] = []
            self._unasked[job_id] = None
        self._waiting[job_id].append(future)
        if not self._soon:  # those awaited in this turn of the event loop go out together
            self._soon = True
            asyncio.get_running_loop().call_soon(self._ask_unasked)
        try:
            if clock.deadline is None:
                return await future
            return await asyncio.wait_for(future, max(0.0, clock.deadline - time.monotonic()))
        except TimeoutError:
            raise Timeout(f"job {job_id} did not finish within {clock.timeout:g}s") from None
        finally:
            waiters = self._waiting.get(job_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiting[job_id]
                    self._unasked.pop(job_id, None)

    def _ask_unasked(self) -> None:
        self._soon = False
        while self._unasked:
            ids = list(itertools.islice(self._unasked, READ_AHEAD))
            for job_id in ids:
                del self._unasked[job_id]
            self._spawn(self._batch(ids))

    def _spawn(self, work) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _settle(self, job_id: str, job: Job | None = None, error: BaseException | None = None) -> None:
        for future in self._waiting.pop(job_id, ()):
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(job)

    async def _batch(self, ids: list[str]) -> None:
        slice_s = self._follower.slice_s
        try:
            reply = await self._follower.client.request(
                EndedJobs(ids=ids, wait_ms=int(slice_s * 1000)), timeout_s=2 * slice_s
            )
        except QntxError:  # no answer in time, or an older server: each asked alone
            reply = None
        alone = set(ids) if reply is None else set(reply.gone)
        if reply is not None:
            for job in reply.jobs:
                if job.status in FINAL_STATUSES:
                    self._settle(job.id, job)
        for job_id in ids:
            if job_id in self._waiting:
                if job_id in alone:
                    self._spawn(self._alone(job_id))
                else:
                    self._unasked[job_id] = None
        self._ask_unasked()

    async def _alone(self, job_id: str) -> None:
        wait_ms = int(self._follower.slice_s * 1000)
        while job_id in self._waiting:
            try:
                update = await self._follower.ask(job_id, wait_ms)
            except Timeout:
                continue
            except QntxError as exc:  # not found: its waiters learn it
                self._settle(job_id, error=exc)
                return
            if update.job.status in FINAL_STATUSES:
                self._settle(job_id, update.job)
                return


def event_sockets(context: zmq.Context, settings: Settings) -> tuple[list[zmq.Socket], Decoder]:
    """SUB sockets on every events endpoint of the bus (the server's, the ATS's),
    and the decoder of what they carry."""
    endpoints = [e for e in (settings.events_endpoint, settings.ats_events_endpoint) if e]
    return [subscriber(context, e, settings.security, b"") for e in endpoints], Decoder(Event)


def read_event(frames: list[bytes], decoder: Decoder) -> Any:
    """The notice in one message of an events socket (decoded); None if it is not
    one this version can read."""
    if len(frames) != 2:
        return None
    try:
        return decoded_event(decoder.decode(frames[1]))
    except QntxError:
        return None  # an event of a newer version: not ours to read


def subscriber(context: zmq.Context, endpoint: str, security: Security, topic: bytes = b"") -> zmq.Socket:
    """A SUB socket on an events endpoint (notices only; a bounded queue)."""
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    security.connect(sock, endpoint)
    return sock
