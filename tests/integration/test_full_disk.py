"""A home on a small filesystem that fills up: writers get a typed ``unavailable:
disk full`` error, reads go on, no actor dies, and writes work again once there is
room. Needs root, to mount a 64 MiB tmpfs; skipped (with the reason) otherwise."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from qntx.errors import Unavailable
from tests.integration.conftest import Bus, Process, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_home(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (mount / "home").mkdir()
        yield mount / "home"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no room left."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    os.sync()


def actor_pids(bus: Bus) -> dict[str, int]:
    lines = (bus.home / "run" / "actors").read_text().split("\n")
    return {line.split()[0]: int(line.split()[1]) for line in lines if line}


def write_until_refused(write) -> Unavailable:
    """Call ``write`` until the store refuses it; LMDB first reuses the free pages it has."""
    for _ in range(2_000):
        try:
            write()
        except Unavailable as exc:
            return exc
    raise AssertionError("the writes never failed on a full disk")


def test_a_full_disk_refuses_writes_with_a_typed_error_and_keeps_everything_else(small_home):
    bus = Bus(small_home)
    try:
        bus.start_up()
        pids = actor_pids(bus)
        b = bus.connect()
        try:
            kept = b.attest("kept", "is", "here")
            done = b.submit("builtin.echo", "before").result(timeout=20)
            assert done == "before"
            filler = small_home / "filler"
            fill(filler)
            blob = "x" * 50_000
            refused = write_until_refused(lambda: b.attest("more", "fills", attributes={"blob": blob}))
            assert str(refused).startswith("disk full"), refused
            refused = write_until_refused(
                lambda: b.submit("builtin.echo", blob).result(timeout=20)
            )
            assert "disk full" in str(refused), refused
            # Reads go on, and every actor is the one that started.
            assert b.get(kept.id) == kept
            assert b.query(subjects=["kept"])[0].id == kept.id
            assert b.jobs(status="completed")
            assert b.ping().actor == "ats"
            assert actor_pids(bus) == pids
            # Room again: writes work again, on the same actors.
            filler.unlink()
            again = b.attest("again", "works")
            assert b.get(again.id) == again
            assert b.submit("builtin.echo", "after").result(timeout=20) == "after"
        finally:
            try:
                b.close()
            except Unavailable:  # the refused submission may be reported again
                pass
        assert actor_pids(bus) == pids and bus.processes[0].alive()
    finally:
        bus.stop_all()
    wait_for(lambda: not any(p.alive() for p in bus.processes), 20, what="actors to stop")
    output = bus.processes[0].output()
    # Each refused commit is one error line, not a storm of retries.
    assert output.count("commit of") < 50, output[-3000:]


def test_a_journal_that_cannot_be_made_on_a_full_disk_lets_go_of_its_lock(small_home):
    """Opening the journal on a full disk fails with the disk's error; once there is
    room it opens, in the same process too (the failed open keeps no lock behind)."""
    from qntx.ats.journal import Journal

    fill(small_home / "filler")
    with pytest.raises(Unavailable, match="disk full"):
        Journal(small_home / "journal")
    (small_home / "filler").unlink()
    journal = Journal(small_home / "journal")  # not "in use by another process"
    journal.close()


def test_commits_that_fail_while_runs_end_and_wait_are_retried_calmly(small_home, tmp_path):
    """The disk fills while python jobs run and more wait: their ends and the next
    dispatches (held until their commit) cannot be written. The server tries again
    now and then, not at once and not from inside its own failure (that recursed),
    and once there is room every job ends with its own result."""
    bus = Bus(small_home)
    try:
        # Results of 50 KB: each end needs new pages (a small one may fit in free ones).
        code = "import time\ntime.sleep(0.3)\n_result = {'n': upstream['n'], 'pad': 'x' * 50_000}"
        assert bus.run("handler", "create", "nap", "--code", code).returncode == 0
        up = Process(bus.qntx_argv("up"), tmp_path / "up.out", bus.env)  # (its console off the full disk)
        bus.processes.append(up)
        up.wait_output("handler=python.nap", timeout=30)
        with bus.connect() as b:
            handles = [b.submit("python.nap", {"n": n}) for n in range(40)]
            b.flush()
            wait_for(lambda: b.status().queue["running"] > 0, 20, what="jobs running")
            fill(small_home / "filler")
            failing = lambda: up.output().count("commit of") >= 3 or "RecursionError" in up.output()  # noqa: E731
            try:
                wait_for(failing, 30, what="commits failing")
            except AssertionError:
                raise AssertionError(up.output()[-3000:]) from None
            time.sleep(2)  # (what is measured: how often it tries in that time)
            failures = up.output().count("commit of")
            (small_home / "filler").unlink()
            assert [h.result(timeout=60)["n"] for h in handles] == list(range(40))
        assert "RecursionError" not in up.output()
        assert failures < 40, up.output()[-3000:]
    finally:
        bus.stop_all()
