"""The error types of QNTX, one per cause, each with the wire code it travels as.

An actor that fails a request replies ``ErrorReply(code, message)``; a client turns
that reply back into the matching exception with ``error_from_reply``. The CLI
prints ``str(error)`` as its one line.
"""

from __future__ import annotations


class QntxError(Exception):
    """Base of every error QNTX raises on purpose."""

    code = "internal"
    exit_code = 1

    def __init_subclass__(cls, *, code: str | None = None, exit_code: int | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if code is not None:
            cls.code = code
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(QntxError, code="bad_request", exit_code=2):
    """A message that cannot be read (not MessagePack, no correlation frame...)."""


class UnknownType(QntxError, code="unknown_type", exit_code=2):
    """A message type the socket does not answer."""


class TooLarge(QntxError, code="too_large", exit_code=2):
    """A message over the bus's size limit."""


class Invalid(QntxError, code="invalid", exit_code=2):
    """A request that reads well but asks for something not allowed."""


class InvalidQuery(Invalid):
    """A query that does not parse; ``position`` is the 0-based offset it fails at."""

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


class NotFound(QntxError, code="not_found"):
    """No such job, attestation, schedule or handler."""


class Conflict(QntxError, code="conflict"):
    """The request clashes with what is stored (an id taken, a job in the wrong state)."""


class Unavailable(QntxError, code="unavailable", exit_code=3):
    """An actor that does not answer, or cannot do the request now."""


class Forbidden(QntxError, code="forbidden", exit_code=5):
    """The peer's key has no role that may send this message."""


class Timeout(QntxError, code="timeout", exit_code=4):
    """No answer within the time given."""


class Internal(QntxError, code="internal"):
    """A fault of QNTX itself (logged where it happened)."""


class Unconfirmed(Unavailable, code="unconfirmed"):
    """A change whose outcome is not known yet: the job may or may not have been
    accepted (or steered), e.g. its commit failed after it was dispatched; it goes
    with the next commit that succeeds. Ask again (a submit with the same id returns
    the job once it is on disk)."""


_BY_CODE = {
    cls.code: cls
    for cls in (
        BadRequest, UnknownType, TooLarge, Invalid, NotFound, Conflict, Unavailable, Forbidden, Timeout, Internal,
        Unconfirmed,
    )  # fmt: skip
}


def error_from_code(code: str, message: str) -> QntxError:
    """The exception for a wire error code (unknown codes become Internal)."""
    return _BY_CODE.get(code, Internal)(message)
