"""The store: migrations match the table definitions; claims are exclusive."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from newsletter.errors import ConflictError
from newsletter.store.db import make_engine, migrate
from newsletter.store.schema import metadata
from newsletter.store.sql import SqlStore

from .conftest import database_url

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")


@pytest.mark.empty_database
def test_migrations_create_exactly_the_declared_schema(tmp_path: Path) -> None:
    engine = make_engine(database_url(tmp_path))
    migrate(engine)
    migrate(engine)  # a second time is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


@pytest.mark.sqlite_only(reason="WAL is a SQLite journal mode")
def test_sqlite_files_use_wal(tmp_path: Path) -> None:
    engine = make_engine(database_url(tmp_path))
    migrate(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_only_one_live_run_can_claim_a_campaign(tmp_path: Path) -> None:
    engine = make_engine(database_url(tmp_path))
    migrate(engine)
    store = SqlStore(engine)
    mlist = store.create_list("news")
    c = store.create_campaign(issue_key="k", content_hash="h", subject="s", issue_json="{}",
                              html="", text="", list_ids=[mlist.id])
    store.claim_campaign(c.id, runner="host:1", lease=30)
    with pytest.raises(ConflictError, match="being sent by host:1"):
        store.claim_campaign(c.id, runner="host:2", lease=30)
    store.claim_campaign(c.id, runner="host:2", lease=0)  # a dead runner's lease can be taken
    store.finish_run(c.id, runner="host:2")
    store.claim_campaign(c.id, runner="host:3", lease=30)  # released: free to claim


def test_list_slugs_and_names_are_checked(tmp_path: Path) -> None:
    engine = make_engine(database_url(tmp_path))
    migrate(engine)
    store = SqlStore(engine)
    store.create_list("news")
    with pytest.raises(ConflictError, match="already exists"):
        store.create_list("news")
    with pytest.raises(ConflictError, match="invalid list slug"):
        store.create_list("../etc")
    with pytest.raises(ValueError, match="control character"):
        store.create_list("ok", name="Evil\r\nBcc: x@y.z")


@pytest.mark.sqlite_only(reason="no database involved")
def test_the_head_revision_constant_matches_alembic() -> None:
    from alembic.script import ScriptDirectory

    from newsletter.store.db import HEAD, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD
