"""``bin/bench cli``: how fast the command line starts, against a bare interpreter.

Times, as the median of interleaved runs, ``python -c pass`` (the floor no command
can beat) and three everyday commands: ``qntx --help``, ``qntx handler list`` and
``qntx ax alice --json``, the last two both on the embedded store (no actor) and
through a running ATS actor. Each is judged by its ratio to the bare start
(target <= 8x). ``--quick`` makes fewer runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from bench.actors import REPO, Home
from bench.report import Metric, Report, Target, progress

COMMANDS = {
    "help": ("qntx --help", ["--help"]),
    "handler_list": ("qntx handler list", ["handler", "list"]),
    "ax_json": ("qntx ax alice --json", ["ax", "alice", "--json"]),
}
TARGET = Target("<=", 8)


def wall_ms(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-3:])} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def measure(report: Report, home: Home, mode: str, runs: int) -> None:
    """Interleaved rounds of the bare start and each command, so a noisy moment
    hurts them alike; the medians and their ratios go into ``report``."""
    # As installed: the first run leaves the modules' bytecode cached (an environment
    # that forbids writing it would make every run compile qntx from source).
    env = {k: v for k, v in home.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    argv = {key: home.qntx_argv(*args) for key, (_, args) in COMMANDS.items()}
    bare = [sys.executable, "-c", "pass"]
    times: dict[str, list[float]] = {"bare": [], **{key: [] for key in argv}}
    for round in range(runs + 1):
        for key, command in (("bare", bare), *argv.items()):
            elapsed = wall_ms(command, env)
            if round:  # the first round warms the page cache
                times[key].append(elapsed)
    floor = statistics.median(times["bare"])
    report.add_raw(f"python_startup_{mode}", floor, "ms", "-")
    for key, (label, _) in COMMANDS.items():
        if key == "help" and mode != "embedded":
            continue  # --help never touches the store
        metric = Metric(
            f"cli_{key}_{mode}", f"{label} ({mode})", statistics.median(times[key]), "ms",
            floor, "python -c pass", TARGET,
        )  # fmt: skip
        report.add(metric)


def run(report: Report, runs: int) -> None:
    from qntx import connect

    with Home() as home:
        created = home.run_cli("handler", "create", "greeter", "--code", "print('hi')")
        if created.returncode != 0:
            raise RuntimeError(created.stderr)
        for who in ("alice", "bob"):
            home.run_cli("as", who, "is", "known")
        progress(f"embedded store: {runs} rounds")
        measure(report, home, "embedded", runs)
        home.start_ats()
        with connect(home.path, embedded=False) as bus:
            bus.ping()
        progress(f"through the ATS actor: {runs} rounds")
        measure(report, home, "bus", runs)
    report.notes.append(
        "each figure is the median wall time of a fresh process, from spawn to exit, "
        "interleaved with `python -c pass` of the same interpreter, bytecode cached"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer runs: a smoke test")
    parser.add_argument("--json", action="store_true", help="print one JSON document, not the table")
    args = parser.parse_args(argv)
    report = Report("cli", args.quick)
    start = time.perf_counter()
    run(report, 3 if args.quick else 10)
    report.seconds = time.perf_counter() - start
    report.print(args.json)
    return 0
