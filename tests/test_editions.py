"""Bilingual editions: one issue in two languages, each subscriber gets its own."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from newsletter.content.parse import load_issue, parse_issue
from newsletter.errors import ContentError
from newsletter.service import Newsletter
from newsletter.store.sql import NewMember
from newsletter.web.app import create_app

from .smtpd import SmtpTestServer

# The store and delivery suite runs on SQLite and on PostgreSQL (conftest.db_backend).
pytestmark = pytest.mark.usefixtures("db_backend")

EN = """---
title: Trade Notes
date: 2026-12-01
number: 3
preheader: Ports, tariffs and a new data rule.
---
# Markets
## Ports get busier
Container volumes rose for the third month in a row.

Source: Port Authority
"""

ZH = """---
title: 贸易简报
subject: 贸易简报 第3期
date: 2026-12-01
number: 3
---
# 市场
## 港口更繁忙
集装箱吞吐量连续第三个月上升，主要港口的排队时间有所缩短。

来源：港务局
"""


@pytest.fixture
def issue(tmp_path: Path) -> Path:
    (tmp_path / "trade.en.md").write_text(EN, encoding="utf-8")
    (tmp_path / "trade.zh.md").write_text(ZH, encoding="utf-8")
    return tmp_path / "trade.en.md"


@pytest.mark.sqlite_only(reason="no database involved")
def test_sibling_files_are_one_issue_whichever_is_named(issue: Path) -> None:
    en = load_issue(issue)
    zh = load_issue(issue.with_name("trade.zh.md"))
    assert (en.language, list(en.translations)) == ("en", ["zh"])
    assert (zh.language, list(zh.translations)) == ("zh", ["en"])
    assert en.key == zh.key == "trade-notes-no-3"
    editions = en.editions()
    assert list(editions) == ["en", "zh"]
    assert editions["zh"].effective_subject == "贸易简报 第3期"
    assert {e.key for e in editions.values()} == {"trade-notes-no-3"}


@pytest.mark.sqlite_only(reason="no database involved")
def test_editions_must_agree_and_name_real_languages(issue: Path) -> None:
    issue.with_name("trade.zh.md").write_text(ZH.replace("number: 3", "number: 4"),
                                              encoding="utf-8")
    with pytest.raises(ContentError) as err:
        load_issue(issue)
    assert err.value.path is not None and err.value.path.endswith("trade.zh.md")
    assert err.value.field == "number"
    yaml_issue = """title: Notes
date: 2026-12-01
sections:
  - title: A
    articles: [{title: One, body: text}]
translations:
  "zh_CN!":
    title: 简报
    sections:
      - title: 甲
        articles: [{title: 一, body: 文}]
"""
    with pytest.raises(ContentError) as err:
        parse_issue(yaml_issue, name="x.yaml", fmt="yaml")
    assert err.value.field == "translations" and err.value.line == 6
    ok = parse_issue(yaml_issue.replace('"zh_CN!"', "zh"), name="x.yaml", fmt="yaml")
    assert ok.editions()["zh"].title == "简报"


@pytest.fixture
def client(nl: Newsletter) -> Iterator[TestClient]:
    with TestClient(create_app(nl)) as c:
        yield c


def _subject(raw: bytes) -> str:
    return str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])


def test_each_subscriber_gets_its_language_and_the_archive_links_the_editions(
    nl: Newsletter, smtpd: SmtpTestServer, issue: Path, client: TestClient,
) -> None:
    news = nl.store.create_list("news")                       # English list
    zhlist = nl.store.create_list("zhnews", language="zh")    # Chinese list
    nl.store.upsert_members(news.id, [
        NewMember("a@example.com", attributes={"lang": "zh"}),
        NewMember("b@example.com", attributes={"lang": "en"}),
        NewMember("c@example.com"),                            # no lang: the list's (en)
        NewMember("d@example.com", attributes={"lang": "zh-CN"}),
        NewMember("e@example.com", attributes={"lang": "fr"}),  # no fr edition: the list's
    ], source="test")
    nl.store.upsert_members(zhlist.id, [NewMember("f@example.com")], source="test")
    plan = nl.plan_send(issue, ["news", "zhnews"])
    assert any("editions: en, zh" in n for n in plan.notes)
    report = asyncio.run(nl.run(plan))
    assert report.progress.sent == 6
    got = {m.rcpt_tos[0]: m for m in smtpd.messages}
    zh = {r for r, m in got.items() if _subject(m.data) == "贸易简报 第3期"}
    en = {r for r, m in got.items() if _subject(m.data) == "Trade Notes"}
    assert zh == {"a@example.com", "d@example.com", "f@example.com"}
    assert en == {"b@example.com", "c@example.com", "e@example.com"}
    # The text part is the reader's language too.
    body = email.message_from_bytes(got["a@example.com"].data, policy=email.policy.default)
    text = body.get_body(preferencelist=("plain",))
    assert text is not None and "集装箱吞吐量" in text.get_content()

    # "View in browser" of a Chinese reader on the English list: the zh edition's page.
    html = body.get_body(preferencelist=("html",))
    assert html is not None
    link = re.search(r'href="https://news\.example\.org(/archive/news/[^"]+)"',
                     html.get_content())
    assert link is not None and link.group(1) == "/archive/news/3/zh"
    page = client.get(link.group(1))
    assert page.status_code == 200 and "贸易简报" in page.text and 'lang="zh"' in page.text
    assert 'href="/archive/news/3" hreflang="en"' in page.text
    en_page = client.get("/archive/news/3")
    assert "Trade Notes" in en_page.text and 'href="/archive/news/3/zh" hreflang="zh"' in \
        en_page.text
    # On the Chinese list the plain URL is the Chinese edition.
    assert "贸易简报" in client.get("/archive/zhnews/3").text
    assert client.get("/archive/news/3/fr").status_code == 404
    # The index lists the issue once, in the list's language.
    index = client.get("/archive/news/").text
    assert index.count("/archive/news/3") == 1 and "Trade Notes" in index


def test_a_scheduled_bilingual_issue_is_re_rendered_with_all_editions(
    nl: Newsletter, issue: Path,
) -> None:
    import datetime as dt

    from newsletter.scheduling import Schedules

    nl.store.create_list("news")
    schedules = Schedules(nl)
    sched = schedules.add_once(issue, ["news"], tz="UTC",
                               at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    assert sched.campaign_id is not None
    assert nl.store.campaign_editions(sched.campaign_id)["zh"]["subject"] == "贸易简报 第3期"
    issue.with_name("trade.zh.md").write_text(ZH.replace("第3期", "第三期"), encoding="utf-8")
    schedules.update(sched.id, issue)
    editions = nl.store.campaign_editions(sched.campaign_id)
    assert list(editions) == ["zh"] and editions["zh"]["subject"] == "贸易简报 第三期"


@pytest.mark.sqlite_only(reason="no database involved")
def test_issue_build_writes_every_edition(nl: Newsletter, issue: Path, tmp_path: Path) -> None:
    result = nl.build_files(issue, tmp_path / "build")
    assert result.html.name == "issue.html" and "Trade Notes" in result.html.read_text("utf-8")
    zh = result.editions["zh"]
    assert (zh.html.name, zh.text.name, zh.eml.name) == ("issue.zh.html", "issue.zh.txt",
                                                         "issue.zh.eml")
    assert "集装箱吞吐量" in zh.text.read_text("utf-8")
    assert _subject(zh.eml.read_bytes()) == "贸易简报 第3期"
