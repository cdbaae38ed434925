"""Handler ``attest()``: a bulk path for code that attests in a loop.

Owns the job process's writes to ATS. Each ``attest()`` is checked at once (a bad
item raises right there, as it always did) and returns its record; the items are
sent to ATS in batches of up to ``BATCH``, with up to ``WINDOW`` batches in flight,
so a loop of ten thousand attests costs a few dozen round trips and group commits,
not ten thousand of each.

The record ``attest()`` returns is the stored one, filled in when its batch is
acknowledged: reading it (any key, ``print``, iterating, ``json.dumps``...) waits
for that acknowledgement first, so the handler never sees a record the store has
not made durable. The runner waits for every batch before the job ends, so a job
only succeeds once all of its attestations are stored; a batch the store refused
fails the job (and reading one of its records raises the store's error).
"""

from __future__ import annotations

import time
from collections import deque

import msgspec

from qntx.ats.records import validated
from qntx.bus.client import Client
from qntx.bus.codec import raise_if_error
from qntx.errors import QntxError
from qntx.protocol import Attest, Attested, NewAttestation
from qntx.values import now_ms

BATCH = 500  # items per Attest request
WINDOW = 4  # batches sent and not yet acknowledged


class StoredRecord(dict):
    """A record as ATS stored it; empty until its batch is acknowledged, and every
    way of reading it waits for that."""

    __slots__ = ("_writes", "_error")

    def __init__(self, writes: AttestWriter):
        super().__init__()
        self._writes: AttestWriter | None = writes
        self._error: QntxError | None = None  # the store refused its batch

    def _ready(self) -> StoredRecord:
        if self._writes is not None:
            self._writes.wait_for(self)
        if self._error is not None:
            raise self._error
        return self

    def __getitem__(self, key):
        return dict.__getitem__(self._ready(), key)

    def __missing__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return dict.__iter__(self._ready())

    def __len__(self) -> int:
        return dict.__len__(self._ready())

    def __contains__(self, key) -> bool:
        return dict.__contains__(self._ready(), key)

    def __eq__(self, other) -> bool:
        return dict.__eq__(self._ready(), other)

    def __ne__(self, other) -> bool:
        return dict.__ne__(self._ready(), other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return dict.__repr__(self._ready())

    def __reduce__(self):
        return (dict, (dict(self.items()),))

    def get(self, key, default=None):
        return dict.get(self._ready(), key, default)

    def keys(self):
        return dict.keys(self._ready())

    def values(self):
        return dict.values(self._ready())

    def items(self):
        return dict.items(self._ready())

    def copy(self) -> dict:
        return dict(dict.items(self._ready()))


class AttestWriter:
    """The batches of one job process: buffered items, and batches in flight."""

    def __init__(self, client: Client, marks: list | None = None):
        self.client = client
        self.marks = marks  # a traced run's ("attest", sent ns, acknowledged ns, items), else None
        self._buffer: list[tuple[NewAttestation, StoredRecord]] = []
        self._in_flight: deque[tuple[bytes, list[StoredRecord], int]] = deque()
        self._failed: QntxError | None = None

    def attest(self, item: NewAttestation) -> StoredRecord:
        validated(item, now_ms())  # raises Invalid now, for this call
        record = StoredRecord(self)
        self._buffer.append((item, record))
        if len(self._buffer) >= BATCH:
            self._send()
        return record

    def wait_for(self, record: StoredRecord) -> None:
        """Until ``record``'s batch is acknowledged (sending it first if need be)."""
        if any(r is record for _, r in self._buffer):
            self._send()
        while record._writes is not None:
            try:
                self._take_oldest()
            except QntxError:
                if record._writes is None:  # its own batch failed: _ready raises
                    return
                raise

    def flush(self) -> None:
        """Send what is buffered and wait for every batch; raise the first error."""
        try:
            self._send()
        except QntxError:
            pass  # kept in _failed
        while self._in_flight:
            try:
                self._take_oldest()
            except QntxError:
                pass
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def _send(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        records = [record for _, record in batch]
        try:
            correlation = self.client.send(Attest(items=[item for item, _ in batch]))
        except QntxError as exc:  # ATS unreachable: this batch is refused as a whole
            self._refused(records, exc)
            raise
        self._in_flight.append((correlation, records, time.time_ns() if self.marks is not None else 0))
        while len(self._in_flight) > WINDOW:
            self._take_oldest()

    def _take_oldest(self) -> None:
        correlation, records, sent_ns = self._in_flight.popleft()
        try:
            reply = raise_if_error(self.client.take(correlation))
            if not isinstance(reply, Attested) or len(reply.records) != len(records):
                raise QntxError(f"unexpected ATS reply to Attest: {type(reply).__name__}")
        except QntxError as exc:
            self._refused(records, exc)
            raise
        for record, stored in zip(records, reply.records, strict=True):
            dict.update(record, msgspec.to_builtins(stored))
            record._writes = None
        if self.marks is not None:
            self.marks.append(("attest", sent_ns, time.time_ns(), len(records)))

    def _refused(self, records: list[StoredRecord], error: QntxError) -> None:
        self._failed = self._failed or error
        for record in records:
            record._writes, record._error = None, error
