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
import glob
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
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
from .render.issue import SIZE_WARN_BYTES, SizeLevel, size_check
from .render.markdown import to_html

if TYPE_CHECKING:
    from rich.console import Console

    from .service import Newsletter

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
    """Links that are not http(s) or mailto, raw HTML (shown as literal text) and empty
    sections, per article. (Images without alt text or https are the model's errors.)
    `source` (the file's text) gives lines; `prefix` goes before field names (a
    translation's "translations.zh.")."""
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
            for kind, value in _body_items(article.body):
                where = _where(name, lines.find(value, last) or a_line, loc)
                findings += _item_findings(kind, value, where)
    return findings


def _body_items(body: str) -> Iterator[tuple[str, str]]:
    """("link", href) and ("html", markup) for everything of the kind in a body."""
    def walk(tokens: Sequence[Token]) -> Iterator[tuple[str, str]]:
        for tok in tokens:
            if tok.type == "link_open":
                yield "link", str(tok.attrs.get("href", ""))
            elif tok.type in ("html_block", "html_inline"):
                yield "html", tok.content.strip()
            if tok.children:
                yield from walk(tok.children)

    yield from walk(_source_md.parse(body))


def _item_findings(kind: str, value: str, where: str) -> list[Finding]:
    if kind == "html":
        hint = " (for an image write ![what it shows](https://...))" if re.match(
            r"<img\b", value, re.IGNORECASE) else ""
        return [Finding(Level.WARNING, "raw-html", f"raw HTML is not rendered: {_short(value)} "
                        f"shows in the email as literal text{hint}", where)]
    problem = _link_problem(value)
    return [Finding(Level.ERROR, "link-scheme", problem, where)] if problem else []


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
    """The HTML part's size against Gmail's clipping, measured as `issue build` and `send`
    measure it (render.issue.size_check)."""
    size = size_check(html)
    if size.level is SizeLevel.OVER:
        return [Finding(Level.ERROR, "html-size", f"{size.describe()}; newsletter send refuses "
                        "it without --force: shorten the issue or split it", "HTML")]
    if size.level is SizeLevel.WARN:
        return [Finding(Level.WARNING, "html-size", size.describe(), "HTML")]
    return [Finding(Level.NOTE, "html-size", f"{size.describe()} (a warning above "
                    f"{SIZE_WARN_BYTES // 1000} KB, an error above {size.limit // 1000} KB)",
                    "HTML")]


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
            table[last] = SpamRule(last, float(row.group(1)) or 0.0, row.group(3).strip())
        elif last and line.startswith(" " * 20) and line.strip():
            rule = table[last]
            table[last] = SpamRule(rule.name, rule.points,
                                   f"{rule.description} {line.strip()}")
    rules = tuple(table.get(n, SpamRule(n, 0.0)) for n in names)
    # `or 0.0`: SpamAssassin prints -0.0 for a sum of informational rules.
    return SpamReport(float(m.group(1)) or 0.0, float(m.group(2)),
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
    """One edition as a sample reader gets it: the HTML and text parts and the message."""

    language: str
    subject: str
    html: str
    text: str
    eml: bytes


def render_samples(nl: Newsletter, path: Path) -> list[Sample]:
    """Every edition of the issue, its main one first, through the real pipeline: what
    `newsletter issue build` writes."""
    editions = load_issue(path).editions()
    with tempfile.TemporaryDirectory(prefix="newsletter-check-") as tmp:
        main = nl.build_files(path, Path(tmp))
        built = [main, *(main.editions[lang] for lang in list(editions)[1:])]
        return [Sample(lang, issue.effective_subject, b.html.read_text(encoding="utf-8"),
                       b.text.read_text(encoding="utf-8"), b.eml.read_bytes())
                for (lang, issue), b in zip(editions.items(), built, strict=True)]


@dataclass
class EditionReport:
    language: str
    subject: str
    html_bytes: int
    css: CssReport | None = None    # None: not run
    spam: SpamReport | None = None

    def as_dict(self) -> dict[str, Any]:
        css, spam = self.css, self.spam
        return {
            "language": self.language, "subject": self.subject, "html_bytes": self.html_bytes,
            "css": None if css is None else {
                "tool": css.tool, "clients": list(css.clients),
                "features": [vars(f) | {"notes": list(f.notes)} for f in css.features]},
            "spam": None if spam is None else {
                "score": spam.score, "required": spam.required,
                "rules": [vars(r) for r in spam.rules]},
        }


@dataclass
class Report:
    path: str
    findings: list[Finding] = field(default_factory=list)
    editions: list[EditionReport] = field(default_factory=list)  # the main one first

    @property
    def subject(self) -> str | None:
        return self.editions[0].subject if self.editions else None

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
            "counts": {level.value: self.count(level) for level in Level},
            "findings": [f.as_dict() for f in
                         sorted(self.findings, key=lambda f: order.index(f.level))],
            "editions": [e.as_dict() for e in self.editions],
        }


def check_issue(nl: Newsletter, path: Path, *, css: bool = True, spam: bool = True,
                allowlist: Path = EMAIL_CSS_DIR / "allowlist.json") -> Report:
    """Every check on an issue file and each of its language editions; an invalid file
    gives the parser's error only."""
    report = Report(str(path))
    try:
        editions = load_issue(path).editions()
        samples = render_samples(nl, path)
    except ContentError as exc:
        report.findings.append(Finding(Level.ERROR, "invalid", exc.message,
                                       _where(exc.path or str(path), exc.line, exc.field)))
        return report
    except RenderError as exc:
        report.findings.append(Finding(Level.ERROR, "render", str(exc), str(path)))
        return report
    source = path.read_text(encoding="utf-8-sig")
    css_missing = css_tool_missing() if css else None
    spam_missing = spamassassin_missing() if spam else None
    allowed = load_allowlist(allowlist) if css and css_missing is None else []
    for n, sample in enumerate(samples):
        edition = editions[sample.language]
        # With several editions, say which one a rendered finding is about.
        tag = f" ({sample.language})" if len(samples) > 1 else ""
        found = check_size(sample.html) + check_template_html(sample.html, edition)
        sibling = _edition_file(path, sample.language) if n else None
        if n == 0:
            found += check_content(edition, name=str(path), source=source)
        elif sibling is not None:  # issue.zh.md beside issue.en.md
            found += check_content(edition, name=str(sibling),
                                   source=sibling.read_text(encoding="utf-8-sig"))
        else:  # a translations block: no lines (the same text may be in both editions)
            found += check_content(edition, name=str(path),
                                   prefix=f"translations.{sample.language}.")
        er = EditionReport(sample.language, sample.subject, len(sample.html.encode("utf-8")))
        report.editions.append(er)
        if css and css_missing is None:
            found += _css(er, sample, allowed)
        if spam and spam_missing is None:
            found += _spam(er, sample)
        report.findings += [replace(f, where=f.where + tag) if f.where in ("HTML", "message")
                            else f for f in found]
    if css_missing is not None:
        report.findings.append(Finding(Level.NOTE, "css-skipped",
                                       f"CSS support report skipped: {css_missing}"))
    if spam_missing is not None:
        report.findings.append(Finding(Level.NOTE, "spam-skipped",
                                       f"SpamAssassin score skipped: {spam_missing}"))
    return report


def _edition_file(path: Path, language: str) -> Path | None:
    """The sibling file an edition was read from (issue.zh.md beside issue.en.md), if any."""
    base, dot, _ = path.stem.rpartition(".")
    if not dot:
        return None
    for sibling in path.parent.glob(f"{glob.escape(base)}.*{path.suffix}"):
        if sibling.stem[len(base) + 1:].lower() == language:
            return sibling
    return None


def _css(er: EditionReport, sample: Sample, allowed: list[Allowed]) -> list[Finding]:
    try:
        er.css = run_doiuse(sample.html)
    except ToolError as exc:
        return [Finding(Level.WARNING, "css-failed", f"CSS support report failed: {exc}",
                        "HTML")]
    return [] if er.css is None else check_css(er.css, allowed)


def _spam(er: EditionReport, sample: Sample) -> list[Finding]:
    try:
        er.spam = run_spamassassin(sample.eml)
    except ToolError as exc:
        return [Finding(Level.WARNING, "spam-failed", f"SpamAssassin score failed: {exc}",
                        "message")]
    return [] if er.spam is None else check_spam(er.spam)


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
