"""Admission of worker sessions (qntx.pulse.shell): a session whose jobs PUSH cannot
be had is refused with a typed error and a log line, never a crash. Real sockets, a
real store; the context's socket limit is filled by hand."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
import zmq
from loguru import logger

from qntx.bus.actor import Actor
from qntx.bus.oslimits import raise_open_file_limit
from qntx.bus.service import Request
from qntx.protocol import WorkerReady
from qntx.pulse.shell import Pulse
from qntx.settings import load_settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pulse(home):
    settings = load_settings(home)
    settings.ensure_dirs()
    actor = Actor(max_message_bytes=settings.max_message_bytes, security=settings.security)
    pulse = Pulse(actor, settings, publish=lambda topic, message: None, cancel_at_plugin=lambda *args: None)
    try:
        yield pulse
    finally:
        pulse.close()
        actor.context.destroy(linger=0)


def hello(pulse: Pulse, session: bytes, worker: str) -> None:
    request = Request(pulse.control, session, b"")
    pulse.on_worker_ready(WorkerReady(worker=worker, credit=1, session=session.decode()), request)


def test_an_actor_raises_its_open_file_limit_to_the_hard_one_and_its_socket_limit_with_it():
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); "
        "from qntx.bus.actor import Actor; import zmq; actor = Actor(); "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], actor.open_file_limit, "
        "actor.context.get(zmq.MAX_SOCKETS)); actor.context.destroy(0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", "4096", "4096"]  # libzmq's default would be 1,023


def test_pulse_counts_its_room_for_sessions(pulse):
    assert pulse.actor.open_file_limit == raise_open_file_limit()
    assert 0 < pulse.sessions_free == pulse.session_room <= pulse.actor.open_file_limit // 5


def test_a_session_that_cannot_get_its_jobs_pipe_is_refused_and_the_next_one_gets_in(pulse):
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    hogs = []
    try:
        hello(pulse, b"w1:1:aa", "w1")
        assert b"w1:1:aa" in pulse.core.sessions
        while True:  # take every socket the context has left
            try:
                hogs.append(pulse.actor.context.socket(zmq.PUSH))
            except zmq.ZMQError:
                break
        hello(pulse, b"w2:2:bb", "w2")
        hello(pulse, b"w2:2:bb", "w2")  # its next heartbeat: refused again, logged once
        assert b"w2:2:bb" not in pulse.core.sessions and b"w1:1:aa" in pulse.core.sessions
        assert pulse.refusals == 2
        refused = [line for line in lines if "refused worker w2" in line]
        assert len(refused) == 1 and "cannot open its jobs pipe" in refused[0], lines
        for sock in hogs:
            sock.close(0)
        hogs.clear()
        hello(pulse, b"w2:2:bb", "w2")  # room again: in it goes
        assert b"w2:2:bb" in pulse.core.sessions
        assert pulse.sessions_free == pulse.session_room - 2
    finally:
        for sock in hogs:
            sock.close(0)
        logger.remove(sink)


def test_past_its_room_a_session_is_refused_unless_it_replaces_its_own_old_session(pulse):
    pulse.session_room = 1
    hello(pulse, b"w1:1:aa", "w1")
    hello(pulse, b"w2:2:bb", "w2")
    assert set(pulse.core.sessions) == {b"w1:1:aa"} and pulse.sessions_free == 0
    hello(pulse, b"w1:9:cc", "w1")  # w1 restarted: its new session takes the old one's place
    assert set(pulse.core.sessions) == {b"w1:9:cc"} and pulse.sessions_free == 0


def test_the_refusal_is_a_typed_error_on_the_control_socket(pulse, home):
    pulse.session_room = 0
    dealer = pulse.actor.context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"w3:3:dd")
    dealer.connect(pulse.settings.workers_endpoint)
    try:
        dealer.send_multipart([b"", msgspec.msgpack.encode({"type": "WorkerReady", "worker": "w3"})])
        assert pulse.control.socket.poll(5000)
        pulse.control.on_readable()
        assert dealer.poll(5000)
        correlation, body = dealer.recv_multipart()
        reply = msgspec.msgpack.decode(body)
        assert (correlation, reply["type"], reply["code"]) == (b"", "ErrorReply", "unavailable")
        assert "no room for another worker session" in reply["message"]
    finally:
        dealer.close(0)
