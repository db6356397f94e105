"""Filters as portable SQL over memberships and subscribers, and the audience queries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    Integer,
    Select,
    String,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.sql.elements import ColumnElement

from ..store import dialect
from ..store.schema import MembershipStatus, lists, memberships, subscribers
from .tree import (
    _ATTR_ALIASES,
    _NUMERIC,
    _ORDERING,
    FIELDS,
    And,
    Bool,
    Compare,
    Field,
    Filter,
    In,
    IsNull,
    Kind,
    ListsContains,
    Not,
    Num,
    Op,
    Or,
    Str,
    Value,
    _bool_text,
    _day_range,
    _folds_case,
    _resolve,
    _str,
    _utc,
)


def compile_filter(flt: Filter, *, now: dt.datetime | None = None) -> ColumnElement[bool]:
    """The filter as a predicate over `memberships JOIN subscribers` (SQLite, PostgreSQL).

    `now` fixes what now and today mean (default: the current time).
    """
    return _sql(flt, _utc(now or dt.datetime.now(dt.UTC)))


def _sql(flt: Filter, now: dt.datetime) -> ColumnElement[bool]:
    match flt:
        case And(items):
            return and_(*(_sql(i, now) for i in items))
        case Or(items):
            return or_(*(_sql(i, now) for i in items))
        case Not(operand):
            return not_(_sql(operand, now))
        case ListsContains(slug):
            return _active_on(slug.value)
        case IsNull(fld, negated):
            x = _attr_column(fld)
            return x.is_not(None) if negated else x.is_(None)
        case In(fld, values, negated):
            pred = _sql_in(fld, values, now)
            return not_(pred) if negated else pred
        case Compare(fld, op, value):
            return _sql_compare(fld, op, value, now)
    raise TypeError(flt)  # pragma: no cover - the match is exhaustive


def _active_on(slug: str) -> ColumnElement[bool]:
    m = memberships.alias("seg_m")
    lst = lists.alias("seg_l")
    return (select(m.c.list_id).join(lst, lst.c.id == m.c.list_id)
            .where(m.c.subscriber_id == subscribers.c.id, lst.c.slug == slug,
                   m.c.status == MembershipStatus.ACTIVE.value)
            .correlate_except(m, lst).exists())


def _list_ids(slugs: Sequence[str]) -> Select[Any]:
    # A subquery, not ids looked up now: the predicate is self-contained, and a slug that
    # names no list simply matches nothing. On an alias, so that a caller selecting from
    # `lists` itself does not correlate it away.
    named = lists.alias("seg_list")
    return select(named.c.id).where(named.c.slug.in_(list(slugs)))


def _text_column(fld: Field) -> ColumnElement[str]:
    if fld.name == "email":
        return subscribers.c.email_key
    if fld.name == "domain":
        key = subscribers.c.email_key
        return func.substr(key, dialect.strpos(key, literal("@")) + 1, type_=String)
    if fld.name == "name":
        return subscribers.c.name
    return _attr_column(fld)


def _attr_column(fld: Field) -> ColumnElement[str]:
    key = fld.key if fld.key is not None else _ATTR_ALIASES[fld.name]
    return dialect.attr_text(subscribers.c.attributes, literal(key, String))


def _date_column(fld: Field) -> ColumnElement[dt.datetime]:
    return {"joined": memberships.c.created_at, "updated": memberships.c.updated_at,
            "created": subscribers.c.created_at}[fld.name]


def _number_column(fld: Field) -> ColumnElement[int]:
    return {"hard_bounces": subscribers.c.hard_bounces,
            "soft_bounces": subscribers.c.soft_bounces}[fld.name]


def _number(n: Decimal) -> ColumnElement[Any]:
    return literal(int(n), Integer) if n == n.to_integral_value() else literal(float(n), Float)


def _sql_compare(fld: Field, op: Op, value: Value, now: dt.datetime) -> ColumnElement[bool]:
    kind = FIELDS[fld.name]
    if kind == Kind.LIST:
        assert isinstance(value, Str)
        on_list = memberships.c.list_id.in_(_list_ids([value.value]))
        return not_(on_list) if op == Op.NE else on_list
    if kind == Kind.STATUS:
        assert isinstance(value, Str)
        return _ordered(memberships.c.status, op, value.value)
    if kind == Kind.DATE:
        return _sql_date(_date_column(fld), op, _resolve(value, now))
    if kind == Kind.NUMBER:
        assert isinstance(value, Num)
        return _ordered(_number_column(fld), op, _number(value.value))
    x = _text_column(fld)
    nullable = kind == Kind.ATTR
    if isinstance(value, Num):
        return _sql_numeric(x, op, value.value)
    text = _bool_text(value.value) if isinstance(value, Bool) else _str(value)
    if _folds_case(fld):
        text = text.lower()
    if op == Op.NE:
        return not_(_sql_compare(fld, Op.EQ, value, now))
    pred: ColumnElement[bool]
    if op == Op.CONTAINS:
        pred = dialect.strpos(x, literal(text, String)) > 0
    elif op == Op.STARTSWITH:
        pred = func.substr(x, 1, len(text), type_=String) == text
    elif op == Op.ENDSWITH:
        pred = and_(func.length(x) >= len(text),
                    func.substr(x, func.length(x) - len(text) + 1, type_=String) == text)
    elif op in _ORDERING:
        pred = _ordered(dialect.bytewise(x), op, literal(text, String))
    else:
        pred = x == text
    return _definite(pred) if nullable else pred


def _definite(pred: ColumnElement[bool]) -> ColumnElement[bool]:
    """A missing attribute makes a comparison NULL; make it false, so that `not` means not."""
    return func.coalesce(pred, false(), type_=Boolean)


def _ordered(x: ColumnElement[Any], op: Op, y: Any) -> ColumnElement[bool]:
    preds: dict[Op, ColumnElement[bool]] = {
        Op.EQ: x == y, Op.NE: x != y, Op.LT: x < y, Op.LE: x <= y, Op.GT: x > y, Op.GE: x >= y,
    }
    return preds[op]


def _sql_numeric(x: ColumnElement[str], op: Op, n: Decimal) -> ColumnElement[bool]:
    # The CASE makes the cast happen only for numeric text; anything else is no match (and
    # `!=` is `not =`, so it matches).
    if op == Op.NE:
        return not_(_sql_numeric(x, Op.EQ, n))
    return case((x.regexp_match(_NUMERIC), _ordered(cast(x, Float), op, _number(n))),
                else_=false())


def _sql_date(x: ColumnElement[dt.datetime], op: Op,
              when: dt.date | dt.datetime) -> ColumnElement[bool]:
    if isinstance(when, dt.datetime):
        return _ordered(x, op, when)
    start, end = _day_range(when)
    return {Op.EQ: and_(x >= start, x < end), Op.NE: or_(x < start, x >= end),
            Op.LT: x < start, Op.LE: x < end, Op.GT: x >= end, Op.GE: x >= start}[op]


def _sql_in(fld: Field, values: Sequence[Value], now: dt.datetime) -> ColumnElement[bool]:
    kind = FIELDS[fld.name]
    if kind == Kind.LIST:
        return memberships.c.list_id.in_(_list_ids([_str(v) for v in values]))
    if kind == Kind.STATUS:
        return memberships.c.status.in_([_str(v) for v in values])
    if kind == Kind.NUMBER:
        return _number_column(fld).in_([_number(v.value) for v in values
                                        if isinstance(v, Num)])
    if kind == Kind.DATE:
        return or_(*(_sql_compare(fld, Op.EQ, v, now) for v in values))
    texts = [_bool_text(v.value) if isinstance(v, Bool) else v.value for v in values
             if isinstance(v, Str | Bool)]
    numbers = [v for v in values if isinstance(v, Num)]
    x = _text_column(fld)
    preds: list[ColumnElement[bool]] = []
    if texts:
        if _folds_case(fld):
            texts = [t.lower() for t in texts]
        pred = x.in_(texts)
        preds.append(_definite(pred) if kind == Kind.ATTR else pred)
    if numbers:
        preds.append(case((x.regexp_match(_NUMERIC),
                           cast(x, Float).in_([_number(n.value) for n in numbers])),
                          else_=false()))
    return or_(*preds)


def matching_query(flt: Filter, *, list_ids: Sequence[int] | None = None,
                   active_only: bool = False,
                   now: dt.datetime | None = None) -> Select[Any]:
    """(subscriber_id, list_id) of every subscriber with a matching membership row, once,
    through the lowest matching list id: the audience of a segment send."""
    query = (
        select(memberships.c.subscriber_id, func.min(memberships.c.list_id).label("list_id"))
        .select_from(memberships.join(subscribers,
                                      subscribers.c.id == memberships.c.subscriber_id))
        .where(compile_filter(flt, now=now))
        .group_by(memberships.c.subscriber_id)
    )
    if list_ids is not None:
        query = query.where(memberships.c.list_id.in_(list(list_ids)))
    if active_only:
        query = query.where(memberships.c.status == MembershipStatus.ACTIVE.value)
    return query


def count_matching(engine: Engine, flt: Filter, *, list_ids: Sequence[int] | None = None,
                   active_only: bool = False, now: dt.datetime | None = None) -> int:
    """How many distinct subscribers have at least one matching membership row."""
    sub = matching_query(flt, list_ids=list_ids, active_only=active_only, now=now).subquery()
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sub)).scalar_one())
