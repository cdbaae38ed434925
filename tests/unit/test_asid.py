"""ASID segments, format and randomness (SPEC §3.2)."""

from __future__ import annotations

import re

import pytest

from qntx.asid import ALPHABET, is_asid, new_asid, segment

ASID_SHAPE = re.compile(r"^[A-Z]{2}-[A-Z2-9]{0,8}-[A-Z2-9]{0,8}-[A-Z2-9]{0,8}-[A-Z2-9]{8}$")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # the spec's examples
        ("commit", "COMIT"),
        ("Müller", "MULER"),
        ("vacancies", "VACANCIE"),
        ("handler", "HANDLER"),
        ("python", "PYTHON"),
        ("_", ""),
        # folding to ASCII
        ("straße", "STRASE"),  # ß -> ss, then the run collapses
        ("Æsir", "AESIR"),
        ("æther", "AETHER"),
        ("œuvre", "OEUVRE"),
        ("Œdipus", "OEDIPUS"),
        ("Ærøskøbing", "AERSKBIN"),  # ø has no decomposition, so it is dropped
        ("café", "CAFE"),
        ("naïve", "NAIVE"),
        ("ﬁnance", "FINANCE"),  # compatibility ligature
        ("日本", ""),  # nothing foldable
        # letters and digits only
        ("john doe", "JOHNDOE"),
        ("a.b-c_d", "ABCD"),
        ("", ""),
        # run collapsing (after uppercasing, so case differences collapse too)
        ("aaabbbccc", "ABC"),
        ("Aardvark", "ARDVARK"),
        ("bookkeeper", "BOKEPER"),
        # leading digits stripped, later 0/1 mapped
        ("123abc", "ABC"),
        ("42", ""),
        ("a0b1", "AOBI"),
        ("x1000", "XIO"),  # the run collapses before 0 becomes O
        ("v2.10", "V2IO"),
        # cut to 8
        ("internationalization", "INTERNAT"),
        ("abcdefghijkl", "ABCDEFGH"),
    ],
)
def test_segment(value: str, expected: str) -> None:
    assert segment(value) == expected


def test_segments_use_only_the_alphabet() -> None:
    for value in ["0O1Il", "ÀÉÎÕÜ", "x" * 100, "Ωmega", "9lives"]:
        assert set(segment(value)) <= set(ALPHABET)
        assert len(segment(value)) <= 8


def test_headline_example_shape() -> None:
    asid = new_asid("vacancies", "handler", "python")
    assert asid.startswith("AS-VACANCIE-HANDLER-PYTHON-")
    assert ASID_SHAPE.match(asid)
    assert is_asid(asid)


def test_empty_segments_stay_empty() -> None:
    asid = new_asid("alice")
    assert re.fullmatch(r"AS-ALICE---[A-Z2-9]{8}", asid)
    assert is_asid(asid)


def test_job_prefix() -> None:
    asid = new_asid("ingest", prefix="JB")
    assert asid.startswith("JB-INGEST---")
    assert is_asid(asid)


def test_suffix_draws_from_the_alphabet() -> None:
    seen: set[str] = set()
    for _ in range(2000):
        seen.update(new_asid("x").rsplit("-", 1)[1])
    assert seen <= set(ALPHABET)
    assert seen == set(ALPHABET)  # 16,000 draws miss a character with odds ~ 34 * e^-470


def test_ids_are_random() -> None:
    ids = {new_asid("alice", "knows", "work") for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize("prefix", ["", "A", "ASX", "as", "A1", "Ä B", 12, None])
def test_bad_prefix(prefix: object) -> None:
    with pytest.raises(ValueError):
        new_asid("alice", prefix=prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "AS-ALICE-KNOWS-WORK",  # no suffix
        "AS-ALICE-KNOWS-WORK-RARARAX",  # short suffix
        "AS-ALICE-KNOWS-WORK-RARARAX1",  # 1 is not in the alphabet
        "as-ALICE-KNOWS-WORK-RARARAXG",
        "AS-ALICE-KNOWSWORKS-WORK-RARARAXG",  # a 9-character segment
        "AS-2ALICE-KNOWS-WORK-RARARAXG",  # a segment starting with a digit
        None,
        42,
    ],
)
def test_is_asid_rejects(text: object) -> None:
    assert not is_asid(text)


def test_is_asid_accepts_spec_example() -> None:
    assert is_asid("AS-ALICE-KNOWS-WORK-RARARAXG")


def test_job_ids_have_a_longer_random_part() -> None:
    """Clients make job ids by the million: 12 random characters (about 61 bits)."""
    job = new_asid("builtin.echo", prefix="JB")
    suffix = job.rsplit("-", 1)[1]
    assert job.startswith("JB-BUILTINE---") and len(suffix) == 12 and is_asid(job)
    assert len(new_asid("alice").rsplit("-", 1)[1]) == 8  # attestations keep SPEC's 8
    assert len({new_asid("h", prefix="JB") for _ in range(20_000)}) == 20_000
