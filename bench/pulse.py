"""``bin/bench pulse``: jobs end to end through a real ``qntx up``, against raw pyzmq.

Starts ``qntx up`` (ats, server+pulse, 2 workers, the python plugin) in a
throwaway home and measures, each beside a raw limit measured in the same run:

1. a plain loop of N ``builtin.echo`` submits, then every result       vs pipelined ROUTER/DEALER msgs/s
2. the same written with asyncio (``gather`` of submits, then results)  vs the same
3. a plain loop of M jobs of a stored python handler                   vs the same
4. sequential submit -> result latency p50/p99 for each                 vs a raw pyzmq round trip
5. the server's RSS around one 10 MB payload (nested empty arrays)      vs the payload (<= 2x)

Targets (issue 6): plain loop echo >= 7,000 jobs/s; python >= 3,500 jobs/s;
sequential p50 <= 0.8 ms.

``--tcp`` (issue 8) then starts a second ``qntx up`` whose every endpoint is
tcp+CURVE on loopback (its workers, its python plugin and this client all connect
with keys, through the ZAP handler) and measures the two plain loops again, judged
against the ipc figures of the same run: target >= 0.75x. Every job is durable: accepted only after a synced
commit; a completion may reach its followers before its own commit syncs (a crash
then re-runs the job). ``--quick`` shrinks everything.

``--store URL`` (issue 18) runs only the plain loops, on LMDB and with the stores
on PostgreSQL in turn (``bench.pulse_stores``).
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


def start_up(home: Home) -> None:
    """Store the benchmark's handler, start ``qntx up`` and wait until it serves it."""
    created = home.run_cli("handler", "create", HANDLER, "--code", HANDLER_CODE)
    if created.returncode != 0:
        raise RuntimeError(created.stderr)
    progress("starting qntx up")
    wait_until_up(home, home.start("up"))


def throughput(bus, handler: str, jobs: int) -> float:
    """The way users write it: a plain loop of submits, then every result; jobs/s."""
    start = time.perf_counter()
    handles = [bus.submit(handler, {"n": n}) for n in range(jobs)]
    for n, handle in enumerate(handles):
        check(handle.id, handle.result(timeout=120), n)
    return jobs / (time.perf_counter() - start)


def check(job_id: str, result, n: int) -> None:
    if result != n and result != {"n": n}:
        raise AssertionError(f"job {job_id} returned {result!r}, expected {n}")


def asyncio_throughput(home: Home, handler: str, jobs: int) -> float:
    """The asyncio form: gather the submits, then gather the results; jobs/s."""
    import asyncio

    import qntx.aio

    async def run() -> float:
        async with await qntx.aio.connect(home.path) as bus:
            await (await bus.submit(handler, {"n": -1})).result(timeout=30)  # connected, subscribed
            start = time.perf_counter()
            handles = await asyncio.gather(*(bus.submit(handler, {"n": n}) for n in range(jobs)))
            results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
            elapsed = time.perf_counter() - start
            for n, (handle, result) in enumerate(zip(handles, results, strict=True)):
                check(handle.id, result, n)
            return jobs / elapsed

    return asyncio.run(run())


BIG_PAYLOAD_BYTES = 10_000_005  # ten million empty arrays, one byte each, in one array


def rss_kb(pid: int, kind: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{kind}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {kind} for pid {pid}")


def big_payload_rss(home: Home, bus) -> tuple[int, int, int, int]:
    """The server's RSS (kB) before, at its peak during, and 1 s after one 10 MB
    ``builtin.echo`` payload of nested empty arrays (carried raw, never decoded), and
    the peak growth of its own memory (RssAnon: without the job store's mapped pages).
    The client waits the way clients do (WaitJob: the outcome without the payload).
    A thread samples every half millisecond: a copy lives a few milliseconds, and
    sampling every 20 ms read 2x where the peak was 3x."""
    import threading

    import msgspec

    from qntx.protocol import Submit, WaitJob

    pid = next(int(line.split()[1]) for line in (home.path / "run" / "actors").read_text().splitlines() if line.startswith("server "))
    before, anon_before = rss_kb(pid), rss_kb(pid, "RssAnon")
    peaks = [before, anon_before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[0], peaks[1] = max(peaks[0], rss_kb(pid)), max(peaks[1], rss_kb(pid, "RssAnon"))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        payload = msgspec.Raw(msgspec.msgpack.encode([[]] * 10_000_000))
        assert len(payload) == BIG_PAYLOAD_BYTES
        bus.server.request(Submit(handler="builtin.echo", payload=payload, id="JB-BENCH---22222222"), timeout_s=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if bus.server.request(WaitJob(id="JB-BENCH---22222222", timeout_ms=20), timeout_s=30).job.status == "completed":
                break
        time.sleep(1)  # what the end left (the result's pages, freed buffers) counts too
    finally:
        done.set()
        sampler.join()
    return before, peaks[0], rss_kb(pid), peaks[1] - anon_before


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


def tcp_config(first_port: int) -> str:
    from qntx.settings import tcp_endpoints

    endpoints = tcp_endpoints(f"tcp://127.0.0.1:{first_port}")
    return "".join(f'{name} = "{endpoint}"\n' for name, endpoint in endpoints.items())


def free_port_run(count: int = 6) -> int:
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def tcp_figures(report: Report, sizes: Sizes, ipc_rates: dict[str, float]) -> None:
    """The plain loops again on a bus whose every socket is tcp+CURVE; ratio to ipc."""
    with Home("qt-") as home:
        (home.path / "config.toml").write_text(tcp_config(free_port_run()))
        done = home.run_cli("keys")
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        progress("starting qntx up with every endpoint on tcp+CURVE")
        up = home.start("up")
        deadline = time.monotonic() + 60
        # Over tcp the handler is stored through the running bus (no embedded store).
        while home.run_cli("handler", "create", HANDLER, "--code", HANDLER_CODE).returncode != 0:
            if time.monotonic() > deadline or up.poll() is not None:
                raise RuntimeError(f"could not store the handler:\n{home.log_text()}")
            time.sleep(0.2)
        wait_until_up(home, up)
        from qntx import connect

        with connect(home.path) as bus:
            warm = [bus.submit(h, {"n": n}) for h in ("builtin.echo", f"python.{HANDLER}") for n in range(50)]
            for handle in warm:
                handle.result(timeout=30)
            for handler, jobs, key in (
                ("builtin.echo", sizes.echo_jobs, "echo"),
                (f"python.{HANDLER}", sizes.python_jobs, "python"),
            ):
                progress(f"tcp+CURVE plain loop: {jobs} {handler} jobs")
                rate = throughput(bus, handler, jobs)
                limit = report.add_raw(f"ipc_{key}_jobs_per_s", ipc_rates[key], "/s", "this run, over ipc")
                report.add(
                    Metric(
                        f"{key}_tcp_jobs_per_s", f"{handler}: plain loop over tcp+CURVE, {jobs:,} jobs", rate, "/s",
                        limit, f"ipc_{key}_jobs_per_s", Target(">=", 0.75),
                    )
                )
    report.notes.append(
        "tcp+CURVE: every actor, worker, the python plugin's session and this client connect over loopback tcp "
        "with CURVE keys checked by the ZAP handler; the ratio is to the ipc figure of this run"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench pulse", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tcp", action="store_true", help="also the plain loops over tcp+CURVE, against ipc")
    parser.add_argument(
        "--store", metavar="URL",
        help="only the plain loops, with the stores on this PostgreSQL database beside LMDB ('local': a server of its own)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    report = Report("pulse", args.quick)
    began = time.perf_counter()
    if args.store:
        from bench import pulse_stores

        pulse_stores.run(report, sizes, args.store, quick=args.quick)
        report.seconds = time.perf_counter() - began
        report.print(args.json)
        return 0

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
        start_up(home)
        from qntx import connect

        with connect(home.path) as bus:
            # Connected, subscribed, and every interpreter has compiled the handler once.
            warm = [bus.submit(h, {"n": n}) for h in ("builtin.echo", f"python.{HANDLER}") for n in range(50)]
            for handle in warm:
                handle.result(timeout=30)
            ipc_rates = {}
            for handler, jobs, key, target in (
                ("builtin.echo", sizes.echo_jobs, "echo", 7_000),
                (f"python.{HANDLER}", sizes.python_jobs, "python", 3_500),
            ):
                progress(f"plain loop: {jobs} {handler} jobs")
                rate = ipc_rates[key] = throughput(bus, handler, jobs)
                report.add(
                    Metric(
                        f"{key}_jobs_per_s", f"{handler}: plain loop, {jobs:,} jobs", rate, "/s",
                        pipelined, "zmq_pipelined", Target(">=", target, on="measured"),
                    )
                )
            progress(f"asyncio: {sizes.echo_jobs} builtin.echo jobs")
            rate = asyncio_throughput(home, "builtin.echo", sizes.echo_jobs)
            report.add(
                Metric(
                    "echo_asyncio_jobs_per_s", f"builtin.echo: asyncio gather, {sizes.echo_jobs:,} jobs", rate, "/s",
                    pipelined, "zmq_pipelined",
                )
            )
            for handler, key, p50_target in (("builtin.echo", "echo", 800), (f"python.{HANDLER}", "python", None)):
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
            progress("a 10 MB payload")
            before, peak, after, anon = big_payload_rss(home, bus)
            report.notes.append(
                f"server RSS around one 10 MB payload: {before:,} kB before, {peak:,} kB at the peak "
                f"(+{(peak - before) / 1024:.1f} MB), {after:,} kB 1 s after (+{(after - before) / 1024:.1f} MB); "
                f"its own memory (RssAnon, without the job store's mapped pages) peaked at +{anon / 1024:.1f} MB"
            )
            payload_kb = report.add_raw("payload_10mb", BIG_PAYLOAD_BYTES / 1024, "kB")
            report.add(
                Metric(
                    "payload_10mb_peak_kb", "10 MB builtin.echo: server RSS growth at the peak", peak - before, "kB",
                    payload_kb, "payload_10mb", Target("<=", 2),
                )
            )
            counts = bus.status().queue
        report.notes.append(
            f"jobs completed in this run: {counts.get('completed', 0):,}; failed: {counts.get('failed', 0)}; "
            "every one committed (synced) on submit and on completion (the latter after its result is published)"
        )
        report.notes.append(
            "throughput ratios are against raw pipelined pyzmq messages/s between two processes; "
            "a job costs at least 4 messages and 2 synced commits (shared by all jobs of a loop turn)"
        )
    if args.tcp:
        tcp_figures(report, sizes, ipc_rates)
    report.seconds = time.perf_counter() - began
    report.print(args.json)
    return 0
