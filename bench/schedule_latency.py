"""How late do scheduled sends start? Schedules one-off sends a few seconds apart while a
scheduler runs (default tick, as in `newsletter serve`), and reports each run's lateness.

    /work/venv/bin/python bench/schedule_latency.py [--jobs 10] [--spacing 1.5] [--tick 1.0]

Jobs are added through the job store while the scheduler is already running and asleep, as
`newsletter schedule` in another process would add them; mail goes to the capture server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

from newsletter.scheduling import Scheduler, Schedules
from newsletter.service import Newsletter
from newsletter.settings import load_settings
from newsletter.store.sql import NewMember

ROOT = Path(__file__).resolve().parents[1]
ISSUE = ROOT / "examples" / "issues" / "sample.md"


async def measure(nl: Newsletter, jobs: int, spacing: float, tick: float) -> list[float]:
    schedules = Schedules(nl)
    scheduler = Scheduler(nl, tick=tick)
    await scheduler.start()
    try:
        await asyncio.sleep(2 * tick)  # it holds the lease and sleeps: nothing is due
        ids = []
        start = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
        for i in range(jobs):
            issue = nl.settings.var_dir / f"issue-{i}.md"
            issue.write_text(ISSUE.read_text(encoding="utf-8").replace(
                "number: 7", f"number: {100 + i}"), encoding="utf-8")
            at = start + dt.timedelta(seconds=spacing * i)
            ids.append(schedules.add_once(issue, ["bench"], at=at, tz="UTC").id)
        deadline = time.monotonic() + 2 + spacing * jobs + 30
        while time.monotonic() < deadline:
            runs = [r for r in schedules.store.runs() if r.outcome != "started"]
            if len(runs) >= jobs:
                break
            await asyncio.sleep(0.1)
    finally:
        await scheduler.stop()
    return [r.lateness for r in schedules.store.runs() if r.schedule_id in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--spacing", type=float, default=1.5, help="seconds between due times")
    ap.add_argument("--tick", type=float, default=1.0, help="scheduler wake-up interval")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        var = Path(tmp) / "var"
        nl = Newsletter(load_settings(var_dir=var, database_url="", smtp_url=None,
                                      secret_key="bench-secret"))
        mlist = nl.store.create_list("bench")
        nl.store.upsert_members(mlist.id, [NewMember(f"r{i}@example.org") for i in range(20)],
                                source="bench")
        late = asyncio.run(measure(nl, args.jobs, args.spacing, args.tick))
    if len(late) < args.jobs:
        raise SystemExit(f"only {len(late)} of {args.jobs} jobs ran")
    late_ms = sorted(x * 1000 for x in late)
    result = {"jobs": args.jobs, "tick_s": args.tick, "lateness_ms_min": round(late_ms[0], 1),
              "lateness_ms_median": round(statistics.median(late_ms), 1),
              "lateness_ms_max": round(late_ms[-1], 1)}
    print(f"{args.jobs} scheduled sends, scheduler tick {args.tick:g} s: started "
          f"{result['lateness_ms_median']:.0f} ms late (median), {result['lateness_ms_max']:.0f}"
          f" ms at most (aim: within 1,000 ms)")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "schedule_latency.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({**result, "when": dt.datetime.now(dt.UTC).isoformat()}) + "\n")


if __name__ == "__main__":
    main()
