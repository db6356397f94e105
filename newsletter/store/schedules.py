"""Schedules, their runs and the scheduler's lock, on SQLAlchemy Core (SQLite and PostgreSQL).

The scheduler's lock (one process per database fires jobs) is a SchedulerLock: on SQLite a
lease row in `locks`, on PostgreSQL a session-level advisory lock (PostgresAdvisoryLock, the
one place with PostgreSQL-specific SQL here); scheduler_lock() picks one by dialect.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from ..errors import NotFoundError
from .dialect import PG_BACKEND_PID, PG_HELD, PG_KEEPALIVES, PG_TRY_LOCK, PG_UNLOCK, advisory_key
from .schema import CampaignStatus, campaigns, locks, schedule_runs, schedules, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    id: int
    kind: str                  # once, digest
    campaign_id: int | None
    issue_path: str | None
    digest: str | None
    run_at: dt.datetime | None
    cron: str | None
    tz: str
    status: str                # active, paused, cancelled, done, missed
    created_at: dt.datetime
    local_time: bool = False


@dataclass(frozen=True)
class ScheduleRun:
    id: int
    schedule_id: int
    fire_time: dt.datetime
    started_at: dt.datetime
    outcome: str               # started, sent, skipped, missed, failed
    campaign_id: int | None
    note: str

    @property
    def lateness(self) -> float:
        """Seconds between the time it was due and the time it started."""
        return (self.started_at - self.fire_time).total_seconds()


class ScheduleStore:
    """Every method is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, kind: str, tz: str, campaign_id: int | None = None,
               issue_path: str | None = None, digest: str | None = None,
               run_at: dt.datetime | None = None, cron: str | None = None,
               local_time: bool = False) -> Schedule:
        with self.engine.begin() as conn:
            key = conn.execute(insert(schedules).values(
                kind=kind, campaign_id=campaign_id, issue_path=issue_path, digest=digest,
                run_at=run_at, cron=cron, tz=tz, status="active", created_at=utcnow(),
                local_time=local_time,
            )).inserted_primary_key
            assert key is not None
            if campaign_id is not None:
                conn.execute(update(campaigns).where(campaigns.c.id == campaign_id)
                             .values(status=CampaignStatus.SCHEDULED))
        return self.get(int(key[0]))

    def get(self, schedule_id: int) -> Schedule:
        with self.engine.connect() as conn:
            row = conn.execute(select(schedules).where(schedules.c.id == schedule_id)).first()
        if row is None:
            raise NotFoundError(f"no schedule {schedule_id}; see: newsletter schedule ls")
        return _schedule(row)

    def all(self) -> list[Schedule]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(schedules).order_by(schedules.c.id)).all()
        return [_schedule(r) for r in rows]

    def set_status(self, schedule_id: int, status: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(schedules).where(schedules.c.id == schedule_id)
                         .values(status=status))

    def start_run(self, schedule_id: int, fire_time: dt.datetime, *,
                  outcome: str = "started", note: str = "") -> ScheduleRun | None:
        """Record a firing; None if this schedule already fired for this time (anywhere)."""
        try:
            with self.engine.begin() as conn:
                key = conn.execute(insert(schedule_runs).values(
                    schedule_id=schedule_id, fire_time=fire_time, started_at=utcnow(),
                    outcome=outcome, note=note)).inserted_primary_key
        except IntegrityError:
            return None
        assert key is not None
        with self.engine.connect() as conn:
            row = conn.execute(select(schedule_runs)
                               .where(schedule_runs.c.id == int(key[0]))).one()
        return _run(row)

    def finish_run(self, run_id: int, *, outcome: str, campaign_id: int | None = None,
                   note: str = "") -> None:
        with self.engine.begin() as conn:
            conn.execute(update(schedule_runs).where(schedule_runs.c.id == run_id)
                         .values(outcome=outcome, campaign_id=campaign_id, note=note[:2000]))

    def runs(self, schedule_id: int | None = None) -> list[ScheduleRun]:
        query = select(schedule_runs).order_by(schedule_runs.c.id)
        if schedule_id is not None:
            query = query.where(schedule_runs.c.schedule_id == schedule_id)
        with self.engine.connect() as conn:
            return [_run(r) for r in conn.execute(query).all()]

    def last_run(self, schedule_id: int, *, outcome: str) -> ScheduleRun | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(schedule_runs).where(
                schedule_runs.c.schedule_id == schedule_id, schedule_runs.c.outcome == outcome,
            ).order_by(schedule_runs.c.fire_time.desc()).limit(1)).first()
        return None if row is None else _run(row)

    # --- the lease ---------------------------------------------------------------------------

    def take_lock(self, name: str, holder: str, *, lease: float) -> bool:
        """Take or renew a lease; True while `holder` has it. Of two processes asking at
        once, one wins: the insert is unique and the update is conditional."""
        now = utcnow()
        expires = now + dt.timedelta(seconds=lease)
        with self.engine.begin() as conn:
            renewed = conn.execute(update(locks).where(
                locks.c.name == name,
                (locks.c.holder == holder) | (locks.c.expires_at < now),
            ).values(holder=holder, expires_at=expires)).rowcount
            if renewed:
                return True
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(locks).values(name=name, holder=holder, expires_at=expires))
        except IntegrityError:
            return False  # someone else holds it
        return True

    def release_lock(self, name: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(locks).where(locks.c.name == name, locks.c.holder == holder))

    def show_holder(self, name: str, holder: str, *, lease: float) -> None:
        """Write `holder` into the `locks` row whatever it says now: for a lock whose
        exclusion lives elsewhere (the PostgreSQL advisory lock), so people can see who
        holds it. expires_at says when it was last confirmed plus `lease`."""
        expires = utcnow() + dt.timedelta(seconds=lease)
        with self.engine.begin() as conn:
            if conn.execute(update(locks).where(locks.c.name == name)
                            .values(holder=holder, expires_at=expires)).rowcount:
                return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(locks).values(name=name, holder=holder, expires_at=expires))
        except IntegrityError:  # written meanwhile (a holder that just lost it): next time
            pass


# --- the scheduler's lock --------------------------------------------------------------------

class SchedulerLock(Protocol):
    """Who may fire jobs. The scheduler calls acquire() each tick while it waits, held()
    each tick while it fires (False: stop firing now), release() when it stops."""

    def acquire(self) -> bool: ...

    def held(self) -> bool: ...

    def release(self) -> None: ...


class LeaseLock:
    """A lease row in `locks`, renewed on every held(): it lapses `lease` seconds after the
    holder stops renewing. For SQLite, where every process is on one machine; it relies on
    the clocks of the processes agreeing."""

    def __init__(self, engine: Engine, name: str, holder: str, *, lease: float) -> None:
        self.store = ScheduleStore(engine)
        self.name, self.holder, self.lease = name, holder, lease

    def acquire(self) -> bool:
        return self.store.take_lock(self.name, self.holder, lease=self.lease)

    def held(self) -> bool:
        return self.store.take_lock(self.name, self.holder, lease=self.lease)

    def release(self) -> None:
        self.store.release_lock(self.name, self.holder)


SCHEDULER_ADVISORY_KEY = advisory_key("newsletter.scheduler")


class PostgresAdvisoryLock:
    """A session-level advisory lock (pg_try_advisory_lock) on a dedicated connection that
    the holder keeps open while it runs. PostgreSQL grants it to one session at a time and
    releases it the moment that session ends, so a holder that dies (kill -9, a crash, its
    connection terminated) frees it at once, and clocks play no part.

    The connection is outside the application's pool (NullPool, autocommit): a pooled
    connection returned with the lock still held would hand it to whoever used it next.
    held() asks the server whether this session still holds the key; a failed query means
    the session is gone (and with it the lock). The `locks` row is kept up to date for
    people to see who holds it (`show_holder`); nothing relies on it."""

    def __init__(self, engine: Engine, name: str, holder: str, *, key: int,
                 lease: float = 15.0) -> None:
        self.name, self.holder, self.key, self.lease = name, holder, key, lease
        self.store = ScheduleStore(engine)
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        self._ids = {"classid": unsigned >> 32, "objid": unsigned & 0xFFFF_FFFF}
        self._engine = create_engine(
            engine.url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
            connect_args={"application_name": f"newsletter scheduler {holder}"[:63],
                          "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                          "keepalives_interval": 5, "keepalives_count": 3})
        self._conn: Connection | None = None
        self._have = False
        self._shown = 0.0
        self.pid: int | None = None   # the lock session's server process, once connected

    def acquire(self) -> bool:
        if self._have:
            return self.held()
        if self._conn is None:
            conn = self._engine.connect()
            try:
                conn.execute(PG_KEEPALIVES)
                self.pid = conn.execute(PG_BACKEND_PID).scalar_one()
            except Exception:
                conn.close()
                raise
            self._conn = conn
        try:
            self._have = bool(self._conn.execute(PG_TRY_LOCK, {"key": self.key}).scalar_one())
        except Exception:
            self._drop()
            raise
        if self._have:
            self._show()
        return self._have

    def held(self) -> bool:
        if not self._have or self._conn is None:
            return False
        try:
            self._have = bool(self._conn.execute(PG_HELD, self._ids).scalar_one())
        except Exception as exc:
            log.warning("the scheduler's lock connection failed (%s): the lock is gone",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._drop()
            return False
        if self._have:
            self._show()
        return self._have

    def release(self) -> None:
        if self._conn is not None and self._have:
            with contextlib.suppress(Exception):  # else the session is gone, and the lock
                self._conn.execute(PG_UNLOCK, {"key": self.key})
            with contextlib.suppress(Exception):
                self.store.release_lock(self.name, self.holder)
        self._drop()
        self._engine.dispose()

    def _drop(self) -> None:
        """Close the lock's connection (ending the session releases the lock)."""
        self._have, self._shown = False, 0.0
        conn, self._conn, self.pid = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _show(self) -> None:
        """Write who holds the lock into `locks`, every lease/3 seconds at most."""
        if time.monotonic() - self._shown < self.lease / 3:
            return
        self._shown = time.monotonic()
        try:
            self.store.show_holder(self.name, self.holder, lease=self.lease)
        except Exception as exc:  # visibility only
            log.warning("could not record the scheduler's holder: %s", exc)


def scheduler_lock(engine: Engine, name: str, holder: str, *,
                   lease: float = 15.0) -> SchedulerLock:
    """The lock for the engine's database: an advisory lock on PostgreSQL, a lease row on
    SQLite."""
    if engine.dialect.name == "postgresql":
        return PostgresAdvisoryLock(engine, name, holder, key=SCHEDULER_ADVISORY_KEY,
                                    lease=lease)
    return LeaseLock(engine, name, holder, lease=lease)


def _schedule(r: Row[Any]) -> Schedule:
    return Schedule(r.id, r.kind, r.campaign_id, r.issue_path, r.digest, r.run_at,
                    r.cron, r.tz, r.status, r.created_at, bool(r.local_time))


def _run(r: Row[Any]) -> ScheduleRun:
    return ScheduleRun(r.id, r.schedule_id, r.fire_time, r.started_at, r.outcome,
                       r.campaign_id, r.note)
