"""Fixtures that run real actor processes on ipc sockets in a temporary home.

Every process a test starts is registered here and stopped at teardown (SIGTERM,
then SIGKILL), whatever the test did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qntx.settings import Settings, load_settings
from tests.conftest import fresh_home

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stays(predicate: Callable[[], object], seconds: float, interval: float = 0.05, what: str = "condition") -> None:
    """Assert ``predicate`` holds all through the next ``seconds`` (an observation
    window: that something does not happen, such as a firing while paused)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"{what} stopped holding"
        time.sleep(interval)


class Process:
    """One started command, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        self.argv = argv
        self.log = log
        self._log_file = open(log, "wb")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 20.0) -> str:
        wait_for(lambda: text in self.output(), timeout, what=f"{text!r} in {self.log.name}")
        return self.output()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log_file.close()
        return self.popen.returncode


class Bus:
    """Starts qntx commands against one home and cleans up after them."""

    def __init__(self, home: Path):
        self.home = home
        self.settings: Settings = load_settings(home)
        self.env = dict(os.environ, QNTX_HOME=str(home), PYTHONUNBUFFERED="1")
        self.env.pop("QNTX_WORKERS", None)
        # Any free port: tests (and other buses on this machine) never fight over 9464.
        self.env["QNTX_METRICS"] = "127.0.0.1:0"
        self.processes: list[Process] = []
        self.up: Process | None = None  # the shared bus's `qntx up` (the ``shared`` fixture)
        self._count = 0

    def qntx_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qntx", "--home", str(self.home), *args]

    def start(self, *args: str) -> Process:
        self._count += 1
        log = self.home / f"test-{self._count}-{args[0]}.out"
        process = Process(self.qntx_argv(*args), log, self.env)
        self.processes.append(process)
        return process

    def run(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.qntx_argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env, cwd=REPO, input=input
        )

    def start_ats(self) -> Process:
        process = self.start("ats")
        wait_for(lambda: Path(self.settings.ats_endpoint[6:]).exists() or not process.alive(), what="ATS socket")
        assert process.alive(), process.output()
        return process

    def start_up(self, *extra: str) -> Process:
        process = self.start("up", *extra)
        process.wait_output("handler=python.script", timeout=30)
        return process

    def start_up_with(self, handlers: dict[str, str], *extra: str) -> Process:
        """Store ``handlers`` (name -> code), start ``qntx up`` and wait until it serves the last."""
        for name, code in handlers.items():
            result = self.run("handler", "create", name, "--code", code)
            assert result.returncode == 0, result.stderr
        process = self.start_up(*extra)
        process.wait_output(f"handler=python.{list(handlers)[-1]}")
        return process

    def create_handler(self, up: Process, name: str, code: str) -> None:
        """Store a handler while ``up`` runs and wait until the server registers it."""
        result = self.run("handler", "create", name, "--code", code)
        assert result.returncode == 0, result.stderr
        up.wait_output(f"Registering plugin async handler plugin=python handler=python.{name}\n")

    def connect(self, **kw):
        import qntx

        return qntx.connect(self.home, **kw)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def bus(home):
    b = Bus(home)
    try:
        yield b
    finally:
        b.stop_all()


@pytest.fixture(scope="module")
def shared(request):
    """One bus with ``qntx up`` running for every test of a module that asks for it
    (an ``up`` costs seconds; most tests need a running bus, not a quiet one). The
    module's ``HANDLERS`` (name -> code), if it has any, are stored first, and its
    ``SHARED_UP`` (extra ``up`` arguments) passed; ``shared.up`` is the process.
    Tests on it tell their jobs and handlers apart by id and name, never by counting
    everything on the bus; a test that needs a quiet or private bus takes ``bus``."""
    handlers = getattr(request.module, "HANDLERS", None)
    extra = getattr(request.module, "SHARED_UP", ())
    with fresh_home() as home:
        b = Bus(home)
        try:
            b.up = b.start_up_with(handlers, *extra) if handlers else b.start_up(*extra)
            yield b
        finally:
            b.stop_all()
