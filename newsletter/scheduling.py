"""Scheduled sends on APScheduler 3: one-off issues at a time, recurring digests on a cron.

Jobs persist in APScheduler's SQLAlchemy job store in the same database, so they survive
restarts. Only one process per database fires them: the holder of the scheduler's lock
(store.schedules.scheduler_lock: a PostgreSQL advisory lock, or on SQLite a lease row in
`locks` renewed every tick); the others wait to take over. A firing first records
a row unique on (schedule, fire time), so even a job that fires twice for the same time
sends once. Recipients are resolved when the send starts, not when it was scheduled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import zoneinfo
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from apscheduler.events import (
    EVENT_JOB_MISSED,
    EVENT_JOB_SUBMITTED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger

from .content.parse import load_issue
from .delivery.engine import runner_name
from .errors import ConfigError, ConflictError
from .store.schedules import Schedule, SchedulerLock, ScheduleStore, scheduler_lock
from .store.schema import CampaignStatus

if TYPE_CHECKING:
    from .service import Newsletter

log = logging.getLogger(__name__)

LOCK = "scheduler"
JOB_FUNC = "newsletter.scheduling:fire"

# APScheduler stores a job as a reference to a module-level function plus its arguments, so
# the firing function cannot be a bound method: it finds the running scheduler here.
_ACTIVE: Scheduler | None = None


def zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError("--tz", f"unknown time zone {name!r} (e.g. Europe/Berlin, "
                                  "Asia/Shanghai, UTC)") from None


def parse_at(text: str, tz: str) -> dt.datetime:
    """'2026-12-01 08:00' in zone tz, as an aware datetime."""
    try:
        naive = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError("--at", f"not a date and time: {text!r} (use 'YYYY-MM-DD HH:MM')") \
            from None
    return naive.replace(tzinfo=zone(tz)) if naive.tzinfo is None else naive


def cron_trigger(cron: str, tz: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(cron, timezone=zone(tz))
    except ValueError as exc:
        raise ConfigError("--cron", f"{cron!r}: {exc}") from None


class SharedEngineJobStore(SQLAlchemyJobStore):  # type: ignore[misc]
    """APScheduler's SQLAlchemy job store on the application's own engine.

    APScheduler's shutdown() disposes the job store's engine. Ours is shared with everything
    else in the process, so a scheduler that stops or loses its lock would dispose the pool
    under running sends: their checked-out connections then go back to a pool nobody holds
    and stay open until the garbage collector finds them (a PostgreSQL backend each). The
    engine belongs to the Store, which closes it."""

    def shutdown(self) -> None:
        pass


def _job_store(nl: Newsletter) -> SQLAlchemyJobStore:
    """The shared job store, opened without a running scheduler: editors' commands change
    jobs here and the running scheduler (any process) sees them at its next wake-up, within
    a second. A scheduler object is needed only to build Job objects; it is never started,
    so nothing can fire in this process."""
    store = SharedEngineJobStore(engine=nl.store.engine)
    store.start(BlockingScheduler(timezone=dt.UTC), "default")
    return store


def job_id(schedule_id: int) -> str:
    return f"schedule-{schedule_id}"


def job_options(nl: Newsletter, schedule_id: int) -> dict[str, Any]:
    """How every schedule's job is set up, wherever it is added: one firing at a time, missed
    firings coalesced, and late by at most the grace period."""
    return {"id": job_id(schedule_id), "args": [schedule_id], "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": int(nl.settings.schedule_grace_seconds)}


class Schedules:
    """The editor's operations on schedules (CLI, API): no scheduler needs to run here."""

    def __init__(self, nl: Newsletter) -> None:
        self.nl = nl
        self.store = ScheduleStore(nl.store.engine)

    def add_once(self, path: Any, slugs: list[str], *, at: dt.datetime, tz: str,
                 local_time: bool = False) -> Schedule:
        """Validate and render the issue now (what was previewed is what goes out).

        local_time: `at`'s wall-clock time in each subscriber's own zone (their `tz`
        attribute, else `tz`); the first firing is at the earliest of those zones, and each
        firing schedules the next zone's release.
        """
        first = self.first_release(slugs, at, tz) if local_time else at
        if first <= dt.datetime.now(dt.UTC):
            raise ConflictError(f"{first:%Y-%m-%d %H:%M %Z} is in the past")
        plan = self.nl.plan_send(path, slugs)
        if not plan.new:
            raise ConflictError(f"issue is already in campaign {plan.campaign.id}; "
                                "schedule another issue or resume that campaign")
        return self.add_campaign(plan.campaign.id, run_at=at, first=first, tz=tz,
                                 local_time=local_time, issue_path=str(path))

    def add_campaign(self, campaign_id: int, *, run_at: dt.datetime, first: dt.datetime,
                     tz: str, local_time: bool = False, issue_path: str | None = None) \
            -> Schedule:
        """A one-off schedule of a campaign that exists already (the API creates campaigns
        from uploaded issues), first firing at `first`."""
        schedule = self.store.create(kind="once", tz=tz, campaign_id=campaign_id,
                                     issue_path=issue_path, run_at=run_at.astimezone(dt.UTC),
                                     local_time=local_time)
        self._add_job(schedule, DateTrigger(run_date=first))
        return schedule

    def first_release(self, slugs: list[str], at: dt.datetime, tz: str) -> dt.datetime:
        """The earliest wall-clock `at` among the zones of the lists' subscribers now."""
        wall = at.replace(tzinfo=None)
        names = {tz}
        for slug in slugs:
            mlist = self.nl.store.get_list(slug)
            for member in self.nl.store.members(mlist.id):
                if member.attributes.get("tz"):
                    names.add(str(member.attributes["tz"]))
        times = []
        for name in names:
            with contextlib.suppress(ConfigError):
                times.append(wall.replace(tzinfo=zone(name)).astimezone(dt.UTC))
        return min(times)

    def add_digest(self, name: str, *, cron: str, tz: str) -> Schedule:
        trigger = cron_trigger(cron, tz)
        schedule = self.store.create(kind="digest", tz=tz, digest=name, cron=cron)
        self._add_job(schedule, trigger)
        return schedule

    @cached_property
    def jobs(self) -> SQLAlchemyJobStore:
        return _job_store(self.nl)

    def _add_job(self, schedule: Schedule, trigger: Any) -> None:
        job = Job(self.jobs._scheduler, func=JOB_FUNC, kwargs={}, trigger=trigger,
                  executor="default", name=f"schedule {schedule.id}",
                  next_run_time=trigger.get_next_fire_time(None, dt.datetime.now(dt.UTC)),
                  **job_options(self.nl, schedule.id))
        self.jobs.add_job(job)

    def update(self, schedule_id: int, path: Any) -> Schedule:
        """Re-render a one-off schedule's issue from its file (before it has fired)."""
        schedule = self.store.get(schedule_id)
        if schedule.kind != "once" or schedule.campaign_id is None:
            raise ConflictError(f"schedule {schedule_id} is not a one-off issue")
        if schedule.status not in ("active", "paused"):
            raise ConflictError(f"schedule {schedule_id} is {schedule.status}")
        issue = load_issue(path)
        main, rendered, editions = self.nl.render_editions(issue)
        self.nl.store.update_campaign_content(
            schedule.campaign_id, issue_key=issue.key, content_hash=issue.content_hash(),
            subject=rendered.subject, issue_json=main.model_dump_json(), html=rendered.html,
            text=rendered.text, editions=editions)
        return schedule

    def next_run(self, schedule: Schedule) -> dt.datetime | None:
        job = self.jobs.lookup_job(job_id(schedule.id))
        return job.next_run_time if job is not None else None

    def pause(self, schedule_id: int) -> None:
        self._modify(schedule_id, next_run_time=None)
        self.store.set_status(schedule_id, "paused")

    def resume(self, schedule_id: int) -> None:
        job = self._lookup(schedule_id)
        job._modify(next_run_time=job.trigger.get_next_fire_time(None, dt.datetime.now(dt.UTC)))
        self.jobs.update_job(job)
        self.store.set_status(schedule_id, "active")

    def cancel(self, schedule_id: int) -> None:
        schedule = self.store.get(schedule_id)
        with contextlib.suppress(JobLookupError):
            self.jobs.remove_job(job_id(schedule_id))
        self.store.set_status(schedule_id, "cancelled")
        if schedule.campaign_id is not None:
            self.nl.store.cancel_campaign(schedule.campaign_id)

    def run_now(self, schedule_id: int) -> None:
        """Make the job due now; the running scheduler fires it within a second."""
        self._modify(schedule_id, next_run_time=dt.datetime.now(dt.UTC))

    def _lookup(self, schedule_id: int) -> Job:
        self.store.get(schedule_id)
        job = self.jobs.lookup_job(job_id(schedule_id))
        if job is None:
            raise ConflictError(f"schedule {schedule_id} has no pending job (it fired, or was "
                                "cancelled)")
        return job

    def _modify(self, schedule_id: int, **changes: Any) -> None:
        job = self._lookup(schedule_id)
        job._modify(**changes)
        self.jobs.update_job(job)


class Scheduler:
    """The process that fires jobs, while it holds the scheduler's lock; start it from the
    web app's lifespan or from `newsletter scheduler`. `lease` is the SQLite lease's length
    (on PostgreSQL, how long the `locks` row's expires_at runs ahead)."""

    def __init__(self, nl: Newsletter, *, lease: float = 15.0, tick: float = 1.0,
                 sweep: float = 30.0,
                 on_fired: Callable[[int, str], None] | None = None) -> None:
        self.nl = nl
        self.store = ScheduleStore(nl.store.engine)
        self.lease = lease
        self.tick = tick          # how often to check the lock and re-read the job store
        self.sweep = sweep        # how often to look for campaigns with retries due
        self._last_sweep = 0.0
        self._resuming: dict[int, asyncio.Task[None]] = {}
        self.holder = runner_name() + f":{id(self):x}"
        self.lock: SchedulerLock = scheduler_lock(nl.store.engine, LOCK, self.holder,
                                                  lease=lease)
        self.on_fired = on_fired
        self.scheduler: AsyncIOScheduler | None = None
        self._task: asyncio.Task[None] | None = None
        self._due: dict[str, dt.datetime] = {}

    @property
    def active(self) -> bool:
        return self.scheduler is not None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep())

    async def stop(self) -> None:
        global _ACTIVE
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in self._resuming.values():
            task.cancel()
        for task in self._resuming.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._release()
        if _ACTIVE is self:
            _ACTIVE = None

    def _release(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        with contextlib.suppress(Exception):
            self.lock.release()

    async def _keep(self) -> None:
        """Hold the lock (or wait for it), and wake the scheduler up every tick so jobs
        added or changed by other processes are seen at once. The holder re-checks the lock
        every tick and stops firing as soon as it is gone."""
        global _ACTIVE
        while True:
            try:
                have = self.lock.held() if self.scheduler is not None else self.lock.acquire()
            except Exception as exc:  # a busy database: keep what we have, try again
                log.warning("scheduler lock check failed: %s", exc)
                have = self.scheduler is not None
            if have and self.scheduler is None:
                _ACTIVE = self
                self.scheduler = AsyncIOScheduler(
                    jobstores={"default": SharedEngineJobStore(engine=self.nl.store.engine)},
                    timezone=dt.UTC)
                self.scheduler.add_listener(self._missed, EVENT_JOB_MISSED)
                self.scheduler.add_listener(self._submitted, EVENT_JOB_SUBMITTED)
                self.scheduler.start()
                log.info("scheduler %s holds the lock and fires jobs", self.holder)
            elif not have and self.scheduler is not None:
                log.warning("scheduler %s lost the lock; another process fires jobs now",
                            self.holder)
                self.scheduler.shutdown(wait=False)
                self.scheduler = None
            if self.scheduler is not None:
                self.scheduler.wakeup()
                if time.monotonic() - self._last_sweep >= self.sweep:
                    self._last_sweep = time.monotonic()
                    self._resume_due()
            await asyncio.sleep(self.tick)

    def _resume_due(self) -> None:
        """Retries with backoff need someone to run them when they fall due: the lock
        holder does, for campaigns no process is sending. With delivery_workers the workers
        claim due retries themselves."""
        if self.nl.settings.delivery_workers:
            return
        try:
            due = self.nl.store.campaigns_due()
        except Exception as exc:
            log.warning("looking for due retries failed: %s", exc)
            return
        for campaign_id in due:
            task = self._resuming.get(campaign_id)
            if task is None or task.done():
                self._resuming[campaign_id] = asyncio.create_task(self._resume(campaign_id))

    async def _resume(self, campaign_id: int) -> None:
        try:
            report = await self.nl.run(self.nl.resume_plan(campaign_id), retry_now=False)
            log.warning("campaign %d: due retries sent, %d delivered", campaign_id,
                        report.progress.sent)
        except ConflictError as exc:  # another process took it meanwhile
            log.info("campaign %d not resumed: %s", campaign_id, exc)
        except Exception as exc:
            log.error("campaign %d: resuming its retries failed: %s", campaign_id, exc)

    def _submitted(self, event: JobSubmissionEvent) -> None:
        """Remember the time a job was due: the firing's identity (the job itself is told
        nothing by APScheduler). Called before the job's coroutine starts."""
        if event.scheduled_run_times:
            self._due[event.job_id] = max(event.scheduled_run_times).astimezone(dt.UTC)

    def _missed(self, event: JobExecutionEvent) -> None:
        """A job found past its grace time when the scheduler (re)started: recorded, never
        run late."""
        schedule_id = int(event.job_id.removeprefix("schedule-"))
        fire = event.scheduled_run_time
        run = self.store.start_run(schedule_id, fire, outcome="missed",
                                   note="nothing was running within the grace period")
        if run is not None:
            log.warning("schedule %d missed its run at %s", schedule_id, fire)
            schedule = self.store.get(schedule_id)
            if schedule.kind == "once":
                self.store.set_status(schedule_id, "missed")
            if self.on_fired:
                self.on_fired(schedule_id, "missed")

    async def fire(self, schedule_id: int) -> str:
        """Run one firing of a schedule: once per (schedule, fire time), wherever it runs."""
        schedule = self.store.get(schedule_id)
        fire_time = self._due.pop(job_id(schedule_id), None) or self._fire_time(schedule)
        run = self.store.start_run(schedule_id, fire_time)
        if run is None:
            log.info("schedule %d already fired for %s", schedule_id, fire_time)
            return "duplicate"
        outcome, campaign_id, note = "failed", None, ""
        try:
            if schedule.kind == "once":
                assert schedule.campaign_id is not None
                campaign_id = schedule.campaign_id
                status = self.nl.store.get_campaign(campaign_id).status
                if status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED):
                    # Newsletter.run resumes a paused campaign: a schedule firing must not
                    # override an editor's pause (or a cancel). Resuming it sends it.
                    self.store.set_status(schedule_id, "done")
                    outcome = "skipped"
                    note = (f"campaign {campaign_id} is {status.value}"
                            + ("; newsletter campaigns resume sends it"
                               if status == CampaignStatus.PAUSED else ""))
                    return outcome
                if schedule.local_time:
                    assert schedule.run_at is not None
                    wall = schedule.run_at.astimezone(zone(schedule.tz)).replace(tzinfo=None)
                    self.nl.store.release_by_zone(campaign_id, wall, schedule.tz, zone)
                plan = self.nl.resume_plan(campaign_id)
                try:
                    report = await self.nl.run(plan, retry_now=False)
                    note = ("handed to the workers" if report.workers
                            else f"sent {report.progress.sent}") \
                        + (f"; {report.aborted}" if report.aborted else "")
                except ConflictError as exc:
                    if "is being sent by" not in str(exc):
                        raise
                    # A run already in progress (retries, an editor's resume) sends the rows
                    # this firing released: nothing to add.
                    note = str(exc)
                outcome = "sent"
                held = self.nl.store.next_release_at(campaign_id) \
                    if schedule.local_time else None
                if held is not None and self.scheduler is not None:
                    # The next zone's turn: the same job, at its release time.
                    self.scheduler.add_job(JOB_FUNC, DateTrigger(run_date=held),
                                           replace_existing=True,
                                           **job_options(self.nl, schedule_id))
                    note += f"; next zone at {held:%Y-%m-%d %H:%M} UTC"
                else:
                    self.store.set_status(schedule_id, "done")
            else:
                outcome, campaign_id, note = await self.nl.fire_digest(schedule, fire_time)
        except Exception as exc:
            note = str(exc)
            log.error("schedule %d failed: %s", schedule_id, exc)
        finally:
            self.store.finish_run(run.id, outcome=outcome, campaign_id=campaign_id, note=note)
            if self.on_fired:
                self.on_fired(schedule_id, outcome)
        return outcome

    def _fire_time(self, schedule: Schedule) -> dt.datetime:
        """Fallback for the time this firing was due (normally known from the submission
        event): the one-off time, or the cron's latest fire time."""
        if schedule.kind == "once":
            assert schedule.run_at is not None
            return schedule.run_at
        assert schedule.cron is not None
        trigger = cron_trigger(schedule.cron, schedule.tz)
        now = dt.datetime.now(dt.UTC)
        t = trigger.get_next_fire_time(None, now - dt.timedelta(
            seconds=self.nl.settings.schedule_grace_seconds + 1))
        last = t
        while t is not None and t <= now:
            last = t
            t = trigger.get_next_fire_time(t, t + dt.timedelta(microseconds=1))
        assert last is not None
        fire_time: dt.datetime = last.astimezone(dt.UTC)
        return fire_time


async def fire(schedule_id: int) -> str:
    """The job function APScheduler persists (by reference)."""
    if _ACTIVE is None:
        raise RuntimeError("no scheduler is running in this process")
    return await _ACTIVE.fire(schedule_id)
