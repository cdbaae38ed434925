"""``bin/bench soak``: many jobs through one long-running bus; memory and disk stay bounded.

Starts ``qntx up`` with a short retention (completed jobs kept 2 s, pruned every
second in the background), pushes ``--jobs`` ``builtin.echo`` jobs through it in
rounds (a plain loop of submits, then every result) with an attestation per 100
jobs, and prints the server's RSS and the size of each ``data.mdb`` at the start,
after a fifth of the jobs and at the end. The limit each end figure is judged against
is its own value after a fifth of the jobs, measured in the same run: bounded
means the end stays near it (what the store holds is set by the rate times the
retention, not by how many jobs went through), not growing with the job count.
"""

from __future__ import annotations

import argparse
import time

from bench.actors import Home
from bench.pulse import rss_kb, start_up
from bench.report import Metric, Report, Target, progress

ROUND = 10_000


def sizes(home: Home) -> tuple[int, int, int]:
    """(server RSS kB, pulse data.mdb kB, ats data.mdb kB)."""
    actors = (home.path / "run" / "actors").read_text().splitlines()
    pid = next(int(line.split()[1]) for line in actors if line.startswith("server "))
    pulse = (home.path / "pulse" / "data.mdb").stat().st_size // 1024
    ats = (home.path / "ats" / "data.mdb").stat().st_size // 1024
    return rss_kb(pid), pulse, ats


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=None, help="jobs in all (500,000)")
    args = parser.parse_args(argv)
    total = args.jobs if args.jobs is not None else (30_000 if args.quick else 500_000)
    rounds = max(2, total // ROUND)
    report = Report("soak", args.quick)
    began = time.perf_counter()

    with Home("qs-") as home:
        (home.path / "config.toml").write_text("keep_completed_s = 2.0\nprune_every_s = 1.0\n")
        progress("completed jobs kept 2 s, pruned every second")
        start_up(home)
        from qntx import connect

        start = sizes(home)
        first, first_at = None, 0
        done = 0
        with connect(home.path) as bus:
            for r in range(rounds):
                handles = [bus.submit("builtin.echo", n) for n in range(ROUND)]
                for n, handle in enumerate(handles):
                    if handle.result(timeout=300) != n:
                        raise AssertionError(f"job {handle.id} returned the wrong result")
                bus.attest_many(
                    {"subjects": [f"soak-{r}-{i}"], "predicates": ["ran"], "contexts": ["soak"]} for i in range(ROUND // 100)
                )
                done += ROUND
                if first is None and done >= total // 5:
                    first = sizes(home)  # warmed up: what the store holds at a steady rate
                    first_at = done
                if r % 10 == 0 or r == rounds - 1:
                    rss, pulse, ats = sizes(home)
                    progress(f"{done:,} jobs: server RSS {rss:,} kB, pulse data.mdb {pulse:,} kB, ats data.mdb {ats:,} kB")
            time.sleep(3)
            end = sizes(home)
            counts = bus.status().queue
    report.seconds = time.perf_counter() - began
    for index, (key, label) in enumerate(
        (("server_rss_kb", "server RSS"), ("pulse_mdb_kb", "pulse data.mdb"), ("ats_mdb_kb", "ats data.mdb"))
    ):
        report.add_raw(f"{key}_after_a_fifth", first[index], "kB")
        report.notes.append(f"{label}: {start[index]:,} kB at the start, {first[index]:,} kB after {first_at:,} jobs, {end[index]:,} kB after {done:,}")
        target = None if key == "ats_mdb_kb" else Target("<=", 1.5)  # attestations are kept: ATS grows by design
        report.add(
            Metric(key, f"{label} after {done:,} jobs", end[index], "kB", first[index], f"{key}_after_a_fifth", target)
        )
    report.notes.append(
        f"jobs left in the store: {counts.get('completed', 0):,} completed (the rest pruned); "
        f"{done // 100:,} attestations stored and kept"
    )
    report.print(args.json)
    return 0
