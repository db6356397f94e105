"""End to end in a real browser (Debian's chromium driven by Playwright) against the app served
by uvicorn on a real socket, with mail going through the built-in capture server:
subscribe, confirm from the mail, receive an issue, unsubscribe from it, next send skips."""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from newsletter.service import Newsletter
from newsletter.store.schema import MembershipStatus
from newsletter.store.sql import NewMember
from newsletter.web.app import create_app

from .conftest import SAMPLE_MD, make_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.slow


def _need_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium installed (Debian: apt-get install chromium); .ci/run installs it")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    """The app on uvicorn in a thread, as `newsletter serve` runs it."""

    def __init__(self, nl: Newsletter, port: int) -> None:
        config = uvicorn.Config(create_app(nl), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Newsletter, str]]:
    _need_browser()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # No SMTP_URL: the app and the sends use the capture server's Maildir outbox.
    nl = Newsletter(make_settings(tmp_path, base_url=base))
    with _Served(nl, port):
        yield nl, base


def _outbox(nl: Newsletter, to: str) -> list[email.message.EmailMessage]:
    box = mailbox.Maildir(nl.settings.outbox_dir, create=False)
    found = []
    for key in box.iterkeys():
        msg = email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)
        if str(msg["To"]).endswith(f"<{to}>") or str(msg["To"]) == to:
            found.append(msg)
    return found  # type: ignore[return-value]


def _send(nl: Newsletter, issue: Path) -> None:
    """Send an issue to 'news' from a thread of its own (Playwright's sync API holds an
    event loop in this one)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(nl.run(nl.plan_send(issue, ["news"])))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not errors, errors


def _html(msg: email.message.EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def test_subscribe_confirm_receive_unsubscribe_in_a_browser(
    served: tuple[Newsletter, str], tmp_path: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    nl, base = served
    mlist = nl.store.create_list("news", name="Weekly News", welcome=True)
    nl.store.upsert_members(mlist.id, [NewMember("stays@example.org")], source="test")
    reader = "browser.reader@example.org"

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking"])
        page = browser.new_page()

        # 1. Subscribe through the public form.
        page.goto(f"{base}/subscribe/news")
        page.get_by_label("Email address").fill(reader)
        page.get_by_label("Name (optional)").fill("Browser Reader")
        page.get_by_role("button", name="Subscribe").click()
        page.wait_for_load_state()
        assert "Almost done" in page.content()
        sub = nl.store.find_subscriber(reader)
        assert sub is not None
        assert nl.store.status_on(sub.id, mlist.id) == MembershipStatus.PENDING

        # 2. Open the confirmation mail from the capture outbox and follow its link.
        mails = _outbox(nl, reader)
        assert len(mails) == 1
        page.set_content(_html(mails[0]))
        page.get_by_role("link", name="Confirm my subscription").click()
        page.wait_for_url(re.compile(r"/confirm/"))
        page.get_by_role("button", name="Confirm").click()
        page.wait_for_load_state()
        assert "Subscription confirmed" in page.content()
        assert nl.store.status_on(sub.id, mlist.id) == MembershipStatus.ACTIVE
        assert len(_outbox(nl, reader)) == 2  # and the welcome mail

        # 3. An issue goes out; it reaches the reader.
        _send(nl, SAMPLE_MD)
        issue_mail = [m for m in _outbox(nl, reader) if "Brief" in str(m["Subject"])]
        assert len(issue_mail) == 1

        # 4. "View in browser" opens the archive page of that issue.
        page.set_content(_html(issue_mail[0]))
        page.get_by_role("link", name="View in browser").click()
        page.wait_for_url(re.compile(r"/archive/news/7$"))
        assert page.locator("h1").first.inner_text().strip() == "Digital Economy Brief"

        # 5. Click the mail's unsubscribe link, then the page's button.
        page.set_content(_html(issue_mail[0]))
        page.get_by_role("link", name="Unsubscribe").click()
        page.wait_for_url(re.compile(r"/unsubscribe/"))
        assert nl.store.status_on(sub.id, mlist.id) == MembershipStatus.ACTIVE  # GET: no change
        assert "b***@example.org" in page.content()
        page.get_by_role("button", name="Unsubscribe").click()
        page.wait_for_load_state()
        assert "You are unsubscribed" in page.content()
        assert nl.store.status_on(sub.id, mlist.id) == MembershipStatus.UNSUBSCRIBED
        browser.close()

    # 6. The next issue skips the address and still reaches everyone else.
    second = tmp_path / "next.md"
    second.write_text(SAMPLE_MD.read_text(encoding="utf-8").replace("number: 7", "number: 8"),
                      encoding="utf-8")
    _send(nl, second)
    assert len([m for m in _outbox(nl, reader) if "Brief" in str(m["Subject"])]) == 1
    assert len(_outbox(nl, "stays@example.org")) == 2
