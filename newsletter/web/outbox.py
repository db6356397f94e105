"""The capture inbox at /outbox/: what the built-in capture server stored, for admins only.

Without an SMTP relay every message (issues, test sends, confirmation mail) lands in the
capture Maildir (`settings.outbox_dir`); these pages list it newest first and show each
message as its HTML (in a sandboxed iframe that runs no script), its text part and its raw
source. An admin API token opens them, either as `Authorization: Bearer` (scripts) or once
through the login form, which sets a signed session cookie holding the token's name and an
expiry, never the token. Each request checks the token again, so revoking it ends its
sessions.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.message
import email.parser
import email.policy
import hashlib
import hmac
import json
import mailbox
import math
import re
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..admin import Admin
from ..apitokens import ApiToken, Role, Tokens
from ..errors import AuthError, NotFoundError
from ..render.templates import render_template
from ..render.tokens import TokenError

if TYPE_CHECKING:
    from .app import WebApp

PAGE_SIZE = 50
SESSION_SECONDS = 8 * 3600
COOKIE = "nl_outbox_session"
# Keys as Python's mailbox.Maildir makes them ("1763300000.M123P45Q6.host"): letters, digits
# and . _ - (and the backslash of an escaped / or : in a host name). No slash, no "..".
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\\-]{0,254}$")
_KEY_TIME = re.compile(r"^(\d+)\.M(\d+)P\d+Q(\d+)\.")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_HEAD_BYTES = 64 * 1024  # enough for any header block we write; the body is not read

# Outbox pages: no script at all, frames only from here (the message's HTML view).
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
}
# A captured message's own HTML: shown in our frame only, with no script, no form and no
# plugin even when opened on its own (the CSP sandbox), remote images as a mail client shows
# them once allowed.
_MAIL_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "SAMEORIGIN",
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src https: data:; font-src https: data:; "
                               "form-action 'none'; frame-ancestors 'self'; base-uri 'none'",
}
_TEXT_HEADERS = {**_MAIL_HEADERS, "Content-Security-Policy": "sandbox; default-src 'none'"}


# --- sessions --------------------------------------------------------------------------------

class SessionSigner:
    """Signed, expiring admin sessions: base64url(JSON) "." base64url(HMAC-SHA256[:16]).

    Keyed by the installation's signing keys (current first, old ones still accepted, as
    render.tokens does), through a key derived for this one purpose, so no other signed
    value of the application can pass for a session or the other way round.
    """

    _CONTEXT = b"newsletter outbox session v1"

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or not keys[0]:
            raise ValueError("at least one non-empty key is required")
        self._keys = [hmac.new(k, self._CONTEXT, hashlib.sha256).digest() for k in keys]

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, payload, hashlib.sha256).digest()[:16]

    def sign(self, token: ApiToken, *, now: float | None = None,
             ttl: float = SESSION_SECONDS) -> str:
        expires = int((time.time() if now is None else now) + ttl)
        payload = json.dumps({"id": token.id, "name": token.name, "exp": expires},
                             separators=(",", ":")).encode()
        return _b64(payload) + "." + _b64(self._mac(self._keys[0], payload))

    def read(self, value: str, *, now: float | None = None) -> tuple[int, str]:
        """(token id, token name) of a genuine, unexpired session; TokenError otherwise."""
        body, _, tag = value.partition(".")
        try:
            payload, given = _unb64(body), _unb64(tag)
        except (binascii.Error, ValueError):
            raise TokenError("malformed session") from None
        if not any(hmac.compare_digest(self._mac(k, payload), given) for k in self._keys):
            raise TokenError("session signature does not match")
        data = json.loads(payload)
        if (time.time() if now is None else now) > int(data["exp"]):
            raise TokenError("session expired")
        return int(data["id"]), str(data["name"])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or len(text) > 1000:
        raise ValueError("bad length")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the Maildir -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """One captured message as the list shows it."""

    key: str
    received: dt.datetime
    sender: str
    to: str
    subject: str
    size: int


def valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key)) and ".." not in key


def _order(key: str, box: mailbox.Maildir) -> tuple[float, int]:
    """Newest first needs arrival order: Maildir keys start with the time (seconds and
    microseconds) and a per-process counter, so no file needs a stat()."""
    m = _KEY_TIME.match(key)
    if m:
        return int(m.group(1)) + int(m.group(2)) / 1e6, int(m.group(3))
    # A message put there by something else: its file's time (MaildirMessage's date).
    return box.get_message(key).get_date(), 0


def _received(key: str, box: mailbox.Maildir) -> dt.datetime:
    return dt.datetime.fromtimestamp(_order(key, box)[0], dt.UTC)


class Outbox:
    """Read-only access to the capture Maildir; a missing folder is an empty outbox (a
    GET must not create it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _box(self) -> mailbox.Maildir | None:
        if not (self.path / "cur").is_dir() or not (self.path / "new").is_dir():
            return None
        return mailbox.Maildir(self.path, factory=None, create=False)

    def page(self, number: int, size: int = PAGE_SIZE) -> tuple[list[Summary], int]:
        """One page (1-based) of summaries, newest first, and the number of messages."""
        box = self._box()
        if box is None:
            return [], 0
        keys = sorted(box.keys(), key=lambda k: _order(k, box), reverse=True)
        chosen = keys[(number - 1) * size: number * size]
        return [self._summary(box, k) for k in chosen], len(keys)

    def _summary(self, box: mailbox.Maildir, key: str) -> Summary:
        with box.get_file(key) as f:
            head = f.read(_HEAD_BYTES)
            f.seek(0, 2)
            size = f.tell()
        end = _HEADER_END.search(head)
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(
            head[:end.end()] if end else head)
        return Summary(key, _received(key, box), _header(headers, "From"),
                       _header(headers, "To") or _header(headers, "Delivered-To"),
                       _header(headers, "Subject"), size)

    def raw(self, key: str) -> bytes:
        """A message's bytes; NotFoundError for a key that is not a message here. Only keys
        listed from the folder are looked up, so no path is built from the request."""
        box = self._box()
        if box is None or not valid_key(key):
            raise NotFoundError("no such message")
        try:
            return box.get_bytes(key)
        except KeyError:
            raise NotFoundError("no such message") from None

    def message(self, key: str) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.raw(key), policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


def _header(msg: email.message.Message, name: str) -> str:
    try:
        return str(msg.get(name, "") or "")
    except (ValueError, IndexError, TypeError):  # a malformed header: show it undecoded
        raw = msg.get_all(name) or [""]
        return str(raw[0])


def _part(msg: email.message.EmailMessage, subtype: str) -> str | None:
    part = msg.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    try:
        return str(part.get_content())
    except (LookupError, ValueError):  # an unknown charset: show what can be shown
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None


# --- authentication ----------------------------------------------------------------------------

class _Gate:
    """Who is asking: an admin token (bearer or session), or the response to send instead."""

    def __init__(self, web: WebApp) -> None:
        self.web = web

    @cached_property
    def tokens(self) -> Tokens:
        return Tokens(self.web.nl.store.engine)

    @cached_property
    def sessions(self) -> SessionSigner:
        return SessionSigner(self.web.nl.settings.signing_keys())

    def admin(self, request: Request) -> ApiToken | Response:
        header = request.headers.get("authorization")
        if header is not None:
            # A script: answer 401/403 as the API does; a redirect would only confuse it.
            scheme, _, value = header.partition(" ")
            try:
                if scheme.lower() != "bearer" or not value.strip():
                    raise AuthError("expected Authorization: Bearer nl_...")
                token = self.tokens.verify(value.strip())
            except AuthError as exc:
                return _plain(401, str(exc), {"WWW-Authenticate": "Bearer"})
            if not token.role.allows(Role.ADMIN):
                return _plain(403, f"the outbox needs an admin token, not {token.role.value}",
                              {"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
            return token
        session = request.cookies.get(COOKIE)
        if session:
            token_or_none = self._from_session(session)
            if token_or_none is not None:
                return token_or_none
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        response = RedirectResponse(f"/outbox/login?next={quote(target, safe='/')}",
                                    status_code=303, headers=_PAGE_HEADERS)
        if session:
            response.delete_cookie(COOKIE, path="/outbox")
        return response

    def _from_session(self, value: str) -> ApiToken | None:
        """The session's token if it is still an active admin token (revoked: no more)."""
        try:
            token_id, name = self.sessions.read(value)
            token = self.tokens.get(name)
        except (TokenError, NotFoundError, KeyError, TypeError, ValueError):
            return None
        if token.id != token_id or not token.active or not token.role.allows(Role.ADMIN):
            return None
        return token


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain; charset=utf-8",
                    headers={**_PAGE_HEADERS, **(headers or {})})


def _safe_next(target: str | None) -> str:
    """Only our own outbox pages: a login form must not redirect anywhere else."""
    if target and target.startswith("/outbox/") and "//" not in target and "\\" not in target:
        return target
    return "/outbox/"


def _page_number(raw: str | None) -> int:
    if raw and raw.isascii() and raw.isdigit() and len(raw) < 9:
        return max(1, int(raw))
    return 1


# --- routes --------------------------------------------------------------------------------------

def mount_outbox(app: FastAPI, web: WebApp) -> None:
    """Add the /outbox/ pages to the web app."""
    gate = _Gate(web)
    settings = web.nl.settings

    def outbox() -> Outbox:
        return Outbox(settings.outbox_dir)

    def page(name: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        html = render_template(web.templates, f"web/{name}.html.j2", lang="en",
                               site_name=settings.sender_name or "newsletter",
                               postal_address="", **context)
        return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)

    @app.get("/outbox", include_in_schema=False)
    def outbox_redirect() -> Response:
        return RedirectResponse("/outbox/", status_code=308)

    @app.get("/outbox/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(next: str | None = None) -> HTMLResponse:
        return page("outbox_login", next=_safe_next(next), error="")

    @app.post("/outbox/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        raw, target = form.get("token"), form.get("next")
        target = _safe_next(target if isinstance(target, str) else None)
        value = raw.strip() if isinstance(raw, str) else ""
        try:
            token = gate.tokens.verify(value)
        except AuthError:
            return page("outbox_login", status=401, next=target,
                        error="That is not a valid token (revoked, mistyped?).")
        if not token.role.allows(Role.ADMIN):
            return page("outbox_login", status=403, next=target,
                        error=f"This is a {token.role.value} token; the outbox needs an "
                              "admin token.")
        Admin(web.nl, token.actor).audit("outbox.login", token.name)
        response = RedirectResponse(target, status_code=303, headers=_PAGE_HEADERS)
        response.set_cookie(COOKIE, gate.sessions.sign(token), max_age=SESSION_SECONDS,
                            path="/outbox", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/outbox/logout", include_in_schema=False)
    def logout() -> Response:
        response = RedirectResponse("/outbox/login", status_code=303, headers=_PAGE_HEADERS)
        response.delete_cookie(COOKIE, path="/outbox")
        return response

    @app.get("/outbox/", response_class=HTMLResponse, include_in_schema=False)
    def index(request: Request) -> Response:
        who = gate.admin(request)
        if isinstance(who, Response):
            return who
        number = _page_number(request.query_params.get("page"))
        items, total = outbox().page(number)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        if number > pages:
            return _plain(404, "no such page")
        return page("outbox_index", items=items, total=total, number=number, pages=pages,
                    who=who, folder=str(settings.outbox_dir), capture=web.nl.capture_mode)

    def _message_or_404(key: str) -> email.message.EmailMessage | Response:
        try:
            return outbox().message(key)
        except NotFoundError:
            return _plain(404, "no such message")

    @app.get("/outbox/{key}", response_class=HTMLResponse, include_in_schema=False)
    def message(key: str, request: Request) -> Response:
        who = gate.admin(request)
        if isinstance(who, Response):
            return who
        msg = _message_or_404(key)
        if isinstance(msg, Response):
            return msg
        headers = [(name, _header(msg, name)) for name in
                   ("Date", "From", "To", "Subject", "Reply-To", "Message-ID", "List-Id",
                    "List-Unsubscribe", "Return-Path", "Delivered-To") if name in msg]
        box = outbox()._box()
        received = _received(key, box) if box is not None else None
        return page("outbox_message", key=key, headers=headers, who=who,
                    subject=_header(msg, "Subject"), received=received,
                    has_html=_part(msg, "html") is not None, text=_part(msg, "plain"),
                    dkim="DKIM-Signature" in msg)

    def gated_part(request: Request, key: str, subtype: str, what: str) -> Response | str:
        """One part of a captured message for an admin, or the response saying why not."""
        who = gate.admin(request)
        if isinstance(who, Response):
            return who
        msg = _message_or_404(key)
        if isinstance(msg, Response):
            return msg
        part = _part(msg, subtype)
        return _plain(404, f"this message has no {what} part") if part is None else part

    @app.get("/outbox/{key}/html", include_in_schema=False)
    def message_html(key: str, request: Request) -> Response:
        html = gated_part(request, key, "html", "HTML")
        if isinstance(html, Response):
            return html
        return HTMLResponse(html, headers=_MAIL_HEADERS)

    @app.get("/outbox/{key}/text", include_in_schema=False)
    def message_text(key: str, request: Request) -> Response:
        text = gated_part(request, key, "plain", "text")
        if isinstance(text, Response):
            return text
        return Response(text, media_type="text/plain; charset=utf-8", headers=_TEXT_HEADERS)

    @app.get("/outbox/{key}/raw", include_in_schema=False)
    def message_raw(key: str, request: Request) -> Response:
        who = gate.admin(request)
        if isinstance(who, Response):
            return who
        try:
            data = outbox().raw(key)
        except NotFoundError:
            return _plain(404, "no such message")
        # As stored, byte for byte; text/plain so the browser shows it and never renders it.
        return Response(data, media_type="text/plain; charset=utf-8", headers=_TEXT_HEADERS)
