"""The admin JSON API under /api/: lists, subscribers, segments, imports, suppression,
campaigns, schedules, tokens and the audit log, for bearer tokens with a role.

A FastAPI sub-application mounted on the public web app, so it has its own OpenAPI document
(/api/openapi.json, docs at /api/docs) and its own error handling, and the public HTML pages
stay out of both. Each route checks the token's role, reads its input through a pydantic
model, calls one use case (newsletter.admin.Admin, newsletter.editor.Editor) as
`token:NAME` and answers with a pydantic model, so the schema says exactly what comes back.

Every 4xx has one shape: {"error": {"code": ..., "message": ..., "field": ...}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import io
import json
import logging
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..admin import Admin, InvalidError, SubscriberDetail
from ..apitokens import ApiToken, Role, Tokens
from ..content.model import Issue
from ..editor import FORMATS, CampaignView, Editor, ImportJob, ImportJobs
from ..errors import (
    AuthError,
    ConfigError,
    ConflictError,
    ContentError,
    DeliveryError,
    FilterSyntaxError,
    ImportFileError,
    NewsletterError,
    NotFoundError,
)
from ..scheduling import Schedules
from ..store.directory import AuditEntry, Segment, SubscriberRow
from ..store.schedules import Schedule, ScheduleRun
from ..store.schema import CampaignStatus, DeliveryStatus, MembershipStatus
from ..store.suppression import Suppression
from ..subscriptions import InvalidInputError

if TYPE_CHECKING:
    from .app import WebApp

log = logging.getLogger(__name__)

# SQLite integers are 64-bit: a larger id in a path could only overflow, never match.
MAX_ID = 2**63 - 1
MAX_UPLOAD = 20 * 1024 * 1024  # an issue file; subscriber imports are not limited
# An import still queued or running this long after its upload belongs to a server that
# died (a million rows take about a minute): a starting server marks it failed.
ABANDONED_IMPORT = dt.timedelta(hours=6)

T = TypeVar("T")


# --- errors --------------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    code: str = Field(description="not_found, invalid, conflict, unauthorized, forbidden, ...")
    message: str
    field: str | None = Field(None, description="The input field at fault, if one is.")
    line: int | None = Field(None, description="Issue content errors: the line in the file.")
    position: int | None = Field(None, description="Filter errors: 0-based offset in the text.")


class ErrorBody(BaseModel):
    error: ErrorInfo


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
          413: "too_large", 415: "unsupported_media_type", 422: "invalid",
          429: "rate_limited", 500: "internal", 502: "relay_error"}

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": _CODES[status].replace("_", " ")}
    for status in (400, 401, 403, 404, 409, 422)
}


def error_response(status: int, message: str, *, field: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None,
                   **extra: int | None) -> JSONResponse:
    info: dict[str, Any] = {"code": code or _CODES.get(status, "error"), "message": message,
                            "field": field}
    info.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": info}, status_code=status, headers=headers)


def _newsletter_error(exc: NewsletterError) -> JSONResponse:
    """Our exception tree onto HTTP: what the caller got wrong is a 4xx naming the field."""
    if isinstance(exc, AuthError):
        if exc.status == 403:
            return error_response(403, str(exc),
                                  headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
        return error_response(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, NotFoundError):
        return error_response(404, str(exc))
    if isinstance(exc, ConflictError):
        return error_response(409, str(exc))
    if isinstance(exc, ContentError):
        return error_response(422, exc.message, field=exc.field, line=exc.line)
    if isinstance(exc, FilterSyntaxError):
        return error_response(422, str(exc), field="filter", position=exc.position)
    if isinstance(exc, InvalidError | InvalidInputError):
        return error_response(422, str(exc) if isinstance(exc, InvalidInputError)
                              else exc.message, field=exc.field)
    if isinstance(exc, ConfigError):
        return error_response(422, exc.problem, field=exc.key.lstrip("-"))
    if isinstance(exc, ImportFileError):
        return error_response(422, str(exc), field="file")
    if isinstance(exc, DeliveryError):
        # The relay failed, not the request: a gateway error, logged like one.
        log.warning("admin API: relay failure: %s", exc)
        return error_response(502, str(exc))
    if isinstance(exc, ValueError):  # HeaderInjectionError and kin
        return error_response(422, str(exc))
    return error_response(400, str(exc))


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    message = str(first.get("msg", "invalid"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_response(422, message, field=".".join(loc) or None)


def _install_error_handlers(app: FastAPI) -> None:
    async def newsletter_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, NewsletterError)
        return _newsletter_error(exc)

    async def validation_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc)

    async def http_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    async def bad_value(_r: Request, exc: Exception) -> Response:
        # A value our checks let through but a lower layer refused (a date out of range,
        # text the database cannot encode): the input's fault, so never a 500.
        return error_response(422, str(exc) or type(exc).__name__)

    async def integrity_error(_r: Request, exc: Exception) -> Response:
        return error_response(409, "the change contradicts what is stored (a duplicate?)")

    async def internal_error(_r: Request, exc: Exception) -> Response:
        log.error("admin API: unexpected %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal error; the server log has the details")

    app.add_exception_handler(NewsletterError, newsletter_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ValueError, bad_value)
    app.add_exception_handler(OverflowError, bad_value)
    app.add_exception_handler(IntegrityError, integrity_error)
    app.add_exception_handler(Exception, internal_error)


# --- pagination ----------------------------------------------------------------------------------

class Page(BaseModel, Generic[T]):
    """One page of a collection; pass next_cursor back as `cursor` for the next one."""

    items: list[T]
    next_cursor: str | None = Field(
        None, description="Opaque; null on the last page.")


Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1 to 500).")]
Cursor = Annotated[str | None, Query(max_length=200,
                                     description="next_cursor of the previous page.")]


def encode_cursor(kind: str, value: int) -> str:
    raw = json.dumps([kind, value], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> int | None:
    """The position a cursor stands for; one made for another collection is refused."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got, value = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidError("cursor", "not a cursor from this API") from None
    if got != kind or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidError("cursor", "not a cursor for this collection") from None
    return value


def page_of(items: Sequence[Any], limit: int, kind: str, key: Callable[[Any], int],
            convert: Callable[[Any], T]) -> Page[T]:
    """`items` was fetched with limit + 1: the extra one only says another page exists."""
    shown = list(items[:limit])
    more = len(items) > limit
    return Page[T](items=[convert(i) for i in shown],
                   next_cursor=encode_cursor(kind, key(shown[-1])) if more and shown else None)


def slice_after(items: Sequence[Any], after: int | None, limit: int,
                key: Callable[[Any], int]) -> list[Any]:
    """Paging over a small collection read whole (lists, segments, schedules, tokens)."""
    ordered = sorted(items, key=key)
    if after is not None:
        ordered = [i for i in ordered if key(i) > after]
    return ordered[:limit + 1]


# --- models: lists -------------------------------------------------------------------------------

class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


Slug = Annotated[str, Field(min_length=1, max_length=64, examples=["digest"])]
ShortText = Annotated[str, Field(max_length=200)]
LongText = Annotated[str, Field(max_length=5000)]
Zone = Annotated[str, Field(max_length=64, examples=["Europe/Berlin"])]
Language = Literal["en", "zh"]


class ListOut(BaseModel):
    slug: str
    name: str
    description: str
    created_at: dt.datetime
    double_opt_in: bool
    public: bool
    language: str
    welcome: bool
    zone: str | None
    members: dict[str, int] = Field(description="Members by status.")
    subscribe_url: str | None
    archive_url: str | None


class ListCreate(_In):
    slug: Slug
    name: ShortText | None = None
    description: LongText = ""
    double_opt_in: bool = True
    public: bool = True
    language: Language = "en"
    zone: Zone | None = None
    welcome: bool = False


class ListPatch(_In):
    slug: Slug | None = None
    name: ShortText | None = None
    description: LongText | None = None
    double_opt_in: bool | None = None
    public: bool | None = None
    language: Language | None = None
    zone: Zone | None = Field(None, description='"" clears it.')
    welcome: bool | None = None


class ListDeleted(BaseModel):
    slug: str
    deleted: dict[str, int] = Field(description="What went with the list.")


# --- models: subscribers -------------------------------------------------------------------------

AttrValue = str | int | Annotated[float, Field(allow_inf_nan=False)] | bool | None
Email = Annotated[str, Field(min_length=1, max_length=320, examples=["ana@example.org"],
                             json_schema_extra={"format": "email"})]


class SubscriberOut(BaseModel):
    id: int
    email: str
    name: str
    attributes: dict[str, Any]
    created_at: dt.datetime
    lists: dict[str, str] = Field(description="Status on each list, by slug.")
    hard_bounces: int
    soft_bounces: int
    suppressed: str | None = Field(None, description="Why it is suppressed, if it is.")


class SubscriberCreate(_In):
    email: Email
    lists: list[Slug] = Field(min_length=1, max_length=50)
    name: ShortText = ""
    attributes: dict[Annotated[str, Field(max_length=64)], AttrValue] = Field(
        default_factory=dict, max_length=100)
    language: Language | None = None
    zone: Zone | None = None


class SubscriberPatch(_In):
    email: Email | None = None
    name: ShortText | None = None
    set_attributes: dict[Annotated[str, Field(max_length=64)], AttrValue] = Field(
        default_factory=dict, max_length=100)
    unset_attributes: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=100)
    language: Literal["en", "zh", ""] | None = Field(None, description='"" removes it.')
    zone: Zone | None = Field(None, description='"" removes it.')


class MoveBody(_In):
    from_list: Slug
    to_list: Slug


class UnsubscribeBody(_In):
    list: Slug | None = Field(None, description="Only from this list; null: from every "
                              "list (the address is then suppressed).")


class UnsubscribeOut(BaseModel):
    changed: int = Field(description="Memberships that changed.")
    subscriber: SubscriberOut


class ResubscribeBody(_In):
    list: Slug
    explicit: bool = Field(False, description="Must be true: the subscriber asked for it.")


class HistoryEntry(BaseModel):
    list: str
    old_status: str | None
    new_status: str
    source: str
    at: dt.datetime


class ErasedOut(BaseModel):
    erased: dict[str, int]


class ExportOut(BaseModel):
    """Everything stored about one subscriber."""

    # A data-subject export must never lose what the store adds to it later.
    model_config = ConfigDict(extra="allow")

    subscriber: dict[str, Any]
    memberships: list[dict[str, Any]]
    history: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    suppression: dict[str, Any] | None
    audit: list[dict[str, Any]]


# --- models: segments ----------------------------------------------------------------------------

FilterText = Annotated[str, Field(min_length=1, max_length=5000,
                                  examples=["lang = 'en' and list = 'digest'"])]


class SegmentOut(BaseModel):
    id: int
    name: str
    filter: str
    description: str
    created_at: dt.datetime
    updated_at: dt.datetime


class SegmentCreate(_In):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")]
    filter: FilterText
    description: LongText = ""


class SegmentPatch(_In):
    filter: FilterText | None = None
    description: LongText | None = None


class CountBody(_In):
    filter: FilterText
    lists: list[Slug] = Field(default_factory=list, max_length=50)
    active_only: bool = True


class CountOut(BaseModel):
    count: int
    filter: str


# --- models: suppression, imports ----------------------------------------------------------------

class SuppressionOut(BaseModel):
    id: int
    value: str
    kind: str
    reason: str
    note: str
    created_at: dt.datetime


class SuppressionCreate(_In):
    value: Annotated[str, Field(min_length=1, max_length=320,
                                description="An address, or a domain (bare or as @domain).")]
    reason: Literal["unsubscribed", "hard-bounce", "complaint", "admin"] = "admin"
    note: Annotated[str, Field(max_length=500)] = ""


class RejectedRow(BaseModel):
    line: int
    value: str
    reason: str


class SuppressionImportOut(BaseModel):
    added: int
    already: int
    rejected: list[RejectedRow]


class ImportJobOut(BaseModel):
    id: int
    list: str | None
    filename: str
    status: Literal["queued", "running", "done", "failed"]
    dry_run: bool
    rows_read: int
    imported: int
    updated: int
    skipped: int
    error: str | None
    created_by: str
    created_at: dt.datetime
    finished_at: dt.datetime | None
    report: str | None = Field(None, description="Where the rejected rows are (CSV).")


# --- models: campaigns and schedules -------------------------------------------------------------

class RunOut(BaseModel):
    fire_time: dt.datetime
    started_at: dt.datetime
    outcome: str
    campaign_id: int | None
    note: str
    late_seconds: float


class ScheduleOut(BaseModel):
    id: int
    kind: str
    campaign_id: int | None
    digest: str | None
    run_at: dt.datetime | None
    cron: str | None
    tz: str
    local_time: bool
    status: str
    created_at: dt.datetime
    next_run: dt.datetime | None
    last_run: RunOut | None


class ScheduleDetail(ScheduleOut):
    runs: list[RunOut]


class CampaignSummary(BaseModel):
    id: int
    issue_key: str
    subject: str
    status: str
    status_note: str | None
    lists: list[str]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    sent: int
    remaining: int
    total: int


class CampaignOut(CampaignSummary):
    segments: str | None = Field(description="A segment send: the segments' names.")
    segment_filter: str | None = Field(description="The filter its audience matched.")
    resend: bool
    last_error: str | None
    counts: dict[str, int] = Field(description="Ledger rows by delivery status.")
    failed: int
    due: int
    rate: float = Field(description="Messages per second over the last minute.")
    estimated_end: dt.datetime | None
    schedules: list[ScheduleOut]


class CampaignCreate(_In):
    lists: list[Slug] = Field(default_factory=list, max_length=20, description="Target "
                              "lists; may be empty with segments (every list where someone "
                              "matches).")
    segments: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, max_length=20, description="Only the active members matching "
        "any of these segments.")
    again: bool = Field(False, description="Send an issue that already went to these lists "
                        "once more.")
    issue: Issue | None = Field(None, description="The issue as JSON; or give `source`.")
    source: Annotated[str, Field(max_length=MAX_UPLOAD)] | None = Field(
        None, description="The issue file's text, in `format`.")
    format: Literal["markdown", "yaml", "json"] = "markdown"


class CampaignCreated(BaseModel):
    campaign: CampaignOut
    new: bool = Field(description="False: an unfinished campaign of this issue and these "
                      "lists existed and is returned instead.")
    due: int = Field(description="Subscribers it would go to now.")
    notes: list[str]


class TestSendBody(_In):
    addresses: list[Email] = Field(min_length=1, max_length=10)


class TestSendResult(BaseModel):
    address: str
    sent: bool
    error: str | None


class TestSendOut(BaseModel):
    subject: str
    results: list[TestSendResult]


class ScheduleBody(_In):
    at: dt.datetime = Field(description="ISO 8601; without an offset it is in `tz`.")
    tz: Zone = "UTC"
    local_time: bool = Field(False, description="At that wall-clock time in each "
                             "subscriber's zone (their tz attribute, else `tz`).")


# --- models: tokens, audit -----------------------------------------------------------------------

class TokenOut(BaseModel):
    name: str
    role: Role
    active: bool
    created_at: dt.datetime
    created_by: str
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreate(_In):
    name: Annotated[str, Field(min_length=1, max_length=100,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")]
    role: Role


class TokenCreated(TokenOut):
    token: str = Field(description="Shown this once; only its SHA-256 is kept.")


class AuditOut(BaseModel):
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


# --- converters ----------------------------------------------------------------------------------

def _subscriber(d: SubscriberDetail | SubscriberRow) -> SubscriberOut:
    return SubscriberOut(id=d.id, email=d.email, name=d.name, attributes=d.attributes,
                         created_at=d.created_at, lists=d.lists, hard_bounces=d.hard_bounces,
                         soft_bounces=d.soft_bounces,
                         suppressed=getattr(d, "suppressed", None))


def _segment(s: Segment) -> SegmentOut:
    return SegmentOut(id=s.id, name=s.name, filter=s.filter, description=s.description,
                      created_at=s.created_at, updated_at=s.updated_at)


def _suppression(s: Suppression) -> SuppressionOut:
    return SuppressionOut(id=s.id, value=s.value, kind=s.kind.value, reason=s.reason,
                          note=s.note, created_at=s.created_at)


def _token(t: ApiToken) -> TokenOut:
    return TokenOut(name=t.name, role=t.role, active=t.active, created_at=t.created_at,
                    created_by=t.created_by, last_used_at=t.last_used_at,
                    revoked_at=t.revoked_at)


def _audit(a: AuditEntry) -> AuditOut:
    return AuditOut(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target,
                    detail=a.detail)


def _run(r: ScheduleRun) -> RunOut:
    return RunOut(fire_time=r.fire_time, started_at=r.started_at, outcome=r.outcome,
                  campaign_id=r.campaign_id, note=r.note, late_seconds=r.lateness)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Query times without an offset are UTC, like everything stored."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# --- the application -----------------------------------------------------------------------------

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
                           last_run=_run(runs[-1]) if runs else None)

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


def _subscriber_ref(ref: str) -> int | str:
    """A path's subscriber: digits are an id, anything else an address."""
    if ref.isdigit():
        if not ref.isascii() or int(ref) > MAX_ID:
            raise NotFoundError(f"no subscriber {ref}")
        return int(ref)
    return ref


def _save_upload(upload: UploadFile, limit: int | None = None) -> bytes:
    data = upload.file.read(limit + 1 if limit else -1)
    if limit and len(data) > limit:
        raise InvalidError("file", f"larger than {limit // (1024 * 1024)} MB")
    return data


class _PrivateResponses:
    """Admin data is for the token holder only: no proxy or browser may keep a copy, and
    no browser may guess another content type for it."""

    _EXTRA = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._EXTRA]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_api(web: WebApp) -> tuple[FastAPI, Api]:
    """The API application (mount it at /api) and its state (start and stop it with the
    parent's lifespan: a mounted app's own lifespan is not run)."""
    api = Api(web)
    app = FastAPI(
        title="newsletter admin API", version=__version__, openapi_url="/openapi.json",
        docs_url="/docs", redoc_url=None, responses=_ERROR_RESPONSES,
        description="Lists, subscribers, segments, imports, suppression, campaigns, "
                    "schedules, tokens and the audit log. Authenticate with "
                    "`Authorization: Bearer nl_...`; see docs/api.md.")
    app.state.api = api
    app.add_middleware(_PrivateResponses)
    _install_error_handlers(app)
    _lists_routes(app)
    _subscriber_routes(app)
    _segment_routes(app)
    _import_routes(app)
    _suppression_routes(app)
    _campaign_routes(app)
    _schedule_routes(app)
    _token_routes(app)
    return app, api


def mount_api(parent: FastAPI, web: WebApp) -> None:
    """Mount the API at /api and run its start and stop inside the parent's lifespan (after
    the web app has opened the database, and before it closes it)."""
    app, api = create_api(web)
    parent.mount("/api", app)
    outer = parent.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with outer(app_) as state:
            await api.start()
            try:
                yield state
            finally:
                await api.stop()

    parent.router.lifespan_context = lifespan


# --- routes: lists -------------------------------------------------------------------------------

def _lists_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["lists"]

    @app.get("/lists", tags=tags, response_model=Page[ListOut])
    def lists_index(api: ApiDep, _t: Viewer, limit: Limit = 50,
                    cursor: Cursor = None) -> Page[ListOut]:
        """Every list with its member counts, in creation order."""
        after = decode_cursor("lists", cursor)
        rows = slice_after(api.nl.store.all_lists(), after, limit, lambda r: r[0].id)
        return page_of(rows, limit, "lists", lambda r: r[0].id,
                       lambda r: api.list_out(r[0].slug, r[1]))

    @app.post("/lists", tags=tags, status_code=201, response_model=ListOut)
    def lists_create(api: ApiDep, t: AdminToken, body: ListCreate) -> ListOut:
        m = api.admin(t).create_list(body.slug, name=body.name, description=body.description,
                                     double_opt_in=body.double_opt_in, public=body.public,
                                     language=body.language, zone=body.zone or None,
                                     welcome=body.welcome)
        return api.list_out(m.slug)

    @app.get("/lists/{slug}", tags=tags, response_model=ListOut)
    def lists_get(api: ApiDep, _t: Viewer, slug: ListSlug) -> ListOut:
        return api.list_out(slug)

    @app.patch("/lists/{slug}", tags=tags, response_model=ListOut)
    def lists_patch(api: ApiDep, t: AdminToken, slug: ListSlug, body: ListPatch) -> ListOut:
        m = api.admin(t).update_list(
            slug, new_slug=body.slug, name=body.name, description=body.description,
            double_opt_in=body.double_opt_in, public=body.public, language=body.language,
            zone=body.zone, welcome=body.welcome)
        return api.list_out(m.slug)

    @app.get("/lists/{slug}/impact", tags=tags, response_model=ListDeleted)
    def lists_impact(api: ApiDep, t: AdminToken, slug: ListSlug) -> ListDeleted:
        """What deleting the list would take with it; changes nothing."""
        return ListDeleted(slug=slug, deleted=api.admin(t).deletion_impact(slug))

    @app.delete("/lists/{slug}", tags=tags, response_model=ListDeleted)
    def lists_delete(api: ApiDep, t: AdminToken, slug: ListSlug,
                     confirm: Annotated[bool, Query(
                         description="Must be true: the list goes with its memberships, "
                                     "history, ledger rows and archive.")] = False) \
            -> ListDeleted:
        admin = api.admin(t)
        if not confirm:
            impact = admin.deletion_impact(slug)
            raise ConflictError(
                f"deleting list {slug!r} removes {impact.get('members', 0)} membership(s), "
                f"{impact.get('ledger_rows', 0)} ledger row(s) and "
                f"{impact.get('archive_entries', 0)} archive entr(ies); repeat with "
                "?confirm=true")
        return ListDeleted(slug=slug, deleted=admin.delete_list(slug))


# --- routes: subscribers -------------------------------------------------------------------------

def _subscriber_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["subscribers"]

    @app.get("/subscribers", tags=tags, response_model=Page[SubscriberOut])
    def subscribers_index(
        api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        list_slug: Annotated[str | None, Query(alias="list", max_length=64)] = None,
        status: MembershipStatus | None = None,
        search: Annotated[str | None, Query(max_length=320,
                                            description="Part of the address or name.")]
        = None,
    ) -> Page[SubscriberOut]:
        """Subscribers in id order; `list` and `status` filter by membership."""
        after = decode_cursor("subscribers", cursor) or 0
        rows = api.admin(t).subscribers(list_slug=list_slug,
                                        status=status.value if status else None,
                                        search=search, after_id=after, limit=limit + 1)
        return page_of(rows, limit, "subscribers", lambda r: r.id, _subscriber)

    @app.post("/subscribers", tags=tags, status_code=201, response_model=SubscriberOut)
    def subscribers_create(api: ApiDep, t: AdminToken, body: SubscriberCreate) \
            -> SubscriberOut:
        """Add an address to lists, active at once; refused if suppressed, and never
        reactivates an address that left or bounced (see resubscribe)."""
        return _subscriber(api.admin(t).add_subscriber(
            body.email, lists=body.lists, name=body.name, attributes=body.attributes,
            language=body.language, zone=body.zone))

    @app.get("/subscribers/{ref}", tags=tags, response_model=SubscriberOut)
    def subscribers_get(api: ApiDep, t: Viewer, ref: SubscriberRef) -> SubscriberOut:
        """One subscriber by id or address."""
        return _subscriber(api.admin(t).subscriber(_subscriber_ref(ref)))

    @app.patch("/subscribers/{ref}", tags=tags, response_model=SubscriberOut)
    def subscribers_patch(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                          body: SubscriberPatch) -> SubscriberOut:
        return _subscriber(api.admin(t).edit_subscriber(
            _subscriber_ref(ref), email=body.email, name=body.name,
            set_attributes=body.set_attributes, unset_attributes=body.unset_attributes,
            language=body.language, zone=body.zone))

    @app.post("/subscribers/{ref}/move", tags=tags, response_model=SubscriberOut)
    def subscribers_move(api: ApiDep, t: AdminToken, ref: SubscriberRef, body: MoveBody) \
            -> SubscriberOut:
        return _subscriber(api.admin(t).move_subscriber(
            _subscriber_ref(ref), from_slug=body.from_list, to_slug=body.to_list))

    @app.post("/subscribers/{ref}/unsubscribe", tags=tags, response_model=UnsubscribeOut)
    def subscribers_unsubscribe(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                                body: UnsubscribeBody) -> UnsubscribeOut:
        """Running sends skip the address for every message not yet sent."""
        admin = api.admin(t)
        changed = admin.unsubscribe(_subscriber_ref(ref), list_slug=body.list)
        return UnsubscribeOut(changed=changed,
                              subscriber=_subscriber(admin.subscriber(_subscriber_ref(ref))))

    @app.post("/subscribers/{ref}/resubscribe", tags=tags, response_model=SubscriberOut)
    def subscribers_resubscribe(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                                body: ResubscribeBody) -> SubscriberOut:
        return _subscriber(api.admin(t).resubscribe(_subscriber_ref(ref),
                                                    list_slug=body.list,
                                                    explicit=body.explicit))

    @app.get("/subscribers/{ref}/history", tags=tags, response_model=Page[HistoryEntry])
    def subscribers_history(api: ApiDep, t: Viewer, ref: SubscriberRef) -> Page[HistoryEntry]:
        """Every change of the subscriber's memberships, oldest first (one page)."""
        rows = api.admin(t).history(_subscriber_ref(ref))
        return Page[HistoryEntry](items=[HistoryEntry(
            list=h["list"], old_status=h["from"], new_status=h["to"], source=h["source"],
            at=h["at"]) for h in rows])

    @app.get("/subscribers/{ref}/export-data", tags=tags, response_model=ExportOut)
    def subscribers_export(api: ApiDep, t: AdminToken, ref: SubscriberRef) -> ExportOut:
        """Everything stored about the subscriber (a data-subject access request)."""
        return ExportOut(**api.admin(t).export_data(_subscriber_ref(ref)))

    @app.post("/subscribers/{ref}/erase", tags=tags, response_model=ErasedOut)
    def subscribers_erase(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                          confirm: Annotated[bool, Query(
                              description="Must be true: erasure cannot be undone.")] = False) \
            -> ErasedOut:
        """Erase the subscriber's personal data; a salted hash keeps it from being added
        back."""
        admin = api.admin(t)
        target = _subscriber_ref(ref)
        if not confirm:
            admin.subscriber(target)  # 404 first, if it is not there
            raise ConflictError("erasure cannot be undone; repeat with ?confirm=true")
        return ErasedOut(erased=admin.erase(target))


# --- routes: segments ----------------------------------------------------------------------------

def _segment_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["segments"]

    @app.get("/segments", tags=tags, response_model=Page[SegmentOut])
    def segments_index(api: ApiDep, t: Viewer, limit: Limit = 50,
                       cursor: Cursor = None) -> Page[SegmentOut]:
        after = decode_cursor("segments", cursor)
        rows = slice_after(api.admin(t).segments(), after, limit, lambda s: s.id)
        return page_of(rows, limit, "segments", lambda s: s.id, _segment)

    @app.post("/segments", tags=tags, status_code=201, response_model=SegmentOut)
    def segments_create(api: ApiDep, t: EditorToken, body: SegmentCreate) -> SegmentOut:
        return _segment(api.admin(t).save_segment(body.name, body.filter, body.description))

    @app.post("/segments/count", tags=tags, response_model=CountOut)
    def segments_count_adhoc(api: ApiDep, t: Viewer, body: CountBody) -> CountOut:
        """How many subscribers a filter matches, without saving it (reads only)."""
        n = api.admin(t).count(body.filter, lists=body.lists, active_only=body.active_only)
        return CountOut(count=n, filter=body.filter)

    @app.get("/segments/{name}", tags=tags, response_model=SegmentOut)
    def segments_get(api: ApiDep, t: Viewer, name: SegmentName) -> SegmentOut:
        return _segment(api.admin(t).get_segment(name))

    @app.patch("/segments/{name}", tags=tags, response_model=SegmentOut)
    def segments_patch(api: ApiDep, t: EditorToken, name: SegmentName,
                       body: SegmentPatch) -> SegmentOut:
        admin = api.admin(t)
        text = body.filter if body.filter is not None else admin.get_segment(name).filter
        return _segment(admin.save_segment(name, text, body.description, create=False))

    @app.delete("/segments/{name}", tags=tags, status_code=204, response_class=Response)
    def segments_delete(api: ApiDep, t: EditorToken, name: SegmentName) -> Response:
        api.admin(t).delete_segment(name)
        return Response(status_code=204)

    @app.get("/segments/{name}/count", tags=tags, response_model=CountOut)
    def segments_count(
        api: ApiDep, t: Viewer, name: SegmentName,
        lists: Annotated[list[str] | None, Query(alias="list", max_length=50)] = None,
        active_only: bool = True,
    ) -> CountOut:
        """How many subscribers the segment matches now (on these lists, if given)."""
        admin = api.admin(t)
        text = admin.get_segment(name).filter
        return CountOut(count=admin.count(text, lists=lists or [], active_only=active_only),
                        filter=text)


# --- routes: imports -----------------------------------------------------------------------------

def _import_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["imports"]

    @app.post("/imports", tags=tags, status_code=202, response_model=ImportJobOut)
    def imports_create(
        api: ApiDep, t: AdminToken,
        file: Annotated[UploadFile, File(description="CSV with a header row; 'email' is "
                                         "required, other columns become attributes.")],
        list_slug: Annotated[str, Form(alias="list", min_length=1, max_length=64)],
        dry_run: Annotated[bool, Form()] = False,
        encoding: Annotated[str | None, Form(max_length=40)] = None,
        delimiter: Annotated[Literal[",", ";", "\t"] | None, Form(
            description="Default: sniffed from the file.")] = None,
    ) -> ImportJobOut:
        """Start an import in the background; poll GET /imports/{id} until done."""
        if encoding:
            try:
                "".encode(encoding)
            except LookupError:
                raise InvalidError("encoding", f"unknown encoding {encoding!r}") from None
        job = api.imports.submit(list_slug, file.filename or "upload.csv", file.file,
                                 dry_run=dry_run, actor=t.actor)
        api.run_import(job.id, encoding=encoding, delimiter=delimiter)
        return api.job_out(job)

    @app.get("/imports", tags=tags, response_model=Page[ImportJobOut])
    def imports_index(
        api: ApiDep, _t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        status: Literal["queued", "running", "done", "failed"] | None = None,
    ) -> Page[ImportJobOut]:
        after = decode_cursor("imports", cursor) or 0
        jobs = api.imports.page(after_id=after, limit=limit + 1, status=status)
        return page_of(jobs, limit, "imports", lambda j: j.id, api.job_out)

    @app.get("/imports/{job_id}", tags=tags, response_model=ImportJobOut)
    def imports_get(api: ApiDep, _t: Viewer, job_id: Id) -> ImportJobOut:
        return api.job_out(api.imports.get(job_id))

    @app.get("/imports/{job_id}/report", tags=tags, response_class=FileResponse,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                              "description": "The rejected rows: line, email, reason."}})
    def imports_report(api: ApiDep, _t: Viewer, job_id: Id) -> FileResponse:
        job = api.imports.get(job_id)
        if job.report_path is None:
            why = "no row was rejected" if job.status == "done" else job.status
            raise NotFoundError(f"import job {job_id} has no report ({why})")
        return FileResponse(job.report_path, media_type="text/csv; charset=utf-8",
                            filename=f"import-{job_id}-rejected.csv")


# --- routes: suppression -------------------------------------------------------------------------

def _suppression_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["suppression"]

    @app.get("/suppressions", tags=tags, response_model=Page[SuppressionOut])
    def suppressions_index(
        api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        kind: Literal["address", "domain", "hash"] | None = None,
        reason: Annotated[str | None, Query(max_length=32)] = None,
    ) -> Page[SuppressionOut]:
        after = decode_cursor("suppressions", cursor) or 0
        rows = api.editor(t).suppressions(kind=kind, reason=reason, after_id=after,
                                          limit=limit + 1)
        return page_of(rows, limit, "suppressions", lambda s: s.id, _suppression)

    @app.post("/suppressions", tags=tags, status_code=201, response_model=SuppressionOut)
    def suppressions_add(api: ApiDep, t: AdminToken, body: SuppressionCreate) \
            -> SuppressionOut:
        """Never send to this address (or anyone at this domain) on any list; queued
        messages to it are skipped at once."""
        return _suppression(api.admin(t).suppress(body.value, reason=body.reason,
                                                  note=body.note))

    @app.get("/suppressions/export", tags=tags, response_class=Response,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}},
                                          "application/x-ndjson": {"schema": {
                                              "type": "string"}}},
                              "description": "The whole list."}})
    def suppressions_export(api: ApiDep, t: Viewer,
                            format: Literal["csv", "jsonl"] = "csv") -> Response:
        out = io.StringIO()
        api.admin(t).export_suppressions(out, fmt=format)
        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        return Response(out.getvalue(), media_type=media, headers={
            "Content-Disposition": f'attachment; filename="suppressions.{format}"'})

    @app.post("/suppressions/import", tags=tags, response_model=SuppressionImportOut)
    def suppressions_import(
        api: ApiDep, t: AdminToken,
        file: Annotated[UploadFile, File(description="CSV (a column email, value, address "
                                         "or domain; optional reason and note) or one value "
                                         "per line.")],
        reason: Annotated[Literal["unsubscribed", "hard-bounce", "complaint", "admin"],
                          Form()] = "admin",
    ) -> SuppressionImportOut:
        folder = api.imports.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"suppressions-{secrets.token_hex(6)}.csv"
        with path.open("wb") as out:
            shutil.copyfileobj(file.file, out, 1024 * 1024)
        try:
            result = api.admin(t).import_suppressions(path, reason=reason)
        finally:
            path.unlink(missing_ok=True)
        return SuppressionImportOut(added=result.added, already=result.already, rejected=[
            RejectedRow(line=n, value=v, reason=r) for n, v, r in result.rejected])

    @app.delete("/suppressions/{value}", tags=tags, response_model=SuppressionOut)
    def suppressions_remove(api: ApiDep, t: AdminToken, value: SuppressedValue) -> SuppressionOut:
        """Lift a suppression (an erased address's hash cannot be lifted)."""
        return _suppression(api.admin(t).unsuppress(value))


# --- routes: campaigns ---------------------------------------------------------------------------

def _campaign_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["campaigns"]

    @app.get("/campaigns", tags=tags, response_model=Page[CampaignSummary])
    def campaigns_index(api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
                        status: CampaignStatus | None = None) -> Page[CampaignSummary]:
        """Campaigns, newest first."""
        before = decode_cursor("campaigns", cursor)
        ids = api.editor(t).campaign_ids(before_id=before, limit=limit + 1,
                                         status=status.value if status else None)
        return page_of(ids, limit, "campaigns", lambda i: i, api.campaign_summary)

    def created(api: Api, t: ApiToken, plan: Any) -> CampaignCreated:
        view = api.editor(t).view(plan.campaign.id)
        return CampaignCreated(campaign=api.campaign_out(view), new=plan.new, due=plan.due,
                               notes=list(plan.notes))

    @app.post("/campaigns", tags=tags, status_code=201, response_model=CampaignCreated)
    def campaigns_create(api: ApiDep, t: EditorToken, body: CampaignCreate) \
            -> CampaignCreated:
        """A draft campaign from an issue (JSON, or a file's text in `source`), validated
        and rendered now; then test-send, schedule or send it."""
        if (body.issue is None) == (body.source is None):
            raise InvalidError("issue", "give either `issue` (JSON) or `source` (text)")
        if body.issue is not None:
            text, fmt = body.issue.model_dump_json(), "json"
        else:
            assert body.source is not None
            text, fmt = body.source, body.format
        plan = api.editor(t).create_campaign(text, fmt=fmt, lists=body.lists,
                                             segments=body.segments, again=body.again)
        return created(api, t, plan)

    @app.post("/campaigns/upload", tags=tags, status_code=201, response_model=CampaignCreated)
    def campaigns_upload(
        api: ApiDep, t: EditorToken,
        file: Annotated[UploadFile, File(description="An issue file: .md, .yaml or .json.")],
        lists: Annotated[list[str] | None, Form(alias="list", max_length=20)] = None,
        segments: Annotated[list[str] | None, Form(alias="segment", max_length=20)] = None,
        again: Annotated[bool, Form()] = False,
    ) -> CampaignCreated:
        """A draft campaign from an uploaded issue file (its suffix gives the format)."""
        name = file.filename or "issue.md"
        suffix = "." + name.rpartition(".")[2].lower() if "." in name else ""
        fmt = {".md": "markdown", ".markdown": "markdown", ".yaml": "yaml", ".yml": "yaml",
               ".json": "json"}.get(suffix)
        if fmt is None:
            raise InvalidError("file", f"unknown issue format {suffix or '(no suffix)'}; "
                               f"use {', '.join(FORMATS.values())}")
        try:
            text = _save_upload(file, MAX_UPLOAD).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidError("file", f"not UTF-8 text ({exc.reason} at byte "
                               f"{exc.start})") from None
        plan = api.editor(t).create_campaign(text, fmt=fmt, lists=lists or [],
                                             segments=segments or [], again=again, name=name)
        return created(api, t, plan)

    @app.get("/campaigns/{campaign_id}", tags=tags, response_model=CampaignOut)
    def campaigns_get(api: ApiDep, t: Viewer, campaign_id: Id) -> CampaignOut:
        """One campaign with its ledger counts, current rate and schedules."""
        return api.campaign_out(api.editor(t).view(campaign_id))

    @app.post("/campaigns/{campaign_id}/test", tags=tags, response_model=TestSendOut)
    async def campaigns_test(api: ApiDep, t: EditorToken, campaign_id: Id,
                             body: TestSendBody) -> TestSendOut:
        """Send the issue to a few addresses, subject prefixed "[TEST] "; nothing is
        recorded as a delivery of the campaign."""
        relay = api.web.subs.relay if api.nl.capture_mode else None
        editor = api.editor(t)
        results = await editor.test_send(campaign_id, body.addresses, relay=relay)
        subject = api.nl.store.get_campaign(campaign_id).subject
        return TestSendOut(subject="[TEST] " + subject, results=[
            TestSendResult(address=r.address, sent=r.sent, error=r.error) for r in results])

    @app.post("/campaigns/{campaign_id}/schedule", tags=tags, status_code=201,
              response_model=ScheduleOut)
    def campaigns_schedule(api: ApiDep, t: EditorToken, campaign_id: Id,
                           body: ScheduleBody) -> ScheduleOut:
        """Send a draft at a time; the scheduler (in `newsletter serve` or `newsletter
        scheduler`) fires it."""
        editor = api.editor(t)
        s = editor.schedule(campaign_id, at=body.at, tz=body.tz, local_time=body.local_time)
        return api.schedule_out(s, api.schedules.next_run(s))

    @app.post("/campaigns/{campaign_id}/send", tags=tags, status_code=202,
              response_model=ScheduleOut)
    def campaigns_send(api: ApiDep, t: EditorToken, campaign_id: Id) -> ScheduleOut:
        """Send now: handed to the scheduler, which starts it within a second or so. Poll
        GET /campaigns/{id} for progress."""
        s = api.editor(t).send_now(campaign_id)
        return api.schedule_out(s, api.schedules.next_run(s))

    @app.post("/campaigns/{campaign_id}/pause", tags=tags, response_model=CampaignOut)
    def campaigns_pause(api: ApiDep, t: EditorToken, campaign_id: Id) -> CampaignOut:
        """A running send stops within a second; a scheduled one does not fire."""
        return api.campaign_out(api.editor(t).pause(campaign_id))

    @app.post("/campaigns/{campaign_id}/resume", tags=tags, status_code=202,
              response_model=ScheduleOut)
    def campaigns_resume(api: ApiDep, t: EditorToken, campaign_id: Id) -> ScheduleOut:
        """Continue a paused campaign (through the scheduler); nobody gets it twice."""
        s = api.editor(t).resume(campaign_id)
        return api.schedule_out(s, api.schedules.next_run(s))

    @app.post("/campaigns/{campaign_id}/cancel", tags=tags, response_model=CampaignOut)
    def campaigns_cancel(api: ApiDep, t: EditorToken, campaign_id: Id) -> CampaignOut:
        """Stop for good: whoever has not got it yet never will from this campaign."""
        return api.campaign_out(api.editor(t).cancel(campaign_id))


# --- routes: schedules ---------------------------------------------------------------------------

def _schedule_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["schedules"]

    @app.get("/schedules", tags=tags, response_model=Page[ScheduleOut])
    def schedules_index(
        api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        status: Literal["active", "paused", "cancelled", "done", "missed"] | None = None,
        kind: Literal["once", "digest"] | None = None,
    ) -> Page[ScheduleOut]:
        after = decode_cursor("schedules", cursor)
        views = [(s, n) for s, n in api.editor(t).schedule_views()
                 if (status is None or s.status == status) and (kind is None or s.kind == kind)]
        rows = slice_after(views, after, limit, lambda v: v[0].id)
        return page_of(rows, limit, "schedules", lambda v: v[0].id,
                       lambda v: api.schedule_out(*v))

    def detail(api: Api, schedule_id: int) -> ScheduleDetail:
        s = api.schedules.store.get(schedule_id)
        nxt = api.schedules.next_run(s) if s.status in ("active", "paused") else None
        out = api.schedule_out(s, nxt)
        return ScheduleDetail(**out.model_dump(), runs=[
            _run(r) for r in api.schedules.store.runs(schedule_id)])

    @app.get("/schedules/{schedule_id}", tags=tags, response_model=ScheduleDetail)
    def schedules_get(api: ApiDep, _t: Viewer, schedule_id: Id) -> ScheduleDetail:
        """One schedule with every firing so far."""
        return detail(api, schedule_id)

    @app.post("/schedules/{schedule_id}/pause", tags=tags, response_model=ScheduleDetail)
    def schedules_pause(api: ApiDep, t: EditorToken, schedule_id: Id) -> ScheduleDetail:
        api.editor(t).pause_schedule(schedule_id)
        return detail(api, schedule_id)

    @app.post("/schedules/{schedule_id}/resume", tags=tags, response_model=ScheduleDetail)
    def schedules_resume(api: ApiDep, t: EditorToken, schedule_id: Id) -> ScheduleDetail:
        api.editor(t).resume_schedule(schedule_id)
        return detail(api, schedule_id)

    @app.post("/schedules/{schedule_id}/cancel", tags=tags, response_model=ScheduleDetail)
    def schedules_cancel(api: ApiDep, t: EditorToken, schedule_id: Id) -> ScheduleDetail:
        """Cancel for good (a one-off's campaign is cancelled with it)."""
        api.editor(t).cancel_schedule(schedule_id)
        return detail(api, schedule_id)


# --- routes: tokens and audit --------------------------------------------------------------------

def _token_routes(app: FastAPI) -> None:
    @app.get("/tokens", tags=["tokens"], response_model=Page[TokenOut])
    def tokens_index(api: ApiDep, _t: AdminToken, limit: Limit = 50,
                     cursor: Cursor = None) -> Page[TokenOut]:
        after = decode_cursor("tokens", cursor)
        rows = slice_after(api.tokens.all(), after, limit, lambda k: k.id)
        return page_of(rows, limit, "tokens", lambda k: k.id, _token)

    @app.post("/tokens", tags=["tokens"], status_code=201, response_model=TokenCreated)
    def tokens_create(api: ApiDep, t: AdminToken, body: TokenCreate) -> TokenCreated:
        """A new token; the answer is the only time it is shown."""
        record, secret = api.tokens.create(body.name, body.role, actor=t.actor)
        return TokenCreated(**_token(record).model_dump(), token=secret)

    @app.get("/tokens/{name}", tags=["tokens"], response_model=TokenOut)
    def tokens_get(api: ApiDep, _t: AdminToken, name: TokenName) -> TokenOut:
        return _token(api.tokens.get(name))

    @app.delete("/tokens/{name}", tags=["tokens"], response_model=TokenOut)
    def tokens_revoke(api: ApiDep, t: AdminToken, name: TokenName) -> TokenOut:
        """Revoke for good; its requests are refused from now on. The record stays."""
        return _token(api.tokens.revoke(name, actor=t.actor))

    @app.get("/audit", tags=["audit"], response_model=Page[AuditOut])
    def audit_index(
        api: ApiDep, t: AdminToken, limit: Limit = 50, cursor: Cursor = None,
        action: Annotated[str | None, Query(max_length=64, description="An action or its "
                                            "prefix: 'list.' is every list action.")] = None,
        actor: Annotated[str | None, Query(max_length=200,
                                           examples=["token:deploy", "cli:ana"])] = None,
        since: dt.datetime | None = None,
    ) -> Page[AuditOut]:
        """Who did what, newest first."""
        before = decode_cursor("audit", cursor)
        rows = api.admin(t).audit_entries(limit=limit + 1, before_id=before, action=action,
                                          actor=actor, since=_utc(since))
        return page_of(rows, limit, "audit", lambda a: a.id, _audit)
