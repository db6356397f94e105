"""Sending over real SMTP (aiosmtpd on loopback) into a real SQLite ledger."""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
from pathlib import Path

import pytest

from newsletter.errors import ConflictError
from newsletter.service import Newsletter
from newsletter.store.schema import CampaignStatus, DeliveryStatus, MembershipStatus
from newsletter.store.sql import NewMember

from .conftest import add_subscribers, make_settings
from .smtpd import Rule, SmtpTestServer

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")


def _send(nl: Newsletter, issue: Path, *slugs: str, again: bool = False):  # type: ignore[no-untyped-def]
    plan = nl.plan_send(issue, list(slugs), again=again)
    return plan, asyncio.run(nl.run(plan))


def _other_list(nl: Newsletter, *emails: str) -> None:
    """A second list, 'other', with these active members."""
    other = nl.store.create_list("other")
    nl.store.upsert_members(other.id, [NewMember(e) for e in emails], source="test")


def test_thousand_subscribers_each_receive_exactly_once(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path,
) -> None:
    add_subscribers(nl, "news", 1000)
    plan, report = _send(nl, issue, "news")
    assert plan.due == 1000
    assert report.aborted is None
    assert report.progress.sent == 1000
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 1000 and set(counts.values()) == {1}
    assert set(counts) == {f"user{i}@example.com" for i in range(1000)}
    ids, tokens = set(), set()
    for m in smtpd.messages:
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        assert msg["To"].addresses[0].addr_spec == m.rcpt_tos[0]
        # VERP: the return path names this very delivery, signed.
        local, _, domain = m.mail_from.partition("@")
        assert domain == "example.org" and local.startswith("bounce+")
        assert nl.signer.read_bounce_token(local.removeprefix("bounce+")) > 0
        ids.add(msg["Message-ID"])
        tokens.add(msg["List-Unsubscribe"])
        text = msg.get_body(("plain",)).get_content()
        assert f"Sent to {m.rcpt_tos[0]}" in text
    assert len(ids) == 1000 and len(tokens) == 1000
    ledger = nl.store.delivery_counts(plan.campaign.id)
    assert ledger[DeliveryStatus.SENT] == 1000 and ledger.total == 1000
    assert nl.store.get_campaign(plan.campaign.id).status == CampaignStatus.COMPLETED


def test_resend_needs_again_and_two_lists_get_one_copy(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path,
) -> None:
    add_subscribers(nl, "news", 5)
    _other_list(nl, "user1@example.com", "solo@example.com")
    _, report = _send(nl, issue, "news", "other")
    assert report.progress.sent == 6  # user1 is on both lists and gets one message
    assert smtpd.recorder.count_by_rcpt()["user1@example.com"] == 1
    with pytest.raises(ConflictError, match=r"already sent.*--again"):
        nl.plan_send(issue, ["news", "other"])
    _, report = _send(nl, issue, "news", "other", again=True)
    assert report.progress.sent == 6
    assert smtpd.recorder.count_by_rcpt()["user1@example.com"] == 2


def test_failures_are_recorded_as_the_right_kind(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path,
) -> None:
    add_subscribers(nl, "news", 20)
    rules = smtpd.recorder.rules
    rules["user1@example.com"] = Rule("rcpt", "450 4.2.1 mailbox busy, try later")
    rules["user2@example.com"] = Rule("rcpt", "550 5.1.1 no such user")
    rules["user3@example.com"] = Rule("data", "451 4.3.0 local error")
    rules["user4@example.com"] = Rule("data", "554 5.7.1 rejected as spam")
    rules["user5@example.com"] = Rule("data", None, store=True)  # accepted, reply lost
    rules["user6@example.com"] = Rule("rcpt", None)  # connection dropped before the message
    plan, report = _send(nl, issue, "news")
    p = report.progress
    assert (p.sent, p.failed_temp, p.failed_perm, p.unknown) == (14, 3, 2, 1)
    store = nl.store
    cid = plan.campaign.id
    status = {e: err for e, err in store.deliveries_of(cid, DeliveryStatus.FAILED_TEMP)}
    assert set(status) == {"user1@example.com", "user3@example.com", "user6@example.com"}
    assert "450" in status["user1@example.com"] and "451" in status["user3@example.com"]
    perm = dict(store.deliveries_of(cid, DeliveryStatus.FAILED_PERM))
    assert "550" in perm["user2@example.com"] and "554" in perm["user4@example.com"]
    assert [e for e, _ in store.deliveries_of(cid, DeliveryStatus.UNKNOWN)] == \
        ["user5@example.com"]
    received = smtpd.recorder.count_by_rcpt()
    assert received["user5@example.com"] == 1  # it did arrive: unknown is honest
    # Running the same send again retries the temporary failures only.
    rules.clear()
    plan2, report2 = _send(nl, issue, "news")
    assert plan2.campaign.id == cid and any("unknown" in n for n in plan2.notes)
    assert report2.start.retrying == 3 and report2.progress.sent == 3
    received = smtpd.recorder.count_by_rcpt()
    assert all(received[f"user{i}@example.com"] == 1 for i in range(20) if i not in (2, 4))
    assert received["user2@example.com"] == 0 and received["user4@example.com"] == 0
    with pytest.raises(ConflictError, match="already sent"):
        nl.plan_send(issue, ["news"])


def test_unsubscribed_addresses_are_not_sent_to(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path,
) -> None:
    add_subscribers(nl, "news", 10)
    nl.store.set_status("user3@example.com", MembershipStatus.UNSUBSCRIBED, source="cli")
    plan = nl.plan_send(issue, ["news"])
    assert plan.due == 9
    # Unsubscribes after the campaign is created and while it is queued still win.
    nl.store.set_status("user4@example.com", MembershipStatus.UNSUBSCRIBED, source="cli")
    report = asyncio.run(nl.run(plan))
    assert report.progress.sent == 8
    received = smtpd.recorder.count_by_rcpt()
    assert "user3@example.com" not in received and "user4@example.com" not in received


def test_unsubscribe_during_a_running_send_is_honoured(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, send_concurrency=1,
                                  batch_size=10))
    add_subscribers(nl, "news", 40)
    smtpd.recorder.delay = 0.01
    plan = nl.plan_send(issue, ["news"])

    async def scenario() -> None:
        task = asyncio.create_task(nl.run(plan))
        while len(smtpd.messages) < 5:
            await asyncio.sleep(0.005)
        # user39 is in a later batch; user6..9 may already be fetched into the queue.
        for n in (8, 9, 39):
            nl.store.set_status(f"user{n}@example.com", MembershipStatus.UNSUBSCRIBED,
                                source="cli")
        report = await task
        assert report.progress.skipped + report.progress.sent == 40

    asyncio.run(scenario())
    received = smtpd.recorder.count_by_rcpt()
    assert not {"user8@example.com", "user9@example.com", "user39@example.com"} & set(received)
    assert len(received) == 37


def test_relay_down_stops_the_run_and_keeps_everyone_due(tmp_path: Path, issue: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nl = Newsletter(make_settings(tmp_path, smtp_url=f"smtp://127.0.0.1:{port}"))
    add_subscribers(nl, "news", 200)
    plan, report = _send(nl, issue, "news")
    assert report.aborted is not None and "failed 8 times in a row" in report.aborted
    assert "cannot connect" in report.aborted
    # Paused with the reason, instead of burning through the list.
    paused = nl.store.get_campaign(plan.campaign.id)
    assert paused.status == "paused" and "cannot connect" in (paused.status_note or "")
    counts = nl.store.delivery_counts(plan.campaign.id)
    assert counts[DeliveryStatus.SENT] == 0
    assert counts.due == 200  # nothing lost: queued or failed temporarily, all due again
    with SmtpTestServer() as smtpd:  # the relay comes back; the same command finishes the job
        nl2 = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
        with pytest.raises(ConflictError, match="is paused"):  # not by accident
            nl2.plan_send(issue, ["news"])
        plan2 = nl2.resume_plan(plan.campaign.id)
        report2 = asyncio.run(nl2.run(plan2))
        assert report2.progress.sent == 200
        assert set(smtpd.recorder.count_by_rcpt().values()) == {1}


def test_capture_mode_writes_a_maildir(tmp_path: Path, issue: Path) -> None:
    nl = Newsletter(make_settings(tmp_path))  # no SMTP_URL
    assert nl.capture_mode
    add_subscribers(nl, "news", 25)
    _, report = _send(nl, issue, "news")
    assert report.progress.sent == 25
    box = mailbox.Maildir(nl.settings.outbox_dir, create=False)
    msgs = [email.message_from_bytes(m.as_bytes(), policy=email.policy.default) for m in box]
    assert len(msgs) == 25
    assert {str(m["Delivered-To"]) for m in msgs} == {f"user{i}@example.com" for i in range(25)}
    assert all(m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click" for m in msgs)


def test_rate_limit_spaces_messages(tmp_path: Path, smtpd: SmtpTestServer, issue: Path) -> None:
    import time

    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, send_rate=50))
    add_subscribers(nl, "news", 20)
    start = time.monotonic()
    _, report = _send(nl, issue, "news")
    assert report.progress.sent == 20
    # 20 messages at 50/s cannot take less than 19 intervals of 20 ms.
    assert time.monotonic() - start >= 0.38


def test_sending_does_not_render_again(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Jinja and premailer run once, when the campaign is created; never per recipient."""
    import newsletter.render.issue as render_issue_mod

    add_subscribers(nl, "news", 50)
    plan = nl.plan_send(issue, ["news"])

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("rendered during the send")

    monkeypatch.setattr(render_issue_mod, "render_template", forbidden)
    monkeypatch.setattr(render_issue_mod, "inline_css", forbidden)
    monkeypatch.setattr("premailer.Premailer", forbidden)
    report = asyncio.run(nl.run(plan))
    assert report.progress.sent == 50


def test_overlapping_list_sets_never_send_a_second_copy(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path,
) -> None:
    add_subscribers(nl, "news", 10)
    _other_list(nl, "user1@example.com", "fresh@example.com")
    _, first = _send(nl, issue, "news")
    assert first.progress.sent == 10
    plan, second = _send(nl, issue, "news", "other")  # a new list set, the same issue
    assert plan.due == 1 and any("already got this issue" in n for n in plan.notes)
    assert second.progress.sent == 1
    counts = smtpd.recorder.count_by_rcpt()
    assert counts["fresh@example.com"] == 1 and max(counts.values()) == 1


def test_again_refuses_while_a_campaign_is_unfinished(nl: Newsletter, issue: Path) -> None:
    add_subscribers(nl, "news", 3)
    nl.plan_send(issue, ["news"])  # created, never run
    with pytest.raises(ConflictError, match="unfinished; run without --again"):
        nl.plan_send(issue, ["news"], again=True)


def test_cancelling_a_send_always_stops_it(tmp_path: Path, smtpd: SmtpTestServer,
                                           issue: Path) -> None:
    """Cancellation (Ctrl-C) ends the run promptly and leaves at most one row per connection
    in flight, however it races with the relay's replies."""
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, send_concurrency=8))
    add_subscribers(nl, "news", 3000)
    smtpd.recorder.delay = 0.001

    async def cancel_after(plan_delay: float) -> None:
        plan = nl.plan_send(issue, ["news"])
        task = asyncio.create_task(nl.run(plan))
        await asyncio.sleep(plan_delay)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=15)
        assert done, "the send did not stop after being cancelled"
        counts = nl.store.delivery_counts(plan.campaign.id)
        assert counts[DeliveryStatus.SENDING] <= 8

    for delay in (0.2, 0.35, 0.5):
        asyncio.run(cancel_after(delay))
    received = smtpd.recorder.count_by_rcpt()
    assert received and max(received.values()) == 1
