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
    workers: bool = False  # handed to the `newsletter worker` processes, not sent here


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

    @property
    def limited(self) -> bool:
        return bool(self.rate > 0 or self.all_windows())

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

    def take(self) -> bool:
        """Count one message now (called right before it is handed over); always True:
        the pace is this process's own."""
        if self.interval:
            self.next = max(self.next, time.monotonic()) + self.interval
        if not self.windows:
            return True
        second = int(time.time())
        for _limit, _period, _label, seconds, total in self.windows:
            if seconds and seconds[-1][0] == second:
                seconds[-1][1] += 1
            else:
                seconds.append([second, 1])
            total[0] += 1
        self.unsaved[second] = self.unsaved.get(second, 0) + 1
        return True

    def drain(self) -> list[tuple[str, int, int]]:
        usage = [(self.name, sec, n) for sec, n in self.unsaved.items()]
        self.unsaved.clear()
        return usage


class _SharedPacer:
    """A relay's pace for a worker among many: the limits are counted in the database over
    all workers. Sending slots are reserved a few at a time (about a tenth of a second's
    worth at the per-second rate) and only spent within the second they were counted in, so
    every second and every window holds, whatever the number of workers. The per-second
    rate is a limit per calendar second rather than an even pace: a second's slots may go
    out in a burst."""

    def __init__(self, plan: RelayPlan, store: DeliveryStore) -> None:
        self.name = plan.name
        self.store = store
        self.windows: list[tuple[int, float, str]] = []
        if plan.rate >= 1:
            self.windows.append((int(plan.rate), 1.0, "per-second"))
        elif plan.rate > 0:  # slower than one a second: one per 1/rate seconds
            self.windows.append((1, 1.0 / plan.rate, "per-second"))
        self.windows += plan.all_windows()
        self.chunk = max(1, int(plan.rate / 10)) if plan.rate >= 1 else 1
        if plan.rate <= 0:
            self.chunk = 20  # only hourly or daily windows: reserve a little ahead
        self.slots = 0
        self.second = 0
        self.retry_at = 0.0
        self.why = ""

    def wait(self) -> tuple[float, str]:
        now = time.time()
        second = int(now)
        if self.slots > 0 and second == self.second:
            return 0.0, ""
        self.slots = 0  # slots counted in an earlier second are not spent in this one
        if time.monotonic() < self.retry_at:
            return self.retry_at - time.monotonic(), self.why
        granted, full = self.store.reserve_relay(
            self.name, self.chunk, [(limit, period) for limit, period, _ in self.windows],
            second=second)
        if granted:
            self.slots, self.second = granted, second
            return 0.0, ""
        limit, period, label = self.windows[full]
        # Try again at the next second: a window gains room as its oldest second leaves.
        pause = max(0.01, second + 1 - now)
        self.why = "" if period <= 1 else (f"relay {self.name}: {label} limit of {limit:,} "
                                           "reached (counted over all workers)")
        self.retry_at = time.monotonic() + pause
        return pause, self.why

    def take(self) -> bool:
        """Spend one reserved slot; False if none is left for this second (another of this
        worker's connections spent it meanwhile): wait() again."""
        if self.slots > 0 and int(time.time()) == self.second:
            self.slots -= 1
            return True
        self.slots = 0
        return False

    def drain(self) -> list[tuple[str, int, int]]:
        return []  # reservations are written when they are made


@dataclass
class _Slot:
    """A relay's state during a run."""

    plan: RelayPlan
    pacer: _Pacer | _SharedPacer
    failures: int = 0          # relay failures in a row
    out_until: float = 0.0     # monotonic time before which the relay is taken out
    strikes: int = 0           # how often it was taken out in this run
    last_error: str = ""

    def out(self) -> bool:
        return time.monotonic() < self.out_until


class _Ledger:
    """Group commit of ledger marks: everything marked in one loop turn is one transaction.

    On SQLite a commit takes microseconds and runs right in the event loop. On a database
    over the network (PostgreSQL) a commit is a round trip and a WAL flush, during which a
    blocked loop would move no SMTP traffic; there each commit runs in a thread of its own,
    one at a time, while marks made meanwhile gather for the next one. Either way the marks
    reach the database in the order they were made, and a 'sending' mark is committed
    before its message is handed over."""

    def __init__(self, store: DeliveryStore, slots: Sequence[_Slot], bounce_threshold: int,
                 worker: int | None = None, *, threaded: bool = False) -> None:
        self.store = store
        self.slots = slots
        self.bounce_threshold = bounce_threshold
        self.worker = worker
        self.pending: list[Mark] = []
        self.future: asyncio.Future[set[int]] | None = None
        self.loop = asyncio.get_running_loop()
        self.threaded = threaded
        # The marks of the commit running in a thread: their future, resolved (and this
        # cleared) by _written, in the loop, once that commit is over.
        self.writing: asyncio.Future[set[int]] | None = None

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
            if self.writing is None:
                self.loop.call_soon(self._flush)
            # else: the running commit's completion starts the next one
        return self.future

    def _usage(self) -> list[tuple[str, int, int]]:
        return [u for slot in self.slots for u in slot.pacer.drain()]

    def _write(self, marks: list[Mark], usage: list[tuple[str, int, int]]) -> set[int]:
        return self.store.begin(marks, usage=usage, bounce_threshold=self.bounce_threshold,
                                worker=self.worker)

    def _flush(self) -> None:
        marks, future = self.pending, self.future
        self.pending, self.future = [], None
        if future is None:
            return
        usage = self._usage()  # read here, in the loop's thread, which updates the pacers
        if self.threaded:
            try:
                thread = self.loop.run_in_executor(None, self._write, marks, usage)
            except RuntimeError as exc:  # the executor is shut down: the loop is closing
                future.set_exception(exc)
                future.exception()
                return
            self.writing = future
            thread.add_done_callback(lambda done: self._written(done, future))
            return
        try:
            # Synchronous: SQLite commits take microseconds, and running it here keeps
            # the order of marks equal to the order of events.
            future.set_result(self._write(marks, usage))
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: workers waiting on it re-raise it themselves

    def _written(self, done: asyncio.Future[set[int]], future: asyncio.Future[set[int]]) \
            -> None:
        self.writing = None  # cleared as `future` resolves: never seen done while set
        if done.cancelled():
            future.cancel()
        elif done.exception() is not None:
            future.set_exception(done.exception())  # type: ignore[arg-type]
            future.exception()
        else:
            future.set_result(done.result())
        if self.future is not None:  # marks made while that commit ran
            self._flush()

    async def drain(self) -> None:
        """Commit everything marked so far (and wait for a commit running in a thread).

        Each turn awaits a future that is still pending: the marks waiting for a commit, or
        those of the commit in the thread, which _written resolves as it clears `writing`.
        (Awaiting a future that is already done does not yield: a loop over the thread's
        own future, done but its callback not yet run, spun forever and froze the loop.)"""
        while True:
            if self.future is not None:
                waiting = self.future
            elif self.writing is not None:
                waiting = self.writing
            else:
                return
            with contextlib.suppress(Exception):
                await asyncio.shield(waiting)

    def close(self) -> None:
        """Commit what is left, synchronously (a commit still running in a thread must have
        been waited for: drain)."""
        marks, self.pending = self.pending, []
        self._write(marks, self._usage())


async def sleep_unless(event: asyncio.Event, seconds: float) -> None:
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
        threaded_commits: bool = False,
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
        self.threaded_commits = threaded_commits  # a database over the network: see _Ledger
        self.runner = runner_name()

    async def run(self, campaign_id: int, message: MessageSource, *, sender: str,
                  takeover: bool = False, retry_now: bool = False,
                  worker: int | None = None, halt: asyncio.Event | None = None) -> RunReport:
        """Send to everyone due; returns when all are done, a retry is too far off, or the
        run had to stop (paused, cancelled, every relay failing).

        With `worker` (a registered `newsletter worker`), the campaign is shared: rows are
        claimed in batches under the worker's lease, which this run renews; relay limits
        are reserved in the database; the run ends when nothing is left to claim now, and
        retries due later are picked up by whichever worker is free then.

        `halt`, when set, ends the run as a pause would: no new message starts, those in
        flight finish and are recorded (a worker stopping on SIGTERM)."""
        if worker is None:
            start = self.store.claim_campaign(campaign_id, runner=self.runner,
                                              lease=0.0 if takeover else self.lease,
                                              retry_now=retry_now)
        else:
            start = self.store.join_campaign(campaign_id)
        counts = self.store.delivery_counts(campaign_id)
        progress = Progress(due=counts.due)
        skipped_before = counts[DeliveryStatus.SKIPPED]
        report = RunReport(progress=progress, start=start)
        usage = self.store.relay_usage(int(time.time()) - 86_400)
        slots = [_Slot(p, _SharedPacer(p, self.store) if worker is not None and p.limited
                       else _Pacer(p, usage.get(p.name, []))) for p in self.plans]
        ledger = _Ledger(self.store, slots, self.bounce_threshold, worker,
                         threaded=self.threaded_commits)
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
            rescan = worker is not None
            while not stop.is_set():
                if worker is None:
                    batch = self.store.due_batch(campaign_id, after_id=after,
                                                 limit=self.batch_size, retries=retries)
                    if not batch.last_id:
                        return
                else:  # queued and due retries alike, held by this worker until sent
                    batch = self.store.claim_batch(campaign_id, worker=worker,
                                                   limit=self.batch_size, after_id=after)
                    if not batch.due and not batch.skipped:
                        if after and rescan:
                            # Once more from the start: rows handed back behind our cursor
                            # (a dead worker's, a paused run's) are due too.
                            after, rescan = 0, False
                            continue
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
                    if worker is None:
                        await walk(retries=True)
                    # Wait for every row handed out to have its outcome written.
                    joined = asyncio.ensure_future(queue.join())
                    stopped = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({joined, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    joined.cancel()
                    stopped.cancel()
                    if stop.is_set():
                        break
                    await ledger.drain()
                    if worker is not None:
                        break  # retries due later: whichever worker is free then
                    nxt = self.store.next_retry_at(campaign_id)
                    report.next_retry = nxt
                    if nxt is None:
                        break
                    wait = (nxt - dt.datetime.now(dt.UTC)).total_seconds()
                    if wait > self.retry.wait:
                        break  # too far off for this run: the campaign waits for a later one
                    notes["retry"] = (f"waiting to retry temporary failures at "
                                      f"{nxt:%H:%M:%S} UTC")
                    await sleep_unless(stop, wait)
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
                        await sleep_unless(stop, min(1.0, slot.out_until - time.monotonic()))
                        if ended.is_set():  # every row is done; only end marks are left
                            break
                        continue
                    wait, why = slot.pacer.wait()
                    if wait > 0:
                        if why:
                            notes[slot.plan.name] = why
                        await sleep_unless(stop, min(wait, 1.0))
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
                        if not slot.pacer.take() and not await self._slot(slot, stop, notes):
                            continue  # stopped while waiting: the row stays due
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
                if halt is not None and halt.is_set():
                    fail("stopped: the process was asked to stop")
                progress.note = "; ".join(notes.values())
                if self.on_progress:
                    self.on_progress(progress)
                now = time.monotonic()
                if now - polled < self.poll:
                    continue
                polled = now
                note = progress.note or None
                try:
                    if worker is not None:
                        # A worker's lease is its own row, renewed a few times per lease;
                        # the campaign is only read, for a pause or a cancel.
                        if now - written >= self.lease / 3:
                            written = now
                            if not self.store.renew_worker(worker, lease=self.lease,
                                                           campaign_id=campaign_id):
                                fail("this worker's lease ran out; its rows went to the "
                                     "other workers")
                                continue
                        status = self.store.campaign_status(campaign_id)
                    elif note != written_note or now - written >= self.lease / 3:
                        # The row is written (heartbeat, note) only when the note changes or
                        # the lease needs renewing; in between, polling for a pause or a
                        # cancel is a read, which does not compete with the ledger's writes.
                        status = self.store.heartbeat(campaign_id, runner=self.runner,
                                                      note=note)
                        written, written_note = now, note
                    else:
                        status = self.store.campaign_status(campaign_id)
                except Exception as exc:  # a busy database: try again next time
                    log.warning("campaign %d: heartbeat or status check failed: %s",
                                campaign_id, exc)
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
                await ledger.drain()
            with contextlib.suppress(Exception):
                ledger.close()
            if worker is None:
                with contextlib.suppress(Exception):
                    report.status = self.store.finish_run(
                        campaign_id, runner=self.runner, pause=pause["asked"],
                        error=report.aborted or (str(error) if error else None))
            else:
                with contextlib.suppress(Exception):
                    self.store.release_claims(campaign_id, worker=worker)
                with contextlib.suppress(Exception):
                    report.status = self.store.finish_shared(
                        campaign_id, pause=report.aborted if pause["asked"] else None)
            # Unsubscribes during the run skip rows directly in the ledger; count them all.
            with contextlib.suppress(Exception):
                skipped = self.store.delivery_counts(campaign_id)[DeliveryStatus.SKIPPED]
                progress.skipped = skipped - skipped_before
            progress.note = ""
            if self.on_progress:
                self.on_progress(progress)
        return report

    async def _slot(self, slot: _Slot, stop: asyncio.Event, notes: dict[str, str]) -> bool:
        """Wait, holding a row, for a sending slot of a shared pace; False if stopped."""
        while not stop.is_set():
            wait, why = slot.pacer.wait()
            if wait <= 0:
                if slot.pacer.take():
                    notes.pop(slot.plan.name, None)
                    return True
                continue
            if why:
                notes[slot.plan.name] = why
            await sleep_unless(stop, min(wait, 1.0))
        return False

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
