"""Streaming CSV import and export of subscribers, with a per-row report of rejected rows.

An import reads the file once, in chunks. Each chunk is validated in Python (a strict regular
expression for plain addresses, email_validator for everything else), written into a TEMP
staging table, and then decided and applied by set-based SQL in one short transaction:
duplicates in the file, suppressed addresses, opt-outs on the list, new subscribers, new
memberships and their events. The database does the deduplicating, so memory stays flat
however long the file is, and other writers (a running send, the web) get their turn between
chunks. Rejected rows go to a report file (line, email, reason), never to a growing list.

Every row read ends as exactly one of:

- imported: the address was not on the list; it is now, active (a new subscriber, or an
  existing one who joins this list);
- updated: the address was already on the list, active or pending (pending stays pending:
  an import does not stand in for the confirmation mail); a non-empty name and the row's
  attributes are merged into the subscriber. `unchanged` counts those where nothing differed;
- skipped: rejected, with its reason: not readable or not valid, a duplicate of an earlier
  line, suppressed, or unsubscribed/bounced earlier on this list (never reactivated).

Blank lines, and lines whose cells are all empty, are not rows.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Literal, TextIO

import email_validator
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from ..errors import HeaderInjectionError, ImportFileError
from ..headers import check_header_text
from . import dialect, suppression
from .schema import (
    TZ,
    MembershipStatus,
    SuppressionKind,
    lists,
    membership_events,
    memberships,
    subscribers,
    suppressions,
)
from .sql import SqlStore

CHUNK = 20_000      # rows per write transaction: other writers wait at most one chunk (~0.2 s)
PROGRESS_EVERY = 5_000
SHOWN = 100         # rejected rows kept in memory for display; the report file has them all
NAME_MAX = 200      # subscribers.name is VARCHAR(200): longer would fail a whole chunk
_SNIFF_BLOCK = 1 << 20

# --- addresses -------------------------------------------------------------------------------

_ATEXT = r"A-Za-z0-9!#$%&'*+/=^_`{|}~-"  # RFC 5322 atext without '?' (no encoded-words)
_FAST_EMAIL = re.compile(
    rf"([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})"
)
# email_validator rejects special-use domains and their subdomains, and lowercases RFC 2142
# local parts: both go the slow way. (Its module-wide defaults are assumed unchanged.)
_SPECIAL_SUFFIXES = tuple("." + d for d in email_validator.SPECIAL_USE_DOMAIN_NAMES)
_CASELESS_LOCAL = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def fast_email(raw: str) -> str | None:
    """The normalised form of a plain ASCII address that email_validator certainly accepts
    unchanged except for the domain's case, or None: then ask email_validator.

    About 30 times cheaper than validate_email; tests check agreement property-wise."""
    m = _FAST_EMAIL.fullmatch(raw)
    if m is None or len(raw) > 254:
        return None
    local, domain = m.group(1), m.group(2)
    # '--' in a label is an R-LDH label or Punycode: email_validator checks those itself.
    if len(local) > 64 or "--" in domain or local.lower() in _CASELESS_LOCAL:
        return None
    domain = domain.lower()
    if ("." + domain).endswith(_SPECIAL_SUFFIXES):
        return None
    return f"{local}@{domain}"


def normalize_email(raw: str) -> str:
    """A valid, normalised ASCII address, or EmailNotValidError/ValueError saying why not."""
    raw = raw.strip()
    fast = fast_email(raw)
    if fast is not None:
        return fast
    return _slow_email(raw)


def _slow_email(raw: str) -> str:
    check_header_text(raw, "email")
    info = validate_email(raw, check_deliverability=False)
    if info.ascii_email is None:
        # A non-ASCII local part needs SMTPUTF8 end to end; we do not send that yet.
        raise ValueError("non-ASCII local part needs SMTPUTF8, which is not supported")
    return info.ascii_email  # IDN domains become punycode


# --- reading the file ------------------------------------------------------------------------

class Outcome(StrEnum):
    IMPORTED = "imported"
    UPDATED = "updated"
    INVALID = "invalid"
    DUPLICATE = "duplicate"
    SUPPRESSED = "suppressed"
    OPTED_OUT = "opted_out"


_ACCEPTED = (Outcome.IMPORTED.value, Outcome.UPDATED.value)
_OPTED_OUT = (MembershipStatus.UNSUBSCRIBED.value, MembershipStatus.BOUNCED.value)
_SURROGATE = re.compile("[\udc80-\udcff]")
_DELIMITERS = (",", ";", "\t")


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str
    email: str = ""


@dataclass
class ImportReport:
    """What an import did (or, in a dry run, would do). imported + updated + skipped ==
    rows_read; `rejected` holds only the first SHOWN rejections, the report file all."""

    rows_read: int = 0
    imported: int = 0
    updated: int = 0
    skipped: int = 0
    unchanged: int = 0  # of updated: nothing to change
    pending: int = 0    # of updated: still waiting for their confirmation, kept pending
    skipped_by: dict[str, int] = field(default_factory=dict)  # Outcome value -> count
    rejected: list[Rejected] = field(default_factory=list)
    encoding: str = ""
    delimiter: str = ""
    dry_run: bool = False
    report_path: Path | None = None

    def summary(self) -> str:
        return (f"imported {self.imported}, updated {self.updated}, skipped {self.skipped} "
                f"(rows read {self.rows_read})")


def detect_encoding(fh: IO[bytes], name: str | Path) -> str:
    """The encoding of a CSV file: UTF-8 (with or without BOM), UTF-16 with BOM, or
    GB18030/GBK as Chinese Excel writes it. Judged on the first block holding non-ASCII
    bytes; rewinds fh. ImportFileError when it cannot tell."""
    start = fh.read(4)
    fh.seek(0)
    if start.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    while True:
        block = fh.read(_SNIFF_BLOCK)
        if not block or not block.isascii():
            break
    fh.seek(0)
    if not block:
        return "utf-8"  # all ASCII
    last = len(block) < _SNIFF_BLOCK  # the end of the file: no character cut in two
    verdicts = {enc: _decode_stats(block, enc, last) for enc in ("utf-8", "gb18030")}
    bad_utf8, good_utf8 = verdicts["utf-8"]
    if bad_utf8 == 0:
        return "utf-8"
    bad_gb, good_gb = verdicts["gb18030"]
    # Almost any byte pair is some GB18030 character, so GB18030 must also look like
    # Chinese: nearly all of it in GB2312 (common simplified characters and punctuation).
    # Latin-1 text read as GB18030 gives rare characters outside it.
    if good_gb and bad_gb * 10 <= good_gb and bad_gb <= bad_utf8:
        text = block.decode("gb18030", "ignore")
        rare = text.encode("gb2312", "replace").count(b"?") - text.count("?")
        if rare * 10 <= good_gb:
            return "gb18030"
    # A UTF-8 file with a few broken rows: those rows are rejected, the rest imports.
    if good_utf8 and bad_utf8 * 10 <= good_utf8:
        return "utf-8"
    raise ImportFileError(f"{name}: cannot tell the text encoding (neither UTF-8 nor "
                          "GB18030); pass --encoding, e.g. --encoding cp1252")


def _decode_stats(block: bytes, encoding: str, final: bool) -> tuple[int, int]:
    """(undecodable bytes, decoded non-ASCII characters) of block in encoding; unless final,
    a character cut at the block's end is left out."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="surrogateescape")
    text = decoder.decode(block, final=final)
    bad = len(_SURROGATE.findall(text))
    return bad, len(text) - len(text.encode("ascii", "ignore")) - bad


def sniff_delimiter(sample: str) -> str:
    """',', ';' or tab: the one that splits the header into cells including 'email' and
    gives the most following lines the header's width (',' when nothing tells)."""
    lines = sample.splitlines()[:50]
    best, best_score = ",", (-1, -1)
    for d in _DELIMITERS:
        rows = list(csv.reader(lines, delimiter=d))
        if not rows:
            break
        header = [h.strip().lstrip("\ufeff").lower() for h in rows[0]]
        if "email" not in header:
            continue
        score = (sum(1 for r in rows[1:] if len(r) == len(header)), len(header))
        if score > best_score:
            best, best_score = d, score
    return best


@dataclass(frozen=True)
class _Layout:
    email_at: int
    name_at: int | None
    attrs: tuple[tuple[int, str], ...]
    width: int


def _layout(header: list[str], path: Path) -> _Layout:
    columns = [h.strip().lstrip("\ufeff").lower() for h in header]
    if "email" not in columns:
        raise ImportFileError(f"{path}: the header row has no 'email' column "
                              f"(found: {', '.join(columns) or 'nothing'})")
    email_at = columns.index("email")
    name_at = columns.index("name") if "name" in columns else None
    # A column name given twice counts once, the first, as 'email' and 'name' do.
    attrs = tuple((i, c) for i, c in enumerate(columns)
                  if c and c not in ("email", "name") and columns.index(c) == i)
    return _Layout(email_at, name_at, attrs, len(columns))


# A staged row: line, email, email_key (None: invalid), name, attributes as JSON text,
# outcome decided in Python (None: SQL decides), reason.
_Staged = tuple[int, str, str | None, str, str | None, str | None, str | None]


def _shown(text: str) -> str:
    """A cell for the report: undecodable bytes as \\xNN, and not too long."""
    if _SURROGATE.search(text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text[:320]


def _read(reader: Iterator[list[str]], line_num: Callable[[], int], layout: _Layout,
          encoding: str, check: suppression.SuppressionCheck) -> Iterator[_Staged]:
    """Validate rows in file order. The hot loop of an import: plain addresses take the
    regular-expression path, and the common case does no more than it must."""
    email_at, name_at, attr_cols, width = (layout.email_at, layout.name_at, layout.attrs,
                                           layout.width)
    check_suppression = bool(check.domains or check.hashes)
    # JSON text of a flat object of strings, as json.dumps writes it, at a third of the cost.
    fast, quote, invalid = fast_email, json.encoder.encode_basestring_ascii, Outcome.INVALID.value
    last = line_num()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield (last + 1, "", None, "", None, invalid, f"unreadable CSV: {exc}")
            last = line_num()
            continue
        except UnicodeDecodeError as exc:
            # Only codecs that surrogateescape cannot mend (UTF-16) get here.
            yield (last + 1, "", None, "", None, invalid,
                   f"not valid {encoding} text ({exc.reason}); the rest of the file was not read")
            return
        line = last + 1
        last = line_num()
        joined = "".join(row)
        if not joined.strip():
            continue  # blank lines are not rows
        n = len(row)
        raw_email = row[email_at].strip() if email_at < n else ""
        if not joined.isascii() and _SURROGATE.search(joined):
            yield (line, _shown(raw_email), None, "", None, invalid,
                   f"bytes that are not valid {encoding} text")
            continue
        if n > width:
            yield (line, _shown(raw_email), None, "", None, invalid,
                   f"{n} fields, the header has {width}")
            continue
        if not raw_email:
            yield (line, "", None, "", None, invalid, "no email address")
            continue
        email = fast(raw_email)
        try:
            if email is None:
                email = _slow_email(raw_email)
            name = row[name_at].strip() if name_at is not None and name_at < n else ""
            if name:
                check_header_text(name, "name")
                if len(name) > NAME_MAX:
                    raise ValueError(f"name longer than {NAME_MAX} characters")
        except (EmailNotValidError, ValueError, HeaderInjectionError) as exc:
            yield (line, _shown(raw_email), None, "", None, invalid, str(exc))
            continue
        attrs = None
        if attr_cols:
            values = [f"{quote(c)}: {quote(v)}" for i, c in attr_cols
                      if i < n and (v := row[i].strip())]
            if values:
                attrs = "{" + ", ".join(values) + "}"
        key = email.lower()
        why = check.reason(key) if check_suppression else None
        yield (line, email, key, name, attrs,
               None if why is None else Outcome.SUPPRESSED.value, why)


def _batches(rows: Iterator[_Staged], progress: Callable[[int], None]) \
        -> Iterator[list[_Staged]]:
    """Rows in lists of CHUNK, reporting progress every PROGRESS_EVERY rows."""
    batch: list[_Staged] = []
    n = 0
    for row in rows:
        batch.append(row)
        n += 1
        if n % PROGRESS_EVERY == 0:
            progress(n)
        if len(batch) >= CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch
    progress(n)


# --- the database side -----------------------------------------------------------------------

# Per connection (TEMPORARY): concurrent imports each have their own, and nothing of it is
# ever committed to the database file.
_stage_meta = MetaData()
_stage = Table(
    "import_stage", _stage_meta,
    Column("line", Integer, primary_key=True),
    Column("email", String(320), nullable=False),  # normalised, or as given when invalid
    Column("email_key", String(320)),              # lowercased; NULL: the row is invalid
    Column("name", String(NAME_MAX), nullable=False),
    Column("attrs", JSON(none_as_null=True)),      # the row's other columns, or NULL
    Column("outcome", String(16)),                 # an Outcome; NULL until decided
    Column("reason", Text),
    Column("dup_of", Integer),                     # duplicates: the line it repeats
    Column("sub_id", Integer),                     # the subscriber, once known
    Column("mstatus", String(16)),                 # the membership's status before
    Column("changed", Boolean),                    # an existing subscriber's details change
    # Duplicates are found by an earlier line with the same key: one index probe per row.
    Index("ix_import_stage_key", "email_key", "line"),
    prefixes=["TEMPORARY"],
)
# A chunk that lost a race for a new address is decided again this many times in all.
_CHUNK_ATTEMPTS = 5
_STAGED_COLUMNS = ("line", "email", "email_key", "name", "attrs", "outcome", "reason")


def _executemany_sql(conn: Connection) -> tuple[str, bool]:
    """The staging INSERT in the driver's own parameter style, and whether it takes tuples:
    executemany straight on the driver is 3x cheaper per row than a Core insert."""
    stmt = insert(_stage).values({c: bindparam(c) for c in _STAGED_COLUMNS})
    compiled = stmt.compile(dialect=conn.dialect)
    positional = bool(compiled.positional)
    if positional:
        assert tuple(compiled.positiontup or ()) == _STAGED_COLUMNS
    return str(compiled), positional


class _Chunks:
    """The staging table on one held connection, and the statements that decide and apply
    a chunk of it. Each chunk commits on its own."""

    def __init__(self, engine: Engine, list_id: int, *, source: str, dry_run: bool,
                 report: ImportReport, report_file: TextIO | None) -> None:
        self.list_id, self.dry_run, self.report = list_id, dry_run, report
        self.report_file = report_file
        self.writer = csv.writer(report_file) if report_file is not None else None
        self.conn = engine.connect()
        try:
            _stage.drop(self.conn, checkfirst=True)  # left on a pooled connection by a crash
            _stage.create(self.conn)
            self.conn.commit()
        except BaseException:
            self.conn.close()
            raise
        self.insert_sql, self.positional = _executemany_sql(self.conn)
        self.decide, self.apply = self._statements(source)

    def close(self) -> None:
        try:
            self.conn.rollback()
            _stage.drop(self.conn, checkfirst=True)
            self.conn.commit()
        finally:
            self.conn.close()

    def _statements(self, source: str) -> tuple[list[Any], list[Any]]:
        st, s, m, su = _stage, subscribers, memberships, suppressions
        lid = literal(self.list_id)
        now = bindparam("now", type_=TZ)
        chunk = st.c.line.between(bindparam("lo"), bindparam("hi"))
        undecided = and_(chunk, st.c.outcome.is_(None))
        earlier = _stage.alias("earlier")
        same_key = earlier.c.email_key == st.c.email_key
        by_address = and_(su.c.email_key == st.c.email_key,
                          su.c.kind == SuppressionKind.ADDRESS.value)
        imported = and_(chunk, st.c.outcome == Outcome.IMPORTED.value)
        status_before = select(m.c.status).select_from(m.join(s, s.c.id == m.c.subscriber_id)) \
            .where(s.c.email_key == st.c.email_key, m.c.list_id == lid).scalar_subquery()
        differs = or_(
            and_(st.c.name != "", st.c.name != s.c.name),
            and_(st.c.attrs.is_not(None),
                 dialect.json_changes(self.conn, s.c.attributes, st.c.attrs)),
        )
        decide = [
            # The first valid occurrence of an address counts; later ones are duplicates,
            # whatever else is true of them.
            update(st).where(chunk, st.c.email_key.is_not(None),
                             exists().where(same_key, earlier.c.line < st.c.line))
            .values(outcome=Outcome.DUPLICATE.value,
                    dup_of=select(func.min(earlier.c.line)).where(same_key).scalar_subquery()),
            # Suppressed addresses can be many: checked here, not in Python.
            update(st).where(undecided, exists().where(by_address))
            .values(outcome=Outcome.SUPPRESSED.value,
                    reason=select(literal("suppressed (") + su.c.reason + literal(")"))
                    .where(by_address).scalar_subquery()),
            # One pass: the subscriber, their status on the list, and so the outcome.
            update(st).where(undecided).values(
                sub_id=select(s.c.id).where(s.c.email_key == st.c.email_key).scalar_subquery(),
                mstatus=status_before,
                outcome=case((status_before.is_(None), Outcome.IMPORTED.value),
                             (status_before.in_(_OPTED_OUT), Outcome.OPTED_OUT.value),
                             else_=Outcome.UPDATED.value)),
            update(st).where(chunk, st.c.outcome.in_(_ACCEPTED), st.c.sub_id.is_not(None),
                             exists().where(s.c.id == st.c.sub_id, differs))
            .values(changed=True),
        ]
        apply = [
            # Existing subscribers keep their id; a non-empty name replaces theirs and the
            # row's attributes are merged into theirs.
            update(s).where(s.c.id == st.c.sub_id, chunk, st.c.changed.is_(True)).values(
                name=case((st.c.name != "", st.c.name), else_=s.c.name),
                attributes=case((st.c.attrs.is_(None), s.c.attributes),
                                else_=dialect.json_merge(self.conn, s.c.attributes, st.c.attrs))),
            # In file order, so new subscribers' ids follow the file.
            insert(s).from_select(
                ["email", "email_key", "name", "attributes", "created_at"],
                select(st.c.email, st.c.email_key, st.c.name,
                       func.coalesce(st.c.attrs, literal_column("'{}'")), now)
                .where(imported, st.c.sub_id.is_(None)).order_by(st.c.line)),
            update(st).where(imported, st.c.sub_id.is_(None)).values(
                sub_id=select(s.c.id).where(s.c.email_key == st.c.email_key).scalar_subquery()),
            insert(m).from_select(
                ["list_id", "subscriber_id", "status", "created_at", "updated_at"],
                select(lid, st.c.sub_id, literal(MembershipStatus.ACTIVE.value), now, now)
                .where(imported)),
            insert(membership_events).from_select(
                ["list_id", "subscriber_id", "new_status", "source", "at"],
                select(lid, st.c.sub_id, literal(MembershipStatus.ACTIVE.value),
                       literal(source), now)
                .where(imported).order_by(st.c.line)),
        ]
        return decide, apply

    def run(self, batch: Sequence[_Staged]) -> None:
        """Stage, decide and (unless a dry run) apply one chunk; count it and report its
        rejected rows."""
        conn = self.conn
        rows: Sequence[Any] = batch if self.positional else \
            [dict(zip(_STAGED_COLUMNS, r, strict=True)) for r in batch]
        conn.exec_driver_sql(self.insert_sql, rows)
        conn.commit()  # TEMP only: no lock on the database file yet
        params = {"lo": batch[0][0], "hi": batch[-1][0], "now": dt.datetime.now(dt.UTC)}
        for attempt in range(_CHUNK_ATTEMPTS):
            if not self.dry_run:
                dialect.begin_write(conn)
            try:
                for stmt in self.decide:
                    conn.execute(stmt, params)
                if not self.dry_run:
                    for stmt in self.apply:
                        conn.execute(stmt, params)
                self._count(params)
            except IntegrityError:
                # PostgreSQL: another writer (a second import, the subscribe form) added one
                # of this chunk's new addresses after we decided it was new. The whole
                # chunk rolls back (the staged rows' decisions too) and is decided again,
                # now seeing that address as existing. SQLite's write lock, taken before
                # deciding, cannot let this happen.
                conn.rollback()
                if attempt == _CHUNK_ATTEMPTS - 1:
                    raise
                continue
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            return

    def _count(self, params: dict[str, Any]) -> None:
        st, report = _stage, self.report
        chunk = st.c.line.between(bindparam("lo"), bindparam("hi"))
        for outcome, mstatus, changed, n in self.conn.execute(
                select(st.c.outcome, st.c.mstatus, st.c.changed, func.count())
                .where(chunk).group_by(st.c.outcome, st.c.mstatus, st.c.changed), params):
            if outcome == Outcome.IMPORTED:
                report.imported += n
            elif outcome == Outcome.UPDATED:
                report.updated += n
                report.unchanged += 0 if changed else n
                report.pending += n if mstatus == MembershipStatus.PENDING else 0
            else:
                report.skipped += n
                report.skipped_by[outcome] = report.skipped_by.get(outcome, 0) + n
        rejected = self.conn.execute(
            select(st.c.line, st.c.email, st.c.outcome, st.c.reason, st.c.dup_of, st.c.mstatus)
            .where(chunk, st.c.outcome.not_in(_ACCEPTED)).order_by(st.c.line), params)
        for line, email, outcome, reason, dup_of, mstatus in rejected:
            if outcome == Outcome.DUPLICATE:
                reason = f"duplicate of line {dup_of}"
            elif outcome == Outcome.OPTED_OUT:
                reason = f"{mstatus} earlier on this list: not reactivated"
            if len(report.rejected) < SHOWN:
                report.rejected.append(Rejected(line, reason, email))
            if self.writer is not None:
                self.writer.writerow([line, email, reason])


# --- the entry points ------------------------------------------------------------------------

def import_csv(
    store: SqlStore, list_id: int, path: Path, *, encoding: str | None = None,
    delimiter: str | None = None, dry_run: bool = False, source: str = "import",
    report_path: Path | None = None, on_progress: Callable[[int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import a CSV file (header row with an 'email' column) into a list.

    The encoding is detected unless given (UTF-8 with or without BOM, UTF-16 with BOM,
    GB18030/GBK); the delimiter (',', ';' or tab) is sniffed unless given. Rejected rows go
    to report_path (CSV, UTF-8 with BOM for Excel: line, email, reason), which is written
    whenever it is given. A dry run decides every row exactly as the import would and
    writes nothing to the database. on_progress(rows read) and on_bytes(bytes read) are
    called every few thousand rows, never while the import holds the database's write lock.
    """
    store.list_by_id(list_id)  # NotFoundError before anything is read
    path = Path(path)
    if report_path is not None and report_path.resolve() == path.resolve():
        raise ImportFileError(f"{path}: the report would overwrite the file being imported")
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{path}: {exc.strerror}") from None
    with raw:
        enc = encoding or detect_encoding(raw, path)
        try:
            text = io.TextIOWrapper(raw, encoding=enc, errors="surrogateescape", newline="")
        except LookupError:
            raise ImportFileError(f"unknown text encoding {enc!r}") from None
        try:
            sample = text.read(64 * 1024)
            text.seek(0)
        except UnicodeDecodeError as exc:
            raise ImportFileError(f"{path}: not {enc} text (byte {exc.start}); "
                                  "pass --encoding") from None
        if delimiter is not None and delimiter not in _DELIMITERS:
            raise ImportFileError(f"the delimiter must be ',', ';' or a tab, not {delimiter!r}")
        delim = delimiter or sniff_delimiter(sample)
        reader = csv.reader(text, delimiter=delim)
        header: list[str] | None = []
        while header == []:  # blank lines before the header are not the header
            header = next(reader, None)
        if header is None:
            raise ImportFileError(f"{path}: the file is empty")
        layout = _layout(header, path)
        check = suppression.load_check(store.engine)
        report = ImportReport(encoding=enc, delimiter=delim, dry_run=dry_run)
        report_file = _open_report(report_path) if report_path is not None else None
        chunks = None

        def progress(rows: int) -> None:
            if on_progress is not None:
                on_progress(rows)
            if on_bytes is not None:
                on_bytes(raw.tell())

        try:
            chunks = _Chunks(store.engine, list_id, source=source, dry_run=dry_run,
                             report=report, report_file=report_file)
            rows = _read(reader, lambda: reader.line_num, layout, enc, check)
            # Progress is reported between chunks, never while a chunk holds the write lock
            # (a caller's callback may itself write to the database).
            for batch in _batches(rows, progress):
                chunks.run(batch)
                report.rows_read += len(batch)
        finally:
            if chunks is not None:
                chunks.close()
            if report_file is not None:
                report_file.close()
        report.report_path = report_path
    return report


def _open_report(path: Path) -> TextIO:
    try:
        fh = path.open("w", newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ImportFileError(f"cannot write the report {path}: {exc.strerror}") from None
    csv.writer(fh).writerow(["line", "email", "reason"])
    return fh


ExportFormat = Literal["csv", "jsonl"]
EXPORT_COLUMNS = ("email", "name", "status", "list", "joined", "attributes")


def export_members(
    engine: Engine, out: TextIO, *, list_id: int | None = None,
    where: ColumnElement[bool] | None = None, status: str | None = "active",
    fmt: ExportFormat = "csv", batch: int = 1000,
) -> int:
    """Write memberships as CSV (a header row, attributes as JSON) or JSON Lines, streamed
    in subscriber-id order a batch at a time; returns how many rows were written.

    status None means every status; `where` is an extra condition over the memberships
    and subscribers tables (a segment's filter)."""
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"format must be csv or jsonl, not {fmt!r}")
    if status is not None:
        status = MembershipStatus(status).value
    s, m = subscribers, memberships
    query = (
        select(m.c.subscriber_id, m.c.list_id, s.c.email, s.c.name, m.c.status,
               lists.c.slug, m.c.created_at, s.c.attributes)
        .select_from(m.join(s, s.c.id == m.c.subscriber_id)
                     .join(lists, lists.c.id == m.c.list_id))
        .order_by(m.c.subscriber_id, m.c.list_id).limit(batch)
    )
    if list_id is not None:
        query = query.where(m.c.list_id == list_id)
    if status is not None:
        query = query.where(m.c.status == status)
    if where is not None:
        query = query.where(where)
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(EXPORT_COLUMNS)
    after_sid, after_lid, written = 0, 0, 0
    while True:
        # Keyset pagination: each batch is one short read, so a long export never holds a
        # snapshot (or a lock) while the output is written.
        page = query.where(or_(m.c.subscriber_id > after_sid,
                               and_(m.c.subscriber_id == after_sid, m.c.list_id > after_lid)))
        with engine.connect() as conn:
            rows = conn.execute(page).all()
        for r in rows:
            joined = r.created_at.isoformat()
            if writer is not None:
                writer.writerow([r.email, r.name, r.status, r.slug, joined,
                                 json.dumps(r.attributes or {}, ensure_ascii=False,
                                            sort_keys=True)])
            else:
                out.write(json.dumps({
                    "email": r.email, "name": r.name, "status": r.status, "list": r.slug,
                    "joined": joined, "attributes": r.attributes or {},
                }, ensure_ascii=False) + "\n")
        written += len(rows)
        if len(rows) < batch:
            return written
        after_sid, after_lid = rows[-1].subscriber_id, rows[-1].list_id
