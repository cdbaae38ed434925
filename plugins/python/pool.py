"""The warm pool of fork servers that runs handler code for the Python plugin.

It owns the fork servers' lives: spawning ``size`` of them ahead of need, handing
each job to an idle one (jobs beyond ``size`` wait their turn, first come first
served), enforcing the wall-clock timeout, cancelling, and replacing any that dies
or is killed, in the background so the pool returns to full size. Each fork server
(``plugins.python.forkserver``) runs every job in a clean process of its own, so a
job that crashes or breaks a limit costs only that process. Handler code never runs
in this process; ``plugins.python.runner`` is what runs inside a job's process, and
``plugins.python.channel`` is this side of the pipes to a fork server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from loguru import logger

from plugins.python.channel import Died, Interpreter, JobDied
from plugins.python.runner import JobContext, RunJob, RunResult
from qntx.lifeline import die_with_parent, kill_group
from qntx.protocol import NIL, TIMED_OUT, JobError, Progress

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0  # a cold interpreter start, on a loaded machine
CLOSE_GRACE_S = 1.0  # how long close() lets a busy runner finish before killing it
EXIT_GRACE_S = 0.5  # after a child exits, how long its last frames may still be in flight
RESPAWN_MAX_DELAY_S = 10.0


class Outcome(msgspec.Struct):
    """How one run ended: what the plugin reports in its ``JobDone``."""

    success: bool
    result: msgspec.Raw = NIL
    error: JobError | None = None
    stdout: str = ""
    stderr: str = ""
    progress: Progress | None = None


def _failure(message: str, progress: Progress | None = None) -> Outcome:
    return Outcome(success=False, error=JobError(message=message), progress=progress)


def describe_exit(returncode: int) -> str:
    """Why a child ended, in words fit for a job's error message."""
    if returncode >= 0:
        return f"interpreter died (exit code {returncode})"
    if -returncode == signal.SIGXCPU:
        return "CPU time limit exceeded (killed by SIGXCPU)"
    try:
        return f"interpreter died (killed by {signal.Signals(-returncode).name})"
    except ValueError:
        return f"interpreter died (killed by signal {-returncode})"


class InterpreterPool:
    """``size`` warm child interpreters; ``run`` executes one handler job on one of them."""

    def __init__(
        self,
        size: int = 2,
        *,
        memory_mb: int = 1024,
        file_mb: int = 0,
        processes: int = 0,
        fresh: bool = False,
        ats_endpoint: str = "",
        keys_dir: str = "",
        insecure: bool = False,
        python: str = sys.executable,
    ):
        if size < 1:
            raise ValueError("an interpreter pool needs at least one interpreter")
        self._size = size
        self._limits = ("--memory-mb", str(memory_mb), "--file-mb", str(file_mb))
        self._limits += ("--processes", str(processes)) if processes > 0 else ()
        self._limits += ("--fresh",) if fresh else ()
        self._ats_endpoint = ats_endpoint
        self._keys = {"keys_dir": keys_dir, "insecure": insecure}  # how handler code reaches ATS
        self._python = python
        self._live: set[Interpreter] = set()  # spawned and not yet reaped
        self._idle: deque[Interpreter] = deque()
        self._waiters: deque[asyncio.Future] = deque()  # run() calls waiting for an interpreter
        self._waiting: dict[str, asyncio.Future] = {}  # job id -> its waiter
        self._running: dict[str, Interpreter] = {}  # job id -> interpreter running it
        self._tasks: set[asyncio.Task] = set()  # reapers and respawners
        self._closed = False

    def use_ats(self, endpoint: str) -> None:
        """Handler code of the runs from now on attests at ``endpoint`` (a server that
        took over serves its ATS elsewhere)."""
        self._ats_endpoint = endpoint

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return sum(1 for interp in self._idle if interp.usable)

    @property
    def busy(self) -> int:
        return len(self._running)

    def pids(self) -> list[int]:
        return sorted(i.proc.pid for i in self._live if i.proc.returncode is None)

    async def start(self) -> None:
        try:
            for interp in await asyncio.gather(*(self._spawn() for _ in range(self._size))):
                self._release(interp)
        except BaseException:
            await self.close()
            raise

    async def run(
        self,
        job_id: str,
        code: str,
        *,
        filename: str,
        payload: msgspec.Raw,
        timeout_s: float,
        cpu_s: int = 600,
        on_progress: Callable[[float, float], None] | None = None,
        on_output: Callable[[str, str], None] | None = None,
        on_start: Callable[[], None] | None = None,
        context: JobContext | None = None,
        on_marks: Callable[[list], None] | None = None,
    ) -> Outcome:
        """Run ``code`` in a free interpreter (waiting for one); ``on_start`` is called
        once it has one and the job is sent: the handler's code starts then."""
        interp = await self._acquire(job_id)
        if interp is None:
            return _failure("interpreter pool closed" if self._closed else "cancelled")
        self._running[job_id] = interp
        reply = interp.expect(on_progress, on_output)
        job = RunJob(
            job_id=job_id,
            code=code,
            filename=filename,
            payload=payload,
            cpu_s=cpu_s,
            traced=on_marks is not None,
            ats_endpoint=self._ats_endpoint,
            **self._keys,
            context=context or JobContext(),
        )
        timeout = f"{TIMED_OUT} {timeout_s:g}s"
        timer = asyncio.get_running_loop().call_later(timeout_s, interp.kill, timeout)
        try:
            interp.send(job)
            if on_start is not None:
                on_start()
            message: RunResult = await reply
        except JobDied as died:  # that job's process only: the fork server serves on
            self._release(interp)
            return _failure(describe_exit(died.returncode), interp.last_progress)
        except Died:
            # Unless we killed it, wait for the exit status: it names the cause.
            reason = interp.kill_reason or describe_exit(await interp.proc.wait())
            return _failure(reason, interp.last_progress)
        except BaseException:
            # run() itself was cancelled: the child is mid-job and can never be reused.
            interp.kill("run cancelled")
            raise
        finally:
            timer.cancel()
            if self._running.get(job_id) is interp:
                del self._running[job_id]
        self._release(interp)
        if on_marks is not None and message.marks:
            on_marks(message.marks)
        return Outcome(
            success=message.success,
            result=message.result,
            error=message.error,
            stdout=message.stdout,
            stderr=message.stderr,
            progress=interp.last_progress,
        )

    def runs(self) -> list[str]:
        """The runs running or waiting for an interpreter."""
        return [*self._running, *self._waiting]

    async def cancel(self, job_id: str) -> bool:
        """Stop a job: kill the interpreter running it, or drop it from the wait line."""
        interp = self._running.get(job_id)
        if interp is not None:
            interp.kill("cancelled")
            return True
        waiter = self._waiting.get(job_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
            return True
        return False

    async def close(self) -> None:
        """Stop every child and reap it; jobs still running fail."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        # From here on close() reaps the children itself and nothing is respawned.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # EOF on its input makes an idle runner exit at once; a busy one after its job.
        for interp in self._live:
            interp.close_input()
        procs = [interp.proc for interp in self._live]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), CLOSE_GRACE_S)
        except TimeoutError:
            for interp in list(self._live):
                interp.kill("interpreter pool closed")
            await asyncio.gather(*(p.wait() for p in procs))
        for proc in procs:  # what handler code started lives on in the runner's group
            kill_group(proc.pid)
        self._live.clear()

    # ----------------------------------------------------------------- internals

    async def _acquire(self, job_id: str) -> Interpreter | None:
        """An idle interpreter, waiting in line for one; None if cancelled or closed."""
        while not self._closed:
            while self._idle:
                interp = self._idle.popleft()
                if interp.usable:
                    return interp
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._waiting[job_id] = waiter
            try:
                interp = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._release(waiter.result())  # handed over just as we were cancelled
                raise
            finally:
                if self._waiting.get(job_id) is waiter:
                    del self._waiting[job_id]
            if interp is None:
                return None
            if interp.usable:
                return interp
        return None

    def _release(self, interp: Interpreter) -> None:
        """Give a free interpreter to the longest-waiting run(), or park it idle."""
        if self._closed or not interp.usable:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(interp)
                return
        self._idle.append(interp)

    async def _spawn(self) -> Interpreter:
        interp = Interpreter()
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        try:
            interp.proc = await asyncio.create_subprocess_exec(
                *(self._python, "-m", "plugins.python.forkserver", *self._limits),
                *("--rfd", str(child_in), "--wfd", str(child_out)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(child_in, child_out),
                preexec_fn=die_with_parent,  # no orphaned handler code if the plugin dies
                cwd=REPO_ROOT,
                env=env,
            )
        except BaseException:
            os.close(to_child)
            os.close(from_child)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        self._live.add(interp)
        self._background(self._reap(interp))
        await interp.connect(from_child, to_child)
        try:
            await asyncio.wait_for(interp.expect(), READY_TIMEOUT_S)
        except (Died, TimeoutError):
            interp.kill("failed to start")
            cause = describe_exit(await interp.proc.wait())
            raise RuntimeError(f"python interpreter failed to start: {cause}") from None
        interp.in_service = True
        return interp

    async def _reap(self, interp: Interpreter) -> None:
        """Wait for a child to exit, forget it, and start its replacement."""
        await interp.proc.wait()
        self._live.discard(interp)
        if interp in self._idle:
            self._idle.remove(interp)
        interp.close_input()
        # Normally EOF on the pipe ends a pending job; this covers a pipe still held open.
        asyncio.get_running_loop().call_later(EXIT_GRACE_S, interp.fail_pending)
        if interp.in_service and not self._closed:
            self._background(self._respawn())

    def _background(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # a strong reference, and a handle for close()
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                self._release(await self._spawn())
                return
            except Exception as exc:
                logger.warning(
                    "could not replace a python interpreter ({}); retry in {:g}s", exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESPAWN_MAX_DELAY_S)
