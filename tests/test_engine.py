"""The engine against the FakeRelay: outcomes, relay failures, ledger invariants."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from newsletter.delivery.engine import Engine
from newsletter.delivery.fake import FakeRelay
from newsletter.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayError,
    TemporaryDeliveryError,
    UnknownOutcomeError,
)
from newsletter.render.issue import RenderedIssue
from newsletter.service import Newsletter
from newsletter.store.schema import DeliveryStatus

from .conftest import add_subscribers, make_settings
from .test_content import MD

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")


def _run(tmp_path: Path, relay: FakeRelay, n: int, **engine_kw: object):  # type: ignore[no-untyped-def]
    nl = Newsletter(make_settings(tmp_path))
    add_subscribers(nl, "news", n)
    issue = tmp_path / "i.md"
    issue.write_text(MD, encoding="utf-8")
    plan = nl.plan_send(issue, ["news"])
    c = plan.campaign
    message = nl.prepare(RenderedIssue(c.subject, c.html, c.text, "en"), plan.lists,
                         campaign_id=c.id)
    engine = Engine(nl.store, relay, **engine_kw)  # type: ignore[arg-type]
    report = asyncio.run(engine.run(c.id, message, sender="digest@example.org"))
    return nl, c.id, report


def test_each_kind_of_failure_lands_in_its_ledger_status(tmp_path: Path) -> None:
    errors: dict[str, DeliveryError] = {
        "user1@example.com": TemporaryDeliveryError("busy", code=450),
        "user2@example.com": PermanentDeliveryError("no such user", code=550),
        "user3@example.com": UnknownOutcomeError("no reply"),
    }
    relay = FakeRelay(fail=errors.get)
    nl, cid, report = _run(tmp_path, relay, 50, concurrency=3)
    counts = nl.store.delivery_counts(cid)
    assert counts[DeliveryStatus.SENT] == 47 == relay.count
    assert counts[DeliveryStatus.FAILED_TEMP] == 1
    assert counts[DeliveryStatus.FAILED_PERM] == 1
    assert counts[DeliveryStatus.UNKNOWN] == 1
    assert counts[DeliveryStatus.SENDING] == 0 and counts[DeliveryStatus.QUEUED] == 0
    assert report.aborted is None
    assert relay.connections == 3  # connections are reused, not opened per message


def test_a_failing_relay_stops_the_run_and_loses_nobody(tmp_path: Path) -> None:
    relay = FakeRelay(fail=lambda rcpt: RelayError("535 authentication failed"))
    nl, cid, report = _run(tmp_path, relay, 300, concurrency=4, max_relay_failures=6)
    assert report.aborted and "535 authentication failed" in report.aborted
    counts = nl.store.delivery_counts(cid)
    assert counts[DeliveryStatus.SENT] == 0
    assert counts.due == 300  # failed temporarily or still queued: all due next run
    assert counts[DeliveryStatus.FAILED_TEMP] < 20  # it stopped early


def test_recipient_failures_do_not_count_as_relay_failures(tmp_path: Path) -> None:
    relay = FakeRelay(fail=lambda rcpt: PermanentDeliveryError("550 no such user", code=550))
    nl, cid, report = _run(tmp_path, relay, 100, concurrency=2, max_relay_failures=5)
    assert report.aborted is None
    assert nl.store.delivery_counts(cid)[DeliveryStatus.FAILED_PERM] == 100
