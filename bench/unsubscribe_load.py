#!/usr/bin/env python3
"""Load test: RFC 8058 one-click unsubscribe POSTs from many concurrent clients over loopback.

Run from the repository root with the project's virtualenv:

    /work/venv/bin/python bench/unsubscribe_load.py [--clients 64 --seconds 10 --subscribers 50000]

What it does (see bench/README.md):
  1. builds a fresh SQLite workspace in a temp dir with one list of N subscribers (setup, not
     timed in the rate) and signs one unsubscribe token per subscriber;
  2. starts the server exactly as a user would, `python -m newsletter serve --port PORT`, with
     NEWSLETTER_VAR_DIR / _SECRET_KEY / _BASE_URL / _DATABASE_URL in its environment, and waits
     for `GET /healthz` to answer 200;
  3. runs C clients (raw asyncio streams, HTTP/1.1 keep-alive, one connection each, uvloop when
     importable) for a fixed time, each sending `POST /unsubscribe/<token>` with the body
     `List-Unsubscribe=One-Click`, every request for a different subscriber (a short warm-up
     comes first and is not counted in the rate);
  4. reports requests, req/s, errors (only status 200 counts as OK), latency p50/p99 and the
     server's CPU per request (from /proc/PID/stat);
  5. stops the server (SIGTERM) and checks in the database that exactly the subscribers whose
     POST returned 200 are now 'unsubscribed', each with exactly one 'one-click' event;
  6. prints a one-line summary and writes bench/results/unsubscribe_load-<timestamp>.json.

Exit status: 0 no errors and persistence PASS, 1 errors or FAIL (or the server did not start),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from send_bench import _exit_on_signal, free_port, proc_cpu_seconds  # same folder

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SECRET_KEY = "bench-unsubscribe-load-secret-key-not-for-production"
TARGET_RPS = 1500
ONE_CLICK_BODY = b"List-Unsubscribe=One-Click"
SHOW_ERRORS = 5


# --- helpers -------------------------------------------------------------------------------------

def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def server_env(var_dir: Path, port: int) -> dict[str, str]:
    """The server's environment: ours, with no other NEWSLETTER_* leaking in from the shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env.update({
        "NEWSLETTER_VAR_DIR": str(var_dir),
        "NEWSLETTER_SECRET_KEY": SECRET_KEY,
        "NEWSLETTER_BASE_URL": f"http://127.0.0.1:{port}",
        "NEWSLETTER_DATABASE_URL": f"sqlite:///{var_dir / 'newsletter.db'}",
    })
    return env


def open_newsletter(env: dict[str, str]) -> Any:
    """The library's Newsletter on the same settings the server gets from its environment."""
    from newsletter.service import Newsletter
    from newsletter.settings import load_settings

    return Newsletter(load_settings(
        var_dir=Path(env["NEWSLETTER_VAR_DIR"]), secret_key=env["NEWSLETTER_SECRET_KEY"],
        base_url=env["NEWSLETTER_BASE_URL"], database_url=env["NEWSLETTER_DATABASE_URL"]))


def setup_workspace(env: dict[str, str], n: int) -> tuple[int, list[tuple[int, str]], float]:
    """One list of n active subscribers; returns (list id, [(subscriber id, token)], seconds)."""
    from newsletter.store.sql import NewMember

    t0 = time.perf_counter()
    nl = open_newsletter(env)
    try:
        mlist = nl.store.create_list("bench", name="Bench readers")
        chunk = 1000
        for start in range(0, n, chunk):
            nl.store.upsert_members(mlist.id, [
                NewMember(f"user{i}@example.com") for i in range(start, min(n, start + chunk))
            ], source="bench")
        tokens = [(m.id, nl.signer.unsubscribe_token(m.id, mlist.id))
                  for m in nl.store.members(mlist.id)]
    finally:
        nl.store.close()
    if len(tokens) != n:
        raise RuntimeError(f"the list has {len(tokens)} members, expected {n}")
    return mlist.id, tokens, time.perf_counter() - t0


def healthz_ok(port: int) -> bool:
    """True when GET /healthz answers 200 (one short blocking attempt)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            status_line = s.makefile("rb").readline()
    except OSError:
        return False
    parts = status_line.split()
    return len(parts) >= 2 and parts[1] == b"200"


@contextlib.contextmanager
def run_server(env: dict[str, str], port: int, cwd: Path, log_path: Path,
               timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m newsletter serve --port PORT` until /healthz answers; always stopped on exit."""
    cmd = [sys.executable, "-m", "newsletter", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not healthz_ok(port):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}:\n"
                                   + server_log_tail(log_path))
            if time.monotonic() > deadline:
                raise RuntimeError(f"GET /healthz did not answer 200 within {timeout:.0f}s:\n"
                                   + server_log_tail(log_path))
            time.sleep(0.05)
        yield proc
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, wait; SIGKILL if it does not stop within 15 s. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print("warning: the server did not stop within 15s of SIGTERM; killing it",
                  file=sys.stderr)
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def server_log_tail(log_path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- the load ------------------------------------------------------------------------------------

class HttpError(Exception):
    """A response that is not a well-formed HTTP/1.1 answer."""


class Load:
    """Shared state of the clients: the token supply, outcomes, latencies, errors."""

    def __init__(self, tokens: Iterator[tuple[int, str]], port: int, timeout: float) -> None:
        self.tokens = tokens
        self.port = port
        self.timeout = timeout
        self.host = f"127.0.0.1:{port}".encode()
        self.exhausted = False
        self.measuring = False
        self.ok_ids: list[int] = []          # every phase: what the database must hold
        self.error_ids: list[int] = []
        self.ok = 0                          # the measured phase only
        self.errors = 0
        self.latencies: list[float] = []
        self.error_kinds: Counter[str] = Counter()

    def request(self, token: str) -> bytes:
        return (b"POST /unsubscribe/" + token.encode() + b" HTTP/1.1\r\nHost: " + self.host
                + b"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: "
                + str(len(ONE_CLICK_BODY)).encode() + b"\r\n\r\n" + ONE_CLICK_BODY)

    def record(self, sid: int, error: str | None, latency: float) -> None:
        if error is None:
            self.ok_ids.append(sid)
        else:
            self.error_ids.append(sid)
            self.error_kinds[error] += 1
        if self.measuring:
            if error is None:
                self.ok += 1
                self.latencies.append(latency)
            else:
                self.errors += 1


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, keep-alive, body) of one HTTP/1.1 response; Content-Length or chunked body."""
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("connection closed by the server before a response")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    keep_alive = parts[0] == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n"):
            break
        if not h:
            raise ConnectionResetError("connection closed by the server inside the headers")
        name, _, value = h.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            v = value.strip().lower()
            keep_alive = v == b"keep-alive" or (keep_alive and v != b"close")
    if chunked:
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif length is not None:
        body = await reader.readexactly(length)
    else:
        body = await reader.read()  # until close
        keep_alive = False
    return status, keep_alive, body


async def client(load: Load, stop_at: float) -> None:
    """One client: one keep-alive connection (reopened after an error), until stop_at
    (a time.perf_counter() value); the request in flight at stop_at still completes."""
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while clock() < stop_at:
            try:
                sid, token = next(load.tokens)
            except StopIteration:
                load.exhausted = True
                return
            t0 = clock()
            error: str | None = None
            try:
                async with asyncio.timeout(load.timeout):
                    if writer is None:
                        reader, writer = await asyncio.open_connection("127.0.0.1", load.port)
                    assert reader is not None
                    writer.write(load.request(token))
                    status, keep_alive, _body = await read_response(reader)
                if status != 200:
                    error = f"HTTP {status}"
            except TimeoutError:
                error, keep_alive = f"timeout after {load.timeout:g}s", False
            except (OSError, EOFError, HttpError, ValueError) as exc:
                error, keep_alive = f"{type(exc).__name__}: {exc}", False
            load.record(sid, error, clock() - t0)
            if not keep_alive and writer is not None:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def run_phase(load: Load, clients: int, seconds: float) -> float:
    """All clients for `seconds` (in-flight requests finish); returns the elapsed time."""
    t0 = time.perf_counter()
    await asyncio.gather(*(client(load, t0 + seconds) for _ in range(clients)))
    return time.perf_counter() - t0


def run_load(load: Load, clients: int, seconds: float, warmup: float,
             server_pid: int) -> dict[str, Any]:
    """Warm-up (not counted), then the measured phase with server and client CPU around it."""
    try:
        import uvloop
        loop_factory: Any = uvloop.new_event_loop
        loop_name = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop_factory, loop_name = None, "asyncio"

    async def both() -> tuple[float, float | None, float]:
        if warmup > 0:
            await run_phase(load, clients, warmup)
        load.measuring = True
        srv0, own0 = proc_cpu_seconds(server_pid), time.process_time()
        elapsed = 0.0
        if not load.exhausted:
            elapsed = await run_phase(load, clients, seconds)
        srv1, own1 = proc_cpu_seconds(server_pid), time.process_time()
        return elapsed, None if srv0 is None or srv1 is None else srv1 - srv0, own1 - own0

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        elapsed, server_cpu, client_cpu = runner.run(both())
    return {"seconds": elapsed, "server_cpu_seconds": server_cpu,
            "client_cpu_seconds": client_cpu, "event_loop": loop_name}


# --- the persistence check -----------------------------------------------------------------------

def check_persistence(env: dict[str, str], list_id: int, ok_ids: list[int],
                      error_ids: list[int]) -> dict[str, Any]:
    """Exactly the 200-answered subscribers are unsubscribed, each with one one-click event."""
    from sqlalchemy import text

    nl = open_newsletter(env)
    try:
        with nl.store.engine.connect() as conn:
            unsubscribed = {int(r[0]) for r in conn.execute(text(
                "SELECT subscriber_id FROM memberships WHERE list_id = :l "
                "AND status = 'unsubscribed'"), {"l": list_id})}
            unsub_count = int(conn.execute(text(
                "SELECT count(*) FROM memberships WHERE list_id = :l "
                "AND status = 'unsubscribed'"), {"l": list_id}).scalar_one())
            event_count = int(conn.execute(text(
                "SELECT count(*) FROM membership_events WHERE source = 'one-click'"))
                .scalar_one())
            per_subscriber = {int(r[0]): int(r[1]) for r in conn.execute(text(
                "SELECT subscriber_id, count(*) FROM membership_events "
                "WHERE source = 'one-click' AND list_id = :l AND new_status = 'unsubscribed' "
                "GROUP BY subscriber_id"), {"l": list_id})}
    finally:
        nl.store.close()
    ok_set = set(ok_ids)
    missing = ok_set - unsubscribed
    extra = unsubscribed - ok_set
    extra_from_errors = extra & set(error_ids)
    events_wrong = sorted(s for s in unsubscribed if per_subscriber.get(s) != 1)
    passed = (len(ok_set) == len(ok_ids) and not missing and not extra
              and unsub_count == len(ok_set) and event_count == len(ok_set)
              and not events_wrong and set(per_subscriber) == unsubscribed)
    return {
        "pass": passed, "ok_requests": len(ok_ids), "distinct_ok": len(ok_set),
        "unsubscribed_rows": unsub_count, "one_click_events": event_count,
        "missing": len(missing), "missing_sample": sorted(missing)[:5],
        "extra": len(extra), "extra_from_errored_requests": len(extra_from_errors),
        "extra_sample": sorted(extra)[:5],
        "subscribers_without_exactly_one_event": len(events_wrong),
        "events_wrong_sample": events_wrong[:5],
    }


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Send one-click unsubscribe POSTs over loopback to `newsletter serve` from "
                    "many concurrent clients for a fixed time; report req/s and errors and check "
                    "that every unsubscribe was persisted.")
    ap.add_argument("--clients", type=int, default=64,
                    help="concurrent clients, one keep-alive connection each (default 64)")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="length of the measured load in seconds (default 10)")
    ap.add_argument("--subscribers", type=int, default=50000,
                    help="subscribers in the list = most requests possible (default 50000)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of load before the measured part, not counted in the rate "
                         "but checked for persistence (default 1; 0 for none)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="per-request timeout in seconds; a timeout counts as an error "
                         "(default 10)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the fresh workspace goes (default: a temp dir, removed after)")
    ap.add_argument("--no-results", action="store_true",
                    help="do not write the JSON file to bench/results/")
    args = ap.parse_args(argv)

    if not 1 <= args.clients <= 1000:
        ap.error("--clients must be between 1 and 1,000")
    if not 0 < args.seconds <= 3600:
        ap.error("--seconds must be more than 0 and at most 3,600")
    if not 1 <= args.subscribers <= 10_000_000:
        ap.error("--subscribers must be between 1 and 10,000,000")
    if not 0 <= args.warmup <= 600:
        ap.error("--warmup must be between 0 and 600")
    if not args.timeout > 0:
        ap.error("--timeout must be more than 0")

    # Self-contained: no NEWSLETTER_* from the shell, and we run inside the workspace so no
    # .env or config/newsletter.toml from the current directory is read (the server neither).
    for key in [k for k in os.environ if k.startswith("NEWSLETTER_")]:
        del os.environ[key]
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="unsub-load-")) if own_tmp \
        else args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = workdir / f"run-{stamp}-{os.getpid()}"  # always a fresh database
    var_dir = run_dir / "var"
    var_dir.mkdir(parents=True)
    old_cwd = Path.cwd()
    os.chdir(run_dir)

    port = free_port()
    env = server_env(var_dir, port)
    try:
        print(f"workspace {run_dir}")
        print(f"setting up {args.subscribers:,} subscribers ...", flush=True)
        list_id, tokens, setup_s = setup_workspace(env, args.subscribers)
        print(f"setup {setup_s:.2f}s; starting `{Path(sys.executable).name} -m newsletter serve "
              f"--port {port}` ...", flush=True)
        load = Load(iter(tokens), port, args.timeout)
        t0 = time.perf_counter()
        with run_server(env, port, run_dir, run_dir / "server.log") as server:
            start_s = time.perf_counter() - t0
            print(f"server pid {server.pid} answered /healthz after {start_s:.2f}s; "
                  f"load: {args.clients} clients, {args.warmup:g}s warm-up + "
                  f"{args.seconds:g}s measured ...", flush=True)
            res = run_load(load, args.clients, args.seconds, args.warmup, server.pid)
            alive = server.poll() is None
        status = server.returncode
        if not alive:
            print("error: the server died during the load:\n"
                  + server_log_tail(run_dir / "server.log"), file=sys.stderr)
        how = (f"ended by {signal.Signals(-status).name}" if status is not None and status < 0
               else f"exit status {status}")  # uvicorn re-raises SIGTERM after shutting down
        print(f"server stopped ({how}); checking the database ...", flush=True)
        check = check_persistence(env, list_id, load.ok_ids, load.error_ids)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        os.chdir(old_cwd)
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = res["seconds"]
    done = load.ok + load.errors
    rps = load.ok / elapsed if elapsed else 0.0
    lat = sorted(load.latencies)
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    srv_cpu = res["server_cpu_seconds"]
    srv_ms = None if srv_cpu is None or not done else srv_cpu / done * 1e3
    cli_ms = res["client_cpu_seconds"] / done * 1e3 if done else None
    total_errors = len(load.error_ids)

    print()
    print(f"one-click unsubscribe, {args.clients} clients, {elapsed:.2f}s measured "
          f"(after {args.warmup:g}s warm-up), client on {res['event_loop']}:")
    print(f"  requests        {done:,} ({load.ok:,} OK, {load.errors:,} errors)")
    print(f"  rate            {rps:,.0f} req/s (OK responses / elapsed)")
    if p50 is not None and p99 is not None:
        print(f"  latency         p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    if srv_cpu is not None and srv_ms is not None:
        print(f"  server CPU      {srv_cpu:.2f}s = {srv_ms:.3f} CPU-ms/request "
              f"({srv_cpu / elapsed:.0%} of a core)")
    if cli_ms is not None:
        print(f"  client CPU      {res['client_cpu_seconds']:.2f}s = {cli_ms:.3f} CPU-ms/request "
              f"({res['client_cpu_seconds'] / elapsed:.0%} of a core)")
    print(f"  setup           {setup_s:.2f}s for {args.subscribers:,} subscribers (not timed)")
    if load.exhausted:
        print(f"  note: all {args.subscribers:,} tokens were used before the time was up; "
              "the load stopped early (raise --subscribers)")
    if load.error_kinds:
        print(f"  errors (all phases: {total_errors:,}), first {SHOW_ERRORS} kinds:")
        for kind, count in load.error_kinds.most_common(SHOW_ERRORS):
            print(f"    {count:>7,}  {kind}")
    print(f"persistence: {'PASS' if check['pass'] else 'FAIL'}: {check['ok_requests']:,} "
          f"answered 200 ({check['distinct_ok']:,} distinct), {check['unsubscribed_rows']:,} "
          f"unsubscribed rows, {check['one_click_events']:,} one-click events; missing "
          f"{check['missing']:,}, extra {check['extra']:,} "
          f"({check['extra_from_errored_requests']:,} from errored requests), subscribers "
          f"without exactly one event {check['subscribers_without_exactly_one_event']:,}")

    ok = check["pass"] and total_errors == 0 and alive
    persisted = (f"all {check['distinct_ok']:,} persisted" if check["pass"]
                 else f"persistence FAILED ({check['missing']:,} missing, "
                      f"{check['extra']:,} extra)")
    print(f"one-click unsubscribe: {rps:,.0f} req/s, {total_errors:,} errors, {persisted} "
          f"(target {TARGET_RPS:,} req/s: {'met' if rps >= TARGET_RPS else 'NOT met'})")

    def r3(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    record = {
        "when": stamp, "host": platform.node(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "clients": args.clients, "seconds_asked": args.seconds,
        "warmup_seconds": args.warmup, "subscribers": args.subscribers,
        "timeout": args.timeout, "event_loop": res["event_loop"], "ok": ok,
        "requests": done, "ok_requests": load.ok, "errors": load.errors,
        "errors_all_phases": total_errors, "error_kinds": dict(load.error_kinds),
        "seconds": r3(elapsed), "req_per_s": round(rps, 1), "target_req_per_s": TARGET_RPS,
        "latency_p50_ms": None if p50 is None else round(p50 * 1e3, 2),
        "latency_p99_ms": None if p99 is None else round(p99 * 1e3, 2),
        "server_cpu_seconds": r3(srv_cpu), "server_cpu_ms_per_request": r3(srv_ms),
        "client_cpu_seconds": r3(res["client_cpu_seconds"]),
        "client_cpu_ms_per_request": r3(cli_ms), "tokens_exhausted": load.exhausted,
        "server_exit_status": status, "setup_seconds": r3(setup_s), "persistence": check,
    }
    if not args.no_results:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / f"unsubscribe_load-{stamp}.json"
        out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"result written to {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    sys.exit(main())
