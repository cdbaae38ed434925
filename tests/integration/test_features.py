"""What people expect of a job system, end to end against a real `qntx up`: delayed
jobs, periodic schedules, limits, dependencies, pinned handler versions, `ax … so`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qntx.errors import NotFound
from qntx.handles import JobFailed
from qntx.pulse.directives import firing_id
from tests.integration.conftest import Bus, stays, wait_for

pytestmark = pytest.mark.timeout(180)

COUNTER = """
import os, time, uuid
d = args[0]
mine = os.path.join(d, uuid.uuid4().hex)
open(mine, 'w').close()
peak = len(os.listdir(d))
with open(d + '.peaks', 'a') as f:
    f.write(f"{peak}\\n")
time.sleep(float(args[1]))
os.remove(mine)
_result = peak
"""


def create(bus, name: str, code: str) -> None:
    result = bus.run("handler", "create", name, "--code", code)
    assert result.returncode == 0, result.stderr


HANDLERS = {
    "counter": COUNTER,
    "versioned": "_result = 'old'",
    "tagger": "_result = [upstream['attestation']['subjects'], args]",
}


@pytest.fixture
def up(bus):
    """A private bus: for tests that restart it, kill its server, or set a limit on a
    built-in handler (limits are bus-wide); the others share one (``shared``)."""
    for name, code in HANDLERS.items():
        create(bus, name, code)
    return bus.start_up()


def test_a_delayed_job_starts_on_time_and_survives_a_restart(bus, up):
    with bus.connect() as client:
        due = int(time.time() * 1000) + 1500
        early = client.submit("builtin.echo", "soon", run_at=due)
        record = early.wait(timeout=20)
        lateness = record.started_at - due
        assert 0 <= lateness < 200, lateness
        later = client.submit("builtin.echo", "later", delay_s=3)
        later.accepted(timeout=10)
    up.stop()
    up2 = bus.start_up()
    with bus.connect() as client:
        record = client.wait(later.id, timeout=30)
        assert record.status == "completed" and record.result == "later"
        assert record.started_at >= record.run_after
    up2.stop()


def test_a_schedule_fires_on_time_never_twice_across_a_restart(bus, up):
    with bus.connect() as client:
        client.schedule_add("tick", "builtin.echo", every=1.0, payload="tock")
        wait_for(lambda: len(client.schedule("tick").firings) >= 2, timeout=15, what="two firings")
        state = client.schedule("tick")
        for due, job_id in state.firings:
            assert job_id == firing_id("tick", due)
            job = client.wait(job_id, timeout=10)
            assert job.result == "tock" and job.schedule == "tick"
            assert job.created_at - due < 500
    up.stop()
    up2 = bus.start_up()
    with bus.connect() as client:
        wait_for(lambda: len(client.schedule("tick").firings) >= len(state.firings) + 2, timeout=15, what="firings after the restart")
        firings = client.schedule("tick").firings
        dues = [due for due, _ in firings]
        assert len(dues) == len(set(dues)) and dues == sorted(dues)
        jobs = client.jobs(limit=1000)
        fired = [j.id for j in jobs if j.schedule == "tick"]
        assert len(fired) == len(set(fired))
        client.schedule_pause("tick")  # returns once Pulse has it paused
        paused_at = len(client.schedule("tick").firings)
        # Watched for several of its periods: nothing fires while it is paused.
        stays(lambda: len(client.schedule("tick").firings) == paused_at, 2.2, what="no firing while paused")
        client.schedule_delete("tick")
        with pytest.raises(NotFound):
            client.schedule("tick")
    up2.stop()


def test_a_concurrency_limit_holds_under_200_jobs(bus, tmp_path):
    create(bus, "counter", COUNTER)
    started = bus.start_up("--python-pool", "5")  # room for 5 at once: the limit of 3 is what holds them
    assert "python plugin with 5 interpreter(s)" in started.output()
    spot = tmp_path / "running"
    spot.mkdir()
    with bus.connect() as client:
        client.limit("python.counter", concurrency=3)  # returns once Pulse applies it
        handles = [client.submit("python.counter", {"args": [str(spot), 0.01]}) for _ in range(200)]
        peaks = [h.result(timeout=120) for h in handles]
    assert max(peaks) <= 3
    assert max(int(line) for line in Path(str(spot) + ".peaks").read_text().split()) <= 3
    assert max(peaks) >= 2  # the limit, not a lack of workers, held them


def test_dependencies_run_in_order_and_a_failure_fails_the_dependents(shared):
    with shared.connect() as client:
        a, b, c = client.chain(("builtin.sleep", 0.3), ("builtin.echo", "b"), ("builtin.echo", "c"))
        assert c.result(timeout=30) == "c"
        ja, jb, jc = (client.job(h.id) for h in (a, b, c))
        assert ja.finished_at <= jb.started_at and jb.finished_at <= jc.started_at
        assert jc.parent_id == jb.id and jc.after == [jb.id]
        bad = client.submit("builtin.fail", "x", max_attempts=1)
        dependent = client.submit("builtin.echo", "never", after=[bad])
        anyway = client.submit("builtin.echo", "anyway", after=[bad], after_policy="always")
        with pytest.raises(JobFailed, match="which it runs after, failed"):
            dependent.result(timeout=30)
        assert anyway.result(timeout=30) == "anyway"
        with pytest.raises(NotFound):
            client.submit("builtin.echo", after=["JB-NO-SUCH-JOB"]).accepted(timeout=10)


def test_a_job_submitted_before_a_handler_update_runs_the_old_code(shared):
    with shared.connect() as client:
        first = client.submit("builtin.sleep", 1.0)
        old = client.submit("python.versioned", after=[first])
        old.accepted(timeout=10)
        result = shared.run("handler", "create", "versioned", "--code", "_result = 'new'")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: client.submit("python.versioned").result(timeout=30) == "new", timeout=20, what="the update")
        assert old.result(timeout=30) == "old"
        client.cancel(client.submit("python.versioned", after=[client.submit("builtin.sleep", 5)]).id)


def test_ax_so_runs_a_handler_once_per_match(shared):
    with shared.connect() as client:
        for name in ("ann", "bob", "cyd"):
            client.attest(name, "tagged", "demo")
        client.attest("dan", "other", "demo")
    result = shared.run("ax", "is", "tagged", "so", "tagger", "x", "--wait")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert sorted(line[0][0] for line in lines) == ["ann", "bob", "cyd"]
    assert all(line[1] == ["x"] for line in lines)
    ids = shared.run("ax", "is", "tagged", "so", "tagger")
    assert ids.returncode == 0 and len(ids.stdout.split()) == 3
    with shared.connect() as client:
        handles = client.ax("is tagged", so="tagger", args=["y"])
        assert sorted(h.result(timeout=30)[0][0] for h in handles) == ["ann", "bob", "cyd"]


def _run_on_a_terminal(bus, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run a qntx command with a pseudo-terminal as its stdout and stderr."""
    import pty
    import select
    import subprocess

    main_fd, side_fd = pty.openpty()
    process = subprocess.Popen(bus.qntx_argv(*args), stdin=side_fd, stdout=side_fd, stderr=side_fd, env=bus.env, close_fds=True)
    os.close(side_fd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(main_fd, 65536)
                except OSError:  # the terminal closed: the command is done
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        return process.wait(timeout=10), b"".join(chunks).decode("utf-8", "replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main_fd)


def test_ix_draws_a_bar_on_a_terminal_and_plain_lines_into_a_pipe(shared):
    create(shared, "stepper", "import time\nfor i in range(10):\n    print('step', i)\n    progress(i + 1, 10)\n    time.sleep(0.05)\n_result = 'ok'")
    code, screen = _run_on_a_terminal(shared, "ix", "stepper")
    assert code == 0, screen
    assert "━" in screen and "10/10" in screen and "/s" in screen and "eta" in screen
    assert "step 9" in screen and '"ok"' in screen
    piped = shared.run("ix", "stepper")
    assert piped.returncode == 0, piped.stderr
    assert "progress 10/10" in piped.stderr and "━" not in piped.stderr + piped.stdout
    assert "step 9" in piped.stdout and '"ok"' in piped.stdout


def test_a_rate_limit_and_schedules_from_the_cli(bus, up):
    limited = bus.run("handler", "limit", "builtin.echo", "--rate", "5/s")
    assert limited.returncode == 0 and "at most 5 starts per 1s" in limited.stdout, limited.stderr
    with bus.connect() as client:  # (the command returned once Pulse applied the limit)
        records = [h.wait(timeout=60) for h in [client.submit("builtin.echo", n) for n in range(15)]]
    starts = sorted(r.started_at for r in records)
    for i in range(5, len(starts)):  # never more than 5 starts in any 1 s window
        assert starts[i] - starts[i - 5] >= 1000 - 5, starts
    assert bus.run("handler", "limit", "builtin.echo", "--clear").returncode == 0

    added = bus.run("schedule", "add", "beat", "--handler", "builtin.echo", "--every", "500ms", "--payload", '"b"')
    assert added.returncode == 0, added.stderr
    wait_for(lambda: "JB-SC-" in bus.run("schedule", "show", "beat").stdout, timeout=10, what="a firing")
    listed = bus.run("schedule", "list")
    assert "beat" in listed.stdout and "every 0.5s" in listed.stdout and "active" in listed.stdout
    assert bus.run("schedule", "pause", "beat").returncode == 0
    assert "paused" in bus.run("schedule", "list").stdout
    assert bus.run("schedule", "delete", "beat").returncode == 0
    missing = bus.run("schedule", "show", "beat")
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1 and "no schedule 'beat'" in missing.stderr
    bad = bus.run("schedule", "add", "x", "--handler", "builtin.echo", "--cron", "61 * * * *")
    assert bad.returncode == 2 and bad.stderr.startswith("error: not a cron expression")


def _server_pid(client) -> int | None:
    try:
        return next(a.pid for a in client.status().actors if a.name == "server")
    except Exception:  # not answering yet
        return None


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_server_idles_once_a_rate_window_is_over(bus, up):
    with bus.connect() as client:
        server = next(a.pid for a in client.status().actors if a.name == "server")
        client.limit("builtin.echo", rate=2, per_s=1.0)
        last = [client.submit("builtin.echo", n).wait(timeout=10) for n in range(3)][-1]
        # Until the rate window of the last start is over (nothing is queued then).
        wait_for(lambda: time.time() * 1000 > last.started_at + 1_100, what="the rate window to pass")
        before = _cpu_s(server)
        time.sleep(2)
        busy = _cpu_s(server) - before
    assert busy < 0.5, f"the server used {busy:.2f} s of CPU in 2 s with nothing to do"


def test_a_rate_window_holds_across_a_kill_9_of_the_server(bus, up):
    """--rate 3/20s, three starts, kill -9 of the server: the restarted one starts none
    of the other three until the window of the first start is over."""
    limited = bus.run("handler", "limit", "builtin.echo", "--rate", "3/20s")
    assert limited.returncode == 0, limited.stderr
    with bus.connect() as client:
        handles = [client.submit("builtin.echo", n) for n in range(6)]
        done = [h.wait(timeout=30) for h in handles[:3]]
        first_start = min(j.started_at for j in done)
        server = next(a.pid for a in client.status().actors if a.name == "server")
    os.kill(server, signal.SIGKILL)
    up.wait_output("server exited with code", timeout=30)
    with bus.connect() as client:
        wait_for(lambda: _server_pid(client) not in (None, server), timeout=30, what="the server back")
        rest = [client.wait(h.id, timeout=60) for h in handles[3:]]
    starts = sorted(j.started_at for j in rest)
    assert starts[0] >= first_start + 20_000 - 5, (first_start, starts)


def test_bad_durations_and_values_are_one_line(shared):
    for args in (
        ("schedule", "add", "s", "--handler", "builtin.echo", "--every", "abc"),
        ("schedule", "add", "s", "--handler", "builtin.echo", "--every", "9000 years"),
        ("schedule", "add", "s", "--handler", "builtin.echo", "--every", "1s", "--max-attempts", "0"),
        ("handler", "limit", "builtin.echo", "--rate", "3/0s"),
        ("handler", "limit", "builtin.echo", "--rate", "10/abc"),
        ("ix", "builtin.echo", "--in", "soon"),
    ):
        result = shared.run(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "internal" not in result.stderr, (args, result.stderr)
    assert "(no schedules)" in shared.run("schedule", "list").stdout


def test_start_times_people_type_and_what_they_are_told(shared):
    """--at takes 'tomorrow 09:00', '2026-12-04 09:00' and 'in 5 minutes'; --in takes
    fractions; a past --at is an error unless --now-if-past; the due time is shown;
    `ax … so` says when nothing matched and exits 2 for an unknown handler."""
    for at in ("tomorrow 09:00", "in 5 minutes"):
        done = shared.run("ix", "builtin.echo", "--at", at, "--no-wait")
        assert done.returncode == 0 and done.stdout.strip().startswith("JB-"), (at, done.stderr)
        assert done.stderr.startswith("runs at "), done.stderr
    later = shared.run("ix", "builtin.echo", "--at", "2099-12-04 09:00", "--no-wait")
    assert later.returncode == 0 and "runs at 2099-12-04 09:00:00 UTC" in later.stderr
    listed = shared.run("pulse", "jobs", "--status", "queued").stdout
    assert "runs at 2099-12-04 09:00:00" in listed
    quick = shared.run("ix", "builtin.echo", "hi", "--in", "0.5s")
    assert quick.returncode == 0 and '"args"' in quick.stdout, quick.stderr
    past = shared.run("ix", "builtin.echo", "--at", "2020-01-01 09:00")
    assert past.returncode == 2 and "in the past" in past.stderr and "--now-if-past" in past.stderr
    anyway = shared.run("ix", "builtin.echo", "late", "--at", "2020-01-01 09:00", "--now-if-past")
    assert anyway.returncode == 0, anyway.stderr
    bad = shared.run("ix", "builtin.echo", "--at", "tomorrow 25:00")
    assert bad.returncode == 2 and "time of day" in bad.stderr
    nothing = shared.run("ax", "nobody", "is", "here", "so", "builtin.echo")
    assert nothing.returncode == 0 and "no attestation matches" in nothing.stderr
    shared.run("as", "somebody", "is", "here")
    unknown = shared.run("ax", "somebody", "is", "here", "so", "nosuchhandler")
    assert unknown.returncode == 2 and "unknown handler" in unknown.stderr and "JB-" not in unknown.stderr


def test_times_past_the_calendar_are_refused_or_shown_as_numbers(shared):
    """A start past the year 9999 is refused before anything is stored (it used to be
    stored, reported as an internal error, and break every job listing after it);
    an attestation's timestamp past it is listed as its milliseconds."""
    before = shared.run("pulse", "jobs").stdout
    far = shared.run("ix", "builtin.echo", "--in", "8000 years", "--no-wait")
    assert far.returncode == 2 and far.stderr.count("\n") == 1, far.stderr
    assert "before the year 10000" in far.stderr and "internal" not in far.stderr, far.stderr
    assert shared.run("pulse", "jobs").stdout == before  # nothing stored
    with shared.connect() as api:
        api.attest("far-future", "is", "stamped", timestamp=2**62)
    listed = shared.run("ax", "far-future")
    assert listed.returncode == 0 and f"{2**62} ms after 1970" in listed.stdout, listed.stderr


def test_ix_after(shared):
    first = shared.run("ix", "builtin.sleep", "1", "--no-wait").stdout.strip()
    second = shared.run("ix", "builtin.echo", "then", "--after", first)
    assert second.returncode == 0 and '"then"' in second.stdout, second.stderr
    with shared.connect() as api:
        assert api.job(first).status == "completed"  # it waited for the first
        ran_after = [j for j in api.jobs(limit=5) if j.after == [first]]
        assert ran_after and ran_after[0].started_at >= api.job(first).finished_at


def test_what_the_machine_or_a_setting_refuses_is_one_line_not_an_internal_error(home):
    """A home that is a file or cannot be made, a handler file that is not UTF-8, a
    store URL that cannot be parsed, JSON numbers JSON has not, a stray word, a timeout
    that is not a number of seconds: one line naming the problem, a non-zero exit,
    never "internal error"."""
    env = Bus(home).env

    def qntx(*args: str, **extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "qntx", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**env, **extra})

    afile = home / "afile"
    afile.write_text("not a directory\n")
    latin1 = home / "latin1.py"
    latin1.write_bytes(b'x = "\xe9"\n')
    cases = [
        (["--home", str(afile), "handler", "list"], "is not a directory"),
        (["--home", str(afile / "sub"), "handler", "list"], "Not a directory"),
        (["--home", str(home), "handler", "create", "latin", "--file", str(latin1)], "not UTF-8 text"),
        (["--home", str(home), "db", "check", "--store", "postgresql://[bad"], "store is not a valid URL"),
        (["--home", str(home), "as", "alice", "is", "here", "--attr", '{"a": NaN}'], "NaN is not a JSON number"),
        (["--home", str(home), "as", "alice", "is", "here", "--attr", '{"a": 1e999}'], "too large for a number"),
        (["--home", str(home), "handler", "list", "yes"], "yes"),  # a stray word, not --json
        (["--home", str(home), "schedule", "add", "s1", "--handler", "a b", "--every", "30s"], "invalid handler"),
        (["--home", str(home), "handler", "limit", "", "--concurrency", "2"], "invalid handler"),
        (["--home", str(home), "handler", "show", "caf\udce9"], "not valid UTF-8"),  # as a shell passes bad bytes
    ]
    for args, expected in cases:
        done = qntx(*args)
        assert done.returncode != 0 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert expected in done.stderr and "internal" not in done.stderr, (args, done.stderr)
    for bad in ("nan", "-1", "0"):
        done = qntx("--home", str(home), "status", QNTX_REQUEST_TIMEOUT_S=bad)
        assert done.returncode == 2 and "request_timeout_s must be a number of seconds > 0" in done.stderr, done.stderr
