"""ASIDs: the readable, random identifiers of attestations and jobs (SPEC §3.2).

An ASID is ``PREFIX-SUBJ-PRED-CTX-SUFFIX``, e.g. ``AS-VACANCIE-HANDLER-PYTHON-7K4M3B9X``.
The three middle segments are cleaned from the first subject, predicate and context so
a human can tell what an id is about; the suffix is what makes it unique. Uniqueness is
enforced by the store, which asks for a fresh id on the (astronomically rare) collision.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata

# No 0/1: they read as O/I, which is also why segments map those digits to letters.
ALPHABET = "23456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SEGMENT_LENGTH = 8
SUFFIX_LENGTH = 8
# Jobs are made by clients, in the millions per handler: 12 characters (about 61 bits)
# keep a collision, which the server would refuse as a conflict, out of reach
# (34**8 is about 2**41: one likely collision per handler at a million ids).
JOB_SUFFIX_LENGTH = 12

# Letters NFKD leaves alone because they are not composed from a base and a mark.
_LIGATURES = str.maketrans({"ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE"})
_DIGIT_LOOKALIKES = str.maketrans({"0": "O", "1": "I"})
_NOT_ALNUM = re.compile(r"[^A-Z0-9]")  # text is ASCII and uppercased by then
_RUNS = re.compile(r"(.)\1+")
_NOT_ALPHABET = re.compile(rf"[^{ALPHABET}]")
_PREFIX = re.compile(r"[A-Z]{2}")
_PREFIXES_SEEN = frozenset(("AS", "JB"))  # checked already: the two the project makes
_SEG = rf"(?:[A-Z][{ALPHABET}]{{0,{SEGMENT_LENGTH - 1}}})?"
_ASID = re.compile(
    rf"[A-Z]{{2}}-{_SEG}-{_SEG}-{_SEG}-(?:[{ALPHABET}]{{{SUFFIX_LENGTH}}}|[{ALPHABET}]{{{JOB_SUFFIX_LENGTH}}})"
)


def _fold_ascii(value: str) -> str:
    if value.isascii():
        return value
    decomposed = unicodedata.normalize("NFKD", value.translate(_LIGATURES))
    return "".join(c for c in decomposed if c.isascii() and not unicodedata.combining(c))


@functools.lru_cache(maxsize=4096)  # predicates and contexts repeat on almost every write
def segment(value: str) -> str:
    """The cleaned, at most 8-character segment for one subject/predicate/context.

    ``commit`` → ``COMIT``, ``Müller`` → ``MULER``, ``vacancies`` → ``VACANCIE``,
    and ``_`` (the existence placeholder) → ``""``.
    """
    text = _NOT_ALNUM.sub("", _fold_ascii(value).upper())
    text = _RUNS.sub(r"\1", text).lstrip("0123456789").translate(_DIGIT_LOOKALIKES)
    return _NOT_ALPHABET.sub("", text)[:SEGMENT_LENGTH]


# Random bytes below 238 (7 x 34) map evenly onto the alphabet; the rest are dropped
# (rejection sampling), so every character is uniform. Characters are drawn from the
# OS's cryptographic source a few thousand at a time, and the pool is emptied in a
# forked child, which must never hand out its parent's characters.
_TO_ALPHABET = bytes(ALPHABET.encode()[b % len(ALPHABET)] for b in range(256))
_REJECTED = bytes(range(len(ALPHABET) * (256 // len(ALPHABET)), 256))
_POOL_BYTES = 4096
_pool = ""


def _forget_pool() -> None:
    global _pool
    _pool = ""


os.register_at_fork(after_in_child=_forget_pool)


def _suffix(length: int = SUFFIX_LENGTH) -> str:
    global _pool
    while len(_pool) < length:
        _pool += os.urandom(_POOL_BYTES).translate(_TO_ALPHABET, _REJECTED).decode()
    suffix, _pool = _pool[:length], _pool[length:]
    return suffix


def new_asid(subject: str, predicate: str = "_", context: str = "_", *, prefix: str = "AS") -> str:
    """A fresh ASID: ``AS`` for attestations, ``JB`` for jobs (with a longer suffix)."""
    if not isinstance(prefix, str) or (prefix not in _PREFIXES_SEEN and not _PREFIX.fullmatch(prefix)):
        raise ValueError(f"ASID prefix must be two uppercase letters, got {prefix!r}")
    suffix = _suffix(JOB_SUFFIX_LENGTH if prefix == "JB" else SUFFIX_LENGTH)
    parts = (prefix, segment(subject), segment(predicate), segment(context), suffix)
    return "-".join(parts)


def is_asid(text: object) -> bool:
    """Whether ``text`` has the shape of an ASID (any prefix)."""
    return isinstance(text, str) and _ASID.fullmatch(text) is not None
