"""Database engine creation and migrations that apply on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from ..errors import ConfigError, StoreError


def make_engine(url: str) -> Engine:
    """An Engine for url; SQLite files get WAL, foreign keys and a busy timeout."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("NEWSLETTER_DATABASE_URL", "not a database URL") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # a missing driver, a bad option
        raise ConfigError("NEWSLETTER_DATABASE_URL", str(exc).splitlines()[0]) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (ls, the web) run while a send writes; NORMAL keeps every committed
    # transaction across a process crash (kill -9) and skips an fsync per commit.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", "newsletter.store:migrations")
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; cheap when it already is."""
    cfg = alembic_config()
    head = ScriptDirectory.from_config(cfg).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            from alembic import command

            command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise StoreError(f"cannot open the database: {exc.orig}") from None
