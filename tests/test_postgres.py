"""The same program on PostgreSQL: migrations, a send with segments and editions, an import,
an erasure. Runs when NEWSLETTER_TEST_POSTGRES_URL names a server (CI sets it); each test
gets a fresh database, dropped afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from newsletter.admin import Admin
from newsletter.service import Newsletter
from newsletter.store.imports import import_csv
from newsletter.store.sql import NewMember

from .conftest import SAMPLE_MD, make_settings, postgres_database
from .smtpd import SmtpTestServer


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def opened() -> Iterator[list[Newsletter]]:
    """Newsletters a test opens; their pools are closed before the database is dropped."""
    apps: list[Newsletter] = []
    yield apps
    for nl in apps:
        nl.store.engine.dispose()


def _open(apps: list[Newsletter], tmp_path: Path, url: str, **overrides: str) -> Newsletter:
    nl = Newsletter(make_settings(tmp_path, database_url=url, **overrides))
    apps.append(nl)
    return nl


def test_migrations_match_the_tables_on_postgresql(pg_url: str, tmp_path: Path,
                                                   opened: list[Newsletter]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from newsletter.store.schema import metadata

    nl = _open(opened, tmp_path, pg_url)
    engine = nl.store.engine
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_send_with_a_segment_and_editions_on_postgresql(
    pg_url: str, tmp_path: Path, smtpd: SmtpTestServer, opened: list[Newsletter],
) -> None:
    nl = _open(opened, tmp_path, pg_url, smtp_url=smtpd.url)
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
    nl = _open(opened, tmp_path, pg_url)
    mlist = nl.store.create_list("news")
    src = tmp_path / "in.csv"
    rows = ["email,name,lang"] + [f"user{i}@example.com,User {i},zh" for i in range(5000)]
    rows += ["not-an-address,,", "user7@example.com,Again,"]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    first = import_csv(nl.store, mlist.id, src)
    assert (first.imported, first.updated, first.skipped) == (5000, 0, 2)
    again = import_csv(nl.store, mlist.id, src)
    assert (again.imported, again.updated, again.skipped) == (0, 5000, 2)
