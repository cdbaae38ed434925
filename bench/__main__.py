"""``python -m bench <name> [options]``: run one benchmark, or ``all`` of them.

Each benchmark is the module ``bench.<name>`` with a ``main(argv) -> int``; the
dispatcher imports it only when asked, so a benchmark still being written (its
module absent) is reported as not yet available instead of breaking the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import signal
import sys

# name -> one line for --help; the order is the order `all` runs them in.
BENCHMARKS = {
    "ats": "attestation store through the bus: durable writes, group commit, queries, CLI",
    "cli": "how fast `qntx --help`, `handler list` and `ax --json` start, against a bare interpreter",
    "pulse": "job scheduler throughput and latency",
    "delayed": "how late delayed jobs start, with 10,000 more waiting",
    "soak": "500,000 jobs through one bus: server RSS and data.mdb sizes stay bounded",
    "results": "others' results cost a waiting client and the server nothing (a stalled subscriber too)",
    "swarm": "1,000 worker sessions from one process: plain loop, idle CPU, status latency",
    "obs": "the plain loops with metrics on and with every job traced, against both off",
    "failover": "a standby on PostgreSQL takes over: kill -9 of the leader to the first job done, 10 kills",
}

USAGE = """usage: bin/bench <benchmark> [--quick] [--json]
       bin/bench all [--quick]

Benchmarks (each prints its raw limit, measured in the same run, and the ratio):
{lines}

Options (passed on to the benchmark):
  --quick   small sizes and short runs (a smoke test, not a measurement)
  --json    print one JSON document instead of the table
  -h, --help  this text, or a benchmark's own with `bin/bench <name> --help`
"""


def usage() -> str:
    lines = "\n".join(f"  {name:<8} {text}" for name, text in BENCHMARKS.items())
    return USAGE.format(lines=lines)


def available(name: str) -> bool:
    return importlib.util.find_spec(f"bench.{name}") is not None


def run(name: str, argv: list[str]) -> int:
    if not available(name):
        print(f"bench {name}: not yet available", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return module.main(argv)


def _exit_on_sigterm(signum, frame) -> None:
    # As an exception, so every benchmark's `finally` stops the actors it started.
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if "--json" in rest:
            print(
                "bench all: --json needs one benchmark (bin/bench <name> --json)", file=sys.stderr
            )
            return 2
        codes = [run(n, rest) for n in BENCHMARKS if available(n)]
        return max(codes, default=0)
    if name not in BENCHMARKS:
        print(f"bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(name, rest)


if __name__ == "__main__":  # guarded: spawned client processes re-import this module
    sys.exit(main(sys.argv[1:]))
