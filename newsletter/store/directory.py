"""Admin-side storage: list edits and deletion, subscriber edits, segments, audit log, erasure.

The store for what admins do by hand (store.sql holds the send and web hot paths). Every
function is one transaction; newsletter.admin validates input and records the audit entry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import ConflictError, NotFoundError
from . import dialect, suppression
from .schema import (
    CampaignStatus,
    MembershipStatus,
    SuppressionKind,
    SuppressionReason,
    archive,
    audit_log,
    campaign_lists,
    campaigns,
    deliveries,
    lists,
    membership_events,
    memberships,
    schedules,
    segments,
    subscribers,
    suppressions,
    utcnow,
)

# An erased subscriber's row stays (campaign counts keep their rows) with no personal data;
# its key can never match a real address because real addresses have no ':'.
ERASED_PREFIX = "erased:"


@dataclass(frozen=True)
class Segment:
    id: int
    name: str
    filter: str
    description: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: dt.datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class SubscriberRow:
    """One subscriber with the status on each of its lists (slug -> status)."""

    id: int
    email: str
    name: str
    attributes: dict[str, Any]
    created_at: dt.datetime
    lists: dict[str, str]
    hard_bounces: int = 0
    soft_bounces: int = 0


# --- audit ------------------------------------------------------------------------------------

def write_audit(conn: Connection, *, actor: str, action: str, target: str = "",
                detail: dict[str, Any] | None = None) -> None:
    """One audit entry, inside the caller's transaction."""
    conn.execute(insert(audit_log).values(at=utcnow(), actor=actor[:200], action=action,
                                          target=target, detail=detail or {}))


def record_audit(engine: Engine, actor: str, action: str, target: str = "",
                 detail: dict[str, Any] | None = None) -> None:
    """One audit entry in a transaction of its own."""
    with engine.begin() as conn:
        write_audit(conn, actor=actor, action=action, target=target, detail=detail)


def audit_entries(engine: Engine, *, limit: int = 50, before_id: int | None = None,
                  action: str | None = None, actor: str | None = None,
                  since: dt.datetime | None = None) -> list[AuditEntry]:
    """Newest first. `action` matches a prefix ('list.' is every list action)."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(audit_log.c.id < before_id)
    if action:
        query = query.where(audit_log.c.action.startswith(action, autoescape=True))
    if actor:
        query = query.where(audit_log.c.actor == actor)
    if since is not None:
        query = query.where(audit_log.c.at >= since)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [AuditEntry(r.id, r.at, r.actor, r.action, r.target, r.detail or {}) for r in rows]


# --- lists ------------------------------------------------------------------------------------

def update_list(engine: Engine, list_id: int, changes: dict[str, Any]) -> None:
    if not changes:
        return
    try:
        with engine.begin() as conn:
            conn.execute(update(lists).where(lists.c.id == list_id).values(**changes))
    except IntegrityError:
        raise ConflictError(f"list {changes.get('slug')!r} already exists") from None


def list_impact(engine: Engine, list_id: int) -> dict[str, int]:
    """What deleting a list takes with it."""
    with engine.connect() as conn:
        by_status: dict[str, int] = dict(conn.execute(
            select(memberships.c.status, func.count()).where(memberships.c.list_id == list_id)
            .group_by(memberships.c.status)).all())
        m2 = memberships.alias("m2")
        only_here = conn.execute(
            select(func.count()).select_from(memberships).where(
                memberships.c.list_id == list_id,
                ~select(m2.c.list_id).where(m2.c.subscriber_id == memberships.c.subscriber_id,
                                            m2.c.list_id != list_id).exists())).scalar_one()
        n_campaigns = conn.execute(select(func.count()).select_from(campaign_lists).where(
            campaign_lists.c.list_id == list_id)).scalar_one()
        n_deliveries = conn.execute(select(func.count()).select_from(deliveries).where(
            deliveries.c.list_id == list_id)).scalar_one()
        n_archive = conn.execute(select(func.count()).select_from(archive).where(
            archive.c.list_id == list_id)).scalar_one()
    impact = {f"members_{s}": int(n) for s, n in by_status.items()}
    total: int = sum(int(n) for n in by_status.values())
    impact.update(members=total,
                  subscribers_on_no_other_list=int(only_here), campaigns=int(n_campaigns),
                  ledger_rows=int(n_deliveries), archive_entries=int(n_archive))
    return impact


def delete_list(engine: Engine, list_id: int) -> None:
    """Delete a list with its memberships, history, ledger rows and archive entries.
    Subscribers stay (they may be on other lists). Refused while a campaign to it runs."""
    with engine.begin() as conn:
        busy = conn.execute(
            select(campaigns.c.id).join(campaign_lists,
                                        campaign_lists.c.campaign_id == campaigns.c.id)
            .where(campaign_lists.c.list_id == list_id,
                   campaigns.c.status.in_([CampaignStatus.RUNNING, CampaignStatus.PAUSED,
                                           CampaignStatus.SCHEDULED]))).scalars().all()
        if busy:
            raise ConflictError(f"campaign(s) {', '.join(map(str, busy))} to this list are "
                                "unfinished; cancel them first")
        waiting = conn.execute(select(schedules.c.id).join(
            campaign_lists, campaign_lists.c.campaign_id == schedules.c.campaign_id).where(
            campaign_lists.c.list_id == list_id,
            schedules.c.status.in_(["active", "paused"]))).scalars().all()
        if waiting:
            raise ConflictError(f"schedule(s) {', '.join(map(str, waiting))} send to this "
                                "list; cancel them first")
        # Explicit deletes: SQLite enforces ON DELETE CASCADE only with foreign_keys on, and
        # the order keeps it cheap either way.
        for table in (deliveries, membership_events, memberships, archive):
            conn.execute(delete(table).where(table.c.list_id == list_id))
        conn.execute(delete(campaign_lists).where(campaign_lists.c.list_id == list_id))
        conn.execute(delete(lists).where(lists.c.id == list_id))


# --- subscribers ------------------------------------------------------------------------------

def subscriber_id(engine: Engine, email_or_id: str | int) -> int:
    """The id of the subscriber with this address (or id, given as int or digits)."""
    with engine.connect() as conn:
        if isinstance(email_or_id, int) or str(email_or_id).isdigit():
            sid = conn.execute(select(subscribers.c.id).where(
                subscribers.c.id == int(email_or_id),
                ~subscribers.c.email_key.startswith(ERASED_PREFIX))).scalar()
        else:
            sid = conn.execute(select(subscribers.c.id).where(
                subscribers.c.email_key == str(email_or_id).strip().lower())).scalar()
    if sid is None:
        raise NotFoundError(f"no subscriber {email_or_id}")
    return int(sid)


def subscriber_rows(engine: Engine, *, list_id: int | None = None, status: str | None = None,
                    search: str | None = None, after_id: int = 0, limit: int = 50) \
        -> list[SubscriberRow]:
    """A page of subscribers in id order (after `after_id`), with their lists."""
    query = (select(subscribers).where(subscribers.c.id > after_id,
                                       ~subscribers.c.email_key.startswith(ERASED_PREFIX))
             .order_by(subscribers.c.id).limit(limit))
    if list_id is not None or status is not None:
        cond = [memberships.c.subscriber_id == subscribers.c.id]
        if list_id is not None:
            cond.append(memberships.c.list_id == list_id)
        if status is not None:
            cond.append(memberships.c.status == status)
        query = query.where(select(memberships.c.list_id).where(*cond).exists())
    if search:
        needle = search.strip().lower()
        query = query.where(or_(subscribers.c.email_key.contains(needle, autoescape=True),
                                func.lower(subscribers.c.name).contains(needle,
                                                                        autoescape=True)))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
        ids = [r.id for r in rows]
        on: dict[int, dict[str, str]] = {}
        for m in conn.execute(select(memberships.c.subscriber_id, lists.c.slug,
                                     memberships.c.status)
                              .join(lists, lists.c.id == memberships.c.list_id)
                              .where(memberships.c.subscriber_id.in_(ids))
                              .order_by(lists.c.slug)):
            on.setdefault(m.subscriber_id, {})[m.slug] = m.status
    return [SubscriberRow(r.id, r.email, r.name, r.attributes or {}, r.created_at,
                          on.get(r.id, {}), r.hard_bounces, r.soft_bounces) for r in rows]


def update_subscriber(engine: Engine, sid: int, changes: dict[str, Any]) -> None:
    if not changes:
        return
    try:
        with engine.begin() as conn:
            conn.execute(update(subscribers).where(subscribers.c.id == sid).values(**changes))
    except IntegrityError:
        raise ConflictError(f"another subscriber has the address {changes.get('email')}") \
            from None


def move(engine: Engine, sid: int, from_id: int, to_id: int, *, source: str) -> str:
    """Move a subscriber from one list to another: active on `to` (unless it opted out
    there: never reactivated by a move), and off `from`. Returns the status on `to`."""
    now = utcnow()
    with engine.begin() as conn:
        old = conn.execute(select(memberships.c.status).where(
            memberships.c.subscriber_id == sid, memberships.c.list_id == from_id)).scalar()
        if old is None:
            raise NotFoundError("the subscriber is not on the list it is moved from")
        there = conn.execute(select(memberships.c.status).where(
            memberships.c.subscriber_id == sid, memberships.c.list_id == to_id)).scalar()
        if there in (MembershipStatus.UNSUBSCRIBED, MembershipStatus.BOUNCED):
            raise ConflictError(f"the subscriber is {there} on the target list; a move does "
                                "not resubscribe (use resubscribe --explicit)")
        if there is None:
            conn.execute(insert(memberships).values(
                list_id=to_id, subscriber_id=sid, status=old, created_at=now, updated_at=now))
            conn.execute(insert(membership_events).values(
                list_id=to_id, subscriber_id=sid, old_status=None, new_status=old,
                source=source, at=now))
        conn.execute(delete(memberships).where(memberships.c.subscriber_id == sid,
                                               memberships.c.list_id == from_id))
        # History keeps the move: "removed" is not a membership status, only an event.
        conn.execute(insert(membership_events).values(
            list_id=from_id, subscriber_id=sid, old_status=old, new_status="removed",
            source=source, at=now))
        # Queued rows for the old list go: the new list's campaigns will pick it up.
        conn.execute(update(deliveries).where(
            deliveries.c.subscriber_id == sid, deliveries.c.list_id == from_id,
            deliveries.c.status.in_(["queued", "failed_temp"])).values(status="skipped",
                                                                        updated_at=now))
    return str(there or old)


def export_data(engine: Engine, sid: int) -> dict[str, Any]:
    """Everything stored about one subscriber (a data-subject access request)."""
    with engine.begin() as conn:
        s = conn.execute(select(subscribers).where(subscribers.c.id == sid)).one()
        members = conn.execute(
            select(lists.c.slug, memberships.c.status, memberships.c.created_at,
                   memberships.c.updated_at)
            .join(lists, lists.c.id == memberships.c.list_id)
            .where(memberships.c.subscriber_id == sid).order_by(lists.c.slug)).all()
        events = conn.execute(
            select(lists.c.slug, membership_events.c.old_status, membership_events.c.new_status,
                   membership_events.c.source, membership_events.c.at)
            .join(lists, lists.c.id == membership_events.c.list_id)
            .where(membership_events.c.subscriber_id == sid)
            .order_by(membership_events.c.id)).all()
        sent = conn.execute(
            select(deliveries.c.campaign_id, campaigns.c.subject, lists.c.slug,
                   deliveries.c.status, deliveries.c.attempts, deliveries.c.last_error,
                   deliveries.c.first_attempt_at, deliveries.c.updated_at)
            .join(campaigns, campaigns.c.id == deliveries.c.campaign_id)
            .join(lists, lists.c.id == deliveries.c.list_id)
            .where(deliveries.c.subscriber_id == sid).order_by(deliveries.c.id)).all()
        entry = suppression.find(conn, s.email_key)
        audit = conn.execute(select(audit_log).where(audit_log.c.target == s.email_key)
                             .order_by(audit_log.c.id)).all()

    def iso(v: dt.datetime | None) -> str | None:
        return v.isoformat() if v else None

    return {
        "subscriber": {"id": s.id, "email": s.email, "name": s.name,
                       "attributes": s.attributes or {}, "created_at": iso(s.created_at),
                       "confirm_sent_at": iso(s.confirm_sent_at),
                       "hard_bounces": s.hard_bounces, "soft_bounces": s.soft_bounces},
        "memberships": [{"list": m.slug, "status": m.status, "joined": iso(m.created_at),
                         "updated": iso(m.updated_at)} for m in members],
        "history": [{"list": e.slug, "from": e.old_status, "to": e.new_status,
                     "source": e.source, "at": iso(e.at)} for e in events],
        "deliveries": [{"campaign": d.campaign_id, "subject": d.subject, "list": d.slug,
                        "status": d.status, "attempts": d.attempts, "last_error": d.last_error,
                        "first_attempt_at": iso(d.first_attempt_at),
                        "updated_at": iso(d.updated_at)} for d in sent],
        "suppression": None if entry is None else {
            "kind": entry.kind.value, "reason": entry.reason, "note": entry.note,
            "since": iso(entry.created_at)},
        "audit": [{"at": iso(a.at), "actor": a.actor, "action": a.action}
                  for a in audit],
    }


def erase(engine: Engine, sid: int) -> dict[str, int]:
    """Erase a subscriber's personal data, keeping only a salted hash of the address in the
    suppression list so no import or form can add it back. Ledger rows stay (campaign
    counts do not change) but lose their error text, which may quote the address."""
    now = utcnow()
    with engine.begin() as conn:
        dialect.secure_delete(conn)
        row = conn.execute(select(subscribers.c.email_key).where(
            subscribers.c.id == sid)).one()
        key = row.email_key
        digest = suppression.erase_hash(suppression.salt(conn), key)
        counts = {
            "memberships": conn.execute(delete(memberships).where(
                memberships.c.subscriber_id == sid)).rowcount,
            "history": conn.execute(delete(membership_events).where(
                membership_events.c.subscriber_id == sid)).rowcount,
            "ledger_rows_scrubbed": conn.execute(update(deliveries).where(
                deliveries.c.subscriber_id == sid).values(last_error=None)).rowcount,
        }
        # Still-due rows must not go out to an erased address.
        conn.execute(update(deliveries).where(
            deliveries.c.subscriber_id == sid,
            deliveries.c.status.in_(["queued", "failed_temp"])).values(status="skipped",
                                                                        updated_at=now))
        # The plain address leaves the suppression list too; the hash replaces it.
        conn.execute(delete(suppressions).where(suppressions.c.email_key == key))
        suppression.add(conn, digest, kind=SuppressionKind.HASH,
                        reason=SuppressionReason.ERASED, now=now)
        conn.execute(update(subscribers).where(subscribers.c.id == sid).values(
            email="", email_key=f"{ERASED_PREFIX}{sid}", name="", attributes={},
            confirm_sent_at=None))
        # Earlier audit entries named the address: they keep what was done, not to whom.
        counts["audit_entries_scrubbed"] = conn.execute(
            update(audit_log).where(audit_log.c.target == key)
            .values(target=f"subscriber #{sid} (erased)")).rowcount
    dialect.flush_deleted(engine)
    return counts


# --- segments ---------------------------------------------------------------------------------

def segment_rows(engine: Engine) -> list[Segment]:
    with engine.connect() as conn:
        rows = conn.execute(select(segments).order_by(segments.c.name)).all()
    return [_segment(r) for r in rows]


def get_segment(engine: Engine, name: str) -> Segment:
    with engine.connect() as conn:
        row = conn.execute(select(segments).where(segments.c.name == name)).first()
    if row is None:
        raise NotFoundError(f"no segment {name!r}")
    return _segment(row)


def save_segment(engine: Engine, name: str, filter_text: str, description: str | None, *,
                 create: bool) -> bool:
    """Create (create=True, refused if it exists) or update a segment. True if created."""
    now = utcnow()
    with engine.begin() as conn:
        exists = conn.execute(select(segments.c.id).where(segments.c.name == name)).scalar()
        if exists is None:
            if not create:
                raise NotFoundError(f"no segment {name!r}")
            conn.execute(insert(segments).values(name=name, filter=filter_text,
                                                 description=description or "",
                                                 created_at=now, updated_at=now))
            return True
        if create:
            raise ConflictError(f"segment {name!r} already exists")
        values: dict[str, Any] = {"filter": filter_text, "updated_at": now}
        if description is not None:
            values["description"] = description
        conn.execute(update(segments).where(segments.c.id == exists).values(**values))
        return False


def delete_segment(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        if not conn.execute(delete(segments).where(segments.c.name == name)).rowcount:
            raise NotFoundError(f"no segment {name!r}")


def _segment(r: Any) -> Segment:
    return Segment(r.id, r.name, r.filter, r.description, r.created_at, r.updated_at)


def slugs(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(lists.c.slug)).scalars())


def list_ids(engine: Engine, slug_list: Sequence[str]) -> list[int]:
    with engine.connect() as conn:
        found = dict(conn.execute(select(lists.c.slug, lists.c.id)
                                  .where(lists.c.slug.in_(list(slug_list)))).all())
    missing = [s for s in slug_list if s not in found]
    if missing:
        raise NotFoundError(f"no list {missing[0]!r}")
    return [int(found[s]) for s in slug_list]
