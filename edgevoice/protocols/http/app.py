"""OpenAI-compatible audio API over aiohttp (``[http]`` in the config).

Routes: ``/v1/audio/transcriptions``, ``/v1/audio/translations``,
``/v1/audio/speech`` (+ WebSocket ``/v1/audio/speech/stream``),
``/v1/audio/voices``, ``/v1/models``, ``/health``, ``/metrics``,
``/openapi.json`` and ``/docs``. Handlers live in :mod:`http_audio`; this
module builds the app (errors, auth, CORS, metrics) and owns its lifecycle
with aiohttp's Runner/Site split.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import hdrs, web

from edgevoice.config import Settings
from edgevoice.engines.base import EngineKind
from edgevoice.hub import EngineHub, LoadedModel
from edgevoice.protocols.base import ProtocolServer
from edgevoice.protocols.http_audio import (
    create_voice,
    delete_voice,
    get_voice,
    list_voices,
    speech,
    speech_stream,
    transcriptions,
    translations,
)
from edgevoice.protocols.http_common import (
    STATE,
    ApiError,
    Metrics,
    ServerState,
    api_error_from,
    not_found,
    state,
)
from edgevoice.protocols.http_openapi import build_spec, render_docs
from edgevoice.voices import VoiceLibrary

_LOGGER = logging.getLogger(__name__)

PUBLIC_PATHS: Final = frozenset({"/health", "/openapi.json", "/docs"})
"""Served without the API key (they reveal nothing secret)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _check_auth(request: web.Request, api_key: str | None) -> None:
    if api_key is None or request.path in PUBLIC_PATHS:
        return
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" and request.path == "/v1/audio/speech/stream":
        token = request.query.get("api_key", "")  # browsers cannot set WebSocket headers
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


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth, CORS preflight, OpenAI-shaped errors and request metrics."""
    st = state(request)
    started = time.monotonic()
    status = 500
    st.request_started()
    try:
        if (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            and _cors_origin(request, st.settings.http.cors_origins) is not None
        ):
            response: web.StreamResponse = web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET, POST, DELETE, OPTIONS",
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: "Authorization, Content-Type",
                    hdrs.ACCESS_CONTROL_MAX_AGE: "600",
                },
            )
        else:
            _check_auth(request, st.api_key)
            response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            status = exc.status
            raise
        status = exc.status
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = (
            exc.text
            if exc.status == 413 and exc.text
            else f"{exc.reason}: {request.method} {request.path}"
        )
        return ApiError(exc.status, message, code=code.get(exc.status)).response()
    except asyncio.CancelledError:
        status = 499  # client went away
        raise
    except Exception as exc:
        error = api_error_from(exc)
        status = error.status
        if status >= 500:
            _LOGGER.exception("Request %s %s failed", request.method, request.path)
        else:
            _LOGGER.debug(
                "Request %s %s: %s %s", request.method, request.path, status, error.message
            )
        return error.response()
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


def _model_json(model: LoadedModel[Any], kind: EngineKind, created: int) -> dict[str, Any]:
    caps: dict[str, Any]
    if kind is EngineKind.ASR:
        asr = model.engine.capabilities
        caps = {
            "languages": list(asr.languages),
            "translate": asr.translate,
            "word_timestamps": asr.word_timestamps,
            "streaming": asr.streaming,
        }
    else:
        tts = model.engine.capabilities
        caps = {
            "voices": [v.name for v in tts.voices],
            "sample_rate_hz": tts.sample_rate_hz,
            "streaming": tts.streaming,
            "cloning": tts.cloning,
            "instructions": tts.instructions,
        }
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "edgevoice",
        "kind": kind.value,
        "engine": model.slot.plugin.name,
        "aliases": list(model.config.aliases),
        "default": model.default,
        "capabilities": caps,
    }


async def list_models(request: web.Request) -> web.Response:
    st = state(request)
    created = int(st.started_at)
    data = [
        _model_json(m, kind, created)
        for kind in (EngineKind.ASR, EngineKind.TTS)
        for m in st.hub.models(kind)
    ]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    st = state(request)
    model_id = request.match_info["model_id"]
    for kind in (EngineKind.ASR, EngineKind.TTS):
        for model in st.hub.models(kind):
            if model_id in model.public_names:
                return web.json_response(_model_json(model, kind, int(st.started_at)))
    raise not_found(f"unknown model {model_id!r}", "model_id", "model_not_found")


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


_SPEC: Final = build_spec()
_DOCS: Final = render_docs(_SPEC)


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(_SPEC)


async def docs(_request: web.Request) -> web.Response:
    return web.Response(text=_DOCS, content_type="text/html", charset="utf-8")


# ---------------------------------------------------------------- the app


def build_app(settings: Settings, hub: EngineHub, api_key: str | None = None) -> web.Application:
    """The aiohttp application (routes, middleware); no sockets."""
    limit = int(settings.http.max_upload_mb * (1 << 20))
    # JSON bodies may carry a base64 voice sample (4/3 of the upload limit).
    app = web.Application(middlewares=[api_middleware], client_max_size=limit * 4 // 3 + (1 << 16))
    app[STATE] = ServerState(
        settings=settings,
        hub=hub,
        library=VoiceLibrary(settings.state_dir / "voices"),
        metrics=Metrics(),
        api_key=api_key,
    )
    app.on_response_prepare.append(_on_prepare)
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", translations)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_get("/v1/audio/speech/stream", speech_stream)
    app.router.add_get("/v1/audio/voices", list_voices)
    app.router.add_post("/v1/audio/voices", create_voice)
    app.router.add_get("/v1/audio/voices/{voice_id}", get_voice)
    app.router.add_delete("/v1/audio/voices/{voice_id}", delete_voice)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    return app


def _read_api_key(settings: Settings) -> str | None:
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
            ) from exc
        if not key:
            raise RuntimeError(f"http.api_key_file {http.api_key_file} is empty")
        return key
    return None


class HttpServer(ProtocolServer):
    """The OpenAI-compatible API; ``addresses`` reports the bound port (port 0 works)."""

    name = "http"

    def __init__(self, settings: Settings, hub: EngineHub) -> None:
        self.settings = settings
        self.hub = hub
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        api_key = await asyncio.to_thread(_read_api_key, self.settings)
        self.app = build_app(self.settings, self.hub, api_key)
        # In-flight requests are drained in stop(); what is still running after
        # that is cancelled quickly.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        http = self.settings.http
        self._site = web.TCPSite(self._runner, http.host, http.port)
        try:
            await self._site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        if api_key is None and http.host not in ("127.0.0.1", "localhost", "::1"):
            _LOGGER.info("HTTP API has no api_key: anyone on the network can use it")

    async def stop(self, timeout_s: float) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        app = self.app
        assert app is not None
        st = app[STATE]
        if self._site is not None:
            await self._site.stop()  # stop accepting
        for ws in list(st.websockets):
            await ws.close(code=1001, message=b"server shutting down")
        # The middleware counts open requests; WebSockets just closed drop out.
        if st.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.idle.wait(), timeout_s)
        if st.inflight:
            _LOGGER.warning(
                "HTTP: %d request(s) still running after %.1f s", st.inflight, timeout_s
            )
        await runner.cleanup()

    @property
    def addresses(self) -> list[str]:
        if self._runner is None:
            return []
        out = []
        for address in self._runner.addresses:
            host, port = address[0], address[1]
            out.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        return out

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        for address in self._runner.addresses if self._runner else []:
            return int(address[1])
        raise RuntimeError("HTTP server is not listening")
