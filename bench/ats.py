"""``bin/bench ats``: the attestation store through the bus, against its raw limits.

Starts a real ATS actor (``python -m qntx --home H ats``) in a throwaway home and
measures, each beside the raw limit from ``bench.raw`` measured in the same run:

1. durable attestations/s from one sequential client   vs synced LMDB txns/s  (>= 0.6x)
2. the same from 8 client processes, sequential (>= 3x) and
   with a window of 8 requests in flight each           vs synced LMDB txns/s
3. ``attest_many`` in batches of 1,000, until indexed   >= 100,000/s (batched puts beside it)
4. handler code attesting 10,000 records in one job     >= 50,000/s (through ``qntx up``)
5. query p50/p99 over 200,000 stored attestations       vs bus ping p50/p99    (<= 3x)
6. ``qntx handler create`` wall time (embedded store)   vs interpreter start   (<= 300 ms)

Stages 1-3 share one actor; stage 4 runs a whole ``qntx up``; stage 5 gets a fresh
ATS so its store holds only the realistic mix; stage 6 runs the CLI against a home
with no actor (``bin/bench cli`` times the everyday commands). Every process is
stopped in a ``finally``. ``--quick`` shrinks everything for a smoke test.
``--and`` runs instead the AND-of-two-broad-fields query at a million attestations
(``bench.ats_and``); ``--store URL`` the store on PostgreSQL beside LMDB
(``bench.ats_stores``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from bench import raw
from bench.actors import REPO, Home, stop_multiprocesses
from bench.probe import StageProbe
from bench.report import Metric, Report, Target, percentile, progress

# A small valid handler, for the handler attestations and `qntx handler create`.
HANDLER_CODE = "def run(args):\n    return {'echo': args}\n"


@dataclass(frozen=True)
class Sizes:
    raw_seconds: float  # each raw rate measurement
    batched_puts: int  # puts in the raw batched transaction
    write_seconds: float  # each write-throughput stage
    clients: int
    window: int  # requests in flight per client in the windowed variant
    batch: int  # attest_many batch size
    stored: int  # attestations in the store the queries run against
    load_batch: int  # attest_many batch size used to load them
    samples: int  # timed calls per query kind (and for ping)
    cli_runs: int  # timed `qntx handler create` runs (after one warm-up)
    handler_attests: int  # attest() calls in the handler job


FULL = Sizes(1.5, 200_000, 3.0, 8, 8, 1_000, 200_000, 10_000, 1_500, 5, 10_000)
QUICK = Sizes(0.3, 20_000, 0.5, 8, 8, 1_000, 3_000, 1_000, 100, 2, 2_000)

PUTS_PER_ATTESTATION = 8  # record + time + one index entry per field (4 lists + source) + pair


# ---------------------------------------------------------------- helpers


def fact(i: int):
    """The i-th small attestation of the write stages (~200 bytes on the wire)."""
    from qntx.api import new_attestation

    return new_attestation(
        f"user-{i % 997}", "knows", "work", actors="bench", attributes={"i": i, "w": 0.5}
    )


# ---------------------------------------------------------------- client processes


def _client_process(
    home: str, mode: str, seconds: float, window: int, barrier, results, index: int
) -> None:
    """One writer: sequential ``bus.attest`` calls, or windows of ``window`` pipelined."""
    from qntx import connect
    from qntx.bus.client import Client
    from qntx.protocol import AtsReply, Attest, Attested

    try:
        with connect(home, embedded=False) as bus:
            bus.ping()  # connected before the clock starts
            client = Client(bus.settings.ats_endpoint, AtsReply)
            client.request(Attest(items=[fact(0)]))
            barrier.wait(60)
            n, cpu0 = 0, time.process_time()
            start = time.time()  # wall clock: comparable across processes
            deadline = start + seconds
            while time.time() < deadline:
                if mode == "sequential":
                    bus.attest(
                        f"user-{n % 997}",
                        "knows",
                        "work",
                        actors=f"client-{index}",
                        attributes={"i": n},
                    )
                    n += 1
                else:
                    replies = client.request_many(
                        [Attest(items=[fact(n + k)]) for k in range(window)]
                    )
                    if not all(isinstance(r, Attested) for r in replies):
                        raise RuntimeError(f"a pipelined attest failed: {replies}")
                    n += window
            end, cpu = time.time(), time.process_time() - cpu0
            client.close()
        results.put((index, n, start, end, cpu, None))
    except BaseException as exc:  # reported, not lost with the process
        barrier.abort()  # the others (and the parent) stop waiting for this one
        results.put((index, 0, 0.0, 0.0, 0.0, f"{type(exc).__name__}: {exc}"))


def concurrent_writes(home: Home, mode: str, sizes: Sizes, probe: StageProbe) -> tuple[float, str]:
    """Attestations/s from ``sizes.clients`` client processes, and the probe's note."""
    spawn = multiprocessing.get_context("spawn")  # no forked zmq contexts
    barrier = spawn.Barrier(sizes.clients + 1)  # + this process, to start the probe with them
    results = spawn.Queue()
    processes = [
        spawn.Process(
            target=_client_process,
            args=(str(home.path), mode, sizes.write_seconds, sizes.window, barrier, results, i),
            daemon=True,
        )
        for i in range(sizes.clients)
    ]
    try:
        for p in processes:
            p.start()
        try:
            barrier.wait(90)
        except threading.BrokenBarrierError:
            pass  # a client failed before its start; every client reports an outcome anyway
        before = probe.snapshot()
        outcomes = [results.get(timeout=60 + sizes.write_seconds) for _ in processes]
        after = probe.snapshot()
    finally:
        stop_multiprocesses(processes)
    errors = [error for *_, error in outcomes if error]
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    total = sum(n for _, n, *_ in outcomes)
    elapsed = max(o[3] for o in outcomes) - min(o[2] for o in outcomes)
    client_cpu = sum(o[4] for o in outcomes)
    # The clients share the cores with the actor, so their CPU per write bounds the total too.
    note = probe.note(f"{sizes.clients} clients {mode}", before, after, total)
    note += f"; clients {client_cpu / max(total, 1) * 1e6:.0f} us CPU per attestation"
    return total / elapsed, note


# ---------------------------------------------------------------- stages


def write_stages(report: Report, sizes: Sizes) -> None:
    """Stages 1-3 against one ATS actor."""
    with Home() as home:
        ats = home.start_ats()
        probe = StageProbe(ats.pid, home.path / "ats")
        try:
            single_client(report, sizes, home, probe)
            for mode in ("sequential", "window"):
                concurrent_clients(report, sizes, home, probe, mode)
            batches(report, sizes, home, probe)
        finally:
            probe.close()


def synced_now(report: Report, sizes: Sizes, stage: str) -> float:
    """The raw synced-transaction rate right before a write stage: the disk is shared,
    and its rate can change within a run, so each stage is judged by its own."""
    rate = raw.lmdb_synced_txns_per_s(sizes.raw_seconds)
    report.notes.append(f"raw synced txns/s just before {stage}: {rate:,.0f}")
    return rate


def single_client(report: Report, sizes: Sizes, home: Home, probe: StageProbe) -> None:
    from qntx import connect

    synced = synced_now(report, sizes, "1 client")
    progress("1 client, sequential bus.attest")
    with connect(home.path, embedded=False) as bus:
        bus.attest("warm", "up")
        n, before = 0, probe.snapshot()
        while time.perf_counter() - before.wall < sizes.write_seconds:
            bus.attest(f"user-{n % 997}", "knows", "work", actors="bench", attributes={"i": n})
            n += 1
        after = probe.snapshot()
    report.notes.append(probe.note("1 client", before, after, n))
    rate = n / (after.wall - before.wall)
    report.add(
        Metric("attest_1_client", "attest, 1 client (durable)", rate, "/s", synced, "synced txn", Target(">=", 0.6))
    )  # fmt: skip


def concurrent_clients(
    report: Report, sizes: Sizes, home: Home, probe: StageProbe, mode: str
) -> None:
    synced = synced_now(report, sizes, f"{sizes.clients} clients {mode}")
    progress(f"{sizes.clients} client processes, {mode}")
    rate, note = concurrent_writes(home, mode, sizes, probe)
    report.notes.append(note)
    if mode == "sequential":
        key, label = "attest_8_clients", f"attest, {sizes.clients} clients sequential"
        report.notes.append(
            f"{sizes.clients} strictly sequential clients can put at most {sizes.clients} writes in one "
            f"fsync; with Python clients on 2 cores about 3x the synced rate is the CPU's limit."
        )
        target = Target(">=", 3)
    else:
        key = f"attest_8_clients_window_{sizes.window}"
        label = f"attest, {sizes.clients} clients x window {sizes.window}"
        target = None
    report.add(Metric(key, label, rate, "/s", synced, "synced txn", target))


def batches(report: Report, sizes: Sizes, home: Home, probe: StageProbe) -> None:
    from qntx import connect

    progress(f"attest_many, batches of {sizes.batch}")
    # Built outside the clock: this measures the bus and the store, not Struct building.
    prebuilt = [[fact(b * sizes.batch + i) for i in range(sizes.batch)] for b in range(20)]
    with connect(home.path, embedded=False) as bus:
        bus.attest_many(prebuilt[0])
        n, before = 0, probe.snapshot()
        while time.perf_counter() - before.wall < sizes.write_seconds:
            bus.attest_many(prebuilt[(n // sizes.batch) % len(prebuilt)])
            n += sizes.batch
        bus.stats()  # a read waits for the indexes: the clock stops once they hold every record
        after = probe.snapshot()
    report.notes.append(probe.note("attest_many", before, after, n))
    report.notes.append(
        f"each attestation is {PUTS_PER_ATTESTATION} LMDB puts (record, time, subjects, predicates, "
        f"contexts, actors, source, subject+predicate) plus count updates, written behind the "
        f"journal; attest_many's clock runs until they are all written, so it tops out near "
        f"1/{PUTS_PER_ATTESTATION} = {1 / PUTS_PER_ATTESTATION:.2f}x batched puts even before "
        "validation, encoding and the reply."
    )
    rate, limit = n / (after.wall - before.wall), report.raw["lmdb_batched_put"]
    label = f"attest_many, batches of {sizes.batch}"
    target = Target(">=", 100_000, on="measured")
    report.add(Metric("attest_many_1000", label, rate, "/s", limit, "batched put", target))


def realistic_mix(n: int, seed: int = 7):
    """``n`` attestations shaped like a real store, and how many are python handlers.

    A long tail of subjects, a few dominant predicates, team/project contexts,
    timestamps over a year, and a handful of ``[name] handler python`` records
    scattered through (the selective query looks for those).
    """
    from qntx.protocol import NewAttestation
    from qntx.stored_handlers import handler_attestation

    rng = random.Random(seed)
    predicates = ["knows", "works_at", "member_of", "likes", "follows", "authored", "reviewed",
                  "mentions", "owns", "located_in", "reports_to", "uses", "depends_on", "tagged"]  # fmt: skip
    weights = [30, 12, 10, 9, 8, 6, 5, 5, 4, 3, 3, 2, 2, 1]
    contexts = (
        ["work", "home", "github", "slack"]
        + [f"team-{k}" for k in range(60)]
        + [f"project-{k}" for k in range(140)]
    )
    actors = [f"importer-{k}" for k in range(40)]
    now_ms = time.time_ns() // 1_000_000
    year_ms = 365 * 24 * 3600 * 1000
    handlers = max(5, min(12, n // 200))
    handler_at = set(rng.sample(range(n), handlers))
    items = []
    for i in range(n):
        if i in handler_at:
            items.append(handler_attestation(f"handler_{i}", HANDLER_CODE, source="bench"))
            continue
        subjects = [f"person-{int(rng.paretovariate(1.2)) % 50_000}"]
        if rng.random() < 0.1:
            subjects.append(f"person-{rng.randrange(50_000)}")
        items.append(NewAttestation(
            subjects=subjects,
            predicates=rng.choices(predicates, weights)[:1],
            contexts=[rng.choice(contexts)],
            actors=[rng.choice(actors)],
            timestamp=now_ms - rng.randrange(year_ms),
            source=rng.choice(("python", "import", "qntx-cli")),
            attributes={"weight": round(rng.random(), 3)} if rng.random() < 0.5 else {},
        ))  # fmt: skip
    return items, handlers


def timed(call, samples: int) -> list[float]:
    """Sorted wall times of ``samples`` calls, in microseconds."""
    out = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        call()
        out.append((time.perf_counter_ns() - start) / 1000)
    return sorted(out)


def load_for_queries(bus, sizes: Sizes, items, handlers: int):
    """Load ``items`` in batches; the seconds it took, and the selective and broad
    queries, each checked once against what was loaded."""
    progress(f"loading {sizes.stored:,} attestations")
    start = time.perf_counter()
    for i in range(0, len(items), sizes.load_batch):
        bus.attest_many(items[i : i + sizes.load_batch])
    load_s = time.perf_counter() - start
    if bus.stats().attestations != sizes.stored:
        raise RuntimeError("the store does not hold what was loaded")
    selective = lambda: bus.query(predicates=["handler"], contexts=["python"])  # noqa: E731
    broad = lambda: bus.query(predicates=["knows"], limit=10)  # noqa: E731
    if len(selective()) != handlers or len(broad()) != 10:
        raise RuntimeError("the queries did not return what was loaded")
    return load_s, selective, broad


def query_stage(report: Report, sizes: Sizes) -> None:
    """Stage 4: query latency over a loaded store, beside a ping to the same actor."""
    from qntx import connect

    items, handlers = realistic_mix(sizes.stored)
    with Home() as home:
        home.start_ats()
        with connect(home.path, embedded=False, request_timeout_s=60.0) as bus:
            load_s, selective, broad = load_for_queries(bus, sizes, items, handlers)
            report.notes.append(
                f"loaded {sizes.stored:,} attestations with attest_many({sizes.load_batch:,}) in "
                f"{load_s:.1f} s ({sizes.stored / load_s:,.0f}/s)"
            )
            progress(f"{sizes.samples} pings and queries of each kind")
            for call in (bus.ping, selective, broad):
                timed(call, max(20, sizes.samples // 20))  # warm: page cache, code paths
            # Interleaved rounds, so a noisy second hurts all three kinds alike.
            times: dict[str, list[float]] = {"ping": [], "selective": [], "broad": []}
            rounds = 10
            for _ in range(rounds):
                for name, call in (("ping", bus.ping), ("selective", selective), ("broad", broad)):
                    times[name] += timed(call, sizes.samples // rounds)
    for values in times.values():
        values.sort()
    ping50 = report.add_raw("bus_ping_p50", percentile(times["ping"], 50), "us", "-")
    ping99 = report.add_raw("bus_ping_p99", percentile(times["ping"], 99), "us", "-")
    for name, label in (
        ("selective", f"query handler/python ({handlers} hits)"),
        ("broad", "query knows, limit 10"),
    ):
        for p, limit, limit_key in ((50, ping50, "ping p50"), (99, ping99, "ping p99")):
            report.add(Metric(
                f"query_{name}_p{p}", f"{label} p{p}", percentile(times[name], p), "us", limit, limit_key, Target("<=", 3),
            ))  # fmt: skip


ATTESTING_HANDLER = "bench_attest"
ATTESTING_CODE = (
    "n = int(args[0])\n"
    "for i in range(n):\n"
    "    attest([f'h{i % 997}'], ['made'], ['bench'], attributes={'i': i})\n"
    "_result = n\n"
)


def handler_stage(report: Report, sizes: Sizes) -> None:
    """Stage 6: handler code attesting ``sizes.handler_attests`` records in one job,
    through ``qntx up`` (the python plugin's job process and its batched attest())."""
    from qntx import connect
    from qntx.errors import QntxError

    with Home() as home:
        created = home.run_cli("handler", "create", ATTESTING_HANDLER, "--code", ATTESTING_CODE)
        if created.returncode != 0:
            raise RuntimeError(created.stderr)
        progress("starting qntx up")
        popen = home.start("up")
        deadline = time.monotonic() + 60
        with connect(home.path, embedded=False, request_timeout_s=60.0) as bus:
            while f"python.{ATTESTING_HANDLER}" not in _handlers(bus, QntxError):
                if popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qntx up did not serve the handler:\n{home.log_text()}")
                time.sleep(0.1)
            bus.submit(f"python.{ATTESTING_HANDLER}", {"args": ["100"]}).result(timeout=60)  # warm
            progress(f"a handler attesting {sizes.handler_attests:,} records in one job")
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                done = bus.submit(f"python.{ATTESTING_HANDLER}", {"args": [str(sizes.handler_attests)]}).result(timeout=120)
                bus.stats()  # and indexed
                runs.append(time.perf_counter() - start)
                if done != sizes.handler_attests:
                    raise RuntimeError(f"the handler returned {done!r}")
            expected = 1 + 100 + 3 * sizes.handler_attests  # the handler itself, the warm-up, the runs
            if bus.stats().attestations != expected:
                raise RuntimeError(f"the store holds {bus.stats().attestations}, not {expected}")
    rate = sizes.handler_attests / statistics.median(runs)
    report.notes.append(
        f"handler job: {sizes.handler_attests:,} attest() calls, job submit to result, median of 3: "
        f"{statistics.median(runs) * 1000:.0f} ms"
    )
    label = f"handler attesting {sizes.handler_attests:,} in one job"
    target = Target(">=", 50_000, on="measured")
    report.add(Metric("handler_attests", label, rate, "/s", report.raw["lmdb_synced_txn"], "synced txn", target))


def _handlers(bus, errors) -> list[str]:
    try:
        return bus.status().handlers
    except errors:
        return []


def cli_stage(report: Report, sizes: Sizes) -> None:
    """Stage 5: ``bin/qntx handler create`` in embedded mode (no actor), median wall time."""
    qntx = str(REPO / "bin" / "qntx")

    def wall_ms(argv: list[str], env: dict[str, str]) -> float:
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        elapsed = (time.perf_counter() - start) * 1000
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:4])}... failed ({done.returncode}): {done.stderr.strip()}"
            )
        return elapsed

    with Home() as home:  # no actor started here: the CLI opens the store itself
        progress(f"qntx handler create x {sizes.cli_runs + 1}")
        runs = []
        for i in range(sizes.cli_runs + 1):  # the first creates the store and warms the page cache
            create = ["handler", "create", f"bench_{i}", "--code", HANDLER_CODE]
            runs.append(wall_ms([qntx, "--home", str(home.path), *create], home.env))
        # The floor no CLI can beat: starting the same interpreter to do nothing.
        startup = [wall_ms([sys.executable, "-c", "pass"], home.env) for _ in runs]
    median = statistics.median(runs[1:])
    floor = report.add_raw("python_startup", statistics.median(startup[1:]), "ms", "-")
    label, target = "qntx handler create (embedded)", Target("<=", 300, on="measured")
    report.add(Metric("handler_create", label, median, "ms", floor, "python -c pass", target))


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bin/bench ats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 when every measurement ran (targets missed or not), 1 on an error.",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, short runs: a smoke test"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document, not the table"
    )
    parser.add_argument(
        "--and", dest="and_query", action="store_true",
        help="only the query that ANDs two broad fields, at 1,000,000 attestations",
    )  # fmt: skip
    parser.add_argument(
        "--store", metavar="URL",
        help="instead: PostgreSQL at URL (an empty database; `local`: a server of its own) beside LMDB",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    report = Report("ats", args.quick)
    start = time.perf_counter()
    if args.and_query:
        from bench import ats_and

        ats_and.run(report, args.quick)
        report.seconds = time.perf_counter() - start
        report.print(args.json)
        return 0
    if args.store:
        from bench import ats_stores

        ats_stores.run(report, sizes, args.store)
        report.seconds = time.perf_counter() - start
        report.print(args.json)
        return 0
    progress("raw limits: LMDB, pyzmq, msgspec")
    for key, value in raw.measure_all(sizes.raw_seconds, sizes.batched_puts).items():
        report.add_raw(key, value, "/s", raw.SPEC_REFERENCE[key])
    write_stages(report, sizes)
    handler_stage(report, sizes)
    query_stage(report, sizes)
    cli_stage(report, sizes)
    report.seconds = time.perf_counter() - start
    report.print(args.json)
    return 0
