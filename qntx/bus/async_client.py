"""The asyncio request/reply client over DEALER (``qntx.bus.client`` has the
blocking one and re-exports this one)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from qntx.bus.client import CONNECT_WAIT_S, _prepare
from qntx.bus.codec import Decoder, encode, raise_if_error
from qntx.bus.security import PLAIN, Security
from qntx.errors import Timeout, Unavailable


def _expire(future: asyncio.Future, endpoint: str, limit: float) -> None:
    if not future.done():
        future.set_exception(Timeout(f"no reply from {endpoint} within {limit:g}s"))


class AsyncClient:
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
    ):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._context = context or zmq.asyncio.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        _prepare(self._socket, endpoint, security)
        self._decoder = Decoder(reply_type, replies=True)  # of our own actors
        self._ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        # When the peer process dies its in-flight requests will never be
        # answered; failing them at once beats waiting for their timeouts.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED) if fail_on_disconnect else None

    async def send(self, message: msgspec.Struct) -> asyncio.Future:
        """Send a request; the future gets its reply (an ErrorReply is not raised)."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
            if self._monitor is not None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnects())
        correlation = next(self._ids).to_bytes(8, "big")
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        future.add_done_callback(lambda _: self._pending.pop(correlation, None))
        frames = [correlation, encode(message)]
        sent = self._socket.send_multipart(frames, zmq.NOBLOCK)  # done at once when the pipe is up
        if sent.done() and sent.exception() is None:
            return future
        if sent.done():  # not connected (IMMEDIATE): wait a moment for the connection
            sent = self._socket.send_multipart(frames)
        try:
            await asyncio.wait_for(sent, CONNECT_WAIT_S)
        except TimeoutError:
            future.cancel()
            raise Unavailable(f"no actor is answering at {self.endpoint} (is `qntx up` running?)") from None
        return future

    async def take(self, future: asyncio.Future, timeout_s: float | None = None) -> Any:
        """The reply a ``send`` future gets, within ``timeout_s`` (default: the client's)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        if future.done():
            return future.result()
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            raise Timeout(f"no reply from {self.endpoint} within {limit:g}s") from None

    async def request(self, message: msgspec.Struct, *, timeout_s: float | None = None) -> Any:
        future = await self.send(message)
        limit = self.timeout_s if timeout_s is None else timeout_s
        # One timer on the reply itself (cheaper than wait_for's extra futures).
        timer = asyncio.get_running_loop().call_later(limit, _expire, future, self.endpoint, limit)
        try:
            return raise_if_error(await future)
        finally:
            timer.cancel()
            future.cancel()  # a late reply is dropped (no-op once it has one)

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget; dropped if the peer is not connected (progress and the like)."""
        try:
            self._socket.send_multipart([b"", encode(message)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    async def _read_replies(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            if len(frames) != 2:
                continue
            future = self._pending.get(frames[0])
            if future is not None and not future.done():
                try:
                    future.set_result(self._decoder.decode(frames[1]))
                except Exception as exc:
                    future.set_exception(exc)

    async def _watch_disconnects(self) -> None:
        while True:
            await self._monitor.recv_multipart()
            for future in list(self._pending.values()):
                if not future.done():
                    future.set_exception(Unavailable(f"lost the connection to {self.endpoint}"))

    def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        if self._monitor is not None:
            self._socket.disable_monitor()
            self._monitor.close(0)
        self._socket.close(0)
