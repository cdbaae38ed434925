"""The client core: requests over a DEALER and the matching of their replies.

Every requester on the bus (the blocking ``Client``, the asyncio ``AsyncClient``
and an actor's ``Peer``) does the same things the same way, here: the socket's
rules (``IMMEDIATE``, so a request to an actor that is not running fails fast as
``Unavailable`` instead of waiting in a queue for a peer that may never come), a
fresh correlation id per request, the frames ``[correlation, body]`` of
``qntx.bus.codec`` (an empty correlation asks for no reply), replies matched by id
whatever order they come in (a late reply to a request nobody waits for any more is
dropped; one that cannot be decoded becomes an ErrorReply), and the errors of a
request that timed out or found nobody. What waits for a reply (a loop turn, a
future, a callback) is each driver's own: it keeps it in ``pending``.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec
import zmq

from qntx.bus.codec import Decoder, encode, error_reply
from qntx.bus.security import Security
from qntx.errors import QntxError, Timeout, TooLarge, Unavailable

# How long a request waits for the connection to the actor to exist at all.
CONNECT_WAIT_S = 1.0

_ABSENT = object()


class Requester:
    """The requests one DEALER has in flight to one endpoint.

    ``own_actors``: the replies come from QNTX's own actors, so a body is not
    checked for decoding to far more memory than its size (``qntx.bus.codec``)."""

    def __init__(
        self,
        socket: zmq.Socket,
        endpoint: str,
        reply_type: Any,
        security: Security,
        *,
        timeout_s: float = 10.0,
        max_message_bytes: int | None = None,
        own_actors: bool = True,
    ):
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        security.connect(socket, endpoint)
        self.socket = socket
        self.endpoint = endpoint
        self.security = security
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self.decoder = Decoder(reply_type, replies=own_actors)
        self.pending: dict[bytes, Any] = {}  # correlation -> what waits for its reply
        self._ids = itertools.count(1)
        # Our own actors are started by `qntx up`; a peer may be anyone's.
        self._hint = " (is `qntx up` running?)" if own_actors else ""

    def next_id(self) -> bytes:
        """A fresh correlation id; the driver puts what waits for its reply in ``pending``."""
        return next(self._ids).to_bytes(8, "big")

    def frames(self, correlation: bytes, message: msgspec.Struct) -> list[bytes]:
        """The frames of a request (or, with an empty correlation, of a notice)."""
        body = encode(message)
        if self.max_message_bytes is not None and len(body) > self.max_message_bytes:
            # Refused here: past the actor's hard limit the transport would drop
            # the connection without a word, and the request would time out.
            raise TooLarge(f"message of {len(body)} bytes exceeds the limit of {self.max_message_bytes}")
        return [correlation, body]

    def match(self, frames: list[bytes]) -> tuple[bytes, Any, Any] | None:
        """(correlation, its waiter, the reply) for a reply that is waited for; the
        waiter is pending no more. None for anything else: a late or malformed reply."""
        if len(frames) != 2:
            return None
        waiter = self.pending.pop(frames[0], _ABSENT)
        if waiter is _ABSENT:
            return None
        return frames[0], waiter, self.decode(frames[1])

    def decode(self, body: bytes) -> Any:
        """A reply body as its message; an ErrorReply if it cannot be decoded."""
        try:
            return self.decoder.decode(body)
        except QntxError as exc:
            return error_reply(exc)

    def limit(self, timeout_s: float | None) -> float:
        """How long a request waits for its reply: ``timeout_s``, or the client's."""
        return self.timeout_s if timeout_s is None else timeout_s

    def timed_out(self, limit: float) -> Timeout:
        return Timeout(f"no reply from {self.endpoint} within {limit:g}s")

    def unreachable(self) -> Unavailable:
        return Unavailable(f"no actor is answering at {self.endpoint}{self._hint}")

    def lost(self) -> Unavailable:
        return Unavailable(f"lost the connection to {self.endpoint}")

    def repoint(self, endpoint: str) -> None:
        """Talk to ``endpoint`` from now on, on the same socket (whoever holds the client
        keeps it); a request in flight to the old endpoint gets no reply."""
        if endpoint == self.endpoint:
            return
        try:
            self.socket.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # (never connected, or already gone)
        self.security.connect(self.socket, endpoint)
        self.endpoint = endpoint

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget, never waiting: dropped while the peer is not connected."""
        try:
            self.socket.send_multipart(self.frames(b"", message), zmq.NOBLOCK)
        except zmq.Again:
            pass


class ClientBase:
    """What the blocking and the asyncio client share around their core."""

    _requests: Requester

    @property
    def endpoint(self) -> str:
        return self._requests.endpoint

    def repoint(self, endpoint: str) -> None:
        """Send to ``endpoint`` from now on (a server that took over from this one's)."""
        self._requests.repoint(endpoint)

    @property
    def timeout_s(self) -> float:
        """How long a request waits for its reply unless it says otherwise."""
        return self._requests.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._requests.timeout_s = value
