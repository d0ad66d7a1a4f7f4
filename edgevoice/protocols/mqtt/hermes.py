"""Hermes (Rhasspy 2.5 / Snips) compatibility for the MQTT bridge (``hermes = true``).

- ``hermes/tts/say`` ``{text, siteId?, id?, sessionId?}`` →
  ``hermes/audioServer/<siteId>/playBytes/<id>`` (WAV) → ``hermes/tts/sayFinished``.
- ``hermes/asr/startListening`` ``{siteId?, sessionId?}``, then WAV chunks on
  ``hermes/audioServer/<siteId>/audioFrame`` (or ``.../audioSessionFrame/<sessionId>``),
  then ``hermes/asr/stopListening`` → ``hermes/asr/textCaptured``.
- Failures → ``hermes/error/tts`` / ``hermes/error/asr`` and ``<base>/error``.

Fields are camelCase; a missing ``siteId`` means ``"default"``. The node
serves one site, ``mqtt.hermes_site_id``; requests for other sites are left to
other services. Listening ends on ``stopListening`` (there is no silence
detection here), or expires after ``limits.session_timeout_s`` without audio;
at most ``limits.max_pending_per_client`` sessions are open at once, each
holding at most ``limits.max_audio_s`` and ``limits.max_upload_bytes`` of audio.
``id`` and ``sessionId`` go into topics, so they must match the request id
pattern.

This module does not import the bridge: it talks to it through
:class:`HermesHost`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
import wave
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt
import numpy as np

from edgevoice.audio import Audio, AudioError, encode, pcm_to_float
from edgevoice.config import Settings
from edgevoice.engines.base import TranscribeOptions
from edgevoice.errors import (
    BusyError,
    ClientError,
    EdgeVoiceError,
    LimitExceededError,
    PayloadTooLargeError,
)
from edgevoice.hub import EngineHub
from edgevoice.pipeline.speak import input_limit_error
from edgevoice.protocols.mqtt.messages import (
    ID_RULE,
    MqttRequestError,
    RequestContext,
    Route,
    checked_id,
    error_fields,
    new_id,
    valid_id,
)
from edgevoice.protocols.mqtt.outbox import OutgoingMessage

_LOGGER = logging.getLogger(__name__)

DEFAULT_SITE = "default"
# JSON payloads up to this size are parsed on the event loop; larger ones in a thread.
_INLINE_JSON_BYTES = 64 * 1024


class HermesHost(Protocol):
    """What Hermes needs from the bridge."""

    settings: Settings
    hub: EngineHub

    async def publish(self, message: OutgoingMessage) -> None: ...

    async def publish_json(
        self, topic: str, data: dict[str, Any], *, retain: bool = False
    ) -> None: ...

    async def report_error(
        self,
        topic: str,
        exc: BaseException,
        request_id: str | None,
        ctx: RequestContext | None = None,
    ) -> None: ...

    def submit(
        self,
        client_key: str,
        topic: str,
        work: Callable[[], Awaitable[None]],
        size_bytes: int,
        ctx: RequestContext | None = None,
    ) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None: ...

    async def render_speech(
        self, text: str, voice: str | None, speed: float, fmt: str
    ) -> tuple[bytes, float]: ...


@dataclass(slots=True)
class _Listening:
    """One ASR session: WAV frames collected between start and stop."""

    session_id: str | None
    wakeword_id: str | None = None
    lang: str | None = None
    send_audio_captured: bool = False
    chunks: list[bytes] = field(default_factory=list)
    format: tuple[int, int, int] | None = None
    """(rate_hz, sample width in bytes, channels) of the frames."""
    frames: int = 0
    bytes: int = 0
    error: EdgeVoiceError | None = None
    last_audio: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` of the start or the last audio frame."""
    timer: asyncio.TimerHandle | None = None

    def fail(self, error: EdgeVoiceError) -> None:
        self.error = self.error or error
        self.chunks.clear()  # nothing more will be transcribed: free the audio now


def _wav_frame(data: bytes) -> tuple[tuple[int, int, int], bytes]:
    """Parse one WAV chunk (a memory copy; runs inline)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            fmt = (wav.getframerate(), wav.getsampwidth(), wav.getnchannels())
            return fmt, wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"audio frame is not a WAV chunk: {exc}") from None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


class HermesAdapter:
    """Hermes topics on top of the bridge (see the module docstring)."""

    def __init__(self, host: HermesHost, site_id: str) -> None:
        if valid_id(site_id) is None:
            # It goes into topic filters: a '+' or '#' would subscribe to other sites.
            raise ValueError(f"mqtt.hermes_site_id {site_id!r}: use {ID_RULE}")
        self.host = host
        self.site_id = site_id
        self.client_key = f"hermes:{site_id}"
        """All Hermes requests count as one client (the site) for bounds and fair turns."""
        self._sessions: dict[str | None, _Listening] = {}

    @property
    def sessions(self) -> int:
        """Listening sessions open now."""
        return len(self._sessions)

    def routes(self) -> list[Route]:
        site = self.site_id
        return [
            Route("hermes/tts/say", self._on_say),
            Route("hermes/asr/startListening", self._on_start),
            Route("hermes/asr/stopListening", self._on_stop),
            Route(f"hermes/audioServer/{site}/audioFrame", self._on_frame),
            Route(f"hermes/audioServer/{site}/audioSessionFrame/+", self._on_frame),
            Route(f"hermes/audioServer/{site}/playBytes/+", self._on_play_bytes),
        ]

    def close(self) -> None:
        """Forget open listening sessions (at stop)."""
        for session in self._sessions.values():
            if session.timer is not None:
                session.timer.cancel()
        self._sessions.clear()

    # ------------------------------------------------------------- helpers

    async def _parse(self, message: aiomqtt.Message, component: str) -> dict[str, Any] | None:
        """The JSON object of a Hermes message, or None (after reporting) when invalid."""
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        limits = self.host.settings.limits
        try:
            if len(payload) > limits.max_upload_bytes:
                raise PayloadTooLargeError(
                    "max_upload_bytes",
                    limits.max_upload_bytes,
                    what=f"payload of {len(payload)} bytes",
                    unit="bytes",
                )
            try:
                if len(payload) > _INLINE_JSON_BYTES:
                    data = await asyncio.to_thread(json.loads, payload)
                else:
                    data = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MqttRequestError(f"payload is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise MqttRequestError("JSON payload must be an object")
        except ClientError as exc:
            await self._report(topic, exc, component)
            return None
        return data

    def _mine(self, data: dict[str, Any]) -> bool:
        return str(data.get("siteId") or DEFAULT_SITE) == self.site_id

    async def _report(
        self,
        topic: str,
        exc: BaseException,
        component: str,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        await self.host.publish_json(
            f"hermes/error/{component}",
            {
                "error": error_fields(exc)["error"],
                "context": topic,
                "siteId": self.site_id,
                "sessionId": session_id,
            },
        )
        await self.host.report_error(topic, exc, request_id)

    async def publish_wake(self, wake_word: str) -> None:
        await self.host.publish_json(
            f"hermes/hotword/{wake_word}/detected",
            {"siteId": self.site_id, "modelId": wake_word, "currentSensitivity": 1.0},
        )

    # ----------------------------------------------------------------- TTS

    async def _on_say(self, message: aiomqtt.Message) -> None:
        data = await self._parse(message, "tts")
        if data is None or not self._mine(data):
            return
        topic = str(message.topic)
        session_id: str | None = None
        request_id: str | None = None
        limits = self.host.settings.limits
        try:
            session_id = checked_id(data.get("sessionId"), "sessionId")
            request_id = checked_id(data.get("id"), "id")
            text = data.get("text")
            if not isinstance(text, str) or not text.strip():
                raise MqttRequestError("text: missing or empty", param="text")
            if len(text) > limits.max_input_chars:
                raise input_limit_error(limits, param="text")
            say_id = request_id or new_id()

            async def work() -> None:
                await self._say(topic, text, say_id, session_id)

            self.host.submit(self.client_key, topic, work, len(text))
        except ClientError as exc:
            await self._report(topic, exc, "tts", session_id, request_id)

    async def _on_play_bytes(self, message: aiomqtt.Message) -> None:
        """``playBytes/<id>`` (WAV) → the local speaker ([audio_io]) → ``playFinished``.

        Only when this node has a local speaker; otherwise another audio server plays it.
        """
        from edgevoice.audio_io.peers import local_player, play_on_speaker

        if local_player(self.host.hub) is None:
            return
        topic = str(message.topic)
        request_id = valid_id(topic.rsplit("/", 1)[-1])
        payload = message.payload if isinstance(message.payload, bytes) else b""
        limits = self.host.settings.limits
        if request_id is None or len(payload) > limits.max_upload_bytes:
            problem = MqttRequestError(f"playBytes: bad id or over {limits.max_upload_bytes} bytes")
            await self._report(topic, problem, "audioServer")
            return

        async def work() -> None:
            result = await play_on_speaker(self.host.hub, payload, f"Hermes playBytes {request_id}")
            if not result["played"]:
                _LOGGER.info("Hermes playBytes %s not played: %s", request_id, result["play_error"])
            await self.host.publish_json(
                f"hermes/audioServer/{self.site_id}/playFinished",
                {"id": request_id, "siteId": self.site_id},
            )

        self.host.submit(self.client_key, topic, work, len(payload))

    async def _say(self, topic: str, text: str, request_id: str, session_id: str | None) -> None:
        try:
            wav, _ = await self.host.render_speech(text, None, 1.0, "wav")
        except Exception as exc:
            await self._report(topic, exc, "tts", session_id, request_id)
            return
        await self.host.publish(
            OutgoingMessage(
                f"hermes/audioServer/{self.site_id}/playBytes/{request_id}",
                wav,
                what=f"Hermes playBytes {request_id}",
            )
        )
        await self.host.publish_json(
            "hermes/tts/sayFinished",
            {"id": request_id, "sessionId": session_id, "siteId": self.site_id},
        )

    # ----------------------------------------------------------------- ASR

    async def _on_start(self, message: aiomqtt.Message) -> None:
        data = await self._parse(message, "asr")
        if data is None or not self._mine(data):
            return
        topic = str(message.topic)
        limits = self.host.settings.limits
        try:
            session_id = checked_id(data.get("sessionId"), "sessionId")
        except MqttRequestError as exc:
            await self._report(topic, exc, "asr")
            return
        previous = self._sessions.pop(session_id, None)
        if previous is not None and previous.timer is not None:
            previous.timer.cancel()
        if len(self._sessions) >= limits.max_pending_per_client:
            busy = BusyError(
                f"{len(self._sessions)} Hermes listening sessions are open "
                "(limits.max_pending_per_client); stop one or retry later"
            )
            await self._report(topic, busy, "asr", session_id)
            return
        session = _Listening(
            session_id=session_id,
            wakeword_id=_text_or_none(data.get("wakewordId")),
            lang=_text_or_none(data.get("lang")),
            send_audio_captured=data.get("sendAudioCaptured") is True,
        )
        self._sessions[session_id] = session
        self._arm_timer(session, limits.session_timeout_s)
        _LOGGER.debug("Hermes listening started (session %s)", session_id)

    def _arm_timer(self, session: _Listening, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(delay_s, self._check_idle, session)

    def _check_idle(self, session: _Listening) -> None:
        """Timer: expire a session without audio for ``session_timeout_s``, else re-arm."""
        if self._sessions.get(session.session_id) is not session:
            return
        timeout_s = self.host.settings.limits.session_timeout_s
        idle_s = time.monotonic() - session.last_audio
        if idle_s < timeout_s:
            self._arm_timer(session, timeout_s - idle_s)
            return
        del self._sessions[session.session_id]
        _LOGGER.info("Hermes listening session %s expired", session.session_id)
        expired = LimitExceededError(
            "session_timeout_s",
            timeout_s,
            what="time without audio in a listening session",
            unit="s",
        )
        self.host.spawn(
            self._report("hermes/asr/startListening", expired, "asr", session.session_id),
            name="hermes session expired",
        )

    async def _on_frame(self, message: aiomqtt.Message) -> None:
        if not self._sessions:
            return
        levels = str(message.topic).split("/")
        targets = (
            [s for s in self._sessions.values() if s.session_id == levels[4]]
            if levels[3] == "audioSessionFrame"
            else list(self._sessions.values())
        )
        if not targets:
            return
        now = time.monotonic()
        limits = self.host.settings.limits
        payload = message.payload if isinstance(message.payload, bytes) else b""
        for session in targets:
            session.last_audio = now
        if len(payload) > limits.max_upload_bytes:
            for session in targets:
                session.fail(
                    PayloadTooLargeError(
                        "max_upload_bytes",
                        limits.max_upload_bytes,
                        what=f"audio frame of {len(payload)} bytes",
                        unit="bytes",
                    )
                )
            return
        try:
            fmt, pcm = _wav_frame(payload)
        except AudioError as exc:
            for session in targets:
                session.fail(exc)
            return
        rate_hz, width, channels = fmt
        frames = len(pcm) // max(1, width * channels)
        for session in targets:
            if session.error:
                continue
            if session.format is None:
                session.format = fmt
            elif session.format != fmt:
                session.fail(
                    AudioError(f"audio frame format changed from {session.format} to {fmt}")
                )
                continue
            if session.frames + frames > limits.max_audio_s * rate_hz:
                session.fail(
                    LimitExceededError(
                        "max_audio_s",
                        limits.max_audio_s,
                        what="listening session audio",
                        unit="s",
                    )
                )
                continue
            if session.bytes + len(pcm) > limits.max_upload_bytes:
                session.fail(
                    PayloadTooLargeError(
                        "max_upload_bytes",
                        limits.max_upload_bytes,
                        what="listening session audio",
                        unit="bytes",
                    )
                )
                continue
            session.chunks.append(pcm)
            session.frames += frames
            session.bytes += len(pcm)

    async def _on_stop(self, message: aiomqtt.Message) -> None:
        data = await self._parse(message, "asr")
        if data is None or not self._mine(data):
            return
        topic = str(message.topic)
        try:
            session_id = checked_id(data.get("sessionId"), "sessionId")
        except MqttRequestError as exc:
            await self._report(topic, exc, "asr")
            return
        session = self._sessions.pop(session_id, None)
        if session is not None and session.timer is not None:
            session.timer.cancel()
        try:
            if session is None:
                raise MqttRequestError(f"no listening session {session_id!r}")
            if session.error:
                raise session.error
            if session.format is None:
                raise AudioError("no audio frames were received")
            listening = session

            async def work() -> None:
                await self._transcribe(topic, listening)

            self.host.submit(self.client_key, topic, work, session.bytes)
        except EdgeVoiceError as exc:
            await self._report(topic, exc, "asr", session_id)

    async def _transcribe(self, topic: str, session: _Listening) -> None:
        assert session.format is not None
        rate, width, channels = session.format
        started = time.monotonic()
        try:
            options = TranscribeOptions(language=session.lang or None)
            async with self.host.hub.asr_session(None, options) as asr:
                pcm = b"".join(session.chunks)
                session.chunks.clear()
                samples = await asyncio.to_thread(pcm_to_float, pcm, width, channels)
                del pcm
                transcript = await asr.transcribe(Audio(samples, rate))
        except Exception as exc:
            await self._report(topic, exc, "asr", session.session_id)
            return
        logprobs = [s.avg_logprob for s in transcript.segments]
        likelihood = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
        await self.host.publish_json(
            "hermes/asr/textCaptured",
            {
                "text": transcript.text,
                "likelihood": round(likelihood if math.isfinite(likelihood) else 0.0, 4),
                "seconds": round(time.monotonic() - started, 3),
                "siteId": self.site_id,
                "sessionId": session.session_id,
                "wakewordId": session.wakeword_id,
                "lang": transcript.language,
            },
        )
        if session.send_audio_captured:
            wav = await asyncio.to_thread(encode, samples, rate, "wav")
            await self.host.publish(
                OutgoingMessage(
                    f"hermes/asr/{self.site_id}/{session.session_id or DEFAULT_SITE}/audioCaptured",
                    wav,
                )
            )
