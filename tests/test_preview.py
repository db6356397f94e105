"""`newsletter issue preview`: the page, the email in either colour scheme and the text part
over HTTP; re-rendering on save and the parser's error on the page; the command itself on a
real socket (prints its URL, streams changes, stops on Ctrl-C); and in Debian's chromium
through Playwright: screenshots at desktop and phone width and in dark mode, kept as CI
artifacts, and the page reloading itself after a save."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import html5lib
import pytest
from fastapi.testclient import TestClient

from newsletter.preview import (
    WIDTHS,
    Preview,
    PreviewServer,
    create_preview_app,
    force_color_scheme,
    listen,
    url_of,
)
from newsletter.service import Newsletter

from .conftest import ROOT, SAMPLE_MD, make_settings, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Read at import: the autouse fixture clears NEWSLETTER_* before each test. CI keeps var/.
ARTIFACTS = Path(os.environ.get("NEWSLETTER_ARTIFACTS_DIR") or ROOT / "var" / "artifacts") \
    / "screenshots"
BAD_DATE = "date: 2026-13-45"


@pytest.fixture
def issue(tmp_path: Path) -> Path:
    path = tmp_path / "issue.md"
    shutil.copy(SAMPLE_MD, path)
    return path


@pytest.fixture
def nl(tmp_path: Path) -> Newsletter:
    return Newsletter(make_settings(tmp_path))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


# --- the page over HTTP ------------------------------------------------------------------------

def test_the_page_shows_the_email_in_a_frame_beside_its_text(nl: Newsletter,
                                                             issue: Path) -> None:
    with TestClient(create_preview_app(Preview(nl, issue))) as client:
        page = client.get("/")
        assert page.status_code == 200
        html5lib.HTMLParser(strict=True).parse(page.text)
        assert "Digital Economy Brief No. 7" in page.text  # the subject, in the bar
        frame = re.search(r"<iframe[^>]*>", page.text)
        assert frame is not None
        assert 'src="/email?scheme=light&amp;edition=&amp;v=1"' in frame.group(0)
        assert 'sandbox="allow-same-origin"' in frame.group(0)  # no scripts in the email
        assert f'width="{WIDTHS["desktop"]}"' in frame.group(0)
        assert '<pre id="text">' in page.text and "Digital services now account" in page.text
        csp = page.headers["content-security-policy"]
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce is not None and f'<script nonce="{nonce.group(1)}">' in page.text
        assert page.text.count("<script") == 1 and "src=" not in page.text.split("<script")[1]

        phone = client.get("/?width=phone&scheme=dark").text
        assert f'width="{WIDTHS["phone"]}"' in phone and 'data-scheme="dark"' in phone
        assert 'src="/email?scheme=dark&amp;edition=&amp;v=1"' in phone
        assert client.get("/?width=huge&scheme=<b>").status_code == 200  # defaults, no echo

        light = client.get("/email?scheme=light")
        assert light.status_code == 200 and "<title>Digital Economy Brief" in light.text
        assert "sandbox allow-same-origin" in light.headers["content-security-policy"]
        assert 'content="light"' in light.text
        dark = client.get("/email?scheme=dark").text
        assert '<meta name="color-scheme" content="dark">' in dark
        assert "prefers-color-scheme: dark" not in dark
        text = client.get("/text")
        assert text.headers["content-type"].startswith("text/plain")
        assert "Digital services now account" in text.text
        # The slots hold the sample reader's values, as `issue build` writes them.
        assert "reader@example.org" in text.text and "NLSLOT" not in text.text + light.text


def test_forcing_a_colour_scheme_rewrites_the_emails_own_queries() -> None:
    html = ('<html><head><meta name="color-scheme" content="light dark">'
            '<meta name="supported-color-schemes" content="light dark"><style>'
            "@media (prefers-color-scheme: dark) { body { background: #000 } }"
            "@media (prefers-color-scheme:light){ body { background: #fff } }</style></head>"
            "<body></body></html>")
    dark = force_color_scheme(html, "dark")
    assert "@media (min-width: 0px) { body { background: #000 } }" in dark
    assert "@media (prefers-color-scheme: nl-preview-off){ body { background: #fff } }" in dark
    assert dark.count("color-scheme\" content") == 1 and 'content="dark"' in dark
    assert ":root { color-scheme: dark !important; }" in dark
    light = force_color_scheme(html, "light")
    assert "@media (min-width: 0px){ body { background: #fff } }" in light
    assert force_color_scheme("<p>no head</p>", "dark").endswith("<p>no head</p>")
    with pytest.raises(ValueError, match="scheme"):
        force_color_scheme(html, "sepia")


def test_an_invalid_file_shows_the_parsers_error_and_the_next_save_recovers(
    nl: Newsletter, issue: Path,
) -> None:
    preview = Preview(nl, issue)
    assert preview.refresh() and preview.current.version == 1
    assert preview.current.problem is None
    assert not preview.refresh()  # nothing changed, nothing rendered

    _edit(issue, "date: 2026-11-16", BAD_DATE)
    # No lifespan, so no watcher: the test says when to look at the file.
    client = TestClient(create_preview_app(preview))
    assert preview.refresh()
    problem = preview.current.problem
    assert problem is not None and (problem.line, problem.field) == (4, "date")
    page = client.get("/")
    assert page.status_code == 200
    html5lib.HTMLParser(strict=True).parse(page.text)
    assert f"{issue}:4: date" in page.text
    assert "Input should be a valid date" in page.text
    assert f"<mark>   4 | {BAD_DATE}</mark>" in page.text  # the line, in context
    assert "<iframe" not in page.text and "EventSource" in page.text  # still reloads
    assert client.get("/email").status_code == 409
    assert client.get("/text").status_code == 409

    _edit(issue, BAD_DATE, "date: 2026-11-17")
    assert preview.refresh()
    assert preview.current.problem is None and preview.current.version == 3
    page = client.get("/")
    assert "<iframe" in page.text and "2026-11-17" in client.get("/text").text

    # A missing file is a problem on the page too.
    issue.unlink()
    assert preview.refresh() and preview.current.problem is not None
    assert "no such file" in preview.current.problem.summary


def test_a_save_caught_half_written_is_rendered_once_it_is_whole(
    nl: Newsletter, issue: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An editor that saves in place truncates the file, then writes it. A poll that lands
    # in between must not show the empty file's problem: it waits for the save to settle.
    preview = Preview(nl, issue)
    preview.refresh()
    whole = issue.read_text(encoding="utf-8").replace("date: 2026-11-16", "date: 2026-11-18")
    issue.write_text("", encoding="utf-8")  # the save has begun
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the save ends while the preview waits for it
        waits.append(seconds)
        if len(waits) == 1:
            issue.write_text(whole, encoding="utf-8")

    monkeypatch.setattr("newsletter.preview.time.sleep", sleep)
    assert preview.refresh()
    assert preview.current.problem is None and "2026-11-18" in preview.current.text
    assert len(waits) == 2  # changed once while it waited, then the same twice in a row


def test_a_template_change_renders_again(tmp_path: Path, issue: Path) -> None:
    own = tmp_path / "templates"
    (own / "email").mkdir(parents=True)
    nl = Newsletter(make_settings(tmp_path, templates_dir=own))
    preview = Preview(nl, issue)
    preview.refresh()
    assert preview.current.problem is None
    # A broken override of the issue template: its error is shown, not raised.
    (own / "email" / "issue.txt.j2").write_text("{{ no_such_value }}\n", encoding="utf-8")
    assert preview.refresh()
    problem = preview.current.problem
    assert problem is not None and "no_such_value" in problem.summary
    (own / "email" / "issue.txt.j2").unlink()
    assert preview.refresh() and preview.current.problem is None


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "newsletter", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"at (http://\S+/) \(Ctrl-C stops\)", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"no URL in {line!r}; stderr: {proc.communicate()[1]}")
    return proc, match.group(1)


def test_the_command_prints_its_url_streams_changes_and_stops_on_ctrl_c(
    tmp_path: Path, issue: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env |= {"NEWSLETTER_VAR_DIR": str(tmp_path / "var"), "PYTHONUNBUFFERED": "1",
            "NEWSLETTER_SECRET_KEY": "preview-test-key"}
    proc, url = _start(["issue", "preview", str(issue), "--port", "0"], tmp_path, env)
    try:
        found = re.match(r"http://([\d.]+):(\d+)/", url)
        assert found is not None
        host, port = found.groups()
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and "Digital Economy Brief" in page.read().decode()
        conn.close()

        events = http.client.HTTPConnection(host, int(port), timeout=10)
        events.request("GET", "/events")
        stream = events.getresponse()
        assert stream.getheader("content-type", "").startswith("text/event-stream")

        def next_data() -> str:
            while True:
                line = stream.fp.readline().decode()
                if line.startswith("data: "):
                    return line[6:].strip()

        assert next_data() == "1"
        _edit(issue, "date: 2026-11-16", BAD_DATE)
        assert next_data() == "2"  # within a poll or two of the save
        # Ctrl-C with the event stream still open: the preview stops all the same.
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - started < 10
        events.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "preview stopped" in out and "rendered 'Digital Economy Brief" in out
    assert f"error: {issue}:4: date: Input should be a valid date" in err
    assert "Traceback" not in err


def test_a_busy_port_is_one_clear_error(tmp_path: Path, issue: Path) -> None:
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        env["NEWSLETTER_VAR_DIR"] = str(tmp_path / "var")
        done = run_cli("issue", "preview", str(issue), "--port", str(port), cwd=tmp_path,
                       env=env, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: setting --port: cannot listen on 127.0.0.1:{port}")


# --- in a real browser ---------------------------------------------------------------------------

def _need_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium installed (Debian: apt-get install chromium); .ci/run installs it")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the [test] extra")


class _Served:
    """The preview on uvicorn in a thread, on a free loopback port, as the command runs it."""

    def __init__(self, preview: Preview) -> None:
        self.sock = listen("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = PreviewServer(preview)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.thread.join(20)
        self.sock.close()


@pytest.fixture
def served(nl: Newsletter, issue: Path) -> Iterator[str]:
    _need_browser()
    with _Served(Preview(nl, issue, interval=0.2)) as s:
        yield s.url


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


# Measured in the page, which may reach into the frame (same origin, no script in it).
_LAYOUT = """() => {
  const frame = document.getElementById("email");
  const doc = frame.contentDocument, win = doc.defaultView;
  let right = 0;
  for (const el of doc.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) right = Math.max(right, r.right);
  }
  return {viewport: win.innerWidth, scroll: doc.documentElement.scrollWidth, right: right,
          frameHeight: frame.getBoundingClientRect().height,
          contentHeight: doc.documentElement.scrollHeight};
}"""

# The colour a reader sees behind the middle of the email's first screen: the first opaque
# background from the element there up to the root, else the canvas of its colour scheme.
_BACKGROUND = """() => {
  const doc = document.getElementById("email").contentDocument, win = doc.defaultView;
  let el = doc.elementFromPoint(win.innerWidth / 2, 120);
  while (el) {
    const parts = win.getComputedStyle(el).backgroundColor.match(/[\\d.]+/g);
    if (parts && (parts.length < 4 || Number(parts[3]) > 0.5))
      return parts.slice(0, 3).map(Number);
    el = el.parentElement;
  }
  return win.getComputedStyle(doc.documentElement).colorScheme.includes("dark")
    ? [18, 18, 18] : [255, 255, 255];
}"""


def _luminance(rgb: list[float]) -> float:
    r, g, b = rgb
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def _shoot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real picture, not an empty page
    return path


@pytest.mark.slow
def test_screenshots_at_desktop_and_phone_width_and_in_dark_mode(served: str,
                                                                 browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 900})

    page.goto(served + "?width=desktop&scheme=light")
    page.wait_for_function("() => document.getElementById('email').contentDocument"
                           ".readyState === 'complete'")
    assert page.get_attribute("#email", "sandbox") == "allow-same-origin"
    desktop = page.evaluate(_LAYOUT)
    assert desktop["viewport"] == WIDTHS["desktop"]
    assert desktop["right"] > WIDTHS["phone"]  # the desktop layout is wider than a phone
    # The frame grew to its content: the page scrolls as one, as a mail client's would.
    assert desktop["frameHeight"] >= desktop["contentHeight"] - 1
    assert page.locator("#text").is_visible()
    assert "Digital services now account" in page.locator("#text").inner_text()
    light_bg = _luminance(page.evaluate(_BACKGROUND))
    _shoot(page, "preview-desktop.png")

    page.goto(served + "?width=phone&scheme=light")
    page.wait_for_function("() => document.getElementById('email').contentDocument"
                           ".readyState === 'complete'")
    phone = page.evaluate(_LAYOUT)
    assert phone["viewport"] == WIDTHS["phone"]
    # Single column and fluid: nothing in the email is wider than the phone.
    assert phone["scroll"] <= WIDTHS["phone"], phone
    assert phone["right"] <= WIDTHS["phone"] + 0.5, phone
    assert page.locator("#text").is_visible()
    _shoot(page, "preview-phone.png")
    page.locator("#email").screenshot(path=str(ARTIFACTS / "preview-phone-email.png"))

    page.goto(served + "?width=phone&scheme=dark")
    page.wait_for_function("() => document.getElementById('email').contentDocument"
                           ".readyState === 'complete'")
    dark_bg = _luminance(page.evaluate(_BACKGROUND))
    assert light_bg > 0.7, light_bg
    assert dark_bg < 0.3, dark_bg  # the email's own dark-mode styles took effect
    assert page.evaluate("() => getComputedStyle(document.getElementById('email')"
                         ".contentDocument.documentElement).colorScheme") == "dark"
    assert page.locator("#text").is_visible()
    _shoot(page, "preview-phone-dark.png")

    page.goto(served + "?width=desktop&scheme=dark")
    page.wait_for_function("() => document.getElementById('email').contentDocument"
                           ".readyState === 'complete'")
    _shoot(page, "preview-desktop-dark.png")
    page.close()


@pytest.mark.slow
def test_the_page_reloads_after_a_save_and_shows_errors_until_fixed(
    served: str, browser: Any, issue: Path,
) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(served)
    email_frame = page.frame_locator("#email")
    email_frame.get_by_text("Digital Economy Brief").first.wait_for()
    page.evaluate("() => { window.beforeSave = true; }")

    _edit(issue, "title: Digital Economy Brief", "title: Freshly Saved Title")
    email_frame.get_by_text("Freshly Saved Title").first.wait_for(timeout=15_000)
    assert page.evaluate("() => window.beforeSave") is None  # a reload, not a patch
    assert "Freshly Saved Title" in page.locator("#text").inner_text()

    _edit(issue, "date: 2026-11-16", BAD_DATE)
    page.locator("#problem").wait_for(timeout=15_000)
    where = page.locator("#problem .where").inner_text()
    assert f"{issue.name}:4: date" in where, where
    assert "valid date" in page.locator("#problem").inner_text()
    _shoot(page, "preview-error.png")

    _edit(issue, BAD_DATE, "date: 2026-11-16")
    email_frame.get_by_text("Freshly Saved Title").first.wait_for(timeout=15_000)
    assert page.locator("#problem").count() == 0
    page.close()


def test_a_bilingual_issue_previews_every_edition(tmp_path: Path) -> None:
    en = tmp_path / "brief.en.md"
    en.write_text("---\ntitle: Trade Notes\ndate: 2026-12-01\nnumber: 3\n---\n"
                  "# Markets\n## Ports get busier\nContainer volumes rose.\n", encoding="utf-8")
    zh = tmp_path / "brief.zh.md"
    zh.write_text("---\ntitle: 贸易简报\ndate: 2026-12-01\nnumber: 3\n---\n"
                  "# 市场\n## 港口更繁忙\n集装箱吞吐量上升。\n", encoding="utf-8")
    preview = Preview(Newsletter(make_settings(tmp_path)), en)
    assert zh in preview.watched()  # saving the other edition reloads too
    with TestClient(create_preview_app(preview)) as client:
        main = client.get("/").text
        assert "Trade Notes" in main and 'hreflang="zh"' in main
        page = client.get("/?edition=zh&width=phone").text
        assert "贸易简报" in page and 'aria-current="page">zh<' in page
        assert 'src="/email?scheme=light&amp;edition=zh&amp;v=1"' in page
        assert "贸易简报" in client.get("/email?edition=zh").text
        assert "集装箱吞吐量上升" in client.get("/text?edition=zh").text
        assert "Trade Notes" in client.get("/text?edition=xx").text  # unknown: the main one
