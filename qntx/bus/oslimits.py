"""The operating system's limits on an actor's files, raised where the OS allows.

Every socket holds at least one file (its mailbox), so the open-file limit bounds
the sockets an actor may open too; ``Actor`` raises it at start and sizes its
context's socket limit from it.
"""

from __future__ import annotations

import os
import resource

from loguru import logger

# An open-file limit the OS calls unlimited is taken as this many (sockets too).
UNLIMITED_FILES = 1 << 20


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard maximum; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED_FILES
    wanted = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:  # e.g. over the kernel's nr_open
        logger.warning("could not raise the open-file limit from {} to {}: {}", soft, wanted, exc)
        return soft
    return wanted


def open_file_count() -> int:
    """How many files this process has open now (0 where /proc is absent)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0
