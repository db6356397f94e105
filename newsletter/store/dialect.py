"""Every piece of SQL that only one of SQLite and PostgreSQL understands; the rest of the
store is portable SQLAlchemy Core.

Each construct here has both forms side by side (or says why the other database needs
none), so a third backend would be added in this one file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    Engine,
    Integer,
    String,
    Text,
    case,
    cast,
    func,
    literal_column,
    not_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

# --- connections ----------------------------------------------------------------------------

def sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (ls, the web) run while a send writes; NORMAL keeps every committed
    # transaction across a process crash (kill -9) and skips an fsync per commit.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def begin_write(conn: Connection) -> None:
    """Start a chunk's transaction. SQLite: take the write lock first (BEGIN IMMEDIATE),
    because a transaction that reads and then writes fails at once, busy timeout or not,
    when another writer committed in between; waiting for the lock up front is safe."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def secure_delete(conn: Connection) -> None:
    """Make this transaction's deletes overwrite the data (SQLite: deleted rows otherwise
    linger in free pages of the file until reused; PostgreSQL's VACUUM reclaims them)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA secure_delete = ON")


def flush_deleted(engine: Engine) -> None:
    """After a secure delete: SQLite copies the overwritten pages into the database file
    now and empties the WAL, which still holds the old versions of the pages."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


@contextlib.contextmanager
def migration_lock(engine: Engine, key: int) -> Iterator[None]:
    """Held while migrating, so that processes starting together migrate one at a time.
    PostgreSQL: a session advisory lock. SQLite: an exclusive lock on a file beside the
    database (SQLite commits each schema statement on its own, so its write lock alone
    would let two migrations interleave)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(PG_LOCK, {"key": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(PG_UNLOCK, {"key": key})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- JSON attributes (imports) ----------------------------------------------------------------

def json_merge(conn: Connection, old: ColumnElement[Any],
                new: ColumnElement[Any]) -> ColumnElement[Any]:
    """The JSON object old with new's keys set (new holds only strings, so a shallow merge)."""
    if conn.dialect.name == "sqlite":
        return func.json_patch(old, new)
    if conn.dialect.name == "postgresql":
        return cast(cast(old, JSONB).op("||")(cast(new, JSONB)), JSON)
    raise NotImplementedError(f"JSON merge on {conn.dialect.name}")


def json_changes(conn: Connection, old: ColumnElement[Any],
                  new: ColumnElement[Any]) -> ColumnElement[bool]:
    """True when merging new into old would change old."""
    if conn.dialect.name == "sqlite":
        # json() minifies old the way json_patch writes its result.
        return func.json_patch(old, new).is_distinct_from(func.json(old))
    if conn.dialect.name == "postgresql":
        contains = cast(old, JSONB).op("@>", return_type=Boolean)(cast(new, JSONB))
        return not_(contains)
    raise NotImplementedError(f"JSON merge on {conn.dialect.name}")


# --- segment filters ------------------------------------------------------------------------

class strpos(FunctionElement[int]):
    """1 + the offset of needle in haystack, 0 if absent (case-sensitive on both databases,
    unlike LIKE, which SQLite folds for ASCII)."""

    type = Integer()
    inherit_cache = True
    name = "strpos"


@compiles(strpos)
def _strpos_default(element: strpos, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strpos({compiler.process(element.clauses, **kw)})"


@compiles(strpos, "sqlite")
def _strpos_sqlite(element: strpos, compiler: SQLCompiler, **kw: Any) -> str:
    return f"instr({compiler.process(element.clauses, **kw)})"


class bytewise(FunctionElement[str]):
    """Text to order by code point, as Python and SQLite do; PostgreSQL would otherwise use
    the database's locale."""

    type = String()
    inherit_cache = True
    name = "bytewise"


@compiles(bytewise)
def _bytewise_default(element: bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return f'({compiler.process(element.clauses, **kw)}) COLLATE "C"'


@compiles(bytewise, "sqlite")
def _bytewise_sqlite(element: bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


class attr_text(FunctionElement[str]):
    """The text of one attribute of the subscriber: a string as is, a number as its JSON
    text, true/false as "true"/"false", NULL when missing or null."""

    type = String()
    # The SQLite form builds a subquery while compiling: never reuse a compiled form.
    inherit_cache = False
    name = "attr_text"


@compiles(attr_text)
def _attr_text_default(element: attr_text, compiler: SQLCompiler, **kw: Any) -> str:
    column, key = element.clauses.clauses
    return f"({compiler.process(column, **kw)} ->> {compiler.process(key, **kw)})"


@compiles(attr_text, "sqlite")
def _attr_text_sqlite(element: attr_text, compiler: SQLCompiler, **kw: Any) -> str:
    # json_each rather than json_extract's path: SQLite before 3.45 cannot find a key
    # that was stored \u-escaped (SQLAlchemy writes JSON with ensure_ascii), such as 部门.
    column, key = element.clauses.clauses
    each = func.json_each(column).table_valued("key", "value", "type").alias("seg_attr")
    text = case((each.c.type == literal_column("'true'"), literal_column("'true'")),
                (each.c.type == literal_column("'false'"), literal_column("'false'")),
                else_=cast(each.c.value, Text))
    query = select(text).select_from(each).where(each.c.key == key).scalar_subquery()
    return compiler.process(query, **kw)


# --- PostgreSQL advisory locks (the scheduler, migrations) ------------------------------------

def advisory_key(name: str) -> int:
    """A fixed signed 64-bit key for pg_advisory_lock(bigint): the first 8 bytes of
    sha256(name)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


# PostgreSQL's advisory lock functions, all on the lock's own connection. A bigint key shows
# in pg_locks as classid (high 32 bits), objid (low 32 bits) and objsubid 1.
PG_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
PG_UNLOCK = text("SELECT pg_advisory_unlock(:key)")
PG_BACKEND_PID = text("SELECT pg_backend_pid()")
PG_HELD = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND objsubid = 1"
    " AND classid = CAST(:classid AS bigint)::oid AND objid = CAST(:objid AS bigint)::oid")
# The server drops the session of a holder whose machine vanished (no FIN) within about
# 10 + 3 * 5 s, so its lock does not outlive it by hours of TCP timeouts.
PG_KEEPALIVES = text("SELECT set_config('tcp_keepalives_idle', '10', false),"
                     " set_config('tcp_keepalives_interval', '5', false),"
                     " set_config('tcp_keepalives_count', '3', false)")
# Held while migrating: processes starting at once on a new database wait here.
PG_LOCK = text("SELECT pg_advisory_lock(:key)")
