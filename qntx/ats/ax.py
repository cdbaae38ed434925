"""The ax query language: query text in, a ``Filter`` (plus an optional action) out.

This module owns the grammar of ``qntx ax`` and ``qntx as``::

    [subjects] [is|are predicates] [of|from contexts] [by|via actors]
    [since T | until T | on T | between T and T] [so action]

Keywords are case-insensitive and clauses come in any order, each at most once.
Values are words (letters, digits, ``_ - . : @ +``, non-ASCII letters) or quoted with
``'`` or ``"``; a quoted value is never a keyword. Time values become Unix milliseconds.
Every mistake raises ``AxSyntaxError`` with the 0-based character position it refers to.

Pure functions, no I/O: anything that needs the clock takes ``now_ms`` so callers
(and tests) can pin it.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import msgspec

from qntx.protocol import Filter

__all__ = ["AxQuery", "AxSyntaxError", "join_words", "parse_as", "parse_ax", "parse_time"]

DAY_MS = 86_400_000

_QUOTES = "'\""
_WORD_PUNCTUATION = "_-.:@+"  # '+' so RFC 3339 offsets like +02:00 stay one word
_WILDCARDS = "*^%$#"

_VALUE_CLAUSES = {
    "is": "predicates",
    "are": "predicates",
    "of": "contexts",
    "from": "contexts",
    "by": "actors",
    "via": "actors",
}
_TIME_CLAUSES = ("since", "until", "on", "between")
_KEYWORDS = frozenset([*_VALUE_CLAUSES, *_TIME_CLAUSES, "so"])

_UNIT_MS: dict[str, int] = {}
for _names, _ms in (
    (("ms", "msec", "msecs", "millisecond", "milliseconds"), 1),
    (("s", "sec", "secs", "second", "seconds"), 1_000),
    (("m", "min", "mins", "minute", "minutes"), 60_000),
    (("h", "hr", "hrs", "hour", "hours"), 3_600_000),
    (("d", "day", "days"), DAY_MS),
    (("w", "wk", "wks", "week", "weeks"), 7 * DAY_MS),
    (("mo", "mos", "month", "months"), 30 * DAY_MS),
    (("y", "yr", "yrs", "year", "years"), 365 * DAY_MS),
):
    _UNIT_MS.update(dict.fromkeys(_names, _ms))
_MAX_AGO_MS = 10_000 * 365 * DAY_MS
_LAST_MS = {"week": 7 * DAY_MS, "month": 30 * DAY_MS, "year": 365 * DAY_MS}

# One regex for the absolute forms: YYYY-MM-DD, optionally with a time of day.
# A missing offset means UTC, which is what a user typing a bare timestamp expects.
_ABSOLUTE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_TIME_FORMS = (
    "use now, today, yesterday, 'N units ago', 'last week|month|year', "
    "YYYY-MM-DD or RFC 3339 like 2026-11-25T10:00:00Z"
)
_UNITS_HINT = "use seconds, minutes, hours, days, weeks, months or years"


class AxSyntaxError(ValueError):
    """A query the ax grammar rejects; ``position`` is a 0-based offset into the text."""

    def __init__(self, message: str, position: int, near: str | None = None):
        super().__init__(message, position, near)  # all in args, so it pickles
        self.message = message
        self.position = position
        self.near = near

    def __str__(self) -> str:
        head = "syntax error" if self.near is None else f"unexpected {self.near!r}"
        return f"{head} at position {self.position}: {self.message}"


class AxQuery(msgspec.Struct, kw_only=True):
    """A parsed ax query: what to match, and what to do with the matches (``so ...``)."""

    filter: Filter
    action: str | None = None


# ------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class _Token:
    text: str
    position: int
    quoted: bool = False

    @property
    def keyword(self) -> str | None:
        low = self.text.lower()
        return low if not self.quoted and low in _KEYWORDS else None

    def error(self, message: str) -> AxSyntaxError:
        return AxSyntaxError(message, self.position, self.text)


def _is_word_char(ch: str) -> bool:
    if ch.isascii():
        return ch.isalnum() or ch in _WORD_PUNCTUATION
    return unicodedata.category(ch)[0] in "LMN"


def _reject_special(ch: str, position: int, *, quoted: bool) -> None:
    if ch in _WILDCARDS:
        where = "not even inside quotes" if quoted else "name the values exactly"
        raise AxSyntaxError(f"wildcards are not supported, {where}", position, near=ch)
    if ch == "|":
        raise AxSyntaxError(
            "'|' alternatives are not supported; list several values separated by spaces",
            position,
            near=ch,
        )


def _tokenize(text: str) -> tuple[list[_Token], str | None]:
    """Split ``text`` into tokens up to an unquoted ``so``; the rest is the raw action."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace() or ch == ",":
            i += 1
        elif ch in _QUOTES:
            end = text.find(ch, i + 1)
            if end < 0:
                raise AxSyntaxError(f"unterminated quote, add the closing {ch}", i)
            for offset, inner in enumerate(text[i + 1 : end], start=i + 1):
                _reject_special(inner, offset, quoted=True)
            if not text[i + 1 : end].strip():
                raise AxSyntaxError("empty quoted value", i)
            tokens.append(_Token(text[i + 1 : end], i, quoted=True))
            i = end + 1
            if i < n and not (text[i].isspace() or text[i] == ","):
                raise AxSyntaxError("put a space after a quoted value", i, near=text[i])
        elif _is_word_char(ch):
            start = i
            while i < n and _is_word_char(text[i]):
                i += 1
            if i < n and text[i] in _QUOTES:
                raise AxSyntaxError(
                    "a quote must start a value; quote the whole value", i, near=text[i]
                )
            token = _Token(text[start:i], start)
            tokens.append(token)
            if token.keyword == "so":
                # The action is free text for whoever runs it, so it is not tokenized.
                return tokens, text[i:]
        else:
            _reject_special(ch, i, quoted=False)
            raise AxSyntaxError("put values with special characters in quotes", i, near=ch)
    return tokens, None


# -------------------------------------------------------------------- clauses


@dataclass
class _Clauses:
    values: dict[str, list[str]] = field(default_factory=dict)
    keywords: dict[str, _Token] = field(default_factory=dict)
    time_keyword: _Token | None = None
    time_tokens: list[_Token] = field(default_factory=list)
    so: _Token | None = None
    action: str | None = None


def _split_clauses(text: str) -> _Clauses:
    tokens, rest = _tokenize(text)
    if not tokens:
        raise AxSyntaxError("the query is empty", 0)
    clauses = _Clauses()
    if rest is not None:
        clauses.so = tokens.pop()
        clauses.action = _action_text(rest, clauses.so)

    subjects: list[_Token] = []
    groups: list[tuple[_Token, list[_Token]]] = []
    for token in tokens:
        if token.keyword:
            groups.append((token, []))
        elif groups:
            groups[-1][1].append(token)
        else:
            subjects.append(token)

    clauses.values["subjects"] = [t.text for t in subjects]
    for keyword, values in groups:
        kw = keyword.keyword
        if kw in _VALUE_CLAUSES:
            name = _VALUE_CLAUSES[kw]
            if name in clauses.keywords:
                first = clauses.keywords[name]
                raise keyword.error(
                    f"{name} were already given by {first.text!r} at position "
                    f"{first.position}; list all values in one clause"
                )
            if not values:
                raise keyword.error(f"{name} need at least one value")
            clauses.keywords[name] = keyword
            clauses.values[name] = [t.text for t in values]
        else:
            if clauses.time_keyword is not None:
                first = clauses.time_keyword
                raise keyword.error(
                    f"only one time clause is allowed and {first.text!r} at position "
                    f"{first.position} is one; use 'between A and B' for a range"
                )
            if not values:
                example = (
                    "between 2026-01-01 and 2026-02-01" if kw == "between" else f"{kw} 3 days ago"
                )
                raise keyword.error(f"{kw} needs a time, e.g. '{example}'")
            clauses.time_keyword, clauses.time_tokens = keyword, values
    return clauses


def _action_text(rest: str, so: _Token) -> str:
    action = rest.strip()
    if not action:
        raise so.error("so needs an action after it")
    # A single quoted action is unwrapped, the way a quoted value is.
    if action[0] in _QUOTES and action.find(action[0], 1) == len(action) - 1:
        action = action[1:-1].strip()
        if not action:
            raise so.error("so needs an action after it")
    return action


def parse_ax(text: str, *, now_ms: int | None = None) -> AxQuery:
    """Parse an ax query into a ``Filter`` and an optional ``so`` action."""
    clauses = _split_clauses(text)
    time_start = time_end = None
    keyword = clauses.time_keyword
    if keyword is not None:
        now = _now(now_ms)
        kw = keyword.keyword
        if kw == "between":
            time_start, time_end = _between(keyword, clauses.time_tokens, now)
        else:
            moment = _time_from_words(_time_words(clauses.time_tokens), now)
            if kw == "since":
                time_start = moment
            elif kw == "until":
                time_end = moment
            else:
                time_start, time_end = moment, moment + DAY_MS - 1
    values = clauses.values
    return AxQuery(
        filter=Filter(
            subjects=values.get("subjects", []),
            predicates=values.get("predicates", []),
            contexts=values.get("contexts", []),
            actors=values.get("actors", []),
            time_start=time_start,
            time_end=time_end,
        ),
        action=clauses.action,
    )


def _between(keyword: _Token, tokens: list[_Token], now: int) -> tuple[int, int]:
    ands = [i for i, t in enumerate(tokens) if not t.quoted and t.text.lower() == "and"]
    example = "e.g. 'between 2026-01-01 and 2026-02-01'"
    if not ands:
        raise keyword.error(f"between needs 'and', {example}")
    if len(ands) > 1:
        raise tokens[ands[1]].error("between takes exactly one 'and'")
    split = ands[0]
    if split == 0:
        raise tokens[split].error("between needs a time before 'and'")
    if split == len(tokens) - 1:
        raise tokens[split].error("between needs a time after 'and'")
    start = _time_from_words(_time_words(tokens[:split]), now)
    end = _time_from_words(_time_words(tokens[split + 1 :]), now)
    if start > end:
        raise AxSyntaxError(
            f"between needs the earlier time first, but {_iso(start)} is after {_iso(end)}",
            keyword.position,
        )
    return start, end


def parse_as(text: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """Parse ``SUBJECT [is P] [of C] [by A]`` into (subjects, predicates, contexts, actors).

    Predicates and contexts default to ``["_"]`` (existence), actors to ``[]``.
    """
    clauses = _split_clauses(text)
    if clauses.time_keyword is not None:
        raise clauses.time_keyword.error(
            "an attestation takes no time clause; it is stamped when it is created"
        )
    if clauses.so is not None:
        raise clauses.so.error("'so' actions belong to queries, not to attestations")
    values = clauses.values
    if not values["subjects"]:
        first = min(clauses.keywords.values(), key=lambda t: t.position)
        raise first.error(f"an attestation needs at least one subject before {first.text!r}")
    return (
        values["subjects"],
        values.get("predicates", ["_"]),
        values.get("contexts", ["_"]),
        values.get("actors", []),
    )


def join_words(words: list[str]) -> str:
    """Join CLI words into one query text; a word with whitespace becomes one quoted value."""
    parts: list[str] = []
    offset = 0
    for word in words:
        if any(ch.isspace() for ch in word):
            quote = "'" if "'" not in word else '"'
            if quote in word:
                raise AxSyntaxError("a value cannot contain both kinds of quote", offset, near=word)
            word = f"{quote}{word}{quote}"
        parts.append(word)
        offset += len(word) + 1
    return " ".join(parts)


# ----------------------------------------------------------------------- time


def _now(now_ms: int | None) -> int:
    return time.time_ns() // 1_000_000 if now_ms is None else now_ms


def _iso(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")


def _time_words(tokens: list[_Token]) -> list[_Token]:
    """Split quoted time tokens into words, so '3 days ago' reads like 3 days ago."""
    words: list[_Token] = []
    for token in tokens:
        if token.quoted:
            base = token.position + 1
            words.extend(
                _Token(m.group(), base + m.start()) for m in re.finditer(r"\S+", token.text)
            )
        else:
            words.append(token)
    return words


def parse_time(text: str, *, now_ms: int | None = None) -> int:
    """Parse one time value ('now', '3 days ago', '2026-01-02', RFC 3339...) to Unix ms."""
    tokens, rest = _tokenize(text)
    if not tokens:
        raise AxSyntaxError(f"the time is empty; {_TIME_FORMS}", 0)
    if rest is not None:
        raise tokens[-1].error(f"not a time; {_TIME_FORMS}")
    return _time_from_words(_time_words(tokens), _now(now_ms))


def duration_ms(text: str, name: str = "duration") -> int:
    """``parse_duration`` for settings and options: a mistake is ``Invalid`` naming ``name``."""
    from qntx.errors import Invalid

    try:
        return parse_duration(text)
    except AxSyntaxError as exc:
        raise Invalid(f"{name}: {exc.message} (got {text!r})") from None


def parse_duration(text: str) -> int:
    """Parse a span ('30s', '5 minutes', '2h') to ms; > 0."""
    tokens, rest = _tokenize(text)
    if not tokens:
        raise AxSyntaxError(f"the duration is empty; {_UNITS_HINT}, e.g. '30s' or '5 minutes'", 0)
    if rest is not None:
        raise tokens[-1].error(f"not a duration; {_UNITS_HINT}")
    words = _time_words(tokens)
    span = _duration(words, words[-1])
    if span <= 0:
        raise words[0].error("the duration must be more than zero")
    return span


def _time_from_words(words: list[_Token], now: int) -> int:
    low = [word.text.lower() for word in words]
    first = words[0]
    today = now - now % DAY_MS
    named = {"now": now, "today": today, "yesterday": today - DAY_MS}
    if len(words) == 1 and low[0] in named:
        return named[low[0]]
    if len(words) == 1 and _looks_absolute(first.text):
        return _absolute(first.text, first)
    if len(words) == 2 and _looks_absolute(first.text) and ":" in words[1].text:
        # RFC 3339 allows a space between date and time: '2026-11-25 10:00:00Z'.
        return _absolute(f"{first.text}T{words[1].text}", first)
    if low[0] == "last":
        if len(words) == 2 and low[1] in _LAST_MS:
            return now - _LAST_MS[low[1]]
        raise words[min(1, len(words) - 1)].error("'last' takes week, month or year")
    if low[-1] == "ago":
        return now - _duration(words[:-1], words[-1])
    if first.text[:1].isdigit():
        raise first.error("a relative time ends with 'ago', e.g. '3 days ago'")
    raise first.error(f"not a time; {_TIME_FORMS}")


def _looks_absolute(word: str) -> bool:
    return len(word) >= 5 and word[:4].isdigit() and word[4] == "-"


def _absolute(text: str, where: _Token) -> int:
    match = _ABSOLUTE.fullmatch(text)
    if match is None:
        raise where.error("not a date; use YYYY-MM-DD or RFC 3339 like 2026-11-25T10:00:00Z")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        tz = UTC
        if offset and offset not in "Zz":
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("offset out of range")
            sign = -1 if offset[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        clock = [int(part) for part in (hour, minute, second) if part is not None]
        moment = datetime(int(year), int(month), int(day), *clock, tzinfo=tz)
    except ValueError as exc:
        raise where.error(f"not a valid date or time ({exc})") from None
    millis = int((fraction or "")[:3].ljust(3, "0"))  # finer than ms is truncated
    return (moment - _EPOCH) // timedelta(milliseconds=1) + millis


def _duration(words: list[_Token], ago: _Token) -> int:
    """The span of '3 days' or '3d' in ms."""
    if len(words) == 2:
        amount, unit = words
    elif len(words) == 1 and words[0].text[:1].isdigit():
        word = words[0]
        digits = len(word.text) - len(word.text.lstrip("0123456789"))
        amount = _Token(word.text[:digits], word.position)
        unit = _Token(word.text[digits:], word.position + digits)
        if not unit.text:
            raise word.error(f"the amount needs a unit; {_UNITS_HINT}")
    else:
        raise (words[0] if words else ago).error("use 'N units', e.g. '3 days' or '30s'")
    if not (amount.text.isascii() and amount.text.isdigit()):
        raise amount.error("the amount must be a whole number, e.g. '3 days ago'")
    if unit.text.lower() not in _UNIT_MS:
        raise unit.error(f"unknown time unit; {_UNITS_HINT}")
    span = int(amount.text) * _UNIT_MS[unit.text.lower()]
    if span > _MAX_AGO_MS:  # keeps every result inside what dates and int64 can hold
        raise amount.error("that is more than 10000 years ago")
    return span
