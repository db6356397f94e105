"""The admin JSON API under /api/: lists, subscribers, segments, imports, suppression,
campaigns, schedules, tokens and the audit log, for bearer tokens with a role.

A FastAPI sub-application mounted on the public web app, so it has its own OpenAPI document
(/api/openapi.json, docs at /api/docs) and its own error handling, and the public HTML pages
stay out of both. Each route checks the token's role, reads its input through a pydantic
model, calls one use case (newsletter.admin.Admin, newsletter.editor.Editor) as
`token:NAME` and answers with a pydantic model, so the schema says exactly what comes back.

Every 4xx has one shape: {"error": {"code": ..., "message": ..., "field": ...}}.
"""

from __future__ import annotations

from .application import create_api, mount_api
from .core import Api

__all__ = ["Api", "create_api", "mount_api"]
