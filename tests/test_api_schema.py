"""The admin API fuzzed from its own OpenAPI document: schemathesis generates valid and
invalid requests for every operation, with an admin token, against a real server (uvicorn on
loopback, the app with its lifespan), and any 5xx fails the test.

The database is seeded first (a list, subscribers, a campaign, a segment if filters are
available, a suppression) so that generated requests reach more than the 404 paths.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode

from newsletter.apitokens import Tokens
from newsletter.service import Newsletter
from newsletter.store.sql import NewMember
from newsletter.web.app import create_app

from .conftest import SAMPLE_MD, make_settings

# Examples per operation and generation mode: about 40 operations x 2 modes x this many
# requests keeps the run under a minute on a small machine.
EXAMPLES = 12


@dataclass
class LiveApi:
    base_url: str
    headers: dict[str, str]


@pytest.fixture
def live_api(tmp_path: Path) -> Iterator[LiveApi]:
    nl = Newsletter(make_settings(tmp_path, send_concurrency=2))
    _seed(nl, tmp_path)
    _, token = Tokens(nl.store.engine).create("fuzz-admin-7f3c", "admin", actor="test")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(nl), log_level="critical",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield LiveApi(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"})
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def _seed(nl: Newsletter, tmp_path: Path) -> None:
    """What the documented examples name (list digest, ana@example.org, segment english,
    token deploy, domain example.net), so generated requests get past the 404s."""
    from newsletter.admin import Admin

    mlist = nl.store.create_list("digest", name="Digest")
    nl.store.upsert_members(mlist.id, [NewMember(f"user{i}@example.com", f"User {i}")
                                       for i in range(5)], source="test")
    nl.store.upsert_members(mlist.id, [NewMember("ana@example.org", "Ana")], source="test")
    nl.plan_send(SAMPLE_MD, ["digest"])
    admin = Admin(nl, "test")
    admin.suppress("example.net")
    admin.save_segment("english", "lang = 'en'")
    Tokens(nl.store.engine).create("deploy", "viewer", actor="test")


def test_no_operation_answers_with_a_server_error(live_api: LiveApi) -> None:
    schema = schemathesis.openapi.from_url(f"{live_api.base_url}/api/openapi.json")
    results = list(schema.get_all_operations())
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) == len(results), "the OpenAPI document has invalid operations"
    assert len(operations) >= 40
    calls: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, headers=live_api.headers)

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case: Any) -> None:
                response = case.call(base_url=f"{live_api.base_url}/api",
                                     headers=live_api.headers, timeout=30)
                calls[case.operation.label] += 1
                statuses[response.status_code] += 1
                case.validate_response(response, checks=[not_a_server_error])

            check()

    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    print(f"\nschemathesis: {len(operations)} operations, {sum(calls.values())} requests, "
          f"statuses {dict(sorted(statuses.items()))}, server errors {server_errors}")
    assert server_errors == 0
    # Every operation was reached with the admin token (not all stopped at 401).
    assert len(calls) == len(operations)
    assert statuses[401] < sum(calls.values()) // 10
