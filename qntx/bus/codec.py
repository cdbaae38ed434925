"""Encoding message bodies and the frame layout around them.

Request/reply over ROUTER/DEALER uses two frames from the client's point of view:

    [correlation id, body]

The correlation id is opaque bytes chosen by the client (empty means "no reply
wanted": a fire-and-forget notice). The ROUTER side sees the peer identity
prepended. The reply repeats the correlation id. Events over PUB/SUB are
``[topic, body]``. Bodies are MessagePack maps with a ``type`` tag.
"""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect

from qntx.bus.bounds import check_decoded_size
from qntx.bus.messages import ErrorReply
from qntx.errors import BadRequest, QntxError, UnknownType, error_from_code

# The default ceiling for one message body; the transport drops anything past
# HARD_LIMIT_FACTOR times this without reading it (see Actor).
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
HARD_LIMIT_FACTOR = 4

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


class Decoder:
    """Decodes bodies into one tagged union, mapping failures to typed errors.

    When the union can hold arbitrary values (a field typed ``Any``, such as an
    attestation's attributes), a body that would decode to far more memory than its
    size is refused first (``qntx.bus.bounds``). Fully typed messages need no such
    check: what they carry unread (payloads, results) stays ``msgspec.Raw`` and is
    skipped without being built, and a value of the wrong shape fails at once. A
    client reading the replies of its own actors skips it (``replies=True``).
    """

    def __init__(self, message_type: Any, *, replies: bool = False):
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._check_size = not replies and holds_any(msgspec.inspect.type_info(message_type))

    def decode(self, body: bytes) -> Any:
        if self._check_size:
            check_decoded_size(body)
        try:
            return self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            text = str(exc)
            if "`$.type`" in text or "Object missing required field `type`" in text:
                raise UnknownType(f"unknown or missing message type: {text}") from None
            raise BadRequest(f"invalid message: {text}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(f"malformed MessagePack body: {exc}") from None
        except Exception as exc:  # e.g. RecursionError on absurdly nested input
            raise BadRequest(f"undecodable message body ({type(exc).__name__})") from None


def holds_any(info: msgspec.inspect.Type, seen: set[type] | None = None) -> bool:
    """Whether a value of the type ``info`` describes may hold values of any type."""
    if isinstance(info, msgspec.inspect.AnyType):
        return True
    seen = set() if seen is None else seen
    if isinstance(info, msgspec.inspect.StructType):
        if info.cls in seen:  # a recursive struct: its fields are being looked at
            return False
        seen.add(info.cls)
        return any(holds_any(field.type, seen) for field in info.fields)
    inner = [
        value for name in ("item_type", "key_type", "value_type", "item_types", "types")
        for value in _as_tuple(getattr(info, name, ()))
    ]  # fmt: skip
    return any(holds_any(t, seen) for t in inner)


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def raise_if_error(reply: Any) -> Any:
    """Return ``reply`` unless it is an ErrorReply, which becomes its exception."""
    if isinstance(reply, ErrorReply):
        raise error_from_code(reply.code, reply.message)
    return reply


def error_reply(error: QntxError) -> ErrorReply:
    return ErrorReply(code=error.code, message=error.message)
