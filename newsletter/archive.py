"""Static archive export: a list's published issues as plain files any web host can serve.

`newsletter archive build --list SLUG --out DIR` writes::

    DIR/index.html               every issue once, newest first
    DIR/NUMBER/index.html        one issue (its key when it has no number): the edition in
                                 the list's language, else its first edition
    DIR/NUMBER/LANG/index.html   the issue's other editions (bilingual issues)
    DIR/feed.atom                Atom feed of the last 20 issues, absolute URLs (--base-url)
    DIR/style.css                the pages' one asset
    DIR/.newsletter-archive.json the manifest: which files are ours

Pages link with relative URLs ending in index.html, so the directory works under any path
and from file://; only the feed needs to know where the site will live.

The core, `build_site`, is a pure function from archive entries to {path: bytes}, apart
from reading the database (`load_entries`) and writing the directory (`write_site`): the
page logic is tested on entries built in memory, editions included.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jinja2
from sqlalchemy import Engine, select

from .content.model import Issue, slugify
from .errors import NewsletterError
from .render.issue import issue_context, labels_for
from .render.templates import render_template
from .store.base import ArchiveEntry, MailingList
from .store.schema import archive
from .web.labels import LANGUAGE_NAMES, labels

if TYPE_CHECKING:
    from .service import Newsletter

MANIFEST = ".newsletter-archive.json"
FEED_SIZE = 20  # as many as the web archive's feed
# Names at the top of the site that an issue's directory must not take.
_RESERVED = {"index.html", "feed.atom", "style.css", MANIFEST}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})*$")


class ArchiveExportError(NewsletterError):
    """The export cannot run as asked: a private list without --include-private, or an
    output directory that holds files which are not ours."""


@dataclass(frozen=True)
class Edition:
    """One language of an issue and where its page goes in the site."""

    entry: ArchiveEntry
    language: str  # lowercased; also the directory of a non-main edition
    file: str      # e.g. "7/index.html", "7/zh/index.html"


@dataclass(frozen=True)
class SiteIssue:
    """An issue with all its editions; the main one (the list's language) first."""

    key: str
    slot: str  # its directory: the number, else the key
    editions: tuple[Edition, ...]

    @property
    def main(self) -> Edition:
        return self.editions[0]

    def edition(self, language: str) -> Edition:
        """The edition in `language`, else the main one: what a neighbour link points at."""
        return next((e for e in self.editions if e.language == language), self.main)


@dataclass(frozen=True)
class Link:
    """What a template needs to link a page: a relative href and the words to show."""

    href: str
    subject: str = ""
    language: str = ""
    name: str = ""
    current: bool = False


@dataclass(frozen=True)
class IndexItem:
    href: str
    subject: str
    title: str
    number: int | None
    date: str
    others: list[Link] = field(default_factory=list)


@dataclass
class WriteReport:
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    out_dir: Path
    issues: int
    pages: int
    write: WriteReport


# --- grouping --------------------------------------------------------------------------------

def _language(code: str) -> str:
    code = code.strip().lower().replace("_", "-")
    # Languages come from validated issues; anything else still gets a usable directory name.
    return code if _LANGUAGE.match(code) else slugify(code)


def group_issues(entries: Iterable[ArchiveEntry], *, list_language: str) -> list[SiteIssue]:
    """Entries sharing an issue key are editions of one issue. Issues oldest first.

    The main edition is the one in the list's language (or its primary subtag), else the
    first published, as the web archive chooses.
    """
    by_key: dict[str, list[ArchiveEntry]] = {}
    for e in sorted(entries, key=lambda e: e.id):
        by_key.setdefault(e.issue_key, []).append(e)
    want = _language(list_language)
    grouped: list[tuple[str, list[ArchiveEntry]]] = []
    for key, rows in by_key.items():
        seen: dict[str, ArchiveEntry] = {}
        for r in rows:  # one edition per language: the first published wins
            seen.setdefault(_language(r.language), r)
        main = seen.get(want) or next(
            (r for lang, r in seen.items() if lang.split("-")[0] == want.split("-")[0]),
            next(iter(seen.values())))
        grouped.append((key, [main, *(r for r in seen.values() if r is not main)]))
    grouped.sort(key=lambda g: (g[1][0].published_at, g[1][0].id))

    # The newest issue with a number gets the bare number, as on the web; the others fall
    # back to their key, so no page overwrites another.
    slots: dict[str, str] = {}
    taken: set[str] = set()
    for key, rows in reversed(grouped):
        number = rows[0].number
        candidates = [str(number)] if number is not None else []
        candidates += [key, slugify(key)]
        numbered = (f"{slugify(key)}-{rows[0].id}-{n}" for n in itertools.count())
        slot = next(c for c in itertools.chain(candidates, numbered)
                    if _SAFE_NAME.match(c) and c not in _RESERVED and c not in taken)
        taken.add(slot)
        slots[key] = slot
    issues = []
    for key, rows in grouped:
        slot = slots[key]
        editions = [Edition(rows[0], _language(rows[0].language), f"{slot}/index.html")]
        editions += [Edition(r, _language(r.language), f"{slot}/{_language(r.language)}/index.html")
                     for r in rows[1:]]
        issues.append(SiteIssue(key, slot, tuple(editions)))
    return issues


# --- rendering -------------------------------------------------------------------------------

def _rel(from_file: str, to_file: str) -> str:
    """A link from one page of the site to another, relative to the first one's folder."""
    return posixpath.relpath(to_file, posixpath.dirname(from_file) or ".")


def _root(from_file: str) -> str:
    """The prefix that leads from a page back to the top of the site ('' or '../...')."""
    depth = from_file.count("/")
    return "../" * depth


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, LANGUAGE_NAMES.get(code.split("-")[0], code))


def _iso(value: dt.datetime) -> str:
    return value.isoformat()


def normalise_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ArchiveExportError(f"--base-url {url!r}: give an absolute http(s) URL, e.g. "
                                 "https://example.org/archive/")
    return url.strip().rstrip("/") + "/"


def build_site(
    entries: Sequence[ArchiveEntry], mlist: MailingList, /, *, env: jinja2.Environment,
    base_url: str, site_base_url: str, site_name: str = "", postal_address: str = "",
    subscribe_url: str = "",
) -> dict[str, bytes]:
    """Every file of the static site, by its path relative to the site's top.

    `base_url` is the newsletter server's (the feed template's default needs it);
    `site_base_url` is where the site will be served, for the feed's absolute URLs.
    Nothing about subscribers reaches these pages: they are rendered from the issues'
    own JSON, without the email's per-recipient slots, and without read counts.
    """
    issues = group_issues(entries, list_language=mlist.language)
    contexts: dict[int, dict[str, Any]] = {}

    def context(entry: ArchiveEntry) -> dict[str, Any]:
        if entry.id not in contexts:
            contexts[entry.id] = issue_context(Issue.model_validate_json(entry.issue_json))
        return contexts[entry.id]

    common = {"site_name": site_name, "postal_address": postal_address, "mlist": mlist,
              "subscribe_url": subscribe_url}
    files: dict[str, bytes] = {"style.css": render_template(env, "web/style.css").encode()}

    for n, item in enumerate(issues):
        older = issues[n - 1] if n > 0 else None
        newer = issues[n + 1] if n + 1 < len(issues) else None
        for ed in item.editions:
            here = ed.file
            links = [Link(_rel(here, other.file), language=other.language,
                          name=language_name(other.language), current=other is ed)
                     for other in item.editions]

            def neighbour(issue: SiteIssue | None, here: str = here,
                          lang: str = ed.language) -> Link | None:
                if issue is None:
                    return None
                target = issue.edition(lang)
                return Link(_rel(here, target.file), subject=target.entry.subject)

            lang = ed.entry.language
            html = render_template(
                env, "web/static_issue.html.j2", **common, **context(ed.entry),
                lang=lang, t=labels(lang), root=_root(here), home_url=_root(here) + "index.html",
                entry=ed.entry, older=neighbour(older), newer=neighbour(newer),
                static_editions=links,
                # The web page's own edition links are absolute; ours are in static_editions.
                editions=(), reader_token="")
            files[here] = html.encode()

    items = []
    for item in reversed(issues):
        main = item.main
        issue = context(main.entry)["issue"]
        items.append(IndexItem(
            href=main.file, subject=main.entry.subject, title=issue.title,
            number=main.entry.number, date=issue.date.isoformat(),
            others=[Link(e.file, language=e.language, name=language_name(e.language))
                    for e in item.editions[1:]]))
    files["index.html"] = render_template(
        env, "web/static_index.html.j2", **common, lang=mlist.language,
        t=labels(mlist.language), labels=labels_for(mlist.language), root="",
        home_url="index.html", issues=items).encode()

    latest = list(reversed(issues))[:FEED_SIZE]
    feed_items = [(i.main.entry, context(i.main.entry)) for i in latest]
    files["feed.atom"] = render_template(
        env, "web/feed.atom.j2", mlist=mlist, items=feed_items, base_url=base_url,
        archive_url=site_base_url, format_iso=_iso, t=labels(mlist.language),
        updated=_iso(latest[0].main.entry.published_at if latest else mlist.created_at),
        # One entry per issue, its main edition: feed readers differ on which of several
        # alternate links they follow, so the other editions are linked from the page.
        entry_hrefs={i.main.entry.id: f"{i.slot}/" for i in latest},
    ).encode()
    return files


# --- the directory ---------------------------------------------------------------------------

def _safe_relative(path: str) -> bool:
    """A path we may write or delete: relative, inside the site, not the manifest."""
    p = PurePosixPath(path)
    return (bool(path) and not p.is_absolute() and ".." not in p.parts and "." not in p.parts
            and "\\" not in path and path != MANIFEST and str(p) == path)


def _write_if_changed(target: Path, data: bytes) -> bool:
    try:
        if target.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside and rename: a web server reading the directory never sees half a page.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _manifest_bytes(owner: str, paths: Iterable[str]) -> bytes:
    doc = {"generator": "newsletter archive build", "list": owner, "files": sorted(paths)}
    return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()


def _read_manifest(out_dir: Path, owner: str) -> set[str]:
    path = out_dir / MANIFEST
    if not path.is_file():
        if any(out_dir.iterdir()):
            raise ArchiveExportError(
                f"{out_dir} is not empty and holds no {MANIFEST}: give an empty or new "
                "directory, so that no file of yours is overwritten")
        return set()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = doc["files"]
        listed = doc["list"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveExportError(f"{path} is damaged ({exc}); remove the directory and "
                                 "build again") from None
    if listed != owner:
        raise ArchiveExportError(f"{out_dir} holds the archive of list {listed!r}, not "
                                 f"{owner!r}; give another directory")
    return {f for f in files if isinstance(f, str) and _safe_relative(f)}


def write_site(out_dir: Path, files: Mapping[str, bytes], *, owner: str) -> WriteReport:
    """Make `out_dir` hold exactly `files` plus what is not ours: changed files are
    rewritten, unchanged ones left alone (their times too), and files a previous build
    wrote that are no longer part of the site removed. Only paths in our manifest are ever
    deleted; a directory that is not empty and has no manifest is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ArchiveExportError(f"{out_dir} is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    before = _read_manifest(out_dir, owner)
    for path in files:
        if not _safe_relative(path):  # pragma: no cover - build_site makes only safe paths
            raise ValueError(f"unsafe path in the site: {path!r}")
    report = WriteReport()
    manifest = out_dir / MANIFEST
    # Record what we are about to write before writing it: a build killed halfway leaves
    # no file of ours that the next build does not know it may remove.
    _write_if_changed(manifest, _manifest_bytes(owner, before | set(files)))
    for path, data in sorted(files.items()):
        if _write_if_changed(out_dir / path, data):
            report.written.append(path)
        else:
            report.unchanged += 1
    for path in sorted(before - set(files)):
        target = out_dir / path
        if target.is_file():
            target.unlink()
            report.removed.append(path)
        parent = target.parent
        while parent != out_dir:  # folders that held only this page go with it
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    _write_if_changed(manifest, _manifest_bytes(owner, files))
    return report


# --- from the database -----------------------------------------------------------------------

def load_entries(engine: Engine, list_id: int) -> list[ArchiveEntry]:
    """Every archive row of a list, every edition of every issue, oldest first.

    Read here rather than through store.archive_entries, which picks one edition per issue
    and stops at a page's worth: the export needs them all.
    """
    with engine.connect() as conn:
        rows = conn.execute(select(archive).where(archive.c.list_id == list_id)
                            .order_by(archive.c.id)).all()
    return [ArchiveEntry(r.id, r.list_id, r.issue_key, r.number, r.subject, r.language,
                         r.issue_json, r.published_at, r.views) for r in rows]


def _subscribe_url(nl: Newsletter, mlist: MailingList) -> str:
    """The list's form on the newsletter server, for public lists; none when the server's
    URL is a loopback default that readers of a published site could not reach."""
    base = nl.settings.base_url
    host = urlsplit(base).hostname or ""
    if not mlist.public or host in ("localhost", "127.0.0.1", "::1"):
        return ""
    return f"{base}/subscribe/{mlist.slug}"


def export_archive(nl: Newsletter, slug: str, out_dir: Path, *, base_url: str | None = None,
                   include_private: bool = False) -> ExportReport:
    """Build the static archive of list `slug` into `out_dir` (see the module docstring)."""
    mlist = nl.store.get_list(slug)
    if not mlist.public and not include_private:
        raise ArchiveExportError(
            f"list {slug!r} is private: its web archive opens only with a subscriber's reader "
            "token, and a static copy would show it to anyone who has the address; pass "
            "--include-private to export it anyway")
    site_base = normalise_base_url(
        base_url or f"{nl.settings.base_url}/archive/{mlist.slug}/")
    entries = load_entries(nl.store.engine, mlist.id)
    files = build_site(
        entries, mlist, env=nl.templates, base_url=nl.settings.base_url,
        site_base_url=site_base, site_name=nl.settings.sender_name or mlist.name,
        postal_address=nl.settings.postal_address, subscribe_url=_subscribe_url(nl, mlist))
    report = write_site(out_dir, files, owner=mlist.slug)
    pages = sum(1 for p in files if p.endswith(".html")) - 1
    return ExportReport(out_dir, len({e.issue_key for e in entries}), pages, report)
