"""`newsletter issue preview`: the rendered issue in a browser, rendered again on every save.

A small FastAPI app on uvicorn, for one editor on their own machine. The page shows the HTML
part in an iframe at a desktop (800 px) or phone (375 px) width, in light or dark mode,
beside the text part. A watcher polls the issue file and the templates every half second
and renders through `Newsletter.build_files`, the rendering `issue build` writes and `send`
sends, with the same sample values in the slots; the page learns of a new rendering through
a tiny EventSource stream and reloads. An invalid file shows the parser's error (file, line,
field) instead, and the next valid save brings the preview back. See docs/preview.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import email.parser
import email.policy
import glob
import logging
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

from .content.parse import EDITION_FILE as _EDITION_FILE
from .errors import ConfigError, ContentError, NewsletterError
from .render.templates import builtin_templates_dir, render_template
from .service import BuildResult, Newsletter

log = logging.getLogger(__name__)

WIDTHS = {"desktop": 800, "phone": 375}
SCHEMES = ("light", "dark")
POLL_SECONDS = 0.5
SETTLE_SECONDS = 0.05  # a save is over when the files look the same this far apart
# Gmail shows "[Message clipped]" below about this much HTML; worth a warning while editing.
CLIP_BYTES = 102 * 1024
# An idle event stream sends a comment this often, so a dead connection is noticed.
_KEEPALIVE_SECONDS = 15.0

_SCHEME_QUERY = re.compile(r"\(\s*prefers-color-scheme\s*:\s*(light|dark)\s*\)", re.IGNORECASE)
_SCHEME_META = re.compile(
    r"<meta\b[^>]*\bname\s*=\s*[\"']?(?:color-scheme|supported-color-schemes)\b[^>]*>",
    re.IGNORECASE)
_HEAD = re.compile(r"<head\b[^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """Why the issue could not be rendered, as the parser (or the templates) said it."""

    summary: str                 # the one line the CLI would print
    message: str
    path: str | None = None
    line: int | None = None
    field: str | None = None
    excerpt: tuple[tuple[int, str], ...] = ()  # (line number, text) around `line`


@dataclass(frozen=True)
class Rendering:
    """One rendering of the issue: the reader's HTML and text, or the problem."""

    version: int
    at: dt.datetime
    html: str = ""
    text: str = ""
    subject: str = ""
    sender: str = ""
    recipient: str = ""
    html_bytes: int = 0
    problem: Problem | None = None
    language: str = ""
    # The other language editions of a bilingual issue, by language (same version and time).
    editions: dict[str, Rendering] = field(default_factory=dict)

    def edition(self, language: str) -> Rendering:
        """The edition in `language`, or this (the main) one."""
        return self.editions.get(language, self)

    @property
    def clipped(self) -> bool:
        return self.html_bytes > CLIP_BYTES


def force_color_scheme(html: str, scheme: str) -> str:
    """The email as a client in `scheme` mode shows it, whatever the viewer's own setting.

    An iframe's `prefers-color-scheme` follows the operating system (in newer browsers, the
    embedding iframe's color-scheme), so a page cannot flip it for one frame. The email's own
    queries are rewritten instead: `(prefers-color-scheme: <scheme>)` becomes always true
    and the other one never true, and a `color-scheme` meta and root rule make the browser's
    defaults (canvas, form controls, unstyled text) follow, as in a mail client in that
    mode.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown colour scheme {scheme!r}")

    def query(match: re.Match[str]) -> str:
        # An unknown value makes the media query false; min-width: 0 is always true.
        return "(min-width: 0px)" if match.group(1).lower() == scheme \
            else "(prefers-color-scheme: nl-preview-off)"

    html = _SCHEME_QUERY.sub(query, html)
    html = _SCHEME_META.sub("", html)
    forced = (f'<meta name="color-scheme" content="{scheme}">'
              f"<style>:root {{ color-scheme: {scheme} !important; }}</style>")
    head = _HEAD.search(html)
    if head is None:
        return forced + html
    return html[:head.end()] + forced + html[head.end():]


def _excerpt(path: Path, line: int | None, context: int = 2) -> tuple[tuple[int, str], ...]:
    if line is None:
        return ()
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError:
        return ()
    first = max(1, line - context)
    return tuple((n, lines[n - 1]) for n in range(first, min(len(lines), line + context) + 1))


class Preview:
    """The issue at `path` and its latest rendering; `refresh` renders it again when the file
    or a template changed. One per served file."""

    def __init__(self, nl: Newsletter, path: Path, *, interval: float = POLL_SECONDS,
                 on_render: Callable[[Rendering], None] | None = None) -> None:
        self.nl = nl
        self.path = path
        self.interval = interval
        self.on_render = on_render
        self._fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self._lock = threading.Lock()  # one rendering at a time (Newsletter is not shared)
        self._changed: asyncio.Event | None = None
        self.closing = False
        self.current = Rendering(version=0, at=dt.datetime.now(dt.UTC), problem=Problem(
            summary="not rendered yet", message="not rendered yet"))

    def watched(self) -> list[Path]:
        """The issue file and every template file that could be part of its rendering."""
        roots = [builtin_templates_dir()]
        if self.nl.settings.templates_dir is not None:
            roots.append(self.nl.settings.templates_dir)
        # A bilingual issue's sibling edition files (issue.zh.md beside issue.en.md) too.
        m = _EDITION_FILE.match(self.path.stem)
        siblings = sorted(self.path.parent.glob(f"{glob.escape(m['base'])}.*{self.path.suffix}")) \
            if m else []
        files = [self.path, *(p for p in siblings if p != self.path)]
        for root in roots:
            with contextlib.suppress(OSError):
                files += sorted(p for p in root.rglob("*") if p.is_file())
        return files

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """What changes when a watched file is saved: its modification time and size (an
        editor that replaces the file rather than writing it changes both, or removes it
        for a moment: -1)."""
        stamp = []
        for p in self.watched():
            try:
                st = p.stat()
                stamp.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append((str(p), -1, -1))
        return tuple(stamp)

    def _settled(self, stamp: tuple[tuple[str, int, int], ...]) \
            -> tuple[tuple[str, int, int], ...]:
        """Wait until a save is over: the same fingerprint twice, SETTLE_SECONDS apart (at
        most a few times). An editor that writes the file in place truncates it first; read
        in between, the issue would show a problem it does not have (empty front matter) until
        the next poll."""
        for _ in range(10):
            time.sleep(SETTLE_SECONDS)
            again = self.fingerprint()
            if again == stamp:
                break
            stamp = again
        return stamp

    def refresh(self, *, force: bool = False) -> bool:
        """Render again if anything watched changed since the last rendering (or `force`);
        returns whether it did. Never raises for a bad issue: the problem is the result."""
        with self._lock:
            stamp = self.fingerprint()
            if not force and stamp == self._fingerprint:
                return False
            stamp = self._settled(stamp)
            self._fingerprint = stamp
            # Jinja checks a cached template's own file only, so a new override in
            # templates_dir would go unseen: templates are looked up afresh each time.
            if self.nl.templates.cache is not None:
                self.nl.templates.cache.clear()
            self.current = self._render(self.current.version + 1)
        if self.on_render is not None:
            self.on_render(self.current)
        return True

    def _render(self, version: int) -> Rendering:
        now = dt.datetime.now(dt.UTC)
        try:
            # The files `issue build` writes, read back: whatever build_files does (slots
            # filled with a sample reader's values, editions, templates) the preview shows.
            with tempfile.TemporaryDirectory(prefix="newsletter-preview-") as tmp:
                result = self.nl.build_files(self.path, Path(tmp))
                editions = {lang: self._read(version, now, lang, other)
                            for lang, other in result.editions.items()}
                main = self._read(version, now, "", result)
        except ContentError as exc:
            where = Path(exc.path) if exc.path else self.path
            return Rendering(version, now, problem=Problem(
                summary=str(exc), message=exc.message, path=exc.path or str(self.path),
                line=exc.line, field=exc.field, excerpt=_excerpt(where, exc.line)))
        except NewsletterError as exc:  # a template that does not render, a bad setting
            return Rendering(version, now, problem=Problem(summary=str(exc), message=str(exc)))
        except Exception as exc:
            # A bug of ours must not take the preview down while someone edits; the next
            # save tries again.
            log.exception("preview of %s failed", self.path)
            summary = f"internal error: {type(exc).__name__}: {exc}"
            return Rendering(version, now, problem=Problem(summary=summary, message=summary))
        return dataclasses.replace(main, editions=editions)

    @staticmethod
    def _read(version: int, now: dt.datetime, language: str, result: BuildResult) -> Rendering:
        """One edition's files, as `issue build` wrote them."""
        head = email.parser.BytesHeaderParser(policy=email.policy.default) \
            .parsebytes(result.eml.read_bytes())
        return Rendering(version, now, html=result.html.read_text(encoding="utf-8"),
                         text=result.text.read_text(encoding="utf-8"),
                         subject=str(head["Subject"] or ""), sender=str(head["From"] or ""),
                         recipient=str(head["To"] or ""), html_bytes=result.html_bytes,
                         language=language)

    # --- in the server's event loop ----------------------------------------------------------

    async def watch(self) -> None:
        """Poll every `interval` until cancelled; wake the event streams after a change."""
        self._changed = asyncio.Event()
        while True:
            if await asyncio.to_thread(self.refresh):
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
            await asyncio.sleep(self.interval)

    async def next_version(self, seen: int, timeout: float) -> int | None:
        """The current version, once it differs from `seen` or after `timeout` seconds;
        None once the server is shutting down."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.current.version == seen and not self.closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # In slices, so `closing` is seen within one of them.
            step = min(remaining, self.interval)
            with contextlib.suppress(TimeoutError):
                if self._changed is None:
                    await asyncio.sleep(step)
                else:
                    await asyncio.wait_for(self._changed.wait(), step)
        return None if self.closing else self.current.version

    def close(self) -> None:
        """The server is stopping: end the event streams (each within one poll), so a
        graceful shutdown does not wait on the pages still open."""
        self.closing = True


def _page_headers(nonce: str) -> dict[str, str]:
    return {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        # The page's only script is its own inline one; the email comes from /email.
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "img-src 'self' data:; frame-src 'self'; connect-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"),
    }


# The email never runs scripts (mail clients do not either); it may show remote images, as a
# mail client would once images are allowed. `sandbox allow-same-origin` keeps scripts off
# even when /email is opened on its own, and lets the page measure its height.
_EMAIL_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline' https:; img-src https: http: data:; "
        "font-src https: data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'; "
        "sandbox allow-same-origin"),
}


def create_preview_app(preview: Preview) -> FastAPI:
    """The preview's web app: the page, the email in either scheme, the text part, and the
    event stream that tells the page to reload. The lifespan runs the watcher."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if preview.current.version == 0:
            await asyncio.to_thread(preview.refresh)
        watcher = asyncio.create_task(preview.watch())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    app = FastAPI(title="newsletter preview", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    templates = preview.nl.templates

    @app.get("/", response_class=HTMLResponse)
    def page(width: str = "desktop", scheme: str = "light", edition: str = "") -> HTMLResponse:
        # Unknown values fall back to the defaults: this is a viewer, not an API.
        width = width if width in WIDTHS else "desktop"
        scheme = scheme if scheme in SCHEMES else "light"
        nonce = secrets.token_urlsafe(16)
        main = preview.current
        r = main.edition(edition)
        html = render_template(
            templates, "web/preview_page.html.j2", r=r, path=str(preview.path),
            editions=list(main.editions), edition=r.language,
            file_name=preview.path.name, width=width, width_px=WIDTHS[width], widths=WIDTHS,
            scheme=scheme, schemes=SCHEMES, nonce=nonce, clip_kb=CLIP_BYTES // 1024,
            rendered_at=r.at.astimezone().strftime("%H:%M:%S"))
        return HTMLResponse(html, headers=_page_headers(nonce))

    @app.get("/email", response_class=HTMLResponse)
    def email_html(scheme: str = "light", edition: str = "") -> HTMLResponse:
        r = preview.current.edition(edition)
        if r.problem is not None:
            return HTMLResponse(f"<p>{escape(r.problem.summary)}</p>", status_code=409,
                                headers=_EMAIL_HEADERS)
        html = force_color_scheme(r.html, scheme if scheme in SCHEMES else "light")
        return HTMLResponse(html, headers=_EMAIL_HEADERS)

    @app.get("/text", response_class=PlainTextResponse)
    def text(edition: str = "") -> PlainTextResponse:
        r = preview.current.edition(edition)
        if r.problem is not None:
            return PlainTextResponse(r.problem.summary + "\n", status_code=409,
                                     headers={"Cache-Control": "no-store"})
        return PlainTextResponse(r.text, headers={"Cache-Control": "no-store"})

    @app.get("/events")
    async def events(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"  # reconnect quickly when the preview is restarted
            seen = -1
            while not await request.is_disconnected():
                version = await preview.next_version(seen, _KEEPALIVE_SECONDS)
                if version is None:
                    return  # shutting down; EventSource reconnects to the next server
                if version != seen:
                    seen = version
                    yield f"data: {version}\n\n"
                else:
                    yield ": still here\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or ConfigError saying why
    not, so a busy port is one clear line rather than a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError("--port", f"cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class PreviewServer(uvicorn.Server):
    """uvicorn's server for a preview: a Ctrl-C (or `stop`) first ends the event streams
    (see Preview.close), so the graceful shutdown has nothing to wait for."""

    def __init__(self, preview: Preview) -> None:
        # The streams end on their own at a shutdown; the timeout is a backstop.
        super().__init__(uvicorn.Config(create_preview_app(preview), log_level="warning",
                                        timeout_graceful_shutdown=3, server_header=False))
        self.preview = preview

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.preview.close()
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """Stop from another thread (tests, embedding)."""
        self.preview.close()
        self.should_exit = True


def serve_preview(nl: Newsletter, path: Path, *, host: str = "127.0.0.1", port: int = 8001,
                  on_ready: Callable[[str], None] | None = None,
                  on_render: Callable[[Rendering], None] | None = None) -> None:
    """Serve the preview until Ctrl-C (uvicorn's signal handling ends the run)."""
    preview = Preview(nl, path, on_render=on_render)
    sock = listen(host, port)
    server = PreviewServer(preview)
    if on_ready is not None:
        on_ready(url_of(sock))
    preview.refresh()  # before the first request, which then needs no waiting
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["CLIP_BYTES", "SCHEMES", "WIDTHS", "Preview", "PreviewServer", "Problem", "Rendering",
           "create_preview_app", "force_color_scheme", "listen", "serve_preview", "url_of"]
