"""Hermes (Rhasspy 2.5 / Snips) compatibility for the MQTT bridge (``hermes = true``).

- ``hermes/tts/say`` ``{text, siteId?, id?, sessionId?}`` →
  ``hermes/audioServer/<siteId>/playBytes/<id>`` (WAV) → ``hermes/tts/sayFinished``.
- ``hermes/asr/startListening`` ``{siteId?, sessionId?}``, then WAV chunks on
  ``hermes/audioServer/<siteId>/audioFrame`` (or ``.../audioSessionFrame/<sessionId>``),
  then ``hermes/asr/stopListening`` → ``hermes/asr/textCaptured``.
- Failures → ``hermes/error/tts`` / ``hermes/error/asr`` and ``<base>/error``.

Fields are camelCase; a missing ``siteId`` means ``"default"``. The node
serves one site, ``mqtt.hermes_site_id``; requests for other sites are left to
other services. Listening ends on ``stopListening`` (there is no
silence detection here).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
import wave
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiomqtt
import numpy as np

from edgevoice.audio import Audio, AudioError, encode, pcm_to_float
from edgevoice.engines.base import EngineRequestError, TranscribeOptions
from edgevoice.errors import UnknownModelError

if TYPE_CHECKING:
    from edgevoice.protocols.mqtt import MqttBridge, Route

_LOGGER = logging.getLogger(__name__)

DEFAULT_SITE = "default"


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
    error: str | None = None


def _wav_frame(data: bytes) -> tuple[tuple[int, int, int], bytes]:
    """Parse one small WAV chunk (cheap; runs inline)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            fmt = (wav.getframerate(), wav.getsampwidth(), wav.getnchannels())
            return fmt, wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"audio frame is not a WAV chunk: {exc}") from None


class HermesAdapter:
    """Hermes topics on top of an :class:`MqttBridge`."""

    def __init__(self, bridge: MqttBridge) -> None:
        self.bridge = bridge
        self.site_id = bridge.config.hermes_site_id
        self._sessions: dict[str | None, _Listening] = {}

    def routes(self) -> list[Route]:
        from edgevoice.protocols.mqtt import Route

        site = self.site_id
        return [
            Route("hermes/tts/say", self._on_say),
            Route("hermes/asr/startListening", self._on_start),
            Route("hermes/asr/stopListening", self._on_stop),
            Route(f"hermes/audioServer/{site}/audioFrame", self._on_frame),
            Route(f"hermes/audioServer/{site}/audioSessionFrame/+", self._on_frame),
        ]

    # ------------------------------------------------------------- helpers

    def _parse(self, message: aiomqtt.Message) -> dict[str, Any] | None:
        """The JSON object of a Hermes message, or None (after reporting) when invalid."""
        topic = str(message.topic)
        try:
            data = json.loads(message.payload if isinstance(message.payload, bytes) else b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._report(
                topic, f"payload is not valid JSON: {exc}", "asr" if "asr" in topic else "tts"
            )
            return None
        if not isinstance(data, dict):
            self._report(topic, "JSON payload must be an object", "tts")
            return None
        return data

    def _mine(self, data: dict[str, Any]) -> bool:
        return str(data.get("siteId") or DEFAULT_SITE) == self.site_id

    def _report(
        self,
        topic: str,
        error: str,
        component: str,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        async def report() -> None:
            await self.bridge.publish_json(
                f"hermes/error/{component}",
                {"error": error, "context": topic, "siteId": self.site_id, "sessionId": session_id},
            )
            await self.bridge.report_error(topic, error, request_id)

        self.bridge.spawn(report(), name="hermes error report")

    async def publish_wake(self, wake_word: str) -> None:
        await self.bridge.publish_json(
            f"hermes/hotword/{wake_word}/detected",
            {"siteId": self.site_id, "modelId": wake_word, "currentSensitivity": 1.0},
        )

    # ----------------------------------------------------------------- TTS

    def _on_say(self, message: aiomqtt.Message) -> None:
        data = self._parse(message)
        if data is None or not self._mine(data):
            return
        topic = str(message.topic)
        text = data.get("text")
        request_id = str(data.get("id") or "") or None
        session_id = data.get("sessionId")
        if not isinstance(text, str) or not text.strip():
            self._report(topic, "text: missing or empty", "tts", session_id, request_id)
            return
        if len(text) > self.bridge.settings.limits.max_input_chars:
            limit = self.bridge.settings.limits.max_input_chars
            self._report(
                topic,
                f"text is {len(text)} characters; the limit is {limit}",
                "tts",
                session_id,
                request_id,
            )
            return
        self.bridge.spawn(self._say(topic, text, request_id, session_id), name="hermes say")

    async def _say(
        self, topic: str, text: str, request_id: str | None, session_id: str | None
    ) -> None:
        from edgevoice.protocols.mqtt import OutgoingMessage, _new_id

        request_id = request_id or _new_id()
        try:
            wav, _ = await self.bridge.synthesize(text, None, 1.0, "wav")
        except (UnknownModelError, AudioError, EngineRequestError) as exc:
            self._report(topic, str(exc), "tts", session_id, request_id)
            return
        except Exception as exc:
            _LOGGER.exception("Hermes say failed")
            self._report(topic, f"internal error: {exc}", "tts", session_id, request_id)
            return
        await self.bridge.publish(
            OutgoingMessage(
                f"hermes/audioServer/{self.site_id}/playBytes/{request_id}",
                wav,
                what=f"Hermes playBytes {request_id}",
            )
        )
        await self.bridge.publish_json(
            "hermes/tts/sayFinished",
            {"id": request_id, "sessionId": session_id, "siteId": self.site_id},
        )

    # ----------------------------------------------------------------- ASR

    def _on_start(self, message: aiomqtt.Message) -> None:
        data = self._parse(message)
        if data is None or not self._mine(data):
            return
        session_id = data.get("sessionId")
        self._sessions[session_id] = _Listening(
            session_id=session_id,
            wakeword_id=data.get("wakewordId"),
            lang=data.get("lang"),
            send_audio_captured=bool(data.get("sendAudioCaptured", False)),
        )
        _LOGGER.debug("Hermes listening started (session %s)", session_id)

    def _on_frame(self, message: aiomqtt.Message) -> None:
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
        try:
            fmt, pcm = _wav_frame(message.payload if isinstance(message.payload, bytes) else b"")
        except AudioError as exc:
            for session in targets:
                session.error = session.error or str(exc)
            return
        max_frames = self.bridge.settings.limits.max_audio_s * fmt[0]
        for session in targets:
            if session.error:
                continue
            if session.format is None:
                session.format = fmt
            elif session.format != fmt:
                session.error = f"audio frame format changed from {session.format} to {fmt}"
                continue
            if session.frames + len(pcm) // (fmt[1] * fmt[2]) > max_frames:
                session.error = f"listening session is longer than {self.bridge.settings.limits.max_audio_s:.0f} s"
                continue
            session.chunks.append(pcm)
            session.frames += len(pcm) // (fmt[1] * fmt[2])

    def _on_stop(self, message: aiomqtt.Message) -> None:
        data = self._parse(message)
        if data is None or not self._mine(data):
            return
        session_id = data.get("sessionId")
        session = self._sessions.pop(session_id, None)
        topic = str(message.topic)
        if session is None:
            self._report(topic, f"no listening session {session_id!r}", "asr", session_id)
            return
        if session.error or session.format is None:
            self._report(topic, session.error or "no audio frames were received", "asr", session_id)
            return
        self.bridge.spawn(self._transcribe(topic, session), name="hermes transcribe")

    async def _transcribe(self, topic: str, session: _Listening) -> None:
        assert session.format is not None
        rate, width, channels = session.format
        started = time.monotonic()
        try:
            samples = await asyncio.to_thread(
                pcm_to_float, b"".join(session.chunks), width, channels
            )
            audio = Audio(samples, rate)
            transcript = await self.bridge.hub.transcribe(
                audio, TranscribeOptions(language=session.lang or None)
            )
        except (UnknownModelError, AudioError, EngineRequestError) as exc:
            self._report(topic, str(exc), "asr", session.session_id)
            return
        except Exception as exc:
            _LOGGER.exception("Hermes transcription failed")
            self._report(topic, f"internal error: {exc}", "asr", session.session_id)
            return
        logprobs = [s.avg_logprob for s in transcript.segments]
        likelihood = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
        await self.bridge.publish_json(
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
            from edgevoice.protocols.mqtt import OutgoingMessage

            wav = await asyncio.to_thread(encode, samples, rate, "wav")
            await self.bridge.publish(
                OutgoingMessage(
                    f"hermes/asr/{self.site_id}/{session.session_id}/audioCaptured", wav
                )
            )
