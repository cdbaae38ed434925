"""Log set-up for actor processes: loguru to stderr, one line per event.

Each line carries the actor's label (``[QNTX Server]``); ``qntx up`` reads the
children's stderr and fans it out to the console and to ``<home>/logs/<actor>.log``.
``log_format = "json"`` makes each line one JSON object instead (loguru's own
serialisation: ``{"text": …, "record": {…}}``), whose ``record.extra`` holds the
``actor`` and, on lines about one run, its ``job``, ``lease``, ``handler`` and
``trace_id`` (``job_context``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from loguru import logger

from qntx.obs.trace import trace_id_of

# Microseconds: `qntx up` merges its actors' lines on the console by this stamp,
# so a reply logged right after the request it answers still reads after it.
FORMAT = "{time:HH:mm:ss.SSSSSS} {level: <7} [{extra[actor]}] {message}"


_structured = False  # JSON lines: the fields of a run go with each line about it
_NOTHING = contextlib.nullcontext()


def setup_logging(label: str, *, level: str = "INFO", log_format: str = "text") -> None:
    global _structured
    _structured = log_format == "json"
    logger.remove()
    logger.configure(extra={"actor": label})
    if log_format == "json":
        logger.add(sys.stderr, format="{message}", serialize=True, level=level, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, format=FORMAT, level=level, colorize=False, backtrace=False, diagnose=False)


def job_context(job_id: str, lease: int, handler: str, trace: str | None = None) -> dict[str, Any]:
    """The fields a log line about one run carries (bound or contextualized)."""
    fields: dict[str, Any] = {"job": job_id, "lease": lease, "handler": handler}
    trace_id = trace_id_of(trace)
    if trace_id is not None:
        fields["trace_id"] = trace_id
    return fields


def about_run(job_id: str, lease: int, handler: str, trace: str | None = None) -> contextlib.AbstractContextManager:
    """Lines logged inside carry the run's fields (``job_context``) where a line can
    show them (JSON lines); text lines cannot, and pay nothing for it."""
    if not _structured:
        return _NOTHING
    return logger.contextualize(**job_context(job_id, lease, handler, trace))
