"""The reference evaluator: the filter semantics in plain Python, which the SQL is held to."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Set
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .tree import (
    _ATTR_ALIASES,
    _NUMERIC_RE,
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
    Value,
    _bool_text,
    _day_range,
    _folds_case,
    _resolve,
    _str,
    _utc,
)


def matches(flt: Filter, *, subscriber: Mapping[str, Any], membership: Mapping[str, Any],
            active_lists: Set[str], now: dt.datetime) -> bool:
    """Does one membership row match? The same semantics as compile_filter, in Python.

    `subscriber` has the columns of subscribers (email or email_key, name, attributes,
    created_at, hard_bounces, soft_bounces); `membership` has `list` (the slug), status,
    created_at and updated_at; `active_lists` the slugs the subscriber is active on.
    """
    return _py(flt, _Row(subscriber, membership, active_lists), _utc(now))


@dataclass(frozen=True)
class _Row:
    subscriber: Mapping[str, Any]
    membership: Mapping[str, Any]
    active_lists: Set[str]

    def text(self, fld: Field) -> str | None:
        if fld.name in ("email", "domain"):
            key = str(self.subscriber.get("email_key") or self.subscriber["email"]).lower()
            # As the SQL: everything after the first "@".
            return key if fld.name == "email" else key[key.find("@") + 1:]
        if fld.name == "name":
            return str(self.subscriber["name"])
        attributes = self.subscriber.get("attributes") or {}
        key = fld.key if fld.key is not None else _ATTR_ALIASES[fld.name]
        return _json_text(attributes.get(key))

    def date(self, fld: Field) -> dt.datetime:
        source = self.subscriber if fld.name == "created" else self.membership
        column = {"joined": "created_at", "updated": "updated_at"}.get(fld.name, "created_at")
        return _utc(source[column])


def _json_text(value: Any) -> str | None:
    """What the databases read from a JSON attribute as text (see _attr_text in sql.py)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return _bool_text(value)
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))


def _py(flt: Filter, row: _Row, now: dt.datetime) -> bool:
    match flt:
        case And(items):
            return all(_py(i, row, now) for i in items)
        case Or(items):
            return any(_py(i, row, now) for i in items)
        case Not(operand):
            return not _py(operand, row, now)
        case ListsContains(slug):
            return slug.value in row.active_lists
        case IsNull(fld, negated):
            return (row.text(fld) is not None) == negated
        case In(fld, values, negated):
            return any(_py_compare(fld, Op.EQ, v, row, now) for v in values) != negated
        case Compare(fld, op, value):
            return _py_compare(fld, op, value, row, now)
    raise TypeError(flt)  # pragma: no cover - the match is exhaustive


def _py_compare(fld: Field, op: Op, value: Value, row: _Row, now: dt.datetime) -> bool:
    kind = FIELDS[fld.name]
    if op == Op.NE:
        return not _py_compare(fld, Op.EQ, value, row, now)
    if kind == Kind.LIST:
        return bool(row.membership["list"] == _str(value))
    if kind == Kind.STATUS:
        return bool(row.membership["status"] == _str(value))
    if kind == Kind.DATE:
        x = row.date(fld)
        when = _resolve(value, now)
        if isinstance(when, dt.datetime):
            return _py_ordered(x, op, when)
        start, end = _day_range(when)
        return {Op.EQ: start <= x < end, Op.LT: x < start, Op.LE: x < end, Op.GT: x >= end,
                Op.GE: x >= start}[op]
    if kind == Kind.NUMBER:
        assert isinstance(value, Num)
        return _py_ordered(int(row.subscriber[fld.name]), op, _py_number(value.value))
    text = row.text(fld)
    if text is None:
        return False
    if isinstance(value, Num):
        if not _NUMERIC_RE.search(text):
            return False
        return _py_ordered(float(text), op, _py_number(value.value))
    wanted = _bool_text(value.value) if isinstance(value, Bool) else _str(value)
    if _folds_case(fld):
        wanted = wanted.lower()
    if op == Op.CONTAINS:
        return wanted in text
    if op == Op.STARTSWITH:
        return text.startswith(wanted)
    if op == Op.ENDSWITH:
        return text.endswith(wanted)
    return _py_ordered(text, op, wanted)


def _py_number(n: Decimal) -> int | float:
    return int(n) if n == n.to_integral_value() else float(n)


def _py_ordered(x: Any, op: Op, y: Any) -> bool:
    return bool({Op.EQ: x == y, Op.LT: x < y, Op.LE: x <= y, Op.GT: x > y,
                 Op.GE: x >= y}[op])
