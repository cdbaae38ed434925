"""An actor's events socket: small notices to subscribers, gated by role.

A subscription is applied only once the subscriber's key may see every topic family
it can match; a slow subscriber loses notices, never the actor its memory: each
notice is at most NOTICE_MAX_BYTES and each subscriber's queue at most EVENTS_QUEUE
notices, so a stalled subscriber holds at most EVENTS_QUEUE x NOTICE_MAX_BYTES
(4,096 x 2 KiB = 8 MiB) of notices on the actor's host. Every notice carries its
number in its topic family (``seq``): what a subscriber lost, it sees as a gap,
counts, and reads back from the store (``qntx.bus.gaps``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import zmq
from loguru import logger

from qntx.bus.codec import encode
from qntx.bus.security import KEYRING_CHECK_S, peer_name
from qntx.bus.sockets import DRAIN_LIMIT
from qntx.protocol.events import NOTICE_MAX_BYTES, fitted

if TYPE_CHECKING:
    from qntx.bus.actor import Actor

# Notices an events socket queues for one subscriber that is slow to read them; past
# it they are dropped (the subscriber sees the gap in ``seq``). Each notice is at most
# NOTICE_MAX_BYTES, so a stalled subscriber costs at most this many times that: 8 MiB
# (libzmq adds about 130 bytes of its own per queued notice, 0.5 MiB more).
EVENTS_QUEUE = 4_096
QUEUE_BYTES = EVENTS_QUEUE * NOTICE_MAX_BYTES
MANY_PREFIXES = 64  # distinct subscribed prefixes past which every notice is just sent


class Publisher:
    """An events socket: events are ``[topic, body]``, small notices only.

    It is an XPUB in manual mode: each subscription is applied only once the
    subscriber's key holds a role ``topics`` asks for every topic family the prefix
    can match (ipc subscribers are this host's user and pass); a refused one is
    counted and logged, and that subscriber simply gets nothing. The send queue per
    subscriber is bounded in bytes (EVENTS_QUEUE notices of at most NOTICE_MAX_BYTES:
    QUEUE_BYTES): past it, a slow subscriber's notices are dropped, never the
    actor's memory. libzmq drops them silently, so each notice is numbered in its
    topic family (``seq``, counted in ``published``): a subscriber of the family
    sees what it lost as a gap. A notice too big is sent in pieces or as its ids
    (``qntx.protocol.events.fitted``; counted in ``oversized``).

    Over tcp, when a key is revoked the socket is opened anew, which drops every
    subscriber; the others reconnect within a reconnect interval (their events
    meanwhile are lost, as for any slow subscriber) and the revoked one is refused
    by the ZAP handler."""

    def __init__(self, actor: Actor, endpoint: str, also: str = "", topics: dict[bytes, frozenset[str]] | None = None):
        self.actor, self.endpoint, self.also = actor, endpoint, also
        self.topics = topics or {}
        self.curve = actor.security.active(also or endpoint)
        self.refused_subscriptions = 0
        self.published: collections.Counter[str] = collections.Counter()  # topic family -> last seq sent
        self.oversized: collections.Counter[str] = collections.Counter()  # notices sent in pieces or ids only
        self._families = sorted(self.topics, key=len, reverse=True)
        actor.publishers.append(self)
        # Prefixes subscribed now (applied minus unsubscribed): a notice nobody could
        # want is not even built. (Missed unsubscriptions only keep it being sent.)
        self._subscribed: collections.Counter[bytes] = collections.Counter()
        self.socket: zmq.Socket | None = self._open()
        if self.curve:
            self._keyring = actor.security.keyring
            self._names = self._keyring.names()
            actor.every(KEYRING_CHECK_S, self._drop_revoked)

    def _open(self) -> zmq.Socket:
        # (before the bind: what is set after it never applies to the subscribers it accepts)
        limits = {zmq.SNDHWM: EVENTS_QUEUE, zmq.MAXMSGSIZE: 4096}  # (subscriptions are short prefixes)
        sock = self.actor.bind(zmq.XPUB, self.endpoint, also=self.also, options=limits)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)
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

    def family(self, topic: bytes) -> str:
        """The topic family ``topic`` belongs to (its key in ``topics``), as text."""
        for family in self._families:
            if topic.startswith(family):
                return family.decode()
        return ""

    def publish(self, topic: bytes, message: msgspec.Struct | Callable[[], msgspec.Struct]) -> None:
        """Send ``[topic, message]`` (numbered in its family, within NOTICE_MAX_BYTES);
        ``message`` may be a function that makes it, called only if some subscriber
        wants the topic."""
        family = self.family(topic)
        if self.socket is None:  # being opened anew after a revocation: a gap for everyone
            self.published[family] += 1
            return
        if callable(message):
            if not self.wants(topic):
                return
            message = message()
        published = self.published

        def next_seq() -> int:
            published[family] += 1
            return published[family]

        messages, whole = fitted(topic, message, encode, next_seq)
        if not whole:
            self.oversized[family] += 1
        for frames in messages:
            try:
                self.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass  # (an XPUB drops for a slow subscriber by itself; this is the rare mute socket)
