"""Commands over Pulse's directives: ``schedule …`` and ``handler limit``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Literal

from cyclopts import App, Parameter

from qntx.cli import app, fail, json_option, open_bus
from qntx.cli.attestations import handler_app, print_json

if TYPE_CHECKING:  # imported where used: a command pays only for what it needs
    from qntx.protocol import ScheduleState

schedule_app = App(name="schedule", help="Periodic jobs, stored as attestations: add, list, show, pause, resume, delete.")
app.command(schedule_app)


def _when(ms: int | None) -> str:
    from qntx.pulse.directives import iso

    return "-" if ms is None else iso(ms)


def _period(state: ScheduleState) -> str:
    if state.cron is not None:
        return f"cron '{state.cron}' ({state.tz})"
    seconds = (state.every_ms or 0) / 1000
    return f"every {seconds:g}s"


@schedule_app.command
def add(
    name: str,
    /,
    *,
    handler: Annotated[str, Parameter(help="The handler to run (`tagger` means python.tagger).")],
    every: Annotated[str | None, Parameter(help="A period: 30s, 5 minutes, 2h, 1 day.")] = None,
    cron: Annotated[str | None, Parameter(help='A cron expression "m h dom mon dow".')] = None,
    payload: Annotated[str | None, Parameter(help="The jobs' payload as JSON.")] = None,
    tz: Annotated[str, Parameter(help="The time zone of a cron expression (e.g. Europe/Berlin).")] = "UTC",
    missed: Annotated[
        Literal["once", "skip"], Parameter(help="Firings missed while the bus was down: run once, or skip.")
    ] = "once",
    priority: Annotated[int, Parameter(help="Higher runs first.")] = 0,
    max_attempts: Annotated[int, Parameter(help="Attempts before a firing's job fails.")] = 3,
):
    """Add (or replace) schedule NAME: a job of HANDLER at every due time.

    Examples: ``qntx schedule add nightly --handler report --cron "0 3 * * *" --tz Europe/Berlin``,
    ``qntx schedule add tick --handler builtin.echo --every 30s --payload '"hi"'``.
    """
    from qntx.calls.args import handler_for

    if (every is None) == (cron is None):
        fail("give exactly one of --every or --cron")
    value = None
    if payload is not None:
        value = json_option(payload, "--payload")
    with open_bus() as bus:
        state = bus.schedule_add(
            name, handler_for(handler), every=every, cron=cron, payload=value, tz=tz, missed=missed,
            priority=priority, max_attempts=max_attempts,
        )  # fmt: skip
    print(f"✓ Schedule '{name}' runs {handler_for(handler)} {_period(state)}; next at {_when(state.next_due)}")


@schedule_app.command(name="list")
def list_(*, json_: Annotated[bool, Parameter(name="--json", negative="", help="Print JSON.")] = False):
    """List the schedules with their next due time."""
    import msgspec

    with open_bus() as bus:
        states = bus.schedules()
    if json_:
        print_json([msgspec.to_builtins(s) for s in states])
        return
    if not states:
        print("(no schedules)")
        return
    print(f"{'NAME':<20} {'HANDLER':<24} {'WHEN':<34} {'NEXT (UTC)':<26} STATE")
    for s in states:
        state = "paused" if s.paused else "active"
        print(f"{s.name[:20]:<20} {s.handler[:24]:<24} {_period(s)[:34]:<34} {_when(s.next_due):<26} {state}")


@schedule_app.command
def show(name: str, /, *, json_: Annotated[bool, Parameter(name="--json")] = False):
    """Show a schedule: its next due times and its past firings."""
    import msgspec

    from qntx.pulse.directives import Schedule

    with open_bus() as bus:
        state = bus.schedule(name)
    if json_:
        print_json(msgspec.to_builtins(state))
        return
    print(f"Schedule {state.name}")
    print(f"  Handler: {state.handler}")
    print(f"  When:    {_period(state)}; missed firings: {'run once' if state.missed == 'once' else 'skipped'}")
    print(f"  State:   {'paused' if state.paused else 'active'}")
    if state.next_due is not None:
        # From the next due time on, both kinds count alike (an `every` one from there).
        rest = Schedule(state.name, state.handler, state.every_ms, state.cron, state.tz, anchor=state.next_due)
        times = [state.next_due, *rest.upcoming(state.next_due, 4)]
        print("  Next:    " + ", ".join(_when(t) for t in times))
    if state.firings:
        print(f"  Fired ({len(state.firings)} most recent, newest last):")
        for due, job_id in state.firings:
            print(f"    {_when(due)}  {job_id}")
    else:
        print("  Fired:   (not yet)")


@schedule_app.command
def pause(name: str, /):
    """Stop firing until `schedule resume` (what falls due meanwhile is skipped)."""
    with open_bus() as bus:
        bus.schedule_pause(name)
    print(f"✓ Schedule '{name}' paused")


@schedule_app.command
def resume(name: str, /):
    """Fire again from the next due time on."""
    with open_bus() as bus:
        bus.schedule_resume(name)
    print(f"✓ Schedule '{name}' resumed")


@schedule_app.command
def delete(name: str, /):
    """Delete a schedule (its history stays in ATS)."""
    with open_bus() as bus:
        bus.schedule_delete(name)
    print(f"✓ Schedule '{name}' deleted")


def _rate(text: str) -> tuple[int, float]:
    """'10/s', '100/minute', '5/30s' as (count, seconds)."""
    from qntx.ats.ax import duration_ms

    count, slash, period = text.partition("/")
    if not slash or not count.strip().isdigit() or int(count) < 1 or not period.strip():
        fail(f"--rate must look like 10/s, 100/minute or 5/30s, got {text!r}")
    period = period.strip()
    span = duration_ms(period if period[:1].isdigit() else f"1{period}", "--rate")
    return int(count), span / 1000


def describe_limit(limit) -> str:
    """'at most 3 at once, at most 10 starts per 1s' (or 'no limits')."""
    parts = ([f"at most {limit.concurrency} at once"] if limit and limit.concurrency else []) + (
        [f"at most {limit.rate} starts per {limit.per_ms / 1000:g}s"] if limit and limit.rate else []
    )
    return ", ".join(parts) or "no limits"


@handler_app.command
def limit(
    name: str,
    /,
    *,
    concurrency: Annotated[int | None, Parameter(help="At most N jobs of it running at once, on all hosts.")] = None,
    rate: Annotated[str | None, Parameter(help="At most N starts per period: 10/s, 100/minute, 5/30s.")] = None,
    no_concurrency: Annotated[bool, Parameter(negative="", help="Remove its concurrency limit (keep its rate).")] = False,
    no_rate: Annotated[bool, Parameter(negative="", help="Remove its rate limit (keep its concurrency).")] = False,
    clear: Annotated[bool, Parameter(negative="", help="Remove its limits.")] = False,
):
    """Limit how many jobs of handler NAME run at once and how fast they start.

    Each option changes its own field and keeps the other: `--rate 3/20s` on a handler
    limited to 2 at once keeps that. Jobs over a limit wait in Pulse, in priority
    order, without taking a worker slot. Stored as an attestation: it survives
    restarts and applies at once. `qntx handler limits` lists them all.
    """
    from qntx.calls.args import handler_for

    changes = concurrency is not None or rate is not None or no_concurrency or no_rate
    if clear == changes:
        fail("give --concurrency, --rate, --no-concurrency or --no-rate, or --clear")
    if concurrency is not None and no_concurrency or rate is not None and no_rate:
        fail("--concurrency with --no-concurrency (or --rate with --no-rate): give one")
    if concurrency is not None and concurrency < 1:
        fail("--concurrency must be at least 1")
    count, per_s = _rate(rate) if rate is not None else (None, None)
    handler = handler_for(name)
    with open_bus() as bus:
        current = None if clear else bus.limits().get(handler)
        if not clear:
            if concurrency is None and not no_concurrency and current is not None:
                concurrency = current.concurrency
            if count is None and not no_rate and current is not None and current.rate:
                count, per_s = current.rate, current.per_ms / 1000
        now = bus.limit(handler, concurrency=concurrency, rate=count, per_s=per_s or 1.0)
    print(f"✓ {handler}: {describe_limit(now)}")


@handler_app.command
def limits(*, json_: Annotated[bool, Parameter(name="--json")] = False):
    """Every handler's limits: at most N at once, at most N starts per period."""

    with open_bus() as bus:
        found = bus.limits()
    if json_:
        data = {h: {"concurrency": lim.concurrency, "rate": lim.rate, "per_s": lim.per_ms / 1000} for h, lim in sorted(found.items())}
        print(json.dumps(data, indent=2))
        return
    if not found:
        print("(no limits)")
    for handler, lim in sorted(found.items()):
        print(f"{handler:<32} {describe_limit(lim)}")
