"""The subscriber web over real HTTP (FastAPI's test client runs the app with its lifespan):
one-click unsubscribe, preferences, subscribe with double opt-in, the archive."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import html5lib
import pytest
from fastapi.testclient import TestClient

from newsletter.render.tokens import TokenSigner
from newsletter.service import Newsletter
from newsletter.settings import Settings
from newsletter.store.schema import DeliveryStatus, MembershipStatus
from newsletter.store.sql import NewMember
from newsletter.web.app import create_app

from .conftest import SAMPLE_MD, SECRET, add_subscribers, make_settings
from .smtpd import SmtpTestServer


@pytest.fixture
def client(nl: Newsletter) -> Iterator[TestClient]:
    with TestClient(create_app(nl)) as c:
        yield c


def _ids(nl: Newsletter, email_addr: str, slug: str) -> tuple[int, int]:
    sub = nl.store.find_subscriber(email_addr)
    assert sub is not None
    return sub.id, nl.store.get_list(slug).id


def _status(nl: Newsletter, email_addr: str, slug: str) -> MembershipStatus | None:
    sid, lid = _ids(nl, email_addr, slug)
    return nl.store.status_on(sid, lid)


def _unsub_path(nl: Newsletter, email_addr: str, slug: str) -> str:
    return "/unsubscribe/" + nl.signer.unsubscribe_token(*_ids(nl, email_addr, slug))


def _sources(nl: Newsletter, email_addr: str) -> list[tuple[str, str, str]]:
    sub = nl.store.find_subscriber(email_addr)
    assert sub is not None
    return [(h["list"], h["to"], h["source"]) for h in nl.store.history(sub.id)]


def _links(text: str, kind: str) -> list[str]:
    return re.findall(rf"https://news\.example\.org(/{kind}/[A-Za-z0-9_\-]+)", text)


def _body_text(data: bytes) -> str:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


# --- one-click unsubscribe (RFC 8058) ----------------------------------------------------------

@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_one_click_post_unsubscribes_at_once_answers_200_and_is_idempotent(
    nl: Newsletter, client: TestClient, encoding: str,
) -> None:
    add_subscribers(nl, "news", 3)
    path = _unsub_path(nl, "user1@example.com", "news")
    client.cookies.clear()
    for attempt in range(2):
        if encoding == "urlencoded":
            resp = client.post(path, content=b"List-Unsubscribe=One-Click",
                               headers={"Content-Type": "application/x-www-form-urlencoded"},
                               follow_redirects=False)
        else:
            resp = client.post(path, files={"List-Unsubscribe": (None, "One-Click")},
                               follow_redirects=False)
        assert resp.status_code == 200, (attempt, resp.text)
        assert "set-cookie" not in resp.headers
        assert resp.headers["cache-control"] == "no-store"
        assert resp.headers["referrer-policy"] == "no-referrer"
    assert _status(nl, "user1@example.com", "news") == MembershipStatus.UNSUBSCRIBED
    assert _status(nl, "user0@example.com", "news") == MembershipStatus.ACTIVE
    # Recorded once, with its source, however many times it was posted.
    assert _sources(nl, "user1@example.com")[-1] == ("news", "unsubscribed", "one-click")
    assert len(_sources(nl, "user1@example.com")) == 2


def test_get_never_unsubscribes_and_shows_a_button(nl: Newsletter, client: TestClient) -> None:
    add_subscribers(nl, "news", 2)
    path = _unsub_path(nl, "user0@example.com", "news")
    for _ in range(3):
        resp = client.get(path)
        assert resp.status_code == 200
    assert _status(nl, "user0@example.com", "news") == MembershipStatus.ACTIVE
    page = resp.text
    assert "News readers" in page
    assert "u***@example.com" in page and "user0@example.com" not in page
    doc = html5lib.parse(page, namespaceHTMLElements=False)
    form = doc.find(".//form")
    assert form is not None and form.get("method") == "post" and form.get("action") == path
    assert form.find(".//button") is not None

    # The button: a page unsubscribe, then a page to undo it and a link to preferences.
    resp = client.post(path, data={"List-Unsubscribe": "One-Click", "via": "page"})
    assert resp.status_code == 200
    assert _sources(nl, "user0@example.com")[-1] == ("news", "unsubscribed", "page")
    assert "/preferences/" in resp.text and f"{path}/resubscribe" in resp.text
    resp = client.post(f"{path}/resubscribe")
    assert resp.status_code == 200
    assert _status(nl, "user0@example.com", "news") == MembershipStatus.ACTIVE


def test_forged_truncated_and_tampered_tokens_change_nothing(
    nl: Newsletter, client: TestClient,
) -> None:
    add_subscribers(nl, "news", 2)
    good = _unsub_path(nl, "user0@example.com", "news").rsplit("/", 1)[1]
    sid, lid = _ids(nl, "user0@example.com", "news")
    flipped = good[:-3] + ("A" if good[-3] != "A" else "B") + good[-2:]
    other_key = TokenSigner([b"someone-elses-key"]).unsubscribe_token(sid, lid)
    wrong_use = nl.signer.preferences_token(sid)
    for bad in (good[:-4], flipped, other_key, wrong_use, "x", "%00%0d%0a", good + "AA"):
        for method in ("get", "post"):
            resp = getattr(client, method)(f"/unsubscribe/{bad}")
            assert 400 <= resp.status_code < 500, (bad, method, resp.status_code)
            assert "not valid" in resp.text
    assert _status(nl, "user0@example.com", "news") == MembershipStatus.ACTIVE
    assert client.get(f"/preferences/{good}").status_code == 400  # wrong purpose


def test_tokens_from_a_previous_key_keep_working_after_rotation(
    tmp_path: Path, smtpd: SmtpTestServer,
) -> None:
    old = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(old, "news", 2)
    path = _unsub_path(old, "user1@example.com", "news")
    rotated = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url,
                                       secret_key="a-brand-new-key-after-rotation",
                                       old_secret_keys=[SECRET]))
    unrotated = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url,
                                         secret_key="a-brand-new-key-after-rotation"))
    with TestClient(create_app(unrotated)) as c:
        assert c.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 400
    with TestClient(create_app(rotated)) as c:
        assert c.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert _status(rotated, "user1@example.com", "news") == MembershipStatus.UNSUBSCRIBED


def test_the_mails_own_list_unsubscribe_header_works_and_the_next_send_skips(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer, tmp_path: Path,
) -> None:
    add_subscribers(nl, "news", 3)
    asyncio.run(nl.run(nl.plan_send(SAMPLE_MD, ["news"])))
    received = {m.rcpt_tos[0]: m for m in smtpd.messages}
    msg = email.message_from_bytes(received["user2@example.com"].data,
                                   policy=email.policy.default)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = str(msg["List-Unsubscribe"]).strip("<>")
    assert urlsplit(url).netloc == "news.example.org"
    resp = client.post(urlsplit(url).path, data={"List-Unsubscribe": "One-Click"})
    assert resp.status_code == 200
    # The body's link is the same one.
    assert urlsplit(url).path in _links(_body_text(received["user2@example.com"].data),
                                        "unsubscribe")
    second = tmp_path / "second.md"
    second.write_text(SAMPLE_MD.read_text(encoding="utf-8").replace("number: 7", "number: 8"),
                      encoding="utf-8")
    before = len(smtpd.messages)
    asyncio.run(nl.run(nl.plan_send(second, ["news"])))
    later = [m.rcpt_tos[0] for m in smtpd.messages[before:]]
    assert sorted(later) == ["user0@example.com", "user1@example.com"]


def test_an_unsubscribe_during_a_running_send_is_honoured(
    tmp_path: Path, smtpd: SmtpTestServer,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, send_concurrency=1,
                                  batch_size=10))
    add_subscribers(nl, "news", 60)
    smtpd.recorder.delay = 0.01
    plan = nl.plan_send(SAMPLE_MD, ["news"])
    late = "user55@example.com"
    path = _unsub_path(nl, late, "news")
    sender = threading.Thread(target=lambda: asyncio.run(nl.run(plan)))
    with TestClient(create_app(Newsletter(nl.settings))) as c:
        sender.start()
        deadline = time.monotonic() + 30
        while len(smtpd.messages) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.post(path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
        sender.join(60)
    got = [m.rcpt_tos[0] for m in smtpd.messages]
    assert late not in got and len(got) == 59
    counts = nl.store.delivery_counts(plan.campaign.id)
    assert counts[DeliveryStatus.SKIPPED] == 1 and counts[DeliveryStatus.SENT] == 59


# --- preferences ------------------------------------------------------------------------------

def test_preferences_show_lists_leave_join_and_leave_all(
    nl: Newsletter, client: TestClient,
) -> None:
    news = nl.store.create_list("news", name="Weekly News")
    nl.store.create_list("briefs", name="Policy Briefs", description="Short notes")
    nl.store.create_list("board", name="Board Papers", public=False)
    nl.store.upsert_members(news.id, [NewMember("ann@example.com", "Ann")], source="test")
    sid, _ = _ids(nl, "ann@example.com", "news")
    path = "/preferences/" + nl.signer.preferences_token(sid)

    page = client.get(path).text
    assert "Weekly News" in page and "Policy Briefs" in page
    assert "Board Papers" not in page  # private lists are not offered
    assert "a***@example.com" in page

    briefs_id = nl.store.get_list("briefs").id
    resp = client.post(path, data={"list": [str(news.id), str(briefs_id)]})
    assert resp.status_code == 200 and "saved" in resp.text
    assert _status(nl, "ann@example.com", "briefs") == MembershipStatus.ACTIVE
    # Asking to join a private list by its id does nothing.
    board_id = nl.store.get_list("board").id
    client.post(path, data={"list": [str(news.id), str(briefs_id), str(board_id)]})
    assert nl.store.status_on(sid, board_id) is None

    client.post(path, data={"list": [str(briefs_id)]})
    assert _status(nl, "ann@example.com", "news") == MembershipStatus.UNSUBSCRIBED
    client.post(path, data={"leave_all": "1", "list": [str(briefs_id)]})
    assert _status(nl, "ann@example.com", "briefs") == MembershipStatus.UNSUBSCRIBED
    assert [s for s in _sources(nl, "ann@example.com")] == [
        ("news", "active", "test"), ("briefs", "active", "page"),
        ("news", "unsubscribed", "page"), ("briefs", "unsubscribed", "page"),
    ]
    page = client.get(path).text
    doc = html5lib.parse(page, namespaceHTMLElements=False)
    assert doc.find(f".//input[@id='list-{news.id}']").get("checked") is None


# --- subscribe with double opt-in -------------------------------------------------------------

def _confirm_link(smtpd: SmtpTestServer, to: str) -> str:
    mails = [m for m in smtpd.messages if m.rcpt_tos == [to]]
    assert len(mails) == 1, f"{len(mails)} mails to {to}"
    links = _links(_body_text(mails[0].data), "confirm")
    assert len(links) == 1
    return links[0]


def test_double_opt_in_pending_until_confirmed_twice_harmless_and_welcome(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer,
) -> None:
    nl.store.create_list("news", name="Weekly News", welcome=True)
    page = client.get("/subscribe/news")
    assert page.status_code == 200
    resp = client.post("/subscribe/news", data={"email": "New.Reader@Example.com",
                                                "name": "New Reader", "language": "en"})
    assert resp.status_code == 200 and "Almost done" in resp.text
    assert _status(nl, "new.reader@example.com", "news") == MembershipStatus.PENDING

    link = _confirm_link(smtpd, "New.Reader@example.com")
    mail = email.message_from_bytes(smtpd.messages[0].data, policy=email.policy.default)
    assert "confirm" in str(mail["Subject"]).lower()
    # Opening the link (as a scanner would) does not confirm; the button does.
    assert client.get(link).status_code == 200
    assert _status(nl, "new.reader@example.com", "news") == MembershipStatus.PENDING
    for _ in range(2):
        resp = client.post(link)
        assert resp.status_code == 200 and "confirmed" in resp.text.lower()
    assert _status(nl, "new.reader@example.com", "news") == MembershipStatus.ACTIVE
    welcome = [m for m in smtpd.messages if b"Welcome to" in m.data]
    assert len(welcome) == 1  # once, though confirmed twice
    assert _sources(nl, "new.reader@example.com") == [
        ("news", "pending", "form"), ("news", "active", "confirm")]


def test_confirmation_mail_goes_through_relays_when_no_smtp_url_is_set(
    tmp_path: Path,
) -> None:
    """With only [[relays]] configured, confirmation mail takes the relay chosen for its
    sender's domain (transactional_from), as a send does; nothing goes to the capture
    outbox (it used to, without a word, when smtp_url was not set)."""
    with SmtpTestServer() as issues, SmtpTestServer() as transactional:
        relays = [{"url": issues.url, "name": "bulk", "from_domains": ["example.org"]},
                  {"url": transactional.url, "name": "tx", "from_domains": ["tx.example.org"]}]
        nl = Newsletter(make_settings(tmp_path, relays=relays,
                                      transactional_from="Desk <desk@tx.example.org>"))
        nl.store.create_list("news")
        with TestClient(create_app(nl)) as c:
            resp = c.post("/subscribe/news", data={"email": "reader@example.com"})
        assert resp.status_code == 200
        assert [m.rcpt_tos for m in transactional.messages] == [["reader@example.com"]]
        assert issues.messages == []
        assert _links(_body_text(transactional.messages[0].data), "confirm")
    assert not any(p.is_file() for p in nl.settings.outbox_dir.rglob("*"))


def test_subscribing_an_active_address_reveals_nothing_and_sends_nothing(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer,
) -> None:
    add_subscribers(nl, "news", 1)
    new = client.post("/subscribe/news", data={"email": "fresh@example.com"})
    known = client.post("/subscribe/news", data={"email": "user0@example.com"})
    assert new.status_code == known.status_code == 200
    assert new.text.replace("fresh@example.com", "X") == known.text.replace(
        "user0@example.com", "X")
    assert [m.rcpt_tos for m in smtpd.messages] == [["fresh@example.com"]]


def test_confirmation_mail_at_most_once_an_hour_per_address(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer,
) -> None:
    nl.store.create_list("news")
    nl.store.create_list("other")
    for slug in ("news", "news", "other", "news"):
        assert client.post(f"/subscribe/{slug}", data={"email": "a@example.com"}).status_code \
            == 200
    assert len(smtpd.messages) == 1


def test_expired_confirmation_link_is_refused(
    nl: Newsletter, client: TestClient,
) -> None:
    nl.store.create_list("news")
    sub = nl.store.add_subscriber("late@example.com")
    lid = nl.store.get_list("news").id
    token = nl.signer.confirm_token(sub.id, lid, valid_for=60, now=time.time() - 3600)
    assert client.get(f"/confirm/{token}").status_code == 410
    assert client.post(f"/confirm/{token}").status_code == 410
    assert nl.store.status_on(sub.id, lid) is None


def test_honeypot_and_invalid_input(nl: Newsletter, client: TestClient,
                                    smtpd: SmtpTestServer) -> None:
    nl.store.create_list("news")
    resp = client.post("/subscribe/news", data={"email": "bot@example.com",
                                                "website": "http://spam.example"})
    assert resp.status_code == 200  # looks like success to the robot
    assert nl.store.find_subscriber("bot@example.com") is None
    resp = client.post("/subscribe/news", data={"email": "not-an-address", "name": "Kim"})
    assert resp.status_code == 422
    doc = html5lib.parse(resp.text, namespaceHTMLElements=False)
    assert doc.find(".//input[@id='email']").get("aria-invalid") == "true"
    assert doc.find(".//input[@id='name']").get("value") == "Kim"  # nothing typed is lost
    resp = client.post("/subscribe/news", data={"email": "ok@example.com",
                                                "name": "Eve\r\nBcc: x@example.com"})
    assert resp.status_code == 422
    assert client.post("/subscribe/news", data={"email": "ok@example.com",
                                                "language": "xx"}).status_code == 422
    assert smtpd.messages == []
    assert client.get("/subscribe/nosuchlist").status_code == 404


def test_rate_limits_per_ip_and_per_address(tmp_path: Path, smtpd: SmtpTestServer) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, subscribe_limit_per_ip=3,
                                  subscribe_limit_per_address=2))
    nl.store.create_list("news")
    with TestClient(create_app(nl)) as c:
        codes = [c.post("/subscribe/news", data={"email": f"p{i}@example.com"}).status_code
                 for i in range(4)]
        assert codes == [200, 200, 200, 429]
    with TestClient(create_app(nl)) as c:  # a new process: fresh per-IP counts
        codes = [c.post("/subscribe/news", data={"email": "same@example.com"}).status_code
                 for _ in range(3)]
        assert codes == [200, 200, 429]


def test_single_opt_in_and_opted_out_addresses(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer,
) -> None:
    mlist = nl.store.create_list("open", double_opt_in=False)
    assert client.post("/subscribe/open", data={"email": "x@example.com"}).status_code == 200
    assert _status(nl, "x@example.com", "open") == MembershipStatus.ACTIVE
    assert smtpd.messages == []
    # Someone who left is not put back by a form anyone could fill in: they must confirm.
    nl.store.upsert_members(mlist.id, [NewMember("gone@example.com")], source="test")
    nl.store.set_status("gone@example.com", MembershipStatus.UNSUBSCRIBED, source="test")
    client.post("/subscribe/open", data={"email": "gone@example.com"})
    assert _status(nl, "gone@example.com", "open") == MembershipStatus.UNSUBSCRIBED
    client.post(_confirm_link(smtpd, "gone@example.com"))
    assert _status(nl, "gone@example.com", "open") == MembershipStatus.ACTIVE


def test_private_lists_have_no_form_and_a_private_archive(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer,
) -> None:
    mlist = nl.store.create_list("board", name="Board Papers", public=False)
    nl.store.upsert_members(mlist.id, [NewMember("chair@example.com")], source="test")
    assert client.get("/subscribe/board").status_code == 404
    assert client.post("/subscribe/board", data={"email": "a@example.com"}).status_code == 404
    asyncio.run(nl.run(nl.plan_send(SAMPLE_MD, ["board"])))
    assert client.get("/archive/board/").status_code == 404
    assert client.get("/archive/board/7").status_code == 404
    assert client.get("/archive/board/feed.atom").status_code == 404
    # The mail's "view in browser" link carries the reader's token and opens the page.
    web = re.findall(r"https://news\.example\.org(/archive/board/7\?t=[\w\-]+)",
                     _body_text(smtpd.messages[0].data))
    assert len(web) == 1
    assert client.get(web[0]).status_code == 200
    assert client.get(web[0][:-2]).status_code == 404


# --- archive ----------------------------------------------------------------------------------

def test_archive_index_issue_pages_counter_feed_and_view_in_browser(
    nl: Newsletter, client: TestClient, smtpd: SmtpTestServer, tmp_path: Path,
) -> None:
    add_subscribers(nl, "news", 2)
    assert client.get("/archive/news/").status_code == 200  # empty but there
    asyncio.run(nl.run(nl.plan_send(SAMPLE_MD, ["news"])))
    second = tmp_path / "second.md"
    second.write_text(SAMPLE_MD.read_text(encoding="utf-8").replace("number: 7", "number: 8")
                      .replace("title: ", "title: Later ", 1), encoding="utf-8")
    asyncio.run(nl.run(nl.plan_send(second, ["news"])))

    index = client.get("/archive/news/").text
    assert index.index("/archive/news/8") < index.index("/archive/news/7")  # newest first
    first = client.get("/archive/news/7")
    assert first.status_code == 200
    assert 'rel="next" href="/archive/news/8"' in first.text and 'rel="prev"' not in first.text
    later = client.get("/archive/news/8").text
    assert 'rel="prev" href="/archive/news/7"' in later
    counts = [re.search(r'id="views">(\d+)', client.get("/archive/news/7").text)
              for _ in range(2)]
    assert [int(m.group(1)) for m in counts if m] == [2, 3]
    assert client.get("/archive/news/99").status_code == 404

    # The email's "view in browser" link is the issue's archive page.
    links = re.findall(r"https://news\.example\.org(/archive/news/\d+)",
                       _body_text(smtpd.messages[0].data))
    assert links == ["/archive/news/7"]

    feed = client.get("/archive/news/feed.atom")
    assert feed.headers["content-type"].startswith("application/atom+xml")
    ns = {"a": "http://www.w3.org/2005/Atom"}
    root = ET.fromstring(feed.content)
    entries = root.findall("a:entry", ns)
    assert len(entries) == 2
    assert entries[0].find("a:link", ns).get("href").endswith("/archive/news/8")
    content = entries[0].find("a:content", ns).text or ""
    assert "<h3>" in content  # the issue's HTML, escaped once inside the XML


def test_pages_follow_the_language_and_label_every_field(
    nl: Newsletter, client: TestClient,
) -> None:
    nl.store.create_list("zh-news", name="每周简报", language="zh")
    page = client.get("/subscribe/zh-news").text
    doc = html5lib.parse(page, namespaceHTMLElements=False)
    assert doc.get("lang") == "zh" and "订阅" in page
    labelled = {lab.get("for") for lab in doc.iter("label")}
    for field in doc.iter("input"):
        if field.get("type") != "hidden":
            assert field.get("id") in labelled, field.get("name")
    assert doc.find(".//script") is None


def test_serve_command_answers_over_a_real_socket(tmp_path: Path, settings: Settings) -> None:
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"NEWSLETTER_DATABASE_URL": settings.resolved_database_url,
           "NEWSLETTER_SECRET_KEY": SECRET, "NEWSLETTER_VAR_DIR": str(tmp_path / "var"),
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0].decode()
    assert "serving" in out


def test_confirmation_mail_comes_from_the_transactional_sender(
    tmp_path: Path, smtpd: SmtpTestServer,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url,
                                  transactional_from="Sign-ups <signup@example.org>"))
    nl.store.create_list("news")
    with TestClient(create_app(nl)) as c:
        c.post("/subscribe/news", data={"email": "t@example.com"})
    (mail,) = smtpd.messages
    assert mail.mail_from == "signup@example.org"
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert str(parsed["From"]) == "Sign-ups <signup@example.org>"
