"""Server addresses for joining a bus: parsing, names, and how long finding none takes."""

from __future__ import annotations

import socket
import time

import pytest

from qntx.errors import Invalid, Unavailable
from qntx.join import addresses, find_server
from qntx.settings import load_settings

pytestmark = pytest.mark.timeout(30)


def test_a_list_of_addresses_keeps_its_order_and_drops_repeats():
    given = "tcp://10.0.0.6:7400, tcp://10.0.0.5:7400,tcp://10.0.0.6:7400,tcp://[::1]:7400"
    assert addresses(given) == ["tcp://10.0.0.6:7400", "tcp://10.0.0.5:7400", "tcp://[::1]:7400"]
    assert addresses(["tcp://10.0.0.5:7400", "tcp://10.0.0.6:7401"]) == ["tcp://10.0.0.5:7400", "tcp://10.0.0.6:7401"]


def test_a_name_stands_for_every_address_it_resolves_to():
    records = {info[4][0] for info in socket.getaddrinfo("localhost", 7400, type=socket.SOCK_STREAM)}
    expected = {f"tcp://[{ip}]:7400" if ":" in ip else f"tcp://{ip}:7400" for ip in records}
    assert set(addresses("tcp://localhost:7400")) == expected and expected


@pytest.mark.parametrize(
    "bad", ["", "10.0.0.5:7400", "tcp://10.0.0.5", "udp://10.0.0.5:7400", "tcp://:7400", "tcp://a:0", "tcp://a:70000",
            "tcp://a:7400,", "tcp://a:7400,ipc:///tmp/x.sock"],
)  # fmt: skip
def test_anything_else_is_invalid_naming_it(bad):
    with pytest.raises(Invalid, match="tcp://HOST:PORT"):
        addresses(bad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nobody_anywhere_is_said_within_a_second_naming_every_address(tmp_path):
    settings = load_settings(tmp_path, environ={}, insecure=True)
    both = f"tcp://127.0.0.1:{free_port()},tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        find_server(settings, both)
    assert time.monotonic() - started < 2
    assert all(address in str(raised.value) for address in both.split(","))


def test_a_silent_host_that_takes_connections_is_waited_for_until_the_timeout(tmp_path):
    """(A stopped server's port still takes connections: it may only be slow.)"""
    settings = load_settings(tmp_path, environ={}, insecure=True)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(Unavailable, match=address):
            find_server(settings, f"tcp://127.0.0.1:{free_port()},{address}", timeout_s=2.5)
        assert 2.4 < time.monotonic() - started < 4
