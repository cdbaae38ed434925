"""Bounded work per request against real actors: a body built to decode to tens of
times its size is refused with a typed error before it is decoded, and the actor's
memory does not jump (its peak RSS is read from /proc)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import zmq

import qntx
from tests.integration.fuzz import _expect_error

pytestmark = pytest.mark.timeout(120)

EMPTIES = 2_000_000  # 2 MB of empty arrays: about 130 MB once decoded


def bomb(message: dict) -> bytes:
    """``message``, whose last encoded value is a nil, with that nil replaced by an
    array of EMPTIES empty arrays."""
    body = msgspec.msgpack.encode(message)
    assert body.endswith(b"\xc0")
    return body[:-1] + b"\xdd" + EMPTIES.to_bytes(4, "big") + b"\x90" * EMPTIES


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def actor_pids(bus) -> dict[str, int]:
    lines = (bus.home / "run" / "actors").read_text().split("\n")
    return {line.split()[0]: int(line.split()[1]) for line in lines if line}


def send(endpoint: str, body: bytes) -> str:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"c1", body])
        return _expect_error(sock, b"c1").message
    finally:
        sock.close(0)


def test_bodies_that_would_decode_to_tens_of_times_their_size_are_refused(bus):
    bus.start_up()
    pids = actor_pids(bus)
    before = {name: peak_rss_kib(pid) for name, pid in pids.items()}
    # ATS decodes attributes: the body is refused before it is decoded.
    attest = bomb({"type": "Attest", "items": [{"subjects": ["a"], "attributes": {"k": None}}]})
    assert "24 times its size" in send(bus.settings.ats_endpoint, attest)
    with bus.connect() as b:
        # The server carries payloads unread (test_leases: a 10 MB one); whoever
        # decodes one checks it first: builtin.sleep in a worker refuses it ...
        sleep = b.submit("builtin.sleep", msgspec.Raw(bomb({"seconds": None})), max_attempts=1)
        with pytest.raises(qntx.JobFailed, match="would decode to more than"):
            sleep.result(timeout=30)
        # ... and python.script builds only the `content` it reads.
        script = {"content": "_result = 'ran'", "junk": None}
        assert b.submit("python.script", msgspec.Raw(bomb(script))).result(timeout=30) == "ran"
        assert b.query(subjects=["a"]) == []  # nothing was written
        assert b.submit("builtin.echo", "ok").result(timeout=20) == "ok"
    after = {name: peak_rss_kib(pid) for name, pid in pids.items()}
    for name in pids:
        grew_mib = (after[name] - before[name]) / 1024
        # The bodies are 2 MB, and decoded would be 130 MB; a carried copy or two is fine.
        assert grew_mib < 25, f"{name} peak RSS grew {grew_mib:.0f} MiB for a 2 MB body"
    assert actor_pids(bus) == pids


def test_limit_options_change_one_field_and_limits_are_shown(bus):
    """`handler limit --rate` keeps an existing concurrency (and the other way round);
    `handler limits` and `handler show` say what is in force."""
    assert bus.run("handler", "create", "paced", "--code", "_result = 1").returncode == 0
    assert bus.run("handler", "limit", "paced", "--concurrency", "2").returncode == 0
    done = bus.run("handler", "limit", "paced", "--rate", "3/20s")
    assert done.returncode == 0 and "at most 2 at once, at most 3 starts per 20s" in done.stdout, done.stdout
    listed = bus.run("handler", "limits").stdout
    assert "python.paced" in listed and "at most 2 at once, at most 3 starts per 20s" in listed
    shown = bus.run("handler", "show", "paced").stdout
    assert "Limits: at most 2 at once, at most 3 starts per 20s" in shown
    done = bus.run("handler", "limit", "paced", "--no-concurrency")
    assert done.returncode == 0 and done.stdout.strip().endswith("python.paced: at most 3 starts per 20s")
    assert bus.run("handler", "limit", "paced", "--clear").returncode == 0
    assert "(no limits)" in bus.run("handler", "limits").stdout
    both = bus.run("handler", "limit", "paced", "--rate", "1/s", "--no-rate")
    assert both.returncode == 2 and "give one" in both.stderr
