"""The segment filter language: parsing, errors with positions, SQL on a real SQLite
database, and property tests holding the SQL against the Python reference evaluator."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, insert, select, update

from newsletter import segments as seg
from newsletter.errors import FilterSyntaxError
from newsletter.segments import (
    And,
    Bool,
    Compare,
    Day,
    Field,
    In,
    IsNull,
    ListsContains,
    Moment,
    Not,
    Num,
    Op,
    Or,
    Relative,
    Str,
    check_lists,
    compile_filter,
    count_matching,
    list_slugs,
    matches,
    matching_query,
    parse,
    to_text,
)
from newsletter.service import Newsletter
from newsletter.store.db import make_engine, migrate
from newsletter.store.schema import MembershipStatus, lists, memberships, subscribers
from newsletter.store.sql import NewMember, SqlStore

from .conftest import database_url, make_settings

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
UTC = dt.UTC


# --- parsing ----------------------------------------------------------------------------------

def _f(name: str, key: str | None = None) -> Field:
    return Field(name, key)


def test_the_issue_example_parses_to_the_expected_tree() -> None:
    flt = parse('lang = "zh" and attributes.sector in ["telecom", "finance"] '
                "and joined > 2026-01-01")
    assert flt == And((
        Compare(_f("lang"), Op.EQ, Str("zh")),
        In(_f("attributes", "sector"), (Str("telecom"), Str("finance"))),
        Compare(_f("joined"), Op.GT, Day(dt.date(2026, 1, 1))),
    ))
    # positions are kept (and ignored by equality)
    assert isinstance(flt, And)
    assert [item.pos for item in flt.items] == [0, 16, 64]


@pytest.mark.parametrize(("text", "tree"), [
    ('list = "a"', Compare(_f("list"), Op.EQ, Str("a"))),
    ("status != 'active'", Compare(_f("status"), Op.NE, Str("active"))),
    ("hard_bounces >= 2", Compare(_f("hard_bounces"), Op.GE, Num(Decimal(2)))),
    ("soft_bounces < -1.5", Compare(_f("soft_bounces"), Op.LT, Num(Decimal("-1.5")))),
    ('name contains "An"', Compare(_f("name"), Op.CONTAINS, Str("An"))),
    ('email startswith "ana"', Compare(_f("email"), Op.STARTSWITH, Str("ana"))),
    ('domain endswith ".org"', Compare(_f("domain"), Op.ENDSWITH, Str(".org"))),
    ('zone in ["Asia/Shanghai"]', In(_f("zone"), (Str("Asia/Shanghai"),))),
    ('lang not in ["en", "de",]', In(_f("lang"), (Str("en"), Str("de")), negated=True)),
    ("attributes.vip = true", Compare(_f("attributes", "vip"), Op.EQ, Bool(True))),
    ("attributes.vip != FALSE", Compare(_f("attributes", "vip"), Op.NE, Bool(False))),
    ('attributes."key with spaces" is null', IsNull(_f("attributes", "key with spaces"))),
    ("attributes.x is not null", IsNull(_f("attributes", "x"), negated=True)),
    ("attributes.x = null", IsNull(_f("attributes", "x"))),
    ("attributes.x != null", IsNull(_f("attributes", "x"), negated=True)),
    ('lists contains "b"', ListsContains(Str("b"))),
    ("created < 2026-01-01T08:00", Compare(_f("created"), Op.LT,
                                           Moment(dt.datetime(2026, 1, 1, 8, tzinfo=UTC)))),
    ("updated <= 2026-01-01T08:00:30Z", Compare(_f("updated"), Op.LE, Moment(
        dt.datetime(2026, 1, 1, 8, 0, 30, tzinfo=UTC)))),
    ("joined > 2026-01-01T08:00+08:00", Compare(_f("joined"), Op.GT, Moment(
        dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)))),
    ("joined > now", Compare(_f("joined"), Op.GT, Relative("now"))),
    ("joined > now - 30d", Compare(_f("joined"), Op.GT, Relative("now", -30, "d"))),
    ("joined > NOW+12h", Compare(_f("joined"), Op.GT, Relative("now", 12, "h"))),
    ("joined >= today - 2w", Compare(_f("joined"), Op.GE, Relative("today", -2, "w"))),
    (r'name = "a\"b\\c\n\u00e9"', Compare(_f("name"), Op.EQ, Str('a"b\\c\né'))),
    ("NOT lang = 'x' AnD lang = 'y' Or lang = 'z'", Or((
        And((Not(Compare(_f("lang"), Op.EQ, Str("x"))), Compare(_f("lang"), Op.EQ, Str("y")))),
        Compare(_f("lang"), Op.EQ, Str("z"))))),
    ("lang = 'x' and (lang = 'y' or not (lang = 'z'))", And((
        Compare(_f("lang"), Op.EQ, Str("x")),
        Or((Compare(_f("lang"), Op.EQ, Str("y")), Not(Compare(_f("lang"), Op.EQ, Str("z")))))))),
])
def test_each_construct_parses_and_round_trips(text: str, tree: Any) -> None:
    flt = parse(text)
    assert flt == tree
    assert parse(to_text(flt)) == flt


def test_printing_is_canonical() -> None:
    flt = parse("(LANG='zh'  or zone is NOT null) AND NOT (a.b = 1 or x = 2)".replace(
        "a.b", "attributes.b").replace("x =", "attributes.and ="))
    assert to_text(flt) == ('(lang = "zh" or zone is not null) and '
                            'not (attributes.b = 1 or attributes."and" = 2)')
    assert to_text(parse("joined > now + 0h")) == "joined > now"
    assert to_text(parse("joined = 2026-01-01T08:00:00.250Z")) == \
        "joined = 2026-01-01T08:00:00.250000Z"
    assert to_text(parse("(lang = 'a' and lang = 'b') and lang = 'c'")) == \
        '(lang = "a" and lang = "b") and lang = "c"'


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "position", "message"), [
    ("lang = ", 7, 'expected a value after "="'),
    ('lang == "zh"', 6, 'expected a value after "=", got "="'),
    ("foo = 1", 0, 'unknown field "foo"'),
    ('lang = "zh" and colour = "red"', 16, 'unknown field "colour"'),
    ("emial = 'x'", 0, 'did you mean "email"?'),
    ('status = "gone"', 9, 'unknown status "gone"'),
    ('status in ["active", "gone"]', 21, 'unknown status "gone"'),
    ('joined > "yesterday"', 9, '"joined" is a date'),
    ("joined > 5", 9, '"joined" is a date'),
    ('lang = "abc', 7, "unterminated string"),
    ('(lang = "zh"', 0, '"(" is never closed'),
    ('lang = "a" or (lang = "b" and (lang = "c")', 14, '"(" is never closed'),
    ('lang = "zh")', 11, 'unmatched ")"'),
    ("", 0, "empty filter"),
    ("   ", 0, "empty filter"),
    ("lang in []", 8, "at least one value"),
    ("lang in", 7, 'expected a list such as ["a", "b"] after "in"'),
    ("lang", 4, 'expected an operator'),
    ("lang is", 7, 'expected "null" or "not null" after "is"'),
    ("lang is not 5", 12, 'expected "null" after "not", got "5"'),
    ("lang not = 1", 9, 'expected "in" after "not"'),
    ('lang = "a" and', 14, 'expected a field name or "(" after "and"'),
    ("lang = 1 2", 9, 'expected "and", "or" or the end of the filter after "1", got "2"'),
    ('(lang = 1 2)', 10, 'expected "and", "or" or ")"'),
    ('lang in ["a" "b"]', 13, 'expected "," or "]" after "a", got "b"'),
    ("lang ! 'x'", 5, "write !="),
    ("lang = 'x' & y", 11, 'unexpected character "&"'),
    ("joined > now -", 14, "expected an offset such as 30d"),
    ("joined > now - 30", 15, "expected an offset such as 30d"),
    ("joined > today - 3h", 17, "today moves by days or weeks"),
    ("joined > now - 40000d", 15, "offset too large"),
    ("joined = 2026-02-30", 9, 'invalid date "2026-02-30"'),
    ("joined = 2026-01-01T24:00", 9, "invalid date"),
    ("joined > 1800-01-01", 9, "year out of range"),
    ('hard_bounces > "3"', 15, '"hard_bounces" is a number'),
    ("name = 5", 7, '"name" is text'),
    ("name = 2026-01-01", 7, '"name" is not a date'),
    ("name is null", 5, '"name" is never null'),
    ("status < 'active'", 7, '"status" takes =, !=, in or not in, not <'),
    ("list contains 'a'", 5, '"list" takes =, !=, in or not in, not contains'),
    ("joined contains 'a'", 7, "contains is for text"),
    ('lists = "a"', 6, '"lists" takes only contains'),
    ('lists startswith "a"', 6, '"lists" takes only contains'),
    ("lists contains 5", 15, "list slug in quotes"),
    ("email contains 5", 15, "contains needs a string"),
    ("lang < true", 7, "true and false cannot be compared"),
    ("lang < null", 7, 'use "is null"'),
    ('lang in ["a", null]', 14, 'null cannot be in a list'),
    ("attributes = 1", 0, '"attributes" needs a key'),
    ('attributes."" = 1', 11, "cannot be empty"),
    ("attributes. = 1", 12, "expected an attribute key"),
    ("lang.x = 1", 4, "only attributes have keys"),
    (r'lang = "a\qb"', 9, r'unknown escape "\q"'),
    (r'lang = "\u0000"', 8, r"\u0000 is not allowed"),
    ("lang = 'a\x00'", 9, "U+0000 is not allowed"),
    ("hard_bounces = 12345678901234567", 15, "number out of range"),
    ("hard_bounces = 1.1234567", 15, "number out of range"),
    ("not", 3, 'expected a field name or "(" after "not"'),
    ("()", 1, 'expected a field name or "(" after "("'),
])
def test_invalid_filters_say_what_and_where(text: str, position: int, message: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse(text)
    err = info.value
    assert message in err.message
    assert err.position == position, err.message
    assert err.text == text
    assert err.pointer().splitlines()[-1] == " " * position + "^"


def test_limits_are_errors_not_crashes() -> None:
    deep = "(" * 40 + "lang = 'x'" + ")" * 40
    assert parse(deep) == parse("lang = 'x'")  # parentheses alone do not nest the tree
    nested = "lang = 'x'"
    for _ in range(40):
        nested = f"not ({nested} or lang = 'y')"
    with pytest.raises(FilterSyntaxError, match="nested too deeply"):
        parse(nested)
    with pytest.raises(FilterSyntaxError, match="too many conditions") as info:
        parse(" and ".join(["lang = 'x'"] * 250))
    assert info.value.position == 200 * len("lang = 'x' and ")
    with pytest.raises(FilterSyntaxError, match="offset too large"):
        parse("joined > now - " + "9" * 5000 + "d")   # more digits than int() takes
    many = ", ".join(f"'{i}'" for i in range(300))
    with pytest.raises(FilterSyntaxError, match="too many values"):
        parse(f"lang in [{many}]")


def test_list_slugs_and_unknown_lists() -> None:
    text = 'list = "a" or list in ["b", "c"] or not lists contains "nope"'
    flt = parse(text)
    assert list_slugs(flt) == [("a", 7), ("b", 23), ("c", 28), ("nope", text.index('"nope"'))]
    check_lists(flt, {"a", "b", "c", "nope"})
    with pytest.raises(FilterSyntaxError) as info:
        check_lists(flt, {"a", "b", "c"}, text=text)
    assert info.value.message == 'unknown list "nope"'
    assert info.value.position == text.index('"nope"')
    # Without the original text, the error points into the canonical text.
    with pytest.raises(FilterSyntaxError) as info:
        check_lists(parse('  list   in ["b","x"]'), {"b"})
    assert info.value.text == 'list in ["b", "x"]'
    assert info.value.pointer().splitlines()[1] == " " * 14 + "^"


# --- SQL on a real database -------------------------------------------------------------------

def _load_rows(engine: Engine) -> list[tuple[int, int, dict[str, Any], dict[str, Any], set[str]]]:
    """Every membership row as matches() wants it: (sid, lid, subscriber, membership,
    active lists of the subscriber)."""
    with engine.connect() as conn:
        slug_of = dict(conn.execute(select(lists.c.id, lists.c.slug)).all())
        subs = {r.id: r._asdict() for r in conn.execute(select(subscribers))}
        rows = conn.execute(select(memberships)).all()
    active: dict[int, set[str]] = {}
    for r in rows:
        if r.status == "active":
            active.setdefault(r.subscriber_id, set()).add(slug_of[r.list_id])
    return [(r.subscriber_id, r.list_id, subs[r.subscriber_id],
             {"list": slug_of[r.list_id], "status": r.status, "created_at": r.created_at,
              "updated_at": r.updated_at}, active.get(r.subscriber_id, set()))
            for r in rows]


def _sql_rows(engine: Engine, flt: seg.Filter, now: dt.datetime = NOW) -> set[tuple[int, int]]:
    query = (select(memberships.c.subscriber_id, memberships.c.list_id)
             .select_from(memberships.join(subscribers,
                                           subscribers.c.id == memberships.c.subscriber_id))
             .where(compile_filter(flt, now=now)))
    with engine.connect() as conn:
        return {(sid, lid) for sid, lid in conn.execute(query).all()}


def _py_rows(rows: list[tuple[int, int, dict[str, Any], dict[str, Any], set[str]]],
             flt: seg.Filter, now: dt.datetime = NOW) -> set[tuple[int, int]]:
    return {(sid, lid) for sid, lid, sub, mem, active in rows
            if matches(flt, subscriber=sub, membership=mem, active_lists=active, now=now)}


class Sample:
    """A handful of subscribers on three lists, with known dates and attributes."""

    def __init__(self, store: SqlStore) -> None:
        self.engine = store.engine
        self.ids: dict[str, int] = {}
        for slug in ("digest", "policy", "events"):
            self.ids[slug] = store.create_list(slug).id
        people: dict[str, tuple[str, dict[str, Any]]] = {
            "ana@Example.org": ("Ana", {"lang": "zh", "sector": "telecom", "age": "34",
                                        "tz": "Asia/Shanghai"}),
            "bo@example.org": ("Bo", {"lang": "zh", "sector": "finance", "age": "n/a"}),
            "Chen@Sub.Example.COM": ("Chen", {"lang": "en", "sector": "telecom", "age": 41,
                                              "vip": True}),
            "dora@other.net": ("Dora", {}),
            "eve@other.net": ("Eve", {"lang": "zh", "sector": "energy", "部门": "电信",
                                      "key with spaces": "yes", "score": "-2.5"}),
        }
        on = {"digest": ["ana@Example.org", "bo@example.org", "Chen@Sub.Example.COM",
                         "eve@other.net"],
              "policy": ["ana@Example.org", "dora@other.net"],
              "events": ["Chen@Sub.Example.COM", "dora@other.net"]}
        for slug, emails in on.items():
            store.upsert_members(self.ids[slug], [NewMember(e, *people[e]) for e in emails],
                                 source="cli")
        store.set_status("chen@sub.example.com", MembershipStatus.UNSUBSCRIBED,
                         source="cli", list_id=self.ids["digest"])
        store.set_status("dora@other.net", MembershipStatus.PENDING, source="cli",
                         list_id=self.ids["policy"])
        store.set_status("dora@other.net", MembershipStatus.BOUNCED, source="cli",
                         list_id=self.ids["events"])
        self.joined("ana@Example.org", "digest", dt.datetime(2026, 1, 15, 9, tzinfo=UTC))
        self.joined("ana@Example.org", "policy", dt.datetime(2025, 6, 1, tzinfo=UTC))
        self.joined("bo@example.org", "digest", dt.datetime(2025, 12, 20, tzinfo=UTC))
        self.joined("Chen@Sub.Example.COM", "digest", dt.datetime(2026, 1, 1, 0, tzinfo=UTC))
        self.joined("Chen@Sub.Example.COM", "events", dt.datetime(2026, 1, 1, 23, 59,
                                                                   tzinfo=UTC))
        self.joined("dora@other.net", "policy", dt.datetime(2026, 2, 1, tzinfo=UTC))
        self.joined("dora@other.net", "events", dt.datetime(2026, 2, 2, tzinfo=UTC))
        self.joined("eve@other.net", "digest", dt.datetime(2026, 2, 27, 23, tzinfo=UTC))
        with self.engine.begin() as conn:
            conn.execute(update(subscribers).values(created_at=dt.datetime(2025, 1, 1,
                                                                           tzinfo=UTC)))
            conn.execute(update(subscribers).where(subscribers.c.email_key == "bo@example.org")
                         .values(hard_bounces=2, soft_bounces=5))

    def joined(self, email: str, slug: str, when: dt.datetime) -> None:
        with self.engine.begin() as conn:
            sid = conn.execute(select(subscribers.c.id)
                               .where(subscribers.c.email_key == email.lower())).scalar_one()
            conn.execute(update(memberships)
                         .where(memberships.c.subscriber_id == sid,
                                memberships.c.list_id == self.ids[slug])
                         .values(created_at=when, updated_at=when))

    def who(self, text: str, *, now: dt.datetime = NOW) -> set[str]:
        """The names of the subscribers with a matching row; the SQL and the Python
        evaluator must agree row by row."""
        flt = parse(text)
        got = _sql_rows(self.engine, flt, now)
        assert got == _py_rows(_load_rows(self.engine), flt, now), text
        with self.engine.connect() as conn:
            names = dict(conn.execute(select(subscribers.c.id, subscribers.c.name)).all())
        return {names[sid] for sid, _ in got}


# The database tests below run on SQLite and on PostgreSQL: their fixtures take db_backend.

@pytest.fixture
def sample(tmp_path: Path, db_backend: str) -> Sample:
    return Sample(Newsletter(make_settings(tmp_path)).store)


def test_the_issue_example_on_a_database(sample: Sample) -> None:
    assert sample.who('lang = "zh" and attributes.sector in ["telecom", "finance"] '
                      "and joined > 2026-01-01") == {"Ana"}


def test_lists_and_statuses(sample: Sample) -> None:
    assert sample.who('list = "policy"') == {"Ana", "Dora"}
    assert sample.who('list != "digest"') == {"Ana", "Chen", "Dora"}
    assert sample.who('list in ["policy", "events"] and status = "active"') == {"Ana", "Chen"}
    assert sample.who('status = "bounced"') == {"Dora"}
    assert sample.who('status not in ["active", "pending"]') == {"Chen", "Dora"}
    assert sample.who('lists contains "events"') == {"Chen"}   # Dora bounced there
    assert sample.who('list = "digest" and not lists contains "policy"') == \
        {"Bo", "Chen", "Eve"}
    assert sample.who('list = "no-such-list"') == set()


def test_dates_days_times_and_relative(sample: Sample) -> None:
    assert sample.who("joined = 2026-01-01") == {"Chen"}          # the whole day
    assert sample.who("joined > 2026-01-01") == {"Ana", "Dora", "Eve"}   # after that day
    assert sample.who("joined >= 2026-01-01 and joined <= 2026-01-15") == {"Ana", "Chen"}
    assert sample.who("joined < 2026-01-01") == {"Ana", "Bo"}
    assert sample.who("joined <= 2025-12-31") == {"Ana", "Bo"}   # Chen: 2026-01-01T00:00
    assert sample.who("joined in [2025-12-20, 2026-02-02]") == {"Bo", "Dora"}
    assert sample.who("joined > 2026-01-01T23:00:00+08:00") == {"Ana", "Chen", "Dora", "Eve"}
    assert sample.who("joined = 2026-01-01T23:59") == {"Chen"}
    assert sample.who("joined > now - 7d") == {"Eve"}
    assert sample.who("joined > now - 38h") == {"Eve"}
    assert sample.who("joined > now - 36h") == set()
    assert sample.who("joined >= today - 2d") == {"Eve"}
    assert sample.who("joined > today - 2d") == set()   # after the whole of Feb 27th
    assert sample.who("updated > today - 4w and list = 'events'") == {"Dora"}
    assert sample.who("created < 2025-01-02 and created >= 2025-01-01") == \
        {"Ana", "Bo", "Chen", "Dora", "Eve"}
    assert sample.who("joined > now - 7d", now=NOW + dt.timedelta(days=30)) == set()


def test_numbers_and_attributes(sample: Sample) -> None:
    assert sample.who("attributes.age > 35") == {"Chen"}       # a JSON number
    assert sample.who("attributes.age < 35") == {"Ana"}        # the text "34"; "n/a" is no number
    assert sample.who("attributes.age in [34, 41]") == {"Ana", "Chen"}
    assert sample.who("attributes.age != 34") == {"Bo", "Chen", "Dora", "Eve"}
    assert sample.who('attributes.age = "34"') == {"Ana"}
    assert sample.who('attributes.age >= "4"') == {"Bo", "Chen"}  # as text: "41", "n/a"
    assert sample.who("attributes.score < -2") == {"Eve"}
    assert sample.who("attributes.vip = true") == {"Chen"}
    assert sample.who('attributes.vip = "true" and attributes.vip != false') == {"Chen"}
    assert sample.who('attributes."部门" = "电信"') == {"Eve"}
    assert sample.who('attributes."key with spaces" startswith "y"') == {"Eve"}
    assert sample.who('lang = "zh" and zone = "Asia/Shanghai"') == {"Ana"}
    assert sample.who('not lang in ["zh"]') == {"Chen", "Dora"}
    assert sample.who("hard_bounces > 1 and soft_bounces in [5, 6]") == {"Bo"}
    assert sample.who("hard_bounces = 0") == {"Ana", "Chen", "Dora", "Eve"}


def test_text_case_and_nulls(sample: Sample) -> None:
    assert sample.who('email = "ANA@example.ORG"') == {"Ana"}
    assert sample.who('email startswith "CHEN@"') == {"Chen"}
    assert sample.who('domain = "sub.example.com"') == {"Chen"}
    assert sample.who('domain endswith "EXAMPLE.org"') == {"Ana", "Bo"}
    assert sample.who('domain in ["other.net", "Example.org"]') == {"Ana", "Bo", "Dora", "Eve"}
    assert sample.who('domain < "f"') == {"Ana", "Bo"}
    assert sample.who('name = "ana"') == set()                # names keep their case
    assert sample.who('name contains "n"') == {"Ana", "Chen"}
    assert sample.who('name endswith "a" or name startswith "E"') == {"Ana", "Dora", "Eve"}
    assert sample.who("zone is null") == {"Bo", "Chen", "Dora", "Eve"}
    assert sample.who("attributes.sector is not null") == {"Ana", "Bo", "Chen", "Eve"}
    assert sample.who('attributes.sector != "telecom"') == {"Bo", "Dora", "Eve"}


def test_count_and_audience_query(sample: Sample) -> None:
    flt = parse('list = "digest" and not lists contains "policy"')
    engine = sample.engine
    assert count_matching(engine, flt, now=NOW) == 3
    assert count_matching(engine, flt, active_only=True) == 2            # Chen left digest
    assert count_matching(engine, parse('lang = "zh"')) == 3
    assert count_matching(engine, parse('lang = "zh"'), list_ids=[sample.ids["policy"]]) == 1
    query = matching_query(parse("lang = 'zh' or status = 'bounced'"), active_only=False)
    with engine.connect() as conn:
        rows = {sid: lid for sid, lid in conn.execute(query).all()}
        names = dict(conn.execute(select(subscribers.c.name, subscribers.c.id)).all())
    # one row per subscriber, through the lowest matching list id
    assert rows == {names["Ana"]: sample.ids["digest"], names["Bo"]: sample.ids["digest"],
                    names["Eve"]: sample.ids["digest"], names["Dora"]: sample.ids["events"]}


def test_the_predicate_works_inside_queries_that_join_lists(sample: Sample) -> None:
    """Callers embed it in their own queries, such as an export that joins lists for the
    slug: its subqueries must not be correlated to the caller's tables."""
    flt = parse('list != "events" and lists contains "digest" or list = "events"')
    query = (select(subscribers.c.name, lists.c.slug)
             .select_from(memberships.join(subscribers,
                                           subscribers.c.id == memberships.c.subscriber_id)
                          .join(lists, lists.c.id == memberships.c.list_id))
             .where(compile_filter(flt)))
    with sample.engine.connect() as conn:
        assert sorted(conn.execute(query).all()) == [
            ("Ana", "digest"), ("Ana", "policy"), ("Bo", "digest"), ("Chen", "events"),
            ("Dora", "events"), ("Eve", "digest")]


# --- properties -------------------------------------------------------------------------------

VALID = [
    'lang = "zh" and attributes.sector in ["telecom", "finance"] and joined > 2026-01-01',
    'list = "a" and not lists contains "b" or status != "active"',
    "(joined >= now - 30d or updated < today + 2w) and attributes.\"x y\" is not null",
    "hard_bounces in [0, 1.5] and email endswith '@example.org'",
    "not (zone = null) and created = 2026-01-01T08:00:00+08:00",
]
GRAMMAR_BITS = [*"()[],.\"'=<>!-+ \\", "and", "or", "not", "in", "is", "null", "lang",
                "attributes", "now", "30d", "2026-01-01", "5"]


def _mutate(text: str, edits: list[tuple[int, str, str]]) -> str:
    for where, how, bit in edits:
        i = where % (len(text) + 1)
        if how == "insert":
            text = text[:i] + bit + text[i:]
        elif how == "delete":
            text = text[:i] + text[i + len(bit):]
        else:
            text = text[:i] + bit + text[i + 1:]
    return text


mutated = st.builds(_mutate, st.sampled_from(VALID), st.lists(st.tuples(
    st.integers(0, 200), st.sampled_from(["insert", "delete", "replace"]),
    st.sampled_from(GRAMMAR_BITS)), min_size=1, max_size=4))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(alphabet="".join(GRAMMAR_BITS[:16]) + "az09",
                                                max_size=40), mutated))
def test_any_text_parses_or_fails_with_a_position(text: str) -> None:
    try:
        flt = parse(text)
    except FilterSyntaxError as exc:
        assert 0 <= exc.position <= len(text)
        assert exc.message
    else:
        assert parse(to_text(flt)) == flt


# What the generated subscribers hold. The narrow filters below draw from the same values,
# so that their comparisons hit rows exactly, and just before or after (the day boundaries
# are midnights, so several rows sit on one).
TEXTS = ["zh", "en", "telecom", "Telecom", "finance", "", "5", "12", "-3.5", "007", "5.0",
         "1e3", " 7", "5.", ".5", "1.2.3", "true", "x", "Ana", "na", "example.org", "部门"]
MIDNIGHTS = [dt.datetime(2026, 1, 1, tzinfo=UTC), dt.datetime(2026, 2, 28, tzinfo=UTC),
             dt.datetime(2026, 3, 1, tzinfo=UTC), dt.datetime(2026, 3, 2, tzinfo=UTC)]
MOMENTS = [*MIDNIGHTS, *(m - dt.timedelta(seconds=1) for m in MIDNIGHTS),
           *(NOW + dt.timedelta(hours=h) for h in (-24 * 30, -24 * 14, -50, -1, 0, 30))]
DAYS = sorted({(m + dt.timedelta(days=d)).date() for m in MIDNIGHTS for d in (-1, 0)})

# Anything a filter can hold: UTF-8 encodable (no lone surrogates), no NUL.
SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


def conditions(*, wide: bool) -> st.SearchStrategy[seg.Filter]:
    """Valid single conditions: wide ones (any text, any date) for printing, narrow ones
    with values the test database holds, for the SQL cross-check."""
    if wide:
        words = SAFE_TEXT
        keys = SAFE_TEXT.filter(bool)
        numbers = st.decimals(-10**6, 10**6, places=2)
        zones = st.integers(-14 * 60, 14 * 60).map(
            lambda m: dt.timezone(dt.timedelta(minutes=m)))
        dates = st.one_of(
            st.builds(Day, st.dates(dt.date(1900, 1, 1), dt.date(2999, 12, 31))),
            st.builds(Moment, st.datetimes(dt.datetime(1900, 1, 2), dt.datetime(2999, 12, 30),
                                           timezones=zones)),
            st.builds(Relative, st.just("now"), st.integers(-5000, 5000),
                      st.sampled_from("hdw")),
            st.builds(Relative, st.just("today"), st.integers(-5000, 5000),
                      st.sampled_from("dw")))
        slugs = SAFE_TEXT
    else:
        words = st.sampled_from([*TEXTS, "a", "e", "ana", "EXAMPLE.ORG", "@", "other.net",
                                 "Chen Na", "bo1"])
        keys = st.sampled_from(["sector", "age", "vip", "部门", "key with spaces", "missing",
                                "and"])
        numbers = st.sampled_from([Decimal(n) for n in
                                   ("0", "1", "2", "5", "-3.5", "7", "12", "2.25")])
        dates = st.one_of(
            st.builds(Day, st.sampled_from(DAYS)),
            st.builds(Moment, st.sampled_from([m + dt.timedelta(seconds=s)
                                               for m in MOMENTS for s in (-1, 0, 1)])),
            st.builds(Relative, st.just("now"), st.sampled_from([0, 1, -1, 12, -12, -36]),
                      st.just("h")),
            st.builds(Relative, st.just("now"), st.sampled_from([-14, -30]), st.just("d")),
            st.builds(Relative, st.just("today"), st.sampled_from([0, 1, -1, -2]),
                      st.just("d")))
        slugs = st.sampled_from(["a", "b", "c", "zz"])
    strings = st.builds(Str, words)
    statuses = st.builds(Str, st.sampled_from(["pending", "active", "unsubscribed", "bounced"]))
    nums = st.builds(Num, numbers)
    attr_fields = st.one_of(st.builds(Field, st.just("attributes"), keys),
                            st.sampled_from([Field("lang"), Field("zone")]))
    attr_values = st.one_of(strings, nums, st.builds(Bool, st.booleans()))
    eq_ops = st.sampled_from([Op.EQ, Op.NE])
    order_ops = st.sampled_from([Op.EQ, Op.NE, Op.LT, Op.LE, Op.GT, Op.GE])
    text_ops = st.sampled_from(list(Op))
    match_ops = st.sampled_from([Op.CONTAINS, Op.STARTSWITH, Op.ENDSWITH])

    def fields(*names: str) -> st.SearchStrategy[Field]:
        return st.sampled_from([Field(n) for n in names])

    def lists_of(v: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
        return st.lists(v, min_size=1, max_size=3).map(tuple)

    def attr_compare(fld: Field, op: Op, value: Any) -> Compare:
        # true/false only with = and !=; the rest have their own strategy below
        return Compare(fld, op if isinstance(value, Str | Num) else Op.EQ, value)

    dated, counted = fields("joined", "updated", "created"), fields("hard_bounces",
                                                                     "soft_bounces")
    texts = fields("email", "domain", "name")
    return st.one_of(
        st.builds(Compare, fields("list"), eq_ops, st.builds(Str, slugs)),
        st.builds(In, fields("list"), lists_of(st.builds(Str, slugs)), st.booleans()),
        st.builds(Compare, fields("status"), eq_ops, statuses),
        st.builds(In, fields("status"), lists_of(statuses), st.booleans()),
        st.builds(Compare, dated, order_ops, dates),
        st.builds(In, dated, lists_of(dates), st.booleans()),
        st.builds(Compare, counted, order_ops, nums),
        st.builds(In, counted, lists_of(nums), st.booleans()),
        st.builds(Compare, texts, text_ops, strings),
        st.builds(In, texts, lists_of(strings), st.booleans()),
        st.builds(attr_compare, attr_fields, order_ops, attr_values),
        st.builds(Compare, attr_fields, match_ops, strings),
        st.builds(In, attr_fields, lists_of(attr_values), st.booleans()),
        st.builds(IsNull, attr_fields, st.booleans()),
        st.builds(ListsContains, st.builds(Str, slugs)),
    )


def filters(*, wide: bool) -> st.SearchStrategy[seg.Filter]:
    """Valid filter trees of up to five conditions under not, and, or."""
    def extend(inner: st.SearchStrategy[seg.Filter]) -> st.SearchStrategy[seg.Filter]:
        items = st.lists(inner, min_size=2, max_size=3).map(tuple)
        return st.one_of(st.builds(Not, inner), st.builds(And, items), st.builds(Or, items))

    return st.recursive(conditions(wide=wide), extend, max_leaves=5)


@settings(max_examples=300, deadline=None)
@given(filters(wide=True))
def test_generated_trees_round_trip_through_text(flt: seg.Filter) -> None:
    text = to_text(flt)
    assert parse(text) == flt
    assert to_text(parse(text)) == text


Population = tuple[Engine, list[tuple[int, int, dict[str, Any], dict[str, Any], set[str]]]]


def _populate(url: str) -> Engine:
    """Sixty generated subscribers on three lists (always the same: a fixed seed)."""
    engine = make_engine(url)
    migrate(engine)
    store = SqlStore(engine)
    rng = random.Random(20260301)
    list_ids = [store.create_list(slug).id for slug in ("a", "b", "c")]
    values: list[Any] = [*TEXTS, 5, 12, -3, 2.25, 7.0, True, False, None]
    keys = ["sector", "age", "vip", "部门", "key with spaces", "and", "lang", "tz"]
    domains = ["example.org", "EXAMPLE.org", "other.net", "sub.example.org", "na.io"]
    statuses = ["pending", "active", "active", "unsubscribed", "bounced"]
    with engine.begin() as conn:
        for n in range(60):
            email = f"{rng.choice(['ana', 'Bo', 'chen', 'x', 'na', 'e'])}{n}@{rng.choice(domains)}"
            sid = conn.execute(insert(subscribers).returning(subscribers.c.id).values(
                email=email, email_key=email.lower(),
                attributes={k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 5))},
                name=rng.choice(["Ana", "ana", "Bo", "", "Chen Na", "Eve"]),
                created_at=rng.choice(MOMENTS), hard_bounces=rng.randint(0, 3),
                soft_bounces=rng.choice([0, 1, 2, 5, 12]),
            )).scalar_one()
            for lid in rng.sample(list_ids, rng.randint(1, 3)):
                when = rng.choice(MOMENTS)
                conn.execute(insert(memberships).values(
                    list_id=lid, subscriber_id=sid, status=rng.choice(statuses),
                    created_at=when, updated_at=rng.choice([when, *MOMENTS])))
    return engine


@pytest.fixture
def population(tmp_path: Path, db_backend: str) -> Iterator[Population]:
    """The generated database, built once per test (on its db_backend) for the cross-checks
    below."""
    engine = _populate(database_url(tmp_path))
    yield engine, _load_rows(engine)
    engine.dispose()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flt=conditions(wide=False))
def test_sql_and_python_agree_on_generated_conditions(population: Population,
                                                      flt: seg.Filter) -> None:
    engine, rows = population
    assert _sql_rows(engine, flt) == _py_rows(rows, flt), to_text(flt)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flt=filters(wide=False))
def test_sql_and_python_agree_on_generated_filters(population: Population,
                                                   flt: seg.Filter) -> None:
    engine, rows = population
    assert _sql_rows(engine, flt) == _py_rows(rows, flt), to_text(flt)


def test_the_population_is_varied_enough(population: Population) -> None:
    """Guards the cross-checks: what they draw matches some rows, not none or all."""
    engine, rows = population
    for text in ("attributes.age > 4", 'lists contains "b"', 'domain = "example.org"',
                 "joined >= today - 2d", 'attributes."部门" in ["部门", "1.2.3", ".5"]',
                 "attributes.sector = true or attributes.age = true or attributes.vip = true",
                 'attributes.and in [5, "1e3"]', "joined = 2026-02-28", 'name < "a"',
                 "created = 2026-03-01T00:00"):
        flt = parse(text)
        found = _sql_rows(engine, flt)
        assert found == _py_rows(rows, flt)
        assert 0 < len(found) < len(rows), text
