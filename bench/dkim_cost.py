#!/usr/bin/env python3
"""Benchmark: what DKIM signing adds to each message of a send (see docs/dkim.md).

What it does:
  1. renders an issue (default examples/issues/sample.md) and prepares it once, as a send does;
  2. times N calls of `PreparedMessage.build(recipient)` for N different recipients: the
     per-message cost without DKIM;
  3. times N of `build()` then `DkimSigner.sign()` joined as the engine joins them
     (`sign(data) + data`), with a 2048-bit RSA key and, when PyNaCl is installed (dkimpy needs
     it for Ed25519), an Ed25519 key;
  4. for reference, times N of `build()` then dkimpy's own `dkim.sign()` on the un-stuffed
     message (key parsed and body canonicalized by dkimpy for every message), and, when gmpy2
     is installed, dkimpy's RSA with the key's integers as gmpy2 numbers (an experiment, not
     something DkimSigner does);
  5. prints wall-clock and CPU µs per message (time.perf_counter, time.process_time), the sign
     share alone, the messages per second one core could sign, and what a send that runs at
     --send-rate messages/s without DKIM would run at with it.

The RSA key is --key FILE, or one made with `openssl genrsa 2048` in a temporary directory
(removed after); without openssl and without --key it says so and exits 2. Nothing is written
unless --json FILE is given. Exit status: 0 ok, 1 a signature did not verify, 2 bad arguments
or no key.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from send_bench import resolve_issue  # same folder

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_ISSUE = "examples/issues/sample.md"
SELECTOR, DOMAIN = "bench", "example.org"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_rsa_key(directory: Path) -> bytes | None:
    """A fresh 2048-bit RSA key from openssl (PKCS#8 PEM, as the docs tell users to make)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    path = directory / "dkim.key"
    subprocess.run([openssl, "genrsa", "-out", str(path), "2048"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path.read_bytes()


def prepare(issue_path: Path) -> Any:
    from newsletter.content.parse import load_issue
    from newsletter.headers import format_address
    from newsletter.render.issue import render_issue
    from newsletter.render.message import ListInfo, PreparedMessage
    from newsletter.render.templates import make_environment
    from newsletter.render.tokens import TokenSigner

    rendered = render_issue(load_issue(issue_path), make_environment(),
                            brand_name="Digest Desk",
                            postal_address="Example Institute, 1 Example Street, Example City")
    return PreparedMessage(
        rendered, from_address=f"digest@{DOMAIN}", from_name="Digest Desk",
        base_url="https://news.example.org",
        unsubscribe_token=TokenSigner([b"bench-secret"]).unsubscribe_token,
        lists={1: ListInfo("Bench readers", format_address("Bench readers", "bench.example.org"))},
        message_id_domain=DOMAIN, campaign_id=1,
    )


def timed(fn: Callable[[Any], object], recipients: list[Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of fn over all recipients, after a short warm-up."""
    for r in recipients[:20]:
        fn(r)
    w0, c0 = time.perf_counter(), time.process_time()
    for r in recipients:
        fn(r)
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Per-message cost of DKIM signing: build() alone vs build()+sign().")
    ap.add_argument("--n", type=int, default=2000, help="messages per measurement (2000)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every measurement R times and report medians (default 1)")
    ap.add_argument("--issue", default=DEFAULT_ISSUE, help=f"issue file ({DEFAULT_ISSUE})")
    ap.add_argument("--key", type=Path, default=None,
                    help="RSA private key (PEM); default: a new one from openssl genrsa 2048")
    ap.add_argument("--send-rate", type=float, default=3000.0,
                    help="messages/s of a send without DKIM, to estimate one with it (3000, "
                         "about what bench/send_bench.py measures)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the dkimpy-as-is and gmpy2 reference rows")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 1_000_000:
        ap.error("--n must be between 1 and 1,000,000")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be between 1 and 20")
    issue = resolve_issue(args.issue)
    if not issue.is_file():
        ap.error(f"no issue file {issue}")

    import dkim

    from newsletter.delivery.dkim import DEFAULT_HEADERS, DkimSigner
    from newsletter.render.message import Recipient, undot

    with tempfile.TemporaryDirectory() as tmp:
        pem = args.key.read_bytes() if args.key else make_rsa_key(Path(tmp))
    if pem is None:
        print("error: openssl not found; give an RSA key with --key FILE "
              "(openssl genrsa -out dkim.key 2048 on any machine)", file=sys.stderr)
        return 2

    prepared = prepare(issue)
    recipients = [Recipient(i, 1, f"user{i}@example.com", f"User {i}") for i in range(args.n)]
    size = len(prepared.build(recipients[0]))

    signers: list[tuple[str, Any]] = [
        ("rsa-2048", DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=pem))]
    have_nacl = importlib.util.find_spec("nacl") is not None
    seed = base64.b64encode(os.urandom(32))  # dknewkey's Ed25519 form
    if have_nacl:
        signers.append(("ed25519", DkimSigner(selector=SELECTOR, domain=DOMAIN,
                                              private_key=seed)))

    include = [h.encode() for h in DEFAULT_HEADERS]

    def with_signer(signer: Any) -> Callable[[Any], object]:
        def run(r: Any) -> object:
            data = prepared.build(r)
            return signer.sign(data) + data  # what the engine sends
        return run

    def dkimpy_as_is(key: bytes, algorithm: bytes) -> Callable[[Any], object]:
        def run(r: Any) -> object:
            data = undot(prepared.build(r))
            return dkim.sign(data, SELECTOR.encode(), DOMAIN.encode(), key,
                             canonicalize=(b"relaxed", b"relaxed"), include_headers=include,
                             signature_algorithm=algorithm) + data
        return run

    cases: list[tuple[str, Callable[[Any], object]]] = [("build()", prepared.build)]
    for name, signer in signers:
        cases.append((f"build()+sign() {name}", with_signer(signer)))
    notes: list[str] = []
    if not have_nacl:
        notes.append("ed25519: skipped, PyNaCl is not installed (dkimpy needs it for Ed25519)")
    if not args.no_reference:
        cases.append(("build()+dkim.sign() rsa-2048 (dkimpy as is)",
                      dkimpy_as_is(pem, b"rsa-sha256")))
        if have_nacl:
            cases.append(("build()+dkim.sign() ed25519 (dkimpy as is)",
                          dkimpy_as_is(seed, b"ed25519-sha256")))
        if importlib.util.find_spec("gmpy2") is not None:
            import gmpy2

            fast = DkimSigner(selector=SELECTOR, domain=DOMAIN, private_key=pem)
            fast._key = {k: gmpy2.mpz(v) for k, v in fast._key.items()}
            signers.append(("rsa-2048 gmpy2", fast))  # verified below, like the others
            cases.append(("build()+sign() rsa-2048, key as gmpy2 mpz (experiment)",
                          with_signer(fast)))
        else:
            notes.append("gmpy2 experiment: skipped, gmpy2 is not installed")

    # Every signed form must verify before its time means anything.
    for name, signer in signers:
        raw = prepared.build(recipients[0])
        record = signer.dns_record().encode()
        if not dkim.verify(signer.sign(raw) + undot(raw), dnsfunc=lambda _n, timeout=5,
                           rec=record: rec):
            print(f"error: the {name} signature did not verify", file=sys.stderr)
            return 1

    results: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in cases}
    for _ in range(args.rounds):
        for label, fn in cases:
            results[label].append(timed(fn, recipients))

    n = args.n
    per = {label: (statistics.median(w for w, _ in runs) / n * 1e6,
                   statistics.median(c for _, c in runs) / n * 1e6)
           for label, runs in results.items()}
    build_cpu = per["build()"][1]
    base_us = 1e6 / args.send_rate

    try:
        dkimpy_version = importlib.metadata.version("dkimpy")
    except importlib.metadata.PackageNotFoundError:
        dkimpy_version = "?"
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"dkimpy {dkimpy_version}")
    print(f"issue: {issue.name}, {size:,} bytes per message; {n:,} messages per measurement, "
          f"{args.rounds} round(s), medians")
    print()
    head = (f"{'':56}{'wall µs':>9}{'CPU µs':>9}{'sign µs':>9}{'sign/s/core':>12}"
            f"{'send msg/s':>11}")
    print(head)
    rows = []
    for label, _ in cases:
        wall, cpu = per[label]
        sign_us = cpu - build_cpu
        signing = label != "build()"
        ceiling = 1e6 / sign_us if signing and sign_us > 0 else None
        send_rate = 1e6 / (base_us + sign_us) if signing else args.send_rate
        print(f"{label:56}{wall:>9.1f}{cpu:>9.1f}"
              + (f"{sign_us:>9.1f}{ceiling:>12,.0f}" if ceiling else f"{'':>9}{'':>12}")
              + f"{send_rate:>11,.0f}")
        rows.append({"case": label, "wall_us": round(wall, 1), "cpu_us": round(cpu, 1),
                     "sign_cpu_us": round(sign_us, 1) if signing else None,
                     "sign_per_s_per_core": round(ceiling) if ceiling else None,
                     "est_send_msg_per_s": round(send_rate)})
    print()
    print("sign µs = CPU µs of the row minus that of build(); sign/s/core = 1e6 / sign µs;")
    print(f"send msg/s = 1e6 / (1e6/{args.send_rate:g} + sign µs): a send at "
          f"{args.send_rate:,.0f} msg/s without DKIM, on one core, with signing added.")
    for note in notes:
        print(note)

    if args.json:
        args.json.write_text(json.dumps({
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "dkimpy": dkimpy_version, "issue": str(issue), "message_bytes": size, "n": n,
            "rounds": args.rounds, "send_rate": args.send_rate, "rows": rows, "notes": notes,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
    sys.exit(main())
