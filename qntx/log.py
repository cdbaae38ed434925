"""Log set-up for actor processes: loguru to stderr, one line per event.

Each line carries the actor's label in brackets (``[QNTX Server]``); ``qntx up``
reads the children's stderr and fans it out to the console and to
``<home>/logs/<actor>.log``.
"""

from __future__ import annotations

import sys

from loguru import logger

# Microseconds: `qntx up` merges its actors' lines on the console by this stamp,
# so a reply logged right after the request it answers still reads after it.
FORMAT = "{time:HH:mm:ss.SSSSSS} {level: <7} [{extra[label]}] {message}"


def setup_logging(label: str, *, level: str = "INFO") -> None:
    logger.remove()
    logger.configure(extra={"label": label})
    logger.add(sys.stderr, format=FORMAT, level=level, colorize=False, backtrace=False, diagnose=False)
