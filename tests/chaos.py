"""``bin/chaos``: a stream of jobs and attestations while actors die at random.

Starts ``qntx up`` in a throwaway home (its own process group), keeps submitting
jobs (``builtin.echo`` and a stored python handler that records each of its runs
in a file) and attestations, each with an id the client made, and meanwhile:

* kills with SIGKILL, at random moments, a worker, a python interpreter of the
  plugin, the python plugin, the server or the ATS actor (``up`` restarts them);
* stops a worker with SIGSTOP past its lease, then resumes it;
* kills the whole process group (a power loss) and starts a fresh ``up`` on the
  same home.

A submission or attestation that got no answer is sent again with the same id
until it is answered, as a careful client does. When the faults are over it waits
for the queue to drain (the load offers more python jobs than the plugin runs, so a
backlog of thousands is normal; only a minute without progress ends the wait),
reads every job in pages of a thousand, and checks, and prints:

1. every accepted job reached a final state with its own result, none is stuck;
2. every run of a python job is counted in its record (``runs``), so no extra run
   went unrecorded;
3. every accepted attestation is in ATS exactly once;
4. both LMDB environments open clean and every record in them reads back (with
   ``--store postgresql://…``: both stores in that database, which ``qntx db
   check`` finds reachable and current at the end).

``python -m tests.chaos --rounds 20 --power 5`` (what ``bin/chaos`` runs);
``tests/integration/test_chaos.py`` runs a shortened version.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from qntx.protocol import FINAL_STATUSES
from qntx.supervisor import BACKOFF_MAX_S

REPO = Path(__file__).resolve().parents[1]
HANDLER = "chaos"
HANDLER_CODE = """
import os, time
with open(os.path.join(upstream['dir'], 'runs.log'), 'a') as f:
    f.write(upstream['id'] + '\\n')
time.sleep(upstream['sleep'])
_result = upstream['n']
"""
JOB_TIMEOUT_S = 2.0
LEASE_S = JOB_TIMEOUT_S * 4 + 5  # rules.lease_ms: PLUGIN_DEPTH x timeout + grace


@dataclass
class Tally:
    rounds: int = 0
    kills: Counter = field(default_factory=Counter)
    jobs: dict[str, int] = field(default_factory=dict)  # accepted job id -> n
    attestations: set[str] = field(default_factory=set)  # accepted attestation ids
    resent: int = 0
    errors: list[str] = field(default_factory=list)  # load threads that died
    lock: threading.Lock = field(default_factory=threading.Lock)


class Chaos:
    def __init__(self, home: Path, seed: int, log=print, store: str = ""):
        self.home = home
        self.store = store  # a postgresql:// URL: both stores there (else LMDB in the home)
        self.random = random.Random(seed)
        self.log = log
        self.tally = Tally()
        self.stop = threading.Event()
        self.up: subprocess.Popen | None = None
        self.env = dict(os.environ, QNTX_HOME=str(home), PYTHONUNBUFFERED="1")
        if store:
            self.env["QNTX_STORE"] = store
        self.settled = (0, 0, 0.0)  # check(): jobs not final when the load stopped, left, seconds
        self.runs_dir = home / "chaos-runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- the bus

    def qntx(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qntx", "--home", str(self.home), *args]

    def start_up(self) -> None:
        out = open(self.home / "chaos-up.log", "ab")
        self.up = subprocess.Popen(self.qntx("up"), stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        import qntx
        from qntx.errors import QntxError

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with qntx.connect(self.home, embedded=False, request_timeout_s=1.0) as bus:
                    status = bus.status()
                workers = sum(a.name.startswith("worker") and a.healthy for a in status.actors)
                if f"python.{HANDLER}" in status.handlers and workers >= 2:
                    return
            except QntxError:
                pass
            time.sleep(0.1)
        raise RuntimeError("qntx up did not come up")

    def pids(self) -> dict[str, int]:
        try:
            lines = (self.home / "run" / "actors").read_text().splitlines()
        except OSError:
            return {}
        return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}

    @staticmethod
    def children(pid: int) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
        return found

    def power_loss(self) -> None:
        assert self.up is not None
        os.killpg(self.up.pid, signal.SIGKILL)
        self.up.wait()
        for pid in self.pids().values():  # anything that outlived its group (none should)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        self.start_up()

    def stop_up(self) -> None:
        if self.up is not None and self.up.poll() is None:
            self.up.send_signal(signal.SIGTERM)
            try:
                self.up.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.up.pid, signal.SIGKILL)
                self.up.wait()

    # ---------------------------------------------------------------- load

    def submitter(self) -> None:
        import qntx
        from qntx.asid import new_asid
        from qntx.errors import QntxError

        n = 0
        with qntx.connect(self.home, embedded=False, request_timeout_s=2.0) as bus:
            while not self.stop.is_set():
                batch = []
                for _ in range(10):
                    n += 1
                    python = n % 2 == 0
                    handler = f"python.{HANDLER}" if python else "builtin.echo"
                    job_id = new_asid(handler, prefix="JB")
                    payload = {"n": n, "id": job_id, "dir": str(self.runs_dir), "sleep": self.random.choice((0, 0, 0.01, 0.05))}
                    batch.append((handler, payload, job_id, n))
                pending = batch
                while pending and not self.stop.is_set():
                    handles = []
                    for handler, payload, job_id, number in pending:
                        try:
                            handles.append((bus.submit(handler, payload, id=job_id, max_attempts=10, timeout_s=JOB_TIMEOUT_S), (handler, payload, job_id, number)))
                        except QntxError:
                            handles.append((None, (handler, payload, job_id, number)))
                    retry = []
                    deadline = time.monotonic() + 3.0  # for the whole batch: replies come in any order
                    for handle, item in handles:
                        try:
                            if handle is None:
                                raise QntxError("not sent")
                            handle.accepted(timeout=max(0.0, deadline - time.monotonic()))
                            with self.tally.lock:
                                self.tally.jobs[item[2]] = item[3]
                        except QntxError:
                            retry.append(item)
                    if retry:
                        self.tally.resent += len(retry)
                        time.sleep(0.2)
                    pending = retry
                try:
                    bus.flush(timeout=0.1)
                except QntxError:
                    pass
                time.sleep(0.01)

    def _guarded(self, work) -> None:
        """A load thread that dies is a bug in the client or the bus: it is reported, not hidden."""
        try:
            work()
        except BaseException as exc:
            import traceback

            self.tally.errors.append(f"{work.__name__}: {type(exc).__name__}: {exc}")
            self.log(traceback.format_exc())

    def attester(self) -> None:
        import qntx
        from qntx.asid import new_asid
        from qntx.errors import Conflict, QntxError

        n = 0
        bus = qntx.connect(self.home, embedded=False, request_timeout_s=2.0)
        try:
            while not self.stop.is_set():
                n += 1
                att_id = new_asid(f"chaos-{n}", "made", "chaos")
                while not self.stop.is_set():
                    try:
                        bus.attest(f"chaos-{n}", "made", "chaos", id=att_id, attributes={"n": n})
                    except Conflict:
                        pass  # the first try was stored after all: the same attestation
                    except QntxError:
                        self.tally.resent += 1
                        time.sleep(0.2)
                        continue
                    with self.tally.lock:
                        self.tally.attestations.add(att_id)
                    break
                time.sleep(0.005)
        finally:
            try:
                bus.close()
            except QntxError:
                pass

    # ---------------------------------------------------------------- faults

    def kill_one(self, patience_s: float = BACKOFF_MAX_S + 5) -> str:
        """SIGKILL one actor of a kind chosen at random. One that ``up`` is still
        restarting (a stale pid, a zombie, a plugin with no interpreter yet; up
        backs off up to BACKOFF_MAX_S for an actor killed again and again) is
        waited for, so a round is a kill, not a miss ("none": none came in time)."""
        kind = self.random.choice(["worker", "interpreter", "plugin", "server", "ats"])
        pick = self.random.random()
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            target = self.target(kind, pick)
            if target is not None:
                try:
                    os.kill(target, signal.SIGKILL)
                    return kind
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return f"none ({kind})"

    def target(self, kind: str, pick: float) -> int | None:
        """A live pid of that kind (``pick`` in [0, 1) chooses among several)."""
        pids = {name: pid for name, pid in self.pids().items() if alive(pid)}
        if kind == "worker":
            found = [pid for name, pid in sorted(pids.items()) if name.startswith("worker")]
        elif kind == "interpreter":
            plugin = next((pid for name, pid in pids.items() if name.startswith("plugin")), None)
            found = sorted(pid for pid in self.children(plugin) if alive(pid)) if plugin else []
        elif kind == "plugin":
            found = [pid for name, pid in pids.items() if name.startswith("plugin")]
        else:
            found = [pids[kind]] if kind in pids else []
        return found[int(pick * len(found))] if found else None

    def stop_a_worker(self, patience_s: float = BACKOFF_MAX_S + 5) -> str:
        """SIGSTOP a live worker past its lease, then let it go on. A worker killed in
        a round before may not be back yet (its pid file still names the dead one):
        one is waited for as ``kill_one`` does, so a round is a stop, not a miss."""
        pick = self.random.random()
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            pid = self.target("worker", pick)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
                else:
                    time.sleep(LEASE_S + 1)  # past its lease: Pulse gave its runs to others meanwhile
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                    return "SIGSTOP past the lease"
            time.sleep(0.1)
        return "none (stop)"

    def run(self, rounds: int, power: int, stops: int) -> None:
        self.log(f"chaos: home {self.home}; {rounds} kill rounds, {power} power losses, {stops} SIGSTOP rounds")
        self.began = time.monotonic()
        created = subprocess.run(self.qntx("handler", "create", HANDLER, "--code", HANDLER_CODE), env=self.env, capture_output=True, text=True)
        if created.returncode != 0:
            raise RuntimeError(created.stderr)
        self.start_up()
        load = [threading.Thread(target=self._guarded, args=(f,), daemon=True) for f in (self.submitter, self.attester)]
        for thread in load:
            thread.start()
        plan = ["kill"] * rounds + ["power"] * power + ["stop"] * stops
        self.random.shuffle(plan)
        for fault in plan:
            time.sleep(self.random.uniform(0.3, 1.5))
            self.tally.rounds += 1
            if fault == "kill":
                kind = self.kill_one()
                self.tally.kills[kind] += 1
            elif fault == "power":
                self.power_loss()
                self.tally.kills["power loss"] += 1
            else:
                self.tally.kills[self.stop_a_worker()] += 1
            self.log(f"  {time.monotonic() - self.began:5.1f}s round {self.tally.rounds}: {fault} -> {dict(self.tally.kills)}; {len(self.tally.jobs)} jobs, {len(self.tally.attestations)} attestations accepted")
        time.sleep(1.0)
        self.stop.set()
        for thread in load:
            thread.join(60)
        self.wait_ready()

    # ---------------------------------------------------------------- invariants

    def settle(self, bus, stall_s: float) -> tuple[int, int, float]:
        """Wait until no job is queued, waiting or running, for as long as the queue
        keeps moving: a backlog (the load offers more python jobs than the plugin
        runs) drains at its own pace, and only ``stall_s`` without a new low in the
        jobs left ends the wait early. Returns (jobs not final at first, jobs left,
        seconds waited)."""
        from qntx.errors import QntxError

        began = time.monotonic()
        first, lowest, moved, said = None, None, began, began
        while True:
            try:
                queue = bus.status().queue
                left = sum(n for status, n in queue.items() if status not in FINAL_STATUSES)
            except QntxError:
                left = None
            now = time.monotonic()
            if first is None:
                first = left
            if left is not None and (lowest is None or left < lowest):
                lowest, moved = left, now
            if left == 0 or now - moved > stall_s:
                return first or 0, (lowest if left is None else left), now - began
            if now - said >= 10:
                self.log(f"  settling: {left} job(s) not final after {now - began:.0f}s")
                said = now
            time.sleep(0.5)

    def check(self, stall_s: float = 60.0) -> dict[str, int]:
        import qntx
        from qntx.errors import QntxError

        jobs, attestations = dict(self.tally.jobs), set(self.tally.attestations)
        counts = Counter({"load threads that died": len(self.tally.errors), "jobs stuck (not final in time)": 0})
        with qntx.connect(self.home, embedded=False, request_timeout_s=10.0) as bus:
            self.settled = self.settle(bus, stall_s)
            # Every job in pages of a thousand, in one pass once the queue has drained
            # (not one request per job while it drains).
            listed = {job.id: job for job in bus.jobs(limit=len(jobs) + 1_000_000)}
            # Read after the records: a run the log shows must be counted in its record.
            runs = Counter((self.runs_dir / "runs.log").read_text().split()) if (self.runs_dir / "runs.log").exists() else Counter()
            final = {}
            for job_id in jobs:
                job = listed.get(job_id)
                if job is None:
                    try:
                        job = bus.job(job_id)
                    except QntxError as exc:
                        counts["jobs stuck (not final in time)"] += 1
                        self.log(f"    {job_id}: not listed ({exc})")
                        continue
                if job.status in ("completed", "failed", "cancelled"):
                    final[job_id] = job
                else:
                    counts["jobs stuck (not final in time)"] += 1
                    if counts["jobs stuck (not final in time)"] <= 20:
                        self.log(f"    {job_id}: {job.status}, attempt {job.attempts}, runs {job.runs}, lease {job.lease}, worker {job.worker}, run_after {job.run_after}, error {job.error.message if job.error else None!r}")
            for job_id, job in final.items():
                n = jobs[job_id]
                own = job.result == n or (isinstance(job.result, dict) and job.result.get("id") == job_id and job.result.get("n") == n)
                if job.status == "completed" and own:
                    counts["jobs completed with their own result"] += 1
                else:
                    counts["jobs final but not completed with their result"] += 1
                    self.log(f"    {job_id}: {job.status} {job.result!r} (expected {n}) {job.error}")
                if job.handler.startswith("python."):
                    if runs[job_id] <= job.runs:
                        counts["python jobs whose every run is recorded"] += 1
                    else:
                        counts["python jobs with unrecorded runs"] += 1
                        self.log(f"    {job_id}: ran {runs[job_id]} times, record says {job.runs}")
            counts["python runs in all (handler's own record)"] = sum(runs.values())
            stored = Counter(r.id for r in bus.query(predicates="made", contexts="chaos"))
            for att_id in attestations:
                if stored[att_id] == 1:
                    counts["attestations stored exactly once"] += 1
                else:
                    counts["attestations missing or duplicated"] += 1
                    self.log(f"    attestation {att_id}: stored {stored[att_id]} times")
        self.stop_up()
        if self.store:  # the database's own check: reachable, every schema current
            checked = subprocess.run(self.qntx("db", "check"), env=self.env, capture_output=True, text=True, timeout=60)
            if checked.returncode == 0:
                counts["databases that check clean"] += 1
            else:
                counts["databases that fail to open or check"] += 1
                self.log(f"    qntx db check: {checked.stdout}{checked.stderr}")
            return counts
        for name in ("ats", "pulse"):
            try:
                counts[f"records read back from {name}"] = read_every_record(self.home / name)
                counts["LMDB environments that open clean"] += 1
            except lmdb.Error as exc:
                counts["LMDB environments that fail to open or read"] += 1
                self.log(f"    {name}: {exc}")
        return counts


def alive(pid: int) -> bool:
    """Running (not a zombie its parent has yet to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def read_every_record(path: Path) -> int:
    """Open an environment read-only and read every record of every database."""
    env = lmdb.open(str(path), readonly=True, max_dbs=32, lock=False, subdir=True)
    try:
        total = 0
        with env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                for _key, _value in txn.cursor(db=db):
                    total += 1
        return total
    finally:
        env.close()


def violations(counts: dict[str, int]) -> int:
    bad = ("stuck", "not completed", "unrecorded", "missing", "fail to open", "died")
    return sum(v for k, v in counts.items() if any(b in k for b in bad))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="SIGKILL rounds (default 20)")
    parser.add_argument("--power", type=int, default=5, help="power losses: the whole group killed (default 5)")
    parser.add_argument("--stops", type=int, default=2, help="SIGSTOP rounds past a lease (default 2)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the home for inspection")
    parser.add_argument("--store", default="", help="postgresql://… : both stores in this database (migrated, empty)")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows where it is
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    home = Path(tempfile.mkdtemp(prefix="qc-", dir="/tmp"))
    chaos = Chaos(home, seed, store=args.store)
    began = time.monotonic()
    try:
        chaos.run(args.rounds, args.power, args.stops)
        counts = chaos.check()
    finally:
        chaos.stop.set()
        chaos.stop_up()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    tally = chaos.tally
    print(f"\nchaos (seed {seed}, {time.monotonic() - began:.0f} s): {tally.rounds} rounds; kills: {dict(tally.kills)}")
    print(f"accepted: {len(tally.jobs):,} jobs, {len(tally.attestations):,} attestations; resent after no answer: {tally.resent:,}")
    backlog, left, waited = chaos.settled
    print(f"when the load stopped {backlog:,} job(s) were not final; {left:,} after settling {waited:.0f} s")
    for key, value in counts.items():
        print(f"  {key}: {value:,}")
    bad = violations(counts)
    print("RESULT: " + ("every invariant held" if not bad else f"{bad} violation(s)"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
