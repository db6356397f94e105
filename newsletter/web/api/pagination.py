"""Cursor pagination: the Page model, its query parameters, and opaque cursors."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

from ...admin import InvalidError

# SQLite integers are 64-bit: a larger id in a path could only overflow, never match.
MAX_ID = 2**63 - 1

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a collection; pass next_cursor back as `cursor` for the next one."""

    items: list[T]
    next_cursor: str | None = Field(
        None, description="Opaque; null on the last page.")


Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1 to 500).")]
Cursor = Annotated[str | None, Query(max_length=200,
                                     description="next_cursor of the previous page.")]


def encode_cursor(kind: str, value: int) -> str:
    raw = json.dumps([kind, value], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> int | None:
    """The position a cursor stands for; one made for another collection is refused."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got, value = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidError("cursor", "not a cursor from this API") from None
    if got != kind or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidError("cursor", "not a cursor for this collection") from None
    return value


def page_of(items: Sequence[Any], limit: int, kind: str, key: Callable[[Any], int],
            convert: Callable[[Any], T]) -> Page[T]:
    """`items` was fetched with limit + 1: the extra one only says another page exists."""
    shown = list(items[:limit])
    more = len(items) > limit
    return Page[T](items=[convert(i) for i in shown],
                   next_cursor=encode_cursor(kind, key(shown[-1])) if more and shown else None)


def slice_after(items: Sequence[Any], after: int | None, limit: int,
                key: Callable[[Any], int]) -> list[Any]:
    """Paging over a small collection read whole (lists, segments, schedules, tokens)."""
    ordered = sorted(items, key=key)
    if after is not None:
        ordered = [i for i in ordered if key(i) > after]
    return ordered[:limit + 1]
