"""A fast counting SMTP server for tests that send tens of thousands of messages.

aiosmtpd (tests/smtpd.py) reads DATA a line at a time: with our 46 KB messages it spends
about 2 ms of CPU on each, and with 20,000 of them the test server, not the senders, set
the pace. This one speaks the same SMTP over a real socket (EHLO with PIPELINING, MAIL,
RCPT, DATA, RSET, NOOP, QUIT) but finds the end of DATA with one search, and keeps only
the envelopes. Use SmtpTestServer for anything that needs the message, faults or rules.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field

from .smtpd import LoopThreadServer, Received

_EHLO = (b"250-sink.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
         b"250 SIZE 104857600\r\n")


@dataclass
class Envelopes:
    """What the sink received; the same reading side as smtpd.Recorder."""

    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delay: float = 0.0  # seconds to wait before answering the end of DATA

    def count_by_rcpt(self) -> Counter[str]:
        with self.lock:
            return Counter(r for m in self.messages for r in m.rcpt_tos)


def _address(arg: bytes) -> str:
    """The address in 'FROM:<a@b> SIZE=1' or 'TO:<a@b>'."""
    start, end = arg.find(b"<"), arg.find(b">")
    return arg[start + 1:end].decode("utf-8", "replace") if 0 <= start < end else ""


class CountingSmtpServer(LoopThreadServer):
    """`with CountingSmtpServer() as sink:` then sink.url, sink.recorder."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = Envelopes()

    async def _start(self) -> asyncio.AbstractServer:
        # The whole message is one readuntil: allow up to 32 MiB before the end marker.
        return await asyncio.start_server(self._session, self.host, 0, limit=2 ** 25)

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        mail_from, rcpts = "", []
        writer.write(b"220 sink.localhost ESMTP\r\n")
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                verb, _, arg = line[:-2].partition(b" ")
                verb = verb.upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(_EHLO if verb == b"EHLO" else b"250 sink.localhost\r\n")
                elif verb == b"MAIL":
                    mail_from, rcpts = _address(arg), []
                    writer.write(b"250 OK\r\n")
                elif verb == b"RCPT":
                    rcpts.append(_address(arg))
                    writer.write(b"250 OK\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 end with <CRLF>.<CRLF>\r\n")
                    await writer.drain()
                    await reader.readuntil(b"\r\n.\r\n")
                    if self.recorder.delay:
                        await asyncio.sleep(self.recorder.delay)
                    with self.recorder.lock:
                        self.recorder.messages.append(Received(mail_from, rcpts, b""))
                    mail_from, rcpts = "", []
                    writer.write(b"250 OK queued\r\n")
                elif verb in (b"RSET", b"NOOP"):
                    mail_from, rcpts = ("", []) if verb == b"RSET" else (mail_from, rcpts)
                    writer.write(b"250 OK\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"502 not implemented\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()
