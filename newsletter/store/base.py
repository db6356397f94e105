"""What the store holds, as plain records, and the interface the delivery engine depends on.

The engine sees only `DeliveryStore`; store.sql implements it on SQLAlchemy (SQLite now,
PostgreSQL later), so another backend can come without touching the delivery code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..render.message import Recipient
from .schema import CampaignStatus, DeliveryStatus, MembershipStatus


@dataclass(frozen=True)
class MailingList:
    id: int
    slug: str
    name: str
    description: str
    created_at: dt.datetime
    double_opt_in: bool = True
    public: bool = True
    language: str = "en"
    welcome: bool = False
    zone: str | None = None   # default time zone for local-time sends (IANA name)


@dataclass(frozen=True)
class Member:
    """A subscriber as seen through one list."""

    id: int
    email: str
    name: str
    attributes: dict[str, Any]
    status: MembershipStatus
    created_at: dt.datetime


@dataclass(frozen=True)
class Subscriber:
    id: int
    email: str
    name: str
    attributes: dict[str, Any]
    created_at: dt.datetime

    @property
    def language(self) -> str | None:
        lang = self.attributes.get("lang") or self.attributes.get("language")
        return str(lang) if lang else None


@dataclass(frozen=True)
class ArchiveEntry:
    """One issue as published in a list's web archive."""

    id: int
    list_id: int
    issue_key: str
    number: int | None
    subject: str
    language: str
    issue_json: str
    published_at: dt.datetime
    views: int

    @property
    def path(self) -> str:
        """The last part of its archive URL: the issue number, else its key."""
        return str(self.number) if self.number is not None else self.issue_key


@dataclass(frozen=True)
class Campaign:
    id: int
    issue_key: str
    content_hash: str
    subject: str
    issue_json: str
    html: str
    text: str
    status: CampaignStatus
    list_ids: tuple[int, ...]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    last_error: str | None
    runner: str | None = None
    resend: bool = False
    status_note: str | None = None
    segment_filter: str | None = None   # a segment send: the filter its audience matched
    segment_names: str | None = None


@dataclass
class DeliveryCounts:
    """How a campaign's ledger stands, by status."""

    by_status: dict[DeliveryStatus, int] = field(default_factory=dict)

    def __getitem__(self, status: DeliveryStatus) -> int:
        return self.by_status.get(status, 0)

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def due(self) -> int:
        """Rows a run would send to: not yet attempted, or failed temporarily."""
        return self[DeliveryStatus.QUEUED] + self[DeliveryStatus.FAILED_TEMP]

    @property
    def remaining(self) -> int:
        """Rows not finished: due, or in flight."""
        return self.due + self[DeliveryStatus.SENDING]

    @property
    def failed(self) -> int:
        return (self[DeliveryStatus.FAILED_TEMP] + self[DeliveryStatus.FAILED_PERM]
                + self[DeliveryStatus.EXPIRED])


@dataclass(frozen=True, slots=True)
class Due:
    """One ledger row that is due, with what is needed to build its message."""

    delivery_id: int
    recipient: Recipient
    attempts: int = 0
    first_attempt_at: dt.datetime | None = None


@dataclass(frozen=True)
class Batch:
    """One page of due ledger rows; `last_id` continues the walk even if all were skipped."""

    due: list[Due]
    skipped: int  # rows whose subscriber left the list since the run started
    last_id: int  # 0 when the walk is over


@dataclass(frozen=True, slots=True)
class Mark:
    """A change to one ledger row: a new status, and the error if it failed."""

    delivery_id: int
    status: DeliveryStatus
    error: str | None = None
    relay: str | None = None                 # SENDING: the relay taking it
    retry_at: dt.datetime | None = None      # FAILED_TEMP: when it is due again
    bounce: bool = False                     # FAILED_PERM: the address itself is bad


@dataclass(frozen=True)
class RunStart:
    """What claiming a campaign for a run found and did."""

    enqueued: int        # rows added to the ledger now (first run only)
    became_unknown: int  # rows a dead run left in 'sending'
    retrying: int        # rows that failed temporarily before and are due again


class DeliveryStore(Protocol):
    """The ledger operations the delivery engine needs; nothing else."""

    def claim_campaign(self, campaign_id: int, *, runner: str, lease: float,
                       retry_now: bool = False) -> RunStart:
        """Take the campaign for this run, or raise ConflictError if a live run holds it or
        it is paused or cancelled. retry_now: temporary failures are due at once (a person
        asked for this run) rather than at their backoff time."""
        ...

    def due_batch(self, campaign_id: int, *, after_id: int, limit: int,
                  retries: bool = False) -> Batch:
        """Queued rows (or, with retries, failed_temp rows whose retry time has come) after
        after_id in id order; rows no longer active become 'skipped'."""
        ...

    def begin(self, marks: Sequence[Mark], *,
              usage: Sequence[tuple[str, int, int]] = (), bounce_threshold: int = 1,
              worker: int | None = None) -> set[int]:
        """Record outcomes and move due rows to 'sending', in one transaction; also add
        (relay, second, count) usage, and bounce the memberships of marks with `bounce`
        (suppressing the address at `bounce_threshold` hard bounces). Returns the ids it
        moved to 'sending'; a row missing from it was changed meanwhile (the subscriber
        left, or, with `worker`, the worker's claim on it lapsed) and must not be sent."""
        ...

    def heartbeat(self, campaign_id: int, *, runner: str, note: str | None = None) \
            -> CampaignStatus:
        """Prove the run alive, set its status note; returns the status (another process
        may have paused or cancelled it)."""
        ...

    def campaign_status(self, campaign_id: int) -> CampaignStatus:
        """The campaign's status now (another process may have paused or cancelled it)."""
        ...

    def next_retry_at(self, campaign_id: int) -> dt.datetime | None:
        """When the earliest temporarily failed row is due again, if any."""
        ...

    def relay_usage(self, since: int) -> dict[str, list[tuple[int, int]]]:
        """(second, count) per relay since a Unix time, for rate windows across runs."""
        ...

    def finish_run(self, campaign_id: int, *, runner: str, error: str | None = None,
                   pause: bool = False) -> CampaignStatus:
        """Release the campaign: completed when nothing is left, paused if asked (or if
        another process paused it), else running and waiting for retries."""
        ...

    def delivery_counts(self, campaign_id: int) -> DeliveryCounts: ...

    # Shared delivery (`newsletter worker`): rows are claimed by workers under a lease.

    def join_campaign(self, campaign_id: int) -> RunStart:
        """A worker starts on a campaign handed to the workers (ConflictError if it is not)."""
        ...

    def claim_batch(self, campaign_id: int, *, worker: int, limit: int,
                    after_id: int = 0) -> Batch:
        """Claim up to `limit` due rows for this worker (queued ones after `after_id`, the
        last batch's `last_id`); rows others hold are skipped over."""
        ...

    def release_claims(self, campaign_id: int, *, worker: int) -> int:
        """Hand back this worker's claimed, unsent rows of the campaign."""
        ...

    def renew_worker(self, worker_id: int, *, lease: float, campaign_id: int | None = None) \
            -> bool:
        """Extend the worker's lease; False if it was lost and its rows went to others."""
        ...

    def finish_shared(self, campaign_id: int, *, pause: str | None = None) -> CampaignStatus:
        """Complete the campaign if nothing is left unfinished, or pause it for every
        worker with this reason; returns its status."""
        ...

    def reserve_relay(self, relay: str, want: int, windows: Sequence[tuple[int, float]], *,
                      second: int) -> tuple[int, int]:
        """Take up to `want` sending slots on a relay within every (limit, seconds) window,
        counted over all workers; returns (granted, index of the window that was full)."""
        ...
