"""Free credit, indexed: which ready worker session has the most free slots.

Pulse sends each job to the ready session with the most free slots (PROTOCOL §6.3),
among the sessions of one group: plain workers (group ``""``) or the sessions a
plugin runs for its own jobs (group = the plugin's name). A scan of every session
per job made dispatch cost grow with the number of sessions; this index keeps, per
group, its usable sessions' entries ``(-free, order, session)`` (``order`` is the
join order, so equal free credit goes to the session that joined first, as a scan
in join order would choose) and, once a group has more than SMALL of them, a heap
of those entries: ``best`` is then O(log n). A small group (the usual two or four
workers) is answered by one ``min`` over its few entries, cheaper than any heap.

The core calls ``set`` after every change to a session's credit, slots or
readiness, and ``remove`` when it ends. Heaps delete lazily: an entry counts only
while it matches the session's live entry, and a heap mostly made of dead entries
is rebuilt.
"""

from __future__ import annotations

import heapq

SMALL = 16  # groups of at most this many usable sessions are scanned, not heaped


class _Group:
    __slots__ = ("usable", "heap", "members")

    def __init__(self) -> None:
        self.usable: dict[bytes, tuple[int, int, bytes]] = {}  # session -> its entry
        self.heap: list[tuple[int, int, bytes]] | None = None  # only past SMALL usable
        self.members = 0  # sessions in the group, usable or not


class FreeCredit:
    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self._group: dict[bytes, str] = {}  # every session -> its group

    def set(self, session: bytes, group: str, order: int, free: int, usable: bool) -> None:
        """The session's state now; ``usable``: ready to take a job (connected, free > 0)."""
        old_group = self._group.get(session)
        if old_group != group:
            if old_group is not None:
                self._leave(session, old_group)
            self._group[session] = group
            if group not in self._groups:
                self._groups[group] = _Group()
            self._groups[group].members += 1
        entries = self._groups[group]
        if not usable:
            entries.usable.pop(session, None)
            return
        entry = (-free, order, session)
        usable_now = entries.usable
        if usable_now.get(session) == entry:
            return
        usable_now[session] = entry
        heap = entries.heap
        if heap is not None:
            heapq.heappush(heap, entry)
            if len(heap) > 2 * len(usable_now) + 64:  # mostly dead entries: rebuild
                entries.heap = None
        elif len(usable_now) > SMALL:
            entries.heap = None  # built at the next best()

    def remove(self, session: bytes) -> None:
        group = self._group.pop(session, None)
        if group is not None:
            self._leave(session, group)

    def _leave(self, session: bytes, group: str) -> None:
        entries = self._groups[group]
        entries.usable.pop(session, None)
        entries.members -= 1
        if not entries.members:
            del self._groups[group]

    def best(self, group: str) -> bytes | None:
        """The usable session of ``group`` with the most free slots (the first to join
        among equals); None if it has none."""
        entries = self._groups.get(group)
        if entries is None or not entries.usable:
            return None
        usable = entries.usable
        if len(usable) <= SMALL:
            entries.heap = None
            return min(usable.values())[2]
        heap = entries.heap
        if heap is None:
            heap = entries.heap = list(usable.values())
            heapq.heapify(heap)
        while heap:
            entry = heap[0]
            if usable.get(entry[2]) == entry:
                return entry[2]
            heapq.heappop(heap)
        return None

    def plugin_groups(self) -> list[str]:
        """Every plugin that runs sessions of its own (usable or not)."""
        return [group for group in self._groups if group]
