"""The built-in capture server: real SMTP on loopback into a Maildir, so nothing leaves.

Used when SMTP_URL is unset (demo, previews, first steps). The sender talks to it exactly as
to a real relay, so what lands in var/outbox/ is what a relay would have received.
"""

from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from ..settings import SmtpRelay


class _MaildirHandler:
    def __init__(self, outbox: mailbox.Maildir) -> None:
        self.outbox = outbox
        self.received = 0

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        # Return-Path and Delivered-To, as a local delivery agent would add them.
        rcpts = ", ".join(envelope.rcpt_tos)
        # aiosmtpd reports the null sender of bounces as "<>": do not wrap it twice.
        sender = (envelope.mail_from or "").strip("<>")
        head = f"Return-Path: <{sender}>\r\nDelivered-To: {rcpts}\r\n".encode()
        self.outbox.add(head + content)
        self.received += 1
        return "250 2.0.0 captured"


class CaptureServer:
    """An aiosmtpd server on 127.0.0.1 (port chosen by the OS), in the running event loop."""

    def __init__(self, outbox_dir: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.outbox_dir = outbox_dir
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._handler: _MaildirHandler | None = None

    @property
    def received(self) -> int:
        return self._handler.received if self._handler else 0

    @property
    def relay(self) -> SmtpRelay:
        return SmtpRelay(host=self.host, port=self.port, start_tls=False, validate_certs=False)

    async def start(self) -> None:
        self.outbox_dir.parent.mkdir(parents=True, exist_ok=True)
        maildir = mailbox.Maildir(self.outbox_dir, create=True)
        for sub in ("tmp", "new", "cur"):  # create=True skips these if the folder exists
            (self.outbox_dir / sub).mkdir(exist_ok=True)
        handler = _MaildirHandler(maildir)
        self._handler = handler
        loop = asyncio.get_running_loop()

        def factory() -> Any:
            return SMTPServer(handler, hostname="capture.localhost", decode_data=False,
                              data_size_limit=10 * 1024 * 1024, enable_SMTPUTF8=True,
                              ident="newsletter capture server")

        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> CaptureServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
