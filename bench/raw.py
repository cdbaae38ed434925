"""Raw limits: what the libraries underneath QNTX do on this machine, right now.

Each function measures one limit with nothing of QNTX in the way, so a benchmark can
print its figure as a fraction of what is physically on offer (SPEC §7):

* ``lmdb_synced_txns_per_s``      durable single-put write transactions (one fsync each)
* ``lmdb_batched_puts_per_s``     puts inside one big write transaction
* ``zmq_sequential_round_trips_per_s`` / ``zmq_pipelined_messages_per_s``
                                  DEALER -> ROUTER echo in another process, over ipc
* ``msgpack_round_trips_per_s``   msgspec encode + decode of a ~200-byte attestation

Stores live in fresh temporary directories under /tmp (the filesystem the benchmark
homes use, so the fsync cost is the same one the ATS pays).
"""

from __future__ import annotations

import multiprocessing
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager

import lmdb
import msgspec
import zmq

from bench.actors import stop_multiprocesses
from qntx.protocol import Attestation

_KEY = struct.Struct(">Q")
VALUE = b"v" * 200  # about one encoded attestation
MAP_SIZE = 1 << 30  # sparse; only what is written takes disk


@contextmanager
def _fresh_env(**options):
    path = tempfile.mkdtemp(prefix="qb-lmdb-", dir="/tmp")
    env = lmdb.open(path, map_size=MAP_SIZE, **options)
    try:
        yield env
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)


def lmdb_synced_txns_per_s(seconds: float = 2.0) -> float:
    """One put per write transaction, synced on commit, as many as fit in ``seconds``."""
    with _fresh_env(sync=True) as env:
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            with env.begin(write=True) as txn:
                txn.put(_KEY.pack(n), VALUE)
            n += 1
        return n / (time.perf_counter() - start)


def lmdb_batched_puts_per_s(puts: int = 200_000, rounds: int = 3) -> float:
    """``puts`` puts and one synced commit; the best of ``rounds`` fresh environments."""
    best = 0.0
    keys = [_KEY.pack(i) for i in range(puts)]  # built outside the clock
    for _ in range(rounds):
        with _fresh_env(sync=True) as env:
            start = time.perf_counter()
            with env.begin(write=True) as txn:
                for key in keys:
                    txn.put(key, VALUE)
            best = max(best, puts / (time.perf_counter() - start))
    return best


def sample_attestation() -> Attestation:
    """A realistic attestation of about 200 bytes encoded."""
    return Attestation(
        id="AS-ALICE-KNOWS-WORK-7F3K2M9Q",
        subjects=["alice"],
        predicates=["knows"],
        contexts=["work"],
        actors=["hr-import"],
        timestamp=1_718_000_000_000,
        source="python",
        attributes={
            "since": 2020,
            "team": "platform",
            "confidence": 0.93,
            "note": "met at the 2020 offsite",
        },
        created_at=1_718_000_000_123,
    )


def msgpack_round_trips_per_s(seconds: float = 1.0) -> float:
    """Encode and decode one typed attestation, as the bus does for every record."""
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Attestation)
    record = sample_attestation()
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(10_000):  # check the clock rarely: it costs as much as a round trip
            decoder.decode(encoder.encode(record))
        n += 10_000
        if time.perf_counter() >= deadline:
            return n / (time.perf_counter() - start)


def encoded_attestation_bytes() -> int:
    return len(msgspec.msgpack.encode(sample_attestation()))


# ---------------------------------------------------------------- pyzmq


def _echo_server(endpoint: str, ready) -> None:
    """Child process: a ROUTER that returns every [identity, correlation, body] as is."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    ready.set()
    while True:  # ends by SIGTERM from the parent
        sock.send_multipart(sock.recv_multipart())


@contextmanager
def echo_server():
    """Start the echo server in a separate process; yields its ipc endpoint."""
    directory = tempfile.mkdtemp(prefix="qb-zmq-", dir="/tmp")
    endpoint = f"ipc://{directory}/echo.sock"
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked zmq state
    ready = spawn.Event()
    process = spawn.Process(target=_echo_server, args=(endpoint, ready), daemon=True)
    try:
        process.start()
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start")
        yield endpoint
    finally:
        stop_multiprocesses([process])
        shutil.rmtree(directory, ignore_errors=True)


def _dealer(endpoint: str) -> tuple[zmq.Context, zmq.Socket]:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A lost reply must fail the measurement, not hang it (see the window note below).
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    sock.send_multipart([b"warm", VALUE])  # the connection exists before the clock starts
    sock.recv_multipart()
    return context, sock


def zmq_sequential_round_trips_per_s(endpoint: str, seconds: float = 1.5) -> float:
    """One request in flight at a time, framed like the bus ([correlation, body])."""
    context, sock = _dealer(endpoint)
    try:
        n = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            sock.send_multipart([_KEY.pack(n), VALUE])
            sock.recv_multipart()
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        context.destroy(linger=0)


def zmq_pipelined_messages_per_s(endpoint: str, seconds: float = 1.5, window: int = 256) -> float:
    """Up to ``window`` requests in flight; replies counted per second.

    The window must stay under the ROUTER's send high-water mark (1,000): past it a
    ROUTER drops replies instead of blocking, and the count would never complete.
    """
    if not 0 < window < 1000:
        raise ValueError("window must be between 1 and 999")
    context, sock = _dealer(endpoint)
    try:
        sent = received = 0
        start = time.perf_counter()
        deadline = start + seconds
        sending = True
        while sending or received < sent:
            while sending and sent - received < window:
                sock.send_multipart([_KEY.pack(sent), VALUE])
                sent += 1
            sock.recv_multipart()
            received += 1
            if sending and received % 1024 == 0 and time.perf_counter() >= deadline:
                sending = False  # drain what is in flight, then stop the clock
        return received / (time.perf_counter() - start)
    finally:
        context.destroy(linger=0)


def measure_all(seconds: float = 1.5, batched_puts: int = 200_000) -> dict[str, float]:
    """Every raw limit, keyed as the benchmark reports print them."""
    out = {
        "lmdb_synced_txn": lmdb_synced_txns_per_s(seconds),
        "lmdb_batched_put": lmdb_batched_puts_per_s(batched_puts),
    }
    with echo_server() as endpoint:
        out["zmq_round_trip"] = zmq_sequential_round_trips_per_s(endpoint, seconds)
        out["zmq_pipelined"] = zmq_pipelined_messages_per_s(endpoint, seconds)
    out["msgpack_round_trip"] = msgpack_round_trips_per_s(min(seconds, 1.0))
    return out


# SPEC §7's figures for a 2-core CI machine: printed beside this run's for context only.
SPEC_REFERENCE = {
    "lmdb_synced_txn": "~4,000/s",
    "lmdb_batched_put": "~1.3 M/s",
    "zmq_round_trip": "~11,000/s",
    "zmq_pipelined": "~170,000/s",
    "msgpack_round_trip": "~1.6 M/s",
}


if __name__ == "__main__":  # `python -m bench.raw`: just the raw limits
    for key, value in measure_all().items():
        print(f"{key:<20} {value:>14,.0f}/s   (SPEC §7 {SPEC_REFERENCE[key]})")
