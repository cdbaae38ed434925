"""``bin/bench swarm``: what a thousand worker sessions cost the server.

Starts ``qntx up`` (ats, server+pulse, 2 workers, the python plugin) in a throwaway
home and measures, with the 2 real workers only and then with ``--sessions`` more
(default 1,000) joined from ONE other process that speaks the worker protocol
(``bench.swarm_sessions``: a DEALER, a jobs PULL and a results PUSH per session, all
served by one epoll loop), so the cost measured is the server's, not a thousand
interpreters'. The sessions join twice: first with credit 0 (joined, heartbeating,
never sent a job: the jobs still run on the same 2 workers, so any difference is
what the sessions cost the server), then with credit 1 each (jobs spread over all of
them: the freest-session choice at work over 1,002 sessions). Measured each time:

1. the plain loop: N pipelined ``builtin.echo`` submits, then every result    judged against the same with 2 workers
   and the server's CPU time per job in it (steadier than a rate on a shared machine)
2. sequential submit -> result, jobs/s                                         the same
3. the server's CPU while idle, in % of one core                               against its own figure with 2 workers
4. ``status`` latency (the reply lists every session)                          against a raw pyzmq round trip

Targets (issue 13): plain loop >= 0.8x of the 2-worker figure; idle server CPU
< 10% of a core with 1,000 sessions; ``status`` p50 < 50 ms. ``--quick`` shrinks
everything (100 sessions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import raw
from bench.actors import REPO, Home, stop_process
from bench.pulse import latencies, throughput
from bench.report import Metric, Report, Target, percentile, progress


@dataclass(frozen=True)
class Sizes:
    raw_seconds: float
    jobs: int
    samples: int
    idle_s: float
    status_samples: int


FULL = Sizes(1.0, 5_000, 400, 10.0, 30)
QUICK = Sizes(0.3, 500, 50, 2.0, 5)


def server_pid(home: Home) -> int:
    lines = (home.path / "run" / "actors").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith("server "))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (every thread)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu_percent(pid: int, seconds: float) -> float:
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - start)


def wait_for_workers(
    home: Home, popen, count: int, prefix: str = "worker", timeout_s: float = 60.0, exactly: bool = False
) -> None:
    """Until the server lists ``count`` healthy sessions whose names start with
    ``prefix`` (``exactly``: that many sessions at all, healthy or not)."""
    from qntx import connect
    from qntx.errors import QntxError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"qntx up exited with {popen.returncode}:\n{home.log_text()}")
        try:
            with connect(home.path, embedded=False, request_timeout_s=1.0) as bus:
                status = bus.status()
            listed = [a for a in status.actors if a.name.startswith(prefix)]
            if exactly and len(listed) == count:
                return
            if not exactly and sum(1 for a in listed if a.healthy) >= count:
                return
        except QntxError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{count} workers did not join within {timeout_s:g}s:\n{home.log_text()}")


def status_latencies_ms(bus, samples: int) -> list[float]:
    values = []
    for _ in range(samples):
        start = time.perf_counter()
        bus.status()
        values.append((time.perf_counter() - start) * 1000)
    return sorted(values)


def sequential_rate(bus, samples: int) -> float:
    """Sequential submit -> result of builtin.echo, jobs/s (from the p50)."""
    return 1e6 / percentile(latencies(bus, "builtin.echo", samples), 50)


class SwarmProcess:
    """``bench.swarm_sessions`` in its own process, its counts read from a file."""

    def __init__(self, home: Home, sessions: int, credit: int):
        self.stats = home.path / "swarm.json"
        self.log = open(home.path / "bench-swarm.log", "wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.swarm_sessions", "--workers", f"ipc://{home.path}/run/workers.sock",
             "--sessions", str(sessions), "--credit", str(credit), "--stats", str(self.stats)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip

    def counts(self) -> dict:
        try:
            return json.loads(self.stats.read_text())
        except (OSError, ValueError):
            return {}

    def wait_ready(self, sessions: int, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"the swarm exited with {self.popen.returncode}")
            counts = self.counts()
            if counts.get("ready", 0) >= sessions:
                return counts
            time.sleep(0.2)
        raise RuntimeError(f"the swarm's sessions were not all ready within {timeout_s:g}s: {self.counts()}")

    def close(self) -> None:
        stop_process(self.popen)
        self.log.close()


def measure(bus, pid: int, sizes: Sizes) -> dict[str, float]:
    progress(f"plain loop: {sizes.jobs} builtin.echo jobs")
    before = cpu_seconds(pid)
    figures = {"plain": throughput(bus, "builtin.echo", sizes.jobs)}
    figures["cpu_per_job"] = 1e6 * (cpu_seconds(pid) - before) / sizes.jobs
    progress(f"sequential: {sizes.samples} builtin.echo jobs")
    figures["sequential"] = sequential_rate(bus, sizes.samples)
    progress(f"status latency, {sizes.status_samples} calls")
    values = status_latencies_ms(bus, sizes.status_samples)
    figures["status_p50"], figures["status_max"] = percentile(values, 50), values[-1]
    progress(f"idle server CPU over {sizes.idle_s:g} s")
    figures["idle_cpu"] = idle_cpu_percent(pid, sizes.idle_s)
    return figures


def mean(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rounds) / len(rounds) for key in rounds[0]}


def with_swarm(home: Home, up, bus, pid: int, sizes: Sizes, sessions: int, credit: int):
    """Join ``sessions`` swarm sessions of ``credit``, measure, and let them go again
    (the server gives them up after 3 heartbeats): (figures, swarm counts, status)."""
    progress(f"joining {sessions:,} swarm sessions of credit {credit}")
    swarm = SwarmProcess(home, sessions, credit)
    try:
        joined_at = time.perf_counter()
        swarm.wait_ready(sessions, timeout_s=120)
        wait_for_workers(home, up, sessions, prefix="swarm-")
        join_s = time.perf_counter() - joined_at
        figures = measure(bus, pid, sizes)
        counts = dict(swarm.counts(), join_s=join_s)
        status = bus.status()
    finally:
        swarm.close()
    wait_for_workers(home, up, 0, prefix="swarm-", exactly=True)
    return figures, counts, status


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench swarm", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=None, help="swarm sessions to join (default 1,000; --quick 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three measurements, averaged")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    sessions = args.sessions if args.sessions is not None else (100 if args.quick else 1_000)
    report = Report("swarm", args.quick)
    began = time.perf_counter()

    progress("raw limit: pyzmq round trips")
    with raw.echo_server() as endpoint:
        rt = report.add_raw(
            "zmq_round_trip", raw.zmq_sequential_round_trips_per_s(endpoint, sizes.raw_seconds), "/s",
            raw.SPEC_REFERENCE["zmq_round_trip"],
        )  # fmt: skip

    with Home("qs-") as home:
        progress("starting qntx up")
        up = home.start("up")
        wait_for_workers(home, up, 2)
        pid = server_pid(home)
        from qntx import connect

        with connect(home.path) as bus:
            for handle in [bus.submit("builtin.echo", {"n": n}) for n in range(200)]:
                handle.result(timeout=30)  # connected, subscribed, warm
            # Rounds of (2 workers, credit 0, credit 1), averaged: the machine is shared
            # and its load drifts; every figure sees the same drift.
            rounds = [[], [], []]
            for n in range(args.rounds):
                progress(f"round {n + 1} of {args.rounds}")
                rounds[0].append(measure(bus, pid, sizes))
                figures, idle_counts, _ = with_swarm(home, up, bus, pid, sizes, sessions, credit=0)
                rounds[1].append(figures)
                figures, counts, status = with_swarm(home, up, bus, pid, sizes, sessions, credit=1)
                rounds[2].append(figures)
            two, idle, many = (mean(r) for r in rounds)

        for key, label, target in (
            ("plain", "builtin.echo: plain loop, {jobs:,} jobs", Target(">=", 0.8)),
            ("sequential", "builtin.echo: sequential submit->result", None),
        ):
            limit = report.add_raw(f"{key}_2_workers", two[key], "/s", "this run, 2 workers")
            for figures, how, suffix in ((idle, "credit 0", "_idle"), (many, "credit 1", "")):
                report.add(
                    Metric(
                        f"{key}_{sessions}_sessions{suffix}",
                        f"{label.format(jobs=sizes.jobs)}, +{sessions:,} sessions of {how}",
                        figures[key], "/s", limit, f"{key}_2_workers", target,
                    )
                )  # fmt: skip
        cpu_two = report.add_raw("cpu_per_job_2_workers", two["cpu_per_job"], "us", "this run, 2 workers")
        for figures, how, suffix in ((idle, "credit 0", "_idle"), (many, "credit 1", "")):
            report.add(
                Metric(
                    f"cpu_per_job_{sessions}_sessions{suffix}", f"server CPU per plain-loop job, +{sessions:,} sessions of {how}",
                    figures["cpu_per_job"], "us", cpu_two, "cpu_per_job_2_workers", Target("<=", 1.25),
                )
            )  # fmt: skip
        idle_two = report.add_raw("idle_cpu_2_workers", two["idle_cpu"], "%", "this run, 2 workers")
        report.add(
            Metric(
                f"idle_cpu_{sessions}_sessions", f"server CPU while idle with {sessions:,} sessions", many["idle_cpu"],
                "%", idle_two, "idle_cpu_2_workers", Target("<=", 10, on="measured"),
            )
        )  # fmt: skip
        rt_ms = 1e3 / rt
        report.add(
            Metric(
                f"status_p50_{sessions}_sessions", f"status p50 with {sessions:,} sessions", many["status_p50"], "ms",
                rt_ms, "zmq_round_trip", Target("<=", 50, on="measured"),
            )
        )  # fmt: skip
        report.add(
            Metric(
                f"status_max_{sessions}_sessions", f"status max of {sizes.status_samples} with {sessions:,} sessions",
                many["status_max"], "ms", rt_ms, "zmq_round_trip",
            )
        )  # fmt: skip
        report.notes.append(
            f"{sessions:,} sessions joined and ready in {counts['join_s']:.1f} s from one process "
            f"(swarm CPU {counts.get('cpu_s', 0):.1f} s in all; with credit 1, {counts.get('jobs', 0):,} jobs ran "
            f"on swarm sessions, with credit 0 {idle_counts.get('jobs', 0)}); the server had room for "
            f"{'?' if status.sessions_free is None else format(status.sessions_free, ',')} more"
        )
        report.notes.append(
            f"with {sessions:,} sessions of credit 0: idle server CPU {idle['idle_cpu']:.1f} %, "
            f"status p50 {idle['status_p50']:.1f} ms"
        )
        report.notes.append(
            f"with 2 workers: status p50 {two['status_p50']:.1f} ms; every session heartbeats once a second; "
            f"each figure is the mean of {args.rounds} rounds (2 workers, credit 0, credit 1 in turn)"
        )
    report.seconds = time.perf_counter() - began
    report.print(args.json)
    return 0
