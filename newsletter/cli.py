"""The `newsletter` command: thin Typer commands over the service layer.

Every error the package raises on purpose ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import json
import logging
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .admin import Admin, cli_actor
from .delivery.engine import Progress as SendProgress
from .delivery.engine import RunReport
from .errors import FilterSyntaxError, NewsletterError
from .render.templates import render_template
from .service import Newsletter, SendPlan, send_runner
from .settings import Settings, load_settings
from .store.base import DeliveryCounts
from .store.imports import ImportReport, import_csv
from .store.schema import CampaignStatus, DeliveryStatus, MembershipStatus
from .web.labels import labels as web_labels

# soft_wrap: an error stays one line however narrow the terminal, so scripts can grep it.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    help="Publish email digests: write an issue, render it once, send it to your lists.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
lists_app = typer.Typer(help="Create and show subscriber lists.", no_args_is_help=True)
subs_app = typer.Typer(help="Add, import, show and unsubscribe subscribers.",
                       no_args_is_help=True)
issue_app = typer.Typer(help="Work with issue files.", no_args_is_help=True)
app.add_typer(lists_app, name="lists")
app.add_typer(subs_app, name="subscribers")
app.add_typer(issue_app, name="issue")
campaigns_app = typer.Typer(help="See and steer campaigns: ls, show, pause, resume, cancel, "
                            "retry.", no_args_is_help=True)
app.add_typer(campaigns_app, name="campaigns")


class _ScheduleGroup(typer.core.TyperGroup):
    """`newsletter schedule FILE ...` and `schedule --digest ...` mean `schedule add ...`;
    `schedule ls|pause|...` are subcommands."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["add", *args]
        return super().parse_args(ctx, args)


schedule_app = typer.Typer(cls=_ScheduleGroup, no_args_is_help=True,
                           help="Schedule sends: newsletter schedule FILE --list SLUG --at "
                           "'YYYY-MM-DD HH:MM' [--tz ZONE] | --digest NAME --cron '0 8 * * MON'; "
                           "ls, pause, resume, cancel, run-now, update.")
app.add_typer(schedule_app, name="schedule")
digest_app = typer.Typer(help="Recurring digests assembled from an inbox folder and feeds.",
                         no_args_is_help=True)
app.add_typer(digest_app, name="digest")
bounces_app = typer.Typer(help="Receive bounces (delivery status notifications) and record "
                          "them.", no_args_is_help=True)
app.add_typer(bounces_app, name="bounces")
tokens_app = typer.Typer(help="Bearer tokens of the admin API (/api/): create, ls, revoke.",
                         no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
archive_app = typer.Typer(help="Export a list's archive as a static site for any web "
                          "host.", no_args_is_help=True)
app.add_typer(archive_app, name="archive")


class _State:
    """Per-invocation state: settings are read on first use, so --help never needs them."""

    def __init__(self) -> None:
        self._app: Newsletter | None = None

    def reset(self) -> None:
        self._app = None

    @property
    def app(self) -> Newsletter:
        if self._app is None:
            self._app = Newsletter(load_settings())
        return self._app


_state = _State()


def _version(value: bool) -> None:
    if value:
        out.print(f"newsletter {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    _state.reset()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        handlers=[handler], force=True)
    # aiosmtpd logs every session of the capture server at INFO; keep it for --verbose.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if verbose else logging.ERROR)


class _LowerLevelFormatter(logging.Formatter):
    """'warning: ...' rather than 'WARNING: ...', like the rest of our messages."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace(record.levelname, record.levelname.lower(), 1)


# --- lists ------------------------------------------------------------------------------------

@lists_app.command("create")
def lists_create(
    slug: Annotated[str, typer.Argument(help="Short id, e.g. 'digest' (a-z, 0-9, - and _).")],
    name: Annotated[str | None, typer.Option(help="Display name; defaults to the slug.")] = None,
    description: Annotated[str, typer.Option(help="What the list is about.")] = "",
    double_opt_in: Annotated[bool, typer.Option(
        "--double-opt-in/--single-opt-in",
        help="Web sign-ups confirm by email first (default) or join at once.")] = True,
    public: Annotated[bool, typer.Option(
        "--public/--private",
        help="Public lists have a subscribe form and a public archive.")] = True,
    language: Annotated[str, typer.Option(help="Language of its pages and mail: en or zh.")]
    = "en",
    welcome: Annotated[bool, typer.Option(
        "--welcome/--no-welcome", help="Mail the welcome template to new subscribers.")] = False,
    zone: Annotated[str | None, typer.Option(
        help="Default time zone for local-time sends (IANA name, e.g. Asia/Shanghai).")]
    = None,
) -> None:
    """Create a subscriber list."""
    mlist = Admin(_state.app, cli_actor()).create_list(
        slug, name=name, description=description, double_opt_in=double_opt_in, public=public,
        language=language, welcome=welcome, zone=zone)
    out.print(f"created list {mlist.slug} ({mlist.name})")


@lists_app.command("show")
def lists_show(slug: Annotated[str, typer.Argument(help="The list's slug.")]) -> None:
    """Show a list's settings, counts, links and an embeddable subscribe form."""
    nl = _state.app
    mlist = nl.store.get_list(slug)
    counts = next(c for m, c in nl.store.all_lists() if m.id == mlist.id)
    base = nl.settings.base_url
    out.print(f"[bold]{mlist.name}[/bold] ({mlist.slug})", highlight=False)
    if mlist.description:
        out.print(mlist.description, highlight=False)
    out.print(f"opt-in: {'double' if mlist.double_opt_in else 'single'} · "
              f"{'public' if mlist.public else 'private'} · language {mlist.language} · "
              f"welcome mail {'on' if mlist.welcome else 'off'}", highlight=False)
    out.print("members: " + ", ".join(f"{s.value} {counts.get(s, 0)}" for s in MembershipStatus),
              highlight=False)
    if mlist.public:
        out.print(f"subscribe page: {base}/subscribe/{mlist.slug}", highlight=False)
        out.print(f"archive: {base}/archive/{mlist.slug}/  (feed: "
                  f"{base}/archive/{mlist.slug}/feed.atom)", highlight=False)
        out.print("\nembeddable form (paste into any web page):", highlight=False)
        snippet = render_template(nl.templates, "web/snippet.html.j2", mlist=mlist,
                                  base_url=base, t=web_labels(mlist.language))
        print(snippet.rstrip())
    else:
        out.print("private list: no public subscribe form or archive", highlight=False)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [web_host].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [web_port].")] = None,
) -> None:
    """Serve the web side: unsubscribe, preferences, subscribe forms and the archive."""
    _serve(_state.app, host, port)


def _serve(nl: Newsletter, host: str | None, port: int | None) -> None:
    import uvicorn

    from .web.app import create_app

    host = host or nl.settings.web_host
    port = port if port is not None else nl.settings.web_port
    if nl.capture_mode:
        out.print(f"no SMTP relay configured: confirmation mail goes to the capture outbox "
                  f"{nl.settings.outbox_dir}", highlight=False)
    out.print(f"serving {nl.settings.base_url} on http://{host}:{port}", highlight=False)
    if nl.settings.scheduler_in_serve:
        out.print("the scheduler runs here too (set scheduler_in_serve = false to run it "
                  "apart with: newsletter scheduler)", highlight=False)
    uvicorn.run(create_app(nl, scheduler=True), host=host, port=port, log_level="warning",
                proxy_headers=True, server_header=False)


@lists_app.command("ls")
def lists_ls() -> None:
    """Show every list with its subscriber counts."""
    rows = _state.app.store.all_lists()
    if not rows:
        out.print("no lists yet; create one with: newsletter lists create SLUG")
        return
    table = Table("slug", "name", *[s.value for s in MembershipStatus], box=None)
    for mlist, counts in rows:
        table.add_row(mlist.slug, mlist.name, *[str(counts.get(s, 0)) for s in MembershipStatus])
    out.print(table)


# --- subscribers ------------------------------------------------------------------------------

ListOpt = Annotated[str, typer.Option("--list", "-l", help="The list's slug.")]


@subs_app.command("add")
def subs_add(
    email: Annotated[str, typer.Argument(help="The address to add.")],
    list_slugs: Annotated[list[str], typer.Option(
        "--list", "-l", help="The list (repeat for several).")],
    name: Annotated[str, typer.Option(help="The subscriber's name.")] = "",
    attr: Annotated[list[str] | None, typer.Option(
        "--attr", help="An attribute: key=value (repeatable).")] = None,
    language: Annotated[str | None, typer.Option(help="en or zh.")] = None,
    zone: Annotated[str | None, typer.Option(help="IANA time zone.")] = None,
) -> None:
    """Add one subscriber to lists (active at once). Suppressed addresses are refused, and
    an address that left a list is not reactivated."""
    from .cli_admin import _attrs

    existing = _state.app.store.find_subscriber(email.strip())
    before = set() if existing is None else {
        m.slug for m, s in _state.app.store.memberships_of(existing.id)}
    d = Admin(_state.app, cli_actor()).add_subscriber(
        email, lists=list_slugs, name=name, attributes=_attrs(attr or []), language=language,
        zone=zone)
    added = [s for s in list_slugs if s not in before]
    if added:
        out.print(f"added {d.email} to {', '.join(added)}", highlight=False)
    else:
        out.print(f"{d.email} is already on {', '.join(list_slugs)}", highlight=False)


@subs_app.command("import")
def subs_import(
    file: Annotated[Path, typer.Argument(help="CSV with a header row; 'email' is required.")],
    list_slug: ListOpt,
    encoding: Annotated[str | None, typer.Option(
        help="Text encoding, e.g. gb18030 or cp1252 (default: detected: UTF-8 with or "
             "without BOM, UTF-16 with BOM, GB18030/GBK).")] = None,
    delimiter: Annotated[str | None, typer.Option(
        help="Field separator: ',', ';' or 'tab' (default: sniffed from the file).")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write every rejected row (line, email, reason) to this CSV file (default: "
             "FILE.rejected.csv next to the input, when a row is rejected).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what the import would do, with the same counts and report; "
                          "write nothing to the database.")] = False,
) -> None:
    """Import subscribers from CSV: other columns become attributes; bad rows are reported.

    Duplicates in the file, suppressed addresses and addresses that unsubscribed from or
    bounced on the list before are skipped (never reactivated); existing subscribers keep
    their status and get the file's name and attributes merged in.
    """
    store = _state.app.store
    mlist = store.get_list(list_slug)
    sep = {"tab": "\t", "\\t": "\t"}.get(delimiter, delimiter) if delimiter else None
    report_path = report or file.with_suffix(".rejected.csv")
    size = file.stat().st_size if file.is_file() else None
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[rows]:,} rows"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=out, transient=True) as bar:
        task = bar.add_task("checking" if dry_run else "importing", total=size or None, rows=0)
        result = import_csv(store, mlist.id, file, encoding=encoding, delimiter=sep,
                            dry_run=dry_run, report_path=report_path,
                            on_progress=lambda n: bar.update(task, rows=n),
                            on_bytes=lambda n: bar.update(task, completed=n))
    if report is None and not result.skipped:
        report_path.unlink(missing_ok=True)  # nothing rejected: no report file to look at
    _print_import(result, report_path if result.skipped or report else None)


def _print_import(result: ImportReport, report: Path | None) -> None:
    for rej in result.rejected[:50]:
        err.print(f"line {rej.line}: {rej.reason}" + (f" ({rej.email})" if rej.email else ""),
                  markup=False)
    if result.skipped > 50:
        err.print(f"... and {result.skipped - 50:,} more")
    if report is not None:
        err.print(f"rejected rows (line, email, reason): {report}", markup=False)
    out.print(result.summary(), markup=False)
    labels = {"invalid": "invalid", "duplicate": "duplicates in the file",
              "suppressed": "suppressed", "opted_out": "unsubscribed or bounced before"}
    details = [f"{result.skipped_by[k]:,} {label}" for k, label in labels.items()
               if result.skipped_by.get(k)]
    if result.unchanged:
        details.append(f"{result.unchanged:,} updated with nothing to change")
    if result.pending:
        details.append(f"{result.pending:,} still pending confirmation (kept pending)")
    if details:
        out.print("  " + "; ".join(details), markup=False)
    if result.dry_run:
        out.print("dry run: nothing was written to the database")


@subs_app.command("ls")
def subs_ls(
    list_slug: ListOpt,
    status: Annotated[MembershipStatus | None, typer.Option(help="Only this status.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json (JSON Lines).")]
    = "table",
) -> None:
    """List a list's subscribers (streamed, so it works for large lists)."""
    if fmt not in ("table", "csv", "json"):
        raise NewsletterError(f"--format must be table, csv or json, not {fmt!r}")
    store = _state.app.store
    members = store.members(store.get_list(list_slug).id, status=status)
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["email", "name", "status", "created_at", "attributes"])
        for m in members:
            writer.writerow([m.email, m.name, m.status.value, m.created_at.isoformat(),
                             json.dumps(m.attributes, ensure_ascii=False)])
    elif fmt == "json":
        for m in members:
            sys.stdout.write(json.dumps({
                "email": m.email, "name": m.name, "status": m.status.value,
                "created_at": m.created_at.isoformat(), "attributes": m.attributes,
            }, ensure_ascii=False) + "\n")
    else:
        table = Table("email", "name", "status", "since", box=None)
        for m in members:
            table.add_row(m.email, m.name, m.status.value, f"{m.created_at:%Y-%m-%d}")
        out.print(table)


@subs_app.command("export")
def subs_export(
    list_slug: Annotated[str | None, typer.Option(
        "--list", "-l", help="The list (default with --segment: every list).")] = None,
    segment: Annotated[str | None, typer.Option(
        "--segment", "-s", help="Only members matching this segment.")] = None,
    status: Annotated[MembershipStatus | None, typer.Option(
        help="Only members with this status (default: active).")] = None,
    all_statuses: Annotated[bool, typer.Option(
        "--all", help="Members of every status: active, pending, unsubscribed, bounced.")]
    = False,
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl (JSON Lines).")] = "csv",
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="Write to this file (default: standard output).")] = None,
) -> None:
    """Export a list's or a segment's members (email, name, status, list, joined,
    attributes), streamed; one row per membership."""
    from .store.imports import export_members

    if status is not None and all_statuses:
        raise NewsletterError("--status and --all exclude each other")
    if fmt not in ("csv", "jsonl"):
        raise NewsletterError(f"--format must be csv or jsonl, not {fmt!r}")
    nl = _state.app
    if list_slug is None and segment is None:
        raise NewsletterError("name a --list or a --segment to export")
    list_id = nl.store.get_list(list_slug).id if list_slug else None
    wanted = None if all_statuses else (status or MembershipStatus.ACTIVE).value
    where = None
    if segment is not None:
        from . import segments as seglang

        where = seglang.compile_filter(seglang.parse(nl.segment_filter([segment]) or ""))
    with contextlib.ExitStack() as stack:
        if out_file is None:
            target: Any = sys.stdout
        else:
            try:
                target = stack.enter_context(out_file.open("w", newline="", encoding="utf-8"))
            except OSError as exc:
                raise NewsletterError(f"cannot write {out_file}: {exc.strerror}") from None
        n = export_members(nl.store.engine, target, list_id=list_id, status=wanted,
                           where=where, fmt="csv" if fmt == "csv" else "jsonl")
        target.flush()  # the data before the count on a terminal that shows both
    what = " ".join(x for x in (f"segment {segment}" if segment else "",
                                 f"list {list_slug}" if list_slug else "") if x)
    err.print(f"exported {n:,} memberships of {what}" + (f" to {out_file}" if out_file else ""),
              markup=False)


@subs_app.command("unsubscribe")
def subs_unsubscribe(
    email: Annotated[str, typer.Argument(help="The address to unsubscribe.")],
    list_slug: Annotated[str | None, typer.Option(
        "--list", "-l", help="Only from this list (default: every list, and the address is "
        "suppressed).")] = None,
) -> None:
    """Unsubscribe an address; running sends skip it for every message not yet sent."""
    n = Admin(_state.app, cli_actor()).unsubscribe(email.strip(), list_slug=list_slug)
    where = list_slug or "every list"
    out.print(f"unsubscribed {email} from {where}" if n else
              f"{email} was not subscribed to {where}; nothing changed")


# --- API tokens -------------------------------------------------------------------------------

@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="A name for who uses it, e.g. 'ci' or 'ana'.")],
    role: Annotated[str, typer.Option(
        help="admin (everything), editor (campaigns, schedules, segments) or viewer "
             "(read only).")],
) -> None:
    """Create a token and print it once: only its SHA-256 is kept."""
    from .admin import cli_actor
    from .apitokens import Tokens

    record, token = Tokens(_state.app.store.engine).create(name, role, actor=cli_actor())
    # The token alone on stdout, so scripts can capture it: TOKEN=$(newsletter tokens ...)
    print(token)
    err.print(f"created {record.role.value} token {record.name!r}; it is shown only now. "
              "Send it as: Authorization: Bearer TOKEN", highlight=False)


@tokens_app.command("ls")
def tokens_ls() -> None:
    """List tokens: name, role, created, last used, revoked (never the tokens)."""
    from .apitokens import Tokens

    found = Tokens(_state.app.store.engine).all()
    if not found:
        out.print("no tokens; create one with: newsletter tokens create NAME --role ROLE")
        return
    table = Table("name", "role", "created", "by", "last used", "revoked", box=None)
    for t in found:
        table.add_row(t.name, t.role.value, f"{t.created_at:%Y-%m-%d %H:%M}", t.created_by,
                      f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "-",
                      f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "-")
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token for good: requests with it are refused from now on."""
    from .admin import cli_actor
    from .apitokens import Tokens

    record = Tokens(_state.app.store.engine).revoke(name, actor=cli_actor())
    out.print(f"revoked token {record.name!r} ({record.role.value})", highlight=False)


# --- archive ----------------------------------------------------------------------------------

@archive_app.command("build")
def archive_build(
    list_slug: ListOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="The site's directory: new, empty, or "
                                          "an earlier build of the same list.")],
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="Where the site will be served, for the feed's absolute links "
        "(default: NEWSLETTER_BASE_URL/archive/SLUG/).")] = None,
    include_private: Annotated[bool, typer.Option(
        "--include-private", help="Export a private list too (its web archive needs a "
        "reader token; the static copy will not).")] = False,
) -> None:
    """Write the list's archive as static files: an index, a page per issue and edition,
    an Atom feed and the CSS, all linked relatively. Re-running updates what changed."""
    from .archive import export_archive

    report = export_archive(_state.app, list_slug, out_dir, base_url=base_url,
                            include_private=include_private)
    w = report.write
    out.print(f"{report.issues} issues, {report.pages} pages: wrote {len(w.written)} files, "
              f"{w.unchanged} unchanged, removed {len(w.removed)}; open "
              f"{report.out_dir / 'index.html'}", highlight=False)


# --- issues -----------------------------------------------------------------------------------

@issue_app.command("build")
def issue_build(
    file: Annotated[Path, typer.Argument(help="Issue file: .md (front matter), .yaml or .json.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the files.")]
    = Path("build"),
) -> None:
    """Render an issue to issue.html, issue.txt and a sample issue.eml, and say how big
    the HTML is against Gmail's clipping limit."""
    from .render.issue import SizeLevel, size_check

    main = _state.app.build_files(file, out_dir)
    for lang, result in [("", main), *main.editions.items()]:
        label = f" ({lang} edition)" if lang else ""
        out.print(f"wrote {result.html}, {result.text}, {result.eml}{label}")
        size = size_check(result.html.read_text(encoding="utf-8"))
        out.print(f"size: {size.kb} of HTML as sent (Gmail clips above about "
                  f"{size.limit // 1000} KB){label}", highlight=False)
        if size.level is SizeLevel.WARN:
            err.print(f"warning: {size.describe()}{label}")
        elif size.level is SizeLevel.OVER:
            err.print(f"warning: {size.describe()}{label}; newsletter send refuses it without "
                      "--force")


@issue_app.command("check")
def issue_check(
    file: Annotated[Path, typer.Argument(help="Issue file: .md (front matter), .yaml or .json.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    css: Annotated[bool, typer.Option(
        "--css/--no-css", help="CSS support in Gmail and Outlook (needs node and "
        "tools/email-css).")] = True,
    spam: Annotated[bool, typer.Option(
        "--spam/--no-spam", help="SpamAssassin score, local tests only (needs spamassassin).")]
    = True,
) -> None:
    """Check an issue before sending: validity, size, links, images, empty sections, CSS
    support and spam score. Exits 1 on errors; warnings do not fail."""
    from .checks import check_issue, print_report

    report = check_issue(_state.app, file, css=css, spam=spam)
    if as_json:
        print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
    else:
        print_report(report, out)
    if not report.ok:
        raise typer.Exit(1)


@issue_app.command("preview")
def issue_preview(
    file: Annotated[Path, typer.Argument(help="Issue file: .md (front matter), .yaml or .json.")],
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8001,
    host: Annotated[str, typer.Option(
        help="Address to listen on. The preview has no login: keep it on loopback.")]
    = "127.0.0.1",
) -> None:
    """Serve the rendered issue in a browser (desktop and phone widths, dark mode, the text
    part), rendered again whenever the file is saved. Ctrl-C stops it."""
    from .preview import Rendering, serve_preview

    def ready(url: str) -> None:
        out.print(f"previewing {file} at {url} (Ctrl-C stops)", highlight=False)

    def rendered(r: Rendering) -> None:
        when = r.at.astimezone().strftime("%H:%M:%S")
        if r.problem is not None:
            err.print(f"{when} error: {r.problem.summary}", markup=False)
        else:
            out.print(f"{when} rendered '{r.subject}' ({r.html_bytes / 1024:.1f} KB)",
                      markup=False)

    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: listening on {host}: anyone who can reach it sees the issue")
    # uvicorn stops on Ctrl-C, then passes the signal on: here that is the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        serve_preview(_state.app, file, host=host, port=port, on_ready=ready, on_render=rendered)
    out.print("preview stopped")


# --- send -------------------------------------------------------------------------------------

@app.command("send")
def send(
    file: Annotated[Path, typer.Argument(help="Issue file: .md (front matter), .yaml or .json.")],
    list_slugs: Annotated[list[str] | None, typer.Option(
        "--list", "-l", help="Target list; repeat for several (each address gets it once).")]
    = None,
    segment: Annotated[list[str] | None, typer.Option(
        "--segment", "-s", help="Only subscribers matching this segment (repeat: any of "
        "them); on the --list lists, or on every list if none is given.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
    = False,
    again: Annotated[bool, typer.Option(
        "--again", help="Send an issue that already went out to these lists once more.")]
    = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Send even if the HTML is over the size at which Gmail clips it "
        "(and hides the unsubscribe link).")] = False,
    to: Annotated[list[str] | None, typer.Option(
        "--to", help="Test send to this address instead (repeat, at most 10): subject marked "
        "[TEST], no campaign, nothing recorded as a delivery.")] = None,
) -> None:
    """Send an issue to lists or segments now. Run it again to resume an interrupted send.
    With --to, a test send to a few addresses only."""
    nl = _state.app
    if to:
        if list_slugs or segment or again:
            raise NewsletterError("--to is a test send to the addresses given: leave out "
                                  "--list, --segment and --again")
        _test_send(nl, file, to)
        return
    plan = nl.plan_send(file, list_slugs or [], again=again, segments=segment or [],
                        force=force)
    _announce_mode(nl)
    for note in plan.notes:
        out.print(f"note: {note}")
    names = ", ".join(m.slug for m in plan.lists)
    if plan.campaign.segment_names:
        names = f"segment {plan.campaign.segment_names} on {names}"
    if not yes:
        if not sys.stdin.isatty():
            raise NewsletterError("not a terminal: add --yes to send without confirmation")
        if not typer.confirm(f"Send '{plan.campaign.subject}' to {plan.due} subscribers of "
                             f"{names}?"):
            raise typer.Exit(1)
    report = _run_with_progress(nl, plan, f"sending to {names}")
    _print_report(report, nl, plan.campaign.id)
    if report.aborted:
        raise typer.Exit(1)


def _test_send(nl: Newsletter, file: Path, addresses: list[str]) -> None:
    """`send FILE --to ...`: the issue as it would go out, to a few addresses; nothing is
    stored but the audit entry."""
    from .content.parse import load_issue
    from .editor import TEST_PREFIX, Editor

    issue = load_issue(file)
    editor = Editor(nl, cli_actor())
    _announce_mode(nl)
    with send_runner() as runner:
        results = runner.run(editor.test_send_issue(issue, addresses))
    subject = TEST_PREFIX + issue.effective_subject
    for r in results:
        if r.sent:
            out.print(f"sent '{subject}' to {r.address}", markup=False)
        else:
            err.print(f"failed: {r.address}: {r.error}", markup=False)
    out.print("test send: nothing was recorded as a delivery (no campaign, no archive entry)")
    if not all(r.sent for r in results):
        raise typer.Exit(1)


def _announce_mode(nl: Newsletter, *, force_capture: bool = False) -> None:
    if force_capture or nl.capture_mode:
        out.print(f"[bold]capture mode[/]: NEWSLETTER_SMTP_URL is not set, so mail goes to the "
                  f"built-in capture server and is stored in {nl.settings.outbox_dir}/ - "
                  "no mail leaves this machine")
    elif relays := nl.relay_plans():
        out.print("relay: " + ", ".join(f"{r.name} ({r.relay.describe()})" for r in relays),
                  highlight=False)
        # Real mail: say what mailbox providers and the law will hold against it.
        if not nl.settings.base_url.startswith("https://"):
            err.print("warning: NEWSLETTER_BASE_URL is not https://; Gmail and Yahoo only "
                      "offer one-click unsubscribe for an HTTPS List-Unsubscribe URL")
        if not nl.settings.postal_address.strip():
            err.print("warning: NEWSLETTER_POSTAL_ADDRESS is empty; bulk mail must show a "
                      "valid postal address (CAN-SPAM)")


def _run_with_progress(nl: Newsletter, plan: SendPlan, label: str,
                       force_capture: bool = False) -> RunReport:
    if nl.settings.delivery_workers and not force_capture:
        with send_runner() as runner:
            report = runner.run(nl.run(plan))
        _follow_workers(nl, plan.campaign.id, label)
        return report
    with _progress() as bar:
        task = bar.add_task(label, total=plan.due or None, rate="")

        def update(p: SendProgress) -> None:
            # A relay's window or a retry the run waits for shows instead of the rate.
            bar.update(task, completed=p.done, total=max(p.due, p.done) or None,
                       rate=p.note or f"{p.rate:,.0f} msg/s")

        try:
            with send_runner() as runner:
                return runner.run(nl.run(plan, on_progress=update,
                                         force_capture=force_capture))
        except KeyboardInterrupt:
            bar.stop()
            err.print("interrupted: what was sent is recorded; run the same command again to "
                      "resume")
            raise typer.Exit(130) from None


def _follow_workers(nl: Newsletter, campaign_id: int, label: str) -> None:
    """delivery_workers: the campaign is the workers' now; show its progress from the ledger
    until it is done or stops. Ctrl-C stops watching, not the send."""
    store = nl.store
    live = store.live_workers()
    if not live:
        err.print(f"campaign {campaign_id} is handed to the workers, but no `newsletter worker` "
                  "is running against this database: it waits for one")
        return
    out.print(f"campaign {campaign_id} handed to {len(live)} worker(s); "
              "Ctrl-C stops watching, the workers go on", highlight=False)
    try:
        with _progress() as bar:
            counts = store.delivery_counts(campaign_id)
            task = bar.add_task(label, total=counts.total or None, rate="")
            sent0, t0 = counts[DeliveryStatus.SENT], time.monotonic()
            while True:
                counts = store.delivery_counts(campaign_id)
                rate = (counts[DeliveryStatus.SENT] - sent0) / max(time.monotonic() - t0, 1e-3)
                bar.update(task, completed=counts.total - counts.remaining,
                           total=counts.total or None, rate=f"{rate:,.0f} msg/s")
                status = store.campaign_status(campaign_id)
                waiting = counts.remaining and not counts[DeliveryStatus.QUEUED] \
                    and not counts[DeliveryStatus.SENDING]  # only retries due later
                if status != CampaignStatus.RUNNING or not counts.remaining or waiting:
                    break
                if not store.live_workers():
                    err.print("no worker is running any more: the campaign waits for one")
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        err.print(f"stopped watching; the workers go on (newsletter campaigns show "
                  f"{campaign_id})")
        raise typer.Exit(130) from None


def _print_report(report: RunReport, nl: Newsletter, campaign_id: int) -> None:
    """What this run did, then where the campaign stands (from the ledger)."""
    if report.workers:
        counts = nl.store.delivery_counts(campaign_id)
        out.print(f"campaign {campaign_id} ({nl.store.campaign_status(campaign_id)}): "
                  f"{_counts_line(counts)}", highlight=False)
        return
    p = report.progress
    if report.start.became_unknown:
        out.print(f"note: {report.start.became_unknown} message(s) were in flight when an "
                  "earlier run stopped; their outcome is unknown and they were not resent "
                  f"(newsletter campaigns retry {campaign_id} --unknown resends them)")
    for email, error in report.errors[:10]:
        err.print(f"failed: {email}: {error}")
    counts = nl.store.delivery_counts(campaign_id)
    elapsed = time.monotonic() - p.started
    out.print(f"this run: sent {p.sent} in {elapsed:.1f} s"
              + (f" ({p.retried} of them retries)" if p.retried else ""), highlight=False)
    out.print(f"campaign {campaign_id}: {_counts_line(counts)}", highlight=False)
    status = report.status
    if status == CampaignStatus.RUNNING and counts[DeliveryStatus.FAILED_TEMP]:
        when = f" at {report.next_retry:%Y-%m-%d %H:%M} UTC" if report.next_retry else ""
        out.print(f"{counts[DeliveryStatus.FAILED_TEMP]} temporary failure(s) are due again"
                  f"{when}: the scheduler (newsletter serve or newsletter scheduler) sends "
                  f"them then, or run 'newsletter campaigns resume {campaign_id}'",
                  highlight=False)
    if report.aborted:
        verb = "paused" if status == CampaignStatus.PAUSED else "stopped early"
        err.print(f"error: {verb}: {report.aborted}. Everyone not yet sent to is still due: "
                  f"fix the cause and run 'newsletter campaigns resume {campaign_id}'.")


def _counts_line(counts: DeliveryCounts) -> str:
    line = (f"sent {counts[DeliveryStatus.SENT]:,}, failed temporary "
            f"{counts[DeliveryStatus.FAILED_TEMP]:,} / permanent "
            f"{counts[DeliveryStatus.FAILED_PERM]:,}")
    if counts[DeliveryStatus.EXPIRED]:
        line += f" / expired {counts[DeliveryStatus.EXPIRED]:,}"
    line += f", unknown {counts[DeliveryStatus.UNKNOWN]:,}"
    line += f", skipped {counts[DeliveryStatus.SKIPPED]:,}, remaining {counts.remaining:,}"
    return line


# --- scheduling -------------------------------------------------------------------------------

@schedule_app.command("add", hidden=True)
def schedule_add(
    file: Annotated[Path | None, typer.Argument(help="Issue file to send at --at.")] = None,
    list_slugs: Annotated[list[str] | None, typer.Option(
        "--list", "-l", help="Target list; repeat for several.")] = None,
    at: Annotated[str | None, typer.Option(help="When: 'YYYY-MM-DD HH:MM' in --tz.")] = None,
    tz: Annotated[str, typer.Option(help="Time zone of --at or --cron, e.g. Europe/Berlin.")]
    = "UTC",
    digest: Annotated[str | None, typer.Option(help="A recurring digest's name "
                                               "(config/digests/NAME.yaml).")] = None,
    cron: Annotated[str | None, typer.Option(help="When a digest recurs, e.g. '0 8 * * MON'.")]
    = None,
    local_time: Annotated[bool, typer.Option(
        "--local-time", help="Deliver at --at's wall-clock time in each subscriber's zone "
        "(their tz attribute, else --tz).")] = False,
) -> None:
    """Schedule an issue at a time, or a recurring digest on a cron expression."""
    from .scheduling import Schedules, parse_at

    schedules = Schedules(_state.app)
    if digest is not None:
        if file is not None or at is not None or not cron:
            raise NewsletterError("a digest takes --digest NAME --cron '...' [--tz ZONE]")
        sched = schedules.add_digest(digest, cron=cron, tz=tz)
    else:
        if file is None or not list_slugs or at is None:
            raise NewsletterError("usage: newsletter schedule FILE --list SLUG --at "
                                  "'YYYY-MM-DD HH:MM' [--tz ZONE]")
        sched = schedules.add_once(file, list_slugs, at=parse_at(at, tz), tz=tz,
                                   local_time=local_time)
    nxt = schedules.next_run(sched)
    when = _both_zones(nxt, sched.tz) if nxt else "?"
    out.print(f"schedule {sched.id}: next run {when}", highlight=False)


def _both_zones(when: dt.datetime, tz: str) -> str:
    from .scheduling import zone

    local = when.astimezone(zone(tz))
    return f"{local:%Y-%m-%d %H:%M} {tz} ({when.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC)"


@schedule_app.command("ls")
def schedule_ls() -> None:
    """List schedules with their next run (in their zone and in UTC) and last outcome."""
    from .scheduling import Schedules

    schedules = Schedules(_state.app)
    found = schedules.store.all()
    if not found:
        out.print("no schedules; add one with: newsletter schedule FILE --list SLUG --at ...")
        return
    table = Table("id", "what", "status", "next run", "last run", box=None)
    for sched in found:
        what = (f"digest {sched.digest} ({sched.cron})" if sched.kind == "digest"
                else f"{sched.issue_path} (campaign {sched.campaign_id})")
        nxt = schedules.next_run(sched) if sched.status in ("active", "paused") else None
        runs = schedules.store.runs(sched.id)
        last = (f"{runs[-1].outcome} at {runs[-1].fire_time:%Y-%m-%d %H:%M} UTC, "
                f"{runs[-1].lateness:.1f} s late" if runs else "")
        table.add_row(str(sched.id), what, sched.status,
                      _both_zones(nxt, sched.tz) if nxt else "-", last)
    out.print(table)


ScheduleArg = Annotated[int, typer.Argument(help="The schedule's id (see: newsletter "
                                                 "schedule ls).")]


@schedule_app.command("pause")
def schedule_pause(schedule_id: ScheduleArg) -> None:
    """Pause a schedule (it does not fire until resumed)."""
    from .scheduling import Schedules

    Schedules(_state.app).pause(schedule_id)
    out.print(f"paused schedule {schedule_id}")


@schedule_app.command("resume")
def schedule_resume(schedule_id: ScheduleArg) -> None:
    """Resume a paused schedule."""
    from .scheduling import Schedules

    Schedules(_state.app).resume(schedule_id)
    out.print(f"resumed schedule {schedule_id}")


@schedule_app.command("cancel")
def schedule_cancel(schedule_id: ScheduleArg) -> None:
    """Cancel a schedule for good (a one-off's campaign is cancelled with it)."""
    from .scheduling import Schedules

    Schedules(_state.app).cancel(schedule_id)
    out.print(f"cancelled schedule {schedule_id}")


@schedule_app.command("run-now")
def schedule_run_now(schedule_id: ScheduleArg) -> None:
    """Fire a schedule now (the running scheduler picks it up within a second)."""
    from .scheduling import Schedules

    Schedules(_state.app).run_now(schedule_id)
    out.print(f"schedule {schedule_id} is due now")


@schedule_app.command("update")
def schedule_update(
    schedule_id: ScheduleArg,
    file: Annotated[Path, typer.Argument(help="The issue file, edited.")],
) -> None:
    """Re-render a scheduled issue from its file (before it goes out)."""
    from .scheduling import Schedules

    Schedules(_state.app).update(schedule_id, file)
    out.print(f"schedule {schedule_id}: the issue was rendered again")


@digest_app.command("preview")
def digest_preview(
    name: Annotated[str, typer.Argument(help="The digest's name (config/digests/NAME.yaml).")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write the preview "
                                                 "[var/digests/NAME/preview].")] = None,
) -> None:
    """Assemble and render the next issue of a digest without sending it."""
    nl = _state.app
    target = out_dir or nl.settings.var_dir / "digests" / name / "preview"
    assembly, built = nl.preview_digest(name, target)
    for origin, reason in assembly.skipped:
        err.print(f"skipped: {origin}: {reason}")
    if built is None:
        out.print(f"digest {name}: no new items for issue {assembly.number}; it would be "
                  "skipped", highlight=False)
        return
    out.print(f"digest {name}, issue {assembly.number}: {len(assembly.items)} items",
              highlight=False)
    out.print(f"  issue file: {target / f'{assembly.number}.md'}", highlight=False)
    out.print(f"  HTML:       {built.html} ({built.html_bytes / 1024:.1f} KB)", highlight=False)
    out.print(f"  text:       {built.text}", highlight=False)


@app.command("worker")
def worker_run(
    once: Annotated[bool, typer.Option(
        "--once", help="Exit when no campaign has work (instead of waiting for more).")]
    = False,
    name: Annotated[str | None, typer.Option(
        "--name", help="How this worker is shown (default HOST:PID).")] = None,
) -> None:
    """Deliver campaigns handed to the workers (delivery_workers = true); run any number,
    on any machines, against one database. SIGTERM or Ctrl-C: finish the messages in
    flight, hand the rest back, exit."""
    import signal

    from .workers import Worker

    nl = _state.app
    _announce_mode(nl)

    def event(text: str) -> None:
        out.print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {text}", markup=False, highlight=False)

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        report = await Worker(nl, name=name, on_event=event).run(stop, once=once)
        return report.sent

    with send_runner() as runner:
        runner.run(run())


@app.command("workers")
def workers_ls() -> None:
    """List the delivery workers registered on this database and what each is sending."""
    nl = _state.app
    found = nl.store.live_workers()
    if not found:
        out.print("no worker is running against this database (start one with: "
                  "newsletter worker)")
        return
    now = dt.datetime.now(dt.UTC)
    table = Table("id", "name", "campaign", "started", "last seen", "lease", box=None)
    for w in found:
        lease = (w.expires_at - now).total_seconds()
        table.add_row(str(w.id), w.name, str(w.campaign_id or "-"),
                      f"{w.started_at:%Y-%m-%d %H:%M:%S}",
                      f"{(now - w.heartbeat_at).total_seconds():.0f} s ago",
                      f"{lease:.0f} s left" if lease > 0 else "expired")
    out.print(table)


@app.command("scheduler")
def scheduler_run() -> None:
    """Run the scheduler alone (it also runs inside newsletter serve); Ctrl-C stops it."""
    from .scheduling import Scheduler

    nl = _state.app

    def fired(schedule_id: int, outcome: str) -> None:
        out.print(f"schedule {schedule_id}: {outcome}", highlight=False)

    async def run() -> None:
        import signal

        # SIGTERM (systemd, kill) stops it as Ctrl-C does: the lock (on SQLite a lease row
        # the next holder would otherwise wait out) is released on the way out.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        scheduler = Scheduler(nl, on_fired=fired)
        await scheduler.start()
        out.print("scheduler running (one per database fires jobs; others wait); Ctrl-C or "
                  "SIGTERM stops")
        try:
            await stop.wait()
        finally:
            await scheduler.stop()
        out.print("scheduler stopped")

    with contextlib.suppress(KeyboardInterrupt), send_runner() as runner:
        runner.run(run())


# --- bounces ----------------------------------------------------------------------------------

@bounces_app.command("serve")
def bounces_serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [bounce_host].")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [bounce_port].")] = None,
) -> None:
    """Receive bounces by SMTP (be the MX of the bounce domain) and record them."""
    from .delivery.bounces import BounceServer

    nl = _state.app
    host = host or nl.settings.bounce_host
    port = port if port is not None else nl.settings.bounce_port
    local = nl.settings.bounce_mailbox.partition("@")[0]

    def handle(bounces: list[Any], raw: bytes) -> None:
        matched = nl.record_bounces(bounces, raw)
        for b in bounces:
            out.print(f"{b.kind} bounce: {b.recipient or '?'} {b.status} "
                      f"({'recorded' if matched else 'no matching delivery'})", highlight=False)

    async def run() -> None:
        server = BounceServer(handle, host=host, port=port, local_prefix=local,
                              keep_dir=nl.settings.var_dir / "bounces")
        async with server:
            out.print(f"receiving bounces for {local}+TOKEN@... on {host}:{server.port}; "
                      "Ctrl-C stops", highlight=False)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@bounces_app.command("scan")
def bounces_scan(
    maildir: Annotated[Path, typer.Argument(help="A Maildir the bounce address delivers to.")],
) -> None:
    """Read bounces from a Maildir and record them; each message is processed once."""
    from .delivery.bounces import scan_maildir

    nl = _state.app
    local = nl.settings.bounce_mailbox.partition("@")[0]
    matched = 0

    def handle(bounces: list[Any], raw: bytes) -> None:
        nonlocal matched
        matched += nl.record_bounces(bounces, raw)

    report = scan_maildir(maildir, handle, local_prefix=local)
    out.print(f"{report.messages} message(s): {report.bounces} bounce(s), {matched} matched a "
              f"delivery, {report.not_bounces} not bounces, {len(report.failed)} failed",
              highlight=False)
    for key, error in report.failed:
        err.print(f"failed: {key}: {error}")
    if report.failed:
        raise typer.Exit(1)


# --- campaigns --------------------------------------------------------------------------------

CampaignArg = Annotated[int, typer.Argument(help="The campaign's id (see: newsletter campaigns "
                                                 "ls).")]


@campaigns_app.command("ls")
def campaigns_ls(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
) -> None:
    """List campaigns, newest first, with their status and counts."""
    nl = _state.app
    found = nl.store.all_campaigns(limit)
    if not found:
        out.print("no campaigns yet; send an issue with: newsletter send FILE --list SLUG")
        return
    lists = {m.id: m.slug for m, _ in nl.store.all_lists()}
    table = Table("id", "status", "issue", "lists", "sent", "remaining", "note", box=None)
    for c in found:
        counts = nl.store.delivery_counts(c.id)
        table.add_row(str(c.id), c.status.value, c.issue_key,
                      ",".join(lists.get(i, "?") for i in c.list_ids),
                      f"{counts[DeliveryStatus.SENT]:,}", f"{counts.remaining:,}",
                      c.status_note or c.last_error or "")
    out.print(table)


@campaigns_app.command("show")
def campaigns_show(campaign_id: CampaignArg) -> None:
    """Show one campaign: counts by outcome, current rate and estimated end."""
    nl = _state.app
    c = nl.store.get_campaign(campaign_id)
    counts = nl.store.delivery_counts(c.id)
    lists = nl.store.lists_by_id(c.list_ids)
    out.print(f"campaign {c.id}: {c.subject}", highlight=False)
    out.print(f"  issue      {c.issue_key} to {', '.join(m.slug for m in lists.values())}",
              highlight=False)
    if c.segment_filter:
        out.print(f"  segment    {c.segment_names}: {c.segment_filter}", highlight=False,
                  markup=False)
    running = f" by {c.runner}" if c.runner else ""
    on_it: list[str] = []
    if not c.runner and c.status == CampaignStatus.RUNNING:
        on_it = [w.name for w in nl.store.live_workers() if w.campaign_id == c.id]
        if on_it:
            running = f" by {len(on_it)} worker(s): {', '.join(on_it)}"
    out.print(f"  status     {c.status.value}{running}"
              + (f" ({c.status_note})" if c.status_note else ""), highlight=False)
    for name, n in (("sent", counts[DeliveryStatus.SENT]),
                    ("failed", counts.failed),
                    ("  temporary", counts[DeliveryStatus.FAILED_TEMP]),
                    ("  permanent", counts[DeliveryStatus.FAILED_PERM]),
                    ("  expired", counts[DeliveryStatus.EXPIRED]),
                    ("unknown", counts[DeliveryStatus.UNKNOWN]),
                    ("skipped", counts[DeliveryStatus.SKIPPED]),
                    ("in flight", counts[DeliveryStatus.SENDING]),
                    ("remaining", counts.remaining),
                    ("total", counts.total)):
        out.print(f"  {name:<10} {n:,}", highlight=False)
    rate = nl.store.recent_rate(c.id)
    if c.status == CampaignStatus.RUNNING and (c.runner or on_it) and rate > 0:
        eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=counts.remaining / rate)
        out.print(f"  rate       {rate:,.1f} msg/s over the last minute; estimated end "
                  f"{eta:%H:%M:%S} UTC", highlight=False)
    elif c.status == CampaignStatus.RUNNING:
        out.print("  rate       0 msg/s (no run is sending it now)", highlight=False)
    if c.last_error:
        out.print(f"  last error {c.last_error}", highlight=False)
    for email, error in nl.store.deliveries_of(c.id, DeliveryStatus.FAILED_PERM)[:5]:
        out.print(f"  failed     {email}: {error}", highlight=False)


@campaigns_app.command("pause")
def campaigns_pause(campaign_id: CampaignArg) -> None:
    """Pause a campaign; a send running in another process stops within a second."""
    if _state.app.store.pause_campaign(campaign_id):
        out.print(f"paused campaign {campaign_id}; resume with: newsletter campaigns resume "
                  f"{campaign_id}")
    else:
        c = _state.app.store.get_campaign(campaign_id)
        out.print(f"campaign {campaign_id} is {c.status.value}; nothing to pause")


@campaigns_app.command("cancel")
def campaigns_cancel(
    campaign_id: CampaignArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
    = False,
) -> None:
    """Cancel a campaign for good: whoever has not got it yet never will from this campaign."""
    nl = _state.app
    counts = nl.store.delivery_counts(campaign_id)
    if not yes and sys.stdin.isatty() and not typer.confirm(
            f"Cancel campaign {campaign_id} with {counts.remaining:,} still to send?"):
        raise typer.Exit(1)
    if nl.store.cancel_campaign(campaign_id):
        out.print(f"cancelled campaign {campaign_id}; {counts.remaining:,} were not sent")
    else:
        c = nl.store.get_campaign(campaign_id)
        out.print(f"campaign {campaign_id} is {c.status.value}; nothing to cancel")


@campaigns_app.command("resume")
def campaigns_resume(campaign_id: CampaignArg) -> None:
    """Resume a paused or unfinished campaign here; nobody gets it twice."""
    nl = _state.app
    plan = nl.resume_plan(campaign_id)
    _announce_mode(nl)
    report = _run_with_progress(nl, plan, f"campaign {campaign_id}")
    _print_report(report, nl, campaign_id)
    if report.aborted:
        raise typer.Exit(1)


@campaigns_app.command("retry")
def campaigns_retry(
    campaign_id: CampaignArg,
    failed: Annotated[bool, typer.Option(
        "--failed", help="Send again to failed rows (temporary, permanent, expired); "
        "addresses that bounced stay skipped.")] = False,
    unknown: Annotated[bool, typer.Option(
        "--unknown", help="Send again to rows whose outcome is unknown (they may get a "
        "second copy).")] = False,
) -> None:
    """Make failed or unknown deliveries due again, then resume the campaign."""
    nl = _state.app
    statuses: list[DeliveryStatus] = []
    if failed:
        statuses += [DeliveryStatus.FAILED_TEMP, DeliveryStatus.FAILED_PERM,
                     DeliveryStatus.EXPIRED]
    if unknown:
        statuses.append(DeliveryStatus.UNKNOWN)
    if not statuses:
        raise NewsletterError("say what to retry: --failed, --unknown or both")
    n = nl.store.requeue(campaign_id, statuses)
    out.print(f"{n:,} deliveries of campaign {campaign_id} are due again")
    campaigns_resume(campaign_id)


def _progress() -> Progress:
    """The send progress bar: done/total, rate, elapsed and remaining time."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=out,
    )


# --- demo -------------------------------------------------------------------------------------

def _find_sample(relative: str) -> Path:
    """A sample file from the working directory, else from the source tree we run from."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / relative).is_file():
            return base / relative
    raise NewsletterError(f"cannot find {relative}; run the demo from the repository folder")


@app.command("demo")
def demo(
    workspace: Annotated[Path, typer.Option(help="Where the demo keeps its files.")]
    = Path("var/demo"),
    serve_after: Annotated[bool, typer.Option(
        "--serve", help="Then serve the web pages, so the captured mail's links work.")] = False,
) -> None:
    """Send the sample issue to a sample list through the capture server, in a fresh workspace."""
    issue_file = _find_sample("examples/issues/sample.md")
    csv_file = _find_sample("subscribers/sample.csv")
    if workspace.exists():
        shutil.rmtree(workspace)
    # A throwaway key: the demo workspace is recreated on every run, links and all.
    settings = load_settings(var_dir=workspace, database_url="", smtp_url=None,
                             secret_key=secrets.token_urlsafe(32))
    nl = Newsletter(settings)
    out.print(f"[bold]newsletter demo[/] - a fresh workspace in {workspace}/")
    mlist = nl.store.create_list("demo", name="Digital Economy Brief")
    out.print(f"  list '{mlist.slug}' created")
    result = import_csv(nl.store, mlist.id, csv_file)
    out.print(f"  {csv_file.name}: {result.summary()}")
    built = nl.build_files(issue_file, workspace / "build")
    out.print(f"  rendered {issue_file.name}: {built.html} ({built.html_bytes / 1024:.1f} KB), "
              f"{built.text.name}, {built.eml.name}")
    plan = nl.plan_send(issue_file, ["demo"])
    _announce_mode(nl, force_capture=True)
    report = _run_with_progress(nl, plan, "sending", force_capture=True)
    _print_report(report, nl, plan.campaign.id)
    captured = sorted((settings.outbox_dir / "new").iterdir())
    out.print()
    out.print(f"HTML preview:   {built.html.resolve()}")
    out.print(f"Plain text:     {built.text.resolve()}")
    out.print(f"Outbox:         {(settings.outbox_dir / 'new').resolve()} "
              f"({len(captured)} messages)")
    if captured:
        out.print(f"One message:    {captured[0].resolve()}")
    if report.aborted:
        raise typer.Exit(1)
    if serve_after:
        _serve(nl, None, None)
    else:
        out.print("Web pages:      run 'newsletter demo --serve' to open the archive and the "
                  "unsubscribe links of these messages", highlight=False)


@app.command("settings")
def show_settings() -> None:
    """Show the settings in effect, as environment variable names; secrets are masked."""
    from sqlalchemy.engine import make_url

    s: Settings = _state.app.settings
    for name in Settings.model_fields:
        value: Any = getattr(s, name)
        if name in ("secret_key", "smtp_url", "old_secret_keys"):
            value = "(set)" if value else "(not set)"
        elif name == "database_url":
            value = make_url(s.resolved_database_url).render_as_string(hide_password=True)
        elif name == "relays":
            value = [f"{r.label} ({r.smtp.describe()})" for r in value]
        elif isinstance(value, Path):
            value = str(value)
        key = "FROM" if name == "from_address" else name.upper()
        out.print(f"NEWSLETTER_{key} = {value!r}", markup=False)
    relays = s.relay_configs()
    out.print("capture mode: no relay set, mail is stored in "
              f"{s.outbox_dir}/" if not relays else
              "relays: " + ", ".join(r.smtp.describe() for r in relays), markup=False)


# The admin commands live in their own module and register themselves on the groups above.
from . import cli_admin  # noqa: E402, F401


def main() -> None:
    """Console entry point: one clear line for every expected error."""
    # Typer runs in standalone mode: usage errors, --help and typer.Exit end in SystemExit
    # there; our own errors come out here.
    try:
        app()
    except FilterSyntaxError as exc:
        err.print(f"error: {exc}\n{exc.pointer()}", markup=False)
        sys.exit(1)
    except NewsletterError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
