"""The API's one error body, and our exceptions mapped onto HTTP statuses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...admin import InvalidError
from ...errors import (
    AuthError,
    ConfigError,
    ConflictError,
    ContentError,
    DeliveryError,
    FilterSyntaxError,
    ImportFileError,
    NewsletterError,
    NotFoundError,
)
from ...subscriptions import InvalidInputError

log = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    code: str = Field(description="not_found, invalid, conflict, unauthorized, forbidden, ...")
    message: str
    field: str | None = Field(None, description="The input field at fault, if one is.")
    line: int | None = Field(None, description="Issue content errors: the line in the file.")
    position: int | None = Field(None, description="Filter errors: 0-based offset in the text.")


class ErrorBody(BaseModel):
    error: ErrorInfo


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
          413: "too_large", 415: "unsupported_media_type", 422: "invalid",
          429: "rate_limited", 500: "internal", 502: "relay_error"}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": _CODES[status].replace("_", " ")}
    for status in (400, 401, 403, 404, 409, 422)
}


def error_response(status: int, message: str, *, field: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None,
                   **extra: int | None) -> JSONResponse:
    info: dict[str, Any] = {"code": code or _CODES.get(status, "error"), "message": message,
                            "field": field}
    info.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse({"error": info}, status_code=status, headers=headers)


def _newsletter_error(exc: NewsletterError) -> JSONResponse:
    """Our exception tree onto HTTP: what the caller got wrong is a 4xx naming the field."""
    if isinstance(exc, AuthError):
        if exc.status == 403:
            return error_response(403, str(exc),
                                  headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
        return error_response(401, str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, NotFoundError):
        return error_response(404, str(exc))
    if isinstance(exc, ConflictError):
        return error_response(409, str(exc))
    if isinstance(exc, ContentError):
        return error_response(422, exc.message, field=exc.field, line=exc.line)
    if isinstance(exc, FilterSyntaxError):
        return error_response(422, str(exc), field="filter", position=exc.position)
    if isinstance(exc, InvalidError | InvalidInputError):
        return error_response(422, str(exc) if isinstance(exc, InvalidInputError)
                              else exc.message, field=exc.field)
    if isinstance(exc, ConfigError):
        return error_response(422, exc.problem, field=exc.key.lstrip("-"))
    if isinstance(exc, ImportFileError):
        return error_response(422, str(exc), field="file")
    if isinstance(exc, DeliveryError):
        # The relay failed, not the request: a gateway error, logged like one.
        log.warning("admin API: relay failure: %s", exc)
        return error_response(502, str(exc))
    if isinstance(exc, ValueError):  # HeaderInjectionError and kin
        return error_response(422, str(exc))
    return error_response(400, str(exc))


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    message = str(first.get("msg", "invalid"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_response(422, message, field=".".join(loc) or None)


def install_error_handlers(app: FastAPI) -> None:
    async def newsletter_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, NewsletterError)
        return _newsletter_error(exc)

    async def validation_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc)

    async def http_error(_r: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    async def bad_value(_r: Request, exc: Exception) -> Response:
        # A value our checks let through but a lower layer refused (a date out of range,
        # text the database cannot encode): the input's fault, so never a 500.
        return error_response(422, str(exc) or type(exc).__name__)

    async def integrity_error(_r: Request, exc: Exception) -> Response:
        return error_response(409, "the change contradicts what is stored (a duplicate?)")

    async def internal_error(_r: Request, exc: Exception) -> Response:
        log.error("admin API: unexpected %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal error; the server log has the details")

    app.add_exception_handler(NewsletterError, newsletter_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ValueError, bad_value)
    app.add_exception_handler(OverflowError, bad_value)
    app.add_exception_handler(IntegrityError, integrity_error)
    app.add_exception_handler(Exception, internal_error)
