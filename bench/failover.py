"""``bin/bench failover``: how long a bus on PostgreSQL is down when its leader is killed.

Two ``qntx up`` on two throwaway homes share one database (``--store URL``, or
``local``: a durable PostgreSQL server of the benchmark's own, the default). One
leads, the other stands by. Each round kills the leader's ``up`` and every actor it
runs with SIGKILL, then submits a ``builtin.echo`` job to the standby's home until
one is accepted and completed there: the failover time is from the kill to that
result. The killed home is started again as the new standby, and the next round
kills the new leader (``--kills`` rounds, 10).

The raw limit, measured in the same run: the lease's TTL (a takeover cannot come
sooner: the standby waits for the lease to expire) plus a cold start (a ``qntx up``
on a database nobody leads, from its start to its first job's result). Target:
every failover within 10 s, as the design asks.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

from bench.actors import Home
from bench.ats_stores import database
from bench.report import Metric, Report, Target, progress

TAKEOVER_TARGET_MS = 10_000.0


def _actor_pids(home: Home) -> list[int]:
    try:
        lines = (home.path / "run" / "actors").read_text().splitlines()
    except OSError:
        return []
    return [int(pid) for _, _, pid in (line.partition(" ") for line in lines) if pid.isdigit()]


def _log(home: Home, popen) -> str:
    index = home.processes.index(popen)
    return (home.path / f"bench-{index}-up.log").read_text(errors="replace")


def _wait_log(home: Home, popen, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in _log(home, popen):
        if popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not seen in {home.path}'s `up` log:\n{_log(home, popen)[-3000:]}")
        time.sleep(0.01)


def _first_result(home: Home, n: int, timeout_s: float = 60.0) -> None:
    """Submit one echo job to ``home``'s server until one is accepted and completed."""
    from qntx import connect
    from qntx.errors import QntxError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with connect(home.path, embedded=False, request_timeout_s=2.0) as bus:
                if bus.submit("builtin.echo", {"n": n}).result(timeout=10) == {"n": n}:
                    return
        except QntxError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _kill(home: Home, popen) -> None:
    for pid in [popen.pid, *_actor_pids(home)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    popen.wait(10)


def _clear_run_dir(home: Home) -> None:
    """What a kill -9 leaves behind (sockets, the actors list), as on a host rebooted."""
    for path in (home.path / "run").glob("*"):
        if path.suffix == ".sock" or path.name == "actors":
            path.unlink(missing_ok=True)


def run(report: Report, url: str, kills: int) -> None:
    from qntx.leader import LEASE_TTL_S

    times: list[float] = []
    with database(url) as store, Home("qf-") as a, Home("qf-") as b:
        for home in (a, b):
            home.env["QNTX_STORE"] = store
        progress("cold start: `qntx up` on a database nobody leads")
        began = time.perf_counter()
        ups = {a: a.start("up", "--workers", "1")}
        _first_result(a, 0)
        cold = time.perf_counter() - began
        ups[b] = b.start("up", "--workers", "1")
        _wait_log(b, ups[b], "standby: ")
        leader, standby = a, b
        for k in range(1, kills + 1):
            _first_result(leader, k)  # the leader serves
            progress(f"kill {k} of {kills}: kill -9 of the leader's `up` and actors")
            killed = time.perf_counter()
            _kill(leader, ups[leader])
            _first_result(standby, 1000 + k)
            times.append(time.perf_counter() - killed)
            _clear_run_dir(leader)
            ups[leader] = leader.start("up", "--workers", "1")  # back as the standby
            _wait_log(leader, ups[leader], "standby: ")
            leader, standby = standby, leader

    limit_ms = report.add_raw("lease TTL + cold start", (LEASE_TTL_S + cold) * 1000, "ms")
    report.add_raw("cold start (up to first result)", cold * 1000, "ms")
    ms = sorted(t * 1000 for t in times)
    report.notes.append("failover per kill: " + ", ".join(f"{t:,.0f} ms" for t in (x * 1000 for x in times)))
    target = Target("<=", TAKEOVER_TARGET_MS, on="measured")
    report.add(Metric("failover_p50_ms", f"failover p50 ({len(ms)} kills)", statistics.median(ms), "ms",
                      limit_ms, "lease TTL + cold start", target))  # fmt: skip
    report.add(Metric("failover_max_ms", f"failover max ({len(ms)} kills)", ms[-1], "ms",
                      limit_ms, "lease TTL + cold start", target))  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench failover", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one kill, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--store", default="local", help="postgresql://... (empty, migrated here) or local (default)")
    parser.add_argument("--kills", type=int, default=None, help="leaders killed (10)")
    args = parser.parse_args(argv)
    kills = args.kills if args.kills is not None else (1 if args.quick else 10)
    if kills < 1:
        parser.error("--kills must be at least 1")
    if args.store == "local":
        from tests.pg import missing

        reason = missing()
        if reason:
            print(f"bench failover: needs PostgreSQL: {reason} (or give --store postgresql://...)", file=sys.stderr)
            return 2
    report = Report("failover", args.quick)
    began = time.perf_counter()
    run(report, args.store, kills)
    report.seconds = time.perf_counter() - began
    report.print(args.json)
    return 0 if all(m.result != "MISS" for m in report.metrics) else 1
