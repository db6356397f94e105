"""A send killed with SIGKILL midway and run again: nobody gets the issue twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newsletter.content.parse import load_issue
from newsletter.service import Newsletter
from newsletter.store.schema import DeliveryStatus

from .conftest import SECRET, add_subscribers, database_url, make_settings, run_cli
from .smtpd import SmtpTestServer
from .test_content import MD

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")

CONCURRENCY = 4


def _env(tmp_path: Path, smtpd: SmtpTestServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update({
        "NEWSLETTER_DATABASE_URL": database_url(tmp_path),
        "NEWSLETTER_VAR_DIR": str(tmp_path / "var"),
        "NEWSLETTER_SMTP_URL": smtpd.url,
        "NEWSLETTER_SECRET_KEY": SECRET,
        "NEWSLETTER_FROM": "Digest Desk <digest@example.org>",
        "NEWSLETTER_SEND_CONCURRENCY": str(CONCURRENCY),
        "NEWSLETTER_BATCH_SIZE": "50",
    })
    return env


def _send_args(issue: Path) -> list[str]:
    return ["send", str(issue), "--list", "news", "--yes"]


def _send_cmd(issue: Path) -> list[str]:
    return [sys.executable, "-m", "newsletter", *_send_args(issue)]


# On PostgreSQL two kill points of the four (the suite's time; the ledger code is the same).
_PG_SPARED = pytest.mark.sqlite_only(reason="two kill points are enough on PostgreSQL")


@pytest.mark.parametrize(("sig", "kill_after"), [
    pytest.param(signal.SIGKILL, 1, marks=_PG_SPARED), (signal.SIGKILL, 150),
    pytest.param(signal.SIGKILL, 600, marks=_PG_SPARED), (signal.SIGINT, 300),
])
def test_killed_send_resumes_without_duplicates(tmp_path: Path, smtpd: SmtpTestServer,
                                                sig: signal.Signals, kill_after: int) -> None:
    n = 800
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", n)
    issue = tmp_path / "issue.md"
    issue.write_text(MD, encoding="utf-8")
    smtpd.recorder.delay = 0.003  # slow enough to be killed in the middle
    env = _env(tmp_path, smtpd)
    log = (tmp_path / "first-run.log").open("wb")
    # The child gets the default SIGINT disposition even when this test runs in a background
    # job (where shells set SIGINT to ignored and Python then keeps it so).
    proc = subprocess.Popen(_send_cmd(issue), env=env, cwd=tmp_path, stdout=log, stderr=log,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(smtpd.messages) < kill_after and time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "first-run.log").read_text()
        time.sleep(0.001)
    proc.send_signal(sig)
    code = proc.wait(20)
    log.close()
    if sig == signal.SIGINT:  # Ctrl-C: a clean stop that records what it knows
        assert code == 130, (tmp_path / "first-run.log").read_text()
        assert "interrupted" in (tmp_path / "first-run.log").read_text()
    first = len(smtpd.messages)
    assert first < n, "the send finished before it could be killed; slow the server down"

    smtpd.recorder.delay = 0
    done = run_cli(*_send_args(issue), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    counts = smtpd.recorder.count_by_rcpt()
    assert max(counts.values()) == 1, "someone received the issue twice"
    campaign = nl.store.find_campaigns(load_issue(issue).key)[0]
    ledger = nl.store.delivery_counts(campaign.id)
    unknown = {e for e, _ in nl.store.deliveries_of(campaign.id, DeliveryStatus.UNKNOWN)}
    assert len(unknown) <= CONCURRENCY
    assert ledger[DeliveryStatus.SENT] + len(unknown) == n
    missing = {f"user{i}@example.com" for i in range(n)} - set(counts)
    assert missing <= unknown  # only an unknown outcome may have gone missing
    if unknown:
        assert "unknown" in done.stdout
    assert "sent" in done.stdout.splitlines()[-1] or "sent" in done.stdout


def test_killed_again_and_again_then_retry_unknown(tmp_path: Path,
                                                   smtpd: SmtpTestServer) -> None:
    """kill -9 at random points, three times; then a run finishes the job and `campaigns
    retry --unknown` resends only the truly unknown ones."""
    import random

    n = 900
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", n)
    issue = tmp_path / "issue.md"
    issue.write_text(MD, encoding="utf-8")
    env = _env(tmp_path, smtpd)
    rng = random.Random(4)
    smtpd.recorder.delay = 0.003
    kills = 0
    for _ in range(3):
        target = len(smtpd.messages) + rng.randint(20, 200)
        proc = subprocess.Popen(_send_cmd(issue), env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(smtpd.messages) < target and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.001)
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(20)
    assert kills == 3 and len(smtpd.messages) < n
    smtpd.recorder.delay = 0
    done = run_cli(*_send_args(issue), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    counts = smtpd.recorder.count_by_rcpt()
    assert max(counts.values()) == 1, "someone received the issue twice"
    campaign = nl.store.find_campaigns(load_issue(issue).key)[0]
    unknown = {e for e, _ in nl.store.deliveries_of(campaign.id, DeliveryStatus.UNKNOWN)}
    assert len(unknown) <= kills * CONCURRENCY  # at most one per connection per crash
    assert nl.store.delivery_counts(campaign.id)[DeliveryStatus.SENT] + len(unknown) == n
    assert {f"user{i}@example.com" for i in range(n)} - set(counts) <= unknown

    retry = run_cli("campaigns", "retry", str(campaign.id), "--unknown", env=env, cwd=tmp_path)
    assert retry.returncode == 0, retry.stderr
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == n  # everyone has it now
    twice = {r for r, c in counts.items() if c > 1}
    assert twice <= unknown  # only an unknown may have got a second copy
    assert nl.store.delivery_counts(campaign.id)[DeliveryStatus.SENT] == n
