"""Walking the ATS indexes: posting lists read newest first, and their intersection.

An index key is ``value key + NUL + tail`` where the tail (timestamp and sequence
number, 16 bytes big-endian) names one record, so the keys of one value are that
value's posting list, sorted by tail. ``walk_back`` reads one list from the top;
``Intersection`` finds the tails that every one of several lists carries (a query
that ANDs fields) by seek and leapfrog: each list jumps straight to the largest tail
not above the others' current one, so the cost follows how often the lists
interleave, not their length, and no record is read until every list agrees on it.

No decoding and no I/O beyond the cursors given; ``qntx.ats.store`` owns the keys.
"""

from __future__ import annotations

from collections.abc import Iterator

TAIL_BYTES = 16


def walk_back(cursor, low: bytes, high: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(tail, value) for every key in [low, high], highest key first."""
    if cursor.set_range(high):
        if cursor.key() > high and not cursor.prev():
            return
    elif not cursor.last():
        return
    while True:
        key = cursor.key()
        if key < low:
            return
        yield key[-TAIL_BYTES:], cursor.value()
        if not cursor.prev():
            return


def tail_before(tail: bytes) -> bytes | None:
    """The tail just below ``tail``, or None when it is the lowest there is."""
    n = int.from_bytes(tail)
    return (n - 1).to_bytes(TAIL_BYTES) if n else None


def tail_after(tail: bytes) -> bytes:
    """The tail just above ``tail`` (tails hold a timestamp below 2**63: no overflow)."""
    return (int.from_bytes(tail) + 1).to_bytes(TAIL_BYTES)


def _seek_back(cursor, prefix: bytes, low: bytes, pivot: bytes) -> bytes:
    """The largest tail in [low, pivot] under ``prefix``, or b"" when there is none."""
    key = prefix + pivot
    if cursor.set_range(key):
        if cursor.key() != key and not cursor.prev():
            return b""
    elif not cursor.last():
        return b""
    found = cursor.key()
    # A key below prefix + low is of an older record or of another value.
    return found[-TAIL_BYTES:] if found >= prefix + low else b""


class PostingList:
    """One field's posting lists (an OR of its values) as one list to seek in, downwards.

    Each value's cursor remembers where it stands: a seek to a pivot at or above that
    place costs nothing, so a list that is already below the others is not touched.
    """

    def __init__(self, cursors: list, prefixes: list[bytes], low: bytes):
        self._walks = list(zip(cursors, prefixes, strict=True))
        self._at: list[bytes | None] = [None] * len(prefixes)
        self._low = low

    def seek(self, pivot: bytes) -> bytes:
        """The largest tail not above ``pivot`` under any value, or b"" when there is
        none. Pivots must only go down from one call to the next."""
        best = b""
        for i, (cursor, prefix) in enumerate(self._walks):
            at = self._at[i]
            if at is None or at > pivot:
                at = self._at[i] = _seek_back(cursor, prefix, self._low, pivot)
            if at > best:
                best = at
        return best


class Intersection:
    """The tails every one of ``lists`` carries, from ``high`` down, one step at a time.

    ``pivot`` is the highest tail not yet settled (every tail above it is known to be
    a hit or not), None once all are; it is where a query that stops for its work
    budget resumes. ``seeks`` counts the seeks made, for that budget.
    """

    def __init__(self, lists: list[PostingList], high: bytes):
        self._lists = lists
        self.pivot: bytes | None = high
        self.seeks = 0

    def step(self) -> bytes | None:
        """One round of leapfrog: the hit at the top if every list has it (the pivot
        moves below it), else None with the pivot moved down to where a hit may be."""
        assert self.pivot is not None
        first, *others = self._lists
        self.seeks += 1
        top = first.seek(self.pivot)
        if not top:
            self.pivot = None
            return None
        for posting in others:
            self.seeks += 1
            tail = posting.seek(top)
            if not tail:
                self.pivot = None
                return None
            if tail != top:  # nothing in (tail, top] is in every list
                self.pivot = tail
                return None
        self.pivot = tail_before(top)
        return top
