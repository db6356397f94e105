#!/usr/bin/env python3
"""Benchmark: multi-worker delivery (`newsletter worker`) on PostgreSQL, against smtp-source.

What it does (see bench/README.md, "Worker benchmark"):
  1. creates a fresh PostgreSQL database (nl_bench_<stamp>_<pid>), writes a CSV of N
     subscribers (email,name), runs `newsletter lists create bench` and times
     `newsletter subscribers import FILE --list bench` (rows/s);
  2. starts Postfix's `smtp-sink` on a free loopback port; then for each worker count W:
     a. times the enqueue, `newsletter send ISSUE --list bench --yes` (`--again` after the
        first), run while no worker is running: it plans, renders and fixes the campaign's N
        ledger rows, says no worker is running and returns; checks exit 0 and N queued rows;
     b. starts W `newsletter worker` processes and times from their start until the
        campaign's status is 'completed' (polling campaigns.status every 0.5 s); measures
        each worker's CPU (utime+stime) and peak RSS (VmHWM) from /proc just before SIGTERM,
        the CPU of every `postgres` process over the window, and smtp-sink's CPU;
     c. checks N rows 'sent', none 'unknown' (or anything else), smtp-sink still alive;
     d. runs `smtp-source -d -s (W x concurrency) -m N -l SIZE` into the same sink, timed;
  3. prints a table and a cost model (worker and PostgreSQL cores per target rate), appends
     one JSON line to bench/results/workers_bench.jsonl and drops the database.

Every setting goes to the child processes through NEWSLETTER_* variables; the shell's own
NEWSLETTER_* are removed and everything runs in a temp workdir (no .env or config/ leaks in).
Exit status: 0 ok, 1 a send failed/miscounted/timed out or a tool failed, 2 missing tools/bad args.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from send_bench import (  # noqa: E402 - the send benchmark's helpers, same conventions
    INSTALL_HINT,
    TOOL_DIRS,
    find_tool,
    free_port,
    proc_cpu_seconds,
    resolve_issue,
    smtp_sink,
)

RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_ISSUE = "examples/issues/sample.md"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATES = (1_000, 5_000, 10_000, 20_000)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_SETTINGS = ("shared_buffers", "synchronous_commit", "fsync", "wal_level", "max_wal_size",
               "checkpoint_timeout", "work_mem", "effective_cache_size", "max_connections",
               "autovacuum", "full_page_writes", "commit_delay")


class BenchError(RuntimeError):
    """A step failed: reported, the run ends with status 1 (after cleaning up)."""


# --- /proc ---------------------------------------------------------------------------------------

def proc_stat(pid: int) -> tuple[str, float, int, int] | None:
    """(comm, utime+stime seconds, start time in ticks, parent pid) of a process, None if
    gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw.rpartition(")")[2].split()
    return comm, (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[19]), int(fields[1])


def vm_hwm_mib(pid: int) -> float | None:
    """Peak RSS of a live process (VmHWM), MiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


class PgCpu:
    """CPU of the PostgreSQL server's processes (comm 'postgres', and the postmaster or its
    children: another cluster on the same machine, e.g. a test suite's, is left out) over a
    window.

    Sampled at the start, every poll (0.5 s) and at the end: a process that exits in between
    keeps the CPU it had at its last sample (it loses at most the last 0.5 s); one started in
    the window counts from zero. Each process is keyed by (pid, start time), so a reused pid
    is a new process. `exclude` holds pids left out (the benchmark's own poller backend)."""

    def __init__(self, postmaster: int, exclude: set[int] | None = None) -> None:
        self.postmaster = postmaster
        self.exclude = exclude or set()
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.title: dict[tuple[int, int], str] = {}
        self.started = False

    def sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in self.exclude:
                continue
            st = proc_stat(pid)
            if st is None or st[0] != "postgres" or (pid != self.postmaster
                                                     and st[3] != self.postmaster):
                continue
            key = (pid, st[2])
            if key not in self.first:
                self.first[key] = st[1] if not self.started else 0.0
                with contextlib.suppress(OSError):
                    self.title[key] = Path(f"/proc/{pid}/cmdline").read_bytes() \
                        .replace(b"\0", b" ").decode(errors="replace").strip()
            self.last[key] = st[1]
        self.started = True

    def total(self) -> float:
        return sum(end - self.first[key] for key, end in self.last.items())

    def parts(self, db: str) -> dict[str, float]:
        """CPU by kind, from each process's title ("postgres: 15/main: postgres DB host
        idle", "... walwriter", "... autovacuum worker DB"): our database's client backends,
        autovacuum, the other background processes, backends of other databases."""
        out = {"our_backends": 0.0, "autovacuum": 0.0, "background": 0.0,
               "other_databases": 0.0}
        for key, end in self.last.items():
            title = self.title.get(key, "")
            words = title.split()
            if "autovacuum" in title:
                kind = "autovacuum"
            elif db in words:
                kind = "our_backends"
            elif len(words) >= 4 and words[0] == "postgres:" and "(" in title:
                kind = "other_databases"  # "postgres: 15/main: USER DB HOST(PORT) ..."
            else:
                kind = "background"  # postmaster, checkpointer, walwriter, bgwriter, ...
            out[kind] += end - self.first[key]
        return out


# --- PostgreSQL ----------------------------------------------------------------------------------

def pg_connect(dbname: str | None = None) -> Any:
    import psycopg

    url = PG_ADMIN_URL if dbname is None else PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname
    return psycopg.connect(url, autocommit=True)


def pg_info(conn: Any) -> dict[str, Any]:
    rows = conn.execute("SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)",
                        (list(PG_SETTINGS),)).fetchall()
    info: dict[str, Any] = {n: (s + (unit or "") if unit and unit not in ("8kB", "kB") else s)
                            for n, s, unit in rows}
    for n, s, unit in rows:  # sizes in MiB, readable
        if unit == "8kB":
            info[n] = f"{int(s) * 8 // 1024}MB"
        elif unit == "kB":
            info[n] = f"{int(s) // 1024}MB"
    info["version"] = conn.execute("SHOW server_version").fetchone()[0]
    return info


def pg_db_stats(conn: Any, db: str) -> dict[str, int]:
    row = conn.execute(
        "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_fetched, "
        "blks_read, blks_hit, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint "
        "FROM pg_stat_database WHERE datname = %s", (db,)).fetchone()
    keys = ("commits", "rollbacks", "tup_inserted", "tup_updated", "tup_fetched",
            "blks_read", "blks_hit", "wal_bytes")
    return {k: int(v) for k, v in zip(keys, row, strict=True)}


# The SELECT of a worker's claim of queued rows (store/claims.py `claim`), with the batch
# size. Since 8d5482a a worker takes rows after the last id it claimed (keyset, the `id > %s`);
# before, it searched from the start of the campaign. EXPLAIN shows which index PostgreSQL
# walks; EXPLAIN ANALYZE halfway through a send, what one search costs in either form.
CLAIM_SELECT = (
    "SELECT deliveries.id FROM deliveries WHERE deliveries.campaign_id = %s "
    "AND deliveries.status = 'queued' AND deliveries.worker_id IS NULL "
    "AND (deliveries.next_attempt_at IS NULL OR deliveries.next_attempt_at <= now()) "
    "AND deliveries.id > %s ORDER BY deliveries.id LIMIT %s"
)


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


def claim_plan(conn: Any, campaign_id: int, limit: int, *, analyze: bool,
               after_id: int = 0) -> dict[str, Any]:
    """The claim's plan; with analyze it runs once, without FOR UPDATE (nothing is locked):
    how long one claim's search takes, how many rows it walks past and buffers it touches."""
    opts = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    (doc,) = conn.execute(f"EXPLAIN ({opts}) {CLAIM_SELECT} FOR UPDATE SKIP LOCKED"
                          if not analyze else f"EXPLAIN ({opts}) {CLAIM_SELECT}",
                          (campaign_id, after_id, limit)).fetchone()
    top = doc[0]
    nodes = _plan_nodes(top["Plan"])
    out: dict[str, Any] = {
        "indexes": [n["Index Name"] for n in nodes if "Index Name" in n],
        "nodes": [n["Node Type"] for n in nodes],
    }
    if analyze:
        out["ms"] = round(top["Execution Time"], 2)
        out["rows_removed_by_filter"] = sum(int(n.get("Rows Removed by Filter", 0))
                                            for n in nodes)
        top_node = nodes[0]  # its buffers include its children's
        out["buffers"] = int(top_node.get("Shared Hit Blocks", 0)) \
            + int(top_node.get("Shared Read Blocks", 0))
    return out


def claim_halfway(conn: Any, campaign_id: int, limit: int, sent: int) -> dict[str, Any]:
    """Once, halfway through a send: one claim's search from the start of the campaign (the
    form before 8d5482a) and after the highest id sent so far (about where a worker's keyset
    is). The poller's backend runs them; its CPU is not counted as PostgreSQL's."""
    after = conn.execute("SELECT coalesce(max(id), 0) FROM deliveries WHERE campaign_id = %s "
                         "AND status = 'sent'", (campaign_id,)).fetchone()[0]
    out: dict[str, Any] = {"sent": sent,
                           "from_start": claim_plan(conn, campaign_id, limit, analyze=True),
                           "keyset": {"after_id": int(after),
                                      **claim_plan(conn, campaign_id, limit, analyze=True,
                                                   after_id=after)}}
    for label, key in (("from the start", "from_start"), ("after the last sent id", "keyset")):
        r = out[key]
        print(f"  halfway: one claim's SELECT {label}: {r['ms']:.1f} ms via "
              f"{', '.join(r['indexes']) or r['nodes']}, {r['buffers']:,} buffers, "
              f"{r['rows_removed_by_filter']:,} rows filtered out", flush=True)
    return out


def git_state() -> tuple[str, list[str]]:
    """HEAD and the files changed under newsletter/ (the code a worker started now runs)."""
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = [line[3:] for line in subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no", "--",
         "newsletter"], capture_output=True, text=True).stdout.splitlines()]
    return commit, dirty


# --- children ------------------------------------------------------------------------------------

def run_cli(args: list[str], *, env: dict[str, str], cwd: Path, log: Path,
            timeout: float) -> tuple[int, float, str]:
    """Run `python -m newsletter ARGS`; (exit status, wall seconds, output)."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "newsletter", *args], env=env, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"`newsletter {' '.join(args)}` took longer than {timeout:.0f}s; "
                             f"see {log}") from None
    return status, time.perf_counter() - t0, log.read_text(errors="replace")


@dataclass
class WorkerProc:
    """One `newsletter worker` child: its output is copied to a log by a thread, which also
    notes when the worker said it started (imports, settings and registration done)."""

    index: int
    proc: subprocess.Popen[bytes]
    log: Path
    t_spawn: float
    t_started: float | None = None
    cpu_at_started: float | None = None
    lines: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def pump(self, sink: IO[str]) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            sink.write(line + "\n")
            sink.flush()
            if self.t_started is None and re.search(r"worker .* started$", line):
                self.t_started = time.perf_counter()
                self.cpu_at_started = proc_cpu_seconds(self.proc.pid)

    def sent(self) -> int | None:
        """Messages this worker sent, from its last line ("... stopped: sent N in R run(s)")."""
        for line in reversed(self.lines):
            m = re.search(r"stopped: sent ([\d,]+) in", line)
            if m:
                return int(m.group(1).replace(",", ""))
        return None


def start_workers(w: int, env: dict[str, str], cwd: Path, tag: str) -> list[WorkerProc]:
    procs: list[WorkerProc] = []
    for i in range(w):
        log = cwd / f"worker-{tag}-{i + 1}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "worker", "--name", f"bench-{tag}-{i + 1}"],
            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        wp = WorkerProc(i + 1, proc, log, time.perf_counter())
        fh = log.open("w")
        wp.thread = threading.Thread(target=lambda wp=wp, fh=fh: (wp.pump(fh), fh.close()),
                                     daemon=True)
        wp.thread.start()
        procs.append(wp)
    return procs


def stop_workers(procs: list[WorkerProc], timeout: float = 60.0) -> list[int | None]:
    """SIGTERM every worker (they finish in flight, hand back, exit), SIGKILL after timeout."""
    for wp in procs:
        if wp.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                wp.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for wp in procs:
        try:
            codes.append(wp.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            wp.proc.kill()
            wp.proc.wait()
            codes.append(None)
        if wp.thread is not None:
            wp.thread.join(timeout=5)
    return codes


def start_py_spy(out_dir: Path, pid: int, tag: str) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"worker-{tag}.txt"
    print(f"  py-spy record of worker pid {pid} -> {out}", flush=True)
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100", "--idle",
                             "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=(out_dir / f"py-spy-{tag}.log").open("w"))


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


_LIVE_WORKERS: list[WorkerProc] = []  # killed by the finally in main(), whatever happens


# --- the steps -----------------------------------------------------------------------------------

def generate_csv(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,name\n")
        chunk: list[str] = []
        for i in range(n):
            chunk.append(f"user{i}@example{i % 40}.com,User {i}\n")
            if len(chunk) == 10_000:
                fh.write("".join(chunk))
                chunk = []
        fh.write("".join(chunk))


def message_size(env: dict[str, str], campaign_id: int) -> int:
    """Bytes of one of the campaign's messages as a worker builds it (`campaign_message`,
    as `Worker._deliver` does), for smtp-source's -l."""
    from newsletter.render.message import Recipient
    from newsletter.service import Newsletter
    from newsletter.settings import load_settings

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("NEWSLETTER_")})
    try:
        nl = Newsletter(load_settings())
        c = nl.store.get_campaign(campaign_id)
        mlists = list(nl.store.lists_by_id(c.list_ids).values())
        message = nl.campaign_message(c, mlists)
        size = len(message.build(Recipient(1, mlists[0].id, "user1@example1.com", "User 1")))
        nl.store.engine.dispose()
        return size
    finally:
        os.environ.clear()
        os.environ.update(saved)


def campaign_counts(conn: Any, campaign_id: int) -> dict[str, int]:
    return {s: int(n) for s, n in conn.execute(
        "SELECT status, count(*) FROM deliveries WHERE campaign_id = %s GROUP BY status",
        (campaign_id,)).fetchall()}


def enqueue(args: argparse.Namespace, env: dict[str, str], cwd: Path, conn: Any, issue: Path,
            again: bool, tag: str) -> tuple[int, float]:
    """`newsletter send` with no worker running: returns (campaign id, seconds)."""
    left = conn.execute("SELECT count(*) FROM workers").fetchone()[0]
    if left:
        raise BenchError(f"{left} worker row(s) still registered before the enqueue; "
                         "`newsletter send` would wait for them")
    before = conn.execute("SELECT coalesce(max(id), 0) FROM campaigns").fetchone()[0]
    cmd = ["send", str(issue), "--list", "bench", "--yes", *(["--again"] if again else [])]
    status, seconds, output = run_cli(cmd, env=env, cwd=cwd, log=cwd / f"send-{tag}.log",
                                      timeout=args.timeout)
    if status != 0:
        raise BenchError(f"`newsletter {' '.join(cmd)}` exited {status}:\n{output[-2000:]}")
    if "no `newsletter worker`" not in output.replace("\n", " "):
        print(f"  note: the send did not say that no worker is running:\n{output[-800:]}")
    row = conn.execute("SELECT id, status FROM campaigns WHERE id > %s ORDER BY id DESC LIMIT 1",
                       (before,)).fetchone()
    if row is None:
        raise BenchError(f"`newsletter send` created no campaign:\n{output[-2000:]}")
    campaign_id, cstatus = int(row[0]), row[1]
    counts = campaign_counts(conn, campaign_id)
    if cstatus != "running" or counts != {"queued": args.n}:
        raise BenchError(f"campaign {campaign_id} is {cstatus!r} with rows {counts}; expected "
                         f"'running' with {args.n} queued")
    return campaign_id, seconds


def timed_send(args: argparse.Namespace, w: int, env: dict[str, str], cwd: Path, conn: Any,
               db: str, campaign_id: int, sink: subprocess.Popen[bytes], tag: str) \
        -> dict[str, Any]:
    """Start W workers, wait for the campaign to complete, measure; workers stopped after."""
    poller_pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    st = proc_stat(poller_pid)
    if st is None:
        raise BenchError("cannot read the PostgreSQL backend's /proc entry: is the server on "
                         "this machine?")
    pg = PgCpu(postmaster=st[3], exclude={poller_pid})
    stats0 = pg_db_stats(conn, db)
    poller0 = proc_cpu_seconds(poller_pid) or 0.0
    pg.sample()
    sink0 = proc_cpu_seconds(sink.pid)
    t0 = time.perf_counter()
    procs = start_workers(w, env, cwd, tag)
    _LIVE_WORKERS.extend(procs)
    last_progress, last_sent = t0, 0
    status = "running"
    half: dict[str, Any] | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        while True:
            time.sleep(0.5)
            if args.profile_worker is not None and spy is None and procs[0].t_started:
                spy = start_py_spy(args.profile_worker, procs[0].proc.pid, tag)
            status = conn.execute("SELECT status FROM campaigns WHERE id = %s",
                                  (campaign_id,)).fetchone()[0]
            now = time.perf_counter()
            pg.sample()
            if status != "running":
                break
            dead = [wp for wp in procs if wp.proc.poll() is not None]
            if dead:
                raise BenchError(f"worker {dead[0].index} exited with {dead[0].proc.returncode} "
                                 f"during the send; see {dead[0].log}:\n"
                                 + "\n".join(dead[0].lines[-20:]))
            if sink.poll() is not None:
                raise BenchError(f"smtp-sink exited with {sink.returncode} during the send")
            if now - t0 > args.timeout:
                raise BenchError(f"campaign {campaign_id} not completed after {args.timeout:.0f}s "
                                 f"(--timeout); rows: {campaign_counts(conn, campaign_id)}")
            if now - last_progress >= args.progress_every:
                sent = conn.execute("SELECT count(*) FROM deliveries WHERE campaign_id = %s "
                                    "AND status = 'sent'", (campaign_id,)).fetchone()[0]
                cpu = [proc_cpu_seconds(wp.proc.pid) or 0.0 for wp in procs]
                print(f"  {now - t0:7.1f}s  sent {sent:>10,}  ({sent / (now - t0):,.0f} msg/s "
                      f"so far, {(sent - last_sent) / (now - last_progress):,.0f} msg/s "
                      f"since the last line; workers' CPU {sum(cpu):.1f}s, PostgreSQL's "
                      f"{pg.total() - pg.parts(db)['other_databases']:.1f}s)", flush=True)
                last_progress, last_sent = now, sent
                if half is None and sent >= args.n // 2:
                    half = claim_halfway(conn, campaign_id, args.worker_batch_size, sent)
        t1 = time.perf_counter()
        # Right before SIGTERM: each worker's CPU and peak RSS, then the rest.
        cpu_end = [proc_cpu_seconds(wp.proc.pid) for wp in procs]
        hwm = [vm_hwm_mib(wp.proc.pid) for wp in procs]
        sink1 = proc_cpu_seconds(sink.pid)
        pg.sample()
        stats1 = pg_db_stats(conn, db)
        poller1 = proc_cpu_seconds(poller_pid) or 0.0
    finally:
        if spy is not None:
            stop_py_spy(spy)
        codes = stop_workers(procs)
        for wp in procs:
            with contextlib.suppress(ValueError):
                _LIVE_WORKERS.remove(wp)
    if status != "completed":
        raise BenchError(f"campaign {campaign_id} ended as {status!r}; rows "
                         f"{campaign_counts(conn, campaign_id)}")
    if any(c is None for c in cpu_end):
        raise BenchError("a worker had exited before its CPU could be read")
    seconds = t1 - t0
    worker_cpu = [float(c) for c in cpu_end if c is not None]
    startup_cpu = [wp.cpu_at_started for wp in procs]
    startup_s = [None if wp.t_started is None else wp.t_started - wp.t_spawn for wp in procs]
    counts = campaign_counts(conn, campaign_id)
    if sink.poll() is not None:
        raise BenchError(f"smtp-sink exited with {sink.returncode} after the send")

    parts = pg.parts(db)
    d = {k: stats1[k] - stats0[k] for k in stats0}
    return {
        "workers": w, "campaign_id": campaign_id, "seconds": seconds,
        "counts": counts, "worker_exit_codes": codes,
        "worker_cpu_seconds": [round(c, 3) for c in worker_cpu],
        "worker_startup_cpu_seconds": [None if c is None else round(c, 3) for c in startup_cpu],
        "worker_startup_seconds": [None if s is None else round(s, 3) for s in startup_s],
        "worker_peak_rss_mib": [None if h is None else round(h, 1) for h in hwm],
        "worker_sent": [wp.sent() for wp in procs],
        # Ours: our database's backends, autovacuum and the shared background processes
        # (walwriter, checkpointer, ...); backends of other databases (a test suite) are not.
        "pg_cpu_seconds": pg.total() - parts["other_databases"],
        "pg_cpu_seconds_all": pg.total(),
        "pg_cpu_parts": {k: round(v, 3) for k, v in parts.items()},
        "pg_processes_seen": len(pg.last),
        "poller_backend_cpu_seconds": round(poller1 - poller0, 3),
        "sink_cpu_seconds": None if sink0 is None or sink1 is None else sink1 - sink0,
        "pg_stats": d, "claim_halfway": half,
    }


def run_smtp_source(path: str, port: int, n: int, sessions: int, size: int, timeout: float,
                    sink_pid: int, log: Path) -> dict[str, Any]:
    cmd = [path, "-d", "-s", str(sessions), "-m", str(n), "-l", str(size), f"127.0.0.1:{port}"]
    sink0 = proc_cpu_seconds(sink_pid)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, proc.kill)
    killer.daemon = True
    killer.start()
    try:
        # wait4: smtp-source's own CPU, apart from every other child's
        _, wstatus, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(wstatus)
    seconds = time.perf_counter() - t0
    sink1 = proc_cpu_seconds(sink_pid)
    if proc.returncode != 0:
        why = f"killed after {timeout:.0f}s" if seconds >= timeout else \
            f"exited with {proc.returncode}"
        raise BenchError(f"{' '.join(cmd)} {why}: "
                         f"{log.read_text(errors='replace').strip()[-500:]}")
    return {"seconds": seconds, "command": " ".join(cmd),
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "sink_cpu_seconds": None if sink0 is None or sink1 is None else sink1 - sink0}


# --- reporting -----------------------------------------------------------------------------------

def derive(n: int, ours: dict[str, Any], src: dict[str, Any], enqueue_s: float,
           size: int) -> dict[str, Any]:
    wcpu = sum(ours["worker_cpu_seconds"])
    pgcpu = ours["pg_cpu_seconds"]
    rate = n / ours["seconds"]
    src_rate = n / src["seconds"]
    st = ours["pg_stats"]
    rss = [r for r in ours["worker_peak_rss_mib"] if r is not None]
    startup = [c for c in ours["worker_startup_cpu_seconds"] if c is not None]
    return {
        "workers": ours["workers"], "ours_msg_per_s": round(rate, 1),
        "source_msg_per_s": round(src_rate, 1), "ratio": round(rate / src_rate, 3),
        "seconds": round(ours["seconds"], 3), "source_seconds": round(src["seconds"], 3),
        "worker_cpu_seconds_total": round(wcpu, 3),
        "worker_cpu_us_per_msg": round(wcpu / n * 1e6, 1),
        "worker_cpu_us_per_msg_after_startup":
            round((wcpu - sum(startup)) / n * 1e6, 1) if len(startup) == len(rss) else None,
        "worker_core_share": round(wcpu / ours["seconds"], 3),
        "pg_cpu_seconds": round(pgcpu, 3), "pg_cpu_us_per_msg": round(pgcpu / n * 1e6, 1),
        "pg_core_share": round(pgcpu / ours["seconds"], 3),
        "db_share": round(pgcpu / (pgcpu + wcpu), 3) if pgcpu + wcpu else None,
        "sink_cpu_us_per_msg": None if ours["sink_cpu_seconds"] is None
        else round(ours["sink_cpu_seconds"] / n * 1e6, 1),
        "source_sink_cpu_us_per_msg": None if src["sink_cpu_seconds"] is None
        else round(src["sink_cpu_seconds"] / n * 1e6, 1),
        "source_cpu_us_per_msg": round(src["cpu_seconds"] / n * 1e6, 1),
        "peak_rss_mib_max": max(rss) if rss else None,
        "enqueue_seconds": round(enqueue_s, 3),
        "commits_per_msg": round(st["commits"] / n, 3),
        "wal_bytes_per_msg": round(st["wal_bytes"] / n, 1),
        "message_bytes": size,
    }


def cost_model(d: dict[str, Any]) -> dict[str, Any]:
    """Cores needed for target rates, from one run's CPU per message."""
    c_w, c_pg = d["worker_cpu_us_per_msg"] / 1e6, d["pg_cpu_us_per_msg"] / 1e6
    return {
        "c_w_s_per_msg": c_w, "c_pg_s_per_msg": c_pg,
        "msg_per_s_per_worker_core": round(1 / c_w) if c_w else None,
        "msg_per_s_per_pg_core": round(1 / c_pg) if c_pg else None,
        "targets": [{"rate": r, "worker_cores": round(r * c_w, 2),
                     "worker_processes_min": math.ceil(r * c_w),
                     "pg_cores": round(r * c_pg, 2)} for r in TARGET_RATES],
    }


def host_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, IndexError, ValueError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    commit, dirty = git_state()
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu,
            "mem_gib": mem, "python": platform.python_version(), "kernel": platform.release(),
            "git_commit": commit, "newsletter_dirty": dirty,
            "loadavg_start": list(os.getloadavg())}


def print_table(n: int, rows: list[dict[str, Any]], concurrency: int) -> None:
    print(f"\n{n:,} messages of {rows[0]['message_bytes']:,} bytes, {concurrency} connections "
          "per worker, PostgreSQL ledger:")
    head = (f"{'W':>2} | {'ours msg/s':>10} | {'smtp-source':>11} | {'ratio':>5} | "
            f"{'wall s':>8} | {'worker CPU':>10} | {'PG CPU':>7} | {'DB':>5} | "
            f"{'peak RSS':>8} | {'enqueue':>7}")
    print(head)
    print(f"{'':>2} | {'':>10} | {'msg/s':>11} | {'':>5} | {'':>8} | {'µs/msg':>10} | "
          f"{'µs/msg':>7} | {'share':>5} | {'MiB max':>8} | {'s':>7}")
    print("-" * len(head))
    for d in rows:
        print(f"{d['workers']:>2} | {d['ours_msg_per_s']:>10,.0f} | "
              f"{d['source_msg_per_s']:>11,.0f} | {d['ratio']:>5.2f} | {d['seconds']:>8.1f} | "
              f"{d['worker_cpu_us_per_msg']:>10.0f} | {d['pg_cpu_us_per_msg']:>7.0f} | "
              f"{d['db_share']:>5.0%} | {d['peak_rss_mib_max'] or 0:>8.1f} | "
              f"{d['enqueue_seconds']:>7.1f}")


def print_details(rows: list[dict[str, Any]], raw: list[dict[str, Any]]) -> None:
    print("\nper W: workers' and PostgreSQL's share of a core over the window, sink CPU, "
          "commits and WAL per message:")
    for d, r in zip(rows, raw, strict=True):
        parts = r["pg_cpu_parts"]
        startup = ", ".join("?" if c is None else f"{c:.2f}s"
                            for c in r["worker_startup_cpu_seconds"])
        print(f"  W={d['workers']}: workers {d['worker_core_share']:.2f} cores "
              f"(per worker {', '.join(f'{c:.1f}s' for c in r['worker_cpu_seconds'])}; "
              f"start-up {startup}"
              f" -> {d['worker_cpu_us_per_msg_after_startup']} µs/msg after start-up); "
              f"PG {d['pg_core_share']:.2f} cores "
              f"(our backends {parts['our_backends']:.1f}s, autovacuum {parts['autovacuum']:.1f}s, "
              f"background {parts['background']:.1f}s, other dbs {parts['other_databases']:.1f}s); "
              f"sink {d['sink_cpu_us_per_msg']} µs/msg (smtp-source run: "
              f"{d['source_sink_cpu_us_per_msg']}); {d['commits_per_msg']} commits/msg, "
              f"{d['wal_bytes_per_msg']:,.0f} WAL bytes/msg; sent per worker "
              f"{r['worker_sent']}")


def print_cost(rows: list[dict[str, Any]], machine_cores: int) -> None:
    print("\ncost model: a worker host of K cores sustains ~K / c_w msg/s; a PostgreSQL server "
          "of P cores ~P / c_pg msg/s before the database is the limit.")
    print("(one worker process is one asyncio thread: at most ~1 core each, so worker "
          "processes >= worker cores.)")
    print(f"{'from W':>6} | {'c_w µs':>7} | {'c_pg µs':>7} | {'msg/s per':>9} | "
          f"{'msg/s per':>9} | " + " | ".join(f"{r // 1000}k: wkr / PG cores"
                                              for r in TARGET_RATES))
    print(f"{'':>6} | {'':>7} | {'':>7} | {'wkr core':>9} | {'PG core':>9} |")
    for d in rows:
        m = d["cost_model"]
        cells = " | ".join(f"{t['worker_cores']:>7.2f} / {t['pg_cores']:<6.2f}"
                           for t in m["targets"])
        print(f"{d['workers']:>6} | {d['worker_cpu_us_per_msg']:>7.0f} | "
              f"{d['pg_cpu_us_per_msg']:>7.0f} | {m['msg_per_s_per_worker_core'] or 0:>9,} | "
              f"{m['msg_per_s_per_pg_core'] or 0:>9,} | {cells}")
    print(f"note: on this {machine_cores}-core machine workers, PostgreSQL and smtp-sink share "
          f"{machine_cores} cores, so W > {machine_cores} cannot raise the wall-clock rate; the "
          "CPU per message is the figure that carries over to bigger machines.")


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Deliver one campaign with W `newsletter worker` processes on PostgreSQL, "
                    "and compare with smtp-source into the same smtp-sink.")
    ap.add_argument("--n", type=int, default=1_000_000, help="subscribers = messages per send "
                    "(default 1000000)")
    ap.add_argument("--workers", default="1,2,4",
                    help="worker counts to run, comma-separated (default 1,2,4)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="send_concurrency of each worker (default 16); smtp-source gets "
                         "W x this many sessions")
    ap.add_argument("--issue", default=DEFAULT_ISSUE, help=f"issue file (default {DEFAULT_ISSUE})")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the CSV, logs and var/ here (default: a temp dir, removed after)")
    ap.add_argument("--keep-db", action="store_true", help="do not drop the database at the end")
    ap.add_argument("--no-vacuum", action="store_true",
                    help="do not run VACUUM ANALYZE deliveries + CHECKPOINT after each enqueue "
                         "(outside the timed window; it stands in for autovacuum, which may be "
                         "off on the server)")
    ap.add_argument("--clear-ledger", action="store_true",
                    help="delete the earlier W's ledger rows before the next enqueue (not "
                         "timed), so every W starts from a table holding only its own campaign "
                         "(default: they stay, as a real ledger's history does; see the README "
                         "on the claim's plan for why this matters)")
    ap.add_argument("--synchronous-commit", choices=("on", "off", "local"), default=None,
                    help="ALTER DATABASE <bench db> SET synchronous_commit (default: the "
                         "server's setting); off shows what waiting for the WAL flush costs")
    ap.add_argument("--profile-worker", type=Path, default=None, metavar="DIR",
                    help="py-spy record (--idle, 100 Hz, raw) worker 1 of each W into DIR; "
                         "py-spy takes CPU, so such a run is not written to bench/results/")
    ap.add_argument("--progress-every", type=float, default=10.0,
                    help="seconds between progress lines (each one count(*)s the sent rows; "
                         "default 10, at least 5)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="limit in seconds for each send, enqueue and smtp-source run "
                         "(default 60 + n/200)")
    ap.add_argument("--pin-code", action="store_true",
                    help="export the committed newsletter/ of HEAD (git archive) into the "
                         "workdir at the start and run every command of the run from it, so "
                         "commits or edits made meanwhile do not reach later workers "
                         "(uncommitted changes are then not measured)")
    ap.add_argument("--no-results", action="store_true",
                    help="do not append to bench/results/workers_bench.jsonl")
    args = ap.parse_args(argv)

    if not 1 <= args.n <= 10_000_000:
        ap.error("--n must be between 1 and 10,000,000")
    if not 1 <= args.concurrency <= 256:
        ap.error("--concurrency must be between 1 and 256 (the setting's own range)")
    try:
        counts = [int(x) for x in args.workers.split(",") if x.strip()]
    except ValueError:
        ap.error("--workers is a comma-separated list of integers, e.g. 1,2,4")
    if not counts or any(not 1 <= w <= 32 for w in counts):
        ap.error("--workers: each count between 1 and 32")
    args.worker_counts = counts
    args.progress_every = max(5.0, args.progress_every)
    args.timeout = args.timeout or 60.0 + args.n / 200
    issue = resolve_issue(args.issue)
    if not issue.is_file():
        ap.error(f"no issue file {issue}")

    sink_path, source_path = find_tool("smtp-sink"), find_tool("smtp-source")
    if not sink_path or not source_path:
        print(f"error: smtp-sink/smtp-source not found on PATH or in {', '.join(TOOL_DIRS)}.\n",
              file=sys.stderr)
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    try:
        admin = pg_connect()
    except Exception as exc:
        print(f"error: cannot reach PostgreSQL as {PG_ADMIN_URL}: {exc}", file=sys.stderr)
        return 2

    for key in [k for k in os.environ if k.startswith("NEWSLETTER_")]:
        del os.environ[key]
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-")) if own_tmp \
        else args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    db = f"nl_bench_{stamp.lower()}_{os.getpid()}"
    created = False
    conn = None
    old_cwd = Path.cwd()
    os.chdir(workdir)  # no .env or config/newsletter.toml from the caller's directory
    try:
        admin.execute(f'CREATE DATABASE "{db}"')
        created = True
        if args.synchronous_commit:
            admin.execute(f'ALTER DATABASE "{db}" SET synchronous_commit = '
                          f'{args.synchronous_commit}')
        conn = pg_connect(db)
        return _bench(args, workdir, db, conn, issue, sink_path, source_path, stamp,
                      pg_info(admin))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for wp in list(_LIVE_WORKERS):
            with contextlib.suppress(Exception):
                wp.proc.kill()
                wp.proc.wait(timeout=10)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if created and not args.keep_db:
            with contextlib.suppress(Exception):
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        elif created:
            print(f"database kept: {db}")
        admin.close()
        os.chdir(old_cwd)
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench(args: argparse.Namespace, workdir: Path, db: str, conn: Any, issue: Path,
           sink_path: str, source_path: str, stamp: str, pg: dict[str, Any]) -> int:
    n = args.n
    host = host_info()
    code_root = REPO_ROOT
    if args.pin_code:
        code_root = workdir / "code"
        code_root.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar",
                              host["git_commit"], "newsletter"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(code_root)], input=tar.stdout, check=True)
        if host["newsletter_dirty"]:
            print("note: --pin-code runs the committed code; uncommitted changes in "
                  f"{', '.join(host['newsletter_dirty'])} are not measured")
        host["newsletter_dirty"] = []
        print(f"code pinned: {host['git_commit'][:10]} exported to {code_root}")
    args.code = (host["git_commit"], host["newsletter_dirty"])
    args.pinned = args.pin_code
    sys.path.insert(0, str(code_root))  # message_size() builds with the same code
    from newsletter.settings import Settings

    args.worker_batch_size = Settings.model_fields["worker_batch_size"].default
    pg["synchronous_commit_bench_db"] = conn.execute("SHOW synchronous_commit").fetchone()[0]
    print(f"database {db} (PostgreSQL {pg['version']}: shared_buffers {pg['shared_buffers']}, "
          f"synchronous_commit {pg['synchronous_commit_bench_db']}, fsync {pg['fsync']}, "
          f"autovacuum {pg['autovacuum']}); "
          f"workdir {workdir}")
    print(f"host {host['host']}: {host['cpus']} cores ({host['cpu_model']}), load "
          f"{' '.join(f'{x:.2f}' for x in host['loadavg_start'])}; commit "
          f"{host['git_commit'][:10]}"
          + (f" (uncommitted changes in {', '.join(host['newsletter_dirty'])})"
             if host['newsletter_dirty'] else ""))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update(
        NEWSLETTER_DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{db}",
        NEWSLETTER_VAR_DIR=str(workdir / "var"),
        NEWSLETTER_SMTP_URL=f"smtp://127.0.0.1:{port}",
        NEWSLETTER_SECRET_KEY=secrets.token_urlsafe(32),
        NEWSLETTER_DELIVERY_WORKERS="true",
        NEWSLETTER_SEND_CONCURRENCY=str(args.concurrency),
        NEWSLETTER_BASE_URL="https://news.example.org",
        NEWSLETTER_FROM="Bench <bench@example.org>",
        NEWSLETTER_POSTAL_ADDRESS="1 Example Street",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(code_root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )

    # 1. subscribers
    csv_path = workdir / "subscribers.csv"
    t = time.perf_counter()
    generate_csv(csv_path, n)
    print(f"{n:,} subscribers written to {csv_path.name} "
          f"({csv_path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f}s")
    status, _, out = run_cli(["lists", "create", "bench"], env=env, cwd=workdir,
                             log=workdir / "lists-create.log", timeout=120)
    if status:
        raise BenchError(f"`newsletter lists create bench` exited {status}:\n{out[-2000:]}")
    status, import_s, out = run_cli(["subscribers", "import", str(csv_path), "--list", "bench"],
                                    env=env, cwd=workdir, log=workdir / "import.log",
                                    timeout=args.timeout)
    active = conn.execute("SELECT count(*) FROM memberships WHERE status = 'active'").fetchone()[0]
    if status or active != n:
        raise BenchError(f"import exited {status} with {active:,} active members (expected "
                         f"{n:,}):\n{out[-2000:]}")
    print(f"import: {n:,} rows in {import_s:.1f}s = {n / import_s:,.0f} rows/s", flush=True)
    if not args.no_vacuum:
        conn.execute("VACUUM ANALYZE")

    raw: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    size = 0
    error: str | None = None
    try:
        with smtp_sink(sink_path, port) as sink:
            print(f"smtp-sink on 127.0.0.1:{port} (pid {sink.pid})")
            for k, w in enumerate(args.worker_counts):
                size = _one_w(args, k, w, env, workdir, conn, db, issue, sink, port,
                              source_path, size, raw, rows)
    except (BenchError, KeyboardInterrupt, SystemExit) as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if rows:
            print_table(n, rows, args.concurrency)
            print_details(rows, raw)
            print_cost(rows, os.cpu_count() or 0)
            print("\nPostgreSQL CPU = utime+stime of the server's `postgres` processes: the "
                  "bench database's backends, autovacuum and the background processes, not "
                  "backends of other databases (shown apart as 'other dbs') nor the benchmark's "
                  "own polling backend; sampled every 0.5 s, so a process that exits loses at "
                  "most its last 0.5 s.")
        print(f"import {n / import_s:,.0f} rows/s ({import_s:.1f}s); load average at the end "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if not args.no_results and args.profile_worker is None:
            record = {
                "when": stamp, **host, "loadavg_end": list(os.getloadavg()),
                "postgres": pg, "database": db, "n": n, "concurrency": args.concurrency,
                "worker_batch_size": args.worker_batch_size,
                "worker_counts": args.worker_counts, "issue": str(issue),
                "message_bytes": size, "vacuum_before_send": not args.no_vacuum,
                "clear_ledger": args.clear_ledger, "pin_code": args.pin_code,
                "synchronous_commit_set": args.synchronous_commit,
                "import_seconds": round(import_s, 3),
                "import_rows_per_s": round(n / import_s, 1),
                "runs": [{**d, "raw": {k: v for k, v in r.items() if k != "source"},
                          "source_command": r["source"]["command"]}
                         for d, r in zip(rows, raw, strict=True)],
                "ok": error is None, "error": error,
            }
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            path = RESULTS_DIR / "workers_bench.jsonl"
            with path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
            print(f"result appended to {path}" + ("" if error is None else
                                                   " (partial: ok false)"))
    return 0


def _one_w(args: argparse.Namespace, k: int, w: int, env: dict[str, str], workdir: Path,
           conn: Any, db: str, issue: Path, sink: subprocess.Popen[bytes], port: int,
           source_path: str, size: int, raw: list[dict[str, Any]],
           rows: list[dict[str, Any]]) -> int:
    """One worker count: enqueue, timed send, checks, smtp-source; appends to raw and rows."""
    n = args.n
    tag = f"{k + 1}-w{w}"
    if k and args.clear_ledger:
        # Every W starts from a table of its own campaign only (not timed).
        t = time.perf_counter()
        gone = conn.execute("DELETE FROM deliveries").rowcount
        conn.execute("VACUUM deliveries")
        print(f"\n[W={w}] earlier ledger rows deleted ({gone:,}) and vacuumed (not timed): "
              f"{time.perf_counter() - t:.1f}s", flush=True)
    print(f"\n[W={w}] enqueue: newsletter send {issue.name} --list bench --yes"
          + (" --again" if k else "") + " (no worker running) ...", flush=True)
    campaign_id, enqueue_s = enqueue(args, env, workdir, conn, issue, again=k > 0, tag=tag)
    if not size:
        size = message_size(env, campaign_id)
    print(f"[W={w}] campaign {campaign_id}: {n:,} rows queued in {enqueue_s:.1f}s; "
          f"message {size:,} bytes", flush=True)
    if not args.no_vacuum:
        t = time.perf_counter()
        conn.execute("VACUUM ANALYZE deliveries")
        conn.execute("CHECKPOINT")
        print(f"[W={w}] VACUUM ANALYZE deliveries + CHECKPOINT (not timed): "
              f"{time.perf_counter() - t:.1f}s", flush=True)
    plan = claim_plan(conn, campaign_id, args.worker_batch_size, analyze=False)
    print(f"[W={w}] the claim's SELECT walks {', '.join(plan['indexes']) or plan['nodes']}",
          flush=True)
    commit, dirty = args.code if args.pinned else git_state()
    if (commit, dirty) != (args.code[0], args.code[1]):
        print(f"[W={w}] warning: the code changed since the run started: now {commit[:10]}"
              + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else ""),
              flush=True)
    print(f"[W={w}] starting {w} worker(s), {args.concurrency} connections each ...",
          flush=True)
    ours = timed_send(args, w, env, workdir, conn, db, campaign_id, sink, tag)
    ours["claim_plan_at_start"] = plan
    ours["git_commit"], ours["newsletter_dirty"] = commit, dirty  # what the workers ran
    if not args.pinned and git_state() != (commit, dirty):
        print(f"[W={w}] warning: the code changed during the send (the workers had already "
              "imported theirs)", flush=True)
    c = ours["counts"]
    ok = c.get("sent") == n and not (set(c) - {"sent"})
    print(f"[W={w}] completed in {ours['seconds']:.1f}s = {n / ours['seconds']:,.0f} "
          f"msg/s; rows {c}" + ("" if ok else "  <- NOT all sent"), flush=True)
    if not ok:
        raise BenchError(f"campaign {campaign_id}: rows {c}, expected {n} sent and "
                         "nothing else")
    print(f"[W={w}] smtp-source: {w * args.concurrency} sessions, {n:,} x {size:,} "
          "bytes ...", flush=True)
    src = run_smtp_source(source_path, port, n, w * args.concurrency, size,
                          args.timeout, sink.pid, workdir / f"smtp-source-{tag}.log")
    d = derive(n, ours, src, enqueue_s, size)
    d["cost_model"] = cost_model(d)
    print(f"[W={w}] smtp-source {n / src['seconds']:,.0f} msg/s; ratio {d['ratio']:.2f}; "
          f"worker CPU {d['worker_cpu_us_per_msg']:.0f} µs/msg, PG CPU "
          f"{d['pg_cpu_us_per_msg']:.0f} µs/msg, DB share {d['db_share']:.0%}",
          flush=True)
    raw.append({**ours, "source": src})
    rows.append(d)
    return size


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: workers, sink, database


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    sys.exit(main())
