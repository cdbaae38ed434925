"""The Python plugin's warm interpreter pool: running handler code in child processes.

Every test starts real child interpreters (``plugins.python.runner``) and always
closes the pool, so no test leaves a process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest

from plugins.python.pool import InterpreterPool, Outcome
from plugins.python.runner import REUSE_CPU_S
from qntx.protocol import NIL, Progress

pytestmark = pytest.mark.timeout(60)


def in_pool(body, **options):
    """Run ``await body(pool)`` on a started pool, closing the pool whatever happens."""

    async def main():
        pool = InterpreterPool(**options)
        await pool.start()
        try:
            return await body(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


async def run(pool: InterpreterPool, code: str, payload=None, **options) -> Outcome:
    """Run ``code``; the outcome with its (raw) result decoded, as a client would see it."""
    options.setdefault("timeout_s", 20)
    raw = msgspec.Raw(msgspec.msgpack.encode(payload))
    outcome = await pool.run("JB-test", code, filename="python.test", payload=raw, **options)
    return msgspec.structs.replace(outcome, result=msgspec.msgpack.decode(outcome.result))


async def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def wait_full(pool: InterpreterPool) -> None:
    await wait_until(lambda: len(pool.pids()) == pool.size and pool.idle == pool.size)


async def start_blocking_job(pool: InterpreterPool, job_id: str) -> tuple[asyncio.Task, int]:
    """Start a job that sleeps after reporting its interpreter's pid as progress."""
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    code = "import os, time\nprogress(os.getpid(), 0)\ntime.sleep(30)\n"
    task = asyncio.create_task(
        pool.run(
            job_id,
            code,
            filename="python.sleepy",
            payload=NIL,
            timeout_s=50,
            on_progress=lambda current, total: started.done() or started.set_result(int(current)),
        )
    )
    return task, await started


# --------------------------------------------------------------------- running code


def test_handler_runs_in_a_process_forked_from_a_fork_server_of_the_pool():
    async def body(pool):
        outcome = await run(pool, "import os\n_result = [os.getpid(), os.getppid()]")
        assert outcome.success
        pid, parent = outcome.result
        assert parent in pool.pids()
        assert pid != os.getpid() and pid not in pool.pids()

    in_pool(body)


def test_print_output_is_captured_per_stream():
    async def body(pool):
        code = "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n"
        outcome = await run(pool, code)
        assert outcome.success
        assert (outcome.stdout, outcome.stderr) == ("hello\n", "oops\n")
        again = await run(pool, "print('second')")
        assert again.stdout == "second\n"  # nothing carried over from the previous job

    in_pool(body)


def test_result_is_the_value_of_underscore_result():
    async def body(pool):
        outcome = await run(pool, "_result = {'n': 3, 'items': [1, 'two', None]}")
        assert outcome.success and outcome.error is None
        assert outcome.result == {"n": 3, "items": [1, "two", None]}
        assert (await run(pool, "x = 1")).result is None

    in_pool(body)


def test_result_that_is_not_msgpack_able_comes_back_as_repr_with_a_note():
    async def body(pool):
        outcome = await run(pool, "class Thing:\n    pass\n_result = Thing()")
        assert outcome.success
        assert outcome.result.startswith("<__main__.Thing object")
        assert "not MessagePack-able" in outcome.stderr

    in_pool(body)


def test_upstream_is_the_payload_and_args_come_from_it():
    async def body(pool):
        code = "_result = [upstream, args]"
        payload = {"args": ["a", "b"], "other": 1}
        assert (await run(pool, code, payload)).result == [payload, ["a", "b"]]
        assert (await run(pool, code, [1, 2])).result == [[1, 2], []]
        assert (await run(pool, code, {"args": "not a list"})).result == [
            {"args": "not a list"},
            [],
        ]

    in_pool(body)


def test_handler_code_sees_its_run_as_job_and_the_pool_says_when_it_starts():
    from plugins.python.runner import JobContext

    async def body(pool):
        started = []
        context = JobContext(id="JB-X", attempt=2, due=1_700_000_000_000, handler="python.t", lease=7)
        code = "_result = [job.id, job.attempt, job.due, job.handler, job.lease]"
        outcome = await run(pool, code, context=context, on_start=lambda: started.append(True))
        assert outcome.result == ["JB-X", 2, 1_700_000_000_000, "python.t", 7] and started == [True]
        assert (await run(pool, "_result = [job.id, job.due]")).result == ["", None]  # none given

    in_pool(body)


def test_every_job_gets_a_fresh_namespace():
    async def body(pool):
        assert (await run(pool, "leaked = 1\n_result = __name__")).result == "__main__"
        outcome = await run(pool, "_result = 'leaked' in globals()")
        assert outcome.success and outcome.result is False

    in_pool(body, size=1)  # one interpreter: both jobs certainly ran in the same process


def test_exception_fails_with_a_traceback_naming_the_handler_line():
    async def body(pool):
        code = "x = 1\ndef explode():\n    raise ValueError('bad value')\nexplode()\n"
        outcome = await run(pool, code)
        assert not outcome.success
        assert outcome.error.message == "ValueError: bad value"
        assert 'File "python.test", line 3, in explode' in outcome.error.traceback
        assert "raise ValueError('bad value')" in outcome.error.traceback  # source is quoted
        assert "runner.py" not in outcome.error.traceback

    in_pool(body)


def test_syntax_error_fails_with_its_location():
    async def body(pool):
        outcome = await run(pool, "x = 1\ndef broken(:\n")
        assert not outcome.success
        assert outcome.error.message.startswith("SyntaxError:")
        assert 'File "python.test", line 2' in outcome.error.traceback

    in_pool(body)


def test_system_exit_zero_succeeds_and_nonzero_fails():
    async def body(pool):
        ok = await run(pool, "import sys\n_result = 'done'\nsys.exit(0)")
        assert ok.success and ok.result == "done"
        bad = await run(pool, "import sys\nsys.exit(3)")
        assert not bad.success and bad.error.message == "SystemExit: 3"
        assert (await run(pool, "_result = 'still alive'")).result == "still alive"

    in_pool(body, size=1)


def test_writes_to_fd_1_do_not_break_the_protocol():
    async def body(pool):
        code = "import os, sys\nos.write(1, b'raw bytes')\nprint('x', file=sys.__stdout__)\n_result = 1"
        assert (await run(pool, code)).result == 1
        assert (await run(pool, "_result = 2")).result == 2

    in_pool(body, size=1)


def test_long_output_keeps_its_tail():
    async def body(pool):
        outcome = await run(pool, "print('x' * (3 << 20))\nprint('THE END')")
        assert outcome.success
        assert len(outcome.stdout) < (1 << 20) + 100
        assert outcome.stdout.endswith("THE END\n")
        assert "characters dropped" in outcome.stdout

    in_pool(body)


def test_progress_reaches_the_callback_and_the_outcome():
    async def body(pool):
        seen = []
        code = "for i in range(3):\n    progress(i + 1, 3)\n"
        outcome = await run(
            pool, code, on_progress=lambda current, total: seen.append((current, total))
        )
        assert outcome.success
        assert seen == [(1, 3), (2, 3), (3, 3)]
        assert outcome.progress == Progress(current=3, total=3)

    in_pool(body)


def test_attest_with_an_unreachable_ats_fails_clearly():
    async def body(pool):
        outcome = await run(pool, "attest('ALICE', 'knows', 'work')", timeout_s=30)
        assert not outcome.success
        assert outcome.error.message.startswith("Unavailable: no actor is answering at ipc://")

    in_pool(body, ats_endpoint="ipc:///nonexistent/qntx-test-ats.sock")


def test_attest_without_an_ats_endpoint_fails_clearly():
    async def body(pool):
        outcome = await run(pool, "attest('ALICE', 'knows', 'work')")
        assert not outcome.success
        assert "no ATS endpoint" in outcome.error.message

    in_pool(body)


# --------------------------------------------------------------------- every job starts clean

REPO_ROOT = str(Path(__file__).resolve().parents[2])

# (what one job changes, how the next job looks at it, what the next job must see)
TRACES = {
    "builtins": ("import builtins\nbuiltins.leaked = 1", "_result = hasattr(__builtins__, 'leaked')", False),
    "sys.modules": (
        "import sys, types\nsys.modules['leaked'] = types.ModuleType('leaked')",
        "import sys\n_result = 'leaked' in sys.modules",
        False,
    ),
    "a module imported": ("import wave", "import sys\n_result = 'wave' in sys.modules", False),
    "a module attribute": ("import json\njson.leaked = 1", "import json\n_result = hasattr(json, 'leaked')", False),
    "a thread": (
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), name='leaked').start()",
        "import threading\n_result = [t.name for t in threading.enumerate() if t.name == 'leaked']",
        [],
    ),
    "the working directory": ("import os\nos.chdir('/tmp')", "import os\n_result = os.getcwd()", REPO_ROOT),
    "the environment": (
        "import os\nos.environ['QNTX_LEAKED'] = '1'",
        "import os\n_result = os.environ.get('QNTX_LEAKED')",
        None,
    ),
    "a signal handler": (
        "import signal\nsignal.signal(signal.SIGUSR1, lambda *a: None)",
        "import signal\n_result = signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL",
        True,
    ),
    "an alarm": ("import signal\nsignal.alarm(60)", "import signal\n_result = signal.alarm(0)", 0),
    "an open file": (
        "import os\n_result = os.open('/dev/null', os.O_RDONLY)",
        "import os\ntry:\n    os.fstat(upstream or 1000)\n    _result = 'open'\nexcept OSError:\n    _result = 'closed'",
        "closed",
    ),
    "a lowered limit": (
        "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))",
        "import resource\n_result = resource.getrlimit(resource.RLIMIT_NOFILE)[1] != 64",
        True,
    ),
}


def test_a_job_that_leaves_no_trace_leaves_its_process_to_the_next_job():
    async def body(pool):
        first = await run(pool, "import os\n_result = os.getpid()")
        second = await run(pool, "import os\n_result = os.getpid()")
        assert first.result == second.result  # no fork on the way of a clean job

    in_pool(body, size=1)


@pytest.mark.parametrize("trace", TRACES)
def test_the_next_job_does_not_see_what_a_job_changed(trace):
    change, look, expected = TRACES[trace]

    async def body(pool):
        assert (await run(pool, look, None)).result == expected  # as a fresh process sees it
        changed = await run(pool, change + "\nimport os\nprogress(os.getpid(), 0)")
        assert changed.success, changed.error
        seen = await run(pool, look + "\nimport os\n_pid = os.getpid()", changed.result)
        assert seen.success, seen.error
        assert seen.result == expected

    in_pool(body, size=1)  # one fork server: every job goes to it


def test_jobs_back_to_back_each_see_a_clean_process_whatever_the_last_one_left():
    # Every other job leaves a trace: each hand-over to a spare happens while the
    # next job is already on its way, and none is lost or sees the trace.
    code = (
        "import builtins, os\n"
        "_result = [getattr(builtins, 'mark', None), os.getpid()]\n"
        "if upstream % 2:\n"
        "    builtins.mark = upstream\n"
    )

    async def body(pool):
        outcomes = await asyncio.gather(*(run(pool, code, n) for n in range(40)))
        assert all(o.success for o in outcomes), [o.error for o in outcomes if not o.success]
        assert [o.result[0] for o in outcomes] == [None] * 40
        assert len({o.result[1] for o in outcomes}) >= 20  # a new process after each odd job

    in_pool(body, size=2)


def test_fresh_process_mode_runs_every_job_in_a_new_process():
    async def body(pool):
        pids = [(await run(pool, "import os\n_result = os.getpid()")).result for _ in range(3)]
        assert len(set(pids)) == 3

    in_pool(body, size=1, fresh=True)


def test_limits_are_hard_and_handler_code_cannot_raise_them():
    code = (
        "import resource\n"
        "names = ['RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_FSIZE']\n"
        "_result = {}\n"
        "for name in names:\n"
        "    which = getattr(resource, name)\n"
        "    soft, hard = resource.getrlimit(which)\n"
        "    try:\n"
        "        resource.setrlimit(which, (hard, resource.RLIM_INFINITY))\n"
        "        raised = True\n"
        "    except (ValueError, OSError):\n"
        "        raised = False\n"
        "    _result[name] = [soft, hard, raised]\n"
    )

    async def body(pool):
        outcome = await run(pool, code, cpu_s=3)
        assert outcome.success, outcome.error
        limits = outcome.result
        soft, hard, _ = limits["RLIMIT_CPU"]
        assert (soft, hard) == (3 + REUSE_CPU_S, 3 + REUSE_CPU_S + 1)
        assert limits["RLIMIT_AS"][:2] == [200 << 20, 200 << 20]
        assert limits["RLIMIT_FSIZE"][:2] == [1 << 20, 1 << 20]
        assert limits["RLIMIT_NPROC"][0] == limits["RLIMIT_NPROC"][1] > 0
        assert [raised for _, _, raised in limits.values()] == [False] * 4  # even as root

    in_pool(body, size=1, memory_mb=200, file_mb=1, processes=10)


def test_writing_past_the_file_size_limit_fails_the_write_not_the_process(tmp_path):
    code = f"open({str(tmp_path / 'big')!r}, 'wb').write(b'x' * (2 << 20))"

    async def body(pool):
        outcome = await run(pool, code)
        assert not outcome.success
        assert outcome.error.message.startswith("OSError: [Errno 27] File too large")
        assert (await run(pool, "_result = 1")).result == 1

    in_pool(body, size=1, file_mb=1)


def test_a_job_that_ignores_sigxcpu_is_killed_at_the_hard_cpu_limit():
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"

    async def body(pool):
        outcome = await run(pool, code, timeout_s=40, cpu_s=1)
        assert not outcome.success
        assert outcome.error.message == "interpreter died (killed by SIGKILL)"
        assert (await run(pool, "_result = 1")).result == 1

    in_pool(body, size=1)


# --------------------------------------------------------------------- limits and faults


def test_timeout_kills_the_interpreter_and_the_pool_recovers():
    async def body(pool):
        (old_pid,) = pool.pids()
        outcome = await run(pool, "while True:\n    pass\n", timeout_s=0.5)
        assert not outcome.success
        assert outcome.error.message == "timed out after 0.5s"
        after = await run(pool, "import os\n_result = os.getppid()")
        assert after.success and after.result != old_pid
        await wait_full(pool)
        assert pool.pids() == [after.result]

    in_pool(body, size=1)


def test_killed_interpreter_fails_its_job_and_is_replaced():
    async def body(pool):
        task, pid = await start_blocking_job(pool, "JB-victim")
        os.kill(pid, signal.SIGKILL)
        outcome = await task
        assert not outcome.success
        assert outcome.error.message == "interpreter died (killed by SIGKILL)"
        await wait_full(pool)
        assert pid not in pool.pids()
        assert (await run(pool, "_result = 'ok'")).result == "ok"

    in_pool(body, size=2)


def test_an_idle_job_process_that_dies_costs_no_later_job():
    async def body(pool):
        for _ in range(5):
            pid = (await run(pool, "import os\n_result = os.getpid()")).result
            os.kill(pid, signal.SIGKILL)  # between two jobs
            # (A job sent while it is dying could still go to it and fail: as with any
            # process that dies under a job, Pulse runs it again.)
            await wait_until(lambda p=pid: not os.path.exists(f"/proc/{p}"))  # reaped by its server
            outcome = await run(pool, "import os\n_result = os.getpid()")
            assert outcome.success, outcome.error
            assert outcome.result != pid

    in_pool(body, size=1)


def test_idle_interpreter_that_dies_is_replaced():
    async def body(pool):
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        await wait_until(lambda: victim not in pool.pids())
        await wait_full(pool)
        results = await asyncio.gather(*(run(pool, "_result = 1") for _ in range(4)))
        assert all(outcome.success for outcome in results)

    in_pool(body, size=2)


def test_cpu_limit_kills_a_busy_loop():
    async def body(pool):
        outcome = await run(pool, "while True:\n    pass\n", timeout_s=30, cpu_s=1)
        assert not outcome.success
        assert "CPU time limit exceeded" in outcome.error.message
        assert (await run(pool, "_result = sum(range(1000))")).result == 499500

    in_pool(body, size=1)


def test_memory_limit_stops_a_huge_allocation_and_the_pool_recovers():
    async def body(pool):
        outcome = await run(pool, "block = bytearray(1 << 30)")
        assert not outcome.success
        assert "MemoryError" in outcome.error.message or "interpreter died" in outcome.error.message
        assert (await run(pool, "_result = len(bytearray(1 << 20))")).result == 1 << 20

    in_pool(body, size=1, memory_mb=200)


def test_cancel_kills_a_running_job_and_drops_a_waiting_one():
    async def body(pool):
        running, pid = await start_blocking_job(pool, "JB-running")
        waiting = asyncio.create_task(run(pool, "_result = 'never'"))
        await asyncio.sleep(0.05)
        assert pool.busy == 1
        assert await pool.cancel("JB-test") is True  # the waiting one: it never runs
        assert (await waiting).error.message == "cancelled"
        assert await pool.cancel("JB-running") is True
        outcome = await running
        assert not outcome.success and outcome.error.message == "cancelled"
        assert await pool.cancel("JB-unknown") is False
        await wait_full(pool)
        assert pid not in pool.pids()

    in_pool(body, size=1)


# --------------------------------------------------------------------- scheduling


def test_two_interpreters_run_two_jobs_in_parallel_and_more_wait_their_turn():
    async def body(pool):
        code = "import time\ntime.sleep(0.5)\n_result = 1"
        started = time.monotonic()
        assert [o.result for o in await asyncio.gather(run(pool, code), run(pool, code))] == [1, 1]
        assert time.monotonic() - started < 0.9  # about one sleep, not two

        started = time.monotonic()
        outcomes = await asyncio.gather(*(run(pool, code) for _ in range(4)))
        assert all(o.success for o in outcomes)
        assert time.monotonic() - started >= 1.0  # four jobs on two interpreters: two rounds

    in_pool(body, size=2)


def test_close_reaps_every_interpreter():
    async def body(pool):
        pids = pool.pids()
        assert len(pids) == 3
        await pool.close()
        for pid in pids:
            with pytest.raises(ProcessLookupError):  # reaped, not a zombie
                os.kill(pid, 0)
        outcome = await run(pool, "_result = 1")
        assert outcome.error.message == "interpreter pool closed"

    in_pool(body, size=3)


def test_warm_round_trip_time(capsys):
    async def body(pool):
        for _ in range(50):  # warm up: compile cache, allocator
            await run(pool, "_result = 1")
        count = 2000
        started = time.perf_counter()
        for _ in range(count):
            outcome = await run(pool, "_result = 1")
        elapsed = time.perf_counter() - started
        assert outcome.success and outcome.result == 1
        with capsys.disabled():
            print(f"\nwarm interpreter round trip: {elapsed / count * 1e6:.0f} us per trivial job")

    in_pool(body, size=1)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] == "Z"  # dead, waiting to be reaped
    except FileNotFoundError:
        return True


def test_processes_a_handler_leaves_running_die_when_its_job_ends():
    code = "import subprocess\np = subprocess.Popen(['sleep', '300'])\n_result = p.pid\n"

    async def body(pool):
        outcome = await run(pool, code)
        assert outcome.success, outcome.error
        await wait_until(lambda: gone(outcome.result), timeout_s=10)
        assert (await run(pool, "_result = 1")).result == 1  # the next job, in a clean process

    in_pool(body, size=1)
