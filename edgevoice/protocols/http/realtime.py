"""``GET /v1/realtime``: OpenAI's Realtime API, transcription sessions.

A WebSocket speaking the event shapes of OpenAI's GA Realtime API for
transcription (``session.type = "transcription"``); the beta form
(``?intent=transcription``, ``transcription_session.update``) is accepted too.

Client events:

- ``session.update`` (or beta ``transcription_session.update``):
  ``audio.input.format`` (``{"type": "audio/pcm", "rate": 24000}``; beta
  ``input_audio_format: "pcm16"``), ``audio.input.transcription``
  (``{model, language, prompt}``) and ``audio.input.turn_detection``
  (``{"type": "server_vad", threshold, prefix_padding_ms,
  silence_duration_ms}`` or ``null``). Required before the first audio. An
  update while audio is buffered drops the uncommitted audio (items already
  committed are still transcribed).
- ``input_audio_buffer.append`` ``{audio}``: base64 s16le mono PCM at the
  session's rate (24 kHz; 8 to 48 kHz accepted as an edgevoice extension).
- ``input_audio_buffer.commit``: end the current item now (with
  ``turn_detection: null`` the only way to end one).
- ``input_audio_buffer.clear``: drop the uncommitted audio.

Server events: ``session.created`` / ``session.updated``,
``input_audio_buffer.speech_started`` / ``speech_stopped`` / ``committed`` /
``cleared``, ``conversation.item.input_audio_transcription.delta`` /
``completed`` / ``failed``, and ``error``.

It runs on the voice core's endpointing pipeline
(:mod:`edgevoice.pipeline.endpointing`): with ``server_vad`` the VAD finds
each utterance (``silence_duration_ms`` of silence ends it and commits it);
partial decodes while the user speaks become ``delta`` events. A delta only
ever extends the text sent before for that item (a partial that revises
earlier words sends nothing); the ``completed`` event carries the final
transcript, which clients should prefer.

Bounds: a message over ``limits.max_ws_message_bytes`` gets an ``error``
event and the socket stays usable (messages over twice that close it with
1009, so the server never holds more); an item is at most
``limits.max_audio_s`` of audio (a longer utterance is committed at that
point with ``server_vad``; without turn detection further audio is refused
with an ``error`` until a commit or clear); ``limits.max_pending_per_client``
committed items may wait for their transcript; at most
``limits.max_connections`` WebSockets are open; a socket silent for
``limits.session_timeout_s`` is closed. Every other bad input (non-JSON,
unknown event types, audio before ``session.update``, bad base64, bad
session fields) is an ``error`` event and the socket stays usable.

Browsers cannot set an ``Authorization`` header on a WebSocket: with an API
key configured they pass it as the subprotocol
``openai-insecure-api-key.<key>`` (OpenAI's way) next to ``realtime``, or as
``?api_key=``. The HTTP middleware attributes the connection to its client
(``client_scope("http", remote)``), so every decode takes a fair turn.

Threading: event loop only; decodes and VAD run in the hub's worker pools.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from edgevoice.audio import PcmConverter
from edgevoice.engines.base import EngineKind, FloatAudio, TranscribeOptions
from edgevoice.errors import (
    BusyError,
    ClientError,
    EdgeVoiceError,
    LimitExceededError,
    UnsupportedRequestError,
)
from edgevoice.hub import LoadedModel
from edgevoice.pipeline.endpointing import (
    DecodeFailed,
    EndpointConfig,
    EndpointingPipeline,
    FinalTranscript,
    PartialTranscript,
    PipelineEvent,
    SpeechStarted,
    SpeechStopped,
)
from edgevoice.protocols.http.errors import ApiError, client_error, to_api_error
from edgevoice.protocols.http.models import resolve_asr
from edgevoice.protocols.http.state import ServerState, state

_LOGGER = logging.getLogger(__name__)

REALTIME_PATH: Final = "/v1/realtime"
INPUT_RATE_HZ: Final = 24000
"""OpenAI's ``audio/pcm`` rate."""
INPUT_RATES_HZ: Final = (8000, 48000)
"""Rates accepted as an extension (the audio is resampled to the model's rate)."""
PARTIAL_INTERVAL_S: Final = 1.0
"""A partial decode per this much new speech at most (the pipeline's budget
keeps one in flight per session)."""
MIN_COMMIT_S: Final = 0.1
"""OpenAI refuses to commit less than 100 ms of audio."""
SUBPROTOCOL: Final = "realtime"
KEY_SUBPROTOCOL: Final = "openai-insecure-api-key."
HARD_CAP_FACTOR: Final = 2
"""Messages up to this many times ``max_ws_message_bytes`` are read (and
refused with an error event); longer ones close the socket."""

_TRAILING_PUNCTUATION: Final = " .,;:!?…"


def websocket_token(request: web.Request) -> str:
    """The API key a browser sent on a WebSocket handshake (subprotocol or ``?api_key``)."""
    for offered in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(","):
        proto = offered.strip()
        if proto.startswith(KEY_SUBPROTOCOL):
            return proto[len(KEY_SUBPROTOCOL) :]
    return request.query.get("api_key", "")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# ------------------------------------------------------------------ session


@dataclass(frozen=True, slots=True)
class TurnDetection:
    """``server_vad`` settings (OpenAI's defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
        }


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """A transcription session's settings, as ``session.update`` leaves them."""

    model: str
    language: str | None = None
    prompt: str = ""
    turn_detection: TurnDetection | None = None
    rate_hz: int = INPUT_RATE_HZ
    id: str = field(default_factory=lambda: _new_id("sess"))

    def to_json(self) -> dict[str, Any]:
        """The GA session object (``session.created`` / ``session.updated``)."""
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": self.id,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": self.rate_hz},
                    "transcription": {
                        "model": self.model,
                        "language": self.language,
                        "prompt": self.prompt,
                    },
                    "turn_detection": (
                        self.turn_detection.to_json() if self.turn_detection else None
                    ),
                    "noise_reduction": None,
                }
            },
            "include": None,
        }


def _object(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise client_error(f"{param} must be an object", param)
    return value


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise client_error(f"{param} must be a number from {low:g} to {high:g}", param)
    return float(value)


def _parse_format(value: Any, param: str, current: int) -> int:
    """The input rate from a GA format object or the beta ``"pcm16"`` string."""
    if value is None:
        return current
    if value == "pcm16":
        return INPUT_RATE_HZ
    fmt = _object(value, param)
    kind = fmt.get("type", "audio/pcm")
    if kind != "audio/pcm":
        error = UnsupportedRequestError(
            f"{param}.type {kind!r} is not supported; send audio/pcm (s16le mono, 24 kHz)",
            param=f"{param}.type",
        )
        raise error
    rate = fmt.get("rate", INPUT_RATE_HZ)
    low, high = INPUT_RATES_HZ
    if isinstance(rate, bool) or not isinstance(rate, int) or not low <= rate <= high:
        raise client_error(f"{param}.rate must be 24000 (or {low}–{high})", f"{param}.rate")
    return rate


def _parse_turn_detection(
    value: Any, param: str, current: TurnDetection | None, can_vad: bool
) -> TurnDetection | None:
    if value is None:
        return None
    td = _object(value, param)
    kind = td.get("type", "server_vad")
    if kind != "server_vad":
        raise UnsupportedRequestError(
            f"{param}.type {kind!r} is not supported; use server_vad or null",
            param=f"{param}.type",
        )
    if not can_vad:
        raise UnsupportedRequestError(
            "server_vad needs a VAD model ([[vad]] in the config); "
            "set turn_detection to null and commit the audio yourself",
            param=param,
        )
    base = current or TurnDetection()
    threshold = td.get("threshold")
    padding = td.get("prefix_padding_ms")
    silence = td.get("silence_duration_ms")
    return TurnDetection(
        threshold=base.threshold
        if threshold is None
        else _number(threshold, f"{param}.threshold", 0.0, 1.0),
        prefix_padding_ms=base.prefix_padding_ms
        if padding is None
        else round(_number(padding, f"{param}.prefix_padding_ms", 0, 5000)),
        silence_duration_ms=base.silence_duration_ms
        if silence is None
        else round(_number(silence, f"{param}.silence_duration_ms", 100, 10000)),
    )


def _parse_transcription(
    value: Any, param: str, current: SessionConfig, st: ServerState
) -> tuple[str, str | None, str]:
    if value is None:
        return current.model, current.language, current.prompt
    tr = _object(value, param)
    model_name = tr.get("model", current.model)
    if model_name is not None and not isinstance(model_name, str):
        raise client_error(f"{param}.model must be a string", f"{param}.model")
    model = resolve_asr(st.hub, model_name or None)
    language = tr.get("language", current.language)
    if language is not None:
        if not isinstance(language, str):
            raise client_error(f"{param}.language must be a string", f"{param}.language")
        language = language.strip().lower() or None
    languages = model.engine.capabilities.languages
    if language is not None and languages and language not in languages:
        raise client_error(
            f"model {model.name!r} does not know language {language!r}",
            f"{param}.language",
            "unsupported_language",
        )
    prompt = tr.get("prompt", current.prompt)
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise client_error(f"{param}.prompt must be a string", f"{param}.prompt")
    limit = st.settings.limits.max_input_chars
    if len(prompt) > limit:
        raise LimitExceededError(
            "max_input_chars", limit, what=f"prompt of {len(prompt)} characters",
            unit="characters", param=f"{param}.prompt",
        )  # fmt: skip
    return model.name, language, prompt


def parse_session_update(
    event: dict[str, Any], current: SessionConfig, st: ServerState
) -> SessionConfig:
    """The session after a GA ``session.update`` or beta ``transcription_session.update``.

    Raises a :class:`~edgevoice.errors.ClientError` naming the field at fault.
    """
    session = _object(event.get("session"), "session")
    can_vad = bool(st.hub.models(EngineKind.VAD))
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise UnsupportedRequestError(
            f"session.type {kind!r} is not supported: edgevoice serves transcription "
            "sessions only (session.type = 'transcription')",
            param="session.type",
        )
    if "audio" in session or event.get("type") == "session.update":
        audio = _object(session.get("audio"), "session.audio")
        given = _object(audio.get("input"), "session.audio.input")
        prefix = "session.audio.input"
    else:  # beta shape: the fields sit on the session itself
        given = {
            "format": session.get("input_audio_format"),
            "transcription": session.get("input_audio_transcription"),
        }
        if "turn_detection" in session:
            given["turn_detection"] = session["turn_detection"]
        prefix = "session"
    rate = _parse_format(given.get("format"), f"{prefix}.format", current.rate_hz)
    model, language, prompt = _parse_transcription(
        given.get("transcription"), f"{prefix}.transcription", current, st
    )
    turn = current.turn_detection
    if "turn_detection" in given:
        turn = _parse_turn_detection(
            given["turn_detection"], f"{prefix}.turn_detection", current.turn_detection, can_vad
        )
    return replace(
        current,
        model=model,
        language=language,
        prompt=prompt,
        turn_detection=turn,
        rate_hz=rate,
    )


def default_session(st: ServerState) -> SessionConfig:
    """What ``session.created`` announces: the default ASR model, server VAD if loaded."""
    model: LoadedModel[Any] = st.hub.asr()
    turn = TurnDetection() if st.hub.models(EngineKind.VAD) else None
    return SessionConfig(model=model.name, turn_detection=turn)


# ------------------------------------------------------------- items


@dataclass(eq=False)
class _Item:
    """One utterance: its id and the text sent in ``delta`` events so far."""

    id: str
    sent: str = ""


@dataclass(eq=False)
class _Track:
    """One pipeline and the items it owes transcripts for.

    A new track starts after each commit without VAD, clear or session
    update; an old track finishes its committed items, then closes.
    """

    pipeline: EndpointingPipeline
    offset_ms: int
    """Session audio before this pipeline started (its timestamps start at 0)."""
    speaking: _Item | None = None
    """The item whose speech is going on (server VAD)."""
    awaiting: deque[_Item] = field(default_factory=deque)
    """Committed items waiting for their transcript, oldest first (the
    pipeline reports transcripts in the order its utterances ended)."""
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    """Notified whenever an item leaves :attr:`awaiting`."""


class RealtimeSession:
    """One ``/v1/realtime`` connection. Event loop only."""

    def __init__(self, ws: web.WebSocketResponse, st: ServerState) -> None:
        self.ws = ws
        self.st = st
        self.limits = st.settings.limits
        self.config = default_session(st)
        self.configured = False
        self._track: _Track | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._converter: PcmConverter | None = None
        self._odd_byte = b""
        self._fed = 0
        """Samples (at the model's rate) fed to pipelines so far: the session timeline."""
        self._fed_rate_hz = 16000
        self._previous_item: str | None = None
        self._pending_items = 0
        """Committed items of every track still waiting for a transcript."""
        self._room = asyncio.Condition()
        """Notified when :attr:`_pending_items` drops."""
        self._send_lock = asyncio.Lock()

    # ---------------------------------------------------------- sending

    async def send(self, event: dict[str, Any]) -> None:
        event = {"event_id": _new_id("event"), **event}
        async with self._send_lock:
            await self.ws.send_json(event, dumps=_dumps)

    async def send_error(self, exc: BaseException, event_id: str | None = None) -> None:
        error = to_api_error(exc).body()["error"]
        error["event_id"] = event_id
        with contextlib.suppress(ConnectionError):
            await self.send({"type": "error", "error": error})

    # --------------------------------------------------------- the loop

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.config.to_json()})
        limit = self.limits.max_ws_message_bytes
        while True:
            message = await self.ws.receive(timeout=self.limits.session_timeout_s)
            # Buffered messages are returned without yielding: a flood of them
            # must not hold the loop.
            await asyncio.sleep(0)
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if message.type is WSMsgType.ERROR:
                # aiohttp closed the socket already (a message over the hard cap: 1009).
                _LOGGER.debug("Realtime WebSocket: %s", message.data)
                return
            if message.type is WSMsgType.BINARY:
                await self.send_error(
                    client_error(
                        "binary messages are not part of the Realtime protocol; send JSON "
                        "events (audio goes base64 in input_audio_buffer.append)",
                        code="invalid_event",
                    )
                )
                continue
            if message.type is not WSMsgType.TEXT:
                continue
            data: str = message.data
            size = len(data) if data.isascii() else len(data.encode())
            if size > limit:
                error = LimitExceededError(
                    "max_ws_message_bytes", limit, what=f"message of {size} bytes", unit="bytes"
                )
                await self.send_error(error)
                continue
            await self._handle_text(data)

    async def _handle_text(self, data: str) -> None:
        event_id: str | None = None
        try:
            try:
                event = json.loads(data)
            except (ValueError, RecursionError) as exc:
                raise client_error(
                    f"message is not valid JSON: {exc}", code="invalid_json"
                ) from None
            if not isinstance(event, dict):
                raise client_error("an event must be a JSON object", code="invalid_event")
            raw_id = event.get("event_id")
            event_id = raw_id if isinstance(raw_id, str) else None
            kind = event.get("type")
            if kind in ("session.update", "transcription_session.update"):
                await self._update_session(event, str(kind))
            elif kind == "input_audio_buffer.append":
                await self._append(event)
            elif kind == "input_audio_buffer.commit":
                await self._commit()
            elif kind == "input_audio_buffer.clear":
                await self._clear()
            elif isinstance(kind, str):
                raise client_error(
                    f"unknown or unsupported event type {kind[:64]!r}; a transcription session "
                    "takes session.update and input_audio_buffer.append/commit/clear",
                    "type",
                    "unknown_event",
                )
            else:
                raise client_error("an event needs a string 'type'", "type", "invalid_event")
        except EdgeVoiceError as exc:
            _LOGGER.debug("Realtime: %s", exc)
            await self.send_error(exc, event_id)

    # ---------------------------------------------------------- session

    async def _update_session(self, event: dict[str, Any], kind: str) -> None:
        config = parse_session_update(event, self.config, self.st)
        changed = config != self.config
        self.config = config
        self.configured = True
        if changed:
            # New settings take effect with a fresh pipeline; uncommitted audio goes.
            self._retire_track()
            self._converter = None
            self._odd_byte = b""
        reply = "transcription_session.updated" if kind.startswith("transcription") else ""
        await self.send({"type": reply or "session.updated", "session": self.config.to_json()})

    def _endpoint_config(self) -> EndpointConfig:
        td = self.config.turn_detection
        if td is None:
            return EndpointConfig()
        silence_s = td.silence_duration_ms / 1000
        pre_roll_s = td.prefix_padding_ms / 1000
        return EndpointConfig(
            speech_threshold=td.threshold,
            trailing_silence_s=silence_s,
            finish_silence_s=silence_s,
            # Commit a long utterance before the item's buffer crosses max_audio_s.
            max_utterance_s=max(1.0, self.limits.max_audio_s - pre_roll_s - 1.0),
            pre_roll_s=pre_roll_s,
            partial_interval_s=PARTIAL_INTERVAL_S,
        )

    async def _open_track(self) -> _Track:
        hub = self.st.hub
        options = TranscribeOptions(
            language=self.config.language, prompt=self.config.prompt or None
        )
        asr = hub.asr_session(
            resolve_asr(hub, self.config.model), options, max_audio_s=self.limits.max_audio_s
        )
        vad = hub.vad_session() if self.config.turn_detection is not None else None
        holder: list[_Track] = []

        async def on_event(event: PipelineEvent) -> None:
            await self._on_pipeline_event(holder[0], event)

        pipeline = EndpointingPipeline(asr, vad, on_event, self._endpoint_config())
        self._fed_rate_hz = pipeline.rate_hz
        track = _Track(pipeline, offset_ms=self._fed * 1000 // self._fed_rate_hz)
        holder.append(track)
        await pipeline.__aenter__()
        return track

    def _retire_track(self) -> None:
        """Stop feeding the current pipeline; it closes once its committed items are done."""
        track, self._track = self._track, None
        if track is None:
            return
        track.speaking = None
        task = asyncio.create_task(self._close_when_done(track), name="realtime-retire")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_done(self, track: _Track) -> None:
        """Let ``track`` finish its committed items (within ``session_timeout_s``), close it."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.limits.session_timeout_s), track.changed:
                    await track.changed.wait_for(lambda: not track.awaiting)
        finally:
            await self._abandon(track)

    async def _abandon(self, track: _Track) -> None:
        """Close ``track`` now; items still waiting for a transcript are dropped."""
        await track.pipeline.aclose()
        while track.awaiting:
            item = await self._item_done(track)
            _LOGGER.debug("Realtime: item %s dropped unfinished", getattr(item, "id", ""))

    async def close(self) -> None:
        """Cancel everything in flight (the socket is gone)."""
        track, self._track = self._track, None
        tasks = list(self._retiring)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if track is not None:
            await track.pipeline.aclose()

    # ------------------------------------------------------------ audio

    def _decode_audio(self, event: dict[str, Any]) -> bytes:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise client_error("audio must be a base64 string of pcm16 samples", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise client_error("audio is not valid base64", "audio", "invalid_base64") from None
        data = self._odd_byte + data
        if len(data) % 2:
            data, self._odd_byte = data[:-1], data[-1:]
        else:
            self._odd_byte = b""
        return data

    async def _append(self, event: dict[str, Any]) -> None:
        if not self.configured:
            raise client_error(
                "send session.update (session.type 'transcription') before audio",
                "type",
                "session_not_configured",
            )
        data = self._decode_audio(event)
        if not data:
            return
        if self._track is None:
            self._track = await self._open_track()
        track = self._track
        pipeline = track.pipeline
        if self._converter is None:
            self._converter = PcmConverter(pipeline.rate_hz)
        converter = self._converter
        rate = self.config.rate_hz
        seconds = len(data) / 2 / rate
        if self.config.turn_detection is None:
            pipeline.check_room(seconds)  # refused whole, before converting
        if seconds > 1.0:
            samples = await asyncio.to_thread(converter.convert, data, rate, 2, 1)
        else:
            samples = converter.convert(data, rate, 2, 1)
        await self._feed(track, samples)

    async def _feed(self, track: _Track, samples: FloatAudio) -> None:
        pipeline = track.pipeline
        if self.config.turn_detection is None:
            await pipeline.feed(samples)
            self._fed += len(samples)
            return
        # VAD-sized pieces: an utterance that ends inside a piece keeps the
        # rest of the piece for the next one.
        piece = max(1, round(pipeline.config.vad_piece_s * pipeline.rate_hz))
        for start in range(0, len(samples), piece):
            await self._wait_for_room()
            if self._track is not track:
                return  # the session changed under us
            chunk = np.ascontiguousarray(samples[start : start + piece])
            await pipeline.feed(chunk)
            self._fed += len(chunk)

    async def _commit(self) -> None:
        track = self._track
        buffered_s = track.pipeline.asr.duration_s if track is not None else 0.0
        if track is None or buffered_s < MIN_COMMIT_S:
            raise client_error(
                f"buffer too small: {buffered_s * 1000:.0f} ms of audio; commit needs at "
                f"least {MIN_COMMIT_S * 1000:.0f} ms",
                code="input_audio_buffer_commit_empty",
            )
        self._check_pending()
        if self._converter is not None and len(tail := self._converter.flush()):
            with contextlib.suppress(LimitExceededError):  # a full item keeps what it has
                await track.pipeline.feed(tail)
        item = track.speaking or _Item(_new_id("item"))
        track.speaking = None
        self._track = None  # the next audio starts a new item on a new pipeline
        await self._committed(track, item)
        task = asyncio.create_task(self._finish(track, item), name="realtime-commit")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _finish(self, track: _Track, item: _Item) -> None:
        """Transcribe the committed ``item`` after the track's earlier ones, then close."""
        try:
            async with track.changed:
                await track.changed.wait_for(
                    lambda: not track.awaiting or track.awaiting[0] is item
                )
            if track.awaiting:
                try:
                    await track.pipeline.finish()  # the transcript arrives as a pipeline event
                except (EdgeVoiceError, RuntimeError) as exc:
                    await self._failed(track, exc)
        except asyncio.CancelledError:
            await self._abandon(track)  # the socket is gone: nobody waits for the rest
            raise
        await self._close_when_done(track)

    async def _clear(self) -> None:
        self._retire_track()
        self._converter = None
        self._odd_byte = b""
        await self.send({"type": "input_audio_buffer.cleared"})

    def _check_pending(self) -> None:
        limit = self.limits.max_pending_per_client
        if self._pending_items >= limit:
            raise BusyError(
                f"{limit} committed items are still being transcribed "
                "(limits.max_pending_per_client); wait for their transcripts"
            )

    async def _wait_for_room(self) -> None:
        """With server VAD, stop reading audio while ``max_pending_per_client``
        items wait for transcripts (the client's socket backs up, not our memory)."""
        limit = self.limits.max_pending_per_client
        if self._pending_items >= limit:
            async with self._room:
                await self._room.wait_for(lambda: self._pending_items < limit)

    # --------------------------------------------------------- pipeline

    async def _committed(self, track: _Track, item: _Item) -> None:
        track.awaiting.append(item)
        self._pending_items += 1
        previous, self._previous_item = self._previous_item, item.id
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "previous_item_id": previous,
                "item_id": item.id,
            }
        )

    async def _item_done(self, track: _Track) -> _Item | None:
        """The oldest committed item of ``track``, now answered (None if there is none)."""
        if not track.awaiting:
            return None
        item = track.awaiting.popleft()
        self._pending_items -= 1
        async with track.changed:
            track.changed.notify_all()
        async with self._room:
            self._room.notify_all()
        return item

    async def _on_pipeline_event(self, track: _Track, event: PipelineEvent) -> None:
        if isinstance(event, SpeechStarted):
            track.speaking = _Item(_new_id("item"))
            await self.send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": track.offset_ms + event.timestamp_ms,
                    "item_id": track.speaking.id,
                }
            )
        elif isinstance(event, SpeechStopped):
            item = track.speaking
            if item is None:
                return
            track.speaking = None
            await self.send(
                {
                    "type": "input_audio_buffer.speech_stopped",
                    "audio_end_ms": track.offset_ms + event.timestamp_ms,
                    "item_id": item.id,
                }
            )
            # With server VAD the pipeline ends the utterance at the same point.
            await self._committed(track, item)
        elif isinstance(event, PartialTranscript):
            if not event.speculative and track.speaking is not None:
                await self._delta(track.speaking, event.text.rstrip(_TRAILING_PUNCTUATION))
        elif isinstance(event, FinalTranscript):
            if (item := await self._item_done(track)) is not None:
                await self._completed(item, event.transcript.text.strip(), event)
        elif isinstance(event, DecodeFailed):
            await self._failed(track, event.error)

    async def _delta(self, item: _Item, text: str) -> None:
        text = text.strip()
        if len(text) <= len(item.sent) or not text.startswith(item.sent):
            return  # nothing new, or a revision of text already sent
        delta, item.sent = text[len(item.sent) :], text
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item.id,
                "content_index": 0,
                "delta": delta,
            }
        )

    async def _completed(self, item: _Item, text: str, event: FinalTranscript) -> None:
        await self._delta(item, text)  # the rest of the text, when it extends the deltas
        seconds = event.transcript.duration_s
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item.id,
                "content_index": 0,
                "transcript": text,
                "usage": {"type": "duration", "seconds": round(seconds, 3)},
            }
        )

    async def _failed(self, track: _Track, exc: Exception) -> None:
        item = await self._item_done(track)
        if item is None:
            return
        _LOGGER.debug("Realtime: transcription of %s failed: %r", item.id, exc)
        error = to_api_error(exc).body()["error"]
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": item.id,
                "content_index": 0,
                "error": error,
            }
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ------------------------------------------------------------------ route


async def realtime(request: web.Request) -> web.StreamResponse:
    """``GET /v1/realtime``: a transcription session over a WebSocket."""
    st = state(request)
    limits = st.settings.limits
    if "websocket" not in request.headers.get(hdrs.UPGRADE, "").lower():
        raise ApiError(
            426,
            f"{REALTIME_PATH} is a WebSocket: connect with a WebSocket client",
            code="upgrade_required",
            headers={hdrs.UPGRADE: "websocket", hdrs.CONNECTION: "Upgrade"},
        )
    intent = request.query.get("intent")
    if intent is not None and intent != "transcription":
        raise UnsupportedRequestError(
            f"intent {intent[:64]!r} is not supported: edgevoice serves transcription "
            "sessions only (intent=transcription)",
            param="intent",
        )
    if len(st.websockets) >= limits.max_connections:
        raise BusyError(f"{limits.max_connections} WebSockets are open (limits.max_connections)")
    ws = web.WebSocketResponse(
        heartbeat=30.0,
        max_msg_size=limits.max_ws_message_bytes * HARD_CAP_FACTOR,
        protocols=(SUBPROTOCOL,),
    )
    await ws.prepare(request)
    st.websockets.add(ws)
    session = RealtimeSession(ws, st)
    try:
        await session.run()
    except TimeoutError:
        _LOGGER.debug("Realtime WebSocket idle for %.0f s; closing", limits.session_timeout_s)
    except ConnectionError as exc:
        _LOGGER.debug("Realtime WebSocket: client went away (%s)", exc)
    except ClientError as exc:  # a session error with no socket left to report it on
        _LOGGER.debug("Realtime WebSocket: %s", exc)
    finally:
        st.websockets.discard(ws)
        await session.close()
        await ws.close(code=WSCloseCode.OK)
    return ws
