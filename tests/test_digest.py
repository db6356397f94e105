"""Recurring digests: definitions, the inbox, feeds over loopback HTTP, assembly, the archive."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from newsletter.content.parse import load_issue
from newsletter.digest import (
    DigestDefinition,
    FeedSource,
    FetchError,
    Item,
    assemble,
    collect,
    fetch_url,
    html_to_markdown,
    load_definition,
    load_definitions,
    preview,
    read_item,
)
from newsletter.errors import ContentError
from newsletter.render.markdown import to_html

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "digest"
EXAMPLE = ROOT / "config" / "digests" / "weekly.example.yaml"

UTC = dt.UTC
SINCE = dt.datetime(2026, 11, 9, 8, 0, tzinfo=UTC)
NOW = dt.datetime(2026, 11, 16, 8, 0, tzinfo=UTC)


# --- a loopback HTTP server -------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class FeedServer:
    """http.server on 127.0.0.1:0 in a thread; `routes` maps a path to a handler function."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.release = threading.Event()  # ends deliberate stalls at teardown
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = server.routes.get(self.path)
                try:
                    if route is None:
                        self.send_error(404)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def file(self, path: str, source: Path, content_type: str = "application/xml") -> str:
        body = source.read_bytes()

        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        self.routes[path] = send
        return self.url(path)


@pytest.fixture
def server() -> Iterator[FeedServer]:
    srv = FeedServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(5)


# --- helpers ----------------------------------------------------------------------------------

@pytest.fixture
def weekly(tmp_path: Path) -> DigestDefinition:
    """The fixture definition with its inbox copied to tmp_path (so tests may add files)."""
    shutil.copytree(DATA / "inbox", tmp_path / "inbox")
    return load_definition(DATA / "weekly.yaml", base_dir=tmp_path,
                           archive_root=tmp_path / "var" / "digests")


def write_item(folder: Path, name: str, front: str, body: str = "Body text.") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"---\n{front.strip()}\n---\n\n{body}\n", encoding="utf-8")
    return path


def no_fetch(url: str) -> bytes:
    raise AssertionError(f"unexpected fetch of {url}")


def write_definition(tmp_path: Path, text: str, name: str = "d.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


GOOD = """
title: Weekly Brief
subject: "Weekly Brief No. {number}"
lists: [weekly]
sections: [News, Reports]
inbox: inbox
"""


# --- definitions ------------------------------------------------------------------------------

def test_fixture_definition_loads_with_paths_resolved(weekly: DigestDefinition,
                                                      tmp_path: Path) -> None:
    assert weekly.name == "weekly"
    assert weekly.title == "Weekly Brief"
    assert weekly.lists == ("weekly", "staff")
    assert weekly.sections == ("Macro Outlook", "The Digital Sector", "Digitalising Industry")
    assert weekly.inbox == tmp_path / "inbox"
    assert weekly.archive_dir == tmp_path / "var" / "digests" / "weekly"
    assert weekly.archive_path(3) == tmp_path / "var" / "digests" / "weekly" / "3.md"
    assert weekly.default_section is None
    assert weekly.max_items_per_section == 10
    assert weekly.feeds == ()


def test_example_definition_loads_and_is_ignored_by_load_definitions(tmp_path: Path) -> None:
    defn = load_definition(EXAMPLE)
    assert defn.name == "weekly"
    assert defn.feeds and all(isinstance(f, FeedSource) for f in defn.feeds)
    assert defn.default_section in defn.sections
    assert load_definitions(EXAMPLE.parent) == {}  # *.example.yaml is documentation
    assert load_definitions(tmp_path / "missing") == {}


def test_load_definitions_by_name_defaults_and_duplicates(tmp_path: Path) -> None:
    folder = tmp_path / "digests"
    folder.mkdir()
    write_definition(folder, GOOD, "monthly.yaml")
    write_definition(folder, GOOD.replace("News, Reports", "A, B"), "weekly.yml")
    (folder / "README.txt").write_text("not a definition")
    found = load_definitions(folder)
    assert sorted(found) == ["monthly", "weekly"]
    assert found["monthly"].language == "en"
    assert found["monthly"].archive_dir == Path("var/digests/monthly")
    assert found["weekly"].sections == ("A", "B")
    write_definition(folder, "name: weekly\n" + GOOD, "zz-other.yaml")
    with pytest.raises(ContentError) as exc:
        load_definitions(folder)
    assert exc.value.field == "name" and "zz-other.yaml" in str(exc.value.path)


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    (GOOD + "colour: blue\n", 6, "colour", "unknown field"),
    (GOOD.replace("Weekly Brief No. {number}", "No. {numbr}"), 2, "subject",
     "unknown placeholder {numbr}"),
    (GOOD.replace("Weekly Brief No. {number}", "{date.__class__}"), 2, "subject",
     "unknown placeholder"),
    (GOOD.replace("Weekly Brief No. {number}", "No. {number"), 2, "subject", "invalid pattern"),
    (GOOD.replace("title: Weekly Brief\n", ""), None, "title", "Field required"),
    (GOOD.replace("[weekly]", "[Weekly List]"), 3, "lists", "not a list slug"),
    (GOOD.replace("[News, Reports]", "[News, news]"), 4, "sections", "distinct"),
    (GOOD + "default_section: Sport\n", 6, "default_section", "'Sport' is not one of"),
    (GOOD + "feeds:\n  - url: https://a.example/feed\n  - url: https://b.example/feed\n"
            "    section: Sport\n", 9, "feeds[2].section", "not one of the sections"),
    (GOOD + "feeds:\n  - url: file:///etc/passwd\n", 7, "feeds[1].url", "http"),
    (GOOD + "feeds:\n  - url: https://a.example/feed\n    max_items: 0\n", 8,
     "feeds[1].max_items", "greater than or equal to 1"),
    (GOOD.replace("inbox: inbox\n", ""), None, "inbox", "needs an inbox"),
    (GOOD + "sections: [oops\n", 7, None, "invalid YAML"),
])
def test_definition_errors_name_file_line_and_field(
    tmp_path: Path, text: str, line: int | None, field: str | None, message: str,
) -> None:
    path = write_definition(tmp_path, text)
    with pytest.raises(ContentError) as exc:
        load_definition(path)
    err = exc.value
    assert err.path == str(path)
    assert message in err.message
    assert err.field == field
    if line is not None:
        assert err.line == line
    assert str(path) in str(err)


# --- the inbox --------------------------------------------------------------------------------

def test_inbox_assembles_three_items_in_two_sections(weekly: DigestDefinition) -> None:
    result = assemble(weekly, number=8, since=SINCE, now=NOW, fetch=no_fetch)
    issue = result.issue
    assert issue is not None and not result.empty
    assert [s.title for s in issue.sections] == ["Macro Outlook", "The Digital Sector"]
    macro, digital = issue.sections
    # newest first: 02-ai (12 Nov 08:30 UTC) before 01-trade (10 Nov)
    assert [a.title for a in macro.articles] == [
        "Productivity gains from AI remain uneven",
        "Digital services drive a third of trade growth",
    ]
    ai, trade = macro.articles
    assert str(ai.link) == "https://example.org/reports/ai-productivity-2026"
    assert ai.source == "Larchmont Institute working paper 41"  # the body's Source: line
    assert trade.source == "Larchmont Institute, Global Digital Trade Monitor 2026"
    assert "- broadband costs;" in trade.body
    (centres,) = digital.articles
    assert centres.title == "Data-centre power: *three* scenarios [to 2035] & beyond #1"
    assert "### Three paths" in centres.body

    assert [i.origin.rsplit("/", 1)[1] for i in result.items] == [
        "02-ai.md", "01-trade.md", "03-datacentres.md"]
    assert all(i.published.tzinfo is not None for i in result.items)
    assert result.items[0].published == dt.datetime(2026, 11, 12, 8, 30, tzinfo=UTC)

    reasons = {Path(origin).name: reason for origin, reason in result.skipped}
    assert set(reasons) == {"04-bad-date.md", "05-old.md"}
    assert "bad item file" in reasons["04-bad-date.md"]
    assert "line 4: date" in reasons["04-bad-date.md"]
    assert "'next Tuesday'" in reasons["04-bad-date.md"]
    assert reasons["05-old.md"].startswith("too old")

    assert issue.number == 8
    assert issue.date == dt.date(2026, 11, 16)
    assert issue.subject == "Weekly Brief No. 8 — 16 November 2026"
    assert issue.preheader == "3 items this week"
    assert issue.slug == "weekly-no-8"
    assert issue.source == "Source: Larchmont Institute"
    assert result.cutoff == NOW


def test_written_issue_round_trips_through_load_issue(weekly: DigestDefinition) -> None:
    result = assemble(weekly, number=8, since=SINCE, now=NOW, fetch=no_fetch)
    assert result.path == weekly.archive_dir / "8.md"
    assert result.path.read_text(encoding="utf-8") == result.markdown
    assert load_issue(result.path) == result.issue
    text = result.markdown or ""
    assert "# Macro Outlook\n" in text
    assert "## [Productivity gains from AI remain uneven](https://example.org/" in text
    assert "number: 8" in text and "date: 2026-11-16" in text
    # no leftover temporary files
    assert sorted(p.name for p in weekly.archive_dir.iterdir()) == ["8.md"]


def test_preview_does_not_write(weekly: DigestDefinition) -> None:
    result = preview(weekly, number=8, since=SINCE, now=NOW, fetch=no_fetch)
    assert result.issue is not None and result.path is None
    assert not weekly.archive_dir.exists()


def test_no_cutoff_takes_everything_up_to_now(weekly: DigestDefinition) -> None:
    items, skipped = collect(weekly, since=None, now=NOW, fetch=no_fetch)
    assert len(items) == 4  # 05-old.md too
    assert [Path(o).name for o, _ in skipped] == ["04-bad-date.md"]


def test_empty_digest_has_no_issue_and_writes_nothing(weekly: DigestDefinition) -> None:
    result = assemble(weekly, number=9, since=NOW, now=NOW + dt.timedelta(days=7),
                      fetch=no_fetch)
    assert result.issue is None and result.empty
    assert result.items == [] and result.path is None and result.markdown is None
    assert not weekly.archive_dir.exists()
    assert any(r.startswith("too old") for _, r in result.skipped)


def test_items_after_now_wait(weekly: DigestDefinition) -> None:
    assert weekly.inbox is not None
    write_item(weekly.inbox, "06-future.md",
               "title: Next week\nsection: Macro Outlook\ndate: 2026-11-20")
    items, skipped = collect(weekly, since=SINCE, now=NOW, fetch=no_fetch)
    assert "06-future.md" not in {Path(i.origin).name for i in items}
    assert any(Path(o).name == "06-future.md" and r.startswith("not yet") for o, r in skipped)


def test_unknown_section_is_reported_or_goes_to_the_default(weekly: DigestDefinition) -> None:
    assert weekly.inbox is not None
    write_item(weekly.inbox, "07-sport.md", "title: A match\nsection: Sport\ndate: 2026-11-13")
    write_item(weekly.inbox, "08-none.md", "title: No section\ndate: 2026-11-13")
    result = assemble(weekly, number=1, since=SINCE, now=NOW, fetch=no_fetch, write=False)
    reasons = {Path(o).name: r for o, r in result.skipped}
    assert "unknown section 'Sport'" in reasons["07-sport.md"]
    assert "no section" in reasons["08-none.md"]

    with_default = dataclasses.replace(weekly, default_section="Digitalising Industry")
    result = assemble(with_default, number=1, since=SINCE, now=NOW, fetch=no_fetch, write=False)
    assert result.issue is not None
    last = result.issue.sections[-1]
    assert last.title == "Digitalising Industry"
    assert sorted(a.title for a in last.articles) == ["A match", "No section"]


@pytest.mark.parametrize(("front", "body", "expected"), [
    ("title: X\nsection: Macro Outlook\ndate: 2026-11-13", "# A section heading",
     "break the issue apart"),
    ("title: X\nsection: Macro Outlook\ndate: 2026-11-13", "Text\n\n```\nunclosed fence",
     "break the issue apart"),
    ("title: X\nsection: Macro Outlook\ndate: 2026-11-13", "Text\n---", "break the issue apart"),
    ("title: X\nsection: Macro Outlook\ndate: 2026-11-13\nlink: ftp://example.org/x",
     "Body", "link"),
    ("title: X\ncolour: red\ndate: 2026-11-13", "Body", "line 3: colour: unknown field"),
    ("section: Macro Outlook\ndate: 2026-11-13", "Body", "title: an item needs a title"),
])
def test_items_that_would_break_the_issue_are_reported(
    weekly: DigestDefinition, front: str, body: str, expected: str,
) -> None:
    assert weekly.inbox is not None
    write_item(weekly.inbox, "09-broken.md", front, body)
    result = assemble(weekly, number=1, since=SINCE, now=NOW, fetch=no_fetch)
    reasons = {Path(o).name: r for o, r in result.skipped}
    assert expected in reasons["09-broken.md"]
    assert result.issue is not None and len(result.items) == 3
    assert load_issue(result.path or Path("-")) == result.issue


def test_awkward_titles_links_and_sources_round_trip(weekly: DigestDefinition) -> None:
    assert weekly.inbox is not None
    write_item(weekly.inbox, "10-awkward.md",
               'title: "`code` <b>not html</b> ![img](x) 1. __under__ ~~strike~~ | pipe \\\\ #"\n'
               "section: Macro Outlook\ndate: 2026-11-14\n"
               "link: https://example.org/a_(b)/c d?q=<x>&r=ü\n"
               "source: |\n  Two\n  lines *kept* as text",
               "Body with a [link](https://example.org/x) and a final line.\n\nSource: ignored")
    result = assemble(weekly, number=2, since=SINCE, now=NOW, fetch=no_fetch)
    assert result.issue is not None and result.path is not None
    assert load_issue(result.path) == result.issue
    article = result.issue.sections[0].articles[0]
    assert article.title.startswith("`code` <b>not html</b> ![img](x) 1. __under__")
    assert article.title.endswith("| pipe \\ #")  # one backslash
    assert article.source == "Two lines *kept* as text"  # the front matter's source wins
    assert article.body.endswith("Source: ignored")  # so this stays part of the body
    assert str(article.link).startswith("https://example.org/a_(b)/c%20d?q=")


def test_read_item_errors_name_the_line(tmp_path: Path) -> None:
    path = write_item(tmp_path, "x.md", "title: X\ndate: 2026-13-45")
    with pytest.raises(ContentError) as exc:
        read_item(path)
    assert (exc.value.path, exc.value.line, exc.value.field) == (str(path), 3, "date")
    (tmp_path / "y.md").write_text("no front matter\n")
    with pytest.raises(ContentError, match="front matter"):
        read_item(tmp_path / "y.md")


def test_missing_inbox_is_reported(weekly: DigestDefinition, tmp_path: Path) -> None:
    defn = dataclasses.replace(weekly, inbox=tmp_path / "nowhere")
    result = assemble(defn, number=1, since=None, now=NOW, fetch=no_fetch)
    assert result.issue is None
    assert result.skipped == [(str(tmp_path / "nowhere"), "the inbox folder does not exist")]


def test_max_items_per_section_keeps_the_newest(weekly: DigestDefinition) -> None:
    defn = dataclasses.replace(weekly, max_items_per_section=1)
    result = assemble(defn, number=1, since=SINCE, now=NOW, fetch=no_fetch, write=False)
    assert result.issue is not None
    assert [a.title for a in result.issue.sections[0].articles] == [
        "Productivity gains from AI remain uneven"]
    assert any("is full" in r and Path(o).name == "01-trade.md" for o, r in result.skipped)


def test_naive_datetimes_are_refused(weekly: DigestDefinition) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        collect(weekly, since=None, now=dt.datetime(2026, 11, 16), fetch=no_fetch)


# --- feeds ------------------------------------------------------------------------------------

def feed_digest(weekly: DigestDefinition, *feeds: FeedSource) -> DigestDefinition:
    return dataclasses.replace(weekly, inbox=None, feeds=feeds)


def test_rss_and_atom_feeds_over_loopback(weekly: DigestDefinition, server: FeedServer) -> None:
    rss = server.file("/rss.xml", DATA / "feeds" / "rss.xml", "application/rss+xml")
    atom = server.file("/atom.xml", DATA / "feeds" / "atom.xml", "application/atom+xml")
    defn = feed_digest(weekly, FeedSource(rss, section="The Digital Sector", max_items=5),
                       FeedSource(atom, section="Digitalising Industry", source="Notes"))
    result = assemble(defn, number=3, since=SINCE, now=NOW)
    issue = result.issue
    assert issue is not None
    assert [s.title for s in issue.sections] == ["The Digital Sector", "Digitalising Industry"]

    (oss,) = issue.sections[0].articles
    assert oss.title == "Open-source maintainers face a funding gap"
    assert str(oss.link) == "https://blog.example.org/posts/open-source-funding"
    assert oss.source == "Example Policy Blog"  # the feed's title
    body = oss.body
    for bad in ("script", "alert", "onclick", "onmouseover", "steal", "javascript", "<img",
                "pixel.gif"):
        assert bad not in body, (bad, body)
    assert "**no regular payment**" in body
    # a relative link, resolved (by feedparser) against the feed's URL; the link text kept
    survey = server.url("/reports/maintainers")
    assert f"[Read the survey]({survey})" in body
    assert "- budget for upkeep\n- recognise maintenance in procurement" in body
    assert "\n\nClick me" in body  # the javascript: link is gone, its text stays
    html = to_html(body)
    assert "<script" not in html and "onclick" not in html
    assert f'<a href="{survey}">Read the survey</a>' in html
    assert "<li>budget for upkeep</li>" in html

    sensors, renovation = issue.sections[1].articles  # newest first
    assert sensors.title == "Sensors & small manufacturers"
    assert sensors.source == renovation.source == "Notes"
    assert "1\\. Fewer stoppages" in sensors.body  # text, not a list it never was
    assert "<ol>" not in to_html(sensors.body)
    assert "*draft*" in renovation.body
    assert "[The draft](https://notes.example.net/model.pdf)" in renovation.body

    assert (rss, "1 entries too old (not after the cutoff)") in result.skipped
    assert result.path is not None and load_issue(result.path) == issue


def test_failing_feed_is_reported_and_the_rest_continue(
    weekly: DigestDefinition, server: FeedServer,
) -> None:
    atom = server.file("/atom.xml", DATA / "feeds" / "atom.xml")
    missing = server.url("/missing.xml")
    garbage = server.file("/garbage", DATA / "weekly.yaml", "text/plain")
    defn = dataclasses.replace(weekly, default_section="Digitalising Industry",
                               feeds=(FeedSource(missing), FeedSource(garbage),
                                      FeedSource(atom)))
    result = assemble(defn, number=1, since=SINCE, now=NOW, write=False)
    assert result.issue is not None
    reasons = dict(result.skipped)
    assert "HTTP 404" in reasons[missing]
    assert "not a readable feed" in reasons[garbage]
    titles = [a.title for s in result.issue.sections for a in s.articles]
    assert "Sensors & small manufacturers" in titles  # feeds without a section: the default
    assert "Productivity gains from AI remain uneven" in titles  # and the inbox too


def test_feed_max_items_and_duplicate_links(weekly: DigestDefinition,
                                            server: FeedServer) -> None:
    atom = server.file("/atom.xml", DATA / "feeds" / "atom.xml")
    again = server.file("/again.xml", DATA / "feeds" / "atom.xml")
    defn = feed_digest(weekly, FeedSource(atom, section="Macro Outlook", max_items=1),
                       FeedSource(again, section="The Digital Sector"))
    items, skipped = collect(defn, since=SINCE, now=NOW)
    assert [(i.title, i.origin) for i in items] == [
        ("Sensors & small manufacturers", atom),
        ("A common data model for renovation", again),
    ]
    assert (atom, "1 entries over the feed's max_items (1)") in skipped
    assert any(o == again and f"duplicate of {atom}" in r for o, r in skipped)


def test_fetch_is_injectable() -> None:
    defn = DigestDefinition(
        name="t", title="T", subject="T {number}", lists=("t",), language="en",
        sections=("News",), archive_dir=Path("unused"),
        feeds=(FeedSource("https://feeds.example/rss", section="News"),),
    )
    rss = (DATA / "feeds" / "rss.xml").read_bytes()
    seen: list[str] = []

    def fetch(url: str) -> bytes:
        seen.append(url)
        return rss

    result = preview(defn, number=1, since=SINCE, now=NOW, fetch=fetch)
    assert seen == ["https://feeds.example/rss"]
    assert result.issue is not None and result.issue.subject == "T 1"
    assert isinstance(result.items[0], Item)


# --- fetch_url ----------------------------------------------------------------------------------

def test_fetch_url_returns_the_body(server: FeedServer) -> None:
    url = server.file("/rss.xml", DATA / "feeds" / "rss.xml")
    assert fetch_url(url) == (DATA / "feeds" / "rss.xml").read_bytes()


def test_fetch_url_times_out(server: FeedServer) -> None:
    def stall(h: BaseHTTPRequestHandler) -> None:
        server.release.wait(1.0)

    server.routes["/slow"] = stall
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"no response within 0\.2 s") as exc:
        fetch_url(server.url("/slow"), timeout=0.2)
    assert time.monotonic() - started < 0.9
    assert exc.value.url == server.url("/slow")


def test_fetch_url_times_out_mid_body(server: FeedServer) -> None:
    def trickle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"<rss>")
        h.wfile.flush()
        server.release.wait(1.0)

    server.routes["/trickle"] = trickle
    with pytest.raises(FetchError, match="read timed out"):
        fetch_url(server.url("/trickle"), timeout=0.2)


def test_fetch_url_refuses_a_declared_oversize_body(server: FeedServer) -> None:
    def big(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10_000_000))
        h.end_headers()
        h.wfile.write(b"x" * 1000)

    server.routes["/big"] = big
    with pytest.raises(FetchError, match="too large: 10000000 bytes"):
        fetch_url(server.url("/big"), max_bytes=100_000)


def test_fetch_url_stops_a_stream_beyond_the_limit(server: FeedServer) -> None:
    sent: list[int] = []

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()  # no Content-Length: HTTP/1.0 body until close
        chunk = b"x" * 65536
        for _ in range(200):  # 13 MB, far beyond the limit
            if server.release.is_set():
                break
            h.wfile.write(chunk)
            sent.append(len(chunk))

    server.routes["/endless"] = endless
    with pytest.raises(FetchError, match="too large: more than 200000 bytes"):
        fetch_url(server.url("/endless"), max_bytes=200_000)


def test_fetch_url_http_errors_and_schemes(server: FeedServer) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(server.url("/nothing"))
    with pytest.raises(FetchError, match="only http"):
        fetch_url("file:///etc/passwd")

    def redirect(to: str) -> Route:
        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", to)
            h.end_headers()
        return send

    server.routes["/to-file"] = redirect("file:///etc/passwd")
    server.routes["/to-ftp"] = redirect("ftp://127.0.0.1/feed.xml")
    server.routes["/to-feed"] = redirect("/rss.xml")
    server.file("/rss.xml", DATA / "feeds" / "rss.xml")
    with pytest.raises(FetchError, match=r"302.*not allowed"):
        fetch_url(server.url("/to-file"))
    with pytest.raises(FetchError, match="refused redirect to ftp:"):
        fetch_url(server.url("/to-ftp"))
    assert fetch_url(server.url("/to-feed")).startswith(b"<?xml")


def test_fetch_url_total_timeout(server: FeedServer) -> None:
    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.end_headers()
        for _ in range(20):
            if server.release.wait(0.05):
                break
            h.wfile.write(b"x")
            h.wfile.flush()

    server.routes["/drip"] = drip
    with pytest.raises(FetchError, match=r"longer than 0\.2 s"):
        fetch_url(server.url("/drip"), timeout=1, total_timeout=0.2)


# --- HTML to Markdown ---------------------------------------------------------------------------

def test_html_to_markdown_keeps_structure_and_escapes_text() -> None:
    md = html_to_markdown(
        '<div><h3>Head</h3><p>a *star* and <i>em</i> <b> spaced </b> [x] &lt;tag&gt;</p>'
        "<ol><li>one<ul><li>nested</li></ul></li><li>two</li></ol>"
        '<p># not a heading<br>- not a list</p><style>p{color:red}</style>'
        '<iframe src="https://evil.example/"></iframe><p><a href="mailto:a@example.org">'
        "mail</a></p></div>",
        base="https://example.org/",
    )
    assert md == (
        "**Head**\n\n"
        "a \\*star\\* and *em* **spaced** \\[x\\] \\<tag\\>\n\n"
        "1. one\n    - nested\n2. two\n\n"
        "\\# not a heading\\\n\\- not a list\n\n"
        "[mail](mailto:a@example.org)"
    )
    html = to_html(md)
    assert "<ol>" in html and "<ul>" in html and "color" not in html and "iframe" not in html
    assert "&lt;tag&gt;" in html
