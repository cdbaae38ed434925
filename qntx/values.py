"""Small value rules shared by the stores, Pulse and the clients.

One home for what several modules would otherwise each write for themselves:
the wall clock in Unix milliseconds, what counts as an integer on the wire, and
turning "one string or a list of strings" into a list.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from qntx.errors import Invalid

# How long a stopping actor lets running jobs finish before giving them back
# (workers and plugins use the same figure, so neither cuts the other short).
STOP_GRACE_S = 5.0


def now_ms() -> int:
    """The wall clock as Unix milliseconds (an int: times on the wire are never floats)."""
    return time.time_ns() // 1_000_000


def utc_text(ms: int) -> str:
    """Unix ms as ``YYYY-MM-DD HH:MM:SS`` (UTC); a time no calendar date holds (past
    the year 9999, say) as its milliseconds."""
    from datetime import UTC, datetime

    try:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms after 1970"


def moment_text(ms: int | None) -> str:
    """A job's time (created, started, runs at...) as ``utc_text``; ``-`` when unset (0)."""
    return utc_text(ms) if ms else "-"


def is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_list(value: str | Sequence[str] | None, name: str = "value") -> list[str]:
    """``"a"`` -> ``["a"]``; a sequence of strings -> a list; None -> ``[]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"{name} must be a string or a list of strings")
    return list(value)
