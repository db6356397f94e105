"""SMTP connections to one relay, with failures classified where they arise.

A connection is reused for many messages. `send()` raises:
  RelayError              connecting, TLS, login or MAIL FROM failed: the relay's fault
  TemporaryDeliveryError  4xx for this recipient, or the link dropped before the message was
                          fully handed over: safe to send again later
  PermanentDeliveryError  5xx for this recipient or this message
  UnknownOutcomeError     the whole message went out but no reply came: it may be delivered
"""

from __future__ import annotations

import ssl
from typing import Protocol

import aiosmtplib
from aiosmtplib import (
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from ..errors import (
    PermanentDeliveryError,
    RelayError,
    TemporaryDeliveryError,
    UnknownOutcomeError,
)
from ..settings import SmtpRelay


class Connection(Protocol):
    """One open session with a relay."""

    async def send(self, sender: str, recipient: str, data: bytes) -> None:
        """Deliver prepared bytes (CRLF, dot-stuffed, without the final '.')."""
        ...

    @property
    def alive(self) -> bool:
        """False once the relay or we closed the session; the engine then opens a new one."""
        ...

    async def close(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection at once, without QUIT (when a run is being cancelled)."""
        ...


class Relay(Protocol):
    """Somewhere mail can be handed over; opens connections on demand."""

    def describe(self) -> str: ...

    async def connect(self) -> Connection: ...


def classify(code: int, message: str, *, stage: str) -> TemporaryDeliveryError | \
        PermanentDeliveryError:
    """A reply code as the right kind of failure; `stage` says which command it answered."""
    text = f"{message.strip()} (at {stage})"
    if 500 <= code < 600:
        return PermanentDeliveryError(text, code=code)
    return TemporaryDeliveryError(text, code=code)


class SmtpRelayClient:
    """A relay reached with aiosmtplib."""

    def __init__(self, relay: SmtpRelay, *, timeout: float = 60.0, hostname: str | None = None,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.relay = relay
        self.timeout = timeout
        self.hostname = hostname
        self.tls_context = tls_context

    def describe(self) -> str:
        return self.relay.describe()

    async def connect(self) -> SmtpConnection:
        r = self.relay
        smtp = aiosmtplib.SMTP(
            hostname=r.host, port=r.port, use_tls=r.use_tls, start_tls=r.start_tls,
            validate_certs=r.validate_certs, timeout=self.timeout, local_hostname=self.hostname,
            username=r.username, password=r.password.get_secret_value() if r.password else None,
            tls_context=self.tls_context,
        )
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:  # connect() greets only for STARTTLS or login
                await smtp.ehlo()
        except SMTPResponseException as exc:
            raise RelayError(f"relay {r.describe()} refused the session: {exc.message}",
                             code=exc.code) from None
        except (SMTPException, OSError, ssl.SSLError) as exc:
            raise RelayError(f"cannot connect to {r.describe()}: {exc}") from None
        return SmtpConnection(smtp, timeout=self.timeout)


class SmtpConnection:
    """One aiosmtplib session; sends one message at a time."""

    def __init__(self, smtp: aiosmtplib.SMTP, *, timeout: float) -> None:
        self.smtp = smtp
        self.timeout = timeout

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    async def send(self, sender: str, recipient: str, data: bytes) -> None:
        smtp = self.smtp
        if not smtp.is_connected:
            raise TemporaryDeliveryError("connection is closed")
        try:
            # MAIL and RCPT through execute_command: smtp.mail()/rcpt() would parse both
            # addresses again for every message (~7% of a send's CPU), and ours are validated
            # ASCII addresses already; execute_command still refuses CR/LF in arguments.
            reply = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode("ascii") + b">")
            if reply.code != 250:
                await self._reset()
                raise RelayError(f"sender {sender} refused: {reply.message}", code=reply.code)
            reply = await smtp.execute_command(b"RCPT",
                                               b"TO:<" + recipient.encode("ascii") + b">")
            if reply.code not in (250, 251):
                await self._reset()
                raise classify(reply.code, reply.message, stage="RCPT")
            reply = await smtp.execute_command(b"DATA")
            if reply.code != 354:
                await self._reset()
                raise classify(reply.code, reply.message, stage="DATA")
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            await self.close()
            raise TemporaryDeliveryError(f"connection lost before the message was sent: {exc}") \
                from None
        # The prepared bytes are already CRLF-only and dot-stuffed, so they are written as they
        # are: aiosmtplib's data() would run two regular expressions over the whole message
        # again, half of its per-message CPU (PERFORMANCE.md, lesson 2).
        protocol = smtp.protocol
        if protocol is None:
            raise TemporaryDeliveryError("connection lost before the message was sent")
        try:
            # One write for body and terminator: one system call instead of two.
            protocol.write(data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"))
            reply = await protocol.read_response(timeout=self.timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
            # Everything was handed over; the relay may have queued it before the link broke.
            await self.close()
            raise UnknownOutcomeError(f"no reply after the message was sent: {exc}") from None
        if reply.code != 250:
            if reply.code == 421:
                await self.close()
            raise classify(reply.code, reply.message, stage="end of DATA")

    async def _reset(self) -> None:
        """Clear the transaction after a refusal so the connection can be reused."""
        try:
            await self.smtp.rset()
        except (SMTPException, OSError):
            await self.close()

    def abort(self) -> None:
        self.smtp.close()

    async def close(self) -> None:
        if self.smtp.is_connected:
            try:
                await self.smtp.quit(timeout=5)
            except (SMTPException, OSError):
                self.smtp.close()
