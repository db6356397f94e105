"""CSV import and export: bad rows reported by line and the rest imported; opt-outs and
suppressed addresses never (re)activated; exact counts at a million rows; encodings,
delimiters and dry runs; the fast address check agrees with email_validator."""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from email_validator import EmailNotValidError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from newsletter.cli import app as cli_app
from newsletter.errors import HeaderInjectionError, ImportFileError, NotFoundError
from newsletter.headers import check_header_text
from newsletter.service import Newsletter
from newsletter.store import imports, suppression
from newsletter.store.imports import (
    ImportReport,
    _slow_email,
    export_members,
    fast_email,
    import_csv,
    normalize_email,
)
from newsletter.store.schema import (
    MembershipStatus,
    SuppressionKind,
    membership_events,
    memberships,
    subscribers,
)
from newsletter.store.sql import NewMember

from .conftest import SAMPLE_CSV, SECRET, database_url, make_settings

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")

ACTIVE, PENDING = MembershipStatus.ACTIVE, MembershipStatus.PENDING
UNSUBSCRIBED, BOUNCED = MembershipStatus.UNSUBSCRIBED, MembershipStatus.BOUNCED


@pytest.fixture
def app(tmp_path: Path) -> Newsletter:
    return Newsletter(make_settings(tmp_path))


def _write(tmp_path: Path, text: str, name: str = "in.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def _members(app: Newsletter, slug: str) -> dict[str, tuple[str, MembershipStatus, dict]]:  # type: ignore[type-arg]
    lid = app.store.get_list(slug).id
    return {m.email: (m.name, m.status, m.attributes) for m in app.store.members(lid)}


def _add(app: Newsletter, lid: int, email: str, name: str = "", status: MembershipStatus = ACTIVE,
         **attrs: str) -> int:
    app.store.upsert_members(lid, [NewMember(email, name, attrs or None)], source="test")
    sid = app.store.find_subscriber(email)
    assert sid is not None
    if status != ACTIVE:
        app.store.set_membership(sid.id, lid, status, source="test")
    return sid.id


def _suppress(app: Newsletter, value: str, kind: SuppressionKind, reason: str = "admin") -> None:
    with app.store.engine.begin() as conn:
        if kind == SuppressionKind.HASH:
            value = suppression.erase_hash(suppression.salt(conn), value)
        suppression.add(conn, value, kind=kind, reason=reason)


def _table_counts(app: Newsletter) -> tuple[int, ...]:
    with app.store.engine.connect() as conn:
        return tuple(conn.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (subscribers, memberships, membership_events))


def _snapshot(app: Newsletter) -> list[tuple[Any, ...]]:
    with app.store.engine.connect() as conn:
        subs = conn.execute(select(subscribers).order_by(subscribers.c.id)).all()
        mems = conn.execute(select(memberships).order_by(memberships.c.list_id,
                                                         memberships.c.subscriber_id)).all()
    return [tuple(r) for r in [*subs, *mems]]


def _report_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.reader(fh))


# --- behaviour, example by example -----------------------------------------------------------

def test_bad_rows_are_reported_by_line_and_the_rest_imports(app: Newsletter, tmp_path: Path) \
        -> None:
    lid = app.store.create_list("news").id
    path = _write(tmp_path, (
        "email,name,sector,lang\n"          # line 1
        "ana@example.com,Ana,telecom,en\n"  # 2 ok
        "not-an-address,Bad,,\n"            # 3 bad
        ",No Email,,\n"                     # 4 bad: empty
        "\n"                                # 5 blank: ignored
        "ben@example.com,\"Ben, Jr.\",finance,en\n"  # 6 ok, quoted comma
        "ANA@Example.com,Ana Again,,\n"     # 7 duplicate of 2 (case-insensitive)
        "\"multi\nline\"@example.com,X,,\n"  # 8-9 bad, spans two lines
        "cai@example.com,Cai,energy,zh,extra\n"  # 10 bad: too many fields
        "dee@bücher.example,Dee,,de\n"      # 11 ok: IDN domain becomes punycode
        "emi@example,Emi,,\n"               # 12 bad: no dot in domain
        "fay@example.com,\"Fay\r\nBcc: x@evil.test\",,\n"  # 13-14 bad: header injection
        "gus@example.com,Gus,,\n"           # 15 ok
        ",  ,,\n"                           # 16 only empty cells: not a row
    ))
    report = import_csv(app.store, lid, path)
    assert (report.imported, report.updated, report.skipped) == (4, 0, 7)
    assert report.summary() == "imported 4, updated 0, skipped 7 (rows read 11)"
    by_line = {r.line: r.reason for r in report.rejected}
    assert sorted(by_line) == [3, 4, 7, 8, 10, 12, 13]
    assert "@-sign" in by_line[3]
    assert by_line[4] == "no email address"
    assert by_line[7] == "duplicate of line 2"
    assert "fields" in by_line[10]
    assert "control character" in by_line[13]
    assert report.skipped_by == {"invalid": 6, "duplicate": 1}
    members = _members(app, "news")
    assert set(members) == {"ana@example.com", "ben@example.com", "dee@xn--bcher-kva.example",
                            "gus@example.com"}
    assert members["ben@example.com"][0] == "Ben, Jr."
    assert members["ana@example.com"][2] == {"sector": "telecom", "lang": "en"}
    with app.store.engine.connect() as conn:
        events = conn.execute(select(membership_events.c.source, membership_events.c.new_status,
                                     membership_events.c.old_status)).all()
    assert sorted(events) == [("import", "active", None)] * 4


def test_bom_semicolons_and_case_insensitive_header(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    path = _write(tmp_path, "\ufeffEmail;Name;Org\r\nwang@example.com;王小明;研究院\r\n"
                  "li@example.com;李雷;\r\n")
    report = import_csv(app.store, lid, path)
    assert report.summary() == "imported 2, updated 0, skipped 0 (rows read 2)"
    assert (report.encoding, report.delimiter) == ("utf-8-sig", ";")
    members = _members(app, "news")
    assert members["wang@example.com"][0] == "王小明"
    assert members["wang@example.com"][2] == {"org": "研究院"}


def test_reimport_updates_and_never_reactivates_opt_outs(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    first = _write(tmp_path, "email,name\na@example.com,A\nb@example.com,B\nc@example.com,C\n")
    assert import_csv(app.store, lid, first).summary() == \
        "imported 3, updated 0, skipped 0 (rows read 3)"
    app.store.set_status("B@EXAMPLE.COM", MembershipStatus.UNSUBSCRIBED, source="cli")
    app.store.set_status("c@example.com", MembershipStatus.BOUNCED, source="bounce")
    again = _write(tmp_path, "email,name\nA@example.com,A. Person\nb@example.com,B\n"
                   "c@example.com,C\nd@example.com,D\n", "again.csv")
    report = import_csv(app.store, lid, again)
    assert report.summary() == "imported 1, updated 1, skipped 2 (rows read 4)"
    assert report.unchanged == 0
    assert {r.line: r.reason for r in report.rejected} == {
        3: "unsubscribed earlier on this list: not reactivated",
        4: "bounced earlier on this list: not reactivated"}
    members = _members(app, "news")
    assert members["b@example.com"][1] == MembershipStatus.UNSUBSCRIBED
    assert members["c@example.com"][1] == MembershipStatus.BOUNCED
    assert members["a@example.com"][0] == "A. Person"
    assert "A@example.com" not in members  # stored once, with its original spelling


def test_unreadable_files_fail_clearly(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    with pytest.raises(ImportFileError, match="no 'email' column"):
        import_csv(app.store, lid, _write(tmp_path, "mail,name\na@example.com,A\n"))
    with pytest.raises(ImportFileError, match="empty"):
        import_csv(app.store, lid, _write(tmp_path, ""))
    with pytest.raises(ImportFileError, match="No such file"):
        import_csv(app.store, lid, tmp_path / "missing.csv")
    # Latin-1 from an old spreadsheet: neither UTF-8 nor plausible GB18030.
    latin = _write(tmp_path, "email,name\na@example.com,Renée Müller\n", "latin.csv",
                   encoding="cp1252")
    with pytest.raises(ImportFileError, match=r"latin\.csv: cannot tell.*--encoding"):
        import_csv(app.store, lid, latin)
    report = import_csv(app.store, lid, latin, encoding="cp1252")
    assert report.imported == 1 and _members(app, "news")["a@example.com"][0] == "Renée Müller"
    with pytest.raises(ImportFileError, match="unknown text encoding"):
        import_csv(app.store, lid, latin, encoding="no-such-codec")
    with pytest.raises(ImportFileError, match="delimiter"):
        import_csv(app.store, lid, latin, encoding="cp1252", delimiter="|")
    with pytest.raises(ImportFileError, match="overwrite"):
        import_csv(app.store, lid, latin, encoding="cp1252", report_path=latin)
    with pytest.raises(NotFoundError):
        import_csv(app.store, 999, latin)


def test_sample_csv_imports_cleanly(app: Newsletter) -> None:
    lid = app.store.create_list("sample").id
    report = import_csv(app.store, lid, SAMPLE_CSV)
    assert report.skipped == 0 and report.imported >= 20
    assert report.rows_read == report.imported


CHINESE = ("email,name,org\nwang@example.com,王小明,中国社会科学院\n"
           "li@example.com,李雷，韩梅梅,研究所\n")


@pytest.mark.parametrize(("encoding", "detected"), [
    ("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gb18030", "gb18030"),
    ("gbk", "gb18030"), ("utf-16", "utf-16"),
])
def test_encodings_are_detected(app: Newsletter, tmp_path: Path, encoding: str,
                                detected: str) -> None:
    lid = app.store.create_list("news").id
    # Plenty of ASCII rows first: detection looks at the first block with non-ASCII bytes.
    text = CHINESE.replace("\n", "\n" + "".join(f"a{i}@example.org,A,\n" for i in range(3000)), 1)
    report = import_csv(app.store, lid, _write(tmp_path, text, encoding=encoding))
    assert report.encoding == detected
    assert report.summary() == "imported 3002, updated 0, skipped 0 (rows read 3002)"
    members = _members(app, "news")
    assert members["wang@example.com"][0] == "王小明"
    assert members["li@example.com"] == ("李雷，韩梅梅", ACTIVE, {"org": "研究所"})


@pytest.mark.sqlite_only(reason="no database involved")
def test_encoding_detection_looks_past_ascii_and_to_the_last_byte() -> None:
    ascii_rows = b"email,name\n" + b"someone@example.com,Some One\n" * 60_000  # > 1 MiB
    for tail, want in [("li@example.com,李雷\n", "gb18030"), ("li@example.com,李雷", "gb18030"),
                       ("li@example.com,Lí Léi", "utf-8"), ("", "utf-8")]:
        enc = "gb18030" if want == "gb18030" else "utf-8"
        for data in (ascii_rows + tail.encode(enc), tail.encode(enc)):
            fh = io.BytesIO(data)
            assert imports.detect_encoding(fh, "x.csv") == want, (tail, len(data))
            assert fh.tell() == 0
    with pytest.raises(ImportFileError, match=r"x\.csv: .*--encoding"):
        imports.detect_encoding(io.BytesIO(ascii_rows + "Zoë,Ørsted\n".encode("cp1252")), "x.csv")


def test_an_encoding_can_be_given(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    path = _write(tmp_path, CHINESE, encoding="gbk")
    report = import_csv(app.store, lid, path, encoding="gbk")
    assert (report.encoding, report.imported) == ("gbk", 2)
    assert _members(app, "news")["wang@example.com"][2] == {"org": "中国社会科学院"}


@pytest.mark.parametrize(("delimiter", "given"), [
    (";", None), ("\t", None), (",", None), (";", ";"), ("\t", "\t"),
])
def test_delimiters_are_sniffed_or_given(app: Newsletter, tmp_path: Path, delimiter: str,
                                         given: str | None) -> None:
    lid = app.store.create_list("news").id
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter)
    writer.writerows([["email", "name", "org"], ["ana@example.com", "Doe, Ana; \"A\"", "x\ty"],
                      ["ben@example.com", "Ben", ""], ["bad", "X", ""]])
    report = import_csv(app.store, lid, _write(tmp_path, buf.getvalue()), delimiter=given)
    assert report.delimiter == delimiter
    assert report.summary() == "imported 2, updated 0, skipped 1 (rows read 3)"
    assert _members(app, "news")["ana@example.com"] == ("Doe, Ana; \"A\"", ACTIVE,
                                                        {"org": "x\ty"})


def test_undecodable_rows_are_rejected_by_line_and_the_rest_imports(
        app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    good = "".join(f"u{i}@example.com,名字{i}\n" for i in range(30)).encode()
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"email,name\n" + good + b"bad@example.com,Ren\xe9e\n"
                     b"\xff\xfe@x.org,X\nU0@example.com,again\n")
    report = import_csv(app.store, lid, path)  # detected: UTF-8 with two broken rows
    assert report.encoding == "utf-8"
    assert report.summary() == "imported 30, updated 0, skipped 3 (rows read 33)"
    assert [(r.line, r.reason, r.email) for r in report.rejected] == [
        (32, "bytes that are not valid utf-8 text", "bad@example.com"),
        (33, "bytes that are not valid utf-8 text", "\\xff\\xfe@x.org"),
        (34, "duplicate of line 2", "U0@example.com")]
    assert "bad@example.com" not in _members(app, "news")
    # The same in GB18030, chosen: a byte sequence GB18030 does not have.
    lid2 = app.store.create_list("zh").id
    gb = tmp_path / "gb.csv"
    gb.write_bytes("email,name\na@example.com,王\n".encode("gb18030") + b"b@example.com,\x81\n"
                   + "c@example.com,李\n".encode("gb18030"))
    report = import_csv(app.store, lid2, gb, encoding="gb18030")
    assert report.summary() == "imported 2, updated 0, skipped 1 (rows read 3)"
    assert report.rejected[0].line == 3 and "gb18030" in report.rejected[0].reason


def test_dry_run_changes_nothing_and_counts_the_same(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    other = app.store.create_list("other").id
    _add(app, lid, "kept@example.com", "Kept", org="old")
    _add(app, lid, "gone@example.com", "Gone", UNSUBSCRIBED)
    _add(app, other, "elsewhere@example.com", "Else")
    _suppress(app, "blocked@example.com", SuppressionKind.ADDRESS)
    path = _write(tmp_path, "email,name,org\nkept@example.com,,new\ngone@example.com,G,\n"
                  "elsewhere@example.com,E,\nblocked@example.com,B,\nnew@example.com,N,\n"
                  "new@example.com,N2,\nbad,X,\n")
    before = _snapshot(app)
    dry = import_csv(app.store, lid, path, dry_run=True, report_path=tmp_path / "dry.csv")
    assert _snapshot(app) == before
    real = import_csv(app.store, lid, path, report_path=tmp_path / "real.csv")
    assert dry.dry_run and not real.dry_run
    for report in (dry, real):
        assert report.summary() == "imported 2, updated 1, skipped 4 (rows read 7)"
        assert report.skipped_by == {"opted_out": 1, "suppressed": 1, "duplicate": 1,
                                     "invalid": 1}
    assert (dry.rejected, dry.unchanged) == (real.rejected, real.unchanged)
    assert _report_rows(tmp_path / "dry.csv") == _report_rows(tmp_path / "real.csv")
    assert _snapshot(app) != before
    members = _members(app, "news")
    assert members["kept@example.com"] == ("Kept", ACTIVE, {"org": "new"})
    assert members["elsewhere@example.com"] == ("E", ACTIVE, {})


def test_opt_outs_and_suppressions_are_never_activated(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    ids = {e: _add(app, lid, e, "Old", s) for e, s in [
        ("unsub@example.com", UNSUBSCRIBED), ("bounced@example.com", BOUNCED),
        ("pending@example.com", PENDING), ("active@example.com", ACTIVE)]}
    _suppress(app, "hard@example.com", SuppressionKind.ADDRESS, "hard-bounce")
    _suppress(app, "blocked.example", SuppressionKind.DOMAIN)
    _suppress(app, "erased@example.com", SuppressionKind.HASH, "erased")
    path = _write(tmp_path, "email,name\n" + "".join(f"{e},New\n" for e in [
        "Unsub@example.com", "bounced@example.com", "pending@example.com",
        "active@example.com", "HARD@example.com", "x@blocked.example",
        "y@mail.blocked.example", "z@notblocked.example", "ERASED@example.com"]))
    report = import_csv(app.store, lid, path)
    assert report.summary() == "imported 1, updated 2, skipped 6 (rows read 9)"
    assert (report.pending, report.unchanged) == (1, 0)
    assert [(r.line, r.reason) for r in report.rejected] == [
        (2, "unsubscribed earlier on this list: not reactivated"),
        (3, "bounced earlier on this list: not reactivated"),
        (6, "suppressed (hard-bounce)"),
        (7, "domain blocked.example is suppressed"),
        (8, "domain blocked.example is suppressed"),
        (10, "erased on request: may not be added again"),
    ]
    members = _members(app, "news")
    assert {e: m[1] for e, m in members.items()} == {
        "unsub@example.com": UNSUBSCRIBED, "bounced@example.com": BOUNCED,
        "pending@example.com": PENDING,  # pending stays pending: the import is no confirmation
        "active@example.com": ACTIVE, "z@notblocked.example": ACTIVE}
    # Skipped rows change nothing, not even the name; kept ones keep their id.
    assert members["unsub@example.com"][0] == "Old" and members["pending@example.com"][0] == "New"
    assert {e: app.store.find_subscriber(e).id for e in ids} == ids  # type: ignore[union-attr]
    assert app.store.find_subscriber("hard@example.com") is None
    assert app.store.find_subscriber("erased@example.com") is None


def test_existing_subscribers_keep_their_id_and_merge_details(app: Newsletter,
                                                              tmp_path: Path) -> None:
    news = app.store.create_list("news").id
    other = app.store.create_list("other").id
    sid = _add(app, other, "ana@example.com", "Ana", org="acme", tz="Europe/Berlin")
    _add(app, news, "ben@example.com", "Ben", org="b")
    path = _write(tmp_path, "email,name,org,lang\nana@example.com,,acme2,zh\n"
                  "ben@example.com,Ben,b,\n")
    report = import_csv(app.store, news, path)
    assert report.summary() == "imported 1, updated 1, skipped 0 (rows read 2)"
    assert report.unchanged == 1  # ben: same name, same attributes
    ana = app.store.get_subscriber(sid)
    assert (ana.name, ana.attributes) == ("Ana", {"org": "acme2", "tz": "Europe/Berlin",
                                                  "lang": "zh"})
    assert app.store.status_on(sid, other) == ACTIVE and app.store.status_on(sid, news) == ACTIVE
    again = import_csv(app.store, news, path)
    assert (again.imported, again.updated, again.unchanged) == (0, 2, 2)


def test_a_column_named_twice_counts_once(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    path = _write(tmp_path, "Email,org,name,ORG,email,Name\na@example.com,one,A,two,b@x.org,B\n")
    assert import_csv(app.store, lid, path).imported == 1
    assert _members(app, "news") == {"a@example.com": ("A", ACTIVE, {"org": "one"})}


def test_many_rejections_stream_to_the_report_and_few_stay_in_memory(
        app: Newsletter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imports, "CHUNK", 64)  # many chunks: duplicates across them too
    lid = app.store.create_list("news").id
    lines = ["email,name"]
    for i in range(300):
        lines += [f"u{i}@example.com,U{i}", f"bad{i}", f"U{i}@EXAMPLE.com,again"]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    seen: list[int] = []
    report = import_csv(app.store, lid, path, report_path=tmp_path / "rejected.csv",
                        on_progress=seen.append)
    assert report.summary() == "imported 300, updated 0, skipped 600 (rows read 900)"
    assert len(report.rejected) == imports.SHOWN
    rows = _report_rows(tmp_path / "rejected.csv")
    assert rows[0] == ["line", "email", "reason"] and len(rows) == 601
    assert [int(r[0]) for r in rows[1:]] == sorted(int(r[0]) for r in rows[1:])
    assert rows[2] == ["4", "U0@example.com", "duplicate of line 2"]
    assert [r.line for r in report.rejected] == [int(r[0]) for r in rows[1:imports.SHOWN + 1]]
    assert seen[-1] == 900 and seen == sorted(seen)


def test_progress_is_reported_every_few_thousand_rows(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    path = _write(tmp_path, "email\n" + "".join(f"u{i}@example.com\n" for i in range(23_456)))
    rows: list[int] = []
    sizes: list[int] = []
    report = import_csv(app.store, lid, path, on_progress=rows.append, on_bytes=sizes.append)
    assert report.imported == 23_456
    assert rows == [5000, 10000, 15000, 20000, 23456]
    assert sizes[-1] == path.stat().st_size and sizes == sorted(sizes)


def test_other_writers_interleave_between_chunks(app: Newsletter, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A send or the web writing meanwhile, and a progress callback that writes (as the API's
    job runner does): nobody fails with 'database is locked', and the other writer gets in
    between chunks all through the import, not only before or after it."""
    monkeypatch.setattr(imports, "CHUNK", 500)
    monkeypatch.setattr(imports, "PROGRESS_EVERY", 500)
    lid = app.store.create_list("news").id
    other = app.store.create_list("other").id
    path = _write(tmp_path, "email,name\n" + "".join(f"u{i}@example.com,U{i}\n"
                                                    for i in range(20_000)))
    done = threading.Event()
    progress_now = [0]
    landed: list[int] = []  # the import's progress when each of the other writer's writes landed
    waits: list[float] = []

    def writer() -> None:
        i = 0
        while not done.is_set():
            t0 = time.perf_counter()
            app.store.upsert_members(other, [NewMember(f"w{i}@example.com")], source="test")
            waits.append(time.perf_counter() - t0)
            landed.append(progress_now[0])
            i += 1

    def progress(rows: int) -> None:
        with app.store.engine.begin() as conn:
            conn.execute(text("INSERT INTO meta (key, value) VALUES (:k, :v) ON CONFLICT (key) "
                              "DO UPDATE SET value = excluded.value"),
                         {"k": "import-progress", "v": str(rows)})
        progress_now[0] = rows

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = import_csv(app.store, lid, path, on_progress=progress)
    finally:
        done.set()
        thread.join()
    assert report.summary() == "imported 20000, updated 0, skipped 0 (rows read 20000)"
    # 40 chunks: writes landed after at least 8 different ones (15-39 seen; a writer shut
    # out until the import ended would show none). How long they waited is reported only.
    between = sorted({n for n in landed if 0 < n < 20_000})
    print(f"\nother writer: {len(waits)} writes, after {len(between)} of 39 chunk boundaries, "
          f"longest wait {max(waits):.3f} s")
    assert len(between) >= 8, between
    with app.store.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM meta WHERE key = 'import-progress'")) \
            .scalar() == "20000"
    assert sum(1 for _ in app.store.members(other)) == len(waits)


def test_two_imports_of_the_same_new_addresses_at_once(app: Newsletter, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two imports racing to add the same new addresses to one list: on PostgreSQL a chunk
    that loses the race for an address is decided again (it now exists); on SQLite the
    write lock orders them. Either way each address is imported once and updated once."""
    monkeypatch.setattr(imports, "CHUNK", 500)
    lid = app.store.create_list("news").id
    body = "email,name\n" + "".join(f"u{i}@example.com,U{i}\n" for i in range(10_000))
    paths = [_write(tmp_path, body, name=f"in{k}.csv") for k in range(2)]
    start = threading.Barrier(2)

    def run(path: Path) -> ImportReport:
        start.wait()
        return import_csv(app.store, lid, path)

    with ThreadPoolExecutor(2) as pool:  # map re-raises an import's error here
        reports = list(pool.map(run, paths))
    assert sum(r.imported for r in reports) == 10_000
    assert sum(r.updated for r in reports) == 10_000
    assert len(_members(app, "news")) == 10_000
    with app.store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM subscribers")).scalar() == 10_000


# --- a million rows --------------------------------------------------------------------------

@dataclass
class _Plan:
    """What a generated file holds, counted as it is written (no set of addresses kept)."""

    rows: int = 0
    imported: int = 0
    updated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


PRE = 2_000  # existing members p0..p1999@pre.example: every 10th unsubscribed, 25th bounced


def _pre_status(j: int) -> MembershipStatus:
    return UNSUBSCRIBED if j % 10 == 0 else BOUNCED if j % 25 == 0 else ACTIVE


def _million_row(i: int) -> tuple[str, str, str, str | None]:
    """Row i: (email, name, org, what it is: None for a new address)."""
    if i % 101 == 7:
        return f"user{i}.example.com", "No At", "x", "invalid"
    if i % 997 == 3:
        return f"user{i}@example.com", f"Bad\r\nName {i}", "x", "invalid"
    if i % 89 == 11 and _million_row(i - 5)[3] is None:
        return f"USER{i - 5}@Example{(i - 5) % 7}.com", "Dup", "y", "duplicate"
    if i % 500 == 3 and i // 500 < PRE:
        return f"p{i // 500}@pre.example", f"Pre {i}", "z", "pre"
    if i % 10_000 == 17:
        return f"s{i}@supp.example", "S", "", "suppressed"
    if i % 20_000 == 19:
        return f"x{i}@blocked.example", "B", "", "suppressed"
    if i % 100_000 == 23:
        return f"erased{i}@example.com", "E", "", "suppressed"
    name = f'Doe, "J" {i}' if i % 13 == 0 else f"王{i}" if i % 17 == 0 else f"User {i}"
    return f"user{i}@example{i % 7}.com", name, f"org{i % 100}", None


def _is_valid_new(i: int) -> bool:
    return _million_row(i)[3] is None


def _write_million(path: Path, n: int) -> _Plan:
    plan = _Plan()
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name", "org"])
        for i in range(n):
            email, name, org, kind = _million_row(i)
            writer.writerow([email, name, org])
            plan.rows += 1
            if kind is None:
                plan.imported += 1
            elif kind == "duplicate":
                plan.skip("duplicate")  # of row i - 5, a new, valid address
            elif kind == "pre":
                status = _pre_status(i // 500)
                if status == ACTIVE:
                    plan.updated += 1
                else:
                    plan.skip("opted_out")
            else:
                plan.skip(kind)
    return plan


def _vm_kib(field_name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


@pytest.mark.slow
@pytest.mark.sqlite_only(reason="the same importer code as the PostgreSQL tests, at a size "
                         "that would add minutes to the suite")
def test_a_million_rows_import_exactly_with_flat_memory(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("big").id
    for start in range(0, PRE, 1000):
        app.store.upsert_members(lid, [NewMember(f"p{j}@pre.example", f"P{j}")
                                       for j in range(start, start + 1000)], source="test")
    for j in range(PRE):
        if _pre_status(j) != ACTIVE:
            app.store.set_membership(j + 1, lid, _pre_status(j), source="test")
    for i in range(17, 1_000_000, 10_000):
        _suppress(app, f"s{i}@supp.example", SuppressionKind.ADDRESS)
    _suppress(app, "blocked.example", SuppressionKind.DOMAIN)
    for i in range(23, 1_000_000, 100_000):
        _suppress(app, f"erased{i}@example.com", SuppressionKind.HASH, "erased")
    path = tmp_path / "million.csv"
    plan = _write_million(path, 1_000_000)

    # Peak RSS of the import itself (VmHWM reset just before); ~25 MiB measured, the same as
    # for 50,000 rows. A Python set of the million addresses alone would be ~100 MiB.
    measured = False
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
        measured = _vm_kib("VmHWM") is not None
    rss_before = _vm_kib("VmRSS") or 0
    progress: list[int] = []
    report = import_csv(app.store, lid, path, on_progress=progress.append,
                        report_path=tmp_path / "rejected.csv")
    growth_mib = ((_vm_kib("VmHWM") or 0) - rss_before) / 1024

    assert report.rows_read == plan.rows == 1_000_000
    assert (report.imported, report.updated) == (plan.imported, plan.updated)
    assert report.skipped_by == plan.skipped
    assert report.imported + report.updated + report.skipped == report.rows_read
    assert progress[-1] == 1_000_000 and len(progress) == 201
    if measured:
        assert growth_mib < 64, f"the import's peak RSS grew by {growth_mib:.0f} MiB"
    with (tmp_path / "rejected.csv").open(encoding="utf-8-sig") as fh:
        assert sum(1 for _ in fh) == report.skipped + 1

    # The database holds exactly the expected members: the existing ones first, then the
    # new ones in file order (ids follow the file), compared as two streams.
    expected = itertools.chain(
        ((f"p{j}@pre.example", _pre_status(j).value) for j in range(PRE)),
        ((_million_row(i)[0], "active") for i in range(1_000_000) if _is_valid_new(i)))
    with app.store.engine.connect() as conn:
        stored = conn.execution_options(yield_per=10_000).execute(text(
            "SELECT s.email, m.status FROM memberships m JOIN subscribers s "
            "ON s.id = m.subscriber_id WHERE m.list_id = :lid ORDER BY s.id"), {"lid": lid})
        for n, (want, got) in enumerate(itertools.zip_longest(expected, stored)):
            assert got is not None and tuple(got) == want, (n, want, got)
        events = conn.execute(select(func.count()).where(
            membership_events.c.source == "import")).scalar_one()
    assert events == plan.imported


# --- property tests --------------------------------------------------------------------------

LOCALS = ["ana", "Ana", "bob", "c.d", "e+f", "info", "x" * 65]
NAME_CHARS = "ab ,;\t\"'\n\r王é\x00=?-"


@dataclass
class _Model:
    """The importer's rules, written plainly, one row after another."""

    members: dict[str, tuple[str, str, str, dict[str, str]]]  # key -> email, name, status, attrs
    suppressed: set[str]
    imported: int = 0
    updated: int = 0
    skipped: int = 0
    rows: int = 0

    def feed(self, email: str, name: str, org: str, seen: set[str]) -> None:
        if not (email + name + org).strip():
            return  # not a row
        self.rows += 1
        name, org = name.strip(), org.strip()
        try:
            address = _slow_email(email.strip())
            if name:
                check_header_text(name, "name")
        except (EmailNotValidError, ValueError, HeaderInjectionError):
            self.skipped += 1
            return
        key = address.lower()
        if key in seen:
            self.skipped += 1
            return
        seen.add(key)
        old = self.members.get(key)
        if key in self.suppressed or (old and old[2] in ("unsubscribed", "bounced")):
            self.skipped += 1
            return
        attrs = {"org": org} if org else {}
        if old is None:
            self.imported += 1
            self.members[key] = (address, name, "active", attrs)
        else:
            self.updated += 1
            self.members[key] = (old[0], name or old[1], old[2], {**old[3], **attrs})


@st.composite
def _import_case(draw: st.DrawFn) -> dict[str, Any]:
    address = st.one_of(
        st.builds(lambda local, domain, case: (local + "@" + domain).upper() if case else
                  local + "@" + domain, st.sampled_from(LOCALS),
                  st.sampled_from(["%.example.org", "mail.%.example.org", "bücher-%.example"]),
                  st.booleans()),
        st.sampled_from(["", " ", "no-at-sign", "two@@%.example.org", "sp ace@%.example.org",
                         "пример@%.example.org", "a@localhost", "a@%.example.org.",
                         " ana@%.example.org "]),
    )
    name = st.one_of(st.text(alphabet=NAME_CHARS, max_size=6), st.text(max_size=4))
    org = st.sampled_from(["", "  ", "acme", "王", "x,y", "q\"uote"])
    rows = draw(st.lists(st.tuples(address, name, org), max_size=14))
    pre = draw(st.lists(st.tuples(st.sampled_from(LOCALS[:5]),
                                  st.sampled_from([ACTIVE, PENDING, UNSUBSCRIBED, BOUNCED]),
                                  org), max_size=3, unique_by=lambda t: t[0].lower()))
    return {
        "rows": rows, "pre": pre,
        "suppressed": draw(st.lists(st.sampled_from(LOCALS[:5]), max_size=2)),
        "delimiter": draw(st.sampled_from([",", ";", "\t"])),
        "sniff": draw(st.booleans()),
        "encoding": draw(st.sampled_from(["utf-8", "utf-8-sig", "gb18030"])),
        "newline": draw(st.sampled_from(["\n", "\r\n"])),
        "dry_first": draw(st.booleans()),
    }


def test_the_importer_agrees_with_a_plain_model(app: Newsletter, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                db_backend: str) -> None:
    monkeypatch.setattr(imports, "CHUNK", 3)  # chunk edges everywhere
    counter = itertools.count()

    # Fewer examples on PostgreSQL (each is several round trips): the same code, less time.
    @settings(max_examples=100 if db_backend == "sqlite" else 40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_import_case())
    def check(case: dict[str, Any]) -> None:
        n = next(counter)
        domain = f"d{n}"  # every example its own addresses: subscribers are global
        lid = app.store.create_list(f"l{n}").id
        model = _Model(members={}, suppressed=set())
        for local, status, org in case["pre"]:
            email = f"{local}@{domain}.example.org"
            _add(app, lid, email, "Pre", status, **({"org": org.strip()} if org.strip() else {}))
            model.members[email.lower()] = (email, "Pre", status.value,
                                            {"org": org.strip()} if org.strip() else {})
        for local in case["suppressed"]:
            key = f"{local}@{domain}.example.org".lower()
            if key not in model.suppressed:
                _suppress(app, key, SuppressionKind.ADDRESS)
                model.suppressed.add(key)
        rows = [(e.replace("%", domain), nm, o) for e, nm, o in case["rows"]]
        buf = io.StringIO()
        # csv.writer quotes a field holding '\r' only when '\r' is in the line terminator:
        # with bare '\n' lines, quote everything, or the file itself would be cut in two.
        writer = csv.writer(buf, delimiter=case["delimiter"], lineterminator=case["newline"],
                            quoting=csv.QUOTE_ALL if case["newline"] == "\n" else
                            csv.QUOTE_MINIMAL)
        writer.writerow(["email", "name", "org"])
        writer.writerows(rows)
        path = tmp_path / f"case{n}.csv"
        path.write_bytes(buf.getvalue().encode(case["encoding"]))
        seen: set[str] = set()
        for email, name, org in rows:
            model.feed(email, name, org, seen)

        kwargs: dict[str, Any] = {
            "delimiter": None if case["sniff"] else case["delimiter"],
            "encoding": "gb18030" if case["encoding"] == "gb18030" else None}
        if case["dry_first"]:
            before = _snapshot(app)
            dry = import_csv(app.store, lid, path, dry_run=True, **kwargs)
            assert _snapshot(app) == before
        report = import_csv(app.store, lid, path, **kwargs)
        assert (report.rows_read, report.imported, report.updated, report.skipped) == \
            (model.rows, model.imported, model.updated, model.skipped)
        if case["dry_first"]:
            assert dry.summary() == report.summary() and dry.rejected == report.rejected
        stored = {m.email.lower(): (m.email, m.name, m.status.value, m.attributes)
                  for m in app.store.members(lid)}
        assert stored == model.members

    check()


ATEXT = "abcXYZ0189!#$%&'*+/=?^_`{|}~-."


@st.composite
def _address_like(draw: st.DrawFn) -> str:
    local = draw(st.one_of(
        st.text(alphabet=ATEXT, min_size=1, max_size=70),
        st.sampled_from(["Postmaster", "INFO", "abuse", "x" * 64, "x" * 65, "a..b", ".a", "a."]),
    ))
    labels = draw(st.lists(st.one_of(
        st.text(alphabet="abcXY019-", min_size=1, max_size=8),
        st.sampled_from(["xn--bcher-kva", "xn--zz", "ab--cd", "a" * 63, "a" * 64, "-a", "a-"]),
    ), min_size=0, max_size=4))
    tld = draw(st.sampled_from(["com", "ORG", "io", "x", "c0m", "123", "test", "local",
                                "localhost", "arpa", "onion", "invalid", "example",
                                "a" * 63, "a" * 64]))
    return local + "@" + ".".join([*labels, tld]) + draw(st.sampled_from(["", "", "."]))


def _oracle(raw: str) -> str | None:
    try:
        return _slow_email(raw)
    except (EmailNotValidError, ValueError, HeaderInjectionError):
        return None


@pytest.mark.sqlite_only(reason="no database involved")
@settings(max_examples=1000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_address_like(), st.emails(), st.text(alphabet=ATEXT + "@", max_size=40)))
@example("user@example.com")
@example("Ana.Lopez+news@Mail.Example.ORG")
@example("a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".cc")  # 255 characters: too long
@example("=?utf-8?q?x?=@example.com")
def test_the_fast_address_check_agrees_with_email_validator(raw: str) -> None:
    fast = fast_email(raw)
    if fast is not None:
        assert fast == _oracle(raw)
    assert _safe_normalize(raw) == _oracle(raw.strip())


def _safe_normalize(raw: str) -> str | None:
    try:
        return normalize_email(raw)
    except (EmailNotValidError, ValueError, HeaderInjectionError):
        return None


@pytest.mark.sqlite_only(reason="no database involved")
def test_plain_addresses_take_the_fast_path() -> None:
    for raw, want in [("user@example.com", "user@example.com"),
                      ("Ana.Lopez+news@Mail.Example.ORG", "Ana.Lopez+news@mail.example.org"),
                      ("o'brien@example.co.uk", "o'brien@example.co.uk")]:
        assert fast_email(raw) == want == _oracle(raw)
    for raw in ["info@example.com", "a@b--c.example.com", "a@example.test", "a@bücher.de",
                "a@example", "a@@example.com", "x@xn--bcher-kva.example"]:
        assert fast_email(raw) is None


# --- export ----------------------------------------------------------------------------------

def test_export_streams_members_as_csv_and_jsonl(app: Newsletter, tmp_path: Path) -> None:
    news = app.store.create_list("news").id
    other = app.store.create_list("other").id
    for i in range(7):
        _add(app, news, f"u{i}@example.com", f"U, {i}", PENDING if i == 3 else ACTIVE,
             org=f"o{i}", city="北京")
    _add(app, other, "u1@example.com")
    _add(app, other, "z@example.com", status=UNSUBSCRIBED)
    buf = io.StringIO()
    assert export_members(app.store.engine, buf, list_id=news, batch=2) == 6
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows[0] == ["email", "name", "status", "list", "joined", "attributes"]
    assert [r[0] for r in rows[1:]] == [f"u{i}@example.com" for i in (0, 1, 2, 4, 5, 6)]
    assert rows[1][1:4] == ["U, 0", "active", "news"]
    assert json.loads(rows[1][5]) == {"org": "o0", "city": "北京"}
    buf = io.StringIO()
    n = export_members(app.store.engine, buf, status=None, fmt="jsonl", batch=3)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert n == len(lines) == 9
    assert [(r["email"], r["list"], r["status"]) for r in lines[:3]] == [
        ("u0@example.com", "news", "active"), ("u1@example.com", "news", "active"),
        ("u1@example.com", "other", "active")]
    assert lines[-1]["status"] == "unsubscribed" and lines[0]["attributes"]["city"] == "北京"
    buf = io.StringIO()
    segment = subscribers.c.email.like("u%") & (memberships.c.status == "pending")
    assert export_members(app.store.engine, buf, where=segment, status=None, fmt="jsonl") == 1
    assert json.loads(buf.getvalue())["email"] == "u3@example.com"
    with pytest.raises(ValueError, match="format"):
        export_members(app.store.engine, buf, fmt="xml")  # type: ignore[arg-type]


# --- the command line ------------------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", database_url(tmp_path))
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["lists", "create", "digest"])
    assert result.exit_code == 0, result.output
    return runner


def _cli(runner: CliRunner, *args: str, stdout: bool = False) -> str:
    """What the command printed (stdout and stderr), or only its stdout."""
    result = runner.invoke(cli_app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout if stdout else result.output


def test_cli_import_dry_run_report_and_export(cli_env: CliRunner, tmp_path: Path) -> None:
    path = _write(tmp_path, "email\tname\tcity\nana@example.com\tAna\tParis\nbad\tB\t\n"
                  "ben@example.com\tBen\t\n", "people.tsv")
    out = _cli(cli_env, "subscribers", "import", str(path), "--list", "digest", "--dry-run",
               "--delimiter", "tab")
    assert "imported 2, updated 0, skipped 1 (rows read 3)" in out
    assert "dry run: nothing was written" in out and "line 3: " in out
    report = tmp_path / "people.rejected.csv"
    assert f"rejected rows (line, email, reason): {report}" in out
    assert _report_rows(report)[1][:2] == ["3", "bad"]
    assert "0 members" in _cli(cli_env, "subscribers", "export", "--list", "digest")
    out = _cli(cli_env, "subscribers", "import", str(path), "--list", "digest")
    assert "imported 2, updated 0, skipped 1 (rows read 3)" in out
    out = _cli(cli_env, "subscribers", "import", str(path), "--list", "digest",
               "--report", str(tmp_path / "again.csv"))
    assert "imported 0, updated 2, skipped 1 (rows read 3)" in out
    assert "2 updated with nothing to change" in out
    clean = _write(tmp_path, "email\ncai@example.com\n", "clean.csv")
    report.unlink()
    assert "rows read 1" in _cli(cli_env, "subscribers", "import", str(clean), "--list", "digest")
    assert not (tmp_path / "clean.rejected.csv").exists()  # nothing rejected: no report

    out = _cli(cli_env, "subscribers", "export", "--list", "digest", stdout=True)
    assert out.splitlines()[0] == "email,name,status,list,joined,attributes"
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == [
        "ana@example.com", "ben@example.com", "cai@example.com"]
    _cli(cli_env, "subscribers", "unsubscribe", "ben@example.com")
    target = tmp_path / "all.jsonl"
    out = _cli(cli_env, "subscribers", "export", "--list", "digest", "--all", "--format",
               "jsonl", "--out", str(target))
    assert f"exported 3 memberships of list digest to {target}" in out
    rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [(r["email"], r["status"]) for r in rows] == [
        ("ana@example.com", "active"), ("ben@example.com", "unsubscribed"),
        ("cai@example.com", "active")]
    assert rows[0]["attributes"] == {"city": "Paris"}
    out = _cli(cli_env, "subscribers", "export", "--list", "digest", "--status", "unsubscribed",
               "--format", "jsonl", stdout=True)
    assert [json.loads(line)["email"] for line in out.splitlines()] == ["ben@example.com"]
    bad = cli_env.invoke(cli_app, ["subscribers", "export", "--list", "digest", "--all",
                                   "--status", "active"])
    assert bad.exit_code == 1 and "exclude each other" in str(bad.exception)
