"""What a new attestation must be: the checks, the defaults, and its encoding.

Owns no storage: the store (``qntx.ats.store``) checks every item with
``validated`` before it writes anything, and a writer may check items with it
before sending them (the python plugin's ``attest()``), so a bad item fails at
its own call.
"""

from __future__ import annotations

from typing import NamedTuple

from qntx.asid import new_asid
from qntx.errors import Invalid
from qntx.protocol import Attestation, NewAttestation
from qntx.values import is_int

# How deep attributes may nest (maps and lists inside one another).
MAX_ATTRIBUTE_DEPTH = 32
DEFAULT_SOURCE = "python"
MAX_TIMESTAMP = (1 << 63) - 1  # int64 max, so every MessagePack client can read it back
MAX_ID_BYTES = 511  # an LMDB key


def check_text(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"{what} must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise Invalid(f"{what} must not contain NUL")
    return value


def check_list(field: str, values: object, *, default: list[str] | None) -> list[str]:
    if type(values) is list and len(values) == 1:  # the usual shape, checked first
        value = values[0]
        if type(value) is str and value and "\x00" not in value:
            return [value]
    if values is None:
        values = []
    if not isinstance(values, list | tuple):
        raise Invalid(f"{field} must be a list of strings, got {type(values).__name__}")
    if not values and default is not None:
        return list(default)
    try:  # the common case, checked in C: all strings (join), none empty, no NUL
        fine = "\x00" not in "\x01".join(values) and "" not in values
    except TypeError:
        fine = False
    if not fine:
        return [check_text(f"{field} value", v) for v in values]  # raises the right error
    return list(values)


def validated(item: NewAttestation, now: int) -> Attestation:
    """The record ``item`` makes (defaults filled, a candidate id when it has none),
    or ``Invalid`` saying what is wrong with it. A writer may check items with it
    before sending them; the store checks them again."""
    if not isinstance(item, NewAttestation):
        raise Invalid(f"expected a NewAttestation, got {type(item).__name__}")
    subjects = check_list("subjects", item.subjects, default=None)
    if not subjects:
        raise Invalid("an attestation needs at least one subject")
    timestamp = now if item.timestamp is None else item.timestamp
    if not is_int(timestamp) or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise Invalid(f"timestamp must be an integer of ms >= 0, got {timestamp!r}")
    source = item.source or DEFAULT_SOURCE
    check_text("source", source)
    attributes = item.attributes
    if not isinstance(attributes, dict) or not all(isinstance(k, str) for k in attributes):
        raise Invalid("attributes must be a map with string keys")
    if has_containers(attributes) and nested_deeper(attributes, MAX_ATTRIBUTE_DEPTH):
        raise Invalid(f"attributes nest deeper than {MAX_ATTRIBUTE_DEPTH} levels")
    if item.id is not None:
        check_text("id", item.id)
        if len(item.id.encode()) > MAX_ID_BYTES:
            raise Invalid(f"id is longer than {MAX_ID_BYTES} bytes")
    predicates = check_list("predicates", item.predicates, default=["_"])
    contexts = check_list("contexts", item.contexts, default=["_"])
    return Attestation(
        # A generated id is only a candidate: the store checks it is free.
        id=item.id if item.id is not None else new_asid(subjects[0], predicates[0], contexts[0]),
        subjects=subjects,
        predicates=predicates,
        contexts=contexts,
        actors=check_list("actors", item.actors, default=[]),
        timestamp=timestamp,
        source=source,
        attributes=attributes,
        created_at=now,
    )


def has_containers(value: dict) -> bool:
    for v in value.values():
        if isinstance(v, dict | list):
            return True
    return False


def nested_deeper(value: dict, limit: int) -> bool:
    """Whether maps and lists in ``value`` (itself level 1) go deeper than ``limit``."""
    level, containers = 1, [value]
    while containers:
        if level > limit:
            return True
        inner = []
        for container in containers:
            items = container.values() if isinstance(container, dict) else container
            inner += [v for v in items if isinstance(v, dict | list)]
        level, containers = level + 1, inner
    return False


class Stored(NamedTuple):
    """One batch as stored: its records, and the MessagePack array of them (the
    bytes each record was stored as), ready to send without encoding them again."""

    records: list[Attestation]
    blobs: list[bytes]  # each record as stored

    @property
    def encoded(self) -> bytes:
        return msgpack_array(self.blobs)


def msgpack_array(blobs: list[bytes]) -> bytes:
    """The MessagePack array of already encoded items."""
    n = len(blobs)
    head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(blobs)
