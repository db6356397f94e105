"""The capture inbox (/outbox/) through FastAPI's test client, with mail put there by the
real capture server; and `newsletter send FILE --to` test sends, into the real SMTP test
server and into the capture outbox."""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import re
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import html5lib
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Table, func, select
from typer.testing import CliRunner

from newsletter.apitokens import Tokens
from newsletter.cli import app as cli_app
from newsletter.content.parse import load_issue
from newsletter.delivery.capture import CaptureServer
from newsletter.editor import Editor
from newsletter.errors import NotFoundError
from newsletter.service import Newsletter
from newsletter.store.schema import archive, audit_log, campaigns, deliveries
from newsletter.web.app import create_app
from newsletter.web.outbox import COOKIE, PAGE_SIZE, Outbox, SessionSigner

from .conftest import SAMPLE_MD, SECRET, add_subscribers, make_settings
from .smtpd import SmtpTestServer

runner = CliRunner()


@pytest.fixture
def capture_nl(tmp_path: Path) -> Newsletter:
    """No SMTP relay: mail goes to the capture server's Maildir."""
    return Newsletter(make_settings(tmp_path))


@pytest.fixture
def tokens(capture_nl: Newsletter) -> dict[str, str]:
    store = Tokens(capture_nl.store.engine)
    return {role: store.create(role, role, actor="test")[1]
            for role in ("admin", "editor", "viewer")}


@pytest.fixture
def client(capture_nl: Newsletter) -> Iterator[TestClient]:
    with TestClient(create_app(capture_nl)) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _capture(nl: Newsletter, *messages: EmailMessage) -> None:
    """Deliver messages over SMTP to the capture server, as any sender would."""
    async def run() -> None:
        async with CaptureServer(nl.settings.outbox_dir) as server:
            for msg in messages:
                await aiosmtplib.send(msg, hostname=server.host, port=server.port)

    asyncio.run(run())


def _message(subject: str, to: str = "reader@example.org", *,
             html: str = "<p>Hello <b>reader</b></p>") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Desk <desk@example.org>"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hello reader, in plain text.\n")
    msg.add_alternative(html, subtype="html")
    return msg


def _keys(page_html: str) -> list[str]:
    return re.findall(r'href="/outbox/([^"/?]+)"', page_html)


def _login(client: TestClient, token: str) -> None:
    r = client.post("/outbox/login", data={"token": token, "next": "/outbox/"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/outbox/"


# --- access ------------------------------------------------------------------------------------

def test_no_admin_no_outbox(capture_nl: Newsletter, client: TestClient,
                            tokens: dict[str, str]) -> None:
    _capture(capture_nl, _message("Secret subject"))
    key = mailbox.Maildir(capture_nl.settings.outbox_dir).keys()[0]
    for path in ("/outbox/", f"/outbox/{key}", f"/outbox/{key}/html", f"/outbox/{key}/text",
                 f"/outbox/{key}/raw", "/outbox/?page=2"):
        # A browser without a session goes to the login page, never to the messages.
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/outbox/login?next=/outbox/")
        assert "Secret subject" not in r.text
        # Scripts with a token that is not an admin's are refused as the API refuses them.
        for role in ("viewer", "editor"):
            r = client.get(path, headers=_bearer(tokens[role]))
            assert r.status_code == 403, (path, role)
            assert "Secret subject" not in r.text
        r = client.get(path, headers=_bearer("nl_" + "x" * 43))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = client.get(path, headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
        assert r.status_code == 401
    r = client.get("/outbox/", headers=_bearer(tokens["admin"]))
    assert r.status_code == 200 and "Secret subject" in r.text
    assert r.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_login_sets_a_signed_expiring_session_and_logout_ends_it(
    capture_nl: Newsletter, client: TestClient, tokens: dict[str, str],
) -> None:
    _capture(capture_nl, _message("Behind the login"))
    page = client.get("/outbox/login?next=/outbox/%3Fpage%3D1")
    assert page.status_code == 200
    html5lib.HTMLParser(strict=True).parse(page.text)
    assert 'type="password"' in page.text and 'name="token"' in page.text

    for role, status in (("viewer", 403), ("editor", 403)):
        r = client.post("/outbox/login", data={"token": tokens[role]}, follow_redirects=False)
        assert r.status_code == status and "set-cookie" not in r.headers
        assert "admin token" in r.text
    r = client.post("/outbox/login", data={"token": "nl_wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "set-cookie" not in r.headers

    # An open redirect through ?next= is not possible.
    r = client.post("/outbox/login", data={"token": tokens["admin"],
                                           "next": "//evil.example/outbox/"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/outbox/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= attrs
    assert "samesite=strict" in cookie.lower() and "path=/outbox" in cookie.lower()
    assert "secure" not in attrs  # plain http here; see the https test below
    value = client.cookies[COOKIE]
    assert tokens["admin"] not in value and tokens["admin"][3:] not in value  # never the token

    r = client.get("/outbox/")
    assert r.status_code == 200 and "Behind the login" in r.text
    audit = capture_nl.store.engine.connect().execute(
        select(audit_log.c.actor).where(audit_log.c.action == "outbox.login")).scalars().all()
    assert audit == ["token:admin"]

    # A forged or tampered session is no session.
    client.cookies.clear()
    client.cookies.set(COOKIE, value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    r = client.get("/outbox/", follow_redirects=False)
    assert r.status_code == 303 and "Behind the login" not in r.text
    # An expired one neither (signed with the right key, eight hours and a bit ago).
    admin = Tokens(capture_nl.store.engine).get("admin")
    old = SessionSigner(capture_nl.settings.signing_keys()).sign(admin, now=0)
    client.cookies.clear()
    client.cookies.set(COOKIE, old)
    assert client.get("/outbox/", follow_redirects=False).status_code == 303

    client.cookies.clear()  # the hand-made ones; the server's own from here on
    _login(client, tokens["admin"])
    assert client.get("/outbox/").status_code == 200
    r = client.post("/outbox/logout", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/outbox/login"
    assert COOKIE not in client.cookies
    assert client.get("/outbox/", follow_redirects=False).status_code == 303

    # Revoking the token ends its sessions at the next request.
    _login(client, tokens["admin"])
    Tokens(capture_nl.store.engine).revoke("admin", actor="test")
    assert client.get("/outbox/", follow_redirects=False).status_code == 303


def test_the_session_cookie_is_secure_over_https(capture_nl: Newsletter,
                                                 tokens: dict[str, str]) -> None:
    with TestClient(create_app(capture_nl), base_url="https://testserver") as c:
        r = c.post("/outbox/login", data={"token": tokens["admin"]}, follow_redirects=False)
        assert r.status_code == 303
        assert "secure" in [a.strip().lower() for a in r.headers["set-cookie"].split(";")]


# --- what it shows -----------------------------------------------------------------------------

def test_a_captured_issue_appears_with_html_text_and_raw_views(
    capture_nl: Newsletter, client: TestClient, tokens: dict[str, str],
) -> None:
    hostile = '<p>Look</p><script>document.title="owned"</script><img src="x" onerror="1">'
    _capture(capture_nl, _message("Older one", html=hostile))
    # An issue test send goes through the capture server too (no relay is configured).
    results = asyncio.run(Editor(capture_nl, "test").test_send_issue(
        load_issue(SAMPLE_MD), ["editor@example.org"]))
    assert [r.sent for r in results] == [True]

    _login(client, tokens["admin"])
    index = client.get("/outbox/")
    assert index.status_code == 200
    html5lib.HTMLParser(strict=True).parse(index.text)
    keys = _keys(index.text)
    assert len(keys) == 2
    rows = re.findall(r"<tr>(.*?)</tr>", index.text.split("<tbody>")[1], re.S)
    # Newest first: the issue, then the older hand-made message.
    assert "[TEST] Digital Economy Brief" in rows[0] and "editor@example.org" in rows[0]
    assert "Older one" in rows[1] and "desk@example.org" in rows[1]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[0])
    assert re.search(r"\d+\.\d KB", rows[0])

    issue_key, older_key = keys
    page = client.get(f"/outbox/{issue_key}")
    assert page.status_code == 200
    html5lib.HTMLParser(strict=True).parse(page.text)
    frame = re.search(r"<iframe[^>]*>", page.text)
    assert frame is not None
    assert f'src="/outbox/{issue_key}/html"' in frame.group(0)
    sandbox = re.search(r'\ssandbox(?:="([^"]*)")?', frame.group(0))
    assert sandbox is not None and "allow-scripts" not in (sandbox.group(1) or "")
    assert "List-Unsubscribe" in page.text and "Digital services now account" in page.text

    body = client.get(f"/outbox/{issue_key}/html")
    assert body.status_code == 200 and body.headers["content-type"].startswith("text/html")
    csp = body.headers["content-security-policy"]
    assert csp.startswith("sandbox;") and "default-src 'none'" in csp
    assert "script-src" not in csp  # default-src 'none' covers scripts
    assert body.headers["x-frame-options"] == "SAMEORIGIN"
    assert "Digital services now account" in body.text and "reader@example.org" not in body.text
    text = client.get(f"/outbox/{issue_key}/text")
    assert text.headers["content-type"] == "text/plain; charset=utf-8"
    assert "Digital services now account" in text.text and "<p>" not in text.text
    raw = client.get(f"/outbox/{issue_key}/raw")
    assert raw.headers["content-type"] == "text/plain; charset=utf-8"
    assert raw.headers["x-content-type-options"] == "nosniff"
    assert raw.content == mailbox.Maildir(capture_nl.settings.outbox_dir).get_bytes(issue_key)
    parsed = email.message_from_bytes(raw.content, policy=email.policy.default)
    assert str(parsed["Subject"]).startswith("[TEST] ")

    # The hostile message's HTML is served as it is, but never runs: the CSP sandbox and
    # no script source, in a frame without allow-scripts.
    hostile_body = client.get(f"/outbox/{older_key}/html")
    assert "<script>" in hostile_body.text
    assert hostile_body.headers["content-security-policy"].startswith("sandbox;")


def test_bad_message_ids_are_404(capture_nl: Newsletter, client: TestClient,
                                 tokens: dict[str, str], tmp_path: Path) -> None:
    _capture(capture_nl, _message("Only one"))
    secret = capture_nl.settings.var_dir / "secret.txt"
    secret.write_text("do not show", encoding="utf-8")
    (capture_nl.settings.outbox_dir / "cur" / "planted").write_text("x", encoding="utf-8")
    auth = _bearer(tokens["admin"])
    # (A bare ".." never gets here: clients resolve it away, /outbox/.. is /.)
    bad = ["...", "..%2Fsecret.txt", "%2e%2e%2fsecret.txt", "..%5Csecret.txt",
           "1795952620.M1P1Q1.nowhere", ".hidden", "new", "cur", "tmp", "planted:2,S",
           "a" * 300, "%00", "1795952620.M1P1Q1..%2F..%2Fsecret.txt"]
    for key in bad:
        for view in ("", "/html", "/text", "/raw"):
            r = client.get(f"/outbox/{key}{view}", headers=auth)
            assert r.status_code == 404, (key, view, r.status_code)
            assert "do not show" not in r.text
    assert client.get("/outbox/?page=2", headers=auth).status_code == 404
    assert client.get("/outbox/?page=x", headers=auth).status_code == 200  # page 1


def test_fifty_per_page_newest_first(capture_nl: Newsletter, client: TestClient,
                                     tokens: dict[str, str]) -> None:
    # Stored the way the capture server stores them, without 51 SMTP sessions.
    box = mailbox.Maildir(capture_nl.settings.outbox_dir, create=True)
    for i in range(PAGE_SIZE + 3):
        box.add(_message(f"Message number {i:02d}").as_bytes())
    auth = _bearer(tokens["admin"])
    first = client.get("/outbox/", headers=auth).text
    assert len(_keys(first)) == PAGE_SIZE
    subjects = re.findall(r"Message number (\d\d)", first)
    assert subjects[0] == f"{PAGE_SIZE + 2:02d}" and subjects[-1] == "03"
    assert 'href="/outbox/?page=2"' in first and "page 1 of 2" in first
    second = client.get("/outbox/?page=2", headers=auth).text
    assert re.findall(r"Message number (\d\d)", second) == ["02", "01", "00"]
    assert 'href="/outbox/?page=1"' in second
    assert client.get("/outbox/?page=3", headers=auth).status_code == 404


def test_an_empty_or_missing_outbox_lists_nothing(capture_nl: Newsletter, client: TestClient,
                                                  tokens: dict[str, str], tmp_path: Path) -> None:
    r = client.get("/outbox/", headers=_bearer(tokens["admin"]))
    assert r.status_code == 200 and "Nothing captured yet" in r.text
    # Looking at an outbox that was never created does not create it.
    missing = tmp_path / "never"
    assert Outbox(missing).page(1) == ([], 0)
    with pytest.raises(NotFoundError):
        Outbox(missing).raw("1795952620.M1P1Q1.host")
    assert not missing.exists()


# --- send FILE --to ----------------------------------------------------------------------------

@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEWSLETTER_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", f"sqlite:///{tmp_path / 'var' / 'cli.db'}")
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    monkeypatch.setenv("NEWSLETTER_BASE_URL", "https://news.example.org")
    monkeypatch.setenv("NEWSLETTER_FROM", "Digest Desk <digest@example.org>")
    return tmp_path


def _count(nl: Newsletter, table: Table) -> int:
    with nl.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_send_to_is_a_test_send_into_a_real_smtp_server(
    cli_env: Path, smtpd: SmtpTestServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEWSLETTER_SMTP_URL", smtpd.url)
    nl = Newsletter(make_settings(cli_env, database_url=f"sqlite:///{cli_env / 'var' / 'cli.db'}",
                                  smtp_url=smtpd.url))
    add_subscribers(nl, "digest", 3)  # subscribers who must not get a test

    result = runner.invoke(cli_app, ["send", str(SAMPLE_MD), "--to", "editor@example.org",
                                     "--to", "Boss@Example.org"])
    assert result.exit_code == 0, result.output
    assert "sent '[TEST] Digital Economy Brief" in result.output
    assert "to editor@example.org" in result.output and "to Boss@example.org" in result.output
    assert "capture mode" not in result.output
    assert sorted(m.rcpt_tos[0] for m in smtpd.messages) == ["Boss@example.org",
                                                            "editor@example.org"]
    for received in smtpd.messages:
        msg = email.message_from_bytes(received.data, policy=email.policy.default)
        assert str(msg["Subject"]).startswith("[TEST] Digital Economy Brief")
        assert msg["List-Unsubscribe"] and msg.get_body(("html",)) is not None
    # A test, not a delivery: no campaign, no ledger row, no archive entry; one audit entry.
    assert _count(nl, campaigns) == 0
    assert _count(nl, deliveries) == 0
    assert _count(nl, archive) == 0
    with nl.store.engine.connect() as conn:
        actions = conn.execute(select(audit_log.c.action, audit_log.c.detail).where(
            audit_log.c.action == "issue.test_send")).all()
    assert [(a, d["sent"], d["failed"]) for a, d in actions] == [("issue.test_send", 2, 0)]

    # The real send still goes to everyone afterwards: the test did not count as one.
    out = runner.invoke(cli_app, ["send", str(SAMPLE_MD), "--list", "digest", "--yes"])
    assert out.exit_code == 0, out.output
    assert len(smtpd.messages) == 2 + 3


@pytest.mark.parametrize(("extra", "message"), [
    (["--list", "digest"], "leave out --list"),
    (["--segment", "zh"], "leave out --list, --segment"),
    (["--again"], "--again"),
    ([f"--to=a{i}@example.org" for i in range(10)], "at most 10"),
    (["--to", "not-an-address"], "invalid address"),
])
def test_send_to_refuses_what_a_test_send_cannot_be(
    cli_env: Path, smtpd: SmtpTestServer, monkeypatch: pytest.MonkeyPatch,
    extra: list[str], message: str,
) -> None:
    monkeypatch.setenv("NEWSLETTER_SMTP_URL", smtpd.url)
    result = runner.invoke(cli_app, ["send", str(SAMPLE_MD), "--to", "editor@example.org",
                                     *extra])
    assert result.exit_code != 0
    assert message in str(result.exception) + result.output
    assert smtpd.messages == []


def test_send_to_in_capture_mode_lands_in_the_outbox(cli_env: Path) -> None:
    result = runner.invoke(cli_app, ["send", str(SAMPLE_MD), "--to", "editor@example.org"])
    assert result.exit_code == 0, result.output
    assert "capture mode" in result.output and "sent '[TEST] " in result.output
    nl = Newsletter(make_settings(cli_env, database_url=f"sqlite:///{cli_env / 'var' / 'cli.db'}"))
    assert len(mailbox.Maildir(nl.settings.outbox_dir).keys()) == 1
    token = Tokens(nl.store.engine).create("admin", "admin", actor="test")[1]
    with TestClient(create_app(nl)) as c:
        index = c.get("/outbox/", headers=_bearer(token)).text
    assert "[TEST] Digital Economy Brief" in index and "editor@example.org" in index
    assert _count(nl, campaigns) == 0 and _count(nl, archive) == 0
