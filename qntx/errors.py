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

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(QntxError):
    code = "bad_request"
    exit_code = 2


class UnknownType(QntxError):
    code = "unknown_type"
    exit_code = 2


class TooLarge(QntxError):
    code = "too_large"
    exit_code = 2


class Invalid(QntxError):
    code = "invalid"
    exit_code = 2


class InvalidQuery(Invalid):
    """A query that does not parse; ``position`` is the 0-based offset it fails at."""

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


class NotFound(QntxError):
    code = "not_found"


class Conflict(QntxError):
    code = "conflict"


class Unavailable(QntxError):
    code = "unavailable"
    exit_code = 3


class Forbidden(QntxError):
    """The peer's key has no role that may send this message."""

    code = "forbidden"
    exit_code = 5


class Timeout(QntxError):
    code = "timeout"
    exit_code = 4


class Internal(QntxError):
    code = "internal"


class Unconfirmed(Unavailable):
    """A change whose outcome is not known yet: the job may or may not have been
    accepted (or steered), e.g. its commit failed after it was dispatched; it goes
    with the next commit that succeeds. Ask again (a submit with the same id returns
    the job once it is on disk)."""

    code = "unconfirmed"


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
