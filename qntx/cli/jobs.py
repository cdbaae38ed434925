"""Commands over jobs and the running bus: ``ix``, ``pulse …`` and ``status``."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Annotated

from cyclopts import App, Parameter

from qntx.cli import app, fail, open_bus
from qntx.cli.attestations import print_json
from qntx.values import moment_text

if TYPE_CHECKING:  # imported where used: a command pays only for what it needs
    from qntx.cli.progress import ProgressView
    from qntx.protocol import Job

pulse_app = App(name="pulse", help="Inspect and steer Pulse jobs.")
app.command(pulse_app)


def _job_dict(job: Job) -> dict:
    import msgspec

    return msgspec.to_builtins(job)


def _print_failure(job: Job) -> None:
    error = job.error
    print(f"error: job {job.id} {job.status}: {error.message if error else job.status}", file=sys.stderr)
    if error and error.traceback:
        sys.stderr.write(error.traceback if error.traceback.endswith("\n") else error.traceback + "\n")


def _show_rest_of_logs(logs: str, streamed: dict[str, int]) -> None:
    """Print what live streaming did not show (all of it, for a quick job)."""
    from qntx.protocol import STDERR_MARK

    stdout, _, stderr = logs.partition(STDERR_MARK)
    rest_out, rest_err = stdout[streamed["stdout"]:], stderr[streamed["stderr"]:]
    if rest_out:
        sys.stdout.write(rest_out if rest_out.endswith("\n") else rest_out + "\n")
    if rest_err:
        sys.stderr.write(rest_err if rest_err.endswith("\n") else rest_err + "\n")


@app.command
def ix(
    name: str,
    /,
    *args: str,
    no_wait: Annotated[bool, Parameter(negative="", help="Print the job id and return at once.")] = False,
    timeout: Annotated[float, Parameter(help="Seconds the handler may run.")] = 300.0,
    priority: Annotated[int, Parameter(help="Higher runs first.")] = 0,
    max_attempts: Annotated[int, Parameter(help="Attempts before the job fails.")] = 3,
    at: Annotated[
        str | None, Parameter(help="Start at this time (UTC): tomorrow 09:00, 2026-12-04 09:00, in 5 minutes, RFC 3339.")
    ] = None,
    in_: Annotated[str | None, Parameter(name="--in", help="Start after this long: 30s, 1.5s, 5 minutes, 2h.")] = None,
    now_if_past: Annotated[bool, Parameter(help="Run at once if --at is already past (else that is an error).")] = False,
    after: Annotated[
        list[str] | None,
        Parameter(help="Run after this job (repeat it for several); it fails if one of them fails.", consume_multiple=False),
    ] = None,
):
    """Run handler NAME with ARGS as a job and stream its output.

    NAME is a python handler (``vacancies`` means ``python.vacancies``); a name with a
    dot is used as is (``builtin.echo``). On a terminal the handler's progress is a
    live bar; into a pipe it is plain lines. Exits 0 on success, 1 on failure.
    """
    from qntx.calls.args import handler_for
    from qntx.cli.progress import ProgressView

    handler = handler_for(name)
    run_at = start_time(at, in_, now_if_past=now_if_past)
    with open_bus() as bus:
        handle = bus.submit(
            handler, {"args": list(args)}, priority=priority, max_attempts=max_attempts, timeout_s=timeout, run_at=run_at,
            after=after or None,
        )  # fmt: skip
        accepted = handle.accepted()  # a refusal (an unknown handler) is one line, before any waiting
        if run_at is not None:  # (on stderr: stdout is the id alone, for scripts)
            print(f"runs at {moment_text(accepted.run_after or run_at)} UTC", file=sys.stderr)
        if no_wait:
            print(handle.id)
            return 0
        with ProgressView(handler, live=sys.stdout.isatty() and sys.stderr.isatty()) as view:
            final = _stream(bus, handle.id, view)
            view.end_lines()
    _show_rest_of_logs(final.logs, view.streamed)
    if final.status != "completed":
        _print_failure(final)
        return 1
    if final.result is not None:
        print_json(final.result)
    return 0


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_DAY_CLOCK = re.compile(r"(today|tomorrow)\s+(\S+)", re.IGNORECASE)
_DATE_CLOCK = re.compile(r"(\d{4}-\d{2}-\d{2})\s+(\d{1,2}:\d{2}(?::\d{2})?)")
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]+)")
DAY_MS = 86_400_000


def span_ms(text: str, option: str) -> int:
    """'30s', '5 minutes', '1.5s', '2h' in ms (> 0)."""
    from qntx.ats.ax import AxSyntaxError, parse_duration

    match = _SPAN.fullmatch(text.strip())
    try:
        if match is None:
            return parse_duration(text)
        return max(1, round(float(match[1]) * parse_duration(f"1 {match[2]}")))
    except AxSyntaxError as exc:
        fail(f"{option}: {exc.message}")


def start_time(at: str | None, in_: str | None, *, now_if_past: bool = False) -> int | None:
    """When a job may start: ``--at`` (now, tomorrow 09:00, 2026-12-04 09:00, in 5
    minutes, RFC 3339 …, UTC) or ``--in`` (30s, 1.5s, 2h). A past ``--at`` is an error
    unless ``now_if_past``."""
    from qntx.ats.ax import AxSyntaxError, parse_time
    from qntx.values import now_ms

    if at is not None and in_ is not None:
        fail("give --at or --in, not both")
    now = now_ms()
    if in_ is not None:
        return now + span_ms(in_, "--in")
    if at is None:
        return None
    text = at.strip()
    try:
        if text.lower().startswith("in "):
            when = now + span_ms(text[3:], "--at")
        elif day := _DAY_CLOCK.fullmatch(text):
            clock = _CLOCK.fullmatch(day[2])
            if clock is None or int(clock[1]) > 23 or int(clock[2]) > 59 or int(clock[3] or 0) > 59:
                fail(f"--at: {day[2]!r} is not a time of day (HH:MM or HH:MM:SS, UTC)")
            midnight = now - now % DAY_MS + (DAY_MS if day[1].lower() == "tomorrow" else 0)
            when = midnight + ((int(clock[1]) * 60 + int(clock[2])) * 60 + int(clock[3] or 0)) * 1000
        elif text.lower() == "tomorrow":
            when = now - now % DAY_MS + DAY_MS
        elif dated := _DATE_CLOCK.fullmatch(text):
            clock = dated[2] if dated[2].count(":") == 2 else dated[2] + ":00"
            when = parse_time(f"{dated[1]}T{clock.zfill(8)}Z")
        else:
            when = parse_time(text, now_ms=now)
    except AxSyntaxError as exc:
        fail(f"--at: {exc.message} (also: tomorrow 09:00, 2026-12-04 09:00, in 5 minutes)")
    if when < now - 1000 and not now_if_past:
        fail(f"--at {at!r} is in the past ({moment_text(when)} UTC); add --now-if-past to run it at once")
    return when


def _stream(bus, job_id: str, view: ProgressView) -> Job:
    """Follow one job to its end, showing its output and progress; its final record."""
    from qntx.protocol import JobChanged, JobOutput, JobProgressed

    attempt = 0
    for event in bus.follow(job_id):
        if isinstance(event, JobChanged) and event.job.attempts != attempt:
            attempt = event.job.attempts  # the final logs are the last attempt's alone
            view.streamed = {"stdout": 0, "stderr": 0}
        if isinstance(event, JobOutput):
            view.output(event.stream, event.text)
        elif isinstance(event, JobProgressed):
            view.progress(event.current, event.total)
        elif isinstance(event, JobChanged) and event.job.status in ("completed", "failed", "cancelled"):
            return event.job
        elif isinstance(event, JobChanged) and event.job.status == "queued" and event.job.attempts:
            error = event.job.error.message if event.job.error else ""
            view.note(f"attempt {event.job.attempts} failed: {error}; retrying")
    raise AssertionError("a followed job ends with its final record")


@pulse_app.command
def jobs(
    *,
    status: Annotated[str | None, Parameter(help="queued, dispatched, running, completed, failed, cancelled, paused or waiting.")] = None,
    limit: Annotated[int, Parameter(help="At most N jobs, newest first.")] = 20,
    json_: Annotated[bool, Parameter(name="--json")] = False,
):
    """List jobs, newest first (``--status failed`` is the dead-letter view)."""
    with open_bus() as bus:
        found = bus.jobs(status=status, limit=limit)
    if json_:
        print_json([_job_dict(j) for j in found])
        return
    if not found:
        print("(no jobs)")
        return
    print(f"{'ID':<34} {'HANDLER':<24} {'STATUS':<10} {'TRIES':<6} {'CREATED (UTC)':<20} ERROR")
    for job in found:
        error = job.error.message.splitlines()[0][:60] if job.error else ""
        if job.status == "queued" and job.run_after > job.created_at:
            error = f"runs at {moment_text(job.run_after)}" + (f"; {error}" if error else "")
        print(f"{job.id:<34} {job.handler[:24]:<24} {job.status:<10} {job.attempts}/{job.max_attempts:<4} {moment_text(job.created_at):<20} {error}")


@pulse_app.command
def show(job_id: str, /, *, json_: Annotated[bool, Parameter(name="--json")] = False):
    """Show one job in full."""
    import msgspec

    from qntx.cli.history import print_history

    with open_bus() as bus:
        job = bus.job(job_id)
        dependents = bus.dependents(job_id)
    if json_:
        print_json(_job_dict(job) | {"dependents": dependents})
        return
    print(f"Job {job.id}")
    print(f"  Handler:  {job.handler}")
    print(f"  Status:   {job.status} (attempt {job.attempts} of {job.max_attempts})")
    print(f"  Priority: {job.priority}   Timeout: {job.timeout_s:g}s")
    print(f"  Created:  {moment_text(job.created_at)}   Started: {moment_text(job.started_at)}   Finished: {moment_text(job.finished_at)}")
    when = "if they all complete" if job.after_policy == "completed" else "once they end"
    optional = (
        ("Runs at", job.run_after and job.status in ("queued", "waiting") and moment_text(job.run_after)),
        ("Version", job.version),
        ("Parent", job.parent_id),
        ("After", job.after and f"{', '.join(job.after)} ({when})"),
        ("Then", dependents and ", ".join(dependents)),  # what runs after it
        ("Schedule", job.schedule),
        ("Worker", job.worker),
        ("Progress", job.progress and f"{job.progress.current:g}/{job.progress.total:g}"),
    )
    for label, value in optional:
        if value:
            print(f"  {label + ':':<10}{value}")
    print(f"  Payload:  {msgspec.json.encode(job.payload).decode()}")
    if job.result is not None:
        print(f"  Result:   {msgspec.json.encode(job.result).decode()}")
    if job.error:
        print(f"  Error:    {job.error.message}")
        for line in job.error.traceback.splitlines():
            print(f"    {line}")
    if job.logs:
        print("  Logs:")
        for line in job.logs.splitlines():
            print(f"    {line}")
    print_history(job)


def _steer(job_id: str, action: str, **options) -> None:
    """Apply a Bus method (cancel, retry, pause, resume) to one job and say where it is now."""
    with open_bus() as bus:
        job = getattr(bus, action)(job_id, **options)
    print(f"✓ Job {job.id} {job.status}")


StatusOption = Annotated[
    str | None, Parameter(help="Every job with this status (queued, running, failed, cancelled, paused, waiting…).")
]
HandlerOption = Annotated[str | None, Parameter(help="Every job of this handler (e.g. python.report).")]
SinceOption = Annotated[str | None, Parameter(help="Jobs created at or after this time: 2026-12-01, '3 hours ago', yesterday.")]
YesOption = Annotated[bool, Parameter(help="Do not ask for confirmation on a terminal.")]


def _bulk(action: str, what: str, status: str | None, handler: str | None, since: str | None, yes: bool, **options) -> int:
    """Steer every job that matches, each once, after a confirmation on a terminal."""
    from qntx.ats.ax import AxSyntaxError, parse_time

    try:
        since_ms = parse_time(since) if since is not None else None
    except AxSyntaxError as exc:
        fail(f"--since: {exc.message}")
    with open_bus() as bus:
        ids = bus.matching_jobs(status=status, handler=handler, since=since_ms)
        chosen = " ".join(p for p in (status, "jobs" if not handler else f"jobs of {handler}") if p)
        if since is not None:
            chosen += f" since {since}"
        if not ids:
            print(f"no {chosen} to {action}")
            return 0
        if not yes and sys.stdin.isatty() and sys.stdout.isatty():
            answer = input(f"{what} {len(ids)} {chosen}? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("nothing done")
                return 1
        steered = bus.retry_many(ids, **options) if action == "retry" else bus.cancel_many(ids)
    print(f"✓ {what.lower()} {len(steered)} job(s)" + (f"; {len(steered.skipped)} skipped (they changed meanwhile)" if steered.skipped else ""))
    return 0


def _one_or_many(job_id: str | None, status: str | None, handler: str | None, since: str | None) -> bool:
    """True for a bulk action; a job id and the bulk filters do not go together."""
    bulk = status is not None or handler is not None or since is not None
    if job_id is not None and bulk:
        fail("give a job id, or --status/--handler/--since for many jobs, not both")
    if job_id is None and not bulk:
        fail("give a job id, or --status/--handler/--since to choose many jobs")
    return bulk


@pulse_app.command
def cancel(
    job_id: str | None = None,
    /,
    *,
    status: StatusOption = None,
    handler: HandlerOption = None,
    since: SinceOption = None,
    yes: YesOption = False,
):
    """Cancel a queued or running job (a running one is killed), or every job that
    matches --status, --handler and --since (each once, in pages; asks first on a terminal)."""
    if _one_or_many(job_id, status, handler, since):
        return _bulk("cancel", "Cancelled", status, handler, since, yes)
    _steer(job_id, "cancel")


@pulse_app.command
def retry(
    job_id: str | None = None,
    /,
    *,
    status: StatusOption = None,
    handler: HandlerOption = None,
    since: SinceOption = None,
    yes: YesOption = False,
    latest: Annotated[bool, Parameter(help="Run the handler's current version, not the one the job ran.")] = False,
):
    """Queue a failed or cancelled job again, with fresh attempts and the same handler
    version; or every job that matches --status (default failed with the other
    filters), --handler and --since (each once; asks first on a terminal)."""
    if _one_or_many(job_id, status, handler, since):
        return _bulk("retry", "Retried", status or "failed", handler, since, yes, latest=latest)
    _steer(job_id, "retry", latest=latest)


@pulse_app.command
def pause(job_id: str, /):
    """Hold a queued job until `pulse resume`."""
    _steer(job_id, "pause")


@pulse_app.command
def resume(job_id: str, /):
    """Release a paused job back to the queue."""
    _steer(job_id, "resume")


@pulse_app.command
def prune(
    *,
    older_than: Annotated[str | None, Parameter(help="Every finished job older than this (e.g. 3d, 12h); default: the configured retention.")] = None,
):
    """Delete finished jobs past their retention now (the server also does it in the background)."""
    from qntx.ats.ax import AxSyntaxError, parse_duration

    seconds = None
    if older_than is not None:
        try:
            seconds = parse_duration(older_than) / 1000
        except AxSyntaxError as exc:
            fail(f"--older-than: {exc.message}")
    with open_bus() as bus:
        deleted = bus.prune(seconds)
    detail = ", ".join(f"{status} {count}" for status, count in deleted.items() if count)
    print(f"✓ Pruned {sum(deleted.values())} finished job(s)" + (f" ({detail})" if detail else ""))


@pulse_app.command
def watch(
    *,
    handler: Annotated[str | None, Parameter(help="Only jobs of this handler.")] = None,
    interval: Annotated[float, Parameter(help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, Parameter(help="Print the table once and return.")] = False,
):
    """A live table of running, queued, waiting and paused jobs (Ctrl-C to stop)."""
    import time

    from rich.console import Console
    from rich.live import Live

    from qntx.calls.args import handler_for

    wanted = handler_for(handler) if handler else None
    console = Console()
    if not console.is_terminal:  # into a pipe or a file: every name whole, not cut at 80 columns
        console = Console(width=250)
    with open_bus() as bus:
        if once or not console.is_terminal:
            console.print(_watch_table(bus, wanted))
            return
        with Live(_watch_table(bus, wanted), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(max(0.2, interval))
                live.update(_watch_table(bus, wanted), refresh=True)


def _watch_table(bus, handler: str | None):
    from rich.table import Table

    from qntx.values import now_ms

    status = bus.status()
    counts = ", ".join(f"{k} {v}" for k, v in status.queue.items() if v)
    table = Table(title=f"Pulse — {counts or 'no jobs'}", title_justify="left")
    table.add_column("ID", no_wrap=True, min_width=22)
    for column in ("HANDLER", "STATUS", "TRIES", "PROGRESS", "WORKER", "AGE"):
        table.add_column(column)
    now = now_ms()
    shown = 0
    for state in ("running", "dispatched", "queued", "waiting", "paused"):
        for job in bus.jobs(status=state, limit=1000):
            if handler is not None and job.handler != handler:
                continue
            progress = f"{job.progress.current:g}/{job.progress.total:g}" if job.progress else ""
            since = job.started_at if state == "running" else job.created_at
            shown_state = state
            if state == "queued" and job.run_after > now:  # a delayed job: when it runs
                shown_state = f"queued, at {moment_text(job.run_after)}"
            table.add_row(
                job.id, job.handler, shown_state, f"{job.attempts}/{job.max_attempts}", progress, job.worker or "",
                f"{(now - since) / 1000:.1f}s" if since else "",
            )  # fmt: skip
            shown += 1
            if shown >= 50:
                return table
    return table


def _server_down(settings, exc: Exception) -> str:
    """One line on why the server does not answer: not running, or running and hung."""
    from qntx.bus.pidlock import lock_holder

    holder = lock_holder(settings.lock_path("server"))
    if holder is None:
        return f"the server is down: none runs on {settings.home} (start it with `qntx up`){_elsewhere(settings)}"
    return f"the server (pid {holder}) is not answering: {exc}"


def _elsewhere(settings) -> str:
    """On a PostgreSQL store, who leads the bus (this host may be a standby)."""
    from qntx import db

    if not db.is_database_url(settings.store):
        return ""
    from qntx.errors import QntxError
    from qntx.leader import holder_line, read

    try:
        return f"; the bus is led by {holder_line(read(settings.store))}"
    except QntxError:
        return ""


@app.command
def status(*, json_: Annotated[bool, Parameter(name="--json")] = False):
    """Every actor (pid, endpoint, health), queue depth by status, registered handlers."""
    import msgspec

    from qntx.errors import Timeout, Unavailable

    with open_bus() as bus:
        try:
            reply = bus.status()
        except (Unavailable, Timeout) as exc:
            raise Unavailable(_server_down(bus.settings, exc)) from None
    if json_:
        print_json(
            {
                "actors": [msgspec.to_builtins(a) for a in reply.actors],
                "queue": reply.queue,
                "handlers": reply.handlers,
                "sessions_free": reply.sessions_free,
                "leadership": msgspec.to_builtins(reply.leadership),
            }
        )
        return
    print("Actors:")
    for actor in reply.actors:
        health = "healthy" if actor.healthy else "UNHEALTHY"
        where = f" host {actor.host}" if actor.host else ""
        who = f" role {actor.role} key {actor.key}" if actor.key else ""
        load = f" leases {actor.leases}/{actor.credit}" if actor.credit else ""
        print(f"  {actor.name:<16} pid {actor.pid or '-':<8} {health:<10} {actor.endpoint}{where}{who}{load}")
    print("Queue:    " + ", ".join(f"{k} {v}" for k, v in reply.queue.items()))
    print("Handlers: " + (", ".join(reply.handlers) or "(none)"))
    if reply.sessions_free is not None:
        print(f"Sessions: room for {reply.sessions_free} more worker session(s)")
    if reply.leadership is not None:
        _print_leadership(msgspec.to_builtins(reply.leadership))


def _print_leadership(lease: dict) -> None:
    """The leader, its epoch and the standbys of a bus kept in PostgreSQL."""
    from qntx.leader import holder_line, standby_line

    if lease.get("error"):
        print(f"Leader:   unknown ({lease['error']})")
        return
    print(f"Leader:   {holder_line(lease)}")
    for standby in lease["standbys"]:
        print(f"Standby:  {standby_line(standby)}")
    if not lease["standbys"]:
        print("Standby:  (none)")
