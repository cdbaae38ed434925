"""What a call asks its driver to do, and the table of calls.

A call is a generator function whose first parameter is the bus: it yields
effects and gets their results back (an error is raised inside the call, where
it asked). It never touches a socket, a clock or an event loop itself, so the
blocking ``Bus`` and the asyncio ``AsyncBus`` run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

ATS = "ats"
SERVER = "server"

# name -> call: every call of the scripting API (``qntx.calls`` fills it).
CALLS: dict[str, Callable[..., Generator]] = {}


def call(fn: Callable[..., Generator]) -> Callable[..., Generator]:
    """Register ``fn`` as a call of both APIs, under its own name."""
    if fn.__name__ in CALLS:
        raise RuntimeError(f"two calls named {fn.__name__}")
    CALLS[fn.__name__] = fn
    return fn


class Ask:
    """One request to ``to`` (ATS or SERVER); the result is its reply, and an
    ErrorReply is raised in the call as its typed error."""

    __slots__ = ("to", "message", "timeout_s")

    def __init__(self, to: str, message: Any, timeout_s: float | None = None):
        self.to, self.message, self.timeout_s = to, message, timeout_s


class AskEach:
    """Requests pipelined to ``to``; the result is their replies in order (an
    ErrorReply stays a value: one refused request does not stop the others)."""

    __slots__ = ("to", "messages")

    def __init__(self, to: str, messages: list[Any]):
        self.to, self.messages = to, messages


class Enqueue:
    """Send a ``Submit``; the result is the driver's handle of the job."""

    __slots__ = ("job_id", "message", "keyed")

    def __init__(self, job_id: str, message: Any, keyed: bool):
        self.job_id, self.message, self.keyed = job_id, message, keyed


class Nap:
    """Let ``seconds`` pass (a poll's interval)."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float):
        self.seconds = seconds


def read_pages(to: str, message: Any, take: Callable[[Any], Any]) -> Generator[Ask, Any, None]:
    """Read a listing page after page: ask ``message``; ``take(reply)`` keeps what
    the page brings and gives the request of the next page, or None once the
    listing is done (its last page, or enough found)."""
    while message is not None:
        message = take((yield Ask(to, message)))
