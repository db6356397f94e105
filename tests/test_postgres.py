"""The same program on PostgreSQL: migrations, a send with segments and editions, an import,
an erasure. Runs when NEWSLETTER_TEST_POSTGRES_URL names a server (CI sets it); each test
gets a fresh database, dropped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from newsletter.admin import Admin
from newsletter.errors import StoreError
from newsletter.service import Newsletter
from newsletter.store.db import HEAD, current_revision, make_engine, migrate
from newsletter.store.imports import import_csv
from newsletter.store.sql import NewMember

from .conftest import (
    SAMPLE_MD,
    SECRET,
    add_subscribers,
    open_app,
    postgres_database,
    terminate_connections,
)
from .smtpd import SmtpTestServer


def test_migrations_match_the_tables_on_postgresql(pg_url: str, tmp_path: Path,
                                                   opened: list[Newsletter]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from newsletter.store.schema import metadata

    nl = open_app(opened, tmp_path, pg_url)
    engine = nl.store.engine
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_send_with_a_segment_and_editions_on_postgresql(
    pg_url: str, tmp_path: Path, smtpd: SmtpTestServer, opened: list[Newsletter],
) -> None:
    nl = open_app(opened, tmp_path, pg_url, smtp_url=smtpd.url)
    news = nl.store.create_list("news")
    nl.store.upsert_members(news.id, [
        NewMember(f"u{i}@example.com",
                  attributes={"lang": "zh" if i % 2 else "en", "sector": f"s{i % 3}"})
        for i in range(60)], source="test")
    admin = Admin(nl, "cli:test")
    admin.save_segment("s0", 'attributes.sector = "s0" and joined > 2020-01-01')
    assert admin.count('attributes.sector = "s0"') == 20
    plan = nl.plan_send(SAMPLE_MD, [], segments=["s0"])
    assert plan.due == 20
    report = asyncio.run(nl.run(plan))
    assert report.progress.sent == 20
    assert sorted(r for m in smtpd.messages for r in m.rcpt_tos) == sorted(
        f"u{i}@example.com" for i in range(60) if i % 3 == 0)
    # Suppression by domain and the erase path use the same SQL on both databases.
    admin.suppress("example.com")
    assert nl.store.audience_count([news.id]) == 0
    admin.unsuppress("example.com")
    admin.erase("u0@example.com")
    assert nl.store.find_subscriber("u0@example.com") is None
    assert nl.store.delivery_counts(plan.campaign.id).total == 20


def test_import_counts_on_postgresql(pg_url: str, tmp_path: Path,
                                     opened: list[Newsletter]) -> None:
    nl = open_app(opened, tmp_path, pg_url)
    mlist = nl.store.create_list("news")
    src = tmp_path / "in.csv"
    rows = ["email,name,lang"] + [f"user{i}@example.com,User {i},zh" for i in range(5000)]
    rows += ["not-an-address,,", "user7@example.com,Again,"]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    first = import_csv(nl.store, mlist.id, src)
    assert (first.imported, first.updated, first.skipped) == (5000, 0, 2)
    again = import_csv(nl.store, mlist.id, src)
    assert (again.imported, again.updated, again.skipped) == (0, 5000, 2)


# SQL only one of the two databases understands: PostgreSQL's functions and operators,
# SQLite's pragmas, locking and JSON functions.
_DIALECT_ONLY = re.compile(r"pg_|PRAGMA|BEGIN IMMEDIATE|json_patch|json_each|->>|COLLATE|JSONB"
                           r"|instr\(|::[a-z]")  # the last: a PostgreSQL cast, x::bigint


def test_sql_for_one_database_only_lives_in_the_dialect_module() -> None:
    """Everything else in the package is portable SQL; a third backend changes one file.
    (Migrations are alembic's and say per operation what each database gets.)"""
    package = Path(__file__).resolve().parent.parent / "newsletter"
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel == "store/dialect.py" or rel.startswith("store/migrations/"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            # Docstrings and comments may name them; quoted SQL in code may not.
            if _DIALECT_ONLY.search(code) and ('"' in code or "'" in code) \
                    and not code.strip().startswith(('"""', "'")):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_starting_together_on_a_new_database_migrate_once(
        backend: str, tmp_path: Path) -> None:
    """Workers on several machines started at once against a new database: one migrates,
    the others wait for it; none fails with 'table already exists'."""
    with contextlib.ExitStack() as stack:
        url = (f"sqlite:///{tmp_path / 'new.db'}" if backend == "sqlite"
               else stack.enter_context(postgres_database()))
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")},
               "NEWSLETTER_DATABASE_URL": url, "NEWSLETTER_VAR_DIR": str(tmp_path / "var"),
               "NEWSLETTER_SECRET_KEY": SECRET}
        procs = [subprocess.Popen([sys.executable, "-m", "newsletter", "lists", "ls"], env=env,
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(6)]
        outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, outputs
        engine = make_engine(url)
        try:
            assert current_revision(engine) == HEAD
        finally:
            engine.dispose()


def test_a_database_from_a_newer_release_is_refused_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    engine = make_engine(url)
    try:
        migrate(engine)
        newer = f"{int(HEAD) + 1:04d}"
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": newer})
        with pytest.raises(StoreError, match=f"schema revision {newer}, newer than this "
                                             f"installation of newsletter knows"):
            migrate(engine)
    finally:
        engine.dispose()


def test_a_one_click_unsubscribe_after_the_server_dropped_every_connection_is_honoured(
    pg_url: str, tmp_path: Path, opened: list[Newsletter],
) -> None:
    """A PostgreSQL restart or failover closes the connections `serve` keeps in its pool;
    the next request must still work, not answer 500 and lose an opt-out."""
    from fastapi.testclient import TestClient

    from newsletter.store.schema import MembershipStatus
    from newsletter.web.app import create_app

    nl = open_app(opened, tmp_path, pg_url)
    add_subscribers(nl, "news", 2)
    sub = nl.store.find_subscriber("user1@example.com")
    assert sub is not None
    lid = nl.store.get_list("news").id
    path = "/unsubscribe/" + nl.signer.unsubscribe_token(sub.id, lid)
    with TestClient(create_app(nl)) as client:
        assert client.get(path).status_code == 200  # the pool now holds live connections
        assert nl.store.engine.pool.checkedin() >= 1
        assert terminate_connections(pg_url) >= 1
        resp = client.post(path, data={"List-Unsubscribe": "One-Click"})
        assert resp.status_code == 200, resp.text
    assert nl.store.status_on(sub.id, lid) == MembershipStatus.UNSUBSCRIBED
