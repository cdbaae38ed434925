"""The blocking request/reply client over DEALER (``qntx.bus.async_client`` has the
asyncio one, re-exported here). Both are drivers of the client core
``qntx.bus.requester``, which frames, numbers and matches their requests; this one
waits by polling its socket.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import zmq

from qntx.bus.codec import raise_if_error
from qntx.bus.requester import CONNECT_WAIT_S, ClientBase, Requester
from qntx.bus.security import PLAIN, Security

# request_many keeps at most this many requests in flight.
PIPELINE_WINDOW = 512


class Client(ClientBase):
    """A blocking client for one actor endpoint. Not thread-safe: one per thread.

    Requests may be pipelined: ``send`` returns the correlation id at once and
    ``take`` (or ``arrived``) hands over its reply later; replies are matched by id,
    whatever order they come in. ``request`` is the two in one. A reply handed over
    may be an ErrorReply; ``request`` raises it as its typed exception."""

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
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # pipelined replies wait here, unbounded
        self._requests = Requester(
            self._socket, endpoint, reply_type, security, timeout_s=timeout_s, max_message_bytes=max_message_bytes
        )
        self._arrived: dict[bytes, Any] = {}  # replies received, not taken yet
        self._sizes: dict[bytes, int] = {}  # their sizes on the wire
        self.waiting_bytes = 0  # the sum of those: what replies not taken yet hold

    @property
    def max_message_bytes(self) -> int | None:
        return self._requests.max_message_bytes

    def send(self, message: msgspec.Struct) -> bytes:
        """Send a request without waiting; its correlation id names its reply."""
        correlation = self._requests.next_id()
        self._send(self._requests.frames(correlation, message))
        self._requests.pending[correlation] = None
        return correlation

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        if not self._socket.poll(CONNECT_WAIT_S * 1000, zmq.POLLOUT):
            raise self._requests.unreachable()
        self._socket.send_multipart(frames)

    def take(self, correlation: bytes, timeout_s: float | None = None) -> Any:
        """The reply to ``correlation`` (an ErrorReply is returned, not raised)."""
        limit = self._requests.limit(timeout_s)
        deadline = time.monotonic() + limit
        while correlation not in self._arrived:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._receive(remaining):
                self._requests.pending.pop(correlation, None)  # a late reply is dropped
                raise self._requests.timed_out(limit)
        self.waiting_bytes -= self._sizes.pop(correlation, 0)
        return self._arrived.pop(correlation)

    def arrived(self, wait_s: float = 0.0) -> dict[bytes, Any]:
        """Every reply that has come in (waiting up to ``wait_s`` for one), handed over."""
        self._receive(0 if self._arrived else wait_s)
        got, self._arrived = self._arrived, {}
        self._sizes, self.waiting_bytes = {}, 0
        return got

    def forget(self, correlation: bytes) -> None:
        """Stop waiting for a reply (it is dropped if it comes)."""
        self._requests.pending.pop(correlation, None)
        self._arrived.pop(correlation, None)
        self.waiting_bytes -= self._sizes.pop(correlation, 0)

    def _receive(self, wait_s: float) -> bool:
        """Read what has arrived, waiting up to ``wait_s`` for the first; False if nothing came.

        What is queued is read first, without a poll: a poll (or asking for the
        socket's events) costs system calls each time, a read that finds nothing
        only once, at the end of what was queued."""
        if self._drain():
            return True
        if wait_s <= 0 or not self._socket.poll(wait_s * 1000, zmq.POLLIN):
            return False
        self._drain()
        return True

    def _drain(self) -> bool:
        """Read every reply queued now; False if there was none."""
        came = False
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return came
            came = True
            matched = self._requests.match(frames)
            if matched is not None:
                correlation, _, reply = matched
                self._arrived[correlation] = reply
                self._sizes[correlation] = len(frames[1])
                self.waiting_bytes += len(frames[1])

    def request(self, message: msgspec.Struct, *, timeout_s: float | None = None) -> Any:
        """Send one request and return its reply (raising the typed error of an ErrorReply)."""
        return raise_if_error(self.take(self.send(message), timeout_s))

    def request_many(self, messages: Iterable[msgspec.Struct], *, timeout_s: float | None = None) -> list[Any]:
        """Pipeline several requests; replies (or error replies, not raised) in request order.

        At most PIPELINE_WINDOW requests are in flight at once, so a huge batch
        never floods the actor's queues.
        """
        replies: list[Any] = []
        in_flight: collections.deque[bytes] = collections.deque()
        for message in messages:
            if len(in_flight) >= PIPELINE_WINDOW:
                replies.append(self.take(in_flight.popleft(), timeout_s))
            in_flight.append(self.send(message))
        replies.extend(self.take(c, timeout_s) for c in in_flight)
        return replies

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget (an empty correlation id asks for no reply)."""
        self._send(self._requests.frames(b"", message))

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    # AsyncClient lives in its own module: asyncio and zmq.asyncio would cost every
    # blocking client (a CLI command) their import time.
    if name == "AsyncClient":
        from qntx.bus.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
