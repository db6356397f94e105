"""Schedules, their runs and the scheduler's lease, on SQLAlchemy Core (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import NotFoundError
from .schema import CampaignStatus, campaigns, locks, schedule_runs, schedules


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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


def _schedule(r: Row[Any]) -> Schedule:
    return Schedule(r.id, r.kind, r.campaign_id, r.issue_path, r.digest, r.run_at,
                    r.cron, r.tz, r.status, r.created_at, bool(r.local_time))


def _run(r: Row[Any]) -> ScheduleRun:
    return ScheduleRun(r.id, r.schedule_id, r.fire_time, r.started_at, r.outcome,
                       r.campaign_id, r.note)
