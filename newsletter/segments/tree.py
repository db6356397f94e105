"""The filter AST: frozen nodes and values with positions, the fields, and shared semantics."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import ClassVar, TypeAlias


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


# --- semantics shared by the SQL compiler and the reference evaluator -------------------------

def _folds_case(fld: Field) -> bool:
    """Addresses compare case-insensitively: they are matched on the lowercased key."""
    return fld.name in ("email", "domain")


# A number as the attribute importer writes it; only such text is compared numerically.
_NUMERIC = r"\A-?[0-9]+(\.[0-9]+)?\Z"
_NUMERIC_RE = re.compile(_NUMERIC)


def _str(value: Value) -> str:
    assert isinstance(value, Str)
    return value.value


def _bool_text(b: bool) -> str:
    return "true" if b else "false"


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
