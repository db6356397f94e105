"""Recurring digests assembled from content: an inbox folder of item files and RSS/Atom feeds.

A digest is defined in ``config/digests/NAME.yaml`` (see ``docs/digests.md``). Each run
collects the items published after the previous issue's cutoff and up to ``now``, groups them
into the defined sections, numbers the issue and writes it as an ordinary Markdown issue file
(the format :func:`newsletter.content.parse.load_issue` reads) into the digest's archive, so
editors see exactly what went out and the file can be sent or re-rendered like any other issue.

The scheduler owns the state: it passes the previous cutoff (``since``), the new number and
``now``; it records ``now`` as the next cutoff once the issue went out, and skips (and records)
an empty digest. Nothing here reads settings or globals::

    defn = load_definition(Path("config/digests/weekly.yaml"))
    result = assemble(defn, number=last_number + 1, since=last_cutoff, now=now)
    if result.issue is None: ...          # empty: skip it and record the skip
    for origin, reason in result.skipped: ...   # items (or feeds) left out, and why

Within a section items are ordered newest first; items published at the same instant keep
their collection order (inbox files by name, then feeds in the order defined).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import io
import os
import re
import socket
import string
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any

import feedparser  # type: ignore[import-untyped]
import nh3
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .content.model import Article, HeaderText, Issue, Section
from .content.parse import (  # the reader's own helpers: same lines, same field names
    _field_name,
    _nearest_line,
    _parse_yaml,
    parse_issue,
    split_front_matter,
)
from .errors import ContentError, NewsletterError

__all__ = [
    "Assembly",
    "DigestDefinition",
    "FeedSource",
    "FetchError",
    "Item",
    "Skip",
    "assemble",
    "collect",
    "fetch_url",
    "html_to_markdown",
    "load_definition",
    "load_definitions",
    "preview",
    "read_item",
    "render_issue_markdown",
]

Skip = tuple[str, str]
"""(origin, reason): an item file, feed URL or folder that was left out, and why."""

Fetch = Callable[[str], bytes]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 5_000_000
DEFAULT_TOTAL_TIMEOUT = 60.0
DEFAULT_FEED_MAX_ITEMS = 20
USER_AGENT = "newsletter-digest/0.1 (+self-hosted newsletter publisher)"

_NAME_RE = r"^[a-z0-9][a-z0-9-]*$"  # a digest name becomes part of the issue slug
_LIST_RE = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # as newsletter.store.sql.SLUG_RE
_PATTERN_FIELDS = frozenset({"number", "date", "name", "title", "count"})


class FetchError(NewsletterError):
    """A feed could not be fetched: timeout, too large, HTTP error, refused scheme."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}")


# --- definitions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeedSource:
    """One RSS or Atom feed of a digest."""

    url: str
    section: str | None = None  # None: the digest's default_section
    max_items: int = DEFAULT_FEED_MAX_ITEMS  # newest entries taken per run
    source: str | None = None  # "Source:" line of its items; None: the feed's own title


@dataclass(frozen=True)
class DigestDefinition:
    """A validated digest definition (one ``config/digests/NAME.yaml``)."""

    name: str
    title: str
    subject: str  # str.format pattern: {number} {date} {name} {title} {count}
    lists: tuple[str, ...]
    language: str
    sections: tuple[str, ...]  # in issue order
    archive_dir: Path  # assembled issues are written here as NUMBER.md
    inbox: Path | None = None
    feeds: tuple[FeedSource, ...] = ()
    default_section: str | None = None  # for items with no or an unknown section
    max_items_per_section: int | None = None
    preheader: str = ""  # same pattern fields as subject
    source: str | None = None  # the issue's source/credit line
    path: Path | None = None  # the definition file, for error messages

    def archive_path(self, number: int) -> Path:
        return self.archive_dir / f"{number}.md"


def _check_pattern(value: str) -> str:
    """A subject/preheader pattern: only known fields, no attribute or index access."""
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"invalid pattern: {exc}") from None
    for _text, name, _spec, conversion in parsed:
        if name is None:
            continue
        if name not in _PATTERN_FIELDS or conversion:
            known = ", ".join("{" + f + "}" for f in sorted(_PATTERN_FIELDS))
            raise ValueError(f"unknown placeholder {{{name}}} (use {known})")
    try:
        _format(value, number=1, date=dt.date(2026, 1, 5), name="n", title="t", count=1)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid pattern: {exc}") from None
    return value


def _format(pattern: str, **values: Any) -> str:
    return pattern.format(**values)


class _FeedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    section: str | None = None
    max_items: int = Field(default=DEFAULT_FEED_MAX_ITEMS, ge=1)
    source: str | None = None

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if urllib.parse.urlsplit(value).scheme.lower() not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value


class _DefinitionFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=_NAME_RE, max_length=60)
    title: HeaderText
    subject: str
    lists: list[str] = Field(min_length=1)
    language: str = Field(default="en", pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
    preheader: str = ""
    source: str | None = None
    sections: list[HeaderText] = Field(min_length=1)
    default_section: str | None = None
    inbox: str | None = None
    feeds: list[_FeedFile] = []
    archive: str | None = None
    max_items_per_section: int | None = Field(default=None, ge=1)

    @field_validator("subject", "preheader")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return _check_pattern(value)

    @field_validator("lists")
    @classmethod
    def _slugs(cls, value: list[str]) -> list[str]:
        for slug in value:
            if not re.match(_LIST_RE, slug):
                raise ValueError(f"{slug!r} is not a list slug (a-z, 0-9, '-', '_')")
        return value


def load_definition(
    path: Path, *, base_dir: Path | None = None, archive_root: Path = Path("var/digests"),
) -> DigestDefinition:
    """Read and validate one digest definition.

    Relative ``inbox`` and ``archive`` paths are joined to `base_dir` (default: left relative,
    i.e. to the working directory, like the other settings). Without ``archive`` the archive
    is ``archive_root/NAME``. Raises ContentError naming the file, line and field.
    """
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContentError(f"cannot read the definition: {exc}", path=name) from None
    data, lines = _parse_yaml(text, name, offset=0)
    if not isinstance(data, dict):
        raise ContentError("a digest definition is a mapping of fields", path=name, line=1)

    def fail(message: str, *loc: str | int) -> ContentError:
        return ContentError(message, path=name, line=_nearest_line(lines, loc),
                            field=_field_name(loc))

    try:
        spec = _DefinitionFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise fail(msg, *err["loc"]) from None

    sections = tuple(spec.sections)
    canon = {_key(s): s for s in sections}
    if len(canon) != len(sections):
        raise fail("section titles must be distinct", "sections")

    def section_ref(value: str | None, *loc: str | int) -> str | None:
        if value is None:
            return None
        if _key(value) not in canon:
            raise fail(f"{value!r} is not one of the sections", *loc)
        return canon[_key(value)]

    default = section_ref(spec.default_section, "default_section")
    feeds = tuple(
        FeedSource(url=f.url, section=section_ref(f.section, "feeds", i, "section"),
                   max_items=f.max_items, source=_one_line(f.source) or None)
        for i, f in enumerate(spec.feeds)
    )
    if spec.inbox is None and not feeds:
        raise fail("a digest needs an inbox folder or at least one feed", "inbox")
    digest_name = spec.name or path.stem
    if not re.match(_NAME_RE, digest_name):
        raise fail(f"{digest_name!r} is not a valid name (a-z, 0-9 and '-'); set 'name'", "name")

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return base_dir / p if base_dir is not None and not p.is_absolute() else p

    return DigestDefinition(
        name=digest_name,
        title=spec.title,
        subject=spec.subject,
        lists=tuple(spec.lists),
        language=spec.language,
        sections=sections,
        archive_dir=(resolve(spec.archive) if spec.archive
                     else resolve(str(archive_root / digest_name))),
        inbox=resolve(spec.inbox) if spec.inbox else None,
        feeds=feeds,
        default_section=default,
        max_items_per_section=spec.max_items_per_section,
        preheader=spec.preheader,
        source=_one_line(spec.source) or None,
        path=path,
    )


def load_definitions(
    folder: Path, *, base_dir: Path | None = None, archive_root: Path = Path("var/digests"),
) -> dict[str, DigestDefinition]:
    """Every ``*.yaml``/``*.yml`` definition in `folder` by name (``*.example.yaml`` ignored).

    A missing folder means no digests. The first invalid file raises its ContentError.
    """
    if not folder.is_dir():
        return {}
    found: dict[str, DigestDefinition] = {}
    for path in sorted(folder.iterdir()):
        if (path.suffix.lower() not in (".yaml", ".yml") or path.name.startswith(".")
                or path.stem.lower().endswith(".example") or not path.is_file()):
            continue
        defn = load_definition(path, base_dir=base_dir, archive_root=archive_root)
        if defn.name in found:
            raise ContentError(f"digest name {defn.name!r} is already defined in "
                               f"{found[defn.name].path}", path=str(path), field="name")
        found[defn.name] = defn
    return found


# --- items ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One piece of content for a digest, from an inbox file or a feed entry."""

    title: str
    body_markdown: str
    link: str | None
    source: str | None
    section: str | None  # after collect(): always one of the definition's sections
    published: dt.datetime  # timezone-aware, UTC
    origin: str  # the item file's path, or the feed's URL


def _key(section: str) -> str:
    return " ".join(section.split()).casefold()


def _one_line(value: str | None) -> str:
    return " ".join(value.split()) if value else ""


def _where(exc: ContentError) -> str:
    """The reason of a ContentError without its path (the origin already names the file)."""
    parts = [f"line {exc.line}" if exc.line is not None else "", exc.field or "", exc.message]
    return ": ".join(p for p in parts if p)


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _aware(value: dt.datetime | None, what: str) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")


_ITEM_FIELDS = ("title", "section", "date", "link", "source")


def read_item(path: Path) -> Item:
    """Parse one inbox item file (front matter: title, section, date, link, source; body below).

    ``date`` is an ISO date or date-time; without an offset it is UTC. Raises ContentError.
    """
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ContentError(f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                           path=name) from None
    except OSError as exc:
        raise ContentError(exc.strerror or str(exc), path=name) from None
    front, lines, src, body_start = split_front_matter(text, name, what="an item")
    if not isinstance(front, dict):
        raise ContentError("front matter must be a mapping of fields", path=name, line=2)

    def fail(message: str, key: str) -> ContentError:
        return ContentError(message, path=name, line=lines.get((key,), 2), field=key)

    for key in front:
        if key not in _ITEM_FIELDS:
            raise fail("unknown field (use " + ", ".join(_ITEM_FIELDS) + ")", str(key))
    values: dict[str, str | None] = {}
    for key in _ITEM_FIELDS:
        value = front.get(key)
        if value is not None and not isinstance(value, str | int | float):
            raise fail("must be text", key)
        values[key] = str(value).strip() or None if value is not None else None
    if not values["title"]:
        raise fail("an item needs a title", "title")
    if not values["date"]:
        raise fail("an item needs a date (YYYY-MM-DD or an ISO date-time)", "date")
    try:
        published = _utc(dt.datetime.fromisoformat(values["date"]))
    except ValueError:
        raise fail(f"{values['date']!r} is not an ISO date or date-time", "date") from None
    return Item(
        title=values["title"], body_markdown="\n".join(src[body_start:]).strip("\n"),
        link=values["link"], source=values["source"], section=values["section"],
        published=published, origin=name,
    )


def _read_inbox(inbox: Path) -> tuple[list[Item], list[Skip]]:
    """Items of every ``*.md`` file in the inbox; names starting with '_' or '.' are drafts."""
    if not inbox.is_dir():
        return [], [(str(inbox), "the inbox folder does not exist")]
    items: list[Item] = []
    skipped: list[Skip] = []
    for path in sorted(inbox.iterdir()):
        if path.suffix.lower() not in (".md", ".markdown") or path.name[:1] in ("_", "."):
            continue
        try:
            items.append(read_item(path))
        except ContentError as exc:
            skipped.append((str(path), f"bad item file: {_where(exc)}"))
    return items, skipped


# --- feeds ------------------------------------------------------------------------------------

class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: HTTPMessage, newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise FetchError(req.full_url, f"refused redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(
    url: str, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES,
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
) -> bytes:
    """GET an http(s) URL and return the body.

    `timeout` bounds the connect and every read; `total_timeout` the whole download (a server
    trickling bytes cannot hold a run); a body over `max_bytes` is abandoned. Every failure
    raises FetchError naming the URL.
    """
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise FetchError(url, "only http:// and https:// URLs are fetched")
    request = urllib.request.Request(url, headers={  # noqa: S310 - scheme checked above
        "User-Agent": USER_AGENT,
        "Accept": "application/rss+xml, application/atom+xml, application/xml;q=0.9, "
                  "text/xml;q=0.9, */*;q=0.5",
        "Accept-Encoding": "identity",
    })
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    deadline = time.monotonic() + total_timeout
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(url, f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError | socket.timeout):
            raise FetchError(url, f"timed out after {timeout:g} s") from None
        raise FetchError(url, f"cannot connect: {exc.reason}") from None
    except TimeoutError:
        raise FetchError(url, f"no response within {timeout:g} s") from None
    except (OSError, ValueError) as exc:
        raise FetchError(url, str(exc) or type(exc).__name__) from None
    with response:
        length = response.headers.get("Content-Length")
        if length and length.strip().isdigit() and int(length) > max_bytes:
            raise FetchError(url, f"too large: {int(length)} bytes (limit {max_bytes})")
        buf = io.BytesIO()
        try:
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    break
                buf.write(chunk)
                if buf.tell() > max_bytes:
                    raise FetchError(url, f"too large: more than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(url, f"download took longer than {total_timeout:g} s")
        except TimeoutError:
            raise FetchError(url, f"read timed out after {timeout:g} s") from None
        except OSError as exc:
            raise FetchError(url, f"read failed: {exc}") from None
    return buf.getvalue()


def _entry_time(entry: Mapping[str, Any]) -> dt.datetime | None:
    for key in ("published_parsed", "updated_parsed", "created_parsed"):
        value = entry.get(key)
        if value:
            year, month, day, hour, minute, second = (int(v) for v in value[:6])
            return dt.datetime(year, month, day, hour, minute, min(second, 59), tzinfo=dt.UTC)
    return None


def _entry_body(entry: Mapping[str, Any]) -> str:
    """The entry's summary (else its content), sanitised and turned into Markdown text."""
    detail: Mapping[str, Any] | None = entry.get("summary_detail")
    if not detail or not str(detail.get("value", "")).strip():
        contents = entry.get("content") or []
        detail = contents[0] if contents else None
    if not detail:
        return ""
    value = str(detail.get("value", ""))
    if "html" not in str(detail.get("type", "text/html")):
        paragraphs = re.split(r"\n\s*\n", value)
        value = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    # feedparser already made relative links absolute (xml:base, else the feed's URL) and
    # blanked unsafe ones; what is still relative now is dropped rather than guessed.
    return html_to_markdown(value)


def _entry_title(entry: Mapping[str, Any]) -> str:
    title = str(entry.get("title", ""))
    detail = entry.get("title_detail") or {}
    if "html" in str(detail.get("type", "")):
        title = html.unescape(nh3.clean(title, tags=set()))
    return _one_line(title)


def _read_feed(feed: FeedSource, fetch: Fetch) -> tuple[list[Item], list[Skip]]:
    try:
        data = fetch(feed.url)
    except NewsletterError as exc:
        return [], [(feed.url, f"feed not fetched: {exc}")]
    parsed = feedparser.parse(io.BytesIO(data), response_headers={"content-location": feed.url})
    if parsed.get("bozo") and not parsed.get("entries"):
        problem = parsed.get("bozo_exception") or "no entries"
        return [], [(feed.url, f"not a readable feed: {problem}")]
    label = feed.source or _one_line(parsed.get("feed", {}).get("title")) or None
    items: list[Item] = []
    skipped: list[Skip] = []
    for entry in parsed.get("entries", []):
        title = _entry_title(entry)
        published = _entry_time(entry)
        if not title or published is None:
            what = title or entry.get("link") or entry.get("id") or "an entry"
            skipped.append((feed.url, f"{what!r}: no {'title' if not title else 'date'}"))
            continue
        link = entry.get("link") or None
        items.append(Item(
            title=title, body_markdown=_entry_body(entry), link=link,
            source=label, section=feed.section, published=published, origin=feed.url,
        ))
    return items, skipped


# --- HTML to Markdown -------------------------------------------------------------------------

_KEEP_TAGS = {"p", "div", "br", "a", "ul", "ol", "li", "strong", "b", "em", "i",
              "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre"}
_BLOCK_TAGS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre"}
_ESCAPE = re.compile(r"([\\`*_\[\]<>&#~|])")
_LINE_START = re.compile(r"^([-+=>]|\d{1,9}(?=[.)]))")


def _escape(text: str) -> str:
    return _ESCAPE.sub(r"\\\1", text)


def _escape_line_start(line: str) -> str:
    """Text at the start of a line must not start a list, quote or setext underline."""
    match = _LINE_START.match(line)
    if not match:
        return line
    end = match.end()
    if match.group(1).isdigit():  # "1." -> "1\.": a backslash only escapes punctuation
        return line[:end] + "\\" + line[end:]
    return "\\" + line


def _link_target(url: str) -> str:
    """A Markdown link destination, in parentheses: bare when it can be, else in <...>."""
    url = url.replace(" ", "%20").replace("<", "%3C").replace(">", "%3E").replace("\n", "")
    return f"({url})" if re.fullmatch(r"[^\s()<>\\]+", url) else f"(<{url}>)"


class _ToMarkdown(HTMLParser):
    """Safe HTML (nh3's output) to Markdown: paragraphs, links, lists, emphasis; text else."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, bool]] = []  # (markdown, is a list line)
        self.inline: list[str] = []
        self.open: list[tuple[str, int, str | None]] = []  # inline tag, start, href
        self.lists: list[list[int]] = []  # per open list: [ordered, counter]
        self.marker: str | None = None  # list marker waiting for its item's first text

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("a", "strong", "b", "em", "i"):
            self.open.append((tag, len(self.inline), dict(attrs).get("href")))
        elif tag == "br":
            self.inline.append("\\\n")
        elif tag in ("ul", "ol"):
            self._flush()
            self.lists.append([tag == "ol", 0])
        elif tag == "li":
            self._flush()
            if self.lists:
                self.lists[-1][1] += 1
                ordered, n = self.lists[-1]
                self.marker = f"{n}. " if ordered else "- "
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in ("a", "strong", "b", "em", "i"):
            for k in range(len(self.open) - 1, -1, -1):
                if self.open[k][0] == tag:
                    _tag, start, href = self.open.pop(k)
                    self._wrap(tag, start, href)
                    break
        elif tag in ("ul", "ol"):
            self._flush()
            if self.lists:
                self.lists.pop()
        elif tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._wrap("strong", 0, None)
            self._flush()
        elif tag in _BLOCK_TAGS or tag == "li":
            self._flush()

    def handle_data(self, data: str) -> None:
        self.inline.append(_escape(re.sub(r"\s+", " ", data)))

    def _wrap(self, tag: str, start: int, href: str | None) -> None:
        inner = "".join(self.inline[start:])
        del self.inline[start:]
        text = inner.strip()
        lead = " " if inner[:1].isspace() else ""
        trail = " " if inner[-1:].isspace() else ""
        if tag == "a":
            if href:
                text = f"[{text or _escape(href)}]{_link_target(href)}"
        elif text:
            mark = "**" if tag in ("strong", "b") else "*"
            text = f"{mark}{text}{mark}"
        self.inline.append(lead + text + trail)

    def _flush(self) -> None:
        text = re.sub(r" {2,}", " ", "".join(self.inline)).strip()
        self.inline.clear()
        self.open.clear()
        if not text:
            return
        lines = [_escape_line_start(line.strip()) for line in text.split("\n")]
        if self.lists:
            indent = "    " * (len(self.lists) - 1)
            marker, self.marker = self.marker or "  ", None
            pad = indent + " " * len(marker)
            self.blocks.append((indent + marker + ("\n" + pad).join(lines), True))
        else:
            self.blocks.append(("\n".join(lines), False))

    def markdown(self) -> str:
        self._flush()
        out = ""
        prev_list = False
        for text, is_list in self.blocks:
            if out:
                out += "\n" if (is_list and prev_list) else "\n\n"
            out += text
            prev_list = is_list
        return out


def html_to_markdown(fragment: str, *, base: str | None = None) -> str:
    """Sanitise an HTML fragment with nh3 and turn it into Markdown text.

    Kept: paragraphs, line breaks, http(s)/mailto links as ``[text](url)`` (relative links
    resolved against `base`), lists, bold and italic; headings become bold paragraphs.
    Scripts and styles are dropped with their content; other markup keeps only its text.
    """
    relative: Any = "deny"
    if base and urllib.parse.urlsplit(base).scheme in ("http", "https"):
        relative = ("rewrite_with_base", base)
    try:
        clean = nh3.clean(
            fragment, tags=_KEEP_TAGS, attributes={"a": {"href"}}, link_rel=None,
            url_schemes={"http", "https", "mailto"}, url_relative=relative, strip_comments=True,
        )
    except Exception:  # nh3 raises for a base it cannot parse: sanitise without it
        clean = nh3.clean(fragment, tags=_KEEP_TAGS, attributes={"a": {"href"}}, link_rel=None,
                          url_schemes={"http", "https", "mailto"}, url_relative="deny")
    parser = _ToMarkdown()
    parser.feed(clean)
    parser.close()
    return parser.markdown()


# --- Markdown out -----------------------------------------------------------------------------

_TITLE_ESCAPE = re.compile(r"([\\`*_\[\]<>&#!~|])")


def _escape_title(title: str) -> str:
    return _TITLE_ESCAPE.sub(r"\\\1", title)


def _article_markdown(article: Article) -> str:
    title = _escape_title(article.title)
    head = f"## [{title}]{_link_target(str(article.link))}" if article.link else f"## {title}"
    parts = [head]
    if article.body:
        parts.append(article.body)
    if article.source:
        parts.append(f"Source: {article.source}")
    return "\n\n".join(parts)


def render_issue_markdown(issue: Issue) -> str:
    """The issue as a Markdown file that load_issue reads back into an equal Issue."""
    front = {k: v for k, v in issue.model_dump(exclude={"sections"}).items()
             if v is not None and v != ""}
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000).strip(),
           "---", ""]
    for section in issue.sections:
        out.append(f"# {_escape_title(section.title)}")
        out.append("")
        for article in section.articles:
            out.append(_article_markdown(article))
            out.append("")
    return "\n".join(out)


_SENTINEL = "digest-end-of-item"


def _as_article(item: Item) -> Article:
    """The article `item` becomes, normalised by the issue reader itself.

    The article is written followed by a sentinel article and read back: a body that would
    change the issue's structure ('#'/'##' or setext headings, an unclosed code fence or
    HTML block) or an invalid field raises ContentError.
    """
    try:
        draft = Article(title=_one_line(item.title), body=item.body_markdown.strip("\n"),
                        link=item.link, source=_one_line(item.source) or None)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ContentError(err["msg"].removeprefix("Value error, "),
                           field=_field_name(tuple(err["loc"]))) from None
    text = (f"---\ntitle: t\ndate: 2000-01-01\n---\n\n# s\n\n{_article_markdown(draft)}\n\n"
            f"## {_SENTINEL}\n")
    issue = parse_issue(text, name=item.origin)
    articles = [a for s in issue.sections for a in s.articles]
    if len(issue.sections) != 1 or len(articles) != 2 or articles[1].title != _SENTINEL:
        raise ContentError("the body would break the issue apart: use '###' or smaller "
                           "headings and close every code block", field="body")
    return articles[0]


# --- collecting and assembling ----------------------------------------------------------------

def collect(
    defn: DigestDefinition, *, since: dt.datetime | None, now: dt.datetime,
    fetch: Fetch | None = None,
) -> tuple[list[Item], list[Skip]]:
    """Items of the inbox and the feeds published after `since` (strictly) and up to `now`.

    Items come back normalised (as they will appear in the issue), with their section resolved
    to one of the definition's sections, duplicates (same link) removed, at most ``max_items``
    per feed, in collection order. Everything left out is in the skipped list with a reason:
    a bad item file, a failing feed, an unknown section, too old, dated after `now`...
    """
    _aware(since, "since")
    _aware(now, "now")
    fetch = fetch or fetch_url
    since_utc = _utc(since) if since is not None else None
    now_utc = _utc(now)
    canon = {_key(s): s for s in defn.sections}
    items: list[Item] = []
    skipped: list[Skip] = []
    seen_links: dict[str, str] = {}

    def in_window(item: Item) -> str | None:
        if since_utc is not None and item.published <= since_utc:
            return (f"too old: published {item.published.isoformat()}, "
                    f"cutoff {since_utc.isoformat()}")
        if item.published > now_utc:
            return f"not yet: dated {item.published.isoformat()}, after {now_utc.isoformat()}"
        return None

    def admit(item: Item, what: str) -> Item | None:
        wanted = item.section
        section = canon.get(_key(wanted)) if wanted else None
        if section is None:
            section = defn.default_section
        if section is None:
            reason = (f"unknown section {wanted!r}" if wanted else "no section") + (
                " and the digest has no default_section")
            skipped.append((item.origin, f"{what}{reason}"))
            return None
        try:
            article = _as_article(item)
        except ContentError as exc:
            skipped.append((item.origin, f"{what}bad item: {_where(exc)}"))
            return None
        link = str(article.link) if article.link else None
        if link is not None and link in seen_links:
            skipped.append((item.origin, f"{what}duplicate of {seen_links[link]}"))
            return None
        if link is not None:
            seen_links[link] = item.origin
        return dataclasses.replace(item, title=article.title, body_markdown=article.body,
                                   link=link, source=article.source, section=section)

    if defn.inbox is not None:
        inbox_items, inbox_skipped = _read_inbox(defn.inbox)
        skipped += inbox_skipped
        for item in inbox_items:
            reason = in_window(item)
            if reason:
                skipped.append((item.origin, reason))
            elif (ok := admit(item, "")) is not None:
                items.append(ok)

    for feed in defn.feeds:
        feed_items, feed_skipped = _read_feed(feed, fetch)
        skipped += feed_skipped
        old = later = 0
        fresh: list[Item] = []
        for item in feed_items:
            reason = in_window(item)
            if reason is None:
                fresh.append(item)
            elif reason.startswith("too old"):
                old += 1
            else:
                later += 1
        if old:
            skipped.append((feed.url, f"{old} entries too old (not after the cutoff)"))
        if later:
            skipped.append((feed.url, f"{later} entries dated after now"))
        fresh.sort(key=lambda i: i.published, reverse=True)
        if len(fresh) > feed.max_items:
            skipped.append((feed.url, f"{len(fresh) - feed.max_items} entries over the feed's "
                                      f"max_items ({feed.max_items})"))
            del fresh[feed.max_items:]
        for item in fresh:
            if (ok := admit(item, f"{item.title!r}: ")) is not None:
                items.append(ok)
    return items, skipped


@dataclass
class Assembly:
    """The result of assembling one digest issue."""

    definition: DigestDefinition
    number: int
    cutoff: dt.datetime  # `now`: pass it as `since` for the next issue once this one went out
    issue: Issue | None  # None when the digest is empty
    items: list[Item] = field(default_factory=list)  # in issue order
    skipped: list[Skip] = field(default_factory=list)
    markdown: str | None = None  # the issue file's text (None when empty)
    path: Path | None = None  # where it was written (None in a preview or when empty)

    @property
    def empty(self) -> bool:
        return self.issue is None


def _order(defn: DigestDefinition, items: Iterable[Item],
           skipped: list[Skip]) -> list[tuple[str, list[Item]]]:
    groups: dict[str, list[Item]] = {s: [] for s in defn.sections}
    for item in items:
        groups[item.section or ""].append(item)
    out: list[tuple[str, list[Item]]] = []
    cap = defn.max_items_per_section
    for title, group in groups.items():
        group.sort(key=lambda i: i.published, reverse=True)  # stable: ties keep their order
        if cap is not None and len(group) > cap:
            for item in group[cap:]:
                skipped.append((item.origin, f"{item.title!r}: section {title!r} is full "
                                             f"(max_items_per_section {cap})"))
            del group[cap:]
        if group:
            out.append((title, group))
    return out


def assemble(
    defn: DigestDefinition, *, number: int, since: dt.datetime | None, now: dt.datetime,
    fetch: Fetch | None = None, write: bool = True,
) -> Assembly:
    """Collect, group and number one issue; with `write`, save it as ``archive_dir/NUMBER.md``.

    `number` is the previous issue's number + 1, `since` the previous cutoff (None: no cutoff);
    the issue is dated ``now.date()``. An empty digest gives ``issue=None`` and writes nothing.
    The file is written atomically and replaces an earlier file of the same number (a retried,
    unsent run). The written text is checked to read back as an equal Issue.
    """
    items, skipped = collect(defn, since=since, now=now, fetch=fetch)
    groups = _order(defn, items, skipped)
    result = Assembly(definition=defn, number=number, cutoff=now, issue=None, skipped=skipped)
    if not groups:
        return result
    ordered = [item for _title, group in groups for item in group]
    values = {"number": number, "date": now.date(), "name": defn.name, "title": defn.title,
              "count": len(ordered)}
    where = str(defn.path) if defn.path else f"digest {defn.name}"
    try:
        issue = Issue(
            title=defn.title,
            subject=_format(defn.subject, **values),
            date=now.date(),
            number=number,
            preheader=_format(defn.preheader, **values),
            language=defn.language,
            source=defn.source,
            slug=f"{defn.name}-no-{number}",
            sections=[Section(title=title, articles=[
                Article(title=i.title, body=i.body_markdown, link=i.link, source=i.source)
                for i in group]) for title, group in groups],
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ContentError(err["msg"].removeprefix("Value error, "), path=where,
                           field=_field_name(tuple(err["loc"]))) from None
    text = render_issue_markdown(issue)
    if parse_issue(text, name=where) != issue:  # cannot happen: each article was read back
        raise ContentError("the assembled issue does not read back unchanged", path=where)
    result.issue, result.items, result.markdown = issue, ordered, text
    if write:
        result.path = _write_atomic(defn.archive_path(number), text)
    return result


def preview(
    defn: DigestDefinition, *, number: int, since: dt.datetime | None, now: dt.datetime,
    fetch: Fetch | None = None,
) -> Assembly:
    """Assemble without writing to the archive (the caller renders ``result.issue``)."""
    return assemble(defn, number=number, since=since, now=now, fetch=fetch, write=False)


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
