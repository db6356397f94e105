"""The API application: create_api builds it, mount_api hangs it at /api of the web app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from ... import __version__
from .core import Api
from .errors import ERROR_RESPONSES, install_error_handlers
from .routes.access import token_routes
from .routes.audience import lists_routes, segment_routes, subscriber_routes
from .routes.imports import import_routes, suppression_routes
from .routes.sending import campaign_routes, schedule_routes

if TYPE_CHECKING:
    from ..app import WebApp


class _PrivateResponses:
    """Admin data is for the token holder only: no proxy or browser may keep a copy, and
    no browser may guess another content type for it."""

    _EXTRA = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._EXTRA]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_api(web: WebApp) -> tuple[FastAPI, Api]:
    """The API application (mount it at /api) and its state (start and stop it with the
    parent's lifespan: a mounted app's own lifespan is not run)."""
    api = Api(web)
    app = FastAPI(
        title="newsletter admin API", version=__version__, openapi_url="/openapi.json",
        docs_url="/docs", redoc_url=None, responses=ERROR_RESPONSES,
        description="Lists, subscribers, segments, imports, suppression, campaigns, "
                    "schedules, tokens and the audit log. Authenticate with "
                    "`Authorization: Bearer nl_...`; see docs/api.md.")
    app.state.api = api
    app.add_middleware(_PrivateResponses)
    install_error_handlers(app)
    lists_routes(app)
    subscriber_routes(app)
    segment_routes(app)
    import_routes(app)
    suppression_routes(app)
    campaign_routes(app)
    schedule_routes(app)
    token_routes(app)
    return app, api


def mount_api(parent: FastAPI, web: WebApp) -> None:
    """Mount the API at /api and run its start and stop inside the parent's lifespan (after
    the web app has opened the database, and before it closes it)."""
    app, api = create_api(web)
    parent.mount("/api", app)
    outer = parent.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with outer(app_) as state:
            await api.start()
            try:
                yield state
            finally:
                await api.stop()

    parent.router.lifespan_context = lifespan
