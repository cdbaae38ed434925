"""The one service core (``qntx.bus.service.Responder``) in both runtimes: the same
requests sent to a poll-loop ``Service`` and to an asyncio ``AsyncService`` get the
same replies and leave the same request and refusal counts. A raw DEALER plays the
client, on a real ipc socket."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq
import zmq.asyncio

from qntx.bus.actor import Actor
from qntx.bus.async_service import AsyncService
from qntx.bus.codec import Decoder, encode
from qntx.bus.messages import Ack, ErrorReply, Ping, Pong

pytestmark = pytest.mark.timeout(30)

REQUESTS = Ping | Ack
UNDECODABLE = b"\xc1"
WANTED = [
    (b"", encode(Ping()), None),  # a notice: counted, not answered (first: handled before the rest)
    (b"1", encode(Ping()), "Pong"),
    (b"2", encode(Ack()), "internal"),  # its handler crashes
    (b"3", UNDECODABLE, "bad_request"),
    (b"4", encode(Pong(actor="x", pid=1)), "unknown_type"),  # not a request here
]
COUNTS = {("Ping", "ok"): 2, ("Ack", "internal"): 1, ("undecoded", "bad_request"): 1, ("undecoded", "unknown_type"): 1}
REFUSED = {"bad_request": 1, "unknown_type": 1}


def pong(message, request):
    return Pong(actor="t", pid=1)


def crash(message, request):
    raise RuntimeError("a bug")


async def crash_later(message, request):
    raise RuntimeError("a bug")


def exchange(endpoint: str, context: zmq.Context) -> dict[bytes, str]:
    """Send WANTED's requests; what came back for each correlation id."""
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(endpoint)
    try:
        for correlation, body, _ in WANTED:
            dealer.send_multipart([correlation, body])
        decoder, got = Decoder(Pong | ErrorReply, replies=True), {}
        while len(got) < 4 and dealer.poll(10_000):
            correlation, body = dealer.recv_multipart()
            reply = decoder.decode(body)
            got[correlation] = reply.code if isinstance(reply, ErrorReply) else type(reply).__name__
        return got
    finally:
        dealer.close(0)


def check(got: dict[bytes, str]) -> None:
    assert got == {correlation: kind for correlation, _, kind in WANTED if correlation}


def test_the_poll_loop_service(tmp_path):
    endpoint = f"ipc://{tmp_path}/loop.sock"
    actor = Actor()
    actor.serve(endpoint, REQUESTS, {Ping: pong, Ack: crash})
    loop = threading.Thread(target=actor.loop, daemon=True)
    loop.start()
    client_context = zmq.Context()
    try:
        check(exchange(endpoint, client_context))
    finally:
        actor.stop()
        loop.join(5)
        client_context.term()
        actor.context.destroy(0)
    assert actor.requests == COUNTS and actor.refused == REFUSED  # the actor's counts, which its metrics show


def test_the_asyncio_service(tmp_path):
    endpoint = f"ipc://{tmp_path}/aio.sock"

    async def run() -> AsyncService:
        context = zmq.asyncio.Context()
        service = AsyncService(
            context, endpoint, REQUESTS, {Ping: pong, Ack: crash_later}, label="test", max_message_bytes=1 << 20
        )
        serving = asyncio.get_running_loop().create_task(service.serve_forever())
        client_context = zmq.Context()
        try:
            check(await asyncio.to_thread(exchange, endpoint, client_context))
        finally:
            serving.cancel()
            service.close()
            client_context.term()
            context.term()
        return service

    service = asyncio.run(run())
    assert service.requests == COUNTS and service.refused == REFUSED
