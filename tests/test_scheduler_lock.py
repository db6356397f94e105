"""One scheduler fires jobs per database: on PostgreSQL the holder of a session-level advisory
lock, on SQLite the holder of a lease row. The PostgreSQL tests run when
NEWSLETTER_TEST_POSTGRES_URL names a server (CI sets it); each gets a fresh database, dropped
afterwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from newsletter.scheduling import Scheduler, Schedules
from newsletter.service import Newsletter
from newsletter.store.schedules import (
    SCHEDULER_ADVISORY_KEY,
    LeaseLock,
    PostgresAdvisoryLock,
    ScheduleStore,
    scheduler_lock,
)

from .conftest import SECRET, add_subscribers, make_settings, open_app, wait_until
from .smtpd import SmtpTestServer

TICK = 0.1


def _soon(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


def _advisory_holders(engine: Engine) -> list[int]:
    """Server pids of the sessions holding the scheduler's advisory lock in this database."""
    unsigned = SCHEDULER_ADVISORY_KEY & 0xFFFF_FFFF_FFFF_FFFF
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND objsubid = 1 AND classid = CAST(:c AS bigint)::oid"
            " AND objid = CAST(:o AS bigint)::oid"),
            {"c": unsigned >> 32, "o": unsigned & 0xFFFF_FFFF}).scalars())


def test_the_lock_key_is_a_fixed_64_bit_constant() -> None:
    digest = hashlib.sha256(b"newsletter.scheduler").digest()[:8]
    assert int.from_bytes(digest, "big", signed=True) == SCHEDULER_ADVISORY_KEY
    # The same in every process and release: changing it would let an old and a new
    # version both fire during an upgrade.
    assert SCHEDULER_ADVISORY_KEY == -6126775949963744455


def test_sqlite_keeps_the_lease_row(tmp_path: Path) -> None:
    nl = Newsletter(make_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'l.db'}"))
    one = scheduler_lock(nl.store.engine, "scheduler", "one", lease=15)
    two = scheduler_lock(nl.store.engine, "scheduler", "two", lease=15)
    assert isinstance(one, LeaseLock) and isinstance(two, LeaseLock)
    assert one.acquire() and not two.acquire()
    assert one.held() and not two.held()
    one.release()
    assert two.acquire() and not one.acquire()
    two.release()


def test_advisory_lock_is_exclusive_and_dies_with_its_session(
    pg_url: str, tmp_path: Path, opened: list[Newsletter],
) -> None:
    nl = open_app(opened, tmp_path, pg_url)
    engine = nl.store.engine
    one = scheduler_lock(engine, "scheduler", "one")
    two = scheduler_lock(engine, "scheduler", "two")
    assert isinstance(one, PostgresAdvisoryLock) and isinstance(two, PostgresAdvisoryLock)
    try:
        assert one.acquire()
        assert not two.acquire() and not two.held()
        assert one.held() and _advisory_holders(engine) == [one.pid]
        # Visible (not relied on): who holds it.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT holder FROM locks WHERE name = 'scheduler'")) \
                .scalar() == "one"
        # The holder's session ends (a crash, a dropped connection): the lock goes with it.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": one.pid}) \
                .scalar()
        assert _wait_gone(engine, one.pid)
        assert not one.held()
        assert two.acquire() and two.held() and not one.acquire()
        two.release()
        assert _advisory_holders(engine) == []
        assert one.acquire()
    finally:
        one.release()
        two.release()


def _wait_gone(engine: Engine, pid: int | None, timeout: float = 5.0) -> bool:
    """Wait until the server process `pid` has exited (and released its locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if not conn.execute(text("SELECT 1 FROM pg_stat_activity WHERE pid = :p"),
                                {"p": pid}).first():
                return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("how", ["stops", "connection terminated"])
def test_two_schedulers_one_fires_and_the_other_takes_over(
    how: str, pg_url: str, tmp_path: Path, smtpd: SmtpTestServer, issue: Path,
    opened: list[Newsletter],
) -> None:
    """Two Newsletter objects, as if two processes: exactly one holds the lock; the other
    stays passive until the first stops (or its lock's connection dies), then takes over
    within a couple of ticks and fires a due job once."""
    first_nl = open_app(opened, tmp_path, pg_url, smtp_url=smtpd.url)
    second_nl = open_app(opened, tmp_path, pg_url, smtp_url=smtpd.url)
    add_subscribers(first_nl, "news", 5)
    fired: list[tuple[str, int, str]] = []

    async def main() -> None:
        a = Scheduler(first_nl, tick=TICK,
                      on_fired=lambda s, o: fired.append(("a", s, o)))
        b = Scheduler(second_nl, tick=TICK,
                      on_fired=lambda s, o: fired.append(("b", s, o)))
        await a.start()
        await wait_until(lambda: a.active, 5)
        await b.start()
        try:
            for _ in range(10):  # a second's worth of ticks: b waits
                await asyncio.sleep(TICK)
                assert a.active and not b.active
                assert not b.lock.held()
            assert _advisory_holders(first_nl.store.engine) == [getattr(a.lock, "pid", -1)]
            with first_nl.store.engine.connect() as conn:
                assert conn.execute(text("SELECT holder FROM locks")).scalar() == a.holder
            if how == "stops":
                await a.stop()
            else:
                pid = getattr(a.lock, "pid", None)
                with first_nl.store.engine.connect() as conn:
                    conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                assert _wait_gone(first_nl.store.engine, pid)
            took = await wait_until(lambda: b.active and not a.active, 3 * TICK + 0.5)
            print(f"\n{how}: the other scheduler took over after {took:.2f} s")
            assert _advisory_holders(first_nl.store.engine) == [getattr(b.lock, "pid", -1)]
            sched = Schedules(first_nl).add_once(issue, ["news"], at=_soon(0.5), tz="UTC")
            store = ScheduleStore(first_nl.store.engine)
            await wait_until(lambda: any(r.outcome != "started" for r in store.runs(sched.id)), 15)
            await asyncio.sleep(5 * TICK)  # time for a second firing, if there were one
            assert [r.outcome for r in store.runs(sched.id)] == ["sent"]
            assert fired == [("b", sched.id, "sent")]
            assert not a.active and b.active
        finally:
            await a.stop()
            await b.stop()
        assert _advisory_holders(first_nl.store.engine) == []

    asyncio.run(main())
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 5 and set(counts.values()) == {1}


def test_a_killed_scheduler_process_is_replaced_by_the_other(
    pg_url: str, tmp_path: Path, smtpd: SmtpTestServer, issue: Path, opened: list[Newsletter],
) -> None:
    """`newsletter scheduler` twice on one database; the one holding the lock is killed -9;
    the other takes over at once (the lock died with the killed process's connection) and
    fires a due job, once."""
    nl = open_app(opened, tmp_path, pg_url, smtp_url=smtpd.url)
    add_subscribers(nl, "news", 10)
    engine = nl.store.engine
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
           "NEWSLETTER_DATABASE_URL": pg_url, "NEWSLETTER_VAR_DIR": str(tmp_path / "var"),
           "NEWSLETTER_SMTP_URL": smtpd.url, "NEWSLETTER_SECRET_KEY": SECRET}
    procs = [subprocess.Popen([sys.executable, "-m", "newsletter", "scheduler"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]

    def holder_pid() -> int | None:
        """The OS pid of the process holding the lock, from the application_name of its
        lock session ('newsletter scheduler HOST:PID:ID')."""
        with engine.connect() as conn:
            names = conn.execute(text(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a"
                " USING (pid) WHERE l.locktype = 'advisory' AND l.granted"
                " AND a.datname = current_database()")).scalars().all()
        assert len(names) <= 1, names
        return int(names[0].split(":")[1]) if names else None

    def wait_for_holder(timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = holder_pid()
            if pid is not None:
                return pid
            time.sleep(0.05)
        raise AssertionError("no scheduler took the lock")

    try:
        first = wait_for_holder(30)
        assert first in {p.pid for p in procs}
        time.sleep(1.5)  # the other keeps waiting
        assert holder_pid() == first
        killed = next(p for p in procs if p.pid == first)
        other = next(p for p in procs if p.pid != first)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        t0 = time.monotonic()
        second = wait_for_holder(10)
        print(f"\nthe other process took the lock {time.monotonic() - t0:.2f} s after kill -9")
        assert second == other.pid
        schedules = Schedules(nl)
        sched = schedules.add_once(issue, ["news"], at=_soon(1.0), tz="UTC")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            runs = schedules.store.runs(sched.id)
            if runs and runs[0].outcome != "started":
                break
            time.sleep(0.1)
        time.sleep(1.5)  # give a second firing, if there were one, time to happen
        assert other.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        outputs = [p.communicate(timeout=15)[0].decode() for p in procs]
    assert [r.outcome for r in schedules.store.runs(sched.id)] == ["sent"], outputs
    counts = smtpd.recorder.count_by_rcpt()
    assert len(counts) == 10 and set(counts.values()) == {1}, outputs
    assert f"schedule {sched.id}: sent" in outputs[procs.index(other)]


def test_sigterm_stops_the_scheduler_cleanly_and_frees_the_lease(tmp_path: Path) -> None:
    """systemd stops services with SIGTERM: the scheduler releases its lock and exits 0, so
    a standby on SQLite need not wait out the lease."""
    url = f"sqlite:///{tmp_path / 'var' / 's.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
           "NEWSLETTER_DATABASE_URL": url, "NEWSLETTER_VAR_DIR": str(tmp_path / "var"),
           "NEWSLETTER_SECRET_KEY": SECRET}
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", "scheduler"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    nl = Newsletter(make_settings(tmp_path, database_url=url))
    engine = nl.store.engine

    def holders() -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(text(
                "SELECT holder FROM locks WHERE name = 'scheduler' AND expires_at > :now"),
                {"now": dt.datetime.now(dt.UTC)}).scalars())

    try:
        deadline = time.monotonic() + 30
        while not holders():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "scheduler stopped" in output
    assert holders() == []
    engine.dispose()
