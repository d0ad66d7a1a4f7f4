"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (OpenAI's multipart API).

The upload is bounded by ``limits.max_upload_bytes`` while it streams in;
decoding runs in a worker thread and stops as soon as the audio passes
``limits.max_audio_s`` (a few MB of low-bitrate Opus can hold hours); the
transcription runs in the hub's engine pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Final

from aiohttp import web

from edgevoice.audio import Audio, decode
from edgevoice.engines.base import TranscribeOptions, Transcript
from edgevoice.errors import LimitExceededError, UnsupportedRequestError
from edgevoice.hub import EngineHub, LoadedModel
from edgevoice.protocols.http.errors import client_error, error_payload
from edgevoice.protocols.http.forms import (
    Form,
    parse_bool,
    parse_choice,
    parse_float,
    parse_int,
    read_form,
)
from edgevoice.protocols.http.models import resolve_asr
from edgevoice.protocols.http.state import state
from edgevoice.transcript_formats import TRANSCRIPT_FORMATS, format_transcript, verbose_json

_LOGGER = logging.getLogger(__name__)

SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    """One Server-Sent Event."""
    data = json.dumps(payload, ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _granularities(form: Form) -> set[str]:
    values = form.getall("timestamp_granularities[]") + form.getall("timestamp_granularities")
    found: set[str] = set()
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if item not in ("word", "segment"):
                raise client_error(
                    f"timestamp_granularities must be word and/or segment, not {item!r}",
                    "timestamp_granularities",
                )
            found.add(item)
    return found


def _render_transcript(
    transcript: Transcript, fmt: str, task: str, granularities: set[str]
) -> web.Response:
    if fmt == "verbose_json":
        body = verbose_json(transcript, task)
        if task == "translate":
            body["language"] = "english"
        if granularities == {"word"}:
            body.pop("segments", None)
        if "word" in granularities:
            body.setdefault("words", [])
        return web.json_response(body, dumps=_dumps)
    if fmt == "json":
        return web.json_response({"text": transcript.text}, dumps=_dumps)
    return web.Response(text=format_transcript(transcript, fmt, task), content_type="text/plain")


def _text_field(form: Form, param: str, limit: int) -> str | None:
    value = form.get(param) or None
    if value is not None and len(value) > limit:
        raise LimitExceededError(
            "max_input_chars", limit, what=f"{param} of {len(value)} characters",
            unit="characters", param=param,
        )  # fmt: skip
    return value


def _options(form: Form, model: LoadedModel[Any], task: str, limit_chars: int) -> TranscribeOptions:
    caps = model.engine.capabilities
    temperature = parse_float(form.get("temperature"), "temperature", 0.0, 1.0)
    if temperature == 0.0:
        # OpenAI: 0 means "raise the temperature automatically when decoding
        # fails its thresholds", which is the engine's fallback schedule.
        temperature = None
    language = None
    if task == "transcribe" and (language := form.get("language") or None) is not None:
        language = language.strip().lower()
        if caps.languages and language not in caps.languages:
            raise client_error(
                f"model {model.name!r} does not know language {language!r}",
                "language",
                "unsupported_language",
            )
    return TranscribeOptions(
        language=language,
        task="translate" if task == "translate" else "transcribe",
        prompt=_text_field(form, "prompt", limit_chars),
        hotwords=_text_field(form, "hotwords", limit_chars),
        temperature=temperature,
        beam_size=parse_int(form.get("beam_size"), "beam_size", 1, 20),
        word_timestamps="word" in _granularities(form),
    )


async def _transcribe(request: web.Request, task: str) -> web.StreamResponse:
    st = state(request)
    hub = st.hub
    limits = st.settings.limits
    form = await read_form(request, limits)
    upload = form.files.get("file")
    if upload is None:
        raise client_error("file is required (an audio file upload)", "file", "missing_file")
    model = resolve_asr(hub, form.get("model"))
    caps = model.engine.capabilities
    if task == "translate" and not caps.translate:
        can = [m.name for m, c in hub.asr_capabilities() if c.translate]
        error = UnsupportedRequestError(
            f"model {model.name!r} cannot translate (it is English-only); "
            + (f"use one of: {', '.join(can)}" if can else "no configured model can translate"),
            param="model",
        )
        error.code = "translation_not_supported"
        raise error
    fmt = parse_choice(form.get("response_format"), "response_format", TRANSCRIPT_FORMATS, "json")
    granularities = _granularities(form)
    stream = task == "transcribe" and parse_bool(form.get("stream"), "stream")
    options = _options(form, model, task, limits.max_input_chars)
    audio = await asyncio.to_thread(
        decode, upload.data, rate_hz=caps.sample_rate_hz, max_duration_s=limits.max_audio_s
    )
    del upload, form  # the encoded upload is not needed any more
    st.metrics.add_audio("in", model.name, audio.duration_s)
    if stream:
        return await _stream_transcript(request, hub, model, audio, options)
    transcript = await hub.transcribe(audio, options, model=model.name)
    return _render_transcript(transcript, fmt, task, granularities)


async def _stream_transcript(
    request: web.Request,
    hub: EngineHub,
    model: LoadedModel[Any],
    audio: Audio,
    options: TranscribeOptions,
) -> web.StreamResponse:
    _loaded, _info, segments = await hub.transcribe_segments(audio, options, model=model.name)
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        parts: list[str] = []
        async for segment in segments:
            delta = segment.text if parts else segment.text.lstrip()
            parts.append(segment.text)
            if delta:
                await send_event(response, {"type": "transcript.text.delta", "delta": delta})
        text = "".join(parts).strip()
        await send_event(response, {"type": "transcript.text.done", "text": text})
    except ConnectionError:
        _LOGGER.debug("Client went away during a streamed transcription")
    except Exception as exc:
        # Headers are out: the error travels as an event.
        _LOGGER.exception("Streaming transcription failed")
        with contextlib.suppress(ConnectionError):
            await send_event(response, {"type": "error", **error_payload(exc)})
    finally:
        close = getattr(segments, "aclose", None)
        if close is not None:
            await close()
    return response


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "translate")
