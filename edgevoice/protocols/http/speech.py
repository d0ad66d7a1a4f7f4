"""``/v1/audio/speech``: speech as one streamed response or as Server-Sent Events.

Text is bounded by ``limits.max_input_chars`` before any work; the hub's
speech pipeline cuts it into bounded sentences and synthesizes them in
order, so the first audio leaves after the first sentence. Encoding runs in
worker threads, inference in the hub's engine pool; the loop only moves bytes.
Voice cloning: a stored voice id, a JSON ``voice_sample`` (base64) or a
multipart ``prompt_speech``; the model must declare cloning.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from aiohttp import web

from edgevoice.audio import OUTPUT_FORMATS, StreamEncoder
from edgevoice.engines.base import FloatAudio, SynthesizeOptions, VoiceReference
from edgevoice.errors import (
    ClientError,
    LimitExceededError,
    UnknownModelError,
    UnsupportedRequestError,
)
from edgevoice.hub import EngineHub, LoadedModel
from edgevoice.pipeline.speak import Speech, SpokenAudio, speak
from edgevoice.protocols.http.compat import require_instructions, unpack_kwargs
from edgevoice.protocols.http.errors import client_error, error_payload
from edgevoice.protocols.http.forms import (
    UploadedFile,
    optional_str,
    parse_bool,
    parse_choice,
    parse_float,
    read_form,
    read_json,
    too_large,
)
from edgevoice.protocols.http.models import OPENAI_VOICES, resolve_tts
from edgevoice.protocols.http.state import ServerState, state
from edgevoice.protocols.http.transcription import SSE_HEADERS, send_event
from edgevoice.voices import decode_reference, valid_voice_id

_LOGGER = logging.getLogger(__name__)

PCM_RATE_HZ: Final = 24000
"""OpenAI's ``pcm``: s16le mono at 24 kHz."""
SPEED_RANGE: Final = (0.25, 4.0)


# ------------------------------------------------------------------ target


@dataclass(frozen=True, slots=True)
class SpeechTarget:
    """Where a speech request goes: the model, the public voice name, the reference."""

    model: LoadedModel[Any]
    voice: str
    reference: VoiceReference | None


@dataclass(frozen=True, slots=True)
class _InlineReference:
    data: bytes
    text: str | None
    instruct_text: str | None


def _b64_audio(value: Any, param: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise client_error(f"{param} must be base64-encoded audio", param)
    if value.startswith("data:"):  # a data URL: data:audio/wav;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise client_error(f"{param} is not valid base64", param) from None


def _inline_reference(
    body: dict[str, Any], files: dict[str, UploadedFile], limit: int
) -> _InlineReference | None:
    """The cloning sample in any of the accepted shapes, or None."""
    text = None
    for param in ("voice_sample_text", "prompt_text", "reference_text"):
        if text := optional_str(body.get(param), param):
            break
    instruct = optional_str(body.get("instruct_text"), "instruct_text")
    data: bytes | None = None
    if (upload := files.get("prompt_speech") or files.get("voice_sample")) is not None:
        data = upload.data  # Xinference: multipart prompt_speech (+ prompt_text, instruct_text)
    else:
        for param in ("voice_sample", "prompt_speech", "reference_audio"):
            value = body.get(param)
            if value is None or value == "":
                continue
            # CSM: JSON voice_sample (base64) + voice_sample_text
            if isinstance(value, str) and len(value) > limit * 4 // 3 + 64:
                raise too_large(limit)
            data = _b64_audio(value, param)
            break
    if data is None:
        return None
    if len(data) > limit:
        raise too_large(limit)
    return _InlineReference(data, text, instruct)


def _cloning_model(hub: EngineHub, model: LoadedModel[Any]) -> LoadedModel[Any]:
    if model.engine.capabilities.cloning:
        return model
    able = [f"{m.name} ({m.slot.plugin.name})" for m, c in hub.tts_capabilities() if c.cloning]
    error = UnsupportedRequestError(
        f"model {model.name!r} (engine {model.slot.plugin.name}) cannot clone voices; "
        + (
            f"models that can: {', '.join(able)}"
            if able
            else "no configured TTS model can clone voices"
        ),
        param="model",
    )
    error.code = "cloning_not_supported"
    raise error


def _voice_field(body: dict[str, Any]) -> str | None:
    raw = body.get("voice")
    if isinstance(raw, dict):
        name = raw.get("id")
        if not isinstance(name, str) or not name:
            raise client_error('voice must be a name or {"id": "<voice id>"}', "voice")
        return name
    if raw is None or isinstance(raw, str):
        return raw or None
    raise client_error('voice must be a name or {"id": "<voice id>"}', "voice")


async def resolve_speech_target(
    st: ServerState, body: dict[str, Any], files: dict[str, UploadedFile]
) -> SpeechTarget:
    """Pick model, voice and cloning reference for a speech request.

    ``voice`` naming a configured voice picks that voice's model; a stored
    voice id (``"voice_x"`` or ``{"id": "voice_x"}``) or an inline sample clones
    with the requested ``model``; OpenAI's voice names (alloy, ...) and an
    empty voice use the requested model's own voice.
    """
    hub = st.hub
    model = resolve_tts(hub, optional_str(body.get("model"), "model"))
    voice_name = _voice_field(body)
    if voice_name is not None:  # [http] speakers: e.g. Xinference's voice="中文女"
        voice_name = st.settings.http.speakers.get(voice_name, voice_name)
    inline = _inline_reference(body, files, st.settings.limits.max_upload_bytes)
    stored_id: str | None = None
    voice = model.name
    if voice_name is not None:
        if voice_name in hub.voice_names():
            model, _engine_voice = hub.voice(voice_name)
            voice = voice_name
        elif valid_voice_id(voice_name):
            stored_id = voice_name
        elif voice_name.lower() not in OPENAI_VOICES:
            # Configured voices only: stored ids belong to whoever stored them.
            raise UnknownModelError("tts", voice_name, hub.voice_names(), param="voice")
    if inline is None and stored_id is None:
        return SpeechTarget(model, voice, None)
    model = _cloning_model(hub, model)
    if voice not in {v.name for v in model.engine.capabilities.voices}:
        voice = model.name
    if inline is not None:
        ref_audio = await asyncio.to_thread(decode_reference, inline.data)
        reference = VoiceReference(
            ref_audio.samples, ref_audio.rate_hz, inline.text, inline.instruct_text
        )
    else:
        assert stored_id is not None
        reference = await asyncio.to_thread(st.library.reference, stored_id)
    return SpeechTarget(model, voice, reference)


# ----------------------------------------------------------------- output


class OutputEncoder:
    """Engine-rate float chunks → the requested format (pcm resampled to 24 kHz). Blocking."""

    def __init__(self, fmt: str, engine_rate_hz: int) -> None:
        self.format = fmt
        self.rate_hz = PCM_RATE_HZ if fmt == "pcm" else engine_rate_hz
        self._resampler: Any = None
        if self.rate_hz != engine_rate_hz:
            import soxr

            self._resampler = soxr.ResampleStream(
                engine_rate_hz, self.rate_hz, 1, dtype="float32", quality="HQ"
            )
        self._encoder = StreamEncoder(fmt, self.rate_hz)
        self.content_type = self._encoder.content_type

    def write(self, chunk: FloatAudio) -> bytes:
        if self._resampler is not None:
            chunk = self._resampler.resample_chunk(np.ascontiguousarray(chunk, dtype=np.float32))
        return self._encoder.write(chunk)

    def close(self) -> bytes:
        tail = b""
        if self._resampler is not None:
            rest = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            tail = self._encoder.write(rest) if len(rest) else b""
        return tail + self._encoder.close()


async def aclose(iterator: AsyncIterator[Any]) -> None:
    """Close a hub stream early (its blocking iterator is closed in the worker)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def check_text(text: Any, limit: int, param: str = "input") -> str:
    """The text to speak: a non-blank string of at most ``limit`` characters."""
    if not isinstance(text, str) or not text.strip():
        raise client_error(f"{param} is required (the text to speak)", param, "missing_input")
    if len(text) > limit:
        raise LimitExceededError(
            "max_input_chars", limit, what=f"{param} of {len(text)} characters",
            unit="characters", param=param,
        )  # fmt: skip
    return text


def log_stream_failure(exc: BaseException, what: str) -> None:
    """A failure after the headers went out: client faults are DEBUG, ours a traceback."""
    if isinstance(exc, ClientError):
        _LOGGER.debug("%s: %s", what, exc)
    else:
        _LOGGER.error("%s", what, exc_info=exc)


# ------------------------------------------------------------------ route


async def speech(request: web.Request) -> web.StreamResponse:
    st = state(request)
    files: dict[str, UploadedFile] = {}
    if request.content_type.startswith("multipart/"):
        form = await read_form(request, st.settings.limits)
        body: dict[str, Any] = form.as_dict()
        files = form.files
    else:
        body = await read_json(request, st.settings.limits)
        if body.get("play") is not None and not isinstance(body["play"], bool):
            # JSON says what it means: only form fields spell booleans as text.
            raise client_error(f"play must be true or false, not {body['play']!r}", "play")
    body = unpack_kwargs(body)  # Xinference's client: prompt_text etc. in a JSON "kwargs"
    text = check_text(body.get("input"), st.settings.limits.max_input_chars)
    fmt = parse_choice(body.get("response_format"), "response_format", OUTPUT_FORMATS, "mp3")
    speed = parse_float(body.get("speed"), "speed", *SPEED_RANGE)
    stream_format = parse_choice(
        body.get("stream_format"), "stream_format", ("audio", "sse"), "audio"
    )
    target = await resolve_speech_target(st, body, files)
    # Xinference's instruct_text: refused by a model without style control, never ignored.
    instruct = optional_str(body.get("instruct_text"), "instruct_text")
    if instruct is not None:
        require_instructions(st, target.model)
    options = SynthesizeOptions(
        voice=target.voice,
        speaker=optional_str(body.get("speaker"), "speaker"),
        speed=1.0 if speed is None else speed,
        instructions=optional_str(body.get("instructions"), "instructions") or instruct,
        reference=target.reference,
    )
    if parse_bool(body.get("play"), "play"):
        # Spoken on this node's speaker ([audio_io]), in order with all it plays.
        from edgevoice.audio_io.peers import speak_on_speaker

        played = await speak_on_speaker(st.hub, text, options, "HTTP speech request")
        return web.json_response(
            {"played": played.played, "duration_s": round(played.duration_s, 3)}
            | ({"error": played.error} if played.error else {})
        )
    async with speak(st.hub, text, options, st.settings.limits) as spoken:
        # The first piece is synthesized before the headers go out, so an
        # engine that rejects the text still gets a proper error status.
        first = await anext(spoken, None)
        if first is None:
            raise client_error("input produced no speech (nothing to say)", "input")
        encoder = await asyncio.to_thread(OutputEncoder, fmt, spoken.rate_hz)  # opens a codec
        try:
            if stream_format == "sse":
                return await _speech_sse(request, spoken, text, encoder, first)
            return await _speech_audio(request, spoken, encoder, first)
        finally:
            st.metrics.add_audio("out", spoken.model.name, spoken.audio_s)


async def _speech_audio(
    request: web.Request, spoken: Speech, encoder: OutputEncoder, first: SpokenAudio
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": encoder.content_type, "X-Sample-Rate": str(encoder.rate_hz)}
    )
    response.enable_chunked_encoding()
    data = await asyncio.to_thread(encoder.write, first.samples)
    try:
        await response.prepare(request)  # a client gone already: quietly, as below
        if data:
            await response.write(data)
        async for chunk in spoken:
            if data := await asyncio.to_thread(encoder.write, chunk.samples):
                await response.write(data)
        if tail := await asyncio.to_thread(encoder.close):
            await response.write(tail)
        await response.write_eof()
    except ConnectionError:
        _LOGGER.debug("Client went away during speech")
    except Exception as exc:
        # Headers are out: the only honest signal left is an aborted transfer.
        log_stream_failure(exc, "Speech synthesis failed mid-stream")
        if request.transport is not None:
            request.transport.close()
    return response


async def _speech_sse(
    request: web.Request, spoken: Speech, text: str, encoder: OutputEncoder, first: SpokenAudio
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)

    async def delta(data: bytes) -> None:
        if data:
            payload = base64.b64encode(data).decode("ascii")
            await send_event(response, {"type": "speech.audio.delta", "audio": payload})

    try:
        await response.prepare(request)  # a client gone already: quietly, as below
        pending: SpokenAudio | None = first
        while pending is not None:
            await delta(await asyncio.to_thread(encoder.write, pending.samples))
            pending = await anext(spoken, None)
        await delta(await asyncio.to_thread(encoder.close))
        output_ms = round(spoken.audio_s * 1000)
        await send_event(
            response,
            {
                "type": "speech.audio.done",
                "usage": {
                    "input_tokens": len(text),
                    "output_tokens": output_ms,
                    "total_tokens": len(text) + output_ms,
                },
            },
        )
    except ConnectionError:
        _LOGGER.debug("Client went away during SSE speech")
    except Exception as exc:
        log_stream_failure(exc, "Speech synthesis failed mid-stream")
        with contextlib.suppress(ConnectionError):
            await send_event(response, {"type": "error", **error_payload(exc)})
    return response
