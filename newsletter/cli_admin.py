"""Admin commands of `newsletter`: list and subscriber edits, segments, suppression, privacy,
and the audit log. Thin faces over newsletter.admin; registered on cli.py's groups."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .admin import Admin, cli_actor
from .cli import _state, app, err, lists_app, out, subs_app
from .errors import NewsletterError

segments_app = typer.Typer(help="Named subscriber filters: create, ls, show, count, edit, rm.",
                           no_args_is_help=True)
suppression_app = typer.Typer(help="The global suppression list (addresses and domains): add, "
                              "rm, ls, import, export.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log of admin actions.", no_args_is_help=True)
app.add_typer(segments_app, name="segments")
app.add_typer(suppression_app, name="suppression")
app.add_typer(audit_app, name="audit")

EmailArg = Annotated[str, typer.Argument(help="The subscriber's address (or id).")]


def _admin() -> Admin:
    return Admin(_state.app, cli_actor())


def _attrs(pairs: list[str]) -> dict[str, Any]:
    """--attr key=value pairs (repeatable)."""
    attrs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise NewsletterError(f"--attr wants key=value, not {pair!r}")
        attrs[key.strip()] = value
    return attrs


def _when(value: dt.datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else "-"


# --- lists -----------------------------------------------------------------------------------

@lists_app.command("edit")
def lists_edit(
    slug: Annotated[str, typer.Argument(help="The list's slug.")],
    new_slug: Annotated[str | None, typer.Option("--slug", help="Rename the slug.")] = None,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    description: Annotated[str | None, typer.Option(help="What the list is about.")] = None,
    double_opt_in: Annotated[bool | None, typer.Option(
        "--double-opt-in/--single-opt-in", help="Web sign-ups confirm by email first.")] = None,
    public: Annotated[bool | None, typer.Option(
        "--public/--private", help="Subscribe form and public archive.")] = None,
    language: Annotated[str | None, typer.Option(help="Default language: en or zh.")] = None,
    zone: Annotated[str | None, typer.Option(
        help="Default time zone for local-time sends (IANA name; '' clears it).")] = None,
    welcome: Annotated[bool | None, typer.Option(
        "--welcome/--no-welcome", help="Mail the welcome template to new subscribers.")] = None,
) -> None:
    """Rename a list or change its settings (only what you name changes)."""
    mlist = _admin().update_list(slug, new_slug=new_slug, name=name, description=description,
                                 double_opt_in=double_opt_in, public=public,
                                 language=language, zone=zone, welcome=welcome)
    out.print(f"list {mlist.slug} ({mlist.name}): "
              f"{'double' if mlist.double_opt_in else 'single'} opt-in, "
              f"{'public' if mlist.public else 'private'}, language {mlist.language}, "
              f"zone {mlist.zone or '-'}, welcome {'on' if mlist.welcome else 'off'}",
              highlight=False)


@lists_app.command("delete")
def lists_delete(
    slug: Annotated[str, typer.Argument(help="The list's slug.")],
    yes: Annotated[bool, typer.Option("--yes", help="Really delete it.")] = False,
) -> None:
    """Delete a list with its memberships, history, ledger rows and archive; shows what goes
    with it and needs --yes. Subscribers stay (they may be on other lists)."""
    admin = _admin()
    impact = admin.deletion_impact(slug)
    lines = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in impact.items())
    if not yes:
        err.print(f"deleting {slug} would remove: {lines}", markup=False)
        err.print("run again with --yes to delete it")
        raise typer.Exit(1)
    admin.delete_list(slug)
    out.print(f"deleted list {slug}: {lines}", markup=False)


# --- subscribers -----------------------------------------------------------------------------

@subs_app.command("show")
def subs_show(email: EmailArg) -> None:
    """One subscriber: details, lists, bounces, suppression and the history of changes."""
    admin = _admin()
    d = admin.subscriber(email)
    out.print(f"[bold]{d.email}[/bold] (id {d.id})" + (f" {d.name}" if d.name else ""),
              highlight=False)
    out.print(f"since {_when(d.created_at)} · language {d.language or '-'} · zone "
              f"{d.zone or '-'} · bounces hard {d.hard_bounces} / soft {d.soft_bounces}",
              highlight=False)
    other = {k: v for k, v in d.attributes.items() if k not in ("lang", "tz")}
    if other:
        out.print("attributes: " + json.dumps(other, ensure_ascii=False), markup=False)
    out.print("lists: " + (", ".join(f"{k} ({v})" for k, v in d.lists.items()) or "none"),
              highlight=False)
    if d.suppressed:
        out.print(f"suppressed: {d.suppressed}", highlight=False)
    _print_history(admin.history(d.id))


def _print_history(events: list[dict[str, Any]]) -> None:
    table = Table("when (UTC)", "list", "from", "to", "source", box=None)
    for e in events:
        table.add_row(_when(e["at"]), e["list"], e["from"] or "-", e["to"], e["source"])
    out.print(table)


@subs_app.command("history")
def subs_history(email: EmailArg) -> None:
    """Every change of a subscriber's status, with when and why."""
    _print_history(_admin().history(email))


@subs_app.command("edit")
def subs_edit(
    email: EmailArg,
    new_email: Annotated[str | None, typer.Option("--email", help="A new address.")] = None,
    name: Annotated[str | None, typer.Option(help="The subscriber's name.")] = None,
    attr: Annotated[list[str] | None, typer.Option(
        "--attr", help="Set an attribute: key=value (repeatable).")] = None,
    unset: Annotated[list[str] | None, typer.Option(
        "--unset", help="Remove an attribute (repeatable).")] = None,
    language: Annotated[str | None, typer.Option(help="en or zh ('' removes it).")] = None,
    zone: Annotated[str | None, typer.Option(help="IANA time zone ('' removes it).")] = None,
) -> None:
    """Change a subscriber's address, name, attributes, language or time zone."""
    d = _admin().edit_subscriber(email, email=new_email, name=name,
                                 set_attributes=_attrs(attr or []), unset_attributes=unset or [],
                                 language=language, zone=zone)
    out.print(f"updated {d.email}: name {d.name or '-'}, attributes "
              f"{json.dumps(d.attributes, ensure_ascii=False)}", markup=False)


@subs_app.command("move")
def subs_move(
    email: EmailArg,
    from_slug: Annotated[str, typer.Option("--from", help="The list it leaves.")],
    to_slug: Annotated[str, typer.Option("--to", help="The list it joins.")],
) -> None:
    """Move a subscriber from one list to another (keeps its status; never reactivates an
    address that opted out of the target list)."""
    d = _admin().move_subscriber(email, from_slug=from_slug, to_slug=to_slug)
    out.print(f"moved {d.email} from {from_slug} to {to_slug} ({d.lists.get(to_slug)})",
              highlight=False)


@subs_app.command("resubscribe")
def subs_resubscribe(
    email: EmailArg,
    list_slug: Annotated[str, typer.Option("--list", "-l", help="The list.")],
    explicit: Annotated[bool, typer.Option(
        "--explicit", help="State that the subscriber asked to come back (required).")]
    = False,
) -> None:
    """Make an address that unsubscribed active again: only with --explicit; recorded."""
    d = _admin().resubscribe(email, list_slug=list_slug, explicit=explicit)
    out.print(f"{d.email} is {d.lists.get(list_slug)} on {list_slug} again (recorded)",
              highlight=False)


@subs_app.command("export-data")
def subs_export_data(
    email: EmailArg,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")]
    = None,
) -> None:
    """Everything stored about one address, as JSON (a data-subject access request)."""
    data = json.dumps(_admin().export_data(email), ensure_ascii=False, indent=2)
    if out_file:
        out_file.write_text(data + "\n", encoding="utf-8")
        out.print(f"wrote {out_file}", highlight=False)
    else:
        sys.stdout.write(data + "\n")


@subs_app.command("erase")
def subs_erase(
    email: EmailArg,
    yes: Annotated[bool, typer.Option("--yes", help="Really erase it.")] = False,
) -> None:
    """Erase an address's personal data; a salted hash stays in the suppression list so no
    later import or form can add it back."""
    admin = _admin()
    d = admin.subscriber(email)
    if not yes:
        err.print(f"this erases {d.email} (id {d.id}): name, attributes, lists "
                  f"({', '.join(d.lists) or 'none'}) and history; run again with --yes",
                  markup=False)
        raise typer.Exit(1)
    counts = admin.erase(d.id)
    out.print(f"erased subscriber #{d.id}: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                          for k, v in counts.items()),
              highlight=False)


# --- segments --------------------------------------------------------------------------------

FilterArg = Annotated[str, typer.Argument(
    help='A filter, e.g. \'lang = "zh" and attributes.sector in ["telecom"]\' '
         "(see docs/segments.md).")]
ListsOpt = Annotated[list[str] | None, typer.Option(
    "--list", "-l", help="Only members of this list (repeatable).")]


@segments_app.command("create")
def segments_create(
    name: Annotated[str, typer.Argument(help="Segment name (a-z, 0-9, - and _).")],
    filter_text: FilterArg,
    description: Annotated[str, typer.Option(help="What it is for.")] = "",
) -> None:
    """Save a named filter; shows how many active subscribers it matches."""
    admin = _admin()
    seg = admin.save_segment(name, filter_text, description)
    out.print(f"created segment {seg.name}: {admin.count(seg.filter):,} active subscriber(s) "
              "match", highlight=False)


@segments_app.command("edit")
def segments_edit(
    name: Annotated[str, typer.Argument(help="Segment name.")],
    filter_text: Annotated[str | None, typer.Option("--filter", help="The new filter.")] = None,
    description: Annotated[str | None, typer.Option(help="The new description.")] = None,
) -> None:
    """Change a segment's filter or description."""
    admin = _admin()
    current = admin.get_segment(name)
    seg = admin.save_segment(name, filter_text or current.filter, description, create=False)
    out.print(f"updated segment {seg.name}: {admin.count(seg.filter):,} active subscriber(s) "
              "match", highlight=False)


@segments_app.command("ls")
def segments_ls() -> None:
    """Every segment with its filter and how many active subscribers it matches."""
    admin = _admin()
    table = Table("name", "matches", "filter", "description", box=None)
    for seg in admin.segments():
        table.add_row(seg.name, f"{admin.count(seg.filter):,}", seg.filter, seg.description)
    out.print(table)


@segments_app.command("show")
def segments_show(
    name: Annotated[str, typer.Argument(help="Segment name.")],
    list_slugs: ListsOpt = None,
) -> None:
    """A segment's filter and counts (active, and any status)."""
    admin = _admin()
    seg = admin.get_segment(name)
    out.print(f"[bold]{seg.name}[/bold]: {seg.filter}", highlight=False, markup=False)
    if seg.description:
        out.print(seg.description, markup=False)
    lists = list_slugs or []
    out.print(f"active subscribers matching: {admin.count(seg.filter, lists=lists):,}; "
              f"any status: {admin.count(seg.filter, lists=lists, active_only=False):,}",
              highlight=False)


@segments_app.command("count")
def segments_count(
    filter_text: FilterArg,
    list_slugs: ListsOpt = None,
    any_status: Annotated[bool, typer.Option(
        "--any-status", help="Count every status, not only active members.")] = False,
) -> None:
    """How many subscribers an ad-hoc filter matches (before saving it as a segment)."""
    n = _admin().count(filter_text, lists=list_slugs or [], active_only=not any_status)
    out.print(f"{n:,}", highlight=False)


@segments_app.command("rm")
def segments_rm(name: Annotated[str, typer.Argument(help="Segment name.")]) -> None:
    """Delete a segment (campaigns already sent to it keep their filter)."""
    _admin().delete_segment(name)
    out.print(f"deleted segment {name}")


# --- suppression -----------------------------------------------------------------------------

@suppression_app.command("add")
def suppression_add(
    value: Annotated[str, typer.Argument(help="An address, or a domain (example.com).")],
    reason: Annotated[str, typer.Option(
        help="admin, complaint, hard-bounce or unsubscribed.")] = "admin",
    note: Annotated[str, typer.Option(help="Why, for the record.")] = "",
) -> None:
    """Never send to this address or domain again, on any list; running sends skip it."""
    entry = _admin().suppress(value, reason=reason, note=note)
    out.print(f"suppressed {entry.kind.value} {entry.value} ({entry.reason})", highlight=False)


@suppression_app.command("rm")
def suppression_rm(value: Annotated[str, typer.Argument(help="The address or domain.")]) \
        -> None:
    """Lift a suppression (erased addresses cannot be lifted)."""
    entry = _admin().unsuppress(value)
    out.print(f"lifted suppression of {entry.kind.value} {entry.value} (was {entry.reason})",
              highlight=False)


@suppression_app.command("ls")
def suppression_ls(
    kind: Annotated[str | None, typer.Option(help="address, domain or hash.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
) -> None:
    """The suppression list (streamed)."""
    table = Table("value", "kind", "reason", "since", "note", box=None)
    for e in _admin().suppressions(kind=kind, reason=reason):
        table.add_row(e.value, e.kind.value, e.reason, _when(e.created_at), e.note)
    out.print(table)


@suppression_app.command("import")
def suppression_import(
    file: Annotated[Path, typer.Argument(help="CSV (email/domain[,reason,note]) or one value "
                                         "per line.")],
    reason: Annotated[str, typer.Option(help="Reason for rows that name none.")] = "admin",
) -> None:
    """Import addresses and domains into the suppression list; bad lines are reported."""
    result = _admin().import_suppressions(file, reason=reason)
    for line, value, why in result.rejected[:50]:
        err.print(f"line {line}: {why}" + (f" ({value})" if value else ""), markup=False)
    out.print(f"added {result.added}, already suppressed {result.already}, rejected "
              f"{len(result.rejected)}", highlight=False)


@suppression_app.command("export")
def suppression_export(
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    out_file: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")]
    = None,
) -> None:
    """Export the suppression list (streamed)."""
    admin = _admin()
    if out_file:
        with out_file.open("w", encoding="utf-8", newline="") as fh:
            n = admin.export_suppressions(fh, fmt=fmt)
        out.print(f"wrote {n:,} entries to {out_file}", highlight=False)
    else:
        admin.export_suppressions(sys.stdout, fmt=fmt)


# --- audit -----------------------------------------------------------------------------------

@audit_app.command("ls")
def audit_ls(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    action: Annotated[str | None, typer.Option(
        help="Only actions starting with this (e.g. 'list.' or 'privacy.erase').")] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor (cli:USER, token:NAME).")]
    = None,
    since: Annotated[str | None, typer.Option(help="Only since this date (YYYY-MM-DD).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines.")] = False,
) -> None:
    """Who did what, to what, and when."""
    when = None
    if since:
        try:
            when = dt.datetime.fromisoformat(since).replace(tzinfo=dt.UTC)
        except ValueError:
            raise NewsletterError(f"--since wants YYYY-MM-DD, not {since!r}") from None
    entries = _admin().audit_entries(limit=limit, action=action, actor=actor, since=when)
    if as_json:
        for e in entries:
            sys.stdout.write(json.dumps({"id": e.id, "at": e.at.isoformat(), "actor": e.actor,
                                         "action": e.action, "target": e.target,
                                         "detail": e.detail}, ensure_ascii=False) + "\n")
        return
    table = Table("when (UTC)", "actor", "action", "target", "detail", box=None)
    for e in entries:
        table.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.target,
                      json.dumps(e.detail, ensure_ascii=False) if e.detail else "")
    out.print(table)

