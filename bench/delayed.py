"""``bin/bench delayed``: how late delayed jobs start, with many more waiting.

Starts ``qntx up`` in a throwaway home, parks ``--waiting`` delayed jobs an hour
ahead (they wait in Pulse's store and heaps), then submits ``--due`` jobs due over
the next few seconds and reads from their records how late each started
(``started_at - run_after``, wall ms as Pulse stamps them). The raw limit, measured
in the same run, is how long an immediate job takes from acceptance to its start
when nothing else is queued (``started_at - created_at``): a delayed job cannot
start sooner after its time than a new one after its submit.
"""

from __future__ import annotations

import argparse
import time

from bench.actors import Home
from bench.pulse import start_up
from bench.report import Metric, Report, Target, percentile, progress


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench delayed", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--waiting", type=int, default=None, help="delayed jobs parked an hour ahead (10,000)")
    parser.add_argument("--due", type=int, default=None, help="jobs due over the next seconds, measured (500)")
    args = parser.parse_args(argv)
    waiting = args.waiting if args.waiting is not None else (500 if args.quick else 10_000)
    due = args.due if args.due is not None else (50 if args.quick else 500)
    report = Report("delayed", args.quick)
    began = time.perf_counter()

    with Home("qd-") as home:
        start_up(home)
        from qntx import connect

        with connect(home.path) as bus:
            progress("raw limit: immediate jobs, one at a time")
            immediate = []
            for n in range(max(20, due // 5)):
                job = bus.submit("builtin.echo", n).wait(timeout=30)
                immediate.append(job.started_at - job.created_at)
            immediate.sort()
            limit = max(1.0, percentile(immediate, 50))
            report.add_raw("immediate_start_ms", limit, "ms")

            progress(f"parking {waiting:,} delayed jobs an hour ahead")
            later = int(time.time() * 1000) + 3_600_000
            for n in range(waiting):
                bus.submit("builtin.echo", n, run_at=later + n)
            bus.flush()

            progress(f"{due} jobs due over the next seconds")
            start = int(time.time() * 1000) + 2_000
            handles = [bus.submit("builtin.echo", n, run_at=start + n * 7) for n in range(due)]
            records = [h.wait(timeout=120) for h in handles]
            late = sorted(float(r.started_at - r.run_after) for r in records)
            if late[0] < 0:
                raise AssertionError(f"a delayed job started {-late[0]:g} ms early")
            for name, p, target in (("p50", 50, None), ("p99", 99, 50), ("max", 100, None)):
                report.add(
                    Metric(
                        f"lateness_{name}", f"delayed job start after its time, {name} ({waiting:,} waiting)",
                        percentile(late, p), "ms", limit, "immediate_start_ms",
                        None if target is None else Target("<=", target, on="measured"),
                    )
                )
            counts = bus.status().queue
        report.notes.append(
            f"{counts.get('queued', 0):,} jobs still queued (the parked ones) when measured; "
            "times are Pulse's wall-clock ms stamps, so a figure below 1 ms reads as 0"
        )
    report.seconds = time.perf_counter() - began
    report.print(args.json)
    return 0
