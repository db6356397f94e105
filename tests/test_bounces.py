"""Bounce parsing on realistic samples, and the two receivers: SMTP and a Maildir scan."""

from __future__ import annotations

import asyncio
import logging
import mailbox
import random
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from newsletter.delivery.bounces import (
    Bounce,
    BounceServer,
    ScanReport,
    parse_bounce,
    scan_maildir,
    verp_token,
)
from newsletter.errors import NewsletterError

DATA = Path(__file__).parent / "data" / "bounces"
SAMPLES = sorted(DATA.glob("*.eml"))


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


# --- each sample --------------------------------------------------------------------------------

# name -> [(recipient, kind, status, action, verp_token, message_id, campaign, subscriber)]
EXPECTED: dict[str, list[tuple[Any, ...]]] = {
    "postfix_user_unknown.eml": [
        ("alice@example.com", "hard", "5.1.1", "failed", "5fdkzpaahjhq4pubzkaj2ievpyzl3a4r",
         "<nl.42.1234.a1b2c3d41f@news.example.org>", 42, 1234)],
    "exim_failed.eml": [
        ("bob@example.com", "hard", "5.0.0", "failed", "ptjtkwofreh5n77dj4mh5ympct3a6pa4",
         "<nl.7.99.0f1e2d3c2@news.example.org>", 7, 99)],
    "gmail_style.eml": [
        ("carol@example.com", "hard", "5.1.1", "failed", "d5mlctnm5ynrmdq4pvdiuraamolx6uvu",
         "<nl.15.30518.77aa0b1c9@news.example.org>", 15, 30518)],
    "microsoft_ndr.eml": [
        ("dave@example.com", "hard", "5.1.10", "failed", "ehtwxbh6aa4ythobpwzpj7rfl4mhoor7",
         "<nl.3.5120.c0ffee012@news.example.org>", 3, 5120)],
    "delayed_4xx.eml": [
        ("frank@example.com", "soft", "4.4.1", "delayed", "oezxa65fmcbdm32wvpaswkailfvmcqzi",
         "<nl.16.8.5e5e5e5e3@news.example.org>", 16, 8)],
    "qmail_plain.eml": [
        ("erin@example.com", "hard", "5.1.1", "failed", "rx76zs3uvhyhe7fmo3reobsgenspo7da",
         "<nl.17.2024.9a8b7c6d5@news.example.org>", 17, 2024)],
    "exim_plain.eml": [
        ("grace@example.com", "hard", "5.1.1", "failed", "mfrggzdfmztwq2lknnwg23tpobyxe43u",
         "<nl.18.61.1f2e3d4c1@news.example.org>", 18, 61),
        ("heidi@example.com", "hard", "5.1.1", "failed", "mfrggzdfmztwq2lknnwg23tpobyxe43u",
         "<nl.18.61.1f2e3d4c1@news.example.org>", 18, 61)],
    "multi_recipient.eml": [
        ("ken@example.com", "hard", "5.1.1", "failed", "nbswy3dpeb3w64tmmqqgc3dfoj2a2mzr",
         "<nl.19.404.abcdef0123@news.example.org>", 19, 404),
        # Original-Recipient (what was sent) wins over Final-Recipient (an alias target).
        ("lisa@example.com", "hard", "5.2.2", "failed", "nbswy3dpeb3w64tmmqqgc3dfoj2a2mzr",
         "<nl.19.404.abcdef0123@news.example.org>", 19, 404)],
    "base64_status.eml": [
        ("nina@example.com", "hard", "5.7.1", "failed", "onswe2lmnrxxezlsmfwgkzdfon2a4ztq",
         "<nl.20.77.0a0b0c0d1@news.example.org>", 20, 77)],
    "odd_blank_lines.eml": [
        ("oscar@example.com", "hard", "5.1.2", "failed", "ojswg2lqnfsw45bamfxgiidvnzsxe43d",
         "<nl.21.3003.deadbeef1@news.example.org>", 21, 3003)],
    "out_of_office.eml": [],
    "ordinary_reply.eml": [],
    "success_relayed.eml": [],
}


def facts(b: Bounce) -> tuple[Any, ...]:
    return (b.recipient, b.kind, b.status, b.action, b.verp_token, b.message_id,
            b.campaign_id, b.subscriber_id)


def test_every_sample_has_expectations() -> None:
    assert {p.name for p in SAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str) -> None:
    bounces = parse_bounce(sample(name))
    assert [facts(b) for b in bounces] == EXPECTED[name]
    for b in bounces:
        assert b.diagnostic and "\n" not in b.diagnostic and len(b.diagnostic) <= 500


def test_diagnostics() -> None:
    [postfix] = parse_bounce(sample("postfix_user_unknown.eml"))
    assert postfix.diagnostic == ("smtp; 550 5.1.1 <alice@example.com>: Recipient address "
                                  "rejected: User unknown in virtual mailbox table")
    [ms] = parse_bounce(sample("microsoft_ndr.eml"))
    assert ms.diagnostic.startswith("smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound")
    [delayed] = parse_bounce(sample("delayed_4xx.eml"))
    assert delayed.diagnostic == ("X-Postfix; connect to mail.example.com[203.0.113.77]:25: "
                                  "Connection timed out")
    [qmail] = parse_bounce(sample("qmail_plain.eml"))
    assert "550 5.1.1 <erin@example.com>" in qmail.diagnostic
    # An MTA that folds without indenting: the stray line still belongs to the field.
    [odd] = parse_bounce(sample("odd_blank_lines.eml"))
    assert odd.diagnostic == ("smtp; 550 Host unknown: old.example.com could not resolve "
                              "example.invalid")


# --- VERP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "token"), [
    ("bounce+abc234@example.org", "abc234"),
    ("<bounce+abc234@example.org>", "abc234"),
    ("  < bounce+abc234@example.org >  ", "abc234"),
    ("Bounce+ABC234@Example.ORG", "abc234"),
    ("bounce+abc234@news.example.org.", "abc234"),
    ("bounce@example.org", None),
    ("bounce+@example.org", None),
    ("bounce+abc1@example.org", "abc1"),  # tokens are lowercase hex (letters and digits)
    ("bounce+ab-c@example.org", None),
    ("bounce+abc=@example.org", None),
    ("bounces+abc234@example.org", None),
    ("xbounce+abc234@example.org", None),
    ("bounce+abc234", None),
    ("bounce+abc234@", None),
    ("bounce+abc234@example.org, bounce+def@example.org", None),
    ("", None),
])
def test_verp_token(address: str, token: str | None) -> None:
    assert verp_token(address) == token


def test_verp_token_prefix() -> None:
    assert verp_token("nl.rtn+abc@example.org", local_prefix="nl.rtn") == "abc"
    assert verp_token("nlxrtn+abc@example.org", local_prefix="nl.rtn") is None
    assert verp_token("bounce+abc@example.org", local_prefix="nl.rtn") is None


def test_envelope_recipient_beats_headers() -> None:
    raw = sample("postfix_user_unknown.eml")
    [b] = parse_bounce(raw, envelope_recipients=["bounce+zzzz2222@news.example.org"])
    assert b.verp_token == "zzzz2222"
    # An envelope recipient without a token (the bare bounce address): headers decide.
    [b] = parse_bounce(raw, envelope_recipients=["postmaster@news.example.org"])
    assert b.verp_token == "5fdkzpaahjhq4pubzkaj2ievpyzl3a4r"
    [b] = parse_bounce(raw, envelope_recipients=["x@example.org", "<bounce+yy@example.org>"])
    assert b.verp_token == "yy"


def dsn(*, head: str = "", action: str = "failed", status: str | None = "5.1.1",
        diagnostic: str | None = "smtp; 550 5.1.1 user unknown", third: str = "") -> bytes:
    """A minimal RFC 3464 report with the given top headers and one recipient block."""
    fields = ["Final-Recipient: rfc822; someone@example.com", f"Action: {action}"]
    if status is not None:
        fields.append(f"Status: {status}")
    if diagnostic is not None:
        fields.append(f"Diagnostic-Code: {diagnostic}")
    text = (
        "From: MAILER-DAEMON@mx.example.com\n"
        f"{head}"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n'
        "\n--B\nContent-Type: text/plain\n\nThe mail system\n"
        "\n--B\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.example.com\n\n" + "\n".join(fields) + "\n"
        + third + "\n--B--\n"
    )
    return text.encode()


def test_verp_header_order() -> None:
    head = ("Return-Path: <bounce+rrrr@news.example.org>\n"
            "X-Failed-Recipients: bounce+ffff@news.example.org\n"
            "Delivered-To: bounces@news.example.org\n"
            "X-Original-To: bounce+oooo@news.example.org\n"
            "To: Digest <bounce+tttt@news.example.org>\n"
            "Envelope-To: bounce+eeee@news.example.org\n")
    assert parse_bounce(dsn(head=head))[0].verp_token == "oooo"
    head = "To: Digest <bounce+tttt@news.example.org>\nEnvelope-To: bounce+eeee@example.org\n"
    assert parse_bounce(dsn(head=head))[0].verp_token == "tttt"
    assert parse_bounce(dsn(head="Envelope-To: bounce+eeee@example.org\n"))[0].verp_token \
        == "eeee"
    # Return-Path and X-Failed-Recipients name the other side: never a token source.
    head = ("Return-Path: <bounce+rrrr@news.example.org>\n"
            "X-Failed-Recipients: bounce+ffff@news.example.org\n")
    assert parse_bounce(dsn(head=head))[0].verp_token is None
    head = "To: news@example.org\n"
    assert parse_bounce(dsn(head=head), local_prefix="news")[0].verp_token is None
    head = "To: news+abc@example.org\n"
    assert parse_bounce(dsn(head=head), local_prefix="news")[0].verp_token == "abc"


# --- rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "status", "diagnostic", "kind", "code"), [
    ("failed", "5.1.1", "smtp; 550 5.1.1 user unknown", "hard", "5.1.1"),
    ("failed", "4.2.2", "smtp; 452 4.2.2 mailbox full", "soft", "4.2.2"),
    ("failed", "5.2.2 (mailbox full)", None, "hard", "5.2.2"),
    ("failed", None, "smtp; 452 try later", "soft", ""),
    ("failed", None, "smtp; 554 rejected", "hard", ""),
    ("failed", None, "X-Postfix; host not found", "hard", ""),
    ("failed", None, None, "hard", ""),
    ("failed", "garbage", "smtp;421 busy", "soft", ""),
    ("Failed (permanent)", "5.0.0", None, "hard", "5.0.0"),
    ("delayed", "4.4.7", None, "soft", "4.4.7"),
    ("DELAYED", "5.0.0", None, "soft", "5.0.0"),
])
def test_kind(action: str, status: str | None, diagnostic: str | None, kind: str,
              code: str) -> None:
    [b] = parse_bounce(dsn(action=action, status=status, diagnostic=diagnostic))
    assert (b.kind, b.status, b.action) == (kind, code, action.split()[0].lower())
    assert b.recipient == "someone@example.com"


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded", "", "bogus"])
def test_other_actions_are_not_bounces(action: str) -> None:
    assert parse_bounce(dsn(action=action, status="2.0.0")) == []


def test_diagnostic_is_one_line_and_bounded() -> None:
    long = "smtp; 550 5.1.1 " + "very long reason " * 60
    [b] = parse_bounce(dsn(diagnostic=long.strip()))
    assert len(b.diagnostic) == 500 and "\n" not in b.diagnostic
    assert b.diagnostic.startswith("smtp; 550 5.1.1 very long reason very")


def test_message_id_sources() -> None:
    headers = ("\n--B\nContent-Type: text/rfc822-headers\n\n"
               "From: digest@example.org\nMessage-ID: <nl.5.6.abcd1@example.org>\n")
    b = parse_bounce(dsn(third=headers, head="In-Reply-To: <other@example.org>\n"))[0]
    assert (b.message_id, b.campaign_id, b.subscriber_id) == ("<nl.5.6.abcd1@example.org>", 5, 6)
    # No returned headers: In-Reply-To, then the last of References.
    b = parse_bounce(dsn(head="In-Reply-To: <nl.8.9.ff1@example.org>\n"))[0]
    assert (b.message_id, b.campaign_id, b.subscriber_id) == ("<nl.8.9.ff1@example.org>", 8, 9)
    b = parse_bounce(dsn(head="References: <a@example.org>\n <nl.1.2.3@example.org>\n"))[0]
    assert (b.campaign_id, b.subscriber_id) == (1, 2)
    # Not one of ours: kept, but no ids.
    b = parse_bounce(dsn(head="In-Reply-To: <12345.nl.1.2@example.org>\n"))[0]
    assert (b.message_id, b.campaign_id, b.subscriber_id) == ("<12345.nl.1.2@example.org>",
                                                              None, None)
    b = parse_bounce(dsn())[0]
    assert (b.message_id, b.campaign_id, b.subscriber_id) == (None, None, None)
    # Absurdly long numbers are not ids (and must not make int() raise).
    huge = "9" * 5000
    b = parse_bounce(dsn(head=f"In-Reply-To: <nl.{huge}.{huge}.1@example.org>\n"))[0]
    assert (b.campaign_id, b.subscriber_id) == (None, None)


def test_missing_or_extra_blank_lines_in_the_report() -> None:
    """One recipient block split by a stray blank line, two blocks run together."""
    raw = (b"From: MAILER-DAEMON@mx.example.com\nSubject: failure\nMIME-Version: 1.0\n"
           b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
           b"--B\nContent-Type: message/delivery-status\n\n"
           b"Reporting-MTA: dns; mx.example.com\n"
           b"Final-Recipient: rfc822; one@example.com\nAction: failed\n\n\n"
           b"Status: 5.1.1\n\n"
           b"Final-Recipient: rfc822; two@example.com\nAction: delayed\nStatus: 4.4.1\n"
           b"Final-Recipient: rfc822; three@example.com\nAction: failed\nStatus: 5.2.1\n"
           b"--B--\n")
    got = [(b.recipient, b.action, b.status, b.kind) for b in parse_bounce(raw)]
    assert got == [("one@example.com", "failed", "5.1.1", "hard"),
                   ("two@example.com", "delayed", "4.4.1", "soft"),
                   ("three@example.com", "failed", "5.2.1", "hard")]


def test_repeated_fields_and_unindented_url() -> None:
    raw = (b"From: MAILER-DAEMON@mx.example.com\nSubject: failure\nMIME-Version: 1.0\n"
           b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
           b"--B\nContent-Type: message/delivery-status\n\n"
           b"Reporting-MTA: dns; mx.example.com\n\n"
           b"Final-Recipient: rfc822; one@example.com\nAction: failed\n"
           b"Remote-MTA: dns; a.example.com\nRemote-MTA: dns; b.example.com\n"
           b"Status: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 no such user, see\n"
           b"https://help.example.com/bounce?code=550\n--B--\n")
    [b] = parse_bounce(raw)
    assert (b.recipient, b.status) == ("one@example.com", "5.1.1")
    assert b.diagnostic == ("smtp; 550 5.1.1 no such user, see "
                            "https://help.example.com/bounce?code=550")


def test_global_delivery_status() -> None:
    """RFC 6533 (SMTPUTF8): message/global-delivery-status, UTF-8 addresses."""
    raw = ("From: MAILER-DAEMON@mx.example.com\nTo: bounce+abc@example.org\n"
           "Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
           'Content-Type: multipart/report; report-type=global-delivery-status; boundary="B"\n\n'
           "--B\nContent-Type: message/global-delivery-status\n\n"
           "Reporting-MTA: dns; mx.example.com\n\n"
           "Final-Recipient: utf-8; jürgen@example.com\nAction: failed\nStatus: 5.1.1\n"
           "\n--B\nContent-Type: message/global-headers\n\n"
           "Message-ID: <nl.4.44.aa1@example.org>\n\n--B--\n").encode()
    [b] = parse_bounce(raw)
    assert (b.recipient, b.kind, b.verp_token, b.campaign_id) == (
        "jürgen@example.com", "hard", "abc", 4)


# --- not bounces ------------------------------------------------------------------------------


def plain(frm: str, subject: str, body: str, extra: str = "") -> bytes:
    return (f"From: {frm}\nTo: bounce+abc@example.org\nSubject: {subject}\n{extra}\n{body}"
            ).encode()


FAILURE_BODY = ("I'm afraid I wasn't able to deliver your message to the following addresses.\n"
                "<victor@example.com>:\nRemote host said: 550 5.1.1 user unknown\n")


def test_plain_bounce_needs_daemon_and_subject_or_header() -> None:
    assert parse_bounce(plain("MAILER-DAEMON@mx.example.com", "failure notice", FAILURE_BODY))
    assert parse_bounce(plain("Postmaster <postmaster@example.com>", "Hello", FAILURE_BODY,
                              "X-Failed-Recipients: victor@example.com\n"))
    # A person, even with the right subject and header.
    assert parse_bounce(plain("Victor <victor@example.com>", "failure notice", FAILURE_BODY,
                              "X-Failed-Recipients: victor@example.com\n")) == []
    # A daemon, but nothing says the message failed.
    assert parse_bounce(plain("MAILER-DAEMON@mx.example.com", "Your mailbox", FAILURE_BODY)) == []
    # A daemon's auto-reply.
    for subject in ("Out of Office: failure notice", "Automatic reply: Undeliverable: x",
                    "Auto: Mail delivery failed"):
        assert parse_bounce(plain("postmaster@example.com", subject, FAILURE_BODY)) == []
    assert parse_bounce(plain("postmaster@example.com", "failure notice", FAILURE_BODY,
                              "X-Autoreply: yes\n")) == []
    assert parse_bounce(plain("postmaster@example.com", "failure notice", FAILURE_BODY,
                              "Precedence: auto_reply\n")) == []


def test_plain_bounce_best_effort() -> None:
    [b] = parse_bounce(plain("MAILER-DAEMON@mx.example.com", "Mail delivery failed",
                             "Delivery to the following recipient failed:\n\n"
                             "  wendy@example.com\n\nMailbox temporarily full (4.2.2)\n"))
    assert (b.recipient, b.status, b.kind, b.action) == ("wendy@example.com", "4.2.2", "soft",
                                                         "failed")
    # No address, no code: still a hard bounce; the VERP token says whose.
    [b] = parse_bounce(plain("MAILER-DAEMON@mx.example.com", "Undeliverable: issue 3",
                             "Your message could not be delivered.\n"))
    assert (b.recipient, b.status, b.kind, b.verp_token) == (None, "", "hard", "abc")
    assert b.diagnostic == "Your message could not be delivered."
    # IP addresses and versions are not status codes.
    [b] = parse_bounce(plain("MAILER-DAEMON@mx.example.com", "failure notice",
                             "Delivery failed for <x@example.com> at 10.5.100.5 (v4.2.10).\n"))
    assert (b.status, b.kind) == ("", "hard")


def test_forwarded_bounce_is_not_a_bounce() -> None:
    """A reader forwards a bounce they got elsewhere: its report is inside message/rfc822."""
    inner = sample("postfix_user_unknown.eml").decode()
    raw = ("From: Yolanda <yolanda@example.com>\nTo: bounce+abc@example.org\n"
           "Subject: Fwd: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
           'Content-Type: multipart/mixed; boundary="F"\n\n'
           "--F\nContent-Type: text/plain\n\nSee below.\n"
           "--F\nContent-Type: message/rfc822\n\n" + inner + "\n--F--\n").encode()
    assert parse_bounce(raw) == []


# --- robustness -------------------------------------------------------------------------------


@pytest.fixture
def no_warnings(caplog: pytest.LogCaptureFixture) -> Any:
    """The last-resort except in parse_bounce logs: any record means a parser bug."""
    with caplog.at_level(logging.WARNING, logger="newsletter.delivery.bounces"):
        yield
    assert caplog.records == []


def check(raw: bytes) -> list[Bounce]:
    result = parse_bounce(raw)
    assert isinstance(result, list) and all(isinstance(b, Bounce) for b in result)
    return result


def test_random_bytes(no_warnings: None) -> None:
    rng = random.Random(3464)
    for _ in range(300):
        check(rng.randbytes(rng.randrange(0, 3000)))
    # Random bytes shaped like mail: header names, MIME words, blank lines.
    words = [b"From: ", b"MAILER-DAEMON@x", b"Content-Type: ", b"multipart/report",
             b"; boundary=", b"\"B\"", b"--B", b"message/delivery-status", b"\n", b"\r\n",
             b"\n\n", b"Action: failed", b"Status: 5.1.1", b"Final-Recipient: rfc822;",
             b"text/rfc822-headers", b"Message-ID: <nl.1.2.", b"=?utf-8?q?=FF?=", b"\xff\xfe",
             b"Content-Transfer-Encoding: base64", b"Subject: failure notice", b":", b" "]
    for _ in range(500):
        check(b"".join(rng.choice(words) for _ in range(rng.randrange(1, 80))))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_truncated_and_damaged(path: Path, no_warnings: None) -> None:
    raw = path.read_bytes()
    for cut in range(0, len(raw), 23):
        check(raw[:cut])
    rng = random.Random(path.name)
    for _ in range(60):
        damaged = bytearray(raw)
        for _ in range(rng.randrange(1, 20)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        check(bytes(damaged))
    # Non-UTF-8 throughout: Latin-1 and CRLF line endings must not change the result.
    assert check(raw.replace(b"\n", b"\r\n")) == parse_bounce(raw)


@pytest.mark.parametrize("raw", [
    b"",
    b"\n\n\n",
    b"From: MAILER-DAEMON@x\n",
    b"Content-Type: multipart/report; boundary=\n\n--\n--\n",
    b"Content-Type: message/delivery-status\n\nAction: failed\nStatus: 5.1.1\n",
    b"Content-Type: multipart/report; boundary=B\n\n--B\nContent-Type: message/delivery-status"
    b"\nContent-Transfer-Encoding: base64\n\n!!!not base64!!!\n--B--\n",
    b"Content-Type: multipart/report; boundary=B\n\n--B\nContent-Type: text/rfc822-headers;"
    b" charset=no-such-charset\nContent-Transfer-Encoding: quoted-printable\n\n=ZZ=\n--B--\n",
    b"From: =?no-such?q?x?= <postmaster@x>\nSubject: =?utf-8?b?!!!?=\n"
    b"X-Failed-Recipients: \xff@\xfe\n\nfailed \xff@example.com 5.1.1\n",
    b"Content-Type: multipart/mixed; boundary=A\n\n"
    + b"--A\nContent-Type: multipart/mixed; boundary=A\n\n" * 2000,
])
def test_malformed(raw: bytes, no_warnings: None) -> None:
    check(raw)


def test_pathological_input_stays_fast(no_warnings: None) -> None:
    """Shapes that make naive regexes or string building quadratic."""
    head = b"From: MAILER-DAEMON@x.example.com\nSubject: failure notice\n"
    dsn_head = (head + b'Content-Type: multipart/report; boundary="B"\n\n--B\n'
                b"Content-Type: message/delivery-status\n\n"
                b"Final-Recipient: rfc822; a@example.com\nAction: failed\nStatus: 5.1.1\n")
    cases = [
        head + b"\nDelivery failed:\n" + b"a" * 2_000_000 + b"\n",
        head + b"\nDelivery failed:\n" + (b"a" * 900 + b"\n") * 2000,
        head + b"X-Failed-Recipients: " + b", ".join(b"u%d@example.com" % i
                                                   for i in range(20000)) + b"\n\nfailed\n",
        dsn_head + b"Diagnostic-Code: smtp; 550\n" + b" folded\n" * 200_000 + b"--B--\n",
        dsn_head + b"X-A: b\n\n" * 20_000 + b"--B--\n",
        head + b"Content-Type: text/html\n\n<p>Delivery failed</p>" + b"<" * 1_000_000,
    ]
    for raw in cases:
        started = time.perf_counter()
        check(raw)
        assert time.perf_counter() - started < 10


def test_bare_delivery_status_message() -> None:
    """A message that is itself message/delivery-status (no multipart/report around it)."""
    raw = (b"From: MAILER-DAEMON@x.example.com\nContent-Type: message/delivery-status\n\n"
           b"Reporting-MTA: dns; x.example.com\n\n"
           b"Final-Recipient: rfc822; zoe@example.com\nAction: failed\nStatus: 5.1.1\n")
    [b] = parse_bounce(raw)
    assert (b.recipient, b.kind) == ("zoe@example.com", "hard")


# --- SMTP receiver ----------------------------------------------------------------------------


async def send_null_sender(port: int, raw: bytes, rcpt: str) -> None:
    """MAIL FROM:<> as a real MTA sends bounces (aiosmtplib.send() insists on a sender)."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as client:
        await client.sendmail("", [rcpt], raw)


def test_server_receives_bounce(tmp_path: Path) -> None:
    got: list[tuple[list[Bounce], bytes]] = []

    async def scenario() -> int:
        async with BounceServer(lambda b, raw: got.append((b, raw)),
                                keep_dir=tmp_path / "kept") as server:
            assert server.port != 0
            await send_null_sender(server.port, sample("postfix_user_unknown.eml"),
                                   "bounce+abc234@example.org")
            await send_null_sender(server.port, sample("out_of_office.eml"),
                                   "bounce+abc234@example.org")
            return server.received

    assert asyncio.run(scenario()) == 2
    [(bounces, raw), (none, _)] = got
    assert none == []
    [b] = bounces
    # The envelope recipient names the token, not the message's own To: header.
    assert (b.verp_token, b.recipient, b.kind, b.campaign_id) == (
        "abc234", "alice@example.com", "hard", 42)
    assert raw.startswith(b"Return-Path: <>\r\nDelivered-To: bounce+abc234@example.org\r\n")
    # Kept, and marked seen because the handler took them.
    kept = tmp_path / "kept"
    assert list((kept / "new").iterdir()) == []
    assert len([p for p in (kept / "cur").iterdir() if p.name.endswith(":2,S")]) == 2
    # The kept bytes carry the token by themselves.
    assert parse_bounce(raw)[0].verp_token == "abc234"


def test_server_handler_failure_answers_451(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    def broken(bounces: list[Bounce], raw: bytes) -> None:
        raise RuntimeError("database is locked")

    async def scenario() -> aiosmtplib.SMTPResponseException:
        async with BounceServer(broken, keep_dir=tmp_path / "kept") as server:
            with pytest.raises(aiosmtplib.SMTPResponseException) as info:
                await send_null_sender(server.port, sample("exim_failed.eml"),
                                       "bounce+abc234@example.org")
            return info.value

    with caplog.at_level(logging.ERROR, logger="newsletter.delivery.bounces"):
        error = asyncio.run(scenario())
    assert error.code == 451
    assert "database is locked" in caplog.text
    # Nothing lost: the message waits, unseen, for a scan.
    [kept] = list((tmp_path / "kept" / "new").iterdir())
    assert b"Delivered-To: bounce+abc234@example.org" in kept.read_bytes()
    recorded: list[Bounce] = []
    report = scan_maildir(tmp_path / "kept", lambda b, raw: recorded.extend(b))
    assert (report.messages, report.bounces, report.failed) == (1, 1, [])
    assert [(b.verp_token, b.recipient) for b in recorded] == [("abc234", "bob@example.com")]


def test_server_without_keep_dir_and_handler_failure() -> None:
    calls = 0

    def flaky(bounces: list[Bounce], raw: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk full")

    async def scenario() -> int:
        async with BounceServer(flaky, port=0) as server:
            with pytest.raises(aiosmtplib.SMTPResponseException) as info:
                await send_null_sender(server.port, sample("qmail_plain.eml"),
                                       "bounce+abc234@example.org")
            assert info.value.code == 451
            # The sending MTA retries: now it goes through.
            await send_null_sender(server.port, sample("qmail_plain.eml"),
                                   "bounce+abc234@example.org")
            return server.received

    assert asyncio.run(scenario()) == 1
    assert calls == 2


def test_server_stop_is_idempotent() -> None:
    async def scenario() -> None:
        server = BounceServer(lambda b, raw: None)
        await server.stop()
        await server.start()
        await server.stop()
        await server.stop()

    asyncio.run(scenario())


# --- Maildir scan -----------------------------------------------------------------------------


def make_maildir(path: Path) -> dict[str, str]:
    """Every sample in path/new; returns key -> sample name."""
    box = mailbox.Maildir(path, factory=None, create=True)
    return {box.add(p.read_bytes()): p.name for p in SAMPLES}


def test_scan_maildir(tmp_path: Path) -> None:
    keys = make_maildir(tmp_path / "bounces")
    got: dict[str, list[Bounce]] = {}

    def handler(bounces: list[Bounce], raw: bytes) -> None:
        name = next(n for n in EXPECTED if (DATA / n).read_bytes() == raw)
        got[name] = bounces

    report = scan_maildir(tmp_path / "bounces", handler)
    bouncing = sum(1 for v in EXPECTED.values() if v)
    assert report == ScanReport(messages=len(keys), bounces=bouncing,
                                not_bounces=len(keys) - bouncing, failed=[])
    assert {n: [facts(b) for b in bs] for n, bs in got.items()} == EXPECTED
    assert list((tmp_path / "bounces" / "new").iterdir()) == []
    box = mailbox.Maildir(tmp_path / "bounces", factory=None, create=False)
    for key in keys:
        msg = box.get_message(key)
        assert (msg.get_subdir(), msg.get_flags()) == ("cur", "S")
    # A second scan finds nothing new.
    again = scan_maildir(tmp_path / "bounces", handler)
    assert again == ScanReport(messages=0, bounces=0, not_bounces=0, failed=[])


def test_scan_maildir_handler_error_leaves_message_unseen(tmp_path: Path) -> None:
    keys = make_maildir(tmp_path / "bounces")
    bad_key = next(k for k, n in keys.items() if n == "gmail_style.eml")
    seen: list[str] = []

    def handler(bounces: list[Bounce], raw: bytes) -> None:
        if raw == sample("gmail_style.eml"):
            raise ValueError("no such delivery")
        seen.append(raw.decode("utf-8", "replace")[:20])

    report = scan_maildir(tmp_path / "bounces", handler)
    assert report.messages == len(keys)
    assert report.failed == [(bad_key, "ValueError: no such delivery")]
    assert report.bounces + report.not_bounces == len(keys) - 1
    assert len(seen) == len(keys) - 1
    assert [p.name for p in (tmp_path / "bounces" / "new").iterdir()] == [bad_key]

    # Fixed: the next scan hands over that one message only.
    handled: list[list[Bounce]] = []
    report = scan_maildir(tmp_path / "bounces", lambda b, raw: handled.append(b))
    assert (report.messages, report.bounces, report.failed) == (1, 1, [])
    assert handled[0][0].recipient == "carol@example.com"


def test_scan_maildir_cur_flags(tmp_path: Path) -> None:
    """cur/ messages count unless flagged S; their other flags are kept when marking."""
    path = tmp_path / "bounces"
    make_maildir(path)
    for p in (path / "new").iterdir():
        p.unlink()
    raw = sample("exim_failed.eml")
    (path / "cur" / "1.read.host:2,S").write_bytes(raw)
    (path / "cur" / "2.flagged.host:2,F").write_bytes(raw)
    (path / "cur" / "3.noinfo.host").write_bytes(raw)
    (path / "tmp" / "4.delivering.host").write_bytes(raw)  # not delivered yet: never read
    (path / "new" / ".hidden").write_bytes(raw)
    report = scan_maildir(path, lambda b, raw: None)
    assert (report.messages, report.bounces, report.failed) == (2, 2, [])
    assert sorted(p.name for p in (path / "cur").iterdir()) == [
        "1.read.host:2,S", "2.flagged.host:2,FS", "3.noinfo.host:2,S"]


def test_scan_maildir_missing(tmp_path: Path) -> None:
    with pytest.raises(NewsletterError, match="nowhere"):
        scan_maildir(tmp_path / "nowhere", lambda b, raw: None)
    (tmp_path / "flat").mkdir()
    with pytest.raises(NewsletterError, match="flat"):
        scan_maildir(tmp_path / "flat", lambda b, raw: None)
