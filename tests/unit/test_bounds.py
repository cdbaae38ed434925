"""A MessagePack body that would decode to far more memory than its size is refused
before it is decoded; real data of every shape passes."""

from __future__ import annotations

import os
import tracemalloc

import msgspec
import pytest

from qntx.bus.bounds import ALLOC_FACTOR, SMALL_BODY, check_decoded_size
from qntx.bus.codec import Decoder
from qntx.errors import TooLarge
from qntx.protocol import AtsRequest

pytestmark = pytest.mark.timeout(60)

encode = msgspec.msgpack.encode


def array32(n: int, element: bytes) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big") + element * n


BOMBS = {
    "nested one-element arrays": b"\x91" * 300_000 + b"\xc0",
    "an array of empty arrays": array32(500_000, b"\x90"),
    "an array of empty maps": array32(500_000, b"\x80"),
    "a map of empty arrays": b"\xdf" + (200_000).to_bytes(4, "big") + b"\x00\x90" * 200_000,
}


@pytest.mark.parametrize("body", BOMBS.values(), ids=BOMBS.keys())
def test_bodies_of_empty_containers_are_refused_without_decoding(body):
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match=f"{ALLOC_FACTOR} times its size"):
            check_decoded_size(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(body)  # the check builds nothing of the sort (one scratch copy)


REAL = {
    "binary": encode({"data": os.urandom(3_000_000)}),
    "text": encode({"text": "word " * 500_000}),
    "words": encode({"words": [f"word{i:05d}" for i in range(100_000)]}),
    "integers": encode(list(range(1_000, 300_000))),
    "floats": encode([i / 7 for i in range(200_000)]),
    "records": encode([{"subjects": [f"user-{i}"], "attributes": {"i": i, "w": 0.5}} for i in range(5_000)]),
    "tiny attestations": encode({"type": "Attest", "items": [{"subjects": ["a"]}] * 20_000}),
}  # fmt: skip


@pytest.mark.parametrize("body", REAL.values(), ids=REAL.keys())
def test_real_data_passes_and_decodes_within_the_bound(body):
    assert len(body) > SMALL_BODY
    check_decoded_size(body)
    tracemalloc.start()
    try:
        msgspec.msgpack.decode(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= ALLOC_FACTOR * len(body)


def test_small_bodies_are_never_checked():
    check_decoded_size(b"\x91" * (SMALL_BODY - 1) + b"\xc0")


def test_malformed_bodies_are_left_to_the_decoder():
    check_decoded_size(REAL["words"][: SMALL_BODY * 2])  # cut short: the walk stops at the end
    check_decoded_size(b"\xc1" * (SMALL_BODY + 1))


def test_the_bus_decoder_refuses_a_bomb_in_attributes_with_a_typed_error():
    body = (
        encode({"type": "Attest", "items": [{"subjects": ["a"], "attributes": {"k": None}}]})[:-1]
        + array32(400_000, b"\x90")
    )
    with pytest.raises(TooLarge):
        Decoder(AtsRequest).decode(body)


def test_fully_typed_messages_carry_a_bomb_unread():
    """A Submit's payload is Raw: the server skips it without building it, so its
    decoder has no need to check (and must not refuse a carried payload)."""
    from qntx.protocol import ServerRequest, Submit

    body = encode({"type": "Submit", "handler": "builtin.echo", "payload": None})[:-1]
    body += array32(400_000, b"\x90")
    tracemalloc.start()
    try:
        message = Decoder(ServerRequest).decode(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(message, Submit) and len(message.payload) == 400_005
    assert peak < 2 * len(body)
    with pytest.raises(TooLarge):  # whoever decodes it checks it first
        check_decoded_size(message.payload, "payload")
