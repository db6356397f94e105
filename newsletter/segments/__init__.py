"""The segment filter language: parse, print, check, compile to SQL, evaluate in Python."""

# A filter selects membership rows (one subscriber on one list), e.g.
#     lang = "zh" and attributes.sector in ["telecom", "finance"] and joined > 2026-01-01
# parse() makes an immutable AST, to_text() prints it back, compile_filter() turns it into a
# predicate over `memberships JOIN subscribers`, and matches() is the same semantics in
# Python, which the property tests hold the SQL to. docs/segments.md is the reference.
#
# Every condition is true or false, never SQL's unknown: a missing attribute equals nothing,
# so `attributes.x != "a"` and `not attributes.x = "a"` both match it, on both sides.
#
# tree.py holds the AST and the semantics both sides share, grammar.py and parser.py read
# text into it, text.py prints it back and checks its lists, sql.py compiles it, and
# evaluate.py is the reference evaluator.

from .evaluate import matches

# Not in __all__ but reachable as before: the limits, the fields and their kinds.
from .grammar import MAX_CONDITIONS as MAX_CONDITIONS
from .grammar import MAX_DEPTH as MAX_DEPTH
from .grammar import MAX_OFFSET_DAYS as MAX_OFFSET_DAYS
from .grammar import MAX_VALUES as MAX_VALUES
from .grammar import YEARS as YEARS
from .parser import parse
from .sql import compile_filter, count_matching, matching_query
from .text import check_lists, list_slugs, to_text
from .tree import FIELDS as FIELDS
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
    Op,
    Or,
    Relative,
    Str,
    Value,
)
from .tree import Kind as Kind

__all__ = [
    "And", "Bool", "Compare", "Day", "Field", "Filter", "In", "IsNull", "ListsContains",
    "Moment", "Not", "Num", "Op", "Or", "Relative", "Str", "Value", "check_lists",
    "compile_filter", "count_matching", "list_slugs", "matches", "matching_query", "parse",
    "to_text",
]
