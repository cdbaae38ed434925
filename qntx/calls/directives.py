"""The schedule and limit calls. Both are stored as attestations (directives);
with the bus up a call returns once Pulse, which follows ATS live, applies it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qntx.ats.ax import duration_ms
from qntx.ats.current import latest
from qntx.calls.args import check_handler
from qntx.calls.attestations import query_filter
from qntx.calls.effects import ATS, SERVER, Ask, Nap, call
from qntx.calls.jobs import status
from qntx.errors import NotFound, Timeout
from qntx.protocol import Attest, Filter, ListSchedules, ScheduleState
from qntx.pulse.directives import CONTEXT as DIRECTIVE_CONTEXT
from qntx.pulse.directives import (
    DIRECTIVES_FILTER,
    LIMIT,
    SCHEDULE,
    Limit,
    check_directive_name,
    directive_attestation,
    parse_limit,
    parse_schedule,
    schedule_state,
    seconds_to_ms,
)
from qntx.pulse.directives import resolve as resolve_directives
from qntx.values import now_ms

PULSE_SEES_S = 5.0  # how long a change may take to reach Pulse
POLL_S = 0.01


@call
def schedule_add(
    self,
    name: str,
    handler: str,
    *,
    every: float | str | None = None,
    cron: str | None = None,
    payload: Any = None,
    tz: str = "UTC",
    missed: str = "once",
    priority: int = 0,
    max_attempts: int = 3,
    timeout_s: float = 300.0,
) -> ScheduleState:
    """Fire a job of ``handler`` periodically: ``every`` (seconds, or a duration
    like ``"5 minutes"``) or ``cron`` ("m h dom mon dow", in ``tz``). Firings
    missed while the bus was down run once (``missed="once"``) or not ("skip").
    Stored as an attestation; a running bus picks it up at once."""
    check_handler(handler)
    every_ms = None
    if every is not None:
        every_ms = duration_ms(every, "every") if isinstance(every, str) else seconds_to_ms(every, "every")
    attributes = {
        "handler": handler, "every_ms": every_ms, "cron": cron, "payload": payload, "tz": tz,
        "missed": missed, "priority": priority, "max_attempts": max_attempts, "timeout_s": timeout_s,
    }  # fmt: skip
    attributes = {k: v for k, v in attributes.items() if v is not None or k == "payload"}
    check_directive_name(name, "schedule")
    schedule = parse_schedule(name, attributes, now_ms())  # the same reading as Pulse's
    if self._server_up() and handler not in (yield from status(self)).handlers:
        raise NotFound(f"unknown handler {handler!r}")
    yield Ask(ATS, Attest(items=[directive_attestation(SCHEDULE, name, attributes)]))
    yield from _until_pulse_sees(
        self, lambda s: name in s and s[name].every_ms == schedule.every_ms and s[name].cron == schedule.cron
    )
    return schedule_state(schedule, now_ms())


@call
def schedules(self) -> list[ScheduleState]:
    """Every schedule with its next due time and (with the bus up) past firings."""
    if self._server_up():
        return (yield Ask(SERVER, ListSchedules())).schedules
    return [schedule_state(s, now_ms()) for s in (yield from _directives(self)).schedules.values()]


@call
def schedule(self, name: str) -> ScheduleState:
    for state in (yield from schedules(self)):
        if state.name == name:
            return state
    raise NotFound(f"no schedule {name!r}")


@call
def schedule_pause(self, name: str) -> None:
    yield from _restate(self, name, paused=True)
    yield from _until_pulse_sees(self, lambda s: name not in s or s[name].paused)


@call
def schedule_resume(self, name: str) -> None:
    yield from _restate(self, name, paused=False)
    yield from _until_pulse_sees(self, lambda s: name not in s or not s[name].paused)


@call
def schedule_delete(self, name: str) -> None:
    yield from _restate(self, name, deleted=True)
    yield from _until_pulse_sees(self, lambda s: name not in s)


@call
def limit(
    self, handler: str, *, concurrency: int | None = None, rate: int | None = None, per_s: float = 1.0
) -> Limit | None:
    """Limit ``handler``: at most ``concurrency`` running at once (across every
    worker and host) and at most ``rate`` starts per ``per_s`` seconds. Jobs over
    a limit wait in Pulse. Both None removes the limit. Stored as an attestation."""
    check_handler(handler)
    attributes = {"concurrency": concurrency, "rate": rate, "per_ms": seconds_to_ms(per_s, "per_s")}
    if concurrency is None and rate is None:
        attributes = {"deleted": True}
    parsed = parse_limit(attributes)
    yield Ask(ATS, Attest(items=[directive_attestation(LIMIT, handler, attributes)]))
    wanted = None if parsed is None else [parsed.concurrency, parsed.rate, parsed.per_ms]
    # the next submit meets it
    yield from _until_pulse_sees(self, lambda applied: applied.get(handler) == wanted, limits=True)
    return parsed


@call
def limits(self) -> dict[str, Limit]:
    return (yield from _directives(self)).limits


def _directives(self):
    return resolve_directives((yield from query_filter(self, DIRECTIVES_FILTER)))


def _restate(self, name: str, **changes: Any):
    records = yield from query_filter(self, Filter(subjects=[name], predicates=[SCHEDULE], contexts=[DIRECTIVE_CONTEXT]))
    current = latest(records)
    if current is None or current.attributes.get("deleted"):
        raise NotFound(f"no schedule {name!r}")
    # Keeps its anchor: pausing does not move the due times of an `every` schedule.
    attributes = {**current.attributes, "anchor": current.attributes.get("anchor", current.timestamp), **changes}
    yield Ask(ATS, Attest(items=[directive_attestation(SCHEDULE, name, attributes)]))


def _until_pulse_sees(self, seen: Callable[[dict], bool], timeout: float = PULSE_SEES_S, *, limits: bool = False):
    """With the bus up, return once Pulse has taken a change in (it follows ATS
    live, within milliseconds), so the caller's next step sees it. ``seen`` gets
    the schedules by name, or (``limits``) the limits Pulse applies by handler."""
    if not self._server_up():
        return
    deadline = time.monotonic() + timeout
    while True:
        reply = yield Ask(SERVER, ListSchedules())
        if seen(reply.limits if limits else {s.name: s for s in reply.schedules}):
            return
        if time.monotonic() > deadline:
            raise Timeout("the server did not pick up the change (is ATS up?)")
        yield Nap(POLL_S)

