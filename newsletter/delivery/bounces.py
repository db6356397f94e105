"""Bounce messages (RFC 3464 delivery status notifications): parse them, receive them.

`parse_bounce` extracts facts from one message: which address failed, how (hard or soft),
the VERP token of the return path it came back to, and the campaign and subscriber named by
the original Message-ID. It never verifies the token and never touches the database: the
caller does both. It never raises on malformed input either; what cannot be read is simply
not reported. It is conservative, because a false hard bounce unsubscribes a real reader:
a message that is not clearly a bounce (an auto-reply, a reader's reply, spam) gives [].

Two ways in: `BounceServer`, an SMTP server to be the MX of the bounce domain, and
`scan_maildir`, for bounces an existing mail server already delivers into a Maildir.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email
import email.policy
import logging
import mailbox
import os
import quopri
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from ..errors import NewsletterError
from .capture import SmtpListener, open_maildir, trace_headers

log = logging.getLogger(__name__)

_DIAGNOSTIC_MAX = 500
# compat32 keeps header values as they came (no header-registry parsing that can raise on
# odd input); both policies split message/delivery-status into the same sub-messages.
_POLICY = email.policy.compat32
_MAX_DEPTH = 12  # MIME nesting followed at most: deeper is garbage or an attack
_MAX_FAILED = 100  # addresses taken from X-Failed-Recipients
_ADDRESS_WINDOW, _LINE_MAX = 40, 1000  # lines searched for a failed address, and their length

_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})(?!\d)")
# In free text: not part of an IP address or version number (no letter, digit or dot
# before it, and no further ".digit" after it).
_STATUS_IN_TEXT = re.compile(r"(?<![\w.])([45]\.\d{1,3}\.\d{1,3})(?!\w|\.\d)")
_SMTP_CODE = re.compile(r"(?<![\d.])([45])\d\d(?![\d.])")
# Digits bounded: int() refuses strings over 4300 digits, and real ids are far shorter.
_NL_ID = re.compile(r"<nl\.(\d{1,18})\.(\d{1,18})\.")
_MSGID = re.compile(r"<[^<>\s]+>")
# "Name: value"; not "https://...", which is an unindented continuation line.
_FIELD = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*:(?![ \t]*//)[ \t]*(.*)")
_ADDRESS = re.compile(r"[A-Za-z0-9._%+'=-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_LINES = re.compile(r"\r\n|\r|\n")

_Blocks = list[list[tuple[str, str]]]  # a delivery-status part: blocks of (name, value)
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_HEADERS_TYPES = (
    "text/rfc822-headers", "message/rfc822-headers", "message/global-headers",
    "message/rfc822", "message/global",
)
_ADDRESS_FIELDS = ("original-recipient", "final-recipient")
_SPLIT_FIELDS = (*_ADDRESS_FIELDS, "action", "status")
_VERP_HEADERS = ("Delivered-To", "X-Original-To", "To", "Envelope-To")

# Only for messages without a delivery-status part: the subject and sender must both say
# "bounce", and nothing may say "auto-reply".
_BOUNCE_SUBJECT = re.compile(
    r"undelivered mail returned to sender|mail delivery failed|delivery status notification"
    r" \(failure\)|^\s*undeliverable:|failure notice|^\s*returned mail:"
    r"|mail delivery failure",
    re.IGNORECASE,
)
_DAEMON_LOCAL = re.compile(r"mailer[-_]?daemon|mail[-_]?daemon|postmaster|mdaemon",
                           re.IGNORECASE)
_AUTO_REPLY_SUBJECT = re.compile(
    r"out of (?:the )?office|automatic reply|auto[- ]?reply|auto[- ]?response"
    r"|autorespon|vacation|away from|^\s*auto:",
    re.IGNORECASE,
)
_FAILURE_LINE = re.compile(
    r"could not|couldn't|wasn't able|was not able|unable to|not be delivered|undeliverable"
    r"|\bfailed\b|failure|permanent (?:fatal )?error|does not exist|unknown user|user unknown",
    re.IGNORECASE,
)
# Where a plain-text bounce starts quoting the original message: addresses and codes below
# belong to it (our From, a reader's text), not to the failure.
_COPY_MARKER = re.compile(
    r"(?im)^.*(?:below this line is a copy|copy of the (?:original )?message"
    r"|original message follows|original message headers|message headers follow"
    r"|unsent message below|^return-path:|^received:)"
)


@dataclass(frozen=True)
class Bounce:
    """One failed (or delayed) recipient reported by a bounce message."""

    recipient: str | None  # Original-Recipient, else Final-Recipient, without "rfc822;"
    kind: str  # "hard" (permanent) or "soft" (temporary)
    status: str  # enhanced status code such as "5.1.1", "" if none
    action: str  # failed | delayed (lowercase)
    diagnostic: str  # Diagnostic-Code text on one line, at most 500 characters
    verp_token: str | None  # TOKEN of the bounce+TOKEN@domain address it came back to
    message_id: str | None  # Message-ID of the original message, when the bounce names it
    campaign_id: int | None  # from an <nl.CAMPAIGN.SUBSCRIBER.*> Message-ID
    subscriber_id: int | None


def verp_token(address: str, *, local_prefix: str = "bounce") -> str | None:
    """TOKEN from 'bounce+TOKEN@domain' (case-insensitive prefix, token lowercased); None
    otherwise. Tolerates '<>' and whitespace around the address."""
    pattern = (r"\s*<?\s*" + re.escape(local_prefix)
               + r"\+([a-z0-9]+)@[^\s@<>]+\.?\s*>?\s*")
    match = re.fullmatch(pattern, address, re.IGNORECASE)
    return match.group(1).lower() if match else None


def parse_bounce(raw: bytes, *, envelope_recipients: Sequence[str] = (),
                 local_prefix: str = "bounce") -> list[Bounce]:
    """Bounces reported by one message. [] if it is not a bounce (e.g. an auto-reply or spam).

    envelope_recipients: the RCPT TO addresses, when known; they name the VERP token more
    reliably than any header.
    """
    try:
        msg = email.message_from_bytes(raw, policy=_POLICY)
        return _parse(msg, envelope_recipients, local_prefix)
    except Exception:  # the parser is meant not to raise: this is the last line of defence
        log.warning("unreadable bounce message ignored", exc_info=True)
        return []


def _parse(msg: Message, envelope_recipients: Sequence[str], local_prefix: str,
           ) -> list[Bounce]:
    top = list(_parts(msg))
    # Field blocks of each delivery-status part.
    statuses = [_text_blocks(_status_text(p)) for p in top if _content_type(p) in _DSN_TYPES]
    blocks: list[dict[str, str]] = []
    for fields in statuses:
        blocks.extend(_group(fields))
    if blocks:
        facts = [_from_block(b) for b in blocks]
        found = [f for f in facts if f is not None]
    elif _looks_like_plain_bounce(msg):
        found = _from_text(msg, top, local_prefix)
    else:
        return []
    if not found:
        return []
    token = _find_token(msg, envelope_recipients, local_prefix)
    message_id = _original_message_id(msg, top, statuses)
    campaign = subscriber = None
    if message_id is not None and (ids := _NL_ID.match(message_id)):
        campaign, subscriber = int(ids.group(1)), int(ids.group(2))
    return [
        Bounce(recipient=recipient, kind=_kind(action, status, diagnostic), status=status,
               action=action, diagnostic=diagnostic, verp_token=token, message_id=message_id,
               campaign_id=campaign, subscriber_id=subscriber)
        for recipient, action, status, diagnostic in found
    ]


# --- MIME helpers ---------------------------------------------------------------------------


def _parts(msg: Message, depth: int = 0) -> Iterator[Message]:
    """The message and its MIME parts, but not what is inside an attached message: a bounce
    quoted inside a reader's forward must not count as a bounce of ours."""
    yield msg
    if depth >= _MAX_DEPTH or _content_type(msg).partition("/")[0] != "multipart":
        return
    payload = msg.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                yield from _parts(sub, depth + 1)


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


def _header(msg: Message, name: str) -> str:
    """One header as plain text: raw 8-bit and encoded-words decoded, lines unfolded."""
    values = _headers(msg, name)
    return values[0] if values else ""


def _headers(msg: Message, name: str) -> list[str]:
    # raw_items: compat32's get() turns raw 8-bit into a Header that has lost the bytes.
    wanted = name.lower()
    return [_header_text(v) for k, v in msg.raw_items() if str(k).lower() == wanted]


def _header_text(value: object) -> str:
    text = _clean(str(value))
    # A malformed encoded-word or an unknown charset: the text stays as it is.
    with contextlib.suppress(Exception):
        if "=?" in text:
            text = str(make_header(decode_header(text)))
    return _one_line(text)


def _clean(text: str) -> str:
    """Drop the surrogates compat32 uses for undecodable bytes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _payload_bytes(part: Message) -> bytes:
    """A leaf part's body with its transfer encoding undone."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return b""
    return data if isinstance(data, bytes) else b""


def _decode(data: bytes, part: Message | None = None) -> str:
    charset = "utf-8"
    if part is not None:
        try:
            charset = part.get_content_charset() or "utf-8"
        except Exception:
            charset = "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:  # an unknown charset name
        return data.decode("utf-8", "replace")


# --- delivery-status parts ------------------------------------------------------------------


def _status_text(part: Message) -> str:
    """The text of a delivery-status part, rebuilt from what the parser made of it.

    The email package splits message/delivery-status into one sub-message per block, which
    is right for well-formed reports only: it takes an unindented "https://..." line for a
    field, any other unindented continuation for the start of a body, and leaves base64
    as it is. So the blocks are turned back into text, which _text_blocks reads the same
    way for every part.
    """
    payload = part.get_payload()
    if isinstance(payload, str):
        data = _payload_bytes(part)
        return _decode(data) if data else _clean(payload)
    chunks = []
    # Inside message/delivery-status a block's "body" starts at a line that was not a
    # field, with no blank line before it; in the other message/* types after one.
    sep = "" if _content_type(part) == "message/delivery-status" else "\n"
    for block in payload if isinstance(payload, list) else []:
        if not isinstance(block, Message):
            continue
        # The parser dropped the space after each colon; "https://" never had one.
        head = "".join(f"{k}:{'' if str(v).startswith('//') else ' '}{_clean(str(v))}\n"
                       for k, v in block.raw_items())
        body = _decode(_payload_bytes(block))  # get_payload() would replace 8-bit text
        chunks.append(head + sep + body)
    text = "\n".join(chunks)
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "base64":
            return _decode(binascii.a2b_base64(text.encode("ascii", "replace")))
        if cte == "quoted-printable":
            return _decode(quopri.decodestring(text.encode("utf-8", "replace")))
    except (binascii.Error, ValueError):
        return text
    return text


def _text_blocks(text: str) -> _Blocks:
    """Blocks of (name, value) fields, split on blank lines. A line that is indented or is
    not 'Name: value' continues the previous field: some MTAs fold without indenting."""
    blocks: list[list[tuple[str, list[str]]]] = []
    current: list[tuple[str, list[str]]] = []
    for line in _LINES.split(text):
        if not line.strip():
            if current:
                blocks.append(current)
                current = []
            continue
        match = None if line[0] in " \t" else _FIELD.fullmatch(line)
        if match:
            current.append((match.group(1), [match.group(2)]))
        elif current:  # a list, not str +=: a huge folded field must not take quadratic time
            current[-1][1].append(line.strip())
    if current:
        blocks.append(current)
    return [[(name, " ".join(value)) for name, value in block] for block in blocks]


def _group(blocks: _Blocks) -> list[dict[str, str]]:
    """Per-recipient groups. A recipient field seen twice starts a new group (a missing
    blank line); a group without an address whose fields do not clash with the previous
    group's is the rest of that group (a stray blank line). Of other repeated fields the
    first counts."""
    groups: list[dict[str, str]] = []
    for block in blocks:
        split: list[dict[str, str]] = []
        for name, value in block:
            key = name.lower()
            if not split or (key in split[-1] and key in _SPLIT_FIELDS):
                split.append({})
            split[-1].setdefault(key, _one_line(value))
        if split and groups:
            first, prev = split[0], groups[-1]
            if (not any(f in first for f in _ADDRESS_FIELDS)
                    and any(f in prev for f in _ADDRESS_FIELDS)
                    and not set(first) & set(prev)):
                prev.update(split.pop(0))
        groups.extend(split)
    return [g for g in groups if "action" in g or any(f in g for f in _ADDRESS_FIELDS)]


def _from_block(block: dict[str, str]) -> tuple[str | None, str, str, str] | None:
    """(recipient, action, status, diagnostic) of a failed or delayed recipient, else None."""
    words = block.get("action", "").lower().split()
    action = words[0] if words else ""
    if action not in ("failed", "delayed"):
        return None
    recipient = None
    for name in _ADDRESS_FIELDS:
        address = _strip_address_type(block.get(name, ""))
        if "@" in address:
            recipient = address
            break
        recipient = recipient or address or None
    status = _STATUS.match(block.get("status", ""))
    diagnostic = block.get("diagnostic-code", "")[:_DIAGNOSTIC_MAX]
    return recipient, action, status.group(1) if status else "", diagnostic


def _strip_address_type(value: str) -> str:
    """'rfc822; <user@example.com>' -> 'user@example.com'."""
    value = value.strip()
    kind, sep, rest = value.partition(";")
    if sep and re.fullmatch(r"[A-Za-z0-9-]+", kind.strip()):
        value = rest.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    return value


def _kind(action: str, status: str, diagnostic: str) -> str:
    if action == "delayed" or status.startswith("4"):
        return "soft"
    if status.startswith("5"):
        return "hard"
    code = _SMTP_CODE.search(diagnostic)
    return "soft" if code and code.group(1) == "4" else "hard"


# --- plain-text bounces ---------------------------------------------------------------------


def _looks_like_plain_bounce(msg: Message) -> bool:
    """A bounce without a delivery-status part: from a mailer daemon, saying so in a header
    or the subject, and not an auto-reply."""
    senders = [addr for _, addr in getaddresses(_headers(msg, "From"))]
    if not senders or not all(_DAEMON_LOCAL.fullmatch(a.rpartition("@")[0] or a)
                              for a in senders):
        return False
    subject = _header(msg, "Subject")
    if _AUTO_REPLY_SUBJECT.search(subject):
        return False
    if any(h in msg for h in ("X-Autoreply", "X-Autorespond")):
        return False
    if _header(msg, "Precedence").lower() == "auto_reply":
        return False
    return bool(_headers(msg, "X-Failed-Recipients") or _BOUNCE_SUBJECT.search(subject))


def _body_text(top: list[Message]) -> str:
    """The first text/plain part (else text/html with tags dropped), decoded."""
    for wanted in ("text/plain", "text/html"):
        for part in top:
            if _content_type(part) == wanted and not part.is_multipart():
                text = _decode(_payload_bytes(part), part)
                if wanted == "text/html":
                    text = re.sub(r"<[^<>]*>", " ", text)  # [^<>]: linear on "<<<<"
                return text
    return ""


def _from_text(msg: Message, top: list[Message], local_prefix: str,
               ) -> list[tuple[str | None, str, str, str]]:
    text = _body_text(top)
    marker = _COPY_MARKER.search(text)
    report = text[:marker.start()] if marker else text
    failed = [addr.strip() for _, addr in getaddresses(_headers(msg, "X-Failed-Recipients"))]
    # A bounce of one VERP message names a few addresses at most: the cap bounds the work
    # a forged header can cause.
    recipients: list[str | None] = []
    recipients.extend(a for a in failed if "@" in a)
    del recipients[_MAX_FAILED:]
    if not recipients:
        recipients = [_first_failed_address(report, msg, local_prefix)]
    lowered = report.lower()
    results = []
    for i, recipient in enumerate(recipients):
        # The stretch about this recipient: from its first mention to the next one's.
        segment = report
        if recipient is not None and (start := lowered.find(recipient.lower())) >= 0:
            end = len(report)
            nxt = recipients[i + 1] if i + 1 < len(recipients) else None
            if nxt is not None and (stop := lowered.find(nxt.lower(), start + 1)) > 0:
                end = stop
            segment = report[start:end]
        status, diagnostic = _status_line(segment)
        if not status and segment is not report:
            status, diagnostic = _status_line(report)
        if not diagnostic:
            diagnostic = next((ln.strip() for ln in report.splitlines()
                               if _FAILURE_LINE.search(ln)), "")
        results.append((recipient, "failed", status, _one_line(diagnostic)[:_DIAGNOSTIC_MAX]))
    return results


def _status_line(text: str) -> tuple[str, str]:
    """The first enhanced status code in text, and the line it is on."""
    for line in text.splitlines():
        if match := _STATUS_IN_TEXT.search(line):
            return match.group(1), line.strip()
    return "", ""


def _first_failed_address(report: str, msg: Message, local_prefix: str) -> str | None:
    """The first address on or after the first line that mentions the failure, other than
    the daemon's, ours (VERP) or a postmaster's."""
    own = {a.lower() for _, a in getaddresses(_headers(msg, "From") + _headers(msg, "To"))}
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if not _FAILURE_LINE.search(line):
            continue
        # A window of short lines: the address follows closely, and _ADDRESS would take
        # quadratic time on a long run of address characters without an "@".
        for later in lines[i:i + _ADDRESS_WINDOW]:
            for match in _ADDRESS.finditer(later[:_LINE_MAX]):
                address = match.group(0)
                local = address.rpartition("@")[0]
                if (address.lower() in own or _DAEMON_LOCAL.fullmatch(local)
                        or verp_token(address, local_prefix=local_prefix)):
                    continue
                return address
        return None
    return None


# --- VERP token and original Message-ID -----------------------------------------------------


def _find_token(msg: Message, envelope_recipients: Sequence[str], local_prefix: str,
                ) -> str | None:
    # Return-Path and X-Failed-Recipients are never looked at: they name the other side.
    for address in envelope_recipients:
        if token := verp_token(address, local_prefix=local_prefix):
            return token
    for name in _VERP_HEADERS:
        for _, address in getaddresses(_headers(msg, name)):
            if token := verp_token(address, local_prefix=local_prefix):
                return token
    return None


def _original_message_id(msg: Message, top: list[Message], statuses: list[_Blocks],
                         ) -> str | None:
    """From the returned headers, else the DSN's X-Original-Message-ID, else a quoted
    header in the text, else In-Reply-To / References (Exchange and Gmail set them)."""
    for part in top:
        if _content_type(part) in _HEADERS_TYPES and (found := _headers_part_id(part)):
            return found
    for fields in statuses:
        for block in fields:
            for name, value in block:
                if name.lower() == "x-original-message-id" and (found := _msgid(value)):
                    return found
    quoted = re.search(r"(?im)^message-id:[ \t]*(<[^<>\s]+>)", _body_text(top))
    if quoted:
        return quoted.group(1)
    if found := _msgid(_header(msg, "In-Reply-To")):
        return found
    references = _MSGID.findall(_header(msg, "References"))
    return references[-1] if references else None


def _headers_part_id(part: Message) -> str | None:
    payload = part.get_payload()
    if isinstance(payload, list):  # message/rfc822: already parsed
        inner = payload[0] if payload and isinstance(payload[0], Message) else None
    else:  # text/rfc822-headers, possibly base64 or quoted-printable
        inner = BytesHeaderParser(policy=_POLICY).parsebytes(_payload_bytes(part))
    return _msgid(_header(inner, "Message-ID")) if inner is not None else None


def _msgid(value: str) -> str | None:
    match = _MSGID.search(value)
    return match.group(0) if match else None


# --- receivers ------------------------------------------------------------------------------

BounceHandler = Callable[[list[Bounce], bytes], None]
"""Called for each received message with what it reports (possibly []) and its bytes."""


def _seen_name(name: str) -> str:
    """A Maildir file name with the 'S' (seen) flag added to its info."""
    colon = mailbox.Maildir.colon
    unique, sep, info = name.partition(colon)
    flags = info[2:] if sep and info.startswith("2,") else ""
    return f"{unique}{colon}2,{''.join(sorted(set(flags) | {'S'}))}"


def _mark_seen(folder: Path, subdir: str, name: str) -> None:
    """Move one message to cur/ with flag S, by renaming: what MaildirMessage.set_subdir('cur')
    and add_flag('S') mean on disk, without rewriting the file (Maildir.__setitem__ would
    regenerate the message and lose its exact bytes)."""
    os.rename(folder / subdir / name, folder / "cur" / _seen_name(name))


class _BounceSMTPHandler:
    def __init__(self, receiver: BounceServer) -> None:
        self.receiver = receiver

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        rcpts = [str(r) for r in envelope.rcpt_tos]
        mail_from = None if envelope.mail_from is None else str(envelope.mail_from)
        raw = trace_headers(mail_from, rcpts) + (envelope.original_content or b"")
        return await self.receiver.receive(raw, rcpts)


class BounceServer(SmtpListener):
    """An aiosmtpd SMTP server on host:port (port 0: chosen by the OS) in the running event
    loop, to be the MX of the bounce domain.

    It accepts any recipient, parses each message with its envelope recipients and calls
    handler(bounces, raw), where raw is the message with Return-Path and Delivered-To
    prepended, as a local delivery agent would store it. Parsing runs in a worker thread;
    the handler runs in the event loop: keep it short. If it raises, the reply is 451 so
    the sending MTA retries later; otherwise 250.

    keep_dir: a Maildir where every message is stored before the handler sees it, so none is
    lost when recording fails. Messages the handler took are marked seen there; those it
    failed on stay unseen, for `scan_maildir`. The sending MTA retries those as well, and a
    scan that runs while the server does may see a message before it is marked, so the
    recording of a bounce should be idempotent (the VERP token names one delivery).
    """

    def __init__(self, handler: BounceHandler, *, host: str = "127.0.0.1", port: int = 0,
                 local_prefix: str = "bounce", keep_dir: Path | None = None) -> None:
        super().__init__(host=host, port=port)
        self.handler = handler
        self.local_prefix = local_prefix
        self.keep_dir = keep_dir
        self.received = 0  # messages the handler took (a 451 is not counted)
        self._keep: mailbox.Maildir | None = None

    async def receive(self, raw: bytes, rcpts: Sequence[str]) -> str:
        """Keep, parse and hand over one message; the SMTP reply to give."""
        key = None
        if self._keep is not None:
            try:
                key = self._keep.add(raw)
            except OSError:
                log.exception("cannot keep a received bounce in %s", self.keep_dir)
                return "451 4.3.0 cannot store the message now, try again later"
        # In a thread: a big or pathological message can take seconds to parse, and the
        # loop serves the other connections meanwhile. The handler stays in the loop, which
        # is where the owner's store is used.
        bounces = await asyncio.to_thread(parse_bounce, raw, envelope_recipients=rcpts,
                                          local_prefix=self.local_prefix)
        try:
            self.handler(bounces, raw)
        except Exception:
            log.exception("bounce handler failed for a message to %s", ", ".join(rcpts))
            return "451 4.3.0 bounce not recorded, try again later"
        self.received += 1
        if key is not None and self.keep_dir is not None:
            try:
                _mark_seen(self.keep_dir, "new", key)
            except OSError as exc:  # recorded already: a later scan may count it twice
                log.warning("cannot mark kept bounce %s as seen: %s", key, exc)
        return "250 2.0.0 bounce received"

    async def start(self) -> None:
        if self.keep_dir is not None:
            self._keep = open_maildir(self.keep_dir)
        await self._listen(_BounceSMTPHandler(self), hostname="bounces.localhost",
                           size_limit=25 * 1024 * 1024, ident="newsletter bounce receiver")


@dataclass
class ScanReport:
    """What one scan_maildir did. Each message processed counts in messages and in one of
    bounces (it reported at least one Bounce), not_bounces, or failed."""

    messages: int = 0
    bounces: int = 0
    not_bounces: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (maildir key, error)


def scan_maildir(path: Path, handler: BounceHandler, *, local_prefix: str = "bounce",
                 ) -> ScanReport:
    """Process every message in path/new and every one in path/cur not yet flagged 'S':
    parse it, call handler, then mark it seen (moved to cur/ with flag S) so a second scan
    skips it. If the handler raises, the message stays unseen, is listed in failed, and the
    scan goes on with the next one."""
    if not (path / "new").is_dir() or not (path / "cur").is_dir():
        raise NewsletterError(f"{path}: not a Maildir (no new/ and cur/ folders in it)")
    colon = mailbox.Maildir.colon
    report = ScanReport()
    for subdir in ("new", "cur"):
        try:
            names = sorted(e.name for e in os.scandir(path / subdir) if e.is_file())
        except OSError as exc:
            raise NewsletterError(f"{path / subdir}: cannot list: {exc}") from exc
        for name in names:
            unique, sep, info = name.partition(colon)
            if name.startswith(".") or (subdir == "cur" and sep and info.startswith("2,")
                                        and "S" in info[2:]):
                continue
            try:
                raw = (path / subdir / name).read_bytes()
            except FileNotFoundError:  # another scan took it meanwhile
                continue
            except OSError as exc:
                report.messages += 1
                report.failed.append((unique, f"cannot read: {exc}"))
                continue
            report.messages += 1
            bounces = parse_bounce(raw, local_prefix=local_prefix)
            try:
                handler(bounces, raw)
            except Exception as exc:
                log.warning("bounce handler failed for %s: %s", unique, exc)
                report.failed.append((unique, f"{type(exc).__name__}: {exc}"))
                continue
            try:
                _mark_seen(path, subdir, name)
            except OSError as exc:  # handled, but a later scan would hand it over again
                report.failed.append((unique, f"handled but not marked seen: {exc}"))
                continue
            if bounces:
                report.bounces += 1
            else:
                report.not_bounces += 1
    return report
