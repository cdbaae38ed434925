"""Request/reply clients over DEALER: a blocking one and an asyncio one.

Both speak the frame layout of ``qntx.bus.codec``: each request carries a fresh
correlation id, replies are matched by it (a late reply to a timed-out request is
dropped), and an ErrorReply is raised as its typed exception. Both set
``IMMEDIATE`` so a request to an actor that is not running fails fast as
``Unavailable`` instead of waiting in a queue for a peer that may never come.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from qntx.bus.codec import Decoder, encode, raise_if_error
from qntx.bus.security import PLAIN, Security
from qntx.errors import Timeout, TooLarge, Unavailable

# How long a request waits for the connection to the actor to exist at all.
CONNECT_WAIT_S = 1.0
# request_many keeps at most this many requests in flight.
PIPELINE_WINDOW = 512


def _prepare(sock: zmq.Socket, endpoint: str, security: Security) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    security.connect(sock, endpoint)


class Client:
    """A blocking client for one actor endpoint. Not thread-safe: one per thread."""

    def __init__(
        self,
        endpoint: str,
        reply_type: Any,
        *,
        timeout_s: float = 10.0,
        context: zmq.Context | None = None,
        security: Security = PLAIN,
        max_message_bytes: int | None = None,
    ):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        _prepare(self._socket, endpoint, security)
        self._decoder = Decoder(reply_type)
        self._ids = itertools.count(1)

    def _send(self, correlation: bytes, message: msgspec.Struct) -> None:
        body = encode(message)
        if self.max_message_bytes is not None and len(body) > self.max_message_bytes:
            # Refused here: past the actor's hard limit the transport would drop
            # the connection without a word, and the request would time out.
            raise TooLarge(f"message of {len(body)} bytes exceeds the limit of {self.max_message_bytes}")
        try:
            self._socket.send_multipart([correlation, body], zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        if not self._socket.poll(CONNECT_WAIT_S * 1000, zmq.POLLOUT):
            raise Unavailable(f"no actor is answering at {self.endpoint} (is `qntx up` running?)")
        self._socket.send_multipart([correlation, body])

    def request(self, message: msgspec.Struct, *, timeout_s: float | None = None) -> Any:
        """Send one request and return its reply (raising the typed error of an ErrorReply)."""
        correlation = next(self._ids).to_bytes(8, "big")
        self._send(correlation, message)
        return raise_if_error(self._receive({correlation}, timeout_s)[correlation])

    def request_many(self, messages: Iterable[msgspec.Struct], *, timeout_s: float | None = None) -> list[Any]:
        """Pipeline several requests; replies (or error replies, not raised) in request order.

        At most PIPELINE_WINDOW requests are in flight at once, so a huge batch
        never floods the actor's queues.
        """
        order: list[bytes] = []
        replies: dict[bytes, Any] = {}
        in_flight: set[bytes] = set()
        for message in messages:
            if len(in_flight) >= PIPELINE_WINDOW:
                got = self._receive(in_flight, timeout_s, at_least=len(in_flight) - PIPELINE_WINDOW // 2)
                replies.update(got)
                in_flight.difference_update(got)
            correlation = next(self._ids).to_bytes(8, "big")
            self._send(correlation, message)
            order.append(correlation)
            in_flight.add(correlation)
        if in_flight:
            replies.update(self._receive(in_flight, timeout_s))
        return [replies[c] for c in order]

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget (an empty correlation id asks for no reply)."""
        self._send(b"", message)

    def _receive(self, wanted: set[bytes], timeout_s: float | None, at_least: int | None = None) -> dict[bytes, Any]:
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        replies: dict[bytes, Any] = {}
        needed = len(wanted) if at_least is None else at_least
        while len(replies) < needed:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(remaining * 1000, zmq.POLLIN):
                raise Timeout(f"no reply from {self.endpoint} within {limit:g}s")
            frames = self._socket.recv_multipart()
            if len(frames) == 2 and frames[0] in wanted:
                replies[frames[0]] = self._decoder.decode(frames[1])
        return replies

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self._decoder = Decoder(reply_type)
        self._ids = itertools.count(1)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        # When the peer process dies its in-flight requests will never be
        # answered; failing them at once beats waiting for their timeouts.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED) if fail_on_disconnect else None

    async def request(self, message: msgspec.Struct, *, timeout_s: float | None = None) -> Any:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
            if self._monitor is not None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnects())
        correlation = next(self._ids).to_bytes(8, "big")
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            try:
                await asyncio.wait_for(
                    self._socket.send_multipart([correlation, encode(message)]), CONNECT_WAIT_S
                )
            except TimeoutError:
                raise Unavailable(f"no actor is answering at {self.endpoint} (is `qntx up` running?)") from None
            try:
                reply = await asyncio.wait_for(future, limit)
            except TimeoutError:
                raise Timeout(f"no reply from {self.endpoint} within {limit:g}s") from None
        finally:
            self._pending.pop(correlation, None)
        return raise_if_error(reply)

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
