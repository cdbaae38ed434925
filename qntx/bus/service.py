"""Answering requests on a bound ROUTER: admission, handlers, replies, refusals.

Both runtimes answer requests the same way: ``Responder`` holds it all (frames to a
typed message, the handler table, the sender's roles, replies and typed errors,
the request counts), and a runtime only says how a reply is put on its socket and
how an admitted request is run. ``Service`` is the poll loop's (``qntx.bus.actor``),
``AsyncService`` asyncio's (``qntx.bus.async_service``).

Whatever a client sends, the service survives: undecodable frames, oversized
bodies, unknown types and handler bugs become a typed ErrorReply when a reply can
be routed, and a log line either way.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import zmq
from loguru import logger

from qntx.bus.codec import Decoder, encode, error_reply
from qntx.bus.gate import Gate, Revoked
from qntx.bus.messages import ErrorReply
from qntx.bus.security import PLAIN
from qntx.bus.sockets import DRAIN_LIMIT, receive
from qntx.errors import BadRequest, Forbidden, Internal, QntxError, TooLarge, UnknownType
from qntx.obs.tally import bump

if TYPE_CHECKING:
    from qntx.bus.actor import Actor


class RejectedFrames(Exception):
    """Frames that cannot become a request; the error goes back if it can be routed."""

    def __init__(self, identity: bytes, correlation: bytes, error: QntxError):
        self.identity = identity
        self.correlation = correlation
        self.error = error


def unpack_request(frames: list[bytes], decoder: Decoder, max_bytes: int) -> tuple[bytes, bytes, Any]:
    """ROUTER frames -> (identity, correlation, message), or RejectedFrames."""
    identity = frames[0]
    if len(frames) != 3:
        correlation = frames[1] if len(frames) > 1 else b""
        raise RejectedFrames(
            identity, correlation, BadRequest(f"expected 2 frames [correlation, body], got {len(frames) - 1}")
        )
    correlation, body = frames[1], frames[2]
    if len(body) > max_bytes:
        raise RejectedFrames(
            identity, correlation, TooLarge(f"message of {len(body)} bytes exceeds the limit of {max_bytes}")
        )
    try:
        return identity, correlation, decoder.decode(body)
    except (BadRequest, UnknownType, TooLarge) as exc:
        raise RejectedFrames(identity, correlation, exc) from None


def error_for(message: Any, exc: Exception) -> QntxError:
    """The typed error a failed handler answers with; a bug is logged with its traceback."""
    if isinstance(exc, QntxError):
        logger.debug("{} failed: {}", type(message).__name__, exc)
        return exc
    logger.error("handler for {} crashed:\n{}", type(message).__name__, traceback.format_exc())
    return Internal(f"{type(exc).__name__}: {exc}")


class Request:
    """Where a reply to one request goes; kept by handlers that reply later.

    ``service`` is the ``Responder`` (of either runtime) that received it and sends
    the reply. ``peer`` is the authorised name of a tcp peer's key (None on ipc)."""

    __slots__ = ("service", "identity", "correlation", "peer", "kind")

    def __init__(self, service: Any, identity: bytes, correlation: bytes, peer: str | None = None, kind: str = ""):
        self.service = service
        self.identity = identity
        self.correlation = correlation
        self.peer = peer
        self.kind = kind  # the request's message type, for the actor's request counts

    def reply(self, message: msgspec.Struct) -> None:
        self.service.send_reply(self, message)

    def fail(self, error: QntxError) -> None:
        self.service.send_reply(self, error_reply(error))


Handler = Callable[[Any, Request], "msgspec.Struct | None"]


def admit(service: Any, frames: list[bytes], peer: str | None) -> tuple[Handler, Any, Request] | None:
    """What is done with a request's frames before its handler runs: decode them,
    find the handler, check the sender's roles. Returns (handler, message, request),
    or None when it was answered already (an error) or gets no answer.
    ``service`` has ``decoder``, ``handlers``, ``max_message_bytes``, ``gate``,
    ``label``, ``refused`` (counts by reason) and ``reject(identity, correlation, error)``."""
    try:
        identity, correlation, message = unpack_request(frames, service.decoder, service.max_message_bytes)
    except RejectedFrames as rejected:
        logger.warning("rejected a message from peer {}: {}", rejected.identity.hex(), rejected.error)
        service.reject(rejected.identity, rejected.correlation, rejected.error)
        return None
    request = Request(service, identity, correlation, peer, type(message).__name__)
    handler = service.handlers.get(type(message))
    if handler is None:
        request.fail(UnknownType(f"{service.label} does not answer {type(message).__name__}"))
        return None
    try:
        service.gate.check(peer, message)
    except Forbidden as exc:
        bump(service.refused, "forbidden")
        request.fail(exc)
        return None
    except Revoked:
        bump(service.refused, "revoked")
        return None
    return handler, message, request


def answer(handler: Handler, message: Any, request: Request) -> None:
    """Run a handler and send what it returns, or the typed error it raised: a bug
    in a handler never takes the actor down."""
    try:
        reply = handler(message, request)
    except Exception as exc:
        reply = error_reply(error_for(message, exc))
    if reply is not None:
        request.reply(reply)


class Responder:
    """A bound ROUTER answering one tagged union of requests, in either runtime.

    ``requests`` counts replies by (request type, "ok" or error code) and
    ``refused`` the messages refused before any handler saw them, by reason; an
    actor's services may share its two dicts (``qntx.obs.metrics`` reads them).
    A runtime gives ``_send`` (how a reply goes out without blocking) and may give
    ``run`` (how an admitted request runs: here, at once)."""

    def __init__(
        self,
        socket: zmq.Socket,
        request_type: Any,
        handlers: dict[type, Handler],
        *,
        label: str,
        max_message_bytes: int,
        gate: Gate | None = None,
        requests: dict[tuple[str, str], int] | None = None,
        refused: dict[str, int] | None = None,
    ):
        self.socket = socket
        self.decoder = Decoder(request_type)
        self.handlers = handlers
        self.label = label
        self.max_message_bytes = max_message_bytes
        self.gate = gate or Gate(PLAIN, "", None)
        self.requests: dict[tuple[str, str], int] = {} if requests is None else requests
        self.refused: dict[str, int] = {} if refused is None else refused

    def handle(self, frames: list[bytes], peer: str | None = None) -> None:
        admitted = admit(self, frames, peer)
        if admitted is not None:
            self.run(*admitted)

    def run(self, handler: Handler, message: Any, request: Request) -> None:
        answer(handler, message, request)

    def reject(self, identity: bytes, correlation: bytes, error: QntxError) -> None:
        bump(self.refused, error.code)
        bump(self.requests, ("undecoded", error.code))
        if correlation:
            self._send(identity, correlation, encode(error_reply(error)))

    def send_reply(self, request: Request, message: msgspec.Struct) -> None:
        key = (request.kind, message.code if type(message) is ErrorReply else "ok")
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if request.correlation:
            self._send(request.identity, request.correlation, encode(message))

    def send_to(self, identity: bytes, message: msgspec.Struct) -> None:
        """Push an unsolicited message to a connected peer (e.g. a job to a worker)."""
        self._send(identity, b"", encode(message))

    def _send(self, identity: bytes, correlation: bytes, body: bytes) -> None:
        raise NotImplementedError


def dropped(identity: bytes, why: str) -> None:
    # The peer stopped reading or is gone; the reply is lost to it (not the data to
    # the store), and the loop must not block on it.
    logger.warning("dropped a message to peer {}: {}", identity.hex(), why)


class Service(Responder):
    """The poll loop's service: read in batches when readable, replies sent at once."""

    def __init__(
        self,
        actor: Actor,
        socket: zmq.Socket,
        request_type: Any,
        handlers: dict[type, Handler],
        max_message_bytes: int,
        gate: Gate | None = None,
    ):
        counts = {"requests": actor.requests, "refused": actor.refused}  # the actor's, shared by its services
        super().__init__(
            socket, request_type, handlers, label=actor.label, max_message_bytes=max_message_bytes, gate=gate, **counts
        )
        self.actor = actor

    def on_readable(self) -> None:
        sock, curve = self.socket, self.gate.curve
        for _ in range(DRAIN_LIMIT):
            try:
                frames, peer = receive(sock, curve, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(frames, peer)

    def _send(self, identity: bytes, correlation: bytes, body: bytes) -> None:
        try:
            # copy=False: a big body is handed to libzmq without a copy (small ones are copied anyway).
            self.socket.send_multipart([identity, correlation, body], zmq.NOBLOCK, copy=False)
        except (zmq.Again, zmq.ZMQError) as exc:
            dropped(identity, exc.strerror)
