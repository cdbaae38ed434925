"""Python handlers as attestations: create, resolve the current set, history, tombstones.

A handler version is the attestation ``[name] handler python`` by ``[name]`` (the
handler certifies itself) whose attributes hold ``code``. The newest attestation
per name wins; one with ``attributes.deleted`` is a tombstone that hides the
handler, and one with neither is not a version at all and is skipped. History is
never edited. The CLI and the python plugin both resolve
handlers here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qntx.ats.current import latest, latest_per
from qntx.errors import Invalid
from qntx.protocol import Attestation, Filter, NewAttestation, StoredNotice

PREDICATE = "handler"
CONTEXT = "python"
# Letters (any script), digits, "_" and "-", not starting with a digit or "-".
NAME_PATTERN = re.compile(r"^[^\W\d][\w-]{0,127}$")

HANDLER_FILTER = Filter(predicates=[PREDICATE], contexts=[CONTEXT])


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise Invalid(
            f"invalid handler name {name!r}: use letters, digits, '_' and '-', starting with a letter or '_'"
        )
    return name


def check_code(name: str, code: str) -> str:
    """Reject code that does not compile, with the line it fails on."""
    if not code.strip():
        raise Invalid(f"handler {name!r} has no code")
    try:
        compile(code, f"<handler {name}>", "exec")
    except SyntaxError as exc:
        raise Invalid(f"handler {name!r} does not compile: {exc.msg} (line {exc.lineno})") from None
    return code


def handler_attestation(name: str, code: str, source: str = "qntx-cli") -> NewAttestation:
    check_name(name)
    check_code(name, code)
    return NewAttestation(
        subjects=[name],
        predicates=[PREDICATE],
        contexts=[CONTEXT],
        actors=[name],
        attributes={"code": code},
        source=source,
    )


def tombstone_attestation(name: str, source: str = "qntx-cli") -> NewAttestation:
    check_name(name)
    return NewAttestation(
        subjects=[name],
        predicates=[PREDICATE],
        contexts=[CONTEXT],
        actors=[name],
        attributes={"deleted": True},
        source=source,
    )


def is_handler(record: Attestation | StoredNotice) -> bool:
    """Whether a record (or the notice of one) is a handler attestation."""
    return PREDICATE in (p.casefold() for p in record.predicates) and CONTEXT in (
        c.casefold() for c in record.contexts
    )


def is_tombstone(record: Attestation) -> bool:
    return bool(record.attributes.get("deleted"))


def is_version(record: Attestation) -> bool:
    """A handler version or a tombstone. Anything else under predicate ``handler`` of
    ``python`` (``qntx as foo is handler of python``) is no version of the handler and
    is skipped, so it cannot hide the real one (SPEC §4.4)."""
    return is_tombstone(record) or isinstance(record.attributes.get("code"), str)


def current_version(history: list[Attestation]) -> Attestation | None:
    """The version or tombstone in ``history`` (newest first) the store wrote last, if any."""
    return latest(record for record in history if is_version(record))


@dataclass(frozen=True)
class Resolution:
    """The current handlers by name, and the attestations skipped for having no code."""

    current: dict[str, Attestation]
    skipped: list[Attestation]


def resolve(records: list[Attestation]) -> Resolution:
    """The version stored last per subject wins (``qntx.ats.current``); tombstones
    hide; code-less entries are skipped. ``records`` come newest first, as every store
    query returns them.
    """
    skipped = [record for record in records if not is_version(record)]
    newest = latest_per((record for record in records if is_version(record)), lambda record: record.subjects)
    current = {name: newest[name] for name in sorted(newest) if not is_tombstone(newest[name])}
    return Resolution(current=current, skipped=skipped)


def history_filter(name: str) -> Filter:
    return Filter(subjects=[name], predicates=[PREDICATE], contexts=[CONTEXT])
