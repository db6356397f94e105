"""Rendering once: sections, numbering, sources in HTML and text; CSS inlined; text escaped."""

from __future__ import annotations

import re
from pathlib import Path

import html5lib
import pytest

from newsletter.content.parse import load_issue, parse_issue
from newsletter.errors import RenderError
from newsletter.render.issue import (
    SLOT_RE,
    Branding,
    SizeLevel,
    render_issue,
    size_check,
    slot,
)
from newsletter.render.markdown import TextRenderer, text_width, wrap
from newsletter.render.templates import make_environment

from .conftest import SAMPLE_MD, SAMPLE_ZH
from .test_content import MD


def _render(text: str = MD, env_dir: Path | None = None):  # type: ignore[no-untyped-def]
    return render_issue(parse_issue(text), make_environment(env_dir), brand_name="Policy Desk",
                        postal_address="1 Example Street, Example City")


def _parse_html(html: str):  # type: ignore[no-untyped-def]
    parser = html5lib.HTMLParser(tree=html5lib.getTreeBuilder("etree"), namespaceHTMLElements=False)
    return parser, parser.parse(html)


def test_html_has_sections_numbered_articles_and_sources() -> None:
    r = _render()
    parser, doc = _parse_html(r.html)
    assert parser.errors == []
    assert r.html.startswith("<!DOCTYPE html>")
    assert doc.get("lang") == "en"
    assert doc.find(".//title").text == "Policy Digest No. 3"
    titles = ["".join(h.itertext()) for h in doc.iter("h3")]
    assert titles == ["1. First article", "2. Second article", "1. Third article"]
    sections = ["".join(h.itertext()) for h in doc.iter("h2")]
    assert sections == ["Macro trends", "Industry"]
    toc = [a.get("href") for a in doc.iter("a") if (a.get("href") or "").startswith("#")]
    sections = {f"#{h.get('id')}" for h in doc.iter("h2")}
    articles = {f"#{h.get('id')}" for h in doc.iter("h3")}
    assert toc == sorted(sections | articles)  # each section, then its articles
    assert "Source: Ministry of Examples" in r.html
    assert "Source: Example Institute" in r.html
    links = [a.get("href") for a in doc.iter("a")]
    assert "https://example.org/second" in links
    # layout tables are marked as such; the preheader is hidden
    assert all(t.get("role") == "presentation" for t in doc.iter("table"))
    hidden = [d for d in doc.iter("div") if "display:none" in (d.get("style") or "")]
    assert hidden and "Three things worth knowing" in "".join(hidden[0].itertext())


def test_css_is_inlined_and_only_media_queries_stay_in_style() -> None:
    r = _render()
    _, doc = _parse_html(r.html)
    h3 = next(doc.iter("h3"))
    assert "font-size" in (h3.get("style") or "")
    body = doc.find("body")
    assert body is not None and body.find(".//style") is None
    styles = "".join(s.text or "" for s in doc.iter("style"))
    assert "@media" in styles
    assert re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}", "", styles).strip() == ""


def test_text_part_is_readable_with_numbering_sources_and_link_footnotes() -> None:
    text = _render().text
    assert "1. First article" in text and "2. Second article [" in text
    assert "1. Third article" in text
    assert "MACRO TRENDS" in text
    assert "- one\n- two" in text
    assert "Source: Ministry of Examples" in text
    assert re.search(r"\[\d+\] https://example.org/second", text)
    assert "Unsubscribe: " + "NLSLOTunsubscribe_urlNLSLOT" in text
    assert "1 Example Street" in text
    assert max(text_width(line) for line in text.splitlines() if "NLSLOT" not in line) <= 72


def test_slots_are_present_in_both_parts() -> None:
    r = _render()
    for part in (r.html, r.text):
        assert {m.group(1) for m in SLOT_RE.finditer(part)} == {
            "unsubscribe_url", "recipient_email", "list_name", "web_url", "preferences_url"}


def test_hostile_content_is_escaped() -> None:
    hostile = (MD.replace("title: Policy Digest", 'title: "<script>alert(1)</script> Digest"')
               .replace("Second body.", "Body <img src=x onerror=alert(1)> and "
                        "[click](javascript:alert(1)) <b>bold</b>")
               .replace("## First article", "## <i>First</i> & article"))
    r = _render(hostile)
    assert "<script>" not in r.html
    assert "&lt;script&gt;" in r.html
    assert "<img" not in r.html
    assert 'href="javascript' not in r.html  # markdown-it refuses the link; text stays text
    assert "<i>First</i>" not in r.html and "&lt;i&gt;First&lt;/i&gt; &amp; article" in r.html
    parser, _ = _parse_html(r.html)
    assert parser.errors == []


def test_sample_issue_renders_under_the_gmail_clip_limit() -> None:
    issue = load_issue(SAMPLE_MD)
    r = render_issue(issue, make_environment(), brand_name="Desk", postal_address="Somewhere")
    assert len(r.html.encode()) < 100 * 1024
    _, doc = _parse_html(r.html)
    assert len(list(doc.iter("h3"))) == 9


def test_chinese_issue_renders_and_wraps_by_width() -> None:
    issue = load_issue(SAMPLE_ZH)
    r = render_issue(issue, make_environment(), brand_name="Desk", postal_address="")
    _, doc = _parse_html(r.html)
    assert doc.get("lang") == "zh"
    assert issue.title in r.html
    lines = [ln for ln in r.text.splitlines() if "NLSLOT" not in ln]
    assert max(text_width(ln) for ln in lines) <= 72


def test_wrap_breaks_cjk_between_characters_and_keeps_punctuation() -> None:
    text = "数字经济" * 30 + "。"
    lines = wrap(text, 20).split("\n")
    assert all(text_width(ln) <= 20 for ln in lines)
    assert "".join(lines) == text
    assert not any(ln.startswith("。") for ln in lines)
    assert wrap("alpha beta gamma delta", 11) == "alpha beta\ngamma delta"


def test_strict_undefined_and_user_template_override(tmp_path: Path) -> None:
    custom = tmp_path / "email"
    custom.mkdir()
    (custom / "issue.txt.j2").write_text("{{ issue.title }} {{ nope }}\n{{ unsubscribe_url }}\n")
    with pytest.raises(RenderError, match="nope"):
        _render(env_dir=tmp_path)
    (custom / "issue.txt.j2").write_text("CUSTOM {{ issue.title }}\n{{ unsubscribe_url }}\n")
    r = _render(env_dir=tmp_path)
    assert r.text.startswith("CUSTOM Policy Digest")
    assert "<!DOCTYPE html>" in r.html  # the HTML template falls back to ours


def test_template_without_unsubscribe_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "issue.txt.j2").write_text("{{ issue.title }}\n")
    with pytest.raises(RenderError, match="unsubscribe"):
        _render(env_dir=tmp_path)


def test_wrap_keeps_opening_punctuation_with_what_follows() -> None:
    text = "数字经济" * 4 + "「公共数据」开放" * 3
    for width in range(10, 30):
        lines = wrap(text, width).split("\n")
        assert "".join(lines) == text
        assert not any(ln.endswith(("「", "“")) for ln in lines), (width, lines)
        assert not any(ln.startswith(("」", "，", "。")) for ln in lines), (width, lines)
        assert all(text_width(ln) <= width + 2 for ln in lines)  # a glued pair may fill it
    assert wrap("word " * 3, 72, "  ", "    ") == "  word word word"


def test_text_renderer_joins_cjk_line_breaks_aligns_lists_and_numbers_links() -> None:
    r = TextRenderer(width=40)
    text = r.render("中文段落的第一行\n第二行，[链接](https://example.org/a)。\n\n"
                    "English line\none [x](https://example.org/a) [y](https://example.org/b)")
    assert "中文段落的第一行第二行，链接 [1]。" in text
    assert "English line one x [1] y [2]" in text
    assert r.links == ["https://example.org/a", "https://example.org/b"]
    items = "\n".join(f"{i}. item number {i} with enough words to wrap" for i in range(1, 11))
    listed = TextRenderer(width=30).render(items).split("\n")
    assert listed[0] == "1.  item number 1 with enough"
    assert listed[1] == "    words to wrap"
    assert listed[-2].startswith("10. item number 10")


def test_footnotes_are_numbered_per_article() -> None:
    md = MD.replace("Third body.", "Third [body](https://example.org/third).")
    text = _render(md).text
    third = text[text.rindex("1. Third article"):]
    assert "body [1]" in third and "[1] https://example.org/third" in third


def test_size_check_fills_slots_with_typical_values_and_grades() -> None:
    page = "<p>" + "x" * 1000 + "</p>" + "".join(slot(n) for n in ("unsubscribe_url",
                                                                   "preferences_url"))
    report = size_check(page)
    assert report.level is SizeLevel.OK and report.size == 7 + 1000 + 2 * 120
    assert size_check("x" * 90_001).level is SizeLevel.WARN
    over = size_check("x" * 100_001)
    assert over.level is SizeLevel.OVER and "100.0 KB as sent, over the 100 KB" in over.describe()
    assert size_check("x" * 500, warn_at=100, limit=400).level is SizeLevel.OVER
    assert "close to" in size_check("x" * 300, warn_at=100, limit=400).describe()


def test_branding_is_validated_where_it_reaches_the_css() -> None:
    for bad in ({"color": "red"}, {"accent_color": "#1234567"},
                {"color": "#000;}body{x:y"}, {"logo_url": "http://x.example/l.png"},
                {"logo_url": 'https://x.example/" onerror="'}, {"logo_width": 2000}):
        with pytest.raises(ValueError, match="brand"):
            Branding(**bad)  # type: ignore[arg-type]
    r = render_issue(parse_issue(MD), make_environment(), brand_name="Desk", postal_address="",
                     branding=Branding(color="#0b6e4f", footer_text="Desk & Co <desk>"))
    assert "#0b6e4f" in r.html and "#1f5f99" not in r.html
    assert "Desk &amp; Co &lt;desk&gt;" in r.html and "Desk & Co <desk>" in r.text


def test_preferences_url_is_per_subscriber_and_optional() -> None:
    from newsletter.render.message import ListInfo, PreparedMessage, Recipient
    from newsletter.render.tokens import TokenSigner

    signer = TokenSigner([b"k"])
    lists = {1: ListInfo("One", "One <one.example.org>"),
             2: ListInfo("Two", "Two <two.example.org>")}
    kwargs = {"from_address": "d@example.org", "from_name": "D",
              "base_url": "https://n.example.org", "unsubscribe_token": signer.unsubscribe_token,
              "lists": lists,
              "message_id_domain": "example.org"}
    with_prefs = PreparedMessage(_render(), preferences_token=signer.preferences_token, **kwargs)
    a, b = Recipient(5, 1, "a@example.org"), Recipient(5, 2, "a@example.org")
    url = with_prefs.preferences_url(a)
    assert url == "https://n.example.org/preferences/" + signer.preferences_token(5)
    assert with_prefs.preferences_url(b) == url and signer.read_preferences_token(
        url.rsplit("/", 1)[1]) == 5
    assert url.encode() in with_prefs.build(a).replace(b"=\r\n", b"")
    without = PreparedMessage(_render(), **kwargs)  # type: ignore[arg-type]
    assert without.preferences_url(a) == "https://n.example.org/"
