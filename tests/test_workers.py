"""`newsletter worker`: many delivery processes on one database, each recipient exactly once.

The store-level tests (claims, leases, relay quotas) run on SQLite and PostgreSQL; the
process tests start real `newsletter worker` processes against a fresh PostgreSQL database
(NEWSLETTER_TEST_POSTGRES_URL; CI sets it) and a real SMTP server that counts what it gets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from newsletter.service import Newsletter
from newsletter.store.base import Mark
from newsletter.store.schema import CampaignStatus, DeliveryStatus, deliveries, subscribers
from newsletter.store.sql import SqlStore

from .conftest import SECRET, add_subscribers, make_settings, run_cli, terminate_connections
from .sink import CountingSmtpServer
from .smtpd import SmtpTestServer


def _campaign(nl: Newsletter, issue: Path, slug: str = "news") -> int:
    """A campaign handed to the workers (what `newsletter send` does with delivery_workers)."""
    plan = nl.plan_send(issue, [slug])
    nl.store.start_campaign(plan.campaign.id)
    return plan.campaign.id


def _statuses(nl: Newsletter, campaign_id: int) -> dict[str, DeliveryStatus]:
    """Each recipient's ledger status."""
    with nl.store.engine.connect() as conn:
        rows = conn.execute(select(subscribers.c.email, deliveries.c.status)
                            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                            .where(deliveries.c.campaign_id == campaign_id)).all()
    return {email: DeliveryStatus(status) for email, status in rows}


# --- the store: claims, leases, quotas (SQLite and PostgreSQL) -----------------------------

@pytest.mark.usefixtures("db_backend")
class TestClaims:
    @pytest.fixture(autouse=True)
    def _close_writer(self, nl: Newsletter) -> Iterator[None]:
        yield
        nl.store.close()  # store.begin holds a ledger-writer connection until closed

    def test_claims_are_disjoint_and_cover_the_campaign(self, nl: Newsletter, issue: Path) \
            -> None:
        add_subscribers(nl, "news", 1000)
        cid = _campaign(nl, issue)
        store = nl.store
        ids = [store.register_worker(f"w{i}", lease=30) for i in range(4)]
        taken: dict[int, list[int]] = {w: [] for w in ids}

        def claim_all(worker: int) -> None:
            mine = SqlStore(store.engine)  # a store (and connections) per thread
            while True:
                batch = mine.claim_batch(cid, worker=worker, limit=37)
                if not batch.due:
                    return
                taken[worker] += [d.delivery_id for d in batch.due]

        with ThreadPoolExecutor(len(ids)) as pool:  # list(map) re-raises a claim's error
            list(pool.map(claim_all, ids))
        every = [i for rows in taken.values() for i in rows]
        assert len(every) == len(set(every)) == 1000
        # Nothing left to claim, and a single-process run sees none of it either.
        assert not store.claim_batch(cid, worker=ids[0], limit=10).due
        assert not store.due_batch(cid, after_id=0, limit=10).due
        assert store.campaigns_with_work() == []

    def test_a_cursor_walks_forward_and_a_rescan_finds_rows_handed_back(
            self, nl: Newsletter, issue: Path) -> None:
        add_subscribers(nl, "news", 30)
        cid = _campaign(nl, issue)
        store = nl.store
        one, two = (store.register_worker(n, lease=30) for n in ("one", "two"))
        first = store.claim_batch(cid, worker=two, limit=5)
        mine = store.claim_batch(cid, worker=one, limit=5)
        assert mine.last_id == max(d.delivery_id for d in mine.due) > first.last_id
        assert store.release_claims(cid, worker=two) == 5  # handed back, behind one's cursor
        ahead = store.claim_batch(cid, worker=one, limit=50, after_id=mine.last_id)
        assert len(ahead.due) == 20 and min(d.delivery_id for d in ahead.due) > mine.last_id
        assert not store.claim_batch(cid, worker=one, limit=50, after_id=ahead.last_id).due
        behind = store.claim_batch(cid, worker=one, limit=50)  # from the start
        assert {d.delivery_id for d in behind.due} == {d.delivery_id for d in first.due}

    def test_a_lapsed_lease_releases_claims_and_makes_in_flight_rows_unknown(
            self, nl: Newsletter, issue: Path) -> None:
        add_subscribers(nl, "news", 30)
        cid = _campaign(nl, issue)
        store = nl.store
        dead = store.register_worker("dead", lease=0.2)
        alive = store.register_worker("alive", lease=30)
        batch = store.claim_batch(cid, worker=dead, limit=10)
        first, second = batch.due[0].delivery_id, batch.due[1].delivery_id
        assert store.begin([Mark(first, DeliveryStatus.SENDING, relay="r"),
                            Mark(second, DeliveryStatus.SENDING, relay="r")],
                           worker=dead) == {first, second}
        # Rows another worker holds cannot be started by anyone else.
        other = store.claim_batch(cid, worker=alive, limit=5).due[0].delivery_id
        assert store.begin([Mark(other, DeliveryStatus.SENDING, relay="r")], worker=dead) \
            == set()
        assert store.begin([Mark(other, DeliveryStatus.SENDING, relay="r")]) == set()
        assert store.reap_workers() == []  # not expired yet
        time.sleep(0.3)
        [reaped] = store.reap_workers()
        assert (reaped.worker, reaped.released, reaped.unknown) == ("dead", 8, 2)
        assert store.reap_workers() == []
        status = _statuses(nl, cid)
        assert sum(s == DeliveryStatus.UNKNOWN for s in status.values()) == 2
        # The dead worker comes back: its lease is gone, and so are its rows.
        assert not store.renew_worker(dead, lease=30)
        rest = [d.delivery_id for d in batch.due[2:]]
        assert store.begin([Mark(i, DeliveryStatus.SENDING, relay="r") for i in rest],
                           worker=dead) == set()
        # The released rows go to the live worker; the unknown ones to nobody.
        again = store.claim_batch(cid, worker=alive, limit=100).due
        assert set(rest) <= {d.delivery_id for d in again}
        assert {first, second}.isdisjoint(d.delivery_id for d in again)

    def test_the_last_outcome_completes_the_campaign(self, nl: Newsletter, issue: Path) \
            -> None:
        add_subscribers(nl, "news", 3)
        cid = _campaign(nl, issue)
        store = nl.store
        w = store.register_worker("w", lease=30)
        due = store.claim_batch(cid, worker=w, limit=10).due
        ids = [d.delivery_id for d in due]
        store.begin([Mark(i, DeliveryStatus.SENDING, relay="r") for i in ids], worker=w)
        store.begin([Mark(i, DeliveryStatus.SENT) for i in ids[:2]], worker=w)
        assert store.finish_shared(cid) == CampaignStatus.RUNNING
        store.begin([Mark(ids[2], DeliveryStatus.SENT)], worker=w)
        assert store.finish_shared(cid) == CampaignStatus.COMPLETED
        with store.engine.connect() as conn:  # outcomes end the claims
            assert conn.execute(select(func.count()).select_from(deliveries)
                                .where(deliveries.c.worker_id.is_not(None))).scalar() == 0

    def test_an_unsubscribe_wins_over_a_claim(self, nl: Newsletter, issue: Path) -> None:
        add_subscribers(nl, "news", 5)
        cid = _campaign(nl, issue)
        store = nl.store
        w = store.register_worker("w", lease=30)
        due = store.claim_batch(cid, worker=w, limit=10).due
        gone = due[0]
        store.leave(gone.recipient.subscriber_id, gone.recipient.list_id, source="test")
        ids = {d.delivery_id for d in due}
        moved = store.begin([Mark(i, DeliveryStatus.SENDING, relay="r") for i in ids], worker=w)
        assert moved == ids - {gone.delivery_id}
        status = _statuses(nl, cid)
        assert status[gone.recipient.email] == DeliveryStatus.SKIPPED
        with store.engine.connect() as conn:  # its claim ended with it
            assert conn.execute(select(deliveries.c.worker_id).where(
                deliveries.c.id == gone.delivery_id)).scalar() is None

    def test_relay_quota_is_shared(self, nl: Newsletter) -> None:
        store = nl.store
        now = int(time.time())
        windows = [(5, 1.0), (12, 60.0)]
        assert store.reserve_relay("r", 3, windows, second=now) == (3, -1)
        assert store.reserve_relay("r", 3, windows, second=now) == (2, 0)  # second is full
        assert store.reserve_relay("r", 3, windows, second=now) == (0, 0)
        assert store.reserve_relay("r", 5, windows, second=now + 1) == (5, -1)
        assert store.reserve_relay("r", 5, windows, second=now + 2) == (2, 1)  # minute full
        assert store.reserve_relay("other", 5, windows, second=now) == (5, -1)


# --- real worker processes ----------------------------------------------------------------

def _env(url: str, tmp_path: Path, smtp_url: str, **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
            "NEWSLETTER_DATABASE_URL": url, "NEWSLETTER_VAR_DIR": str(tmp_path / "var"),
            "NEWSLETTER_SMTP_URL": smtp_url, "NEWSLETTER_SECRET_KEY": SECRET,
            "NEWSLETTER_DELIVERY_WORKERS": "true", "NEWSLETTER_SEND_CONCURRENCY": "4",
            "NEWSLETTER_BASE_URL": "https://news.example.org",
            "NEWSLETTER_FROM": "Digest Desk <digest@example.org>",
            "NEWSLETTER_POSTAL_ADDRESS": "Example Institute, 1 Example Street", **extra}


@contextmanager
def _workers(env: dict[str, str], cwd: Path, n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """n `newsletter worker` processes (named w0..); stopped with SIGTERM at the end, which
    they must obey (exit 0) unless the test killed them."""
    procs = [subprocess.Popen([sys.executable, "-m", "newsletter", "worker", "--name", f"w{i}"],
                              env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=60)[0].decode() for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            print(out)
            assert p.returncode in (0, -signal.SIGKILL), out


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    r = run_cli(*args, env=env, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _until(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def quiet_smtpd() -> Iterator[CountingSmtpServer]:
    """Tens of thousands of messages: a server that keeps envelopes only, fast enough that
    the workers, not the test's server, set the pace."""
    with CountingSmtpServer() as server:
        yield server


def test_four_workers_send_20000_recipients_exactly_once(
        pg_url: str, tmp_path: Path, quiet_smtpd: CountingSmtpServer, issue: Path) -> None:
    nl = Newsletter(make_settings(tmp_path, database_url=pg_url, smtp_url=quiet_smtpd.url,
                                  delivery_workers=True))
    try:
        add_subscribers(nl, "news", 20_000)
        env = _env(pg_url, tmp_path, quiet_smtpd.url)
        with _workers(env, tmp_path, 4):
            _until(lambda: len(nl.store.live_workers()) == 4, 60, "four workers registered")
            listed = _cli(env, tmp_path, "workers")
            assert all(f"w{i}" in listed for i in range(4)), listed
            # `newsletter send` hands the campaign over and follows it to the end.
            out = _cli(env, tmp_path, "send", str(issue), "--list", "news", "--yes")
            assert "handed to 4 worker(s)" in out
            cid = nl.store.all_campaigns()[0].id
            _until(lambda: nl.store.campaign_status(cid) == CampaignStatus.COMPLETED, 120,
                   "campaign completed")
        counts = quiet_smtpd.recorder.count_by_rcpt()
        assert len(counts) == 20_000 and set(counts.values()) == {1}
        assert set(_statuses(nl, cid).values()) == {DeliveryStatus.SENT}
        assert "sent 20,000" in out
    finally:
        nl.store.engine.dispose()


def test_a_worker_killed_mid_batch_loses_no_one_and_sends_no_one_twice(
        pg_url: str, tmp_path: Path, quiet_smtpd: CountingSmtpServer, issue: Path) -> None:
    """kill -9 one of three workers while it holds claimed rows and has messages in flight:
    after its lease (2 s) the others send its claimed rows; what it had in flight is
    'unknown' and is not resent; nobody gets two copies and everyone is accounted for."""
    quiet_smtpd.recorder.delay = 0.003  # slow enough to catch the victim mid-batch
    nl = Newsletter(make_settings(tmp_path, database_url=pg_url, smtp_url=quiet_smtpd.url))
    try:
        add_subscribers(nl, "news", 6000)
        cid = _campaign(nl, issue)
        env = _env(pg_url, tmp_path, quiet_smtpd.url, NEWSLETTER_WORKER_LEASE_SECONDS="2")

        def held_by(name: str) -> int:
            with nl.store.engine.connect() as conn:
                return int(conn.execute(text(
                    "SELECT count(*) FROM deliveries d JOIN workers w ON w.id = d.worker_id "
                    "WHERE w.name = :n"), {"n": name}).scalar_one())

        with _workers(env, tmp_path, 3) as procs:
            _until(lambda: nl.store.delivery_counts(cid)[DeliveryStatus.SENT] >= 1000
                   and held_by("w1") > 0, 60, "the victim holding rows")
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait(10)
            _until(lambda: nl.store.campaign_status(cid) == CampaignStatus.COMPLETED, 120,
                   "campaign completed")
        status = _statuses(nl, cid)
        received = quiet_smtpd.recorder.count_by_rcpt()
        sent = {e for e, s in status.items() if s == DeliveryStatus.SENT}
        unknown = {e for e, s in status.items() if s == DeliveryStatus.UNKNOWN}
        assert sent | unknown == set(status) and len(status) == 6000
        assert set(received.values()) == {1}                # nobody twice
        assert sent <= set(received)                        # every 'sent' arrived
        assert set(received) - sent <= unknown              # the rest of what arrived is unknown
        assert len(unknown) <= 4                            # at most the victim's connections
        print(f"\nkilled worker: {len(unknown)} unknown, "
              f"{len(unknown & set(received))} of them delivered before the kill")
    finally:
        nl.store.engine.dispose()


def test_workers_ride_out_lost_database_connections(
        pg_url: str, tmp_path: Path, quiet_smtpd: CountingSmtpServer, issue: Path) -> None:
    """Every connection of two sending workers is terminated by the server (what a database
    restart or failover does to them): they say so, give up what they held (claims back,
    messages in flight 'unknown'), reconnect and finish; nobody gets two copies."""
    quiet_smtpd.recorder.delay = 0.003
    nl = Newsletter(make_settings(tmp_path, database_url=pg_url, smtp_url=quiet_smtpd.url))
    try:
        add_subscribers(nl, "news", 3000)
        cid = _campaign(nl, issue)
        env = _env(pg_url, tmp_path, quiet_smtpd.url)
        with _workers(env, tmp_path, 2) as procs:
            _until(lambda: nl.store.delivery_counts(cid)[DeliveryStatus.SENT] >= 500, 60,
                   "sending under way")
            killed = terminate_connections(pg_url)
            nl.store.engine.dispose()  # this test's own pooled connections went too
            assert killed >= 2
            _until(lambda: nl.store.campaign_status(cid) == CampaignStatus.COMPLETED, 120,
                   "campaign completed")
            assert [p.poll() for p in procs] == [None, None]  # both still running
        status = _statuses(nl, cid)
        received = quiet_smtpd.recorder.count_by_rcpt()
        sent = {e for e, s in status.items() if s == DeliveryStatus.SENT}
        unknown = {e for e, s in status.items() if s == DeliveryStatus.UNKNOWN}
        assert sent | unknown == set(status) and len(status) == 3000
        assert set(received.values()) == {1}
        assert sent <= set(received) and set(received) - sent <= unknown
        assert len(unknown) <= 2 * 4  # at most one per connection of each worker
        print(f"\nconnections terminated: {killed}; unknown afterwards: {len(unknown)}")
    finally:
        nl.store.engine.dispose()


def test_pause_resume_and_cancel_reach_every_worker(
        pg_url: str, tmp_path: Path, quiet_smtpd: CountingSmtpServer, issue: Path) -> None:
    """Three workers on one campaign: a pause stops them all (and they hand their claims
    back), a resume sets them going again, a cancel stops them for good; each within a
    second, and nobody gets a message twice."""
    quiet_smtpd.recorder.delay = 0.01
    nl = Newsletter(make_settings(tmp_path, database_url=pg_url, smtp_url=quiet_smtpd.url,
                                  delivery_workers=True))
    try:
        add_subscribers(nl, "news", 3000)
        cid = _campaign(nl, issue)
        env = _env(pg_url, tmp_path, quiet_smtpd.url)

        def sent() -> int:
            return nl.store.delivery_counts(cid)[DeliveryStatus.SENT]

        def quiet() -> bool:
            counts = nl.store.delivery_counts(cid)
            with nl.store.engine.connect() as conn:
                held = conn.execute(select(func.count()).select_from(deliveries).where(
                    deliveries.c.worker_id.is_not(None))).scalar()
            return not counts[DeliveryStatus.SENDING] and not held

        def stays_quiet() -> None:
            # Past the second the workers have to notice (0.1 s status poll + the messages
            # in flight), nothing more reaches the server.
            frozen = len(quiet_smtpd.recorder.messages)
            time.sleep(1.5)
            assert len(quiet_smtpd.recorder.messages) == frozen

        with _workers(env, tmp_path, 3):
            _until(lambda: sent() >= 300, 60, "sending under way")
            assert len({w.campaign_id for w in nl.store.live_workers()} - {None}) == 1
            shown = _cli(env, tmp_path, "campaigns", "show", str(cid))
            assert "running by 3 worker(s): " in shown, shown
            assert all(f"w{i}" in shown for i in range(3)), shown
            assert "msg/s over the last minute" in shown, shown
            # What `newsletter campaigns pause` does, here in-process to time its reach.
            assert nl.store.pause_campaign(cid)
            took = _until(quiet, 1.0, "every worker stopped and handed its rows back")
            print(f"\npause: all three workers stopped, rows handed back, {took:.2f} s")
            stays_quiet()
            assert nl.store.campaign_status(cid) == CampaignStatus.PAUSED
            # What `newsletter campaigns resume` does with delivery_workers (before it
            # follows the progress): hand the campaign back to the workers.
            before = sent()
            report = asyncio.run(nl.run(nl.resume_plan(cid)))
            assert report.workers and report.status == CampaignStatus.RUNNING
            took = _until(lambda: sent() > before, 1.0, "sending again after the resume")
            print(f"resume: the first message sent again {took:.2f} s after it")
            _until(lambda: sent() >= 1500, 60, "half sent")
            assert nl.store.cancel_campaign(cid)
            took = _until(quiet, 1.0, "every worker stopped after the cancel")
            print(f"cancel: all three workers stopped, rows handed back, {took:.2f} s")
            stays_quiet()
        status = _statuses(nl, cid)
        received = quiet_smtpd.recorder.count_by_rcpt()
        assert set(received.values()) == {1}
        assert set(received) == {e for e, s in status.items() if s == DeliveryStatus.SENT}
        assert nl.store.campaign_status(cid) == CampaignStatus.CANCELLED
        assert nl.store.delivery_counts(cid)[DeliveryStatus.QUEUED] > 0  # never sent
    finally:
        nl.store.engine.dispose()


def test_relay_rate_limit_holds_across_workers(
        pg_url: str, tmp_path: Path, quiet_smtpd: CountingSmtpServer, issue: Path) -> None:
    """20 messages per second through one relay, three workers: together, not each."""
    nl = Newsletter(make_settings(tmp_path, database_url=pg_url, smtp_url=quiet_smtpd.url))
    try:
        add_subscribers(nl, "news", 100)
        env = _env(pg_url, tmp_path, quiet_smtpd.url, NEWSLETTER_SEND_RATE="20")
        with _workers(env, tmp_path, 3):
            _until(lambda: len(nl.store.live_workers()) == 3, 60, "three workers registered")
            cid = _campaign(nl, issue)
            start = time.monotonic()
            _until(lambda: nl.store.campaign_status(cid) == CampaignStatus.COMPLETED, 60,
                   "campaign completed")
            elapsed = time.monotonic() - start
        with nl.store.engine.connect() as conn:
            per_second = conn.execute(text("SELECT second, count FROM relay_usage")).all()
        assert per_second and max(n for _, n in per_second) <= 20
        assert sum(n for _, n in per_second) >= 100
        # Three workers at 20/s each would be done in under 2 s; together they need 5
        # seconds' worth of slots, so at least 4 whole seconds pass.
        assert elapsed >= 4.0, elapsed
        counts = quiet_smtpd.recorder.count_by_rcpt()
        assert len(counts) == 100 and set(counts.values()) == {1}
    finally:
        nl.store.engine.dispose()


def test_workers_on_sqlite(tmp_path: Path, smtpd: SmtpTestServer, issue: Path) -> None:
    """The same program on the embedded database: two workers, `--once`."""
    url = f"sqlite:///{tmp_path / 'var' / 'w.db'}"
    nl = Newsletter(make_settings(tmp_path, database_url=url, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 400)
    cid = _campaign(nl, issue)
    env = _env(url, tmp_path, smtpd.url)
    procs = [subprocess.Popen([sys.executable, "-m", "newsletter", "worker", "--once"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert nl.store.campaign_status(cid) == CampaignStatus.COMPLETED, outputs
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 400 and set(counts.values()) == {1}
    assert nl.store.live_workers() == []  # both retired cleanly


def test_send_without_a_live_worker_says_so(tmp_path: Path, smtpd: SmtpTestServer,
                                            issue: Path) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'w.db'}"
    nl = Newsletter(make_settings(tmp_path, database_url=url, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 5)
    env = _env(url, tmp_path, smtpd.url)
    r = run_cli("send", str(issue), "--list", "news", "--yes", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no `newsletter worker` is running" in r.stderr
    assert "no worker is running" in _cli(env, tmp_path, "workers")
    cid = nl.store.all_campaigns()[0].id
    assert nl.store.campaign_status(cid) == CampaignStatus.RUNNING
    assert nl.store.delivery_counts(cid)[DeliveryStatus.QUEUED] == 5
    assert smtpd.recorder.messages == []
    # The campaign waits; a worker started later sends it.
    r = subprocess.run([sys.executable, "-m", "newsletter", "worker", "--once"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "campaign completed" in r.stdout, r.stdout + r.stderr
    assert len(smtpd.recorder.count_by_rcpt()) == 5
