"""A real PostgreSQL server for the tests of the PostgreSQL store.

``pg_server`` (one per test session) runs ``initdb`` and ``postgres`` in a temporary
directory, listening only on a unix socket there; as root it runs them as the
``postgres`` user (the server refuses root). ``pg_url`` gives each test a fresh
database, copied from a template that ``qntx db upgrade`` migrated once, and drops it
after. The server stops at the end of the session.

``job_store`` gives a test an empty Pulse job store on each backend.

The binaries are found on PATH, in /usr/local/bin or in Debian's
/usr/lib/postgresql/NN/bin. Without them (or without psycopg) the tests that need a
server skip with one line, unless ``QNTX_REQUIRE_POSTGRES=1`` (set by .ci/run),
which makes that a failure. A test module uses the fixtures by importing them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REQUIRED = os.environ.get("QNTX_REQUIRE_POSTGRES") == "1"
_BINARIES = ("initdb", "pg_ctl", "postgres")
TEMPLATE = "qntx_template"


def find_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, newest Debian version first."""
    found = shutil.which("initdb")
    candidates = [Path(found).parent] if found else []
    candidates += [Path("/usr/local/bin")]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    for directory in candidates:
        if all((directory / name).is_file() for name in _BINARIES):
            return directory
    return None


def _version(path: Path) -> int:
    name = path.parent.name
    return int(name) if name.isdigit() else 0


def missing() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None."""
    if find_binaries() is None:
        return "PostgreSQL (initdb, pg_ctl, postgres) is not installed"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'qntx[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    return None


def skip_or_fail(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"PostgreSQL tests required (QNTX_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"PostgreSQL store tests skipped: {reason}")


class PgServer:
    """One postgres process in a temporary directory; ``url(name)`` reaches a database."""

    def __init__(self, *, durable: bool = False):
        """``durable``: fsync and synchronous commit on, as in production (benchmarks);
        off by default, which keeps the tests fast and changes nothing they check."""
        self.bin = find_binaries()
        assert self.bin is not None
        self.dir = Path(tempfile.mkdtemp(prefix="qx-pg-", dir="/tmp"))
        self.data, self.socket = self.dir / "data", self.dir
        self.user = "qntx"
        self._run_as = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self._run_as = entry.pw_uid
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._durable = durable
        self._names = itertools.count(1)

    def _pg(self, name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / name), *args], user=self._run_as, capture_output=True, text=True,
            timeout=120, check=False, cwd=self.dir, **kwargs,
        )  # fmt: skip

    def start(self) -> PgServer:
        made = self._pg(
            "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-instructions", *(() if self._durable else ("--no-sync",)),
        )  # fmt: skip
        if made.returncode:
            raise RuntimeError(f"initdb failed: {made.stderr.strip() or made.stdout.strip()}")
        fast = "" if self._durable else " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        options = f"-c listen_addresses='' -k {self.socket} -c max_connections=200{fast}"
        started = self._pg(
            "pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.dir / "log"), "-o", options
        )
        if started.returncode:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"postgres did not start: {started.stderr.strip()} {log[-2000:]}")
        return self

    def stop(self) -> None:
        self._pg("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket}"

    def admin(self, *statements: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def new_database(self, template: str = "template1") -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        return name

    def drop(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def running_server(*, durable: bool = False):
    server = PgServer(durable=durable)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server():
    reason = missing()
    if reason:
        skip_or_fail(reason)
    with running_server() as server:
        from qntx.db import upgrade

        server.admin(f"CREATE DATABASE {TEMPLATE}")
        upgrade(server.url(TEMPLATE))  # every test's database starts migrated
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer):
    """A fresh, migrated database for one test."""
    name = pg_server.new_database(TEMPLATE)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop(name)


@pytest.fixture
def pg_empty_url(pg_server: PgServer):
    """A fresh database without QNTX's schema (for `qntx db upgrade`)."""
    name = pg_server.new_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop(name)


@pytest.fixture(params=["lmdb", "postgresql"])
def job_store(request, tmp_path):
    """An empty Pulse job store on each backend: LMDB in a temp dir, and a fresh
    migrated database (``pg_server`` must be imported beside this fixture)."""
    if request.param == "lmdb":
        from qntx.pulse.jobstore import JobStore

        opened = JobStore(tmp_path / "pulse")
        yield opened
        opened.close()
        return
    from qntx.pulse.jobstore_pg import PgJobStore

    server = request.getfixturevalue("pg_server")
    name = server.new_database(TEMPLATE)
    opened = PgJobStore(server.url(name))
    try:
        yield opened
    finally:
        opened.close()
        server.drop(name)
