"""Read an issue file (Markdown with front matter, YAML or JSON) into an Issue.

Every failure is a ContentError naming the file, the line where it is known, and the field.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token
from pydantic import ValidationError

from ..errors import ContentError
from .model import Issue, Translation

# Lines at the top of an article's last paragraph that give its source.
_SOURCE_PREFIX = re.compile(r"^(?:Source|Sources|来源|資料來源|出处)\s*[:：]\s*", re.IGNORECASE)

Lines = dict[tuple[str | int, ...], int]


class _Loader(yaml.SafeLoader):
    """SafeLoader that leaves dates as text, so an invalid date becomes a validation error
    with its field and line instead of a bare ValueError from the YAML constructor."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


# issue.en.md, issue.zh.md: one issue's editions in sibling files named NAME.LANG.SUFFIX.
EDITION_FILE = re.compile(r"^(?P<base>.+)\.(?P<lang>[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*)$")


def load_issue(path: str | Path) -> Issue:
    """Parse and validate the issue file at `path`; the format follows the file's suffix.

    A file named NAME.LANG.SUFFIX (issue.en.md) is one edition: its siblings
    NAME.OTHER.SUFFIX (issue.zh.md) become the issue's translations, checked to be the
    same issue (date and number)."""
    path = Path(path)
    issue = _load_one(path)
    m = EDITION_FILE.match(path.stem)
    if m is None:
        return issue
    lang = m["lang"].lower()
    data = issue.model_dump(exclude_defaults=True)
    if "language" not in data:
        issue = issue.model_copy(update={"language": lang})
    elif issue.language.lower() != lang:
        raise ContentError(f"the file name says {lang!r} but language is "
                           f"{issue.language!r}", path=str(path), field="language")
    translations = dict(issue.translations)
    keys = {lang: issue.key}
    for sibling in sorted(path.parent.glob(f"{glob.escape(m['base'])}.*{path.suffix}")):
        other = EDITION_FILE.match(sibling.stem)
        if sibling == path or other is None or other["base"] != m["base"]:
            continue
        edition = _load_one(sibling)
        other_lang = other["lang"].lower()
        for field in ("date", "number"):
            if getattr(edition, field) != getattr(issue, field):
                raise ContentError(f"{field} differs from {path.name}'s "
                                   f"({getattr(issue, field)}); editions are one issue",
                                   path=str(sibling), field=field)
        translations[other_lang] = Translation(
            title=edition.title, subject=edition.subject, preheader=edition.preheader,
            source=edition.source, sections=edition.sections)
        keys[other_lang] = edition.key
    update: dict[str, Any] = {"translations": translations}
    if issue.slug is None and len(keys) > 1:
        # The same issue whichever edition's file is named on the command line.
        update["slug"] = keys[min(keys)]
    return issue.model_copy(update=update)


def _load_one(path: Path) -> Issue:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ContentError("no such file", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ContentError(f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                           path=str(path)) from None
    except OSError as exc:
        raise ContentError(exc.strerror or str(exc), path=str(path)) from None
    return parse_issue(text, name=str(path), fmt=_format_of(path))


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".md", ".markdown"):
        return "markdown"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ContentError(
        f"unknown issue format {suffix or '(no suffix)'}; use .md, .yaml, .yml or .json",
        path=str(path),
    )


def parse_issue(text: str, *, name: str = "<issue>", fmt: str = "markdown") -> Issue:
    """Parse issue text in the given format ("markdown", "yaml" or "json")."""
    if fmt == "markdown":
        data, lines = _parse_markdown(text, name)
    elif fmt == "yaml":
        data, lines = _parse_yaml(text, name, offset=0)
        if not isinstance(data, dict):
            raise ContentError("the file must be a mapping of issue fields", path=name, line=1)
    elif fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ContentError(f"invalid JSON: {exc.msg}", path=name, line=exc.lineno) from None
        if not isinstance(data, dict):
            raise ContentError("the file must be a JSON object of issue fields", path=name, line=1)
        # JSON is YAML, so the YAML composer gives us line numbers for every field.
        lines = _yaml_lines(text)
    else:
        raise ContentError(f"unknown format {fmt!r}", path=name)
    return _validate(data, lines, name)


def _validate(data: dict[str, Any], lines: Lines, name: str) -> Issue:
    try:
        return Issue.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        line = _nearest_line(lines, loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise ContentError(msg, path=name, line=line, field=_field_name(loc)) from None


def _field_name(loc: tuple[str | int, ...]) -> str:
    """sections[2].articles[1].title, counting from 1 as editors do."""
    out = ""
    for part in loc:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "issue"


def _nearest_line(lines: Lines, loc: tuple[str | int, ...]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


# --- YAML and JSON ----------------------------------------------------------------------------

def _parse_yaml(text: str, name: str, *, offset: int) -> tuple[Any, Lines]:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 + offset if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ContentError(f"invalid YAML: {problem}", path=name, line=line) from None
    return data, _yaml_lines(text, offset)


def _yaml_lines(text: str, offset: int = 0) -> Lines:
    """Map every path in a YAML/JSON document to the 1-based line where it starts."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return {}
    lines: Lines = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        lines[path] = node.start_mark.line + 1 + offset
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                walk(value, child)
                lines[child] = key.start_mark.line + 1 + offset
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


# --- Markdown with front matter -------------------------------------------------------------

_md = MarkdownIt("commonmark")


def split_front_matter(text: str, name: str, *, what: str) -> tuple[Any, Lines, list[str], int]:
    """The YAML between the opening '---' lines, parsed with its line numbers, then the
    text's lines and the index of the first body line. `what` names the document in the
    error for a missing opening line ("a Markdown issue", "an item")."""
    src = text.splitlines()
    if not src or src[0].strip() != "---":
        raise ContentError(f"{what} starts with front matter between '---' lines "
                           "(title, date, ...)", path=name, line=1)
    try:
        end = next(i for i in range(1, len(src)) if src[i].strip() in ("---", "..."))
    except StopIteration:
        raise ContentError("front matter is not closed with '---'", path=name, line=1) from None
    front, lines = _parse_yaml("\n".join(src[1:end]), name, offset=1)
    return front, lines, src, end + 1


def _parse_markdown(text: str, name: str) -> tuple[dict[str, Any], Lines]:
    front, lines, src, body_start = split_front_matter(text, name, what="a Markdown issue")
    if front is None:
        front = {}
    if not isinstance(front, dict):
        raise ContentError("front matter must be a mapping of fields", path=name, line=2)
    if "sections" in front:
        raise ContentError("sections come from '#' headings in the body, not the front matter",
                           path=name, line=lines.get(("sections",)), field="sections")
    body = src[body_start:]
    sections: list[dict[str, Any]] = []
    for kind, title, link, first, last, lineno in _headings(body):
        line = body_start + lineno + 1
        if kind == "text":
            raise ContentError("text before the first '# Section' heading", path=name, line=line)
        if kind == "h1":
            lines[("sections", len(sections))] = line
            sections.append({"title": title, "articles": []})
            continue
        if not sections:
            raise ContentError("article '## " + title + "' comes before any '# Section' heading",
                               path=name, line=line)
        art_body, source = _split_source("\n".join(body[first:last]))
        article: dict[str, Any] = {"title": title, "body": art_body}
        if link:
            article["link"] = link
        if source:
            article["source"] = source
        idx = ("sections", len(sections) - 1, "articles", len(sections[-1]["articles"]))
        lines[idx] = line
        sections[-1]["articles"].append(article)
    if not sections:
        raise ContentError("no sections: start one with a '# Section title' line",
                           path=name, line=body_start + 1)
    for i, section in enumerate(sections):
        if not section["articles"]:
            raise ContentError(f"section '{section['title']}' has no '## Article' headings",
                               path=name, line=lines[("sections", i)], field=f"sections[{i+1}]")
    lines[("sections",)] = body_start + 1
    return {**front, "sections": sections}, lines


def _headings(body: list[str]) -> Iterator[tuple[str, str, str | None, int, int, int]]:
    """Yield (kind, title, link, body_first, body_last, line) per top-level h1/h2.

    markdown-it tells headings from '#' lines inside code blocks; `map` gives line spans.
    """
    tokens = _md.parse("\n".join(body))
    marks: list[tuple[str, str, str | None, int, int]] = []  # kind, title, link, start, end
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and tok.level == 0 and tok.tag in ("h1", "h2") and tok.map:
            title, link = _heading_text(tokens[i + 1])
            marks.append((tok.tag, title, link, tok.map[0], tok.map[1]))
    # Non-blank text before the first heading is a mistake worth reporting.
    first = marks[0][3] if marks else len(body)
    for n in range(first):
        if body[n].strip():
            yield "text", "", None, 0, 0, n
            return
    for j, (kind, title, link, start, end) in enumerate(marks):
        nxt = marks[j + 1][3] if j + 1 < len(marks) else len(body)
        yield kind, title, link, end, nxt, start


def _heading_text(inline: Token) -> tuple[str, str | None]:
    """Heading text, and its link if the whole heading is one Markdown link."""
    children = [c for c in (inline.children or []) if not (c.type == "text" and not c.content)]
    if (len(children) >= 3 and children[0].type == "link_open"
            and children[-1].type == "link_close"):
        href = str(children[0].attrs.get("href", ""))
        text = "".join(c.content for c in children[1:-1])
        return text.strip(), href
    return "".join(c.content for c in children).strip() or inline.content.strip(), None


def _split_source(body: str) -> tuple[str, str | None]:
    """Take a final 'Source: ...' paragraph off an article body."""
    stripped = body.strip("\n")
    head, sep, last = stripped.rpartition("\n\n")
    candidate = last if sep else stripped
    match = _SOURCE_PREFIX.match(candidate.strip())
    if not match or "\n" in candidate.strip():
        return stripped, None
    return (head if sep else "").strip("\n"), candidate.strip()[match.end():].strip()
