"""Routes for data in bulk: subscriber import jobs, and the suppression list."""

from __future__ import annotations

import io
import secrets
import shutil
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response

from ....admin import InvalidError
from ....errors import NotFoundError
from ..core import AdminToken, ApiDep, Id, SuppressedValue, Viewer
from ..models import (
    ImportJobOut,
    RejectedRow,
    SuppressionCreate,
    SuppressionImportOut,
    SuppressionOut,
    suppression_out,
)
from ..pagination import Cursor, Limit, Page, decode_cursor, page_of

# --- routes: imports -----------------------------------------------------------------------------

def import_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["imports"]

    @app.post("/imports", tags=tags, status_code=202, response_model=ImportJobOut)
    def imports_create(
        api: ApiDep, t: AdminToken,
        file: Annotated[UploadFile, File(description="CSV with a header row; 'email' is "
                                         "required, other columns become attributes.")],
        list_slug: Annotated[str, Form(alias="list", min_length=1, max_length=64)],
        dry_run: Annotated[bool, Form()] = False,
        encoding: Annotated[str | None, Form(max_length=40)] = None,
        delimiter: Annotated[Literal[",", ";", "\t"] | None, Form(
            description="Default: sniffed from the file.")] = None,
    ) -> ImportJobOut:
        """Start an import in the background; poll GET /imports/{id} until done."""
        if encoding:
            try:
                "".encode(encoding)
            except LookupError:
                raise InvalidError("encoding", f"unknown encoding {encoding!r}") from None
        job = api.imports.submit(list_slug, file.filename or "upload.csv", file.file,
                                 dry_run=dry_run, actor=t.actor)
        api.run_import(job.id, encoding=encoding, delimiter=delimiter)
        return api.job_out(job)

    @app.get("/imports", tags=tags, response_model=Page[ImportJobOut])
    def imports_index(
        api: ApiDep, _t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        status: Literal["queued", "running", "done", "failed"] | None = None,
    ) -> Page[ImportJobOut]:
        after = decode_cursor("imports", cursor) or 0
        jobs = api.imports.page(after_id=after, limit=limit + 1, status=status)
        return page_of(jobs, limit, "imports", lambda j: j.id, api.job_out)

    @app.get("/imports/{job_id}", tags=tags, response_model=ImportJobOut)
    def imports_get(api: ApiDep, _t: Viewer, job_id: Id) -> ImportJobOut:
        return api.job_out(api.imports.get(job_id))

    @app.get("/imports/{job_id}/report", tags=tags, response_class=FileResponse,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                              "description": "The rejected rows: line, email, reason."}})
    def imports_report(api: ApiDep, _t: Viewer, job_id: Id) -> FileResponse:
        job = api.imports.get(job_id)
        if job.report_path is None:
            why = "no row was rejected" if job.status == "done" else job.status
            raise NotFoundError(f"import job {job_id} has no report ({why})")
        return FileResponse(job.report_path, media_type="text/csv; charset=utf-8",
                            filename=f"import-{job_id}-rejected.csv")


# --- routes: suppression -------------------------------------------------------------------------

def suppression_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["suppression"]

    @app.get("/suppressions", tags=tags, response_model=Page[SuppressionOut])
    def suppressions_index(
        api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        kind: Literal["address", "domain", "hash"] | None = None,
        reason: Annotated[str | None, Query(max_length=32)] = None,
    ) -> Page[SuppressionOut]:
        after = decode_cursor("suppressions", cursor) or 0
        rows = api.editor(t).suppressions(kind=kind, reason=reason, after_id=after,
                                          limit=limit + 1)
        return page_of(rows, limit, "suppressions", lambda s: s.id, suppression_out)

    @app.post("/suppressions", tags=tags, status_code=201, response_model=SuppressionOut)
    def suppressions_add(api: ApiDep, t: AdminToken, body: SuppressionCreate) \
            -> SuppressionOut:
        """Never send to this address (or anyone at this domain) on any list; queued
        messages to it are skipped at once."""
        return suppression_out(api.admin(t).suppress(body.value, reason=body.reason,
                                                  note=body.note))

    @app.get("/suppressions/export", tags=tags, response_class=Response,
             responses={200: {"content": {"text/csv": {"schema": {"type": "string"}},
                                          "application/x-ndjson": {"schema": {
                                              "type": "string"}}},
                              "description": "The whole list."}})
    def suppressions_export(api: ApiDep, t: Viewer,
                            format: Literal["csv", "jsonl"] = "csv") -> Response:
        out = io.StringIO()
        api.admin(t).export_suppressions(out, fmt=format)
        media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
        return Response(out.getvalue(), media_type=media, headers={
            "Content-Disposition": f'attachment; filename="suppressions.{format}"'})

    @app.post("/suppressions/import", tags=tags, response_model=SuppressionImportOut)
    def suppressions_import(
        api: ApiDep, t: AdminToken,
        file: Annotated[UploadFile, File(description="CSV (a column email, value, address "
                                         "or domain; optional reason and note) or one value "
                                         "per line.")],
        reason: Annotated[Literal["unsubscribed", "hard-bounce", "complaint", "admin"],
                          Form()] = "admin",
    ) -> SuppressionImportOut:
        folder = api.imports.folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"suppressions-{secrets.token_hex(6)}.csv"
        with path.open("wb") as out:
            shutil.copyfileobj(file.file, out, 1024 * 1024)
        try:
            result = api.admin(t).import_suppressions(path, reason=reason)
        finally:
            path.unlink(missing_ok=True)
        return SuppressionImportOut(added=result.added, already=result.already, rejected=[
            RejectedRow(line=n, value=v, reason=r) for n, v, r in result.rejected])

    @app.delete("/suppressions/{value}", tags=tags, response_model=SuppressionOut)
    def suppressions_remove(api: ApiDep, t: AdminToken, value: SuppressedValue) -> SuppressionOut:
        """Lift a suppression (an erased address's hash cannot be lifted)."""
        return suppression_out(api.admin(t).unsuppress(value))
