"""Audio endpoints of the OpenAI-compatible API: transcription, translation,
speech (plain, streamed, SSE, cloning), the WebSocket speech stream and the
voice library. Decoding and encoding run in worker threads, inference in the
hub's engine pools; the event loop only moves bytes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from aiohttp import WSMsgType, web

from edgevoice.audio import OUTPUT_FORMATS, Audio, AudioError, StreamEncoder, decode
from edgevoice.engines.base import (
    EngineRequestError,
    FloatAudio,
    SynthesizeOptions,
    TranscribeOptions,
    Transcript,
    VoiceReference,
)
from edgevoice.formats import TRANSCRIPT_FORMATS, format_transcript, verbose_json
from edgevoice.hub import EngineHub, LoadedModel
from edgevoice.protocols.http_common import (
    OPENAI_VOICES,
    ApiError,
    Form,
    ServerState,
    UploadedFile,
    api_error_from,
    bad_request,
    not_found,
    optional_str,
    parse_bool,
    parse_choice,
    parse_float,
    read_form,
    read_json,
    resolve_asr,
    resolve_tts,
    state,
    too_large,
)
from edgevoice.text import SentenceBuffer
from edgevoice.voices import VoiceNotFoundError, decode_reference, valid_voice_id

_LOGGER = logging.getLogger(__name__)

PCM_RATE_HZ: Final = 24000
"""OpenAI's ``pcm``: s16le mono at 24 kHz."""
SPEED_RANGE: Final = (0.25, 4.0)
_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _upload_limit(st: ServerState) -> int:
    return int(st.settings.http.max_upload_mb * (1 << 20))


async def _send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    """Close a hub stream early (its blocking iterator is closed in the worker)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def _error_payload(exc: BaseException) -> dict[str, Any]:
    return api_error_from(exc).body()


# ------------------------------------------------------------- transcription


def _granularities(form: Form) -> set[str]:
    values = form.getall("timestamp_granularities[]") + form.getall("timestamp_granularities")
    found: set[str] = set()
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if item not in ("word", "segment"):
                raise bad_request(
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
        return web.json_response(body, dumps=lambda v: json.dumps(v, ensure_ascii=False))
    if fmt == "json":
        return web.json_response(
            {"text": transcript.text}, dumps=lambda v: json.dumps(v, ensure_ascii=False)
        )
    return web.Response(text=format_transcript(transcript, fmt, task), content_type="text/plain")


async def _transcribe(request: web.Request, task: str) -> web.StreamResponse:
    st = state(request)
    hub = st.hub
    form = await read_form(request, _upload_limit(st))
    upload = form.files.get("file")
    if upload is None:
        raise bad_request("file is required (an audio file upload)", "file", "missing_file")
    model = resolve_asr(hub, form.get("model"))
    caps = model.engine.capabilities
    if task == "translate" and not caps.translate:
        can = [m.name for m, c in hub.asr_capabilities() if c.translate]
        raise bad_request(
            f"model {model.name!r} cannot translate (it is English-only); "
            + (f"use one of: {', '.join(can)}" if can else "no configured model can translate"),
            "model",
            "translation_not_supported",
        )
    fmt = parse_choice(form.get("response_format"), "response_format", TRANSCRIPT_FORMATS, "json")
    temperature = parse_float(form.get("temperature"), "temperature", 0.0, 1.0)
    if temperature == 0.0:
        # OpenAI: 0 means "raise the temperature automatically when decoding
        # fails its thresholds", which is the engine's fallback schedule.
        temperature = None
    beam_size = parse_float(form.get("beam_size"), "beam_size", 1, 20)
    granularities = _granularities(form)
    stream = task == "transcribe" and parse_bool(form.get("stream"), "stream")
    options = TranscribeOptions(
        language=(form.get("language") or None) if task == "transcribe" else None,
        task="translate" if task == "translate" else "transcribe",
        prompt=form.get("prompt") or None,
        hotwords=form.get("hotwords") or None,
        temperature=temperature,
        beam_size=int(beam_size) if beam_size is not None else None,
        word_timestamps="word" in granularities,
    )
    audio = await asyncio.to_thread(decode, upload.data, rate_hz=caps.sample_rate_hz)
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
    response = web.StreamResponse(headers=_SSE_HEADERS)
    try:
        await response.prepare(request)
        parts: list[str] = []
        async for segment in segments:
            delta = segment.text if parts else segment.text.lstrip()
            parts.append(segment.text)
            if delta:
                await _send_event(response, {"type": "transcript.text.delta", "delta": delta})
        text = "".join(parts).strip()
        await _send_event(response, {"type": "transcript.text.done", "text": text})
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:
        _LOGGER.exception("Streaming transcription failed")
        with contextlib.suppress(ConnectionResetError):
            await _send_event(response, _error_payload(exc))
    finally:
        await _aclose(segments)
    return response


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "translate")


# ------------------------------------------------------------------ speech


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
        raise bad_request(f"{param} must be base64-encoded audio", param)
    if value.startswith("data:"):  # a data URL: data:audio/wav;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param) from None


def _inline_reference(
    body: dict[str, Any], files: dict[str, UploadedFile], limit: int
) -> _InlineReference | None:
    """The cloning sample in any of the accepted shapes, or None."""
    data: bytes | None = None
    if (upload := files.get("prompt_speech") or files.get("voice_sample")) is not None:
        data = upload.data  # Xinference: multipart prompt_speech (+ prompt_text, instruct_text)
    else:
        for param in ("voice_sample", "prompt_speech", "reference_audio"):
            if body.get(param):  # CSM: JSON voice_sample (base64) + voice_sample_text
                if isinstance(body[param], str) and len(body[param]) > limit * 4 // 3 + 64:
                    raise too_large(limit)
                data = _b64_audio(body[param], param)
                break
    if data is None:
        return None
    if len(data) > limit:
        raise too_large(limit)
    text = None
    for param in ("voice_sample_text", "prompt_text", "reference_text"):
        if text := optional_str(body.get(param), param):
            break
    instruct = optional_str(body.get("instruct_text"), "instruct_text")
    return _InlineReference(data, text, instruct)


def _cloning_model(hub: EngineHub, model: LoadedModel[Any]) -> LoadedModel[Any]:
    if model.engine.capabilities.cloning:
        return model
    able = [f"{m.name} ({m.slot.plugin.name})" for m, c in hub.tts_capabilities() if c.cloning]
    raise bad_request(
        f"model {model.name!r} (engine {model.slot.plugin.name}) cannot clone voices; "
        + (
            f"models that can: {', '.join(able)}"
            if able
            else "no configured TTS model can clone voices"
        ),
        "model",
        "cloning_not_supported",
    )


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
    raw_voice = body.get("voice")
    if isinstance(raw_voice, dict):
        voice_name = raw_voice.get("id")
        if not isinstance(voice_name, str) or not voice_name:
            raise bad_request('voice must be a name or {"id": "<voice id>"}', "voice")
    elif raw_voice is None or isinstance(raw_voice, str):
        voice_name = raw_voice or None
    else:
        raise bad_request('voice must be a name or {"id": "<voice id>"}', "voice")

    inline = _inline_reference(body, files, int(st.settings.http.max_upload_mb * (1 << 20)))
    stored_id: str | None = None
    voice = model.name
    if voice_name is not None:
        if voice_name in hub.voice_names():
            model, _engine_voice = hub.voice(voice_name)
            voice = voice_name
        elif valid_voice_id(voice_name):
            stored_id = voice_name
        elif voice_name.lower() not in OPENAI_VOICES:
            known = [
                *hub.voice_names(),
                *(v.id for v in await asyncio.to_thread(st.library.voices)),
            ]
            raise not_found(
                f"unknown voice {voice_name!r}; available: {', '.join(known)}",
                "voice",
                "voice_not_found",
            )
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
        try:
            reference = await asyncio.to_thread(st.library.reference, stored_id)
        except VoiceNotFoundError:
            raise not_found(
                f"no stored voice with id {stored_id!r}", "voice", "voice_not_found"
            ) from None
    return SpeechTarget(model, voice, reference)


class _OutputEncoder:
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


def _speech_options(body: dict[str, Any], st: ServerState) -> tuple[str, str, float, str | None]:
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad_request("input is required (the text to speak)", "input", "missing_input")
    limit = st.settings.http.max_input_chars
    if len(text) > limit:
        raise bad_request(
            f"input is {len(text)} characters; the limit is {limit}", "input", "input_too_long"
        )
    fmt = parse_choice(body.get("response_format"), "response_format", OUTPUT_FORMATS, "mp3")
    speed = parse_float(body.get("speed"), "speed", *SPEED_RANGE)
    instructions = optional_str(body.get("instructions"), "instructions")
    return text, fmt, 1.0 if speed is None else speed, instructions


async def speech(request: web.Request) -> web.StreamResponse:
    st = state(request)
    files: dict[str, UploadedFile] = {}
    if request.content_type.startswith("multipart/"):
        form = await read_form(request, int(st.settings.http.max_upload_mb * (1 << 20)))
        body: dict[str, Any] = form.as_dict()
        files = form.files
    else:
        body = await read_json(request)
    text, fmt, speed, instructions = _speech_options(body, st)
    stream_format = parse_choice(
        body.get("stream_format"), "stream_format", ("audio", "sse"), "audio"
    )
    target = await resolve_speech_target(st, body, files)
    options = SynthesizeOptions(
        voice=target.voice,
        speaker=optional_str(body.get("speaker"), "speaker"),
        speed=speed,
        instructions=instructions,
        reference=target.reference,
    )
    loaded, rate, chunks = await st.hub.synthesize(text, options)
    try:
        # The first sentence is synthesized before the headers go out, so an
        # engine that rejects the text still gets a proper error status.
        first = await anext(chunks, None)
        if first is None:
            raise bad_request("input produced no speech", "input")
        encoder = _OutputEncoder(fmt, rate)
        if stream_format == "sse":
            return await _speech_sse(
                request,
                st=st,
                loaded=loaded,
                text=text,
                encoder=encoder,
                first=first,
                chunks=chunks,
            )
        return await _speech_audio(
            request, st=st, loaded=loaded, encoder=encoder, first=first, chunks=chunks
        )
    finally:
        await _aclose(chunks)


async def _speech_audio(
    request: web.Request,
    *,
    st: ServerState,
    loaded: LoadedModel[Any],
    encoder: _OutputEncoder,
    first: FloatAudio,
    chunks: AsyncIterator[FloatAudio],
) -> web.StreamResponse:
    rate = loaded.engine.capabilities.sample_rate_hz
    response = web.StreamResponse(
        headers={"Content-Type": encoder.content_type, "X-Sample-Rate": str(encoder.rate_hz)}
    )
    response.enable_chunked_encoding()
    data = await asyncio.to_thread(encoder.write, first)
    await response.prepare(request)
    audio_s = len(first) / rate
    try:
        if data:
            await response.write(data)
        async for chunk in chunks:
            audio_s += len(chunk) / rate
            if data := await asyncio.to_thread(encoder.write, chunk):
                await response.write(data)
        if tail := await asyncio.to_thread(encoder.close):
            await response.write(tail)
        await response.write_eof()
    except ConnectionResetError:
        _LOGGER.debug("Client went away during speech")
    except Exception:
        # Headers are out: the only honest signal left is an aborted transfer.
        _LOGGER.exception("Speech synthesis failed mid-stream")
        if request.transport is not None:
            request.transport.close()
    finally:
        st.metrics.add_audio("out", loaded.name, audio_s)
    return response


async def _speech_sse(
    request: web.Request,
    *,
    st: ServerState,
    loaded: LoadedModel[Any],
    text: str,
    encoder: _OutputEncoder,
    first: FloatAudio,
    chunks: AsyncIterator[FloatAudio],
) -> web.StreamResponse:
    rate = loaded.engine.capabilities.sample_rate_hz
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    audio_s = 0.0

    async def delta(data: bytes) -> None:
        if data:
            payload = base64.b64encode(data).decode("ascii")
            await _send_event(response, {"type": "speech.audio.delta", "audio": payload})

    try:
        pending: FloatAudio | None = first
        while pending is not None:
            audio_s += len(pending) / rate
            await delta(await asyncio.to_thread(encoder.write, pending))
            pending = await anext(chunks, None)
        await delta(await asyncio.to_thread(encoder.close))
        output_ms = round(audio_s * 1000)
        await _send_event(
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
    except ConnectionResetError:
        _LOGGER.debug("Client went away during SSE speech")
    except Exception as exc:
        _LOGGER.exception("Speech synthesis failed mid-stream")
        with contextlib.suppress(ConnectionResetError):
            await _send_event(response, _error_payload(exc))
    finally:
        st.metrics.add_audio("out", loaded.name, audio_s)
    return response


# --------------------------------------------------------------- websocket


async def speech_stream(request: web.Request) -> web.WebSocketResponse:
    """``/v1/audio/speech/stream``: text in pieces → binary audio per sentence."""
    st = state(request)
    ws = web.WebSocketResponse(
        heartbeat=30.0, max_msg_size=int(st.settings.http.max_upload_mb * 1.4 * (1 << 20))
    )
    await ws.prepare(request)
    st.websockets.add(ws)
    worker: asyncio.Task[None] | None = None
    try:
        first = await ws.receive(timeout=60.0)
        if first.type is not WSMsgType.TEXT:
            return ws
        try:
            config = json.loads(first.data)
            if not isinstance(config, dict):
                raise bad_request("the first message must be a JSON object of options")
            fmt = parse_choice(
                config.get("response_format"), "response_format", OUTPUT_FORMATS, "pcm"
            )
            speed = parse_float(config.get("speed"), "speed", *SPEED_RANGE) or 1.0
            target = await resolve_speech_target(st, config, {})
        except (ApiError, AudioError, EngineRequestError, ValueError, LookupError) as exc:
            await _ws_error(ws, exc)
            return ws
        options = SynthesizeOptions(
            voice=target.voice,
            speed=speed,
            instructions=optional_str(config.get("instructions"), "instructions"),
            reference=target.reference,
        )
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        worker = asyncio.create_task(_ws_synthesize(ws, st, options, fmt, queue))
        buffer = SentenceBuffer()
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            try:
                event = json.loads(message.data)
                chunk = (
                    event.get("text_chunk", event.get("text", ""))
                    if isinstance(event, dict)
                    else None
                )
                if not isinstance(chunk, str):
                    raise bad_request('messages must be {"text_chunk": "...", "is_final": false}')
            except (ValueError, ApiError) as exc:
                await _ws_error(ws, exc)
                continue
            for sentence in buffer.feed(chunk):
                queue.put_nowait(sentence)
            if parse_bool(event.get("is_final"), "is_final"):
                for sentence in buffer.flush():
                    queue.put_nowait(sentence)
                queue.put_nowait(None)  # end of utterance: flush and send done
    except TimeoutError:
        pass  # no options message within a minute
    finally:
        st.websockets.discard(ws)
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        await ws.close()
    return ws


async def _ws_error(ws: web.WebSocketResponse, exc: BaseException) -> None:
    if isinstance(exc, json.JSONDecodeError):
        exc = bad_request(f"message is not valid JSON: {exc}")
    with contextlib.suppress(ConnectionResetError):
        await ws.send_json({"type": "error", **_error_payload(exc)})


async def _ws_synthesize(
    ws: web.WebSocketResponse,
    st: ServerState,
    options: SynthesizeOptions,
    fmt: str,
    queue: asyncio.Queue[str | None],
) -> None:
    """Synthesize queued sentences in order; ``None`` ends an utterance."""
    encoder: _OutputEncoder | None = None
    audio_s = 0.0
    sentences = 0
    model_name = ""
    while True:
        sentence = await queue.get()
        try:
            if sentence is None:
                if encoder is not None and (tail := await asyncio.to_thread(encoder.close)):
                    await ws.send_bytes(tail)
                await ws.send_json(
                    {
                        "type": "done",
                        "sentences": sentences,
                        "audio_seconds": round(audio_s, 3),
                        "format": fmt,
                        "sample_rate": encoder.rate_hz if encoder else None,
                    }
                )
                st.metrics.add_audio("out", model_name, audio_s)
                encoder, audio_s, sentences = None, 0.0, 0
                continue
            loaded, rate, chunks = await st.hub.synthesize(sentence, options)
            model_name = loaded.name
            if encoder is None:
                encoder = _OutputEncoder(fmt, rate)
            sentences += 1
            try:
                async for chunk in chunks:
                    audio_s += len(chunk) / rate
                    if data := await asyncio.to_thread(encoder.write, chunk):
                        await ws.send_bytes(data)
            finally:
                await _aclose(chunks)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            _LOGGER.warning("WebSocket speech failed: %s", exc)
            await _ws_error(ws, exc)
        finally:
            queue.task_done()


# ------------------------------------------------------------ voice library


async def list_voices(request: web.Request) -> web.Response:
    st = state(request)
    data: list[dict[str, Any]] = []
    for model, caps in st.hub.tts_capabilities():
        for info in caps.voices:
            data.append(
                {
                    "id": info.name,
                    "object": "audio.voice",
                    "type": "builtin",
                    "name": info.name,
                    "model": model.name,
                    "engine": model.slot.plugin.name,
                    "languages": list(info.languages),
                    "speakers": list(info.speakers),
                    "cloning": caps.cloning,
                }
            )
    stored = await asyncio.to_thread(st.library.voices)
    data.extend(v.to_json() for v in stored)
    return web.json_response({"object": "list", "data": data})


async def create_voice(request: web.Request) -> web.Response:
    st = state(request)
    form = await read_form(request, int(st.settings.http.max_upload_mb * (1 << 20)))
    name = form.get("name")
    if not name:
        raise bad_request("name is required", "name", "missing_name")
    upload = form.files.get("audio_sample") or form.files.get("file")
    if upload is None:
        raise bad_request(
            "audio_sample is required (a 1–30 s recording)", "audio_sample", "missing_file"
        )
    transcript = form.get("transcript") or form.get("text") or None
    voice = await asyncio.to_thread(st.library.add, name, upload.data, transcript)
    return web.json_response(voice.to_json(), status=201)


async def get_voice(request: web.Request) -> web.Response:
    st = state(request)
    voice_id = request.match_info["voice_id"]
    try:
        voice = await asyncio.to_thread(st.library.get, voice_id)
    except VoiceNotFoundError:
        raise not_found(
            f"no stored voice with id {voice_id!r}", "voice_id", "voice_not_found"
        ) from None
    return web.json_response(voice.to_json())


async def delete_voice(request: web.Request) -> web.Response:
    st = state(request)
    voice_id = request.match_info["voice_id"]
    try:
        await asyncio.to_thread(st.library.delete, voice_id)
    except VoiceNotFoundError:
        raise not_found(
            f"no stored voice with id {voice_id!r}", "voice_id", "voice_not_found"
        ) from None
    return web.json_response({"id": voice_id, "object": "audio.voice.deleted", "deleted": True})
