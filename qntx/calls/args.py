"""Arguments as users give them, turned into messages: friendly lists, filters,
ax text and handler names. Shared by the calls, the CLI and the dashboard."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

import msgspec

from qntx.errors import Invalid, InvalidQuery
from qntx.protocol import Filter, NewAttestation
from qntx.values import as_list


def new_attestation(
    subjects: str | Sequence[str],
    predicates: str | Sequence[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    actors: str | Sequence[str] | None = None,
    attributes: dict[str, Any] | None = None,
    timestamp: int | None = None,
    source: str | None = None,
    id: str | None = None,
) -> NewAttestation:
    """Build a NewAttestation from friendly arguments (a str stands for a one-item list)."""
    return NewAttestation(
        subjects=as_list(subjects, "subjects"),
        predicates=as_list(predicates, "predicates") or ["_"],
        contexts=as_list(contexts, "contexts") or ["_"],
        actors=as_list(actors, "actors"),
        attributes=dict(attributes or {}),
        timestamp=timestamp,
        source=source or "python",
        id=id,
    )


def make_filter(
    subjects: str | Sequence[str] | None = None,
    predicates: str | Sequence[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    actors: str | Sequence[str] | None = None,
    time_start: int | None = None,
    time_end: int | None = None,
    source: str | None = None,
    limit: int | None = None,
) -> Filter:
    return Filter(
        subjects=as_list(subjects, "subjects"),
        predicates=as_list(predicates, "predicates"),
        contexts=as_list(contexts, "contexts"),
        actors=as_list(actors, "actors"),
        time_start=time_start,
        time_end=time_end,
        source=source,
        limit=limit,
    )


def parse_query(text: str, limit: int | None = None) -> tuple[Filter, str | None]:
    """The Filter of an ax query and its ``so`` action (None if it has none); a
    syntax error is Invalid with its position."""
    from qntx.ats.ax import AxSyntaxError, parse_ax

    try:
        query = parse_ax(text)
    except AxSyntaxError as exc:
        raise InvalidQuery(f"ax: {exc}", exc.position) from None
    flt = query.filter
    if limit is not None:
        flt = msgspec.structs.replace(flt, limit=limit)
    return flt, query.action


def ax_filter(text: str, limit: int | None = None) -> Filter:
    return parse_query(text, limit)[0]


def handler_for(name: str) -> str:
    """A handler as users type it: ``tagger`` is ``python.tagger``; a name with a dot is as is."""
    return check_handler(name if "." in name else f"python.{name}")


def check_handler(handler: object) -> str:
    """A handler's full name, PLUGIN.NAME (``python.tagger``, ``builtin.echo``), each
    part as a handler's name may be; else Invalid."""
    from qntx.stored_handlers import NAME_PATTERN

    plugin, dot, name = handler.partition(".") if isinstance(handler, str) else ("", "", "")
    if not (dot and NAME_PATTERN.fullmatch(plugin) and NAME_PATTERN.fullmatch(name)):
        raise Invalid(f"invalid handler {handler!r}: PLUGIN.NAME, as python.tagger or builtin.echo")
    return handler


def split_action(action: str) -> tuple[str, list[str]]:
    """``so HANDLER ARGS...`` as (handler, args)."""
    try:
        words = shlex.split(action)
    except ValueError as exc:
        raise Invalid(f"ax: the so action cannot be read: {exc}") from None
    if not words:
        raise Invalid("ax: so needs a handler")
    return handler_for(words[0]), words[1:]
