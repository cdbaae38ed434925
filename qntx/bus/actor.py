"""The actor runtime: one thread, one poll loop, handler tables keyed by message type.

An actor owns sockets. ``serve`` binds a ROUTER and answers requests with a
handler table ``{MessageType: handler}``; a handler returns the reply message, or
``None`` to reply later through ``Request.reply`` (the ATS uses that to commit many
writers in one transaction before answering any of them). ``call`` sends a request
to another actor and runs a callback with the reply, so an actor never blocks on a
peer. Timers and an ``after_batch`` hook (run once each loop turn, after every
readable socket was drained) complete the toolbox.

Whatever a client sends, the loop survives: undecodable frames, oversized bodies,
unknown types and handler bugs become a typed ErrorReply when a reply can be
routed, and a log line either way.

Limits are raised where the OS allows, at start: the open-file limit to its hard
maximum, and the context's socket limit (libzmq's default is 1,023) from it. What
an actor does when it would pass them is its own business (the server refuses a
worker session it has no room for); the limits are on ``Actor.open_file_limit`` and
``Actor.max_sockets``.

A reader may be paced (``add_reader(..., pace_s=...)``): when it is read again
within two paces of its last read, its socket then rests for ``pace_s`` before the
loop looks at it again, so a steady stream of messages (a thousand workers'
heartbeats) is read in batches, not one loop turn each, while a socket that hears
a message now and then (a few workers) is read at once, as an unpaced one is.
``read_now`` reads a resting socket before something that must see all pending input.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import os
import queue
import resource
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
from loguru import logger

from qntx.bus.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HARD_LIMIT_FACTOR,
    Decoder,
    encode,
    error_reply,
)
from qntx.bus.messages import ErrorReply
from qntx.bus.security import KEYRING_CHECK_S, PLAIN, Security, peer_name, stop_zap
from qntx.errors import (
    BadRequest,
    Forbidden,
    Internal,
    QntxError,
    Timeout,
    TooLarge,
    Unavailable,
    UnknownType,
)
from qntx.lifeline import give_big_blocks_back
from qntx.obs.tally import bump

# How many messages one socket may deliver per loop turn before the others get a go.
DRAIN_LIMIT = 512
# The poll loop never sleeps longer than this, so a stop request is seen promptly.
MAX_POLL_S = 0.25
# Notices an events socket queues for one subscriber that is slow to read them; past
# it they are dropped (and counted). Notices are small (ids, names, a status), so
# this bounds the memory a stalled subscriber can cost in bytes as well.
EVENTS_QUEUE = 10_000
MANY_PREFIXES = 64  # distinct subscribed prefixes past which every notice is just sent
# Replies a ROUTER holds for one peer that is slow to read them.
REPLY_QUEUE_LIMIT = 100_000
# An open-file limit the OS calls unlimited is taken as this many (sockets too).
UNLIMITED_FILES = 1 << 20


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard maximum; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED_FILES
    wanted = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:  # e.g. over the kernel's nr_open
        logger.warning("could not raise the open-file limit from {} to {}: {}", soft, wanted, exc)
        return soft
    return wanted


def open_file_count() -> int:
    """How many files this process has open now (0 where /proc is absent)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


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


# Roles a peer's key needs to send each message type over tcp (qntx.bus.security).
# A message type's roles, or a function of the message that gives them (an Attest of
# a handler needs more than one of a plain claim).
RolePolicy = dict[type, frozenset[str] | Callable[[Any], frozenset[str]]]


class Revoked(Exception):
    """A message over a connection whose key was revoked since: it gets no answer."""


class Gate:
    """Who may send what on one socket. On ipc (no CURVE) every peer is this host's
    own user and passes; over tcp the peer's authorised name (the connection's
    ``User-Id``) must still be authorised and hold one of the roles the message needs."""

    def __init__(self, security: Security, endpoint: str, policy: RolePolicy | None):
        self.curve = security.active(endpoint)
        self.keyring = security.keyring if self.curve else None
        self.policy = policy or {}

    def roles(self, peer: str | None) -> frozenset[str]:
        return self.keyring.roles(peer) if self.keyring is not None and peer else frozenset()

    def check(self, peer: str | None, message: Any) -> None:
        """Raise Forbidden if ``peer`` may not send ``message``."""
        if not self.curve or peer is None:
            # No User-Id: it came over ipc (every CURVE connection passed the ZAP
            # handler, which names it).
            return
        held = self.roles(peer)
        if not held:
            logger.warning("dropped {} from {}: the key is no longer authorised", type(message).__name__, peer)
            raise Revoked(peer)
        needed = self.policy.get(type(message), frozenset({"admin"}))
        if callable(needed):
            needed = needed(message)
        if not held & needed:
            logger.warning("refused {} from {}: the key has role {}", type(message).__name__, peer, ", ".join(sorted(held)))
            raise Forbidden(
                f"{type(message).__name__} needs role {' or '.join(sorted(needed))}; key {peer!r} has {', '.join(sorted(held))}"
            )


def receive(sock: zmq.Socket, curve: bool, flags: int = 0) -> tuple[list[bytes], str | None]:
    """One multipart message and, over CURVE, the authorised name of its sender."""
    if not curve:
        return sock.recv_multipart(flags), None
    frames = sock.recv_multipart(flags, copy=False)
    return [f.bytes for f in frames], peer_name(frames[-1])


class Request:
    """Where a reply to one request goes; kept by handlers that reply later.

    ``service`` is the poll-loop ``Service`` or the asyncio ``AsyncService`` that
    received it: either sends the reply with ``send_reply``. ``peer`` is the
    authorised name of a tcp peer's key (None on ipc)."""

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
    """What both runtimes do with a request's frames before its handler runs: decode
    them, find the handler, check the sender's roles. Returns (handler, message,
    request), or None when it was answered already (an error) or gets no answer.
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


class Service:
    """A bound ROUTER answering one tagged union of requests."""

    def __init__(
        self,
        actor: Actor,
        socket: zmq.Socket,
        request_type: Any,
        handlers: dict[type, Handler],
        max_message_bytes: int,
        gate: Gate | None = None,
    ):
        self.actor = actor
        self.socket = socket
        self.decoder = Decoder(request_type)
        self.handlers = handlers
        self.max_message_bytes = max_message_bytes
        self.gate = gate or Gate(PLAIN, "", None)

    def on_readable(self) -> None:
        sock, curve = self.socket, self.gate.curve
        for _ in range(DRAIN_LIMIT):
            try:
                frames, peer = receive(sock, curve, zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(frames, peer)

    @property
    def label(self) -> str:
        return self.actor.label

    def handle(self, frames: list[bytes], peer: str | None = None) -> None:
        admitted = admit(self, frames, peer)
        if admitted is not None:
            answer(*admitted)

    @property
    def refused(self) -> dict[str, int]:
        return self.actor.refused

    def reject(self, identity: bytes, correlation: bytes, error: QntxError) -> None:
        bump(self.actor.refused, error.code)
        bump(self.actor.requests, ("undecoded", error.code))
        if correlation:
            self._send(identity, correlation, encode(error_reply(error)))

    def send_reply(self, request: Request, message: msgspec.Struct) -> None:
        key = (request.kind, message.code if type(message) is ErrorReply else "ok")
        requests = self.actor.requests
        requests[key] = requests.get(key, 0) + 1
        if request.correlation:
            self._send(request.identity, request.correlation, encode(message))

    def send_to(self, identity: bytes, message: msgspec.Struct) -> None:
        """Push an unsolicited message to a connected peer (e.g. a job to a worker)."""
        self._send(identity, b"", encode(message))

    def _send(self, identity: bytes, correlation: bytes, body: bytes) -> None:
        try:
            # copy=False: a big body is handed to libzmq without a copy (small ones are copied anyway).
            self.socket.send_multipart([identity, correlation, body], zmq.NOBLOCK, copy=False)
        except (zmq.Again, zmq.ZMQError) as exc:
            # The peer stopped reading or is gone; the reply is lost to it (not
            # the data to the store), and the loop must not block on it.
            logger.warning("dropped a message to peer {}: {}", identity.hex(), exc.strerror)


class Peer:
    """A DEALER to another actor, with non-blocking calls and reply callbacks.

    No call ever blocks the loop: the socket only takes a request while a connection
    to the peer is up (``IMMEDIATE``); until then requests wait here, in order, and
    are sent once it is (checked every RESEND_S), or answered ``unavailable`` when
    their timeout passes. So a peer that is absent for hours costs its pending calls
    and nothing more."""

    RESEND_S = 0.02

    def __init__(self, actor: Actor, endpoint: str, reply_type: Any):
        self.actor = actor
        self.endpoint = endpoint
        self.socket = actor.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        actor.security.connect(self.socket, endpoint)
        self.decoder = Decoder(reply_type)
        self._ids = itertools.count(1)
        self._pending: dict[bytes, tuple[Callable[[Any], None], Timer | None]] = {}
        self._unsent: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()  # correlation -> body
        self._resend: Timer | None = None
        actor.add_reader(self.socket, self.on_readable)

    def call(self, message: msgspec.Struct, callback: Callable[[Any], None], timeout_s: float = 10.0) -> None:
        """Send ``message``; ``callback`` later gets the reply, an ErrorReply, or a timeout ErrorReply."""
        correlation = next(self._ids).to_bytes(8, "big")
        timer = self.actor.call_later(timeout_s, lambda: self._expire(correlation))
        self._pending[correlation] = (callback, timer)
        self._unsent[correlation] = encode(message)
        self._send_unsent()

    def _send_unsent(self) -> None:
        self._resend = None
        while self._unsent:
            correlation, body = next(iter(self._unsent.items()))
            try:
                self.socket.send_multipart([correlation, body], zmq.NOBLOCK)
            except zmq.Again:  # no connection to the peer (yet): try again shortly
                self._resend = self.actor.call_later(self.RESEND_S, self._send_unsent)
                return
            del self._unsent[correlation]

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget (dropped while the peer is not connected)."""
        try:
            self.socket.send_multipart([b"", encode(message)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _expire(self, correlation: bytes) -> None:
        entry = self._pending.pop(correlation, None)
        if self._unsent.pop(correlation, None) is not None:  # never sent: nobody was there
            if entry is not None:
                entry[0](error_reply(Unavailable(f"no connection to {self.endpoint}")))
            return
        if entry is not None:
            entry[0](error_reply(Timeout(f"no reply from {self.endpoint}")))

    def on_readable(self) -> None:
        for _ in range(DRAIN_LIMIT):
            if self.socket.closed:  # a reply's callback closed this peer (a plugin dropped)
                return
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            entry = self._pending.pop(frames[0], None)
            if entry is None:
                continue  # a reply that came after its timeout
            callback, timer = entry
            if timer is not None:
                timer.cancel()
            try:
                reply = self.decoder.decode(frames[1])
            except QntxError as exc:
                reply = ErrorReply(code=exc.code, message=exc.message)
            callback(reply)

    def close(self) -> None:
        self.actor.remove_reader(self.socket)
        self.socket.close(0)
        for _callback, timer in self._pending.values():
            if timer is not None:
                timer.cancel()
        if self._resend is not None:
            self._resend.cancel()
        self._pending.clear()
        self._unsent.clear()


class Offloader:
    """Runs blocking work on one background thread; its callback runs on the loop.

    For work that releases the GIL (an fsync) and must not stall the loop meanwhile.
    Jobs run one at a time, in order. A pipe wakes the poll loop when one is done.
    """

    def __init__(self, actor: Actor, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._actor = actor
        actor.add_reader(self._read_fd, self.drain)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any], callback: Callable[[Any], None]) -> None:
        """Run ``work()`` off the loop; later ``callback(result or exception)`` on it."""
        self._jobs.put((work, callback))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, callback = job
            try:
                result = work()
            except BaseException as exc:  # handed to the callback, which decides
                result = exc
            self._done.append((callback, result))
            os.write(self._write_fd, b"!")

    def drain(self) -> None:
        try:
            os.read(self._read_fd, 4096)
        except BlockingIOError:
            pass
        while self._done:
            callback, result = self._done.popleft()
            self._actor._guarded(functools.partial(callback, result))

    def close(self) -> None:
        """Finish the queued work, run its callbacks, stop the thread."""
        self._jobs.put(None)
        self._thread.join()
        self.drain()
        self._actor.remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)


class Timer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], None]):
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Actor:
    """Base of every actor process. Subclasses set ``name``/``label`` and wire sockets in ``setup``."""

    name = "actor"
    label = "Actor"

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, security: Security = PLAIN):
        self.open_file_limit = raise_open_file_limit()
        self.context = zmq.Context()
        # Every socket holds at least one file (its mailbox), so the open-file limit
        # bounds the sockets too; libzmq's own ceiling is SOCKET_LIMIT.
        self.max_sockets = max(64, min(self.open_file_limit, self.context.get(zmq.SOCKET_LIMIT)))
        self.context.set(zmq.MAX_SOCKETS, self.max_sockets)
        self.security = security
        self.max_message_bytes = max_message_bytes
        self.poller = zmq.Poller()
        self._readers: dict[zmq.Socket, Callable[[], None]] = {}
        self._paces: dict[Any, float] = {}  # paced readers -> how long they rest after a read
        self._resting: dict[Any, Timer] = {}  # paced readers out of the poller until their timer
        self._last_read: dict[Any, float] = {}  # paced readers -> monotonic time of their last read
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_ids = itertools.count()
        self._stopping = False
        self.pid = os.getpid()
        # Counted for qntx.obs.metrics: replies by (request type, "ok" or error code),
        # and messages refused before any handler saw them, by reason.
        self.requests: dict[tuple[str, str], int] = {}
        self.refused: dict[str, int] = {}

    # ------------------------------------------------------------------ sockets

    def bind(
        self, kind: int, endpoint: str, *, handover: bool = False, only: str | None = None, also: str = ""
    ) -> zmq.Socket:
        """A socket of ``kind`` bound to ``endpoint`` (and to ``also``: a tcp endpoint for
        other hosts). ``handover``: a ROUTER peer that reconnects with the same routing
        id takes its old connection over. ``only``: over tcp, the one authorised key
        name that may connect."""
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind in (zmq.ROUTER, zmq.PULL):
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes * HARD_LIMIT_FACTOR)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if kind == zmq.ROUTER:
            # (MAXMSGSIZE above: past it the transport drops the peer's message
            # unread; between the soft limit and it, the peer gets a too_large reply.)
            # Replies queue up to a generous bound per peer; past it (or to a peer
            # that is gone) a send fails loudly instead of vanishing silently.
            sock.setsockopt(zmq.SNDHWM, REPLY_QUEUE_LIMIT)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            self.security.bind(sock, endpoint, only=only)  # a tcp bind starts the ZAP handler first
            if also:
                self.security.bind(sock, also, only=only)  # after the ipc bind: CURVE applies to tcp only
        except BaseException:
            sock.close(0)
            raise
        return sock

    def serve(
        self,
        endpoint: str,
        request_type: Any,
        handlers: dict[type, Handler],
        *,
        handover: bool = False,
        roles: RolePolicy | None = None,
        also: str = "",
        pace_s: float = 0.0,
    ) -> Service:
        sock = self.bind(zmq.ROUTER, endpoint, handover=handover, also=also)
        gate = Gate(self.security, also or endpoint, roles)
        service = Service(self, sock, request_type, handlers, self.max_message_bytes, gate)
        self.add_reader(sock, service.on_readable, pace_s=pace_s)
        return service

    def connect(self, endpoint: str, reply_type: Any) -> Peer:
        return Peer(self, endpoint, reply_type)

    def add_reader(self, sock: Any, callback: Callable[[], None], *, pace_s: float = 0.0) -> None:
        """Run ``callback`` when ``sock`` is readable; ``pace_s``: then leave it unread
        for that long, so what arrives meanwhile is read in one batch."""
        self._readers[sock] = callback
        if pace_s > 0:
            self._paces[sock] = pace_s
        self.poller.register(sock, zmq.POLLIN)

    def remove_reader(self, sock: Any) -> None:
        self._paces.pop(sock, None)
        self._last_read.pop(sock, None)
        timer = self._resting.pop(sock, None)
        if self._readers.pop(sock, None) is not None:
            if timer is not None:
                timer.cancel()  # out of the poller already
            else:
                self.poller.unregister(sock)

    def read_now(self, sock: Any) -> None:
        """Read a paced socket now if it is resting (before judging what it may hold)."""
        timer = self._resting.pop(sock, None)
        if timer is not None:
            timer.cancel()
            self.poller.register(sock, zmq.POLLIN)
            self._read_socket(sock)

    def _read_socket(self, sock: Any) -> None:
        callback = self._readers.get(sock)
        if callback is None:
            return
        self._guarded(callback)
        pace = self._paces.get(sock)
        if pace is None or sock not in self._readers or sock in self._resting:
            return
        now = time.monotonic()
        # Read twice within two paces (a rest of one pace included): a stream.
        busy = now - self._last_read.get(sock, float("-inf")) < 2 * pace
        self._last_read[sock] = now
        if busy:  # a stream, not a message now and then: let the next ones gather
            self.poller.unregister(sock)
            self._resting[sock] = self.call_later(pace, functools.partial(self._wake_reader, sock))

    def _wake_reader(self, sock: Any) -> None:
        if self._resting.pop(sock, None) is not None:
            self.poller.register(sock, zmq.POLLIN)

    # ------------------------------------------------------------------ timers

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay_s), callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_ids), timer))
        return timer

    def every(self, interval_s: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` every ``interval_s`` seconds for the actor's life."""

        def tick() -> None:
            self.call_later(interval_s, tick)
            callback()

        self.call_later(interval_s, tick)

    def _next_timer_in(self) -> float | None:
        """Seconds until the next live timer is due (None: no timer)."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None

    def _run_due_timers(self) -> float | None:
        """Run expired timers; return seconds until the next one (None if none)."""
        now = time.monotonic()
        while self._timers:
            deadline, _, timer = self._timers[0]
            if timer.cancelled:
                heapq.heappop(self._timers)
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(self._timers)
            self._guarded(timer.callback)
            now = time.monotonic()
        return None

    # ------------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        """Bind and connect sockets. Runs in the actor's process before the loop."""

    def after_batch(self) -> None:
        """Runs once per loop turn after all readable sockets were drained."""

    def teardown(self) -> None:
        """Runs after the loop ends, before sockets close."""

    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> None:
        give_big_blocks_back()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())
        self.setup()
        try:
            self.loop()
        finally:
            self._guarded(self.teardown)
            stop_zap(self.context)
            self.context.destroy(linger=0)

    def loop(self) -> None:
        # Input first, then timers: a timer that judges liveness (or anything else
        # about peers) runs only after every message that arrived was read, even if
        # the loop was held up for a while.
        while not self._stopping:
            wait = self._next_timer_in()
            timeout = MAX_POLL_S if wait is None else min(wait, MAX_POLL_S)
            try:
                ready = self.poller.poll(timeout * 1000)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    break
                raise
            for sock, _ in ready:
                self._read_socket(sock)
            self._run_due_timers()
            self._guarded(self.after_batch)

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.error("{} recovered from an error:\n{}", self.label, traceback.format_exc())


class Publisher:
    """An events socket: events are ``[topic, body]``, small notices only.

    It is an XPUB in manual mode: each subscription is applied only once the
    subscriber's key holds a role ``topics`` asks for every topic family the prefix
    can match (ipc subscribers are this host's user and pass); a refused one is
    counted and logged, and that subscriber simply gets nothing. The send queue per
    subscriber is bounded (EVENTS_QUEUE notices of bounded size): past it, a slow
    subscriber's notices are dropped (counted), never the server's memory.

    Over tcp, when a key is revoked the socket is opened anew, which drops every
    subscriber; the others reconnect within a reconnect interval (their events
    meanwhile are lost, as for any slow subscriber) and the revoked one is refused
    by the ZAP handler."""

    def __init__(self, actor: Actor, endpoint: str, also: str = "", topics: dict[bytes, frozenset[str]] | None = None):
        self.actor, self.endpoint, self.also = actor, endpoint, also
        self.topics = topics or {}
        self.curve = actor.security.active(also or endpoint)
        self.refused_subscriptions = 0
        # Prefixes subscribed now (applied minus unsubscribed): a notice nobody could
        # want is not even built. (Missed unsubscriptions only keep it being sent.)
        self._subscribed: collections.Counter[bytes] = collections.Counter()
        self.socket: zmq.Socket | None = self._open()
        if self.curve:
            self._keyring = actor.security.keyring
            self._names = self._keyring.names()
            actor.every(KEYRING_CHECK_S, self._drop_revoked)

    def _open(self) -> zmq.Socket:
        sock = self.actor.bind(zmq.XPUB, self.endpoint, also=self.also)
        sock.setsockopt(zmq.SNDHWM, EVENTS_QUEUE)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscriptions are short prefixes
        self.actor.add_reader(sock, self._on_subscriptions)
        return sock

    def allowed(self, peer: str | None, prefix: bytes) -> bool:
        """May ``peer`` subscribe to ``prefix``? Every topic family it can match must allow it."""
        if not self.curve or peer is None:
            return True
        held = self._keyring.roles(peer)
        families = [roles for family, roles in self.topics.items() if family.startswith(prefix) or prefix.startswith(family)]
        return bool(held) and all(held & roles for roles in families)

    def _on_subscriptions(self) -> None:
        sock = self.socket
        for _ in range(DRAIN_LIMIT):
            if sock is None:
                return
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if not data or data[0] not in (0, 1):
                continue
            prefix = data[1:]
            if data[0] == 0:  # unsubscribe: applied to the pipe it came from
                sock.setsockopt(zmq.UNSUBSCRIBE, prefix)
                if self._subscribed[prefix] > 1:
                    self._subscribed[prefix] -= 1
                else:
                    self._subscribed.pop(prefix, None)  # no entry per prefix once unsubscribed
                continue
            peer = peer_name(frame) if self.curve else None
            if self.allowed(peer, prefix):
                sock.setsockopt(zmq.SUBSCRIBE, prefix)
                self._subscribed[prefix] += 1
            else:
                self.refused_subscriptions += 1
                logger.warning("refused the subscription {!r} of key {}: its roles do not allow it", prefix, peer)

    def _drop_revoked(self) -> None:
        names = self._keyring.names()
        revoked, self._names = self._names - names, names
        if revoked or self.socket is None:
            if self.socket is not None:
                logger.info("key(s) {} revoked: events subscribers are dropped and reconnect", ", ".join(sorted(revoked)))
                self.actor.remove_reader(self.socket)
                self.socket.close(0)
                self.socket = None
                self._subscribed.clear()  # the others subscribe again when they reconnect
            try:
                self.socket = self._open()
            except zmq.ZMQError as exc:  # the old listener is still closing: next tick
                logger.debug("events socket not bound again yet: {}", exc)

    def wants(self, topic: bytes) -> bool:
        """Whether any subscriber's prefix matches ``topic``. Past MANY_PREFIXES distinct
        prefixes the answer is yes without looking: a loop turn never scans a
        subscriber's whim."""
        subscribed = self._subscribed
        if not subscribed:
            return False
        if len(subscribed) > MANY_PREFIXES:
            return True
        return any(topic.startswith(prefix) for prefix in subscribed)

    def publish(self, topic: bytes, message: msgspec.Struct | Callable[[], msgspec.Struct]) -> None:
        """Send ``[topic, message]``; ``message`` may be a function that makes it,
        called only if some subscriber wants the topic."""
        if self.socket is None:
            return  # being opened anew after a revocation
        if callable(message):
            if not self.wants(topic):
                return
            message = message()
        try:
            self.socket.send_multipart([topic, encode(message)], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # PUB drops for slow subscribers by design
