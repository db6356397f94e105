"""The send engine: campaign -> ledger batches -> bounded queue -> relays' connections -> ledger.

Exactly-once rests on the ledger. Before a message is handed to the relay its row is
committed as 'sending'; its outcome is committed with the next group commit, which always
precedes that connection's next 'sending' mark. So when a process dies, each connection has
at most one row left in 'sending', and the next run counts those as 'unknown' instead of
sending them again: the unknowns never exceed the number of connections.

Commits are grouped: every mark made in one turn of the event loop goes into one
transaction, so the database sees a few hundred commits per second, not one per message.

Several relays share one queue, each with its own connections and pace (a token bucket per
second and sliding windows per hour and day, counted in the database across runs). A relay
that fails many times in a row is taken out for a cooldown and its share goes to the others;
when every relay is out, the campaign pauses with the reason. Temporary failures come back
after an exponential backoff with jitter, until a maximum age. Another process pauses or
cancels a campaign through its row; the run sees it within a tenth of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayError,
    UnknownOutcomeError,
)
from ..render.message import MessageSource
from ..store.base import DeliveryStore, Due, Mark, RunStart
from ..store.schema import CampaignStatus, DeliveryStatus
from .relay import Connection, Relay

log = logging.getLogger(__name__)


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
    expired: int = 0
    retried: int = 0        # attempts that were retries of a temporary failure
    note: str = ""          # what the run is waiting for, if anything
    started: float = field(default_factory=time.monotonic)

    def count(self, status: DeliveryStatus) -> None:
        """One more outcome of this status (SENT, FAILED_TEMP, FAILED_PERM, UNKNOWN, EXPIRED)."""
        setattr(self, _COUNTER[status], getattr(self, _COUNTER[status]) + 1)

    @property
    def done(self) -> int:
        return (self.sent + self.failed_perm + self.unknown + self.skipped + self.expired
                + self.failed_temp - self.retried)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.sent / elapsed if elapsed > 0 else 0.0


_COUNTER = {DeliveryStatus.SENT: "sent", DeliveryStatus.FAILED_TEMP: "failed_temp",
            DeliveryStatus.FAILED_PERM: "failed_perm", DeliveryStatus.UNKNOWN: "unknown",
            DeliveryStatus.EXPIRED: "expired"}


@dataclass
class RunReport:
    progress: Progress
    start: RunStart
    aborted: str | None = None  # why the run stopped early, if it did
    errors: list[tuple[str, str]] = field(default_factory=list)  # (email, error), first few
    status: CampaignStatus | None = None  # the campaign's status after the run
    next_retry: dt.datetime | None = None  # when temporary failures are due again, if any


@dataclass(frozen=True)
class RelayPlan:
    """One relay as the engine uses it: its connections and its pace."""

    relay: Relay
    name: str = "relay"
    concurrency: int = 8
    rate: float = 0.0                          # messages per second, 0: no limit
    per_hour: int = 0                          # messages per sliding hour, 0: no limit
    per_day: int = 0                           # messages per sliding day, 0: no limit
    # Extra (limit, seconds) windows; tests use short ones to watch a window fill and drain.
    windows: tuple[tuple[int, float], ...] = ()

    def all_windows(self) -> list[tuple[int, float, str]]:
        found = [(limit, float(period), label) for limit, period, label in (
            (self.per_hour, 3600, "hourly"), (self.per_day, 86_400, "daily")) if limit]
        found += [(limit, period, f"{period:g}-second") for limit, period in self.windows]
        return found


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for temporary failures, up to a maximum age."""

    base: float = 60.0            # first retry after about this many seconds
    max_interval: float = 3600.0  # never wait longer than this between attempts
    max_age: float = 3 * 86_400.0  # give up (status 'expired') this long after the first try
    wait: float = 0.0             # a run waits this long for the next retry before it ends

    def delay(self, attempts: int) -> float:
        """Seconds until the next attempt after `attempts` failed ones ("equal jitter")."""
        ceiling = float(min(self.max_interval, self.base * 2.0 ** max(0, attempts - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class _Pacer:
    """A relay's pace: a token bucket for messages per second and sliding windows (per hour,
    per day) counted per second; the windows start from the usage recorded in the database."""

    def __init__(self, plan: RelayPlan, history: Sequence[tuple[int, int]]) -> None:
        self.name = plan.name
        self.interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
        self.next = time.monotonic()
        self.windows: list[tuple[int, float, str, deque[list[int]], list[int]]] = []
        now = time.time()
        for limit, period, label in plan.all_windows():
            seconds: deque[list[int]] = deque([sec, n] for sec, n in history
                                              if sec > now - period)
            self.windows.append((limit, period, label, seconds,
                                 [sum(n for _, n in seconds)]))
        self.unsaved: dict[int, int] = {}

    def wait(self) -> tuple[float, str]:
        """Seconds until a message may go, and why (empty when only the per-second pace)."""
        wall = time.time()
        longest, why = 0.0, ""
        for limit, period, label, seconds, total in self.windows:
            while seconds and seconds[0][0] <= wall - period:
                total[0] -= seconds.popleft()[1]
            if total[0] >= limit:
                # Full: room again when the oldest second falls out of the window.
                until = seconds[0][0] + period - wall if seconds else 0.0
                if until > longest:
                    resume = dt.datetime.fromtimestamp(wall + until, dt.UTC)
                    longest, why = until, (f"relay {self.name}: {label} limit of {limit:,} "
                                           f"reached; resumes at {resume:%H:%M:%S} UTC")
        pace = self.next - time.monotonic()
        return max(longest, pace), why

    def take(self) -> None:
        """Count one message now (called right before it is handed over)."""
        if self.interval:
            self.next = max(self.next, time.monotonic()) + self.interval
        if not self.windows:
            return
        second = int(time.time())
        for _limit, _period, _label, seconds, total in self.windows:
            if seconds and seconds[-1][0] == second:
                seconds[-1][1] += 1
            else:
                seconds.append([second, 1])
            total[0] += 1
        self.unsaved[second] = self.unsaved.get(second, 0) + 1

    def drain(self) -> list[tuple[str, int, int]]:
        usage = [(self.name, sec, n) for sec, n in self.unsaved.items()]
        self.unsaved.clear()
        return usage


@dataclass
class _Slot:
    """A relay's state during a run."""

    plan: RelayPlan
    pacer: _Pacer
    failures: int = 0          # relay failures in a row
    out_until: float = 0.0     # monotonic time before which the relay is taken out
    strikes: int = 0           # how often it was taken out in this run
    last_error: str = ""

    def out(self) -> bool:
        return time.monotonic() < self.out_until


class _Ledger:
    """Group commit of ledger marks: everything marked in one loop turn is one transaction."""

    def __init__(self, store: DeliveryStore, slots: Sequence[_Slot], bounce_threshold: int) \
            -> None:
        self.store = store
        self.slots = slots
        self.bounce_threshold = bounce_threshold
        self.pending: list[Mark] = []
        self.future: asyncio.Future[set[int]] | None = None
        self.loop = asyncio.get_running_loop()

    async def begin(self, delivery_id: int, relay: str) -> bool:
        """Commit 'sending' for this row (with any outcomes waiting); False if it was taken."""
        self.pending.append(Mark(delivery_id, DeliveryStatus.SENDING, relay=relay))
        # shield: one worker being cancelled must not cancel the commit the others await.
        return delivery_id in await asyncio.shield(self._schedule())

    def finish(self, mark: Mark) -> None:
        self.pending.append(mark)
        self._schedule()

    def _schedule(self) -> asyncio.Future[set[int]]:
        if self.future is None:
            self.future = self.loop.create_future()
            self.loop.call_soon(self._flush)
        return self.future

    def _write(self, marks: list[Mark]) -> set[int]:
        usage = [u for slot in self.slots for u in slot.pacer.drain()]
        return self.store.begin(marks, usage=usage, bounce_threshold=self.bounce_threshold)

    def _flush(self) -> None:
        marks, future = self.pending, self.future
        self.pending, self.future = [], None
        assert future is not None
        try:
            # Synchronous on purpose: SQLite commits take microseconds, and running it here
            # keeps the order of marks equal to the order of events.
            future.set_result(self._write(marks))
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: workers waiting on it re-raise it themselves

    def close(self) -> None:
        marks, self.pending = self.pending, []
        self._write(marks)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake as soon as `event` is set."""
    if seconds <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


_ENHANCED = re.compile(r"\b5\.(\d{1,3})\.\d{1,3}\b")


def bad_address(exc: PermanentDeliveryError) -> bool:
    """Does this 5xx say the address is bad (so the membership bounces), rather than the
    message, the sender or the relay? Enhanced codes 5.1.x (address) and 5.2.x (mailbox)
    do; 5.7.x (policy, authentication) and the rest do not. Without one, 550/551/553 at
    RCPT do."""
    text = str(exc)
    m = _ENHANCED.search(text)
    if m:
        return m.group(1) in ("1", "2")
    return exc.code in (550, 551, 553) and "(at RCPT)" in text


class Engine:
    """Sends one campaign's due rows through one or more relays; dependencies come in,
    nothing global."""

    def __init__(
        self, store: DeliveryStore, relay: Relay | Sequence[RelayPlan], *,
        concurrency: int = 8, rate: float = 0.0,
        batch_size: int = 500, lease: float = 30.0,
        on_progress: Callable[[Progress], None] | None = None,
        max_relay_failures: int | None = None,
        cooldown: float = 60.0,
        retry: RetryPolicy | None = None,
        bounce_threshold: int = 1,
        envelope: Callable[[Due], str] | None = None,
        sign: Callable[[bytes], bytes] | None = None,
        poll: float = 0.1,
    ) -> None:
        self.store = store
        if isinstance(relay, Sequence):
            self.plans = list(relay)
        else:
            self.plans = [RelayPlan(relay, name=relay.describe()[:64], concurrency=concurrency,
                                    rate=rate)]
        if not self.plans:
            raise ValueError("no relay to send through")
        self.batch_size = batch_size
        self.lease = lease
        self.on_progress = on_progress
        self.max_relay_failures = max_relay_failures
        self.cooldown = cooldown
        self.retry = retry or RetryPolicy()
        self.bounce_threshold = bounce_threshold
        self.envelope = envelope    # per-message envelope sender (VERP), else `sender`
        self.sign = sign            # DKIM: returns header bytes to put in front
        self.poll = poll
        self.runner = runner_name()

    async def run(self, campaign_id: int, message: MessageSource, *, sender: str,
                  takeover: bool = False, retry_now: bool = False) -> RunReport:
        """Send to everyone due; returns when all are done, a retry is too far off, or the
        run had to stop (paused, cancelled, every relay failing)."""
        start = self.store.claim_campaign(campaign_id, runner=self.runner,
                                          lease=0.0 if takeover else self.lease,
                                          retry_now=retry_now)
        counts = self.store.delivery_counts(campaign_id)
        progress = Progress(due=counts.due)
        skipped_before = counts[DeliveryStatus.SKIPPED]
        report = RunReport(progress=progress, start=start)
        usage = self.store.relay_usage(int(time.time()) - 86_400)
        slots = [_Slot(p, _Pacer(p, usage.get(p.name, []))) for p in self.plans]
        ledger = _Ledger(self.store, slots, self.bounce_threshold)
        workers = sum(p.concurrency for p in self.plans)
        queue: asyncio.Queue[Due | None] = asyncio.Queue(maxsize=workers * 4)
        stop = asyncio.Event()
        notes: dict[str, str] = {}
        pause = {"asked": False}

        def fail(reason: str, *, pause_it: bool = False) -> None:
            if report.aborted is None:
                report.aborted = reason
            pause["asked"] = pause["asked"] or pause_it
            stop.set()

        async def walk(retries: bool) -> None:
            after = 0
            while not stop.is_set():
                batch = self.store.due_batch(campaign_id, after_id=after, limit=self.batch_size,
                                             retries=retries)
                if not batch.last_id:
                    return
                progress.skipped += batch.skipped
                for due in batch.due:
                    if stop.is_set():
                        return
                    await queue.put(due)
                after = batch.last_id

        async def produce() -> None:
            try:
                while not stop.is_set():
                    await walk(retries=False)
                    await walk(retries=True)
                    # Wait for every row handed out to have its outcome written.
                    joined = asyncio.ensure_future(queue.join())
                    stopped = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({joined, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    joined.cancel()
                    stopped.cancel()
                    if stop.is_set():
                        break
                    ledger.close()
                    nxt = self.store.next_retry_at(campaign_id)
                    report.next_retry = nxt
                    if nxt is None:
                        break
                    wait = (nxt - dt.datetime.now(dt.UTC)).total_seconds()
                    if wait > self.retry.wait:
                        break  # too far off for this run: the campaign waits for a later one
                    notes["retry"] = (f"waiting to retry temporary failures at "
                                      f"{nxt:%H:%M:%S} UTC")
                    await _sleep_unless(stop, wait)
                    notes.pop("retry", None)
            finally:
                ended.set()
                for _ in range(workers):
                    with contextlib.suppress(asyncio.QueueFull):
                        queue.put_nowait(None)

        ended = asyncio.Event()

        async def work(slot: _Slot) -> None:
            conn: Connection | None = None
            try:
                while not stop.is_set():
                    if slot.out():
                        await _sleep_unless(stop, min(1.0, slot.out_until - time.monotonic()))
                        if ended.is_set():  # every row is done; only end marks are left
                            break
                        continue
                    wait, why = slot.pacer.wait()
                    if wait > 0:
                        if why:
                            notes[slot.plan.name] = why
                        await _sleep_unless(stop, min(wait, 1.0))
                        if ended.is_set():  # every row is done; only end marks are left
                            break
                        continue
                    notes.pop(slot.plan.name, None)
                    due = await queue.get()
                    try:
                        if due is None:
                            break
                        if stop.is_set():
                            continue  # the row stays due for the next run
                        slot.pacer.take()
                        if not await ledger.begin(due.delivery_id, slot.plan.name):
                            progress.skipped += 1
                            continue
                        if due.attempts:
                            progress.retried += 1
                        conn = await self._deliver(conn, slot, due, message, sender, ledger,
                                                   progress, report)
                        if slot.failures >= self._failure_limit(slot):
                            self._take_out(slot, slots, notes, fail)
                            if conn is not None:
                                conn.abort()
                                conn = None
                    finally:
                        queue.task_done()
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
            polled = written = 0.0
            written_note: str | None = None
            while True:
                await asyncio.sleep(0.1)
                progress.note = "; ".join(notes.values())
                if self.on_progress:
                    self.on_progress(progress)
                now = time.monotonic()
                if now - polled < self.poll:
                    continue
                polled = now
                note = progress.note or None
                try:
                    # The row is written (heartbeat, note) only when the note changes or the
                    # lease needs renewing; in between, polling for a pause or a cancel is a
                    # read, which does not compete with the ledger's writes.
                    if note != written_note or now - written >= self.lease / 3:
                        status = self.store.heartbeat(campaign_id, runner=self.runner,
                                                      note=note)
                        written, written_note = now, note
                    else:
                        status = self.store.campaign_status(campaign_id)
                except Exception as exc:  # a busy database: try again next time
                    log.warning("heartbeat of campaign %d failed: %s", campaign_id, exc)
                    continue
                if status in (CampaignStatus.PAUSED, CampaignStatus.CANCELLED):
                    fail(f"campaign {campaign_id} was {status.value}")

        ticker = asyncio.create_task(tick())
        error: BaseException | None = None
        try:
            producer = asyncio.create_task(produce())
            tasks = [asyncio.create_task(work(slot)) for slot in slots
                     for _ in range(slot.plan.concurrency)]

            def producer_done(task: asyncio.Task[None]) -> None:
                if task.cancelled() or task.exception() is not None:
                    stop.set()  # workers must not wait for rows that will never come
                    for _ in range(workers):
                        with contextlib.suppress(asyncio.QueueFull):
                            queue.put_nowait(None)

            producer.add_done_callback(producer_done)
            tasks.append(producer)
            try:
                # asyncio.wait, not gather: a cancellation of this run reaches us at once,
                # even if a worker swallows its own (below).
                await asyncio.wait(tasks[:-1])
                for t in tasks[:-1]:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                # Workers end on the producer's end marks, or on stop, when the producer may
                # still be waiting to hand out a row nobody will take.
                if not producer.done():
                    producer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await producer
            except BaseException as exc:
                error = exc
                stop.set()
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
                report.status = self.store.finish_run(
                    campaign_id, runner=self.runner, pause=pause["asked"],
                    error=report.aborted or (str(error) if error else None))
            # Unsubscribes during the run skip rows directly in the ledger; count them all.
            with contextlib.suppress(Exception):
                skipped = self.store.delivery_counts(campaign_id)[DeliveryStatus.SKIPPED]
                progress.skipped = skipped - skipped_before
            progress.note = ""
            if self.on_progress:
                self.on_progress(progress)
        return report

    def _failure_limit(self, slot: _Slot) -> int:
        return self.max_relay_failures or max(5, 2 * slot.plan.concurrency)

    def _take_out(self, slot: _Slot, slots: Sequence[_Slot], notes: dict[str, str],
                  fail: Callable[..., None]) -> None:
        """Too many failures in a row: rest the relay (longer each time); if every relay
        is resting, pause the campaign rather than burn through the list."""
        if slot.out():
            return
        reason = (f"the relay {slot.plan.name} failed {slot.failures} times in a row; "
                  f"last error: {slot.last_error}")
        slot.failures = 0
        if all(other is slot or other.out() for other in slots):
            fail(reason if len(slots) == 1 else "every relay is failing; " + reason,
                 pause_it=True)
            return
        pause_for = self.cooldown * 2 ** slot.strikes
        slot.strikes += 1
        slot.out_until = time.monotonic() + pause_for
        notes[slot.plan.name] = f"{reason}; taken out for {pause_for:g}s"

    async def _deliver(
        self, conn: Connection | None, slot: _Slot, due: Due, message: MessageSource,
        sender: str, ledger: _Ledger, progress: Progress, report: RunReport,
    ) -> Connection | None:
        """Send one message whose row is marked 'sending'; record its outcome."""
        rcpt = due.recipient.email
        try:
            if conn is None or not conn.alive:
                conn = await slot.plan.relay.connect()
            data = message.build(due.recipient)
            if self.sign is not None:
                data = self.sign(data) + data
            envelope = self.envelope(due) if self.envelope is not None else sender
            await conn.send(envelope, rcpt, data)
        except DeliveryError as exc:
            text = str(exc)[:500]
            if len(report.errors) < 20:
                report.errors.append((rcpt, str(exc)))
            mark = self._failure_mark(due, exc, text, slot.plan.name)
            progress.count(mark.status)
            ledger.finish(mark)
            if isinstance(exc, RelayError):
                slot.failures += 1
                slot.last_error = str(exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                return None
            slot.failures = 0
            return conn
        slot.failures = 0
        progress.count(DeliveryStatus.SENT)
        ledger.finish(Mark(due.delivery_id, DeliveryStatus.SENT))
        return conn

    def _failure_mark(self, due: Due, exc: DeliveryError, text: str, relay: str) -> Mark:
        """The ledger change for a failure: temporary ones get their next attempt time, or
        expire at the maximum age; permanent ones say whether the address bounced."""
        status = _status_of(exc)
        if status == DeliveryStatus.FAILED_PERM:
            assert isinstance(exc, PermanentDeliveryError)
            return Mark(due.delivery_id, status, text, bounce=bad_address(exc))
        if status != DeliveryStatus.FAILED_TEMP:
            return Mark(due.delivery_id, status, text)
        now = dt.datetime.now(dt.UTC)
        first = due.first_attempt_at or now
        if (now - first).total_seconds() >= self.retry.max_age:
            return Mark(due.delivery_id, DeliveryStatus.EXPIRED,
                        f"gave up after {due.attempts + 1} attempts: {text}"[:500])
        # A relay's own failure says nothing about the recipient: due again at once (on
        # another relay, or this one after its cooldown).
        delay = 0.0 if isinstance(exc, RelayError) else self.retry.delay(due.attempts + 1)
        return Mark(due.delivery_id, status, text, retry_at=now + dt.timedelta(seconds=delay))


def _status_of(exc: DeliveryError) -> DeliveryStatus:
    """The ledger status for a failure; subclasses count as their base class."""
    if isinstance(exc, PermanentDeliveryError):
        return DeliveryStatus.FAILED_PERM
    if isinstance(exc, UnknownOutcomeError):
        return DeliveryStatus.UNKNOWN
    return DeliveryStatus.FAILED_TEMP  # TemporaryDeliveryError, RelayError, anything else
