"""The filter grammar, and the transformer that builds and checks the AST as lark reduces."""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from lark import Token, Transformer

from ..store.schema import MembershipStatus
from .tree import (
    _ORDERING,
    _TEXT_MATCH,
    FIELDS,
    And,
    Bool,
    Compare,
    Day,
    Field,
    Filter,
    In,
    IsNull,
    Kind,
    ListsContains,
    Moment,
    Not,
    Num,
    Op,
    Or,
    Relative,
    Str,
)

# Bounds that keep every filter compilable: SQLite refuses expressions nested deeper than
# 1000, and each condition, list value and level of nesting adds to that depth.
MAX_DEPTH = 32
MAX_CONDITIONS = 200
MAX_VALUES = 200
MAX_OFFSET_DAYS = 36525  # `now - Nd`: a hundred years, so the arithmetic cannot overflow
YEARS = (1900, 2999)     # dates outside cannot overflow when a day becomes its time range

_STATUSES = tuple(s.value for s in MembershipStatus)


_GRAMMAR = r"""
start: or_expr

?or_expr: and_expr (_OR and_expr)*
?and_expr: not_expr (_AND not_expr)*
?not_expr: NOT not_expr                  -> negation
         | atom
?atom: LPAR or_expr RPAR                 -> group
     | condition

condition: field CMP value               -> compare
         | field IN values               -> in_list
         | field NOT IN values           -> not_in_list
         | field match_op value          -> text_match
         | field IS NULL                 -> is_null
         | field IS NOT NULL             -> is_not_null

match_op: CONTAINS | STARTSWITH | ENDSWITH

field: NAME                              -> plain_field
     | NAME DOT NAME                     -> keyed_field
     | NAME DOT STRING                   -> keyed_field

values: LSQB (value (COMMA value)* COMMA?)? RSQB

value: STRING                            -> string
     | NUMBER                            -> number
     | TRUE                              -> boolean
     | FALSE                             -> boolean
     | NULL                              -> null
     | DATE                              -> date
     | (NOW | TODAY) (SIGN DURATION)?    -> relative

_OR: "or"i
_AND: "and"i
NOT: "not"i
IN: "in"i
IS: "is"i
NULL: "null"i
TRUE: "true"i
FALSE: "false"i
NOW: "now"i
TODAY: "today"i
CONTAINS: "contains"i
STARTSWITH: "startswith"i
ENDSWITH: "endswith"i

// The i flag lets the keywords above, which NAME also matches, be told apart from it.
NAME: /[a-z_][a-z0-9_]*/i
CMP: /!=|<=|>=|=|<|>/
STRING: /"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'/s
// Before NUMBER, or 2026-01-01 would lex as the number 2026.
DATE.2: _DAY (/[Tt]/ _CLOCK _OFFSET?)?
_DAY: /[0-9]{4}-[0-9]{2}-[0-9]{2}/
_CLOCK: /[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?/
_OFFSET: /[Zz]|[+-][0-9]{2}:[0-9]{2}/
NUMBER: /-?[0-9]+(?:\.[0-9]+)?/
DURATION.2: /[0-9]+[hdwHDW]/
SIGN: /[+-]/
LPAR: "("
RPAR: ")"
LSQB: "["
RSQB: "]"
COMMA: ","
DOT: "."

%ignore /\s+/
"""

_KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false", "now", "today",
                       "contains", "startswith", "endswith"})
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


class _Invalid(Exception):
    """Raised while building the AST; parse() adds the text and makes it a FilterSyntaxError
    (the transformer is shared between parses, so it cannot hold the text itself)."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


class _Null:
    """`null` as written: only `= null` / `!= null` accept it (they mean `is [not] null`)."""

    def __init__(self, pos: int) -> None:
        self.pos = pos


def _tok(t: Token) -> int:
    return t.start_pos or 0


class _Build(Transformer[Token, Any]):
    """Builds the AST while LALR reduces, so an unknown field is reported before whatever
    follows it; each callback checks what it can see (types, operators, limits)."""

    def start(self, c: list[Any]) -> Filter:
        node: Filter = c[0]
        return node

    def or_expr(self, c: list[Filter]) -> Or:
        return Or(tuple(c), _chain_checked(c))

    def and_expr(self, c: list[Filter]) -> And:
        return And(tuple(c), _chain_checked(c))

    def negation(self, c: list[Any]) -> Not:
        node = Not(c[1], _tok(c[0]))
        _check_depth(node)
        return node

    def group(self, c: list[Any]) -> Filter:
        node: Filter = c[1]
        return node

    def plain_field(self, c: list[Token]) -> Field:
        name, pos = c[0].value.lower(), _tok(c[0])
        if name == "lists":
            return Field("lists", None, pos)  # only in `lists contains`, checked there
        if name not in FIELDS:
            near = difflib.get_close_matches(name, [*FIELDS, "lists"], n=1)
            hint = f' (did you mean "{near[0]}"?)' if near else ""
            raise _Invalid(f'unknown field "{c[0].value}"{hint}', pos)
        if name == "attributes":
            raise _Invalid('"attributes" needs a key: attributes.KEY', pos)
        return Field(name, None, pos)

    def keyed_field(self, c: list[Token]) -> Field:
        name, pos = c[0].value.lower(), _tok(c[0])
        if name != "attributes":
            raise _Invalid(f'only attributes have keys; "{c[0].value}" has none', _tok(c[1]))
        key = _unquote(c[2]) if c[2].type == "STRING" else c[2].value
        if not key:
            raise _Invalid("an attribute key cannot be empty", _tok(c[2]))
        return Field("attributes", key, pos)

    def match_op(self, c: list[Token]) -> Token:
        return c[0]

    def compare(self, c: list[Any]) -> Compare | IsNull:
        fld, tok, value = c
        op = Op(tok.value)
        if isinstance(value, _Null):
            if op not in (Op.EQ, Op.NE):
                raise _Invalid(f'null cannot be compared with "{op}"; use "is null"', value.pos)
            return self._is_null(fld, op == Op.NE, value.pos)
        _check_op(fld, op, _tok(tok))
        _check_value(fld, op, value)
        return Compare(fld, op, value, fld.pos)

    def text_match(self, c: list[Any]) -> Compare | ListsContains:
        fld, tok, value = c
        op = Op(tok.value.lower())
        if isinstance(value, _Null):
            raise _Invalid(f"{op} needs a string, not null", value.pos)
        if fld.name == "lists":
            if op != Op.CONTAINS:
                raise _Invalid(f'"lists" takes only contains: lists contains "slug", not {op}',
                               _tok(tok))
            if not isinstance(value, Str):
                raise _Invalid('lists contains needs a list slug in quotes', value.pos)
            return ListsContains(value, fld.pos)
        _check_op(fld, op, _tok(tok))
        _check_value(fld, op, value)
        return Compare(fld, op, value, fld.pos)

    def in_list(self, c: list[Any]) -> In:
        return self._in(c[0], c[1], c[2], negated=False)

    def not_in_list(self, c: list[Any]) -> In:
        return self._in(c[0], c[2], c[3], negated=True)

    def _in(self, fld: Field, tok: Token, values: tuple[Token, list[Any]], *,
            negated: bool) -> In:
        _check_op(fld, Op.EQ, _tok(tok), word="not in" if negated else "in")
        lsqb, items = values
        if not items:
            raise _Invalid("an in list needs at least one value", _tok(lsqb))
        if len(items) > MAX_VALUES:
            raise _Invalid(f"too many values in a list (at most {MAX_VALUES})",
                           items[MAX_VALUES].pos)
        for value in items:
            if isinstance(value, _Null):
                raise _Invalid('null cannot be in a list; use "is null"', value.pos)
            _check_value(fld, Op.EQ, value)
        return In(fld, tuple(items), negated, fld.pos)

    def is_null(self, c: list[Any]) -> IsNull:
        return self._is_null(c[0], False, _tok(c[1]))

    def is_not_null(self, c: list[Any]) -> IsNull:
        return self._is_null(c[0], True, _tok(c[1]))

    def _is_null(self, fld: Field, negated: bool, pos: int) -> IsNull:
        if fld.name == "lists":
            raise _Invalid('"lists" takes only contains: lists contains "slug"', fld.pos)
        if FIELDS[fld.name] != Kind.ATTR:
            raise _Invalid(f'"{fld.name}" is never null', pos)
        return IsNull(fld, negated, fld.pos)

    def values(self, c: list[Any]) -> tuple[Token, list[Any]]:
        return c[0], [v for v in c[1:] if not isinstance(v, Token)]

    def string(self, c: list[Token]) -> Str:
        return Str(_unquote(c[0]), _tok(c[0]))

    def number(self, c: list[Token]) -> Num:
        text = c[0].value
        whole, _, frac = text.lstrip("-").partition(".")
        if len(whole.lstrip("0")) > 15 or len(frac) > 6:
            raise _Invalid("number out of range (at most 15 digits, and 6 after the point)",
                           _tok(c[0]))
        return Num(Decimal(text), _tok(c[0]))

    def boolean(self, c: list[Token]) -> Bool:
        return Bool(c[0].type == "TRUE", _tok(c[0]))

    def null(self, c: list[Token]) -> _Null:
        return _Null(_tok(c[0]))

    def date(self, c: list[Token]) -> Day | Moment:
        text, pos = c[0].value.upper(), _tok(c[0])
        try:
            if "T" not in text:
                day = dt.date.fromisoformat(text)
                year = day.year
            else:
                moment = dt.datetime.fromisoformat(text)
                year = moment.year
        except ValueError:
            raise _Invalid(f'invalid date "{c[0].value}"', pos) from None
        if not YEARS[0] <= year <= YEARS[1]:
            raise _Invalid(f"year out of range ({YEARS[0]}-{YEARS[1]})", pos)
        if "T" not in text:
            return Day(day, pos)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return Moment(moment, pos)

    def relative(self, c: list[Token]) -> Relative:
        base, pos = c[0].value.lower(), _tok(c[0])
        if len(c) == 1:
            return Relative(base, 0, "d", pos)
        sign, duration = c[1], c[2]
        digits, unit = duration.value[:-1].lstrip("0"), duration.value[-1].lower()
        if base == "today" and unit == "h":
            raise _Invalid("today moves by days or weeks (for hours: now - 12h)",
                           _tok(duration))
        # Count the digits first: int() refuses strings of thousands of them.
        amount = int(digits) if 0 < len(digits) <= 7 else 0 if not digits else 10**7
        if amount * {"h": 1 / 24, "d": 1, "w": 7}[unit] > MAX_OFFSET_DAYS:
            raise _Invalid("offset too large (at most 100 years)", _tok(duration))
        return Relative(base, -amount if sign.value == "-" else amount, unit, pos)


def _chain_checked(items: Sequence[Filter]) -> int:
    """Check the limits of an and/or chain as it is built; returns its position."""
    total = 0
    for item in items:
        total += item.size
        if total > MAX_CONDITIONS:
            raise _Invalid(f"too many conditions (at most {MAX_CONDITIONS})", item.pos)
        _check_depth(item, extra=1)
    return items[0].pos


def _check_depth(node: Filter, extra: int = 0) -> None:
    if node.depth + extra > MAX_DEPTH:
        raise _Invalid(f"nested too deeply (at most {MAX_DEPTH} levels)", node.pos)


def _check_op(fld: Field, op: Op, pos: int, *, word: str | None = None) -> None:
    """Is this operator meaningful for this field? `word` names in/not in (checked as =)."""
    if fld.name == "lists":
        raise _Invalid('"lists" takes only contains: lists contains "slug"', pos)
    kind = FIELDS[fld.name]
    if kind in (Kind.LIST, Kind.STATUS) and op not in (Op.EQ, Op.NE):
        raise _Invalid(f'"{fld.name}" takes =, !=, in or not in, not {word or op}', pos)
    if kind in (Kind.DATE, Kind.NUMBER) and op in _TEXT_MATCH:
        raise _Invalid(f'{op} is for text; "{fld.name}" is a {kind}', pos)


def _check_value(fld: Field, op: Op, value: Any) -> None:
    kind = FIELDS[fld.name]
    if op in _TEXT_MATCH:
        if not isinstance(value, Str):
            raise _Invalid(f"{op} needs a string in quotes", value.pos)
        return
    if kind == Kind.DATE:
        if not isinstance(value, Day | Moment | Relative):
            raise _Invalid(f'"{fld.name}" is a date: compare it with a date (2026-01-01), '
                           "a time (2026-01-01T08:00) or now/today, without quotes", value.pos)
    elif kind == Kind.NUMBER:
        if not isinstance(value, Num):
            raise _Invalid(f'"{fld.name}" is a number: compare it with a number', value.pos)
    elif isinstance(value, Day | Moment | Relative):
        raise _Invalid(f'"{fld.name}" is not a date; a date in quotes compares as text',
                       value.pos)
    elif kind == Kind.ATTR:
        if isinstance(value, Bool) and op in _ORDERING:
            raise _Invalid(f'true and false cannot be compared with "{op}"', value.pos)
    elif not isinstance(value, Str):
        raise _Invalid(f'"{fld.name}" is text: compare it with a string in quotes', value.pos)
    elif kind == Kind.STATUS and value.value not in _STATUSES:
        raise _Invalid(f'unknown status "{value.value}" (one of {", ".join(_STATUSES)})',
                       value.pos)


def _unquote(tok: Token) -> str:
    """The text of a STRING token, escapes resolved; positions of errors point into it."""
    raw, start = tok.value, _tok(tok)
    out: list[str] = []
    i = 1
    while i < len(raw) - 1:
        ch = raw[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", raw[i + 2:i + 6]):
            code = int(raw[i + 2:i + 6], 16)
            if code == 0 or 0xD800 <= code <= 0xDFFF:
                raise _Invalid(f"\\u{raw[i + 2:i + 6]} is not allowed in a string", start + i)
            out.append(chr(code))
            i += 6
        else:
            raise _Invalid(f'unknown escape "\\{nxt}" (use \\" \\\' \\\\ \\n \\t \\r or '
                           "\\uXXXX)", start + i)
    return "".join(out)
