"""The delivery engine at full strength, over real SMTP: retries with backoff, bounces and
suppression, several relays, rate windows, pause/resume/cancel from another process."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from newsletter.delivery.engine import Progress, RelayPlan, RetryPolicy, bad_address
from newsletter.delivery.relay import SmtpRelayClient
from newsletter.errors import PermanentDeliveryError
from newsletter.render.issue import RenderedIssue
from newsletter.service import Newsletter, SendPlan
from newsletter.settings import SmtpRelay
from newsletter.store.schema import CampaignStatus, DeliveryStatus, MembershipStatus
from newsletter.store.sql import NewMember

from .conftest import SECRET, add_subscribers, database_url, make_settings, run_cli
from .smtpd import Rule, SmtpTestServer
from .test_content import MD

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")

FAST_RETRY: dict[str, Any] = {"retry_base_seconds": 0.01, "retry_max_interval_seconds": 0.05,
                              "retry_wait_seconds": 30}


def _send(nl: Newsletter, issue: Path, *slugs: str) -> tuple[SendPlan, Any]:
    plan = nl.plan_send(issue, list(slugs))
    return plan, asyncio.run(nl.run(plan))


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- temporary failures ------------------------------------------------------------------------

def test_random_4xx_and_disconnects_are_all_delivered_after_retries(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, relay_failure_limit=1000,
                                  **FAST_RETRY))
    add_subscribers(nl, "news", 500)
    smtpd.recorder.random_4xx = 0.10
    smtpd.recorder.random_drop = 0.02
    plan, report = _send(nl, issue, "news")
    counts = smtpd.recorder.count_by_rcpt()
    assert smtpd.recorder.refused > 40  # the faults really happened
    assert len(counts) == 500 and set(counts.values()) == {1}
    ledger = nl.store.delivery_counts(plan.campaign.id)
    assert ledger[DeliveryStatus.SENT] == 500 and ledger.remaining == 0
    assert report.progress.retried >= smtpd.recorder.refused
    assert nl.store.get_campaign(plan.campaign.id).status == CampaignStatus.COMPLETED


@pytest.mark.sqlite_only(reason="no database involved")
def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(base=60, max_interval=3600)
    for attempts, ceiling in ((1, 60), (2, 120), (3, 240), (8, 3600), (30, 3600)):
        delays = [policy.delay(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 3) for d in delays}) > 150  # jittered, not lockstep


def test_temporary_failures_expire_at_the_maximum_age_and_keep_their_history(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, retry_base_seconds=0.05,
                                  retry_max_interval_seconds=0.1, retry_wait_seconds=10,
                                  retry_max_age_hours=0.5 / 3600))
    add_subscribers(nl, "news", 5)
    smtpd.recorder.rules["user2@example.com"] = Rule("rcpt", "452 4.2.2 mailbox full")
    plan, report = _send(nl, issue, "news")
    ledger = nl.store.delivery_counts(plan.campaign.id)
    assert ledger[DeliveryStatus.SENT] == 4 and ledger[DeliveryStatus.EXPIRED] == 1
    (email, error), = nl.store.deliveries_of(plan.campaign.id, DeliveryStatus.EXPIRED)
    assert email == "user2@example.com" and "gave up after" in error and "452" in error
    assert report.status == CampaignStatus.COMPLETED  # given up, reported, not left hanging


def test_a_run_leaves_far_retries_due_and_says_when(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))  # 60 s backoff, no waiting
    add_subscribers(nl, "news", 5)
    smtpd.recorder.rules["user1@example.com"] = Rule("rcpt", "450 4.2.0 greylisted", times=1)
    plan, report = _send(nl, issue, "news")
    assert report.status == CampaignStatus.RUNNING and report.next_retry is not None
    campaign = nl.store.get_campaign(plan.campaign.id)
    assert campaign.status == CampaignStatus.RUNNING and campaign.runner is None
    # Resuming is asking for it now: the greylisted address gets it.
    report2 = asyncio.run(nl.run(nl.resume_plan(plan.campaign.id)))
    assert report2.progress.sent == 1 and report2.status == CampaignStatus.COMPLETED
    assert set(smtpd.recorder.count_by_rcpt().values()) == {1}


# --- permanent failures, bounces, suppression --------------------------------------------------

def test_5xx_is_not_retried_bounces_the_address_and_suppresses_it_everywhere(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, **FAST_RETRY))
    add_subscribers(nl, "news", 10)
    other = nl.store.create_list("other")
    nl.store.upsert_members(other.id, [NewMember("user3@example.com"),
                                       NewMember("user4@example.com"),
                                       NewMember("fresh@example.com")], source="test")
    smtpd.recorder.rules["user3@example.com"] = Rule("rcpt", "550 5.1.1 no such user")
    smtpd.recorder.rules["user4@example.com"] = Rule("data", "554 5.7.1 message refused")
    plan, _ = _send(nl, issue, "news")
    failed = dict(nl.store.deliveries_of(plan.campaign.id, DeliveryStatus.FAILED_PERM))
    assert set(failed) == {"user3@example.com", "user4@example.com"}
    news = nl.store.get_list("news").id
    bad = nl.store.find_subscriber("user3@example.com")
    policy = nl.store.find_subscriber("user4@example.com")
    assert bad is not None and policy is not None
    # The address is bad: bounced, counted, suppressed for every list.
    assert nl.store.status_on(bad.id, news) == MembershipStatus.BOUNCED
    assert nl.store.bounce_counts(bad.id) == (1, 0) and nl.store.is_suppressed(bad.email)
    # A policy refusal (5.7.1) is about the message, not the address: nothing changes.
    assert nl.store.status_on(policy.id, news) == MembershipStatus.ACTIVE
    assert not nl.store.is_suppressed(policy.email)
    # Not retried: the server saw each of them once, and resuming sends nothing more.
    attempts = smtpd.recorder.refused
    asyncio.run(nl.run(nl.resume_plan(plan.campaign.id)))
    assert smtpd.recorder.refused == attempts and "user3@example.com" not in \
        smtpd.recorder.count_by_rcpt()
    # The other list's next send skips the suppressed address but not the refused one.
    smtpd.recorder.rules.clear()
    before = len(smtpd.messages)
    other_issue = tmp_path / "other.md"
    other_issue.write_text(MD.replace("number: ", "number: 1"), encoding="utf-8")
    _send(nl, other_issue, "other")
    got = sorted(m.rcpt_tos[0] for m in smtpd.messages[before:])
    assert got == ["fresh@example.com", "user4@example.com"]


def test_bounce_threshold_is_configurable(tmp_path: Path, smtpd: SmtpTestServer) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, bounce_threshold=2))
    add_subscribers(nl, "news", 2)
    sub = nl.store.find_subscriber("user0@example.com")
    assert sub is not None
    lid = nl.store.get_list("news").id
    assert nl.store.record_bounce(subscriber_id=sub.id, list_id=lid, hard=True,
                                  reason="550 5.1.1", threshold=2)
    assert nl.store.status_on(sub.id, lid) == MembershipStatus.BOUNCED
    assert not nl.store.is_suppressed(sub.email)
    nl.store.record_bounce(subscriber_id=sub.id, hard=True, reason="550 5.1.1", threshold=2)
    assert nl.store.is_suppressed(sub.email)
    assert nl.store.record_bounce(subscriber_id=sub.id, hard=False, reason="452 4.2.2")
    assert nl.store.bounce_counts(sub.id) == (2, 1)


@pytest.mark.sqlite_only(reason="no database involved")
@pytest.mark.parametrize(("reply", "bad"), [
    ("550 5.1.1 user unknown (at RCPT)", True), ("550 5.2.1 mailbox disabled (at RCPT)", True),
    ("554 5.7.1 spam detected (at end of DATA)", False), ("550 5.7.26 DMARC (at RCPT)", False),
    ("550 no such user (at RCPT)", True), ("554 transaction failed (at end of DATA)", False),
])
def test_which_5xx_replies_bounce_the_address(reply: str, bad: bool) -> None:
    code, _, text = reply.partition(" ")
    assert bad_address(PermanentDeliveryError(text, code=int(code))) is bad


# --- several relays -------------------------------------------------------------------------------

def test_two_relays_share_the_load(
    tmp_path: Path, issue: Path,
) -> None:
    with SmtpTestServer() as a, SmtpTestServer() as b:
        relays = [{"url": a.url, "name": "a", "concurrency": 2},
                  {"url": b.url, "name": "b", "concurrency": 2}]
        nl = Newsletter(make_settings(tmp_path, relays=relays))
        add_subscribers(nl, "news", 300)
        a.recorder.delay = b.recorder.delay = 0.001
        _send(nl, issue, "news")
        got_a, got_b = a.recorder.count_by_rcpt(), b.recorder.count_by_rcpt()
        assert len(got_a) > 50 and len(got_b) > 50  # both relays carried a share
        assert not set(got_a) & set(got_b) and len(got_a) + len(got_b) == 300


def test_a_dead_relay_is_taken_out_and_the_other_carries_the_send(
    tmp_path: Path, issue: Path,
) -> None:
    with SmtpTestServer() as up:
        relays = [{"url": f"smtp://127.0.0.1:{_dead_port()}", "name": "down", "concurrency": 2},
                  {"url": up.url, "name": "up", "concurrency": 2}]
        nl = Newsletter(make_settings(tmp_path, relays=relays, relay_failure_limit=3,
                                      **FAST_RETRY))
        add_subscribers(nl, "news", 200)
        plan, report = _send(nl, issue, "news")
        assert report.aborted is None and report.status == CampaignStatus.COMPLETED
        counts = up.recorder.count_by_rcpt()
        assert len(counts) == 200 and set(counts.values()) == {1}
        ledger = nl.store.delivery_counts(plan.campaign.id)
        assert ledger[DeliveryStatus.SENT] == 200


@pytest.mark.sqlite_only(reason="no database involved")
def test_relays_are_chosen_by_the_from_domain(tmp_path: Path) -> None:
    relays = [{"url": "smtp://127.0.0.1:2501", "name": "other", "from_domains": ["other.org"]},
              {"url": "smtp://127.0.0.1:2502", "name": "ours", "from_domains": ["example.org"]},
              {"url": "smtp://127.0.0.1:2503", "name": "any"}]
    nl = Newsletter(make_settings(tmp_path, relays=relays))
    assert [p.name for p in nl.relay_plans()] == ["ours"]
    nl = Newsletter(make_settings(tmp_path, relays=relays, from_address="x@third.org"))
    assert [p.name for p in nl.relay_plans()] == ["any"]


# --- rate windows -----------------------------------------------------------------------------

def test_a_full_window_makes_the_run_wait_and_resume_by_itself(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 90)
    plan = nl.plan_send(issue, ["news"])
    c = plan.campaign
    message = nl.prepare(RenderedIssue(c.subject, c.html, c.text, "en"), plan.lists,
                         campaign_id=c.id)
    notes: list[str] = []
    relay = RelayPlan(SmtpRelayClient(SmtpRelay.from_url(smtpd.url), timeout=10), name="w",
                      concurrency=3, windows=((40, 1.0),))

    def seen(p: Progress) -> None:
        if p.note and p.note not in notes:
            notes.append(p.note)

    engine = nl.engine([relay], on_progress=seen)
    report = asyncio.run(engine.run(c.id, message, sender="digest@example.org"))
    assert report.status == CampaignStatus.COMPLETED and report.progress.sent == 90
    assert set(smtpd.recorder.count_by_rcpt().values()) == {1}
    assert any("1-second limit of 40 reached" in n for n in notes)
    # Usage is in the database (so the next run, in any process, starts from it): never
    # more than 40 in a second, so 90 took at least three seconds' windows.
    usage = nl.store.relay_usage(int(time.time()) - 60)["w"]
    assert sum(n for _, n in usage) == 90
    assert max(n for _, n in usage) <= 40 and len(usage) >= 3


def test_an_hourly_limit_shows_in_the_campaign_status(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, send_per_hour=25))
    add_subscribers(nl, "news", 40)
    plan = nl.plan_send(issue, ["news"])
    thread = threading.Thread(target=lambda: asyncio.run(nl.run(plan)))
    thread.start()
    watcher = Newsletter(nl.settings)  # as another process sees it
    deadline = time.monotonic() + 20
    note = ""
    while time.monotonic() < deadline:
        note = watcher.store.get_campaign(plan.campaign.id).status_note or ""
        if "hourly limit of 25 reached" in note:
            break
        time.sleep(0.05)
    assert "hourly limit of 25 reached; resumes at" in note
    assert len(smtpd.messages) == 25
    watcher.store.pause_campaign(plan.campaign.id)
    thread.join(10)
    assert not thread.is_alive()
    counts = watcher.store.delivery_counts(plan.campaign.id)
    assert counts[DeliveryStatus.SENT] == 25 and counts.remaining == 15  # waiting, not done
    assert watcher.store.get_campaign(plan.campaign.id).status == CampaignStatus.PAUSED


# --- campaign control from another process ----------------------------------------------------

def _cli(tmp_path: Path, smtpd: SmtpTestServer, *args: str) -> subprocess.CompletedProcess[str]:
    # As make_settings: a run ends instead of waiting for a retry (a temporary failure
    # then shows in the ledger's counts, not as a command that never returns).
    env = {"NEWSLETTER_DATABASE_URL": database_url(tmp_path),
           "NEWSLETTER_VAR_DIR": str(tmp_path / "var"), "NEWSLETTER_SMTP_URL": smtpd.url,
           "NEWSLETTER_SECRET_KEY": SECRET, "NEWSLETTER_RETRY_WAIT_SECONDS": "0",
           "PATH": "/usr/bin:/bin"}
    return run_cli(*args, env=env, cwd=tmp_path, timeout=60,
                   on_hang=lambda: f"the database then: {_database_state(database_url(tmp_path))}")


def _database_state(url: str) -> str:
    """For a command that hangs: the ledger's counts, and on PostgreSQL who waits on what."""
    from sqlalchemy import text

    from newsletter.store.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            state = [tuple(r) for r in conn.execute(text(
                "SELECT campaign_id, status, count(*) FROM deliveries "
                "GROUP BY campaign_id, status"))]
            state += [tuple(r) for r in conn.execute(text(
                "SELECT id, status, runner, status_note FROM campaigns"))]
            if engine.dialect.name == "postgresql":
                state += [tuple(r) for r in conn.execute(text(
                    "SELECT pid, state, wait_event_type, wait_event, pg_blocking_pids(pid), "
                    "left(query, 120) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"))]
        return repr(state)
    finally:
        engine.dispose()


def test_pause_resume_and_cancel_from_another_process_without_duplicates(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, send_concurrency=2))
    add_subscribers(nl, "news", 400)
    smtpd.recorder.delay = 0.004
    plan = nl.plan_send(issue, ["news"])
    cid = plan.campaign.id
    thread = threading.Thread(target=lambda: asyncio.run(nl.run(plan)))
    thread.start()
    while len(smtpd.messages) < 40:
        time.sleep(0.01)
    paused = _cli(tmp_path, smtpd, "campaigns", "pause", str(cid))
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stderr
    thread.join(10)
    assert not thread.is_alive()
    stopped_at = len(smtpd.messages)
    assert stopped_at < 400
    time.sleep(0.3)
    assert len(smtpd.messages) == stopped_at  # nothing goes out while paused
    shown = _cli(tmp_path, smtpd, "campaigns", "show", str(cid)).stdout
    assert "paused" in shown and "remaining" in shown
    assert nl.store.get_campaign(cid).status == CampaignStatus.PAUSED
    # `send` of a paused campaign's issue does not sneak past the pause.
    refused = _cli(tmp_path, smtpd, "send", str(issue), "--list", "news", "--yes")
    assert refused.returncode != 0 and "is paused" in refused.stderr

    smtpd.recorder.delay = 0.0
    resumed = _cli(tmp_path, smtpd, "campaigns", "resume", str(cid))
    assert resumed.returncode == 0, resumed.stderr
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 400 and set(counts.values()) == {1}
    assert nl.store.get_campaign(cid).status == CampaignStatus.COMPLETED
    listed = _cli(tmp_path, smtpd, "campaigns", "ls").stdout
    assert "completed" in listed

    # Cancel: stops for good; a later send of the issue never repeats anyone.
    second = tmp_path / "second.md"
    second.write_text(MD.replace("number: ", "number: 2"), encoding="utf-8")
    smtpd.recorder.delay = 0.004
    before = len(smtpd.messages)
    plan2 = nl.plan_send(second, ["news"])
    thread = threading.Thread(target=lambda: asyncio.run(nl.run(plan2)))
    thread.start()
    while len(smtpd.messages) - before < 30:
        time.sleep(0.01)
    assert _cli(tmp_path, smtpd, "campaigns", "cancel", str(plan2.campaign.id),
                "--yes").returncode == 0
    thread.join(10)
    assert nl.store.get_campaign(plan2.campaign.id).status == CampaignStatus.CANCELLED
    got = len(smtpd.messages) - before
    assert got < 400
    resume = _cli(tmp_path, smtpd, "campaigns", "resume", str(plan2.campaign.id))
    assert resume.returncode != 0 and "cancelled" in resume.stderr
    smtpd.recorder.delay = 0.0
    again = _cli(tmp_path, smtpd, "send", str(second), "--list", "news", "--yes")
    assert again.returncode == 0, again.stderr
    second_counts = {r: n for r, n in smtpd.recorder.count_by_rcpt().items()}
    # Everyone has issue 1 once and issue 2 once: 2 messages each.
    assert set(second_counts.values()) == {2} and len(second_counts) == 400


def test_retry_unknown_resends_only_the_unknowns(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 20)
    # Accepted but never answered: the sender cannot know (unknown).
    smtpd.recorder.rules["user5@example.com"] = Rule("data", None, store=True, times=1)
    plan, _ = _send(nl, issue, "news")
    cid = plan.campaign.id
    assert nl.store.delivery_counts(cid)[DeliveryStatus.UNKNOWN] == 1
    assert _cli(tmp_path, smtpd, "campaigns", "resume", str(cid)).returncode == 0
    assert smtpd.recorder.count_by_rcpt()["user5@example.com"] == 1  # not resent by resume
    out = _cli(tmp_path, smtpd, "campaigns", "retry", str(cid), "--unknown")
    assert out.returncode == 0 and "1 deliveries" in out.stdout, out.stderr
    counts = smtpd.recorder.count_by_rcpt()
    assert counts["user5@example.com"] == 2 and max(
        n for r, n in counts.items() if r != "user5@example.com") == 1


# --- DKIM and bounces end to end ----------------------------------------------------------------

def test_dkim_signed_send_verifies_on_what_the_server_received(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    import dkim

    from .test_dkim import dns, make_rsa_key

    key = make_rsa_key(2048, seed=7)
    key_file = tmp_path / "dkim.key"
    key_file.write_bytes(key.pkcs8)
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, dkim_key_file=key_file,
                                  dkim_selector="nl2026"))
    add_subscribers(nl, "news", 12)
    _send(nl, issue, "news")
    assert len(smtpd.messages) == 12
    lookup = dns(key.record, selector="nl2026", domain="example.org")
    for m in smtpd.messages:
        assert m.data.startswith(b"DKIM-Signature:")
        assert dkim.verify(m.data, dnsfunc=lookup)
        header = m.data.split(b"\r\n\r\n", 1)[0].decode().lower()
        assert "list-unsubscribe-post" in header.split("h=", 1)[1].split(";")[0]
    tampered = smtpd.messages[0].data.replace(b"List-Unsubscribe=One-Click",
                                             b"List-Unsubscribe=Two-Clicks")
    assert not dkim.verify(tampered, dnsfunc=lookup)


def test_a_later_bounce_to_the_verp_address_bounces_the_membership(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    import aiosmtplib

    from newsletter.delivery.bounces import BounceServer

    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 5)
    plan, _ = _send(nl, issue, "news")
    sent = {m.rcpt_tos[0]: m for m in smtpd.messages}
    victim = sent["user3@example.com"]
    message_id = next(line for line in victim.data.split(b"\r\n")
                      if line.lower().startswith(b"message-id:")).split(b":", 1)[1].strip()
    mid = message_id.decode()
    dsn = (
        f"From: MAILER-DAEMON@mx.example.com\r\nTo: {victim.mail_from}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nThe mailbox does not exist.\r\n"
        "--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        "Final-Recipient: rfc822; user3@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n"
        f"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: {mid}\r\n\r\n--b--\r\n"
    ).encode()

    async def deliver_bounce() -> None:
        server = BounceServer(nl.record_bounces)
        async with server:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port)
            async with smtp:
                await smtp.sendmail("", [victim.mail_from], dsn)
                await smtp.sendmail("", [victim.mail_from], dsn)  # an MTA retrying

    asyncio.run(deliver_bounce())
    sub = nl.store.find_subscriber("user3@example.com")
    assert sub is not None
    assert nl.store.status_on(sub.id, nl.store.get_list("news").id) == MembershipStatus.BOUNCED
    assert nl.store.bounce_counts(sub.id) == (1, 0)  # the retry was not counted twice
    assert nl.store.is_suppressed("user3@example.com")
    (email, error), = nl.store.deliveries_of(plan.campaign.id, DeliveryStatus.FAILED_PERM)
    assert email == "user3@example.com" and "5.1.1" in error
    # A forged bounce (bad token) changes nothing.
    forged = dsn.replace(b"user3@example.com", b"user1@example.com")
    bad_rp = "bounce+" + "a" * 42 + "@example.org"

    async def forge() -> None:
        async with BounceServer(nl.record_bounces) as server:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port)
            async with smtp:
                await smtp.sendmail("", [bad_rp], forged.replace(
                    victim.mail_from.encode(), bad_rp.encode()))

    asyncio.run(forge())
    other = nl.store.find_subscriber("user1@example.com")
    assert other is not None
    assert nl.store.status_on(other.id, nl.store.get_list("news").id) == MembershipStatus.ACTIVE


def test_bounces_scan_reads_a_maildir_once(tmp_path: Path, smtpd: SmtpTestServer,
                                           issue: Path) -> None:
    import mailbox

    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 3)
    _send(nl, issue, "news")
    victim = next(m for m in smtpd.messages if m.rcpt_tos == ["user2@example.com"])
    box = mailbox.Maildir(tmp_path / "bounces", create=True)
    sample = (Path(__file__).parent / "data" / "bounces" / "postfix_user_unknown.eml").read_bytes()
    box.add(b"Delivered-To: " + victim.mail_from.encode() + b"\r\n" + sample)
    first = _cli(tmp_path, smtpd, "bounces", "scan", str(tmp_path / "bounces"))
    assert first.returncode == 0 and "1 matched" in first.stdout, first.stdout + first.stderr
    again = _cli(tmp_path, smtpd, "bounces", "scan", str(tmp_path / "bounces"))
    assert "0 message(s)" in again.stdout
    sub = nl.store.find_subscriber("user2@example.com")
    assert sub is not None and nl.store.bounce_counts(sub.id)[0] == 1


def test_a_stalled_relay_times_out_and_the_rows_are_retried_later(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, smtp_timeout=0.3,
                                  send_concurrency=2))
    add_subscribers(nl, "news", 4)
    smtpd.recorder.stall = 1.0  # answers RCPT after the sender has given up
    plan, report = _send(nl, issue, "news")
    counts = nl.store.delivery_counts(plan.campaign.id)
    assert counts[DeliveryStatus.FAILED_TEMP] == 4 and counts[DeliveryStatus.SENT] == 0
    assert all("timed out" in e.lower() or "lost" in e.lower()
               for _, e in nl.store.deliveries_of(plan.campaign.id, DeliveryStatus.FAILED_TEMP))
    assert report.status == CampaignStatus.RUNNING  # retries due, not "completed"
    smtpd.recorder.stall = 0.0
    asyncio.run(nl.run(nl.resume_plan(plan.campaign.id)))
    got = smtpd.recorder.count_by_rcpt()
    assert len(got) == 4 and set(got.values()) == {1}


def test_the_scheduler_sends_retries_when_they_fall_due(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    """Nobody runs a command: the scheduler (as in `newsletter serve`) picks up a campaign
    whose temporary failures are due again."""
    from newsletter.scheduling import Scheduler

    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, retry_base_seconds=0.3,
                                  retry_max_interval_seconds=0.3))
    add_subscribers(nl, "news", 5)
    smtpd.recorder.rules["user2@example.com"] = Rule("rcpt", "450 4.2.0 greylisted", times=1)
    plan, report = _send(nl, issue, "news")
    assert report.status == CampaignStatus.RUNNING  # a retry is due later; the run ended

    async def scheduler_for_a_while() -> None:
        scheduler = Scheduler(nl, tick=0.1, sweep=0.1)
        await scheduler.start()
        try:
            for _ in range(100):
                if nl.store.get_campaign(plan.campaign.id).status == CampaignStatus.COMPLETED:
                    break
                await asyncio.sleep(0.05)
        finally:
            await scheduler.stop()

    asyncio.run(scheduler_for_a_while())
    assert nl.store.get_campaign(plan.campaign.id).status == CampaignStatus.COMPLETED
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 5 and set(counts.values()) == {1}


def test_two_campaigns_sent_at_once_by_one_process(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    """The scheduler may fire one campaign while resuming another: each run needs its own
    ledger writer."""
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 300)
    other = tmp_path / "other.md"
    other.write_text(MD.replace("number: 3", "number: 4"), encoding="utf-8")
    smtpd.recorder.delay = 0.001
    plans = [nl.plan_send(issue, ["news"]), nl.plan_send(other, ["news"])]

    async def both() -> None:
        await asyncio.gather(*(nl.run(p) for p in plans))

    asyncio.run(both())
    for p in plans:
        assert nl.store.delivery_counts(p.campaign.id)[DeliveryStatus.SENT] == 300
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 300 and set(counts.values()) == {2}
