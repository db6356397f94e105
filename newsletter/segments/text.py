"""Printing a filter as its canonical text, and finding and checking the lists it names."""

from __future__ import annotations

from collections.abc import Iterator, Set

from ..errors import FilterSyntaxError
from .grammar import _IDENT, _KEYWORDS
from .tree import (
    And,
    Bool,
    Compare,
    Day,
    Field,
    Filter,
    In,
    IsNull,
    ListsContains,
    Moment,
    Not,
    Num,
    Or,
    Relative,
    Str,
    Value,
)


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
