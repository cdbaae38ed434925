"""Pulse's worker sessions and their leases. No I/O.

A **session** is one worker (or a plugin's own worker) connected to the pool: its
credit (the jobs it takes at once), the leases it holds and the runs taken back from
it that it still reports running (``foreign``: they hold slots until it stops listing
them). Which ready session has the most free slots is an index lookup (free credit
per route, ``qntx.pulse.credit``); liveness is a heap with one entry per session (an
entry whose session was heard from since is pushed again when it comes due); a
restarted worker's old session is found by its name.

A **lease** is one run: an id that only grows (reserved in blocks, durably, before
use), the job, the session holding it and a deadline on the monotonic clock.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from qntx.pulse.credit import FreeCredit

LEASE_BLOCK = 100_000  # lease ids reserved on disk at a time
FINISHED_KEPT_MS = 10_000  # how long a lease that ended with its JobDone is remembered


@dataclass(slots=True)
class Lease:
    id: int
    job_id: str
    session: bytes | None  # None: left by a crashed server, waiting for its worker to claim it
    deadline: int  # monotonic ms
    plugin: str | None = None


@dataclass(slots=True)
class Session:
    id: bytes
    name: str
    pid: int
    credit: int
    last_seen: int  # monotonic ms
    plugin: str = ""  # the plugin whose jobs it takes itself ("": a plain worker)
    host: str = ""
    ready: bool = False  # connected to its jobs pipe
    leases: set[int] = field(default_factory=set)
    foreign: set[int] = field(default_factory=set)  # taken back, still reported running
    order: int = 0  # join order: among sessions equally free, the first to join goes first

    @property
    def free(self) -> int:
        return self.credit - len(self.leases) - len(self.foreign)


class Sessions:
    def __init__(self, dead_after_ms: int) -> None:
        self.dead_after_ms = dead_after_ms
        self.by_id: dict[bytes, Session] = {}
        self._free = FreeCredit()  # ready sessions by free slots, per route
        self._liveness: list[tuple[int, int, bytes]] = []  # (deadline, order, session): one entry each
        self._named: dict[str, bytes] = {}  # worker name -> its session
        self._order = itertools.count(1)

    def get(self, session_id: bytes | None) -> Session | None:
        return None if session_id is None else self.by_id.get(session_id)

    def named(self, name: str) -> Session | None:
        return self.by_id.get(self._named.get(name, b""))

    def join(self, session_id: bytes, name: str, pid: int, mono: int) -> Session:
        session = Session(session_id, name, pid, 0, mono, order=next(self._order))
        self.by_id[session_id] = session
        self._named[name] = session_id
        heapq.heappush(self._liveness, (mono + self.dead_after_ms, session.order, session_id))
        return session

    def leave(self, session: Session) -> None:
        del self.by_id[session.id]
        self._free.remove(session.id)
        if self._named.get(session.name) == session.id:
            del self._named[session.name]

    def index(self, session: Session) -> None:
        """Tell the free-credit index what the session can take now."""
        free = session.free
        self._free.set(session.id, session.plugin, session.order, free, session.ready and free > 0)

    def best(self, route: str) -> Session | None:
        """The ready session of ``route`` with the most free slots (an index lookup)."""
        found = self._free.best(route)
        return None if found is None else self.by_id.get(found)

    def silent(self, mono: int) -> list[Session]:
        """The sessions silent for longer than ``dead_after_ms``: only entries that
        came due are looked at; one heard from since is pushed again at its new deadline."""
        gone = []
        while self._liveness and self._liveness[0][0] < mono:
            _, order, session_id = heapq.heappop(self._liveness)
            session = self.by_id.get(session_id)
            if session is None or session.order != order:
                continue  # ended (or replaced by a new session under the same id)
            if mono - session.last_seen > self.dead_after_ms:
                gone.append(session)
            else:
                heapq.heappush(self._liveness, (session.last_seen + self.dead_after_ms, order, session_id))
        return gone

    def next_liveness(self) -> int | None:
        return self._liveness[0][0] if self._liveness else None

    def stalled(self, ms: int) -> None:
        """The loop was blind for ``ms``: nobody is late for that."""
        for session in self.by_id.values():
            session.last_seen += ms


class Leases:
    """Every lease out, their deadlines, and the ids reserved on disk."""

    def __init__(self) -> None:
        self.by_id: dict[int, Lease] = {}
        self._deadlines: list[tuple[int, int]] = []  # (deadline, lease id), lazy
        self.taken_back: dict[int, bytes] = {}  # ended leases whose worker may still run them
        # Leases that ended with their own JobDone lately: a heartbeat sent before that
        # arrived may still list them, and that is no reason to cancel anything.
        self.ended_by_report: dict[int, int] = {}  # lease id -> monotonic ms it ended
        self.next_id = 1
        self.ceiling = 1  # leases below this are durably reserved
        self.wanted_ceiling = 1 + LEASE_BLOCK

    def restore(self, ceiling: int) -> None:
        self.next_id = self.ceiling = max(ceiling, 1)
        self.wanted_ceiling = self.ceiling + LEASE_BLOCK

    def get(self, lease_id: int) -> Lease | None:
        return self.by_id.get(lease_id)

    def add(self, lease: Lease) -> None:
        self.by_id[lease.id] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))

    def extend(self, lease: Lease, deadline: int) -> None:
        lease.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, lease.id))

    def remove(self, lease: Lease) -> None:
        del self.by_id[lease.id]

    def _current(self, deadline: int, lease_id: int) -> bool:
        lease = self.by_id.get(lease_id)
        return lease is not None and lease.deadline == deadline

    def expired(self, mono: int) -> list[Lease]:
        """The leases whose deadline passed, soonest first (still current, not ended)."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= mono:
            deadline, lease_id = heapq.heappop(self._deadlines)
            if self._current(deadline, lease_id):
                out.append(self.by_id[lease_id])
        return out

    def next_deadline(self) -> int | None:
        while self._deadlines and not self._current(*self._deadlines[0]):
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def can_issue(self) -> bool:
        return self.next_id < self.ceiling

    def issue(self) -> tuple[int, bool]:
        """A new lease id, and whether the next block of ids must be reserved on disk."""
        lease_id = self.next_id
        self.next_id += 1
        if self.next_id + LEASE_BLOCK // 2 > self.wanted_ceiling:
            self.wanted_ceiling += LEASE_BLOCK
            return lease_id, True
        return lease_id, False

    @property
    def urgent(self) -> bool:
        """Dispatching soon waits for the next block of lease ids."""
        return self.wanted_ceiling != self.ceiling and self.next_id + LEASE_BLOCK // 4 >= self.ceiling

    def forget_reports(self, mono: int) -> None:
        ended = self.ended_by_report
        while ended and next(iter(ended.values())) < mono - FINISHED_KEPT_MS:
            ended.pop(next(iter(ended)))
