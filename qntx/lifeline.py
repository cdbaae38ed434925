"""Child processes that cannot outlive their parent.

``die_with_parent`` runs in a child between fork and exec: it asks the kernel
to SIGKILL the child when its parent dies (however the parent dies, kill -9
included) and puts the child in a process group of its own, so a Ctrl-C on the
terminal reaches only the parent and the whole group can be killed at once.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal

PR_SET_PDEATHSIG = 1


def _prctl_function():
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Loaded and looked up once, at import, in the parent: ``die_with_parent`` runs between
# fork and exec, where a dlopen or a symbol lookup can hang on a lock that another
# thread of the parent held at the fork (the parent's threads do not exist there).
_PRCTL = _prctl_function()


def prctl(option: int, value: int) -> None:
    """Linux's prctl(2); elsewhere nothing (children are still stopped on a clean shutdown)."""
    if _PRCTL is not None:
        _PRCTL(option, value)


def die_with_parent() -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpgid(0, 0)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (what its code started, too)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


M_MMAP_THRESHOLD = -3  # mallopt(3)


def give_big_blocks_back() -> None:
    """Serve every allocation of 128 KiB or more with its own mapping, returned to the
    kernel when freed. glibc otherwise raises that threshold after the first big free,
    so one 10 MB payload would keep the actor's memory high long after it is gone."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def freeze_what_lives_on() -> None:
    """Keep what a process made before its loop (modules, classes, its store and
    sockets) out of the cycle collector's walks. They live as long as the process,
    yet each full collection visits every one of them; a burst of records held
    briefly (an ATS group waiting for its index write) starts full collections
    often: they were about 30% of the ATS's CPU samples under bulk writes."""
    gc.collect()
    gc.freeze()
