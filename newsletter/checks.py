"""Checks of an issue before it is sent: plain functions that return findings.

`check_issue` runs them all on the issue as a reader gets it (rendered through the real
pipeline, slots filled with a sample reader's values) for `newsletter issue check`; each
check is usable alone, e.g. by the API or a preview page. Two checks need outside tools:
the CSS support report (node and doiuse-email, installed by `npm ci` in tools/email-css) and
the SpamAssassin score (`spamassassin`). Their runners return None when the tool is missing
(`*_missing()` says why), so the report and the tests can say what was skipped.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from rich.markup import escape

from .content.model import Issue
from .content.parse import load_issue
from .errors import ContentError, NewsletterError, RenderError
from .render.markdown import to_html

if TYPE_CHECKING:
    from rich.console import Console

    from .service import Newsletter

# Gmail clips a message whose HTML passes about 102 KB, hiding the rest (unsubscribe link
# included); stay under 100 KB and warn from 90 KB.
HTML_WARN_BYTES = 90 * 1024
HTML_MAX_BYTES = 100 * 1024
# SpamAssassin's own bar is 5.0 ("required"); above 2.0 is worth a look before sending.
SPAM_WARN_SCORE = 2.0

EMAIL_CSS_DIR = Path(__file__).resolve().parents[1] / "tools" / "email-css"
CSS_CLIENTS = ("gmail.*", "outlook.windows")
_SAFE_SCHEMES = ("http://", "https://", "mailto:")


class Level(StrEnum):
    ERROR = "error"      # must be fixed: the command exits non-zero
    WARNING = "warning"  # worth fixing; does not fail the check
    NOTE = "note"        # information: sizes, scores, what was skipped or allowed


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str
    where: str = ""  # FILE:LINE: FIELD like the parser's errors, or "HTML" for the template
    details: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level.value, "code": self.code, "message": self.message,
                "where": self.where, "details": list(self.details)}


class ToolError(NewsletterError):
    """An outside checking tool is installed but failed (exit status, timeout, output)."""


# --- the issue's own content ----------------------------------------------------------------

class _AllLinks(MarkdownIt):
    """The body parser with every link kept and raw HTML recognised, to see what the
    editor wrote; the renderer itself drops unsafe links and shows raw HTML as text."""

    def validateLink(self, url: str) -> bool:
        return True


_source_md = _AllLinks("commonmark").enable(["table", "strikethrough"])


def check_content(issue: Issue, *, name: str = "<issue>", source: str = "",
                  prefix: str = "") -> list[Finding]:
    """Links that are not http(s) or mailto, images without alt text, raw HTML (shown as
    literal text) and empty sections, per article. `source` (the file's text) gives lines;
    `prefix` goes before field names (a translation's "translations.zh.")."""
    lines = _Locator(source)
    findings: list[Finding] = []
    last = lines.body_start
    for s_index, section in enumerate(issue.sections, start=1):
        s_line = lines.find(section.title, last)
        last = s_line or last
        where = _where(name, s_line, f"{prefix}sections[{s_index}]")
        if not any(a.body.strip() for a in section.articles):
            findings.append(Finding(Level.WARNING, "empty-section",
                                    f"section {section.title!r}: none of its articles has a "
                                    "body, so only titles show", where))
        for a_index, article in enumerate(section.articles, start=1):
            a_line = lines.find(article.title, last)
            last = a_line or last
            loc = f"{prefix}sections[{s_index}].articles[{a_index}]"
            for kind, value, token in _body_items(article.body):
                where = _where(name, lines.find(value, last) or a_line, loc)
                findings += _item_findings(kind, value, token, where)
    return findings


def _body_items(body: str) -> Iterator[tuple[str, str, Token]]:
    """("link" | "image" | "html", href/src/markup, token) for everything in a body."""
    def walk(tokens: Sequence[Token]) -> Iterator[tuple[str, str, Token]]:
        for tok in tokens:
            if tok.type == "link_open":
                yield "link", str(tok.attrs.get("href", "")), tok
            elif tok.type == "image":
                yield "image", str(tok.attrs.get("src", "")), tok
            elif tok.type in ("html_block", "html_inline"):
                yield "html", tok.content.strip(), tok
            if tok.children:
                yield from walk(tok.children)

    yield from walk(_source_md.parse(body))


def _item_findings(kind: str, value: str, token: Token, where: str) -> list[Finding]:
    if kind == "html":
        hint = " (for an image write ![description](https://...))" if re.match(
            r"<img\b", value, re.IGNORECASE) else ""
        return [Finding(Level.WARNING, "raw-html", f"raw HTML is not rendered: {_short(value)} "
                        f"shows in the email as literal text{hint}", where)]
    out = []
    if kind == "image" and not token.content.strip():
        out.append(Finding(Level.WARNING, "image-alt", f"image {_short(value)} has no alt "
                           "text: write ![what it shows](url), for screen readers and "
                           "clients that block images", where))
    problem = _link_problem(value, image=kind == "image")
    if problem:
        out.append(Finding(Level.ERROR, "link-scheme", problem, where))
    return out


def _link_problem(url: str, *, image: bool = False) -> str | None:
    """Why a link (or an image source) will not work in an email, or None."""
    what = "image" if image else "link"
    low = url.strip().lower()
    if low.startswith(("http://", "https://") if image else _SAFE_SCHEMES):
        return None
    if re.match(r"(javascript|vbscript|data|file):", low):
        return (f"{what} {_short(url)} is unsafe: the email shows the Markdown text instead "
                "of a link")
    if re.match(r"[a-z][a-z0-9+.-]*:", low):
        return (f"{what} {_short(url)} is not http(s){'' if image else ' or mailto'}: mail "
                "clients will not open it")
    return (f"{what} {_short(url)} is relative: an email has no address to resolve it "
            "against; write the full https:// URL")


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return "`" + (text if len(text) <= limit else text[:limit - 1] + "…") + "`"


class _Locator:
    """Approximate line numbers in the issue file: the first line, from `start` on, that
    contains the text. Good enough to point an editor at a link or a title."""

    def __init__(self, source: str) -> None:
        self.lines = source.splitlines()
        # After a Markdown file's front matter, where its sections are.
        self.body_start = 1
        if self.lines and self.lines[0].strip() == "---":
            self.body_start = next((n + 1 for n in range(1, len(self.lines))
                                    if self.lines[n].strip() in ("---", "...")), 1)

    def find(self, text: str, start: int = 1) -> int | None:
        needle = text.strip().splitlines()[0] if text.strip() else ""
        if not needle:
            return None
        for n in range(start - 1, len(self.lines)):
            if needle in self.lines[n]:
                return n + 1
        return None


def _where(name: str, line: int | None, field_name: str | None) -> str:
    where = name + (f":{line}" if line is not None else "")
    return f"{where}: {field_name}" if field_name else where


# --- the rendered HTML ----------------------------------------------------------------------

def check_size(html: str) -> list[Finding]:
    """The HTML part's size against Gmail's clipping (about 102 KB)."""
    size = len(html.encode("utf-8"))
    text = f"the HTML part is {size / 1024:.1f} KB"
    if size > HTML_MAX_BYTES:
        return [Finding(Level.ERROR, "html-size", f"{text}, over {HTML_MAX_BYTES // 1024} KB: "
                        "Gmail clips it and hides the rest, unsubscribe link included; "
                        "split the issue or shorten it", "HTML")]
    if size >= HTML_WARN_BYTES:
        return [Finding(Level.WARNING, "html-size", f"{text}, close to the "
                        f"{HTML_MAX_BYTES // 1024} KB where Gmail starts clipping", "HTML")]
    return [Finding(Level.NOTE, "html-size", f"{text} (warning from {HTML_WARN_BYTES // 1024} "
                    f"KB, error above {HTML_MAX_BYTES // 1024} KB)", "HTML")]


class _Tags(HTMLParser):
    """Every <a href> and <img> of a document, with their attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a" and dict(attrs).get("href") is not None:
            self.links.append(str(dict(attrs)["href"]))
        elif tag == "img":
            self.images.append(dict(attrs))


def _tags(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return parser


def check_template_html(html: str, issue: Issue) -> list[Finding]:
    """Links and images that the templates (not the articles) put in the rendered HTML:
    every link http(s), mailto or an in-message #anchor, every image with an alt."""
    from_articles = _Tags()
    for section in issue.sections:
        for article in section.articles:
            from_articles.feed(to_html(article.body))
    own_links, own_srcs = set(from_articles.links), {i.get("src") for i in from_articles.images}
    tags = _tags(html)
    findings = []
    for href in dict.fromkeys(tags.links):
        if href not in own_links and not href.startswith("#"):
            problem = _link_problem(href)
            if problem:
                findings.append(Finding(Level.ERROR, "link-scheme", problem, "HTML"))
    for img in tags.images:
        if img.get("src") in own_srcs:
            continue
        if img.get("alt") is None:
            src = _short(img.get("src") or "")
            findings.append(Finding(Level.WARNING, "image-alt", f"image {src} has no alt "
                                    "attribute (alt=\"\" if it is decorative)", "HTML"))
        problem = _link_problem(img.get("src") or "", image=True)
        if problem:
            findings.append(Finding(Level.ERROR, "link-scheme", problem, "HTML"))
    return findings


# --- CSS support: doiuse-email and the caniemail data ---------------------------------------

@dataclass(frozen=True)
class CssFeature:
    feature: str     # as caniemail names it: "@media", "display:flex", "Local anchors"
    client: str      # "outlook.windows", "gmail.ios", ...
    support: str     # "none" or "partial"
    count: int       # how many times the HTML uses it
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CssReport:
    tool: str
    clients: tuple[str, ...]
    features: tuple[CssFeature, ...]
    other: tuple[str, ...] = ()

    def unsupported(self) -> set[tuple[str, str]]:
        return {(f.feature, f.client) for f in self.features if f.support == "none"}


@dataclass(frozen=True)
class Allowed:
    feature: str
    clients: tuple[str, ...]
    reason: str


def css_tool_missing(tool_dir: Path = EMAIL_CSS_DIR) -> str | None:
    """Why the CSS report cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (tool_dir / "node_modules" / "doiuse-email").is_dir():
        return f"doiuse-email is not installed (run: npm ci --prefix {tool_dir})"
    return None


def run_doiuse(html: str, clients: Sequence[str] = CSS_CLIENTS, *,
               tool_dir: Path = EMAIL_CSS_DIR, timeout: float = 60) -> CssReport | None:
    """doiuse-email's report on the HTML for the clients; None if node or it is missing."""
    if css_tool_missing(tool_dir) is not None:
        return None
    node = shutil.which("node") or "node"
    data = json.loads(_run([node, str(tool_dir / "check.mjs"), "-", *clients],
                           html.encode("utf-8"), "doiuse-email", timeout))
    return CssReport(
        tool=data["tool"], clients=tuple(data["clients"]), other=tuple(data["other"]),
        features=tuple(CssFeature(f["feature"], f["client"], f["support"], f["count"],
                                  tuple(f["notes"])) for f in data["features"]))


def load_allowlist(path: Path = EMAIL_CSS_DIR / "allowlist.json") -> list[Allowed]:
    """The allowlist: unsupported constructs kept on purpose, each with its reason."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["allowed"]
        allowed = [Allowed(e["feature"], tuple(e["clients"]), e["reason"].strip())
                   for e in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NewsletterError(f"{path}: not a valid allowlist ({exc})") from None
    for entry in allowed:
        if not entry.reason or not entry.clients:
            raise NewsletterError(f"{path}: {entry.feature!r} needs clients and a reason")
    return allowed


def check_css(report: CssReport, allowlist: Iterable[Allowed] = ()) -> list[Finding]:
    """A warning per construct a client does not support, unless allowed; allowed ones and
    partial support (caniemail's caveats) as notes."""
    allowed = {(a.feature, c): a.reason for a in allowlist for c in a.clients}
    findings = []
    for feature, rows in _by_feature(f for f in report.features if f.support == "none"):
        counted = [r for r in rows if (feature, r.client) not in allowed]
        if counted:
            findings.append(Finding(
                Level.WARNING, "css-unsupported",
                f"`{feature}` is not supported by {_clients(counted)} "
                f"(used {max(r.count for r in counted)}x)", "HTML",
                tuple(f"{r.client}: {n}" for r in counted for n in r.notes)))
        for reason in dict.fromkeys(allowed[feature, r.client] for r in rows
                                    if (feature, r.client) in allowed):
            ok = [r for r in rows if allowed.get((feature, r.client)) == reason]
            findings.append(Finding(Level.NOTE, "css-allowed", f"`{feature}` is not supported "
                                    f"by {_clients(ok)}: allowed ({reason})", "HTML"))
    partial = list(_by_feature(f for f in report.features if f.support == "partial"))
    if partial:
        findings.append(Finding(
            Level.NOTE, "css-partial", "partly supported, with caveats (details in --json): "
            + ", ".join(f"`{feature}`" for feature, _ in partial), "HTML",
            tuple(f"{feature} in {r.client}: {n}" for feature, rows in partial for r in rows
                  for n in r.notes)))
    findings += [Finding(Level.NOTE, "css-other", line, "HTML") for line in report.other]
    return findings


def _by_feature(features: Iterable[CssFeature]) -> Iterator[tuple[str, list[CssFeature]]]:
    groups: dict[str, list[CssFeature]] = {}
    for f in features:
        groups.setdefault(f.feature, []).append(f)
    yield from groups.items()


def _clients(rows: Sequence[CssFeature]) -> str:
    return ", ".join(dict.fromkeys(r.client for r in rows))


# --- SpamAssassin ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SpamRule:
    name: str
    points: float
    description: str = ""


@dataclass(frozen=True)
class SpamReport:
    score: float
    required: float
    rules: tuple[SpamRule, ...]

    @property
    def is_spam(self) -> bool:
        return self.score >= self.required


def spamassassin_missing() -> str | None:
    """Why the SpamAssassin score cannot be computed here, or None."""
    if shutil.which("spamassassin") is None:
        return "spamassassin is not installed (Debian: apt-get install spamassassin)"
    return None


def run_spamassassin(eml: bytes, *, timeout: float = 120) -> SpamReport | None:
    """The message's score with local tests only (-L: no DNS or network checks, so no
    DKIM/SPF/blocklists) and no Bayes database; None if spamassassin is missing."""
    exe = shutil.which("spamassassin")
    if exe is None:
        return None
    out = _run([exe, "-L", "-t", "-x", "--cf=use_bayes 0"], eml, "spamassassin", timeout)
    return parse_spamassassin(out)


def parse_spamassassin(output: bytes) -> SpamReport:
    """Score, bar and rules from `spamassassin -t` output: the X-Spam-Status header, with
    points and descriptions from the report table appended to the message."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(output)
    # Folded: "tests=A,\n\tB,C"; unfolded without the spaces after commas.
    status = re.sub(r",\s+", ",", " ".join(str(headers.get("X-Spam-Status", "")).split()))
    m = re.search(r"score=(-?[\d.]+) required=(-?[\d.]+)(?: tests=(\S*))?", status)
    if m is None:
        raise ToolError("spamassassin: no X-Spam-Status header in its output")
    names = [t for t in (m.group(3) or "").split(",") if t]
    table: dict[str, SpamRule] = {}
    text = output.decode("utf-8", "replace")
    report = text.rsplit("Content analysis details:", 1)[-1]
    last: str | None = None
    for line in report.splitlines()[1:]:
        row = re.match(r"\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]+)\s+(.*)", line)
        if row:
            last = row.group(2)
            table[last] = SpamRule(last, float(row.group(1)), row.group(3).strip())
        elif last and line.startswith(" " * 20) and line.strip():
            rule = table[last]
            table[last] = SpamRule(rule.name, rule.points,
                                   f"{rule.description} {line.strip()}")
    rules = tuple(table.get(n, SpamRule(n, 0.0)) for n in names)
    return SpamReport(float(m.group(1)), float(m.group(2)),
                      tuple(sorted(rules, key=lambda r: -r.points)))


def check_spam(report: SpamReport) -> list[Finding]:
    hits = ", ".join(f"{r.name} {r.points:g}" for r in report.rules if r.points) or "none"
    text = (f"SpamAssassin score {report.score:.1f} ({report.required:.1f} is spam; local "
            f"tests only), rules with points: {hits}")
    level = (Level.ERROR if report.is_spam else
             Level.WARNING if report.score > SPAM_WARN_SCORE else Level.NOTE)
    return [Finding(level, "spam-score", text, "message",
                    tuple(f"{r.name} {r.points:g}: {r.description}" for r in report.rules))]


def _run(cmd: list[str], stdin: bytes, name: str, timeout: float) -> bytes:
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ToolError(f"{name} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ToolError(f"{name} failed (exit {proc.returncode}): "
                        f"{lines[-1] if lines else 'no message'}")
    return proc.stdout


# --- everything, on an issue file -----------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """An issue as a sample reader gets it: the HTML and text parts and the whole message."""

    html: str
    text: str
    eml: bytes


def render_sample(nl: Newsletter, path: Path) -> Sample:
    """Through the real pipeline: what `newsletter issue build` writes."""
    with tempfile.TemporaryDirectory(prefix="newsletter-check-") as tmp:
        built = nl.build_files(path, Path(tmp))
        return Sample(built.html.read_text(encoding="utf-8"),
                      built.text.read_text(encoding="utf-8"), built.eml.read_bytes())


@dataclass
class Report:
    path: str
    findings: list[Finding] = field(default_factory=list)
    subject: str | None = None
    html_bytes: int | None = None
    css: CssReport | None = None
    spam: SpamReport | None = None

    def count(self, level: Level) -> int:
        return sum(f.level == level for f in self.findings)

    @property
    def ok(self) -> bool:
        """No errors (warnings do not fail a check)."""
        return self.count(Level.ERROR) == 0

    def as_dict(self) -> dict[str, Any]:
        order = list(Level)
        return {
            "file": self.path, "ok": self.ok, "subject": self.subject,
            "html_bytes": self.html_bytes,
            "counts": {level.value: self.count(level) for level in Level},
            "findings": [f.as_dict() for f in
                         sorted(self.findings, key=lambda f: order.index(f.level))],
            "css": None if self.css is None else {
                "tool": self.css.tool, "clients": list(self.css.clients),
                "features": [vars(f) | {"notes": list(f.notes)} for f in self.css.features]},
            "spam": None if self.spam is None else {
                "score": self.spam.score, "required": self.spam.required,
                "rules": [vars(r) for r in self.spam.rules]},
        }


def check_issue(nl: Newsletter, path: Path, *, css: bool = True, spam: bool = True,
                allowlist: Path = EMAIL_CSS_DIR / "allowlist.json") -> Report:
    """Every check on an issue file; an invalid file gives the parser's error only."""
    report = Report(str(path))
    try:
        issue = load_issue(path)
        sample = render_sample(nl, path)
    except ContentError as exc:
        report.findings.append(Finding(Level.ERROR, "invalid", exc.message,
                                       _where(exc.path or str(path), exc.line, exc.field)))
        return report
    except RenderError as exc:
        report.findings.append(Finding(Level.ERROR, "render", str(exc), str(path)))
        return report
    report.subject = issue.effective_subject
    report.html_bytes = len(sample.html.encode("utf-8"))
    source = path.read_text(encoding="utf-8-sig")
    editions = list(issue.editions().items())  # this issue's language first
    main = editions[0][1]
    report.findings += check_size(sample.html)
    report.findings += check_content(main, name=str(path), source=source)
    report.findings += check_template_html(sample.html, main)
    for lang, edition in editions[1:]:
        # No lines: a translation may come from a sibling file (issue.zh.md).
        report.findings += check_content(edition, name=str(path), prefix=f"translations.{lang}.")
    if len(editions) > 1:
        report.findings.append(Finding(
            Level.NOTE, "editions", f"editions {', '.join(lang for lang, _ in editions)}: the "
            f"content of each is checked; the rendered checks cover the {editions[0][0]} edition"))
    if css:
        report.findings += _tool_findings("css", css_tool_missing(), lambda: _css(report, sample,
                                                                                  allowlist))
    if spam:
        report.findings += _tool_findings("spam", spamassassin_missing(),
                                          lambda: _spam(report, sample))
    return report


def _css(report: Report, sample: Sample, allowlist: Path) -> list[Finding]:
    report.css = run_doiuse(sample.html)
    return [] if report.css is None else check_css(report.css, load_allowlist(allowlist))


def _spam(report: Report, sample: Sample) -> list[Finding]:
    report.spam = run_spamassassin(sample.eml)
    return [] if report.spam is None else check_spam(report.spam)


def _tool_findings(name: str, missing: str | None,
                   run: Callable[[], list[Finding]]) -> list[Finding]:
    label = {"css": "CSS support report", "spam": "SpamAssassin score"}[name]
    if missing is not None:
        return [Finding(Level.NOTE, f"{name}-skipped", f"{label} skipped: {missing}")]
    try:
        findings = run()
    except ToolError as exc:
        return [Finding(Level.WARNING, f"{name}-failed", f"{label} failed: {exc}")]
    return findings


# --- the readable report ----------------------------------------------------------------------

_STYLE = {Level.ERROR: "bold red", Level.WARNING: "yellow", Level.NOTE: "dim"}


def print_report(report: Report, console: Console) -> None:
    """One line per finding, errors first, in the CLI's `level: where: message` form."""
    head = escape(report.path)
    if report.subject is not None:
        head += f": {escape(report.subject)}"
    console.print(f"[bold]{head}[/bold]")
    for level in Level:
        for f in (f for f in report.findings if f.level == level):
            where = f"{escape(f.where)}: " if f.where else ""
            console.print(f"[{_STYLE[level]}]{level.value}[/]: {where}{escape(f.message)} "
                          f"[dim]\\[{f.code}][/dim]")
            if level != Level.NOTE:
                for line in f.details:
                    console.print(f"    {escape(line)}", style="dim")
    counts = [f"{report.count(level)} {level.value}{'s' if report.count(level) != 1 else ''}"
              for level in Level]
    verdict = "[bold red]not ready[/]" if not report.ok else "[green]ready to send[/]"
    console.print(f"{', '.join(counts)}: {verdict}")
