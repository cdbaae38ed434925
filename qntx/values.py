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
