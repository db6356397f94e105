"""The prepared message against the checklist in shared/STANDARDS.md, on the raw bytes."""

from __future__ import annotations

import email
import email.policy
import json
import quopri
import random
import re
from email.message import EmailMessage
from email.utils import getaddresses, parsedate_to_datetime
from pathlib import Path

import pytest

from newsletter.content.parse import parse_issue
from newsletter.errors import ContentError, HeaderInjectionError
from newsletter.headers import check_header_text, encode_text, format_address
from newsletter.render.issue import RenderedIssue, render_issue
from newsletter.render.message import ListInfo, PreparedMessage, Recipient, qp_slot, undot
from newsletter.render.templates import make_environment
from newsletter.render.tokens import TokenError, TokenSigner

from .test_content import MD

SIGNER = TokenSigner([b"k1"])


def _prepared(subject: str = "Policy Digest No. 3", text: str = MD,
              list_name: str = "Policy readers") -> PreparedMessage:
    issue = parse_issue(text.replace('"Policy Digest No. 3"', f'"{subject}"'))
    rendered = render_issue(issue, make_environment(), brand_name="Policy Desk",
                            postal_address="1 Example Street, Example City")
    return PreparedMessage(
        rendered, from_address="digest@example.org", from_name="Policy Desk",
        base_url="https://news.example.org", unsubscribe_token=SIGNER.unsubscribe_token,
        lists={7: ListInfo(list_name, format_address(list_name, "policy.example.org"))},
        message_id_domain="example.org", campaign_id=42,
    )


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(undot(raw), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


ANA = Recipient(subscriber_id=11, list_id=7, email="ana@example.com", name="Ana Example")


def test_headers_follow_the_checklist() -> None:
    raw = _prepared().build(ANA)
    head, _, _ = raw.partition(b"\r\n\r\n")
    msg = _parse(raw)
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "List-Id",
                 "List-Unsubscribe", "List-Unsubscribe-Post"):
        assert len(msg.get_all(name) or []) == 1, name  # 1
    assert getaddresses([msg["From"]]) == [("Policy Desk", "digest@example.org")]  # 2, 25
    assert getaddresses([msg["To"]]) == [("Ana Example", "ana@example.com")]
    date = parsedate_to_datetime(msg["Date"])  # 3
    assert date.tzinfo is not None and b"+0000" in head
    assert re.fullmatch(r"<[^<>@\s]+@example\.org>", msg["Message-ID"])  # 4
    unsub = msg["List-Unsubscribe"]  # 9
    assert re.fullmatch(r"<https://news\.example\.org/unsubscribe/[A-Za-z0-9_-]+>", unsub)
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"  # 10
    assert msg["List-Id"] == "Policy readers <policy.example.org>"  # 12
    assert len(msg["List-Id"]) <= 255
    assert msg["Subject"] == "Policy Digest No. 3"
    assert not re.match(r"(?i)(re|fwd?):", msg["Subject"])


def test_bytes_are_crlf_7bit_and_within_line_limits() -> None:
    raw = _prepared().build(ANA)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # 5: no bare LF
    assert b"\r" not in raw.replace(b"\r\n", b"")  # and no bare CR
    assert all(b < 128 for b in raw)  # 7-bit clean, headers included (7, 17)
    lines = raw.split(b"\r\n")
    assert max(len(ln) for ln in lines) <= 998  # 6
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    # Only List-Unsubscribe may exceed 78: it is one URL, which must not be folded inside <>.
    assert all(len(ln) <= 78 for ln in head if not ln.startswith(b"List-Unsubscribe:"))
    body = raw.partition(b"\r\n\r\n")[2].split(b"\r\n")
    assert max(len(ln) for ln in body) <= 76  # quoted-printable lines


def test_structure_text_then_html_quoted_printable_utf8() -> None:
    msg = _parse(_prepared().build(ANA))
    assert msg.get_content_type() == "multipart/alternative"  # 15
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    for part in parts:  # 17
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
        assert part.get_content_charset() == "utf-8"
    text = parts[0].get_content()
    html = parts[1].get_content()
    url = msg["List-Unsubscribe"].strip("<>")
    assert f"Unsubscribe: {url}" in text  # 16
    assert "1 Example Street" in text
    assert f'href="{url}"' in html  # 19: same token in the body
    assert "1 Example Street" in html
    assert "ana@example.com" in text and "ana@example.com" in html
    assert "Policy readers" in text
    assert len(html.encode()) < 100 * 1024  # 18


def test_message_ids_and_tokens_are_unique_per_recipient_and_send() -> None:
    prepared = _prepared()
    recipients = [Recipient(i, 7, f"u{i}@example.com") for i in range(200)]
    msgs = [_parse(prepared.build(r)) for r in recipients]
    ids = [m["Message-ID"] for m in msgs]
    assert len(set(ids)) == len(ids)
    again = _parse(prepared.build(recipients[0]))
    assert again["Message-ID"] != ids[0]  # a resend gets a new id
    other_run = _parse(_prepared().build(recipients[0]))
    assert other_run["Message-ID"] not in ids
    urls = {m["List-Unsubscribe"] for m in msgs}
    assert len(urls) == len(msgs)  # 11: per recipient
    for m in msgs:
        assert "u" not in m["List-Unsubscribe"].split("/")[-1][:0]  # opaque, see below
        assert "example.com" not in m["List-Unsubscribe"]  # not the plain address


def test_unsubscribe_token_names_subscriber_and_list_and_resists_forgery() -> None:
    token = SIGNER.unsubscribe_token(11, 7)
    assert SIGNER.read_unsubscribe_token(token) == (11, 7)
    assert len(token) >= 40
    for bad in (token[:-1], token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1],
                "", "!!!", token + "AA"):
        with pytest.raises(TokenError):
            SIGNER.read_unsubscribe_token(bad)
    with pytest.raises(TokenError):
        TokenSigner([b"other"]).read_unsubscribe_token(token)
    # Rotation: signed with the old key, still valid after the new key is first.
    rotated = TokenSigner([b"k2", b"k1"])
    assert rotated.read_unsubscribe_token(token) == (11, 7)
    assert rotated.unsubscribe_token(11, 7) != token
    from newsletter.render.tokens import Purpose

    confirm = SIGNER.sign(Purpose.CONFIRM, 11, 7)
    with pytest.raises(TokenError, match="not valid for this use"):
        SIGNER.read_unsubscribe_token(confirm)


def test_chinese_subject_names_and_list_use_encoded_words() -> None:
    subject = "数字经济简报 第 7 期：平台治理与数据要素市场的新进展"
    prepared = _prepared(subject=subject, list_name="数字经济读者")
    raw = prepared.build(Recipient(3, 7, "wang@example.com", "王小明"))
    head = raw.partition(b"\r\n\r\n")[0]
    assert all(b < 128 for b in head)
    words = re.findall(rb"=\?utf-8\?[bq]\?[^?]*\?=", head, re.IGNORECASE)
    assert words and all(len(w) <= 75 for w in words)  # 7
    msg = _parse(raw)
    assert str(msg["Subject"]) == subject
    assert getaddresses([str(msg["To"])]) == [("王小明", "wang@example.com")]
    assert "数字经济读者" in str(msg["List-Id"])
    assert "数字经济读者" in msg.get_body(("plain",)).get_content()


@pytest.mark.parametrize("evil", [
    "Hello\r\nBcc: victim@example.com",
    "Hello\nBcc: victim@example.com",
    "Hello\rBcc: victim@example.com",
    "Hello\x00",
    "Hello\n",
    "=?UTF-8?Q?=0A?=Bcc: injected@example.com",
    "x =?utf-8?b?DQpCY2M6IHhAeS56?= y",
])
def test_header_injection_is_rejected_everywhere(evil: str) -> None:  # 8
    with pytest.raises(HeaderInjectionError):
        check_header_text(evil, "subject")
    with pytest.raises(HeaderInjectionError):
        encode_text(evil, "Subject")
    with pytest.raises(HeaderInjectionError):
        format_address(evil, "a@example.com")
    # From an issue file: rejected, or (surrounding whitespace only) stripped to safe text.
    try:
        issue = parse_issue(MD.replace("title: Policy Digest",
                                       "title: " + json.dumps(evil)))
    except ContentError as exc:
        assert "control character" in str(exc) or "encoded-word" in str(exc)
    else:
        assert issue.title == evil.strip()
        check_header_text(issue.title, "title")
    prepared = _prepared()
    with pytest.raises(HeaderInjectionError):
        prepared.build(Recipient(1, 7, "a@example.com", evil))
    rendered = RenderedIssue(evil, "<p>NLSLOTunsubscribe_urlNLSLOT</p>",
                             "NLSLOTunsubscribe_urlNLSLOT", "en")
    with pytest.raises(HeaderInjectionError):
        PreparedMessage(rendered, from_address="d@example.org", from_name="D",
                        base_url="https://x.example.org",
                        unsubscribe_token=SIGNER.unsubscribe_token, lists={},
                        message_id_domain="example.org")


def test_display_names_with_specials_are_quoted() -> None:
    for name in ('Doe, Jane', 'A "quoted" name', "O'Brien (Ops)", "Ann <admin@evil.test>"):
        raw = _prepared().build(Recipient(1, 7, "jane@example.com", name))
        msg = _parse(raw)
        assert getaddresses([str(msg["To"])]) == [(name, "jane@example.com")], name


def test_qp_slot_round_trips_any_value() -> None:
    rng = random.Random(7)
    alphabet = "abc.=?&<> \t数字é\x7f-_/:"
    for _ in range(300):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        encoded = qp_slot(value)
        assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
        assert not any(line.startswith(b".") for line in encoded.split(b"\r\n"))
        assert quopri.decodestring(encoded.replace(b"\r\n", b"\n")).decode() == value


def test_spliced_values_survive_any_position_in_the_body() -> None:
    """Long, dotted and non-ASCII values decode exactly, wherever the template put them."""
    prepared = _prepared(list_name="." + "Lists.with.dots=" * 12 + "数字")
    for email_addr in ("a@example.com", ".leading.dot@example.com",
                       "x" * 60 + "+tag=1@example.com"):
        msg = _parse(prepared.build(Recipient(5, 7, email_addr, "")))
        text = msg.get_body(("plain",)).get_content()
        html = msg.get_body(("html",)).get_content()
        assert f"Sent to {email_addr}" in text
        assert "." + "Lists.with.dots=" * 12 + "数字" in text
        assert email_addr in html


def test_build_issue_writes_preview_text_and_eml(tmp_path: Path) -> None:
    from newsletter.service import Newsletter

    from .conftest import make_settings

    nl = Newsletter(make_settings(tmp_path))
    (tmp_path / "i.md").write_text(MD, encoding="utf-8")
    result = nl.build_files(tmp_path / "i.md", tmp_path / "out")
    html = result.html.read_text(encoding="utf-8")
    assert "NLSLOT" not in html and "reader@example.org" in html
    assert "NLSLOT" not in result.text.read_text(encoding="utf-8")
    msg = email.message_from_bytes(result.eml.read_bytes(), policy=email.policy.default)
    assert msg["Subject"] == "Policy Digest No. 3"
