"""Commands over attestations: ``ax``, ``as`` and ``handler create|list|show|delete``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from cyclopts import App, Parameter

from qntx.cli import app, fail, json_option, open_bus
from qntx.values import utc_text

if TYPE_CHECKING:
    from qntx.protocol import Attestation

handler_app = App(name="handler", help="Create, list, show and delete Python handlers.")
app.command(handler_app)


def query_text(words: tuple[str, ...]) -> str:
    """One argument is the query text itself; several are words (a word with spaces is quoted)."""
    from qntx.ats.ax import join_words

    return words[0] if len(words) == 1 else join_words(list(words))


def record_dict(record: Attestation) -> dict:
    import msgspec

    data = msgspec.to_builtins(record)
    data.pop("seq", None)  # the store's internal order; the printed record is SPEC §3.1's fields
    return data


def print_json(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def print_attestation(record: Attestation) -> None:
    print(f"  ASID: {record.id}")
    print(f"  Subject: [{', '.join(record.subjects)}]")
    print(f"  Predicate: [{', '.join(record.predicates)}]")
    print(f"  Context: [{', '.join(record.contexts)}]")
    actors = ", ".join(record.actors)
    self_certifying = " (self-certifying)" if record.actors and record.actors == record.subjects else ""
    print(f"  Actor: [{actors}]{self_certifying}")
    if record.attributes:
        print("  Attributes:")
        for line in json.dumps(record.attributes, indent=2, ensure_ascii=False).splitlines():
            print(f"  {line}")


def print_table(records: list[Attestation]) -> None:
    if not records:
        print("(no attestations)")
        return
    rows = [("ASID", "SUBJECTS", "PREDICATES", "CONTEXTS", "ACTORS", "TIME (UTC)")]
    for r in records:
        rows.append(
            (r.id, ", ".join(r.subjects), ", ".join(r.predicates), ", ".join(r.contexts), ", ".join(r.actors), utc_text(r.timestamp))
        )
    widths = [min(40, max(len(row[i]) for row in rows)) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell[: widths[i]].ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print(f"({len(records)} attestation{'s' if len(records) != 1 else ''})")


@app.command
def ax(
    *query: str,
    limit: Annotated[int | None, Parameter(help="Return at most N attestations.")] = None,
    json_: Annotated[bool, Parameter(name="--json", help="Print a JSON array.")] = False,
    wait: Annotated[bool, Parameter(help="With `so`: wait for the jobs and print their results.")] = False,
):
    """Query attestations with the ax language.

    ``[subjects] [is predicates] [of contexts] [by actors] [since T|until T|on T|between T and T] [so HANDLER ARGS]``

    Examples: ``qntx ax alice is knows``, ``qntx ax is handler of python since '3 days ago'``.
    With ``so HANDLER ARGS`` it enqueues one job of HANDLER per match (payload:
    ``attestation`` and ``args``) and prints the job ids, or with ``--wait`` their
    results, one JSON line each.
    """

    from qntx.calls.args import parse_query

    if limit is not None and limit <= 0:
        fail("--limit must be positive")
    text = query_text(query)
    flt, action = parse_query(text, limit)
    if action is not None:
        return _ax_so(text, limit, wait)
    with open_bus() as bus:
        records = bus.query_filter(flt)
    if json_:
        print_json([record_dict(r) for r in records])
    else:
        print_table(records)


def _ax_so(text: str, limit: int | None, wait: bool) -> int:
    from qntx.errors import NotFound

    with open_bus() as bus:
        handles = bus.ax(text, limit=limit)
        if not handles:
            print("no attestation matches: no job submitted", file=sys.stderr)
            return 0
        try:
            bus.flush()
        except NotFound as exc:  # an unknown handler: bad input, whatever the job ids
            first = exc.failures[0][1] if getattr(exc, "failures", None) else exc
            fail(str(first), 2)
        if not wait:
            for handle in handles:
                print(handle.id)
            return 0
        failed = 0
        for handle in handles:
            job = handle.wait()
            if job.status == "completed":
                print(json.dumps(job.result, default=str))
            else:
                failed += 1
                print(f"error: job {job.id} {job.status}: {job.error.message if job.error else job.status}", file=sys.stderr)
    return 1 if failed else 0


@app.command(name="as")
def as_(
    *words: str,
    attr: Annotated[str | None, Parameter(help="Attributes as a JSON object.")] = None,
    json_: Annotated[bool, Parameter(name="--json", help="Print the stored attestation as JSON.")] = False,
):
    """Create an attestation: ``qntx as SUBJECT [is PREDICATE] [of CONTEXT] [by ACTOR]``."""
    from qntx.ats.ax import AxSyntaxError, parse_as

    try:
        subjects, predicates, contexts, actors = parse_as(query_text(words))
    except AxSyntaxError as exc:
        fail(f"as: {exc}")
    attributes = {}
    if attr is not None:
        attributes = json_option(attr, "--attr")
        if not isinstance(attributes, dict):
            fail("--attr must be a JSON object")
    with open_bus() as bus:
        record = bus.attest(subjects, predicates, contexts, actors, attributes=attributes, source="qntx-cli")
    if json_:
        print_json(record_dict(record))
    else:
        print("✓ Attestation created")
        print_attestation(record)


@handler_app.command
def create(
    name: str,
    /,
    *,
    code: Annotated[str | None, Parameter(help="The handler's Python source.")] = None,
    file: Annotated[Path | None, Parameter(help="Read the handler's source from this file.")] = None,
):
    """Create a handler (or a new version of it) from --code or --file."""
    from qntx.stored_handlers import handler_attestation

    if (code is None) == (file is None):
        fail("give exactly one of --code or --file")
    if file is not None:
        try:
            code = file.read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror}")
        except UnicodeDecodeError as exc:
            fail(f"cannot read {file}: it is not UTF-8 text (byte {exc.start})")
    item = handler_attestation(name, code)
    with open_bus() as bus:
        record = bus.attest_many([item])[0]
    print(f"✓ Handler '{name}' created")
    print_attestation(record)


@handler_app.command(name="list")
def list_(*, json_: Annotated[bool, Parameter(name="--json", negative="", help="Print JSON.")] = False):
    """List the current handlers."""
    from qntx.stored_handlers import HANDLER_FILTER, resolve

    with open_bus() as bus:
        resolution = resolve(bus.query_filter(HANDLER_FILTER))
    if json_:
        print_json(
            [{"name": n, "handler": f"python.{n}", "asid": r.id, "updated": r.timestamp} for n, r in resolution.current.items()]
        )
        return
    if not resolution.current:
        print("(no handlers)")
        return
    for name, record in resolution.current.items():
        lines = record.attributes["code"].count("\n") + 1
        print(f"python.{name:<24} {record.id}  {utc_text(record.timestamp)}  {lines} line{'s' if lines != 1 else ''}")


@handler_app.command
def show(name: str, /):
    """Show a handler's current code and its version history."""
    from qntx.ats.current import stored_last_first
    from qntx.cli.schedules import describe_limit
    from qntx.stored_handlers import current_version, history_filter, is_tombstone, is_version

    with open_bus() as bus:
        history = stored_last_first(bus.query_filter(history_filter(name)))
        limit = bus.limits().get(f"python.{name}")
    current = current_version(history)
    if current is None:
        fail(f"no handler named {name!r}", 1)
    if is_tombstone(current):
        print(f"Handler '{name}' (deleted {utc_text(current.timestamp)} UTC)")
    else:
        print(f"Handler '{name}' (python.{name})")
        print(f"  ASID: {current.id}")
        print("  Code:")
        for line in str(current.attributes.get("code", "")).splitlines():
            print(f"    {line}")
    print(f"  Limits: {describe_limit(limit)}")
    print(f"  History ({len(history)} version{'s' if len(history) != 1 else ''}, newest first):")
    for record in history:
        if is_tombstone(record):
            what = "deleted"
        elif is_version(record):
            what = f"{len(record.attributes['code'])} bytes"
        else:
            what = "no code (skipped)"
        print(f"    {utc_text(record.timestamp)}  {record.id}  {what}")


@handler_app.command
def delete(name: str, /):
    """Delete a handler (writes a tombstone; history is kept)."""
    from qntx.stored_handlers import HANDLER_FILTER, resolve, tombstone_attestation

    with open_bus() as bus:
        if name not in resolve(bus.query_filter(HANDLER_FILTER)).current:
            fail(f"no handler named {name!r}", 1)
        record = bus.attest_many([tombstone_attestation(name)])[0]
    print(f"✓ Handler '{name}' deleted")
    print(f"  ASID: {record.id}")
