"""Model names: OpenAI's names mapped to ours, and the ``/v1/models`` routes."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from edgevoice.engines.base import EngineKind
from edgevoice.errors import UnknownModelError
from edgevoice.hub import EngineHub, LoadedModel, ModelStatus
from edgevoice.protocols.http.errors import ApiError
from edgevoice.protocols.http.state import state

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


def _with_openai_default(
    hub: EngineHub, kind: EngineKind, name: str | None, openai_names: frozenset[str]
) -> LoadedModel[Any]:
    try:
        return hub.get(kind, name)
    except UnknownModelError as exc:
        if name in openai_names:
            return hub.get(kind, None)
        raise UnknownModelError(exc.kind, exc.name, exc.known, param="model") from None


def resolve_asr(hub: EngineHub, name: str | None) -> LoadedModel[Any]:
    """A configured ASR model by name/alias; OpenAI's names mean the default one."""
    return _with_openai_default(hub, EngineKind.ASR, name, OPENAI_ASR_MODELS)


def resolve_tts(hub: EngineHub, name: str | None) -> LoadedModel[Any]:
    return _with_openai_default(hub, EngineKind.TTS, name, OPENAI_TTS_MODELS)


def _model_json(
    hub: EngineHub, model: LoadedModel[Any], kind: EngineKind, created: int
) -> dict[str, Any]:
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
        # Xinference's shape, which its client's get_model() reads:
        "model_type": "audio",
        "model_name": model.name,
        "model_ability": ["audio2text"] if kind is EngineKind.ASR else ["text2audio"],
        **_state_json(hub.status(model)),
    }


def _state_json(status: ModelStatus) -> dict[str, Any]:
    """Lifecycle fields: state, device, memory estimate (RSS growth at load)."""
    return {
        "state": status.state,
        "device": status.device,
        "memory_bytes": status.memory_bytes,
        "load": status.load,
        "ttl_s": status.ttl_s,
        "idle_s": None if status.idle_s is None else round(status.idle_s, 3),
        "error": status.error,
    }


async def list_models(request: web.Request) -> web.Response:
    st = state(request)
    created = int(st.started_at)
    data = [
        _model_json(st.hub, m, kind, created)
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
                return web.json_response(_model_json(st.hub, model, kind, int(st.started_at)))
    raise ApiError(404, f"unknown model {model_id!r}", param="model_id", code="model_not_found")


async def _change_state(request: web.Request, *, load: bool) -> web.Response:
    st = state(request)
    model_id = request.match_info["model_id"]
    try:
        status = await (st.hub.load(model_id) if load else st.hub.unload(model_id))
    except UnknownModelError as exc:
        raise UnknownModelError(exc.kind, model_id, exc.known, param="model_id") from None
    body = {"id": status.name, "object": "model.state", "kind": status.kind.value}
    return web.json_response({**body, **_state_json(status)})


async def load_model(request: web.Request) -> web.Response:
    """``POST /v1/models/{id}/load``: load now (any kind); waits at most its
    ``load_timeout_s``; a failed load is a 500 naming why."""
    return await _change_state(request, load=True)


async def unload_model(request: web.Request) -> web.Response:
    """``POST /v1/models/{id}/unload``: unload now (it loads again on demand);
    429 while it serves sessions or calls."""
    return await _change_state(request, load=False)
