"""Streaming CSV import of subscribers, with a per-row report of what was rejected and why.

A bad row never stops an import: it is reported with its line number and reason and the rest
goes in. Rows are read and written in chunks, so memory does not grow with the file.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from email_validator import EmailNotValidError, validate_email

from ..errors import HeaderInjectionError, ImportFileError
from ..headers import check_header_text
from .sql import NewMember, SqlStore

CHUNK = 1000


@dataclass
class Rejected:
    line: int
    reason: str
    email: str = ""


@dataclass
class ImportReport:
    imported: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.rejected)

    def summary(self) -> str:
        return f"imported {self.imported}, updated {self.updated}, skipped {self.skipped}"


def normalize_email(raw: str) -> str:
    """A valid, normalised ASCII address, or EmailNotValidError/ValueError saying why not."""
    raw = raw.strip()
    check_header_text(raw, "email")
    info = validate_email(raw, check_deliverability=False)
    if info.ascii_email is None:
        # A non-ASCII local part needs SMTPUTF8 end to end; we do not send that yet.
        raise ValueError("non-ASCII local part needs SMTPUTF8, which is not supported")
    return info.ascii_email  # IDN domains become punycode


def _open_text(path: Path, encoding: str | None) -> io.TextIOWrapper:
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ImportFileError(f"{path}: {exc.strerror}") from None
    # utf-8-sig reads files with and without a byte order mark alike.
    return io.TextIOWrapper(raw, encoding=encoding or "utf-8-sig", newline="")


def read_rows(path: Path, *, encoding: str | None = None) \
        -> Iterator[tuple[int, NewMember] | Rejected]:
    """Yield (line, member) for good rows and Rejected for bad ones, in file order."""
    with _open_text(path, encoding) as fh:
        try:
            sample = fh.read(64 * 1024)
        except UnicodeDecodeError as exc:
            raise ImportFileError(f"{path}: not {encoding or 'UTF-8'} text "
                                  f"(byte {exc.start}); pass --encoding") from None
        fh.seek(0)
        try:
            dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, ",;\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.reader(fh, dialect)
        try:
            header = next(reader)
        except StopIteration:
            raise ImportFileError(f"{path}: the file is empty") from None
        except UnicodeDecodeError as exc:
            raise ImportFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        columns = [h.strip().lower() for h in header]
        if "email" not in columns:
            raise ImportFileError(f"{path}: the header row has no 'email' column "
                                  f"(found: {', '.join(columns) or 'nothing'})")
        email_at = columns.index("email")
        name_at = columns.index("name") if "name" in columns else None
        attr_cols = [(i, c) for i, c in enumerate(columns)
                     if c and i not in (email_at, name_at)]
        last_line = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                yield Rejected(last_line + 1, f"not valid text ({exc.reason}); "
                               "the rest of the file was not read")
                return
            except csv.Error as exc:
                yield Rejected(last_line + 1, f"unreadable CSV: {exc}")
                last_line = reader.line_num
                continue
            line = last_line + 1
            last_line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank lines are not errors
            if len(row) > len(columns):
                yield Rejected(line, f"{len(row)} fields, the header has {len(columns)}")
                continue
            raw_email = row[email_at] if email_at < len(row) else ""
            try:
                email = normalize_email(raw_email)
                name = row[name_at].strip() if name_at is not None and name_at < len(row) else ""
                check_header_text(name, "name")
            except (EmailNotValidError, ValueError, HeaderInjectionError) as exc:
                reason = str(exc) if raw_email.strip() else "no email address"
                yield Rejected(line, reason, raw_email.strip())
                continue
            attrs = {c: row[i].strip() for i, c in attr_cols if i < len(row) and row[i].strip()}
            yield line, NewMember(email=email, name=name, attributes=attrs or None)


def import_csv(
    store: SqlStore, list_id: int, path: Path, *, encoding: str | None = None,
    source: str = "import", on_progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import a CSV into a list; unsubscribed or bounced addresses stay as they are."""
    report = ImportReport()
    seen: dict[str, int] = {}  # address -> first line, for duplicate reports
    chunk: list[NewMember] = []
    rows = 0

    def flush() -> None:
        result = store.upsert_members(list_id, chunk, source=source)
        report.imported += result.added
        report.updated += result.updated
        report.unchanged += result.unchanged
        for email in result.opted_out or []:
            report.rejected.append(Rejected(seen[email.lower()],
                                            "unsubscribed or bounced earlier: not reactivated",
                                            email))
        chunk.clear()

    for item in read_rows(path, encoding=encoding):
        rows += 1
        if isinstance(item, Rejected):
            report.rejected.append(item)
        else:
            line, member = item
            key = member.email.lower()
            if key in seen:
                report.rejected.append(Rejected(line, f"duplicate of line {seen[key]}",
                                                member.email))
                continue
            seen[key] = line
            chunk.append(member)
            if len(chunk) >= CHUNK:
                flush()
        if on_progress and rows % CHUNK == 0:
            on_progress(rows)
    if chunk:
        flush()
    if on_progress:
        on_progress(rows)
    report.rejected.sort(key=lambda r: r.line)
    return report
