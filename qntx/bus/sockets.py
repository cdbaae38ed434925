"""Opening bound sockets and reading them, the same way in both runtimes.

A bound socket lingers nothing on close, and a ROUTER or PULL caps what a peer may
send it: past ``HARD_LIMIT_FACTOR`` times the actor's message limit the transport
drops the peer's message unread (between the soft limit and that, the peer gets a
too_large reply). A ROUTER queues replies up to a generous bound per peer and, past
it or to a peer that is gone, fails a send loudly instead of dropping it silently
(``ROUTER_MANDATORY``).
"""

from __future__ import annotations

import zmq

from qntx.bus.codec import HARD_LIMIT_FACTOR
from qntx.bus.security import Security, peer_name

# How many messages one socket may deliver per loop turn before the others get a go.
DRAIN_LIMIT = 512
# Replies a ROUTER holds for one peer that is slow to read them.
REPLY_QUEUE_LIMIT = 100_000


def bound_socket(
    context: zmq.Context,
    kind: int,
    security: Security,
    endpoint: str,
    *,
    max_message_bytes: int,
    handover: bool = False,
    only: str | None = None,
    also: str = "",
    options: dict[int, int] | None = None,
) -> zmq.Socket:
    """A socket of ``kind`` (of ``context``'s flavour: blocking or asyncio) bound to
    ``endpoint`` and to ``also`` (a tcp endpoint for other hosts). ``handover``: a
    ROUTER peer that reconnects with the same routing id takes its old connection
    over. ``only``: over tcp, the one authorised key name that may connect.
    ``options`` are set before the binds: a listener copies the socket's options
    when it binds, so a queue bound (SNDHWM) or a size limit set after would never
    apply to the peers it accepts."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in (options or {}).items():
        sock.setsockopt(option, value)
    if kind in (zmq.ROUTER, zmq.PULL):
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes * HARD_LIMIT_FACTOR)
    if handover:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.SNDHWM, REPLY_QUEUE_LIMIT)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    try:
        security.bind(sock, endpoint, only=only)  # a tcp bind starts the ZAP handler first
        if also:
            security.bind(sock, also, only=only)  # after the ipc bind: CURVE applies to tcp only
    except BaseException:
        sock.close(0)
        raise
    return sock


def receive(sock: zmq.Socket, curve: bool, flags: int = 0) -> tuple[list[bytes], str | None]:
    """One multipart message and, over CURVE, the authorised name of its sender."""
    if not curve:
        return sock.recv_multipart(flags), None
    return with_peer(sock.recv_multipart(flags, copy=False))


def with_peer(frames: list[zmq.Frame]) -> tuple[list[bytes], str | None]:
    """Frames received with ``copy=False`` as bytes, and the authorised name of their sender."""
    return [f.bytes for f in frames], peer_name(frames[-1])
