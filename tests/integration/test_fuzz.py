"""Garbage thrown at the ATS actor: typed errors where routable, and it keeps serving."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from qntx.bus.client import Client
from qntx.protocol import AtsReply, Ping, Pong
from tests.integration.fuzz import _expect_error, hammer

pytestmark = pytest.mark.timeout(120)


def test_ats_survives_garbage(bus):
    bus.env["QNTX_MAX_MESSAGE_BYTES"] = str(64 * 1024)
    process = bus.start_ats()
    hammer(bus.settings.ats_endpoint)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(bus.settings.ats_endpoint)
    try:
        big = msgspec.msgpack.encode({"type": "Ping", "pad": "x" * (100 * 1024)})
        sock.send_multipart([b"big", big])
        assert _expect_error(sock, b"big").code == "too_large"
    finally:
        sock.close(0)
    with Client(bus.settings.ats_endpoint, AtsReply) as client:
        pong = client.request(Ping())
    assert isinstance(pong, Pong) and pong.pid == process.pid
    with bus.connect() as b:
        assert b.attest("still", "works").subjects == ["still"]
    assert process.alive()
