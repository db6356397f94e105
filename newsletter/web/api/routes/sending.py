"""Routes for sending: campaigns (create, test, schedule, send, pause) and schedules."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, UploadFile

from ....admin import InvalidError
from ....apitokens import ApiToken
from ....editor import FORMATS
from ....store.schema import CampaignStatus
from ..core import Api, ApiDep, EditorToken, Id, Viewer
from ..models import (
    MAX_UPLOAD,
    CampaignCreate,
    CampaignCreated,
    CampaignOut,
    CampaignSummary,
    ScheduleBody,
    ScheduleDetail,
    ScheduleOut,
    TestSendBody,
    TestSendOut,
    TestSendResult,
    run_out,
)
from ..pagination import Cursor, Limit, Page, decode_cursor, page_of, slice_after

# --- routes: campaigns ---------------------------------------------------------------------------

def _save_upload(upload: UploadFile, limit: int | None = None) -> bytes:
    data = upload.file.read(limit + 1 if limit else -1)
    if limit and len(data) > limit:
        raise InvalidError("file", f"larger than {limit // (1024 * 1024)} MB")
    return data


def campaign_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["campaigns"]

    @app.get("/campaigns", tags=tags, response_model=Page[CampaignSummary])
    def campaigns_index(api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
                        status: CampaignStatus | None = None) -> Page[CampaignSummary]:
        """Campaigns, newest first."""
        before = decode_cursor("campaigns", cursor)
        ids = api.editor(t).campaign_ids(before_id=before, limit=limit + 1,
                                         status=status.value if status else None)
        return page_of(ids, limit, "campaigns", lambda i: i, api.campaign_summary)

    def created(api: Api, t: ApiToken, plan: Any) -> CampaignCreated:
        view = api.editor(t).view(plan.campaign.id)
        return CampaignCreated(campaign=api.campaign_out(view), new=plan.new, due=plan.due,
                               notes=list(plan.notes))

    @app.post("/campaigns", tags=tags, status_code=201, response_model=CampaignCreated)
    def campaigns_create(api: ApiDep, t: EditorToken, body: CampaignCreate) \
            -> CampaignCreated:
        """A draft campaign from an issue (JSON, or a file's text in `source`), validated
        and rendered now; then test-send, schedule or send it."""
        if (body.issue is None) == (body.source is None):
            raise InvalidError("issue", "give either `issue` (JSON) or `source` (text)")
        if body.issue is not None:
            text, fmt = body.issue.model_dump_json(), "json"
        else:
            assert body.source is not None
            text, fmt = body.source, body.format
        plan = api.editor(t).create_campaign(text, fmt=fmt, lists=body.lists,
                                             segments=body.segments, again=body.again)
        return created(api, t, plan)

    @app.post("/campaigns/upload", tags=tags, status_code=201, response_model=CampaignCreated)
    def campaigns_upload(
        api: ApiDep, t: EditorToken,
        file: Annotated[UploadFile, File(description="An issue file: .md, .yaml or .json.")],
        lists: Annotated[list[str] | None, Form(alias="list", max_length=20)] = None,
        segments: Annotated[list[str] | None, Form(alias="segment", max_length=20)] = None,
        again: Annotated[bool, Form()] = False,
    ) -> CampaignCreated:
        """A draft campaign from an uploaded issue file (its suffix gives the format)."""
        name = file.filename or "issue.md"
        suffix = "." + name.rpartition(".")[2].lower() if "." in name else ""
        fmt = {".md": "markdown", ".markdown": "markdown", ".yaml": "yaml", ".yml": "yaml",
               ".json": "json"}.get(suffix)
        if fmt is None:
            raise InvalidError("file", f"unknown issue format {suffix or '(no suffix)'}; "
                               f"use {', '.join(FORMATS.values())}")
        try:
            text = _save_upload(file, MAX_UPLOAD).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidError("file", f"not UTF-8 text ({exc.reason} at byte "
                               f"{exc.start})") from None
        plan = api.editor(t).create_campaign(text, fmt=fmt, lists=lists or [],
                                             segments=segments or [], again=again, name=name)
        return created(api, t, plan)

    @app.get("/campaigns/{campaign_id}", tags=tags, response_model=CampaignOut)
    def campaigns_get(api: ApiDep, t: Viewer, campaign_id: Id) -> CampaignOut:
        """One campaign with its ledger counts, current rate and schedules."""
        return api.campaign_out(api.editor(t).view(campaign_id))

    @app.post("/campaigns/{campaign_id}/test", tags=tags, response_model=TestSendOut)
    async def campaigns_test(api: ApiDep, t: EditorToken, campaign_id: Id,
                             body: TestSendBody) -> TestSendOut:
        """Send the issue to a few addresses, subject prefixed "[TEST] "; nothing is
        recorded as a delivery of the campaign."""
        relay = api.web.subs.relay if api.nl.capture_mode else None
        editor = api.editor(t)
        results = await editor.test_send(campaign_id, body.addresses, relay=relay)
        subject = api.nl.store.get_campaign(campaign_id).subject
        return TestSendOut(subject="[TEST] " + subject, results=[
            TestSendResult(address=r.address, sent=r.sent, error=r.error) for r in results])

    @app.post("/campaigns/{campaign_id}/schedule", tags=tags, status_code=201,
              response_model=ScheduleOut)
    def campaigns_schedule(api: ApiDep, t: EditorToken, campaign_id: Id,
                           body: ScheduleBody) -> ScheduleOut:
        """Send a draft at a time; the scheduler (in `newsletter serve` or `newsletter
        scheduler`) fires it."""
        editor = api.editor(t)
        s = editor.schedule(campaign_id, at=body.at, tz=body.tz, local_time=body.local_time)
        return api.schedule_out(s, api.schedules.next_run(s))

    @app.post("/campaigns/{campaign_id}/send", tags=tags, status_code=202,
              response_model=ScheduleOut)
    def campaigns_send(api: ApiDep, t: EditorToken, campaign_id: Id) -> ScheduleOut:
        """Send now: handed to the scheduler, which starts it within a second or so. Poll
        GET /campaigns/{id} for progress."""
        s = api.editor(t).send_now(campaign_id)
        return api.schedule_out(s, api.schedules.next_run(s))

    @app.post("/campaigns/{campaign_id}/pause", tags=tags, response_model=CampaignOut)
    def campaigns_pause(api: ApiDep, t: EditorToken, campaign_id: Id) -> CampaignOut:
        """A running send stops within a second; a scheduled one does not fire."""
        return api.campaign_out(api.editor(t).pause(campaign_id))

    @app.post("/campaigns/{campaign_id}/resume", tags=tags, status_code=202,
              response_model=ScheduleOut)
    def campaigns_resume(api: ApiDep, t: EditorToken, campaign_id: Id) -> ScheduleOut:
        """Continue a paused campaign (through the scheduler); nobody gets it twice."""
        s = api.editor(t).resume(campaign_id)
        return api.schedule_out(s, api.schedules.next_run(s))

    @app.post("/campaigns/{campaign_id}/cancel", tags=tags, response_model=CampaignOut)
    def campaigns_cancel(api: ApiDep, t: EditorToken, campaign_id: Id) -> CampaignOut:
        """Stop for good: whoever has not got it yet never will from this campaign."""
        return api.campaign_out(api.editor(t).cancel(campaign_id))


# --- routes: schedules ---------------------------------------------------------------------------

def schedule_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["schedules"]

    @app.get("/schedules", tags=tags, response_model=Page[ScheduleOut])
    def schedules_index(
        api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        status: Literal["active", "paused", "cancelled", "done", "missed"] | None = None,
        kind: Literal["once", "digest"] | None = None,
    ) -> Page[ScheduleOut]:
        after = decode_cursor("schedules", cursor)
        views = [(s, n) for s, n in api.editor(t).schedule_views()
                 if (status is None or s.status == status) and (kind is None or s.kind == kind)]
        rows = slice_after(views, after, limit, lambda v: v[0].id)
        return page_of(rows, limit, "schedules", lambda v: v[0].id,
                       lambda v: api.schedule_out(*v))

    def detail(api: Api, schedule_id: int) -> ScheduleDetail:
        s = api.schedules.store.get(schedule_id)
        nxt = api.schedules.next_run(s) if s.status in ("active", "paused") else None
        out = api.schedule_out(s, nxt)
        return ScheduleDetail(**out.model_dump(), runs=[
            run_out(r) for r in api.schedules.store.runs(schedule_id)])

    @app.get("/schedules/{schedule_id}", tags=tags, response_model=ScheduleDetail)
    def schedules_get(api: ApiDep, _t: Viewer, schedule_id: Id) -> ScheduleDetail:
        """One schedule with every firing so far."""
        return detail(api, schedule_id)

    @app.post("/schedules/{schedule_id}/pause", tags=tags, response_model=ScheduleDetail)
    def schedules_pause(api: ApiDep, t: EditorToken, schedule_id: Id) -> ScheduleDetail:
        api.editor(t).pause_schedule(schedule_id)
        return detail(api, schedule_id)

    @app.post("/schedules/{schedule_id}/resume", tags=tags, response_model=ScheduleDetail)
    def schedules_resume(api: ApiDep, t: EditorToken, schedule_id: Id) -> ScheduleDetail:
        api.editor(t).resume_schedule(schedule_id)
        return detail(api, schedule_id)

    @app.post("/schedules/{schedule_id}/cancel", tags=tags, response_model=ScheduleDetail)
    def schedules_cancel(api: ApiDep, t: EditorToken, schedule_id: Id) -> ScheduleDetail:
        """Cancel for good (a one-off's campaign is cancelled with it)."""
        api.editor(t).cancel_schedule(schedule_id)
        return detail(api, schedule_id)
