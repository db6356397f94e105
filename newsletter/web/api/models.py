"""The API's request and response models, and converters from the store's records."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...admin import SubscriberDetail
from ...apitokens import ApiToken, Role
from ...content.model import Issue
from ...store.directory import AuditEntry, Segment, SubscriberRow
from ...store.schedules import ScheduleRun
from ...store.suppression import Suppression

MAX_UPLOAD = 20 * 1024 * 1024  # an issue file; subscriber imports are not limited


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

def subscriber_out(d: SubscriberDetail | SubscriberRow) -> SubscriberOut:
    return SubscriberOut(id=d.id, email=d.email, name=d.name, attributes=d.attributes,
                         created_at=d.created_at, lists=d.lists, hard_bounces=d.hard_bounces,
                         soft_bounces=d.soft_bounces,
                         suppressed=getattr(d, "suppressed", None))


def segment_out(s: Segment) -> SegmentOut:
    return SegmentOut(id=s.id, name=s.name, filter=s.filter, description=s.description,
                      created_at=s.created_at, updated_at=s.updated_at)


def suppression_out(s: Suppression) -> SuppressionOut:
    return SuppressionOut(id=s.id, value=s.value, kind=s.kind.value, reason=s.reason,
                          note=s.note, created_at=s.created_at)


def token_out(t: ApiToken) -> TokenOut:
    return TokenOut(name=t.name, role=t.role, active=t.active, created_at=t.created_at,
                    created_by=t.created_by, last_used_at=t.last_used_at,
                    revoked_at=t.revoked_at)


def audit_out(a: AuditEntry) -> AuditOut:
    return AuditOut(id=a.id, at=a.at, actor=a.actor, action=a.action, target=a.target,
                    detail=a.detail)


def run_out(r: ScheduleRun) -> RunOut:
    return RunOut(fire_time=r.fire_time, started_at=r.started_at, outcome=r.outcome,
                  campaign_id=r.campaign_id, note=r.note, late_seconds=r.lateness)


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Query times without an offset are UTC, like everything stored."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
