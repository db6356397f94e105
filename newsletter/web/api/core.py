"""The API's shared state, and what every route depends on: its token's role, path parameters."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ...admin import Admin
from ...apitokens import ApiToken, Role, Tokens
from ...editor import CampaignView, Editor, ImportJob, ImportJobs
from ...errors import AuthError, NotFoundError
from ...scheduling import Schedules
from ...store.schedules import Schedule
from ...store.schema import CampaignStatus, DeliveryStatus, MembershipStatus
from .models import CampaignOut, CampaignSummary, ImportJobOut, ListOut, ScheduleOut, run_out
from .pagination import MAX_ID

if TYPE_CHECKING:
    from ..app import WebApp

log = logging.getLogger(__name__)

# An import still queued or running this long after its upload belongs to a server that
# died (a million rows take about a minute): a starting server marks it failed.
ABANDONED_IMPORT = dt.timedelta(hours=6)


class Api:
    """The API's shared state: the web app's Newsletter, tokens, and the import workers."""

    def __init__(self, web: WebApp) -> None:
        self.web = web
        self.nl = web.nl
        self.imports = ImportJobs(self.nl)
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: set[int] = set()  # the import jobs this process runs

    @cached_property
    def tokens(self) -> Tokens:
        return Tokens(self.nl.store.engine)

    @cached_property
    def schedules(self) -> Schedules:
        # One per app: it opens APScheduler's job store, which is not free to open per call.
        return Schedules(self.nl)

    def admin(self, token: ApiToken) -> Admin:
        return Admin(self.nl, token.actor)

    def editor(self, token: ApiToken) -> Editor:
        return Editor(self.nl, token.actor, schedules=self.schedules)

    async def start(self) -> None:
        # One import at a time: SQLite has one writer, and a second import would only queue
        # behind the first one's transactions.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="import")
        failed = self.imports.fail_unfinished(
            "abandoned: the server running it stopped", older_than=ABANDONED_IMPORT)
        if failed:
            log.warning("%d import job(s) abandoned by a server that stopped marked failed",
                        failed)

    async def stop(self) -> None:
        if self._executor is not None:
            # A running import finishes (its rows are committed chunk by chunk anyway);
            # queued ones are dropped and marked failed, so pollers are not left waiting.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
            self._executor = None
            self.imports.fail_unfinished("the server stopped before this import ran",
                                         ids=sorted(self._jobs))

    def run_import(self, job_id: int, *, encoding: str | None,
                   delimiter: str | None) -> None:
        if self._executor is None:
            raise RuntimeError("the API has not started (lifespan not run)")
        self._jobs.add(job_id)
        self._executor.submit(self.imports.run, job_id, encoding=encoding, delimiter=delimiter)

    def list_out(self, slug: str, counts: dict[str, int] | None = None) -> ListOut:
        store = self.nl.store
        m = store.get_list(slug)
        if counts is None:
            counts = next((c for x, c in store.all_lists() if x.id == m.id), {})
        base = self.nl.settings.base_url
        return ListOut(slug=m.slug, name=m.name, description=m.description,
                       created_at=m.created_at, double_opt_in=m.double_opt_in, public=m.public,
                       language=m.language, welcome=m.welcome, zone=m.zone,
                       members={s.value: counts.get(s.value, 0) for s in MembershipStatus},
                       subscribe_url=f"{base}/subscribe/{m.slug}" if m.public else None,
                       archive_url=f"{base}/archive/{m.slug}/" if m.public else None)

    def schedule_out(self, s: Schedule, next_run: dt.datetime | None) -> ScheduleOut:
        runs = self.schedules.store.runs(s.id)
        return ScheduleOut(id=s.id, kind=s.kind, campaign_id=s.campaign_id, digest=s.digest,
                           run_at=s.run_at, cron=s.cron, tz=s.tz, local_time=s.local_time,
                           status=s.status, created_at=s.created_at,
                           next_run=next_run.astimezone(dt.UTC) if next_run else None,
                           last_run=run_out(runs[-1]) if runs else None)

    def campaign_summary(self, campaign_id: int) -> CampaignSummary:
        store = self.nl.store
        c = store.get_campaign(campaign_id)
        counts = store.delivery_counts(c.id)
        lists = store.lists_by_id(c.list_ids)
        return CampaignSummary(
            id=c.id, issue_key=c.issue_key, subject=c.subject, status=c.status.value,
            status_note=c.status_note, lists=[lists[i].slug for i in c.list_ids if i in lists],
            created_at=c.created_at, started_at=c.started_at, finished_at=c.finished_at,
            sent=counts[DeliveryStatus.SENT], remaining=counts.remaining, total=counts.total)

    def campaign_out(self, view: CampaignView) -> CampaignOut:
        c, counts = view.campaign, view.counts
        eta = None
        if c.status == CampaignStatus.RUNNING and view.rate > 0 and counts.remaining:
            eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=counts.remaining / view.rate)
        return CampaignOut(
            id=c.id, issue_key=c.issue_key, subject=c.subject, status=c.status.value,
            status_note=c.status_note, lists=view.lists, created_at=c.created_at,
            started_at=c.started_at, finished_at=c.finished_at,
            sent=counts[DeliveryStatus.SENT], remaining=counts.remaining, total=counts.total,
            segments=c.segment_names, segment_filter=c.segment_filter,
            resend=c.resend, last_error=c.last_error,
            counts={s.value: counts[s] for s in DeliveryStatus}, failed=counts.failed,
            due=counts.due, rate=view.rate, estimated_end=eta,
            schedules=[self.schedule_out(s, n) for s, n in view.schedules])

    def job_out(self, job: ImportJob) -> ImportJobOut:
        try:
            slug: str | None = self.nl.store.list_by_id(job.list_id).slug
        except NotFoundError:
            slug = None
        return ImportJobOut(
            id=job.id, list=slug, filename=job.filename, status=job.status,
            dry_run=job.dry_run, rows_read=job.rows_read, imported=job.imported,
            updated=job.updated, skipped=job.skipped, error=job.error,
            created_by=job.created_by, created_at=job.created_at, finished_at=job.finished_at,
            report=f"/api/imports/{job.id}/report" if job.report_path else None)


# --- authentication ------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, bearerFormat="nl_...",
                     description="A token from `newsletter tokens create NAME --role ROLE`.")


def _api(request: Request) -> Api:
    api: Api = request.app.state.api
    return api


def _role(needed: Role) -> Callable[..., ApiToken]:
    def check(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiToken:
        if credentials is None:
            raise AuthError("missing bearer token (Authorization: Bearer nl_...)")
        token = _api(request).tokens.verify(credentials.credentials)
        if not token.role.allows(needed):
            raise AuthError(f"a {token.role.value} token may not do this; it needs "
                            f"{needed.value}", status=403)
        return token

    return check


Viewer = Annotated[ApiToken, Depends(_role(Role.VIEWER))]
EditorToken = Annotated[ApiToken, Depends(_role(Role.EDITOR))]
AdminToken = Annotated[ApiToken, Depends(_role(Role.ADMIN))]
ApiDep = Annotated[Api, Depends(_api)]

Id = Annotated[int, Path(ge=1, le=MAX_ID, examples=[1])]
ListSlug = Annotated[str, Path(min_length=1, max_length=64, examples=["digest"])]
SubscriberRef = Annotated[str, Path(min_length=1, max_length=320,
                                    description="The subscriber's id or address.",
                                    examples=["ana@example.org", "1"])]
SegmentName = Annotated[str, Path(min_length=1, max_length=64, examples=["english"])]
TokenName = Annotated[str, Path(min_length=1, max_length=100, examples=["deploy"])]
SuppressedValue = Annotated[str, Path(min_length=1, max_length=320,
                                      description="The address or domain.",
                                      examples=["example.net"])]
