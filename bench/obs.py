"""What observability costs: the plain loops of ``bin/bench pulse`` with metrics
and tracing on, against the same loops with both off, in one run.

Three buses, started one after the other in throwaway homes, each running the
plain loop of N ``builtin.echo`` jobs and of M jobs of a stored python handler:

* off: ``metrics = ""``, no trace context (the raw figure each ratio is against);
* metrics: ``metrics = "127.0.0.1:0"`` (what ``qntx up`` does by default), and the
  endpoint scraped once a second meanwhile, as Prometheus would;
* tracing: metrics off; every job submitted inside a span of the OpenTelemetry SDK,
  and the actors record every span with the SDK and write it out
  (``QNTX_SPANS_DIR``: a synchronous exporter, so this is the dearer case).

Wall-clock rates on a shared machine swing with other load, so the three take
turns for ``--rounds`` rounds (default 3) and the medians are reported, each round's
figures in the notes. The server's CPU time per echo job is the steadier figure (wall-clock
rates swing with the machine's other load). Target (issue 16): metrics on cost
<= 3% (throughput ratio >= 0.97, server CPU per job ratio <= 1.03).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from bench.actors import Home
from bench.pulse import FULL, HANDLER, QUICK, start_up, throughput
from bench.report import Metric, Report, Target, progress

MODES = ("off", "metrics", "tracing")


def run_mode(mode: str, sizes, spans_dir: str) -> dict[str, float]:
    with Home("qo-") as home:
        (home.path / "config.toml").write_text('metrics = "127.0.0.1:0"\n' if mode == "metrics" else 'metrics = ""\n')
        home.env.pop("QNTX_METRICS", None)
        if mode == "tracing":
            home.env["QNTX_SPANS_DIR"] = spans_dir
        start_up(home)
        stop = threading.Event()
        scraper = None
        if mode == "metrics":
            address = (home.path / "run" / "metrics.address").read_text().strip()
            scraper = threading.Thread(target=_scrape_every_second, args=(f"http://{address}/metrics", stop), daemon=True)
            scraper.start()
        from qntx import connect

        span = _caller_span() if mode == "tracing" else None
        try:
            with connect(home.path) as bus:
                warm = [bus.submit(h, {"n": n}) for h in ("builtin.echo", f"python.{HANDLER}") for n in range(50)]
                for handle in warm:
                    handle.result(timeout=30)
                if span is not None:
                    span.__enter__()
                server = _server_pid(home)
                cpu_before = cpu_ns(server)
                rates = {"echo": throughput(bus, "builtin.echo", sizes.echo_jobs)}
                rates["echo_cpu_us"] = (cpu_ns(server) - cpu_before) / 1e3 / sizes.echo_jobs
                rates["python"] = throughput(bus, f"python.{HANDLER}", sizes.python_jobs)
        finally:
            if span is not None:
                span.__exit__(None, None, None)
            stop.set()
            if scraper is not None:
                scraper.join(5)
        return rates


def cpu_ns(pid: int) -> int:
    """CPU time a process's threads used, in ns (schedstat: finer than clock ticks)."""
    return sum(
        int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()
    )


def _server_pid(home: Home) -> int:
    for line in (home.path / "run" / "actors").read_text().splitlines():
        name, _, pid = line.partition(" ")
        if name == "server":
            return int(pid)
    raise RuntimeError("qntx up runs no server")


def _scrape_every_second(url: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()


def _caller_span():
    from opentelemetry.sdk.trace import TracerProvider

    if not hasattr(_caller_span, "provider"):
        _caller_span.provider = TracerProvider()  # recording, exporting nowhere
    return _caller_span.provider.get_tracer("bench").start_as_current_span("bench loop")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench obs", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three buses (default 3; 1 with --quick)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 3)
    report = Report("obs", args.quick)
    began = time.perf_counter()
    import tempfile

    figures: dict[str, dict[str, list[float]]] = {mode: {"echo": [], "echo_cpu_us": [], "python": []} for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="qo-spans-") as spans_dir:
        for round_no in range(1, rounds + 1):
            for mode in MODES:
                progress(f"round {round_no}/{rounds}: {mode}")
                for key, rate in run_mode(mode, sizes, spans_dir).items():
                    figures[mode][key].append(rate)
        spans = sum(1 for name in os.listdir(spans_dir) for _ in open(os.path.join(spans_dir, name)))
    for key, jobs, handler in (("echo", sizes.echo_jobs, "builtin.echo"), ("python", sizes.python_jobs, f"python.{HANDLER}")):
        off = report.add_raw(f"{key}_off", statistics.median(figures["off"][key]), "/s")
        report.add(Metric(
            f"{key}_metrics_jobs_per_s", f"{handler}: plain loop of {jobs:,}, metrics on (scraped every 1 s)",
            statistics.median(figures["metrics"][key]), "/s", off, f"{key}_off", Target(">=", 0.97),
        ))  # fmt: skip
        report.add(Metric(
            f"{key}_tracing_jobs_per_s", f"{handler}: plain loop of {jobs:,}, every job traced",
            statistics.median(figures["tracing"][key]), "/s", off, f"{key}_off",
        ))  # fmt: skip
        for mode in MODES:
            report.notes.append(f"{key} {mode}, each round: " + ", ".join(f"{r:,.0f}" for r in figures[mode][key]) + " jobs/s")
    cpu_off = report.add_raw("echo_server_cpu_off", statistics.median(figures["off"]["echo_cpu_us"]), "us")
    for mode in ("metrics", "tracing"):
        report.add(Metric(
            f"echo_server_cpu_{mode}", f"server CPU per builtin.echo job of the plain loop, {mode} on",
            statistics.median(figures[mode]["echo_cpu_us"]), "us", cpu_off, "echo_server_cpu_off",
            Target("<=", 1.03) if mode == "metrics" else None,
        ))  # fmt: skip
        report.notes.append(
            f"server CPU per echo job, {mode} / off, each round: "
            + ", ".join(f"{m:.0f}/{o:.0f} us" for m, o in zip(figures[mode]["echo_cpu_us"], figures["off"]["echo_cpu_us"], strict=True))
        )
    report.notes.append(f"spans the actors wrote in the tracing rounds: {spans:,}")
    report.seconds = time.perf_counter() - began
    report.print(args.json)
    return 0
