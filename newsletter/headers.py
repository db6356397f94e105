"""Header safety and encoding: the only way user text reaches a mail header.

Python's email package has let CR/LF through encoded-words (CVE-2024-6923), so we do not
trust it to sanitise: text bound for a header is checked when it enters the system and
again here, and encoded-words are produced by us, never accepted from users.
"""

from __future__ import annotations

import re
from email.header import Header

from .errors import HeaderInjectionError

# CR, LF and NUL forge header lines; other C0 controls and DEL have no business in a header.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A pre-made encoded-word in user text could decode to anything, including a line break.
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?[^?]*\?=")
# Display names that need no quoting or encoding (RFC 5322 atext plus space and dot).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ .-]*")


def check_header_text(value: str, field: str) -> str:
    """Return value unchanged if it is safe in a header, else raise HeaderInjectionError.

    `field` names the value in the message; empty when the caller already says which it is.
    """
    where = f"{field}: " if field else ""
    if match := _FORBIDDEN.search(value):
        raise HeaderInjectionError(
            f"{where}control character {match.group()!r} is not allowed in text that goes "
            "into a mail header"
        )
    if _ENCODED_WORD.search(value):
        raise HeaderInjectionError(f"{where}RFC 2047 encoded-words ('=?...?=') are not allowed")
    return value


def encode_text(value: str, name: str) -> str:
    """Encode an unstructured header value (Subject), folded, without the field name.

    Non-ASCII text becomes UTF-8 encoded-words of at most 75 characters each.
    """
    check_header_text(value, name)
    if value.isascii() and len(value) + len(name) + 2 <= 78:
        return value
    # Header.encode folds with CRLF + space; maxlinelen counts the field name's room.
    return Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def format_address(name: str | None, email: str) -> str:
    """`Name <addr>` for a header; the name encoded if it must be, the address never."""
    check_header_text(email, "address")
    if not name:
        return email
    check_header_text(name, "name")
    if _PLAIN_NAME.fullmatch(name) and len(name) < 60:
        # Quote whenever a dot or special is present; plain words go bare.
        if re.fullmatch(r"[A-Za-z0-9 ]+", name):
            return f"{name} <{email}>"
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{email}>'
    if name.isascii():
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        if len(escaped) < 70:
            return f'"{escaped}" <{email}>'
    encoded = Header(name, "utf-8").encode(linesep="\r\n")
    return f"{encoded} <{email}>"
