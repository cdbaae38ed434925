"""tcp endpoints: CURVE by default, refused without keys, plaintext only with --insecure."""

from __future__ import annotations

import socket

import pytest

from qntx.bus.client import Client
from qntx.bus.security import Security
from qntx.errors import QntxError
from qntx.protocol import AtsReply, Ping

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_tcp(bus) -> str:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    bus.env["QNTX_ATS_ENDPOINT"] = endpoint
    bus.env["QNTX_ATS_EVENTS_ENDPOINT"] = f"tcp://127.0.0.1:{free_port()}"
    return endpoint


def test_tcp_bind_without_keys_is_refused(bus):
    use_tcp(bus)
    process = bus.start("ats")
    assert process.popen.wait(20) != 0
    assert "qntx keys" in process.output() and "--insecure" in process.output()


def test_curve_admits_authorized_clients_only(bus):
    endpoint = use_tcp(bus)
    made = bus.run("keys")
    assert made.returncode == 0 and "host.key_secret" in made.stdout
    process = bus.start("ats")
    security = Security(keys_dir=bus.home / "keys")
    import time

    deadline = time.monotonic() + 15
    while True:
        try:
            with Client(endpoint, AtsReply, security=security, timeout_s=2) as client:
                assert client.request(Ping()).pid == process.pid
            break
        except QntxError:
            assert time.monotonic() < deadline, process.output()
    # A plaintext client gets nowhere.
    with Client(endpoint, AtsReply, timeout_s=1, security=Security(insecure=True)) as plain, pytest.raises(QntxError):
        plain.request(Ping())
    # A client with a valid but unauthorized key pair is rejected too.
    stranger = bus.home / "stranger"
    stranger.mkdir()
    import zmq.auth

    zmq.auth.create_certificates(str(stranger), "host")
    (stranger / "server.key").write_bytes((bus.home / "keys" / "host.key").read_bytes())
    with Client(endpoint, AtsReply, security=Security(keys_dir=stranger), timeout_s=1) as other:
        with pytest.raises(QntxError):
            other.request(Ping())


def test_insecure_opts_out(bus):
    endpoint = use_tcp(bus)
    process = bus.start("--insecure", "ats")
    import time

    deadline = time.monotonic() + 15
    while True:
        try:
            with Client(endpoint, AtsReply, timeout_s=1, security=Security(insecure=True)) as client:
                assert client.request(Ping()).pid == process.pid
            return
        except QntxError:
            assert time.monotonic() < deadline, process.output()
