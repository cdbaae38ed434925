"""``bin/bench results``: what other people's results cost a client and the server.

Starts ``qntx up`` with a short retention, then:

* a *watcher* process submits one long job and waits for its result (WaitJob
  long-polls on its own connection) the whole time;
* a *stalled subscriber* connects a SUB to the events socket, subscribes to
  everything, reads one notice and is stopped with SIGSTOP;
* another client pushes ``--jobs`` ``builtin.echo`` jobs with 40 KB results through
  the bus, in rounds of 1,000.

It prints the watcher's RSS growth (target: under +20 MB) and the server's RSS
growth (RssAnon: its own memory, without the pages of the LMDB file it maps),
both against their own values after a fifth of the jobs (steady state) (the limit, measured
in the same run: bounded means not growing with the jobs of others), and the
server's growth against the stalled subscriber's budget (+50 MB).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from bench.actors import REPO, Home
from bench.pulse import rss_kb, start_up
from bench.report import Metric, Report, Target, progress


def anon_kb(pid: int) -> int:
    """The process's own resident memory, without the pages of the files it maps (the
    LMDB store, which grows with what it holds and which the kernel may drop)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError(f"no RssAnon for pid {pid}")


ROUND = 1_000
BLOB = "x" * 40_000

WATCHER = """
import sys, qntx
bus = qntx.connect()
handle = bus.submit("builtin.sleep", 3600, max_attempts=1)
handle.accepted()
print("waiting", flush=True)
try:
    handle.wait(timeout=3600)
except qntx.errors.QntxError:
    pass
"""
SUBSCRIBER = """
import zmq, qntx.settings
sub = zmq.Context.instance().socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(qntx.settings.load_settings().events_endpoint)
sub.recv_multipart()
print("subscribed", flush=True)
while True:
    sub.recv_multipart()
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench results", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=None, help="jobs of 40 KB results in all (100,000)")
    args = parser.parse_args(argv)
    total = args.jobs if args.jobs is not None else (4_000 if args.quick else 100_000)
    report = Report("results", args.quick)

    with Home("qr-") as home:
        (home.path / "config.toml").write_text("keep_completed_s = 2.0\nprune_every_s = 1.0\n")
        start_up(home)
        from qntx import connect

        env = dict(home.env)
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        subscriber = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        try:
            with connect(home.path) as bus:
                server = next(a.pid for a in bus.status().actors if a.name == "server")
                if watcher.stdout.readline().strip() != "waiting":
                    raise RuntimeError("the watcher did not start")
                bus.submit("builtin.echo", 1).result(timeout=30)
                if subscriber.stdout.readline().strip() != "subscribed":
                    raise RuntimeError("the subscriber did not start")
                os.kill(subscriber.pid, signal.SIGSTOP)
                progress(f"{total:,} jobs of 40 KB results; a watcher waits, a subscriber is stopped")
                first: tuple[int, int] | None = None
                started = time.perf_counter()
                for done in range(0, total, ROUND):
                    handles = [bus.submit("builtin.echo", BLOB) for _ in range(min(ROUND, total - done))]
                    for handle in handles:
                        if len(handle.result(timeout=300)) != len(BLOB):
                            raise AssertionError(f"job {handle.id} returned the wrong result")
                    if first is None and done + ROUND >= total // 5:  # steady state: a fifth of the jobs
                        first = (rss_kb(watcher.pid), anon_kb(server))
                elapsed = time.perf_counter() - started
                end = (rss_kb(watcher.pid), anon_kb(server))
        finally:
            for process in (watcher, subscriber):
                try:
                    os.kill(process.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                process.kill()
                process.wait(10)

    assert first is not None
    report.seconds = elapsed
    report.add_raw("watcher_rss_first_kb", first[0], "kB", "after a fifth of the jobs")
    report.add_raw("server_rss_first_kb", first[1], "kB", "after a fifth of the jobs")
    report.add_raw("none", 1.0, "")
    report.metrics.append(
        Metric(
            "watcher_rss_kb", f"watcher RSS after {total:,} others' jobs (growth <= 20 MB)", end[0], "kB",
            first[0], "watcher_rss_first_kb", Target("<=", first[0] + 20_000, on="measured"),
        )  # fmt: skip
    )
    report.metrics.append(
        Metric(
            "server_rss_anon_kb", "server RssAnon, a subscriber stopped all along (growth <= 50 MB)", end[1], "kB",
            first[1], "server_rss_first_kb", Target("<=", first[1] + 50_000, on="measured"),
        )  # fmt: skip
    )
    report.metrics.append(Metric("jobs_per_s", "jobs of 40 KB results", total / elapsed, "/s", 1.0, "none"))
    report.print(args.json)
    return 0
