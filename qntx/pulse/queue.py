"""Pulse's queue: the jobs waiting for a slot, ready or not yet due. No I/O.

A ready job sits in its handler's heap, keyed by (-priority, seq): the highest
priority first, then the oldest. Handlers are grouped by **route**, the group of
worker sessions that can run them (``""``: plain workers, for built-ins; a plugin's
name: the sessions that plugin runs for its own jobs); each route keeps a heap of
its handlers keyed by their best job. Taking the best job that can go now
(``pop_best``) looks only at the routes that have a free session and, in each, at
the head of its heap of handlers: its cost does not grow with the number of
sessions, handlers or jobs. A handler at its limit is set aside (``parked``) until
the next dispatch pass, so it is looked at once per pass, not once per job.

A job not due yet (a backoff, ``run_at``) waits in the delayed heap keyed by
(run_after, seq) and moves to its handler's heap when due (``promote``).

Heaps delete lazily: an entry counts only while its token is the job's current
one; a queue mostly made of dead entries is rebuilt.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

Entry = tuple[int, int, int, str]  # (-priority, seq, token, job id)


class _Handler:
    __slots__ = ("route", "heap", "listed")

    def __init__(self, route: str) -> None:
        self.route = route
        self.heap: list[Entry] = []
        self.listed: Entry | None = None  # the entry its route's heap lists it under


class JobQueue:
    def __init__(self) -> None:
        self._token = itertools.count()
        # job id -> (token, -priority, seq, handler, route, run_after) of its live entry
        self._live: dict[str, tuple[int, int, int, str, str, int]] = {}
        self._handlers: dict[str, _Handler] = {}
        self._routes: dict[str, list[tuple[Entry, str]]] = {}  # route -> heap of (best entry, handler)
        self._delayed: list[tuple[int, int, int, str]] = []  # (run_after, seq, token, id)
        self._entries = 0  # entries in every heap, live or dead
        self._parked: list[str] = []  # handlers at their limit, set aside for this pass
        self.visits = 0  # heads looked at by pop_best (the tests count them)
        self._wall = 0  # the latest wall clock seen: what is due

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._live

    def add(self, job_id: str, handler: str, route: str, priority: int, seq: int, run_after: int, wall: int) -> None:
        token = next(self._token)
        self._wall = wall
        self._live[job_id] = (token, -priority, seq, handler, route, run_after)
        self._entries += 1
        if run_after <= wall:
            self._push_ready(handler, route, (-priority, seq, token, job_id))
        else:
            heapq.heappush(self._delayed, (run_after, seq, token, job_id))

    def remove(self, job_id: str) -> None:
        """Take a job out (lazily: its entries go stale)."""
        if self._live.pop(job_id, None) is None:
            return
        if self._entries > 2 * len(self._live) + 64:  # mostly dead entries: rebuild
            live = self._live
            self._live, self._handlers, self._routes, self._delayed, self._entries = {}, {}, {}, [], 0
            for job_id_, (_, neg_priority, seq, handler, route, run_after) in live.items():
                self.add(job_id_, handler, route, -neg_priority, seq, run_after, self._wall)

    def _push_ready(self, handler: str, route: str, entry: Entry) -> None:
        state = self._handlers.get(handler)
        if state is None:
            state = self._handlers[handler] = _Handler(route)
        heapq.heappush(state.heap, entry)
        if state.listed is None or entry < state.listed:
            state.listed = entry
            heapq.heappush(self._routes.setdefault(state.route, []), (entry, handler))

    def _live_head(self, state: _Handler) -> Entry | None:
        heap, live = state.heap, self._live
        while heap:
            entry = heap[0]
            current = live.get(entry[3])
            if current is not None and current[0] == entry[2]:
                return entry
            heapq.heappop(heap)
            self._entries -= 1
        return None

    def promote(self, wall: int) -> None:
        """Jobs whose time came move to their handler's heap."""
        delayed, live = self._delayed, self._live
        self._wall = wall
        while delayed and delayed[0][0] <= wall:
            _, seq, token, job_id = heapq.heappop(delayed)
            current = live.get(job_id)
            if current is not None and current[0] == token:
                self._push_ready(current[3], current[4], (current[1], seq, token, job_id))
            else:
                self._entries -= 1

    def next_due(self) -> int | None:
        """Wall ms when the next delayed job is due (None: none)."""
        delayed, live = self._delayed, self._live
        while delayed:
            _, _, token, job_id = delayed[0]
            current = live.get(job_id)
            if current is not None and current[0] == token:
                return delayed[0][0]
            heapq.heappop(delayed)
            self._entries -= 1
        return None

    def has_ready(self, handler: str) -> bool:
        state = self._handlers.get(handler)
        return state is not None and self._live_head(state) is not None

    def _route_head(self, route: str, limited: Callable[[str], bool]) -> tuple[Entry, str] | None:
        """The best ready job of ``route`` whose handler is not at its limit."""
        heap = self._routes.get(route)
        while heap:
            entry, handler = heap[0]
            self.visits += 1
            state = self._handlers.get(handler)
            if state is None or state.listed != entry:
                heapq.heappop(heap)  # listed again since under a better entry, or gone
                continue
            head = self._live_head(state)
            if head is None:
                heapq.heappop(heap)
                del self._handlers[handler]
                continue
            if head != entry:  # its best job left: list it under its best one now
                heapq.heappop(heap)
                state.listed = head
                heapq.heappush(heap, (head, handler))
                continue
            if limited(handler):
                heapq.heappop(heap)
                state.listed = None
                self._parked.append(handler)
                continue
            return entry, handler
        if heap is not None and not heap:
            del self._routes[route]
        return None

    def pop_best(self, routes: list[str], limited: Callable[[str], bool]) -> tuple[str, str] | None:
        """Take the best ready job among ``routes`` (highest priority, then oldest)
        whose handler is not ``limited``: (job id, its route), or None."""
        best = None
        for route in routes:
            found = self._route_head(route, limited)
            if found is not None and (best is None or found[0] < best[1][0]):
                best = (route, found)
        if best is None:
            return None
        route, (entry, handler) = best
        state = self._handlers[handler]
        heapq.heappop(state.heap)
        self._entries -= 1
        del self._live[entry[3]]
        state.listed = None
        heap = self._routes[route]  # (entry, handler) is its head
        head = self._live_head(state)
        if head is None:
            heapq.heappop(heap)
            del self._handlers[handler]
        else:
            state.listed = head
            heapq.heapreplace(heap, (head, handler))
        return entry[3], route

    def unpark(self) -> None:
        """A new dispatch pass: the handlers set aside at their limit are looked at again."""
        parked, self._parked = self._parked, []
        for handler in parked:
            state = self._handlers.get(handler)
            if state is None or state.listed is not None:
                continue
            head = self._live_head(state)
            if head is None:
                del self._handlers[handler]
            else:
                state.listed = head
                heapq.heappush(self._routes.setdefault(state.route, []), (head, handler))

    def routes(self) -> list[str]:
        """The routes that may have ready jobs."""
        return list(self._routes)
