"""Garbage to throw at an actor's ROUTER, checking each routable piece gets a typed error."""

from __future__ import annotations

import random

import msgspec
import zmq

from qntx.bus.messages import ErrorReply

GARBAGE_BODIES = [
    b"",
    b"\xc1",  # never-used MessagePack byte
    b"\x92\x01\x02",  # an array, not a map
    msgspec.msgpack.encode({"type": "NoSuchMessage"}),
    msgspec.msgpack.encode({"no": "type"}),
    msgspec.msgpack.encode({"type": "Attest", "items": "not a list"}),
    msgspec.msgpack.encode({"type": "Attest", "items": [{"subjects": 7}]}),
    msgspec.msgpack.encode({"type": "Query", "filter": {"limit": "ten"}}),
    msgspec.msgpack.encode({"type": "Query", "filter": {"limit": -1}}),
    msgspec.msgpack.encode({"type": "Attest", "items": [{"subjects": ["a\x00b"]}]}),
    msgspec.msgpack.encode({"type": "Attest", "items": [{"subjects": []}]}),
    msgspec.msgpack.encode({"type": "GetAttestation", "id": 5}),
    msgspec.msgpack.encode({"type": "Submit", "handler": "x"}),  # right bus, wrong actor
    # A payload nested 200,000 deep: the decoder's recursion limit, not a crash.
    b"\x84" + msgspec.msgpack.encode({"type": "ExecuteJob", "job_id": "x", "handler": "python.script"})[1:]
    + msgspec.msgpack.encode("payload") + b"\x91" * 200_000 + b"\xc0",
    b"\x82" + msgspec.msgpack.encode("type") + msgspec.msgpack.encode("Attest") + msgspec.msgpack.encode("items")
    + b"\x91\x82" + msgspec.msgpack.encode("subjects") + msgspec.msgpack.encode(["a"])
    + msgspec.msgpack.encode("attributes") + b"\x81" + msgspec.msgpack.encode("k") + b"\x91" * 200_000 + b"\xc0",
]


def _expect_error(sock: zmq.Socket, correlation: bytes) -> ErrorReply:
    assert sock.poll(5000), "no reply to a bad request"
    frames = sock.recv_multipart()
    assert frames[0] == correlation
    reply = msgspec.msgpack.decode(frames[1], type=ErrorReply)
    assert reply.code in {"bad_request", "unknown_type", "invalid", "too_large", "not_found"}, reply
    return reply


def hammer(endpoint: str, seed: int = 7, rounds: int = 300) -> None:
    """Send malformed frames and bodies; check each routable one gets a typed error."""
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for n, body in enumerate(GARBAGE_BODIES):
            correlation = b"g%d" % n
            sock.send_multipart([correlation, body])
            _expect_error(sock, correlation)
        # Wrong frame counts: one frame, three frames, empty frames.
        sock.send_multipart([b"lonely"])  # a lone frame is taken as the correlation id
        assert _expect_error(sock, b"lonely").code == "bad_request"
        sock.send_multipart([b"c1", b"x", b"y"])
        assert _expect_error(sock, b"c1").code == "bad_request"
        sock.send_multipart([b"", b"\xc1"])  # fire-and-forget garbage: no reply, no crash
        for _ in range(rounds):
            frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 4))]
            sock.send_multipart(frames)
        # A client that vanishes mid-request.
        gone = ctx.socket(zmq.DEALER)
        gone.setsockopt(zmq.LINGER, 0)
        gone.connect(endpoint)
        gone.send_multipart([b"x", msgspec.msgpack.encode({"type": "Ping"})])
        gone.close(0)
        # Drain whatever replies the random frames earned.
        while sock.poll(300):
            sock.recv_multipart()
    finally:
        sock.close(0)


