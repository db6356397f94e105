"""The public web side: one-click unsubscribe, preferences, subscribe and confirm, archive.

A thin face over subscriptions.Subscriptions: each route reads the request, calls one use
case and renders one template. No page needs JavaScript; every action is a plain form POST.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from ..content.model import Issue
from ..delivery.capture import CaptureServer
from ..delivery.relay import Relay, SmtpRelayClient
from ..errors import DeliveryError, NotFoundError
from ..render.issue import issue_context
from ..render.templates import make_environment, render_template
from ..render.tokens import TokenError, TokenExpiredError
from ..service import Newsletter

if TYPE_CHECKING:
    from ..scheduling import Scheduler
from ..store.base import ArchiveEntry, MailingList
from ..subscriptions import (
    SUPPORTED_LANGUAGES,
    InvalidInputError,
    RateLimitedError,
    Source,
    Subscriptions,
    mask_email,
)
from .labels import LANGUAGE_NAMES, labels

log = logging.getLogger(__name__)

# Token pages must not leak the token to other sites (Referer) or be cached by proxies.
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src https: "
                               "data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
_NO_STORE = {**_HEADERS, "Cache-Control": "no-store"}
_ONE_CLICK = "List-Unsubscribe=One-Click"


class WebApp:
    """Routes' shared state: the application, its subscription rules, a small render cache."""

    def __init__(self, nl: Newsletter, relay: Relay | None, *, run_scheduler: bool = False) \
            -> None:
        self.nl = nl
        self.relay = relay
        self.run_scheduler = run_scheduler
        self.scheduler: Scheduler | None = None
        self.capture: CaptureServer | None = None
        self._subs: Subscriptions | None = None
        self._issue_cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.templates = make_environment(nl.settings.templates_dir, auto_reload=False)
        self._common = {"site_name": nl.settings.sender_name,
                        "postal_address": nl.settings.postal_address}

    @property
    def subs(self) -> Subscriptions:
        if self._subs is None:
            raise RuntimeError("the web app has not started (lifespan not run)")
        return self._subs

    async def start(self) -> None:
        relay = self.relay
        if relay is None:
            # Confirmation mail goes through the relay chosen for its sender's domain, from
            # smtp_url or [[relays]] alike (send picks relays the same way).
            plans = self.nl.relay_plans(self.nl.settings.transactional_domain)
            if plans:
                relay = plans[0].relay
            else:
                # No SMTP server configured: confirmation mail goes to the capture outbox,
                # like the demo's issues.
                self.capture = CaptureServer(self.nl.settings.outbox_dir)
                await self.capture.start()
                relay = SmtpRelayClient(self.capture.relay, timeout=10)
        self.nl.store  # noqa: B018 - open and migrate the database before the first request
        self._subs = Subscriptions(self.nl, relay)
        if self.run_scheduler and self.nl.settings.scheduler_in_serve:
            from ..scheduling import Scheduler

            # One process per database fires jobs (a lease); this one waits if another has it.
            self.scheduler = Scheduler(self.nl)
            await self.scheduler.start()

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.capture is not None:
            await self.capture.stop()
        self.nl.store.close()

    # --- rendering ---------------------------------------------------------------------------

    def page(self, name: str, *, lang: str = "en", status: int = 200, cache: bool = False,
             **context: Any) -> HTMLResponse:
        t = labels(lang)
        html = render_template(self.templates, f"web/{name}.html.j2", t=t, lang=lang,
                               **self._common, **context)
        return HTMLResponse(html, status_code=status, headers=_HEADERS if cache else _NO_STORE)

    def invalid_link(self, exc: TokenError, lang: str = "en") -> HTMLResponse:
        if isinstance(exc, TokenExpiredError):
            return self.page("message", lang=lang, status=410, title=labels(lang)["expired_title"],
                             body=labels(lang)["expired_body"])
        return self.page("message", lang=lang, status=400, title=labels(lang)["invalid_title"],
                         body=labels(lang)["invalid_body"])

    def not_found(self, lang: str = "en") -> HTMLResponse:
        t = labels(lang)
        return self.page("message", lang=lang, status=404, title=t["not_found_title"],
                         body=t["not_found_body"])

    def rendered_issue(self, entry: ArchiveEntry) -> dict[str, Any]:
        """The issue's template context; archived issues never change, so it is cached."""
        cached = self._issue_cache.get(entry.id)
        if cached is None:
            cached = issue_context(Issue.model_validate_json(entry.issue_json))
            self._issue_cache[entry.id] = cached
            if len(self._issue_cache) > 128:
                self._issue_cache.popitem(last=False)
        return cached

    def archive_access(self, mlist: MailingList, token: str | None) -> bool:
        """Public archives are open; a private one needs a reader token for that list."""
        if mlist.public:
            return True
        if not token:
            return False
        try:
            _sid, lid = self.nl.signer.read_archive_token(token)
        except TokenError:
            return False
        return lid == mlist.id


async def _form_values(request: Request) -> dict[str, list[str]]:
    """The POST body's fields with all their values, urlencoded (parsed directly: the
    one-click hot path) or multipart (RFC 8058 allows both)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/x-www-form-urlencoded") or not ctype:
        body = (await request.body()).decode("utf-8", "replace")
        return parse_qs(body, keep_blank_values=True)
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        return {k: [v for v in form.getlist(k) if isinstance(v, str)] for k in form}
    return {}


async def _form(request: Request) -> dict[str, str]:
    """The POST body's fields, the last value of each."""
    return {k: v[-1] for k, v in (await _form_values(request)).items() if v}


def create_app(nl: Newsletter, *, relay: Relay | None = None,
               scheduler: bool = False) -> FastAPI:
    """The web app. `relay` carries confirmation mail; default: SMTP_URL, else a capture
    server started with the app. The lifespan hook is where long-running parts start: with
    `scheduler` (as `newsletter serve` does), the scheduler."""
    web = WebApp(nl, relay, run_scheduler=scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await web.start()
        try:
            yield
        finally:
            await web.stop()

    app = FastAPI(title="newsletter", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.web = web
    # The admin JSON API (bearer tokens): its own OpenAPI document at /api/openapi.json.
    from .api import mount_api

    mount_api(app, web)
    # The capture inbox for admins (/outbox/): what the built-in capture server received.
    from .outbox import mount_outbox

    mount_outbox(app, web)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        public = [m for m, _ in nl.store.all_lists() if m.public]
        return web.page("index", lists=public, cache=True)

    # --- unsubscribe (RFC 8058) ----------------------------------------------------------

    @app.get("/unsubscribe/{token}", response_class=HTMLResponse)
    def unsubscribe_page(token: str) -> HTMLResponse:
        # Never changes anything: mail scanners and prefetchers open this URL.
        try:
            view = web.subs.unsubscribe_view(token)
        except TokenError as exc:
            return web.invalid_link(exc)
        lang = web.subs.language_for(view.subscriber, view.mlist)
        return web.page("unsubscribe", lang=lang, token=token, view=view)

    @app.post("/unsubscribe/{token}", response_class=HTMLResponse)
    async def unsubscribe(token: str, request: Request) -> HTMLResponse:
        fields = await _form(request)
        # The page's button says so; anything else (a mail client's RFC 8058 POST) is one-click.
        source = Source.PAGE if fields.get("via") == "page" else Source.ONE_CLICK
        try:
            view = web.subs.unsubscribe(token, source)
        except TokenError as exc:
            return web.invalid_link(exc)
        lang = web.subs.language_for(view.subscriber, view.mlist)
        prefs = nl.signer.preferences_token(view.subscriber.id)
        return web.page("unsubscribed", lang=lang, token=token, view=view, preferences=prefs)

    @app.post("/unsubscribe/{token}/resubscribe", response_class=HTMLResponse)
    def resubscribe(token: str) -> HTMLResponse:
        try:
            view = web.subs.resubscribe(token)
        except TokenError as exc:
            return web.invalid_link(exc)
        lang = web.subs.language_for(view.subscriber, view.mlist)
        prefs = nl.signer.preferences_token(view.subscriber.id)
        return web.page("resubscribed", lang=lang, view=view, preferences=prefs)

    # --- preferences ---------------------------------------------------------------------

    def _preferences(token: str, *, saved: bool = False, keep: set[int] | None = None,
                     leave_all: bool = False) -> HTMLResponse:
        try:
            if keep is None and not leave_all:
                view = web.subs.preferences(token)
            else:
                view = web.subs.update_preferences(token, keep=keep or set(),
                                                   leave_all=leave_all)
        except TokenError as exc:
            return web.invalid_link(exc)
        lang = (view.subscriber.language or "en").split("-")[0]
        return web.page("preferences", lang=lang, token=token, view=view, saved=saved,
                        masked_email=mask_email(view.subscriber.email))

    @app.get("/preferences/{token}", response_class=HTMLResponse)
    def preferences_page(token: str) -> HTMLResponse:
        return _preferences(token)

    @app.post("/preferences/{token}", response_class=HTMLResponse)
    async def preferences_save(token: str, request: Request) -> HTMLResponse:
        fields = await _form_values(request)
        keep = {int(i) for i in fields.get("list", []) if i.isdigit()}
        return _preferences(token, saved=True, keep=keep, leave_all="leave_all" in fields)

    # --- subscribe with double opt-in ----------------------------------------------------

    def _subscribe_form(mlist: MailingList, *, status: int = 200, error: str = "",
                        error_field: str = "", values: dict[str, str] | None = None) \
            -> HTMLResponse:
        return web.page("subscribe", lang=mlist.language, status=status, mlist=mlist,
                        error=error, error_field=error_field, values=values or {},
                        languages=[(c, LANGUAGE_NAMES[c]) for c in SUPPORTED_LANGUAGES])

    @app.get("/subscribe/{slug}", response_class=HTMLResponse)
    def subscribe_page(slug: str) -> HTMLResponse:
        try:
            mlist = web.subs.public_list(slug)
        except NotFoundError:
            return web.not_found()
        return _subscribe_form(mlist)

    @app.post("/subscribe/{slug}", response_class=HTMLResponse)
    async def subscribe(slug: str, request: Request) -> HTMLResponse:
        try:
            mlist = web.subs.public_list(slug)
        except NotFoundError:
            return web.not_found()
        fields = await _form(request)
        email = fields.get("email", "").strip()
        t = labels(mlist.language)
        done_key = "subscribe_done_body" if mlist.double_opt_in else "subscribe_done_single"
        done = web.page("message", lang=mlist.language, title=t["subscribe_done_title"],
                        body=t[done_key].format(email=email, list=mlist.name))
        if fields.get("website"):
            # The honeypot: people do not see this field, form-filling robots fill it.
            # They get the normal answer, and nothing happens.
            log.info("subscribe form for %s: honeypot filled, ignored", slug)
            return done
        client = request.client.host if request.client else ""
        try:
            await web.subs.subscribe(slug, email=email, name=fields.get("name", ""),
                                     language=fields.get("language", ""), client=client)
        except InvalidInputError as exc:
            return _subscribe_form(mlist, status=422, error=str(exc), error_field=exc.field,
                                   values=fields)
        except RateLimitedError:
            response = web.page("message", lang=mlist.language, status=429,
                                title=t["rate_limited_title"], body=t["rate_limited_body"])
            response.headers["Retry-After"] = "600"
            return response
        except (DeliveryError, OSError) as exc:
            log.error("confirmation mail for list %s not sent: %s", slug, exc)
            return web.page("message", lang=mlist.language, status=503,
                            title=t["error_title"], body=t["send_failed_body"])
        return done

    @app.get("/confirm/{token}", response_class=HTMLResponse)
    def confirm_page(token: str) -> HTMLResponse:
        # A button, not an automatic confirmation: link scanners must not subscribe anyone.
        try:
            sub, mlist, _status = web.subs.confirm_view(token)
        except TokenError as exc:
            return web.invalid_link(exc)
        return web.page("confirm", lang=web.subs.language_for(sub, mlist), token=token,
                        mlist=mlist, masked_email=mask_email(sub.email))

    @app.post("/confirm/{token}", response_class=HTMLResponse)
    async def confirm(token: str) -> HTMLResponse:
        try:
            sub, mlist, _changed = await web.subs.confirm(token)
        except TokenError as exc:
            return web.invalid_link(exc)
        lang = web.subs.language_for(sub, mlist)
        t = labels(lang)
        prefs = nl.signer.preferences_token(sub.id)
        return web.page("message", lang=lang, title=t["confirmed_title"],
                        body=t["confirmed_body"].format(email=mask_email(sub.email),
                                                        list=mlist.name),
                        preferences=prefs)

    # --- archive -------------------------------------------------------------------------

    def _archive_list(slug: str, token: str | None) -> MailingList | None:
        try:
            mlist = nl.store.get_list(slug)
        except NotFoundError:
            return None
        # A private archive without a reader token looks like no archive at all.
        return mlist if web.archive_access(mlist, token) else None

    @app.get("/archive/{slug}", include_in_schema=False)
    def archive_redirect(slug: str) -> Response:
        return RedirectResponse(f"/archive/{slug}/", status_code=308)

    @app.get("/archive/{slug}/", response_class=HTMLResponse)
    def archive_index(slug: str, t: str | None = None) -> HTMLResponse:
        mlist = _archive_list(slug, t)
        if mlist is None:
            return web.not_found()
        entries = nl.store.archive_entries(mlist.id, language=mlist.language)
        return web.page("archive_index", lang=mlist.language, mlist=mlist, entries=entries,
                        reader_token=t or "", cache=mlist.public)

    @app.get("/archive/{slug}/feed.atom")
    def archive_feed(slug: str) -> Response:
        mlist = _archive_list(slug, None)
        if mlist is None:
            return web.not_found()
        entries = nl.store.archive_entries(mlist.id, limit=20, language=mlist.language)
        items = [(e, web.rendered_issue(e)) for e in entries]
        base = nl.settings.base_url
        xml = render_template(
            web.templates, "web/feed.atom.j2", mlist=mlist, items=items, base_url=base,
            updated=format_iso(entries[0].published_at) if entries else format_iso(
                mlist.created_at), format_iso=format_iso, t=labels(mlist.language))
        return Response(xml, media_type="application/atom+xml; charset=utf-8",
                        headers=_HEADERS)

    @app.get("/archive/{slug}/{path}", response_class=HTMLResponse)
    def archive_issue(slug: str, path: str, t: str | None = None) -> HTMLResponse:
        return _archive_issue(slug, path, None, t)

    @app.get("/archive/{slug}/{path}/{language}", response_class=HTMLResponse)
    def archive_edition(slug: str, path: str, language: str,
                        t: str | None = None) -> HTMLResponse:
        """One language's edition of a bilingual issue."""
        return _archive_issue(slug, path, language.lower(), t)

    def _archive_issue(slug: str, path: str, language: str | None,
                       t: str | None) -> HTMLResponse:
        mlist = _archive_list(slug, t)
        if mlist is None:
            return web.not_found()
        try:
            entry, older, newer = nl.store.archive_entry(
                mlist.id, path, count_view=True, language=language or mlist.language)
        except NotFoundError:
            return web.not_found(mlist.language)
        if language is not None and entry.language != language:
            return web.not_found(mlist.language)
        editions = nl.store.archive_editions(mlist.id, entry.issue_key)
        # The plain URL shows the list's language (else the first edition); the others live
        # one level below it.
        plain = next((e for e in editions if e.language == mlist.language), editions[0])
        links = [(e.language, LANGUAGE_NAMES.get(e.language, e.language),
                  e.path if e.id == plain.id else f"{e.path}/{e.language}")
                 for e in editions if e.id != entry.id]
        context = web.rendered_issue(entry)
        return web.page("archive_issue", lang=entry.language, mlist=mlist, entry=entry,
                        older=older, newer=newer, reader_token=t or "", editions=links,
                        cache=False, **context)

    return app


def format_iso(value: dt.datetime) -> str:
    """RFC 3339 for Atom (stored timestamps come back zone-aware, see schema.UtcDateTime)."""
    return value.isoformat()

