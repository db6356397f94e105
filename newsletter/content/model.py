"""The typed model of an issue: Issue -> Section -> Article, whatever file it came from."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import unicodedata
from typing import Annotated

from markdown_it import MarkdownIt
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, field_validator

from ..headers import check_header_text


def _header_safe(value: str) -> str:
    return check_header_text(value, "")  # pydantic's error already names the field


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


# A title travels into the Subject and the TOC; it must be one clean line.
HeaderText = Annotated[str, AfterValidator(_not_blank), AfterValidator(_header_safe)]
Text = Annotated[str, AfterValidator(_not_blank)]


def _https(value: HttpUrl) -> HttpUrl:
    # Mail clients fetch images through their proxies; an http:// image shows as broken or
    # as "insecure content" in the web archive.
    if value.scheme != "https":
        raise ValueError("an image URL must start with https://")
    return value


class Image(BaseModel):
    """A picture shown under an article's title. The alt text is required: it is what
    screen readers say and what a reader sees while images are blocked (most clients' default
    for a new sender)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[HttpUrl, AfterValidator(_https)]
    alt: Annotated[str, AfterValidator(_not_blank)]
    # Display width in CSS pixels, at most the email's content column; phones scale it down.
    width: int = Field(default=536, ge=1, le=536)


_body_md = MarkdownIt("commonmark")


def _body_images_ok(body: str) -> str:
    """A Markdown image in a body needs alt text and an https source, like Image."""
    if "![" not in body:  # cheap: most bodies have none
        return body
    for block in _body_md.parse(body):
        for tok in block.children or []:
            if tok.type != "image":
                continue
            src = str(tok.attrGet("src") or "")
            if not tok.content.strip():
                raise ValueError(f"image {src} has no alt text; write ![what it shows]({src})")
            if not src.startswith("https://"):
                raise ValueError(f"image {src or '(empty)'}: the URL must start with https://")
    return body


class Article(BaseModel):
    """One numbered item of a section: a title, a Markdown body, optionally a link, a source
    and images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: HeaderText
    body: Annotated[str, AfterValidator(_body_images_ok)] = ""
    link: HttpUrl | None = None
    source: str | None = None
    images: list[Image] = Field(default_factory=list)

    @field_validator("source")
    @classmethod
    def _strip_source(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class Section(BaseModel):
    """A titled group of articles; articles are numbered from 1 within their section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: HeaderText
    articles: list[Article] = Field(min_length=1)

    @property
    def anchor(self) -> str:
        return slugify(self.title) or "section"


LANGUAGE_PATTERN = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"


class Translation(BaseModel):
    """Another language's edition of an issue: its own title, subject and sections; the
    date, number and identity are the issue's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: HeaderText
    subject: HeaderText | None = None
    preheader: str = ""
    source: str | None = None
    sections: list[Section] = Field(min_length=1)

    @field_validator("preheader")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return " ".join(value.split())


class Issue(BaseModel):
    """One issue of a digest, validated; the unit that is rendered once and sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: HeaderText
    subject: HeaderText | None = None
    date: dt.date
    number: int | None = Field(default=None, ge=0)
    preheader: str = ""
    language: str = Field(default="en", pattern=LANGUAGE_PATTERN)
    source: str | None = None
    slug: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=120)
    sections: list[Section] = Field(min_length=1)
    # Other languages' editions, by language code: a subscriber's `lang` picks one, the
    # list's language is the fallback, and this issue's own language the last resort.
    translations: dict[str, Translation] = Field(default_factory=dict)

    @field_validator("preheader")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return " ".join(value.split())

    @field_validator("translations")
    @classmethod
    def _languages(cls, value: dict[str, Translation]) -> dict[str, Translation]:
        for lang in value:
            if not re.match(LANGUAGE_PATTERN, lang):
                raise ValueError(f"{lang!r} is not a language code (en, zh, pt-BR, ...)")
        return {lang.lower(): t for lang, t in value.items()}

    def editions(self) -> dict[str, Issue]:
        """Every edition as a whole Issue, this one's language first. They share the issue's
        key (through the slug), date and number, so they are one issue to the archive and
        to resend protection."""
        primary = self.model_copy(update={"translations": {}})
        out = {self.language.lower(): primary}
        for lang, t in self.translations.items():
            if lang in out:
                continue
            out[lang] = Issue(
                title=t.title, subject=t.subject, date=self.date, number=self.number,
                preheader=t.preheader, language=lang, source=t.source or self.source,
                slug=self.key, sections=t.sections)
        return out

    @property
    def effective_subject(self) -> str:
        return self.subject or self.title

    @property
    def key(self) -> str:
        """Identity of the issue across edits: sending the same key twice is a resend.

        An explicit slug wins; else the number, else the date and title. The content hash is
        deliberately not part of it, so fixing a typo does not make a new issue.
        """
        if self.slug:
            return self.slug
        if self.number is not None:
            return f"{slugify(self.title)}-no-{self.number}"
        return f"{slugify(self.title)}-{self.date.isoformat()}"

    def content_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def slugify(text: str) -> str:
    """ASCII slug for anchors and keys; CJK text falls back to a short hash."""
    norm = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", norm.lower()).strip("-")
    if not slug:
        slug = "h" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8]
    return slug[:60].rstrip("-")
