"""The send engine: campaign -> ledger batches -> bounded queue -> N connections -> ledger.

Exactly-once rests on the ledger. Before a message is handed to the relay its row is
committed as 'sending'; its outcome is committed with the next group commit, which always
precedes that connection's next 'sending' mark. So when a process dies, each connection has
at most one row left in 'sending', and the next run counts those as 'unknown' instead of
sending them again: the unknowns never exceed the number of connections.

Commits are grouped: every mark made in one turn of the event loop goes into one
transaction, so the database sees a few hundred commits per second, not one per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayError,
    UnknownOutcomeError,
)
from ..render.message import PreparedMessage
from ..store.base import DeliveryStore, Due, Mark, RunStart
from ..store.schema import DeliveryStatus
from .relay import Connection, Relay


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def runner_is_dead(runner: str | None) -> bool:
    """True if runner names a process on this host that no longer exists."""
    if not runner:
        return True
    host, _, pid = runner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine: only its heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Progress:
    """Counts for this run, updated as outcomes arrive."""

    due: int = 0
    sent: int = 0
    failed_temp: int = 0
    failed_perm: int = 0
    unknown: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, status: DeliveryStatus) -> None:
        """One more outcome of this status (SENT, FAILED_TEMP, FAILED_PERM or UNKNOWN)."""
        setattr(self, _COUNTER[status], getattr(self, _COUNTER[status]) + 1)

    @property
    def done(self) -> int:
        return self.sent + self.failed_temp + self.failed_perm + self.unknown + self.skipped

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


_COUNTER = {DeliveryStatus.SENT: "sent", DeliveryStatus.FAILED_TEMP: "failed_temp",
            DeliveryStatus.FAILED_PERM: "failed_perm", DeliveryStatus.UNKNOWN: "unknown"}


@dataclass
class RunReport:
    progress: Progress
    start: RunStart
    aborted: str | None = None  # why the run stopped early, if it did
    errors: list[tuple[str, str]] = field(default_factory=list)  # (email, error), first few


class _RateLimiter:
    """Spaces messages evenly at `rate` per second across all connections (0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(self.next, now)
        self.next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


class _Ledger:
    """Group commit of ledger marks: everything marked in one loop turn is one transaction."""

    def __init__(self, store: DeliveryStore) -> None:
        self.store = store
        self.pending: list[Mark] = []
        self.future: asyncio.Future[set[int]] | None = None
        self.loop = asyncio.get_running_loop()

    async def begin(self, delivery_id: int) -> bool:
        """Commit 'sending' for this row (with any outcomes waiting); False if it was taken."""
        self.pending.append(Mark(delivery_id, DeliveryStatus.SENDING))
        # shield: one worker being cancelled must not cancel the commit the others await.
        return delivery_id in await asyncio.shield(self._schedule())

    def finish(self, delivery_id: int, status: DeliveryStatus, error: str | None = None) -> None:
        self.pending.append(Mark(delivery_id, status, error))
        self._schedule()

    def _schedule(self) -> asyncio.Future[set[int]]:
        if self.future is None:
            self.future = self.loop.create_future()
            self.loop.call_soon(self._flush)
        return self.future

    def _flush(self) -> None:
        marks, future = self.pending, self.future
        self.pending, self.future = [], None
        assert future is not None
        try:
            # Synchronous on purpose: SQLite commits take microseconds, and running it here
            # keeps the order of marks equal to the order of events.
            future.set_result(self.store.begin(marks))
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: workers waiting on it re-raise it themselves

    def close(self) -> None:
        if self.pending:
            marks, self.pending = self.pending, []
            self.store.begin(marks)


class Engine:
    """Sends one campaign's due rows through a relay; dependencies come in, nothing global."""

    def __init__(
        self, store: DeliveryStore, relay: Relay, *, concurrency: int = 8, rate: float = 0.0,
        batch_size: int = 500, lease: float = 30.0,
        on_progress: Callable[[Progress], None] | None = None,
        max_relay_failures: int | None = None,
    ) -> None:
        self.store = store
        self.relay = relay
        self.concurrency = concurrency
        self.rate = rate
        self.batch_size = batch_size
        self.lease = lease
        self.on_progress = on_progress
        # Many relay failures in a row (wrong password, relay down) stop the run instead of
        # burning through the list; every unsent row stays due for the next run.
        self.max_relay_failures = max_relay_failures or max(5, 2 * concurrency)
        self.runner = runner_name()

    async def run(self, campaign_id: int, message: PreparedMessage, *, sender: str,
                  takeover: bool = False) -> RunReport:
        """Send to everyone due; returns when all are attempted or the run had to stop."""
        start = self.store.claim_campaign(campaign_id, runner=self.runner,
                                          lease=0.0 if takeover else self.lease)
        counts = self.store.delivery_counts(campaign_id)
        progress = Progress(due=counts[DeliveryStatus.QUEUED])
        skipped_before = counts[DeliveryStatus.SKIPPED]
        report = RunReport(progress=progress, start=start)
        ledger = _Ledger(self.store)
        queue: asyncio.Queue[Due | None] = asyncio.Queue(maxsize=self.concurrency * 4)
        limiter = _RateLimiter(self.rate)
        state = {"relay_failures": 0}
        stop = asyncio.Event()

        def fail(reason: str) -> None:
            if report.aborted is None:
                report.aborted = reason
            stop.set()

        async def produce() -> None:
            after = 0
            while not stop.is_set():
                batch = self.store.due_batch(campaign_id, after_id=after, limit=self.batch_size)
                if not batch.last_id:
                    break
                progress.skipped += batch.skipped
                for due in batch.due:
                    if stop.is_set():
                        break
                    await queue.put(due)
                after = batch.last_id
            for _ in range(self.concurrency):
                await queue.put(None)

        async def work() -> None:
            conn: Connection | None = None
            try:
                while (due := await queue.get()) is not None:
                    if stop.is_set():
                        continue  # drain: the row stays queued for the next run
                    await limiter.wait()
                    if not await ledger.begin(due.delivery_id):
                        progress.skipped += 1
                        continue
                    conn = await self._deliver(conn, due, message, sender, ledger, progress,
                                               report, state)
                    if state["relay_failures"] >= self.max_relay_failures:
                        fail(f"the relay failed {state['relay_failures']} times in a row; "
                             f"last error: {report.errors[-1][1]}")
            finally:
                if conn is not None:
                    try:
                        await conn.close()
                    except Exception:  # noqa: S110 - the relay may already be gone
                        pass
                    except BaseException:
                        conn.abort()  # cancelled while saying goodbye: close the socket now
                        raise

        async def tick() -> None:
            beat = time.monotonic()
            while True:
                await asyncio.sleep(0.1)
                if self.on_progress:
                    self.on_progress(progress)
                if time.monotonic() - beat > self.lease / 3:
                    beat = time.monotonic()
                    self.store.heartbeat(campaign_id, runner=self.runner)

        ticker = asyncio.create_task(tick())
        error: BaseException | None = None
        try:
            tasks = [asyncio.create_task(produce())]
            tasks += [asyncio.create_task(work()) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*tasks)
            except BaseException as exc:
                error = exc
                # Cancel until every task is done: on Python 3.11, asyncio.wait_for (used by
                # aiosmtplib) can swallow a cancellation that races with a reply (gh-86296),
                # and a worker that survives it would wait forever for its end-of-queue mark.
                pending = set(tasks)
                while pending:
                    for t in pending:
                        t.cancel()
                    _, pending = await asyncio.wait(pending, timeout=1.0)
                raise
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            # Also on Ctrl-C: outcomes already known are written and the claim released;
            # rows still 'sending' stay so and the next run counts them as unknown.
            with contextlib.suppress(Exception):
                ledger.close()
            with contextlib.suppress(Exception):
                self.store.finish_run(campaign_id, runner=self.runner,
                                      error=report.aborted or (str(error) if error else None))
            # Unsubscribes during the run skip rows directly in the ledger; count them all.
            with contextlib.suppress(Exception):
                skipped = self.store.delivery_counts(campaign_id)[DeliveryStatus.SKIPPED]
                progress.skipped = skipped - skipped_before
            if self.on_progress:
                self.on_progress(progress)
        return report

    async def _deliver(
        self, conn: Connection | None, due: Due, message: PreparedMessage, sender: str,
        ledger: _Ledger, progress: Progress, report: RunReport, state: dict[str, int],
    ) -> Connection | None:
        """Send one message whose row is marked 'sending'; record its outcome."""
        rcpt = due.recipient.email
        try:
            if conn is None or not conn.alive:
                conn = await self.relay.connect()
            await conn.send(sender, rcpt, message.build(due.recipient))
        except DeliveryError as exc:
            status = _status_of(exc)
            progress.count(status)
            ledger.finish(due.delivery_id, status, str(exc)[:500])
            if len(report.errors) < 20:
                report.errors.append((rcpt, str(exc)))
            if isinstance(exc, RelayError):
                state["relay_failures"] += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                return None
            state["relay_failures"] = 0
            return conn
        state["relay_failures"] = 0
        progress.count(DeliveryStatus.SENT)
        ledger.finish(due.delivery_id, DeliveryStatus.SENT)
        return conn


def _status_of(exc: DeliveryError) -> DeliveryStatus:
    """The ledger status for a failure; subclasses count as their base class."""
    if isinstance(exc, PermanentDeliveryError):
        return DeliveryStatus.FAILED_PERM
    if isinstance(exc, UnknownOutcomeError):
        return DeliveryStatus.UNKNOWN
    return DeliveryStatus.FAILED_TEMP  # TemporaryDeliveryError, RelayError, anything else
