"""The LMDB environment: readers that died in the middle of a read do not make the
file grow, because their reader slots are freed on open and by the periodic check."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qntx.lmdbenv import LmdbEnv

pytestmark = pytest.mark.timeout(120)

KEYS, VALUE_BYTES = 200, 4_000  # about 0.8 MB of live data, rewritten over and over


def kill_a_reader(path: Path) -> None:
    """A process that begins a read transaction and is killed (-9) inside it."""
    reader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import lmdb, os, signal
            env = lmdb.open({str(path)!r}, max_dbs=4, subdir=True)
            txn = env.begin()  # a read transaction, never ended
            print("reading", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "reading"
        assert reader.wait(10) == -9
    finally:
        reader.kill()
        reader.stdout.close()


def rewrite_with_killed_readers(path: Path, *, check: bool, rounds: int = 8) -> int:
    """Rewrite every record ``rounds`` times, a reader killed mid-read before each;
    the file size at the end."""
    env = LmdbEnv(path, ["jobs"], map_size=256 << 20, sync=False)
    db = env.db("jobs")

    def rewrite(n: int) -> None:
        def work(txn) -> None:
            for key in range(KEYS):
                txn.put(key.to_bytes(4, "big"), bytes([n % 256]) * VALUE_BYTES, db=db)

        for _ in range(3):  # a few transactions, so freed pages could be reused
            env.write(work)

    try:
        rewrite(0)
        for n in range(1, rounds + 1):
            kill_a_reader(path)
            if check:
                assert env.clear_stale_readers() == 1
            rewrite(n)
        return (path / "data.mdb").stat().st_size
    finally:
        env.close()


def test_killed_readers_do_not_make_the_file_grow_across_rewrites(tmp_path: Path) -> None:
    live = KEYS * VALUE_BYTES
    checked = rewrite_with_killed_readers(tmp_path / "checked", check=True)
    assert checked < 4 * live, f"{checked} bytes for {live} bytes of live data"
    # Without the check each dead reader pins the pages of its snapshot: the same
    # work makes the file grow with every round (this is what the check prevents).
    unchecked = rewrite_with_killed_readers(tmp_path / "unchecked", check=False)
    assert unchecked > 2 * checked, (unchecked, checked)
    # Opening the environment frees the dead readers' slots too.
    env = LmdbEnv(tmp_path / "unchecked", ["jobs"], map_size=256 << 20, sync=False)
    try:
        assert env.clear_stale_readers() == 0
    finally:
        env.close()
