"""The admin JSON API through HTTP (FastAPI's test client runs the app with its lifespan, on
a real SQLite file, with the real SMTP test server where mail goes out): tokens and roles,
every route group, the error body, pagination, import jobs, test sends, the scheduler
hand-off, and the audit trail."""

from __future__ import annotations

import email
import email.policy
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from newsletter.apitokens import Tokens
from newsletter.cli import app as cli_app
from newsletter.service import Newsletter
from newsletter.store.schema import DeliveryStatus, api_tokens
from newsletter.web.app import create_app

from .conftest import SAMPLE_MD, SAMPLE_YAML, SECRET, add_subscribers
from .smtpd import SmtpTestServer


@dataclass
class Api:
    """A client with one token per role; `as_(role)` gives that role's headers."""

    client: TestClient
    nl: Newsletter
    tokens: dict[str, str]

    def h(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.get("/api" + path, headers=self.h(role), **kw)

    def post(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.post("/api" + path, headers=self.h(role), **kw)

    def patch(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.patch("/api" + path, headers=self.h(role), **kw)

    def delete(self, path: str, role: str = "admin", **kw: Any) -> Any:
        return self.client.delete("/api" + path, headers=self.h(role), **kw)


def _tokens(nl: Newsletter) -> dict[str, str]:
    store = Tokens(nl.store.engine)
    return {role: store.create(role, role, actor="test")[1]
            for role in ("admin", "editor", "viewer")}


@pytest.fixture
def api(nl: Newsletter) -> Iterator[Api]:
    tokens = _tokens(nl)
    with TestClient(create_app(nl)) as client:
        yield Api(client, nl, tokens)


def _error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    """The one error shape of the API."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert "field" in err
    if field is not None:
        assert err["field"] == field, err
    return dict(err)


def _campaign(api: Api, slug: str = "news", **extra: Any) -> dict[str, Any]:
    r = api.post("/campaigns", role="editor", json={
        "lists": [slug], "source": SAMPLE_MD.read_text(encoding="utf-8"), **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


# --- authentication and roles ---------------------------------------------------------------

def test_requests_without_a_valid_token_get_401_with_a_bearer_challenge(api: Api) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    {"Authorization": "Bearer nl_not-a-real-token"},
                    {"Authorization": "Bearer " + "x" * 5000}):
        r = api.client.get("/api/lists", headers=headers)
        _error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # Revoked: refused from the next request on.
    assert api.get("/lists", role="viewer").status_code == 200
    Tokens(api.nl.store.engine).revoke("viewer", actor="test")
    r = api.get("/lists", role="viewer")
    _error(r, 401, "unauthorized")
    assert "revoked" in r.json()["error"]["message"]


def test_each_role_may_do_what_the_matrix_says_and_nothing_more(api: Api) -> None:
    add_subscribers(api.nl, "news", 2)
    cid = _campaign(api)["campaign"]["id"]
    # viewer: reads, but not tokens, the audit log or a privacy export
    for path in ("/lists", "/lists/news", "/subscribers", "/subscribers/user0@example.com",
                 "/segments", "/suppressions", "/campaigns", f"/campaigns/{cid}",
                 "/schedules", "/imports"):
        assert api.get(path, role="viewer").status_code == 200, path
    for path in ("/tokens", "/audit", "/subscribers/user0@example.com/export-data"):
        _error(api.get(path, role="viewer"), 403, "forbidden")
    _error(api.post("/lists", role="viewer", json={"slug": "x"}), 403, "forbidden")
    _error(api.post("/campaigns", role="viewer", json={"lists": ["news"], "source": "x"}),
           403, "forbidden")
    _error(api.post("/segments", role="viewer", json={"name": "x", "filter": "lang = 'en'"}),
           403, "forbidden")
    _error(api.post(f"/campaigns/{cid}/pause", role="viewer"), 403, "forbidden")
    # editor: campaigns, schedules, segments; not lists, subscribers, suppression, tokens
    assert api.post("/segments", role="editor",
                    json={"name": "en", "filter": "lang = 'en'"}).status_code == 201
    assert api.post(f"/campaigns/{cid}/schedule", role="editor",
                    json={"at": "2099-01-01T08:00:00", "tz": "Europe/Berlin"}).status_code == 201
    for method, path, body in (
            ("post", "/lists", {"slug": "other"}),
            ("delete", "/lists/news?confirm=true", None),
            ("post", "/subscribers", {"email": "a@example.org", "lists": ["news"]}),
            ("post", "/suppressions", {"value": "example.net"}),
            ("post", "/tokens", {"name": "x", "role": "admin"}),
            ("delete", "/tokens/viewer", None)):
        kw = {"json": body} if body is not None else {}
        r = getattr(api, method)(path, role="editor", **kw)
        _error(r, 403, "forbidden")
        assert "needs admin" in r.json()["error"]["message"]
    assert api.get("/tokens", role="editor").status_code == 403
    # admin: everything
    assert api.post("/lists", json={"slug": "other"}).status_code == 201
    assert api.get("/audit").status_code == 200


def test_tokens_through_the_api_are_shown_once_stored_hashed_and_revocable(api: Api) -> None:
    r = api.post("/tokens", json={"name": "deploy", "role": "editor"})
    assert r.status_code == 201
    created = r.json()
    secret = created["token"]
    assert secret.startswith("nl_") and len(secret) > 40
    with api.nl.store.engine.connect() as conn:
        stored = conn.execute(select(api_tokens.c.token_hash)
                              .where(api_tokens.c.name == "deploy")).scalar_one()
    assert secret not in stored and len(stored) == 64
    listed = api.get("/tokens").json()["items"]
    assert {t["name"] for t in listed} == {"admin", "editor", "viewer", "deploy"}
    assert all("token" not in t for t in listed)
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.client.get("/api/campaigns", headers=headers).status_code == 200
    _error(api.post("/tokens", json={"name": "deploy", "role": "viewer"}), 409, "conflict")
    _error(api.post("/tokens", json={"name": "bad name!", "role": "viewer"}), 422, "invalid",
           "name")
    revoked = api.delete("/tokens/deploy").json()
    assert revoked["active"] is False and revoked["revoked_at"]
    _error(api.client.get("/api/campaigns", headers=headers), 401, "unauthorized")
    actions = [(e["actor"], e["action"], e["target"]) for e in api.get("/audit").json()["items"]]
    assert ("token:admin", "token.revoke", "deploy") in actions
    assert ("token:admin", "token.create", "deploy") in actions


def test_last_use_is_written_at_most_once_a_minute_and_tokens_are_never_logged(
    api: Api, caplog: pytest.LogCaptureFixture,
) -> None:
    def last_used() -> Any:
        with api.nl.store.engine.connect() as conn:
            return conn.execute(select(api_tokens.c.last_used_at)
                                .where(api_tokens.c.name == "viewer")).scalar_one()

    assert last_used() is None
    with caplog.at_level(logging.DEBUG):
        api.get("/lists", role="viewer")
        first = last_used()
        assert first is not None
        for _ in range(3):
            api.get("/lists", role="viewer")
        assert last_used() == first
        api.client.get("/api/lists", headers={"Authorization": "Bearer nl_wrong"})
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for token in api.tokens.values():
        assert token not in text


def test_tokens_from_the_cli_create_ls_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              smtpd: SmtpTestServer) -> None:
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("NEWSLETTER_SECRET_KEY", SECRET)
    runner = CliRunner()
    result = runner.invoke(cli_app, ["tokens", "create", "ci", "--role", "admin"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    assert token.startswith("nl_")
    listed = runner.invoke(cli_app, ["tokens", "ls"])
    assert "ci" in listed.stdout and "admin" in listed.stdout and token not in listed.stdout
    assert runner.invoke(cli_app, ["tokens", "revoke", "ci"]).exit_code == 0
    bad = runner.invoke(cli_app, ["tokens", "create", "x", "--role", "root"])
    assert bad.exit_code != 0
    from newsletter.settings import load_settings

    nl = Newsletter(load_settings())
    entries = [(e.actor, e.action) for e in
               __import__("newsletter.admin", fromlist=["Admin"]).Admin(nl, "t").audit_entries()]
    assert [a for _, a in entries] == ["token.revoke", "token.create"]
    assert all(actor.startswith("cli:") for actor, _ in entries)


# --- errors ---------------------------------------------------------------------------------

def test_every_4xx_has_the_same_error_body(api: Api) -> None:
    _error(api.get("/lists/nope"), 404, "not_found")
    _error(api.get("/no/such/route"), 404, "not_found")
    _error(api.client.put("/api/lists", headers=api.h()), 405, "method_not_allowed")
    _error(api.get("/campaigns/abc"), 422, "invalid", "campaign_id")
    _error(api.get("/campaigns/99999999999999999999999"), 422, "invalid", "campaign_id")
    _error(api.get("/subscribers?limit=501"), 422, "invalid", "limit")
    _error(api.post("/lists", json={"slug": "x", "extra": 1}), 422, "invalid", "extra")
    _error(api.client.post("/api/lists", content=b"{not json",
                           headers={**api.h(), "Content-Type": "application/json"}),
           422, "invalid")
    _error(api.post("/lists", json={"slug": "Bad Slug"}), 422, "invalid", "slug")
    assert api.post("/lists", json={"slug": "news"}).status_code == 201
    _error(api.post("/lists", json={"slug": "news"}), 409, "conflict")
    _error(api.get("/subscribers/99999999999999999999999"), 404, "not_found")
    _error(api.get("/subscribers?cursor=garbage"), 422, "invalid", "cursor")


def test_issue_and_filter_errors_point_at_the_line_field_and_position(api: Api) -> None:
    add_subscribers(api.nl, "news", 1)
    bad = "---\ntitle: Brief\ndate: 2026-13-40\n---\n\n# Section\n\n## Item\n\nText.\n"
    err = _error(api.post("/campaigns", role="editor", json={"lists": ["news"], "source": bad}),
                 422, "invalid", "date")
    assert err["line"] == 3
    err = _error(api.post("/campaigns", role="editor", json={
        "lists": ["news"], "issue": {"title": "T", "date": "2026-01-01", "sections": []}}),
        422, "invalid")
    assert err["field"].startswith("issue")
    err = _error(api.post("/segments/count", role="viewer", json={"filter": "lang = = 'en'"}),
                 422, "invalid", "filter")
    assert err["position"] == 7
    _error(api.post("/campaigns", role="editor", json={"lists": ["nope"], "source": "x"}),
           422, "invalid")


# --- pagination -----------------------------------------------------------------------------

def _walk(api: Api, path: str, limit: int, role: str = "admin") -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        sep = "&" if "?" in path else "?"
        url = f"{path}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        r = api.get(url, role=role)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"items", "next_cursor"}
        assert len(body["items"]) <= limit
        items += body["items"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return items
        assert pages < 100


def test_pagination_walks_every_page_once_with_filters(api: Api) -> None:
    add_subscribers(api.nl, "news", 23)
    add_subscribers(api.nl, "other", 4, domain="example.net")
    subs = _walk(api, "/subscribers", 5)
    ids = [s["id"] for s in subs]
    assert len(ids) == 27 and len(set(ids)) == 27 and ids == sorted(ids)
    on_news = _walk(api, "/subscribers?list=news&status=active", 4, role="viewer")
    assert len(on_news) == 23
    assert [s["email"] for s in _walk(api, "/subscribers?search=user1", 50)][:3] == [
        "user1@example.com", "user10@example.com", "user11@example.com"]
    # Newest first, also exactly once: the audit log.
    for i in range(7):
        api.post("/suppressions", json={"value": f"blocked{i}.example.org"})
    entries = _walk(api, "/audit?action=suppression.", 3)
    assert len(entries) == 7 and [e["id"] for e in entries] == sorted(
        (e["id"] for e in entries), reverse=True)
    assert len(_walk(api, "/suppressions?kind=domain", 2, role="viewer")) == 7
    assert len(_walk(api, "/lists", 1)) == 2
    # A cursor belongs to its collection.
    cursor = api.get("/subscribers?limit=1").json()["next_cursor"]
    _error(api.get(f"/audit?cursor={cursor}"), 422, "invalid", "cursor")


# --- lists and subscribers ------------------------------------------------------------------

def test_lists_crud_and_delete_only_with_confirmation(api: Api) -> None:
    r = api.post("/lists", json={"slug": "brief", "name": "The Brief", "public": False,
                                 "zone": "Asia/Shanghai", "language": "zh"})
    assert r.status_code == 201
    assert r.json()["zone"] == "Asia/Shanghai" and r.json()["subscribe_url"] is None
    r = api.patch("/lists/brief", json={"name": "Brief", "description": "Weekly",
                                        "zone": ""})
    assert r.json()["name"] == "Brief" and r.json()["zone"] is None
    _error(api.patch("/lists/brief", json={"zone": "Mars/Base"}), 422, "invalid", "zone")
    add_subscribers(api.nl, "news", 3)
    assert api.get("/lists/news", role="viewer").json()["members"]["active"] == 3
    err = _error(api.delete("/lists/news"), 409, "conflict")
    assert "3 membership" in err["message"] and "confirm=true" in err["message"]
    assert api.get("/lists/news").status_code == 200
    r = api.delete("/lists/news?confirm=true")
    assert r.status_code == 200 and r.json()["deleted"]["members"] == 3
    _error(api.get("/lists/news"), 404, "not_found")


def test_subscriber_operations_end_to_end(api: Api) -> None:
    add_subscribers(api.nl, "news", 1)
    api.post("/lists", json={"slug": "other"})
    r = api.post("/subscribers", json={"email": "Ana@Example.org", "lists": ["news"],
                                       "name": "Ana", "attributes": {"sector": "telecom"},
                                       "language": "zh", "zone": "Asia/Shanghai"})
    assert r.status_code == 201, r.text
    ana = r.json()
    assert ana["lists"] == {"news": "active"} and ana["attributes"]["tz"] == "Asia/Shanghai"
    assert api.get(f"/subscribers/{ana['id']}", role="viewer").json()["email"] == \
        "Ana@example.org"  # the domain is normalised, the local part kept
    assert api.get("/subscribers/ana@example.org").json()["id"] == ana["id"]
    r = api.patch("/subscribers/ana@example.org",
                  json={"name": "Ana B", "set_attributes": {"tier": 2},
                        "unset_attributes": ["sector"], "zone": ""})
    assert r.json()["name"] == "Ana B" and r.json()["attributes"] == {"tier": 2, "lang": "zh"}
    r = api.post(f"/subscribers/{ana['id']}/move", json={"from_list": "news",
                                                        "to_list": "other"})
    assert r.json()["lists"] == {"other": "active"}
    r = api.post(f"/subscribers/{ana['id']}/unsubscribe", json={"list": "other"})
    assert r.json()["changed"] == 1 and r.json()["subscriber"]["lists"]["other"] == \
        "unsubscribed"
    _error(api.post(f"/subscribers/{ana['id']}/resubscribe", json={"list": "other"}), 409,
           "conflict")
    r = api.post(f"/subscribers/{ana['id']}/resubscribe", json={"list": "other",
                                                               "explicit": True})
    assert r.json()["lists"]["other"] == "active"
    history = api.get(f"/subscribers/{ana['id']}/history", role="viewer").json()["items"]
    assert [(h["list"], h["new_status"]) for h in history][-2:] == [
        ("other", "unsubscribed"), ("other", "active")]
    data = api.get(f"/subscribers/{ana['id']}/export-data").json()
    assert data["subscriber"]["email"] == "Ana@example.org" and data["history"]
    _error(api.post(f"/subscribers/{ana['id']}/erase"), 409, "conflict")
    erased = api.post(f"/subscribers/{ana['id']}/erase?confirm=true").json()["erased"]
    assert erased["memberships"] == 1
    _error(api.get(f"/subscribers/{ana['id']}"), 404, "not_found")
    # Erased addresses cannot come back.
    _error(api.post("/subscribers", json={"email": "ana@example.org", "lists": ["news"]}),
           409, "conflict")
    actions = {e["action"] for e in _walk(api, "/audit?actor=token:admin", 100)}
    assert {"subscriber.add", "subscriber.edit", "subscriber.move", "subscriber.unsubscribe",
            "subscriber.resubscribe", "privacy.export", "privacy.erase"} <= actions


# --- segments and suppression ---------------------------------------------------------------

def test_segments_crud_and_counts(api: Api) -> None:
    add_subscribers(api.nl, "news", 6)
    api.post("/subscribers", json={"email": "zh@example.cn", "lists": ["news"],
                                   "language": "zh"})
    r = api.post("/segments", role="editor", json={"name": "chinese", "filter": "lang = 'zh'",
                                                   "description": "Chinese readers"})
    assert r.status_code == 201, r.text
    assert api.get("/segments/chinese/count", role="viewer").json()["count"] == 1
    assert api.get("/segments/chinese/count?list=news", role="viewer").json()["count"] == 1
    r = api.post("/segments/count", role="viewer", json={"filter": "domain = 'example.com'"})
    assert r.json()["count"] == 6
    r = api.patch("/segments/chinese", role="editor", json={"filter": "not lang = 'zh'"})
    assert r.json()["filter"] == "not lang = 'zh'" and r.json()["description"] == \
        "Chinese readers"
    assert api.get("/segments/chinese/count").json()["count"] == 6
    _error(api.post("/segments", role="editor", json={"name": "chinese", "filter": "lang = 'x'"}),
           409, "conflict")
    _error(api.patch("/segments/chinese", role="editor", json={"filter": "lang ="}), 422,
           "invalid", "filter")
    assert [s["name"] for s in api.get("/segments").json()["items"]] == ["chinese"]
    assert api.delete("/segments/chinese", role="editor").status_code == 204
    _error(api.get("/segments/chinese"), 404, "not_found")


def test_suppression_add_list_import_export_remove(api: Api) -> None:
    add_subscribers(api.nl, "news", 2)
    r = api.post("/suppressions", json={"value": "user0@example.com", "reason": "complaint",
                                        "note": "called us"})
    assert r.status_code == 201 and r.json()["kind"] == "address"
    assert api.post("/suppressions", json={"value": "@spam.example"}).json()["kind"] == "domain"
    _error(api.post("/suppressions", json={"value": "not a domain"}), 422, "invalid", "value")
    csv_text = "email,reason\nx@example.org,hard-bounce\nbad value,\nspam.example,\n"
    r = api.post("/suppressions/import", files={"file": ("s.csv", csv_text, "text/csv")})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 1 and r.json()["already"] == 1 and len(r.json()["rejected"]) == 1
    kinds = [s["kind"] for s in api.get("/suppressions", role="viewer").json()["items"]]
    assert kinds == ["address", "domain", "address"]
    assert api.get("/suppressions?kind=domain").json()["items"][0]["value"] == "spam.example"
    exported = api.get("/suppressions/export?format=csv", role="viewer")
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.text.splitlines()[0] == "value,kind,reason,note,created_at"
    assert len(exported.text.splitlines()) == 4
    lines = api.get("/suppressions/export?format=jsonl").text.splitlines()
    assert len(lines) == 3 and '"spam.example"' in lines[1]
    assert api.get("/subscribers/user0@example.com").json()["suppressed"].startswith(
        "complaint")
    assert api.delete("/suppressions/spam.example").json()["value"] == "spam.example"
    _error(api.delete("/suppressions/spam.example"), 404, "not_found")


# --- imports --------------------------------------------------------------------------------

def _poll_job(api: Api, job_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        job = api.get(f"/imports/{job_id}", role="viewer").json()
        if job["status"] in ("done", "failed"):
            return dict(job)
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_an_import_job_is_uploaded_polled_and_reports_its_rejected_rows(api: Api) -> None:
    api.post("/lists", json={"slug": "news"})
    rows = ["email,name,sector"] + [f"p{i}@example.org,P {i},telecom" for i in range(2500)]
    rows += ["not-an-address,X,", "p1@example.org,Dup,"]
    data = ("\n".join(rows) + "\n").encode()
    r = api.post("/imports", data={"list": "news"},
                 files={"file": ("people.csv", data, "text/csv")})
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("queued", "running", "done")
    job = _poll_job(api, r.json()["id"])
    assert job["status"] == "done", job
    assert (job["rows_read"], job["imported"], job["skipped"]) == (2502, 2500, 2)
    assert job["list"] == "news" and job["filename"] == "people.csv"
    report = api.get(f"/imports/{job['id']}/report", role="viewer")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/csv")
    assert "not-an-address" in report.text and "p1@example.org" in report.text
    assert api.get("/lists/news").json()["members"]["active"] == 2500
    # A dry run counts the same and writes nothing.
    r = api.post("/imports", data={"list": "news", "dry_run": "true"},
                 files={"file": ("more.csv", b"email\nnew@example.org\n", "text/csv")})
    job = _poll_job(api, r.json()["id"])
    assert (job["status"], job["dry_run"], job["imported"]) == ("done", True, 1)
    assert job["report"] is None
    _error(api.get(f"/imports/{job['id']}/report"), 404, "not_found")
    assert api.get("/lists/news").json()["members"]["active"] == 2500
    # A file that cannot be read fails the job, with the reason.
    r = api.post("/imports", data={"list": "news"},
                 files={"file": ("x.csv", b"name\nno email column\n", "text/csv")})
    job = _poll_job(api, r.json()["id"])
    assert job["status"] == "failed" and "email" in job["error"]
    _error(api.post("/imports", data={"list": "nope"},
                    files={"file": ("x.csv", b"email\n", "text/csv")}), 404, "not_found")
    _error(api.post("/imports", role="editor", data={"list": "news"},
                    files={"file": ("x.csv", b"email\n", "text/csv")}), 403, "forbidden")
    listed = api.get("/imports").json()["items"]
    assert [j["status"] for j in listed] == ["done", "done", "failed"]
    audit = api.get("/audit?action=import.").json()["items"]
    assert audit and all(e["actor"] == "token:admin" for e in audit)


# --- campaigns and schedules ----------------------------------------------------------------

def test_campaigns_from_a_json_issue_and_an_uploaded_file(api: Api) -> None:
    add_subscribers(api.nl, "news", 3)
    issue = {"title": "API Brief", "date": "2026-05-01", "number": 3,
             "sections": [{"title": "News", "articles": [{"title": "One", "body": "Text."}]}]}
    r = api.post("/campaigns", role="editor", json={"lists": ["news"], "issue": issue})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["new"] and created["due"] == 3
    assert created["campaign"]["status"] == "draft" and created["campaign"]["total"] == 0
    # The same issue to the same lists is the same unfinished campaign.
    again = api.post("/campaigns", role="editor", json={"lists": ["news"], "issue": issue})
    assert again.json()["new"] is False
    assert again.json()["campaign"]["id"] == created["campaign"]["id"]
    r = api.post("/campaigns/upload", role="editor", data={"list": ["news"]},
                 files={"file": ("issue.yaml", SAMPLE_YAML.read_bytes(), "text/yaml")})
    assert r.status_code == 201, r.text
    _error(api.post("/campaigns/upload", role="editor", data={"list": ["news"]},
                    files={"file": ("issue.txt", b"x", "text/plain")}), 422, "invalid", "file")
    _error(api.post("/campaigns", role="editor", json={"lists": ["news"]}), 422, "invalid",
           "issue")
    listed = api.get("/campaigns", role="viewer").json()["items"]
    assert [c["id"] for c in listed] == sorted((c["id"] for c in listed), reverse=True)
    assert len(listed) == 2


def test_a_test_send_arrives_marked_and_records_no_delivery(api: Api,
                                                           smtpd: SmtpTestServer) -> None:
    add_subscribers(api.nl, "news", 2)
    cid = _campaign(api)["campaign"]["id"]
    r = api.post(f"/campaigns/{cid}/test", role="editor",
                 json={"addresses": ["editor@example.org", "boss@example.org"]})
    assert r.status_code == 200, r.text
    assert [x["sent"] for x in r.json()["results"]] == [True, True]
    assert r.json()["subject"].startswith("[TEST] ")
    assert sorted(m.rcpt_tos[0] for m in smtpd.messages) == ["boss@example.org",
                                                            "editor@example.org"]
    msg = email.message_from_bytes(smtpd.messages[0].data, policy=email.policy.default)
    assert str(msg["Subject"]).startswith("[TEST] Digital Economy Brief")
    assert msg["List-Unsubscribe"]
    counts = api.nl.store.delivery_counts(cid)
    assert counts.total == 0
    campaign = api.get(f"/campaigns/{cid}").json()
    assert campaign["status"] == "draft" and campaign["total"] == 0
    _error(api.post(f"/campaigns/{cid}/test", role="editor", json={"addresses": ["nope"]}),
           422, "invalid")
    _error(api.post(f"/campaigns/{cid}/test", role="editor",
                    json={"addresses": [f"a{i}@example.org" for i in range(11)]}),
           422, "invalid", "addresses")
    entry = api.get("/audit?action=campaign.test_send").json()["items"][0]
    assert entry["actor"] == "token:editor" and entry["detail"]["sent"] == 2


def test_schedule_pause_resume_and_cancel_a_campaign(api: Api) -> None:
    add_subscribers(api.nl, "news", 2)
    cid = _campaign(api)["campaign"]["id"]
    _error(api.post(f"/campaigns/{cid}/pause", role="editor"), 409, "conflict")  # a draft
    _error(api.post(f"/campaigns/{cid}/schedule", role="editor",
                    json={"at": "2001-01-01T08:00:00"}), 422, "invalid", "at")
    _error(api.post(f"/campaigns/{cid}/schedule", role="editor",
                    json={"at": "2099-01-01T08:00:00", "tz": "Mars/Base"}), 422, "invalid", "tz")
    r = api.post(f"/campaigns/{cid}/schedule", role="editor",
                 json={"at": "2099-12-01T08:00:00", "tz": "Asia/Shanghai"})
    assert r.status_code == 201, r.text
    sched = r.json()
    assert sched["status"] == "active" and sched["next_run"].startswith("2099-12-01T00:00")
    _error(api.post(f"/campaigns/{cid}/schedule", role="editor",
                    json={"at": "2099-12-02T08:00:00"}), 409, "conflict")
    assert api.get(f"/campaigns/{cid}").json()["status"] == "scheduled"
    paused = api.post(f"/campaigns/{cid}/pause", role="editor").json()
    assert paused["status"] == "paused" and paused["schedules"][0]["status"] == "paused"
    assert paused["schedules"][0]["next_run"] is None
    r = api.post(f"/campaigns/{cid}/resume", role="editor")
    assert r.status_code == 202 and r.json()["id"] == sched["id"]
    assert r.json()["next_run"].startswith("2099-12-01T00:00")
    assert api.get(f"/campaigns/{cid}").json()["status"] == "scheduled"
    # The schedule routes steer the same thing.
    s = api.get(f"/schedules/{sched['id']}", role="viewer").json()
    assert s["campaign_id"] == cid and s["runs"] == []
    assert api.post(f"/schedules/{sched['id']}/pause", role="editor").json()["status"] == \
        "paused"
    assert api.post(f"/schedules/{sched['id']}/resume", role="editor").json()["status"] == \
        "active"
    assert [x["id"] for x in api.get("/schedules?status=active").json()["items"]] == [
        sched["id"]]
    cancelled = api.post(f"/campaigns/{cid}/cancel", role="editor").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["schedules"][0]["status"] == "cancelled"
    _error(api.post(f"/campaigns/{cid}/send", role="editor"), 409, "conflict")
    _error(api.post(f"/schedules/{sched['id']}/cancel", role="editor"), 409, "conflict")
    actions = [e["action"] for e in api.get("/audit?action=campaign.").json()["items"]]
    assert actions[:4] == ["campaign.cancel", "campaign.resume", "campaign.pause",
                           "campaign.schedule"]


def test_send_now_is_fired_by_the_scheduler_in_the_serve_process(
    nl: Newsletter, smtpd: SmtpTestServer,
) -> None:
    add_subscribers(nl, "news", 5)
    tokens = _tokens(nl)
    with TestClient(create_app(nl, scheduler=True)) as client:
        api = Api(client, nl, tokens)
        cid = _campaign(api)["campaign"]["id"]
        r = api.post(f"/campaigns/{cid}/send", role="editor")
        assert r.status_code == 202, r.text  # handed to the scheduler, not sent in the request
        deadline = time.monotonic() + 30
        while (c := api.get(f"/campaigns/{cid}").json())["status"] != "completed":
            assert time.monotonic() < deadline, c
            time.sleep(0.1)
        assert c["sent"] == 5 and c["remaining"] == 0
        assert c["schedules"][0]["last_run"]["outcome"] == "sent"
    assert len(smtpd.messages) == 5
    assert nl.store.delivery_counts(cid)[DeliveryStatus.SENT] == 5


# --- the OpenAPI document -------------------------------------------------------------------

def test_the_openapi_document_describes_every_api_route_and_nothing_public(api: Api) -> None:
    doc = api.client.get("/api/openapi.json").json()
    paths = doc["paths"]
    assert not [p for p in paths if p.startswith(("/unsubscribe/", "/archive/", "/subscribe/",
                                                  "/preferences/", "/confirm/", "/healthz"))]
    assert {"/lists", "/subscribers/{ref}", "/segments/count", "/imports/{job_id}/report",
            "/suppressions/export", "/campaigns/{campaign_id}/test", "/schedules",
            "/tokens", "/audit"} <= set(paths)
    for path, methods in paths.items():
        for method, op in methods.items():
            assert op.get("security") == [{"HTTPBearer": []}], (path, method)
            ok = next(v for k, v in op["responses"].items() if k.startswith("2"))
            if ok["description"] != "" and "content" in ok:
                schema = next(iter(ok["content"].values()))["schema"]
                assert schema, (path, method)
            assert op["responses"]["401"]["content"]["application/json"]["schema"][
                "$ref"].endswith("/ErrorBody")
    assert api.client.get("/api/docs").status_code == 200
    assert api.client.get("/openapi.json").status_code == 404


def test_resuming_a_paused_campaign_without_a_schedule_sends_the_rest(
    nl: Newsletter, smtpd: SmtpTestServer,
) -> None:
    """A campaign paused mid-send (no schedule of its own): resume hands it to the
    scheduler, which must not take the pause for an editor's and skip it."""
    add_subscribers(nl, "news", 4)
    tokens = _tokens(nl)
    with TestClient(create_app(nl, scheduler=True)) as client:
        api = Api(client, nl, tokens)
        cid = _campaign(api)["campaign"]["id"]
        assert nl.store.pause_campaign(cid, reason="paused mid-send")
        r = api.post(f"/campaigns/{cid}/resume", role="editor")
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        while (c := api.get(f"/campaigns/{cid}").json())["status"] != "completed":
            assert time.monotonic() < deadline, c
            time.sleep(0.1)
    assert sorted(r for m in smtpd.messages for r in m.rcpt_tos) == sorted(
        f"user{i}@example.com" for i in range(4))
