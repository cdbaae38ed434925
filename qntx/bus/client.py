"""Request/reply clients over DEALER: a blocking one and an asyncio one.

Both speak the frame layout of ``qntx.bus.codec``: each request carries a fresh
correlation id, replies are matched by it (a late reply to a timed-out request is
dropped), and an ErrorReply is raised as its typed exception. Both set
``IMMEDIATE`` so a request to an actor that is not running fails fast as
``Unavailable`` instead of waiting in a queue for a peer that may never come.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import zmq

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
    """A blocking client for one actor endpoint. Not thread-safe: one per thread.

    Requests may be pipelined: ``send`` returns the correlation id at once and
    ``take`` (or ``arrived``) hands over its reply later; replies are matched by id,
    whatever order they come in. ``request`` is the two in one."""

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
        self._socket.setsockopt(zmq.RCVHWM, 0)  # pipelined replies wait here, unbounded
        _prepare(self._socket, endpoint, security)
        self._decoder = Decoder(reply_type, replies=True)  # of our own actors
        self._ids = itertools.count(1)
        self._outstanding: set[bytes] = set()  # sent, reply not taken yet
        self._arrived: dict[bytes, Any] = {}  # replies received, not taken yet
        self._sizes: dict[bytes, int] = {}  # their sizes on the wire
        self.waiting_bytes = 0  # the sum of those: what replies not taken yet hold

    def send(self, message: msgspec.Struct) -> bytes:
        """Send a request without waiting; its correlation id names its reply."""
        correlation = next(self._ids).to_bytes(8, "big")
        self._send(correlation, message)
        self._outstanding.add(correlation)
        return correlation

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

    def take(self, correlation: bytes, timeout_s: float | None = None) -> Any:
        """The reply to ``correlation`` (an ErrorReply is returned, not raised)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while correlation not in self._arrived:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._receive(remaining):
                self._outstanding.discard(correlation)  # a late reply is dropped
                raise Timeout(f"no reply from {self.endpoint} within {limit:g}s")
        self._outstanding.discard(correlation)
        self.waiting_bytes -= self._sizes.pop(correlation, 0)
        return self._arrived.pop(correlation)

    def arrived(self, wait_s: float = 0.0) -> dict[bytes, Any]:
        """Every reply that has come in (waiting up to ``wait_s`` for one), handed over."""
        if not self._arrived:
            self._receive(wait_s)
        else:
            self._receive(0)
        got, self._arrived = self._arrived, {}
        self._sizes, self.waiting_bytes = {}, 0
        self._outstanding.difference_update(got)
        return got

    def forget(self, correlation: bytes) -> None:
        """Stop waiting for a reply (it is dropped if it comes)."""
        self._outstanding.discard(correlation)
        self._arrived.pop(correlation, None)
        self.waiting_bytes -= self._sizes.pop(correlation, 0)

    def _receive(self, wait_s: float) -> bool:
        """Read what has arrived, waiting up to ``wait_s`` for the first; False if nothing came."""
        if not self._socket.poll(max(0.0, wait_s) * 1000, zmq.POLLIN):
            return False
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if len(frames) == 2 and frames[0] in self._outstanding:
                self._arrived[frames[0]] = self._decoder.decode(frames[1])
                self._sizes[frames[0]] = len(frames[1])
                self.waiting_bytes += len(frames[1])
            if not self._socket.get(zmq.EVENTS) & zmq.POLLIN:
                return True  # drained, without raising Again (which costs more than asking)

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
        self._send(b"", message)

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
