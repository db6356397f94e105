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


def test_migrations_create_exactly_the_declared_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    migrate(engine)  # a second time is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert diff == []
    assert mode == "wal"


def test_only_one_live_run_can_claim_a_campaign(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'c.db'}")
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
    engine = make_engine(f"sqlite:///{tmp_path / 'l.db'}")
    migrate(engine)
    store = SqlStore(engine)
    store.create_list("news")
    with pytest.raises(ConflictError, match="already exists"):
        store.create_list("news")
    with pytest.raises(ConflictError, match="invalid list slug"):
        store.create_list("../etc")
    with pytest.raises(ValueError, match="control character"):
        store.create_list("ok", name="Evil\r\nBcc: x@y.z")


def test_the_head_revision_constant_matches_alembic() -> None:
    from alembic.script import ScriptDirectory

    from newsletter.store.db import HEAD, alembic_config

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD
