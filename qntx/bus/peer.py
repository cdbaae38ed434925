"""A poll-loop actor's DEALER to another actor: non-blocking calls, reply callbacks.

A driver of the client core ``qntx.bus.requester`` (the same ids, frames, matching and
errors as the clients); this one waits on the actor's loop: a reply runs its
callback, a timeout is one of the actor's timers.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from qntx.bus.codec import error_reply
from qntx.bus.requester import Requester
from qntx.bus.sockets import DRAIN_LIMIT

if TYPE_CHECKING:
    from qntx.bus.actor import Actor, Timer


class Peer:
    """A DEALER to another actor, with non-blocking calls and reply callbacks.

    No call ever blocks the loop: the socket only takes a request while a connection
    to the peer is up (``IMMEDIATE``); until then requests wait here, in order, and
    are sent once it is (checked every RESEND_S, by one timer however many wait), or
    answered ``unavailable`` when their timeout passes. So a peer that is absent for
    hours costs its pending calls and nothing more."""

    RESEND_S = 0.02

    def __init__(self, actor: Actor, endpoint: str, reply_type: Any):
        self.actor = actor
        self.endpoint = endpoint
        self.socket = actor.context.socket(zmq.DEALER)
        # A peer may be another host's: its replies are checked like any request.
        self._requests = Requester(self.socket, endpoint, reply_type, actor.security, own_actors=False)
        self._unsent: collections.OrderedDict[bytes, list[bytes]] = collections.OrderedDict()  # correlation -> frames
        self._resend: Timer | None = None
        actor.add_reader(self.socket, self.on_readable)

    def call(self, message: msgspec.Struct, callback: Callable[[Any], None], timeout_s: float = 10.0) -> None:
        """Send ``message``; ``callback`` later gets the reply, an ErrorReply, or a timeout ErrorReply."""
        correlation = self._requests.next_id()
        frames = self._requests.frames(correlation, message)
        timer = self.actor.call_later(timeout_s, lambda: self._expire(correlation, timeout_s))
        self._requests.pending[correlation] = (callback, timer)
        self._unsent[correlation] = frames
        if self._resend is None:  # else the queue waits for its one resend timer
            self._send_unsent()

    def _send_unsent(self) -> None:
        self._resend = None
        while self._unsent:
            correlation, frames = next(iter(self._unsent.items()))
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # no connection to the peer (yet): try again shortly
                self._resend = self.actor.call_later(self.RESEND_S, self._send_unsent)
                return
            del self._unsent[correlation]

    def notify(self, message: msgspec.Struct) -> None:
        """Fire and forget (dropped while the peer is not connected)."""
        self._requests.notify(message)

    def _expire(self, correlation: bytes, limit: float) -> None:
        entry = self._requests.pending.pop(correlation, None)
        never_sent = self._unsent.pop(correlation, None) is not None  # nobody was there
        if entry is not None:
            entry[0](error_reply(self._requests.unreachable() if never_sent else self._requests.timed_out(limit)))

    def on_readable(self) -> None:
        for _ in range(DRAIN_LIMIT):
            if self.socket.closed:  # a reply's callback closed this peer (a plugin dropped)
                return
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            matched = self._requests.match(frames)
            if matched is None:
                continue  # a reply that came after its timeout
            _, (callback, timer), reply = matched
            timer.cancel()
            callback(reply)

    def close(self) -> None:
        self.actor.remove_reader(self.socket)
        self.socket.close(0)
        for _callback, timer in self._requests.pending.values():
            timer.cancel()
        if self._resend is not None:
            self._resend.cancel()
        self._requests.pending.clear()
        self._unsent.clear()
