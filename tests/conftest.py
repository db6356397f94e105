"""Shared fixtures: a real SMTP server, a fresh SQLite workspace, the sample files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from newsletter.service import Newsletter
from newsletter.settings import Settings, load_settings
from newsletter.store.sql import NewMember

from .smtpd import SmtpTestServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MD = ROOT / "examples" / "issues" / "sample.md"
SAMPLE_YAML = ROOT / "examples" / "issues" / "sample.yaml"
SAMPLE_ZH = ROOT / "examples" / "issues" / "sample-zh.md"
SAMPLE_CSV = ROOT / "subscribers" / "sample.csv"
SECRET = "test-secret-key-not-for-production"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NEWSLETTER_* from the developer's shell, and no config/.env from the repo."""
    for key in list(os.environ):
        if key.startswith("NEWSLETTER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def smtpd() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as server:
        yield server


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": tmp_path / "var",
        "database_url": f"sqlite:///{tmp_path / 'var' / 'test.db'}",
        "base_url": "https://news.example.org",
        "secret_key": SECRET,
        "from_address": "Digest Desk <digest@example.org>",
        "postal_address": "Example Institute, 1 Example Street, Example City",
        "send_concurrency": 4,
        # Runs end instead of waiting for a retry (tests that retry shorten the backoff).
        "retry_wait_seconds": 0,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(tmp_path: Path, smtpd: SmtpTestServer) -> Settings:
    return make_settings(tmp_path, smtp_url=smtpd.url)


@pytest.fixture
def nl(settings: Settings) -> Newsletter:
    return Newsletter(settings)


def add_subscribers(nl: Newsletter, slug: str, n: int, *, domain: str = "example.com") -> int:
    """Create list `slug` with n active subscribers user0..user{n-1}@domain; returns list id."""
    mlist = nl.store.create_list(slug, name=f"{slug.title()} readers")
    for start in range(0, n, 1000):
        nl.store.upsert_members(mlist.id, [
            NewMember(f"user{i}@{domain}", f"User {i}") for i in range(start, min(n, start + 1000))
        ], source="test")
    return mlist.id


# --- required tests must not skip in CI ---------------------------------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # CI sets NEWSLETTER_TEST_NO_SKIP=1: a skipped test there means something required
    # (a tool, a service) was missing, which must fail the run rather than pass quietly.
    if _skipped and os.environ.get("NEWSLETTER_TEST_NO_SKIP") == "1":
        print(f"\n{len(_skipped)} test(s) skipped but NEWSLETTER_TEST_NO_SKIP=1:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
