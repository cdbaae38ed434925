"""What a handler job leaves behind in its process, so a process that ran one job is
trusted with the next only if the job left nothing another job could see.

``Traces`` takes a baseline in a fresh job process (just forked, the fork server's
state) and, after each job, names the first trace it finds: an event the process
saw while the job ran (an import, ``os.chdir``, an environment change, a lowered
limit, ``ctypes``, a trace or profile function, a new audit hook) or a difference
from the baseline in ``builtins``, ``sys.modules``, the attribute names of any
loaded module, the threads, the working directory, the environment, the umask,
signal handlers, the interpreter's hooks and settings, open file descriptors, and
processes still running. ``plugins.python.forkserver`` retires a process with a
trace and gives the next job a fresh one.

This is isolation for ordinary handler code, not a sandbox: code that sets out to
hide a change (say, replacing an attribute of an already imported module in place)
can. The ``python_fresh_process`` setting runs every job in a fresh process instead,
at the cost of a fork per job.
"""

from __future__ import annotations

import _thread
import builtins
import gc
import operator
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

# Audit events after which a process is never reused.
TRACE_EVENTS = frozenset(
    {
        "import",  # a module loaded (a cached import raises no event)
        "os.chdir",
        "os.putenv",
        "os.unsetenv",
        "os.fork",
        "os.forkpty",
        "signal.pthread_kill",
        "resource.setrlimit",
        "resource.prlimit",
        "sys.settrace",
        "sys.setprofile",
        "sys.addaudithook",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.addressof",
        "ctypes.cdata",
        "ctypes.call_function",
        "object.__setattr__",  # an attribute of a class (type) changed
        "object.__delattr__",
    }
)
# After these a process may still be running: look for one.
SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system", "os.exec", "pty.spawn"}
)
# After these a file or socket may still be open: count the descriptors (os.open
# raises "open" too; what opens one without an event, like os.pipe, is not seen).
OPEN_EVENTS = frozenset({"open", "socket.__new__"}) | SPAWN_EVENTS
# Calls that change process state no audit event reports: wrapped in each job process.
WRAPPED = (
    (signal, ("signal", "alarm", "setitimer", "siginterrupt", "set_wakeup_fd", "pthread_sigmask")),
    (os, ("umask",)),
)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _interpreter() -> tuple:
    return (
        sys.getrecursionlimit(),
        sys.getswitchinterval(),
        tuple(sys.path),
        tuple(sys.meta_path),
        tuple(sys.path_hooks),
        sys.displayhook,
        sys.excepthook,
        sys.unraisablehook,
        sys.breakpointhook,
        threading.excepthook,
        gc.isenabled(),
        gc.get_threshold(),
        len(gc.callbacks),
        sys.stdin,
    )


class Snapshot:
    """A dict's keys and the identity of its values (a replaced value is a change)."""

    def __init__(self, watched: dict):
        self._watched = watched
        self._keys = list(watched)
        self._values = list(watched.values())

    def changed(self) -> bool:
        now = self._watched
        return not (
            len(now) == len(self._keys)
            and all(map(operator.is_, now.values(), self._values))
            and list(now) == self._keys
        )


# name -> a probe whose value must not change across a job.
PROBES: dict[str, Callable[[], Any]] = {
    "the threads": lambda: (_thread._count(), threading.active_count()),
    "the working directory": os.getcwd,
    "the environment": lambda: len(os.environ),  # a change to it raises os.putenv/os.unsetenv
    "interpreter settings or hooks": _interpreter,
}


class Traces:
    def __init__(self) -> None:
        self._event: str | None = None
        self._spawned = self._opened = False
        sys.addaudithook(self._audit)  # for the life of this process: it cannot be removed
        for module, names in WRAPPED:
            for name in names:
                setattr(
                    module, name, self._noting(f"{module.__name__}.{name}", getattr(module, name))
                )
        self._builtins = Snapshot(vars(builtins))
        self._modules = Snapshot(sys.modules)
        self._module_dicts = [vars(m) for m in sys.modules.values() if hasattr(m, "__dict__")]
        self._module_sizes = list(map(len, self._module_dicts))
        self._baseline = {name: probe() for name, probe in PROBES.items()}
        self._files = _fds()

    def _noting(self, event: str, call: Callable) -> Callable:
        def noted(*args, **kwargs):
            self._event = self._event or event
            return call(*args, **kwargs)

        noted.__name__, noted.__doc__ = call.__name__, call.__doc__
        return noted

    def _audit(self, event: str, args: tuple) -> None:
        if self._event is None and event in TRACE_EVENTS:
            self._event = event
        if event in OPEN_EVENTS:
            self._opened = True
            self._spawned = self._spawned or event in SPAWN_EVENTS

    def left(self) -> str | None:
        """The first trace the jobs so far left, or None if the process is as it was."""
        if self._event is not None:
            return f"event {self._event}"
        if self._builtins.changed():
            return "builtins"
        if self._modules.changed():
            return "sys.modules"
        if list(map(len, self._module_dicts)) != self._module_sizes:
            return "module attributes"
        for name, probe in PROBES.items():
            if probe() != self._baseline[name]:
                return name
        if self._opened and _fds() != self._files:
            return "open files"
        if self._spawned and children(os.getpid()):
            return "running processes"
        return None


def children(pid: int) -> list[int]:
    """The pids of a process's children (those of its main thread)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []
