"""Every wire message survives encode -> decode through its socket's union (hypothesis)."""

from __future__ import annotations

import types
import typing
from typing import Any, Union

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qntx import protocol
from qntx.bus.codec import Decoder, encode
from qntx.bus.messages import Message
from qntx.errors import BadRequest, TooLarge, UnknownType

pytestmark = pytest.mark.timeout(120)

UNIONS = {
    "ats": protocol.AtsRequest | protocol.AtsReply,
    "server": protocol.ServerRequest | protocol.ServerReply,
    "workers": protocol.WorkerMessage | protocol.WorkerCommand,
    "jobs": protocol.WorkerJob,
    "results": protocol.WorkerResult,
    "plugin": protocol.PluginRequest | protocol.PluginReply,
    "events": protocol.Event,
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
# Any MessagePack value (what payloads, results and attributes may hold).
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def strategy_for(tp: Any) -> st.SearchStrategy:
    origin = typing.get_origin(tp)
    if tp is Any:
        return values
    if tp is msgspec.Raw:  # carried, not decoded: any MessagePack value, as bytes
        return values.map(lambda v: msgspec.Raw(msgspec.msgpack.encode(v)))
    if origin in (Union, types.UnionType):
        return st.one_of(*(strategy_for(arg) for arg in typing.get_args(tp)))
    if origin is list:
        return st.lists(strategy_for(typing.get_args(tp)[0]), max_size=3)
    if origin is tuple:
        return st.tuples(*(strategy_for(arg) for arg in typing.get_args(tp)))
    if origin is dict:
        key, value = typing.get_args(tp)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=3)
    if tp is type(None):
        return st.none()
    if tp is str:
        return st.text(max_size=20)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**63), 2**63 - 1)
    if tp is float:
        return st.floats(allow_nan=False)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        hints = typing.get_type_hints(tp)
        return st.builds(tp, **{f: strategy_for(hints[f]) for f in tp.__struct_fields__})
    raise TypeError(f"no strategy for {tp!r}")


def members(union: Any) -> list[type]:
    return list(typing.get_args(union)) or [union]


ALL = sorted({(role, cls) for role, union in UNIONS.items() for cls in members(union)}, key=lambda rc: (rc[0], rc[1].__name__))


@pytest.mark.parametrize("role, cls", ALL, ids=[f"{r}-{c.__name__}" for r, c in ALL])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(role, cls, data):
    message = data.draw(strategy_for(cls))
    decoded = Decoder(UNIONS[role]).decode(encode(message))
    assert type(decoded) is cls
    assert decoded == message


def test_every_message_is_in_a_union():
    declared = {
        obj
        for obj in vars(protocol).values()
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    }
    routed = {cls for union in UNIONS.values() for cls in members(union)}
    assert declared <= routed, f"messages no socket decodes: {sorted(c.__name__ for c in declared - routed)}"


def test_decoder_errors_are_typed():
    decoder = Decoder(protocol.AtsRequest)
    with pytest.raises(UnknownType):
        decoder.decode(encode(protocol.Submit(handler="x")))
    with pytest.raises(BadRequest):
        decoder.decode(b"\xc1")
    with pytest.raises(BadRequest):
        decoder.decode(msgspec.msgpack.encode({"type": "Query", "filter": {"limit": "ten"}}))
    head = b"\x82\xa4type\xa6Attest\xa5items\x91\x82\xa8subjects\x91\xa1a\xaaattributes\x81\xa1k"
    with pytest.raises(BadRequest):  # nested past any recursion limit, in a small body
        decoder.decode(head + b"\x91" * 50_000 + b"\xc0")
    with pytest.raises(TooLarge):  # a big one is refused before it is decoded
        decoder.decode(head + b"\x91" * 100_000 + b"\xc0")
