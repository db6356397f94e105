"""DKIM signing of prepared messages, verified offline with dkimpy against our own TXT record.

The keys are made here in pure Python (no OpenSSL, no `cryptography`), once per module: a
2048-bit key in the PKCS#1 and PKCS#8 PEM forms (the second is what `openssl genrsa` writes
since OpenSSL 3) and a 1024-bit one that must be refused.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest
from dkim.canonicalization import Relaxed  # type: ignore[import-untyped]
from dkim.util import parse_tag_value  # type: ignore[import-untyped]

from newsletter.content.parse import load_issue
from newsletter.delivery.dkim import (
    DEFAULT_HEADERS,
    DkimSigner,
    relaxed_body,
    rsa_public_key_der,
    undot_wire,
)
from newsletter.delivery.relay import SmtpRelayClient
from newsletter.errors import ConfigError
from newsletter.headers import format_address
from newsletter.render.issue import RenderedIssue, render_issue
from newsletter.render.message import ListInfo, PreparedMessage, Recipient, undot
from newsletter.render.templates import make_environment
from newsletter.render.tokens import TokenSigner
from newsletter.settings import SmtpRelay

from .conftest import SAMPLE_MD
from .smtpd import SmtpTestServer

SELECTOR = "news2026"
DOMAIN = "example.org"
ANA = Recipient(subscriber_id=11, list_id=7, email="ana@example.com", name="Ana Example")
REQUIRED = {"from", "to", "subject", "date", "message-id", "list-id", "list-unsubscribe",
            "list-unsubscribe-post", "mime-version", "content-type"}
HAVE_NACL = importlib.util.find_spec("nacl") is not None


# --- keys, made without any crypto library ----------------------------------------------------

def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _int(v: int) -> bytes:
    return _der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))


RSA_ALGORITHM = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + b"\x05\x00")
SMALL_PRIMES = [p for p in range(3, 2000, 2) if all(p % d for d in range(3, int(p**0.5) + 1, 2))]


def _probably_prime(n: int, rng: random.Random) -> bool:
    if any(n % p == 0 for p in SMALL_PRIMES):
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(24):  # Miller-Rabin: a composite survives with odds below 4**-24
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, rng: random.Random, e: int) -> int:
    while True:
        # The two top bits set: the product of two such primes has exactly 2 * bits bits.
        c = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if (c - 1) % e and _probably_prime(c, rng):
            return c


def _pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""]).encode()


@dataclass(frozen=True)
class RsaKey:
    n: int
    e: int
    pkcs1: bytes  # PEM "RSA PRIVATE KEY"
    pkcs8: bytes  # PEM "PRIVATE KEY"
    public_pem: bytes

    @property
    def record(self) -> str:
        spki = _der(0x30, RSA_ALGORITHM + _der(0x03, b"\x00" + _der(0x30, _int(self.n)
                                                                    + _int(self.e))))
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


def make_rsa_key(bits: int, seed: int, *, break_crt: bool = False) -> RsaKey:
    rng = random.Random(seed)
    e = 65537
    p = _prime(bits // 2, rng, e)
    q = _prime(bits // 2, rng, e)
    while q == p:
        q = _prime(bits // 2, rng, e)
    d = pow(e, -1, (p - 1) * (q - 1))
    qinv = pow(q, -1, p) + (1 if break_crt else 0)
    pkcs1 = _der(0x30, b"".join(_int(v) for v in (0, p * q, e, d, p, q, d % (p - 1),
                                                   d % (q - 1), qinv)))
    pkcs8 = _der(0x30, _int(0) + RSA_ALGORITHM + _der(0x04, pkcs1))
    spki = _der(0x30, RSA_ALGORITHM + _der(0x03, b"\x00" + _der(0x30, _int(p * q) + _int(e))))
    return RsaKey(p * q, e, _pem("RSA PRIVATE KEY", pkcs1), _pem("PRIVATE KEY", pkcs8),
                  _pem("PUBLIC KEY", spki))


@pytest.fixture(scope="module")
def rsa_key() -> RsaKey:
    return make_rsa_key(2048, seed=2026)


@pytest.fixture(scope="module")
def signer(rsa_key: RsaKey) -> DkimSigner:
    return DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=rsa_key.pkcs8)


def dns(record: str, selector: str = SELECTOR, domain: str = DOMAIN
        ) -> Callable[..., bytes | None]:
    """A dnsfunc for dkim.verify that knows one TXT record and nothing else."""
    name = f"{selector}._domainkey.{domain}.".encode()

    def lookup(qname: bytes, timeout: float = 5) -> bytes | None:
        return record.encode() if qname == name else None

    return lookup


# --- messages ----------------------------------------------------------------------------------

def _prepared(rendered: RenderedIssue) -> PreparedMessage:
    list_id = format_address("Policy readers", "policy.example.org")
    return PreparedMessage(
        rendered, from_address=f"digest@{DOMAIN}", from_name="Policy Desk",
        base_url="https://news.example.org",
        unsubscribe_token=TokenSigner([b"k1"]).unsubscribe_token,
        lists={7: ListInfo("Policy readers", list_id)}, message_id_domain=DOMAIN, campaign_id=42,
    )


@pytest.fixture(scope="module")
def sample() -> PreparedMessage:
    rendered = render_issue(load_issue(SAMPLE_MD), make_environment(), brand_name="Policy Desk",
                            postal_address="1 Example Street, Example City")
    return _prepared(rendered)


def tags(header: bytes) -> dict[str, str]:
    name, _, value = header.partition(b":")
    assert name == b"DKIM-Signature"
    unfolded = re.sub(rb"\r\n[ \t]", b" ", value)
    return {k.decode(): v.decode() for k, v in parse_tag_value(unfolded).items()}


# --- signing and verifying ---------------------------------------------------------------------

def test_signed_sample_issue_verifies(sample: PreparedMessage, signer: DkimSigner,
                                      rsa_key: RsaKey) -> None:
    raw = sample.build(ANA)
    before = int(time.time())
    header = signer.sign(raw)
    # A header block ready to go in front of the wire bytes: CRLF, 7-bit, folded, no dot.
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    assert all(ln[:1] in (b" ", b"\t") for ln in lines[1:])
    assert max(len(ln) for ln in lines) <= 78
    assert all(b < 128 for b in header) and b"\n" not in header.replace(b"\r\n", b"")
    assert not any(ln.startswith(b".") for ln in lines)

    t = tags(header)
    assert t["v"] == "1" and t["a"] == "rsa-sha256" and t["c"] == "relaxed/relaxed"
    assert t["d"] == DOMAIN and t["s"] == SELECTOR
    assert before <= int(t["t"]) <= int(time.time())
    signed = {h.strip() for h in t["h"].split(":")}
    assert signed >= REQUIRED
    assert signed == set(DEFAULT_HEADERS)
    # What the receiver stores: our header, then the message with the dot-stuffing undone.
    assert dkim.verify(header + undot(raw), dnsfunc=dns(rsa_key.record)) is True


def test_signature_matches_what_dkimpy_signs(sample: PreparedMessage, signer: DkimSigner,
                                             rsa_key: RsaKey) -> None:
    """Our shortcuts (key parsed once, own body canonicalization) change no byte of b= or bh=."""
    stored = undot(sample.build(ANA))
    ours = signer.sign(stored)
    theirs = dkim.sign(stored, SELECTOR.encode(), DOMAIN.encode(), rsa_key.pkcs8,
                       canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=[h.encode() for h in DEFAULT_HEADERS])
    ours_t, theirs_t = tags(ours), tags(theirs)
    if ours_t["t"] != theirs_t["t"]:  # a second ticked over between the two: sign again
        ours_t = tags(signer.sign(stored))
    assert ours_t == theirs_t


@pytest.mark.parametrize("change", ["unsubscribe-post", "drop-unsubscribe-post", "subject",
                                    "body", "list-unsubscribe"])
def test_changes_after_signing_break_the_signature(sample: PreparedMessage, signer: DkimSigner,
                                                   rsa_key: RsaKey, change: str) -> None:
    stored = undot(sample.build(ANA))
    header = signer.sign(stored)
    lookup = dns(rsa_key.record)
    assert dkim.verify(header + stored, dnsfunc=lookup) is True
    post = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    assert post in stored
    if change == "unsubscribe-post":
        altered = stored.replace(post, b"List-Unsubscribe-Post: List-Unsubscribe=Two-Clicks\r\n")
    elif change == "drop-unsubscribe-post":
        altered = stored.replace(post, b"")
    elif change == "subject":
        altered = re.sub(rb"(?m)^Subject: [^\r]*", b"Subject: You have won", stored, count=1)
    elif change == "list-unsubscribe":
        altered = stored.replace(b"List-Unsubscribe: <https://news.example.org/",
                                 b"List-Unsubscribe: <https://evil.example.net/")
    else:
        head, sep, body = stored.partition(b"\r\n\r\n")
        altered = head + sep + body.replace(b"Unsubscribe", b"Unsubscrlbe", 1)
    assert altered != stored
    assert dkim.verify(header + altered, dnsfunc=lookup) is False


def test_a_dot_stuffed_line_verifies_once_unstuffed(signer: DkimSigner, rsa_key: RsaKey) -> None:
    text = (".leading dot, stuffed on the wire\n..two dots\nplain line\n\n"
            "Unsubscribe: NLSLOTunsubscribe_urlNLSLOT\n")
    html = "<p>.x</p>\n.dotted html line\n<p><a href=\"NLSLOTunsubscribe_urlNLSLOT\">bye</a></p>\n"
    raw = _prepared(RenderedIssue("Dots", html, text, "en")).build(ANA)
    assert b"\r\n..leading dot" in raw and b"\r\n...two dots" in raw  # the wire form
    header = signer.sign(raw)
    stored = undot(raw)
    assert b"\r\n.leading dot" in stored and b"\r\n..two dots" in stored
    lookup = dns(rsa_key.record)
    assert dkim.verify(header + stored, dnsfunc=lookup) is True
    # Signed over the stored form, not the wire form: the stuffed bytes do not verify.
    assert dkim.verify(header + raw, dnsfunc=lookup) is False
    assert signer.sign(stored) != b""  # an already clean message is signed as it is


def test_signed_message_verifies_after_real_smtp(sample: PreparedMessage, signer: DkimSigner,
                                                 rsa_key: RsaKey,
                                                 smtpd: SmtpTestServer) -> None:
    raw = sample.build(ANA)
    assert b"\r\n.." in raw  # the sample does have stuffed lines: SMTP undoes them
    wire = signer.sign(raw) + raw

    async def send() -> None:
        client = SmtpRelayClient(SmtpRelay(host=smtpd.host, port=smtpd.port, start_tls=False),
                                 timeout=10)
        conn = await client.connect()
        try:
            await conn.send(f"bounce@{DOMAIN}", ANA.email, wire)
        finally:
            await conn.close()

    asyncio.run(send())
    [received] = smtpd.messages
    assert received.rcpt_tos == [ANA.email]
    assert received.data.startswith(b"DKIM-Signature: ")
    assert dkim.verify(received.data, dnsfunc=dns(rsa_key.record)) is True


# --- keys and settings -------------------------------------------------------------------------

def test_pkcs1_and_pkcs8_give_the_same_key_and_record(rsa_key: RsaKey,
                                                      signer: DkimSigner) -> None:
    other = DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=rsa_key.pkcs1)
    assert signer.dns_record() == other.dns_record() == rsa_key.record
    assert signer.dns_name() == f"{SELECTOR}._domainkey.{DOMAIN}"
    assert rsa_public_key_der(rsa_key.n, rsa_key.e) == base64.b64decode(
        rsa_key.record.partition("p=")[2])
    assert signer.algorithm == b"rsa-sha256"


def test_from_file_reads_a_key(tmp_path: Path, rsa_key: RsaKey) -> None:
    path = tmp_path / "dkim.key"
    path.write_bytes(rsa_key.pkcs8.replace(b"\n", b"\r\n"))  # CRLF files are fine too
    s = DkimSigner.from_file(path, selector=SELECTOR, domain=DOMAIN)
    assert s.dns_record() == rsa_key.record


def test_a_1024_bit_key_is_refused(tmp_path: Path) -> None:
    small = make_rsa_key(1024, seed=7)
    with pytest.raises(ConfigError, match="1024 bits; at least 2048") as err:
        DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=small.pkcs8)
    assert err.value.key == "dkim_key_file"
    path = tmp_path / "small.key"
    path.write_bytes(small.pkcs1)
    with pytest.raises(ConfigError, match=r"small\.key: the RSA key has 1024 bits"):
        DkimSigner.from_file(path, selector=SELECTOR, domain=DOMAIN)


def test_key_file_errors_are_clear(tmp_path: Path, rsa_key: RsaKey) -> None:
    def refused(path: Path) -> str:
        with pytest.raises(ConfigError) as err:
            DkimSigner.from_file(path, selector=SELECTOR, domain=DOMAIN)
        assert err.value.key == "dkim_key_file"
        assert str(path) in str(err.value)
        return str(err.value)

    assert "no such file" in refused(tmp_path / "missing.key")
    assert "is a directory" in refused(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("this is not a key\n")
    assert "not a private key" in refused(text)
    public = tmp_path / "public.pem"
    public.write_bytes(rsa_key.public_pem)
    assert "PUBLIC KEY, not a private key" in refused(public)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(_pem("ENCRYPTED PRIVATE KEY", b"\x30\x00"))
    assert "passphrase" in refused(encrypted)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(_pem("PRIVATE KEY", b"\x30\x03\x02\x01\x00"))
    assert "not an RSA or Ed25519 private key" in refused(garbage)


def test_a_damaged_key_fails_the_self_test(rsa_key: RsaKey) -> None:
    broken = make_rsa_key(2048, seed=2026, break_crt=True)  # same key, wrong CRT coefficient
    assert broken.n == rsa_key.n
    with pytest.raises(ConfigError, match="did not verify"):
        DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=broken.pkcs1)


@pytest.mark.parametrize(("selector", "domain", "key", "problem"), [
    ("news\r\nBcc: x@example.net", DOMAIN, "dkim_selector", "line break"),
    ("news\n", DOMAIN, "dkim_selector", "line break"),
    ("", DOMAIN, "dkim_selector", "empty"),
    ("news 1", DOMAIN, "dkim_selector", "not a plain ASCII DNS name"),
    ("news;x=1", DOMAIN, "dkim_selector", "not a plain ASCII DNS name"),
    ("sélecteur", DOMAIN, "dkim_selector", "not a plain ASCII DNS name"),
    (SELECTOR, "example.org\r\n", "dkim_domain", "line break"),
    (SELECTOR, "-example.org", "dkim_domain", "not a plain ASCII DNS name"),
    (SELECTOR, "example..org", "dkim_domain", "not a plain ASCII DNS name"),
    ("a" * 63 + "." + "b" * 63, "c" * 63 + "." + "d" * 60, "dkim_selector", "253"),
])
def test_bad_selector_or_domain_is_refused(rsa_key: RsaKey, selector: str, domain: str,
                                           key: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        DkimSigner(selector=selector, domain=domain, private_key=rsa_key.pkcs8)
    assert err.value.key == key


def test_selector_may_have_dots_and_domain_hyphens(rsa_key: RsaKey) -> None:
    s = DkimSigner(selector="2026.nl", domain="mail-out.example.co.uk",
                   private_key=rsa_key.pkcs8)
    assert s.dns_name() == "2026.nl._domainkey.mail-out.example.co.uk"


def test_headers_list(rsa_key: RsaKey, sample: PreparedMessage) -> None:
    # Names are lowercased; a name given twice signs the field "one more time than it occurs",
    # so a second one added in transit breaks the signature (over-signing).
    s = DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=rsa_key.pkcs8,
                   headers=["From", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post",
                            "List-Unsubscribe-Post"])
    assert s.headers == ("from", "subject", "list-unsubscribe", "list-unsubscribe-post",
                         "list-unsubscribe-post")
    stored = undot(sample.build(ANA))
    header = s.sign(stored)
    lookup = dns(rsa_key.record)
    assert dkim.verify(header + stored, dnsfunc=lookup) is True
    extra = b"List-Unsubscribe-Post: List-Unsubscribe=Two-Clicks\r\n"
    assert dkim.verify(header + extra + stored, dnsfunc=lookup) is False
    with pytest.raises(ValueError, match="From header field must be signed"):
        DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=rsa_key.pkcs8,
                   headers=["subject"])
    with pytest.raises(ValueError, match="received"):
        DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=rsa_key.pkcs8,
                   headers=["from", "Received"])
    with pytest.raises(ValueError, match="not a header field name"):
        DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=rsa_key.pkcs8,
                   headers=["from", "x-a:b"])


def test_ed25519_keys(tmp_path: Path, sample: PreparedMessage) -> None:
    """Ed25519 (RFC 8463) works where dkimpy can do it, i.e. with PyNaCl; else a clear error."""
    seed = bytes(range(32))
    dknewkey_form = base64.b64encode(seed)  # what `dknewkey --ktype ed25519` writes
    pkcs8 = _pem("PRIVATE KEY", bytes.fromhex("302e020100300506032b657004220420") + seed)
    for data in (dknewkey_form, pkcs8):
        if not HAVE_NACL:
            with pytest.raises(ConfigError, match="PyNaCl"):
                DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=data)
            continue
        s = DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=data)
        assert s.algorithm == b"ed25519-sha256"
        assert s.dns_record().startswith("v=DKIM1; k=ed25519; p=")
        raw = sample.build(ANA)
        header = s.sign(raw)
        assert tags(header)["a"] == "ed25519-sha256"
        assert dkim.verify(header + undot(raw), dnsfunc=dns(s.dns_record())) is True


# --- the shortcuts equal what they replace -----------------------------------------------------

def test_relaxed_body_equals_dkimpy() -> None:
    rng = random.Random(5)
    pieces = [b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b".", b"=20", b"\r\n\r\n", b" \t "]
    bodies = [b"", b"\r\n", b"\r\n\r\n", b" ", b"a ", b"a  ", b" \r\n", b"\t\r\n \r\n",
              b"a\r\n \r\n\r\n", b"  a\r\n"]
    bodies += [b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
               for _ in range(3000)]
    for body in bodies:
        assert relaxed_body(body) == Relaxed.canonicalize_body(body), body


def test_undot_wire_equals_undot() -> None:
    rng = random.Random(6)
    pieces = [b".", b"..", b"\r\n", b"\n", b"x", b"\r\n.."]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 30)))
        assert undot_wire(data) == undot(data), data


def test_a_message_without_a_body_separator_is_refused(signer: DkimSigner) -> None:
    with pytest.raises(ValueError, match="empty line"):
        signer.sign(b"From: a@example.org\r\nSubject: x\r\n")
