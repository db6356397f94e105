"""Issue files: both formats map to the same model; bad files name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from newsletter.content.parse import load_issue, parse_issue
from newsletter.errors import ContentError

from .conftest import SAMPLE_MD, SAMPLE_YAML, SAMPLE_ZH

MD = """---
title: Policy Digest
subject: "Policy Digest No. 3"
date: 2026-10-01
number: 3
preheader: Three things   worth
  knowing
source: "Source: Example Institute"
---

# Macro trends

## First article

Body with a list:

- one
- two

Source: Ministry of Examples

## [Second article](https://example.org/second)

Second body.

```
# not a section: inside a code block
```

# Industry

## Third article

Third body.
"""


def test_markdown_sections_articles_links_sources(tmp_path: Path) -> None:
    path = tmp_path / "issue.md"
    path.write_text(MD, encoding="utf-8")
    issue = load_issue(path)
    assert issue.title == "Policy Digest"
    assert issue.number == 3
    assert issue.preheader == "Three things worth knowing"
    assert [s.title for s in issue.sections] == ["Macro trends", "Industry"]
    first, second = issue.sections[0].articles
    assert first.title == "First article"
    assert first.source == "Ministry of Examples"
    assert "- one" in first.body and "Source:" not in first.body
    assert second.title == "Second article"
    assert str(second.link) == "https://example.org/second"
    assert "# not a section" in second.body  # a heading inside a code block stays in the body
    assert issue.sections[1].articles[0].title == "Third article"


def test_yaml_and_json_give_the_same_model(tmp_path: Path) -> None:
    md = parse_issue(MD, fmt="markdown")
    data = json.loads(md.model_dump_json())
    (tmp_path / "i.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    (tmp_path / "i.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert load_issue(tmp_path / "i.yaml") == md
    assert load_issue(tmp_path / "i.json") == md


@pytest.mark.parametrize("path", [SAMPLE_MD, SAMPLE_YAML, SAMPLE_ZH], ids=lambda p: p.name)
def test_sample_issues_are_valid(path: Path) -> None:
    issue = load_issue(path)
    assert len(issue.sections) >= 2
    assert all(len(s.articles) >= 2 for s in issue.sections)


def test_sample_has_the_digest_shape() -> None:
    issue = load_issue(SAMPLE_MD)
    assert [len(s.articles) for s in issue.sections] == [3, 3, 3]
    assert issue.source
    bodies = [a.body for s in issue.sections for a in s.articles]
    assert sum(1 for b in bodies if "\n- " in b or "\n1. " in b) >= 3  # lists inside bodies


def _error(tmp_path: Path, name: str, text: str) -> ContentError:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ContentError) as info:
        load_issue(path)
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        (MD.replace("title: Policy Digest\n", ""), 2, "title", "Field required"),
        (MD.replace("date: 2026-10-01", "date: 2026-13-45"), 4, "date", "date"),
        (MD.replace("number: 3", "number: three"), 5, "number", "integer"),
        (MD.replace("## Third article", "### Third article"), 30, "sections[2]", "no '## Article'"),
        (MD.replace("# Macro trends\n", ""), 12, None, "before any '# Section'"),
        (MD.replace("---\n\n# Macro", "---\nstray text\n# Macro"), 10, None, "before the first"),
        (MD.replace("number: 3", "numbr: 3"), 5, "numbr", "unknown field"),
        (MD.replace("[Second article](https://example.org/second)",
                    "[Second article](ftp://example.org/x)"), 22, "sections[1].articles[2].link",
         "URL"),
        (MD.replace("number: 3", "number: [1"), 6, None, "invalid YAML"),
        (MD.replace('subject: "Policy Digest No. 3"', 'subject: "A =?UTF-8?Q?=0A?=Bcc: x@y.z"'),
         3, "subject", "encoded-word"),
        (MD.replace('subject: "Policy Digest No. 3"', 'subject: "A\\r\\nBcc: x@y.z"'),
         3, "subject", "control character"),
        (MD.replace("---\ntitle", "title", 1), 1, None, "front matter"),
    ],
)
def test_invalid_markdown_names_file_line_and_field(
    tmp_path: Path, text: str, line: int | None, field: str | None, words: str,
) -> None:
    err = _error(tmp_path, "bad.md", text)
    assert err.path and err.path.endswith("bad.md")
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    assert words in str(err)
    assert str(err).startswith(str(tmp_path / "bad.md"))


def test_invalid_yaml_field_points_at_its_line(tmp_path: Path) -> None:
    text = """title: T
date: 2026-01-01
sections:
  - title: S
    articles:
      - title: A
        body: ok
      - title: ""
        body: empty title
"""
    err = _error(tmp_path, "bad.yaml", text)
    assert err.field == "sections[1].articles[2].title"
    assert err.line == 8
    assert "must not be empty" in str(err)


def test_invalid_json_reports_line(tmp_path: Path) -> None:
    err = _error(tmp_path, "bad.json", '{\n  "title": "T",\n  "date": \n}')
    assert err.line == 4
    assert "invalid JSON" in str(err)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ContentError, match="no such file"):
        load_issue(tmp_path / "nope.md")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ContentError, match="unknown issue format"):
        load_issue(tmp_path / "x.txt")


def test_issue_key_ignores_content_edits() -> None:
    a = parse_issue(MD)
    b = parse_issue(MD.replace("Second body.", "Second body, fixed typo."))
    assert a.key == b.key == "policy-digest-no-3"
    assert a.content_hash() != b.content_hash()
