"""A reply callback may close the very peer it came from (the server drops a plugin
whose Health reply says it is unwell): the read of that peer's socket ends there,
with no read on the closed socket (which the loop logged as an error it recovered
from, seen in a chaos run)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import zmq
from loguru import logger

from qntx.bus.actor import Actor
from qntx.bus.codec import encode
from qntx.bus.messages import Ping, Pong
from qntx.protocol import ServerReply

pytestmark = pytest.mark.timeout(30)


def test_a_callback_that_closes_its_peer_ends_the_read(tmp_path: Path):
    endpoint = f"ipc://{tmp_path}/answers.sock"
    actor = Actor()
    answerer = actor.context.socket(zmq.ROUTER)
    answerer.setsockopt(zmq.LINGER, 0)
    answerer.bind(endpoint)
    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(str(message)), level="ERROR")
    answered: list[object] = []
    peer = actor.connect(endpoint, ServerReply)

    def close_on_reply(reply: object) -> None:
        answered.append(reply)
        peer.close()  # in the middle of the peer's own read
        actor.stop()

    peer.call(Ping(), close_on_reply, timeout_s=10)
    loop = threading.Thread(target=actor.loop, daemon=True)
    loop.start()
    try:
        assert answerer.poll(10_000), "the request never arrived"
        identity, correlation, _body = answerer.recv_multipart()
        answerer.send_multipart([identity, correlation, encode(Pong(actor="answers", pid=1))])
        loop.join(10)
        assert not loop.is_alive(), "the actor's loop did not end"
        assert [type(reply) for reply in answered] == [Pong]
        assert errors == []
    finally:
        logger.remove(sink)
        actor.stop()
        loop.join(10)
        answerer.close(0)
        actor.context.destroy(linger=0)
