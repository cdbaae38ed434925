"""The asyncio request/reply client over DEALER (``qntx.bus.client`` has the
blocking one and re-exports this one). Both are drivers of the client core
``qntx.bus.requester``; this one waits on futures, which a reader task settles."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from qntx.bus.codec import raise_if_error
from qntx.bus.requester import CONNECT_WAIT_S, ClientBase, Requester
from qntx.bus.security import PLAIN, Security


class AsyncClient(ClientBase):
    """An asyncio client for one actor endpoint; many requests may be in flight."""

    def __init__(
        self,
        endpoint: str,
        reply_type: Any,
        *,
        timeout_s: float = 10.0,
        context: zmq.asyncio.Context | None = None,
        fail_on_disconnect: bool = False,
        security: Security = PLAIN,
        notices: bool = False,
    ):
        self._context = context or zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._requests = Requester(self._socket, endpoint, reply_type, security, timeout_s=timeout_s)
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        # When the peer process dies its in-flight requests will never be
        # answered; failing them at once beats waiting for their timeouts.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED) if fail_on_disconnect else None
        # ``notices``: fire-and-forget notices (``notify``) go out on a plain DEALER of
        # their own that never receives, connected now so the first one finds it up.
        self._notices: Requester | None = None
        if notices:
            plain = zmq.Context.shadow(self._context.underlying).socket(zmq.DEALER)
            self._notices = Requester(plain, endpoint, reply_type, security)

    async def send(self, message: msgspec.Struct) -> asyncio.Future:
        """Send a request; the future gets its reply (an ErrorReply is not raised)."""
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read_replies())
            if self._monitor is not None:
                self._watcher = loop.create_task(self._watch_disconnects())
        correlation = self._requests.next_id()
        frames = self._requests.frames(correlation, message)
        future = loop.create_future()
        pending = self._requests.pending
        pending[correlation] = future
        future.add_done_callback(lambda _: pending.pop(correlation, None))
        sent = self._socket.send_multipart(frames, zmq.NOBLOCK)  # done at once when the pipe is up
        if sent.done() and sent.exception() is None:
            return future
        if sent.done():  # not connected (IMMEDIATE): wait a moment for the connection
            sent = self._socket.send_multipart(frames)
        try:
            await asyncio.wait_for(sent, CONNECT_WAIT_S)
        except TimeoutError:
            future.cancel()
            raise self._requests.unreachable() from None
        return future

    async def take(self, future: asyncio.Future, timeout_s: float | None = None) -> Any:
        """The reply a ``send`` future gets, within ``timeout_s`` (default: the client's)."""
        limit = self._requests.limit(timeout_s)
        if future.done():
            return future.result()
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            raise self._requests.timed_out(limit) from None

    async def request(self, message: msgspec.Struct, *, timeout_s: float | None = None) -> Any:
        future = await self.send(message)
        limit = self._requests.limit(timeout_s)
        # One timer on the reply itself (cheaper than wait_for's extra futures).
        timer = asyncio.get_running_loop().call_later(limit, self._expire, future, limit)
        try:
            return raise_if_error(await future)
        finally:
            timer.cancel()
            future.cancel()  # a late reply is dropped (no-op once it has one)

    def _expire(self, future: asyncio.Future, limit: float) -> None:
        if not future.done():
            future.set_exception(self._requests.timed_out(limit))

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget; dropped if the peer is not connected (progress and the like).

        With ``notices`` they go out on a socket of their own: a send on the requests'
        socket costs a future and a look at that socket's events (the reader awaits
        replies there), about a third more CPU per notice. They stay in order among
        themselves, not with the requests."""
        (self._notices or self._requests).notify(message)

    def repoint(self, endpoint: str) -> None:
        super().repoint(endpoint)
        if self._notices is not None:
            self._notices.repoint(endpoint)

    async def _read_replies(self) -> None:
        while True:
            matched = self._requests.match(await self._socket.recv_multipart())
            if matched is not None:
                _, future, reply = matched
                if not future.done():
                    future.set_result(reply)

    async def _watch_disconnects(self) -> None:
        while True:
            await self._monitor.recv_multipart()
            for future in list(self._requests.pending.values()):
                if not future.done():
                    future.set_exception(self._requests.lost())

    def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(0)
        self._socket.close(0)
        if self._notices is not None:
            self._notices.socket.close(0)
