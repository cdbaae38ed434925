"""The asyncio scripting API: ``await qntx.aio.connect()`` returns an ``AsyncBus``.

The same calls as ``qntx.Bus``, as coroutines, for code that runs many requests
concurrently (each call is one in-flight request; gather them). Every call is
written once in ``qntx.calls``; this module is their asyncio driver, with the
same signatures and defaults (tests/unit/test_api_parity.py). It always talks to
running actors: start ``qntx up`` first (``Unavailable`` otherwise).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import zmq.asyncio

from qntx.api import split_address, warn_unsettled
from qntx.bus.client import PIPELINE_WINDOW, AsyncClient
from qntx.calls import ATS, SERVER, Ask, AskEach, Enqueue, Nap
from qntx.calls.derive import with_calls
from qntx.errors import NotFound, QntxError, Timeout, Unavailable
from qntx.follow import AsyncJobFollower, JobEvent, event_sockets, read_event
from qntx.handles import Acceptance, decoded, decoded_event, first_failure, result_of, unconfirmed
from qntx.join import SILENT_HEARTBEATS, join, rejoined, retried
from qntx.protocol import AtsReply, Event, Job, Ping, ServerReply
from qntx.settings import Settings, load_settings


class AsyncJobHandle:
    """A submitted job: ``.id``, ``await .accepted()``, ``await .result(timeout)``."""

    def __init__(self, bus: AsyncBus, job_id: str, reply: asyncio.Future):
        self.bus = bus
        self._id = job_id
        self._reply = reply
        self._acceptance = Acceptance(job_id)

    @property
    def id(self) -> str:
        """The job's id: the one it was submitted with, or, with an idempotency key,
        the id of the job the key names (``submit`` waits for the server's answer
        to such a submission, so it is known at once)."""
        record = self._acceptance.record
        return self._id if record is None else record.id

    async def accepted(self, timeout: float | None = None) -> Job:
        """Wait until the server has durably accepted the job; its record then.
        Raises the refusal (e.g. an unknown handler) or a Timeout if no answer came."""
        if not self._acceptance.settled:
            try:
                self._acceptance.settle(await self.bus.server.take(self._reply, timeout))
            except QntxError as exc:
                self._acceptance.fail(unconfirmed(self._id, exc))
        if self._acceptance.error is not None and self in self.bus._submitted:
            self.bus._submitted.remove(self)  # raised here: flush need not report it again
        return self._acceptance.outcome()

    async def record(self) -> Job:
        return await self.bus.job(self.id)

    async def wait(self, timeout: float | None = None) -> Job:
        """Wait until the job is final; return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job_id = (await self.accepted(timeout)).id  # an idempotency key may name an older job
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return await self.bus.wait(job_id, timeout=left)

    async def result(self, timeout: float | None = None) -> Any:
        """The job's result; raises the refusal of its submission, or JobFailed if it
        failed or was cancelled."""
        return result_of(await self.wait(timeout))

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.id!r})"


@with_calls(asynchronous=True)
class AsyncBus:
    """A connection to a running bus, for asyncio. Its calls (``attest``,
    ``query``, ``submit``, ``jobs``, ...) come from ``qntx.calls``, the same as
    ``Bus``'s."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._context = zmq.asyncio.Context()
        timeout = settings.request_timeout_s
        security = settings.security
        self._ats = AsyncClient(settings.ats_endpoint, AtsReply, timeout_s=timeout, context=self._context, security=security)
        self._server = AsyncClient(
            settings.server_endpoint, ServerReply, timeout_s=timeout, context=self._context, security=security
        )
        self._follower = AsyncJobFollower(self._server, timeout)
        self._submitted: list[AsyncJobHandle] = []
        self._prune_at = 1024

    @property
    def embedded(self) -> bool:
        """Always False: the asyncio API talks to running actors only."""
        return False

    @property
    def server(self) -> AsyncClient:
        """The request connection to the server."""
        return self._server

    # ---------------------------------------------------------------- the effects the calls ask for

    async def _ask(self, effect: Ask) -> Any:
        try:
            return await self._ask_once(effect)
        except (Timeout, Unavailable):
            if not (retried(effect.message) and await self._moved()):
                raise
        return await self._ask_once(effect)  # the same request, to the server that took over

    async def _ask_once(self, effect: Ask) -> Any:
        client = self._ats if effect.to == ATS else self._server
        return await client.request(effect.message, timeout_s=effect.timeout_s)

    async def _ask_each(self, effect: AskEach) -> list[Any]:
        try:
            return await self._ask_each_once(effect)
        except (Timeout, Unavailable):
            if not (all(retried(m) for m in effect.messages) and await self._moved()):
                raise
        return await self._ask_each_once(effect)

    async def _moved(self) -> bool:
        """Joined through server addresses and the server stopped answering: join again;
        True if another server leads now (every connection then points at it)."""
        joined = await asyncio.to_thread(rejoined, self.settings)
        if joined is None:
            return False
        self.settings = joined
        self._ats.repoint(joined.ats_endpoint)
        self._server.repoint(joined.server_endpoint)
        return True

    async def _ask_each_once(self, effect: AskEach) -> list[Any]:
        client = self._ats if effect.to == ATS else self._server
        replies: list[Any] = []
        messages = effect.messages
        for start in range(0, len(messages), PIPELINE_WINDOW):  # the same window as Client.request_many
            futures = [await client.send(m) for m in messages[start : start + PIPELINE_WINDOW]]
            replies += [await client.take(f) for f in futures]
        return replies

    async def _nap(self, effect: Nap) -> None:
        await asyncio.sleep(effect.seconds)

    def _server_up(self) -> bool:
        return True  # never reads Pulse's store itself: a stopped server is Unavailable

    def _forget_outcome(self, job_id: str) -> None:
        pass  # (AsyncOutcomes holds no outcome nobody awaits)

    # ---------------------------------------------------------------- submissions

    async def _enqueue(self, effect: Enqueue) -> AsyncJobHandle:
        try:
            reply = await self._server.send(effect.message)
        except Unavailable:  # not sent at all (no server took the connection): it may go to another
            if not await self._moved():
                raise
            reply = await self._server.send(effect.message)
        handle = AsyncJobHandle(self, effect.job_id, reply)
        if effect.keyed:  # the key may name an older job: its id is in the answer
            try:
                await handle.accepted()
            except QntxError:
                pass  # kept in the handle: accepted(), result() and flush raise it
        self._submitted.append(handle)
        if len(self._submitted) > self._prune_at:  # settle what has been answered; keep what flush must see
            for done in self._submitted:
                if done._reply.done() and not done._reply.cancelled() and not done._acceptance.settled:
                    done._acceptance.settle(done._reply.result())
            self._submitted = [h for h in self._submitted if not h._acceptance.settled or h._acceptance.error]
            self._prune_at = max(1024, 2 * len(self._submitted))  # amortised: no rescan per submit
        return handle

    _effects = {Ask: _ask, AskEach: _ask_each, Enqueue: _enqueue, Nap: _nap}  # (as Bus._effects)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every submission so far is accepted or refused; raise the first
        refusal (its ``failures`` lists every refused or unconfirmed job id)."""
        handles, self._submitted = self._submitted, []
        deadline = None if timeout is None else time.monotonic() + timeout  # for all of them together
        failures = []
        for handle in handles:
            try:
                await handle.accepted(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except QntxError as exc:
                failures.append((handle._id, exc))
        if failures:
            raise first_failure(failures)

    # ---------------------------------------------------------------- outcomes and events

    async def follow(self, id: str, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """Job ``id``'s output, progress and state as they happen (asked for over this
        connection), ending with its final JobChanged."""
        async for event in self._follower.follow(id, timeout):
            yield decoded_event(event)

    async def wait(self, id: str, *, timeout: float | None = None) -> Job:
        """Wait until job ``id`` is final and return its record (with its result).
        A job this connection submitted and the server refused raises the refusal."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return decoded(await self._follower.outcome(id, timeout))
        except NotFound:
            if not await self._accepted_now(id):
                raise
        except (Timeout, Unavailable):
            if not await self._moved():
                raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return decoded(await self._follower.outcome(id, left))  # asked again (of the server that took over)

    async def _accepted_now(self, id: str) -> bool:
        """For a job the server does not know: raise the refusal of this connection's
        submission of it, if it was refused; True if that submission was still
        waiting for its answer and is accepted now."""
        for handle in self._submitted:
            if handle._id == id:
                settled = handle._acceptance.settled
                await handle.accepted()  # raises its refusal
                return not settled
        return False

    async def events(self) -> AsyncIterator[Event]:
        """Every notice of the bus as it happens: the server's (a job changed, handlers
        registered) and the ATS's (attestations created). Notices carry no results,
        output or bodies (``job``, ``follow`` and ``get`` have those); they are fast,
        not guaranteed (a slow reader's are dropped): who needs the state asks."""
        # Joined through server addresses, a quiet stream is a cue to check the server is
        # still there, and to subscribe at the one that took over if it is not.
        quiet_ms = self.settings.heartbeat_s * SILENT_HEARTBEATS * 1000 if self.settings.connect else None
        sockets: list = []
        try:
            while True:
                subscribed = self.settings
                sockets, decoder = event_sockets(self._context, subscribed)
                poller = zmq.asyncio.Poller()
                for sock in sockets:
                    poller.register(sock, zmq.POLLIN)
                while self.settings is subscribed:
                    ready = await poller.poll(quiet_ms)
                    for sock, _ in ready:
                        event = read_event(await sock.recv_multipart(), decoder)
                        if event is not None:
                            yield event
                    if not ready:
                        await self._still_there()
                for sock in sockets:
                    sock.close(0)
        finally:
            for sock in sockets:
                sock.close(0)

    async def _still_there(self) -> None:
        """Ask the server for a sign of life (joining the one that took over if none comes)."""
        try:
            await self._ask(Ask(SERVER, Ping(), timeout_s=self.settings.heartbeat_s * SILENT_HEARTBEATS))
        except QntxError:
            pass  # no server answers yet: asked again after the next quiet spell

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        """Flush the submissions still waiting for their reply (raising the first
        refusal), then close the connections."""
        try:
            await self.flush()
        finally:
            self._ats.close()
            self._server.close()
            self._context.destroy(linger=0)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.close()
            return
        try:  # an exception is already on its way: report, do not replace it
            await self.close()
        except QntxError as error:
            warn_unsettled(error)


async def connect(home: str | Path | None = None, **settings: Any) -> AsyncBus:
    """Connect to the running bus of ``home`` ($QNTX_HOME, default ~/.qntx), or of
    another host through its server's address: ``connect("tcp://HOST:PORT")``."""
    home, settings = split_address(home, settings)
    resolved = load_settings(home, **settings)
    if resolved.connect:
        resolved = await asyncio.to_thread(join, resolved)
    return AsyncBus(resolved)
