"""Pulse's handler limits: how many runs of a handler may be out at once
(concurrency) and how many may start per period (rate). No I/O.

The core counts each handler's leases out (``lease_added``/``lease_ended``) and its
recent starts (``started``); ``limited`` says whether a handler must wait. A rate
limit's starts are saved with the limit (as wall ms) so that a restart keeps its
window.
"""

from __future__ import annotations

from collections import deque

from qntx.pulse.directives import Limit


class Limits:
    def __init__(self) -> None:
        self._limits: dict[str, Limit] = {}
        self._running: dict[str, int] = {}  # handler -> leases out
        self._starts: dict[str, deque[int]] = {}  # handler -> monotonic ms of its recent starts
        self.dirty = False

    def restore(self, saved: dict[str, list], wall: int, mono: int) -> None:
        """The limits last read from ATS, with each rate limit's recent starts (wall ms)."""
        self._limits = {}
        for handler, (c, r, p, *rest) in saved.items():
            self._limits[handler] = Limit(concurrency=c, rate=r, per_ms=p)
            starts = sorted(min(mono, mono - (wall - at)) for at in (rest[0] if rest else ()))
            if starts and r is not None:
                self._starts[handler] = deque(starts)

    def set(self, limits: dict[str, Limit]) -> None:
        if limits != self._limits:
            self.dirty = True
        self._limits = dict(limits)
        for handler in [h for h in self._starts if h not in self._limits or self._limits[h].rate is None]:
            del self._starts[handler]

    def current(self) -> dict[str, Limit]:
        return dict(self._limits)

    def snapshot(self, wall: int, mono: int) -> dict[str, list] | None:
        """What to save (None: unchanged): each limit with its starts in the window,
        as wall ms (this process's monotonic clock means nothing to the next)."""
        if not self.dirty:
            return None
        self.dirty = False
        return {
            h: [limit.concurrency, limit.rate, limit.per_ms, [wall - (mono - m) for m in self._starts.get(h, ())]]
            for h, limit in self._limits.items()
        }

    def lease_added(self, handler: str) -> None:
        self._running[handler] = self._running.get(handler, 0) + 1

    def lease_ended(self, handler: str) -> None:
        self._running[handler] -= 1
        if not self._running[handler]:
            del self._running[handler]

    def started(self, handler: str, mono: int) -> None:
        limit = self._limits.get(handler)
        if limit is not None and limit.rate is not None:
            self._starts.setdefault(handler, deque()).append(mono)
            self.dirty = True  # saved with the limit: a restart keeps its window

    def unstarted(self, handler: str) -> None:
        """The last start of ``handler`` never happened (its dispatch was undeliverable)."""
        starts = self._starts.get(handler)
        if starts:
            starts.pop()

    def limited(self, handler: str, mono: int) -> bool:
        """Whether ``handler`` is at its concurrency or rate limit now."""
        limit = self._limits.get(handler)
        if limit is None:
            return False
        if limit.concurrency is not None and self._running.get(handler, 0) >= limit.concurrency:
            return True
        return self._rate_full(handler, mono)

    def _rate_full(self, handler: str, mono: int) -> bool:
        limit, starts = self._limits.get(handler), self._starts.get(handler)
        if limit is None or limit.rate is None or not starts:
            return False
        while starts and starts[0] <= mono - limit.per_ms:
            starts.popleft()
        return len(starts) >= limit.rate

    def rate_wakeups(self, mono: int, waiting) -> list[int]:
        """When a full rate window frees a start for a handler with jobs ``waiting``."""
        return [
            self._starts[h][0] + self._limits[h].per_ms
            for h in self._starts
            if waiting(h) and self._rate_full(h, mono)
        ]
