"""The store on SQLAlchemy Core: lists, subscribers, campaigns and the delivery ledger.

Queries are portable SQL (SQLite and PostgreSQL); each hot one says why it is shaped so.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Row,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from ..errors import ConflictError, NotFoundError
from ..headers import check_header_text
from . import claims, suppression
from .base import (
    ArchiveEntry,
    Batch,
    Campaign,
    DeliveryCounts,
    MailingList,
    Mark,
    Member,
    RunStart,
    Subscriber,
)
from .schema import (
    TZ,
    CampaignStatus,
    DeliveryStatus,
    MembershipStatus,
    SuppressionKind,
    archive,
    campaign_editions,
    campaign_lists,
    campaigns,
    deliveries,
    lists,
    membership_events,
    memberships,
    relay_usage,
    subscribers,
    utcnow,
)
from .suppression import suppressed_clause

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_OPTED_OUT = (MembershipStatus.UNSUBSCRIBED, MembershipStatus.BOUNCED)


@dataclass(frozen=True)
class NewMember:
    """One subscriber to put on a list (from the CLI or an import row)."""

    email: str       # normalised address
    name: str = ""
    attributes: dict[str, Any] | None = None


@dataclass
class UpsertResult:
    added: int = 0        # new on the list
    updated: int = 0      # already there; name or attributes changed
    unchanged: int = 0    # already there, nothing to change
    opted_out: list[str] | None = None  # emails kept unsubscribed/bounced, not reactivated


# Hot statements as text: prepared once, executed many times per second during a send.
# An outcome also ends a worker's claim on the row (store.claims).
_MARK_OUTCOME = text(
    "UPDATE deliveries SET status = :status, last_error = :error, updated_at = :now, "
    "next_attempt_at = :retry_at, worker_id = NULL WHERE id = :id"
).bindparams(bindparam("now", type_=TZ), bindparam("retry_at", type_=TZ))
# Only a row still due may start sending: an unsubscribe that marked it 'skipped'
# meanwhile wins, and the engine learns it from the row count. A single-process run takes
# only rows no worker has claimed; a worker only rows it still has claimed (a worker whose
# lease ran out finds its rows gone to others here, not in the mailbox).
_SENDING = ("UPDATE deliveries SET status = 'sending', attempts = attempts + 1, "
            "updated_at = :now, first_attempt_at = COALESCE(first_attempt_at, :now), "
            "relay = :relay WHERE id = :id AND status IN ('queued', 'failed_temp') AND ")
_MARK_SENDING = text(_SENDING + "worker_id IS NULL").bindparams(bindparam("now", type_=TZ))
_MARK_SENDING_CLAIMED = text(_SENDING + "worker_id = :worker") \
    .bindparams(bindparam("now", type_=TZ))
# Relay usage per second; the same upsert syntax works on SQLite and PostgreSQL.
_ADD_USAGE = text(
    "INSERT INTO relay_usage (relay, second, count) VALUES (:relay, :second, :count) "
    "ON CONFLICT (relay, second) DO UPDATE SET count = relay_usage.count + excluded.count"
)
_UNFINISHED = (DeliveryStatus.QUEUED, DeliveryStatus.SENDING, DeliveryStatus.FAILED_TEMP)


# The one-click unsubscribe, the web side's hot path: who, which list, what status, in one
# read; then, only if something changes, the writes of _apply_status in the same transaction.
_TARGET = text(
    "SELECT s.id AS s_id, s.email, s.name AS s_name, s.attributes, s.created_at AS s_created, "
    "l.id AS l_id, l.slug, l.name AS l_name, l.description, l.created_at AS l_created, "
    "l.double_opt_in, l.public, l.language, l.welcome, l.zone, m.status "
    "FROM subscribers s JOIN lists l ON l.id = :lid "
    "LEFT JOIN memberships m ON m.subscriber_id = s.id AND m.list_id = l.id "
    "WHERE s.id = :sid"
).columns(s_created=TZ, l_created=TZ, attributes=JSON, double_opt_in=Boolean, public=Boolean,
          welcome=Boolean)  # by name: positional columns would be matched by position
_SET_STATUS = text(
    "UPDATE memberships SET status = :status, updated_at = :now "
    "WHERE subscriber_id = :sid AND list_id = :lid"
).bindparams(bindparam("now", type_=TZ))
_EVENT = text(
    "INSERT INTO membership_events (list_id, subscriber_id, old_status, new_status, source, at) "
    "VALUES (:lid, :sid, :old, :status, :source, :now)"
).bindparams(bindparam("now", type_=TZ))
_SKIP_QUEUED = text(
    "UPDATE deliveries SET status = 'skipped', updated_at = :now, worker_id = NULL "
    "WHERE subscriber_id = :sid AND list_id = :lid AND status IN ('queued', 'failed_temp')"
).bindparams(bindparam("now", type_=TZ))


class SqlStore:
    """The store. Pass it an Engine; every method is one short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # The ledger writer: one connection held for a run, because checking a connection
        # out of the pool for every group commit cost a third of a send's CPU.
        self._writer: Connection | None = None

    def close(self) -> None:
        """Return the ledger writer's connection to the pool."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # --- lists -------------------------------------------------------------------------------

    def create_list(self, slug: str, *, name: str | None = None, description: str = "",
                    double_opt_in: bool = True, public: bool = True, language: str = "en",
                    welcome: bool = False) -> MailingList:
        if not SLUG_RE.match(slug):
            raise ConflictError(f"invalid list slug {slug!r}: use lowercase letters, digits, "
                                "'-' and '_', starting with a letter or digit")
        name = check_header_text(name or slug, "list name")
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(lists).values(
                    slug=slug, name=name, description=description, created_at=utcnow(),
                    double_opt_in=double_opt_in, public=public, language=language,
                    welcome=welcome))
        except IntegrityError:
            raise ConflictError(f"list {slug!r} already exists") from None
        return self.get_list(slug)

    def get_list(self, slug: str) -> MailingList:
        with self.engine.connect() as conn:
            row = conn.execute(select(lists).where(lists.c.slug == slug)).first()
        if row is None:
            raise NotFoundError(f"no list {slug!r}; create it with: newsletter lists create {slug}")
        return _list(row)

    def list_by_id(self, list_id: int) -> MailingList:
        with self.engine.connect() as conn:
            row = conn.execute(select(lists).where(lists.c.id == list_id)).first()
        if row is None:
            raise NotFoundError(f"no list with id {list_id}")
        return _list(row)

    def lists_by_id(self, ids: Iterable[int]) -> dict[int, MailingList]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(lists).where(lists.c.id.in_(list(ids)))).all()
        return {r.id: _list(r) for r in rows}

    def all_lists(self) -> list[tuple[MailingList, dict[str, int]]]:
        """Every list with its member counts by status."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(lists).order_by(lists.c.slug)).all()
            counts = conn.execute(
                select(memberships.c.list_id, memberships.c.status, func.count())
                .group_by(memberships.c.list_id, memberships.c.status)
            ).all()
        by_list: dict[int, dict[str, int]] = {}
        for list_id, status, n in counts:
            by_list.setdefault(list_id, {})[status] = n
        return [(_list(r), by_list.get(r.id, {})) for r in rows]

    # --- subscribers -------------------------------------------------------------------------

    def upsert_members(
        self, list_id: int, members: Sequence[NewMember], *, source: str,
        status: MembershipStatus = MembershipStatus.ACTIVE,
    ) -> UpsertResult:
        """Add members to a list in one transaction; never reactivates an opted-out address.

        Existing subscribers keep their id; a non-empty name or new attributes update them.
        `members` must not repeat an address (the importer deduplicates).
        """
        result = UpsertResult(opted_out=[])
        if not members:
            return result
        now = utcnow()
        keys = [m.email.lower() for m in members]
        with self.engine.begin() as conn:
            existing = {
                r.email_key: r for r in conn.execute(
                    select(subscribers.c.id, subscribers.c.email_key, subscribers.c.name,
                           subscribers.c.attributes)
                    .where(subscribers.c.email_key.in_(keys))
                )
            }
            fresh = [m for m, k in zip(members, keys, strict=True) if k not in existing]
            if fresh:
                conn.execute(insert(subscribers), [
                    {"email": m.email, "email_key": m.email.lower(), "name": m.name,
                     "attributes": m.attributes or {}, "created_at": now} for m in fresh
                ])
            ids = {
                r.email_key: r.id for r in conn.execute(
                    select(subscribers.c.id, subscribers.c.email_key)
                    .where(subscribers.c.email_key.in_(keys))
                )
            }
            changed_details: set[int] = set()
            for m, k in zip(members, keys, strict=True):
                old = existing.get(k)
                if old is None:
                    continue
                attrs = {**(old.attributes or {}), **(m.attributes or {})}
                name = m.name or old.name
                if name != old.name or attrs != (old.attributes or {}):
                    conn.execute(update(subscribers).where(subscribers.c.id == old.id)
                                 .values(name=name, attributes=attrs))
                    changed_details.add(old.id)
            current = {
                r.subscriber_id: r.status for r in conn.execute(
                    select(memberships.c.subscriber_id, memberships.c.status).where(
                        memberships.c.list_id == list_id,
                        memberships.c.subscriber_id.in_(list(ids.values())),
                    )
                )
            }
            new_rows, events = [], []
            for m, k in zip(members, keys, strict=True):
                sid = ids[k]
                was = current.get(sid)
                if was is None:
                    new_rows.append({"list_id": list_id, "subscriber_id": sid, "status": status,
                                     "created_at": now, "updated_at": now})
                    events.append({"list_id": list_id, "subscriber_id": sid, "old_status": None,
                                   "new_status": status, "source": source, "at": now})
                    result.added += 1
                elif was in _OPTED_OUT:
                    result.opted_out.append(m.email)  # type: ignore[union-attr]
                elif sid in changed_details:
                    result.updated += 1
                else:
                    result.unchanged += 1
            if new_rows:
                conn.execute(insert(memberships), new_rows)
                conn.execute(insert(membership_events), events)
        return result

    def audience_count(self, list_ids: Sequence[int], *, issue_key: str | None = None,
                       segment_filter: str | None = None) -> int:
        """How many a new campaign to these lists would reach (see _audience)."""
        sub = _audience(list_ids, issue_key=issue_key, exclude_campaign=None,
                        segment_filter=segment_filter).subquery()
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(sub)).scalar_one())

    def lists_matching(self, flt: Any) -> list[str]:
        """Slugs of the lists with at least one active member matching a segment filter."""
        from .. import segments

        with self.engine.connect() as conn:
            return list(conn.execute(
                select(lists.c.slug).where(select(memberships.c.list_id).join(
                    subscribers, subscribers.c.id == memberships.c.subscriber_id).where(
                    memberships.c.list_id == lists.c.id,
                    memberships.c.status == MembershipStatus.ACTIVE,
                    segments.compile_filter(flt)).exists()).order_by(lists.c.slug)).scalars())

    def members(self, list_id: int, *, status: MembershipStatus | None = None,
                batch: int = 1000) -> Iterator[Member]:
        """Stream a list's members in id order, a batch at a time (memory stays flat)."""
        after = 0
        while True:
            query = (
                select(subscribers.c.id, subscribers.c.email, subscribers.c.name,
                       subscribers.c.attributes, memberships.c.status, memberships.c.created_at)
                .join(memberships, memberships.c.subscriber_id == subscribers.c.id)
                .where(memberships.c.list_id == list_id, subscribers.c.id > after)
                .order_by(subscribers.c.id).limit(batch)
            )
            if status is not None:
                query = query.where(memberships.c.status == status)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for r in rows:
                yield Member(r.id, r.email, r.name, r.attributes or {},
                             MembershipStatus(r.status), r.created_at)
            if len(rows) < batch:
                return
            after = rows[-1].id

    def set_status(self, email: str, status: MembershipStatus, *, source: str,
                   list_id: int | None = None) -> int:
        """Change an address's status on one list or all; returns memberships changed.

        Moving away from 'active' also skips the address's rows still queued in any campaign,
        so a running send honours it for every message not yet sent.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            sid = conn.execute(select(subscribers.c.id)
                               .where(subscribers.c.email_key == email.lower())).scalar()
            if sid is None:
                raise NotFoundError(f"no subscriber {email}")
            return len(_change_status(conn, sid, status, source=source, list_id=list_id,
                                      now=now))

    def set_membership(self, subscriber_id: int, list_id: int | None, status: MembershipStatus,
                       *, source: str, create: bool = False) -> dict[int, str | None]:
        """Set one subscriber's status on one list (or all, with list_id None).

        Returns {list_id: previous status} for what changed (None: was not on the list, with
        create=True). Idempotent: asking for the status already held changes nothing.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            changed: dict[int, str | None] = dict(_change_status(
                conn, subscriber_id, status, source=source, list_id=list_id, now=now))
            if create and list_id is not None and list_id not in changed:
                present = conn.execute(select(memberships.c.status).where(
                    memberships.c.subscriber_id == subscriber_id,
                    memberships.c.list_id == list_id)).first()
                if present is None:
                    conn.execute(insert(memberships).values(
                        list_id=list_id, subscriber_id=subscriber_id, status=status,
                        created_at=now, updated_at=now))
                    conn.execute(insert(membership_events).values(
                        list_id=list_id, subscriber_id=subscriber_id, old_status=None,
                        new_status=status, source=source, at=now))
                    changed[list_id] = None
        return changed

    def subscription(self, subscriber_id: int, list_id: int) \
            -> tuple[Subscriber, MailingList, MembershipStatus | None]:
        """A subscriber, a list and the subscriber's status on it, in one query."""
        with self.engine.connect() as conn:
            return _target(conn, subscriber_id, list_id)

    def leave(self, subscriber_id: int, list_id: int, *, source: str,
              status: MembershipStatus = MembershipStatus.UNSUBSCRIBED) \
            -> tuple[Subscriber, MailingList, MembershipStatus | None, bool]:
        """Take a subscriber off one list (one-click unsubscribe): one transaction, one read,
        three writes only when the status changes. Idempotent. Returns the subscriber, the
        list, the status now and whether it changed."""
        with self.engine.begin() as conn:
            sub, mlist, old = _target(conn, subscriber_id, list_id)
            if old is None or old == status:
                return sub, mlist, old, False
            _apply_status(conn, subscriber_id, list_id, old, status, source=source,
                          now=utcnow())
        return sub, mlist, status, True

    def get_subscriber(self, subscriber_id: int) -> Subscriber:
        with self.engine.connect() as conn:
            row = conn.execute(select(subscribers)
                               .where(subscribers.c.id == subscriber_id)).first()
        if row is None:
            raise NotFoundError(f"no subscriber with id {subscriber_id}")
        return _subscriber(row)

    def find_subscriber(self, email: str) -> Subscriber | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(subscribers)
                               .where(subscribers.c.email_key == email.lower())).first()
        return None if row is None else _subscriber(row)

    def add_subscriber(self, email: str, *, name: str = "",
                       attributes: dict[str, Any] | None = None) -> Subscriber:
        """The subscriber with this address, created if new (name and attributes then set)."""
        existing = self.find_subscriber(email)
        if existing is not None:
            return existing
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(subscribers).values(
                    email=email, email_key=email.lower(), name=check_header_text(name, "name"),
                    attributes=attributes or {}, created_at=utcnow()))
        except IntegrityError:
            pass  # created meanwhile by another request: use that one
        found = self.find_subscriber(email)
        assert found is not None
        return found

    def status_on(self, subscriber_id: int, list_id: int) -> MembershipStatus | None:
        with self.engine.connect() as conn:
            status = conn.execute(select(memberships.c.status).where(
                memberships.c.subscriber_id == subscriber_id,
                memberships.c.list_id == list_id)).scalar()
        return None if status is None else MembershipStatus(status)

    def memberships_of(self, subscriber_id: int) -> list[tuple[MailingList, MembershipStatus]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(lists, memberships.c.status.label("membership_status"))
                .join(memberships, memberships.c.list_id == lists.c.id)
                .where(memberships.c.subscriber_id == subscriber_id)
                .order_by(lists.c.name)
            ).all()
        return [(_list(r), MembershipStatus(r.membership_status)) for r in rows]

    def history(self, subscriber_id: int) -> list[dict[str, Any]]:
        """Every status change of this subscriber, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(membership_events, lists.c.slug)
                .join(lists, lists.c.id == membership_events.c.list_id)
                .where(membership_events.c.subscriber_id == subscriber_id)
                .order_by(membership_events.c.id)
            ).all()
        return [{"list": r.slug, "from": r.old_status, "to": r.new_status, "source": r.source,
                 "at": r.at} for r in rows]

    def take_confirm_slot(self, subscriber_id: int, *, every: dt.timedelta) -> bool:
        """Reserve the right to mail a confirmation now: at most one per `every` per address.

        A conditional update, so two requests at once cannot both win.
        """
        now = utcnow()
        with self.engine.begin() as conn:
            return bool(conn.execute(update(subscribers).where(
                subscribers.c.id == subscriber_id,
                subscribers.c.confirm_sent_at.is_(None)
                | (subscribers.c.confirm_sent_at <= now - every),
            ).values(confirm_sent_at=now)).rowcount)

    def release_confirm_slot(self, subscriber_id: int) -> None:
        """The confirmation could not be sent: let the next request try again."""
        with self.engine.begin() as conn:
            conn.execute(update(subscribers).where(subscribers.c.id == subscriber_id)
                         .values(confirm_sent_at=None))

    # --- the web archive ---------------------------------------------------------------------

    def publish(self, campaign: Campaign, *, number: int | None, language: str,
                editions: Sequence[tuple[str, str, str]] = ()) -> None:
        """Put a campaign's issue in the archive of each of its lists (once per list and
        edition). `editions`: the other languages' (language, subject, issue_json)."""
        now = utcnow()
        all_editions = [(language, campaign.subject, campaign.issue_json), *editions]
        with self.engine.begin() as conn:
            have = set(conn.execute(select(archive.c.list_id, archive.c.language).where(
                archive.c.issue_key == campaign.issue_key,
                archive.c.list_id.in_(campaign.list_ids))).all())
            rows = [{"list_id": lid, "campaign_id": campaign.id, "issue_key": campaign.issue_key,
                     "number": number, "subject": subject, "language": lang,
                     "issue_json": issue_json, "published_at": now}
                    for lid in campaign.list_ids for lang, subject, issue_json in all_editions
                    if (lid, lang) not in have]
            if rows:
                conn.execute(insert(archive), rows)

    def archive_entries(self, list_id: int, *, limit: int = 500,
                        language: str | None = None) -> list[ArchiveEntry]:
        """A list's archive, newest first: one entry per issue, in `language` where that
        edition exists, else its first edition."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(archive).where(archive.c.list_id == list_id)
                                .order_by(archive.c.published_at.desc(), archive.c.id.desc())
                                .limit(limit * 4)).all()
        chosen: dict[str, Row[Any]] = {}
        for r in rows:
            best = chosen.get(r.issue_key)
            if best is None or r.language == language or (
                    best.language != language and r.id < best.id):
                chosen[r.issue_key] = r
        ordered = sorted(chosen.values(), key=lambda r: (r.published_at, r.id), reverse=True)
        return [_archive_entry(r) for r in ordered[:limit]]

    def archive_editions(self, list_id: int, issue_key: str) -> list[ArchiveEntry]:
        """Every edition of one issue in a list's archive, first published first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(archive).where(
                archive.c.list_id == list_id, archive.c.issue_key == issue_key)
                .order_by(archive.c.id)).all()
        return [_archive_entry(r) for r in rows]

    def archive_entry(self, list_id: int, path: str, *, count_view: bool = False,
                      language: str | None = None) \
            -> tuple[ArchiveEntry, ArchiveEntry | None, ArchiveEntry | None]:
        """The entry at an archive path (number or key), in `language` if that edition
        exists (else the first edition), with the previous and next issues."""
        with self.engine.begin() as conn:
            found: list[Row[Any]] = []
            if path.isdigit() and len(path) < 10:
                newest = conn.execute(select(archive.c.issue_key).where(
                    archive.c.list_id == list_id, archive.c.number == int(path),
                ).order_by(archive.c.id.desc()).limit(1)).scalar()
                if newest is not None:
                    found = list(conn.execute(select(archive).where(
                        archive.c.list_id == list_id, archive.c.issue_key == newest)
                        .order_by(archive.c.id)).all())
            if not found:  # not a number, or an issue whose key is all digits
                found = list(conn.execute(select(archive).where(
                    archive.c.list_id == list_id, archive.c.issue_key == path)
                    .order_by(archive.c.id)).all())
            if not found:
                raise NotFoundError(f"no issue {path!r} in this archive")
            row = next((r for r in found if r.language == language), found[0])
            if count_view:
                conn.execute(update(archive).where(archive.c.id == row.id)
                             .values(views=archive.c.views + 1))
            # Neighbours are other issues, not other editions of this one.
            first, last = found[0], found[-1]
            order = (archive.c.published_at, archive.c.id)
            older = conn.execute(select(archive).where(
                archive.c.list_id == list_id, archive.c.issue_key != row.issue_key,
                (archive.c.published_at < first.published_at)
                | ((archive.c.published_at == first.published_at) & (archive.c.id < first.id)),
            ).order_by(order[0].desc(), order[1].desc()).limit(1)).first()
            newer = conn.execute(select(archive).where(
                archive.c.list_id == list_id, archive.c.issue_key != row.issue_key,
                (archive.c.published_at > last.published_at)
                | ((archive.c.published_at == last.published_at) & (archive.c.id > last.id)),
            ).order_by(*order).limit(1)).first()
        entry = _archive_entry(row)
        if count_view:
            entry = dataclasses.replace(entry, views=entry.views + 1)
        return (entry, _archive_entry(older) if older else None,
                _archive_entry(newer) if newer else None)

    # --- campaigns ---------------------------------------------------------------------------

    def create_campaign(self, *, issue_key: str, content_hash: str, subject: str,
                        issue_json: str, html: str, text: str, list_ids: Sequence[int],
                        resend: bool = False, segment_filter: str | None = None,
                        segment_names: str | None = None,
                        editions: Sequence[dict[str, str]] = ()) -> Campaign:
        """A draft campaign; `editions` are the other languages' rendered editions
        (language, subject, issue_json, html, text)."""
        with self.engine.begin() as conn:
            key = conn.execute(insert(campaigns).values(
                issue_key=issue_key, content_hash=content_hash, subject=subject,
                issue_json=issue_json, html=html, text=text, status=CampaignStatus.DRAFT,
                created_at=utcnow(), resend=resend, segment_filter=segment_filter,
                segment_names=segment_names,
            )).inserted_primary_key
            assert key is not None
            cid = int(key[0])
            conn.execute(insert(campaign_lists),
                         [{"campaign_id": cid, "list_id": lid} for lid in list_ids])
            if editions:
                conn.execute(insert(campaign_editions),
                             [{"campaign_id": cid, **e} for e in editions])
        return self.get_campaign(cid)

    def campaign_editions(self, campaign_id: int) -> dict[str, dict[str, str]]:
        """The other-language editions of a campaign: language -> subject, issue_json,
        html, text."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(campaign_editions).where(
                campaign_editions.c.campaign_id == campaign_id)).all()
        return {r.language: {"subject": r.subject, "issue_json": r.issue_json,
                             "html": r.html, "text": r.text} for r in rows}

    def campaigns_due(self, *, stale_after: float = 90.0) -> list[int]:
        """Campaigns nobody is sending whose retries are due now: what the scheduler picks
        up, so temporary failures are retried without anyone running a command. Queued rows
        are left alone: an interrupted send (Ctrl-C) waits for a person, and a local-time
        campaign's held rows have their own scheduled job."""
        now = utcnow()
        due_rows = select(deliveries.c.id).where(
            deliveries.c.campaign_id == campaigns.c.id,
            deliveries.c.status == DeliveryStatus.FAILED_TEMP,
            deliveries.c.next_attempt_at <= now,
        )
        with self.engine.connect() as conn:
            return [int(i) for i in conn.execute(select(campaigns.c.id).where(
                campaigns.c.status == CampaignStatus.RUNNING,
                campaigns.c.runner.is_(None)
                | (campaigns.c.heartbeat_at < now - dt.timedelta(seconds=stale_after)),
                due_rows.exists(),
            ).order_by(campaigns.c.id)).scalars()]

    def release_by_zone(self, campaign_id: int, wall: dt.datetime, fallback_tz: str,
                        zone_of: Callable[[str], Any]) -> dict[dt.datetime, int]:
        """Local-time delivery: fix the campaign's audience (if not yet) and hold each row
        until `wall` (a naive wall-clock time) in the subscriber's zone: the `tz` attribute,
        else its list's zone, else fallback_tz. Returns {release time (UTC): rows}.
        Idempotent."""
        now = utcnow()
        releases: dict[dt.datetime, list[int]] = {}
        zones: dict[str, dt.datetime] = {}
        with self.engine.begin() as conn:
            row = conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).one()
            if row.started_at is None:
                _enqueue_audience(conn, row, now)
                conn.execute(update(campaigns).where(campaigns.c.id == campaign_id)
                             .values(started_at=now))
            rows = conn.execute(
                select(deliveries.c.id, subscribers.c.attributes, lists.c.zone)
                .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                .join(lists, lists.c.id == deliveries.c.list_id)
                .where(deliveries.c.campaign_id == campaign_id,
                       deliveries.c.status == DeliveryStatus.QUEUED,
                       deliveries.c.next_attempt_at.is_(None))).all()
            for delivery_id, attrs, list_zone in rows:
                name = str((attrs or {}).get("tz") or list_zone or fallback_tz)
                if name not in zones:
                    try:
                        zones[name] = wall.replace(tzinfo=zone_of(name)).astimezone(dt.UTC)
                    except Exception:  # an unknown zone in an attribute: the fallback's time
                        zones[name] = wall.replace(tzinfo=zone_of(fallback_tz)) \
                            .astimezone(dt.UTC)
                releases.setdefault(zones[name], []).append(delivery_id)
            for release, ids in releases.items():
                if release <= now:
                    continue  # that zone's time has come: due now
                for start in range(0, len(ids), 500):
                    conn.execute(update(deliveries).where(
                        deliveries.c.id.in_(ids[start:start + 500]))
                        .values(next_attempt_at=release))
        return {t: len(ids) for t, ids in releases.items()}

    def next_release_at(self, campaign_id: int) -> dt.datetime | None:
        """When the next held (queued) rows of a local-time campaign are released."""
        with self.engine.connect() as conn:
            value = conn.execute(select(func.min(deliveries.c.next_attempt_at)).where(
                deliveries.c.campaign_id == campaign_id,
                deliveries.c.status == DeliveryStatus.QUEUED)).scalar()
        return value

    def update_campaign_content(self, campaign_id: int, *, issue_key: str, content_hash: str,
                                subject: str, issue_json: str, html: str, text: str,
                                editions: Sequence[dict[str, str]] = ()) -> None:
        """Replace a campaign's rendered issue and editions, only while nothing has been
        sent."""
        with self.engine.begin() as conn:
            changed = conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id, campaigns.c.started_at.is_(None),
            ).values(issue_key=issue_key, content_hash=content_hash, subject=subject,
                     issue_json=issue_json, html=html, text=text)).rowcount
            if not changed:
                raise ConflictError(f"campaign {campaign_id} has started; its issue is fixed")
            conn.execute(delete(campaign_editions).where(
                campaign_editions.c.campaign_id == campaign_id))
            if editions:
                conn.execute(insert(campaign_editions),
                             [{"campaign_id": campaign_id, **e} for e in editions])

    def get_campaign(self, campaign_id: int) -> Campaign:
        with self.engine.connect() as conn:
            row = conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).first()
            if row is None:
                raise NotFoundError(f"no campaign {campaign_id}")
            return _campaign(row, _campaign_list_ids(conn, campaign_id))

    def find_campaigns(self, issue_key: str) -> list[Campaign]:
        """Campaigns of the same issue, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(campaigns).where(campaigns.c.issue_key == issue_key)
                                .order_by(campaigns.c.id.desc())).all()
            return [_campaign(r, _campaign_list_ids(conn, r.id)) for r in rows]

    # --- the ledger (DeliveryStore) ----------------------------------------------------------

    def claim_campaign(self, campaign_id: int, *, runner: str, lease: float,
                       retry_now: bool = False) -> RunStart:
        now = utcnow()
        stale = now - dt.timedelta(seconds=lease)
        with self.engine.begin() as conn:
            row = conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).first()
            if row is None:
                raise NotFoundError(f"no campaign {campaign_id}")
            if row.status == CampaignStatus.CANCELLED:
                raise ConflictError(f"campaign {campaign_id} was cancelled")
            if row.status == CampaignStatus.PAUSED:
                raise ConflictError(f"campaign {campaign_id} is paused"
                                    + (f" ({row.status_note})" if row.status_note else "")
                                    + f"; resume it with: newsletter campaigns resume "
                                    f"{campaign_id}")
            # Conditional update: of two processes starting at once, exactly one wins.
            claimed = conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id,
                (campaigns.c.runner.is_(None)) | (campaigns.c.heartbeat_at < stale),
            ).values(status=CampaignStatus.RUNNING, runner=runner, heartbeat_at=now,
                     started_at=func.coalesce(campaigns.c.started_at, now), finished_at=None,
                     last_error=None, status_note=None)).rowcount
            if not claimed:
                raise ConflictError(
                    f"campaign {campaign_id} is being sent by {row.runner} (alive at "
                    f"{row.heartbeat_at:%H:%M:%S} UTC); wait for it or stop that process")
            enqueued = 0
            if row.started_at is None:
                enqueued = _enqueue_audience(conn, row, now)
            # A run that died left rows in 'sending': the relay may have taken them. (Rows
            # a worker is sending are its own; its lease decides about them.)
            unknown = conn.execute(update(deliveries).where(
                deliveries.c.campaign_id == campaign_id,
                deliveries.c.status == DeliveryStatus.SENDING, deliveries.c.worker_id.is_(None),
            ).values(status=DeliveryStatus.UNKNOWN, updated_at=now,
                     last_error="outcome unknown: the sending process stopped")).rowcount
            retrying = _retries(conn, campaign_id, now, due_now=retry_now)
        return RunStart(enqueued=enqueued, became_unknown=unknown, retrying=retrying)

    def due_batch(self, campaign_id: int, *, after_id: int, limit: int,
                  retries: bool = False) -> Batch:
        # Keyset pagination on the ledger's (campaign_id, status, id) index: constant cost per
        # batch however far into the list we are. Rows a worker holds are its own.
        now = utcnow()
        query = (claims.ledger_rows()
                 .where(deliveries.c.campaign_id == campaign_id, deliveries.c.id > after_id,
                        claims.claimable(now)[1 if retries else 0])
                 .order_by(deliveries.c.id).limit(limit))
        with self.engine.begin() as conn:
            rows = conn.execute(query).all()
            due, skipped = claims.take_due(conn, rows, now)
        return Batch(due, skipped, rows[-1].id if rows else 0)

    def begin(self, marks: Sequence[Mark], *,
              usage: Sequence[tuple[str, int, int]] = (), bounce_threshold: int = 1,
              worker: int | None = None) -> set[int]:
        now = utcnow()
        outcomes = [{"id": m.delivery_id, "status": str(m.status), "error": m.error, "now": now,
                     "retry_at": m.retry_at}
                    for m in marks if m.status != DeliveryStatus.SENDING]
        sending = {m.delivery_id: m.relay for m in marks if m.status == DeliveryStatus.SENDING}
        wanted = set(sending)
        if self._writer is None:
            self._writer = self.engine.connect()
        conn = self._writer
        with conn.begin():
            if outcomes:
                conn.execute(_MARK_OUTCOME, outcomes)
            for m in marks:
                if m.bounce:  # rare: a 5xx that says the address itself is bad
                    _bounce_delivery(conn, m.delivery_id, hard=True, reason=m.error or "",
                                     threshold=bounce_threshold, now=now)
            if usage:
                conn.execute(_ADD_USAGE, [{"relay": r, "second": sec, "count": n}
                                          for r, sec, n in usage])
            if not wanted:
                return set()
            if worker is None:
                moved = conn.execute(_MARK_SENDING, [{"id": i, "now": now, "relay": sending[i]}
                                                     for i in wanted]).rowcount
            else:
                moved = conn.execute(_MARK_SENDING_CLAIMED, [
                    {"id": i, "now": now, "relay": sending[i], "worker": worker}
                    for i in wanted]).rowcount
            if moved == len(wanted):
                return wanted
            # Rare: someone unsubscribed between the batch read and now. Find who is left.
            return set(conn.execute(select(deliveries.c.id).where(
                deliveries.c.id.in_(wanted), deliveries.c.status == DeliveryStatus.SENDING,
            )).scalars())

    def heartbeat(self, campaign_id: int, *, runner: str, note: str | None = None) \
            -> CampaignStatus:
        with self.engine.begin() as conn:
            conn.execute(update(campaigns).where(campaigns.c.id == campaign_id,
                                                 campaigns.c.runner == runner)
                         .values(heartbeat_at=utcnow(), status_note=note))
        return self.campaign_status(campaign_id)

    def campaign_status(self, campaign_id: int) -> CampaignStatus:
        with self.engine.connect() as conn:
            return CampaignStatus(conn.execute(select(campaigns.c.status)
                                               .where(campaigns.c.id == campaign_id))
                                  .scalar_one())

    def next_retry_at(self, campaign_id: int) -> dt.datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(func.min(deliveries.c.next_attempt_at)).where(
                deliveries.c.campaign_id == campaign_id,
                deliveries.c.status == DeliveryStatus.FAILED_TEMP)).scalar()
        return value

    def relay_usage(self, since: int) -> dict[str, list[tuple[int, int]]]:
        with self.engine.begin() as conn:
            # Usage older than a day no longer counts against any window.
            conn.execute(relay_usage.delete().where(relay_usage.c.second < since - 86_400))
            rows = conn.execute(select(relay_usage.c.relay, relay_usage.c.second,
                                       relay_usage.c.count)
                                .where(relay_usage.c.second >= since)
                                .order_by(relay_usage.c.second)).all()
        found: dict[str, list[tuple[int, int]]] = {}
        for relay, second, count in rows:
            found.setdefault(relay, []).append((int(second), int(count)))
        return found

    def finish_run(self, campaign_id: int, *, runner: str, error: str | None = None,
                   pause: bool = False) -> CampaignStatus:
        self.close()
        now = utcnow()
        with self.engine.begin() as conn:
            current = conn.execute(select(campaigns.c.status, campaigns.c.status_note)
                                   .where(campaigns.c.id == campaign_id)).one()
            pending = conn.execute(select(func.count()).select_from(deliveries).where(
                deliveries.c.campaign_id == campaign_id, deliveries.c.status.in_(_UNFINISHED),
            )).scalar_one()
            values: dict[str, Any] = {"runner": None, "heartbeat_at": None, "last_error": error}
            if current.status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED):
                status = CampaignStatus(current.status)  # another process decided
            elif pause:
                status = CampaignStatus.PAUSED
                values["status_note"] = error
            elif pending:
                status = CampaignStatus.RUNNING  # waiting for retries, or stopped early
            else:
                status = CampaignStatus.COMPLETED
                values.update(finished_at=now, status_note=None)
            values["status"] = status
            conn.execute(update(campaigns).where(campaigns.c.id == campaign_id,
                                                 campaigns.c.runner == runner).values(**values))
        return status

    # --- shared delivery: workers (store.claims) ---------------------------------------------

    def start_campaign(self, campaign_id: int, *, retry_now: bool = False,
                       stale_after: float = 90.0) -> RunStart:
        """Hand a campaign to the workers: fix its audience in the ledger (first time only)
        and mark it running with no single process holding it."""
        now = utcnow()
        with self.engine.begin() as conn:
            row = conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).first()
            if row is None:
                raise NotFoundError(f"no campaign {campaign_id}")
            if row.status in (CampaignStatus.CANCELLED, CampaignStatus.PAUSED):
                raise ConflictError(f"campaign {campaign_id} is {row.status}")
            started = conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id,
                campaigns.c.runner.is_(None)
                | (campaigns.c.heartbeat_at < now - dt.timedelta(seconds=stale_after)),
            ).values(status=CampaignStatus.RUNNING, runner=None, heartbeat_at=None,
                     started_at=func.coalesce(campaigns.c.started_at, now), finished_at=None,
                     last_error=None, status_note=None)).rowcount
            if not started:
                raise ConflictError(f"campaign {campaign_id} is being sent by {row.runner}")
            enqueued = _enqueue_audience(conn, row, now) if row.started_at is None else 0
            retrying = _retries(conn, campaign_id, now, due_now=retry_now)
        return RunStart(enqueued=enqueued, became_unknown=0, retrying=retrying)

    def register_worker(self, name: str, *, lease: float) -> int:
        return claims.register(self.engine, name, lease=lease)

    def renew_worker(self, worker_id: int, *, lease: float, campaign_id: int | None = None) \
            -> bool:
        return claims.renew(self.engine, worker_id, lease=lease, campaign_id=campaign_id)

    def retire_worker(self, worker_id: int) -> claims.Reaped:
        return claims.retire(self.engine, worker_id)

    def reset_worker(self, worker_id: int) -> claims.Reaped:
        return claims.reset(self.engine, worker_id)

    def reap_workers(self) -> list[claims.Reaped]:
        return claims.reap(self.engine)

    def live_workers(self) -> list[claims.WorkerInfo]:
        return claims.live(self.engine)

    def campaigns_with_work(self) -> list[int]:
        return claims.campaigns_with_work(self.engine)

    def join_campaign(self, campaign_id: int) -> RunStart:
        return claims.join(self.engine, campaign_id)

    def claim_batch(self, campaign_id: int, *, worker: int, limit: int,
                    after_id: int = 0) -> Batch:
        return claims.claim(self.engine, campaign_id, worker, limit=limit, after_id=after_id)

    def release_claims(self, campaign_id: int, *, worker: int) -> int:
        return claims.release_claims(self.engine, worker, campaign_id)

    def finish_shared(self, campaign_id: int, *, pause: str | None = None) -> CampaignStatus:
        self.close()
        return claims.finish(self.engine, campaign_id, pause=pause)

    def reserve_relay(self, relay: str, want: int, windows: Sequence[tuple[int, float]], *,
                      second: int) -> tuple[int, int]:
        return claims.reserve(self.engine, relay, want, windows, second=second)

    # --- campaign control (from any process) -------------------------------------------------

    def all_campaigns(self, limit: int = 50) -> list[Campaign]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(campaigns).order_by(campaigns.c.id.desc())
                                .limit(limit)).all()
            return [_campaign(r, _campaign_list_ids(conn, r.id)) for r in rows]

    def pause_campaign(self, campaign_id: int, *, reason: str = "paused by an editor") -> bool:
        """Ask a campaign to pause: a running send stops within a second; True if changed."""
        self.get_campaign(campaign_id)
        with self.engine.begin() as conn:
            return bool(conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id,
                campaigns.c.status.in_([CampaignStatus.RUNNING, CampaignStatus.SCHEDULED,
                                        CampaignStatus.DRAFT]),
            ).values(status=CampaignStatus.PAUSED, status_note=reason)).rowcount)

    def cancel_campaign(self, campaign_id: int) -> bool:
        """Stop a campaign for good; its unsent rows are never sent. True if changed."""
        self.get_campaign(campaign_id)
        with self.engine.begin() as conn:
            return bool(conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id,
                campaigns.c.status.notin_([CampaignStatus.CANCELLED, CampaignStatus.COMPLETED]),
            ).values(status=CampaignStatus.CANCELLED, status_note="cancelled",
                     finished_at=utcnow())).rowcount)

    def unpause_campaign(self, campaign_id: int, *,
                         to: CampaignStatus = CampaignStatus.RUNNING) -> None:
        """Make a paused campaign runnable again: 'running' (the caller then runs it) or
        'scheduled' (its schedule will)."""
        c = self.get_campaign(campaign_id)
        if c.status == CampaignStatus.CANCELLED:
            raise ConflictError(f"campaign {campaign_id} was cancelled and cannot be resumed")
        with self.engine.begin() as conn:
            conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id, campaigns.c.status == CampaignStatus.PAUSED,
            ).values(status=to, status_note=None))

    def requeue(self, campaign_id: int, statuses: Sequence[DeliveryStatus]) -> int:
        """Make rows in these statuses due again (retry --failed / --unknown)."""
        c = self.get_campaign(campaign_id)
        if c.status == CampaignStatus.CANCELLED:
            raise ConflictError(f"campaign {campaign_id} was cancelled")
        now = utcnow()
        with self.engine.begin() as conn:
            n = conn.execute(update(deliveries).where(
                deliveries.c.campaign_id == campaign_id, deliveries.c.status.in_(list(statuses)),
            ).values(status=DeliveryStatus.QUEUED, next_attempt_at=None, first_attempt_at=None,
                     updated_at=now)).rowcount
            if n and c.status == CampaignStatus.COMPLETED:
                conn.execute(update(campaigns).where(campaigns.c.id == campaign_id)
                             .values(status=CampaignStatus.RUNNING, finished_at=None))
        return int(n)

    def recent_rate(self, campaign_id: int, seconds: int = 60) -> float:
        """Messages finished per second over the last `seconds`, from the ledger."""
        since = utcnow() - dt.timedelta(seconds=seconds)
        with self.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(deliveries).where(
                deliveries.c.campaign_id == campaign_id,
                deliveries.c.status == DeliveryStatus.SENT,
                deliveries.c.updated_at >= since)).scalar_one()
        return float(n) / seconds

    # --- bounces and suppression -------------------------------------------------------------

    def record_bounce(self, *, delivery_id: int | None = None,
                      subscriber_id: int | None = None, list_id: int | None = None,
                      hard: bool, reason: str, threshold: int = 1) -> bool:
        """A bounce that arrived later (DSN): by ledger row, or by subscriber (and list).
        Hard: that membership becomes 'bounced' and, at `threshold` hard bounces, the address
        is suppressed on every list. Soft: counted only. False if nothing matched."""
        now = utcnow()
        with self.engine.begin() as conn:
            if delivery_id is not None:
                return _bounce_delivery(conn, delivery_id, hard=hard, reason=reason,
                                        threshold=threshold, now=now, mark_row=True)
            if subscriber_id is None:
                return False
            return _bounce_subscriber(conn, subscriber_id, list_id, hard=hard, reason=reason,
                                      threshold=threshold, now=now)

    def find_delivery(self, campaign_id: int, subscriber_id: int) -> tuple[int, str] | None:
        """(delivery id, address) of one campaign's row for one subscriber."""
        with self.engine.connect() as conn:
            row = conn.execute(select(deliveries.c.id, subscribers.c.email)
                               .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                               .where(deliveries.c.campaign_id == campaign_id,
                                      deliveries.c.subscriber_id == subscriber_id)).first()
        return None if row is None else (int(row.id), str(row.email))

    def suppress(self, email: str, *, reason: str, note: str = "") -> bool:
        """Never send to this address again on any list; queued rows are skipped now."""
        now = utcnow()
        with self.engine.begin() as conn:
            return _suppress(conn, email.lower(), reason=reason, note=note, now=now)

    def suppression_of(self, email: str) -> suppression.Suppression | None:
        """The entry suppressing this address (by address, domain or erased hash)."""
        with self.engine.begin() as conn:
            return suppression.find(conn, email)

    def lift_unsubscribed(self, email: str) -> None:
        with self.engine.begin() as conn:
            suppression.lift_unsubscribed(conn, email)

    def is_suppressed(self, email: str) -> bool:
        """Suppressed by address, by domain or as an erased address."""
        with self.engine.begin() as conn:
            return suppression.find(conn, email) is not None

    def bounce_counts(self, subscriber_id: int) -> tuple[int, int]:
        with self.engine.connect() as conn:
            r = conn.execute(select(subscribers.c.hard_bounces, subscribers.c.soft_bounces)
                             .where(subscribers.c.id == subscriber_id)).one()
        return int(r.hard_bounces), int(r.soft_bounces)

    def delivery_counts(self, campaign_id: int) -> DeliveryCounts:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(deliveries.c.status, func.count())
                .where(deliveries.c.campaign_id == campaign_id)
                .group_by(deliveries.c.status)
            ).all()
        return DeliveryCounts({DeliveryStatus(s): n for s, n in rows})

    def deliveries_of(self, campaign_id: int, status: DeliveryStatus) -> list[tuple[str, str]]:
        """(email, last_error) of a campaign's rows in one status, for reports."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(subscribers.c.email, deliveries.c.last_error)
                .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                .where(deliveries.c.campaign_id == campaign_id, deliveries.c.status == status)
                .order_by(deliveries.c.id)
            ).all()
        return [(r.email, r.last_error or "") for r in rows]


def _retries(conn: Connection, campaign_id: int, now: dt.datetime, *, due_now: bool) -> int:
    """How many of a campaign's rows failed temporarily; with due_now (someone asked for
    this run) they are all made due at once rather than at their backoff time."""
    temp = [deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.FAILED_TEMP]
    if due_now:
        return int(conn.execute(update(deliveries).where(*temp)
                                .values(next_attempt_at=now)).rowcount)
    return int(conn.execute(select(func.count()).select_from(deliveries)
                            .where(*temp)).scalar_one())


def _enqueue_audience(conn: Connection, row: Row[Any], now: dt.datetime) -> int:
    """A campaign's first run: fix its audience now, in one INSERT ... SELECT, and give
    each row its edition when the campaign has several."""
    audience = _audience(_campaign_list_ids(conn, row.id),
                         issue_key=None if row.resend else row.issue_key,
                         exclude_campaign=row.id, segment_filter=row.segment_filter)
    n = int(conn.execute(insert(deliveries).from_select(
        ["subscriber_id", "list_id", "campaign_id", "status", "attempts", "updated_at"],
        audience.add_columns(literal(row.id), literal(DeliveryStatus.QUEUED.value),
                             literal(0), literal(now, TZ)),
    )).rowcount)
    languages = list(conn.execute(select(campaign_editions.c.language).where(
        campaign_editions.c.campaign_id == row.id)).scalars())
    if languages:
        _assign_editions(conn, row.id, languages)
    return n


def _assign_editions(conn: Connection, campaign_id: int, languages: list[str]) -> None:
    """Each recipient's edition: its own `lang` attribute (zh-CN counts as zh) if the
    campaign has that edition, else its list's language if it has that one; the rest keep
    None, the main edition. Set-based: a few UPDATEs, whatever the audience size."""
    lang = func.lower(subscribers.c.attributes["lang"].as_string())
    mine = deliveries.c.campaign_id == campaign_id
    for code in languages:
        conn.execute(update(deliveries).where(
            mine, deliveries.c.edition.is_(None),
            deliveries.c.subscriber_id.in_(select(subscribers.c.id).where(
                (lang == code) | lang.startswith(code + "-")))).values(edition=code))
    for code in languages:
        conn.execute(update(deliveries).where(
            mine, deliveries.c.edition.is_(None),
            deliveries.c.list_id.in_(select(lists.c.id).where(
                func.lower(lists.c.language) == code))).values(edition=code))


def _bounce_delivery(conn: Connection, delivery_id: int, *, hard: bool, reason: str,
                     threshold: int, now: dt.datetime, mark_row: bool = False) -> bool:
    row = conn.execute(select(deliveries.c.subscriber_id, deliveries.c.list_id,
                              deliveries.c.status, deliveries.c.last_error)
                       .where(deliveries.c.id == delivery_id)).first()
    if row is None:
        return False
    if mark_row and hard and row.status == DeliveryStatus.FAILED_PERM and \
            (row.last_error or "").startswith("bounced: "):
        return True  # the same bounce again (an MTA retried, or a rescan): counted once
    if mark_row and hard:
        # It was accepted by the relay ('sent'), then bounced: the ledger says so now.
        conn.execute(update(deliveries).where(deliveries.c.id == delivery_id).values(
            status=DeliveryStatus.FAILED_PERM, last_error=("bounced: " + reason)[:500],
            updated_at=now))
    return _bounce_subscriber(conn, row.subscriber_id, row.list_id, hard=hard, reason=reason,
                              threshold=threshold, now=now)


def _bounce_subscriber(conn: Connection, sid: int, lid: int | None, *, hard: bool, reason: str,
                       threshold: int, now: dt.datetime) -> bool:
    counter = subscribers.c.hard_bounces if hard else subscribers.c.soft_bounces
    if not conn.execute(update(subscribers).where(subscribers.c.id == sid)
                        .values({counter: counter + 1})).rowcount:
        return False
    if not hard:
        return True
    _change_status(conn, sid, MembershipStatus.BOUNCED, source="bounce", list_id=lid, now=now)
    bounces, email_key = conn.execute(select(subscribers.c.hard_bounces,
                                             subscribers.c.email_key)
                                      .where(subscribers.c.id == sid)).one()
    if bounces >= threshold:
        _suppress(conn, email_key, reason="hard-bounce", note=reason[:500], now=now)
    return True


def _suppress(conn: Connection, email_key: str, *, reason: str, note: str,
              now: dt.datetime) -> bool:
    return suppression.add(conn, email_key, kind=SuppressionKind.ADDRESS, reason=reason,
                           note=note, now=now)


def _target(conn: Connection, sid: int, lid: int) \
        -> tuple[Subscriber, MailingList, MembershipStatus | None]:
    r = conn.execute(_TARGET, {"sid": sid, "lid": lid}).first()
    if r is None:
        raise NotFoundError(f"no subscriber {sid} or no list {lid}")
    sub = Subscriber(r.s_id, r.email, r.s_name, r.attributes or {}, r.s_created)
    mlist = MailingList(r.l_id, r.slug, r.l_name, r.description, r.l_created,
                        double_opt_in=bool(r.double_opt_in), public=bool(r.public),
                        language=r.language, welcome=bool(r.welcome), zone=r.zone)
    return sub, mlist, None if r.status is None else MembershipStatus(r.status)


def _change_status(conn: Connection, sid: int, status: MembershipStatus, *, source: str,
                   list_id: int | None, now: dt.datetime) -> list[tuple[int, str]]:
    """Move a subscriber's memberships to status; returns (list_id, old status) changed."""
    cond = [memberships.c.subscriber_id == sid, memberships.c.status != status]
    if list_id is not None:
        cond.append(memberships.c.list_id == list_id)
    rows = conn.execute(select(memberships.c.list_id, memberships.c.status).where(*cond)).all()
    for r in rows:
        _apply_status(conn, sid, r.list_id, r.status, status, source=source, now=now)
    return [(r.list_id, r.status) for r in rows]


def _apply_status(conn: Connection, sid: int, lid: int, old: str, status: MembershipStatus, *,
                  source: str, now: dt.datetime) -> None:
    """One membership's change: the row, its history event and, when leaving 'active',
    the address's queued ledger rows for that list skipped, so a running send honours it
    for every message not yet handed to a relay. Prebuilt statements: the one-click
    unsubscribe runs this hundreds of times a second."""
    params = {"sid": sid, "lid": lid, "status": str(status), "now": now, "old": str(old),
              "source": source}
    conn.execute(_SET_STATUS, params)
    conn.execute(_EVENT, params)
    if status != MembershipStatus.ACTIVE:
        conn.execute(_SKIP_QUEUED, params)


def _audience(list_ids: Sequence[int], *, issue_key: str | None,
              exclude_campaign: int | None, segment_filter: str | None = None) -> Select[Any]:
    """(subscriber_id, list_id) of everyone a campaign to these lists is for.

    Someone on several of the lists appears once, through the list with the lowest id. A
    segment filter narrows it to the memberships that match, so a segment send's rows still
    name the real list each recipient is on (and its unsubscribe link leaves that list). With
    an issue_key, anyone another campaign of the same issue already sent to or still owes
    (any status but 'skipped') is left out, so sending an issue to lists that overlap an
    earlier send never gives anyone a second copy.
    """
    query = (
        select(memberships.c.subscriber_id, func.min(memberships.c.list_id).label("list_id"))
        .where(memberships.c.list_id.in_(list(list_ids)),
               memberships.c.status == MembershipStatus.ACTIVE)
        .group_by(memberships.c.subscriber_id)
    )
    # Suppressed addresses and domains are on no campaign's audience, whatever their
    # list status.
    query = query.join(subscribers, subscribers.c.id == memberships.c.subscriber_id) \
        .where(~suppressed_clause(subscribers.c.email_key))
    if segment_filter:
        from .. import segments  # the parser loads only for segment sends

        query = query.where(segments.compile_filter(segments.parse(segment_filter)))
    if issue_key is not None:
        # Rows that were (or may have been) handed to a relay count even in a cancelled
        # campaign; only its never-attempted rows do not.
        not_sent = [DeliveryStatus.SKIPPED, DeliveryStatus.QUEUED, DeliveryStatus.FAILED_TEMP,
                    DeliveryStatus.EXPIRED]
        earlier = (
            select(deliveries.c.id)
            .join(campaigns, campaigns.c.id == deliveries.c.campaign_id)
            .where(campaigns.c.issue_key == issue_key,
                   deliveries.c.subscriber_id == memberships.c.subscriber_id,
                   deliveries.c.status != DeliveryStatus.SKIPPED,
                   ~and_(campaigns.c.status == CampaignStatus.CANCELLED,
                         deliveries.c.status.in_(not_sent)))
        )
        if exclude_campaign is not None:
            earlier = earlier.where(campaigns.c.id != exclude_campaign)
        query = query.where(~earlier.exists())
    return query


def _campaign_list_ids(conn: Connection, campaign_id: int) -> tuple[int, ...]:
    return tuple(conn.execute(select(campaign_lists.c.list_id)
                              .where(campaign_lists.c.campaign_id == campaign_id)
                              .order_by(campaign_lists.c.list_id)).scalars())


def _list(row: Row[Any]) -> MailingList:
    return MailingList(row.id, row.slug, row.name, row.description, row.created_at,
                       double_opt_in=bool(row.double_opt_in), public=bool(row.public),
                       language=row.language, welcome=bool(row.welcome), zone=row.zone)


def _subscriber(row: Row[Any]) -> Subscriber:
    return Subscriber(row.id, row.email, row.name, row.attributes or {}, row.created_at)


def _archive_entry(row: Row[Any]) -> ArchiveEntry:
    return ArchiveEntry(row.id, row.list_id, row.issue_key, row.number, row.subject,
                        row.language, row.issue_json, row.published_at, row.views)


def _campaign(row: Row[Any], list_ids: tuple[int, ...]) -> Campaign:
    return Campaign(
        id=row.id, issue_key=row.issue_key, content_hash=row.content_hash, subject=row.subject,
        issue_json=row.issue_json, html=row.html, text=row.text,
        status=CampaignStatus(row.status), list_ids=list_ids, created_at=row.created_at,
        started_at=row.started_at, finished_at=row.finished_at, last_error=row.last_error,
        runner=row.runner, resend=bool(row.resend), status_note=row.status_note,
        segment_filter=row.segment_filter, segment_names=row.segment_names,
    )


def dump_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
