"""Keys, roles and the ZAP handler's answers, without sockets between processes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import zmq
import zmq.auth

from qntx.bus.gate import Gate, Revoked
from qntx.bus.security import (
    AUTHORIZED,
    ZAP_ENDPOINT,
    Keyring,
    Security,
    ZapHandler,
    allow,
    host_public_key,
    make_keys,
    revoke,
    stop_zap,
)
from qntx.errors import Forbidden, Invalid, NotFound
from qntx.protocol import SERVER_ROLES, Ping, RegisterPlugin, Submit
from qntx.settings import load_settings, tcp_endpoints


def a_key(tmp_path, name="other") -> tuple[str, bytes]:
    public = zmq.auth.create_certificates(str(tmp_path), name)[0]
    key = zmq.auth.load_certificate(public)[0]
    return key.decode(), zmq.utils.z85.decode(key)


def zap_request(domain: bytes, raw_key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", domain, b"127.0.0.1", b"", mechanism, raw_key]


def test_make_keys_is_private_and_authorises_this_host(tmp_path):
    keys = tmp_path / "keys"
    made = make_keys(keys)
    assert {p.name for p in made} == {"host.key", "host.key_secret", "server.key", AUTHORIZED}
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for path in keys.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    entry = json.loads((keys / AUTHORIZED).read_text())["host"]
    assert entry["key"] == host_public_key(keys) and entry["roles"] == ["client", "developer", "worker", "plugin", "admin"]
    os.chmod(keys / "host.key_secret", 0o644)
    assert make_keys(keys) == []  # nothing new, and modes tightened again
    assert stat.S_IMODE((keys / "host.key_secret").stat().st_mode) == 0o600


def test_allow_and_revoke(tmp_path):
    keys = tmp_path / "keys"
    key, _ = a_key(tmp_path)
    entry = allow(keys, "box-2", key, ["worker", "plugin", "worker"])
    assert entry.roles == ("worker", "plugin")
    ring = Keyring(keys)
    assert ring.roles("box-2") == {"worker", "plugin"} and ring.by_key(key).name == "box-2"
    with pytest.raises(Invalid, match="already authorised as 'box-2'"):
        allow(keys, "box-3", key, ["client"])
    with pytest.raises(Invalid, match="--role must be"):
        allow(keys, "box-3", key, ["root"])
    with pytest.raises(Invalid, match="39 characters long; a CURVE public key is 40"):
        allow(keys, "box-3", key[:-1], ["client"])
    with pytest.raises(Invalid, match="key name"):
        allow(keys, "box 3", key, ["client"])
    revoke(keys, "box-2")
    ring.refresh(force=True)
    assert ring.roles("box-2") == frozenset() and ring.by_key(key) is None
    with pytest.raises(NotFound):
        revoke(keys, "box-2")


def test_a_broken_authorized_file_admits_nobody(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys)
    (keys / AUTHORIZED).write_text("{not json")
    assert Keyring(keys).names() == frozenset()


def test_the_zap_handler_admits_authorised_curve_keys_in_its_domain_only(tmp_path):
    keys = tmp_path / "keys"
    key, raw = a_key(tmp_path)
    allow(keys, "box-2", key, ["worker"])
    _, stranger = a_key(tmp_path, "stranger")
    context = zmq.Context()
    try:
        zap = ZapHandler(context, Keyring(keys))
        try:
            assert zap.answer(zap_request(b"qntx", raw))[2:5] == [b"200", b"OK", b"box-2"]
            assert zap.answer(zap_request(b"qntx/only/box-2", raw))[2] == b"200"
            assert zap.answer(zap_request(b"qntx/only/box-9", raw))[2] == b"400"
            assert zap.answer(zap_request(b"", raw))[2] == b"400"  # no domain, no entry
            assert zap.answer(zap_request(b"qntx", stranger))[2] == b"400"
            assert zap.answer(zap_request(b"qntx", b"", b"NULL"))[2] == b"400"
            assert zap.answer([b"1.0"])[2] == b"400"
        finally:
            zap.stop()
    finally:
        context.destroy(linger=0)


def test_a_hand_edited_authorized_file_never_stops_the_zap_handler(tmp_path):
    """Entries whose roles are not a list (edited by hand) authorise nothing; the
    handler's thread answers every request on, the good entries' ones with 200."""
    keys = tmp_path / "keys"
    key, raw = a_key(tmp_path)
    allow(keys, "box-2", key, ["worker"])
    odd = {name: a_key(tmp_path, name) for name in ("nulled", "numbered")}
    entries = json.loads((keys / AUTHORIZED).read_text())
    entries["nulled"] = {"key": odd["nulled"][0], "roles": None}
    entries["numbered"] = {"key": odd["numbered"][0], "roles": 5}
    (keys / AUTHORIZED).write_text(json.dumps(entries))
    context = zmq.Context()
    try:
        zap = ZapHandler(context, Keyring(keys))
        asker = context.socket(zmq.REQ)
        asker.setsockopt(zmq.RCVTIMEO, 5000)
        asker.connect(ZAP_ENDPOINT)
        try:
            for raw_key, status in ((odd["nulled"][1], b"400"), (odd["numbered"][1], b"400"), (raw, b"200")):
                asker.send_multipart(zap_request(b"qntx", raw_key))
                assert asker.recv_multipart()[2] == status
            assert zap.alive
        finally:
            asker.close(0)
            zap.stop()
    finally:
        context.destroy(linger=0)


def test_the_gate_checks_roles_per_message_over_tcp_only(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys)
    client, _ = a_key(tmp_path, "client")
    allow(keys, "laptop", client, ["client"])
    security = Security(keys_dir=keys)
    gate = Gate(security, "tcp://127.0.0.1:1", SERVER_ROLES)
    gate.check("laptop", Submit(handler="builtin.echo"))
    gate.check("laptop", Ping())
    with pytest.raises(Forbidden, match="RegisterPlugin needs role admin or plugin; key 'laptop' has client"):
        gate.check("laptop", RegisterPlugin(name="python", endpoint=""))
    with pytest.raises(Revoked):
        gate.check("gone", Ping())
    gate.check(None, RegisterPlugin(name="python", endpoint=""))  # ipc: this host's user
    Gate(security, "ipc:///tmp/x", SERVER_ROLES).check("gone", Submit(handler="builtin.echo"))


def test_bind_sets_every_endpoint_on_consecutive_ports(tmp_path):
    assert tcp_endpoints("tcp://10.0.0.5:7400") == {
        "server_endpoint": "tcp://10.0.0.5:7400",
        "workers_endpoint": "tcp://10.0.0.5:7401",
        "results_endpoint": "tcp://10.0.0.5:7402",
        "events_endpoint": "tcp://10.0.0.5:7403",
        "ats_endpoint": "tcp://10.0.0.5:7404",
        "ats_events_endpoint": "tcp://10.0.0.5:7405",
    }
    for bad in ("ipc:///x", "tcp://host", "tcp://:7400", "tcp://h:65533"):
        with pytest.raises(Invalid, match="--bind needs"):
            tcp_endpoints(bad)
    settings = load_settings(tmp_path, environ={"QNTX_BIND": "tcp://0.0.0.0:7400"})
    assert settings.server_endpoint.startswith("ipc://")  # this host keeps ipc
    assert settings.for_other_hosts("ats_endpoint") == "tcp://0.0.0.0:7404"


def test_no_zap_handler_means_no_connection(tmp_path):
    """Fail-closed: once a context's ZAP handler is gone, even an authorised key
    gets no connection (the domain is enforced by libzmq)."""
    keys = tmp_path / "keys"
    make_keys(keys)
    security = Security(keys_dir=keys)
    context = zmq.Context()
    try:
        server = context.socket(zmq.ROUTER)
        server.setsockopt(zmq.LINGER, 0)
        security.bind(server, "tcp://127.0.0.1:*")
        endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)

        def answered() -> bool:
            client = context.socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            security.connect(client, endpoint)
            client.send(b"hello")
            got = server.poll(1500)
            if got:
                server.recv_multipart()
            client.close(0)
            return bool(got)

        assert answered()  # with its handler: this host's own key gets through
        stop_zap(context)
        assert not answered()
        server.close(0)
    finally:
        context.destroy(linger=0)
