"""The segment filter language: parse, print, check, compile to SQL, evaluate in Python."""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import re
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    Integer,
    Select,
    String,
    Text,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from .errors import FilterSyntaxError
from .store.schema import MembershipStatus, lists, memberships, subscribers

# A filter selects membership rows (one subscriber on one list), e.g.
#     lang = "zh" and attributes.sector in ["telecom", "finance"] and joined > 2026-01-01
# parse() makes an immutable AST, to_text() prints it back, compile_filter() turns it into a
# predicate over `memberships JOIN subscribers`, and matches() is the same semantics in
# Python, which the property tests hold the SQL to. docs/segments.md is the reference.
#
# Every condition is true or false, never SQL's unknown: a missing attribute equals nothing,
# so `attributes.x != "a"` and `not attributes.x = "a"` both match it, on both sides.

__all__ = [
    "And", "Bool", "Compare", "Day", "Field", "Filter", "In", "IsNull", "ListsContains",
    "Moment", "Not", "Num", "Op", "Or", "Relative", "Str", "Value", "check_lists",
    "compile_filter", "count_matching", "list_slugs", "matches", "matching_query", "parse",
    "to_text",
]

# Bounds that keep every filter compilable: SQLite refuses expressions nested deeper than
# 1000, and each condition, list value and level of nesting adds to that depth.
MAX_DEPTH = 32
MAX_CONDITIONS = 200
MAX_VALUES = 200
MAX_OFFSET_DAYS = 36525  # `now - Nd`: a hundred years, so the arithmetic cannot overflow
YEARS = (1900, 2999)     # dates outside cannot overflow when a day becomes its time range


def _at() -> int:
    """A node's position in the parsed text: kept for errors, ignored by equality."""
    return dataclasses.field(default=0, compare=False)


# --- the AST ----------------------------------------------------------------------------------

class Op(StrEnum):
    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    CONTAINS = "contains"
    STARTSWITH = "startswith"
    ENDSWITH = "endswith"


_ORDERING = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})
_TEXT_MATCH = frozenset({Op.CONTAINS, Op.STARTSWITH, Op.ENDSWITH})


@dataclass(frozen=True)
class Str:
    value: str
    pos: int = _at()


@dataclass(frozen=True)
class Num:
    value: Decimal
    pos: int = _at()


@dataclass(frozen=True)
class Bool:
    value: bool
    pos: int = _at()


@dataclass(frozen=True)
class Day:
    """A calendar day (UTC): `= 2026-01-01` is any time that day, `> 2026-01-01` after it."""

    value: dt.date
    pos: int = _at()


@dataclass(frozen=True)
class Moment:
    """An instant; always zone-aware (a literal without an offset is UTC)."""

    value: dt.datetime
    pos: int = _at()


@dataclass(frozen=True)
class Relative:
    """`now` (an instant) or `today` (a day), moved by amount units (h, d or w)."""

    base: str
    amount: int = 0
    unit: str = "d"
    pos: int = _at()

    def __post_init__(self) -> None:
        if self.base not in ("now", "today") or self.unit not in ("h", "d", "w") or (
                self.base == "today" and self.unit == "h" and self.amount):
            raise ValueError(f"invalid relative time {self.base} {self.amount}{self.unit}")
        if self.amount == 0:  # `now + 0h` is `now`: one spelling, so printing round-trips
            object.__setattr__(self, "unit", "d")


Value: TypeAlias = Str | Num | Bool | Day | Moment | Relative


@dataclass(frozen=True)
class Field:
    name: str                 # one of FIELDS
    key: str | None = None    # the attribute's key, for name == "attributes"
    pos: int = _at()


@dataclass(frozen=True)
class Compare:
    field: Field
    op: Op
    value: Value
    pos: int = _at()
    depth: ClassVar[int] = 1
    size: ClassVar[int] = 1


@dataclass(frozen=True)
class In:
    field: Field
    values: tuple[Value, ...]
    negated: bool = False
    pos: int = _at()
    depth: ClassVar[int] = 1
    size: ClassVar[int] = 1


@dataclass(frozen=True)
class IsNull:
    field: Field
    negated: bool = False
    pos: int = _at()
    depth: ClassVar[int] = 1
    size: ClassVar[int] = 1


@dataclass(frozen=True)
class ListsContains:
    """`lists contains "slug"`: the subscriber is active on that list (any row of theirs)."""

    slug: Str
    pos: int = _at()
    depth: ClassVar[int] = 1
    size: ClassVar[int] = 1


@dataclass(frozen=True)
class Not:
    operand: Filter
    pos: int = _at()
    depth: int = dataclasses.field(default=0, init=False, compare=False, repr=False)
    size: int = dataclasses.field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", self.operand.depth + 1)
        object.__setattr__(self, "size", self.operand.size)


@dataclass(frozen=True)
class And:
    items: tuple[Filter, ...]
    pos: int = _at()
    depth: int = dataclasses.field(default=0, init=False, compare=False, repr=False)
    size: int = dataclasses.field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", 1 + max(i.depth for i in self.items))
        object.__setattr__(self, "size", sum(i.size for i in self.items))


@dataclass(frozen=True)
class Or:
    items: tuple[Filter, ...]
    pos: int = _at()
    depth: int = dataclasses.field(default=0, init=False, compare=False, repr=False)
    size: int = dataclasses.field(default=0, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", 1 + max(i.depth for i in self.items))
        object.__setattr__(self, "size", sum(i.size for i in self.items))


Filter: TypeAlias = Compare | In | IsNull | ListsContains | Not | And | Or


class Kind(StrEnum):
    LIST = "list"          # the membership's list, by slug
    STATUS = "status"      # a MembershipStatus
    TEXT = "text"          # never null
    NUMBER = "number"      # an integer column
    DATE = "date"          # a UTC timestamp column
    ATTR = "attribute"     # a subscriber attribute: text, a number when compared to one, or null


FIELDS: dict[str, Kind] = {
    "list": Kind.LIST, "status": Kind.STATUS, "joined": Kind.DATE, "updated": Kind.DATE,
    "email": Kind.TEXT, "domain": Kind.TEXT, "name": Kind.TEXT, "lang": Kind.ATTR,
    "zone": Kind.ATTR, "created": Kind.DATE, "hard_bounces": Kind.NUMBER,
    "soft_bounces": Kind.NUMBER, "attributes": Kind.ATTR,
}
# Fields that are attributes under a friendlier name.
_ATTR_ALIASES = {"lang": "lang", "zone": "tz"}
_STATUSES = tuple(s.value for s in MembershipStatus)


# --- the grammar ------------------------------------------------------------------------------

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


_PARSER = Lark(_GRAMMAR, parser="lalr", lexer="contextual", transformer=_Build(),
               maybe_placeholders=False)


def parse(text: str) -> Filter:
    """The AST of a filter; raises FilterSyntaxError (with the position) if it is invalid."""
    # NUL and lone surrogates can be stored in neither database: refuse them up front.
    bad = re.search(r"[\x00\ud800-\udfff]", text)
    if bad:
        raise FilterSyntaxError(f"character U+{ord(bad.group()):04X} is not allowed",
                                text=text, position=bad.start())
    try:
        flt: Any = _PARSER.parse(text)
    except _Invalid as exc:
        raise FilterSyntaxError(exc.message, text=text, position=exc.position) from None
    except UnexpectedInput as exc:
        message, position = _describe(exc, text)
        raise FilterSyntaxError(message, text=text,
                                position=max(0, min(position, len(text)))) from None
    assert isinstance(flt, Compare | In | IsNull | ListsContains | Not | And | Or)
    return flt


_VALUE_TOKENS = {"STRING", "NUMBER", "DATE", "TRUE", "FALSE", "NULL", "NOW", "TODAY"}
_OPERATOR_TOKENS = {"CMP", "IN", "CONTAINS", "STARTSWITH", "ENDSWITH", "IS"}


def _describe(exc: UnexpectedInput, text: str) -> tuple[str, int]:
    """A human message and position for one of lark's errors."""
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = text[pos] if pos < len(text) else ""
        if char in "\"'":
            return "unterminated string (no closing quote)", pos
        if char == "!":
            return 'unexpected "!" (for not equal, write !=)', pos
        return f'unexpected character "{char}"', pos
    if not isinstance(exc, UnexpectedToken):
        return "unexpected end of the filter", len(text)
    tok = exc.token
    at_end = tok.type == "$END"
    pos = len(text) if at_end else _tok(tok)
    got = "" if at_end else f", got {_show(tok)}"
    expected = set(exc.expected)
    stack: list[Any] = []
    if exc.interactive_parser is not None:
        stack = list(exc.interactive_parser.parser_state.value_stack)
    prev = _symbol(stack[-1]) if stack else None
    after = f" after {prev}" if prev else ""
    if not text.strip():
        return "empty filter", 0
    if stack and _is_token(stack[-1], "DOT"):
        return f'expected an attribute key (a name or a string in quotes){after}{got}', pos
    last = stack[-1] if stack else None
    if _is_token(last, "IS"):
        return f'expected "null" or "not null"{after}{got}', pos
    if _is_token(last, "NOT") and len(stack) > 1 and _is_token(stack[-2], "IS"):
        return f'expected "null"{after}{got}', pos
    if _is_token(last, "NOT") and len(stack) > 1 and isinstance(stack[-2], Field):
        return f'expected "in"{after}{got}', pos
    if expected & _VALUE_TOKENS:
        return f"expected a value{after}{got}", pos
    if "DURATION" in expected:
        return f"expected an offset such as 30d, 12h or 2w{after}{got}", pos
    if "LSQB" in expected:
        return f'expected a list such as ["a", "b"]{after}{got}', pos
    if expected & _OPERATOR_TOKENS:
        return (f"expected an operator (=, !=, <, <=, >, >=, in, not in, contains, startswith, "
                f"endswith, is null){after}{got}"), pos
    if "NAME" in expected:
        return f'expected a field name or "("{after}{got}', pos
    # After a complete condition or value: what may follow depends on what is still open.
    open_parens = [t for t in stack if isinstance(t, Token) and t.type == "LPAR"]
    if any(isinstance(t, Token) and t.type == "LSQB" for t in stack):
        return f'expected "," or "]"{after}{got}', pos
    if tok.type == "RPAR" and not open_parens:
        return 'unmatched ")"', pos
    if at_end and open_parens:
        return '"(" is never closed', _tok(open_parens[-1])
    closing = '"and", "or" or ")"' if open_parens else '"and", "or" or the end of the filter'
    return f"expected {closing}{after}{got}", pos


def _is_token(item: Any, kind: str) -> bool:
    return isinstance(item, Token) and item.type == kind


def _show(tok: Token) -> str:
    return str(tok.value) if tok.type == "STRING" else f'"{tok.value}"'


def _symbol(item: Any) -> str | None:
    """How the error message names the symbol before the error."""
    if isinstance(item, Token):
        return _show(item)
    if isinstance(item, Field):
        return f'"{_field_text(item)}"'
    if isinstance(item, Str | Num | Bool | Day | Moment | Relative):
        return f"the value {_value_text(item)}"
    return None


# --- printing ---------------------------------------------------------------------------------

def to_text(flt: Filter) -> str:
    """The canonical text of a filter: parse(to_text(f)) == f."""
    printer = _Printer()
    printer.filter(flt)
    return "".join(printer.parts)


class _Printer:
    """Prints a filter, noting where each string value starts (for check_lists)."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.starts: dict[int, int] = {}

    def put(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)

    def filter(self, flt: Filter) -> None:
        match flt:
            case And(items) | Or(items):
                word = " and " if isinstance(flt, And) else " or "
                for n, item in enumerate(items):
                    if n:
                        self.put(word)
                    # `and` binds tighter than `or`: only these need parentheses to stay put.
                    self.group(item, isinstance(item, Or) or
                               (isinstance(flt, And) and isinstance(item, And)))
            case Not(operand):
                self.put("not ")
                self.group(operand, isinstance(operand, And | Or))
            case ListsContains(slug):
                self.put("lists contains ")
                self.value(slug)
            case IsNull(fld, negated):
                self.put(f"{_field_text(fld)} is {'not ' if negated else ''}null")
            case In(fld, values, negated):
                self.put(f"{_field_text(fld)} {'not in' if negated else 'in'} [")
                for n, value in enumerate(values):
                    if n:
                        self.put(", ")
                    self.value(value)
                self.put("]")
            case Compare(fld, op, value):
                self.put(f"{_field_text(fld)} {op} ")
                self.value(value)

    def group(self, flt: Filter, parens: bool) -> None:
        self.put("(" if parens else "")
        self.filter(flt)
        self.put(")" if parens else "")

    def value(self, value: Value) -> None:
        self.starts[id(value)] = self.length
        self.put(_value_text(value))


def _field_text(fld: Field) -> str:
    if fld.key is None:
        return fld.name
    if _IDENT.fullmatch(fld.key) and fld.key.lower() not in _KEYWORDS:
        return f"attributes.{fld.key}"
    return f"attributes.{_quote(fld.key)}"


def _quote(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _value_text(value: Value) -> str:
    match value:
        case Str(s):
            return _quote(s)
        case Num(n):
            return format(n, "f")
        case Bool(b):
            return "true" if b else "false"
        case Day(d):
            return d.isoformat()
        case Moment(m):
            text = m.isoformat()
            return text[:-6] + "Z" if text.endswith("+00:00") else text
        case Relative(base, amount, unit):
            if amount == 0:
                return base
            return f"{base} {'-' if amount < 0 else '+'} {abs(amount)}{unit}"
    raise TypeError(value)  # pragma: no cover - the match is exhaustive


# --- lists ------------------------------------------------------------------------------------

def _walk(flt: Filter) -> Iterator[Filter]:
    yield flt
    if isinstance(flt, And | Or):
        for item in flt.items:
            yield from _walk(item)
    elif isinstance(flt, Not):
        yield from _walk(flt.operand)


def _slug_values(flt: Filter) -> list[Str]:
    found: list[Str] = []
    for node in _walk(flt):
        if isinstance(node, ListsContains):
            found.append(node.slug)
        elif isinstance(node, Compare | In) and node.field.name == "list":
            values = node.values if isinstance(node, In) else (node.value,)
            found.extend(v for v in values if isinstance(v, Str))
    return found


def list_slugs(flt: Filter) -> list[tuple[str, int]]:
    """The list slugs the filter names (list =, list in, lists contains), with positions."""
    return [(s.value, s.pos) for s in _slug_values(flt)]


def check_lists(flt: Filter, known: Set[str], *, text: str | None = None) -> None:
    """Raise FilterSyntaxError for the first slug not in `known`.

    Pass the text the filter was parsed from, so the error points into it; without it the
    error shows the canonical text (to_text) and points into that.
    """
    for value in _slug_values(flt):
        if value.value in known:
            continue
        message = f'unknown list "{value.value}"'
        if text is not None:
            raise FilterSyntaxError(message, text=text, position=value.pos)
        printer = _Printer()
        printer.filter(flt)
        raise FilterSyntaxError(message, text="".join(printer.parts),
                                position=printer.starts[id(value)])


# --- time -------------------------------------------------------------------------------------

def _utc(moment: dt.datetime) -> dt.datetime:
    """Stored times are UTC; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def _resolve(value: Value, now: dt.datetime) -> dt.date | dt.datetime:
    """A date value as a day (dt.date) or an instant (an aware dt.datetime, UTC)."""
    if isinstance(value, Day):
        return value.value
    if isinstance(value, Moment):
        return _utc(value.value)
    assert isinstance(value, Relative)
    delta = {"h": dt.timedelta(hours=value.amount), "d": dt.timedelta(days=value.amount),
             "w": dt.timedelta(weeks=value.amount)}[value.unit]
    if value.base == "today":
        return now.date() + delta
    return now + delta


def _day_range(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


# --- SQL --------------------------------------------------------------------------------------

class _strpos(FunctionElement[int]):
    """1 + the offset of needle in haystack, 0 if absent (case-sensitive on both databases,
    unlike LIKE, which SQLite folds for ASCII)."""

    type = Integer()
    inherit_cache = True
    name = "strpos"


@compiles(_strpos)
def _strpos_default(element: _strpos, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strpos({compiler.process(element.clauses, **kw)})"


@compiles(_strpos, "sqlite")
def _strpos_sqlite(element: _strpos, compiler: SQLCompiler, **kw: Any) -> str:
    return f"instr({compiler.process(element.clauses, **kw)})"


class _bytewise(FunctionElement[str]):
    """Text to order by code point, as Python and SQLite do; PostgreSQL would otherwise use
    the database's locale."""

    type = String()
    inherit_cache = True
    name = "bytewise"


@compiles(_bytewise)
def _bytewise_default(element: _bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return f'({compiler.process(element.clauses, **kw)}) COLLATE "C"'


@compiles(_bytewise, "sqlite")
def _bytewise_sqlite(element: _bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


class _attr_text(FunctionElement[str]):
    """The text of one attribute of the subscriber: a string as is, a number as its JSON
    text, true/false as "true"/"false", NULL when missing or null."""

    type = String()
    # The SQLite form builds a subquery while compiling: never reuse a compiled form.
    inherit_cache = False
    name = "attr_text"


@compiles(_attr_text)
def _attr_text_default(element: _attr_text, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = element.clauses.clauses
    return f"({compiler.process(column, **kw)} ->> {compiler.process(key, **kw)})"


@compiles(_attr_text, "sqlite")
def _attr_text_sqlite(element: _attr_text, compiler: SQLCompiler, **kw: Any) -> str:
    # json_each rather than json_extract's path: SQLite before 3.45 cannot find a key
    # that was stored \u-escaped (SQLAlchemy writes JSON with ensure_ascii), such as 部门.
    column, key = element.clauses.clauses
    each = func.json_each(column).table_valued("key", "value", "type").alias("seg_attr")
    text = case((each.c.type == literal_column("'true'"), literal_column("'true'")),
                (each.c.type == literal_column("'false'"), literal_column("'false'")),
                else_=cast(each.c.value, Text))
    query = select(text).select_from(each).where(each.c.key == key).scalar_subquery()
    return compiler.process(query, **kw)


# A number as the attribute importer writes it; only such text is compared numerically.
_NUMERIC = r"\A-?[0-9]+(\.[0-9]+)?\Z"
_NUMERIC_RE = re.compile(_NUMERIC)


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
        return func.substr(key, _strpos(key, literal("@")) + 1, type_=String)
    if fld.name == "name":
        return subscribers.c.name
    return _attr_column(fld)


def _attr_column(fld: Field) -> ColumnElement[str]:
    key = fld.key if fld.key is not None else _ATTR_ALIASES[fld.name]
    return _attr_text(subscribers.c.attributes, literal(key, String))


def _date_column(fld: Field) -> ColumnElement[dt.datetime]:
    return {"joined": memberships.c.created_at, "updated": memberships.c.updated_at,
            "created": subscribers.c.created_at}[fld.name]


def _number_column(fld: Field) -> ColumnElement[int]:
    return {"hard_bounces": subscribers.c.hard_bounces,
            "soft_bounces": subscribers.c.soft_bounces}[fld.name]


def _folds_case(fld: Field) -> bool:
    """Addresses compare case-insensitively: they are matched on the lowercased key."""
    return fld.name in ("email", "domain")


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
        pred = _strpos(x, literal(text, String)) > 0
    elif op == Op.STARTSWITH:
        pred = func.substr(x, 1, len(text), type_=String) == text
    elif op == Op.ENDSWITH:
        pred = and_(func.length(x) >= len(text),
                    func.substr(x, func.length(x) - len(text) + 1, type_=String) == text)
    elif op in _ORDERING:
        pred = _ordered(_bytewise(x), op, literal(text, String))
    else:
        pred = x == text
    return _definite(pred) if nullable else pred


def _definite(pred: ColumnElement[bool]) -> ColumnElement[bool]:
    """A missing attribute makes a comparison NULL; make it false, so that `not` means not."""
    return func.coalesce(pred, false(), type_=Boolean)


def _str(value: Value) -> str:
    assert isinstance(value, Str)
    return value.value


def _bool_text(b: bool) -> str:
    return "true" if b else "false"


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


# --- the reference evaluator -------------------------------------------------------------------

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
    """What the databases read from a JSON attribute as text (see _attr_text)."""
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
