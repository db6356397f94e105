"""`newsletter worker`: a delivery-only process; any number of them share one database.

A worker registers itself (store.claims), then loops: release the rows of workers whose
lease ran out, find running campaigns handed to the workers, and run the delivery engine
on each in worker mode (rows claimed in batches, the lease renewed as it goes). Pause and
cancel reach a running engine through the campaign's row within a tenth of a second; a
resumed campaign is found by an idle worker within `worker_poll_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError

from .delivery.engine import Progress, RelayPlan, RunReport, runner_name, sleep_unless
from .errors import ConflictError, NotFoundError
from .render.message import MessageSource
from .service import Newsletter
from .store.claims import Reaped
from .store.schema import CampaignStatus

log = logging.getLogger(__name__)


@dataclass
class WorkerReport:
    """What one worker did over its life."""

    name: str
    sent: int = 0
    runs: int = 0
    reaped: list[Reaped] = field(default_factory=list)
    reregistered: int = 0   # times its lease was lost and it registered again


class Worker:
    """One delivery worker. Dependencies come in: the service (settings, store, relays)."""

    def __init__(self, nl: Newsletter, *, name: str | None = None,
                 on_event: Callable[[str], None] | None = None,
                 on_progress: Callable[[int, Progress], None] | None = None) -> None:
        self.nl = nl
        self.name = name or runner_name()
        self.lease = nl.settings.worker_lease_seconds
        self.poll = nl.settings.worker_poll_seconds
        self.on_event = on_event or (lambda text: log.info("%s", text))
        self.on_progress = on_progress
        self.id: int | None = None
        self.current: int | None = None  # the campaign being sent, for `newsletter workers`
        self._messages: dict[int, MessageSource] = {}

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> WorkerReport:
        """Deliver until `stop` is set (then finish what is in flight, hand back the rest)
        or, with `once`, until no campaign has work for it. A database that goes away
        (a restart, a failover) is waited for, not fatal."""
        store = self.nl.store
        report = WorkerReport(self.name)
        self.id = store.register_worker(self.name, lease=self.lease)
        self.on_event(f"worker {self.name} (id {self.id}) started")
        # Lease renewal and the release of dead workers' rows run beside the sending, so a
        # killed worker's rows go to the others one lease after it died, not when this
        # worker's current run ends.
        keeper = asyncio.create_task(self._keep(report, stop))
        failures = 0
        try:
            async with self.nl.delivery_relays() as relays:
                while not stop.is_set():
                    try:
                        ids = store.campaigns_with_work()
                        if not ids:
                            if once:
                                break
                            await sleep_unless(stop, self.poll)
                            continue
                        for campaign_id in ids:
                            if stop.is_set():
                                break
                            run = await self._deliver(campaign_id, relays, stop)
                            if run is not None:
                                report.runs += 1
                                report.sent += run.progress.sent
                        failures = 0
                    except DBAPIError as exc:
                        failures += 1
                        wait = min(30.0, self.poll * 2 ** failures)
                        self.on_event(f"database unavailable ({_first_line(exc)}); trying "
                                      f"again in {wait:.0f} s")
                        await sleep_unless(stop, wait)
                        self._reset(report)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            # Whatever stopped us: claimed rows go back to the others now, not after the
            # lease; anything still 'sending' (cancelled mid-message) becomes unknown.
            assert self.id is not None
            with contextlib.suppress(Exception):
                left = store.retire_worker(self.id)
                if left.released or left.unknown:
                    self.on_event(f"handed back {left.released} claimed row(s)"
                                  + (f"; {left.unknown} in flight marked unknown"
                                     if left.unknown else ""))
            self.on_event(f"worker {self.name} stopped: sent {report.sent:,} in "
                          f"{report.runs} run(s)")
        return report

    async def _keep(self, report: WorkerReport, stop: asyncio.Event) -> None:
        """Every third of a lease: renew this worker's lease, and release the rows of
        workers whose lease ran out."""
        store = self.nl.store
        while not stop.is_set():
            await sleep_unless(stop, self.lease / 3)
            try:
                self._renew(report)
                for r in store.reap_workers():
                    report.reaped.append(r)
                    self.on_event(f"worker {r.worker} stopped renewing its lease: "
                                  f"{r.released} claimed row(s) handed back, {r.unknown} "
                                  "in flight now 'unknown' (not resent)")
            except DBAPIError as exc:  # the sending loop says so, and waits
                log.warning("lease renewal: %s", _first_line(exc))

    def _reset(self, report: WorkerReport) -> None:
        """After a run failed on the database: what this worker held is given up (claimed
        rows back to everyone, rows it had handed to a relay unknown), so nothing waits for
        a lease that this live worker keeps renewing."""
        assert self.id is not None
        with contextlib.suppress(DBAPIError):
            found = self.nl.store.reset_worker(self.id)
            if found.released or found.unknown:
                self.on_event(f"gave up {found.released} claimed row(s)"
                              + (f"; {found.unknown} in flight marked unknown"
                                 if found.unknown else ""))
            self._renew(report)

    def _renew(self, report: WorkerReport) -> None:
        """Renew the lease; if it was lost (this process stalled longer than the lease and
        another worker released its rows), register again under a new id."""
        assert self.id is not None
        if self.nl.store.renew_worker(self.id, lease=self.lease, campaign_id=self.current):
            return
        self.id = self.nl.store.register_worker(self.name, lease=self.lease)
        report.reregistered += 1
        self.on_event(f"lease lost (its rows went to other workers); registered again as "
                      f"id {self.id}")

    async def _deliver(self, campaign_id: int, relays: list[RelayPlan], stop: asyncio.Event) \
            -> RunReport | None:
        nl = self.nl
        assert self.id is not None
        try:
            c = nl.store.get_campaign(campaign_id)
            message = self._messages.get(campaign_id)
            if message is None:
                # A started campaign's content is fixed: build its messages once.
                mlists = list(nl.store.lists_by_id(c.list_ids).values())
                message = self._messages[campaign_id] = nl.campaign_message(c, mlists)

            def progress(p: Progress) -> None:
                if self.on_progress is not None:
                    self.on_progress(campaign_id, p)

            engine = nl.engine(relays, on_progress=progress, worker=True)
            self.current = campaign_id
            report = await engine.run(campaign_id, message, sender=nl.settings.sender_email,
                                      worker=self.id, halt=stop)
        except (ConflictError, NotFoundError) as exc:  # paused or cancelled meanwhile
            log.info("campaign %d: %s", campaign_id, exc)
            return None
        finally:
            self.current = None
        p = report.progress
        if p.sent or p.failed_temp or p.failed_perm or report.aborted:
            line = (f"campaign {campaign_id}: sent {p.sent:,}"
                    + (f", failed {p.failed_temp + p.failed_perm:,}"
                       if p.failed_temp or p.failed_perm else "")
                    + f" ({p.rate:,.0f} msg/s)")
            if report.aborted:
                line += f"; {report.aborted}"
            if report.status == CampaignStatus.COMPLETED:
                line += "; campaign completed"
                self._messages.pop(campaign_id, None)
            self.on_event(line)
        return report


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["?"])[0]
