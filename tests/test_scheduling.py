"""Scheduling with APScheduler over a real database and real SMTP, on short intervals: fires
once, survives restarts, one scheduler per database, misfire grace, DST, run-now."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from newsletter.scheduling import Scheduler, Schedules, cron_trigger, zone
from newsletter.service import Newsletter
from newsletter.store.schema import CampaignStatus, MembershipStatus

from .conftest import SECRET, add_subscribers, make_settings, run_cli, wait_until
from .smtpd import SmtpTestServer
from .test_content import MD

# Bounces and schedules live in the store: these run on SQLite and PostgreSQL too.
pytestmark = pytest.mark.usefixtures("db_backend")


def _soon(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


async def _run_scheduler(nl: Newsletter, until: float, *, done: int = 1) -> Scheduler:
    """Run a scheduler until `done` runs are recorded or `until` seconds pass."""
    scheduler = Scheduler(nl, tick=0.1)
    await scheduler.start()
    deadline = time.monotonic() + until
    try:
        while time.monotonic() < deadline:
            runs = scheduler.store.runs()
            if len([r for r in runs if r.outcome != "started"]) >= done:
                break
            await asyncio.sleep(0.05)
    finally:
        await scheduler.stop()
    return scheduler


def test_a_one_off_send_fires_once_at_its_time(tmp_path: Path, smtpd: SmtpTestServer,
                                               issue: Path) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 20)
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], at=_soon(1.0), tz="Europe/Berlin")
    assert nl.store.get_campaign(sched.campaign_id or 0).status == CampaignStatus.SCHEDULED
    assert smtpd.messages == []
    asyncio.run(_run_scheduler(nl, 15))
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 20 and set(counts.values()) == {1}
    (run,) = schedules.store.runs(sched.id)
    assert run.outcome == "sent" and run.campaign_id == sched.campaign_id
    # How late did it start? Reported, not asserted (timing belongs in reports).
    print(f"\nscheduled send started {run.lateness:.3f} s after it was due")
    assert schedules.store.get(sched.id).status == "done"
    assert nl.store.get_campaign(sched.campaign_id or 0).status == CampaignStatus.COMPLETED
    asyncio.run(_run_scheduler(nl, 1.0))  # a restart afterwards sends nothing more
    assert len(smtpd.messages) == 20


def test_a_restart_between_scheduling_and_firing_still_fires_once(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 5)
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], at=_soon(0.5), tz="UTC")
    time.sleep(1.0)  # nothing runs when it is due (within the grace period)
    asyncio.run(_run_scheduler(Newsletter(nl.settings), 10))  # "after a restart"
    assert len(smtpd.messages) == 5
    assert [r.outcome for r in schedules.store.runs(sched.id)] == ["sent"]


def test_a_miss_beyond_the_grace_period_is_recorded_not_sent(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, schedule_grace_seconds=1))
    add_subscribers(nl, "news", 5)
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], at=_soon(0.3), tz="UTC")
    time.sleep(2.0)
    asyncio.run(_run_scheduler(nl, 5))
    assert smtpd.messages == []
    (run,) = schedules.store.runs(sched.id)
    assert run.outcome == "missed"
    assert schedules.store.get(sched.id).status == "missed"


def test_two_scheduler_processes_on_one_database_fire_once(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 10)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
           "NEWSLETTER_DATABASE_URL": nl.settings.resolved_database_url,
           "NEWSLETTER_VAR_DIR": str(tmp_path / "var"), "NEWSLETTER_SMTP_URL": smtpd.url,
           "NEWSLETTER_SECRET_KEY": SECRET}
    procs = [subprocess.Popen([sys.executable, "-m", "newsletter", "scheduler"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    try:
        schedules = Schedules(nl)
        sched = schedules.add_once(issue, ["news"], at=_soon(3.0), tz="UTC")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = schedules.store.runs(sched.id)
            if runs and runs[0].outcome != "started":
                break
            time.sleep(0.1)
        time.sleep(1.5)  # give a second firing, if there were one, time to happen
    finally:
        for p in procs:
            p.terminate()
        outputs = [p.communicate(timeout=15)[0].decode() for p in procs]
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 10 and set(counts.values()) == {1}, outputs
    assert [r.outcome for r in schedules.store.runs(sched.id)] == ["sent"]


def test_an_unsubscribe_between_scheduling_and_firing_is_honoured(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 6)
    Schedules(nl).add_once(issue, ["news"], at=_soon(1.0), tz="UTC")
    nl.store.set_status("user4@example.com", MembershipStatus.UNSUBSCRIBED, source="test")
    asyncio.run(_run_scheduler(nl, 10))
    got = smtpd.recorder.count_by_rcpt()
    assert len(got) == 5 and "user4@example.com" not in got


def test_run_now_pause_and_cancel(tmp_path: Path, smtpd: SmtpTestServer, issue: Path) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 3)
    schedules = Schedules(nl)
    far = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    sched = schedules.add_once(issue, ["news"], at=far, tz="UTC")
    schedules.pause(sched.id)
    assert schedules.store.get(sched.id).status == "paused"
    schedules.resume(sched.id)

    async def scenario() -> None:
        scheduler = Scheduler(nl, tick=0.1)
        await scheduler.start()
        try:
            await asyncio.sleep(0.3)
            schedules.run_now(sched.id)  # as another process would
            for _ in range(100):
                if len(smtpd.messages) == 3:
                    break
                await asyncio.sleep(0.05)
        finally:
            await scheduler.stop()

    asyncio.run(scenario())
    assert len(smtpd.messages) == 3
    other = tmp_path / "other.md"
    other.write_text(MD.replace("number: 3", "number: 4"), encoding="utf-8")
    sched2 = schedules.add_once(other, ["news"], at=_soon(0.5), tz="UTC")
    schedules.cancel(sched2.id)
    asyncio.run(_run_scheduler(nl, 1.5))
    assert len(smtpd.messages) == 3
    assert nl.store.get_campaign(sched2.campaign_id or 0).status == CampaignStatus.CANCELLED


@pytest.mark.sqlite_only(reason="APScheduler's trigger arithmetic only; no database")
def test_a_weekly_digest_stays_at_8_local_across_daylight_saving() -> None:
    trigger = cron_trigger("0 8 * * MON", "Europe/Berlin")
    t = dt.datetime(2027, 3, 15, tzinfo=dt.UTC)
    hours_local, hours_utc = [], []
    for _ in range(4):  # 15, 22, 29 March (after the change on the 28th), 5 April
        t = trigger.get_next_fire_time(None, t + dt.timedelta(seconds=1))
        hours_local.append(t.astimezone(zone("Europe/Berlin")).hour)
        hours_utc.append(t.astimezone(dt.UTC).hour)
    assert hours_local == [8, 8, 8, 8]
    assert hours_utc == [7, 7, 6, 6]


def test_scheduling_in_the_past_or_an_unknown_zone_is_refused(
    tmp_path: Path, issue: Path,
) -> None:
    from newsletter.errors import ConfigError, ConflictError

    nl = Newsletter(make_settings(tmp_path))
    add_subscribers(nl, "news", 1)
    with pytest.raises(ConflictError, match="in the past"):
        Schedules(nl).add_once(issue, ["news"], at=_soon(-60), tz="UTC")
    with pytest.raises(ConfigError, match="unknown time zone"):
        zone("Mars/Olympus")
    with pytest.raises(ConfigError, match="--cron"):
        cron_trigger("every monday", "UTC")


def test_a_digest_assembled_from_an_inbox_and_a_feed_then_an_empty_run_skipped(
    tmp_path: Path, smtpd: SmtpTestServer,
) -> None:
    import functools
    import http.server
    import shutil
    import threading

    data = Path(__file__).parent / "data" / "digest"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("01-trade.md", "02-ai.md"):
        shutil.copy(data / "inbox" / name, inbox / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(data / "feeds"))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    digests = tmp_path / "digests"
    digests.mkdir()
    (digests / "weekly.yaml").write_text(
        "name: weekly\ntitle: Weekly Brief\n"
        'subject: "Weekly Brief No. {number} — {date:%d %B %Y}"\n'
        "lists: [news]\nsections: [Macro Outlook, The Digital Sector, Digitalising Industry]\n"
        f"inbox: {inbox}\n"
        f"feeds:\n  - url: http://127.0.0.1:{server.server_address[1]}/rss.xml\n"
        "    section: The Digital Sector\n", encoding="utf-8")
    try:
        nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url, digests_dir=digests))
        add_subscribers(nl, "news", 4)
        schedules = Schedules(nl)
        sched = schedules.add_digest("weekly", cron="0 8 * * MON", tz="Europe/Berlin")

        async def fire_twice() -> None:
            scheduler = Scheduler(nl, tick=0.1)
            await scheduler.start()
            try:
                for expected in (1, 2):
                    await asyncio.sleep(0.3)
                    schedules.run_now(sched.id)
                    for _ in range(200):
                        if len([r for r in schedules.store.runs(sched.id)
                                if r.outcome != "started"]) >= expected:
                            break
                        await asyncio.sleep(0.05)
            finally:
                await scheduler.stop()

        asyncio.run(fire_twice())
    finally:
        server.shutdown()
        server.server_close()
    runs = schedules.store.runs(sched.id)
    assert [r.outcome for r in runs] == ["sent", "skipped"], [r.note for r in runs]
    assert "no new items" in runs[1].note
    assert len(smtpd.messages) == 4  # the empty second run sent nothing
    import email
    import email.policy

    mail = email.message_from_bytes(smtpd.messages[0].data, policy=email.policy.default)
    assert str(mail["Subject"]).startswith("Weekly Brief No. 1")
    text = mail.get_body(("plain",)).get_content()
    assert "Digital services drive a third of trade growth" in text  # from the inbox
    archived = tmp_path / "var" / "digests" / "weekly" / "1.md"
    assert archived.is_file()  # exactly what went out, for editors to see
    from newsletter.content.parse import load_issue

    assert load_issue(archived).number == 1


@pytest.mark.sqlite_only(reason="a preview opens no database")
def test_digest_preview_assembles_and_renders_without_sending(
    tmp_path: Path, smtpd: SmtpTestServer,
) -> None:
    import shutil

    data = Path(__file__).parent / "data" / "digest"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(data / "inbox" / "01-trade.md", inbox / "01-trade.md")
    digests = tmp_path / "digests"
    digests.mkdir()
    (digests / "weekly.yaml").write_text(
        "title: Weekly Brief\nsubject: \"Weekly Brief No. {number}\"\nlists: [news]\n"
        f"sections: [Macro Outlook]\ninbox: {inbox}\n", encoding="utf-8")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
           "NEWSLETTER_VAR_DIR": str(tmp_path / "var"), "NEWSLETTER_SECRET_KEY": SECRET,
           "NEWSLETTER_DIGESTS_DIR": str(digests), "NEWSLETTER_SMTP_URL": smtpd.url}
    done = run_cli("digest", "preview", "weekly", env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "issue 1: 1 items" in done.stdout
    html = tmp_path / "var" / "digests" / "weekly" / "preview" / "issue.html"
    assert "Digital services drive a third of trade growth" in html.read_text(encoding="utf-8")
    assert smtpd.messages == []
    assert not (tmp_path / "var" / "digests" / "weekly" / "1.md").exists()  # not archived


def test_local_time_delivery_releases_each_zone_at_its_own_time(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    """Two zones an hour apart (and one more on the fallback zone): the first firing sends
    only the zone whose wall-clock time has come and sets up the next zone's release."""
    from sqlalchemy import update

    from newsletter.store.schema import deliveries
    from newsletter.store.sql import NewMember

    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    mlist = nl.store.create_list("news")
    members = ([NewMember(f"east{i}@example.com", attributes={"tz": "Etc/GMT-3"})
                for i in range(3)]
               + [NewMember(f"mid{i}@example.com", attributes={"tz": "Etc/GMT-2"})
                  for i in range(2)]
               + [NewMember("nozone@example.com")])  # falls back to the schedule's zone
    nl.store.upsert_members(mlist.id, members, source="test")
    east_now = dt.datetime.now(zone("Etc/GMT-3")) + dt.timedelta(seconds=1.5)
    at = east_now.replace(tzinfo=None).replace(tzinfo=zone("UTC"))  # the same wall clock
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], at=at, tz="UTC", local_time=True)
    first_job = schedules.next_run(sched)
    assert first_job is not None and abs((first_job - east_now).total_seconds()) < 1

    asyncio.run(_run_scheduler(nl, 15))
    got = set(smtpd.recorder.count_by_rcpt())
    assert got == {"east0@example.com", "east1@example.com", "east2@example.com"}
    assert schedules.store.get(sched.id).status == "active"  # more zones to come
    nxt = schedules.next_run(sched)
    assert nxt is not None and 3590 < (nxt - east_now).total_seconds() < 3610  # UTC+2: 1 h later

    # An hour passes (the clock is the ledger's: the held rows' release time comes).
    with nl.store.engine.begin() as conn:
        conn.execute(update(deliveries).where(
            deliveries.c.next_attempt_at <= dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
            .values(next_attempt_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    schedules.run_now(sched.id)
    asyncio.run(_run_scheduler(nl, 15, done=2))
    got = set(smtpd.recorder.count_by_rcpt())
    assert {"mid0@example.com", "mid1@example.com"} <= got
    assert "nozone@example.com" not in got  # UTC's 08:00 is three hours after UTC+3's
    assert max(smtpd.recorder.count_by_rcpt().values()) == 1
    assert [r.outcome for r in schedules.store.runs(sched.id)] == ["sent", "sent"]


def test_a_job_firing_twice_for_the_same_time_makes_one_campaign_run(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 4)
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], at=_soon(30), tz="UTC")

    async def twice() -> list[str]:
        one, two = Scheduler(nl), Scheduler(nl)  # as if two processes both fired it
        return list(await asyncio.gather(one.fire(sched.id), two.fire(sched.id)))

    outcomes = asyncio.run(twice())
    assert sorted(outcomes) == ["duplicate", "sent"]
    assert len(smtpd.messages) == 4
    assert len(schedules.store.runs(sched.id)) == 1


def test_schedule_commands_from_the_cli(tmp_path: Path, smtpd: SmtpTestServer,
                                        issue: Path) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 2)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
           "NEWSLETTER_DATABASE_URL": nl.settings.resolved_database_url,
           "NEWSLETTER_VAR_DIR": str(tmp_path / "var"), "NEWSLETTER_SMTP_URL": smtpd.url,
           "NEWSLETTER_SECRET_KEY": SECRET}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env, cwd=tmp_path, timeout=60)

    added = cli("schedule", str(issue), "--list", "news", "--at", "2031-06-02 08:00",
                "--tz", "Asia/Shanghai")
    assert added.returncode == 0, added.stderr
    assert "2031-06-02 08:00 Asia/Shanghai (2031-06-02 00:00 UTC)" in added.stdout
    listed = cli("schedule", "ls")
    assert "active" in listed.stdout and "Asia/Shanghai" in listed.stdout
    # Edit the issue, then render the scheduled campaign again from it.
    issue.write_text(issue.read_text(encoding="utf-8").replace(
        "subject: ", "subject: Edited ", 1), encoding="utf-8")
    assert cli("schedule", "update", "1", str(issue)).returncode == 0
    sched = Schedules(nl).store.get(1)
    assert nl.store.get_campaign(sched.campaign_id or 0).subject.startswith("Edited ")
    bad = cli("schedule", str(issue), "--list", "news", "--at", "tomorrow")
    assert bad.returncode != 0 and "--at" in bad.stderr
    assert cli("schedule", "cancel", "1").returncode == 0
    assert "cancelled" in cli("schedule", "ls").stdout


def test_a_schedule_firing_does_not_override_an_editors_pause(
    tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
) -> None:
    nl = Newsletter(make_settings(tmp_path, smtp_url=smtpd.url))
    add_subscribers(nl, "news", 3)
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], at=_soon(1.5), tz="UTC")
    assert sched.campaign_id is not None
    assert nl.store.pause_campaign(sched.campaign_id)
    asyncio.run(_run_scheduler(nl, 15))
    assert smtpd.messages == []
    (run,) = schedules.store.runs(sched.id)
    assert run.outcome == "skipped" and "paused" in run.note
    assert nl.store.get_campaign(sched.campaign_id).status == "paused"


def test_stopping_the_scheduler_leaves_the_applications_engine_open(tmp_path: Path) -> None:
    """APScheduler's job store disposes its engine when the scheduler shuts down. Ours is
    the application's, shared with sends in flight: a connection a send holds across the
    stop must go back to the same pool, not to a disposed one where it would stay open until
    the garbage collector found it (on PostgreSQL, a server backend each)."""
    from sqlalchemy import text

    nl = Newsletter(make_settings(tmp_path))
    pool = nl.store.engine.pool

    async def stop_while_a_connection_is_out() -> None:
        scheduler = Scheduler(nl, tick=0.05)
        await scheduler.start()
        await wait_until(lambda: scheduler.active, 10)
        with nl.store.engine.connect() as conn:  # a send's connection
            await scheduler.stop()
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        # A scheduler that loses its lock shuts APScheduler down the same way: a new one
        # starts on the same engine afterwards.
        again = Scheduler(nl, tick=0.05)
        await again.start()
        await wait_until(lambda: again.active, 10)
        await again.stop()

    asyncio.run(stop_while_a_connection_is_out())
    assert nl.store.engine.pool is pool
    assert pool.checkedout() == 0 and pool.checkedin() >= 1
