"""Joining a bus on another host through one address: its server's.

A client, worker or plugin elsewhere is given ``tcp://HOST:PORT`` (``qntx --connect``,
``qntx.connect("tcp://…")``, ``connect = "…"`` in config.toml) and asks the server
there for every other endpoint (``GetEndpoints``). A bus that does not answer is a
clear ``Unavailable`` within JOIN_TIMEOUT_S, never a silent fall-back to this home's
embedded store.
"""

from __future__ import annotations

import dataclasses

from qntx.errors import QntxError, Unavailable, UnknownType
from qntx.settings import Settings

JOIN_TIMEOUT_S = 5.0


def reachable(endpoint: str, via: str) -> str:
    """``endpoint`` as this host can reach it: a wildcard host becomes the one of ``via``."""
    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in ("*", "0.0.0.0", "[::]", "::"):
        via_host = via.partition("://")[2].rpartition(":")[0]
        return f"tcp://{via_host}:{port}"
    return endpoint


def ask_endpoints(settings: Settings, address: str):
    """The server at ``address``'s ``BusEndpoints`` (None: it is an older peer that does
    not know GetEndpoints, e.g. a workers endpoint given directly)."""
    from qntx.bus.client import Client
    from qntx.protocol import BusEndpoints, GetEndpoints, ServerReply

    timeout = min(settings.request_timeout_s, JOIN_TIMEOUT_S)
    try:
        with Client(address, ServerReply, security=settings.security, timeout_s=timeout) as client:
            reply = client.request(GetEndpoints())
    except UnknownType:
        return None
    except QntxError as exc:
        if exc.code in ("unavailable", "timeout"):
            raise Unavailable(
                f"no QNTX server answers at {address} ({exc}); is its `qntx up --bind` running, and is this "
                "host's key authorised there (`qntx keys allow`) and the server's key set here (`qntx keys server`)?"
            ) from None
        raise
    if not isinstance(reply, BusEndpoints):  # pragma: no cover - a server answers this or an error
        raise Unavailable(f"{address} did not answer GetEndpoints")
    return reply


def join(settings: Settings) -> Settings:
    """``settings`` with the endpoints of the bus whose server is ``settings.connect``."""
    address = settings.connect
    if not address:
        return settings
    if not address.startswith("tcp://"):
        raise Unavailable(f"--connect takes a server's tcp://HOST:PORT, got {address!r}")
    bus = ask_endpoints(settings, address)
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
