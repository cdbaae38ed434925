"""Free credit, indexed: which ready worker session has the most free slots, in O(log n).

Pulse sends each job to the ready session with the most free slots (PROTOCOL §6.3),
among the sessions of one group: plain workers (group ``""``) or the sessions a
plugin runs for its own jobs (group = the plugin's name). A scan of every session
per job made dispatch cost grow with the number of sessions; this index keeps one
heap per group keyed by (-free, order) instead, where ``order`` is the session's
join order, so equal free credit goes to the session that joined first, as a scan
in join order would choose.

The core calls ``set`` after every change to a session's credit, slots or
readiness, and ``remove`` when it ends. Heaps delete lazily: an entry counts only
while it matches the session's live entry, and a heap mostly made of dead entries
is rebuilt.
"""

from __future__ import annotations

import heapq
from collections import Counter


class FreeCredit:
    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, int, bytes]]] = {}  # group -> [(-free, order, session)]
        self._live: dict[bytes, tuple[int, int, bytes]] = {}  # session -> its current heap entry (usable ones)
        self._group: dict[bytes, str] = {}  # every session -> its group
        self._members: Counter[str] = Counter()  # group -> its sessions, usable or not

    def set(self, session: bytes, group: str, order: int, free: int, usable: bool) -> None:
        """The session's state now; ``usable``: ready to take a job (connected, free > 0)."""
        old_group = self._group.get(session)
        if old_group != group:
            if old_group is not None:
                self._leave(session, old_group)
            self._group[session] = group
            self._members[group] += 1
        entry = (-free, order, session)
        if not usable:
            self._live.pop(session, None)
            return
        if self._live.get(session) == entry:
            return
        self._live[session] = entry
        heap = self._heaps.setdefault(group, [])
        heapq.heappush(heap, entry)
        if len(heap) > 2 * len(self._live) + 64:  # mostly dead entries: rebuild
            self._heaps[group] = [e for e in heap if self._live.get(e[2]) == e and self._group[e[2]] == group]
            heapq.heapify(self._heaps[group])

    def remove(self, session: bytes) -> None:
        group = self._group.pop(session, None)
        if group is not None:
            self._leave(session, group)

    def _leave(self, session: bytes, group: str) -> None:
        self._live.pop(session, None)
        self._members[group] -= 1
        if not self._members[group]:
            del self._members[group]
            self._heaps.pop(group, None)

    def best(self, group: str) -> bytes | None:
        """The usable session of ``group`` with the most free slots (the first to join
        among equals); None if it has none."""
        heap = self._heaps.get(group)
        while heap:
            entry = heap[0]
            if self._live.get(entry[2]) == entry and self._group.get(entry[2]) == group:
                return entry[2]
            heapq.heappop(heap)
        return None

    def plugin_groups(self) -> list[str]:
        """Every plugin that runs sessions of its own (usable or not)."""
        return [group for group in self._members if group]
