"""The CSM voice-cloning API (csm-voice-api), on the same hub and cloning engines.

``POST /v1/voice-clone`` (form: ``text``, ``audio_file``, ``context_text``,
``speaker_id``, ``max_audio_length_ms``, ``temperature``, ``topk``,
``output_format`` wav|mp3, ``stream``) answers ``{audio_url,
duration_seconds}`` for a file kept in a bounded, expiring in-memory store
(``[limits] max_stored_audio_files``, ``max_stored_audio_bytes``,
``stored_audio_ttl_s``; oldest dropped) and served by ``GET
/v1/audio/{filename}`` (names are generated; anything else is 404, so no path
can reach the filesystem), or with ``stream`` the audio itself as it is made.

Streaming sessions: ``POST /v1/streaming-session`` keeps the reference
(at most ``[limits] max_stream_sessions``, each expiring after
``limits.session_timeout_s`` unused); ``POST /v1/stream-text`` (JSON
``session_id``, ``text_chunk``, ``is_final``) and ``WebSocket
/v1/ws/stream-text/{session_id}`` (JSON ``{text_chunk, is_final}`` in) answer
each chunk with one WAV of the sentences it completed (a header only when none
did), so a client that reads one answer per chunk stays in step; ``is_final``
speaks the rest and ends the session.

``temperature``, ``topk`` and ``speaker_id`` are checked and accepted for
compatibility; edgevoice's engines choose their own sampling. Errors come in
FastAPI's shape (``{"detail": ...}``, 422 for a missing field) like CSM's.
Event-loop only; decoding, synthesis and encoding run in worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from aiohttp import WSMsgType, hdrs, web

from edgevoice.audio import StreamEncoder, encode
from edgevoice.config import LimitsConfig
from edgevoice.engines.base import SynthesizeOptions, VoiceReference
from edgevoice.errors import BusyError, ClientError, LimitExceededError, UnknownModelError
from edgevoice.hub import LoadedModel
from edgevoice.pipeline.speak import speak
from edgevoice.protocols.http.compat import (
    Fields,
    MissingFields,
    add_error_shape,
    cloning_model,
    fastapi_error,
    read_fields,
    require,
    uploaded_reference,
)
from edgevoice.protocols.http.errors import ApiError, client_error
from edgevoice.protocols.http.forms import (
    ClientGone,
    parse_bool,
    parse_choice,
    parse_float,
    parse_int,
    read_json,
)
from edgevoice.protocols.http.speech import check_text, log_stream_failure
from edgevoice.protocols.http.state import ServerState, state
from edgevoice.text import SentenceBuffer

_LOGGER = logging.getLogger(__name__)

FORMATS: Final = ("wav", "mp3")
CONTENT_TYPES: Final = {"wav": "audio/wav", "mp3": "audio/mpeg"}
FILENAME_PATTERN: Final = re.compile(r"^[0-9a-f]{32}\.(wav|mp3)$")
WS_PATH: Final = "/v1/ws/stream-text/{session_id}"
AUDIO_PATH: Final = r"/v1/audio/{filename:[^/]+\.(?:wav|mp3)}"
"""Only names with an audio suffix: /v1/audio/speech etc. keep their own 405."""
DEFAULT_MAX_AUDIO_MS: Final = 15000.0


# ------------------------------------------------------------------ stores


@dataclass(frozen=True, slots=True)
class StoredAudio:
    data: bytes
    content_type: str
    expires_at: float


class AudioStore:
    """Generated files by name: bounded in count and bytes, each expiring. Loop only."""

    def __init__(self, max_files: int, max_bytes: int, ttl_s: float) -> None:
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._files: OrderedDict[str, StoredAudio] = OrderedDict()
        self._bytes = 0

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [n for n, f in self._files.items() if f.expires_at <= now]:
            self._drop(name)

    def _drop(self, name: str) -> None:
        self._bytes -= len(self._files.pop(name).data)

    def put(self, data: bytes, fmt: str) -> str:
        """Keep ``data``; returns its generated file name (oldest files make room)."""
        if len(data) > self.max_bytes:
            raise LimitExceededError(
                "max_stored_audio_bytes",
                self.max_bytes,
                what=f"a generated file of {len(data)} bytes",
                unit="bytes",
            )
        self._expire()
        while self._files and (
            len(self._files) >= self.max_files or self._bytes + len(data) > self.max_bytes
        ):
            self._drop(next(iter(self._files)))
        name = f"{uuid.uuid4().hex}.{fmt}"
        self._files[name] = StoredAudio(data, CONTENT_TYPES[fmt], time.monotonic() + self.ttl_s)
        self._bytes += len(data)
        return name

    def get(self, name: str) -> StoredAudio | None:
        self._expire()
        if not FILENAME_PATTERN.fullmatch(name):
            return None
        return self._files.get(name)

    def __len__(self) -> int:
        self._expire()
        return len(self._files)


class SessionNotFoundError(UnknownModelError):
    """No open session has this id (never opened, finished or expired): 404."""

    def __init__(self, sid: str) -> None:
        super().__init__("session", sid, param="session_id")
        self.args = (f"unknown or expired session {sid[:64]!r}",)


@dataclass
class Session:
    """A text-streaming session: its model, reference, format and pending text."""

    model: LoadedModel[Any]
    reference: VoiceReference
    fmt: str
    sentences: SentenceBuffer
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    """At most ``max_sessions``, each dropped after ``timeout_s`` unused. Loop only."""

    def __init__(self, max_sessions: int, timeout_s: float) -> None:
        self.max_sessions = max_sessions
        self.timeout_s = timeout_s
        self._sessions: dict[str, Session] = {}

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.timeout_s
        for sid in [
            s for s, v in self._sessions.items() if v.last_used <= cutoff and not v.lock.locked()
        ]:
            del self._sessions[sid]

    def open(self, session: Session) -> str:
        self._expire()
        if len(self._sessions) >= self.max_sessions:
            raise BusyError(
                f"{self.max_sessions} streaming sessions are open (limits.max_stream_sessions); "
                "finish one (is_final) or let it expire"
            )
        sid = str(uuid.uuid4())
        self._sessions[sid] = session
        return sid

    def get(self, sid: str) -> Session:
        self._expire()
        session = self._sessions.get(sid)
        if session is None:
            raise SessionNotFoundError(sid)
        session.last_used = time.monotonic()
        return session

    def close(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)


@dataclass
class CsmState:
    files: AudioStore
    sessions: Sessions


CSM: Final = web.AppKey("edgevoice_csm", CsmState)


def csm_state(request: web.Request) -> CsmState:
    return request.app[CSM]


# ------------------------------------------------------------------ fields


@dataclass(frozen=True, slots=True)
class _Voice:
    model: LoadedModel[Any]
    reference: VoiceReference
    fmt: str


async def _voice(st: ServerState, f: Fields) -> _Voice:
    """The common fields of voice-clone and streaming-session, checked."""
    parse_int(f.values.get("speaker_id"), "speaker_id", 0, 1 << 31)
    parse_float(f.values.get("temperature"), "temperature", 0.0, 2.0)
    parse_int(f.values.get("topk"), "topk", 1, 100000)
    fmt = parse_choice(f.values.get("output_format"), "output_format", FORMATS, "wav")
    model = cloning_model(st, "audio_file")
    reference = await uploaded_reference(f.files["audio_file"].data, f.text("context_text"))
    return _Voice(model, reference, fmt)


def _wav_or_mp3(samples: np.ndarray[Any, Any], rate_hz: int, fmt: str) -> bytes:
    return encode(samples.astype(np.float32), rate_hz, fmt)


# ------------------------------------------------------------------ routes


async def voice_clone(request: web.Request) -> web.StreamResponse:
    st = state(request)
    try:
        f = await read_fields(request, st)
        require(f, ("text", "audio_file"), frozenset({"audio_file"}))
        text = check_text(f.values["text"], st.settings.limits.max_input_chars, "text")
        max_ms = parse_float(
            f.values.get("max_audio_length_ms"), "max_audio_length_ms", 1.0,
            st.settings.limits.max_audio_s * 1000,
        )  # fmt: skip
        stream = parse_bool(f.values.get("stream"), "stream")
        voice = await _voice(st, f)
        options = SynthesizeOptions(voice=voice.model.name, reference=voice.reference)
        spoken = speak(st.hub, text, options, st.settings.limits)
        max_samples = round((max_ms or DEFAULT_MAX_AUDIO_MS) / 1000 * spoken.rate_hz)
        if stream:
            return await _stream(request, spoken, voice.fmt, max_samples)
        chunks: list[np.ndarray[Any, Any]] = []
        total = 0
        async with spoken:
            async for chunk in spoken:
                take = chunk.samples[: max_samples - total]
                chunks.append(take)
                total += len(take)
                if total >= max_samples:
                    break
        if not total:
            raise client_error("text produced no speech (nothing to say)", "text")
        samples = np.concatenate(chunks)
        data = await asyncio.to_thread(_wav_or_mp3, samples, spoken.rate_hz, voice.fmt)
        name = csm_state(request).files.put(data, voice.fmt)
        st.metrics.add_audio("out", spoken.model.name, total / spoken.rate_hz)
        return web.json_response(
            {"audio_url": f"/v1/audio/{name}", "duration_seconds": round(total / spoken.rate_hz, 3)}
        )
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return fastapi_error(exc)


async def _stream(
    request: web.Request, spoken: Any, fmt: str, max_samples: int
) -> web.StreamResponse:
    async with spoken:
        first = await anext(spoken, None)
        if first is None:
            raise client_error("text produced no speech (nothing to say)", "text")
        encoder = await asyncio.to_thread(StreamEncoder, fmt, spoken.rate_hz)
        response = web.StreamResponse(
            headers={"Content-Type": encoder.content_type, "X-Sample-Rate": str(spoken.rate_hz)}
        )
        response.enable_chunked_encoding()
        total = 0
        try:
            await response.prepare(request)  # a client gone already: quietly, as below
            chunk = first
            while chunk is not None and total < max_samples:
                take = chunk.samples[: max_samples - total]
                total += len(take)
                if data := await asyncio.to_thread(encoder.write, take):
                    await response.write(data)
                chunk = await anext(spoken, None)
            if tail := await asyncio.to_thread(encoder.close):
                await response.write(tail)
            await response.write_eof()
        except ConnectionError:
            _LOGGER.debug("CSM client went away mid-stream")
        except Exception as exc:
            log_stream_failure(exc, "CSM synthesis failed mid-stream")
            if request.transport is not None:
                request.transport.close()
        return response


async def get_audio(request: web.Request) -> web.StreamResponse:
    name = request.match_info["filename"]
    stored = csm_state(request).files.get(name)
    if stored is None:
        return fastapi_error(ApiError(404, "Audio file not found"))
    return web.Response(
        body=stored.data,
        content_type=stored.content_type,
        headers={hdrs.CONTENT_DISPOSITION: f'attachment; filename="{name}"'},
    )


async def streaming_session(request: web.Request) -> web.StreamResponse:
    st = state(request)
    try:
        f = await read_fields(request, st)
        require(f, ("audio_file",), frozenset({"audio_file"}))
        voice = await _voice(st, f)
        limits = st.settings.limits
        session = Session(
            voice.model,
            voice.reference,
            voice.fmt,
            SentenceBuffer(
                max_sentence_chars=limits.max_sentence_chars,
                max_pending_chars=limits.max_input_chars,
            ),
        )
        sid = csm_state(request).sessions.open(session)
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return fastapi_error(exc)
    return web.json_response(
        {"session_id": sid, "message": "Streaming session created successfully"}
    )


def _chunk_fields(body: Any) -> tuple[str, bool]:
    if not isinstance(body, dict):
        raise client_error("expected a JSON object {text_chunk, is_final}")
    chunk = body.get("text_chunk", "")
    if not isinstance(chunk, str):
        raise client_error("text_chunk must be a string", "text_chunk")
    final = body.get("is_final")
    if final is not None and not isinstance(final, bool):
        raise client_error("is_final must be true or false", "is_final")
    return chunk, bool(final)


async def _speak_chunk(st: ServerState, session: Session, chunk: str, final: bool) -> bytes:
    """The WAV of the sentences ``chunk`` completes (all that is left when ``final``)."""
    async with session.lock:
        sentences = session.sentences.feed(chunk)
        if final:
            sentences += session.sentences.flush()
        rate = session.model.engine.capabilities.sample_rate_hz
        pieces: list[np.ndarray[Any, Any]] = []
        if sentences:
            options = SynthesizeOptions(voice=session.model.name, reference=session.reference)
            async with speak(st.hub, " ".join(sentences), options, st.settings.limits) as spoken:
                rate = spoken.rate_hz
                async for audio in spoken:
                    pieces.append(audio.samples)
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        session.last_used = time.monotonic()
        return await asyncio.to_thread(_wav_or_mp3, samples, rate, "wav")


async def stream_text(request: web.Request) -> web.StreamResponse:
    st = state(request)
    sessions = csm_state(request).sessions
    try:
        body = await read_json(request, st.settings.limits)
        sid = body.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise MissingFields(["session_id"])
        chunk, final = _chunk_fields(body)
        session = sessions.get(sid)
        data = await _speak_chunk(st, session, chunk, final)
        if final:
            sessions.close(sid)
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return fastapi_error(exc)
    return web.Response(body=data, content_type="audio/wav")


async def stream_text_ws(request: web.Request) -> web.StreamResponse:
    st = state(request)
    limits: LimitsConfig = st.settings.limits
    sessions = csm_state(request).sessions
    sid = request.match_info["session_id"]
    if "websocket" not in request.headers.get(hdrs.UPGRADE, "").lower():
        raise ApiError(
            426,
            "this is a WebSocket: connect with a WebSocket client",
            code="upgrade_required",
            headers={hdrs.UPGRADE: "websocket", hdrs.CONNECTION: "Upgrade"},
        )
    try:
        sessions.get(sid)
    except UnknownModelError as exc:
        return fastapi_error(exc)
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=limits.max_ws_message_bytes)
    await ws.prepare(request)
    st.websockets.add(ws)
    try:
        while True:
            message = await ws.receive(timeout=limits.session_timeout_s)
            await asyncio.sleep(0)  # a flood of buffered messages must not hold the loop
            if message.type in (
                WSMsgType.CLOSE,
                WSMsgType.CLOSING,
                WSMsgType.CLOSED,
                WSMsgType.ERROR,
            ):
                break
            if message.type is not WSMsgType.TEXT:
                continue
            try:
                try:
                    body = json.loads(message.data)
                except ValueError:
                    raise client_error("messages must be JSON {text_chunk, is_final}") from None
                chunk, final = _chunk_fields(body)
                data = await _speak_chunk(st, sessions.get(sid), chunk, final)
            except (ClientError, LimitExceededError) as exc:
                await ws.send_str(json.dumps({"detail": str(exc)}))
                if isinstance(exc, UnknownModelError | LimitExceededError):
                    break
                continue
            await ws.send_bytes(data)
            if final:
                sessions.close(sid)
                break
    except TimeoutError:
        _LOGGER.debug("CSM WebSocket idle for %.0f s; closing", limits.session_timeout_s)
    except ConnectionError:
        _LOGGER.debug("CSM WebSocket client went away")
    finally:
        st.websockets.discard(ws)
        await ws.close()
    return ws


def add_csm_routes(app: web.Application, limits: LimitsConfig) -> None:
    """The CSM API's routes and its file and session stores."""
    app[CSM] = CsmState(
        AudioStore(
            limits.max_stored_audio_files, limits.max_stored_audio_bytes, limits.stored_audio_ttl_s
        ),
        Sessions(limits.max_stream_sessions, limits.session_timeout_s),
    )
    app.router.add_post("/v1/voice-clone", voice_clone)
    app.router.add_get(AUDIO_PATH, get_audio)
    app.router.add_post("/v1/streaming-session", streaming_session)
    app.router.add_post("/v1/stream-text", stream_text)
    app.router.add_get(WS_PATH, stream_text_ws)
    paths = ("/v1/voice-clone", "/v1/audio/{filename}", "/v1/streaming-session", "/v1/stream-text")
    add_error_shape(app, (*paths, WS_PATH), fastapi_error)
