"""A group of new attestations made ready to store: validated, encoded once, their ids
claimed and their commit sequence numbers given. Shared by every backend of the
attestation store, so both store exactly the same records and bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from qntx.asid import new_asid
from qntx.ats.records import validated
from qntx.errors import Conflict, Invalid, QntxError
from qntx.protocol import Attestation, NewAttestation
from qntx.values import now_ms as wall_clock_ms


class Prepared(msgspec.Struct, frozen=True, gc=False):
    """A validated attestation with its id chosen and its one encoding made."""

    record: Attestation
    blob: bytes
    explicit: bool  # the id came with the item (else the store generated it)

    def numbered(self, seq: int, encode) -> Prepared:
        """The record, and its encoding, with its commit sequence number: what decides
        which record is current (``qntx.ats.current``). ``seq`` is the last field of
        the encoding (0 until now), so only its last byte changes."""
        record = msgspec.structs.replace(self.record, seq=seq)
        blob = self.blob
        blob = blob[:-1] + encode(seq) if blob.endswith(SEQ_UNSET) else encode(record)
        return Prepared(record, blob, self.explicit)


SEQ_UNSET = b"\xa3seq\x00"  # how an Attestation's encoding ends while its seq is 0


def prepare_batches(batches, now_ms: int | None, encoder) -> list[list[Prepared] | QntxError]:
    """Each batch prepared, or the ``Invalid`` error of its first bad item."""
    now = wall_clock_ms() if now_ms is None else now_ms
    prepared: list[list[Prepared] | QntxError] = []
    for batch in batches:
        try:
            if not isinstance(batch, list | tuple):
                raise Invalid("a batch must be a list of attestations")
            prepared.append([prepare(item, now, encoder) for item in batch])
        except Invalid as exc:
            prepared.append(exc)
    return prepared


def prepare(item: NewAttestation, now: int, encoder) -> Prepared:
    """Validate, fill defaults, pick an id and encode: all before the write,
    so a bad item fails its batch before anything is written."""
    record = validated(item, now)
    try:  # the one encoding of the record; only attributes can fail it
        blob = encoder.encode(record)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise Invalid(f"attributes cannot be encoded: {exc}") from None
    return Prepared(record, blob, item.id is not None)


def claim_ids(batch: list[Prepared], taken: Callable[[str], bool], encoder) -> list[Prepared]:
    """The batch with every id free: Conflict when an explicit id is taken or repeated;
    a generated id that is taken (or another item's explicit id) is drawn again."""
    explicit = [p.record.id for p in batch if p.explicit]
    unique = frozenset(explicit)
    if len(unique) != len(explicit):
        raise Conflict("a batch repeats an attestation id")
    for id in explicit:
        if taken(id):
            raise Conflict(f"attestation {id} already exists")
    out, generated = [], set()
    for item in batch:
        if not item.explicit:
            record = item.record
            while record.id in unique or record.id in generated or taken(record.id):
                fresh = new_asid(record.subjects[0], record.predicates[0], record.contexts[0])
                record = msgspec.structs.replace(record, id=fresh)
            if record is not item.record:
                item = Prepared(record, encoder.encode(record), False)
            generated.add(record.id)
        out.append(item)
    return out



def claim_and_number(
    prepared: list[list[Prepared] | QntxError], taken: Callable[[str], bool], seq: int, encoder
) -> tuple[list[list[Prepared] | QntxError], list[Prepared]]:
    """Each batch with its ids claimed and its records numbered from ``seq + 1`` on, in
    order, or its error (a bad item, a taken id); and every numbered item. ``taken``
    says whether the store holds an id; ids claimed by earlier batches count too."""
    claimed: set[str] = set()

    def unavailable(id: str) -> bool:
        return id in claimed or taken(id)

    results: list[list[Prepared] | QntxError] = []
    accepted: list[Prepared] = []
    encode = encoder.encode
    for batch in prepared:
        if isinstance(batch, QntxError):
            results.append(batch)
            continue
        try:
            batch = claim_ids(batch, unavailable, encoder)
        except Conflict as exc:
            results.append(exc)
            continue
        numbered = []
        for item in batch:
            seq += 1
            numbered.append(item.numbered(seq, encode))
        claimed.update(item.record.id for item in numbered)
        accepted += numbered
        results.append(numbered)
    return results, accepted
