"""Admin use cases: lists, subscribers, segments, suppression, privacy and the audit log.

The CLI and the admin API are thin faces over `Admin`. Each change is validated here and
recorded in the audit log with its actor (`cli:USER` or `token:NAME`), so who did what and
when can be read back whichever face was used.
"""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import io
import json
import zoneinfo
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from email_validator import EmailNotValidError

from .errors import ConflictError, HeaderInjectionError, NewsletterError, NotFoundError
from .headers import check_header_text
from .store import directory, suppression
from .store.base import MailingList
from .store.directory import AuditEntry, Segment, SubscriberRow
from .store.imports import normalize_email
from .store.schema import MembershipStatus, SuppressionKind, SuppressionReason
from .store.sql import SLUG_RE, NewMember
from .store.suppression import Suppression
from .subscriptions import SUPPORTED_LANGUAGES

if TYPE_CHECKING:
    from .service import Newsletter

SEGMENT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli:unknown"


class InvalidError(NewsletterError, ValueError):
    """An admin input is invalid; names the field, so the API can point at it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SubscriberDetail:
    id: int
    email: str
    name: str
    attributes: dict[str, Any]
    created_at: dt.datetime
    lists: dict[str, str]          # slug -> status
    hard_bounces: int
    soft_bounces: int
    suppressed: str | None         # why it is suppressed, if it is

    @property
    def language(self) -> str | None:
        value = self.attributes.get("lang")
        return str(value) if value else None

    @property
    def zone(self) -> str | None:
        value = self.attributes.get("tz")
        return str(value) if value else None


@dataclass
class SuppressionImport:
    added: int = 0
    already: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # line, value, reason


def check_email(raw: str, field: str = "email") -> str:
    try:
        return normalize_email(raw)
    except (EmailNotValidError, ValueError, HeaderInjectionError) as exc:
        raise InvalidError(field, f"invalid address {raw!r}: {exc}") from None


def check_zone(zone: str, field: str = "zone") -> str:
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise InvalidError(field, f"unknown time zone {zone!r} (use an IANA name such as "
                           "Europe/Berlin or Asia/Shanghai)") from None
    return zone


def check_language(language: str, field: str = "language") -> str:
    if language not in SUPPORTED_LANGUAGES:
        raise InvalidError(field, f"must be one of {', '.join(SUPPORTED_LANGUAGES)}, "
                           f"not {language!r}")
    return language


def _check_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    for key, value in attrs.items():
        if not isinstance(key, str) or not key.strip() or len(key) > 64:
            raise InvalidError("attributes", f"invalid attribute name {key!r}")
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise InvalidError("attributes", f"attribute {key!r}: only strings, numbers and "
                               "booleans")
    return attrs


class Admin:
    """Admin operations for one actor. Cheap to create: one per command or request."""

    def __init__(self, nl: Newsletter, actor: str) -> None:
        self.nl = nl
        self.actor = actor
        self.engine = nl.store.engine

    # --- audit -----------------------------------------------------------------------------

    def audit(self, action: str, target: str = "", **detail: Any) -> None:
        directory.record_audit(self.engine, self.actor, action, target, detail)

    def audit_entries(self, *, limit: int = 50, before_id: int | None = None,
                      action: str | None = None, actor: str | None = None,
                      since: dt.datetime | None = None) -> list[AuditEntry]:
        return directory.audit_entries(self.engine, limit=limit, before_id=before_id,
                                       action=action, actor=actor, since=since)

    # --- lists -----------------------------------------------------------------------------

    def lists(self) -> list[tuple[MailingList, dict[str, int]]]:
        return self.nl.store.all_lists()

    def get_list(self, slug: str) -> MailingList:
        return self.nl.store.get_list(slug)

    def create_list(self, slug: str, *, name: str | None = None, description: str = "",
                    double_opt_in: bool = True, public: bool = True, language: str = "en",
                    zone: str | None = None, welcome: bool = False) -> MailingList:
        if not SLUG_RE.match(slug):
            raise InvalidError("slug", f"invalid list slug {slug!r}: use lowercase letters, "
                               "digits, '-' and '_', starting with a letter or digit")
        check_language(language)
        if zone:
            check_zone(zone)
        self._check_name(name or slug, "name")
        mlist = self.nl.store.create_list(slug, name=name, description=description,
                                          double_opt_in=double_opt_in, public=public,
                                          language=language, welcome=welcome)
        if zone:
            directory.update_list(self.engine, mlist.id, {"zone": zone})
            mlist = self.nl.store.get_list(slug)
        self.audit("list.create", slug, name=mlist.name, double_opt_in=double_opt_in,
                   public=public, language=language, zone=zone, welcome=welcome)
        return mlist

    def update_list(self, slug: str, *, new_slug: str | None = None, name: str | None = None,
                    description: str | None = None, double_opt_in: bool | None = None,
                    public: bool | None = None, language: str | None = None,
                    zone: str | None = None, welcome: bool | None = None) -> MailingList:
        """Change a list's settings; None leaves a setting as it is (zone "" clears it)."""
        mlist = self.nl.store.get_list(slug)
        changes: dict[str, Any] = {}
        if new_slug is not None and new_slug != slug:
            if not SLUG_RE.match(new_slug):
                raise InvalidError("slug", f"invalid list slug {new_slug!r}")
            changes["slug"] = new_slug
        if name is not None:
            changes["name"] = self._check_name(name, "name")
        if description is not None:
            changes["description"] = description
        for key, value in (("double_opt_in", double_opt_in), ("public", public),
                           ("welcome", welcome)):
            if value is not None:
                changes[key] = value
        if language is not None:
            changes["language"] = check_language(language)
        if zone is not None:
            changes["zone"] = check_zone(zone) if zone else None
        directory.update_list(self.engine, mlist.id, changes)
        if changes:
            self.audit("list.update", slug, **{k: v for k, v in changes.items()})
        return self.nl.store.get_list(changes.get("slug", slug))

    def deletion_impact(self, slug: str) -> dict[str, int]:
        return directory.list_impact(self.engine, self.nl.store.get_list(slug).id)

    def delete_list(self, slug: str) -> dict[str, int]:
        mlist = self.nl.store.get_list(slug)
        impact = directory.list_impact(self.engine, mlist.id)
        directory.delete_list(self.engine, mlist.id)
        self.audit("list.delete", slug, **impact)
        return impact

    # --- subscribers -----------------------------------------------------------------------

    def subscribers(self, *, list_slug: str | None = None, status: str | None = None,
                    search: str | None = None, after_id: int = 0,
                    limit: int = 50) -> list[SubscriberRow]:
        if status is not None and status not in set(MembershipStatus):
            raise InvalidError("status", f"must be one of "
                               f"{', '.join(s.value for s in MembershipStatus)}")
        list_id = self.nl.store.get_list(list_slug).id if list_slug else None
        return directory.subscriber_rows(self.engine, list_id=list_id, status=status,
                                         search=search, after_id=after_id, limit=limit)

    def subscriber(self, email_or_id: str | int) -> SubscriberDetail:
        sid = directory.subscriber_id(self.engine, email_or_id)
        sub = self.nl.store.get_subscriber(sid)
        hard, soft = self.nl.store.bounce_counts(sid)
        with self.engine.begin() as conn:
            entry = suppression.find(conn, sub.email)
        return SubscriberDetail(
            sub.id, sub.email, sub.name, dict(sub.attributes), sub.created_at,
            {m.slug: s.value for m, s in self.nl.store.memberships_of(sid)}, hard, soft,
            None if entry is None else f"{entry.reason} ({entry.kind.value})")

    def add_subscriber(self, email: str, *, lists: Sequence[str], name: str = "",
                       attributes: dict[str, Any] | None = None, language: str | None = None,
                       zone: str | None = None) -> SubscriberDetail:
        """Add an address (active at once) to lists. Refused if suppressed; never
        reactivates an address that left or bounced on one of the lists."""
        address = check_email(email)
        self._check_name(name, "name")
        attrs = _check_attributes(dict(attributes or {}))
        if language:
            attrs["lang"] = check_language(language)
        if zone:
            attrs["tz"] = check_zone(zone)
        if not lists:
            raise InvalidError("lists", "name at least one list")
        self._refuse_suppressed(address)
        mlists = [self.nl.store.get_list(slug) for slug in lists]
        refused = []
        for mlist in mlists:
            result = self.nl.store.upsert_members(
                mlist.id, [NewMember(address, name, attrs or None)], source="admin")
            if result.opted_out:
                refused.append(mlist.slug)
        self.audit("subscriber.add", address.lower(), lists=list(lists))
        if refused:
            raise ConflictError(f"{address} unsubscribed from or bounced on "
                                f"{', '.join(refused)} before; not reactivated (use "
                                "resubscribe with the explicit flag)")
        return self.subscriber(address)

    def edit_subscriber(self, email_or_id: str | int, *, email: str | None = None,
                        name: str | None = None, set_attributes: dict[str, Any] | None = None,
                        unset_attributes: Sequence[str] = (), language: str | None = None,
                        zone: str | None = None) -> SubscriberDetail:
        """Change a subscriber's address, name, attributes, language (`lang` attribute) or
        zone (`tz` attribute). "" for language or zone removes it."""
        current = self.subscriber(email_or_id)
        changes: dict[str, Any] = {}
        if email is not None:
            address = check_email(email)
            if address.lower() != current.email.lower():
                self._refuse_suppressed(address)
                changes["email"] = address
                changes["email_key"] = address.lower()
        if name is not None:
            changes["name"] = self._check_name(name, "name")
        attrs = dict(current.attributes)
        attrs.update(_check_attributes(dict(set_attributes or {})))
        for key in unset_attributes:
            attrs.pop(key, None)
        if language is not None:
            if language:
                attrs["lang"] = check_language(language)
            else:
                attrs.pop("lang", None)
        if zone is not None:
            if zone:
                attrs["tz"] = check_zone(zone)
            else:
                attrs.pop("tz", None)
        if attrs != current.attributes:
            changes["attributes"] = attrs
        directory.update_subscriber(self.engine, current.id, changes)
        if changes:
            self.audit("subscriber.edit", current.email.lower(),
                       fields=sorted(k for k in changes if k != "email_key"))
        return self.subscriber(current.id)

    def move_subscriber(self, email_or_id: str | int, *, from_slug: str,
                        to_slug: str) -> SubscriberDetail:
        current = self.subscriber(email_or_id)
        source, target = self.nl.store.get_list(from_slug), self.nl.store.get_list(to_slug)
        if source.id == target.id:
            raise InvalidError("to", "the lists are the same")
        directory.move(self.engine, current.id, source.id, target.id, source="admin")
        self.audit("subscriber.move", current.email.lower(), from_list=from_slug,
                   to_list=to_slug)
        return self.subscriber(current.id)

    def unsubscribe(self, email_or_id: str | int, *, list_slug: str | None = None) -> int:
        """Unsubscribe from one list or all; running sends skip it for every message not
        yet sent. From all lists also puts the address on the suppression list."""
        current = self.subscriber(email_or_id)
        list_id = self.nl.store.get_list(list_slug).id if list_slug else None
        changed = self.nl.store.set_membership(current.id, list_id,
                                               MembershipStatus.UNSUBSCRIBED, source="admin")
        if list_slug is None:
            with self.engine.begin() as conn:
                suppression.add(conn, current.email.lower(), kind=SuppressionKind.ADDRESS,
                                reason=SuppressionReason.UNSUBSCRIBED, note="by an admin")
        self.audit("subscriber.unsubscribe", current.email.lower(),
                   list=list_slug or "*", changed=len(changed))
        return len(changed)

    def resubscribe(self, email_or_id: str | int, *, list_slug: str,
                    explicit: bool = False) -> SubscriberDetail:
        """Make an opted-out address active again: only with `explicit` (the admin states
        the subscriber asked for it); recorded in the history and the audit log."""
        if not explicit:
            raise ConflictError("resubscribing an address that opted out needs the explicit "
                                "flag (--explicit / explicit=true): only do it when the "
                                "subscriber asked")
        current = self.subscriber(email_or_id)
        mlist = self.nl.store.get_list(list_slug)
        with self.engine.begin() as conn:
            entry = suppression.find(conn, current.email)
            if entry is not None and entry.reason != SuppressionReason.UNSUBSCRIBED:
                raise ConflictError(f"{current.email} is suppressed ({entry.reason}); lift "
                                    "the suppression first")
            suppression.lift_unsubscribed(conn, current.email)
        self.nl.store.set_membership(current.id, mlist.id, MembershipStatus.ACTIVE,
                                     source="resubscribe", create=True)
        self.audit("subscriber.resubscribe", current.email.lower(), list=list_slug)
        return self.subscriber(current.id)

    def history(self, email_or_id: str | int) -> list[dict[str, Any]]:
        return self.nl.store.history(directory.subscriber_id(self.engine, email_or_id))

    def export_data(self, email_or_id: str | int) -> dict[str, Any]:
        sid = directory.subscriber_id(self.engine, email_or_id)
        data = directory.export_data(self.engine, sid)
        self.audit("privacy.export", data["subscriber"]["email"].lower())
        return data

    def erase(self, email_or_id: str | int) -> dict[str, int]:
        sid = directory.subscriber_id(self.engine, email_or_id)
        counts = directory.erase(self.engine, sid)
        # The audit entry names the subscriber by id only: the address is what was erased.
        self.audit("privacy.erase", f"subscriber #{sid} (erased)", **counts)
        return counts

    # --- segments --------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        return directory.segment_rows(self.engine)

    def get_segment(self, name: str) -> Segment:
        return directory.get_segment(self.engine, name)

    def check_filter(self, text: str) -> Any:
        """The parsed filter; FilterSyntaxError (with the position) if it is invalid or
        names a list that does not exist."""
        from . import segments as seglang  # the parser is loaded only where filters are used

        flt = seglang.parse(text)
        seglang.check_lists(flt, directory.slugs(self.engine), text=text)
        return flt

    def save_segment(self, name: str, filter_text: str, description: str | None = None, *,
                     create: bool = True) -> Segment:
        if not name or len(name) > 64 or not set(name) <= SEGMENT_NAME_CHARS:
            raise InvalidError("name", "a segment name uses a-z, 0-9, '-' and '_' (at most "
                               "64)")
        self.check_filter(filter_text)
        created = directory.save_segment(self.engine, name, filter_text, description,
                                         create=create)
        self.audit("segment.create" if created else "segment.update", name,
                   filter=filter_text)
        return directory.get_segment(self.engine, name)

    def delete_segment(self, name: str) -> None:
        directory.delete_segment(self.engine, name)
        self.audit("segment.delete", name)

    def count(self, filter_text: str, *, lists: Sequence[str] = (),
              active_only: bool = True) -> int:
        """How many subscribers match (on the given lists, if any; active ones only unless
        told otherwise) — what a send to it would reach before suppression."""
        from . import segments as seglang

        flt = self.check_filter(filter_text)
        ids = directory.list_ids(self.engine, lists) if lists else None
        return seglang.count_matching(self.engine, flt, list_ids=ids, active_only=active_only)

    # --- suppression -----------------------------------------------------------------------

    def suppress(self, value: str, *, reason: str = SuppressionReason.ADMIN,
                 note: str = "") -> Suppression:
        """Suppress an address, or a whole domain (given without '@', or as '@domain')."""
        kind, key = self._suppression_key(value)
        if reason not in set(SuppressionReason) or reason == SuppressionReason.ERASED:
            raise InvalidError("reason", "one of unsubscribed, hard-bounce, complaint, admin")
        with self.engine.begin() as conn:
            added = suppression.add(conn, key, kind=kind, reason=reason, note=note)
            entry = suppression.get(conn, key)
        if added:
            self.audit("suppression.add", key, kind=kind.value, reason=reason)
        return entry

    def unsuppress(self, value: str) -> Suppression:
        _kind, key = self._suppression_key(value)
        with self.engine.begin() as conn:
            entry = suppression.remove(conn, key)
        self.audit("suppression.remove", key, kind=entry.kind.value, reason=entry.reason)
        return entry

    def suppressions(self, *, kind: str | None = None,
                     reason: str | None = None) -> Iterator[Suppression]:
        return suppression.entries(self.engine,
                                   kind=SuppressionKind(kind) if kind else None,
                                   reason=reason)

    def import_suppressions(self, path: Path, *, reason: str = SuppressionReason.ADMIN) \
            -> SuppressionImport:
        """A CSV (first column, or a column named email/value/domain, plus optional
        reason and note) or a plain file of one address or domain per line."""
        result = SuppressionImport()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise NewsletterError(f"{path}: cannot read: {exc}") from None
        rows = list(csv.reader(io.StringIO(text)))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        col = next((header.index(c) for c in ("email", "value", "address", "domain")
                    if c in header), None)
        start = 1 if col is not None else 0
        col = col or 0
        r_col = header.index("reason") if "reason" in header else None
        n_col = header.index("note") if "note" in header else None
        with self.engine.begin() as conn:
            for i, row in enumerate(rows[start:], start=start + 1):
                if not row or not any(c.strip() for c in row):
                    continue
                raw = row[col].strip() if col < len(row) else ""
                why = row[r_col].strip() if r_col is not None and r_col < len(row) else ""
                why = why or reason
                try:
                    kind, key = self._suppression_key(raw)
                    if why not in set(SuppressionReason) or why == SuppressionReason.ERASED:
                        raise InvalidError("reason", f"unknown reason {why!r}")
                except (InvalidError, ValueError) as exc:
                    result.rejected.append((i, raw, str(exc)))
                    continue
                note = row[n_col].strip() if n_col is not None and n_col < len(row) else ""
                if suppression.add(conn, key, kind=kind, reason=why, note=note):
                    result.added += 1
                else:
                    result.already += 1
        self.audit("suppression.import", str(path.name), added=result.added,
                   already=result.already, rejected=len(result.rejected))
        return result

    def export_suppressions(self, out: TextIO, *, fmt: str = "csv") -> int:
        """Stream the suppression list (erased hashes included: they are not personal)."""
        n = 0
        if fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(["value", "kind", "reason", "note", "created_at"])
        elif fmt != "jsonl":
            raise InvalidError("format", "csv or jsonl")
        for entry in self.suppressions():
            record = [entry.value, entry.kind.value, entry.reason, entry.note,
                      entry.created_at.isoformat()]
            if fmt == "csv":
                writer.writerow(record)
            else:
                out.write(json.dumps(dict(zip(("value", "kind", "reason", "note", "created_at"),
                                              record, strict=True)), ensure_ascii=False) + "\n")
            n += 1
        return n

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str, field_name: str) -> str:
        try:
            return check_header_text(name, field_name)
        except HeaderInjectionError as exc:
            raise InvalidError(field_name, str(exc)) from None

    @staticmethod
    def _suppression_key(value: str) -> tuple[SuppressionKind, str]:
        raw = value.strip()
        if "@" in raw and not raw.startswith("@"):
            return SuppressionKind.ADDRESS, check_email(raw, "value").lower()
        try:
            return SuppressionKind.DOMAIN, suppression.normalize_domain(raw)
        except ValueError as exc:
            raise InvalidError("value", str(exc)) from None

    def _refuse_suppressed(self, address: str) -> None:
        with self.engine.begin() as conn:
            entry = suppression.find(conn, address)
        if entry is not None:
            what = "erased on request" if entry.kind == SuppressionKind.HASH else \
                f"suppressed ({entry.reason}" + (
                    f", domain {entry.value}" if entry.kind == SuppressionKind.DOMAIN else "")\
                + ")"
            raise ConflictError(f"{address} is {what}; not added")


__all__ = ["Admin", "InvalidError", "NotFoundError", "SubscriberDetail", "cli_actor"]
