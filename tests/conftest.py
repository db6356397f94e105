"""Shared fixtures: a real SMTP server, a fresh workspace (on SQLite, or on PostgreSQL for the
modules that opt into `db_backend`), the sample files."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from newsletter.service import Newsletter
from newsletter.settings import Settings, load_settings
from newsletter.store import db as store_db
from newsletter.store.sql import NewMember

from .smtpd import SmtpTestServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MD = ROOT / "examples" / "issues" / "sample.md"
SAMPLE_YAML = ROOT / "examples" / "issues" / "sample.yaml"
SAMPLE_ZH = ROOT / "examples" / "issues" / "sample-zh.md"
SAMPLE_CSV = ROOT / "subscribers" / "sample.csv"
SECRET = "test-secret-key-not-for-production"
POSTGRES_SERVER = os.environ.get("NEWSLETTER_TEST_POSTGRES_URL", "")
NO_POSTGRES = ("NEWSLETTER_TEST_POSTGRES_URL is not set (e.g. "
               "postgresql://postgres@127.0.0.1:5432/test); .ci/run sets it")

# The database of the running test when it is not the default SQLite file: set by db_backend,
# read by make_settings (tests run one at a time).
_database_url: str | None = None


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


# A database migrated once per session on the PostgreSQL server, which the db_backend tests
# copy (CREATE DATABASE ... TEMPLATE) instead of each running the migrations; dropped when
# the session ends. Tests about migrations get an empty database (pg_url, empty_database).
_template: str | None = None


def _admin_url() -> Any:
    return make_url(POSTGRES_SERVER).set(drivername="postgresql+psycopg")


def _migrated_template(admin: Engine) -> str:
    global _template
    if _template is None:
        name = f"nl_template_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine = store_db.make_engine(_admin_url().set(drivername="postgresql", database=name)
                                      .render_as_string(hide_password=False))
        try:
            store_db.migrate(engine)
        finally:
            engine.dispose()
        _template = name
    return _template


def _drop_template() -> None:
    """At the end of the session (pytest_sessionfinish, below)."""
    if _template is not None:
        admin = create_engine(_admin_url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{_template}" WITH (FORCE)'))
        admin.dispose()


def _create_database(admin: Engine, name: str, template: str | None) -> None:
    sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
    for attempt in range(50):
        try:
            with admin.connect() as conn:
                conn.execute(text(sql))
            return
        except OperationalError as exc:
            # The template's last session may still be ending on the server.
            if "being accessed by other users" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.1)


@contextmanager
def postgres_database(opened: list[Engine] | None = None, *,
                      migrated: bool = False) -> Iterator[str]:
    """A fresh database on the NEWSLETTER_TEST_POSTGRES_URL server, dropped afterwards:
    empty, or with `migrated` a copy of the session's migrated template.

    Yields its URL with the plain scheme, as a user would write it (the app picks psycopg).
    Every engine the program makes meanwhile is kept and disposed before the drop: a pooled
    psycopg connection that is garbage-collected open warns, and the suite turns warnings
    into errors."""
    if not POSTGRES_SERVER:
        pytest.skip(NO_POSTGRES)
    admin_url = _admin_url()
    name = f"nl_test_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    engines: list[Engine] = [] if opened is None else opened

    def keep(*args: Any, **kwargs: Any) -> Engine:
        engine = create_engine(*args, **kwargs)
        engines.append(engine)
        return engine

    try:
        _create_database(admin, name, _migrated_template(admin) if migrated else None)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(store_db, "create_engine", keep)
                yield admin_url.set(drivername="postgresql", database=name) \
                    .render_as_string(hide_password=False)
        finally:
            for engine in engines:
                engine.dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database's URL, for a test that is about PostgreSQL alone."""
    with postgres_database() as url:
        yield url


@pytest.fixture
def opened() -> Iterator[list[Newsletter]]:
    """Newsletters a test opens; their pools are closed before the database is dropped."""
    apps: list[Newsletter] = []
    yield apps
    for nl in apps:
        nl.store.engine.dispose()


def open_app(apps: list[Newsletter], tmp_path: Path, url: str, **overrides: str) -> Newsletter:
    """A Newsletter on `url`, kept in `apps` (the `opened` fixture) to be closed."""
    nl = Newsletter(make_settings(tmp_path, database_url=url, **overrides))
    apps.append(nl)
    return nl


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Modules opt in with `pytestmark = pytest.mark.usefixtures("db_backend")`; a test marked
    # sqlite_only (with its reason) runs on SQLite alone.
    if "db_backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("db_backend", ["sqlite"] if only else ["sqlite", "postgresql"],
                             indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A sqlite_only mark on one pytest.param case of a test that runs on both databases.
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_pg = callspec is not None and callspec.params.get("db_backend") == "postgresql"
        (drop if on_pg and item.get_closest_marker("sqlite_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The database the test's make_settings (and so settings/nl) uses: "sqlite" (a file
    under tmp_path) or "postgresql" (a fresh database on NEWSLETTER_TEST_POSTGRES_URL)."""
    global _database_url
    if request.param == "sqlite":
        yield "sqlite"
        return
    engines: list[Engine] = []
    empty = request.node.get_closest_marker("empty_database") is not None
    with postgres_database(engines, migrated=not empty) as url:
        _database_url = url
        try:
            yield "postgresql"
        finally:
            _database_url = None
    # A test that runs twice must use the database the second time too.
    assert engines, "the test never opened its PostgreSQL database: mark it sqlite_only"


def database_url(tmp_path: Path) -> str:
    """The URL make_settings(tmp_path) uses for the running test's backend."""
    return _database_url or f"sqlite:///{tmp_path / 'var' / 'test.db'}"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "var_dir": tmp_path / "var",
        "database_url": database_url(tmp_path),
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
def issue(tmp_path: Path) -> Path:
    """The test issue (test_content's MD) as a file; a module with its own issue overrides
    this fixture."""
    from .test_content import MD  # here: test_content imports from this module

    path = tmp_path / "issue.md"
    path.write_text(MD, encoding="utf-8")
    return path


@pytest.fixture
def settings(tmp_path: Path, smtpd: SmtpTestServer) -> Settings:
    return make_settings(tmp_path, smtp_url=smtpd.url)


@pytest.fixture
def nl(settings: Settings) -> Newsletter:
    return Newsletter(settings)


def terminate_connections(url: str) -> int:
    """What a PostgreSQL restart or failover does to every process using the database at
    `url`: the server ends all their sessions. Returns how many it ended."""
    engine = store_db.make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )).scalar_one())
    finally:
        engine.dispose()


HANGDUMP = Path(__file__).parent / "hangdump"


def run_cli(*args: str, env: dict[str, str] | None, cwd: Path, timeout: float = 120,
            on_hang: Callable[[], str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m newsletter ARGS`, its output captured. A command still running after
    `timeout` is looked at before it is killed: `on_hang()` (the database's state, say),
    then its threads' stacks and its asyncio tasks' awaits (tests/hangdump); the test then
    fails with all of it instead of a bare timeout."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HANGDUMP), env.get("PYTHONPATH")) if p)
    with subprocess.Popen([sys.executable, "-m", "newsletter", *args], env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            state = on_hang() if on_hang is not None else ""
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"newsletter {' '.join(args)} did not end within {timeout:g} "
                                 f"s; {state}\nstdout: {out}\nstderr, with where it "
                                 f"waited: {err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def add_subscribers(nl: Newsletter, slug: str, n: int, *, domain: str = "example.com") -> int:
    """Create list `slug` with n active subscribers user0..user{n-1}@domain; returns list id."""
    mlist = nl.store.create_list(slug, name=f"{slug.title()} readers")
    for start in range(0, n, 1000):
        nl.store.upsert_members(mlist.id, [
            NewMember(f"user{i}@{domain}", f"User {i}") for i in range(start, min(n, start + 1000))
        ], source="test")
    return mlist.id


async def wait_until(check: Callable[[], bool], timeout: float) -> float:
    """Wait (letting the event loop's tasks, e.g. schedulers, run) until check() holds;
    the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


# --- required tests must not skip in CI ---------------------------------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _drop_template()
    # CI sets NEWSLETTER_TEST_NO_SKIP=1: a skipped test there means something required
    # (a tool, a service) was missing, which must fail the run rather than pass quietly.
    if _skipped and os.environ.get("NEWSLETTER_TEST_NO_SKIP") == "1":
        print(f"\n{len(_skipped)} test(s) skipped but NEWSLETTER_TEST_NO_SKIP=1:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
