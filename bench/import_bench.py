#!/usr/bin/env python3
"""Benchmark: `newsletter subscribers import` of N generated rows against a csv + sqlite3 floor.

What it does (see bench/README.md):
  1. writes a CSV of N rows (default 1,000,000): email, name, org, country, with about 1%
     invalid addresses, 1% duplicates of earlier rows, 0.1% names with a line break, quoted
     names with commas and quotes, Chinese names and a few IDN domains;
  2. in a fresh workspace (its own SQLite file, no NEWSLETTER_* from the shell) creates a
     list and runs, each in a child process, timed from outside, with the child's peak RSS:
     `newsletter subscribers import FILE --list bench --dry-run`, the real import, and the
     same import again (every row then already on the list);
  3. checks that the counts are exactly the expected ones and that the database holds them;
  4. runs the floor in a child process as well: Python's csv module reading the same file
     and sqlite3 executemany of its rows into a plain table with a unique index on the
     lowercased address (INSERT OR IGNORE), chunks of 20,000, WAL, synchronous=NORMAL;
  5. prints time, rows/s, peak RSS and the ratio to the floor, and appends a JSON line to
     bench/results/import_bench.jsonl.

Exit status: 0 ok, 1 a run failed or counted wrong, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

FLOOR = r"""
import csv, sqlite3, sys
path, db = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(db)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("CREATE TABLE t (email TEXT NOT NULL, email_key TEXT NOT NULL, name TEXT, "
             "org TEXT, country TEXT)")
conn.execute("CREATE UNIQUE INDEX t_key ON t (email_key)")
sql = "INSERT OR IGNORE INTO t VALUES (?, ?, ?, ?, ?)"
with open(path, newline="", encoding="utf-8") as fh:
    reader = csv.reader(fh)
    next(reader)
    batch = []
    for row in reader:
        batch.append((row[0], row[0].lower(), row[1], row[2], row[3]))
        if len(batch) == 20000:
            conn.executemany(sql, batch)
            conn.commit()
            batch = []
    conn.executemany(sql, batch)
    conn.commit()
print(conn.execute("SELECT count(*) FROM t").fetchone()[0])
"""


@dataclass
class Expected:
    rows: int = 0
    imported: int = 0
    invalid: int = 0
    duplicates: int = 0


def generate(path: Path, n: int) -> Expected:
    """Write n data rows; returns what a first import of them must count."""
    exp = Expected(rows=n)
    countries = ("de", "cn", "fr", "")
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["email", "name", "org", "country"])
        for i in range(n):
            kind = i % 100
            if i % 200 == 9:
                email = f"user{i}@bücher{i % 5}.example"   # IDN: the email_validator path
            elif i % 50 == 5:
                email = f"User{i}@Example{i % 40}.COM"       # mixed case: still the fast path
            else:
                email = f"user{i}@example{i % 40}.com"
            name = f"User {i}"
            if kind == 7:
                email = f"user{i}.example.com"               # no @-sign
                exp.invalid += 1
            elif kind == 13 and i >= 10:
                email = f"user{i - 10}@EXAMPLE{(i - 10) % 40}.com"  # repeats line i - 10 + 2
                exp.duplicates += 1
            elif i % 1000 == 555:
                name = f"Evil {i}\r\nBcc: victim@example.org"  # a header injection
                exp.invalid += 1
            elif kind == 21:
                name = f'Doe, "JJ" {i}'
            elif kind == 33:
                name = f"王小明{i}"
            writer.writerow([email, name, f"org{i % 1000}", countries[i % 4]])
    exp.imported = n - exp.invalid - exp.duplicates
    return exp


def run_child(args: list[str], *, env: dict[str, str], cwd: Path, log: Path) \
        -> tuple[int, float, float, str]:
    """Run a child process; (exit status, wall seconds, peak RSS MiB, its stdout)."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        # wait4 gives this child's own rusage: ru_maxrss is its peak RSS (KiB on Linux).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return proc.returncode, seconds, rss, log.read_text(encoding="utf-8", errors="replace")


def summary_counts(output: str) -> dict[str, int] | None:
    for line in output.splitlines():
        words = line.replace(",", " ").replace("(", " ").replace(")", " ").split()
        if words[:1] == ["imported"] and "read" in words:
            return {"imported": int(words[1]), "updated": int(words[3]),
                    "skipped": int(words[5]), "rows": int(words[8])}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="rows in the file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the workspace here (default: a temp dir, removed after)")
    parser.add_argument("--no-reimport", action="store_true",
                        help="skip the second import of the same file")
    parser.add_argument("--no-results", action="store_true",
                        help="do not append to bench/results/import_bench.jsonl")
    args = parser.parse_args(argv)
    if args.n < 100:
        parser.error("--n must be at least 100")

    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="import-bench-")) if own_tmp \
        else args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _bench(args, workdir)
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(args: argparse.Namespace, workdir: Path) -> int:
    csv_path = workdir / "subscribers.csv"
    t0 = time.perf_counter()
    exp = generate(csv_path, args.n)
    gen_seconds = time.perf_counter() - t0
    size_mib = csv_path.stat().st_size / 2**20
    print(f"{args.n:,} rows, {size_mib:.1f} MiB, generated in {gen_seconds:.1f} s "
          f"({exp.invalid:,} invalid, {exp.duplicates:,} duplicates)")

    # Self-contained: no NEWSLETTER_* from the shell, no .env or config/ from the cwd.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    db = workdir / "var" / "newsletter.db"
    env.update(NEWSLETTER_VAR_DIR=str(workdir / "var"),
               NEWSLETTER_DATABASE_URL=f"sqlite:///{db}",
               NEWSLETTER_SECRET_KEY="bench-secret-key-not-for-production",
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cli = [sys.executable, "-m", "newsletter"]
    status, *_ = run_child([*cli, "lists", "create", "bench"], env=env, cwd=workdir,
                           log=workdir / "create.log")
    if status:
        print((workdir / "create.log").read_text(), file=sys.stderr)
        return 1

    runs: dict[str, dict[str, Any]] = {}
    ok = True
    plan: list[tuple[str, list[str], dict[str, int]]] = [
        ("dry run", ["--dry-run"], {"imported": exp.imported, "updated": 0}),
        ("import", [], {"imported": exp.imported, "updated": 0}),
    ]
    if not args.no_reimport:
        plan.append(("again", [], {"imported": 0, "updated": exp.imported}))
    for label, extra, want in plan:
        report = workdir / f"rejected-{label.replace(' ', '-')}.csv"
        status, seconds, rss, output = run_child(
            [*cli, "subscribers", "import", str(csv_path), "--list", "bench",
             "--report", str(report), *extra],
            env=env, cwd=workdir, log=workdir / f"{label.replace(' ', '-')}.log")
        counts = summary_counts(output)
        skipped = exp.rows - want["imported"] - want["updated"]
        right = counts == {**want, "skipped": skipped, "rows": exp.rows}
        if status or not right:
            ok = False
            print(f"{label}: exit {status}, counts {counts}, expected {want} and skipped "
                  f"{skipped}\n{output[-2000:]}", file=sys.stderr)
        runs[label] = {"seconds": seconds, "rows_per_s": exp.rows / seconds,
                       "peak_rss_mib": rss, "counts": counts, "ok": not status and right}

    with sqlite3.connect(db) as conn:
        members = conn.execute("SELECT count(*) FROM memberships WHERE status = 'active'") \
            .fetchone()[0]
        events = conn.execute("SELECT count(*) FROM membership_events WHERE source = 'import'") \
            .fetchone()[0]
    if members != exp.imported or events != exp.imported:
        ok = False
        print(f"database: {members:,} active members and {events:,} events, expected "
              f"{exp.imported:,}", file=sys.stderr)

    floor_db = workdir / "floor.db"
    status, seconds, rss, output = run_child(
        [sys.executable, "-c", FLOOR, str(csv_path), str(floor_db)],
        env=env, cwd=workdir, log=workdir / "floor.log")
    if status:
        ok = False
        print(f"floor failed:\n{output[-2000:]}", file=sys.stderr)
    runs["floor"] = {"seconds": seconds, "rows_per_s": exp.rows / seconds, "peak_rss_mib": rss}

    floor_s = runs["floor"]["seconds"]
    print(f"\n{'':24}{'seconds':>9}{'rows/s':>11}{'peak RSS':>11}{'x floor':>9}")
    for label, r in runs.items():
        name = {"dry run": "import --dry-run", "again": "import again (all on)",
                "floor": "floor: csv + sqlite3"}.get(label, "import (fresh list)")
        print(f"{name:24}{r['seconds']:9.2f}{r['rows_per_s']:11,.0f}"
              f"{r['peak_rss_mib']:8.1f} MiB{r['seconds'] / floor_s:8.2f}x")
    imp = runs["import"]
    # The target is for a million rows; smaller runs are dominated by start-up.
    target = "" if exp.rows < 1_000_000 else \
        f" (target: 1,000,000 rows < 30 s: " \
        f"{'met' if exp.rows / imp['seconds'] > 1_000_000 / 30 else 'NOT met'})"
    print(f"\nratio floor/ours (rate): {floor_s / imp['seconds']:.2f}; "
          f"the import takes {imp['seconds'] / floor_s:.1f}x the floor's time{target}")
    print(f"database: {members:,} active members, {events:,} import events; "
          f"counts {'exact' if ok else 'WRONG'}")

    if not args.no_results:
        RESULTS_DIR.mkdir(exist_ok=True)
        record = {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "n": exp.rows, "file_mib": round(size_mib, 1),
            "invalid": exp.invalid, "duplicates": exp.duplicates, "ok": ok,
            **{f"{k.replace(' ', '_')}_{f}": (round(v[f], 2) if isinstance(v[f], float)
                                              else v[f])
               for k, v in runs.items() for f in ("seconds", "rows_per_s", "peak_rss_mib")},
            "ratio_time_vs_floor": round(imp["seconds"] / floor_s, 2),
        }
        out = RESULTS_DIR / "import_bench.jsonl"
        with out.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"result appended to {out}")
    return 0 if ok else 1


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through finally: the temp workspace goes


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    sys.exit(main())
