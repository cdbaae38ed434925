"""Joining a bus on another host through its server's address, or one of several.

A client, worker or plugin elsewhere is given ``tcp://HOST:PORT`` (``qntx --connect``,
``qntx.connect("tcp://…")``, ``connect = "…"`` in config.toml) and asks the server
there for every other endpoint (``GetEndpoints``). Where a standby server may take
over, it is given every server's address, ``tcp://a:7400,tcp://b:7400``, or one DNS
name with a record per server: only the leading server answers ``GetEndpoints`` (a
standby binds nothing), so the join asks every address at once and takes the one that
answers. At once rather than in turn: a server that was stopped (or a host cut off
without a reset) accepts nothing and refuses nothing, and asked in turn it would cost
each later address a whole timeout. Whoever joined this way and later finds its server
silent joins again through the same list (``qntx.pulse.worker``, the python plugin,
``qntx.api``). A bus that does not answer is a clear ``Unavailable`` within
JOIN_TIMEOUT_S naming every address tried, never a silent fall-back to this home's
embedded store.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import time
from collections.abc import Sequence

import zmq

from qntx.errors import Invalid, QntxError, Unavailable, UnknownType
from qntx.settings import Settings

JOIN_TIMEOUT_S = 5.0
# Whoever joined through server addresses and finds its server silent this many
# heartbeats (the server's own window for a worker's liveness) joins again through
# them: a standby that took over may lead now.
SILENT_HEARTBEATS = 3
_CORRELATION = (1).to_bytes(8, "big")


def reachable(endpoint: str, via: str) -> str:
    """``endpoint`` as this host can reach it: a wildcard host becomes the one of ``via``."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in ("*", "0.0.0.0", "[::]", "::"):
        via_host = via.partition("://")[2].rpartition(":")[0]
        return f"tcp://{via_host}:{port}"
    return endpoint


def addresses(connect: str | Sequence[str]) -> list[str]:
    """The server addresses ``connect`` names, in its order: a comma-separated list (or
    a list) of ``tcp://HOST:PORT``; a HOST that is a name stands for every address it
    resolves to now (A and AAAA records). Raises Invalid for anything else."""
    items = connect.split(",") if isinstance(connect, str) else [str(item) for item in connect]
    found: list[str] = []
    for item in (item.strip() for item in items):
        scheme, sep, rest = item.partition("://")
        host, colon, port = rest.rpartition(":")
        if scheme != "tcp" or not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise Invalid(f"--connect takes server addresses tcp://HOST:PORT[,tcp://HOST:PORT...], got {item!r}")
        for address in _resolved(host, int(port)):
            if address not in found:
                found.append(address)
    return found


def _resolved(host: str, port: int) -> list[str]:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return [f"tcp://{host}:{port}"]  # an address already
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [f"tcp://{host}:{port}"]  # unresolvable now: tried as it is (and named when nothing answers)
    resolved: list[str] = []
    for family, *_, sockaddr in infos:
        ip = sockaddr[0]
        address = f"tcp://[{ip}]:{port}" if family == socket.AF_INET6 else f"tcp://{ip}:{port}"
        if address not in resolved:
            resolved.append(address)
    return resolved


def find_server(settings: Settings, connect: str | Sequence[str], timeout_s: float | None = None):
    """(address, its ``BusEndpoints``) of the first of ``connect``'s servers to answer
    ``GetEndpoints``, all asked at once; (address, None) when the only answer came
    from an older peer that does not know GetEndpoints (e.g. a workers endpoint given
    directly). Raises Unavailable, naming every address, when none answers in time
    (or when, after CONNECT_WAIT_S, none has even taken a connection); a refusal (e.g.
    Forbidden) is raised when it is all that came back."""
    from qntx.bus.codec import Decoder, encode, raise_if_error
    from qntx.bus.requester import CONNECT_WAIT_S
    from qntx.protocol import BusEndpoints, GetEndpoints, ServerReply

    tried = addresses(connect)
    limit = min(settings.request_timeout_s, JOIN_TIMEOUT_S) if timeout_s is None else timeout_s
    context = zmq.Context.instance()
    decoder = Decoder(ServerReply, replies=True)
    poller = zmq.Poller()
    sockets: dict[zmq.Socket, str] = {}
    refusals: list[QntxError] = []
    older_peer = None
    monitors: list[zmq.Socket] = []
    connected = False  # some address took a connection (it may still answer)
    body = encode(GetEndpoints())
    try:
        for address in tried:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            monitors.append(sock.get_monitor_socket(zmq.EVENT_CONNECTED))
            poller.register(monitors[-1], zmq.POLLIN)
            settings.security.connect(sock, address)
            sock.send_multipart([_CORRELATION, body], zmq.NOBLOCK)  # queued until its connection is up
            sockets[sock] = address
            poller.register(sock, zmq.POLLIN)
        started = time.monotonic()
        deadline = started + limit
        while (left := deadline - time.monotonic()) > 0 and len(refusals) + (older_peer is not None) < len(tried):
            if not connected:  # nobody home anywhere: said as soon as a request would say it
                left = min(left, started + CONNECT_WAIT_S - time.monotonic())
                if left <= 0:
                    break
            for sock, _ in poller.poll(left * 1000):
                if sock not in sockets:  # a monitor: that address took a connection
                    sock.recv_multipart()
                    connected = True
                    continue
                frames = sock.recv_multipart()
                poller.unregister(sock)  # one answer each
                if len(frames) != 2 or frames[0] != _CORRELATION:
                    continue
                try:
                    reply = raise_if_error(decoder.decode(frames[1]))
                except UnknownType:
                    older_peer = sockets[sock]
                    continue
                except QntxError as exc:
                    refusals.append(exc)
                    continue
                if isinstance(reply, BusEndpoints):
                    return sockets[sock], reply
    finally:
        for sock in sockets:
            sock.disable_monitor()
            sock.close(0)
        for monitor in monitors:
            monitor.close(0)
    if older_peer is not None:
        return older_peer, None
    if refusals:
        raise refusals[0]
    raise Unavailable(
        f"no QNTX server answers at {', '.join(tried)} within {time.monotonic() - started:.1f}s; is its `qntx up --bind` running, and "
        "is this host's key authorised there (`qntx keys allow`) and the server's key set here (`qntx keys server`)?"
    )


def ask_endpoints(settings: Settings, address: str):
    """The ``BusEndpoints`` of the server at ``address`` (one of them, if it lists
    several); None: an older peer that does not know GetEndpoints answered."""
    return find_server(settings, address)[1]


def join(settings: Settings) -> Settings:
    """``settings`` with the endpoints of the bus whose leading server is one of
    ``settings.connect``'s (which stays, for joining again)."""
    if not settings.connect:
        return settings
    address, bus = find_server(settings, settings.connect)
    if bus is None:
        raise Unavailable(f"{address} is not a QNTX server's address (it does not answer GetEndpoints)")
    return dataclasses.replace(
        settings,
        server_endpoint=address,
        ats_endpoint=reachable(bus.ats_endpoint, address),
        ats_events_endpoint=reachable(bus.ats_events_endpoint, address),
        events_endpoint=reachable(bus.events_endpoint, address),
        workers_endpoint=reachable(bus.workers_endpoint, address),
    )


def retried(message: object) -> bool:
    """Whether a request may be sent again, as it is, to a server that took over: one
    that reads and changes nothing (a submission is not: its acceptance stays unknown,
    and the caller may submit again with the same id)."""
    from qntx.protocol import (
        EndedJobs,
        GetAttestation,
        GetEndpoints,
        GetJob,
        GetStatus,
        ListJobs,
        ListSchedules,
        Ping,
        Query,
        Stats,
        WaitJob,
    )

    return isinstance(
        message, (Ping, WaitJob, EndedJobs, GetJob, ListJobs, GetStatus, ListSchedules, GetEndpoints, Query, GetAttestation, Stats)
    )


def rejoined(settings: Settings) -> Settings | None:
    """Joined through server addresses and the server stopped answering: join again.
    The new settings if another server leads now, else None (the same one, or none)."""
    if not settings.connect:
        return None
    try:
        joined = join(settings)
    except QntxError:
        return None
    return None if joined.server_endpoint == settings.server_endpoint else joined
