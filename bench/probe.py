"""Where a benchmark stage's time went: the actor's CPU, the machine's CPU, LMDB commits.

A figure below its target says little by itself; these say whether the actor was
busy computing, waiting on fsync, or starved of CPU by its clients. Linux only
(/proc); elsewhere the CPU figures come out as nan.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used, from /proc (Linux); nan elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent not idle since boot, from /proc/stat; nan elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, IndexError, ValueError):
        return float("nan")


@dataclass(frozen=True)
class Snapshot:
    wall: float
    actor_cpu: float
    machine_busy: float
    commits: int


class StageProbe:
    """Where a stage's time went: one actor's CPU, the machine's CPU, and LMDB commits.

    The commit count is the actor's store's last transaction id, read through a
    read-only handle on its environment (LMDB allows readers in other processes), so
    items per commit shows how much group commit actually grouped.
    """

    def __init__(
        self, actor_pid: int, store_path, *, actor: str = "ATS", item: str = "attestation"
    ):
        import lmdb

        self.pid = actor_pid
        self.actor, self.item = actor, item
        self.env = lmdb.open(str(store_path), readonly=True, lock=True, max_dbs=0)

    def snapshot(self) -> Snapshot:
        commits = self.env.info()["last_txnid"]
        return Snapshot(time.perf_counter(), cpu_seconds(self.pid), machine_busy_seconds(), commits)

    def note(self, stage: str, before: Snapshot, after: Snapshot, items: int) -> str:
        elapsed = after.wall - before.wall
        commits = max(after.commits - before.commits, 1)
        cpu = after.actor_cpu - before.actor_cpu
        busy = (after.machine_busy - before.machine_busy) / elapsed
        cores = os.cpu_count() or 1
        return (
            f"{stage}: {items / commits:.1f} {self.item}s per commit, {commits / elapsed:,.0f} commits/s; "
            f"{self.actor} process {cpu / elapsed:.0%} of a core ({cpu / max(items, 1) * 1e6:.0f} us CPU "
            f"per {self.item}); machine {busy / cores:.0%} busy over {cores} cores"
        )

    def close(self) -> None:
        self.env.close()
