"""Routes for admins: the API's tokens, and the audit log of who did what."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import FastAPI, Query

from ..core import AdminToken, ApiDep, TokenName
from ..models import AuditOut, TokenCreate, TokenCreated, TokenOut, audit_out, token_out, utc
from ..pagination import Cursor, Limit, Page, decode_cursor, page_of, slice_after


def token_routes(app: FastAPI) -> None:
    @app.get("/tokens", tags=["tokens"], response_model=Page[TokenOut])
    def tokens_index(api: ApiDep, _t: AdminToken, limit: Limit = 50,
                     cursor: Cursor = None) -> Page[TokenOut]:
        after = decode_cursor("tokens", cursor)
        rows = slice_after(api.tokens.all(), after, limit, lambda k: k.id)
        return page_of(rows, limit, "tokens", lambda k: k.id, token_out)

    @app.post("/tokens", tags=["tokens"], status_code=201, response_model=TokenCreated)
    def tokens_create(api: ApiDep, t: AdminToken, body: TokenCreate) -> TokenCreated:
        """A new token; the answer is the only time it is shown."""
        record, secret = api.tokens.create(body.name, body.role, actor=t.actor)
        return TokenCreated(**token_out(record).model_dump(), token=secret)

    @app.get("/tokens/{name}", tags=["tokens"], response_model=TokenOut)
    def tokens_get(api: ApiDep, _t: AdminToken, name: TokenName) -> TokenOut:
        return token_out(api.tokens.get(name))

    @app.delete("/tokens/{name}", tags=["tokens"], response_model=TokenOut)
    def tokens_revoke(api: ApiDep, t: AdminToken, name: TokenName) -> TokenOut:
        """Revoke for good; its requests are refused from now on. The record stays."""
        return token_out(api.tokens.revoke(name, actor=t.actor))

    @app.get("/audit", tags=["audit"], response_model=Page[AuditOut])
    def audit_index(
        api: ApiDep, t: AdminToken, limit: Limit = 50, cursor: Cursor = None,
        action: Annotated[str | None, Query(max_length=64, description="An action or its "
                                            "prefix: 'list.' is every list action.")] = None,
        actor: Annotated[str | None, Query(max_length=200,
                                           examples=["token:deploy", "cli:ana"])] = None,
        since: dt.datetime | None = None,
    ) -> Page[AuditOut]:
        """Who did what, newest first."""
        before = decode_cursor("audit", cursor)
        rows = api.admin(t).audit_entries(limit=limit + 1, before_id=before, action=action,
                                          actor=actor, since=utc(since))
        return page_of(rows, limit, "audit", lambda a: a.id, audit_out)
