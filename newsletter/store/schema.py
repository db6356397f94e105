"""Tables and status enums. Alembic migrations in store/migrations create them; a test checks
that the migrations and these definitions agree."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class MembershipStatus(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class DeliveryStatus(StrEnum):
    QUEUED = "queued"          # due, not yet attempted in this run
    SENDING = "sending"        # handed to a connection; outcome not yet recorded
    SENT = "sent"              # the relay accepted it (250 after DATA)
    FAILED_TEMP = "failed_temp"  # 4xx, dropped connection, timeout: due again on the next run
    FAILED_PERM = "failed_perm"  # 5xx: not retried
    UNKNOWN = "unknown"        # was SENDING when a run died: may have been delivered
    SKIPPED = "skipped"        # no longer active on the list when its turn came
    EXPIRED = "expired"        # failed temporarily until retry_max_age: given up


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that always comes back zone-aware (UTC). We only store UTC, but SQLite
    keeps no zone, so without this every reader would have to remember to add it back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None,
                             dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


TZ = UtcDateTime()


def utcnow() -> dt.datetime:
    """Now, zone-aware UTC: the only kind of time the store writes."""
    return dt.datetime.now(dt.UTC)

lists = Table(
    "lists", metadata,
    Column("id", Integer, primary_key=True),
    Column("slug", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("created_at", TZ, nullable=False),
    # New subscribers from the web form confirm by email first unless this is off.
    Column("double_opt_in", Boolean, nullable=False, default=True, server_default="1"),
    # Public lists have a subscribe form and a public archive; private ones have neither.
    Column("public", Boolean, nullable=False, default=True, server_default="1"),
    Column("language", String(16), nullable=False, default="en", server_default="en"),
    # Send the welcome template when an address is confirmed (or joins a single opt-in list).
    Column("welcome", Boolean, nullable=False, default=False, server_default="0"),
    # The list's default time zone (IANA name) for local-time sends; None: the schedule's.
    Column("zone", String(64), nullable=True),
)

subscribers = Table(
    "subscribers", metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(320), nullable=False),
    # Lowercased address: uniqueness is case-insensitive without relying on a dialect's collation.
    Column("email_key", String(320), nullable=False, unique=True),
    Column("name", String(200), nullable=False, default=""),
    Column("attributes", JSON, nullable=False, default=dict),
    Column("created_at", TZ, nullable=False),
    # When the last confirmation mail went to this address: at most one an hour.
    Column("confirm_sent_at", TZ, nullable=True),
    Column("hard_bounces", Integer, nullable=False, default=0, server_default="0"),
    Column("soft_bounces", Integer, nullable=False, default=0, server_default="0"),
)

memberships = Table(
    "memberships", metadata,
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True),
    Column("subscriber_id", Integer, ForeignKey("subscribers.id", ondelete="CASCADE"),
           primary_key=True),
    Column("status", String(16), nullable=False),
    Column("created_at", TZ, nullable=False),
    Column("updated_at", TZ, nullable=False),
    # Recipient selection walks a list's active members in id order.
    Index(None, "list_id", "status", "subscriber_id"),
    Index(None, "subscriber_id"),
)

# Every change of a membership's status, with when and why: the subscriber's history.
membership_events = Table(
    "membership_events", metadata,
    Column("id", Integer, primary_key=True),
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("subscriber_id", Integer, ForeignKey("subscribers.id", ondelete="CASCADE"),
           nullable=False),
    Column("old_status", String(16), nullable=True),
    Column("new_status", String(16), nullable=False),
    Column("source", String(16), nullable=False),  # cli, import, one-click, page, admin, bounce
    Column("at", TZ, nullable=False),
    Index(None, "subscriber_id", "list_id"),
)

campaigns = Table(
    "campaigns", metadata,
    Column("id", Integer, primary_key=True),
    Column("issue_key", String(200), nullable=False),
    Column("content_hash", String(32), nullable=False),
    Column("subject", Text, nullable=False),
    Column("issue_json", Text, nullable=False),   # the validated issue, as it was sent
    Column("html", Text, nullable=False),         # rendered and inlined once, with slots
    Column("text", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", TZ, nullable=False),
    Column("started_at", TZ, nullable=True),
    Column("finished_at", TZ, nullable=True),
    # The process sending it and when it last proved alive: a stale heartbeat means it died.
    Column("runner", String(200), nullable=True),
    Column("heartbeat_at", TZ, nullable=True),
    Column("last_error", Text, nullable=True),
    # What the campaign is doing or waiting for, in words ("waiting: relay X hourly limit").
    Column("status_note", Text, nullable=True),
    # False: whoever already has (or is due) this issue from another campaign is left out.
    Column("resend", Boolean, nullable=False, default=False),
    # A segment send: the filter (segment language) the audience was narrowed by, and the
    # segments' names for display. The audience is fixed when the campaign is enqueued.
    Column("segment_filter", Text, nullable=True),
    Column("segment_names", Text, nullable=True),
    Index(None, "issue_key"),
)

# The other-language editions of a campaign (the main one is in `campaigns`), rendered
# once each when the campaign is created.
campaign_editions = Table(
    "campaign_editions", metadata,
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"),
           primary_key=True),
    Column("language", String(16), primary_key=True),
    Column("subject", Text, nullable=False),
    Column("issue_json", Text, nullable=False),
    Column("html", Text, nullable=False),
    Column("text", Text, nullable=False),
)

campaign_lists = Table(
    "campaign_lists", metadata,
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"),
           primary_key=True),
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), primary_key=True),
)

# The delivery ledger: one row per (campaign, subscriber), the unit of exactly-once.
deliveries = Table(
    "deliveries", metadata,
    Column("id", Integer, primary_key=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="CASCADE"),
           nullable=False),
    Column("subscriber_id", Integer, ForeignKey("subscribers.id", ondelete="CASCADE"),
           nullable=False),
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("updated_at", TZ, nullable=False),
    Column("first_attempt_at", TZ, nullable=True),
    Column("next_attempt_at", TZ, nullable=True),   # for failed_temp: when it is due again
    Column("relay", String(64), nullable=True),     # the relay of the last attempt
    # Which edition (language) of a bilingual campaign this recipient gets; None: the main.
    Column("edition", String(16), nullable=True),
    # The `newsletter worker` (workers.id) that claimed the row: set while it is claimed or
    # being sent, cleared with its outcome. No foreign key: when a worker's lease runs out
    # its rows are released or marked unknown first, then its row is deleted.
    Column("worker_id", Integer, nullable=True),
    UniqueConstraint("campaign_id", "subscriber_id"),
    # Batches walk a campaign's due rows in id order; counts group by status.
    Index(None, "campaign_id", "status", "id"),
    # An unsubscribe skips the address's queued rows in every campaign: find them directly.
    Index(None, "subscriber_id"),
    # A dead worker's rows, found directly; partial, so only rows in hand are indexed.
    Index("ix_deliveries_worker_id", "worker_id",
          sqlite_where=text("worker_id IS NOT NULL"),
          postgresql_where=text("worker_id IS NOT NULL")),
)

# The web archive: one entry per issue and list, created when the issue starts going out.
archive = Table(
    "archive", metadata,
    Column("id", Integer, primary_key=True),
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="SET NULL"),
           nullable=True),
    Column("issue_key", String(200), nullable=False),
    Column("number", Integer, nullable=True),
    Column("subject", Text, nullable=False),
    Column("language", String(16), nullable=False),
    Column("issue_json", Text, nullable=False),
    Column("published_at", TZ, nullable=False),
    Column("views", Integer, nullable=False, default=0, server_default="0"),
    # One row per edition: a bilingual issue has an entry per language on each list.
    UniqueConstraint("list_id", "issue_key", "language"),
    Index(None, "list_id", "published_at"),
)

class SuppressionKind(StrEnum):
    ADDRESS = "address"  # email_key is a lowercased address
    DOMAIN = "domain"    # email_key is a lowercased domain: every address at it
    HASH = "hash"        # email_key is the salted hash of an erased address (no address kept)


class SuppressionReason(StrEnum):
    UNSUBSCRIBED = "unsubscribed"  # left every list
    HARD_BOUNCE = "hard-bounce"
    COMPLAINT = "complaint"
    ADMIN = "admin"
    ERASED = "erased"              # a data-subject erasure: only the hash remains


# Addresses and domains never to be sent to on any list; checked when a campaign's audience
# is fixed, honoured by queued rows at once, and by every import and subscribe form.
suppressions = Table(
    "suppressions", metadata,
    Column("id", Integer, primary_key=True),
    # What is suppressed, as `kind` says: an address, a domain or an erased address's hash.
    Column("email_key", String(320), nullable=False, unique=True),
    Column("kind", String(16), nullable=False, default="address", server_default="address"),
    Column("reason", String(32), nullable=False),   # a SuppressionReason
    Column("note", Text, nullable=False, default="", server_default=""),
    Column("created_at", TZ, nullable=False),
)

# Messages handed to each relay per second, so per-hour and per-day limits hold across runs.
relay_usage = Table(
    "relay_usage", metadata,
    Column("relay", String(64), primary_key=True),
    Column("second", Integer, primary_key=True),  # Unix time, whole seconds
    Column("count", Integer, nullable=False),
)

# Scheduled sends: a one-off issue at a time (its campaign rendered when scheduled) or a
# recurring digest on a cron expression in a time zone. APScheduler keeps the timing in its
# own table (apscheduler_jobs); this is what editors see and what a firing checks.
schedules = Table(
    "schedules", metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),          # once, digest
    Column("campaign_id", Integer, ForeignKey("campaigns.id", ondelete="SET NULL"),
           nullable=True),
    Column("issue_path", Text, nullable=True),
    Column("digest", String(64), nullable=True),
    Column("run_at", TZ, nullable=True),
    Column("cron", String(120), nullable=True),
    Column("tz", String(64), nullable=False),
    # Local-time delivery: run_at's wall-clock time in each subscriber's zone (attribute tz,
    # else `tz`); the campaign releases recipients zone by zone.
    Column("local_time", Boolean, nullable=False, default=False, server_default="0"),
    Column("status", String(16), nullable=False),        # active, paused, cancelled, done, missed
    Column("created_at", TZ, nullable=False),
)

# One row per firing: unique on (schedule, fire time), so a job that fires twice for the
# same time (two processes, a restart) creates one campaign.
schedule_runs = Table(
    "schedule_runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("schedule_id", Integer, ForeignKey("schedules.id", ondelete="CASCADE"),
           nullable=False),
    Column("fire_time", TZ, nullable=False),
    Column("started_at", TZ, nullable=False),
    Column("outcome", String(16), nullable=False),       # started, sent, skipped, missed, failed
    Column("campaign_id", Integer, nullable=True),
    Column("note", Text, nullable=False, default="", server_default=""),
    UniqueConstraint("schedule_id", "fire_time"),
)

# Delivery workers (`newsletter worker`) alive on this database. A worker renews its lease;
# once expires_at has passed, any other worker releases its claimed rows to the rest and
# marks the rows it had handed to a relay 'unknown', then deletes this row.
workers = Table(
    "workers", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),          # host:pid, or --name
    Column("started_at", TZ, nullable=False),
    Column("heartbeat_at", TZ, nullable=False),
    Column("expires_at", TZ, nullable=False),
    Column("campaign_id", Integer, nullable=True),        # what it is sending now, for display
)

# One row per relay, locked by the transaction that reserves sending slots for it, so the
# rate limits in relay_usage hold across every worker together.
relay_locks = Table(
    "relay_locks", metadata,
    Column("relay", String(64), primary_key=True),
)

# Leases: only the holder of 'scheduler' fires jobs for this database.
locks = Table(
    "locks", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at", TZ, nullable=False),
)

# Named filters over subscribers and memberships (newsletter.segments parses the language).
segments = Table(
    "segments", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("filter", Text, nullable=False),
    Column("description", Text, nullable=False, default="", server_default=""),
    Column("created_at", TZ, nullable=False),
    Column("updated_at", TZ, nullable=False),
)

# Bearer tokens of the admin API: only a SHA-256 of the token is kept (it is shown once).
api_tokens = Table(
    "api_tokens", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("role", String(16), nullable=False),          # admin, editor, viewer
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", TZ, nullable=False),
    Column("created_by", String(200), nullable=False, default="", server_default=""),
    Column("last_used_at", TZ, nullable=True),
    Column("revoked_at", TZ, nullable=True),
)

# Who did what to which object, and when: every admin action from the CLI or the API.
audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True),
    Column("at", TZ, nullable=False),
    Column("actor", String(200), nullable=False),       # cli:USER or token:NAME
    Column("action", String(64), nullable=False),       # list.create, subscriber.erase, ...
    Column("target", Text, nullable=False, default="", server_default=""),
    Column("detail", JSON, nullable=False, default=dict),
    Index(None, "at"),
)

# Imports started from the API (or CLI), so their progress can be polled.
import_jobs = Table(
    "import_jobs", metadata,
    Column("id", Integer, primary_key=True),
    Column("list_id", Integer, ForeignKey("lists.id", ondelete="CASCADE"), nullable=False),
    Column("filename", Text, nullable=False),
    Column("status", String(16), nullable=False),       # queued, running, done, failed
    Column("dry_run", Boolean, nullable=False, default=False, server_default="0"),
    Column("rows_read", Integer, nullable=False, default=0, server_default="0"),
    Column("imported", Integer, nullable=False, default=0, server_default="0"),
    Column("updated", Integer, nullable=False, default=0, server_default="0"),
    Column("skipped", Integer, nullable=False, default=0, server_default="0"),
    Column("report_path", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_by", String(200), nullable=False, default="", server_default=""),
    Column("created_at", TZ, nullable=False),
    Column("finished_at", TZ, nullable=True),
)

# Small per-database values: the salt of erased addresses' hashes lives here, so rotating
# SECRET_KEY does not let an erased address back in.
meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
