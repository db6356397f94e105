"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, port 0, in a thread of its own.

It records every message it accepts and can be told to answer a recipient with a 4xx or
5xx at RCPT or at the end of DATA, or to drop the connection, to fail a share of messages
at random (4xx or dropped connections), or to stall, so tests exercise the sender's failure
handling over real sockets.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # as stored by the server: dot-stuffing undone, CRLF line endings


@dataclass
class Rule:
    stage: str  # "rcpt" or "data"
    reply: str | None  # e.g. "450 4.2.0 mailbox busy"; None means drop the connection
    store: bool = False  # at "data" with reply None: keep the message before dropping
    times: int | None = None  # apply this many times, then accept (None: always)


@dataclass
class Recorder:
    """The handler: thread-safe enough for tests (one server loop writes, tests read)."""

    messages: list[Received] = field(default_factory=list)
    rules: dict[str, Rule] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delay: float = 0.0  # seconds to wait before answering DATA (slows a send down)
    # Random faults per message, seeded so a failing run can be replayed: the share of
    # messages answered 451 at end of DATA, and of connections dropped at RCPT.
    random_4xx: float = 0.0
    random_drop: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    stall: float = 0.0  # seconds to stall before answering RCPT (a hung relay)
    refused: int = 0    # messages refused or dropped by the random faults
    keep_data: bool = True  # False: record envelopes only (tests of tens of thousands)

    def _rule(self, address: str, stage: str) -> Rule | None:
        rule = self.rules.get(address.lower())
        if rule is None or rule.stage != stage:
            return None
        if rule.times is not None:
            if rule.times <= 0:
                return None
            rule.times -= 1
        return rule

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if self.stall:
            await asyncio.sleep(self.stall)
        if self.random_drop and self.rng.random() < self.random_drop:
            with self.lock:
                self.refused += 1
            server.transport.close()
            return "421 closing"
        rule = self._rule(address, "rcpt")
        if rule is not None:
            if rule.reply is None:
                server.transport.close()
                return "421 closing"
            return rule.reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        rule = None
        for rcpt in envelope.rcpt_tos:
            rule = rule or self._rule(rcpt, "data")
        if rule is not None and rule.reply is not None:
            return rule.reply
        if self.random_4xx and self.rng.random() < self.random_4xx:
            with self.lock:
                self.refused += 1
            return "451 4.3.0 try again later"
        with self.lock:
            if rule is None or rule.store:
                self.messages.append(Received(
                    str(envelope.mail_from), list(envelope.rcpt_tos),
                    (envelope.original_content or b"") if self.keep_data else b""))
        if rule is not None:  # drop without answering: the sender cannot know
            server.transport.close()
            return "250 OK (never seen)"
        return "250 OK queued"

    def count_by_rcpt(self) -> Counter[str]:
        with self.lock:
            return Counter(r for m in self.messages for r in m.rcpt_tos)


class LoopThreadServer:
    """A server on 127.0.0.1, port 0, with its own event loop in a thread; subclasses say
    how to start it (_start, run in that loop). `with Server() as srv:` then srv.url."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Any = None

    async def _start(self) -> asyncio.AbstractServer:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"


class SmtpTestServer(LoopThreadServer):
    """aiosmtpd with a Recorder: `with SmtpTestServer() as srv:`; srv.port, srv.recorder."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()

    async def _start(self) -> asyncio.AbstractServer:
        return await self._loop.create_server(
            lambda: SMTP(self.recorder, hostname="test.localhost", decode_data=False,
                         enable_SMTPUTF8=False),
            self.host, 0)

    @property
    def messages(self) -> list[Received]:
        with self.recorder.lock:
            return list(self.recorder.messages)
