"""CSV import: bad rows reported by line and the rest imported; opt-outs never reactivated."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.errors import ImportFileError
from newsletter.service import Newsletter
from newsletter.store.imports import import_csv
from newsletter.store.schema import MembershipStatus

from .conftest import SAMPLE_CSV, make_settings


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
    ))
    report = import_csv(app.store, lid, path)
    assert (report.imported, report.updated, report.skipped) == (4, 0, 7)
    assert report.summary() == "imported 4, updated 0, skipped 7"
    by_line = {r.line: r.reason for r in report.rejected}
    assert sorted(by_line) == [3, 4, 7, 8, 10, 12, 13]
    assert "@-sign" in by_line[3]
    assert by_line[4] == "no email address"
    assert by_line[7] == "duplicate of line 2"
    assert "fields" in by_line[10]
    assert "control character" in by_line[13]
    members = _members(app, "news")
    assert set(members) == {"ana@example.com", "ben@example.com", "dee@xn--bcher-kva.example",
                            "gus@example.com"}
    assert members["ben@example.com"][0] == "Ben, Jr."
    assert members["ana@example.com"][2] == {"sector": "telecom", "lang": "en"}


def test_bom_semicolons_and_case_insensitive_header(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    path = _write(tmp_path, "\ufeffEmail;Name;Org\r\nwang@example.com;王小明;研究院\r\n"
                  "li@example.com;李雷;\r\n")
    report = import_csv(app.store, lid, path)
    assert report.summary() == "imported 2, updated 0, skipped 0"
    members = _members(app, "news")
    assert members["wang@example.com"][0] == "王小明"
    assert members["wang@example.com"][2] == {"org": "研究院"}


def test_reimport_updates_and_never_reactivates_opt_outs(app: Newsletter, tmp_path: Path) -> None:
    lid = app.store.create_list("news").id
    first = _write(tmp_path, "email,name\na@example.com,A\nb@example.com,B\nc@example.com,C\n")
    assert import_csv(app.store, lid, first).summary() == "imported 3, updated 0, skipped 0"
    app.store.set_status("B@EXAMPLE.COM", MembershipStatus.UNSUBSCRIBED, source="cli")
    app.store.set_status("c@example.com", MembershipStatus.BOUNCED, source="bounce")
    again = _write(tmp_path, "email,name\nA@example.com,A. Person\nb@example.com,B\n"
                   "c@example.com,C\nd@example.com,D\n", "again.csv")
    report = import_csv(app.store, lid, again)
    assert report.summary() == "imported 1, updated 1, skipped 2"
    assert {r.line for r in report.rejected} == {3, 4}
    assert all("not reactivated" in r.reason for r in report.rejected)
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
    with pytest.raises(ImportFileError, match="encoding"):
        import_csv(app.store, lid, _write(tmp_path, "email,name\na@example.com,王\n",
                                          encoding="gb18030"))
    report = import_csv(app.store, lid, _write(tmp_path, "email,name\na@example.com,王\n",
                                               encoding="gb18030"), encoding="gb18030")
    assert report.imported == 1


def test_sample_csv_imports_cleanly(app: Newsletter) -> None:
    lid = app.store.create_list("sample").id
    report = import_csv(app.store, lid, SAMPLE_CSV)
    assert report.skipped == 0 and report.imported >= 20
