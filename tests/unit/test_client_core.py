"""The client core (``qntx.bus.requester``) that the blocking ``Client`` and the asyncio
``AsyncClient`` both drive, run through one script against each: replies are matched
by correlation id whatever order they come in, a reply nobody waits for is dropped,
one that cannot be decoded is an ErrorReply (which ``request`` raises) without losing
the replies around it, and a timeout is the same error from either. A raw ROUTER in
a thread plays the actor, on a real ipc socket."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq
import zmq.asyncio

from qntx.bus.async_client import AsyncClient
from qntx.bus.client import Client
from qntx.bus.codec import encode
from qntx.bus.messages import ErrorReply, Ping, Pong
from qntx.errors import BadRequest, Timeout

pytestmark = pytest.mark.timeout(30)

REPLIES = Pong | ErrorReply
UNDECODABLE = b"\xc1"  # a byte MessagePack never uses
STRAY = (99).to_bytes(8, "big")  # a correlation id nobody sent


def pong(name: str) -> bytes:
    return encode(Pong(actor=name, pid=1))


def out_of_order(requests, held):
    """Three requests: the last answered first, the first undecodable, a stray reply between."""
    (who, first, _), (_, second, _), (_, third, _) = requests
    return [[who, third, pong("third")], [who, first, UNDECODABLE], [who, STRAY, pong("stray")], [who, second, pong("second")]]


def undecodable(requests, held):
    (who, correlation, _) = requests[0]
    return [[who, correlation, UNDECODABLE]]


def no_answer(requests, held):
    held.extend(requests)  # answered late, with the next one
    return []


def late_then_fresh(requests, held):
    (who, late, _), (_, fresh, _) = held.pop(), requests[0]
    return [[who, late, pong("late")], [who, fresh, pong("fresh")]]


SCRIPT = [(3, out_of_order), (1, undecodable), (1, no_answer), (1, late_then_fresh)]


class ScriptedActor:
    """A ROUTER that takes the script's requests step by step and sends what each step says."""

    def __init__(self, endpoint: str):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        held: list[list[bytes]] = []
        for count, step in SCRIPT:
            requests = []
            while len(requests) < count:
                if self.router.poll(100):
                    requests.append(self.router.recv_multipart())
                elif self.done.is_set():
                    return
            for frames in step(requests, held):
                self.router.send_multipart(frames)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.router.close(0)
        self.context.term()


@pytest.fixture
def actor(tmp_path):
    endpoint = f"ipc://{tmp_path}/actor.sock"
    scripted = ScriptedActor(endpoint)
    yield endpoint
    scripted.close()


def check_out_of_order(sent: list, got: dict) -> None:
    assert set(got) == set(sent)  # the stray reply was dropped
    assert got[sent[2]] == Pong(actor="third", pid=1) and got[sent[1]] == Pong(actor="second", pid=1)
    assert isinstance(got[sent[0]], ErrorReply) and got[sent[0]].code == "bad_request"


def test_the_blocking_client_follows_the_script(actor):
    with Client(actor, REPLIES, timeout_s=5) as client:
        sent = [client.send(Ping()) for _ in range(3)]
        got: dict = {}
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            got.update(client.arrived(0.5))
        check_out_of_order(sent, got)
        assert client.waiting_bytes == 0
        with pytest.raises(BadRequest):
            client.request(Ping())
        with pytest.raises(Timeout) as timed_out:
            client.request(Ping(), timeout_s=0.2)
        assert str(timed_out.value) == f"no reply from {actor} within 0.2s"
        assert client.request(Ping()).actor == "fresh"  # not the late reply before it


def test_the_asyncio_client_follows_the_script(actor):
    async def run() -> None:
        context = zmq.asyncio.Context()
        client = AsyncClient(actor, REPLIES, timeout_s=5, context=context)
        try:
            futures = [await client.send(Ping()) for _ in range(3)]
            got = {n: await client.take(future) for n, future in enumerate(futures)}
            check_out_of_order([0, 1, 2], got)
            with pytest.raises(BadRequest):
                await client.request(Ping())
            with pytest.raises(Timeout) as timed_out:
                await client.request(Ping(), timeout_s=0.2)
            assert str(timed_out.value) == f"no reply from {actor} within 0.2s"
            assert (await client.request(Ping())).actor == "fresh"  # not the late reply before it
        finally:
            client.close()
            context.term()

    asyncio.run(run())
