"""Queries of the LMDB attestation store: the planner and the walks of its indexes.

Queries walk one index backwards (the one the counts say is smallest) instead of
scanning records, so cost follows the number of candidates, not the store size. A
query that ANDs fields intersects their posting lists (``qntx.ats.postings``) and
reads only the records that every field carries. Records the journal holds and the
indexes not yet (their index write failed) are merged into each page.

A mixin of ``qntx.ats.store.AttestationStore``, which owns the environment and the
sub-databases these methods read.
"""

from __future__ import annotations

import heapq

from qntx.ats.filters import (
    MAX_FILTER_VALUES,
    Budget,
    matches,
    normalise_filter,
    parse_cursor,
)
from qntx.ats.indexing import PAIR, TS_SEQ, U64, count_key, pair_key, stored_seq, value_key
from qntx.ats.postings import Intersection, PostingList, tail_after, tail_before, walk_back
from qntx.protocol import MAX_PAGE, Attestation, Filter

# Records one query request may read (matching or not), and index seeks it may make,
# before it answers with what it found and a cursor: bounded work per request (a few
# milliseconds of the actor's loop), whatever the filter.
MAX_SCAN = 2_000
MAX_SEEKS = 8_000
# A field with more values than this is checked on the records the other fields
# found rather than joined in the intersection (each seek in it seeks every value).
MAX_JOINED_VALUES = 16
_MIN_SEQ, _MAX_SEQ = b"\x00" * 8, b"\xff" * 8


class LmdbQueries:
    """``query_page`` over the store's indexes (``query`` pages through it)."""

    def query_page(
        self, flt: Filter, *, page: int = MAX_PAGE, max_scan: int = MAX_SCAN,
        max_seeks: int = MAX_SEEKS,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """One page of ``query``: at most ``page`` records, ``max_scan`` records read
        and ``max_seeks`` index seeks, so no request holds the actor for long; the
        cursor of the next page, or None when there is no more."""
        want, lo, hi, limit = normalise_filter(flt)
        start = parse_cursor(flt.cursor)
        self.last_query_scanned, self.last_query_plan = 0, []
        if lo > hi:
            return [], None
        limit = page if limit is None else min(limit, page)
        budget = Budget(limit, max_scan, max_seeks)
        self._page_tails: list[bytes] = []  # beside each record found, its ts + seq
        def work(txn):
            self._page_indexed = stored_seq(self, txn)  # what the overlay must not repeat
            return self._run_query(txn, want, lo, hi, start, budget)

        records, cursor = self._env.read(work)
        if self._logged:  # only when the index writes fail (a full disk): readers wait otherwise
            return self._with_logged(records, cursor, want, lo, hi, start, limit)
        return records, cursor

    def _with_logged(
        self, records: list[Attestation], cursor: str | None, want: dict[str, set[str]],
        lo: int, hi: int, start: bytes | None, limit: int,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """The page with the journaled records that match and fall in its range of
        ts + seq (the indexes do not hold them yet), in order, cut to ``limit``."""
        floor = bytes.fromhex(cursor) if cursor is not None else None
        found = list(zip(self._page_tails, records, strict=True))
        for entry in list(self._logged):
            for seq, item in enumerate(entry.items, entry.first_seq):
                if seq <= self._page_indexed:  # an index write committed before the page's read
                    continue
                record = item.record
                tail = TS_SEQ.pack(record.timestamp, seq)
                in_page = (start is None or tail < start) and (floor is None or tail > floor)
                if in_page and lo <= record.timestamp <= hi and matches(record, want):
                    found.append((tail, record))
        found.sort(key=lambda pair: pair[0], reverse=True)
        if len(found) > limit:
            found = found[:limit]
            cursor = found[-1][0].hex()
        return [record for _, record in found], cursor

    def _run_query(
        self, txn, want: dict[str, set[str]], lo: int, hi: int, start: bytes | None, budget: Budget
    ) -> tuple[list[Attestation], str | None]:
        low, high = U64.pack(lo) + _MIN_SEQ, U64.pack(hi) + _MAX_SEQ
        if start is not None:
            high = min(high, start)  # resume below the previous page's last record
        if want:
            plan = self._plan(txn, want)
            self.last_query_plan = [field for field, _ in plan]
            if not plan:
                return [], None
            if len(plan) > 1:
                return self._intersect(txn, want, plan, low, high, start, budget)
            field, vkeys = plan[0]
            walks = [
                walk_back(
                    txn.cursor(self._index[field]), vkey + b"\x00" + low, vkey + b"\x00" + high
                )
                for vkey in vkeys
            ]
            # Each walk yields (ts+seq, id) newest first; merging keeps that order.
            candidates = walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=True)
        else:
            candidates = walk_back(txn.cursor(self._time), low, high)
        out: list[Attestation] = []
        previous = start
        for tail, id in candidates:
            if tail == previous:  # the same record through two OR values, or the cursor's
                continue
            previous = tail
            self._read_candidate(txn, id, tail, want, out)
            if len(out) >= budget.limit or self.last_query_scanned >= budget.max_scan:
                return out, tail.hex()  # the page is full, or its work is done
        return out, None

    def _intersect(
        self, txn, want: dict[str, set[str]], plan: list[tuple[str, list[bytes]]],
        low: bytes, high: bytes, start: bytes | None, budget: Budget,
    ) -> tuple[list[Attestation], str | None]:  # fmt: skip
        """The query's records through the intersection of the planned fields' posting
        lists: only records every one of them carries are read."""
        if start is not None:  # the cursor's own record was on the previous page
            high = tail_before(start)
            if high is None:
                return [], None
        lists = [
            PostingList(
                [txn.cursor(self._index[field]) for _ in vkeys], [k + b"\x00" for k in vkeys], low
            )
            for field, vkeys in plan
        ]
        join = Intersection(lists, high)
        out: list[Attestation] = []
        while join.pivot is not None:
            if join.seeks >= budget.max_seeks or self.last_query_scanned >= budget.max_scan:
                # Its work is done: the next page starts at the first unsettled tail.
                return out, tail_after(join.pivot).hex()
            tail = join.step()
            if tail is None:
                continue
            self._read_candidate(txn, txn.get(tail, db=self._time), tail, want, out)
            if len(out) >= budget.limit:
                return out, tail.hex()
        return out, None

    def _read_candidate(self, txn, id: bytes, tail: bytes, want: dict[str, set[str]], out: list) -> None:
        """Decode one candidate and keep it when it matches: index keys may be cut short
        and a field may be left out of the intersection, so the record has the word."""
        self.last_query_scanned += 1
        record = self._decoder.decode(txn.get(id, db=self._records))
        if matches(record, want):
            out.append(record)
            self._page_tails.append(tail)

    def _plan(self, txn, want: dict[str, set[str]]) -> list[tuple[str, list[bytes]]]:
        """The fields to walk, each with its value keys, the one carried by the fewest
        attestations first: that one alone, or with every other field of few enough
        values to join in an intersection. Empty when a field matches no attestation.
        Subjects and predicates asked together walk their pair index instead."""
        ranked: list[tuple[int, str, list[bytes]]] = []
        fields = dict.fromkeys(want)
        subjects, predicates = want.get("subjects"), want.get("predicates")
        if self._pairs and subjects and predicates and len(subjects) * len(predicates) <= MAX_FILTER_VALUES:
            fields = {f: None for f in want if f not in ("subjects", "predicates")}
            fields[PAIR] = {pair_key(value_key(s), value_key(p)) for s in subjects for p in predicates}
        for field, pair_keys in fields.items():
            vkeys = sorted(pair_keys) if pair_keys is not None else sorted({value_key(v) for v in want[field]})
            counts = [txn.get(count_key(field, k), db=self._counts) for k in vkeys]
            total = sum(U64.unpack(c)[0] for c in counts if c)
            if total == 0:
                return []
            ranked.append((total, field, vkeys))
        ranked.sort()
        first, rest = ranked[0], ranked[1:]
        joined = [r for r in rest if len(r[2]) <= MAX_JOINED_VALUES]
        return [(field, vkeys) for _, field, vkeys in (first, *joined)]

