"""The web page: ``/`` and ``/ui/…`` serve the static files of ``edgevoice/web``.

Plain HTML, CSS and JavaScript modules shipped as package data: no build
step, no CDN (the daemon runs offline). The files are read once, in a worker
thread, when the app starts, and served from memory: a request can only name
a file that was found then, so no path reaches the file system (``..``,
absolute paths and encoded separators simply find nothing). Each response
carries a strong ``ETag`` and ``Cache-Control: no-cache`` (the browser keeps
its copy and revalidates it with a cheap 304), ``nosniff`` and, for HTML, a
Content Security Policy that allows only this origin.

The page is public (it holds no secret); the API calls it makes carry the key
the page asks for (``Authorization``, or the WebSocket subprotocol).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final

from aiohttp import hdrs, web

_LOGGER = logging.getLogger(__name__)

UI_PREFIX: Final = "/ui/"
INDEX: Final = "index.html"
MAX_DEPTH: Final = 4
"""Sub-folders of ``edgevoice/web`` served at most this deep."""

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
}
"""Files of other types in the folder are not served."""

CSP: Final = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' blob: data:",
        "connect-src 'self' blob:",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


UI_FILES: Final = web.AppKey("edgevoice_ui_files", dict[str, StaticFile])


def is_ui_path(path: str) -> bool:
    """True for the page's own paths (public: they need no API key)."""
    return path in ("/", "/ui") or path.startswith(UI_PREFIX)


def _walk(folder: Traversable, prefix: str, depth: int, out: dict[str, StaticFile]) -> None:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if depth < MAX_DEPTH:
                _walk(entry, f"{prefix}{entry.name}/", depth + 1, out)
            continue
        suffix = "." + entry.name.rpartition(".")[2] if "." in entry.name else ""
        content_type = CONTENT_TYPES.get(suffix.lower())
        if content_type is None:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        out[prefix + entry.name] = StaticFile(body, content_type, etag)


def read_ui_files() -> dict[str, StaticFile]:
    """Blocking: every servable file of ``edgevoice/web``, by path relative to it."""
    files: dict[str, StaticFile] = {}
    root = resources.files("edgevoice") / "web"
    if root.is_dir():
        _walk(root, "", 0, files)
    if INDEX not in files:
        _LOGGER.warning("The web page is missing from this installation (edgevoice/web)")
    return files


async def _load_files(app: web.Application) -> None:
    app[UI_FILES].update(await asyncio.to_thread(read_ui_files))


def _serve(request: web.Request, name: str) -> web.StreamResponse:
    found = request.app[UI_FILES].get(name)
    if found is None:
        raise web.HTTPNotFound()
    headers = {
        hdrs.ETAG: found.etag,
        hdrs.CACHE_CONTROL: "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if found.content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CSP
        headers["X-Frame-Options"] = "DENY"
    if found.etag in request.headers.get(hdrs.IF_NONE_MATCH, ""):
        return web.Response(status=304, headers=headers)
    headers[hdrs.CONTENT_TYPE] = found.content_type
    return web.Response(body=found.body, headers=headers)


async def index(request: web.Request) -> web.StreamResponse:
    """``/`` and ``/ui/``: the page."""
    return _serve(request, INDEX)


async def ui_redirect(_request: web.Request) -> web.StreamResponse:
    """``/ui`` → ``/ui/`` (the page's relative links need the slash)."""
    raise web.HTTPPermanentRedirect(UI_PREFIX)


async def asset(request: web.Request) -> web.StreamResponse:
    """``/ui/{path}``: a file of ``edgevoice/web``."""
    return _serve(request, request.match_info["path"])


def add_ui_routes(app: web.Application) -> None:
    """Register the page's routes; its files are read when the app starts."""
    app[UI_FILES] = {}
    app.on_startup.append(_load_files)
    app.router.add_get("/", index)
    app.router.add_get("/ui", ui_redirect)
    app.router.add_get(UI_PREFIX, index)
    app.router.add_get(UI_PREFIX + "{path:.+}", asset)
