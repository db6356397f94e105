"""Database engine creation and migrations that apply on first use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from ..errors import ConfigError, StoreError
from . import dialect

if TYPE_CHECKING:
    from alembic.config import Config

# The newest migration. A test checks it against alembic's own head, so it cannot drift;
# knowing it here lets a process whose schema is current skip importing alembic (12 MiB of
# a sender's memory).
HEAD = "0007"
# The PostgreSQL advisory lock held while migrating.
MIGRATION_ADVISORY_KEY = dialect.advisory_key("newsletter.migrate")


def make_engine(url: str) -> Engine:
    """An Engine for url; SQLite files get WAL, foreign keys and a busy timeout."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError("NEWSLETTER_DATABASE_URL", "not a database URL") from None
    kwargs: dict[str, Any] = {}
    if parsed.drivername in ("postgresql", "postgres"):
        # psycopg 3 is the driver we ship; SQLAlchemy's default for the bare scheme is
        # psycopg2, which we do not depend on.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "postgresql":
        # A restart or failover closes every pooled connection. Without a check when one is
        # taken from the pool, the next use of each fails once: in `serve`, a one-click
        # unsubscribe answered 500 and not recorded. The check is a round trip per checkout;
        # the hot path (the ledger writer) holds its connection and does not pay it.
        kwargs["pool_pre_ping"] = True
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # a missing driver, a bad option
        raise ConfigError("NEWSLETTER_DATABASE_URL", str(exc).splitlines()[0]) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", dialect.sqlite_pragmas)
    return engine


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "newsletter.store:migrations")
    return cfg


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, "alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; cheap (and alembic-free) when it already is.

    Processes starting at once on a new or older database (workers on several machines)
    take turns: one migrates, the others wait for it, then find nothing left to do."""
    try:
        found = current_revision(engine)
        if found == HEAD:
            return
        _refuse_newer(found)
        with dialect.migration_lock(engine, MIGRATION_ADVISORY_KEY):
            found = current_revision(engine)  # another process may have done it meanwhile
            if found == HEAD:
                return
            _refuse_newer(found)
            cfg = alembic_config()
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                from alembic import command

                command.upgrade(cfg, "head")
    except OperationalError as exc:
        raise StoreError(f"cannot open the database: {exc.orig}") from None


def _refuse_newer(found: str | None) -> None:
    """A database a newer release migrated: say so, instead of alembic's traceback about a
    revision it cannot locate. (Revisions are numbered 0001, 0002, ... in order.)"""
    if found is not None and found.isdigit() and len(found) == len(HEAD) and found > HEAD:
        raise StoreError(f"the database is at schema revision {found}, newer than this "
                         f"installation of newsletter knows ({HEAD}): upgrade newsletter on "
                         "this machine to the release the others run")
