"""Admin operations through the CLI: lists, subscribers, suppression, privacy, audit log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from newsletter.admin import Admin, cli_actor
from newsletter.cli import app
from newsletter.service import Newsletter
from newsletter.settings import load_settings
from newsletter.store import suppression

from .conftest import SAMPLE_MD, SECRET, database_url
from .smtpd import SmtpTestServer

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, smtpd: SmtpTestServer, monkeypatch: pytest.MonkeyPatch) -> SmtpTestServer:
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", database_url(tmp_path))
    monkeypatch.setenv("NEWSLETTER_SMTP_URL", smtpd.url)
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    monkeypatch.setenv("NEWSLETTER_BASE_URL", "https://news.example.org")
    monkeypatch.setenv("NEWSLETTER_RETRY_WAIT_SECONDS", "0")
    return smtpd


def _run(*args: str, code: int = 0) -> str:
    """The command's output; for a failure, what main() would print (in-process, our
    errors come out as the exception)."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (args, result.output, result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return result.output + str(result.exception)
    return result.output


def _nl() -> Newsletter:
    return Newsletter(load_settings())


def test_list_edit_and_delete_needs_yes_and_reports_what_goes(env: SmtpTestServer) -> None:
    _run("lists", "create", "news", "--zone", "Europe/Berlin")
    _run("subscribers", "add", "ana@example.com", "--list", "news")
    out = _run("lists", "edit", "news", "--name", "The News", "--single-opt-in", "--private",
               "--language", "zh", "--zone", "Asia/Shanghai", "--slug", "thenews")
    assert "thenews (The News): single opt-in, private, language zh, zone Asia/Shanghai" in out
    mlist = _nl().store.get_list("thenews")
    assert (mlist.double_opt_in, mlist.public, mlist.zone) == (False, False, "Asia/Shanghai")
    out = _run("lists", "edit", "thenews", "--zone", "Mars/Olympus", code=1)
    assert "unknown time zone" in out
    out = _run("lists", "delete", "thenews", code=1)
    assert "members 1" in out and "--yes" in out
    assert _nl().store.get_list("thenews")  # still there
    out = _run("lists", "delete", "thenews", "--yes")
    assert "deleted list thenews" in out and "members active 1" in out
    assert "no list" in _run("lists", "show", "thenews", code=1)
    # The subscriber stays (it may be on other lists) and so does the audit trail.
    assert _nl().store.find_subscriber("ana@example.com") is not None
    actions = [e.action for e in Admin(_nl(), "t").audit_entries()]
    assert actions[:3] == ["list.delete", "list.update", "subscriber.add"]


def test_subscriber_edit_move_resubscribe_and_history(env: SmtpTestServer) -> None:
    _run("lists", "create", "a")
    _run("lists", "create", "b")
    _run("subscribers", "add", "Bo@Example.com", "--list", "a", "--name", "Bo",
         "--attr", "sector=telecom", "--language", "zh")
    out = _run("subscribers", "edit", "bo@example.com", "--name", "Bo Li", "--attr", "org=X",
               "--unset", "sector", "--zone", "Asia/Shanghai")
    assert '"org": "X"' in out and "sector" not in out
    d = Admin(_nl(), "t").subscriber("bo@example.com")
    assert (d.name, d.language, d.zone) == ("Bo Li", "zh", "Asia/Shanghai")
    _run("subscribers", "edit", "bo@example.com", "--name", "Evil\r\nBcc: x@y.org", code=1)
    _run("subscribers", "move", "bo@example.com", "--from", "a", "--to", "b")
    assert Admin(_nl(), "t").subscriber("bo@example.com").lists == {"b": "active"}
    _run("subscribers", "unsubscribe", "bo@example.com", "--list", "b")
    # Adding again does not bring back an address that left...
    out = _run("subscribers", "add", "bo@example.com", "--list", "b", code=1)
    assert "not reactivated" in out
    # ... and neither does a resubscribe without the explicit flag.
    assert "explicit" in _run("subscribers", "resubscribe", "bo@example.com", "--list", "b",
                              code=1)
    _run("subscribers", "resubscribe", "bo@example.com", "--list", "b", "--explicit")
    out = _run("subscribers", "show", "bo@example.com")
    assert "b (active)" in out
    history = _run("subscribers", "history", "bo@example.com")
    for source in ("admin", "resubscribe"):
        assert source in history
    assert "removed" in history  # the move off list a is in the history
    entries = Admin(_nl(), "t").audit_entries(action="subscriber.")
    assert {e.action for e in entries} >= {"subscriber.add", "subscriber.edit",
                                          "subscriber.move", "subscriber.unsubscribe",
                                          "subscriber.resubscribe"}
    assert all(e.actor == cli_actor() for e in entries)


def test_unsubscribe_from_everything_suppresses_the_address(env: SmtpTestServer) -> None:
    _run("lists", "create", "a")
    _run("lists", "create", "c")
    _run("subscribers", "add", "cy@example.com", "--list", "a")
    _run("subscribers", "unsubscribe", "cy@example.com")
    assert _nl().store.is_suppressed("cy@example.com")
    out = _run("subscribers", "add", "cy@example.com", "--list", "c", code=1)
    assert "suppressed (unsubscribed)" in out


def test_suppressed_domains_and_addresses_get_nothing(env: SmtpTestServer) -> None:
    nl = _nl()
    mlist = nl.store.create_list("news")
    from newsletter.store.sql import NewMember

    nl.store.upsert_members(mlist.id, [NewMember(e) for e in (
        "ok@example.com", "one@blocked.example", "two@mail.blocked.example",
        "me@notblocked.example", "bad@example.com")], source="test")
    _run("suppression", "add", "blocked.example", "--reason", "complaint")
    _run("suppression", "add", "bad@example.com")
    # A domain is not a prefix match: notblocked.example is another domain.
    assert "blocked.example  domain  complaint" in _run("suppression", "ls", "--kind", "domain")
    _run("send", str(SAMPLE_MD), "--list", "news", "--yes")
    got = sorted(r for m in env.messages for r in m.rcpt_tos)
    assert got == ["me@notblocked.example", "ok@example.com"]
    out = _run("subscribers", "add", "new@blocked.example", "--list", "news", code=1)
    assert "domain blocked.example" in out
    # Lifting works for addresses and domains.
    _run("suppression", "rm", "blocked.example")
    assert not _nl().store.is_suppressed("one@blocked.example")


def test_suppression_import_and_export(env: SmtpTestServer, tmp_path: Path) -> None:
    src = tmp_path / "supp.csv"
    src.write_text("email,reason,note\n"
                   "a@example.com,complaint,via FBL\n"
                   "spam.example,,\n"
                   "not an address,,\n"
                   "b@example.com,nonsense,\n"
                   "a@example.com,admin,dup\n", encoding="utf-8")
    out = _run("suppression", "import", str(src))
    assert "added 2, already suppressed 1, rejected 2" in out
    assert "line 4" in out and "line 5" in out
    dest = tmp_path / "out.jsonl"
    _run("suppression", "export", "--format", "jsonl", "--out", str(dest))
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [(r["value"], r["kind"], r["reason"]) for r in rows] == [
        ("a@example.com", "address", "complaint"), ("spam.example", "domain", "admin")]
    csv_out = _run("suppression", "export")
    assert csv_out.splitlines()[0] == "value,kind,reason,note,created_at"


def test_export_data_and_erase_then_reimport_is_refused(env: SmtpTestServer,
                                                        tmp_path: Path) -> None:
    _run("lists", "create", "news")
    _run("subscribers", "add", "Dee@Example.com", "--list", "news", "--name", "Dee",
         "--attr", "org=Acme")
    _run("send", str(SAMPLE_MD), "--list", "news", "--yes")
    data = json.loads(_run("subscribers", "export-data", "dee@example.com"))
    assert data["subscriber"]["email"] == "Dee@example.com"
    assert data["subscriber"]["attributes"] == {"org": "Acme"}
    assert data["memberships"][0]["list"] == "news"
    assert data["deliveries"][0]["status"] == "sent"
    assert any(a["action"] == "subscriber.add" for a in data["audit"])

    assert "--yes" in _run("subscribers", "erase", "dee@example.com", code=1)
    _run("subscribers", "erase", "dee@example.com", "--yes")
    nl = _nl()
    assert nl.store.find_subscriber("dee@example.com") is None
    # Nothing readable about the address is left in the database file or its WAL (no
    # VACUUM needed: erasure overwrites the deleted rows' bytes).
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("admin.db*"))
    assert b"dee@example.com" not in raw.lower() and b"Acme" not in raw
    # The campaign's counts are unchanged: the ledger row stays, without personal data.
    campaign = nl.store.all_campaigns()[0]
    assert nl.store.delivery_counts(campaign.id).total == 1
    # Neither an add nor an import can bring it back.
    assert "erased on request" in _run("subscribers", "add", "DEE@example.com", "--list",
                                       "news", code=1)
    src = tmp_path / "back.csv"
    src.write_text("email,name\ndee@example.com,Dee\nnew@example.com,New\n", encoding="utf-8")
    out = _run("subscribers", "import", str(src), "--list", "news",
               "--report", str(tmp_path / "rej.csv"))
    assert "imported 1" in out and "skipped 1" in out
    assert nl.store.find_subscriber("dee@example.com") is None
    with nl.store.engine.begin() as conn:
        entry = suppression.find(conn, "dee@example.com")
    assert entry is not None and entry.kind == "hash" and entry.reason == "erased"
    audit = _run("audit", "ls", "--action", "privacy.")
    assert "privacy.erase" in audit and "privacy.export" in audit
    assert "dee@example.com" not in _run("audit", "ls").lower()


def test_audit_log_filters_and_json(env: SmtpTestServer) -> None:
    _run("lists", "create", "one")
    _run("lists", "create", "two")
    _run("suppression", "add", "x@example.com")
    lines = _run("audit", "ls", "--json", "--action", "list.").splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["target"] for e in entries] == ["two", "one"]
    assert {e["actor"] for e in entries} == {cli_actor()}
    assert _run("audit", "ls", "--actor", "token:nobody").count("list.") == 0
    assert "--since wants" in _run("audit", "ls", "--since", "yesterday", code=1)


def test_a_lists_zone_is_the_fallback_for_local_time_sends(tmp_path: Path) -> None:
    import datetime as dt
    import zoneinfo

    from newsletter.store.sql import NewMember

    from .conftest import make_settings

    nl = Newsletter(make_settings(tmp_path))
    mlist = Admin(nl, "t").create_list("east", zone="Etc/GMT-3")  # UTC+3
    nl.store.upsert_members(mlist.id, [
        NewMember("own@example.com", attributes={"tz": "Etc/GMT-2"}),  # its own zone wins
        NewMember("list@example.com"),                                 # the list's zone
    ], source="test")
    campaign = nl.plan_send(SAMPLE_MD, ["east"]).campaign
    wall = dt.datetime(2030, 1, 1, 8, 0)
    releases = nl.store.release_by_zone(campaign.id, wall, "UTC", zoneinfo.ZoneInfo)
    assert releases == {dt.datetime(2030, 1, 1, 5, 0, tzinfo=dt.UTC): 1,
                        dt.datetime(2030, 1, 1, 6, 0, tzinfo=dt.UTC): 1}


def test_send_to_a_segment_reaches_only_matches_and_names_the_real_list(
        env: SmtpTestServer) -> None:
    import email
    import email.policy

    from newsletter.store.sql import NewMember

    nl = _nl()
    digest, policy = nl.store.create_list("digest"), nl.store.create_list("policy")
    nl.store.upsert_members(digest.id, [
        NewMember("zh1@example.com", attributes={"lang": "zh", "sector": "telecom"}),
        NewMember("zh2@example.com", attributes={"lang": "zh", "sector": "retail"}),
        NewMember("en1@example.com", attributes={"lang": "en", "sector": "telecom"}),
    ], source="test")
    nl.store.upsert_members(policy.id, [
        NewMember("zh3@example.com", attributes={"lang": "zh", "sector": "finance"}),
        NewMember("zh1@example.com"),  # on both lists: gets one copy
    ], source="test")
    out = _run("segments", "create", "zh-industry",
               'lang = "zh" and attributes.sector in ["telecom", "finance"]')
    assert "2 active subscriber(s) match" in out
    # An invalid filter names the position; an unknown list too.
    bad = _run("segments", "create", "broken", 'lang = ', code=1)
    assert "position 8" in bad
    assert "unknown list" in _run("segments", "count", 'list = "nope"', code=1)
    assert _run("segments", "count", 'lang = "zh"').strip() == "3"

    _run("send", str(SAMPLE_MD), "--segment", "zh-industry", "--yes")
    got = sorted(r for m in env.messages for r in m.rcpt_tos)
    assert got == ["zh1@example.com", "zh3@example.com"]
    # Each message's unsubscribe link leaves the list the match came through.
    for raw in env.messages:
        msg = email.message_from_bytes(raw.data, policy=email.policy.default)
        token = str(msg["List-Unsubscribe"]).split("/unsubscribe/")[1].split(">")[0]
        _sid, lid = nl.signer.read_unsubscribe_token(token)
        assert nl.store.list_by_id(lid).slug == ("digest" if raw.rcpt_tos == [
            "zh1@example.com"] else "policy")
    campaign = nl.store.all_campaigns()[0]
    assert campaign.segment_names == "zh-industry"
    assert "segment    zh-industry" in _run("campaigns", "show", str(campaign.id))
    # Restricted to a list: only the matches on it.
    _run("send", str(SAMPLE_MD), "--segment", "zh-industry", "--list", "policy", "--yes",
         "--again")
    assert sorted(r for m in env.messages[2:] for r in m.rcpt_tos) == [
        "zh1@example.com", "zh3@example.com"]


def test_export_a_segment(env: SmtpTestServer, tmp_path: Path) -> None:
    from newsletter.store.sql import NewMember

    nl = _nl()
    a, b = nl.store.create_list("a"), nl.store.create_list("b")
    nl.store.upsert_members(a.id, [NewMember("zh@example.com", attributes={"lang": "zh"}),
                                   NewMember("en@example.com", attributes={"lang": "en"})],
                            source="test")
    nl.store.upsert_members(b.id, [NewMember("zh@example.com")], source="test")
    _run("segments", "create", "zh", 'lang = "zh"')
    dest = tmp_path / "zh.jsonl"
    _run("subscribers", "export", "--segment", "zh", "--format", "jsonl", "--out", str(dest))
    rows = [json.loads(line) for line in dest.read_text(encoding="utf-8").splitlines()]
    assert [(r["email"], r["list"]) for r in rows] == [("zh@example.com", "a"),
                                                       ("zh@example.com", "b")]
    _run("subscribers", "export", "--segment", "zh", "--list", "b", "--out", str(dest))
    assert dest.read_text(encoding="utf-8").count("zh@example.com") == 1
    assert "name a --list or a --segment" in _run("subscribers", "export", code=1)
