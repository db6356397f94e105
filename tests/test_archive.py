"""The static archive export: issues published by real sends, built to a directory whose
every link resolves from file://, an Atom feed feedparser accepts, idempotent re-runs, the
private-list refusal, and bilingual editions linked to each other."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import feedparser
import html5lib
import pytest
from sqlalchemy import delete, insert
from typer.testing import CliRunner

from newsletter.archive import (
    MANIFEST,
    ArchiveExportError,
    build_site,
    export_archive,
    write_site,
)
from newsletter.cli import app
from newsletter.content.parse import load_issue
from newsletter.render.templates import make_environment
from newsletter.service import Newsletter
from newsletter.store.base import ArchiveEntry, MailingList
from newsletter.store.schema import archive
from newsletter.store.sql import NewMember

from .conftest import SAMPLE_MD, SAMPLE_ZH, SECRET, add_subscribers
from .smtpd import SmtpTestServer

BASE = "https://news.example.org/archive/news/"


def _second_issue(tmp_path: Path) -> Path:
    second = tmp_path / "second.md"
    second.write_text(SAMPLE_MD.read_text(encoding="utf-8")
                      .replace("number: 7", "number: 8").replace("No. 7", "No. 8")
                      .replace("title: ", "title: Later ", 1), encoding="utf-8")
    return second


@pytest.fixture
def published(nl: Newsletter, smtpd: SmtpTestServer, tmp_path: Path) -> Newsletter:
    """List `news` with two subscribers and two issues sent to it over real SMTP."""
    add_subscribers(nl, "news", 2)
    asyncio.run(nl.run(nl.plan_send(SAMPLE_MD, ["news"])))
    asyncio.run(nl.run(nl.plan_send(_second_issue(tmp_path), ["news"])))
    assert len(smtpd.messages) == 4
    return nl


def _parse(page: Path) -> object:
    # strict: any HTML parse error fails the test, not only what a browser would choke on
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(
        page.read_bytes())


def _check_links(site: Path) -> dict[str, list[tuple[str, str]]]:
    """Every page parses; every relative link and asset resolves to a file in the site;
    nothing is loaded from elsewhere. Returns each page's (rel, href) links."""
    found: dict[str, list[tuple[str, str]]] = {}
    top = site.resolve()
    for page in sorted(site.rglob("*.html")):
        doc = _parse(page)
        ids = {el.get("id") for el in doc.iter() if el.get("id")}  # type: ignore[attr-defined]
        links = []
        for el in doc.iter():  # type: ignore[attr-defined]
            for attr in ("href", "src"):
                url = el.get(attr)
                if url is None:
                    continue
                parts = urlsplit(url)
                if parts.scheme or parts.netloc:
                    # Links out are fine (articles' sources, the subscribe form); assets not.
                    assert el.tag == "a", (page, el.tag, url)
                    assert parts.scheme == "https"
                    continue
                links.append((el.get("rel") or "", url))
                if not parts.path:
                    assert parts.fragment in ids, (page, url)
                    continue
                # file:// serves no index.html for a folder: every link names a file.
                assert not parts.path.startswith("/") and not parts.path.endswith("/"), url
                target = (page.parent / unquote(parts.path)).resolve()
                assert target.is_file() and top in target.parents, (page, url)
        assert doc.find(".//script") is None  # type: ignore[attr-defined]
        found[page.relative_to(site).as_posix()] = links
    return found


def _href(links: list[tuple[str, str]], rel: str) -> str | None:
    return next((h for r, h in links if r == rel), None)


def test_two_sent_issues_build_a_static_site(published: Newsletter, tmp_path: Path) -> None:
    nl = published
    site = tmp_path / "site"
    report = export_archive(nl, "news", site)
    assert report.issues == 2 and report.pages == 2
    files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert files == [MANIFEST, "7/index.html", "8/index.html", "feed.atom", "index.html",
                     "style.css"]
    assert sorted(report.write.written) == sorted(f for f in files if f != MANIFEST)

    links = _check_links(site)
    index = (site / "index.html").read_text(encoding="utf-8")
    # Newest first, each with its title, number, date and subject.
    assert index.index('href="8/index.html"') < index.index('href="7/index.html"')
    assert "Later Digital Economy Brief · No. 8 · 2026-11-16" in index
    assert "Digital Economy Brief No. 8 — November 2026" in index
    assert 'href="style.css"' in index and "<style>" not in index  # the CSS is a copied file
    assert (site / "style.css").read_text(encoding="utf-8").startswith(":root")

    # Previous/next point at each other's pages; the pager and header lead back to the index.
    assert _href(links["7/index.html"], "next") == "../8/index.html"
    assert _href(links["7/index.html"], "prev") is None
    assert _href(links["8/index.html"], "prev") == "../7/index.html"
    assert _href(links["8/index.html"], "next") is None
    assert ("", "../index.html") in links["8/index.html"]

    # Nothing about subscribers: no addresses, tokens, slots, read counts or mail links.
    sub = nl.store.find_subscriber("user0@example.com")
    assert sub is not None
    mlist = nl.store.get_list("news")
    secrets = [nl.signer.archive_token(sub.id, mlist.id),
               nl.signer.unsubscribe_token(sub.id, mlist.id),
               nl.signer.preferences_token(sub.id)]
    for path in site.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            for word in ["user0@example.com", "user1@example.com", "?t=", "NLSLOT",
                         "/unsubscribe/", "/preferences/", "View in browser", " reads",
                         *secrets]:
                assert word not in text, (path, word)

    # The feed: valid, absolute URLs under the base, newest first, each pointing at a page.
    feed = feedparser.parse((site / "feed.atom").read_bytes())
    assert not feed.bozo, feed.get("bozo_exception")
    assert feed.feed.link == BASE
    assert [e.link for e in feed.entries] == [BASE + "8/", BASE + "7/"]
    assert feed.entries[0].title == "Digital Economy Brief No. 8 — November 2026"
    assert feed.entries[0].published_parsed >= feed.entries[1].published_parsed
    assert "<h3>" in feed.entries[0].content[0].value
    for e in feed.entries:
        assert (site / e.link.removeprefix(BASE) / "index.html").is_file()


def test_rerun_is_idempotent_and_removes_only_our_pages(
    published: Newsletter, tmp_path: Path,
) -> None:
    nl = published
    site = tmp_path / "site"
    export_archive(nl, "news", site, base_url="https://example.org/brief")
    times = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    (site / "CNAME").write_text("brief.example.org\n", encoding="utf-8")  # the owner's file

    again = export_archive(nl, "news", site, base_url="https://example.org/brief")
    assert again.write.written == [] and again.write.removed == []
    assert again.write.unchanged == 5
    assert {p: p.stat().st_mtime_ns for p in times} == times  # not even rewritten

    # An entry leaves the archive: its page goes, its neighbour loses the link to it.
    with nl.store.engine.begin() as conn:
        conn.execute(delete(archive).where(archive.c.number == 7))
    third = export_archive(nl, "news", site, base_url="https://example.org/brief")
    assert third.write.removed == ["7/index.html"]
    assert sorted(third.write.written) == ["8/index.html", "feed.atom", "index.html"]
    assert not (site / "7").exists()
    assert (site / "CNAME").is_file()
    assert 'rel="prev"' not in (site / "8" / "index.html").read_text(encoding="utf-8")
    manifest = json.loads((site / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["list"] == "news" and "7/index.html" not in manifest["files"]
    feed = feedparser.parse((site / "feed.atom").read_bytes())
    assert [e.link for e in feed.entries] == ["https://example.org/brief/8/"]
    _check_links(site)


def test_directories_that_are_not_ours_are_refused(published: Newsletter,
                                                    tmp_path: Path) -> None:
    nl = published
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.html").write_text("my home page", encoding="utf-8")
    with pytest.raises(ArchiveExportError, match="not empty"):
        export_archive(nl, "news", theirs)
    assert (theirs / "index.html").read_text(encoding="utf-8") == "my home page"

    site = tmp_path / "site"
    export_archive(nl, "news", site)
    nl.store.create_list("other", name="Other")
    with pytest.raises(ArchiveExportError, match="archive of list 'news'"):
        export_archive(nl, "other", site)
    with pytest.raises(ArchiveExportError, match="absolute"):
        export_archive(nl, "news", site, base_url="/relative/")


def test_private_lists_are_refused_unless_asked(nl: Newsletter, tmp_path: Path) -> None:
    mlist = nl.store.create_list("board", name="Board Papers", public=False)
    nl.store.upsert_members(mlist.id, [NewMember("chair@example.com")], source="test")
    asyncio.run(nl.run(nl.plan_send(SAMPLE_MD, ["board"])))
    with pytest.raises(ArchiveExportError, match=r"private.*reader token.*--include-private"):
        export_archive(nl, "board", tmp_path / "board")
    assert not (tmp_path / "board").exists()

    export_archive(nl, "board", tmp_path / "board", include_private=True)
    page = (tmp_path / "board" / "7" / "index.html").read_text(encoding="utf-8")
    assert '<meta name="robots" content="noindex">' in page
    assert "/subscribe/" not in page  # a private list has no form
    _check_links(tmp_path / "board")


def test_cli_archive_build(published: Newsletter, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = published.settings
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    monkeypatch.setenv("NEWSLETTER_BASE_URL", "https://news.example.org")
    runner = CliRunner()
    site = tmp_path / "cli-site"
    args = ["archive", "build", "--list", "news", "--out", str(site)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 issues, 2 pages: wrote 5 files, 0 unchanged, removed 0" in result.output
    result = runner.invoke(app, args)
    assert "wrote 0 files, 5 unchanged, removed 0" in result.output
    feed = feedparser.parse((site / "feed.atom").read_bytes())
    assert feed.entries[0].link == BASE + "8/"


# --- editions ----------------------------------------------------------------------------------

def _edition_entries(list_id: int) -> list[ArchiveEntry]:
    """Issue 7 in English and Chinese (one key), then a later English-only issue 8."""
    en = load_issue(SAMPLE_MD)
    zh = load_issue(SAMPLE_ZH).model_copy(update={"number": 7})
    later = en.model_copy(update={"number": 8, "subject": "Brief No. 8"})
    t0 = dt.datetime(2026, 11, 16, 8, 0, tzinfo=dt.UTC)
    rows = [(en, "brief-7", t0), (zh, "brief-7", t0 + dt.timedelta(seconds=1)),
            (later, "brief-8", t0 + dt.timedelta(days=7))]
    return [ArchiveEntry(i, list_id, key, issue.number, issue.effective_subject,
                         issue.language, issue.model_dump_json(), when, 0)
            for i, (issue, key, when) in enumerate(rows, start=1)]


def _mlist(language: str) -> MailingList:
    return MailingList(1, "news", "News readers", "", dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                       language=language)


def _build(entries: list[ArchiveEntry], language: str, site: Path) -> None:
    files = build_site(entries, _mlist(language), env=make_environment(),
                       base_url="https://news.example.org", site_base_url=BASE,
                       site_name="Digest Desk")
    write_site(site, files, owner="news")


def _assert_editions(site: Path, *, main: str, other: str) -> None:
    links = _check_links(site)
    names = {"en": "English", "zh": "中文"}
    main_page = (site / "7" / "index.html").read_text(encoding="utf-8")
    other_page = (site / "7" / other / "index.html").read_text(encoding="utf-8")
    assert f'<html lang="{main}">' in main_page and f'<html lang="{other}">' in other_page
    # Each edition links the other by hreflang and the language's name, both ways.
    assert (f'<a href="{other}/index.html" hreflang="{other}" lang="{other}" '
            f'rel="alternate">{names[other]}</a>') in main_page
    assert (f'<a href="../index.html" hreflang="{main}" lang="{main}" '
            f'rel="alternate">{names[main]}</a>') in other_page
    assert f'<link rel="alternate" hreflang="{other}" href="{other}/index.html">' in main_page
    # The issue is listed once, in its main edition, with a link to the other.
    index = (site / "index.html").read_text(encoding="utf-8")
    assert index.count('href="7/index.html"') == 1
    assert f'href="7/{other}/index.html" hreflang="{other}"' in index
    # Previous/next stay in the page's language where the neighbour has that edition, else
    # lead to its main one: issue 8 is in English only.
    assert _href(links["7/index.html"], "next") == "../8/index.html"
    assert _href(links[f"7/{other}/index.html"], "next") == "../../8/index.html"
    assert _href(links["8/index.html"], "prev") == ("../7/index.html" if main == "en"
                                                    else "../7/en/index.html")
    feed = feedparser.parse((site / "feed.atom").read_bytes())
    assert not feed.bozo
    assert [e.link for e in feed.entries] == [BASE + "8/", BASE + "7/"]  # the issue once
    assert feed.entries[1].title == ("数字经济简报 第 3 期 — 2026 年 11 月" if main == "zh"
                                     else "Digital Economy Brief No. 7 — November 2026")


def test_editions_of_one_issue_are_pages_linked_both_ways(tmp_path: Path) -> None:
    entries = _edition_entries(1)
    _build(entries, "en", tmp_path / "en")
    _assert_editions(tmp_path / "en", main="en", other="zh")
    # A Chinese list shows the Chinese edition as the issue, English below it.
    _build(entries, "zh", tmp_path / "zh")
    _assert_editions(tmp_path / "zh", main="zh", other="en")
    assert "数字经济简报" in (tmp_path / "zh" / "index.html").read_text(encoding="utf-8")

    # An edition withdrawn from the archive: its page and folder go on the next build.
    _build([e for e in entries if e.language != "zh"], "en", tmp_path / "en")
    assert not (tmp_path / "en" / "7" / "zh").exists()
    assert "hreflang" not in (tmp_path / "en" / "7" / "index.html").read_text(encoding="utf-8")


def test_editions_stored_as_archive_rows(nl: Newsletter, tmp_path: Path) -> None:
    """Two rows of the archive table with one issue key and two languages (the shape of
    migration 0006) are read and built as editions of one issue."""
    add_subscribers(nl, "news", 1)
    mlist = nl.store.get_list("news")
    with nl.store.engine.begin() as conn:
        for e in _edition_entries(mlist.id):
            conn.execute(insert(archive).values(
                list_id=e.list_id, issue_key=e.issue_key, number=e.number, subject=e.subject,
                language=e.language, issue_json=e.issue_json, published_at=e.published_at))
    report = export_archive(nl, "news", tmp_path / "site")
    assert report.issues == 2 and report.pages == 3
    _assert_editions(tmp_path / "site", main="en", other="zh")


def test_pages_sit_at_the_number_else_the_key(tmp_path: Path) -> None:
    """An issue without a number gets its key's folder; when two issues share a number the
    newer one has it, as on the web, and the older keeps its key: no page overwrites another."""
    issue = load_issue(SAMPLE_MD)
    t0 = dt.datetime(2026, 11, 16, 8, 0, tzinfo=dt.UTC)
    rows = [(issue, "first-7", t0), (issue, "again-7", t0 + dt.timedelta(days=1)),
            (issue.model_copy(update={"number": None}), "special-edition",
             t0 + dt.timedelta(days=2))]
    entries = [ArchiveEntry(i, 1, key, it.number, f"subject {i}", "en", it.model_dump_json(),
                            when, 0) for i, (it, key, when) in enumerate(rows, start=1)]
    _build(entries, "en", tmp_path / "site")
    links = _check_links(tmp_path / "site")
    assert sorted(links) == ["7/index.html", "first-7/index.html", "index.html",
                             "special-edition/index.html"]
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert '<a href="7/index.html">subject 2</a>' in index
    assert _href(links["7/index.html"], "prev") == "../first-7/index.html"
    assert _href(links["7/index.html"], "next") == "../special-edition/index.html"
