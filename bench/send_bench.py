#!/usr/bin/env python3
"""Benchmark: our sender against Postfix's smtp-source, both into the same Postfix smtp-sink.

What it does (see bench/README.md and /work/shared/PERFORMANCE.md):
  1. starts `smtp-sink` on a free loopback port (killed at the end, also on error);
  2. builds a fresh SQLite workspace with one list of N subscribers (timed apart: "setup");
  3. plans and runs a real send of the issue with `Newsletter.plan_send` + `Newsletter.run`
     (ledger on, SMTP over loopback), timing only the run, and checks that all N were sent;
  4. runs `smtp-source -d -s CONCURRENCY -m N -l SIZE` into the same sink, SIZE being the size
     of one of our messages, and times it;
  5. prints both rates, their ratio, our CPU per message and peak RSS, and appends a JSON line
     to bench/results/send_bench.jsonl.

It installs nothing: without smtp-sink/smtp-source it says how to get them and exits 2.
Exit status: 0 ok, 1 the send did not send all N (or a tool failed), 2 missing tools/bad args.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_ISSUE = "examples/issues/sample.md"
TOOL_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/lib/postfix/sbin")
INSTALL_HINT = """\
smtp-sink and smtp-source (Postfix test tools) are needed. On Debian/Ubuntu, as root:

    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix

(or run bench/install-postfix-tools.sh). The Postfix daemon is not needed and need not run.
"""


# --- helpers -------------------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """The path of a Postfix test tool: on PATH, else in the usual sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    for d in TOOL_DIRS:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (bounded); fail if proc died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"smtp-sink exited with status {proc.returncode}: {err.strip()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"smtp-sink did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@contextlib.contextmanager
def smtp_sink(path: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run smtp-sink on 127.0.0.1:port with a backlog of 1024; always stopped on exit."""
    cmd = [path]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
    cmd += [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()


def proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process from /proc (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14, 15 of stat(5)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0), so the peak measured is the send's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def peak_rss_mib() -> tuple[float, str]:
    """Peak RSS in MiB: VmHWM since the last reset if available, else ru_maxrss (lifetime)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # KiB on Linux, bytes on macOS
    return (maxrss / 1024 / 1024 if sys.platform == "darwin" else maxrss / 1024), "ru_maxrss"


def cpu_self() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def resolve_issue(arg: str) -> Path:
    path = Path(arg).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path  # the default works from any working directory
    return path.resolve()


# --- the two measurements ------------------------------------------------------------------------

def setup_workspace(var_dir: Path, port: int, n: int, concurrency: int) -> tuple[Any, str, float]:
    """A fresh workspace with one list of n active subscribers; returns (nl, slug, seconds)."""
    from newsletter.service import Newsletter
    from newsletter.settings import load_settings
    from newsletter.store.sql import NewMember

    t0 = time.perf_counter()
    settings = load_settings(
        var_dir=var_dir,
        database_url="",  # sqlite under var_dir
        smtp_url=f"smtp://127.0.0.1:{port}",
        send_concurrency=concurrency,
        send_rate=0.0,
        secret_key="bench-secret-key-not-for-production",
        from_address="Digest Desk <digest@example.org>",
        base_url="https://news.example.org",
        postal_address="Example Institute, 1 Example Street, Example City",
    )
    nl = Newsletter(settings)
    slug = "bench"
    mlist = nl.store.create_list(slug, name="Bench readers")
    chunk = 1000
    for start in range(0, n, chunk):
        nl.store.upsert_members(mlist.id, [
            NewMember(f"user{i}@example.com", f"User {i}")
            for i in range(start, min(n, start + chunk))
        ], source="bench")
    return nl, slug, time.perf_counter() - t0


def message_size(nl: Any, plan: Any) -> int:
    """Bytes of one of our messages as `run` builds it (same campaign, same list, and the
    issue's archive URL as the "view in browser" link, as `Newsletter.run` passes it)."""
    from newsletter.content.model import Issue
    from newsletter.render.issue import RenderedIssue
    from newsletter.render.message import Recipient

    c = plan.campaign
    issue = Issue.model_validate_json(c.issue_json)
    message = nl.prepare(RenderedIssue(c.subject, c.html, c.text, issue.language), plan.lists,
                         campaign_id=c.id, issue=issue)
    mlist = plan.lists[0]
    return len(message.build(Recipient(1, mlist.id, "user1@example.com", "User 1")))


def hard_stop(sink: subprocess.Popen[bytes], workdir: Path | None, timeout: float) -> None:
    """Watchdog: the send did not even stop after being cancelled; end everything now."""
    print(f"\nerror: our send was cancelled after {timeout:.0f}s (--timeout) but had not stopped "
          "30s later; killing smtp-sink and exiting", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sink.kill()
        sink.wait(timeout=5)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(1)


def run_ours(nl: Any, plan: Any, timeout: float, sink: subprocess.Popen[bytes],
             profile: Path | None = None, tmp_workdir: Path | None = None) -> dict[str, Any]:
    """Run the planned send; only the run is timed (and profiled, if asked).

    The run is cancelled after `timeout`. On Python 3.11 a cancelled send can hang (see
    bench/README.md), so a watchdog thread ends the process 30 s after that.
    """
    sink_pid = sink.pid
    grace = timeout + 30
    watchdog = threading.Timer(grace, hard_stop, (sink, tmp_workdir, timeout))
    watchdog.daemon = True
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
    rss_before = current_rss_mib()
    reset = reset_peak_rss()
    sink0 = proc_cpu_seconds(sink_pid)
    user0, sys0 = cpu_self()
    t0 = time.perf_counter()
    watchdog.start()
    if profiler is not None:
        profiler.enable()
    try:
        # The event loop `newsletter send` uses (uvloop when installed).
        from newsletter.service import send_runner

        with send_runner() as runner:
            report = runner.run(asyncio.wait_for(nl.run(plan), timeout))
    except TimeoutError:
        raise RuntimeError(f"our send did not finish within {timeout:.0f}s (--timeout)") \
            from None
    finally:
        if profiler is not None:
            profiler.disable()
        watchdog.cancel()
    elapsed = time.perf_counter() - t0
    user1, sys1 = cpu_self()
    cpu = (user1 - user0) + (sys1 - sys0)
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
    sink1 = proc_cpu_seconds(sink_pid)
    rss, rss_source = peak_rss_mib()
    p = report.progress
    return {
        "seconds": elapsed, "cpu_seconds": cpu, "user_seconds": user1 - user0,
        "system_seconds": sys1 - sys0,
        "sink_cpu_seconds": None if sink0 is None or sink1 is None else sink1 - sink0,
        "peak_rss_mib": rss, "rss_before_mib": rss_before,
        "rss_source": rss_source + (" reset before the send" if reset else ", whole process"),
        "sent": p.sent, "failed_temp": p.failed_temp, "failed_perm": p.failed_perm,
        "unknown": p.unknown, "skipped": p.skipped, "aborted": report.aborted,
        "errors": report.errors[:5],
    }


def run_smtp_source(path: str, port: int, n: int, concurrency: int, size: int,
                    timeout: float, sink_pid: int) -> dict[str, Any]:
    """smtp-source with the same sessions, count and message size, into the same sink."""
    cmd = [path, "-d", "-s", str(concurrency), "-m", str(n), "-l", str(size),
           f"127.0.0.1:{port}"]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink0 = proc_cpu_seconds(sink_pid)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    sink1 = proc_cpu_seconds(sink_pid)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # smtp-sink is not reaped yet
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[:500]}")
    return {
        "seconds": elapsed, "command": " ".join(cmd),
        "cpu_seconds": (children1.ru_utime + children1.ru_stime)
        - (children0.ru_utime + children0.ru_stime),
        "sink_cpu_seconds": None if sink0 is None or sink1 is None else sink1 - sink0,
    }


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Send N messages with newsletter and with Postfix's smtp-source into the "
                    "same Postfix smtp-sink on loopback, and compare the rates.")
    ap.add_argument("--n", type=int, default=20000, help="messages to send (default 20000)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="SMTP sessions, ours and smtp-source's (default 16)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the fresh workspace goes (default: a temp dir, removed after)")
    ap.add_argument("--issue", default=DEFAULT_ISSUE, help=f"issue file (default {DEFAULT_ISSUE})")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate ours and smtp-source this many times and report medians "
                         "(default 1; the machines are noisy, 3 or 5 give steadier ratios)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="limit in seconds for each of the two sends (default: 60 + n/50)")
    ap.add_argument("--profile", type=Path, default=None, metavar="FILE",
                    help="cProfile our send (only the run) into FILE and print the top functions;"
                         " profiling slows it down, so the rates of such a run are not figures")
    ap.add_argument("--no-results", action="store_true",
                    help="do not append the JSON line to bench/results/")
    args = ap.parse_args(argv)

    if not 1 <= args.n <= 10_000_000:
        ap.error("--n must be between 1 and 10,000,000")
    if not 1 <= args.concurrency <= 256:
        ap.error("--concurrency must be between 1 and 256 (the setting's own range)")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be between 1 and 20")
    issue = resolve_issue(args.issue)
    if not issue.is_file():
        ap.error(f"no issue file {issue}")
    timeout = args.timeout if args.timeout else 60.0 + args.n / 50
    profile = args.profile.expanduser().resolve() if args.profile else None

    sink_path, source_path = find_tool("smtp-sink"), find_tool("smtp-source")
    if not sink_path or not source_path:
        missing = " and ".join(t for t, p in (("smtp-sink", sink_path),
                                              ("smtp-source", source_path)) if not p)
        print(f"error: {missing} not found on PATH or in {', '.join(TOOL_DIRS)}.\n",
              file=sys.stderr)
        print(INSTALL_HINT, file=sys.stderr)
        return 2

    # The benchmark is self-contained: no NEWSLETTER_* from the shell, no .env or
    # config/newsletter.toml from the current directory (we chdir into the workspace).
    for key in [k for k in os.environ if k.startswith("NEWSLETTER_")]:
        del os.environ[key]

    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="send-bench-")) if own_tmp \
        else args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    var_dir = workdir / f"var-{stamp}-{os.getpid()}"  # always a fresh database
    old_cwd = Path.cwd()
    os.chdir(workdir)

    port = free_port()
    rounds: list[dict[str, Any]] = []
    ok = True
    try:
        with smtp_sink(sink_path, port) as sink:
            print(f"smtp-sink {sink_path} on 127.0.0.1:{port} (pid {sink.pid})")
            print(f"workspace {var_dir}")
            print(f"setting up {args.n:,} subscribers ...", flush=True)
            nl, slug, setup_s = setup_workspace(var_dir, port, args.n, args.concurrency)
            for r in range(args.rounds):
                t0 = time.perf_counter()
                # Later rounds send the same issue again: a new campaign, a fresh ledger.
                plan = nl.plan_send(issue, [slug], again=r > 0)
                plan_s = time.perf_counter() - t0
                if plan.due != args.n:
                    print(f"error: the plan has {plan.due} due, expected {args.n}",
                          file=sys.stderr)
                    return 1
                size = message_size(nl, plan)
                tag = f"[round {r + 1}/{args.rounds}] " if args.rounds > 1 else ""
                if r == 0:
                    print(f"setup {setup_s:.2f}s (+ plan/render {plan_s:.2f}s); message "
                          f"{size:,} bytes")
                print(f"{tag}newsletter: sending {args.n:,} with {args.concurrency} "
                      "connections ...", flush=True)
                ours = run_ours(nl, plan, timeout, sink, profile if r == 0 else None,
                                workdir if own_tmp else None)
                if ours["sent"] != args.n or ours["aborted"]:
                    ok = False
                    print(f"error: sent {ours['sent']} of {args.n}: {ours}", file=sys.stderr)
                print(f"{tag}smtp-source: {args.concurrency} sessions, {args.n:,} x {size:,} "
                      "bytes ...", flush=True)
                src = run_smtp_source(source_path, port, args.n, args.concurrency, size,
                                      timeout, sink.pid)
                rounds.append({"ours": ours, "source": src, "message_bytes": size,
                               "plan_seconds": plan_s})
                if args.rounds > 1:
                    o, q = args.n / ours["seconds"], args.n / src["seconds"]
                    print(f"{tag}ours {o:,.0f} msg/s, smtp-source {q:,.0f} msg/s, "
                          f"ratio {o / q:.2f}", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        os.chdir(old_cwd)
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)

    n = args.n
    med = statistics.median

    def pick(side: str, key: str) -> list[float]:
        return [rd[side][key] for rd in rounds]

    ours_rate = med([n / s for s in pick("ours", "seconds")])
    src_rate = med([n / s for s in pick("source", "seconds")])
    ratio = med([(n / rd["ours"]["seconds"]) / (n / rd["source"]["seconds"]) for rd in rounds])
    ours_s, src_s = med(pick("ours", "seconds")), med(pick("source", "seconds"))
    cpu_s, user_s, sys_s = (med(pick("ours", k)) for k in
                            ("cpu_seconds", "user_seconds", "system_seconds"))
    cpu_us = cpu_s / n * 1e6
    src_cpu_us = med(pick("source", "cpu_seconds")) / n * 1e6
    peak_rss = max(pick("ours", "peak_rss_mib"))
    rss_before = rounds[0]["ours"]["rss_before_mib"]
    size = rounds[0]["message_bytes"]
    sent = sum(pick("ours", "sent"))

    def sink_share(side: str) -> tuple[float | None, float | None]:
        vals = [rd[side]["sink_cpu_seconds"] for rd in rounds]
        if any(v is None for v in vals):
            return None, None
        return (med([v / n * 1e6 for v in vals]),
                med([v / rd[side]["seconds"] for v, rd in zip(vals, rounds, strict=True)]))

    def sink_text(side: str) -> str:
        us, share = sink_share(side)
        return "n/a" if us is None or share is None else f"{us:.0f} µs/msg ({share:.0%} of a core)"

    label = "median of " + str(len(rounds)) + " rounds" if len(rounds) > 1 else "one round"
    print()
    print(f"{args.n:,} messages of {size:,} bytes, {args.concurrency} connections, {label}:")
    print(f"{'':22}{'msg/s':>10}{'seconds':>10}{'CPU µs/msg':>12}   sink CPU")
    print(f"{'newsletter (ours)':22}{ours_rate:>10,.0f}{ours_s:>10.2f}{cpu_us:>12.0f}"
          f"   {sink_text('ours')}")
    print(f"{'smtp-source (C)':22}{src_rate:>10,.0f}{src_s:>10.2f}{src_cpu_us:>12.0f}"
          f"   {sink_text('source')}")
    print()
    print(f"ratio ours/smtp-source: {ratio:.2f}   (goal >= 0.60)")
    print(f"our CPU during the send: {cpu_s:.2f}s = {cpu_us:.0f} µs/message "
          f"({cpu_s / ours_s:.0%} of a core; user {user_s / n * 1e6:.0f} µs + system "
          f"{sys_s / n * 1e6:.0f} µs)")
    print(f"peak RSS during the send: {peak_rss:.1f} MiB ({rounds[0]['ours']['rss_source']})"
          + (f"; {rss_before:.1f} MiB when it started" if rss_before is not None else ""))
    print(f"setup (workspace + {n:,} subscribers, not timed in the rate): {setup_s:.2f}s")
    print(f"sent {sent:,}/{n * len(rounds):,}; target >= 1,000 msg/s: "
          f"{'met' if ours_rate >= 1000 else 'NOT met'}; ratio >= 0.6: "
          f"{'met' if ratio >= 0.6 else 'NOT met'}")

    def r3(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    sink_ours, sink_src = sink_share("ours"), sink_share("source")
    record = {
        "when": stamp, "host": platform.node(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "n": n, "concurrency": args.concurrency,
        "rounds": len(rounds), "issue": str(issue), "message_bytes": size, "ok": ok,
        "ours_msg_per_s": round(ours_rate, 1), "ours_seconds": r3(ours_s),
        "ours_cpu_us_per_msg": round(cpu_us, 1), "ours_cpu_seconds": r3(cpu_s),
        "ours_user_seconds": r3(user_s), "ours_system_seconds": r3(sys_s),
        "ours_peak_rss_mib": round(peak_rss, 1), "rss_source": rounds[0]["ours"]["rss_source"],
        "ours_rss_before_mib": None if rss_before is None else round(rss_before, 1),
        "ours_sink_cpu_us_per_msg": r3(sink_ours[0]), "ours_sink_core_share": r3(sink_ours[1]),
        "source_msg_per_s": round(src_rate, 1), "source_seconds": r3(src_s),
        "source_cpu_us_per_msg": round(src_cpu_us, 1),
        "source_sink_cpu_us_per_msg": r3(sink_src[0]), "source_sink_core_share": r3(sink_src[1]),
        "ratio": round(ratio, 3),
        "per_round": [{"ours_msg_per_s": round(n / rd["ours"]["seconds"], 1),
                       "source_msg_per_s": round(n / rd["source"]["seconds"], 1)}
                      for rd in rounds],
        "setup_seconds": r3(setup_s), "plan_seconds": r3(rounds[0]["plan_seconds"]),
        "sent": sent, "failed": sum(pick("ours", "failed_temp")) + sum(pick("ours", "failed_perm")),
        "unknown": sum(pick("ours", "unknown")),
    }
    if profile is not None:
        import pstats

        print(f"\nprofile of our send (round 1) written to {profile}; top 25 by internal time:")
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
        print("(a profiled run is slower: its figures are not written to bench/results/)")
    if not args.no_results and profile is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        out = RESULTS_DIR / "send_bench.jsonl"
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        print(f"result appended to {out}")
    return 0 if ok else 1


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: smtp-sink is stopped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    sys.exit(main())
