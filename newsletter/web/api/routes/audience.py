"""Routes for the audience: lists, subscribers and segments."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import Response

from ....errors import ConflictError, NotFoundError
from ....store.schema import MembershipStatus
from ..core import (
    AdminToken,
    ApiDep,
    EditorToken,
    ListSlug,
    SegmentName,
    SubscriberRef,
    Viewer,
)
from ..models import (
    CountBody,
    CountOut,
    ErasedOut,
    ExportOut,
    HistoryEntry,
    ListCreate,
    ListDeleted,
    ListOut,
    ListPatch,
    MoveBody,
    ResubscribeBody,
    SegmentCreate,
    SegmentOut,
    SegmentPatch,
    SubscriberCreate,
    SubscriberOut,
    SubscriberPatch,
    UnsubscribeBody,
    UnsubscribeOut,
    segment_out,
    subscriber_out,
)
from ..pagination import MAX_ID, Cursor, Limit, Page, decode_cursor, page_of, slice_after

# --- routes: lists -------------------------------------------------------------------------------

def lists_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["lists"]

    @app.get("/lists", tags=tags, response_model=Page[ListOut])
    def lists_index(api: ApiDep, _t: Viewer, limit: Limit = 50,
                    cursor: Cursor = None) -> Page[ListOut]:
        """Every list with its member counts, in creation order."""
        after = decode_cursor("lists", cursor)
        rows = slice_after(api.nl.store.all_lists(), after, limit, lambda r: r[0].id)
        return page_of(rows, limit, "lists", lambda r: r[0].id,
                       lambda r: api.list_out(r[0].slug, r[1]))

    @app.post("/lists", tags=tags, status_code=201, response_model=ListOut)
    def lists_create(api: ApiDep, t: AdminToken, body: ListCreate) -> ListOut:
        m = api.admin(t).create_list(body.slug, name=body.name, description=body.description,
                                     double_opt_in=body.double_opt_in, public=body.public,
                                     language=body.language, zone=body.zone or None,
                                     welcome=body.welcome)
        return api.list_out(m.slug)

    @app.get("/lists/{slug}", tags=tags, response_model=ListOut)
    def lists_get(api: ApiDep, _t: Viewer, slug: ListSlug) -> ListOut:
        return api.list_out(slug)

    @app.patch("/lists/{slug}", tags=tags, response_model=ListOut)
    def lists_patch(api: ApiDep, t: AdminToken, slug: ListSlug, body: ListPatch) -> ListOut:
        m = api.admin(t).update_list(
            slug, new_slug=body.slug, name=body.name, description=body.description,
            double_opt_in=body.double_opt_in, public=body.public, language=body.language,
            zone=body.zone, welcome=body.welcome)
        return api.list_out(m.slug)

    @app.get("/lists/{slug}/impact", tags=tags, response_model=ListDeleted)
    def lists_impact(api: ApiDep, t: AdminToken, slug: ListSlug) -> ListDeleted:
        """What deleting the list would take with it; changes nothing."""
        return ListDeleted(slug=slug, deleted=api.admin(t).deletion_impact(slug))

    @app.delete("/lists/{slug}", tags=tags, response_model=ListDeleted)
    def lists_delete(api: ApiDep, t: AdminToken, slug: ListSlug,
                     confirm: Annotated[bool, Query(
                         description="Must be true: the list goes with its memberships, "
                                     "history, ledger rows and archive.")] = False) \
            -> ListDeleted:
        admin = api.admin(t)
        if not confirm:
            impact = admin.deletion_impact(slug)
            raise ConflictError(
                f"deleting list {slug!r} removes {impact.get('members', 0)} membership(s), "
                f"{impact.get('ledger_rows', 0)} ledger row(s) and "
                f"{impact.get('archive_entries', 0)} archive entr(ies); repeat with "
                "?confirm=true")
        return ListDeleted(slug=slug, deleted=admin.delete_list(slug))


# --- routes: subscribers -------------------------------------------------------------------------

def _subscriber_ref(ref: str) -> int | str:
    """A path's subscriber: digits are an id, anything else an address."""
    if ref.isdigit():
        if not ref.isascii() or int(ref) > MAX_ID:
            raise NotFoundError(f"no subscriber {ref}")
        return int(ref)
    return ref


def subscriber_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["subscribers"]

    @app.get("/subscribers", tags=tags, response_model=Page[SubscriberOut])
    def subscribers_index(
        api: ApiDep, t: Viewer, limit: Limit = 50, cursor: Cursor = None,
        list_slug: Annotated[str | None, Query(alias="list", max_length=64)] = None,
        status: MembershipStatus | None = None,
        search: Annotated[str | None, Query(max_length=320,
                                            description="Part of the address or name.")]
        = None,
    ) -> Page[SubscriberOut]:
        """Subscribers in id order; `list` and `status` filter by membership."""
        after = decode_cursor("subscribers", cursor) or 0
        rows = api.admin(t).subscribers(list_slug=list_slug,
                                        status=status.value if status else None,
                                        search=search, after_id=after, limit=limit + 1)
        return page_of(rows, limit, "subscribers", lambda r: r.id, subscriber_out)

    @app.post("/subscribers", tags=tags, status_code=201, response_model=SubscriberOut)
    def subscribers_create(api: ApiDep, t: AdminToken, body: SubscriberCreate) \
            -> SubscriberOut:
        """Add an address to lists, active at once; refused if suppressed, and never
        reactivates an address that left or bounced (see resubscribe)."""
        return subscriber_out(api.admin(t).add_subscriber(
            body.email, lists=body.lists, name=body.name, attributes=body.attributes,
            language=body.language, zone=body.zone))

    @app.get("/subscribers/{ref}", tags=tags, response_model=SubscriberOut)
    def subscribers_get(api: ApiDep, t: Viewer, ref: SubscriberRef) -> SubscriberOut:
        """One subscriber by id or address."""
        return subscriber_out(api.admin(t).subscriber(_subscriber_ref(ref)))

    @app.patch("/subscribers/{ref}", tags=tags, response_model=SubscriberOut)
    def subscribers_patch(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                          body: SubscriberPatch) -> SubscriberOut:
        return subscriber_out(api.admin(t).edit_subscriber(
            _subscriber_ref(ref), email=body.email, name=body.name,
            set_attributes=body.set_attributes, unset_attributes=body.unset_attributes,
            language=body.language, zone=body.zone))

    @app.post("/subscribers/{ref}/move", tags=tags, response_model=SubscriberOut)
    def subscribers_move(api: ApiDep, t: AdminToken, ref: SubscriberRef, body: MoveBody) \
            -> SubscriberOut:
        return subscriber_out(api.admin(t).move_subscriber(
            _subscriber_ref(ref), from_slug=body.from_list, to_slug=body.to_list))

    @app.post("/subscribers/{ref}/unsubscribe", tags=tags, response_model=UnsubscribeOut)
    def subscribers_unsubscribe(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                                body: UnsubscribeBody) -> UnsubscribeOut:
        """Running sends skip the address for every message not yet sent."""
        admin = api.admin(t)
        changed = admin.unsubscribe(_subscriber_ref(ref), list_slug=body.list)
        return UnsubscribeOut(changed=changed,
                              subscriber=subscriber_out(admin.subscriber(_subscriber_ref(ref))))

    @app.post("/subscribers/{ref}/resubscribe", tags=tags, response_model=SubscriberOut)
    def subscribers_resubscribe(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                                body: ResubscribeBody) -> SubscriberOut:
        return subscriber_out(api.admin(t).resubscribe(_subscriber_ref(ref),
                                                    list_slug=body.list,
                                                    explicit=body.explicit))

    @app.get("/subscribers/{ref}/history", tags=tags, response_model=Page[HistoryEntry])
    def subscribers_history(api: ApiDep, t: Viewer, ref: SubscriberRef) -> Page[HistoryEntry]:
        """Every change of the subscriber's memberships, oldest first (one page)."""
        rows = api.admin(t).history(_subscriber_ref(ref))
        return Page[HistoryEntry](items=[HistoryEntry(
            list=h["list"], old_status=h["from"], new_status=h["to"], source=h["source"],
            at=h["at"]) for h in rows])

    @app.get("/subscribers/{ref}/export-data", tags=tags, response_model=ExportOut)
    def subscribers_export(api: ApiDep, t: AdminToken, ref: SubscriberRef) -> ExportOut:
        """Everything stored about the subscriber (a data-subject access request)."""
        return ExportOut(**api.admin(t).export_data(_subscriber_ref(ref)))

    @app.post("/subscribers/{ref}/erase", tags=tags, response_model=ErasedOut)
    def subscribers_erase(api: ApiDep, t: AdminToken, ref: SubscriberRef,
                          confirm: Annotated[bool, Query(
                              description="Must be true: erasure cannot be undone.")] = False) \
            -> ErasedOut:
        """Erase the subscriber's personal data; a salted hash keeps it from being added
        back."""
        admin = api.admin(t)
        target = _subscriber_ref(ref)
        if not confirm:
            admin.subscriber(target)  # 404 first, if it is not there
            raise ConflictError("erasure cannot be undone; repeat with ?confirm=true")
        return ErasedOut(erased=admin.erase(target))


# --- routes: segments ----------------------------------------------------------------------------

def segment_routes(app: FastAPI) -> None:
    tags: list[str | Any] = ["segments"]

    @app.get("/segments", tags=tags, response_model=Page[SegmentOut])
    def segments_index(api: ApiDep, t: Viewer, limit: Limit = 50,
                       cursor: Cursor = None) -> Page[SegmentOut]:
        after = decode_cursor("segments", cursor)
        rows = slice_after(api.admin(t).segments(), after, limit, lambda s: s.id)
        return page_of(rows, limit, "segments", lambda s: s.id, segment_out)

    @app.post("/segments", tags=tags, status_code=201, response_model=SegmentOut)
    def segments_create(api: ApiDep, t: EditorToken, body: SegmentCreate) -> SegmentOut:
        return segment_out(api.admin(t).save_segment(body.name, body.filter, body.description))

    @app.post("/segments/count", tags=tags, response_model=CountOut)
    def segments_count_adhoc(api: ApiDep, t: Viewer, body: CountBody) -> CountOut:
        """How many subscribers a filter matches, without saving it (reads only)."""
        n = api.admin(t).count(body.filter, lists=body.lists, active_only=body.active_only)
        return CountOut(count=n, filter=body.filter)

    @app.get("/segments/{name}", tags=tags, response_model=SegmentOut)
    def segments_get(api: ApiDep, t: Viewer, name: SegmentName) -> SegmentOut:
        return segment_out(api.admin(t).get_segment(name))

    @app.patch("/segments/{name}", tags=tags, response_model=SegmentOut)
    def segments_patch(api: ApiDep, t: EditorToken, name: SegmentName,
                       body: SegmentPatch) -> SegmentOut:
        admin = api.admin(t)
        text = body.filter if body.filter is not None else admin.get_segment(name).filter
        return segment_out(admin.save_segment(name, text, body.description, create=False))

    @app.delete("/segments/{name}", tags=tags, status_code=204, response_class=Response)
    def segments_delete(api: ApiDep, t: EditorToken, name: SegmentName) -> Response:
        api.admin(t).delete_segment(name)
        return Response(status_code=204)

    @app.get("/segments/{name}/count", tags=tags, response_model=CountOut)
    def segments_count(
        api: ApiDep, t: Viewer, name: SegmentName,
        lists: Annotated[list[str] | None, Query(alias="list", max_length=50)] = None,
        active_only: bool = True,
    ) -> CountOut:
        """How many subscribers the segment matches now (on these lists, if given)."""
        admin = api.admin(t)
        text = admin.get_segment(name).filter
        return CountOut(count=admin.count(text, lists=lists or [], active_only=active_only),
                        filter=text)
