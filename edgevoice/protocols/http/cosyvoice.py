"""CosyVoice's FastAPI server (``runtime/python/fastapi/server.py``), on the same hub.

Five endpoints, each on GET and POST with form fields (CosyVoice's own client
sends a GET with a form body): ``/inference_sft`` (``tts_text``, ``spk_id``),
``/inference_zero_shot`` (``tts_text``, ``prompt_text``, ``prompt_wav``),
``/inference_cross_lingual`` (``tts_text``, ``prompt_wav``),
``/inference_instruct`` (``tts_text``, ``spk_id``, ``instruct_text``) and
``/inference_instruct2`` (``tts_text``, ``instruct_text``, ``prompt_wav``).

The answer is what CosyVoice streams: raw 16-bit little-endian mono PCM at
the model's own rate (``X-Sample-Rate`` says which), written as each sentence
is synthesized, as ``application/octet-stream``, CORS open to every origin
(preflights included).
``spk_id`` names a configured voice, a voice-library id or name, or an entry
of ``[http] speakers`` mapping it to one (so ``中文女`` can name a stored
voice). Errors come in FastAPI's shape: a missing field is 422 with
``{"detail": [{"type": "missing", "loc": ["body", field], ...}]}``, anything
else ``{"detail": message}`` with the HTTP face's status for it. A capability
the model lacks (``instruct_text`` without style control, cross-lingual text
on an English-only model) is refused, never silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from edgevoice.engines.base import SynthesizeOptions, VoiceReference
from edgevoice.errors import UnsupportedRequestError
from edgevoice.hub import LoadedModel
from edgevoice.pipeline.speak import SpokenAudio, speak
from edgevoice.protocols.http.compat import (
    Fields,
    add_error_shape,
    cloning_model,
    fastapi_error,
    read_fields,
    require,
    require_instructions,
    resolve_speaker,
    to_pcm16,
    uploaded_reference,
)
from edgevoice.protocols.http.errors import client_error
from edgevoice.protocols.http.forms import ClientGone
from edgevoice.protocols.http.speech import check_text, log_stream_failure
from edgevoice.protocols.http.state import ServerState, state

_LOGGER = logging.getLogger(__name__)

CORS: Final[dict[str, str]] = {"Access-Control-Allow-Origin": "*"}
"""CosyVoice's server allows every origin."""
FILE_FIELDS: Final = frozenset({"prompt_wav"})


@dataclass(frozen=True, slots=True)
class _Plan:
    model: LoadedModel[Any]
    options: SynthesizeOptions


def _non_latin(text: str) -> bool:
    return any(ch.isalpha() and ord(ch) > 0x24F for ch in text)


async def _sft(st: ServerState, f: Fields) -> _Plan:
    require(f, ("tts_text", "spk_id"), FILE_FIELDS)
    speaker = await resolve_speaker(st, f.values["spk_id"], "spk_id")
    return _Plan(speaker.model, SynthesizeOptions(voice=speaker.voice, reference=speaker.reference))


async def _instruct(st: ServerState, f: Fields) -> _Plan:
    require(f, ("tts_text", "spk_id", "instruct_text"), FILE_FIELDS)
    speaker = await resolve_speaker(st, f.values["spk_id"], "spk_id")
    require_instructions(st, speaker.model)
    options = SynthesizeOptions(
        voice=speaker.voice, reference=speaker.reference, instructions=f.text("instruct_text")
    )
    return _Plan(speaker.model, options)


async def _cloned(
    st: ServerState, f: Fields, text: str | None, instruct: str | None
) -> tuple[LoadedModel[Any], VoiceReference]:
    model = cloning_model(st, "prompt_wav")
    if instruct is not None:
        require_instructions(st, model)
    reference = await uploaded_reference(f.files["prompt_wav"].data, text, instruct)
    return model, reference


async def _zero_shot(st: ServerState, f: Fields) -> _Plan:
    require(f, ("tts_text", "prompt_text", "prompt_wav"), FILE_FIELDS)
    model, reference = await _cloned(st, f, f.text("prompt_text"), None)
    return _Plan(model, SynthesizeOptions(voice=model.name, reference=reference))


async def _cross_lingual(st: ServerState, f: Fields) -> _Plan:
    require(f, ("tts_text", "prompt_wav"), FILE_FIELDS)
    model = cloning_model(st, "prompt_wav")
    languages = {lang for v in model.engine.capabilities.voices for lang in v.languages}
    if languages == {"en"} and _non_latin(f.values["tts_text"]):
        raise UnsupportedRequestError(
            f"model {model.name!r} speaks only English, so it cannot speak this text "
            "cross-lingually; configure a multilingual cloning model",
            param="tts_text",
        )
    model, reference = await _cloned(st, f, None, None)
    return _Plan(model, SynthesizeOptions(voice=model.name, reference=reference))


async def _instruct2(st: ServerState, f: Fields) -> _Plan:
    require(f, ("tts_text", "instruct_text", "prompt_wav"), FILE_FIELDS)
    instruct = f.text("instruct_text")
    model, reference = await _cloned(st, f, None, instruct)
    options = SynthesizeOptions(voice=model.name, reference=reference, instructions=instruct)
    return _Plan(model, options)


MODES: Final[dict[str, Callable[[ServerState, Fields], Awaitable[_Plan]]]] = {
    "/inference_sft": _sft,
    "/inference_zero_shot": _zero_shot,
    "/inference_cross_lingual": _cross_lingual,
    "/inference_instruct": _instruct,
    "/inference_instruct2": _instruct2,
}
"""Path → how its fields become a synthesis plan."""


def error_response(exc: BaseException) -> web.Response:
    """FastAPI's error shape for anything a CosyVoice handler raises."""
    return fastapi_error(exc, CORS)


async def inference(request: web.Request) -> web.StreamResponse:
    """Any of the five endpoints: the fields, then PCM as it is synthesized."""
    st = state(request)
    plan_for = MODES[request.path]
    try:
        fields = await read_fields(request, st)
        plan = await plan_for(st, fields)
        text = check_text(fields.values["tts_text"], st.settings.limits.max_input_chars, "tts_text")
        spoken = speak(st.hub, text, plan.options, st.settings.limits)
        try:
            # The first piece is made before the headers go out: an engine
            # that refuses the text still gets a proper error status.
            first = await anext(spoken, None)
            if first is None:
                raise client_error("tts_text produced no speech (nothing to say)", "tts_text")
        except BaseException:
            await spoken.aclose()
            raise
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return error_response(exc)
    async with spoken:
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "X-Sample-Rate": str(spoken.rate_hz),
                **CORS,
            }
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)  # a client gone already: quietly, as below
            chunk: SpokenAudio | None = first
            while chunk is not None:
                await response.write(await asyncio.to_thread(to_pcm16, chunk.samples))
                chunk = await anext(spoken, None)
            await response.write_eof()
        except ConnectionError:
            _LOGGER.debug("CosyVoice client went away mid-stream")
        except Exception as exc:
            log_stream_failure(exc, "CosyVoice synthesis failed mid-stream")
            if request.transport is not None:
                request.transport.close()
        finally:
            st.metrics.add_audio("out", spoken.model.name, spoken.audio_s)
    return response


MAX_ALLOWED_HEADERS_CHARS: Final = 1024


async def preflight(request: web.Request) -> web.Response:
    """A CORS preflight, answered as CosyVoice's ``CORSMiddleware`` does (every origin,
    method and header). With ``[http] cors_origins`` set, the HTTP face answers first."""
    headers = {
        **CORS,
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Max-Age": "600",
    }
    asked = request.headers.get("Access-Control-Request-Headers", "")
    if asked and len(asked) <= MAX_ALLOWED_HEADERS_CHARS:
        headers["Access-Control-Allow-Headers"] = asked
    return web.Response(status=200, headers=headers)


def add_cosyvoice_routes(app: web.Application) -> None:
    """The five CosyVoice endpoints, each on GET (with HEAD), POST and OPTIONS (CORS)."""
    for path in MODES:
        app.router.add_get(path, inference)
        app.router.add_post(path, inference)
        app.router.add_route("OPTIONS", path, preflight)
    add_error_shape(app, MODES, error_response)
