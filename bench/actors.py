"""Throwaway homes and the real processes a benchmark starts in them.

Everything started here is stopped by ``Home.close`` (SIGTERM, then SIGKILL), which
every benchmark calls in a ``finally``: a benchmark that fails half way must not
leave an actor holding a socket or a store. Homes live directly under /tmp with
short names because ipc socket paths are limited to ~100 bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOP_WAIT_S = 10.0


def stop_process(popen: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM, give it ``wait_s`` to finish its teardown, then SIGKILL."""
    if popen.poll() is not None:
        return
    try:
        popen.send_signal(signal.SIGTERM)
        popen.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also when a signal interrupts the wait: the process must not outlive us
        if popen.poll() is None:
            popen.kill()
            popen.wait(5)


def stop_multiprocesses(processes: list) -> None:
    """The same for ``multiprocessing`` children, all of them even if one stop is interrupted."""
    try:
        for process in processes:
            if process.pid is not None and process.is_alive():
                process.terminate()  # SIGTERM
                process.join(STOP_WAIT_S)
    finally:
        for process in processes:
            if process.pid is not None and process.is_alive():
                process.kill()
                process.join(5)


class Home:
    """A temporary QNTX home and the ``qntx`` processes started against it."""

    def __init__(self, prefix: str = "qb-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.env = dict(os.environ, QNTX_HOME=str(self.path), PYTHONUNBUFFERED="1")
        self.processes: list[subprocess.Popen] = []
        self._logs = []

    def qntx_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qntx", "--home", str(self.path), *args]

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.path / f"bench-{len(self.processes)}-{args[0]}.log", "wb")
        self._logs.append(log)
        popen = subprocess.Popen(
            self.qntx_argv(*args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )
        self.processes.append(popen)
        return popen

    def run_cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run one ``qntx`` command against this home and wait for it."""
        return subprocess.run(
            self.qntx_argv(*args), capture_output=True, text=True, env=self.env, cwd=REPO, timeout=timeout_s
        )

    def start_ats(self, timeout_s: float = 20.0) -> subprocess.Popen:
        """Start ``qntx ats`` and return once it answers a ping."""
        from qntx import connect
        from qntx.errors import QntxError

        popen = self.start("ats")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise RuntimeError(
                    f"the ATS actor exited with {popen.returncode}:\n{self.log_text()}"
                )
            try:
                with connect(self.path, embedded=False, request_timeout_s=1.0) as bus:
                    bus.ping()
                return popen
            except QntxError:
                time.sleep(0.05)
        raise RuntimeError(
            f"the ATS actor did not answer within {timeout_s:g}s:\n{self.log_text()}"
        )

    def log_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-2000:] for p in sorted(self.path.glob("bench-*.log"))
        )

    def close(self) -> None:
        try:
            for popen in reversed(self.processes):
                stop_process(popen)
        finally:  # even when interrupted half way: nothing outlives the home, nothing is left
            for popen in self.processes:
                if popen.poll() is None:
                    popen.kill()
                    popen.wait(5)
            for log in self._logs:
                log.close()
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
