"""Bearer tokens of the admin API: shown once when created, kept only as a SHA-256 digest.

A token is `nl_` followed by 43 URL-safe characters (256 random bits). Because it is that
random, a plain SHA-256 is enough to store it (no salt or slow hash needed: there is nothing
to guess), and a request is matched by looking its digest up. Creating and revoking a token
writes an audit entry in the same transaction, so neither can happen unrecorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from .admin import InvalidError
from .errors import AuthError, ConflictError, NotFoundError
from .store.directory import write_audit
from .store.schema import api_tokens, utcnow

PREFIX = "nl_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
# Longer than any token we issue: anything beyond is refused before it is hashed.
_MAX_TOKEN_LENGTH = 200


class Role(StrEnum):
    """What a token may do; each role includes the ones below it."""

    VIEWER = "viewer"  # read
    EDITOR = "editor"  # + campaigns, schedules, segments
    ADMIN = "admin"    # + lists, subscribers, imports, suppression, privacy, tokens, audit

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.EDITOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class ApiToken:
    """A token as stored: never the token itself."""

    id: int
    name: str
    role: Role
    created_at: dt.datetime
    created_by: str
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def actor(self) -> str:
        """How its requests are named in the audit log."""
        return f"token:{self.name}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    """Create, list, revoke and verify API tokens.

    `touch_every`: last_used_at is written at most this often per token (seconds), so a busy
    client does not turn every read into a write.
    """

    def __init__(self, engine: Engine, *, touch_every: float = 60.0) -> None:
        self.engine = engine
        self.touch_every = touch_every
        self._touched: dict[int, float] = {}
        self._lock = threading.Lock()

    def create(self, name: str, role: Role | str, *, actor: str) -> tuple[ApiToken, str]:
        """A new token: (its record, the token). The token is not kept; show it once."""
        if not NAME_RE.match(name):
            raise InvalidError("name", f"invalid token name {name!r}: 1 to 100 letters, digits, "
                               "'.', '_', '-' or '@', starting with a letter or digit")
        if role not in set(Role):
            raise InvalidError("role", "one of " + ", ".join(Role))
        role = Role(role)
        token = PREFIX + secrets.token_urlsafe(32)
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(api_tokens).values(
                    name=name, role=role.value, token_hash=digest(token), created_at=utcnow(),
                    created_by=actor[:200]))
                write_audit(conn, actor=actor, action="token.create", target=name,
                            detail={"role": role.value})
        except IntegrityError:
            raise ConflictError(f"a token named {name!r} exists already (revoked tokens keep "
                                "their name)") from None
        return self.get(name), token

    def get(self, name: str) -> ApiToken:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_tokens).where(api_tokens.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"no token named {name!r}")
        return _token(row)

    def all(self) -> list[ApiToken]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_tokens).order_by(api_tokens.c.id)).all()
        return [_token(r) for r in rows]

    def revoke(self, name: str, *, actor: str) -> ApiToken:
        """Revoke a token for good; requests with it are refused from now on. Revoking a
        revoked token changes nothing (and records nothing)."""
        with self.engine.begin() as conn:
            changed = conn.execute(update(api_tokens).where(
                api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None),
            ).values(revoked_at=utcnow())).rowcount
            if changed:
                write_audit(conn, actor=actor, action="token.revoke", target=name)
        return self.get(name)

    def verify(self, token: str) -> ApiToken:
        """The active token this is, or AuthError (401). The token is never logged."""
        if not token.startswith(PREFIX) or len(token) > _MAX_TOKEN_LENGTH:
            raise AuthError("invalid token")
        wanted = digest(token)
        with self.engine.connect() as conn:
            row = conn.execute(select(api_tokens).where(api_tokens.c.token_hash == wanted)) \
                .first()
        # The lookup compares digests, which tells a timing observer nothing about the
        # token; compare_digest makes the final comparison constant-time all the same.
        if row is None or not hmac.compare_digest(str(row.token_hash), wanted):
            raise AuthError("invalid token")
        found = _token(row)
        if not found.active:
            raise AuthError("token revoked")
        self._touch(found)
        return found

    def _touch(self, token: ApiToken) -> None:
        """Record use, at most once per touch_every per token (per process here; across
        processes the conditional update keeps it to about that)."""
        now = time.monotonic()
        with self._lock:
            last = self._touched.get(token.id)
            if last is not None and now - last < self.touch_every:
                return
            self._touched[token.id] = now
        at = utcnow()
        with self.engine.begin() as conn:
            conn.execute(update(api_tokens).where(
                api_tokens.c.id == token.id,
                api_tokens.c.last_used_at.is_(None)
                | (api_tokens.c.last_used_at < at - dt.timedelta(seconds=self.touch_every)),
            ).values(last_used_at=at))


def _token(r: Any) -> ApiToken:
    return ApiToken(id=r.id, name=r.name, role=Role(r.role), created_at=r.created_at,
                    created_by=r.created_by, last_used_at=r.last_used_at,
                    revoked_at=r.revoked_at)
