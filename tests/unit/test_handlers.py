"""Handlers as attestations: names, code checks, and which version is current."""

from __future__ import annotations

import pytest

from qntx.errors import Invalid
from qntx.protocol import Attestation
from qntx.stored_handlers import (
    check_name,
    current_version,
    handler_attestation,
    resolve,
    tombstone_attestation,
)

pytestmark = pytest.mark.timeout(30)


def record(name: str, ts: int, **attributes) -> Attestation:
    return Attestation(
        id=f"AS-{name}-{ts}", subjects=[name], predicates=["handler"], contexts=["python"], actors=[name],
        timestamp=ts, source="test", attributes=attributes, created_at=ts,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["vacancies", "_x", "x-y", "café", "東京", "a" * 128])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "1x", "-x", "a.b", "a b", "a/b", "a" * 129])
def test_bad_names(name):
    with pytest.raises(Invalid):
        check_name(name)


def test_code_that_does_not_compile_is_refused_with_its_line():
    with pytest.raises(Invalid, match="line 2"):
        handler_attestation("x", "a = 1\nif:\n")
    with pytest.raises(Invalid, match="no code"):
        handler_attestation("x", "   \n")


def test_handler_attestation_is_self_certifying():
    item = handler_attestation("vacancies", "print(1)")
    assert (item.subjects, item.predicates, item.contexts, item.actors) == (
        ["vacancies"], ["handler"], ["python"], ["vacancies"],
    )  # fmt: skip
    assert item.attributes == {"code": "print(1)"} and item.source == "qntx-cli"
    assert tombstone_attestation("vacancies").attributes == {"deleted": True}


def test_newest_wins_tombstones_hide_and_codeless_entries_are_skipped():
    records = [  # newest first, as the store returns them
        record("b", 50, deleted=True),
        record("a", 40, code="new"),
        record("c", 30, note="no code"),
        record("b", 20, code="old b"),
        record("a", 10, code="old"),
    ]
    resolution = resolve(records)
    assert {n: r.attributes["code"] for n, r in resolution.current.items()} == {"a": "new"}
    assert [r.id for r in resolution.skipped] == ["AS-c-30"]
    # A handler re-created after its tombstone is back.
    assert "b" in resolve([record("b", 60, code="again"), *records]).current


def test_a_newer_codeless_attestation_does_not_hide_the_real_handler():
    records = [  # e.g. `qntx as a is handler of python`, after the real versions
        record("a", 50),
        record("a", 40, note="still no code"),
        record("a", 30, code="real"),
        record("b", 20),
        record("b", 10, deleted=True),
    ]
    resolution = resolve(records)
    assert {n: r.attributes["code"] for n, r in resolution.current.items()} == {"a": "real"}
    assert [r.id for r in resolution.skipped] == ["AS-a-50", "AS-a-40", "AS-b-20"]
    assert current_version(records[:3]).id == "AS-a-30"
    assert current_version(records[3:]).id == "AS-b-10"
    assert current_version(records[:2]) is None
