"""The built-in capture server: real SMTP on loopback into a Maildir, so nothing leaves.

Used when SMTP_URL is unset (demo, previews, first steps). The sender talks to it exactly as
to a real relay, so what lands in var/outbox/ is what a relay would have received.
"""

from __future__ import annotations

import asyncio
import mailbox
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from ..settings import SmtpRelay


def trace_headers(mail_from: str | None, rcpt_tos: Sequence[str]) -> bytes:
    """Return-Path and Delivered-To, as a local delivery agent adds them to stored mail.
    aiosmtpd gives the null sender of a bounce as "<>", other senders without brackets."""
    sender = (mail_from or "").strip().removeprefix("<").removesuffix(">")
    rcpts = ", ".join(rcpt_tos)
    return f"Return-Path: <{sender}>\r\nDelivered-To: {rcpts}\r\n".encode("utf-8", "replace")


def open_maildir(path: Path) -> mailbox.Maildir:
    """A Maildir at path, created with its tmp/, new/ and cur/ if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    maildir = mailbox.Maildir(path, factory=None, create=True)
    for sub in ("tmp", "new", "cur"):  # create=True skips these if the folder exists
        (path / sub).mkdir(exist_ok=True)
    return maildir


class SmtpListener:
    """An aiosmtpd server in the running event loop on host:port (port 0: chosen by the
    OS, and known after start); subclasses say what handles the mail."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def _listen(self, handler: object, *, hostname: str, size_limit: int,
                      ident: str) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> Any:
            return SMTPServer(handler, hostname=hostname, decode_data=False,
                              data_size_limit=size_limit, enable_SMTPUTF8=True, ident=ident)

        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


class _MaildirHandler:
    def __init__(self, outbox: mailbox.Maildir) -> None:
        self.outbox = outbox
        self.received = 0

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.outbox.add(trace_headers(envelope.mail_from, envelope.rcpt_tos) + content)
        self.received += 1
        return "250 2.0.0 captured"


class CaptureServer(SmtpListener):
    """The capture server: every message accepted into a Maildir."""

    def __init__(self, outbox_dir: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host=host, port=port)
        self.outbox_dir = outbox_dir
        self._handler: _MaildirHandler | None = None

    @property
    def received(self) -> int:
        return self._handler.received if self._handler else 0

    @property
    def relay(self) -> SmtpRelay:
        return SmtpRelay(host=self.host, port=self.port, start_tls=False, validate_certs=False)

    async def start(self) -> None:
        self._handler = _MaildirHandler(open_maildir(self.outbox_dir))
        await self._listen(self._handler, hostname="capture.localhost",
                           size_limit=10 * 1024 * 1024, ident="newsletter capture server")
