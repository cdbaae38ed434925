"""The generic messages every actor understands, and the base of all tagged messages.

Domain messages (attestations, jobs, plugins) live in ``qntx.protocol``; this
module holds only what the transport itself needs to speak: errors, ping, ack.
"""

from __future__ import annotations

import msgspec


class Message(msgspec.Struct, tag_field="type", tag=True, omit_defaults=True, kw_only=True):
    """Base of every tagged wire message; the tag is the class name."""


class ErrorReply(Message):
    """The reply to any request that failed. ``code`` is one of ERROR_CODES."""

    code: str
    message: str


class Ping(Message):
    pass


class Pong(Message):
    actor: str
    pid: int
    version: str = ""


class Ack(Message):
    pass


# ERROR_CODES: the closed set of ErrorReply.code values.
ERROR_CODES = (
    "bad_request",  # the frames or the body could not be decoded
    "unknown_type",  # a well-formed message this socket does not answer
    "too_large",  # the body exceeds the maximum message size
    "invalid",  # the message decoded but its values are not acceptable
    "not_found",  # the referenced attestation, job or handler does not exist
    "conflict",  # the request clashes with the current state (e.g. duplicate id)
    "unavailable",  # an actor needed for the request is not reachable
    "forbidden",  # the sender's key has no role that may send this (tcp; docs/DEPLOY.md)
    "timeout",  # the request did not finish in time
    "internal",  # a bug: the actor logged the traceback
)


