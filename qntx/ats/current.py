"""Which attestation is current: the one the store committed last.

"Current" (the handler version that runs, the limit or schedule in force) follows the
store's commit order (``Attestation.seq``), never the ``timestamp`` a client claimed:
a record attested with a timestamp a year ahead is still replaced by the next one
stored. Records stored before ``seq`` was kept carry 0; among those the newest
timestamp wins, as the store's query order gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from qntx.protocol import Attestation

K = TypeVar("K", bound=Hashable)


def latest_per(records: Iterable[Attestation], keys: Callable[[Attestation], Iterable[K]]) -> dict[K, Attestation]:
    """For each key, the record stored last among ``records`` that carry it.

    ``records`` come newest ``timestamp`` first (as every query returns them), which
    only breaks ties between records without a ``seq``.
    """
    latest: dict[K, Attestation] = {}
    for record in records:
        for key in keys(record):
            held = latest.get(key)
            if held is None or record.seq > held.seq:
                latest[key] = record
    return latest


def latest(records: Iterable[Attestation]) -> Attestation | None:
    """The record stored last, if any (``records`` newest timestamp first)."""
    found = None
    for record in records:
        if found is None or record.seq > found.seq:
            found = record
    return found


def stored_last_first(records: Iterable[Attestation]) -> list[Attestation]:
    """``records`` (newest timestamp first) in the order the store wrote them, last first."""
    return sorted(records, key=lambda record: record.seq, reverse=True)  # stable: ties keep timestamp order
