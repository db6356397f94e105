"""The email as it is sent, held to what mail clients need (shared/STANDARDS.md, section 3).

The sample issues go through the project's own path (Newsletter.render, PreparedMessage.build)
and the checks read the MIME parts of the built message: strict HTML5 parsing, layout tables,
images, what stays in <style>, inlined styles, Outlook and dark-mode parts, the preheader,
the footer's links; the text part's layout; branding; the size guard; the preferences link.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import functools
import re
import tempfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import html5lib
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from newsletter.cli import app as cli_app
from newsletter.content.parse import load_issue, parse_issue
from newsletter.errors import ContentError, RenderError
from newsletter.render.markdown import _NO_LINE_START, text_width
from newsletter.render.message import Recipient, undot
from newsletter.service import Newsletter
from newsletter.store.base import MailingList
from newsletter.store.sql import NewMember
from newsletter.web.app import create_app

from .conftest import SAMPLE_MD, SAMPLE_ZH, add_subscribers, make_settings
from .smtpd import SmtpTestServer

READER = Recipient(subscriber_id=4242, list_id=1, email="reader.name@example.org",
                   name="Reader Name")
BRAND = {"brand_name": "Larchmont Brief", "brand_logo_url": "https://news.example.org/logo.png",
         "brand_logo_width": 180, "brand_color": "#0b6e4f", "brand_accent_color": "#c2410c",
         "brand_footer_text": "Published by the Larchmont Institute for Economic Policy."}
IMAGES = """
  - title: Pictures
    articles:
      - title: A chart and a photo
        body: |
          Text before ![Grid connection queue by region, 2020-2026](https://example.org/q.png)

          Text after.
        images:
          - url: https://example.org/chart.png
            alt: Data-centre demand in three scenarios
            width: 400
"""


@dataclass(frozen=True)
class Sent:
    raw: bytes
    html: str
    text: str
    doc: Element


def _newsletter(**overrides: Any) -> Newsletter:
    return Newsletter(make_settings(Path(tempfile.mkdtemp()), **overrides))


@functools.cache
def _sent(path: Path, brand: bool = False, extra_yaml: str = "") -> Sent:
    """An issue as one recipient gets it (cached: several tests read the same message)."""
    nl = _newsletter(**(BRAND if brand else {}))
    if extra_yaml:
        issue = load_issue(SAMPLE_MD)
        data = issue.model_dump(mode="json", exclude_defaults=True)
        import yaml

        data["sections"] = data["sections"] + yaml.safe_load(extra_yaml)
        issue = parse_issue(yaml.safe_dump(data, allow_unicode=True), fmt="yaml")
    else:
        issue = load_issue(path)
    mlist = MailingList(1, "brief", "Digital Economy Brief readers", "",
                        dt.datetime.now(dt.UTC))
    raw = undot(nl.prepare(nl.render(issue), [mlist], issue=issue).build(READER))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    html_part, text_part = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html_part is not None and text_part is not None
    html = str(html_part.get_content()).replace("\r\n", "\n")
    text = str(text_part.get_content()).replace("\r\n", "\n")
    # Strict: the first parse error raises, naming where it is.
    parser = html5lib.HTMLParser(strict=True, tree=html5lib.getTreeBuilder("etree"),
                                 namespaceHTMLElements=False)
    return Sent(raw, html, text, parser.parse(html))


SAMPLES = [pytest.param(SAMPLE_MD, id="en"), pytest.param(SAMPLE_ZH, id="zh")]


def _style(el: Element) -> str:
    return (el.get("style") or "").replace(" ", "").lower()


def _with_class(doc: Element, name: str) -> list[Element]:
    return [e for e in doc.iter() if name in (e.get("class") or "").split()]


# --- HTML ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SAMPLES)
def test_sent_html_parses_strictly_with_doctype_lang_and_title(path: Path) -> None:
    sent = _sent(path)
    assert sent.html.startswith("<!DOCTYPE html>")
    assert sent.doc.get("lang") == load_issue(path).language
    title = sent.doc.find("./head/title")
    assert title is not None and title.text == load_issue(path).effective_subject
    metas = {m.get("name"): m.get("content") for m in sent.doc.iter("meta")}
    assert metas["color-scheme"] == "light dark" and "width=device-width" in metas["viewport"]


@pytest.mark.parametrize("path", SAMPLES)
def test_layout_tables_images_and_style_placement(path: Path) -> None:
    sent = _sent(path)
    tables = list(sent.doc.iter("table"))
    assert len(tables) >= 3 and all(t.get("role") == "presentation" for t in tables)
    body = sent.doc.find("body")
    assert body is not None and body.find(".//style") is None
    assert not list(sent.doc.iter("script")) and not list(sent.doc.iter("form"))
    head_css = "".join(s.text or "" for s in sent.doc.find("head").iter("style"))  # type: ignore[union-attr]
    # Only what cannot be inlined stays: media queries for phones and dark mode.
    assert re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}", "", head_css).strip() == ""
    assert "prefers-color-scheme:dark" in head_css.replace(" ", "")
    assert "max-width:600px" in head_css.replace(" ", "")


@pytest.mark.parametrize("path", SAMPLES)
def test_critical_styles_are_inlined(path: Path) -> None:
    doc = _sent(path).doc
    container = _with_class(doc, "container")[0]
    assert container.tag == "table" and "max-width:600px" in _style(container)
    assert container.get("width") == "100%"  # fluid: one column on any narrower screen
    article = _with_class(doc, "article")[0]
    assert "color:#1f2933" in _style(article) and "font-size:16px" in _style(article)
    in_text = [a for td in _with_class(doc, "article") for p in td.iter("p") for a in p.iter("a")]
    assert in_text and all("color:#1f5f99" in _style(a) for a in in_text)
    in_titles = [a for h3 in doc.iter("h3") for a in h3.iter("a")]
    assert in_titles and all("color:#102a43" in _style(a) for a in in_titles)
    bar = _with_class(doc, "section-bar")[0]
    assert "background-color:#1f5f99" in _style(bar) and bar.get("bgcolor") == "#1f5f99"
    fonts = _style(_with_class(doc, "article-title")[0])
    for font in ("-apple-system", '"pingfangsc"', '"microsoftyahei"', '"notosanscjksc"'):
        assert font in fonts


def test_chinese_body_text_uses_a_cjk_font_stack_and_no_italics() -> None:
    doc = _sent(SAMPLE_ZH).doc
    article = _style(_with_class(doc, "article")[0])
    assert article.index("pingfangsc") < article.index("sans-serif")
    assert "georgia" not in article
    source = _with_class(doc, "article-source")[0]
    assert "font-style:normal" in _style(source)
    assert "".join(source.itertext()).startswith("来源：")


@pytest.mark.parametrize("path", SAMPLES)
def test_outlook_ghost_table_and_font_fallback(path: Path) -> None:
    html = _sent(path).html
    conditionals = re.findall(r"<!--\[if mso\]>(.*?)<!\[endif\]-->", html, re.DOTALL)
    assert html.count("<!--[if mso]>") == html.count("<![endif]-->") == len(conditionals) == 3
    assert "PixelsPerInch>96" in conditionals[0] and "font-family" in conditionals[0]
    assert re.search(r'<table role="presentation"[^>]*width="600"', conditionals[1])
    assert conditionals[2].strip() == "</td></tr></table>"


@pytest.mark.parametrize("path", SAMPLES)
def test_preheader_is_hidden_and_padded(path: Path) -> None:
    doc = _sent(path).doc
    body = doc.find("body")
    assert body is not None
    first = body[0]
    style = _style(first)
    for rule in ("display:none", "max-height:0", "overflow:hidden", "mso-hide:all"):
        assert rule in style
    text = "".join(first.itertext())
    preheader = load_issue(path).preheader
    assert text.startswith(preheader)
    assert text[len(preheader):].count("\u200c\u00a0") >= 50  # &zwnj;&nbsp; keeps body text out


@pytest.mark.parametrize("path", SAMPLES)
def test_contents_numbering_sources_and_footer(path: Path) -> None:
    sent = _sent(path)
    issue = load_issue(path)
    ids = {e.get("id") for e in sent.doc.iter() if e.get("id")}
    toc = [a.get("href") for a in _with_class(sent.doc, "toc")[0].iter("a")]
    n_articles = sum(len(s.articles) for s in issue.sections)
    assert len(toc) == len(issue.sections) + n_articles
    assert all(href and href[1:] in ids for href in toc)  # every entry lands somewhere
    numbers = ["".join(h.itertext()).split(".")[0] for h in sent.doc.iter("h3")]
    expected = [str(i) for s in issue.sections for i in range(1, len(s.articles) + 1)]
    assert numbers == expected
    assert len(_with_class(sent.doc, "article-source")) == sum(
        1 for s in issue.sections for a in s.articles if a.source)
    msg = email.message_from_bytes(sent.raw, policy=email.policy.default)
    unsubscribe = str(msg["List-Unsubscribe"]).strip("<>")
    footer = _with_class(sent.doc, "footer")[0]
    hrefs = [a.get("href") or "" for a in footer.iter("a")]
    assert unsubscribe in hrefs
    assert any(h.startswith("https://news.example.org/preferences/") for h in hrefs)
    footer_text = "".join(footer.itertext())
    assert READER.email in footer_text and "Digital Economy Brief readers" in footer_text
    assert "1 Example Street" in footer_text
    web = [a for a in sent.doc.iter("a") if a.get("href") == "https://news.example.org/archive/brief/"
           + str(issue.number)]
    assert len(web) == 1  # "View in browser"


def test_images_have_alt_width_and_fluid_styles() -> None:
    sent = _sent(SAMPLE_MD, brand=True, extra_yaml=IMAGES)
    images = list(sent.doc.iter("img"))
    assert len(images) == 3  # the logo, the article's image, the one in its body
    for img in images:
        assert (img.get("alt") or "").strip(), img.attrib
        assert (img.get("width") or "").isdigit(), img.attrib
        assert img.get("height") is None  # premailer would add height="auto"
        for rule in ("display:block", "max-width:100%", "height:auto"):
            assert rule in _style(img), img.attrib
    by_src = {i.get("src"): i for i in images}
    assert by_src["https://example.org/chart.png"].get("width") == "400"
    assert by_src["https://example.org/q.png"].get("alt") == (
        "Grid connection queue by region, 2020-2026")
    assert "[Data-centre demand in three scenarios]" in sent.text


def test_branding_from_settings_reaches_both_parts() -> None:
    sent = _sent(SAMPLE_MD, brand=True)
    logo = next(i for i in sent.doc.iter("img") if i.get("src") == BRAND["brand_logo_url"])
    assert logo.get("alt") == "Larchmont Brief" and logo.get("width") == "180"
    bar = _with_class(sent.doc, "section-bar")[0]
    assert "background-color:#0b6e4f" in _style(bar)
    assert "color:#0b6e4f" in _style(_with_class(sent.doc, "article-number")[0])
    body_link = next(a for a in sent.doc.iter("a")
                     if a.get("href") == "https://example.org/data-compact")
    assert "color:#c2410c" in _style(body_link)
    footer_line = "".join(_with_class(sent.doc, "brand-footer")[0].itertext())
    assert BRAND["brand_footer_text"] in footer_line
    assert BRAND["brand_footer_text"] in sent.text and "LARCHMONT BRIEF" in sent.text
    assert "#1f5f99" not in sent.html  # the stock colour is gone everywhere


@pytest.mark.parametrize(("key", "value", "words"), [
    ("brand_color", "red", "NEWSLETTER_BRAND_COLOR: must be a colour written #rrggbb"),
    ("brand_accent_color", "#12345", "NEWSLETTER_BRAND_ACCENT_COLOR"),
    ("brand_color", "#000000;}body{x:y", "NEWSLETTER_BRAND_COLOR"),
    ("brand_logo_url", "http://news.example.org/logo.png", "must be an https:// URL"),
    ("brand_logo_url", 'https://x.example/a.png" onerror="x', "must be an https:// URL"),
])
def test_bad_branding_is_refused_naming_the_key(key: str, value: str, words: str) -> None:
    from newsletter.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(words)):
        _newsletter(**{key: value})


def test_confirmation_mail_shares_the_frame_and_branding(tmp_path: Path) -> None:
    from newsletter.delivery.fake import FakeRelay
    from newsletter.subscriptions import Subscriptions

    nl = Newsletter(make_settings(tmp_path, **BRAND))
    mlist = nl.store.create_list("news", name="Weekly News")
    nl.store.upsert_members(mlist.id, [NewMember("ann@example.com", "Ann")], source="test")
    sub = nl.store.find_subscriber("ann@example.com")
    assert sub is not None
    subs = Subscriptions(nl, FakeRelay())
    for kind, extra in (("confirm", {"confirm_url": "https://x.example/c", "valid_hours": "72"}),
                        ("welcome", {"preferences_url": "https://x.example/p",
                                     "archive_url": "https://x.example/a"})):
        html = subs.render_mail(kind, sub, mlist, **extra).html
        doc = html5lib.HTMLParser(strict=True, tree=html5lib.getTreeBuilder("etree"),
                                  namespaceHTMLElements=False).parse(html)
        assert all(t.get("role") == "presentation" for t in doc.iter("table"))
        assert "<!--[if mso]>" in html and "prefers-color-scheme" in html
        logo = next(doc.iter("img"))
        assert logo.get("src") == BRAND["brand_logo_url"] and logo.get("alt")
        assert logo.get("width") == "180"


# --- text part ----------------------------------------------------------------------------------

def _overflow_ok(line: str) -> bool:
    """A line may pass 72 columns only because of an unbreakable URL at its end."""
    url = re.search(r"https://\S+$", line)
    return url is not None and text_width(line[:url.start()]) < 72


@pytest.mark.parametrize("path", SAMPLES)
def test_text_part_fits_72_columns(path: Path) -> None:
    text = _sent(path).text
    for line in text.splitlines():
        assert text_width(line) <= 72 or _overflow_ok(line), line
    assert max(text_width(ln) for ln in text.splitlines() if "://" not in ln) >= 66  # filled


def test_text_part_layout_en() -> None:
    text = _sent(SAMPLE_MD).text
    lines = text.splitlines()
    assert lines[0].startswith("View in browser: https://news.example.org/archive/brief/7")
    assert "Digital Economy Brief\nNo. 7 · 2026-11-16\n" + "=" * 72 in text  # title block
    toc = text[text.index("IN THIS ISSUE"):text.index("MACRO OUTLOOK")]
    assert "Macro Outlook\n  1. Digital services now account for a third of cross-border" in toc
    assert "\n     growth\n" in toc  # hanging indent under the number
    assert "MACRO OUTLOOK\n=============\n" in text  # underlined section headings
    assert "THE DIGITAL SECTOR\n==================\n" in text
    assert "\n2. Productivity gains from AI remain uneven across sectors [1]\n" in text
    # footnotes: numbered per article and listed under it, before the next article
    body = text[text.index("MACRO OUTLOOK\n"):]
    article = body[body.index("2. Productivity gains"):body.index("3. Regional governments")]
    assert article.rstrip().endswith("[1] https://example.org/reports/ai-productivity-2026")
    article = body[body.index("3. Regional governments"):body.index("THE DIGITAL SECTOR")]
    assert "example.org/data-compact [1]" in article
    assert "[1] https://example.org/data-compact" in article
    # lists with hanging indents, numbered lists aligned
    assert "- the share of the workforce with intermediate or advanced digital\n  skills;" in text
    assert "1. grid connection queues, not generation capacity, are the most\n   immediate" in text
    assert "Source: Larchmont Institute, Global Digital Trade Monitor 2026" in text
    footer = text[text.rindex("-" * 72):]
    assert "Sent to reader.name@example.org\nbecause you subscribed to Digital Economy Brief" \
        in footer
    assert re.search(r"\nPreferences: https://news\.example\.org/preferences/\S+\n", footer)
    assert re.search(r"\nUnsubscribe: https://news\.example\.org/unsubscribe/\S+\n", footer)
    assert "Example Institute, 1 Example Street, Example City" in footer


def test_text_part_wraps_chinese_by_width_and_punctuation() -> None:
    text = _sent(SAMPLE_ZH).text
    body = [ln for ln in text.splitlines() if ln and not ln.isascii() and "://" not in ln]
    assert max(text_width(ln) for ln in body) in (71, 72)  # CJK counted as two columns
    assert not any(ln[0] in _NO_LINE_START for ln in body)  # no line opens with ，。、）」
    assert "宏观形势\n========\n" in text  # underline as wide as the (double-width) heading
    assert "来源：澜山经济政策研究院《中小企业数字化调查 2026》" in text
    assert "[1] https://example.org/zh/reports/open-data" in text
    assert "退订：https://news.example.org/unsubscribe/" in text
    # a paragraph's source line breaks vanish between Chinese characters instead of
    # becoming spaces
    assert "样本以制造业和批发零售业为主。" in text.replace("\n", "")


# --- size guard ---------------------------------------------------------------------------------

def _huge_issue(path: Path) -> Path:
    paragraph = ("Regional statistics offices report the series with a lag of two quarters, "
                 "and the revisions since the first estimate have been small. ") * 6
    articles = "".join(f"## Article {i} on the state of the digital economy\n\n{paragraph}\n\n"
                       f"{paragraph}\n\n" for i in range(1, 61))
    path.write_text("---\ntitle: Long Brief\ndate: 2026-11-30\nnumber: 99\n---\n\n"
                    f"# Everything\n\n{articles}", encoding="utf-8")
    return path


def test_size_guard_refuses_a_clipped_issue_and_force_sends_it(
    tmp_path: Path, smtpd: SmtpTestServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("NEWSLETTER_SMTP_URL", smtpd.url)
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", "size-test-secret-key")
    monkeypatch.setenv("NEWSLETTER_BASE_URL", "https://news.example.org")
    runner = CliRunner()
    issue = _huge_issue(tmp_path / "long.md")
    assert runner.invoke(cli_app, ["lists", "create", "digest"]).exit_code == 0
    assert runner.invoke(cli_app, ["subscribers", "add", "ann@example.com", "--list",
                                   "digest"]).exit_code == 0
    built = runner.invoke(cli_app, ["issue", "build", str(issue), "--out", str(tmp_path / "b")])
    assert built.exit_code == 0, built.output
    assert re.search(r"size: 1\d\d\.\d KB of HTML as sent", built.output)
    assert "refuses it without --force" in built.output
    refused = runner.invoke(cli_app, ["send", str(issue), "--list", "digest", "--yes"])
    assert refused.exit_code == 1 and isinstance(refused.exception, RenderError)
    message = str(refused.exception)
    assert re.search(r"the HTML is 1\d\d\.\d KB as sent, over the 100 KB", message)
    assert "--force" in message and "long.md" in message
    assert not smtpd.messages
    forced = runner.invoke(cli_app, ["send", str(issue), "--list", "digest", "--yes", "--force"])
    assert forced.exit_code == 0, (forced.output, forced.exception)
    assert "close to" not in forced.output and "sent 1" in forced.output
    assert len(smtpd.messages) == 1


def test_issue_build_prints_the_size_of_the_sample(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", "size-test-secret-key")
    result = CliRunner().invoke(cli_app, ["issue", "build", str(SAMPLE_MD), "--out",
                                          str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    size = re.search(r"size: (\d+\.\d) KB of HTML as sent", result.output)
    assert size and 10 < float(size.group(1)) < 60  # the sample stays small
    assert "warning" not in result.output


# --- preferences --------------------------------------------------------------------------------

def test_preferences_link_in_a_sent_issue_opens_the_page(
    nl: Newsletter, smtpd: SmtpTestServer, tmp_path: Path,
) -> None:
    import asyncio

    add_subscribers(nl, "news", 2)
    plan = nl.plan_send(SAMPLE_MD, ["news"])
    assert asyncio.run(nl.run(plan)).progress.sent == 2
    msg = email.message_from_bytes(smtpd.messages[0].data, policy=email.policy.default)
    html_part, text_part = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html_part is not None and text_part is not None
    html_urls = re.findall(r'href="(https://news\.example\.org/preferences/[^"]+)"',
                           str(html_part.get_content()))
    text_urls = re.findall(r"https://news\.example\.org/preferences/\S+",
                           str(text_part.get_content()))
    assert len(html_urls) == 1 and html_urls == text_urls
    rcpt = smtpd.messages[0].rcpt_tos[0]
    with TestClient(create_app(nl)) as client:
        page = client.get(html_urls[0].removeprefix("https://news.example.org"))
    assert page.status_code == 200
    assert "News readers" in page.text
    assert rcpt.split("@")[0][0] + "***@" in page.text  # the masked address it was sent to


def test_image_without_alt_is_rejected_with_file_line_and_field(tmp_path: Path) -> None:
    yaml_file = tmp_path / "issue.yaml"
    yaml_file.write_text(
        "title: T\ndate: 2026-12-01\nsections:\n  - title: S\n    articles:\n"
        "      - title: A\n        images:\n          - url: https://example.org/a.png\n"
        "            width: 300\n", encoding="utf-8")
    with pytest.raises(ContentError) as info:
        load_issue(yaml_file)
    assert str(info.value) == (f"{yaml_file}:8: sections[1].articles[1].images[1].alt: "
                               "Field required")
    md_file = tmp_path / "issue.md"
    md_file.write_text("---\ntitle: T\ndate: 2026-12-01\n---\n\n# S\n\n## A\n\n"
                       "Look: ![](https://example.org/a.png)\n", encoding="utf-8")
    with pytest.raises(ContentError) as info:
        load_issue(md_file)
    assert str(info.value).startswith(f"{md_file}:8: sections[1].articles[1].body: image "
                                      "https://example.org/a.png has no alt text")


@pytest.mark.parametrize("path", SAMPLES)
def test_every_contents_link_has_a_named_anchor(path: Path) -> None:
    """Gmail webmail and Outlook for Windows jump only to <a name>, not to id= (caniemail)."""
    sent = _sent(path)
    targets = [a.get("href", "")[1:] for a in sent.doc.iter("a")
               if a.get("href", "").startswith("#")]
    names = {a.get("name") for a in sent.doc.iter("a") if a.get("name")}
    assert targets and all(t in names for t in targets), set(targets) - names
