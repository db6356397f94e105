"""Editor use cases of the admin API: campaigns from an uploaded issue, test sends, scheduling
an existing campaign, sending it now through the scheduler, pause, resume and cancel.

The CLI sends in its own process and waits; an API request must not. So "send now" and
"resume" become a one-off schedule due now, and the process holding the scheduler lease
(`newsletter serve` or `newsletter scheduler`) fires it within a second, with the same
exactly-once guarantees as any scheduled send. Every change is recorded in the audit log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from email_validator import EmailNotValidError
from sqlalchemy import ColumnElement, Engine, insert, select, update

from .admin import Admin, InvalidError
from .content.model import Issue
from .content.parse import parse_issue
from .delivery.capture import CaptureServer
from .delivery.relay import Relay, SmtpRelayClient
from .errors import ConflictError, HeaderInjectionError, NewsletterError, NotFoundError
from .render.issue import RenderedIssue
from .render.message import PreparedMessage, Recipient
from .scheduling import Schedules, zone
from .store.base import Campaign, DeliveryCounts, MailingList
from .store.imports import import_csv, normalize_email
from .store.schedules import Schedule
from .store.schema import (
    CampaignStatus,
    SuppressionKind,
    campaigns,
    import_jobs,
    suppressions,
    utcnow,
)
from .store.suppression import Suppression

if TYPE_CHECKING:
    from .service import Newsletter, SendPlan

log = logging.getLogger(__name__)

FORMATS = {"markdown": ".md", "yaml": ".yaml", "json": ".json"}
TEST_PREFIX = "[TEST] "
MAX_TEST_RECIPIENTS = 10
# Schedule statuses that still lead to a firing (or may again, once resumed).
_PENDING = ("active", "paused")


@dataclass(frozen=True)
class CampaignView:
    """A campaign with where its ledger stands and the schedules that send it."""

    campaign: Campaign
    lists: list[str]
    counts: DeliveryCounts
    rate: float                      # messages per second over the last minute
    schedules: list[tuple[Schedule, dt.datetime | None]]  # with each one's next run


@dataclass(frozen=True)
class TestResult:
    address: str
    sent: bool
    error: str | None = None


class Editor:
    """Campaign and schedule operations for one actor (`cli:USER` or `token:NAME`)."""

    def __init__(self, nl: Newsletter, actor: str, *,
                 schedules: Schedules | None = None) -> None:
        self.nl = nl
        self.actor = actor
        self.admin = Admin(nl, actor)
        self.schedules = schedules or Schedules(nl)

    @property
    def engine(self) -> Engine:
        return self.nl.store.engine

    def audit(self, action: str, target: str = "", **detail: Any) -> None:
        self.admin.audit(action, target, **detail)

    # --- campaigns -------------------------------------------------------------------------

    def create_campaign(self, text: str, *, fmt: str, lists: Sequence[str],
                        segments: Sequence[str] = (), again: bool = False,
                        name: str = "<issue>") -> SendPlan:
        """A draft campaign from issue text, validated by the issue parser (ContentError
        names the line and field). An unfinished campaign of the same issue and lists is
        returned instead of a second one (plan.new is then False), as `newsletter send`
        does."""
        if fmt not in FORMATS:
            raise InvalidError("format", f"one of {', '.join(FORMATS)}, not {fmt!r}")
        issue = parse_issue(text, name=name, fmt=fmt)
        slugs = list(dict.fromkeys(lists))
        if not slugs and not segments:
            raise InvalidError("lists", "name at least one list or segment")
        known = {m.slug for m, _ in self.nl.store.all_lists()}
        if missing := [s for s in slugs if s not in known]:
            raise InvalidError("lists", f"no list {missing[0]!r}")
        for seg in segments:
            try:
                self.admin.get_segment(seg)
            except NotFoundError as exc:
                raise InvalidError("segments", str(exc)) from None
        # plan_send reads a file, and a scheduled campaign keeps the path of its issue
        # (schedule update re-renders from it): the text is kept under var/issues/.
        folder = self.nl.settings.var_dir / "issues"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{issue.key}-{secrets.token_hex(4)}{FORMATS[fmt]}"
        path.write_text(text, encoding="utf-8")
        try:
            plan = self.nl.plan_send(path, slugs, again=again, segments=list(segments))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if not plan.new:
            path.unlink(missing_ok=True)
            return plan
        kept = folder / f"campaign-{plan.campaign.id}{FORMATS[fmt]}"
        path.replace(kept)
        self.audit("campaign.create", f"campaign {plan.campaign.id}", issue=issue.key,
                   lists=[m.slug for m in plan.lists], segments=list(segments), again=again)
        return plan

    def issue_path(self, campaign_id: int) -> Path | None:
        """The issue file kept for a campaign created through the API, if any."""
        folder = self.nl.settings.var_dir / "issues"
        for suffix in FORMATS.values():
            path = folder / f"campaign-{campaign_id}{suffix}"
            if path.is_file():
                return path
        return None

    def campaign_ids(self, *, before_id: int | None = None, status: str | None = None,
                     limit: int = 50) -> list[int]:
        """Campaign ids, newest first (store.all_campaigns has no cursor)."""
        if status is not None and status not in set(CampaignStatus):
            raise InvalidError("status", "one of " + ", ".join(CampaignStatus))
        query = select(campaigns.c.id).order_by(campaigns.c.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(campaigns.c.id < before_id)
        if status is not None:
            query = query.where(campaigns.c.status == status)
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(query).scalars()]

    def view(self, campaign_id: int) -> CampaignView:
        store = self.nl.store
        c = store.get_campaign(campaign_id)
        lists = store.lists_by_id(c.list_ids)
        return CampaignView(
            c, [lists[i].slug for i in c.list_ids if i in lists], store.delivery_counts(c.id),
            store.recent_rate(c.id),
            [(s, self.schedules.next_run(s) if s.status in _PENDING else None)
             for s in self._schedules_of(c.id)])

    def _schedules_of(self, campaign_id: int) -> list[Schedule]:
        return [s for s in self.schedules.store.all() if s.campaign_id == campaign_id]

    async def test_send(self, campaign_id: int, addresses: Sequence[str], *,
                        relay: Relay | None = None) -> list[TestResult]:
        """Send the campaign's issue to a few addresses, subject prefixed "[TEST] ".

        Built exactly as the real send builds it (same rendering, headers, DKIM), but no
        ledger row is written: the campaign's counts and the recipients' histories do not
        change. The links carry subscriber 0, so the test's unsubscribe link touches
        nobody. `relay`: default the first configured relay, else a capture server.
        """
        checked = self._test_addresses(addresses)
        c = self.nl.store.get_campaign(campaign_id)
        issue = Issue.model_validate_json(c.issue_json)
        mlists = list(self.nl.store.lists_by_id(c.list_ids).values())
        if not mlists:
            raise ConflictError(f"campaign {campaign_id} has no lists left")
        message = self.nl.prepare(RenderedIssue(c.subject, c.html, c.text, issue.language),
                                  mlists, campaign_id=c.id, subject_prefix=TEST_PREFIX,
                                  issue=issue)
        results = await self._send_tests(message, mlists[0].id, checked, relay)
        self.audit("campaign.test_send", f"campaign {campaign_id}",
                   sent=sum(r.sent for r in results), failed=sum(not r.sent for r in results))
        return results

    async def test_send_issue(self, issue: Issue, addresses: Sequence[str], *,
                              relay: Relay | None = None) -> list[TestResult]:
        """Send an issue that is in no campaign (`newsletter send FILE --to`) to a few
        addresses, subject prefixed "[TEST] ": rendered now, and sent like test_send's
        messages. Nothing is stored but the audit entry: no campaign, ledger row or
        archive entry. Without a list, the message names a stand-in list called after the
        issue, and "view in browser" points at the site (the issue is in no archive yet).
        A bilingual issue is test-sent in its main edition, the one a list in the issue's
        language gets.
        """
        checked = self._test_addresses(addresses)
        main = next(iter(issue.editions().values()))
        stand_in = MailingList(0, "test", main.title, "", utcnow(), language=main.language)
        message = self.nl.prepare(self.nl.render(main), [stand_in],
                                  subject_prefix=TEST_PREFIX)
        results = await self._send_tests(message, stand_in.id, checked, relay)
        self.audit("issue.test_send", issue.key, sent=sum(r.sent for r in results),
                   failed=sum(not r.sent for r in results))
        return results

    @staticmethod
    def _test_addresses(addresses: Sequence[str]) -> list[str]:
        if not addresses:
            raise InvalidError("addresses", "name at least one address")
        if len(addresses) > MAX_TEST_RECIPIENTS:
            raise InvalidError("addresses", f"at most {MAX_TEST_RECIPIENTS} addresses")
        checked = []
        for raw in addresses:
            try:
                checked.append(normalize_email(raw))
            except (EmailNotValidError, ValueError, HeaderInjectionError) as exc:
                raise InvalidError("addresses", f"invalid address {raw!r}: {exc}") from None
        return checked

    async def _send_tests(self, message: PreparedMessage, list_id: int,
                          addresses: Sequence[str], relay: Relay | None) -> list[TestResult]:
        """The one place test messages go out: one connection, DKIM as in a real send."""
        results: list[TestResult] = []
        async with contextlib.AsyncExitStack() as stack:
            if relay is None:
                relay = await self._default_relay(stack)
            connection = await relay.connect()
            stack.push_async_callback(connection.close)
            for address in addresses:
                data = message.build(Recipient(0, list_id, address))
                if self.nl.dkim is not None:
                    data = self.nl.dkim.sign(data) + data
                try:
                    await connection.send(self.nl.settings.sender_email, address, data)
                except Exception as exc:  # one refused address does not stop the others
                    results.append(TestResult(address, False, str(exc)))
                    if not connection.alive:
                        connection = await relay.connect()
                        stack.push_async_callback(connection.close)
                else:
                    results.append(TestResult(address, True))
        return results

    async def _default_relay(self, stack: contextlib.AsyncExitStack) -> Relay:
        plans = self.nl.relay_plans()
        if plans:
            return plans[0].relay
        capture = CaptureServer(self.nl.settings.outbox_dir)
        await capture.start()
        stack.push_async_callback(capture.stop)
        return SmtpRelayClient(capture.relay, timeout=self.nl.settings.smtp_timeout)

    def schedule(self, campaign_id: int, *, at: dt.datetime, tz: str = "UTC",
                 local_time: bool = False) -> Schedule:
        """Send a draft campaign at `at` (aware, or naive in `tz`); with local_time, at
        that wall-clock time in each subscriber's zone, as `newsletter schedule` does."""
        zone(tz)  # ConfigError names the zone
        if at.tzinfo is None:
            at = at.replace(tzinfo=zone(tz))
        c = self._draft(campaign_id)
        first = at
        if local_time:
            slugs = [m.slug for m in self.nl.store.lists_by_id(c.list_ids).values()]
            first = self.schedules.first_release(slugs, at, tz)
        if first <= dt.datetime.now(dt.UTC):
            raise InvalidError("at", f"{first:%Y-%m-%d %H:%M %Z} is in the past")
        schedule = self._add(c, run_at=at, first=first, tz=tz, local_time=local_time)
        self.audit("campaign.schedule", f"campaign {campaign_id}", schedule=schedule.id,
                   at=at.isoformat(), tz=tz, local_time=local_time)
        return schedule

    def send_now(self, campaign_id: int) -> Schedule:
        """Hand the campaign to the scheduler, due now: a draft starts, a campaign whose
        schedule has not fired yet fires now, an unfinished one continues."""
        c = self.nl.store.get_campaign(campaign_id)
        if c.status in (CampaignStatus.COMPLETED, CampaignStatus.CANCELLED):
            raise ConflictError(f"campaign {campaign_id} is {c.status.value}; create it again "
                                "(with again=true) to send the issue once more")
        if c.status == CampaignStatus.PAUSED:
            return self.resume(campaign_id)
        if c.status == CampaignStatus.RUNNING and c.runner is not None:
            raise ConflictError(f"campaign {campaign_id} is being sent by {c.runner}")
        for s in self._schedules_of(campaign_id):
            if s.status == "active" and self.schedules.next_run(s) is not None:
                self.schedules.run_now(s.id)
                self.audit("campaign.send_now", f"campaign {campaign_id}", schedule=s.id)
                return self.schedules.store.get(s.id)
        now = dt.datetime.now(dt.UTC)
        schedule = self._add(c, run_at=now, first=now, tz="UTC", local_time=False)
        self.audit("campaign.send_now", f"campaign {campaign_id}", schedule=schedule.id)
        return schedule

    def pause(self, campaign_id: int) -> CampaignView:
        """Pause a campaign: a running send stops within a second; a scheduled one does not
        fire (its schedule is paused with it)."""
        c = self.nl.store.get_campaign(campaign_id)
        if c.status == CampaignStatus.PAUSED:
            return self.view(campaign_id)
        if c.status not in (CampaignStatus.RUNNING, CampaignStatus.SCHEDULED):
            # A draft is not going anywhere yet; pausing it would only make "resume" send it.
            raise ConflictError(f"campaign {campaign_id} is {c.status.value}; nothing to pause")
        # The schedule first, so it keeps its time: left active, it would fire, find the
        # campaign paused and be used up (recorded as skipped).
        for s in self._schedules_of(campaign_id):
            if s.status == "active" and self.schedules.next_run(s) is not None:
                self.schedules.pause(s.id)
        if self.nl.store.pause_campaign(campaign_id, reason=f"paused by {self.actor}"):
            self.audit("campaign.pause", f"campaign {campaign_id}")
        return self.view(campaign_id)

    def resume(self, campaign_id: int) -> Schedule:
        """Resume a paused campaign: its paused schedule again (it fires at its time, or at
        once if that has passed), else a run due now in the scheduler's process."""
        c = self.nl.store.get_campaign(campaign_id)
        if c.status != CampaignStatus.PAUSED:
            raise ConflictError(f"campaign {campaign_id} is {c.status.value}, not paused")
        for s in self._schedules_of(campaign_id):
            if s.status == "paused" and self.schedules.next_run(s) is None:
                with contextlib.suppress(ConflictError):  # its job is gone: run it now below
                    self.schedules.resume(s.id)
                    # Back to waiting for its time, as before the pause (not "running").
                    self.nl.store.unpause_campaign(campaign_id, to=CampaignStatus.SCHEDULED)
                    self.audit("campaign.resume", f"campaign {campaign_id}", schedule=s.id)
                    return self.schedules.store.get(s.id)
        # The new schedule makes the campaign 'scheduled' again (a schedule firing for a
        # paused campaign skips it), and its firing sends the rest.
        now = dt.datetime.now(dt.UTC)
        schedule = self._add(c, run_at=now, first=now, tz="UTC", local_time=False)
        self.audit("campaign.resume", f"campaign {campaign_id}", schedule=schedule.id)
        return schedule

    def cancel(self, campaign_id: int) -> CampaignView:
        """Cancel for good: whoever has not got it yet never will from this campaign; its
        schedules are cancelled with it."""
        c = self.nl.store.get_campaign(campaign_id)
        if c.status == CampaignStatus.COMPLETED:
            raise ConflictError(f"campaign {campaign_id} is completed; nothing to cancel")
        if c.status == CampaignStatus.CANCELLED:
            return self.view(campaign_id)
        schedules = [s.id for s in self._schedules_of(campaign_id) if s.status in _PENDING]
        for schedule_id in schedules:
            self.schedules.cancel(schedule_id)  # cancels the campaign too
        self.nl.store.cancel_campaign(campaign_id)
        self.audit("campaign.cancel", f"campaign {campaign_id}", schedules=schedules)
        return self.view(campaign_id)

    def _draft(self, campaign_id: int) -> Campaign:
        c = self.nl.store.get_campaign(campaign_id)
        if c.status != CampaignStatus.DRAFT or c.started_at is not None:
            raise ConflictError(f"campaign {campaign_id} is {c.status.value}; only a draft "
                                "can be scheduled (pause, resume or send-now the others)")
        if any(s.status in _PENDING for s in self._schedules_of(campaign_id)):
            raise ConflictError(f"campaign {campaign_id} is scheduled already")
        return c

    def _add(self, c: Campaign, *, run_at: dt.datetime, first: dt.datetime, tz: str,
             local_time: bool) -> Schedule:
        """A one-off schedule of an existing campaign and its job (first firing `first`)."""
        path = self.issue_path(c.id)
        return self.schedules.add_campaign(c.id, run_at=run_at, first=first, tz=tz,
                                           local_time=local_time,
                                           issue_path=str(path) if path else None)

    # --- schedules -------------------------------------------------------------------------

    def schedule_views(self) -> list[tuple[Schedule, dt.datetime | None]]:
        return [(s, self.schedules.next_run(s) if s.status in _PENDING else None)
                for s in self.schedules.store.all()]

    def pause_schedule(self, schedule_id: int) -> Schedule:
        self.schedules.pause(schedule_id)
        self.audit("schedule.pause", f"schedule {schedule_id}")
        return self.schedules.store.get(schedule_id)

    def resume_schedule(self, schedule_id: int) -> Schedule:
        self.schedules.resume(schedule_id)
        self.audit("schedule.resume", f"schedule {schedule_id}")
        return self.schedules.store.get(schedule_id)

    def cancel_schedule(self, schedule_id: int) -> Schedule:
        schedule = self.schedules.store.get(schedule_id)
        if schedule.status not in _PENDING:
            raise ConflictError(f"schedule {schedule_id} is {schedule.status}")
        self.schedules.cancel(schedule_id)
        self.audit("schedule.cancel", f"schedule {schedule_id}")
        return self.schedules.store.get(schedule_id)

    # --- suppression paging ----------------------------------------------------------------

    def suppressions(self, *, kind: str | None = None, reason: str | None = None,
                     after_id: int = 0, limit: int = 50) -> list[Suppression]:
        """One page of the suppression list in id order (Admin.suppressions streams all)."""
        if kind is not None and kind not in set(SuppressionKind):
            raise InvalidError("kind", "one of " + ", ".join(SuppressionKind))
        query = (select(suppressions).where(suppressions.c.id > after_id)
                 .order_by(suppressions.c.id).limit(limit))
        if kind is not None:
            query = query.where(suppressions.c.kind == kind)
        if reason is not None:
            query = query.where(suppressions.c.reason == reason)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [Suppression(r.id, r.email_key, SuppressionKind(r.kind), r.reason, r.note,
                            r.created_at) for r in rows]


# --- import jobs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportJob:
    id: int
    list_id: int
    filename: str
    status: str                 # queued, running, done, failed
    dry_run: bool
    rows_read: int
    imported: int
    updated: int
    skipped: int
    report_path: str | None
    error: str | None
    created_by: str
    created_at: dt.datetime
    finished_at: dt.datetime | None


class ImportJobs:
    """Subscriber imports that run in the background and are polled by id.

    `submit` keeps the upload under var/imports/ and records a queued job; `run` (in a
    worker thread of the caller's choice) imports it with store.imports.import_csv, writing
    rows_read as it goes, then the counts and the report of rejected rows.
    """

    def __init__(self, nl: Newsletter) -> None:
        self.nl = nl

    @property
    def folder(self) -> Path:
        return self.nl.settings.var_dir / "imports"

    def submit(self, list_slug: str, filename: str, upload: BinaryIO, *, dry_run: bool,
               actor: str) -> ImportJob:
        mlist = self.nl.store.get_list(list_slug)
        with self.nl.store.engine.begin() as conn:
            key = conn.execute(insert(import_jobs).values(
                list_id=mlist.id, filename=filename[:200], status="queued", dry_run=dry_run,
                created_by=actor[:200], created_at=utcnow())).inserted_primary_key
        assert key is not None
        job_id = int(key[0])
        self.folder.mkdir(parents=True, exist_ok=True)
        # The stored name is ours, never the client's: it cannot point outside the folder.
        with self.source(job_id).open("wb") as out:
            shutil.copyfileobj(upload, out, 1024 * 1024)
        Admin(self.nl, actor).audit("import.submit", mlist.slug, job=job_id, file=filename,
                                    dry_run=dry_run)
        return self.get(job_id)

    def source(self, job_id: int) -> Path:
        return self.folder / f"job-{job_id}.csv"

    def run(self, job_id: int, *, encoding: str | None = None,
            delimiter: str | None = None) -> ImportJob:
        """Import the job's file now; any failure ends the job as `failed` with the reason
        (an unreadable file is the sender's problem, not the server's)."""
        job = self.get(job_id)
        self._set(job_id, status="running")
        report_path = self.folder / f"job-{job_id}-rejected.csv"
        last = [0.0]

        def progress(rows: int) -> None:
            # Progress arrives every chunk of rows; a write twice a second is plenty to poll.
            now = time.monotonic()
            if now - last[0] >= 0.5:
                last[0] = now
                self._set(job_id, rows_read=rows)

        try:
            report = import_csv(self.nl.store, job.list_id, self.source(job_id),
                                encoding=encoding, delimiter=delimiter, dry_run=job.dry_run,
                                source="import", report_path=report_path,
                                on_progress=progress)
        except Exception as exc:
            known = isinstance(exc, (NewsletterError, OSError, ValueError))
            if not known:
                log.exception("import job %d failed", job_id)
            self._set(job_id, status="failed", finished_at=utcnow(),
                      error=str(exc) if known else f"internal error ({type(exc).__name__})")
        else:
            kept = bool(report.skipped) and report_path.is_file()
            if not kept:
                report_path.unlink(missing_ok=True)  # nothing rejected: nothing to fetch
            self._set(job_id, status="done", finished_at=utcnow(), rows_read=report.rows_read,
                      imported=report.imported, updated=report.updated, skipped=report.skipped,
                      report_path=str(report_path) if kept else None)
        finally:
            self.source(job_id).unlink(missing_ok=True)
        return self.get(job_id)

    def get(self, job_id: int) -> ImportJob:
        with self.nl.store.engine.connect() as conn:
            row = conn.execute(select(import_jobs).where(import_jobs.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"no import job {job_id}")
        return _job(row)

    def page(self, *, after_id: int = 0, limit: int = 50,
             status: str | None = None) -> list[ImportJob]:
        query = (select(import_jobs).where(import_jobs.c.id > after_id)
                 .order_by(import_jobs.c.id).limit(limit))
        if status is not None:
            query = query.where(import_jobs.c.status == status)
        with self.nl.store.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query).all()]

    def fail_unfinished(self, reason: str, *, ids: Sequence[int] | None = None,
                        older_than: dt.timedelta | None = None) -> int:
        """Mark jobs that can never finish as failed, so pollers are not left waiting: the
        given ones (a stopping server's own), or those created longer ago than older_than
        (a server that crashed; the job rows do not say which process runs them, so a
        younger one may still be running elsewhere)."""
        cond: list[ColumnElement[bool]] = [import_jobs.c.status.in_(["queued", "running"])]
        if ids is not None:
            cond.append(import_jobs.c.id.in_(list(ids)))
        if older_than is not None:
            cond.append(import_jobs.c.created_at < utcnow() - older_than)
        with self.nl.store.engine.begin() as conn:
            n = conn.execute(update(import_jobs).where(*cond).values(
                status="failed", error=reason, finished_at=utcnow())).rowcount
        return int(n)

    def _set(self, job_id: int, **values: Any) -> None:
        with self.nl.store.engine.begin() as conn:
            conn.execute(update(import_jobs).where(import_jobs.c.id == job_id).values(**values))


def _job(r: Any) -> ImportJob:
    return ImportJob(r.id, r.list_id, r.filename, r.status, bool(r.dry_run), r.rows_read,
                     r.imported, r.updated, r.skipped, r.report_path, r.error, r.created_by,
                     r.created_at, r.finished_at)
