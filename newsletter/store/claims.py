"""Shared delivery: workers, their leases, row claims (FOR UPDATE SKIP LOCKED) and relay quotas.

Any number of `newsletter worker` processes share one database. Each registers a row in
`workers` and renews its lease. It claims due ledger rows in batches by writing its id into
`deliveries.worker_id`; on PostgreSQL the claim's SELECT takes `FOR UPDATE SKIP LOCKED`,
so two workers never wait on, or take, the same rows (SQLite has no row locks and needs
none: its one writer at a time does the same). A row goes to 'sending' only while it is
still claimed by the worker that sends it, which is what keeps a row whose worker lost its
lease from being sent twice.

When a lease runs out, the next worker to look releases the dead worker's claimed rows
to everyone and marks the rows it had handed to a relay 'unknown': the relay may have
taken them, so they are not sent again unless a person asks (campaigns retry --unknown).

Rate limits per relay are reserved here too, in the database: a worker takes a few
sending slots at a time under a lock on the relay's row, so the limits hold for all
workers together rather than for each.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    Select,
    and_,
    exists,
    func,
    or_,
    select,
    text,
    update,
)

from ..errors import ConflictError, NotFoundError
from ..render.message import Recipient
from .base import Batch, Due, RunStart
from .schema import (
    CampaignStatus,
    DeliveryStatus,
    MembershipStatus,
    campaigns,
    deliveries,
    memberships,
    relay_usage,
    subscribers,
    utcnow,
    workers,
)


@dataclass(frozen=True)
class WorkerInfo:
    """A registered worker, for display."""

    id: int
    name: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    expires_at: dt.datetime
    campaign_id: int | None


@dataclass(frozen=True)
class Reaped:
    """What releasing one dead worker's rows did."""

    worker: str
    released: int   # claimed, never handed to a relay: due again for everyone
    unknown: int    # handed to a relay with no outcome recorded: not sent again


# --- worker registry ------------------------------------------------------------------------

def register(engine: Engine, name: str, *, lease: float) -> int:
    now = utcnow()
    with engine.begin() as conn:
        return int(conn.execute(workers.insert().values(
            name=name[:200], started_at=now, heartbeat_at=now,
            expires_at=now + dt.timedelta(seconds=lease)).returning(workers.c.id)).scalar_one())


def renew(engine: Engine, worker_id: int, *, lease: float, campaign_id: int | None) -> bool:
    """Extend the lease; False if it was lost (another worker found it expired and released
    this worker's rows), in which case the worker must stop sending what it holds."""
    now = utcnow()
    with engine.begin() as conn:
        return bool(conn.execute(update(workers).where(workers.c.id == worker_id).values(
            heartbeat_at=now, expires_at=now + dt.timedelta(seconds=lease),
            campaign_id=campaign_id)).rowcount)


def retire(engine: Engine, worker_id: int) -> Reaped:
    """A worker stopping cleanly: its unsent claims go back, then its row goes."""
    with engine.begin() as conn:
        name = conn.execute(select(workers.c.name).where(workers.c.id == worker_id)).scalar()
        found = _release_rows(conn, worker_id, why="its worker stopped")
        conn.execute(workers.delete().where(workers.c.id == worker_id))
    return Reaped(name or f"worker {worker_id}", *found)


def reset(engine: Engine, worker_id: int) -> Reaped:
    """A live worker gives up what it holds (its run failed midway): claimed rows go back to
    everyone, rows it had handed to a relay become unknown."""
    with engine.begin() as conn:
        name = conn.execute(select(workers.c.name).where(workers.c.id == worker_id)).scalar()
        found = _release_rows(conn, worker_id, why="its worker's run failed")
    return Reaped(name or f"worker {worker_id}", *found)


def reap(engine: Engine) -> list[Reaped]:
    """Release the rows of every worker whose lease has run out. Safe from any number of
    workers at once: the conditional delete decides which one does each."""
    now = utcnow()
    done: list[Reaped] = []
    with engine.connect() as conn:
        dead = conn.execute(select(workers.c.id, workers.c.name)
                            .where(workers.c.expires_at < now)).all()
    for worker_id, name in dead:
        with engine.begin() as conn:
            # The delete first: it locks the worker's row, and only one reaper (and not a
            # worker renewing just in time) gets a row count of 1.
            gone = conn.execute(workers.delete().where(
                workers.c.id == worker_id, workers.c.expires_at < now)).rowcount
            if not gone:
                continue
            released, unknown = _release_rows(conn, worker_id,
                                              why=f"its worker {name} stopped (lease expired)")
        done.append(Reaped(name, released, unknown))
    return done


def _release_rows(conn: Connection, worker_id: int, *, why: str) -> tuple[int, int]:
    now = utcnow()
    mine = deliveries.c.worker_id == worker_id
    touched = list(conn.execute(select(deliveries.c.campaign_id).where(mine).distinct())
                   .scalars())
    unknown = conn.execute(update(deliveries).where(
        mine, deliveries.c.status == DeliveryStatus.SENDING,
    ).values(status=DeliveryStatus.UNKNOWN, worker_id=None, updated_at=now,
             last_error=f"outcome unknown: {why}")).rowcount
    released = conn.execute(update(deliveries).where(
        mine, deliveries.c.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.FAILED_TEMP]),
    ).values(worker_id=None)).rowcount
    # If those in-flight rows were a campaign's last unfinished ones, no worker is left to
    # see it done: complete it here.
    for campaign_id in touched:
        _complete_if_done(conn, campaign_id, now)
    return int(released), int(unknown)


def release_claims(engine: Engine, worker_id: int, campaign_id: int) -> int:
    """Hand back this worker's claimed, unsent rows of one campaign (a run ending early:
    paused, cancelled, stopping)."""
    with engine.begin() as conn:
        return int(conn.execute(update(deliveries).where(
            deliveries.c.campaign_id == campaign_id, deliveries.c.worker_id == worker_id,
            deliveries.c.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.FAILED_TEMP]),
        ).values(worker_id=None)).rowcount)


def live(engine: Engine) -> list[WorkerInfo]:
    with engine.connect() as conn:
        rows = conn.execute(select(workers).order_by(workers.c.id)).all()
    return [WorkerInfo(r.id, r.name, r.started_at, r.heartbeat_at, r.expires_at, r.campaign_id)
            for r in rows]


# --- campaigns for workers --------------------------------------------------------------

def claimable(now: dt.datetime) -> list[ColumnElement[bool]]:
    """The two kinds of due row no worker holds: [queued and released (a local-time
    campaign holds rows until their zone's time), failed temporarily and due again]. What
    a worker claims, and what a single-process run walks."""
    free = deliveries.c.worker_id.is_(None)
    return [
        and_(deliveries.c.status == DeliveryStatus.QUEUED, free,
             or_(deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= now)),
        and_(deliveries.c.status == DeliveryStatus.FAILED_TEMP, free,
             deliveries.c.next_attempt_at <= now),
    ]


def campaigns_with_work(engine: Engine) -> list[int]:
    """Running campaigns handed to workers (no single process holds them) with rows a
    worker could claim now, oldest first."""
    now = utcnow()
    kinds = [exists().where(deliveries.c.campaign_id == campaigns.c.id, kind)
             for kind in claimable(now)]
    with engine.connect() as conn:
        return [int(i) for i in conn.execute(select(campaigns.c.id).where(
            campaigns.c.status == CampaignStatus.RUNNING, campaigns.c.runner.is_(None),
            campaigns.c.started_at.is_not(None), or_(*kinds),
        ).order_by(campaigns.c.id)).scalars()]


def join(engine: Engine, campaign_id: int) -> RunStart:
    """A worker starts on a campaign: it must be running and held by no single process.
    Rows an earlier single-process run left in 'sending' (no worker id: that run was
    interrupted) become 'unknown', as that run's own next start would have made them."""
    now = utcnow()
    with engine.begin() as conn:
        row = conn.execute(select(campaigns.c.status, campaigns.c.runner, campaigns.c.started_at)
                           .where(campaigns.c.id == campaign_id)).first()
        if row is None:
            raise NotFoundError(f"no campaign {campaign_id}")
        if row.status != CampaignStatus.RUNNING or row.runner is not None \
                or row.started_at is None:
            raise ConflictError(f"campaign {campaign_id} is not waiting for workers "
                                f"({row.status}{', held by ' + row.runner if row.runner else ''})")
        unknown = conn.execute(update(deliveries).where(
            deliveries.c.campaign_id == campaign_id,
            deliveries.c.status == DeliveryStatus.SENDING, deliveries.c.worker_id.is_(None),
            # Re-checked in the statement: a single-process run claiming the campaign
            # meanwhile keeps its rows.
            select(campaigns.c.runner).where(campaigns.c.id == campaign_id)
            .scalar_subquery().is_(None),
        ).values(status=DeliveryStatus.UNKNOWN, updated_at=now,
                 last_error="outcome unknown: the sending process stopped")).rowcount
    return RunStart(enqueued=0, became_unknown=int(unknown), retrying=0)


def claim(engine: Engine, campaign_id: int, worker_id: int, *, limit: int,
          after_id: int = 0) -> Batch:
    """Claim up to `limit` due rows of a campaign for this worker, in id order, skipping rows
    another worker is claiming at this moment; rows whose subscriber left become 'skipped'.

    Queued rows are taken after `after_id`, the batch's `last_id` of the previous call:
    on PostgreSQL every row already sent leaves a dead entry at the front of the index's
    'queued' range until VACUUM, and a scan from the start would walk all of them, so each
    claim would cost more than the last. Retries are few and taken from the start."""
    now = utcnow()
    ids: list[int] = []
    cursor = after_id
    with engine.begin() as conn:
        queued, retries = claimable(now)
        for kind in (and_(queued, deliveries.c.id > after_id), retries):
            if len(ids) >= limit:
                break
            picked = (select(deliveries.c.id)
                      .where(deliveries.c.campaign_id == campaign_id, kind)
                      .order_by(deliveries.c.id).limit(limit - len(ids))
                      .with_for_update(skip_locked=True))
            got = conn.execute(update(deliveries).where(deliveries.c.id.in_(picked))
                               .values(worker_id=worker_id)
                               .returning(deliveries.c.id)).scalars().all()
            if kind is not retries and got:
                cursor = max(got)
            ids += got
        if not ids:
            return Batch([], 0, cursor)
        rows = conn.execute(ledger_rows().where(deliveries.c.id.in_(ids))
                            .order_by(deliveries.c.id)).all()
        due, skipped = take_due(conn, rows, now)
    return Batch(due, skipped, cursor)


def ledger_rows() -> Select[Any]:
    """Ledger rows with what their messages need: the address, the name, the edition, and
    the membership's status now (someone who left since the campaign started is skipped,
    not sent to)."""
    return (
        select(deliveries.c.id, deliveries.c.subscriber_id, deliveries.c.list_id,
               deliveries.c.attempts, deliveries.c.first_attempt_at, deliveries.c.edition,
               subscribers.c.email, subscribers.c.name, memberships.c.status)
        .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
        .outerjoin(memberships, and_(memberships.c.list_id == deliveries.c.list_id,
                                     memberships.c.subscriber_id == deliveries.c.subscriber_id))
    )


def take_due(conn: Connection, rows: Sequence[Row[Any]], now: dt.datetime) \
        -> tuple[list[Due], int]:
    """The rows (of ledger_rows) whose subscriber is still active on the list, as Due; the
    others become 'skipped' here, ending any claim on them. Returns (due, skipped)."""
    due: list[Due] = []
    gone: list[int] = []
    for r in rows:
        if r.status != MembershipStatus.ACTIVE:
            gone.append(r.id)
        else:
            due.append(Due(r.id, Recipient(r.subscriber_id, r.list_id, r.email, r.name,
                                           r.edition), r.attempts, r.first_attempt_at))
    if gone:
        conn.execute(update(deliveries).where(deliveries.c.id.in_(gone)).values(
            status=DeliveryStatus.SKIPPED, worker_id=None, updated_at=now))
    return due, len(gone)


def finish(engine: Engine, campaign_id: int, *, pause: str | None = None) -> CampaignStatus:
    """A worker is done with a campaign for now: complete it if no row is left unfinished
    (whichever worker commits the last outcome sees that), else leave it as it is; with
    `pause` (every relay failing), pause it for all workers with that reason."""
    now = utcnow()
    with engine.begin() as conn:
        if pause:
            conn.execute(update(campaigns).where(
                campaigns.c.id == campaign_id, campaigns.c.status == CampaignStatus.RUNNING,
            ).values(status=CampaignStatus.PAUSED, status_note=pause[:500], last_error=pause))
        _complete_if_done(conn, campaign_id, now)
        return CampaignStatus(conn.execute(select(campaigns.c.status)
                                           .where(campaigns.c.id == campaign_id)).scalar_one())


def _complete_if_done(conn: Connection, campaign_id: int, now: dt.datetime) -> None:
    unfinished = exists().where(
        deliveries.c.campaign_id == campaign_id,
        deliveries.c.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.SENDING,
                                 DeliveryStatus.FAILED_TEMP]))
    conn.execute(update(campaigns).where(
        campaigns.c.id == campaign_id, campaigns.c.status == CampaignStatus.RUNNING,
        campaigns.c.runner.is_(None), ~unfinished,
    ).values(status=CampaignStatus.COMPLETED, finished_at=now, status_note=None))


# --- relay quotas ---------------------------------------------------------------------------

# Lock the relay's row for the rest of the transaction: an upsert that always updates, the
# same syntax on SQLite and PostgreSQL. Reservations for one relay queue up on this row.
_LOCK_RELAY = text(
    "INSERT INTO relay_locks (relay) VALUES (:relay) "
    "ON CONFLICT (relay) DO UPDATE SET relay = excluded.relay"
)
_ADD_USAGE = text(
    "INSERT INTO relay_usage (relay, second, count) VALUES (:relay, :second, :count) "
    "ON CONFLICT (relay, second) DO UPDATE SET count = relay_usage.count + excluded.count"
)


def reserve(engine: Engine, relay: str, want: int, windows: Sequence[tuple[int, float]],
            *, second: int) -> tuple[int, int]:
    """Take up to `want` sending slots on a relay for this second, within every (limit,
    seconds) window counted over all workers. Returns (granted, the fullest window's index);
    granted slots are recorded as used at once, whether or not they are spent."""
    with engine.begin() as conn:
        conn.execute(_LOCK_RELAY, {"relay": relay})
        grant, fullest = want, -1
        for i, (limit, period) in enumerate(windows):
            used = conn.execute(select(func.coalesce(func.sum(relay_usage.c.count), 0)).where(
                relay_usage.c.relay == relay,
                relay_usage.c.second > second - max(1, int(period)))).scalar_one()
            room = limit - int(used)
            if room < grant:
                grant, fullest = max(0, room), i
        if grant > 0:
            conn.execute(_ADD_USAGE, {"relay": relay, "second": second, "count": grant})
    return grant, fullest
