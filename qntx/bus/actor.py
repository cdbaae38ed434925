"""The actor runtime: one thread, one poll loop, handler tables keyed by message type.

An actor owns sockets. ``serve`` binds a ROUTER and answers requests with a
handler table ``{MessageType: handler}`` (``qntx.bus.service``); a handler returns
the reply message, or ``None`` to reply later through ``Request.reply`` (the ATS
uses that to commit many writers in one transaction before answering any of them).
``connect`` gives a ``Peer`` (``qntx.bus.peer``), whose ``call`` sends a request to
another actor and runs a callback with the reply, so an actor never blocks on a
peer. Timers and an ``after_batch`` hook (run once each loop turn, after every
readable socket was drained) complete the toolbox; ``Offloader`` runs blocking work
off the loop and ``Publisher`` is an events socket.

Limits are raised where the OS allows, at start (``qntx.bus.oslimits``): the
open-file limit to its hard maximum, and the context's socket limit (libzmq's
default is 1,023) from it. What an actor does when it would pass them is its own
business (the server refuses a worker session it has no room for); the limits are
on ``Actor.open_file_limit`` and ``Actor.max_sockets``.

A reader may be paced (``add_reader(..., pace_s=...)``): when it is read again
within two paces of its last read, its socket then rests for ``pace_s`` before the
loop looks at it again, so a steady stream of messages (a thousand workers'
heartbeats) is read in batches, not one loop turn each, while a socket that hears
a message now and then (a few workers) is read at once, as an unpaced one is.
``read_now`` reads a resting socket before something that must see all pending input.

The runtime's parts keep their names here, where they were first imported from.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import zmq
from loguru import logger

from qntx.bus.codec import DEFAULT_MAX_MESSAGE_BYTES
from qntx.bus.gaps import Gaps
from qntx.bus.gate import Gate, Revoked, RolePolicy
from qntx.bus.offload import Offloader
from qntx.bus.oslimits import UNLIMITED_FILES, open_file_count, raise_open_file_limit
from qntx.bus.peer import Peer
from qntx.bus.publisher import EVENTS_QUEUE, MANY_PREFIXES, Publisher
from qntx.bus.security import PLAIN, Security, stop_zap
from qntx.bus.service import (
    Handler,
    RejectedFrames,
    Request,
    Service,
    admit,
    answer,
    error_for,
    unpack_request,
)
from qntx.bus.sockets import DRAIN_LIMIT, REPLY_QUEUE_LIMIT, bound_socket, receive
from qntx.lifeline import freeze_what_lives_on, give_big_blocks_back

__all__ = [
    "DRAIN_LIMIT",
    "EVENTS_QUEUE",
    "MANY_PREFIXES",
    "MAX_POLL_S",
    "REPLY_QUEUE_LIMIT",
    "UNLIMITED_FILES",
    "Actor",
    "Gate",
    "Handler",
    "Offloader",
    "Peer",
    "Publisher",
    "RejectedFrames",
    "Request",
    "Revoked",
    "RolePolicy",
    "Service",
    "Timer",
    "admit",
    "answer",
    "error_for",
    "open_file_count",
    "raise_open_file_limit",
    "receive",
    "unpack_request",
]

# The poll loop never sleeps longer than this, so a stop request is seen promptly.
MAX_POLL_S = 0.25


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
        self.publishers: list[Publisher] = []  # its events sockets (what they sent: qntx.obs.metrics)
        self.gaps: list[Gaps] = []  # what its subscriptions missed (qntx.bus.gaps)

    # ------------------------------------------------------------------ sockets

    def bind(
        self,
        kind: int,
        endpoint: str,
        *,
        handover: bool = False,
        only: str | None = None,
        also: str = "",
        options: dict[int, int] | None = None,
    ) -> zmq.Socket:
        """A socket of ``kind`` bound to ``endpoint`` (and ``also``), as ``bound_socket`` says."""
        limit = self.max_message_bytes
        return bound_socket(
            self.context, kind, self.security, endpoint, max_message_bytes=limit, handover=handover, only=only,
            also=also, options=options,
        )  # fmt: skip

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
        """Run the timers due when the pass starts; return seconds until the next one
        (None if none). A timer armed during the pass waits for the next pass, even if
        it is due by then: one that re-arms itself sooner than a pass takes can never
        keep the loop from reading its sockets."""
        start = time.monotonic()
        while self._timers:
            deadline, _, timer = self._timers[0]
            if timer.cancelled:
                heapq.heappop(self._timers)
                continue
            if deadline > start:
                return max(0.0, deadline - time.monotonic())
            heapq.heappop(self._timers)
            self._guarded(timer.callback)
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
        freeze_what_lives_on()
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
