"""Article bodies from Markdown to HTML (for the HTML part) and to wrapped plain text.

Raw HTML in Markdown is off: an editor's body cannot smuggle markup or scripts into the email.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from markupsafe import Markup

_md = MarkdownIt("commonmark", {"html": False, "typographer": False}).enable(
    ["table", "strikethrough"]
)
_SAFE_SCHEMES = ("http://", "https://", "mailto:")

# The email's content column: a 600 px container less 32 px padding on each side. Images
# in a body are shown across it (and shrink with the column on a phone).
CONTENT_WIDTH = 536
IMAGE_STYLE = "display:block;max-width:100%;height:auto;border:0"


def _render_image(self: RendererHTML, tokens: Sequence[Token], idx: int,
                  options: OptionsDict, env: EnvType) -> str:
    # Outlook sizes an image by its width attribute and ignores CSS; everyone else scales it
    # down with max-width. markdown-it's own rule sets neither. The model has already
    # refused images without alt text or with a non-https source.
    tok = tokens[idx]
    alt = self.renderInlineAsText(tok.children or [], options, env)
    return (f'<img src="{escapeHtml(str(tok.attrGet("src") or ""))}" alt="{escapeHtml(alt)}" '
            f'width="{CONTENT_WIDTH}" style="{IMAGE_STYLE}">')


_md.add_render_rule("image", _render_image)


def to_html(markdown: str) -> Markup:
    """HTML for an article body. markdown-it escapes text and rejects javascript: links."""
    return Markup(_md.render(markdown))  # noqa: S704 - markdown-it output with html disabled


# --- plain text -------------------------------------------------------------------------------

# Line-breaking rules for CJK text (kinsoku shori): closing punctuation never starts a line,
# opening punctuation never ends one. ASCII ones are here for mixed text such as "中文)".
_NO_LINE_START = set("，。、；：！？）」』】》〉〕］｝”’,.;:!?)]}%")
_NO_LINE_END = set("（「『【《〈〔［｛“‘([{")
_SOFT_BREAK = "\x00"  # a source line break, decided once both neighbours are known


def char_width(ch: str) -> int:
    """Display columns of a character: 2 for wide and full-width ones (CJK), else 1."""
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    return sum(char_width(c) for c in text)


def _units(text: str) -> list[str]:
    """Split into breakable units: words, spaces, and single wide (CJK) characters, with
    punctuation glued to its neighbour so that no line starts or ends with the wrong one."""
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
    glued: list[str] = []
    for u in units:
        if glued and glued[-1] != " " and u != " " and (
                u[0] in _NO_LINE_START or glued[-1][-1] in _NO_LINE_END):
            glued[-1] += u
        else:
            glued.append(u)
    return glued


def wrap(text: str, width: int = 72, indent: str = "", subsequent: str | None = None) -> str:
    """Wrap text to `width` display columns; CJK text breaks between characters.

    `indent` starts the first line, `subsequent` the others (a hanging indent when it is
    wider). A word longer than the line (a URL) gets a line of its own and overflows.
    """
    subsequent = indent if subsequent is None else subsequent
    lines: list[str] = []
    for para_line in text.split("\n"):
        prefix = indent if not lines else subsequent
        line, used = prefix, text_width(prefix)
        for unit in _units(para_line):
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


def _join_soft_breaks(text: str) -> str:
    """A line break inside a paragraph is a space in Latin text and nothing between two CJK
    characters (Chinese has no spaces between words)."""
    if _SOFT_BREAK not in text:
        return text
    out: list[str] = []
    for i, ch in enumerate(text):
        if ch != _SOFT_BREAK:
            out.append(ch)
            continue
        before = text[i - 1] if i else " "
        after = text[i + 1] if i + 1 < len(text) else " "
        out.append("" if char_width(before) == 2 and char_width(after) == 2 else " ")
    return "".join(out)


class TextRenderer:
    """Markdown to readable plain text, wrapped to `width` columns; links become numbered
    footnotes, counted across every render() of one renderer (one per article)."""

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
        # One marker width for the whole list, so that items 9 and 10 align.
        count = sum(1 for t in tokens[start:end] if t.type == "list_item_open"
                    and t.level == tokens[start].level + 1)
        marker_width = len(f"{number + count - 1}. ") if ordered else 2
        items: list[str] = []
        i = start + 1
        while i < end:
            if tokens[i].type == "list_item_open":
                close = _matching(tokens, i)
                marker = f"{number}. ".ljust(marker_width) if ordered else "- "
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
        for tok in tokens:
            if tok.type == "tr_open":
                rows.append([])
            elif tok.type == "inline" and rows:
                rows[-1].append(self._inline(tok))
        return "\n".join(wrap(" | ".join(r), self.width, indent, indent + "  ") for r in rows)

    def _inline(self, tok: Token) -> str:
        parts: list[str] = []
        href: str | None = None
        for child in tok.children or []:
            if child.type in ("text", "code_inline"):
                parts.append(child.content)
            elif child.type == "softbreak":
                parts.append(_SOFT_BREAK)
            elif child.type == "hardbreak":
                parts.append("\n")
            elif child.type == "link_open":
                href = str(child.attrs.get("href", ""))
            elif child.type == "link_close" and href:
                if href.startswith(_SAFE_SCHEMES):
                    parts.append(f" [{self.footnote(href)}]")
                href = None
            elif child.type == "image":
                # The text part cannot show the picture; its alt text says what it shows.
                parts.append(f"[{child.content}]" if child.content else "")
        return _join_soft_breaks("".join(parts))


def _matching(tokens: Sequence[Token], start: int) -> int:
    """Index of the token closing tokens[start] (same nesting level)."""
    level = 0
    for j in range(start, len(tokens)):
        level += tokens[j].nesting
        if level == 0:
            return j
    return len(tokens) - 1
