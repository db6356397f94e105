"""Use cases shared by the CLI and, later, the web app: wiring settings to store, render and
delivery. Nothing here parses arguments or prints."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

if TYPE_CHECKING:
    from .delivery.bounces import Bounce
    from .delivery.dkim import DkimSigner
    from .store.schedules import Schedule

from .content.model import Issue
from .content.parse import load_issue
from .delivery.capture import CaptureServer
from .delivery.engine import Engine, Progress, RelayPlan, RetryPolicy, RunReport, runner_is_dead
from .delivery.relay import SmtpRelayClient
from .errors import ConflictError, NotFoundError, RenderError
from .headers import format_address
from .render.issue import Branding, RenderedIssue, SizeLevel, fill_slots, render_issue, size_check
from .render.message import (
    Editions,
    ListInfo,
    MessageSource,
    PreparedMessage,
    Recipient,
    undot,
)
from .render.templates import make_environment
from .render.tokens import TokenError, TokenSigner
from .settings import Settings
from .store.base import Campaign, DeliveryCounts, Due, MailingList
from .store.db import make_engine, migrate
from .store.schedules import ScheduleStore
from .store.schema import CampaignStatus, DeliveryStatus
from .store.sql import SqlStore

log = logging.getLogger(__name__)


def send_runner() -> asyncio.Runner:
    """An event loop for a send: uvloop when installed (it comes with uvicorn[standard]),
    whose socket and callback handling costs less of a send's CPU than asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - installed with uvicorn[standard] on Linux
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def archive_path(issue: Issue) -> str:
    """An issue's place in a list's archive: its number if it has one, else its key."""
    return str(issue.number) if issue.number is not None else issue.key


@dataclass
class SendPlan:
    """What `send` is about to do, for the confirmation prompt and the summary."""

    campaign: Campaign
    lists: list[MailingList]
    new: bool
    due: int
    notes: list[str] = field(default_factory=list)


@dataclass
class BuildResult:
    html: Path
    text: Path
    eml: Path
    html_bytes: int
    # The other language editions, each written as issue.LANG.html/.txt/.eml.
    editions: dict[str, BuildResult] = field(default_factory=dict)


class Newsletter:
    """The application: one per process, built from Settings; parts are created on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def store(self) -> SqlStore:
        engine = make_engine(self.settings.resolved_database_url)
        migrate(engine)
        return SqlStore(engine)

    @cached_property
    def signer(self) -> TokenSigner:
        return TokenSigner(self.settings.signing_keys())

    @cached_property
    def templates(self) -> jinja2.Environment:
        env = make_environment(self.settings.templates_dir)
        # Confirmation and welcome mail share the issue's branding (their context is built
        # elsewhere, so the brand travels as a global).
        env.globals["brand"] = self.branding
        return env

    @cached_property
    def branding(self) -> Branding:
        s = self.settings
        return Branding(logo_url=s.brand_logo_url, logo_width=s.brand_logo_width,
                        color=s.brand_color, accent_color=s.brand_accent_color,
                        footer_text=s.brand_footer_text)

    # --- rendering ---------------------------------------------------------------------------

    def render(self, issue: Issue) -> RenderedIssue:
        return render_issue(
            issue, self.templates,
            brand_name=self.settings.brand_name or self.settings.sender_name or issue.title,
            postal_address=self.settings.postal_address, branding=self.branding,
        )

    def list_info(self, mlist: MailingList) -> ListInfo:
        label = f"{mlist.slug}.{self.settings.list_domain}"
        return ListInfo(name=mlist.name, list_id_header=format_address(mlist.name, label))

    def archive_url(self, mlist: MailingList, issue: Issue | None = None, *,
                    edition: bool = False) -> str:
        """The list's web archive, or one issue's page in it (with `edition`, that
        language's page: /archive/SLUG/NUMBER/LANG). A private list's URL ends in
        '?t=' for the reader's token (PreparedMessage appends it per recipient)."""
        url = f"{self.settings.base_url}/archive/{mlist.slug}/"
        if issue is not None:
            url += archive_path(issue)
            if edition and issue.language.lower() != mlist.language.lower():
                url += f"/{issue.language.lower()}"
            if not mlist.public:
                url += "?t="
        return url

    def prepare(self, rendered: RenderedIssue, lists: Sequence[MailingList], *,
                campaign_id: int = 0, subject_prefix: str = "",
                issue: Issue | None = None, edition: bool = False,
                sender: tuple[str, str] | None = None) -> PreparedMessage:
        """The message, ready to build per recipient; with `issue`, its "view in browser"
        links point at the issue's archive page on each list."""
        s = self.settings
        from_name, from_address = sender or (s.sender_name, s.sender_email)
        return PreparedMessage(
            rendered, from_address=from_address, from_name=from_name,
            base_url=s.base_url, unsubscribe_token=self.signer.unsubscribe_token,
            lists={m.id: self.list_info(m) for m in lists},
            message_id_domain=s.sender_domain, campaign_id=campaign_id,
            subject_prefix=subject_prefix,
            web_urls={m.id: self.archive_url(m, issue, edition=edition) for m in lists}
            if issue else None,
            web_token=self.signer.archive_token,
            preferences_token=self.signer.preferences_token,
        )

    def build_files(self, path: Path, out_dir: Path) -> BuildResult:
        """issue.html, issue.txt and a sample issue.eml, as a reader would get them; each
        other language edition as issue.LANG.html, .txt and .eml beside them."""
        editions = load_issue(path).editions()
        main, *others = editions.values()
        result = self._build_edition(main, out_dir, "issue")
        for other in others:
            result.editions[other.language] = self._build_edition(
                other, out_dir, f"issue.{other.language}")
        return result

    def _build_edition(self, issue: Issue, out_dir: Path, stem: str) -> BuildResult:
        rendered = self.render(issue)
        sample_list = MailingList(0, "sample", "Sample list", "", None)  # type: ignore[arg-type]
        message = self.prepare(rendered, [sample_list], issue=issue)
        reader = Recipient(subscriber_id=0, list_id=0, email="reader@example.org",
                           name="Sample Reader")
        values = {"unsubscribe_url": message.unsubscribe_url(reader),
                  "recipient_email": reader.email, "list_name": sample_list.name,
                  "web_url": message.web_url(reader),
                  "preferences_url": message.preferences_url(reader)}
        out_dir.mkdir(parents=True, exist_ok=True)
        result = BuildResult(out_dir / f"{stem}.html", out_dir / f"{stem}.txt",
                             out_dir / f"{stem}.eml", 0)
        html = fill_slots(rendered.html, {k: escape(v) for k, v in values.items()})
        result.html.write_text(html, encoding="utf-8")
        result.text.write_text(fill_slots(rendered.text, values), encoding="utf-8")
        result.eml.write_bytes(undot(message.build(reader)))
        result.html_bytes = len(html.encode("utf-8"))
        return result

    # --- sending -----------------------------------------------------------------------------

    def render_editions(self, issue: Issue) \
            -> tuple[Issue, RenderedIssue, list[dict[str, str]]]:
        """Render every edition once: the main edition (this issue's language) and the
        others as rows for campaign_editions."""
        editions = issue.editions()  # this issue's language first
        main = next(iter(editions.values()))
        others = []
        for lang, edition in list(editions.items())[1:]:
            r = self.render(edition)
            others.append({"language": lang, "subject": r.subject,
                           "issue_json": edition.model_dump_json(), "html": r.html,
                           "text": r.text})
        return main, self.render(main), others

    def segment_filter(self, names: Sequence[str]) -> str | None:
        """The filter of a send to these segments: any of them (or), checked now."""
        if not names:
            return None
        from . import segments as seglang
        from .store import directory

        texts = [directory.get_segment(self.store.engine, n).filter for n in dict.fromkeys(names)]
        text = texts[0] if len(texts) == 1 else " or ".join(f"({t})" for t in texts)
        seglang.check_lists(seglang.parse(text), directory.slugs(self.store.engine), text=text)
        return text

    def plan_send(self, path: Path, slugs: Sequence[str], *, again: bool = False,
                  segments: Sequence[str] = (), force: bool = False) -> SendPlan:
        """Find the campaign this send continues, or create one; nothing is sent yet.

        With segments, the audience is the active members matching any of them: on the
        given lists, or on every list where someone matches when no list is given. An issue
        whose HTML Gmail would clip is refused unless `force`."""
        issue = load_issue(path)
        segment_filter = self.segment_filter(segments)
        if not slugs and segment_filter is None:
            raise ConflictError("name a list or a segment to send to")
        if not slugs:
            from . import segments as seglang

            slugs = self.store.lists_matching(seglang.parse(segment_filter or ""))
            if not slugs:
                raise ConflictError(f"nobody active on any list matches segment(s) "
                                    f"{', '.join(segments)}")
        mlists = [self.store.get_list(slug) for slug in dict.fromkeys(slugs)]
        list_ids = tuple(sorted(m.id for m in mlists))
        notes: list[str] = []
        names = ", ".join(m.slug for m in mlists)
        if segment_filter is not None:
            names = f"segment {', '.join(dict.fromkeys(segments))} on {names}"
        previous = [c for c in self.store.find_campaigns(issue.key) if c.list_ids == list_ids
                    and c.segment_filter == segment_filter
                    and c.status != CampaignStatus.CANCELLED]
        if previous:
            campaign = previous[0]
            counts = self.store.delivery_counts(campaign.id)
            finished = campaign.status == CampaignStatus.COMPLETED and counts.due == 0
            if again and not finished:
                raise ConflictError(
                    f"campaign {campaign.id} of issue '{issue.key}' to {names} is unfinished; "
                    "run without --again to resume it first")
            if finished and not again:
                when = f"{campaign.finished_at:%Y-%m-%d %H:%M} UTC" if campaign.finished_at else ""
                raise ConflictError(
                    f"issue '{issue.key}' was already sent to {names} {when} "
                    f"(campaign {campaign.id}: sent {counts[DeliveryStatus.SENT]}); "
                    "use --again to send it to everyone once more")
            if campaign.status == CampaignStatus.PAUSED:
                raise ConflictError(
                    f"campaign {campaign.id} of issue '{issue.key}' is paused"
                    + (f" ({campaign.status_note})" if campaign.status_note else "")
                    + f"; resume it with: newsletter campaigns resume {campaign.id}")
            if not again:
                return self._resume_plan(issue, campaign, counts, mlists)
        main, rendered, others = self.render_editions(issue)
        for lang, html in [(main.language, rendered.html), *((e["language"], e["html"])
                                                            for e in others)]:
            size = size_check(html)
            edition = f" ({lang} edition)" if others else ""
            if size.level is SizeLevel.OVER and not force:
                raise RenderError(f"{path}{edition}: {size.describe()}; shorten the issue, or "
                                  "send it anyway with --force")
            if size.level is not SizeLevel.OK:
                notes.append(f"{size.describe()}{edition}")
        due = self.store.audience_count(list_ids, issue_key=None if again else issue.key,
                                        segment_filter=segment_filter)
        reach = self.store.audience_count(list_ids, segment_filter=segment_filter)
        if due < reach and not again:
            notes.append(f"{reach - due} subscriber(s) of {names} already got this issue (or are "
                         "due it) from another send and are left out")
        campaign = self.store.create_campaign(
            issue_key=issue.key, content_hash=issue.content_hash(), subject=rendered.subject,
            issue_json=main.model_dump_json(), html=rendered.html, text=rendered.text,
            list_ids=list_ids, resend=again, segment_filter=segment_filter,
            segment_names=", ".join(dict.fromkeys(segments)) or None, editions=others,
        )
        if others:
            notes.append("editions: " + ", ".join([main.language, *(e["language"] for e in others)])
                         + " (each subscriber gets its lang's, else its list's language, else "
                         + main.language + ")")
        return SendPlan(campaign, mlists, new=True, due=due, notes=notes)

    def _resume_plan(self, issue: Issue, campaign: Campaign, counts: DeliveryCounts,
                     mlists: list[MailingList]) -> SendPlan:
        """The plan for continuing an unfinished campaign of the same issue and lists."""
        notes: list[str] = []
        if campaign.content_hash != issue.content_hash():
            notes.append("the issue file changed since this campaign started; the rest of "
                         "the list gets the version the others got")
        if campaign.started_at is None:
            due = self.store.audience_count(
                campaign.list_ids, issue_key=None if campaign.resend else issue.key,
                segment_filter=campaign.segment_filter)
        else:
            due = counts.due + counts[DeliveryStatus.SENDING]
            notes.append(f"resuming campaign {campaign.id}: {counts[DeliveryStatus.SENT]} "
                         f"already sent, {counts.due} due")
        if counts[DeliveryStatus.UNKNOWN]:
            notes.append(f"{counts[DeliveryStatus.UNKNOWN]} with unknown outcome from an "
                         "interrupted run are not resent")
        return SendPlan(campaign, mlists, new=False, due=due, notes=notes)

    def relay_plans(self, domain: str | None = None) -> list[RelayPlan]:
        """The configured relays for a sender domain (default: from_address's): those whose
        from_domains name it, else those without from_domains, else all of them."""
        configs = self.settings.relay_configs()
        domain = (domain or self.settings.sender_domain).lower()
        chosen = ([c for c in configs if domain in [d.lower() for d in c.from_domains]]
                  or [c for c in configs if not c.from_domains] or configs)
        return [RelayPlan(SmtpRelayClient(c.smtp, timeout=self.settings.smtp_timeout),
                          name=c.label[:64], concurrency=c.concurrency, rate=c.rate,
                          per_hour=c.per_hour, per_day=c.per_day) for c in chosen]

    def engine(self, relays: Sequence[RelayPlan], *,
               on_progress: Callable[[Progress], None] | None = None,
               worker: bool = False) -> Engine:
        """The delivery engine with this installation's policies: retries, bounces, VERP,
        DKIM."""
        s = self.settings
        # A store of its own per run: each run holds a ledger-writer connection and closes
        # it at its end, and one process may run several campaigns at once (the scheduler
        # firing one while resuming another's retries).
        return Engine(
            SqlStore(self.store.engine), relays,
            batch_size=s.worker_batch_size if worker else s.batch_size,
            lease=s.worker_lease_seconds if worker else 30.0,
            on_progress=on_progress,
            max_relay_failures=s.relay_failure_limit or None,
            cooldown=s.relay_cooldown_seconds,
            retry=RetryPolicy(base=s.retry_base_seconds, max_interval=s.retry_max_interval_seconds,
                              max_age=s.retry_max_age_hours * 3600, wait=s.retry_wait_seconds),
            bounce_threshold=s.bounce_threshold,
            envelope=self.verp_addresses() if s.verp else None,
            sign=self.dkim.sign if self.dkim is not None else None,
            threaded_commits=self.store.engine.dialect.name != "sqlite",
        )

    def verp_addresses(self) -> Callable[[Due], str]:
        """Per message: bounce+TOKEN@domain, so a bounce names the delivery it is about.
        The address is split once here: this runs for every message."""
        local, _, domain = self.settings.bounce_mailbox.partition("@")
        prefix, suffix = local + "+", "@" + domain
        token = self.signer.bounce_token
        return lambda due: prefix + token(due.delivery_id) + suffix

    @cached_property
    def dkim(self) -> DkimSigner | None:
        s = self.settings
        if s.dkim_key_file is None:
            return None
        from .delivery.dkim import DkimSigner

        return DkimSigner.from_file(s.dkim_key_file, selector=s.dkim_selector or "newsletter",
                                    domain=s.dkim_domain or s.sender_domain)

    def campaign_message(self, c: Campaign, mlists: Sequence[MailingList]) -> MessageSource:
        """How each recipient's message of this campaign is built (every edition)."""
        issue = Issue.model_validate_json(c.issue_json)
        rendered = RenderedIssue(c.subject, c.html, c.text, issue.language)
        editions = self.store.campaign_editions(c.id)
        if not editions:
            return self.prepare(rendered, mlists, campaign_id=c.id, issue=issue)
        others = {}
        for lang, e in editions.items():
            e_issue = Issue.model_validate_json(e["issue_json"])
            others[lang] = self.prepare(
                RenderedIssue(e["subject"], e["html"], e["text"], lang), mlists,
                campaign_id=c.id, issue=e_issue, edition=True)
        return Editions(self.prepare(rendered, mlists, campaign_id=c.id, issue=issue,
                                     edition=True), others)

    def publish_campaign(self, c: Campaign) -> None:
        """Put the campaign's issue (every edition) in its lists' web archives."""
        issue = Issue.model_validate_json(c.issue_json)
        editions = self.store.campaign_editions(c.id)
        self.store.publish(c, number=issue.number, language=issue.language.lower(),
                           editions=[(lang, e["subject"], e["issue_json"])
                                     for lang, e in editions.items()])

    @contextlib.asynccontextmanager
    async def delivery_relays(self, *, force_capture: bool = False) \
            -> AsyncIterator[list[RelayPlan]]:
        """The configured relays, or the built-in capture server (started here and stopped
        on leaving) when none is configured."""
        relays = [] if force_capture else self.relay_plans()
        if relays:
            yield relays
            return
        async with CaptureServer(self.settings.outbox_dir) as capture:
            yield [RelayPlan(SmtpRelayClient(capture.relay, timeout=self.settings.smtp_timeout),
                             name="capture", concurrency=self.settings.send_concurrency,
                             rate=self.settings.send_rate)]

    async def run(self, plan: SendPlan, *, on_progress: Callable[[Progress], None] | None = None,
                  force_capture: bool = False, retry_now: bool = True) -> RunReport:
        """Send the planned campaign through the relays, or the capture server if none is set.
        With delivery_workers, hand it to the `newsletter worker` processes instead (the
        report then says `workers`); the demo (force_capture) always sends here.

        A paused campaign is resumed: its ledger says who still needs the issue.
        """
        c = plan.campaign
        # The web version exists before the first mail that links to it goes out.
        self.publish_campaign(c)
        self.store.unpause_campaign(c.id)
        if self.settings.delivery_workers and not force_capture:
            start = self.store.start_campaign(c.id, retry_now=retry_now)
            counts = self.store.delivery_counts(c.id)
            return RunReport(progress=Progress(due=counts.due), start=start,
                             status=self.store.campaign_status(c.id), workers=True)
        message = self.campaign_message(c, plan.lists)
        async with self.delivery_relays(force_capture=force_capture) as relays:
            engine = self.engine(relays, on_progress=on_progress)
            current = self.store.get_campaign(c.id)
            return await engine.run(c.id, message, sender=self.settings.sender_email,
                                    takeover=runner_is_dead(current.runner),
                                    retry_now=retry_now)

    def record_bounces(self, bounces: Sequence[Bounce], _raw: bytes = b"") -> int:
        """Record bounces that arrived later; returns how many matched a delivery.

        The VERP token is signed, so it is trusted. Without one, a bounce is matched by the
        Message-ID's campaign and subscriber only if it names that subscriber's address
        (Message-IDs are not secret, and a forged bounce must not unsubscribe anyone).
        """
        matched = 0
        for b in bounces:
            delivery_id: int | None = None
            if b.verp_token:
                try:
                    delivery_id = self.signer.read_bounce_token(b.verp_token)
                except TokenError:
                    log.warning("bounce with an invalid VERP token ignored: %s", b.recipient)
            if delivery_id is None and b.campaign_id and b.subscriber_id and b.recipient:
                found = self.store.find_delivery(b.campaign_id, b.subscriber_id)
                if found and found[1].lower() == b.recipient.lower():
                    delivery_id = found[0]
            if delivery_id is None:
                log.info("bounce for %s matches no delivery", b.recipient or "?")
                continue
            reason = " ".join(x for x in (b.status, b.diagnostic) if x) or b.action
            if self.store.record_bounce(delivery_id=delivery_id, hard=b.kind == "hard",
                                        reason=reason, threshold=self.settings.bounce_threshold):
                matched += 1
        return matched

    def digest_state(self, name: str) -> tuple[int, dt.datetime | None]:
        """(next issue number, cutoff of the last issue sent) for a digest, over all its
        schedules."""
        schedules = ScheduleStore(self.store.engine)
        sent = [r for s in schedules.all() if s.kind == "digest" and s.digest == name
                for r in schedules.runs(s.id) if r.outcome == "sent"]
        last = max((r.fire_time for r in sent), default=None)
        return len(sent) + 1, last

    def preview_digest(self, name: str, out_dir: Path) -> tuple[Any, BuildResult | None]:
        """Assemble the next issue of a digest and render it, without sending or archiving."""
        from . import digest

        definitions = digest.load_definitions(self.settings.digests_dir,
                                              archive_root=self.settings.var_dir / "digests")
        if name not in definitions:
            raise NotFoundError(f"no digest {name!r} in {self.settings.digests_dir}")
        number, since = self.digest_state(name)
        assembly = digest.preview(definitions[name], number=number, since=since,
                                  now=dt.datetime.now(dt.UTC))
        if assembly.issue is None or assembly.markdown is None:
            return assembly, None
        out_dir.mkdir(parents=True, exist_ok=True)
        source = out_dir / f"{number}.md"
        source.write_text(assembly.markdown, encoding="utf-8")
        return assembly, self.build_files(source, out_dir)

    async def fire_digest(self, schedule: Schedule, fire_time: dt.datetime) \
            -> tuple[str, int | None, str]:
        """Assemble a recurring digest from what arrived since its last issue, archive the
        assembled file, and send it. Returns (outcome, campaign id, note)."""
        from . import digest

        definitions = digest.load_definitions(self.settings.digests_dir,
                                              archive_root=self.settings.var_dir / "digests")
        if schedule.digest not in definitions:
            raise NotFoundError(f"no digest {schedule.digest!r} in {self.settings.digests_dir}")
        defn = definitions[schedule.digest]
        number, since = self.digest_state(defn.name)
        assembly = digest.assemble(defn, number=number, since=since, now=fire_time, write=True)
        skipped = "; ".join(f"{o}: {why}" for o, why in assembly.skipped)
        if assembly.issue is None:
            if self.settings.digest_skip_empty:
                return "skipped", None, "no new items" + (f" ({skipped})" if skipped else "")
            raise ConflictError(f"digest {defn.name} has no items to send")
        assert assembly.path is not None
        plan = self.plan_send(assembly.path, list(defn.lists))
        report = await self.run(plan, retry_now=False)
        note = f"issue {number}: {len(assembly.items)} items, " + (
            "handed to the workers" if report.workers else f"sent {report.progress.sent}")
        return "sent", plan.campaign.id, note + (f"; skipped {skipped}" if skipped else "")

    def resume_plan(self, campaign_id: int) -> SendPlan:
        """A plan that continues an existing campaign (resume, retry)."""
        c = self.store.get_campaign(campaign_id)
        if c.status == CampaignStatus.CANCELLED:
            raise ConflictError(f"campaign {campaign_id} was cancelled")
        mlists = list(self.store.lists_by_id(c.list_ids).values())
        counts = self.store.delivery_counts(c.id)
        return SendPlan(c, mlists, new=False, due=counts.remaining)

    @property
    def capture_mode(self) -> bool:
        return not self.settings.relay_configs()
