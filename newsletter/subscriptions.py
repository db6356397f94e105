"""Subscriber use cases behind the web pages: unsubscribe, preferences, subscribe with double
opt-in, confirmation and welcome mail. The web module only maps HTTP onto these."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import jinja2
from email_validator import EmailNotValidError

from .delivery.relay import Relay
from .errors import DeliveryError, HeaderInjectionError, NewsletterError, NotFoundError
from .headers import check_header_text
from .render.issue import SLOTS, RenderedIssue, finish_rendering, slot
from .render.message import Recipient
from .render.templates import render_template
from .render.tokens import TokenError
from .store.base import MailingList, Subscriber
from .store.imports import normalize_email
from .store.schema import MembershipStatus, SuppressionReason

if TYPE_CHECKING:
    from .service import Newsletter

log = logging.getLogger(__name__)

SUPPORTED_LANGUAGES = ("en", "zh")


class Source(StrEnum):
    """Why a membership changed, as recorded in its history."""

    ONE_CLICK = "one-click"
    PAGE = "page"
    ADMIN = "admin"
    IMPORT = "import"
    BOUNCE = "bounce"
    CONFIRM = "confirm"
    FORM = "form"


class RateLimitedError(NewsletterError):
    """Too many attempts from one client or for one address; try again later."""


class InvalidInputError(NewsletterError):
    """A form field is wrong; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class SlidingWindow:
    """At most `limit` hits per key within `window` seconds (kept in memory, per process)."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._hits: dict[str, deque[float]] = {}
        self._last_sweep = 0.0

    def hit(self, key: str, now: float | None = None) -> bool:
        """Count one hit; False if it is over the limit (the hit is then not counted)."""
        now = time.monotonic() if now is None else now
        cutoff = now - self.window
        if now - self._last_sweep > self.window:  # forget idle keys so memory stays bounded
            self._hits = {k: q for k, q in self._hits.items() if q and q[-1] > cutoff}
            self._last_sweep = now
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= cutoff:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True


def mask_email(email: str) -> str:
    """j***@example.org: enough for its owner to recognise, little for anyone else."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


@dataclass(frozen=True)
class UnsubscribeView:
    subscriber: Subscriber
    mlist: MailingList
    status: MembershipStatus | None  # None: the address is not (or no longer) on the list
    changed: bool = False

    @property
    def masked_email(self) -> str:
        return mask_email(self.subscriber.email)


@dataclass(frozen=True)
class PreferencesView:
    subscriber: Subscriber
    memberships: list[tuple[MailingList, MembershipStatus]]
    joinable: list[MailingList]  # public lists the address is not on


class Subscriptions:
    """The subscriber-facing rules; `relay` carries confirmation and welcome mail."""

    def __init__(self, nl: Newsletter, relay: Relay) -> None:
        self.nl = nl
        self.store = nl.store
        self.signer = nl.signer
        self.relay = relay
        s = nl.settings
        window = s.subscribe_limit_window_minutes * 60
        self.per_ip = SlidingWindow(s.subscribe_limit_per_ip, window)
        self.per_address = SlidingWindow(s.subscribe_limit_per_address, window)

    # --- unsubscribe -------------------------------------------------------------------------

    def _target(self, token: str) -> tuple[Subscriber, MailingList, MembershipStatus | None]:
        sid, lid = self.signer.read_unsubscribe_token(token)
        try:
            return self.store.subscription(sid, lid)
        except NotFoundError:
            # Signed by us but the subscriber or list is gone (erased): same as a bad link.
            raise TokenError("this link no longer points to a subscription") from None

    def unsubscribe_view(self, token: str) -> UnsubscribeView:
        """What the unsubscribe page shows; changes nothing (scanners fetch it)."""
        return UnsubscribeView(*self._target(token))

    def unsubscribe(self, token: str, source: Source) -> UnsubscribeView:
        """Leave the token's list now; idempotent. Queued deliveries to the address are
        skipped in the same transaction, so a running send honours it."""
        sid, lid = self.signer.read_unsubscribe_token(token)
        try:
            sub, mlist, status, changed = self.store.leave(sid, lid, source=source)
        except NotFoundError:
            raise TokenError("this link no longer points to a subscription") from None
        return UnsubscribeView(sub, mlist, status, changed=changed)

    def resubscribe(self, token: str) -> UnsubscribeView:
        """Undo an unsubscribe from the confirmation page (the token proves the mailbox)."""
        sub, mlist, status = self._target(token)
        if status is None:
            return UnsubscribeView(sub, mlist, None)
        changed = self.store.set_membership(sub.id, mlist.id, MembershipStatus.ACTIVE,
                                            source=Source.PAGE)
        return UnsubscribeView(sub, mlist, MembershipStatus.ACTIVE, changed=bool(changed))

    # --- preferences -------------------------------------------------------------------------

    def preferences(self, token: str) -> PreferencesView:
        sid = self.signer.read_preferences_token(token)
        try:
            sub = self.store.get_subscriber(sid)
        except NotFoundError:
            raise TokenError("this link no longer points to a subscription") from None
        mine = self.store.memberships_of(sid)
        on = {m.id for m, _ in mine}
        joinable = [m for m, _ in self.store.all_lists() if m.public and m.id not in on]
        return PreferencesView(sub, mine, joinable)

    def update_preferences(self, token: str, *, keep: set[int], leave_all: bool = False) \
            -> PreferencesView:
        """Make the address active on exactly the lists in `keep` (of those it may choose).

        It may leave any list it is on and join any public list; the token proves it owns
        the mailbox, so joining needs no further confirmation.
        """
        view = self.preferences(token)
        sid = view.subscriber.id
        if leave_all:
            keep = set()
            # Leaving everything is a global opt-out: no import may add the address back.
            self.store.suppress(view.subscriber.email, reason=SuppressionReason.UNSUBSCRIBED,
                                note="left every list on the preferences page")
        elif keep:
            self.store.lift_unsubscribed(view.subscriber.email)
        for mlist, status in view.memberships:
            if mlist.id in keep and status != MembershipStatus.ACTIVE:
                self.store.set_membership(sid, mlist.id, MembershipStatus.ACTIVE,
                                          source=Source.PAGE)
            elif mlist.id not in keep and status in (MembershipStatus.ACTIVE,
                                                     MembershipStatus.PENDING):
                self.store.set_membership(sid, mlist.id, MembershipStatus.UNSUBSCRIBED,
                                          source=Source.PAGE)
        for mlist in view.joinable:
            if mlist.id in keep:
                self.store.set_membership(sid, mlist.id, MembershipStatus.ACTIVE,
                                          source=Source.PAGE, create=True)
        return self.preferences(token)

    # --- subscribe and confirm ---------------------------------------------------------------

    def public_list(self, slug: str) -> MailingList:
        mlist = self.store.get_list(slug)
        if not mlist.public:
            raise NotFoundError(f"no public list {slug!r}")
        return mlist

    async def subscribe(self, slug: str, *, email: str, name: str = "", language: str = "",
                        client: str = "") -> None:
        """A form submission. The outcome the visitor sees is the same whether or not the
        address was already on the list, so the form cannot be used to probe addresses."""
        mlist = self.public_list(slug)
        try:
            address = normalize_email(email)
        except (EmailNotValidError, ValueError, HeaderInjectionError) as exc:
            raise InvalidInputError("email", str(exc)) from None
        name = name.strip()[:200]
        try:
            check_header_text(name, "name")
        except HeaderInjectionError as exc:
            raise InvalidInputError("name", str(exc)) from None
        if language and language not in SUPPORTED_LANGUAGES:
            raise InvalidInputError("language", f"unsupported language {language!r}")
        if not self.per_ip.hit(client or "?") or not self.per_address.hit(address.lower()):
            raise RateLimitedError("too many attempts; please try again later")

        entry = self.store.suppression_of(address)
        if entry is not None and entry.reason != SuppressionReason.UNSUBSCRIBED:
            # Suppressed (complaint, bounce, admin, erased, a domain): no mail goes there, and
            # the visitor sees the usual answer. Only an address that once left everything
            # may come back, and only through the confirmation link it is sent.
            log.info("subscribe form: suppressed address ignored (%s)", entry.reason)
            return
        sub = self.store.add_subscriber(
            address, name=name, attributes={"lang": language} if language else None)
        status = self.store.status_on(sub.id, mlist.id)
        if status == MembershipStatus.ACTIVE:
            return  # already subscribed: nothing to do, and nothing to tell
        if not mlist.double_opt_in and status is None and entry is None:
            self.store.set_membership(sub.id, mlist.id, MembershipStatus.ACTIVE,
                                      source=Source.FORM, create=True)
            if mlist.welcome:
                await self.send_welcome(sub, mlist)
            return
        # Double opt-in, or an address that once left or bounced (even on a single opt-in
        # list, only its owner may bring it back): it stays as it is until confirmed.
        if status is None:
            self.store.set_membership(sub.id, mlist.id, MembershipStatus.PENDING,
                                      source=Source.FORM, create=True)
        every = dt.timedelta(minutes=self.nl.settings.confirm_min_interval_minutes)
        if not self.store.take_confirm_slot(sub.id, every=every):
            log.info("confirmation for subscriber %d not resent: one went out recently", sub.id)
            return
        try:
            await self.send_confirmation(sub, mlist)
        except BaseException:
            self.store.release_confirm_slot(sub.id)
            raise

    def confirm_view(self, token: str) -> tuple[Subscriber, MailingList, MembershipStatus | None]:
        sid, lid = self.signer.read_confirm_token(token)
        try:
            sub, mlist = self.store.get_subscriber(sid), self.store.list_by_id(lid)
        except NotFoundError:
            raise TokenError("this link no longer points to a subscription") from None
        return sub, mlist, self.store.status_on(sid, lid)

    async def confirm(self, token: str) -> tuple[Subscriber, MailingList, bool]:
        """Make the address active on the list; harmless when done twice."""
        sub, mlist, _status = self.confirm_view(token)
        # The owner of the mailbox asked again: an earlier "leave everything" is over.
        self.store.lift_unsubscribed(sub.email)
        changed = self.store.set_membership(sub.id, mlist.id, MembershipStatus.ACTIVE,
                                            source=Source.CONFIRM, create=True)
        if changed and mlist.welcome:
            try:
                await self.send_welcome(sub, mlist)
            except DeliveryError as exc:  # the subscription stands; the welcome is extra
                log.warning("welcome mail to subscriber %d not sent: %s", sub.id, exc)
        return sub, mlist, bool(changed)

    # --- transactional mail ------------------------------------------------------------------

    def language_for(self, sub: Subscriber | None, mlist: MailingList) -> str:
        lang = (sub.language if sub else None) or mlist.language or "en"
        lang = lang.split("-")[0].lower()
        return lang if lang in SUPPORTED_LANGUAGES else "en"

    def render_mail(self, kind: str, sub: Subscriber, mlist: MailingList,
                    **extra: str) -> RenderedIssue:
        """Render a confirmation or welcome mail with the same templates engine and inliner
        as issues; a list may have its own `email/KIND-SLUG.*.j2` templates."""
        env = self.nl.templates
        lang = self.language_for(sub, mlist)
        context = {
            "list": mlist, "lang": lang, "brand_name": self.nl.settings.sender_name,
            "postal_address": self.nl.settings.postal_address, "base_url":
            self.nl.settings.base_url, **extra, **{name: slot(name) for name in SLOTS},
        }
        parts = {}
        for ext in ("html", "txt"):
            try:
                template = env.select_template([f"email/{kind}-{mlist.slug}.{ext}.j2",
                                                f"email/{kind}.{ext}.j2"])
            except jinja2.TemplateNotFound as exc:
                raise NotFoundError(f"template not found: {exc.name}") from None
            parts[ext] = render_template(env, template.name or "", **context)
        subject_template = env.get_template(f"email/{kind}.subject.txt.j2")
        subject = " ".join(subject_template.render(**context).split())
        return finish_rendering(subject, parts["html"], parts["txt"], lang)

    async def send_confirmation(self, sub: Subscriber, mlist: MailingList) -> None:
        hours = self.nl.settings.confirm_valid_hours
        token = self.signer.confirm_token(sub.id, mlist.id, valid_for=hours * 3600)
        url = self.nl.settings.base_url + "/confirm/" + token
        rendered = self.render_mail("confirm", sub, mlist, confirm_url=url,
                                    valid_hours=f"{hours:g}")
        await self._send(rendered, sub, mlist, transactional=True)

    async def send_welcome(self, sub: Subscriber, mlist: MailingList) -> None:
        prefs = self.nl.settings.base_url + "/preferences/" + self.signer.preferences_token(
            sub.id)
        archive = f"{self.nl.settings.base_url}/archive/{mlist.slug}/"
        rendered = self.render_mail("welcome", sub, mlist, preferences_url=prefs,
                                    archive_url=archive)
        await self._send(rendered, sub, mlist)

    async def _send(self, rendered: RenderedIssue, sub: Subscriber, mlist: MailingList, *,
                    transactional: bool = False) -> None:
        """One message through the relay, built by the same PreparedMessage as issues."""
        sender = self.nl.settings.transactional_sender if transactional else None
        message = self.nl.prepare(rendered, [mlist], sender=sender)
        data = message.build(Recipient(sub.id, mlist.id, sub.email, sub.name))
        connection = await self.relay.connect()
        try:
            await connection.send(message.from_address, sub.email, data)
        finally:
            await connection.close()
