"""What a query asks, checked, and how its pages follow one another: shared by every
backend of the attestation store (``qntx.ats.store`` on LMDB, ``qntx.ats.store_pg`` on
PostgreSQL), so both accept the same filters and the same cursors.

A cursor is the hex of the last record's tail, timestamp and sequence number (8 bytes
each, big-endian): the next page holds the matching records strictly below it in
(timestamp, seq) order, newest first.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from qntx.ats.indexing import LIST_FIELDS, TS_SEQ
from qntx.ats.records import MAX_TIMESTAMP, check_list, check_text
from qntx.errors import Invalid
from qntx.protocol import Attestation, Filter
from qntx.values import is_int

# Values one filter field may OR together: each is a lookup and a cursor per page.
MAX_FILTER_VALUES = 1_000


class Budget(NamedTuple):
    """What one query page may return and do."""

    limit: int
    max_scan: int
    max_seeks: int


def next_page(flt: Filter, cursor: str | None, found: int) -> Filter | None:
    """The filter asking for the page after one that ended at ``cursor``, having
    found ``found`` records in all so far; None when the query is done."""
    if cursor is None or (flt.limit is not None and found >= flt.limit):
        return None
    left = None if flt.limit is None else flt.limit - found
    return msgspec.structs.replace(flt, cursor=cursor, limit=left)


def parse_cursor(cursor: str | None) -> bytes | None:
    if cursor is None:
        return None
    try:
        tail = bytes.fromhex(cursor) if isinstance(cursor, str) else b""
    except ValueError:
        tail = b""
    if len(tail) != TS_SEQ.size:
        raise Invalid(f"not a page cursor: {cursor!r}")
    return tail


def matches(record: Attestation, want: dict[str, set[str]]) -> bool:
    """The field conditions (the time range is already bounded by the index keys)."""
    for field, values in want.items():
        have = [record.source] if field == "source" else getattr(record, field)
        if not any(v.casefold() in values for v in have):
            return False
    return True


def normalise_filter(flt: Filter) -> tuple[dict[str, set[str]], int, int, int | None]:
    """Validate ``flt``; return casefolded wanted values per field, the ms range, the limit."""
    if not isinstance(flt, Filter):
        raise Invalid(f"expected a Filter, got {type(flt).__name__}")
    want: dict[str, set[str]] = {}
    for field in LIST_FIELDS:
        values = check_list(f"filter {field}", getattr(flt, field), default=None)
        if len(values) > MAX_FILTER_VALUES:
            raise Invalid(f"filter {field} has {len(values)} values, more than {MAX_FILTER_VALUES}")
        if values:
            want[field] = {v.casefold() for v in values}
    if flt.source is not None:
        want["source"] = {check_text("filter source", flt.source).casefold()}
    bounds = []
    for name, default in (("time_start", 0), ("time_end", MAX_TIMESTAMP)):
        value = getattr(flt, name)
        if value is not None and not is_int(value):
            raise Invalid(f"filter {name} must be an integer of ms, got {value!r}")
        bounds.append(default if value is None else value)
    lo, hi = max(bounds[0], 0), min(bounds[1], MAX_TIMESTAMP)
    if flt.limit is not None and (not is_int(flt.limit) or flt.limit <= 0):
        raise Invalid(f"limit must be a positive integer, got {flt.limit!r}")
    return want, lo, hi, flt.limit
