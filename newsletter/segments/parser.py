"""parse(): the LALR parser, built once, and lark's errors as positioned FilterSyntaxErrors."""

from __future__ import annotations

import re
from typing import Any

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from ..errors import FilterSyntaxError
from .grammar import _GRAMMAR, _Build, _Invalid, _tok
from .text import _field_text, _value_text
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
)

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
