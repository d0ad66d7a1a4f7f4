"""The aiohttp application: routes, and the middleware every request passes.

The middleware attributes the request to its client for fair engine turns
(``client_scope("http", remote address)``), bounds the requests one client
has in flight (``limits.max_pending_per_client`` → 429), checks the API key,
answers CORS preflights, turns every failure into OpenAI's error shape
(:func:`~edgevoice.protocols.http.errors.to_api_error`) and records metrics.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import hdrs, web

from edgevoice.config import Settings
from edgevoice.engines.base import EngineKind
from edgevoice.fairness import client_scope
from edgevoice.hub import EngineHub
from edgevoice.protocols.http.compat import compat_error
from edgevoice.protocols.http.cosyvoice import add_cosyvoice_routes
from edgevoice.protocols.http.csm import add_csm_routes
from edgevoice.protocols.http.errors import ApiError, to_api_error
from edgevoice.protocols.http.fish import add_fish_routes
from edgevoice.protocols.http.forms import ClientGone, body_limit
from edgevoice.protocols.http.metrics import Metrics
from edgevoice.protocols.http.models import get_model, list_models, load_model, unload_model
from edgevoice.protocols.http.openapi import build_spec, render_docs
from edgevoice.protocols.http.realtime import REALTIME_PATH, realtime, websocket_token
from edgevoice.protocols.http.speech import speech
from edgevoice.protocols.http.speech_stream import STREAM_PATH, speech_stream
from edgevoice.protocols.http.state import STATE, Documents, ServerState, state
from edgevoice.protocols.http.status import STATUS_PATH, status
from edgevoice.protocols.http.transcription import transcriptions, translations
from edgevoice.protocols.http.ui import add_ui_routes, is_ui_path
from edgevoice.protocols.http.voices import create_voice, delete_voice, get_voice, list_voices
from edgevoice.protocols.http.xinference import CLUSTER_AUTH_PATH, add_xinference_routes
from edgevoice.voices import VoiceLibrary

_LOGGER = logging.getLogger(__name__)

PUBLIC_PATHS: Final = frozenset({"/health", "/openapi.json", "/docs", CLUSTER_AUTH_PATH})
"""Served without the API key (they reveal nothing secret)."""
UNCOUNTED_PATHS: Final = frozenset({"/health", "/metrics", "/openapi.json", "/docs"})
"""Cheap routes outside ``max_pending_per_client``: probes must answer a busy client too."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _check_auth(request: web.Request, api_key: str | None) -> None:
    if api_key is None or request.path in PUBLIC_PATHS or is_ui_path(request.path):
        return
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" and request.path in (STREAM_PATH, REALTIME_PATH):
        token = websocket_token(request)  # browsers cannot set WebSocket headers
    elif scheme.lower() != "bearer":
        token = ""
    if not token:
        raise ApiError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


def _cors_origin(request: web.Request, origins: list[str]) -> str | None:
    origin = request.headers.get(hdrs.ORIGIN)
    if not origins or origin is None:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _preflight(request: web.Request, st: ServerState) -> web.Response | None:
    if (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        and _cors_origin(request, st.settings.http.cors_origins) is not None
    ):
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST, DELETE, OPTIONS",
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: "Authorization, Content-Type",
                hdrs.ACCESS_CONTROL_MAX_AGE: "600",
            },
        )
    return None


async def _serve(request: web.Request, handler: Handler, st: ServerState) -> web.StreamResponse:
    if (preflight := _preflight(request, st)) is not None:
        return preflight
    _check_auth(request, st.api_key)
    if request.path in UNCOUNTED_PATHS:
        return await handler(request)
    client = request.remote or "unknown"
    st.admit(client)
    try:
        return await handler(request)
    finally:
        st.release(client)


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Fairness scope, per-client bound, auth, CORS, OpenAI-shaped errors, metrics."""
    st = state(request)
    started = time.monotonic()
    status = 500
    st.request_started()
    try:
        with client_scope("http", request.remote or "unknown"):
            response = await _serve(request, handler, st)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        return compat_error(request, exc) or to_api_error(exc, request).response()
    except ClientGone as exc:
        status = 499  # nobody is left to answer
        _LOGGER.debug("HTTP %s %s: client went away (%s)", request.method, request.path, exc)
        return ApiError(400, "the client went away mid-request").response()
    except ConnectionError as exc:
        status = 499
        _LOGGER.debug("HTTP %s %s: connection lost (%s)", request.method, request.path, exc)
        raise
    except Exception as exc:
        error = to_api_error(exc, request)
        status = error.status
        if status >= 500 and status != 503:
            _LOGGER.exception("HTTP %s %s failed", request.method, request.path)
        else:
            _LOGGER.debug("HTTP %s %s: %s %s", request.method, request.path, status, error.message)
        return compat_error(request, exc) or error.response()
    finally:
        st.request_finished()
        st.metrics.observe(request.method, _route_name(request), status, time.monotonic() - started)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    origin = _cors_origin(request, request.app[STATE].settings.http.cors_origins)
    if origin is not None:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = "Content-Type, X-Sample-Rate"
        if origin != "*":
            response.headers[hdrs.VARY] = "Origin"


# ------------------------------------------------------------ small routes


async def health(request: web.Request) -> web.Response:
    st = state(request)
    return web.json_response(
        {
            "status": "ok",
            "models": {
                kind.value: [m.name for m in st.hub.models(kind)]
                for kind in (EngineKind.ASR, EngineKind.TTS)
            },
            "uptime_s": round(time.time() - st.started_at, 1),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    st = state(request)
    return web.Response(
        text=st.metrics.render(st.hub), content_type="text/plain", charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )  # fmt: skip


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(state(request).documents.spec)


async def docs(request: web.Request) -> web.StreamResponse:
    page = state(request).documents.page
    return web.Response(text=page, content_type="text/html", charset="utf-8")


def documents(settings: Settings, api_key: str | None) -> Documents:
    """``/openapi.json`` and ``/docs`` for this configuration (its limits, its key)."""
    spec = build_spec(
        settings.limits, api_key=api_key is not None, local_speaker=settings.audio_io.enabled
    )
    return Documents(spec, render_docs(spec))


# ---------------------------------------------------------------- the app


def _library(settings: Settings, hub: EngineHub) -> VoiceLibrary:
    """The hub's voice library (one for every face), unless these settings keep
    voices elsewhere (a server given its own ``state_dir``)."""
    limits = settings.limits
    if settings.state_dir == hub.settings.state_dir:
        return hub.library
    return VoiceLibrary(
        settings.state_dir / "voices",
        max_voices=limits.max_voices,
        max_bytes=limits.max_voice_library_bytes,
    )


def build_app(settings: Settings, hub: EngineHub, api_key: str | None = None) -> web.Application:
    """The aiohttp application (routes, middleware); no sockets."""
    limits = settings.limits
    app = web.Application(middlewares=[api_middleware], client_max_size=body_limit(limits))
    app[STATE] = ServerState(
        settings=settings,
        hub=hub,
        library=_library(settings, hub),
        metrics=Metrics(),
        api_key=api_key,
        documents=documents(settings, api_key),
    )
    app.on_response_prepare.append(_on_prepare)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", translations)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_get(STREAM_PATH, speech_stream)
    app.router.add_get(REALTIME_PATH, realtime)
    app.router.add_get("/v1/audio/voices", list_voices)
    app.router.add_post("/v1/audio/voices", create_voice)
    app.router.add_get("/v1/audio/voices/{voice_id}", get_voice)
    app.router.add_delete("/v1/audio/voices/{voice_id}", delete_voice)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_post("/v1/models/{model_id}/load", load_model)
    app.router.add_post("/v1/models/{model_id}/unload", unload_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(STATUS_PATH, status)
    add_cosyvoice_routes(app)  # CosyVoice's FastAPI server: /inference_*
    add_csm_routes(app, limits)  # the CSM voice-cloning API
    add_fish_routes(app)  # Fish Speech: /v1/tts, /v1/references/*
    add_xinference_routes(app)  # Xinference's client: /v1/cluster/auth
    add_ui_routes(app)  # the web page: / and /ui/
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    return app


def read_api_key(settings: Settings) -> str | None:
    """Blocking: the key from ``api_key`` or ``api_key_file`` (stripped)."""
    http = settings.http
    if http.api_key is not None and http.api_key.get_secret_value():
        return http.api_key.get_secret_value()
    if http.api_key_file is not None:
        try:
            key = http.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RuntimeError(
                f"http.api_key_file {http.api_key_file}: {exc.strerror or exc}"
            ) from None
        if not key:
            raise RuntimeError(f"http.api_key_file {http.api_key_file} is empty")
        return key
    return None
