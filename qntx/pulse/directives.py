"""Handler limits and periodic schedules: what they are, stored as attestations.

Both are attestations in context ``pulse``, so they are durable, versioned data
like handlers, and Pulse follows them live from the ATS event stream:

* ``[HANDLER] limit pulse``: ``attributes`` ``concurrency`` (at most N running at
  once) and/or ``rate`` + ``per_ms`` (at most N starts in any window of per_ms).
* ``[NAME] schedule pulse``: ``attributes`` ``handler``, ``every_ms`` or ``cron``
  (+ ``tz``), ``payload``, ``missed`` (``skip`` or ``once``), ``paused``,
  ``priority``, ``max_attempts``, ``timeout_s``.

The newest attestation per name wins; ``attributes.deleted`` removes it. Nothing
here does I/O; the pure schedule arithmetic (next due time, firing ids) is here so
the CLI shows exactly the times Pulse will use.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from qntx.ats.current import latest_per
from qntx.errors import Invalid
from qntx.protocol import Attestation, Filter, NewAttestation, ScheduleState, Submit
from qntx.pulse.rules import check_submit
from qntx.values import is_int

CONTEXT = "pulse"
LIMIT = "limit"
SCHEDULE = "schedule"
DIRECTIVES_FILTER = Filter(predicates=[LIMIT, SCHEDULE], contexts=[CONTEXT])
MISSED_POLICIES = ("once", "skip")
MIN_EVERY_MS = 100
MAX_EVERY_MS = 10 * 366 * 86_400_000
MAX_SCHEDULE_PAYLOAD_BYTES = 64 << 10  # a schedule's payload lives in an attestation
# A due time the loop reaches this late was missed (the bus was down), not just busy.
MISSED_AFTER_MS = 2_000
FIRINGS_KEPT = 20
NAME_PATTERN = re.compile(r"^[^\W\d][\w.-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Limit:
    concurrency: int | None = None
    rate: int | None = None
    per_ms: int = 1_000


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    handler: str
    every_ms: int | None = None
    cron: str | None = None
    tz: str = "UTC"
    payload: bytes = b"\xc0"  # MessagePack (nil)
    missed: str = "once"
    paused: bool = False
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    anchor: int = 0  # wall ms every_ms counts from (the attestation's time)

    def next_due(self, after: int) -> int:
        """The first due time strictly after ``after`` (wall ms)."""
        if self.every_ms is not None:
            if after < self.anchor:
                return self.anchor
            return self.anchor + ((after - self.anchor) // self.every_ms + 1) * self.every_ms
        # Cron times are whole minutes, and CronSim yields those strictly after its start.
        start = datetime.fromtimestamp(after // 1000, tz=ZoneInfo(self.tz))
        return int(next(iter(CronSim(self.cron, start))).timestamp()) * 1000

    def latest_due(self, due: int, now: int) -> int:
        """The last due time at or before ``now``, from ``due`` (one at or before it) on."""
        if self.every_ms is not None:
            return max(due, self.anchor + (now - self.anchor) // self.every_ms * self.every_ms)
        for _ in range(100_000):  # cron times are minutes apart: 100,000 of them span two months
            following = self.next_due(due)
            if following > now:
                break
            due = following
        return due

    def upcoming(self, after: int, count: int) -> list[int]:
        times, at = [], after
        for _ in range(count):
            at = self.next_due(at)
            times.append(at)
        return times


def firing_id(name: str, due: int) -> str:
    """The id of the job a schedule's firing at ``due`` enqueues: the same for the
    same firing on any server, so it can never be enqueued twice."""
    digest = hashlib.blake2b(f"{name}\x00{due}".encode(), digest_size=8).hexdigest().upper()
    return f"JB-SC-{digest}"


# ----------------------------------------------------------------- from attestations


def _positive_int(attributes: dict, key: str) -> int | None:
    value = attributes.get(key)
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise Invalid(f"{key} must be a whole number >= 1, got {value!r}")
    return value


def parse_limit(attributes: dict) -> Limit | None:
    """The limit an attestation sets; None if it removes it."""
    if attributes.get("deleted"):
        return None
    concurrency = _positive_int(attributes, "concurrency")
    rate = _positive_int(attributes, "rate")
    per_ms = _positive_int(attributes, "per_ms") or 1_000
    if concurrency is None and rate is None:
        return None
    return Limit(concurrency=concurrency, rate=rate, per_ms=per_ms)


def check_cron(expression: str, tz: str = "UTC") -> None:
    zone = check_tz(tz)
    try:
        CronSim(expression, datetime.now(zone))
    except CronSimError as exc:
        raise Invalid(f"not a cron expression {expression!r}: {exc}") from None


def check_tz(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid(f"unknown time zone {tz!r}; use a name like UTC or Europe/Berlin") from None


def parse_schedule(name: str, attributes: dict, stamped: int) -> Schedule | None:
    """The schedule an attestation defines; None if it deletes it."""
    if attributes.get("deleted"):
        return None
    handler = attributes.get("handler")
    if not isinstance(handler, str) or not handler:
        raise Invalid("a schedule needs a handler")
    every, cron = attributes.get("every_ms"), attributes.get("cron")
    if (every is None) == (cron is None):
        raise Invalid("a schedule needs exactly one of every or cron")
    if every is not None and (not is_int(every) or not MIN_EVERY_MS <= every <= MAX_EVERY_MS):
        raise Invalid(f"every must be from {MIN_EVERY_MS} ms to 10 years, got {every!r}")
    tz = attributes.get("tz") or "UTC"
    if not isinstance(tz, str):
        raise Invalid(f"tz must be a zone name, got {tz!r}")
    if cron is not None:
        if not isinstance(cron, str):
            raise Invalid(f"cron must be a string, got {cron!r}")
        check_cron(cron, tz)
    missed = attributes.get("missed", "once")
    if missed not in MISSED_POLICIES:
        raise Invalid(f"missed must be one of {', '.join(MISSED_POLICIES)}, got {missed!r}")
    priority = attributes.get("priority", 0)
    max_attempts = attributes.get("max_attempts", 3)
    timeout_s = attributes.get("timeout_s", 300.0)
    payload = msgspec.msgpack.encode(attributes.get("payload"))
    # Its jobs must be ones Pulse accepts: the same rules as a Submit's.
    check_submit(
        Submit(handler=handler, payload=msgspec.Raw(payload), priority=priority, max_attempts=max_attempts, timeout_s=timeout_s),
        MAX_SCHEDULE_PAYLOAD_BYTES,
    )
    return Schedule(
        name=name, handler=handler, every_ms=every, cron=cron, tz=tz,
        payload=payload,
        missed=missed, paused=bool(attributes.get("paused", False)), priority=priority,
        max_attempts=max_attempts, timeout_s=float(timeout_s), anchor=int(attributes.get("anchor", stamped)),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Directives:
    limits: dict[str, Limit]
    schedules: dict[str, Schedule]
    problems: list[str]  # attestations that could not be read, and why


def resolve(records: list[Attestation]) -> Directives:
    """The current limits and schedules from their attestations, newest first."""
    def keys(record: Attestation) -> list[tuple[str, str]]:
        if CONTEXT not in record.contexts:
            return []
        kinds = {p for p in record.predicates if p in (LIMIT, SCHEDULE)}
        return [(kind, subject) for kind in kinds for subject in record.subjects]

    newest = latest_per(records, keys)  # the one the store wrote last, whatever its timestamp
    limits, schedules, problems = {}, {}, []
    for (kind, name), record in sorted(newest.items()):
        try:
            if kind == LIMIT:
                limit = parse_limit(record.attributes)
                if limit is not None:
                    limits[name] = limit
            else:
                schedule = parse_schedule(name, record.attributes, record.timestamp)
                if schedule is not None:
                    schedules[name] = schedule
        except Invalid as exc:
            problems.append(f"{kind} {name!r} ({record.id}): {exc.message}")
    return Directives(limits, schedules, problems)


def is_directive(record: Attestation) -> bool:
    return CONTEXT in record.contexts and (LIMIT in record.predicates or SCHEDULE in record.predicates)


def directive_attestation(kind: str, name: str, attributes: dict, source: str = "qntx-cli") -> NewAttestation:
    return NewAttestation(
        subjects=[name], predicates=[kind], contexts=[CONTEXT], actors=["qntx"], attributes=attributes, source=source
    )


def seconds_to_ms(value: object, name: str) -> int:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1e10:
        raise Invalid(f"{name} must be a number of seconds > 0, got {value!r}")
    return max(1, round(value * 1000))


def check_directive_name(name: object, kind: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise Invalid(f"invalid {kind} name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter")
    return name


def schedule_state(schedule: Schedule, now: int | None = None) -> ScheduleState:
    """How a schedule reads without Pulse's record of its firings (the bus is down)."""
    return ScheduleState(
        name=schedule.name, handler=schedule.handler, every_ms=schedule.every_ms, cron=schedule.cron,
        tz=schedule.tz, missed=schedule.missed, paused=schedule.paused,
        next_due=None if schedule.paused or now is None else schedule.next_due(now),
    )  # fmt: skip


def iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return f"{ms} ms"
