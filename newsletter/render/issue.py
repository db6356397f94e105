"""Render an Issue once: Jinja to HTML and text, premailer to inline the CSS.

Per-recipient values are not known here; the templates receive slot markers instead, which
survive escaping and inlining and are spliced per recipient by render.message.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import jinja2

from ..content.model import Issue
from ..errors import RenderError
from .markdown import TextRenderer, to_html, wrap
from .templates import render_template

# Slot markers: plain ASCII letters so neither autoescape, premailer nor lxml alter them.
SLOTS = ("unsubscribe_url", "recipient_email", "list_name", "web_url")
_SLOT_FMT = "NLSLOT{}NLSLOT"
SLOT_RE = re.compile(r"NLSLOT([a-z_]+)NLSLOT")

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "contents": "In this issue", "number": "No. {n}", "source": "Source",
        "sent_to": "Sent to", "because": "you subscribed to", "unsubscribe": "Unsubscribe",
        "view_online": "View in browser",
    },
    "zh": {
        "contents": "本期目录", "number": "第 {n} 期", "source": "来源",
        "sent_to": "收件人", "because": "您订阅了", "unsubscribe": "退订",
        "view_online": "在浏览器中查看",
    },
}


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


def issue_context(issue: Issue, *, text_width: int = 72) -> dict[str, Any]:
    """What the issue templates (email and web) are given about the issue itself."""
    texts = TextRenderer(width=text_width)
    sections: list[dict[str, Any]] = []
    for s_index, section in enumerate(issue.sections, start=1):
        articles = []
        for number, article in enumerate(section.articles, start=1):
            before = len(texts.links)
            body_text = texts.render(article.body)
            link = str(article.link) if article.link else None
            footnotes = [(before + i + 1, url) for i, url in enumerate(texts.links[before:])]
            heading = f"{number}. {article.title}"
            if link:
                heading += f" [{texts.footnote(link)}]"
                if link not in [u for _, u in footnotes]:
                    footnotes.append((texts.footnote(link), link))
            articles.append({
                "number": number, "title": article.title, "link": link,
                "source": article.source, "html": to_html(article.body), "text": body_text,
                "heading_text": wrap(heading, text_width, "", "   "), "footnotes": footnotes,
            })
        sections.append({
            "title": section.title, "anchor": f"section-{s_index}", "articles": articles,
            "title_text": wrap(section.title.upper() if section.title.isascii() else section.title,
                               text_width),
        })
    return {"issue": issue, "subject": issue.effective_subject, "sections": sections,
            "labels": labels_for(issue.language)}


def render_issue(
    issue: Issue, env: jinja2.Environment, *, brand_name: str, postal_address: str,
    text_width: int = 72,
) -> RenderedIssue:
    """Jinja once for HTML and once for text, then premailer once; returns slotted output."""
    context: dict[str, Any] = {
        **issue_context(issue, text_width=text_width),
        "brand_name": brand_name, "postal_address": postal_address,
        **{name: slot(name) for name in SLOTS},
    }
    html = render_template(env, "email/issue.html.j2", **context)
    text = render_template(env, "email/issue.txt.j2", **context)
    return finish_rendering(issue.effective_subject, html, text, issue.language)


def finish_rendering(subject: str, html: str, text: str, language: str) -> RenderedIssue:
    """Inline the CSS, tidy the text, and check the unsubscribe link is in both parts."""
    html = inline_css(html)
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r", "")).strip() + "\n"
    for part_name, part in (("HTML", html), ("text", text)):
        if slot("unsubscribe_url") not in part:
            raise RenderError(f"the {part_name} template must show the unsubscribe URL "
                              "({{ unsubscribe_url }})")
    return RenderedIssue(subject, html, text, language)


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
        cssutils_logging_level=logging.CRITICAL,
    ).transform(pretty_print=False)
    # premailer drops a lowercase doctype and may drop ours; email clients need one.
    if not result.lstrip().upper().startswith("<!DOCTYPE"):
        result = doctype + "\n" + result
    return str(result)
