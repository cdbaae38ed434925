"""The fixed rules of Pulse's jobs: what a valid submission is, how long a run may
hold its lease, how retries back off and how much of a job's output is kept.

Pure functions and constants, shared by the core (``qntx.pulse.core``) and its
tests; nothing here keeps state.
"""

from __future__ import annotations

import math

from qntx.errors import Invalid, TooLarge
from qntx.obs.trace import MAX_TRACEPARENT
from qntx.protocol import AFTER_POLICIES, PLUGIN_DEPTH, Submit
from qntx.values import is_int

LEASE_GRACE_MS = 5_000  # a worker gets this long past timeout_s to report before we give up
MAX_LOG_BYTES = 64 << 10
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: past that a job is a service, not a job
MAX_PRIORITY = 2**62
MAX_ATTEMPTS = 1000
MAX_KEY_BYTES = 400  # idempotency keys and job ids: LMDB keys stop at 511 bytes
# Runs lost to infrastructure (a worker, plugin or server going away) use no attempt;
# past this many extra runs a job that keeps taking its runner down fails anyway.
MAX_LOST_RUNS = 25
MAX_AFTER = 1000  # jobs one job may run after
MAX_RUN_AT = 253_402_300_800_000  # ms: 10000-01-01T00:00Z, the first time no calendar date holds
BACKOFF_BASE_MS = 500
BACKOFF_MAX_MS = 60_000


def lease_ms(timeout_s: float) -> int:
    """How long a run may hold its lease before it counts as lost: a plugin may hold
    the job behind others that each run to their timeout (``PLUGIN_DEPTH``), plus a
    grace for reporting back."""
    return int(timeout_s * 1000 * PLUGIN_DEPTH) + LEASE_GRACE_MS


def backoff_ms(attempts: int, base_ms: int = BACKOFF_BASE_MS, max_ms: int = BACKOFF_MAX_MS) -> int:
    """The wait before attempt ``attempts + 1``: doubling from ``base_ms``, capped."""
    exponent = min(max(attempts - 1, 0), 30)
    return min(base_ms * 2**exponent, max_ms)


def bound_logs(text: str, limit: int = MAX_LOG_BYTES) -> str:
    """``text`` if it fits in ``limit`` bytes, else its tail behind a marker line."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    tail = data[-(limit - 100) :].decode("utf-8", "ignore")  # 100 bytes leave room for the marker
    dropped = len(data) - len(tail.encode())
    return f"[... {dropped} bytes of earlier output dropped ...]\n{tail}"


def _check_key(name: str, value: object) -> None:
    if value is not None and (
        not isinstance(value, str) or not value or "\x00" in value or len(value.encode()) > MAX_KEY_BYTES
    ):
        raise Invalid(f"{name} must be a non-empty string of at most {MAX_KEY_BYTES} bytes without NUL")


def check_submit(spec: Submit, max_payload_bytes: int) -> None:
    """Raise Invalid (or TooLarge) unless ``spec`` is a job Pulse can accept."""
    if not isinstance(spec, Submit):
        raise Invalid(f"expected a Submit, got {type(spec).__name__}")
    if not isinstance(spec.handler, str) or not spec.handler.strip():
        raise Invalid(f"handler must be a non-empty string, got {spec.handler!r}")
    if not is_int(spec.priority) or abs(spec.priority) > MAX_PRIORITY:
        raise Invalid(f"priority must be an integer within ±{MAX_PRIORITY}, got {spec.priority!r}")
    if not is_int(spec.max_attempts) or not 1 <= spec.max_attempts <= MAX_ATTEMPTS:
        raise Invalid(f"max_attempts must be an integer from 1 to {MAX_ATTEMPTS}, got {spec.max_attempts!r}")
    timeout = spec.timeout_s
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not (0 < timeout <= MAX_TIMEOUT_S and math.isfinite(timeout))
    ):
        raise Invalid(f"timeout_s must be a number of seconds > 0 and <= {MAX_TIMEOUT_S}, got {timeout!r}")
    _check_key("idempotency_key", spec.idempotency_key)
    _check_key("id", spec.id)
    if spec.trace is not None and (not isinstance(spec.trace, str) or len(spec.trace) > MAX_TRACEPARENT):
        raise Invalid(f"trace must be a W3C traceparent of at most {MAX_TRACEPARENT} characters")
    if spec.parent_id is not None and not isinstance(spec.parent_id, str):
        raise Invalid(f"parent_id must be a string, got {spec.parent_id!r}")
    size = len(spec.payload)
    if size > max_payload_bytes:
        raise TooLarge(f"payload of {size} bytes exceeds max_payload_bytes ({max_payload_bytes})")
    if spec.run_at is not None and (not is_int(spec.run_at) or not 0 <= spec.run_at < MAX_RUN_AT):
        raise Invalid(f"run_at must be a time in Unix ms before the year 10000, got {spec.run_at!r}")
    if not isinstance(spec.after, list) or len(spec.after) > MAX_AFTER:
        raise Invalid(f"after must be a list of at most {MAX_AFTER} job ids")
    for job_id in spec.after:
        _check_key("a job id in after", job_id)
    if spec.after_policy not in AFTER_POLICIES:
        raise Invalid(f"after_policy must be one of {', '.join(AFTER_POLICIES)}, got {spec.after_policy!r}")
    _check_key("version", spec.version)
