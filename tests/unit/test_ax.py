"""The ax query language: clauses, values, time values, errors and their positions."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qntx.ats.ax import AxQuery, AxSyntaxError, join_words, parse_as, parse_ax, parse_time
from qntx.protocol import Filter

pytestmark = pytest.mark.timeout(30)

DAY = 86_400_000


def ms(*args: int, tz: timezone = UTC) -> int:
    """A reference conversion that does not share code with the parser."""
    moment = datetime(*args[:6], tzinfo=tz) + timedelta(
        milliseconds=args[6] if len(args) > 6 else 0
    )
    return int(moment.timestamp() * 1000)


# 2026-11-25T10:30:15.250Z, a Wednesday
NOW = 1_795_602_615_250
TODAY = 1_795_564_800_000  # 2026-11-25T00:00:00Z


def test_reference_clock_constants_agree():
    assert NOW == ms(2026, 11, 25, 10, 30, 15, 250)
    assert TODAY == ms(2026, 11, 25, 0, 0, 0)


def ax(text: str) -> Filter:
    return parse_ax(text, now_ms=NOW).filter


def error(text: str) -> AxSyntaxError:
    with pytest.raises(AxSyntaxError) as caught:
        parse_ax(text, now_ms=NOW)
    return caught.value


# ---------------------------------------------------------------- clauses


def test_subjects_alone():
    result = parse_ax("alice", now_ms=NOW)
    assert isinstance(result, AxQuery)
    assert result.filter == Filter(subjects=["alice"])
    assert result.action is None


def test_absent_clauses_stay_empty():
    f = ax("alice")
    assert (f.predicates, f.contexts, f.actors) == ([], [], [])
    assert (f.time_start, f.time_end, f.source, f.limit) == (None, None, None, None)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("is author", "predicates"),
        ("are author", "predicates"),
        ("of git", "contexts"),
        ("from git", "contexts"),
        ("by bob", "actors"),
        ("via bob", "actors"),
    ],
)
def test_each_value_clause_alone(text, field):
    f = ax(text)
    assert getattr(f, field) == [text.split()[1]]
    assert f.subjects == []
    others = {"subjects", "predicates", "contexts", "actors"} - {field}
    assert all(getattr(f, name) == [] for name in others)


@pytest.mark.parametrize(
    "text",
    [
        "alice is author of git by bob since yesterday",
        "alice by bob since yesterday of git is author",
        "alice since yesterday by bob is author of git",
        "alice of git since yesterday is author by bob",
    ],
)
def test_clauses_in_any_order(text):
    assert ax(text) == Filter(
        subjects=["alice"],
        predicates=["author"],
        contexts=["git"],
        actors=["bob"],
        time_start=TODAY - DAY,
    )


def test_keywords_are_case_insensitive_and_values_keep_case():
    result = parse_ax("Alice IS Author Of GitHub By BOB SINCE Today So Notify Me", now_ms=NOW)
    assert result.filter == Filter(
        subjects=["Alice"],
        predicates=["Author"],
        contexts=["GitHub"],
        actors=["BOB"],
        time_start=TODAY,
    )
    assert result.action == "Notify Me"


def test_multiple_values_by_whitespace_and_commas():
    f = ax("alice  bob,carol , dave is author,reviewer of git\tcode by x y")
    assert f.subjects == ["alice", "bob", "carol", "dave"]
    assert f.predicates == ["author", "reviewer"]
    assert f.contexts == ["git", "code"]
    assert f.actors == ["x", "y"]


def test_word_characters():
    f = ax("user@example.com a_b-c.d:e v1.2+build is x")
    assert f.subjects == ["user@example.com", "a_b-c.d:e", "v1.2+build"]


def test_non_ascii_values():
    f = ax("Müller Straße 東京 is Geschäftsführer of Zürich")
    assert f.subjects == ["Müller", "Straße", "東京"]
    assert f.predicates == ["Geschäftsführer"]
    assert f.contexts == ["Zürich"]


def test_non_ascii_combining_marks_stay_in_the_word():
    decomposed = "Mu\u0308ller"
    assert ax(decomposed).subjects == [decomposed]


# ---------------------------------------------------------------- quoting


def test_single_and_double_quotes():
    f = ax("'John Doe' \"Jane Roe\" is 'senior developer' of \"ACME Corp\" by 'HR dept'")
    assert f.subjects == ["John Doe", "Jane Roe"]
    assert f.predicates == ["senior developer"]
    assert f.contexts == ["ACME Corp"]
    assert f.actors == ["HR dept"]


def test_quoted_keywords_are_values():
    result = parse_ax("'is' \"by\" is 'of' of 'since' by 'so'", now_ms=NOW)
    assert result.filter == Filter(
        subjects=["is", "by"], predicates=["of"], contexts=["since"], actors=["so"]
    )
    assert result.action is None


def test_other_quote_inside_quotes():
    f = ax('"O\'Brien" is \'said "hi"\'')
    assert f.subjects == ["O'Brien"]
    assert f.predicates == ['said "hi"']


def test_quoted_value_followed_by_comma():
    assert ax("'a b','c d'").subjects == ["a b", "c d"]


def test_keyword_prefix_words_are_not_keywords():
    f = ax("island isolated byword sonar")
    assert f.subjects == ["island", "isolated", "byword", "sonar"]


def test_and_is_an_ordinary_value_outside_between():
    assert ax("salt and pepper").subjects == ["salt", "and", "pepper"]


# ------------------------------------------------------------------- time


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("now", NOW),
        ("NOW", NOW),
        ("today", TODAY),
        ("yesterday", TODAY - DAY),
        ("Yesterday", 1_795_478_400_000),
        ("last week", NOW - 7 * DAY),
        ("last month", NOW - 30 * DAY),
        ("last year", NOW - 365 * DAY),
        ("LAST Month", 1_793_010_615_250),
        ("2026-01-02", ms(2026, 1, 2)),
        ("2026-11-25T10:00:00Z", 1_795_600_800_000),
        ("2026-11-25T10:00:00+02:00", 1_795_593_600_000),
        ("2026-11-25T10:00:00-05:30", ms(2026, 11, 25, 15, 30, 0)),
        ("2026-11-25T10:00:00.5Z", 1_795_600_800_500),
        ("2026-11-25T10:00:00.123456789Z", 1_795_600_800_123),
        ("2026-11-25t10:00:00z", 1_795_600_800_000),
        ("2026-11-25T10:00:00", 1_795_600_800_000),
        ("'2026-11-25 10:00:00Z'", 1_795_600_800_000),
        ("1969-12-31", -DAY),
    ],
)
def test_since_time_values(value, expected):
    f = ax(f"since {value}")
    assert f.time_start == expected
    assert f.time_end is None


@pytest.mark.parametrize(
    ("unit", "span"),
    [
        *[(u, 1_000) for u in ("s", "sec", "secs", "second", "seconds")],
        *[(u, 60_000) for u in ("m", "min", "mins", "minute", "minutes")],
        *[(u, 3_600_000) for u in ("h", "hr", "hrs", "hour", "hours")],
        *[(u, DAY) for u in ("d", "day", "days")],
        *[(u, 7 * DAY) for u in ("w", "wk", "week", "weeks")],
        *[(u, 30 * DAY) for u in ("mo", "month", "months")],
        *[(u, 365 * DAY) for u in ("y", "yr", "yrs", "year", "years")],
    ],
)
def test_units_ago(unit, span):
    assert ax(f"since 3 {unit} ago").time_start == NOW - 3 * span
    assert ax(f"since 3 {unit.upper()} AGO").time_start == NOW - 3 * span


def test_three_days_ago_quoted_and_unquoted():
    expected = 1_795_343_415_250
    assert expected == NOW - 3 * DAY
    assert ax("since 3 days ago").time_start == expected
    assert ax("since '3 days ago'").time_start == expected
    assert ax('since "3 days ago"').time_start == expected
    assert ax("alice since 3 days ago by bob").time_start == expected


def test_compact_amount_and_unit():
    assert ax("since 3d ago").time_start == NOW - 3 * DAY
    assert ax("since 90min ago").time_start == NOW - 90 * 60_000
    assert ax("since 0s ago").time_start == NOW


def test_until():
    f = ax("alice until 2026-01-01")
    assert (f.time_start, f.time_end) == (None, ms(2026, 1, 1))


def test_on_today_is_today():
    f = ax("on today")
    assert f.time_start == TODAY
    assert f.time_end == TODAY + DAY - 1 == 1_795_651_199_999


def test_on_date_and_on_yesterday():
    f = ax("on 2026-03-01")
    assert (f.time_start, f.time_end) == (ms(2026, 3, 1), ms(2026, 3, 2) - 1)
    f = ax("on yesterday")
    assert (f.time_start, f.time_end) == (TODAY - DAY, TODAY - 1)


def test_on_an_instant_covers_24_hours_from_it():
    f = ax("on 2026-11-25T10:00:00+02:00")
    assert (f.time_start, f.time_end) == (1_795_593_600_000, 1_795_593_600_000 + DAY - 1)


def test_between_is_inclusive_on_both_ends():
    f = ax("alice between 2026-01-01 and 2026-02-01")
    assert (f.time_start, f.time_end) == (ms(2026, 1, 1), ms(2026, 2, 1))


def test_between_with_multi_word_times():
    f = ax("between 3 days ago AND yesterday")
    assert (f.time_start, f.time_end) == (NOW - 3 * DAY, TODAY - DAY)
    f = ax("between '2 weeks ago' and 'last week'")
    assert (f.time_start, f.time_end) == (NOW - 14 * DAY, NOW - 7 * DAY)


def test_between_equal_times_is_allowed():
    f = ax("between now and now")
    assert (f.time_start, f.time_end) == (NOW, NOW)


def test_real_clock_when_now_is_not_given():
    before = int(datetime.now(UTC).timestamp() * 1000)
    start = parse_ax("since now").filter.time_start
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert before - 1 <= start <= after + 1


def test_parse_time():
    assert parse_time("now", now_ms=NOW) == NOW
    assert parse_time("3 days ago", now_ms=NOW) == NOW - 3 * DAY
    assert parse_time("'3 days ago'", now_ms=NOW) == NOW - 3 * DAY
    assert parse_time("2026-01-02") == ms(2026, 1, 2)
    assert parse_time("  today ", now_ms=NOW) == TODAY


@pytest.mark.parametrize(
    ("text", "position", "near"),
    [
        ("", 0, None),
        ("   ", 0, None),
        ("tomorrow", 0, "tomorrow"),
        ("3 days", 0, "3"),
        ("3 parsecs ago", 2, "parsecs"),
        ("last decade", 5, "decade"),
        ("2026-02-30", 0, "2026-02-30"),
        ("so yesterday", 0, "so"),
        ("ago", 0, "ago"),
    ],
)
def test_parse_time_errors(text, position, near):
    with pytest.raises(AxSyntaxError) as caught:
        parse_time(text, now_ms=NOW)
    assert (caught.value.position, caught.value.near) == (position, near)


# ----------------------------------------------------------------- action


def test_so_takes_the_rest_as_action():
    result = parse_ax("alice is author so notify the team of it by email", now_ms=NOW)
    assert result.filter == Filter(subjects=["alice"], predicates=["author"])
    assert result.action == "notify the team of it by email"


def test_so_action_is_free_text():
    result = parse_ax("alice so post https://x.test/a?b=1 #ops *now*", now_ms=NOW)
    assert result.action == "post https://x.test/a?b=1 #ops *now*"


def test_so_quoted_action_is_unwrapped():
    assert parse_ax("alice so 'send email'").action == "send email"
    assert parse_ax("alice so 'a' and 'b'").action == "'a' and 'b'"


def test_so_after_a_time_clause_and_alone():
    result = parse_ax("alice since 3 days ago SO summarise", now_ms=NOW)
    assert result.filter.time_start == NOW - 3 * DAY
    assert result.action == "summarise"
    assert parse_ax("so summarise").action == "summarise"


# ---------------------------------------------------------------- results


def test_filter_encodes_on_the_wire():
    f = ax("alice is author since today")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(f), type=Filter) == f


# ----------------------------------------------------------------- errors


def test_error_is_a_value_error_with_message_and_position():
    exc = error("alice is by bob")
    assert isinstance(exc, ValueError)
    assert exc.position == 6
    assert exc.message == "predicates need at least one value"
    assert str(exc) == "unexpected 'is' at position 6: predicates need at least one value"


def test_error_pickles():
    exc = error("alice is by bob")
    again = pickle.loads(pickle.dumps(exc))
    assert (again.message, again.position, str(again)) == (exc.message, exc.position, str(exc))


@pytest.mark.parametrize("text", ["", "   ", "\t\n", ",", " , ,"])
def test_empty_query(text):
    exc = error(text)
    assert exc.position == 0
    assert "empty" in str(exc)


@pytest.mark.parametrize("char", list("*^%$#"))
def test_wildcards_rejected_outside_quotes(char):
    exc = error(f"alice is auth{char}")
    assert exc.position == 13
    assert exc.near == char
    assert f"'{char}'" in str(exc) and "wildcard" in str(exc)


@pytest.mark.parametrize("char", list("*^%$#"))
def test_wildcards_rejected_inside_quotes(char):
    exc = error(f"alice is 'au{char}th'")
    assert exc.position == 12
    assert "not even inside quotes" in str(exc)


@pytest.mark.parametrize(
    ("text", "position"), [("alice|bob", 5), ("alice | bob", 6), ("'alice|bob'", 6)]
)
def test_pipe_rejected(text, position):
    exc = error(text)
    assert (exc.position, exc.near) == (position, "|")
    assert "not supported" in str(exc)


@pytest.mark.parametrize(
    ("text", "position"), [("alice is 'author", 9), ('"abc', 0), ("a 'b\"", 2)]
)
def test_unterminated_quote(text, position):
    exc = error(text)
    assert exc.position == position
    assert "unterminated quote" in str(exc)


@pytest.mark.parametrize(
    ("text", "position", "near", "message"),
    [
        ("alice is", 6, "is", "predicates need at least one value"),
        ("alice is of git", 6, "is", "predicates need at least one value"),
        ("alice of", 6, "of", "contexts need at least one value"),
        ("alice from by bob", 6, "from", "contexts need at least one value"),
        ("alice by", 6, "by", "actors need at least one value"),
        ("alice VIA so x", 6, "VIA", "actors need at least one value"),
        ("alice since", 6, "since", "since needs a time, e.g. 'since 3 days ago'"),
        ("alice until by bob", 6, "until", "until needs a time, e.g. 'until 3 days ago'"),
        ("alice on", 6, "on", "on needs a time, e.g. 'on 3 days ago'"),
        (
            "alice between",
            6,
            "between",
            "between needs a time, e.g. 'between 2026-01-01 and 2026-02-01'",
        ),
        ("alice so", 6, "so", "so needs an action after it"),
        ("alice so '  '", 6, "so", "so needs an action after it"),
    ],
)
def test_keyword_without_values(text, position, near, message):
    exc = error(text)
    assert (exc.position, exc.near, exc.message) == (position, near, message)


@pytest.mark.parametrize(
    ("text", "position"),
    [("a is x are y", 7), ("a of x of y", 7), ("a by x is p VIA y", 12), ("a from x Of y", 9)],
)
def test_repeated_clause(text, position):
    exc = error(text)
    assert exc.position == position
    assert "already given" in exc.message


@pytest.mark.parametrize(
    ("text", "position", "near"),
    [
        ("a since now until now", 12, "until"),
        ("a on today since yesterday", 11, "since"),
        ("a since now since today", 12, "since"),
        ("a between now and now on today", 22, "on"),
    ],
)
def test_two_time_clauses(text, position, near):
    exc = error(text)
    assert (exc.position, exc.near) == (position, near)
    assert "only one time clause" in exc.message


@pytest.mark.parametrize(
    ("text", "position", "near"),
    [
        ("since tomorrow", 6, "tomorrow"),
        ("since 3 parsecs ago", 8, "parsecs"),
        ("since '3 parsecs ago'", 9, "parsecs"),
        ("since 3 days", 6, "3"),
        ("since 3", 6, "3"),
        ("since 3 ago", 6, "3"),
        ("since x days ago", 6, "x"),
        ("since 1.5 days ago", 6, "1.5"),
        ("since days ago", 6, "days"),
        ("since ago", 6, "ago"),
        ("since 1 2 days ago", 6, "1"),
        ("since 99999 years ago", 6, "99999"),
        ("since last", 6, "last"),
        ("since last decade", 11, "decade"),
        ("since 2026-02-30", 6, "2026-02-30"),
        ("since 2026-1-2", 6, "2026-1-2"),
        ("since 2026-11-25T25:00:00Z", 6, "2026-11-25T25:00:00Z"),
        ("since 2026-11-25T10:00:00+25:00", 6, "2026-11-25T10:00:00+25:00"),
        ("since now now", 6, "now"),
        ("on '2026-01-01 noon'", 4, "2026-01-01"),
    ],
)
def test_invalid_time_values(text, position, near):
    exc = error(text)
    assert (exc.position, exc.near) == (position, near)
    assert f"unexpected {near!r} at position {position}: " in str(exc)


def test_invalid_time_message_lists_the_forms():
    assert "use now, today, yesterday" in error("since tomorrow").message
    assert "use seconds, minutes" in error("since 3 parsecs ago").message
    assert "'ago'" in error("since 3 days").message


@pytest.mark.parametrize(
    ("text", "position", "near", "message"),
    [
        (
            "a between now",
            2,
            "between",
            "between needs 'and', e.g. 'between 2026-01-01 and 2026-02-01'",
        ),
        (
            "a between now 'and' today",
            2,
            "between",
            "between needs 'and', e.g. 'between 2026-01-01 and 2026-02-01'",
        ),
        ("a between and now", 10, "and", "between needs a time before 'and'"),
        ("a between now and", 14, "and", "between needs a time after 'and'"),
        ("a between now and today and now", 24, "and", "between takes exactly one 'and'"),
    ],
)
def test_between_errors(text, position, near, message):
    exc = error(text)
    assert (exc.position, exc.near, exc.message) == (position, near, message)


def test_between_start_after_end():
    exc = error("alice between 2026-02-01 and 2026-01-01")
    assert exc.position == 6
    assert "earlier time first" in exc.message
    assert "2026-02-01T00:00:00.000+00:00 is after 2026-01-01T00:00:00.000+00:00" in exc.message


@pytest.mark.parametrize(
    ("text", "position", "near"),
    [
        ("a/b", 1, "/"),
        ("alice is (author)", 9, "("),
        ("alice = bob", 6, "="),
        ("O'Brien", 1, "'"),
        ("'a'b", 3, "b"),
        ("'a'\"b\"", 3, '"'),
    ],
)
def test_unexpected_characters(text, position, near):
    exc = error(text)
    assert (exc.position, exc.near) == (position, near)


def test_symbols_need_quotes():
    assert error("🙂").position == 0
    assert ax("'🙂 happy'").subjects == ["🙂 happy"]


def test_unquoted_date_and_time_words_form_one_instant():
    assert ax("alice since 2026-11-25 10:00:00Z").time_start == 1_795_600_800_000


def test_empty_quoted_value():
    exc = error("alice is ''")
    assert exc.position == 9
    assert "empty" in exc.message


# -------------------------------------------------------------- join_words


def test_join_words_plain():
    assert join_words(["alice", "is", "author"]) == "alice is author"
    assert join_words([]) == ""


def test_join_words_quotes_words_with_whitespace():
    text = join_words(["John Doe", "is", "senior developer", "of", "ACME Corp"])
    assert text == "'John Doe' is 'senior developer' of 'ACME Corp'"
    assert ax(text) == Filter(
        subjects=["John Doe"], predicates=["senior developer"], contexts=["ACME Corp"]
    )


def test_join_words_picks_a_quote_not_in_the_word():
    text = join_words(["Miles O'Brien", "is", 'the "chief"'])
    assert text == '"Miles O\'Brien" is \'the "chief"\''
    assert ax(text).subjects == ["Miles O'Brien"]
    assert ax(text).predicates == ['the "chief"']


def test_join_words_tabs_count_as_whitespace():
    assert join_words(["a\tb"]) == "'a\tb'"


def test_join_words_rejects_both_quotes_with_whitespace():
    with pytest.raises(AxSyntaxError) as caught:
        join_words(["alice", "is", 'it\'s "x" y'])
    assert caught.value.position == 9


# ---------------------------------------------------------------- parse_as


def test_parse_as_spec_example():
    words = ["John Doe", "is", "senior developer", "of", "ACME Corp"]
    assert parse_as(join_words(words)) == (["John Doe"], ["senior developer"], ["ACME Corp"], [])


def test_parse_as_defaults():
    assert parse_as("vacancies") == (["vacancies"], ["_"], ["_"], [])
    assert parse_as("alice by bob") == (["alice"], ["_"], ["_"], ["bob"])
    assert parse_as("alice Of work") == (["alice"], ["_"], ["work"], [])


def test_parse_as_everything():
    assert parse_as("alice bob are engineers from ACME via hr") == (
        ["alice", "bob"],
        ["engineers"],
        ["ACME"],
        ["hr"],
    )


@pytest.mark.parametrize(
    ("text", "position", "near", "fragment"),
    [
        ("is author", 0, "is", "at least one subject"),
        ("of work by bob", 0, "of", "at least one subject"),
        ("alice since today", 6, "since", "no time clause"),
        ("alice between now and now", 6, "between", "no time clause"),
        ("alice so notify", 6, "so", "belong to queries"),
        ("alice is", 6, "is", "need at least one value"),
        ("", 0, None, "empty"),
        ("alice*", 5, "*", "wildcards"),
    ],
)
def test_parse_as_errors(text, position, near, fragment):
    with pytest.raises(AxSyntaxError) as caught:
        parse_as(text)
    exc = caught.value
    assert (exc.position, exc.near) == (position, near)
    assert fragment in exc.message


# -------------------------------------------------------------- properties

KEYWORDS = {"is", "are", "of", "from", "by", "via", "since", "until", "on", "between", "so"}
CLAUSE_KEYWORDS = {"predicates": ("is", "are"), "contexts": ("of", "from"), "actors": ("by", "via")}
TIMES = [
    ("since now", NOW, None),
    ("until yesterday", None, TODAY - DAY),
    ("on today", TODAY, TODAY + DAY - 1),
    ("since '3 days ago'", NOW - 3 * DAY, None),
    ("since 2 weeks ago", NOW - 14 * DAY, None),
    ("between last month and 2026-11-25T10:00:00Z", NOW - 30 * DAY, 1_795_600_800_000),
]

safe_word = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:@äöüßéÅ東",
    min_size=1,
    max_size=10,
).filter(lambda w: w.lower() not in KEYWORDS)
multi_word = st.lists(safe_word, min_size=2, max_size=3).map(" ".join)
value = st.one_of(safe_word, multi_word)
values = st.lists(value, min_size=1, max_size=3)


def render(value: str, quote: str) -> str:
    return f"{quote}{value}{quote}" if " " in value or quote else value


def flip_case(word: str, upper: bool) -> str:
    return word.upper() if upper else word


@given(
    subjects=st.lists(value, max_size=3),
    clauses=st.dictionaries(st.sampled_from(sorted(CLAUSE_KEYWORDS)), values),
    time_index=st.one_of(st.none(), st.integers(0, len(TIMES) - 1)),
    action=st.one_of(st.none(), st.lists(safe_word, min_size=1, max_size=3).map(" ".join)),
    data=st.data(),
)
def test_random_queries_parse_back(subjects, clauses, time_index, action, data):
    quote = data.draw(st.sampled_from(["", "'", '"']))
    parts = [" ".join(render(v, quote or "'") if " " in v else render(v, quote) for v in subjects)]
    pieces = []
    for field, field_values in clauses.items():
        keyword = flip_case(
            data.draw(st.sampled_from(CLAUSE_KEYWORDS[field])), data.draw(st.booleans())
        )
        separator = data.draw(st.sampled_from([" ", ", ", ","]))
        rendered = separator.join(
            render(v, quote or "'") if " " in v else render(v, quote) for v in field_values
        )
        pieces.append(f"{keyword} {rendered}")
    if time_index is not None:
        pieces.append(TIMES[time_index][0])
    pieces = data.draw(st.permutations(pieces))
    parts.extend(pieces)
    if action is not None:
        parts.append(f"so {action}")
    text = " ".join(p for p in parts if p)
    if not text:
        return

    result = parse_ax(text, now_ms=NOW)

    assert result.filter.subjects == subjects
    assert result.filter.predicates == clauses.get("predicates", [])
    assert result.filter.contexts == clauses.get("contexts", [])
    assert result.filter.actors == clauses.get("actors", [])
    start, end = (None, None) if time_index is None else TIMES[time_index][1:]
    assert (result.filter.time_start, result.filter.time_end) == (start, end)
    assert result.action == action


@given(words=st.lists(st.one_of(value, st.just("Miles O'Brien")), min_size=1, max_size=5))
def test_join_words_round_trips_as_subjects(words):
    assert parse_ax(join_words(words)).filter.subjects == words


@given(amount=st.integers(0, 5000), unit=st.sampled_from(["s", "min", "h", "d", "w", "mo", "y"]))
def test_relative_times_match_a_reference(amount, unit):
    span = {
        "s": 1_000,
        "min": 60_000,
        "h": 3_600_000,
        "d": DAY,
        "w": 7 * DAY,
        "mo": 30 * DAY,
        "y": 365 * DAY,
    }
    expected = NOW - amount * span[unit]
    assert parse_time(f"{amount} {unit} ago", now_ms=NOW) == expected
    assert parse_time(f"{amount}{unit} ago", now_ms=NOW) == expected
