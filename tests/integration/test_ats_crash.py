"""kill -9 of the ATS actor at random instants while 8 writers attest.

Every attestation a writer saw acknowledged must be stored exactly once, and the
indexes must agree with the records entry for entry (a full scan): the journal
is replayed on open, and no record is ever half indexed, acknowledged or not.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
from collections import Counter
from pathlib import Path

import lmdb
import msgspec
import pytest

from qntx.ats.indexing import PAIR_SEP, VALUE_KEY_BYTES
from qntx.ats.store import AttestationStore
from qntx.bus.client import Client
from qntx.errors import QntxError
from qntx.protocol import AtsReply, Attest, Attestation, Attested, NewAttestation
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(240)

WRITERS = 8
ROUNDS = int(os.environ.get("QNTX_CRASH_ROUNDS", "6"))
SEED = int(os.environ.get("QNTX_CRASH_SEED", str(random.randrange(1 << 30))))
FIELDS = ("subjects", "predicates", "contexts", "actors")


class Writer(threading.Thread):
    """Attests batches of 1-20 (writer k, item n) records, each n once; keeps what
    came back acknowledged. A request that fails (the actor died) is not retried."""

    def __init__(self, endpoint: str, index: int, rng: random.Random):
        super().__init__(daemon=True)
        self.endpoint, self.index, self.rng = endpoint, index, rng
        self.acknowledged: dict[str, tuple[int, int]] = {}  # id -> (writer, n)
        self.sent = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.endpoint, AtsReply, timeout_s=2.0) as client:
                while not self.halt.is_set():
                    size = self.rng.randint(1, 20)
                    items = [self.item(self.sent + k) for k in range(size)]
                    self.sent += size
                    try:
                        reply = client.request(Attest(items=items))
                    except QntxError:
                        continue  # the actor is down; these may or may not be stored
                    assert isinstance(reply, Attested), reply
                    for record in reply.records:
                        self.acknowledged[record.id] = (self.index, record.attributes["n"])
        except BaseException as exc:  # reported by the test
            self.error = exc

    def item(self, n: int) -> NewAttestation:
        return NewAttestation(
            subjects=[f"w{self.index}", f"item{n % 7}"] if n % 3 == 0 else [f"W{self.index}"],
            predicates=["wrote"],
            contexts=[f"c{n % 5}"],
            actors=[f"writer-{self.index}"],
            attributes={"writer": self.index, "n": n},
        )


def acknowledged_count(writers: list[Writer]) -> int:
    return sum(len(w.acknowledged) for w in writers)


def test_kill_9_at_random_instants_loses_nothing_acknowledged_and_leaves_no_half_index(bus):
    rng = random.Random(SEED)
    print(f"crash test seed {SEED} ({ROUNDS} rounds)")
    process = bus.start_ats()
    writers = [Writer(bus.settings.ats_endpoint, k, random.Random(rng.random())) for k in range(WRITERS)]
    for writer in writers:
        writer.start()
    try:
        for _ in range(ROUNDS):
            # A random instant: after a random number of further acknowledgements.
            target = acknowledged_count(writers) + rng.randint(1, 400)
            wait_for(lambda t=target: acknowledged_count(writers) >= t, timeout=60, what="acknowledgements")
            process.stop(signal.SIGKILL)
            process = bus.start_ats()
        target = acknowledged_count(writers) + 50
        wait_for(lambda: acknowledged_count(writers) >= target, timeout=60, what="writes after the last restart")
    finally:
        for writer in writers:
            writer.halt.set()
        for writer in writers:
            writer.join(30)
    process.stop(signal.SIGKILL)  # the last one too: the check below replays the journal
    assert all(w.error is None for w in writers), [w.error for w in writers if w.error]

    path = Path(bus.settings.ats_path)
    with AttestationStore(path) as store:  # opening replays the journal
        count = store.count()
    records = check_indexes(path)
    assert len(records) == count
    acknowledged = {id: item for w in writers for id, item in w.acknowledged.items()}
    missing = set(acknowledged) - set(records)
    assert not missing, f"{len(missing)} acknowledged attestations lost, e.g. {sorted(missing)[:3]}"
    stored_items = Counter((r.attributes["writer"], r.attributes["n"]) for r in records.values())
    assert all(n == 1 for n in stored_items.values()), "an attestation is stored twice"
    assert all(stored_items[item] == 1 for item in acknowledged.values())


def check_indexes(path: Path) -> dict[str, Attestation]:
    """Every record with exactly its index entries and counts, and no entry without
    its record (a full scan of the LMDB environment); returns the records by id."""
    decoder = msgspec.msgpack.Decoder(Attestation)
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=32, subdir=True)
    try:
        with env.begin() as txn:
            def items(name: str) -> list[tuple[bytes, bytes]]:
                return list(txn.cursor(env.open_db(name.encode(), txn=txn)))

            records = {k.decode(): decoder.decode(v) for k, v in items("records")}
            tails: dict[str, bytes] = {}
            for tail, id in items("time"):
                assert id.decode() not in tails, f"{id} has two time entries"
                tails[id.decode()] = tail
            assert set(tails) == set(records), "time index and records disagree"
            seq = struct.unpack(">Q", dict(items("meta"))[b"seq"])[0]
            seqs = sorted(struct.unpack(">QQ", t)[1] for t in tails.values())
            assert seqs == list(range(1, len(records) + 1)) and seq == len(records), "sequence numbers skip or repeat"

            def key(value: str) -> bytes:
                return value.casefold().encode()[:VALUE_KEY_BYTES]

            expected: dict[str, set[tuple[bytes, bytes]]] = {f: set() for f in (*FIELDS, "source", "subject_predicate")}
            for id, record in records.items():
                tail, raw_id = tails[id], id.encode()
                for field in FIELDS:
                    for vkey in {key(v) for v in getattr(record, field)}:
                        expected[field].add((vkey + b"\x00" + tail, raw_id))
                expected["source"].add((key(record.source) + b"\x00" + tail, raw_id))
                for s in record.subjects:
                    for p in record.predicates:
                        pair = (key(s) + PAIR_SEP + key(p))[:VALUE_KEY_BYTES]
                        expected["subject_predicate"].add((pair + b"\x00" + tail, raw_id))
            counts = {k: struct.unpack(">Q", v)[0] for k, v in items("counts")}
            for field, want in expected.items():
                have = items(field)
                assert len(have) == len(set(have)) and set(have) == want, f"{field} index disagrees with the records"
                per_value = Counter(k[:-17] for k, _ in have)  # value key, NUL, 16-byte tail
                for vkey, n in per_value.items():
                    assert counts.get(field.encode() + b":" + vkey) == n, f"{field} count of {vkey!r}"
                stored = {k: n for k, n in counts.items() if k.startswith(field.encode() + b":") and n}
                assert len(stored) == len(per_value), f"{field} counts for values with no entries"
    finally:
        env.close()
    return records
