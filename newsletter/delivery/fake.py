"""A fake relay for tests and profiling: records messages in memory, fails on request.

It implements the same Relay/Connection interface as SmtpRelayClient, so the engine can be
exercised (or timed without the network) without monkeypatching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DeliveryError


@dataclass
class FakeRelay:
    """`fail(recipient)` may return an error to raise for that recipient, or None."""

    fail: Callable[[str], DeliveryError | None] = lambda _rcpt: None
    keep: bool = True  # False: count messages without keeping their bytes
    sent: list[tuple[str, str, bytes]] = field(default_factory=list)
    count: int = 0
    connections: int = 0

    def describe(self) -> str:
        return "fake relay (in memory)"

    async def connect(self) -> FakeConnection:
        self.connections += 1
        return FakeConnection(self)


class FakeConnection:
    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.open = True

    @property
    def alive(self) -> bool:
        return self.open

    async def send(self, sender: str, recipient: str, data: bytes) -> None:
        error = self.relay.fail(recipient)
        if error is not None:
            raise error
        self.relay.count += 1
        if self.relay.keep:
            self.relay.sent.append((sender, recipient, data))

    async def close(self) -> None:
        self.open = False

    def abort(self) -> None:
        self.open = False
