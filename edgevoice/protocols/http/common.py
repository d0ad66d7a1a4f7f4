"""Shared pieces of the OpenAI-compatible HTTP API: app keys, errors, forms, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import BodyPartReader, web

from edgevoice.audio import AudioError
from edgevoice.config import Settings
from edgevoice.engines.base import EngineKind, EngineRequestError
from edgevoice.hub import EngineHub, LoadedModel, UnknownModelError
from edgevoice.voices import VoiceLibrary, VoiceLibraryError, VoiceNotFoundError

# OpenAI's own model and voice names: requests naming them get our defaults
# unless the config gives the name to a model (as an alias).
OPENAI_ASR_MODELS: Final = frozenset(
    {
        "whisper-1",
        "gpt-transcribe",
        "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe",
        "gpt-4o-mini-transcribe-2025-12-15",
        "gpt-4o-transcribe-diarize",
    }
)
OPENAI_TTS_MODELS: Final = frozenset(
    {"tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15"}
)
OPENAI_VOICES: Final = frozenset(
    {
        "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable",
        "marin", "nova", "onyx", "sage", "shimmer", "verse",
    }
)  # fmt: skip


@dataclass
class ServerState:
    """Everything handlers need, stored on the app under :data:`STATE`."""

    settings: Settings
    hub: EngineHub
    library: VoiceLibrary
    metrics: Metrics
    api_key: str | None
    started_at: float = field(default_factory=time.time)
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no request is in flight (the middleware keeps it current)."""

    def request_started(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


STATE: Final = web.AppKey("edgevoice_state", ServerState)


def state(request: web.Request) -> ServerState:
    return request.app[STATE]


# ------------------------------------------------------------------ errors


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def api_error_from(exc: BaseException) -> ApiError:
    """The OpenAI-shaped error (and status) for any exception a handler raises."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModelError):
        code = "voice_not_found" if exc.kind is EngineKind.TTS else "model_not_found"
        return ApiError(404, str(exc), param="model", code=code)
    if isinstance(exc, VoiceNotFoundError):
        return ApiError(
            404, f"no stored voice with id {exc}", param="voice", code="voice_not_found"
        )
    if isinstance(exc, AudioError):
        return ApiError(415, str(exc), code="unsupported_audio")
    if isinstance(exc, EngineRequestError | VoiceLibraryError):
        return ApiError(400, str(exc), code="invalid_value")
    return ApiError(500, f"engine failure: {exc}", code="engine_error")


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param=param, code=code)


# ------------------------------------------------------------------ models


def _with_openai_default(
    hub: EngineHub, kind: EngineKind, name: str | None, openai_names: frozenset[str]
) -> LoadedModel[Any]:
    try:
        return hub.get(kind, name)
    except UnknownModelError as exc:
        if name in openai_names:
            return hub.get(kind, None)
        raise not_found(str(exc), param="model", code="model_not_found") from None


def resolve_asr(hub: EngineHub, name: str | None) -> LoadedModel[Any]:
    """A configured ASR model by name/alias; OpenAI's names mean the default one."""
    return _with_openai_default(hub, EngineKind.ASR, name, OPENAI_ASR_MODELS)


def resolve_tts(hub: EngineHub, name: str | None) -> LoadedModel[Any]:
    return _with_openai_default(hub, EngineKind.TTS, name, OPENAI_TTS_MODELS)


# ------------------------------------------------------------- parameters


def parse_float(value: Any, param: str, low: float, high: float) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad_request(f"{param} must be a number, not {value!r}", param) from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise bad_request(f"{param} must be between {low:g} and {high:g}, not {value!r}", param)
    return number


def parse_bool(value: Any, param: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", "null"):
        return False
    raise bad_request(f"{param} must be true or false, not {value!r}", param)


def parse_choice(value: Any, param: str, choices: tuple[str, ...], default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in choices:
        raise bad_request(f"{param} must be one of {', '.join(choices)}; got {value!r}", param)
    return value


def optional_str(value: Any, param: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string", param)
    return value


# ------------------------------------------------------------------- forms


@dataclass(frozen=True, slots=True)
class UploadedFile:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Form:
    """A parsed multipart/form-data body."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def getall(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))

    def as_dict(self) -> dict[str, Any]:
        return {k: v[-1] for k, v in self.fields.items() if v}


_MAX_FIELD_BYTES: Final = 1 << 20


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than the upload limit of {limit_bytes / (1 << 20):g} MB",
        code="request_too_large",
    )


async def read_form(request: web.Request, limit_bytes: int) -> Form:
    """Stream-parse a multipart body, answering 413 as soon as it passes ``limit_bytes``."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            415,
            f"expected a multipart/form-data body, got {request.content_type or 'none'}",
            code="unsupported_media_type",
        )
    if request.content_length is not None and request.content_length > limit_bytes + 65536:
        raise too_large(limit_bytes)
    form = Form()
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                continue  # nested multiparts and unnamed parts are not ours
            chunks = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                total += len(chunk)
                if total > limit_bytes:
                    raise too_large(limit_bytes)
                chunks += chunk
                if part.filename is None and len(chunks) > _MAX_FIELD_BYTES:
                    raise bad_request(f"form field {part.name!r} is too long", part.name)
            if part.filename is not None:
                form.files[part.name] = UploadedFile(
                    part.filename,
                    part.headers.get("Content-Type", "application/octet-stream"),
                    bytes(chunks),
                )
            else:
                charset = part.get_charset(default="utf-8")
                try:
                    text = chunks.decode(charset)
                except (UnicodeDecodeError, LookupError):
                    raise bad_request(
                        f"form field {part.name!r} is not {charset} text", part.name
                    ) from None
                form.fields.setdefault(part.name, []).append(text)
    except (ValueError, AssertionError) as exc:
        if isinstance(exc, ApiError):
            raise
        raise bad_request(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    return form


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    return body


# ----------------------------------------------------------------- metrics

LATENCY_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    total_s: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1
        self.total_s += seconds
        self.count += 1


# (metric, EngineSlot attribute, type, help)
_ENGINE_METRICS: Final = (
    ("edgevoice_engine_busy_seconds_total", "busy_s", "counter",
     "Seconds engines spent in worker calls."),
    ("edgevoice_engine_requests_total", "requests", "counter",
     "Requests engines served (all protocols)."),
    ("edgevoice_engine_audio_seconds_total", "audio_s", "counter",
     "Seconds of audio engines received."),
    ("edgevoice_engine_load_seconds", "load_s", "gauge", "Seconds the engine took to load."),
)  # fmt: skip


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Request counters and latency histograms, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.audio_s: dict[tuple[str, str], float] = defaultdict(float)
        """(direction ``in``/``out``, model) → seconds of audio."""

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        self.latency[route].observe(seconds)

    def add_audio(self, direction: str, model: str, seconds: float) -> None:
        self.audio_s[(direction, model)] += seconds

    def render(self, hub: EngineHub) -> str:
        out: list[str] = []

        def header(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        header(
            "edgevoice_http_requests_total", "counter", "HTTP requests by method, route and status."
        )
        for (method, route, status), count in sorted(self.requests.items()):
            out.append(
                f'edgevoice_http_requests_total{{method="{_label(method)}",'
                f'route="{_label(route)}",status="{status}"}} {count}'
            )
        name = "edgevoice_http_request_duration_seconds"
        header(name, "histogram", "Time from request to the end of the response.")
        for route, hist in sorted(self.latency.items()):
            r = _label(route)
            for bound, count in zip(LATENCY_BUCKETS_S, hist.buckets, strict=True):
                out.append(f'{name}_bucket{{route="{r}",le="{bound:g}"}} {count}')
            out.append(f'{name}_bucket{{route="{r}",le="+Inf"}} {hist.count}')
            out.append(f'{name}_sum{{route="{r}"}} {hist.total_s:.6f}')
            out.append(f'{name}_count{{route="{r}"}} {hist.count}')
        header(
            "edgevoice_http_audio_seconds_total",
            "counter",
            "Seconds of audio transcribed (direction=in) and synthesized (direction=out).",
        )
        for (direction, model), seconds in sorted(self.audio_s.items()):
            out.append(
                f'edgevoice_http_audio_seconds_total{{direction="{direction}",'
                f'model="{_label(model)}"}} {seconds:.3f}'
            )
        engine_rows: list[tuple[str, str, str, Any]] = []
        for kind in EngineKind:
            for loaded in hub.models(kind):
                engine_rows.append((kind.value, loaded.name, loaded.slot.plugin.name, loaded.slot))
        for metric, attr, kind_text, text in _ENGINE_METRICS:
            header(metric, kind_text, text)
            for kind_value, model_name, engine, slot in engine_rows:
                value = getattr(slot, attr)
                out.append(
                    f'{metric}{{kind="{kind_value}",model="{_label(model_name)}",'
                    f'engine="{_label(engine)}"}} {float(value):.6f}'
                )
        return "\n".join(out) + "\n"
