"""Article bodies from Markdown to HTML (for the HTML part) and to wrapped plain text.

Raw HTML in Markdown is off: an editor's body cannot smuggle markup or scripts into the email.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from markdown_it import MarkdownIt
from markdown_it.token import Token
from markupsafe import Markup

_md = MarkdownIt("commonmark", {"html": False, "typographer": False}).enable(
    ["table", "strikethrough"]
)
_SAFE_SCHEMES = ("http://", "https://", "mailto:")


def to_html(markdown: str) -> Markup:
    """HTML for an article body. markdown-it escapes text and rejects javascript: links."""
    return Markup(_md.render(markdown))  # noqa: S704 - markdown-it output with html disabled


# --- plain text -------------------------------------------------------------------------------

# Characters that must not start a line in CJK text (closing punctuation), kinsoku shori.
_NO_LINE_START = set("，。、；：！？）」』】》〉”’,.;:!?)]}%")


def char_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(c) for c in text)


def _units(text: str) -> list[str]:
    """Split into breakable units: words, spaces, and single wide (CJK) characters."""
    units: list[str] = []
    word = ""
    for ch in text:
        if ch == " ":
            if word:
                units.append(word)
                word = ""
            units.append(" ")
        elif char_width(ch) == 2:
            if word:
                units.append(word)
                word = ""
            units.append(ch)
        elif ch in _NO_LINE_START and units and not word and units[-1] != " ":
            units[-1] += ch  # keep closing punctuation with what it closes
        else:
            word += ch
    if word:
        units.append(word)
    # Glue wide closing punctuation to the unit before it.
    glued: list[str] = []
    for u in units:
        if glued and u[0] in _NO_LINE_START and glued[-1] != " ":
            glued[-1] += u
        else:
            glued.append(u)
    return glued


def wrap(text: str, width: int = 72, indent: str = "", subsequent: str | None = None) -> str:
    """Wrap text to `width` display columns; CJK text breaks between characters."""
    subsequent = indent if subsequent is None else subsequent
    lines: list[str] = []
    for para_line in text.split("\n"):
        prefix = indent if not lines else subsequent
        line, used = prefix, text_width(prefix)
        for unit in _units(" ".join(para_line.split(" "))):
            w = text_width(unit)
            if unit == " ":
                if line.strip():
                    line += " "
                    used += 1
                continue
            if used + w > width and line.strip():
                lines.append(line.rstrip())
                line, used = subsequent, text_width(subsequent)
            line += unit
            used += w
        lines.append(line.rstrip())
    return "\n".join(lines)


class TextRenderer:
    """Markdown to readable plain text; links become numbered footnotes shared across a call."""

    def __init__(self, width: int = 72) -> None:
        self.width = width
        self.links: list[str] = []

    def footnote(self, url: str) -> int:
        """The footnote number for url, reusing the number of a link seen before."""
        if url in self.links:
            return self.links.index(url) + 1
        self.links.append(url)
        return len(self.links)

    def render(self, markdown: str) -> str:
        tokens = _md.parse(markdown)
        out: list[str] = []
        self._blocks(tokens, 0, len(tokens), out, indent="")
        return "\n\n".join(b for b in out if b.strip())

    def _blocks(self, tokens: Sequence[Token], start: int, end: int, out: list[str],
                indent: str) -> None:
        i = start
        while i < end:
            tok = tokens[i]
            if tok.type in ("paragraph_open", "heading_open"):
                text = self._inline(tokens[i + 1])
                if tok.type == "heading_open":
                    text = text.upper() if text.isascii() else text
                out.append(wrap(text, self.width, indent))
                i += 3
            elif tok.type in ("bullet_list_open", "ordered_list_open"):
                close = _matching(tokens, i)
                self._list(tokens, i, close, out, indent)
                i = close + 1
            elif tok.type == "blockquote_open":
                close = _matching(tokens, i)
                self._blocks(tokens, i + 1, close, out, indent + "> ")
                i = close + 1
            elif tok.type in ("fence", "code_block"):
                code = tok.content.rstrip().split("\n")
                out.append("\n".join(indent + "    " + ln for ln in code))
                i += 1
            elif tok.type == "hr":
                out.append(indent + "-" * 20)
                i += 1
            elif tok.type == "table_open":
                close = _matching(tokens, i)
                out.append(self._table(tokens[i:close], indent))
                i = close + 1
            else:
                i += 1

    def _list(self, tokens: Sequence[Token], start: int, end: int, out: list[str],
              indent: str) -> None:
        ordered = tokens[start].type == "ordered_list_open"
        number = int(tokens[start].attrs.get("start", 1) or 1) if ordered else 0
        items: list[str] = []
        i = start + 1
        while i < end:
            if tokens[i].type == "list_item_open":
                close = _matching(tokens, i)
                marker = f"{number}. " if ordered else "- "
                number += 1
                inner: list[str] = []
                self._blocks(tokens, i + 1, close, inner, indent + " " * len(marker))
                body = "\n".join(b for b in inner if b.strip())
                first_pad = indent + " " * len(marker)
                if body.startswith(first_pad):
                    body = indent + marker + body[len(first_pad):]
                items.append(body)
                i = close + 1
            else:
                i += 1
        out.append("\n".join(items))

    def _table(self, tokens: Sequence[Token], indent: str) -> str:
        rows: list[list[str]] = []
        for j, tok in enumerate(tokens):
            if tok.type == "tr_open":
                rows.append([])
            elif tok.type == "inline" and rows:
                rows[-1].append(self._inline(tok))
            del j
        return "\n".join(indent + " | ".join(r) for r in rows)

    def _inline(self, tok: Token) -> str:
        parts: list[str] = []
        href: str | None = None
        for child in tok.children or []:
            if child.type in ("text", "code_inline"):
                parts.append(child.content)
            elif child.type == "softbreak":
                parts.append(" ")
            elif child.type == "hardbreak":
                parts.append("\n")
            elif child.type == "link_open":
                href = str(child.attrs.get("href", ""))
            elif child.type == "link_close" and href:
                if href.startswith(_SAFE_SCHEMES):
                    parts.append(f" [{self.footnote(href)}]")
                href = None
            elif child.type == "image":
                parts.append(child.content or "")
        return "".join(parts)


def _matching(tokens: Sequence[Token], start: int) -> int:
    """Index of the token closing tokens[start] (same nesting level)."""
    level = 0
    for j in range(start, len(tokens)):
        level += tokens[j].nesting
        if level == 0:
            return j
    return len(tokens) - 1
