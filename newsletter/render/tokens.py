"""Signed, unforgeable tokens for unsubscribe, preferences and confirmation links.

A token is base64url(version|purpose, fields as unsigned 64-bit ints, HMAC-SHA256[:16]).
It names a subscriber and a list without exposing the address; 128 bits of MAC make it
unguessable. Tokens are signed with the current key and verified against the current and
old keys, so rotating SECRET_KEY does not break links in mail already delivered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import time
from enum import IntEnum

from ..errors import NewsletterError

_VERSION = 1
_MAC_BYTES = 16


class TokenError(NewsletterError):
    """A token is malformed, tampered with, signed with an unknown key, or for another use."""


class TokenExpiredError(TokenError):
    """A genuine token whose validity ended (confirmation links expire)."""


class Purpose(IntEnum):
    UNSUBSCRIBE = 1
    PREFERENCES = 2
    CONFIRM = 3
    ARCHIVE = 4   # lets a subscriber of a private list read its web archive
    BOUNCE = 5    # the VERP return path of one delivery: bounce+TOKEN@domain


class TokenSigner:
    """Signs with keys[0]; verifies with any of keys."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or not keys[0]:
            raise ValueError("at least one non-empty key is required")
        # Pre-keyed HMAC objects: copying one is several times cheaper than hmac.new per token.
        self._macs = [hmac.new(k, digestmod=hashlib.sha256) for k in keys]

    def _raw(self, purpose: Purpose, fields: tuple[int, ...]) -> bytes:
        payload = struct.pack(f">BB{len(fields)}Q", _VERSION, purpose, *fields)
        mac = self._macs[0].copy()
        mac.update(payload)
        return payload + mac.digest()[:_MAC_BYTES]

    def sign(self, purpose: Purpose, *fields: int) -> str:
        return base64.urlsafe_b64encode(self._raw(purpose, fields)).rstrip(b"=").decode("ascii")

    def verify(self, token: str, purpose: Purpose, nfields: int) -> tuple[int, ...]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("malformed token") from None
        return self._check(raw, purpose, nfields)

    def _check(self, raw: bytes, purpose: Purpose, nfields: int) -> tuple[int, ...]:
        size = 2 + 8 * nfields
        if len(raw) != size + _MAC_BYTES:
            raise TokenError("malformed token")
        payload, given = raw[:size], raw[size:]
        for base in self._macs:
            mac = base.copy()
            mac.update(payload)
            if hmac.compare_digest(mac.digest()[:_MAC_BYTES], given):
                break
        else:
            raise TokenError("token signature does not match")
        version, got_purpose, *fields = struct.unpack(f">BB{nfields}Q", payload)
        if version != _VERSION or got_purpose != purpose:
            raise TokenError("token is not valid for this use")
        return tuple(fields)

    def unsubscribe_token(self, subscriber_id: int, list_id: int) -> str:
        return self.sign(Purpose.UNSUBSCRIBE, subscriber_id, list_id)

    def read_unsubscribe_token(self, token: str) -> tuple[int, int]:
        sid, lid = self.verify(token, Purpose.UNSUBSCRIBE, 2)
        return sid, lid

    def preferences_token(self, subscriber_id: int) -> str:
        return self.sign(Purpose.PREFERENCES, subscriber_id)

    def read_preferences_token(self, token: str) -> int:
        return self.verify(token, Purpose.PREFERENCES, 1)[0]

    def archive_token(self, subscriber_id: int, list_id: int) -> str:
        return self.sign(Purpose.ARCHIVE, subscriber_id, list_id)

    def read_archive_token(self, token: str) -> tuple[int, int]:
        sid, lid = self.verify(token, Purpose.ARCHIVE, 2)
        return sid, lid

    def confirm_token(self, subscriber_id: int, list_id: int, *, valid_for: float,
                      now: float | None = None) -> str:
        """A double opt-in link's token; the expiry is inside the signed payload."""
        expires = int((time.time() if now is None else now) + valid_for)
        return self.sign(Purpose.CONFIRM, subscriber_id, list_id, expires)

    def read_confirm_token(self, token: str, *, now: float | None = None) -> tuple[int, int]:
        sid, lid, expires = self.verify(token, Purpose.CONFIRM, 3)
        if (time.time() if now is None else now) > expires:
            raise TokenExpiredError("this confirmation link has expired")
        return sid, lid

    def bounce_token(self, delivery_id: int) -> str:
        """Lowercase hex: mail systems may change the case of an address's local part, and
        it is cheap (this runs once per message)."""
        return self._raw(Purpose.BOUNCE, (delivery_id,)).hex()

    def read_bounce_token(self, token: str) -> int:
        try:
            raw = bytes.fromhex(token.strip())
        except ValueError:
            raise TokenError("malformed token") from None
        return self._check(raw, Purpose.BOUNCE, 1)[0]
