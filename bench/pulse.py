"""``bin/bench pulse``: jobs end to end through a real ``qntx up``, against raw pyzmq.

Starts ``qntx up`` (ats, server+pulse, 2 workers, the python plugin) in a
throwaway home and measures, each beside a raw limit measured in the same run:

1. throughput of N ``builtin.echo`` jobs (submit all, wait for all)   vs pipelined ROUTER/DEALER msgs/s
2. throughput of M jobs of a stored python handler                   vs the same
3. sequential submit -> result latency p50/p99 for each               vs a raw pyzmq round trip

Targets (issue): echo >= 5,000 jobs/s with p50 <= 1 ms; python >= 2,000 jobs/s.
Every job is durable: accepted only after a synced commit, and its completion is
committed before its result is published. ``--quick`` shrinks everything.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from bench import raw
from bench.actors import Home
from bench.report import Metric, Report, Target, percentile, progress

HANDLER = "bench"
HANDLER_CODE = "_result = upstream['n'] if isinstance(upstream, dict) else upstream\n"


@dataclass(frozen=True)
class Sizes:
    raw_seconds: float
    echo_jobs: int
    python_jobs: int
    samples: int


FULL = Sizes(1.5, 5_000, 1_000, 400)
QUICK = Sizes(0.3, 500, 100, 40)


def wait_until_up(home: Home, popen, timeout_s: float = 60.0) -> None:
    from qntx import connect
    from qntx.errors import QntxError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"qntx up exited with {popen.returncode}:\n{home.log_text()}")
        try:
            with connect(home.path, embedded=False, request_timeout_s=1.0) as bus:
                status = bus.status()
            workers = [a for a in status.actors if a.name.startswith("worker")]
            if f"python.{HANDLER}" in status.handlers and len(workers) >= 2:
                return
        except QntxError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"qntx up was not ready within {timeout_s:g}s:\n{home.log_text()}")


def throughput(bus, handler: str, jobs: int) -> float:
    """Submit ``jobs`` at once (pipelined), wait for every result; jobs/s over the whole."""
    payloads = [{"n": n} for n in range(jobs)]
    start = time.perf_counter()
    handles = [bus.submit(handler, payload) for payload in payloads]
    for n, handle in enumerate(handles):
        result = handle.result(timeout=120)
        if result != n and result != {"n": n}:
            raise AssertionError(f"job {handle.id} returned {result!r}, expected {n}")
    return jobs / (time.perf_counter() - start)


def latencies(bus, handler: str, samples: int) -> list[float]:
    """Sequential submit -> result, in microseconds, sorted."""
    for n in range(20):  # warm the path (connections, compiled handler, caches)
        bus.submit(handler, {"n": n}).result(timeout=30)
    values = []
    for n in range(samples):
        start = time.perf_counter()
        bus.submit(handler, {"n": n}).result(timeout=30)
        values.append((time.perf_counter() - start) * 1e6)
    return sorted(values)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench pulse", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    report = Report("pulse", args.quick)
    began = time.perf_counter()

    progress("raw limits: pyzmq round trips and pipelined messages, synced LMDB txns")
    with raw.echo_server() as endpoint:
        rt = report.add_raw(
            "zmq_round_trip", raw.zmq_sequential_round_trips_per_s(endpoint, sizes.raw_seconds), "/s",
            raw.SPEC_REFERENCE["zmq_round_trip"],
        )
        pipelined = report.add_raw(
            "zmq_pipelined", raw.zmq_pipelined_messages_per_s(endpoint, sizes.raw_seconds), "/s",
            raw.SPEC_REFERENCE["zmq_pipelined"],
        )
    report.add_raw(
        "lmdb_synced_txn", raw.lmdb_synced_txns_per_s(sizes.raw_seconds), "/s", raw.SPEC_REFERENCE["lmdb_synced_txn"]
    )
    rt_us = 1e6 / rt

    with Home("qp-") as home:
        created = home.run_cli("handler", "create", HANDLER, "--code", HANDLER_CODE)
        if created.returncode != 0:
            raise RuntimeError(created.stderr)
        progress("starting qntx up")
        up = home.start("up")
        wait_until_up(home, up)
        from qntx import connect

        with connect(home.path) as bus:
            for handler, jobs, key, target in (
                ("builtin.echo", sizes.echo_jobs, "echo", 5_000),
                (f"python.{HANDLER}", sizes.python_jobs, "python", 2_000),
            ):
                progress(f"{jobs} {handler} jobs")
                rate = throughput(bus, handler, jobs)
                report.add(
                    Metric(
                        f"{key}_jobs_per_s", f"{handler}: {jobs:,} jobs end to end", rate, "/s",
                        pipelined, "zmq_pipelined", Target(">=", target, on="measured"),
                    )
                )
            for handler, key, p50_target in (("builtin.echo", "echo", 1000), (f"python.{HANDLER}", "python", None)):
                progress(f"sequential latency, {handler}")
                values = latencies(bus, handler, sizes.samples)
                for name, p in (("p50", 50), ("p99", 99)):
                    target = Target("<=", p50_target, on="measured") if name == "p50" and p50_target else None
                    report.add(
                        Metric(
                            f"{key}_latency_{name}", f"{handler}: submit->result {name}", percentile(values, p), "us",
                            rt_us, "zmq_round_trip", target,
                        )
                    )
            counts = bus.status().queue
        report.notes.append(
            f"jobs completed in this run: {counts.get('completed', 0):,}; failed: {counts.get('failed', 0)}; "
            "every one committed (synced) on submit and on completion"
        )
        report.notes.append(
            "throughput ratios are against raw pipelined pyzmq messages/s between two processes; "
            "a job costs at least 4 messages and 2 synced commits (shared by all jobs of a loop turn)"
        )
    report.seconds = time.perf_counter() - began
    report.print(args.json)
    return 0
