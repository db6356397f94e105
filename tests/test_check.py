"""`newsletter issue check`: the sample issues pass every check as rendered by the real
templates; issue files with one problem each get the right finding and exit code."""

from __future__ import annotations

import json
import tempfile
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from newsletter import checks
from newsletter.checks import (
    CssFeature,
    CssReport,
    Level,
    Sample,
    SpamReport,
    SpamRule,
)
from newsletter.cli import app
from newsletter.errors import NewsletterError
from newsletter.render.issue import SIZE_LIMIT_BYTES, SIZE_WARN_BYTES
from newsletter.service import Newsletter

from .conftest import SAMPLE_MD, SAMPLE_ZH, SECRET, make_settings

runner = CliRunner()
SAMPLES = [SAMPLE_MD, SAMPLE_ZH]

FRONT = """\
---
title: Check Brief
date: 2026-12-01
number: 3
---

"""


@cache
def rendered(path: Path) -> Sample:
    """A sample issue as a reader gets it, rendered once per test run."""
    nl = Newsletter(make_settings(Path(tempfile.mkdtemp(prefix="check-test-"))))
    [sample] = checks.render_samples(nl, path)
    return sample


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    monkeypatch.setenv("NEWSLETTER_BASE_URL", "https://news.example.org")
    monkeypatch.setenv("NEWSLETTER_FROM", "Digest Desk <digest@example.org>")
    monkeypatch.setenv("NEWSLETTER_POSTAL_ADDRESS", "Example Institute, 1 Example Street")
    return tmp_path


def issue_file(tmp_path: Path, body: str, name: str = "issue.md") -> Path:
    path = tmp_path / name
    path.write_text(FRONT + textwrap.dedent(body), encoding="utf-8")
    return path


def check_json(path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """Run the command (without the slow outside tools unless asked) and read its JSON."""
    result = runner.invoke(app, ["issue", "check", str(path), "--json", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def codes(report: dict[str, Any], level: str) -> list[str]:
    return [f["code"] for f in report["findings"] if f["level"] == level]


def finding(report: dict[str, Any], code: str) -> dict[str, Any]:
    found = [f for f in report["findings"] if f["code"] == code]
    assert len(found) == 1, (code, report["findings"])
    return found[0]


# --- the samples, through the real templates ------------------------------------------------

@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_html_size_within_limits(path: Path) -> None:
    html = rendered(path).html
    assert len(html.encode()) < SIZE_WARN_BYTES
    assert [f.level for f in checks.check_size(html)] == [Level.NOTE]


def test_sample_css_only_allowlisted_constructs_unsupported() -> None:
    missing = checks.css_tool_missing()
    if missing:
        pytest.skip(f"CSS support report: {missing}")
    allowlist = checks.load_allowlist()
    allowed = {(a.feature, c) for a in allowlist for c in a.clients}
    met: set[tuple[str, str]] = set()
    for path in SAMPLES:
        report = checks.run_doiuse(rendered(path).html, checks.CSS_CLIENTS)
        assert report is not None and report.tool == "doiuse-email 0.4.1"
        unsupported = report.unsupported()
        assert unsupported <= allowed, f"{path.name}: not allowlisted: {unsupported - allowed}"
        assert not report.other, report.other  # every doiuse sentence was understood
        met |= unsupported
        assert [f.level for f in checks.check_css(report, allowlist)
                if f.level != Level.NOTE] == []
    # An entry no sample needs any more goes: the allowlist stays short and true.
    assert allowed <= met, f"allowlist entries never met: {allowed - met}"
    assert all(len(a.reason) > 20 for a in allowlist)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_spamassassin_score(path: Path) -> None:
    missing = checks.spamassassin_missing()
    if missing:
        pytest.skip(f"SpamAssassin score: {missing}")
    report = checks.run_spamassassin(rendered(path).eml)
    assert report is not None
    names = {r.name for r in report.rules}
    assert report.score <= 1.0, report.rules
    assert not names & {"MISSING_DATE", "MISSING_MID", "MIME_HTML_ONLY", "MISSING_HEADERS",
                        "MPART_ALT_DIFF", "HTML_IMAGE_ONLY_04"}, names


def test_sample_passes_the_whole_check_through_the_cli(env: Path) -> None:
    result = runner.invoke(app, ["issue", "check", str(SAMPLE_MD)])
    assert result.exit_code == 0, result.output
    assert "0 errors, 0 warnings" in result.output and "ready to send" in result.output
    code, report = check_json(SAMPLE_MD, "--no-spam")  # SpamAssassin: tested above
    assert code == 0 and report["ok"] and report["counts"]["warning"] == 0
    assert report["subject"].startswith("Digital Economy Brief No. 7")
    # Each outside tool either ran or says why not.
    [edition] = report["editions"]
    assert edition["language"] == "en" and edition["html_bytes"] > 10_000
    assert ("css-skipped" in codes(report, "note")) == (edition["css"] is None)


# --- issue files with one problem each -----------------------------------------------------

def test_links_that_are_not_http_or_mailto(env: Path) -> None:
    path = issue_file(env, """\
        # Links

        ## Good ones

        See [the report](https://example.org/r) or [write](mailto:desk@example.org).

        ## Bad ones

        A [script](javascript:alert(1)) and an [archive](ftp://files.example.org/a.zip).

        Then [a page](reports/page.html).
        """)
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 1 and not report["ok"]
    errors = [f for f in report["findings"] if f["code"] == "link-scheme"]
    assert [(f["level"], f["where"]) for f in errors] == [
        ("error", f"{path}:15: sections[1].articles[2]"),
        ("error", f"{path}:15: sections[1].articles[2]"),
        ("error", f"{path}:17: sections[1].articles[2]"),
    ]
    assert "`javascript:alert(1)` is unsafe" in errors[0]["message"]
    assert "`ftp://files.example.org/a.zip` is not http(s) or mailto" in errors[1]["message"]
    assert "`reports/page.html` is relative" in errors[2]["message"]
    # The readable report: one line per finding, in the parser's FILE:LINE: FIELD form.
    result = runner.invoke(app, ["issue", "check", str(path), "--no-css", "--no-spam"])
    assert result.exit_code == 1
    assert (f"error: {path}:15: sections[1].articles[2]: link `javascript:alert(1)` is unsafe"
            in result.output)
    assert "3 errors, 0 warnings" in result.output and "not ready" in result.output


def test_translations_content_is_checked_too(env: Path) -> None:
    path = env / "issue.yaml"
    path.write_text(textwrap.dedent("""\
        title: Trade Notes
        date: 2026-12-01
        language: en
        sections:
          - title: Markets
            articles:
              - title: Ports are busier
                body: Container volumes rose for a [third month](https://example.org/p).
        translations:
          zh:
            title: 贸易简报
            sections:
              - title: 市场
                articles:
                  - title: 港口更繁忙
                    body: 集装箱吞吐量[连续第三个月](ports.html)上升。
        """), encoding="utf-8")
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 1
    link = finding(report, "link-scheme")
    assert link["where"] == f"{path}: translations.zh.sections[1].articles[1]"
    assert "`ports.html` is relative" in link["message"]
    # Each edition is rendered and checked; rendered findings say which one.
    assert [(e["language"], e["subject"]) for e in report["editions"]] == [
        ("en", "Trade Notes"), ("zh", "贸易简报")]
    sizes = [f["where"] for f in report["findings"] if f["code"] == "html-size"]
    assert sizes == ["HTML (en)", "HTML (zh)"]


def test_sibling_edition_files_are_checked_with_their_lines(env: Path) -> None:
    issue_file(env, """\
        # Markets

        ## Ports are busier

        Container volumes rose for a [third month](https://example.org/p).
        """, name="trade.en.md")
    zh = issue_file(env, """\
        # 市场

        ## 港口更繁忙

        集装箱吞吐量[连续第三个月](ftp://files.example.org/p)上升。
        """, name="trade.zh.md")
    code, report = check_json(env / "trade.en.md", "--no-css", "--no-spam")
    assert code == 1
    assert finding(report, "link-scheme")["where"] == f"{zh}:11: sections[1].articles[1]"


def test_relative_heading_link_is_the_parsers_error(env: Path) -> None:
    path = issue_file(env, """\
        # Links

        ## [A page](reports/page.html)

        Text.
        """)
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 1
    invalid = finding(report, "invalid")
    assert invalid["where"] == f"{path}:9: sections[1].articles[1].link"
    assert "URL" in invalid["message"]


def test_image_without_alt_is_the_parsers_error(env: Path) -> None:
    path = issue_file(env, """\
        # Charts

        ## Output

        ![](https://example.org/chart.png)
        """)
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 1
    invalid = finding(report, "invalid")
    assert invalid["where"] == f"{path}:9: sections[1].articles[1].body"
    assert invalid["message"] == ("image https://example.org/chart.png has no alt text; write "
                                  "![what it shows](https://example.org/chart.png)")


def test_raw_html_image_shows_as_text(env: Path) -> None:
    path = issue_file(env, """\
        # Charts

        ## Output

        Before the chart.

        <img src="https://example.org/chart.png">
        """)
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 0 and report["ok"]
    raw = finding(report, "raw-html")
    assert raw["level"] == "warning" and raw["where"] == f"{path}:13: sections[1].articles[1]"
    assert "literal text" in raw["message"] and "![what it shows](https://...)" in raw["message"]


def test_section_without_articles_is_the_parsers_error(env: Path) -> None:
    path = issue_file(env, """\
        # Empty

        # Full

        ## Article

        Text.
        """)
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 1
    assert finding(report, "invalid")["where"] == f"{path}:7: sections[1]"
    result = runner.invoke(app, ["issue", "check", str(path)])
    assert result.exit_code == 1
    assert f"error: {path}:7: sections[1]: section 'Empty' has no '## Article'" in result.output


def test_section_whose_articles_have_no_body(env: Path) -> None:
    path = issue_file(env, """\
        # Headlines only

        ## First
        ## [Second](https://example.org/2)

        # Full

        ## Article

        Text.
        """)
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 0 and report["ok"]
    empty = finding(report, "empty-section")
    assert empty["level"] == "warning" and empty["where"] == f"{path}:7: sections[1]"
    assert "'Headlines only'" in empty["message"]


def test_oversized_issue(env: Path) -> None:
    paragraph = " ".join(["Output per hour rose again in the third quarter."] * 12)
    articles = "".join(f"## Article {n}\n\n{paragraph}\n\n{paragraph}\n\n" for n in range(70))
    path = issue_file(env, f"# Long\n\n{articles}")
    code, report = check_json(path, "--no-css", "--no-spam")
    assert code == 1 and report["editions"][0]["html_bytes"] > SIZE_LIMIT_BYTES
    size = finding(report, "html-size")
    assert size["level"] == "error" and "over the 100 KB at which Gmail clips" in size["message"]
    assert "newsletter send refuses it without --force" in size["message"]


def test_size_levels() -> None:
    def level(size: int) -> Level:
        [f] = checks.check_size("x" * size)
        return f.level

    assert level(SIZE_WARN_BYTES) == Level.NOTE and level(SIZE_WARN_BYTES + 1) == Level.WARNING
    assert level(SIZE_LIMIT_BYTES) == Level.WARNING and level(SIZE_LIMIT_BYTES + 1) == Level.ERROR


# --- the outside tools' plumbing -------------------------------------------------------------

def test_missing_tools_are_skipped_with_a_reason(env: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert checks.css_tool_missing() == "node is not installed"
    assert checks.run_doiuse("<p>x</p>") is None
    assert checks.spamassassin_missing() is not None
    assert checks.run_spamassassin(b"Subject: x\r\n\r\nx\r\n") is None
    code, report = check_json(SAMPLE_MD)
    assert code == 0 and report["editions"][0]["css"] is None
    assert report["editions"][0]["spam"] is None
    notes = {f["code"]: f["message"] for f in report["findings"]}
    assert notes["css-skipped"] == "CSS support report skipped: node is not installed"
    assert notes["spam-skipped"].startswith("SpamAssassin score skipped: spamassassin is not")


def test_css_findings_count_only_what_the_allowlist_does_not_cover() -> None:
    report = CssReport("doiuse-email 0.4.1", ("gmail.*", "outlook.windows"), (
        CssFeature("display:flex", "outlook.windows", "none", 2, ("Not supported.",)),
        CssFeature("@media", "outlook.windows", "none", 1),
        CssFeature("@media", "gmail.mobile-webmail", "none", 1),
        CssFeature("margin", "outlook.windows", "partial", 9, ("Negative values.",)),
    ))
    allow = [checks.Allowed("@media", ("outlook.windows",), "layout works without it")]
    found = {(f.level, f.code, f.message) for f in checks.check_css(report, allow)}
    assert found == {
        (Level.WARNING, "css-unsupported",
         "`display:flex` is not supported by outlook.windows (used 2x)"),
        (Level.WARNING, "css-unsupported",
         "`@media` is not supported by gmail.mobile-webmail (used 1x)"),
        (Level.NOTE, "css-allowed",
         "`@media` is not supported by outlook.windows: allowed (layout works without it)"),
        (Level.NOTE, "css-partial",
         "partly supported, with caveats (details in --json): `margin`"),
    }


def test_allowlist_entries_need_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "allowlist.json"
    path.write_text(json.dumps({"allowed": [{"feature": "@media",
                                             "clients": ["outlook.windows"], "reason": " "}]}))
    with pytest.raises(NewsletterError, match="needs clients and a reason"):
        checks.load_allowlist(path)
    path.write_text(json.dumps({"allowed": [{"feature": "@media"}]}))
    with pytest.raises(NewsletterError, match="not a valid allowlist"):
        checks.load_allowlist(path)


def test_spamassassin_output_is_parsed() -> None:
    output = textwrap.dedent("""\
        From: a@example.org
        X-Spam-Status: Yes, score=6.2 required=5.0 tests=HTML_FONT_LOW_CONTRAST,
        \tMISSING_DATE,NO_RECEIVED autolearn=disabled version=4.0.1

        body

        Content analysis details:   (6.2 points, 5.0 required)

         pts rule name              description
        ---- ---------------------- --------------------------------------------------
        -0.0 NO_RECEIVED            Informational: message has no Received headers
         0.7 HTML_FONT_LOW_CONTRAST BODY: HTML font color similar or identical to
                                    background
         5.5 MISSING_DATE           Missing Date: header

        """).encode()
    report = checks.parse_spamassassin(output)
    assert report == SpamReport(6.2, 5.0, (
        SpamRule("MISSING_DATE", 5.5, "Missing Date: header"),
        SpamRule("HTML_FONT_LOW_CONTRAST", 0.7,
                 "BODY: HTML font color similar or identical to background"),
        SpamRule("NO_RECEIVED", -0.0, "Informational: message has no Received headers"),
    ))
    [f] = checks.check_spam(report)
    assert f.level == Level.ERROR and "MISSING_DATE 5.5, HTML_FONT_LOW_CONTRAST 0.7" in f.message
    with pytest.raises(checks.ToolError):
        checks.parse_spamassassin(b"Subject: x\n\nno status\n")
