"""Build the MIME message once per issue, then splice per-recipient values into prepared bytes.

Everything that is the same for every recipient (MIME structure, quoted-printable encoding,
CRLF line endings, SMTP dot-stuffing) is done once in `PreparedMessage.__init__`. Per
recipient, `build()` joins byte strings: the per-recipient headers, and each slot value
encoded as quoted-printable on lines of its own. A slot is always preceded and followed by a
soft line break, so a value never crosses the wrapping of the text around it, whatever its
length (PERFORMANCE.md, lesson 1). The result is ready for the DATA command as it is.
"""

from __future__ import annotations

import html
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import quoprimime
from email.utils import format_datetime
from typing import Protocol

from ..headers import check_header_text, encode_text, format_address
from .issue import SLOT_RE, SLOTS, RenderedIssue

_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")
# Bytes that may stand for themselves in quoted-printable: printable ASCII except "=".
_QP_SAFE = re.compile(r"[!-<>-~]*")
_QP_LINE = 73  # leaves room for "=2E" at a line start and the "=" of a soft break (76 max)


@dataclass(frozen=True, slots=True)
class Recipient:
    """One addressee of a send: ids for the token and Message-ID, and what the mail shows."""

    subscriber_id: int
    list_id: int
    email: str
    name: str = ""
    edition: str | None = None  # the language edition it gets (None: the main one)


@dataclass(frozen=True)
class ListInfo:
    """What the message says about the list a recipient is on."""

    name: str
    list_id_header: str  # value of List-Id, e.g. 'Digest <digest.example.org>'


def qp_slot(value: str) -> bytes:
    """Quoted-printable for a value spliced at a line start, ending with a soft break."""
    if _QP_SAFE.fullmatch(value):
        encoded = [value[i:i + _QP_LINE] for i in range(0, len(value), _QP_LINE)]
    else:
        encoded = []
        line: list[str] = []
        used = 0
        for byte in value.encode("utf-8"):
            unit = chr(byte) if 33 <= byte <= 126 and byte != 61 else f"={byte:02X}"
            if used + len(unit) > _QP_LINE:
                encoded.append("".join(line))
                line, used = [], 0
            line.append(unit)
            used += len(unit)
        if line:
            encoded.append("".join(line))
    # A line starting with "." would be eaten by SMTP; "=2E" decodes to the same dot.
    encoded = ["=2E" + ln[1:] if ln.startswith(".") else ln for ln in encoded]
    return "".join(ln + "=\r\n" for ln in encoded).encode("ascii")


def _qp_static(text: str) -> bytes:
    """Quoted-printable for a fixed stretch of a body, CRLF line endings, dot-stuffed."""
    if not text:
        return b""
    # quoprimime works on str whose code points are bytes; latin-1 maps them one to one.
    latin = text.encode("utf-8").decode("latin-1")
    encoded = quoprimime.body_encode(latin, maxlinelen=76, eol="\r\n").encode("ascii")
    return _DOT_AT_LINE_START.sub(b"..", encoded)


class _Part:
    """One body part split at its slots: fixed bytes, then (slot name, fixed bytes) pairs."""

    def __init__(self, text: str) -> None:
        pieces = SLOT_RE.split(text)
        # split() alternates text, slot name, text, ...; a slot's text neighbours end and
        # start with a soft break so the slot value sits on lines of its own.
        self.head = _qp_static(pieces[0]) + (b"=\r\n" if len(pieces) > 1 else b"")
        self.rest: list[tuple[str, bytes]] = []
        for i in range(1, len(pieces), 2):
            name, after = pieces[i], pieces[i + 1]
            if name not in SLOTS:
                raise ValueError(f"unknown slot {name} in rendered output")
            tail = _qp_static(after)
            if i + 2 < len(pieces):
                tail += b"=\r\n"
            self.rest.append((name, tail))

    def emit(self, encoded: dict[str, bytes], out: list[bytes]) -> None:
        """Append this part, its slots filled with already encoded values."""
        out.append(self.head)
        for name, tail in self.rest:
            out.append(encoded[name])
            out.append(tail)


_HTML_SPECIAL = re.compile(r"[&<>\"']")


def _for_html(value: str, encoded: bytes) -> bytes:
    """The HTML part's encoding of value: the text part's bytes unless escaping changes it."""
    if _HTML_SPECIAL.search(value):
        return qp_slot(html.escape(value, quote=True))
    return encoded


class PreparedMessage:
    """An issue turned into bytes once; `build(recipient)` gives one recipient's message."""

    def __init__(
        self, rendered: RenderedIssue, *, from_address: str, from_name: str, base_url: str,
        unsubscribe_token: Callable[[int, int], str], lists: dict[int, ListInfo],
        message_id_domain: str, campaign_id: int = 0, subject_prefix: str = "",
        web_urls: dict[int, str] | None = None,
        web_token: Callable[[int, int], str] | None = None,
        preferences_token: Callable[[int], str] | None = None,
    ) -> None:
        """web_urls: each list's URL of this issue's web version (default: base_url). A URL
        ending in "?t=" is a private archive's: web_token(subscriber, list) is appended.
        preferences_token(subscriber) makes the preferences_url slot's
        base_url/preferences/TOKEN (without it the slot is base_url)."""
        self.from_address = from_address
        self._base_url = base_url.rstrip("/") + "/"
        self._web_urls = web_urls or {}
        self._web_token = web_token
        # Encoded web-version URL per public list: the same for every recipient of that list.
        self._web_cache: dict[int, tuple[bytes, bytes]] = {}
        self._token = unsubscribe_token
        self._unsub_base = base_url.rstrip("/") + "/unsubscribe/"
        self._prefs_token = preferences_token
        self._prefs_base = base_url.rstrip("/") + "/preferences/"
        self._domain = message_id_domain
        self._campaign = campaign_id
        self._lists = lists
        # Random per run: Message-IDs stay unique when a campaign is resumed or retried.
        self._run = secrets.token_hex(4)
        self._seq = 0
        self._date_second = -1
        self._date_header = b""
        self._list_headers: dict[int, bytes] = {}
        boundary = "=_nl_" + secrets.token_hex(12)
        subject = check_header_text(subject_prefix + rendered.subject, "subject")
        common = (
            f"From: {format_address(from_name, from_address)}\r\n"
            + f"Subject: {encode_text(subject, 'Subject')}\r\n"
            + "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            + "MIME-Version: 1.0\r\n"
            + f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
            + "\r\n"
        )
        part_head = (
            'Content-Type: text/{}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        )
        self._common = common.encode("ascii")
        self._text_open = (f"--{boundary}\r\n" + part_head.format("plain")).encode("ascii")
        self._html_open = (f"\r\n--{boundary}\r\n" + part_head.format("html")).encode("ascii")
        self._close = f"\r\n--{boundary}--\r\n".encode("ascii")
        self._text = _Part(rendered.text)
        self._html = _Part(rendered.html)
        # A second signed token per message only when a template shows the link (campaigns
        # rendered before the slot existed, custom templates without it).
        self._uses_prefs = any(name == "preferences_url"
                               for part in (self._text, self._html) for name, _ in part.rest)
        # List names repeat across recipients: encode each once per part.
        self._list_names: dict[int, tuple[bytes, bytes]] = {}

    def _date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:  # formatting a date costs more than the rest of a header
            self._date_second = now
            stamp = format_datetime(datetime.fromtimestamp(now, UTC))
            self._date_header = f"Date: {stamp}\r\n".encode("ascii")
        return self._date_header

    def _list_header(self, list_id: int) -> bytes:
        cached = self._list_headers.get(list_id)
        if cached is None:
            info = self._lists[list_id]
            cached = f"List-Id: {info.list_id_header}\r\n".encode("ascii")
            self._list_headers[list_id] = cached
        return cached

    def web_url(self, recipient: Recipient) -> str:
        """The issue's web version for this recipient (with a reader token if private)."""
        url = self._web_urls.get(recipient.list_id, self._base_url)
        if self._web_token is not None and url.endswith("?t="):
            url += self._web_token(recipient.subscriber_id, recipient.list_id)
        return url

    def _web_slot(self, recipient: Recipient) -> tuple[bytes, bytes]:
        cached = self._web_cache.get(recipient.list_id)
        if cached is not None:
            return cached
        url = self.web_url(recipient)
        plain = qp_slot(url)
        pair = (plain, _for_html(url, plain))
        if url == self._web_urls.get(recipient.list_id, self._base_url):  # no per-reader token
            self._web_cache[recipient.list_id] = pair
        return pair

    def unsubscribe_url(self, recipient: Recipient) -> str:
        return self._unsub_base + self._token(recipient.subscriber_id, recipient.list_id)

    def preferences_url(self, recipient: Recipient) -> str:
        """The recipient's preferences page: one token per subscriber, whatever the list."""
        if self._prefs_token is None:
            return self._base_url
        return self._prefs_base + self._prefs_token(recipient.subscriber_id)

    def message_id(self, recipient: Recipient) -> str:
        self._seq += 1
        return (f"<nl.{self._campaign}.{recipient.subscriber_id}.{self._run}{self._seq:x}"
                f"@{self._domain}>")

    def build(self, recipient: Recipient) -> bytes:
        """The full message for one recipient: CRLF, dot-stuffed, without the final '.'."""
        url = self.unsubscribe_url(recipient)
        names = self._list_names.get(recipient.list_id)
        if names is None:
            name = self._lists[recipient.list_id].name
            plain = qp_slot(name)
            names = self._list_names[recipient.list_id] = (plain, _for_html(name, plain))
        url_qp = qp_slot(url)
        email_qp = qp_slot(recipient.email)
        web = self._web_slot(recipient)
        text_values = {"unsubscribe_url": url_qp, "recipient_email": email_qp,
                       "list_name": names[0], "web_url": web[0]}
        html_values = {"unsubscribe_url": _for_html(url, url_qp),
                       "recipient_email": _for_html(recipient.email, email_qp),
                       "list_name": names[1], "web_url": web[1]}
        if self._uses_prefs:
            prefs = self.preferences_url(recipient)
            prefs_qp = text_values["preferences_url"] = qp_slot(prefs)
            html_values["preferences_url"] = _for_html(prefs, prefs_qp)
        head = (
            f"To: {format_address(recipient.name, recipient.email)}\r\n"
            + f"Message-ID: {self.message_id(recipient)}\r\n"
            + f"List-Unsubscribe: <{url}>\r\n"
        )
        out = [head.encode("ascii"), self._date(), self._list_header(recipient.list_id),
               self._common, self._text_open]
        self._text.emit(text_values, out)
        out.append(self._html_open)
        self._html.emit(html_values, out)
        out.append(self._close)
        return b"".join(out)


def undot(data: bytes) -> bytes:
    """Reverse SMTP dot-stuffing: what a receiving server stores from what we transmit."""
    return re.sub(rb"(?m)^\.\.", b".", data)


class MessageSource(Protocol):
    """What the delivery engine sends: bytes per recipient."""

    def build(self, recipient: Recipient) -> bytes: ...


class Editions:
    """A bilingual campaign's messages: each recipient gets its edition (Recipient.edition,
    fixed in the ledger when the audience was), the main one otherwise."""

    def __init__(self, main: PreparedMessage, others: dict[str, PreparedMessage]) -> None:
        self.main = main
        self.others = others

    def build(self, recipient: Recipient) -> bytes:
        edition = recipient.edition
        message = self.others.get(edition, self.main) if edition else self.main
        return message.build(recipient)
