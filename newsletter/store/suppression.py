"""The global suppression list: addresses, whole domains and erased addresses' hashes.

Suppressed addresses are kept out of every campaign's audience (store.sql._audience), their
queued rows are skipped at once, and imports and subscribe forms refuse them. A domain entry
covers the domain and its subdomains. An erased address leaves only a salted hash, so a
later import cannot add it back while nothing readable about it stays stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, Engine, delete, exists, insert, or_, select, text
from sqlalchemy import update as sql_update

from ..errors import ConflictError, NotFoundError
from .schema import (
    DeliveryStatus,
    SuppressionKind,
    SuppressionReason,
    deliveries,
    meta,
    subscribers,
    suppressions,
    utcnow,
)

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
                        r"[a-z0-9-]{2,63}$")
_SALT_KEY = "erase_salt"


def normalize_domain(raw: str) -> str:
    """A lowercased domain name (IDN as punycode), or ValueError saying why not."""
    domain = raw.strip().lower().lstrip("@").rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a domain name: {raw!r}") from None
    if not _DOMAIN_RE.match(domain):
        raise ValueError(f"not a domain name: {raw!r}")
    return domain


def domains_of(email_key: str) -> list[str]:
    """The domain of an address and every parent domain: a.b.example.org -> a.b.example.org,
    b.example.org, example.org, org."""
    domain = email_key.rpartition("@")[2]
    parts = domain.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def erase_hash(salt: bytes, email_key: str) -> str:
    return hmac.new(salt, email_key.lower().encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Suppression:
    id: int
    value: str          # address, domain or hash, as kind says
    kind: SuppressionKind
    reason: str
    note: str
    created_at: dt.datetime


@dataclass(frozen=True)
class SuppressionCheck:
    """An in-memory check for imports and forms: suppressed domains and erased hashes are
    few, so they are loaded once; suppressed addresses can be many, so `reason` asks the
    database only when given a connection (imports check addresses in SQL instead)."""

    salt: bytes
    domains: frozenset[str]
    hashes: frozenset[str]

    def hash(self, email_key: str) -> str:
        return erase_hash(self.salt, email_key)

    def reason(self, email_key: str, conn: Connection | None = None) -> str | None:
        """Why this address may not be added (None: it may)."""
        key = email_key.lower()
        if self.domains:
            for d in domains_of(key):
                if d in self.domains:
                    return f"domain {d} is suppressed"
        if self.hashes and self.hash(key) in self.hashes:
            return "erased on request: may not be added again"
        if conn is not None:
            reason = conn.execute(select(suppressions.c.reason).where(
                suppressions.c.email_key == key,
                suppressions.c.kind == SuppressionKind.ADDRESS)).scalar()
            if reason is not None:
                return f"suppressed ({reason})"
        return None


def salt(conn: Connection) -> bytes:
    """This database's salt for erased addresses' hashes, created on first use."""
    value = conn.execute(select(meta.c.value).where(meta.c.key == _SALT_KEY)).scalar()
    if value is None:
        # Migration 0007 creates it; a database migrated before that gets it here. Two
        # processes may get here at once: the second's insert does nothing, and both read
        # the one that was stored.
        conn.execute(_ADD_SALT, {"key": _SALT_KEY, "value": secrets.token_hex(32)})
        value = conn.execute(select(meta.c.value).where(meta.c.key == _SALT_KEY)).scalar_one()
    return bytes.fromhex(value)


# The same upsert syntax on SQLite and PostgreSQL.
_ADD_SALT = text("INSERT INTO meta (key, value) VALUES (:key, :value) "
                 "ON CONFLICT (key) DO NOTHING")


def load_check(engine: Engine) -> SuppressionCheck:
    with engine.begin() as conn:
        s = salt(conn)
        rows = conn.execute(select(suppressions.c.email_key, suppressions.c.kind).where(
            suppressions.c.kind != SuppressionKind.ADDRESS)).all()
    return SuppressionCheck(
        salt=s,
        domains=frozenset(r.email_key for r in rows if r.kind == SuppressionKind.DOMAIN),
        hashes=frozenset(r.email_key for r in rows if r.kind == SuppressionKind.HASH),
    )


def suppressed_clause(email_key: ColumnElement[str]) -> ColumnElement[bool]:
    """SQL true when the address in `email_key` is suppressed by address or by domain
    (hashes need no clause: an erased address has no subscriber row any more)."""
    by_address = exists().where(suppressions.c.email_key == email_key,
                                suppressions.c.kind == SuppressionKind.ADDRESS)
    # Domain names hold only [a-z0-9.-] (normalize_domain), so LIKE has no wildcard to fear.
    by_domain = exists().where(
        suppressions.c.kind == SuppressionKind.DOMAIN,
        or_(email_key.like("%@" + suppressions.c.email_key),
            email_key.like("%." + suppressions.c.email_key)))
    return or_(by_address, by_domain)


def add(conn: Connection, value: str, *, kind: SuppressionKind, reason: str, note: str = "",
        now: dt.datetime | None = None) -> bool:
    """Suppress an address, domain or hash (already normalised). False if it already was.
    Queued and retrying ledger rows of the addresses it covers are skipped at once, so a
    running send honours it for every message not yet handed to a relay."""
    now = now or utcnow()
    key = value.lower()
    if conn.execute(select(suppressions.c.id).where(suppressions.c.email_key == key)).first():
        return False
    conn.execute(insert(suppressions).values(email_key=key, kind=kind, reason=reason,
                                             note=note[:500], created_at=now))
    if kind == SuppressionKind.ADDRESS:
        who = select(subscribers.c.id).where(subscribers.c.email_key == key)
    elif kind == SuppressionKind.DOMAIN:
        who = select(subscribers.c.id).where(or_(subscribers.c.email_key.like("%@" + key),
                                                 subscribers.c.email_key.like("%." + key)))
    else:
        return True
    conn.execute(sql_update(deliveries).where(
        deliveries.c.subscriber_id.in_(who.scalar_subquery()),
        deliveries.c.status.in_([DeliveryStatus.QUEUED, DeliveryStatus.FAILED_TEMP]),
    ).values(status=DeliveryStatus.SKIPPED, updated_at=now, worker_id=None))  # claims end
    return True


def remove(conn: Connection, value: str) -> Suppression:
    """Lift a suppression; erased hashes cannot be lifted (nothing to check them against)."""
    key = value.strip().lower()
    row = conn.execute(select(suppressions).where(suppressions.c.email_key == key)).first()
    if row is None:
        raise NotFoundError(f"{value} is not suppressed")
    if row.kind == SuppressionKind.HASH:
        raise ConflictError("an erased address's hash cannot be lifted")
    conn.execute(delete(suppressions).where(suppressions.c.id == row.id))
    return _row(row)


def lift_unsubscribed(conn: Connection, email_key: str) -> None:
    """A confirmed opt-in overrides an earlier 'unsubscribed from all' (and nothing else)."""
    conn.execute(delete(suppressions).where(
        suppressions.c.email_key == email_key.lower(),
        suppressions.c.reason == SuppressionReason.UNSUBSCRIBED))


def get(conn: Connection, key: str) -> Suppression:
    row = conn.execute(select(suppressions).where(suppressions.c.email_key == key)).first()
    if row is None:
        raise NotFoundError(f"{key} is not suppressed")
    return _row(row)


def find(conn: Connection, email_key: str) -> Suppression | None:
    """The entry that suppresses this address (by address, domain or hash), if any."""
    key = email_key.lower()
    candidates = [key, *domains_of(key), erase_hash(salt(conn), key)]
    rows = conn.execute(select(suppressions).where(
        suppressions.c.email_key.in_(candidates))).all()
    return _row(rows[0]) if rows else None


def entries(engine: Engine, *, kind: SuppressionKind | None = None,
            reason: str | None = None, batch: int = 1000) -> Iterator[Suppression]:
    """Stream the suppression list in id order, a batch at a time."""
    after = 0
    while True:
        query = select(suppressions).where(suppressions.c.id > after) \
            .order_by(suppressions.c.id).limit(batch)
        if kind is not None:
            query = query.where(suppressions.c.kind == kind)
        if reason is not None:
            query = query.where(suppressions.c.reason == reason)
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        yield from (_row(r) for r in rows)
        if len(rows) < batch:
            return
        after = rows[-1].id


def _row(r: object) -> Suppression:
    return Suppression(r.id, r.email_key, SuppressionKind(r.kind), r.reason,  # type: ignore[attr-defined]
                       r.note, r.created_at)  # type: ignore[attr-defined]
