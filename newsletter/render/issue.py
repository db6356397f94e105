"""Render an Issue once: Jinja to HTML and text, premailer to inline the CSS.

Per-recipient values are not known here; the templates receive slot markers instead, which
survive escaping and inlining and are spliced per recipient by render.message. The size of
the result is checked against Gmail's clipping limit by size_check().
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jinja2
from markupsafe import Markup

from ..content.model import Issue
from ..errors import RenderError
from .markdown import CONTENT_WIDTH, IMAGE_STYLE, TextRenderer, text_width, to_html, wrap
from .templates import render_template

# Slot markers: plain ASCII letters so neither autoescape, premailer nor lxml alter them.
SLOTS = ("unsubscribe_url", "recipient_email", "list_name", "web_url", "preferences_url")
_SLOT_FMT = "NLSLOT{}NLSLOT"
SLOT_RE = re.compile(r"NLSLOT([a-z_]+)NLSLOT")

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "contents": "In this issue", "number": "No. {n}", "source": "Source", "colon": ": ",
        "sent_to": "Sent to", "because": "because you subscribed to",
        "reason": "Sent to {email} because you subscribed to {list}.",
        "reason_text": "Sent to {email}\nbecause you subscribed to {list}.",
        "unsubscribe": "Unsubscribe", "preferences": "Preferences",
        "view_online": "View in browser",
    },
    "zh": {
        "contents": "本期目录", "number": "第 {n} 期", "source": "来源", "colon": "：",
        "sent_to": "收件人", "because": "您订阅了", "unsubscribe": "退订",
        "reason": "本邮件发送至 {email}，因为您订阅了 {list}。",
        "reason_text": "本邮件发送至 {email}\n因为您订阅了 {list}。",
        "preferences": "订阅设置", "view_online": "在浏览器中查看",
    },
}

# Font stacks, written once here rather than in each rule. The sans stack names a CJK font
# for every platform (macOS, Windows, Linux/Android) so Chinese never falls back to a serif
# bitmap face; Latin body text keeps the serif look of the original design.
FONT_SANS = Markup('-apple-system, BlinkMacSystemFont, "Segoe UI", Helvetica, Arial, '
                   '"PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "Noto Sans CJK SC", '
                   'sans-serif')
FONT_SERIF = Markup('Georgia, "Times New Roman", "Songti SC", SimSun, serif')
_CJK_LANGUAGES = ("zh", "ja", "ko")

_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class Branding:
    """How the mail looks without editing templates (the brand_* settings).

    The colours go into CSS unescaped (autoescape does not know CSS), so they are checked
    here as well as in the settings: only #rrggbb can reach a template.
    """

    logo_url: str = ""
    logo_width: int = 160
    color: str = "#1f5f99"         # section bars, article numbers, contents links
    accent_color: str = "#1f5f99"  # links in article text
    footer_text: str = ""          # a line above the footer

    def __post_init__(self) -> None:
        for name in ("color", "accent_color"):
            if not _HEX_COLOR.fullmatch(getattr(self, name)):
                raise ValueError(f"brand {name} must be #rrggbb, not {getattr(self, name)!r}")
        if self.logo_url and (not self.logo_url.startswith("https://")
                              or re.search(r"[\s\"'<>]", self.logo_url)):
            raise ValueError("brand logo_url must be an https:// URL")
        if not 16 <= self.logo_width <= CONTENT_WIDTH:
            raise ValueError(f"brand logo_width must be 16 to {CONTENT_WIDTH}")


def slot(name: str) -> str:
    if name not in SLOTS:
        raise ValueError(f"unknown slot {name}")
    return _SLOT_FMT.format(name)


def fill_slots(text: str, values: dict[str, str]) -> str:
    """Replace slot markers with values, for previews; sending splices bytes instead."""
    return SLOT_RE.sub(lambda m: values[m.group(1)], text)


@dataclass(frozen=True)
class RenderedIssue:
    """The output of rendering: what is stored with a campaign and spliced per recipient."""

    subject: str
    html: str
    text: str
    language: str


def labels_for(language: str) -> dict[str, str]:
    return LABELS.get(language.split("-")[0].lower(), LABELS["en"])


def _shout(text: str) -> str:
    """Upper case for Latin headings in the text part; other scripts have no case."""
    return text.upper() if text.isascii() else text


def issue_context(issue: Issue, *, text_width: int = 72) -> dict[str, Any]:
    """What the issue templates (email and web) are given about the issue itself."""
    sections: list[dict[str, Any]] = []
    for s_index, section in enumerate(issue.sections, start=1):
        articles = []
        for number, article in enumerate(section.articles, start=1):
            # Footnotes are numbered per article and listed under it: a reader finds [2]
            # a few lines down, not at the end of a long issue.
            texts = TextRenderer(width=text_width)
            link = str(article.link) if article.link else None
            heading = f"{number}. {article.title}"
            if link:
                heading += f" [{texts.footnote(link)}]"
            body_text = texts.render(article.body)
            articles.append({
                "number": number, "title": article.title, "link": link,
                "anchor": f"section-{s_index}-{number}",
                "source": article.source, "html": to_html(article.body), "text": body_text,
                "images": [{"url": str(i.url), "alt": i.alt, "width": i.width}
                           for i in article.images],
                "heading_text": wrap(heading, text_width, "", " " * len(f"{number}. ")),
                "footnotes": list(enumerate(texts.links, start=1)),
            })
        title_text = wrap(_shout(section.title), text_width)
        sections.append({
            "title": section.title, "anchor": f"section-{s_index}", "articles": articles,
            "title_text": title_text,
            "underline": _underline(title_text),
        })
    return {"issue": issue, "subject": issue.effective_subject, "sections": sections,
            "labels": labels_for(issue.language)}


def render_issue(
    issue: Issue, env: jinja2.Environment, *, brand_name: str, postal_address: str,
    text_width: int = 72, branding: Branding | None = None,
) -> RenderedIssue:
    """Jinja once for HTML and once for text, then premailer once; returns slotted output."""
    cjk = issue.language.split("-")[0].lower() in _CJK_LANGUAGES

    def wrap_text(text: str, indent: str = "", subsequent: str | None = None) -> str:
        return wrap(text, text_width, indent, subsequent)

    context: dict[str, Any] = {
        **issue_context(issue, text_width=text_width),
        "brand_name": brand_name, "postal_address": postal_address,
        "brand": branding or Branding(), "cjk": cjk,
        "fonts": {"sans": FONT_SANS, "body": FONT_SANS if cjk else FONT_SERIF},
        "content_width": CONTENT_WIDTH, "image_style": IMAGE_STYLE,
        # Text-part helpers, so the layout stays in the template.
        "wrap": wrap_text, "shout": _shout, "underline": _underline,
        "text_width": text_width,
        **{name: slot(name) for name in SLOTS},
    }
    html = render_template(env, "email/issue.html.j2", **context)
    text = render_template(env, "email/issue.txt.j2", **context)
    return finish_rendering(issue.effective_subject, html, text, issue.language)


def _underline(text: str, char: str = "=") -> str:
    """A rule as wide as the widest line of text (CJK characters count twice)."""
    return char * max((text_width(ln) for ln in text.splitlines()), default=0)


def finish_rendering(subject: str, html: str, text: str, language: str) -> RenderedIssue:
    """Inline the CSS, tidy the text, and check the unsubscribe link is in both parts."""
    html = inline_css(html)
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r", "")).strip() + "\n"
    for part_name, part in (("HTML", html), ("text", text)):
        if slot("unsubscribe_url") not in part:
            raise RenderError(f"the {part_name} template must show the unsubscribe URL "
                              "({{ unsubscribe_url }})")
    return RenderedIssue(subject, html, text, language)


_LEFTOVER_STYLE = re.compile(r"(<style[^>]*>)(.*?)(</style>)", re.DOTALL)


def _compact_css(css: str) -> str:
    # cssutils pretty-prints what premailer leaves in <style>; the indentation is bytes
    # towards Gmail's clipping limit and nothing else.
    css = re.sub(r"\s+", " ", css)
    return re.sub(r"\s*([{};,>])\s*", r"\1", css).replace(";}", "}").strip()


def inline_css(html: str) -> str:
    """Inline <style> rules into style attributes with premailer; keep @media rules."""
    import premailer  # imported here: it pulls in lxml and cssutils, slow to load

    doctype = "<!DOCTYPE html>"
    result = premailer.Premailer(
        html,
        keep_style_tags=False,
        remove_classes=False,
        strip_important=False,
        disable_validation=True,
        allow_network=False,
        # premailer turns `height:auto` into height="auto", which Outlook reads as a size.
        disable_basic_attributes=["height"],
        cssutils_logging_level=logging.CRITICAL,
    ).transform(pretty_print=False)
    result = _LEFTOVER_STYLE.sub(lambda m: m.group(1) + _compact_css(m.group(2)) + m.group(3),
                                 str(result))
    # premailer drops a lowercase doctype and may drop ours; email clients need one.
    if not result.lstrip().upper().startswith("<!DOCTYPE"):
        result = doctype + "\n" + result
    return result


# --- size -------------------------------------------------------------------------------------

# Gmail clips a message whose HTML passes about 102 KB: the rest, the unsubscribe link and the
# postal address with it, hides behind "[Message clipped] View entire message". Measured
# in bytes of decoded HTML, 1 KB = 1000 bytes (the stricter reading of "102 KB").
SIZE_WARN_BYTES = 90_000
SIZE_LIMIT_BYTES = 100_000

# What the slots hold in a real message, a little on the long side: tokens make the URLs
# about 80-100 bytes on a short base URL.
_TYPICAL_SLOTS = {
    "unsubscribe_url": "https://" + "u" * 112, "web_url": "https://" + "w" * 112,
    "preferences_url": "https://" + "p" * 112,
    "recipient_email": "firstname.lastname@example-organisation.org",
    "list_name": "Digital Economy Brief readers",
}


class SizeLevel(StrEnum):
    OK = "ok"
    WARN = "warn"   # close to the limit: say so
    OVER = "over"   # Gmail would clip it: refuse to send unless forced


@dataclass(frozen=True)
class SizeReport:
    """How big an email's HTML is as sent, against Gmail's clipping limit."""

    size: int
    level: SizeLevel
    limit: int = SIZE_LIMIT_BYTES

    @property
    def kb(self) -> str:
        return f"{self.size / 1000:.1f} KB"

    def describe(self) -> str:
        if self.level is SizeLevel.OK:
            return f"HTML {self.kb} as sent"
        what = ("over" if self.level is SizeLevel.OVER else "close to")
        return (f"the HTML is {self.kb} as sent, {what} the {self.limit // 1000} KB at which "
                "Gmail clips a message and hides the rest, unsubscribe link included")


def size_check(html: str, *, warn_at: int = SIZE_WARN_BYTES,
               limit: int = SIZE_LIMIT_BYTES) -> SizeReport:
    """The size of rendered (slotted) HTML once typical per-recipient values are filled in."""
    def typical(m: re.Match[str]) -> str:
        return _TYPICAL_SLOTS.get(m.group(1), "")

    size = len(SLOT_RE.sub(typical, html).encode("utf-8"))
    level = (SizeLevel.OVER if size > limit else SizeLevel.WARN if size > warn_at
             else SizeLevel.OK)
    return SizeReport(size, level, limit)
