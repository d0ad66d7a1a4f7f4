"""Wyoming server: speech-to-text, text-to-speech and wake words for Home Assistant.

One process serves what usually takes three servers (wyoming-faster-whisper,
wyoming-piper, wyoming-openwakeword). The wire format comes from the
``wyoming`` package; the server, its framing checks and its concurrency are
ours:

- every connection reads events in its own task; ``describe`` and ``ping`` are
  answered inline, never behind inference (which runs in the hub's worker
  pools);
- transcription and synthesis run in a per-connection job queue, so the
  reader keeps going (and answers ``ping``) while they run;
- with a VAD model configured, the incoming audio is watched for the end of
  speech and decoding starts speculatively, so the transcript is (nearly)
  ready when ``audio-stop`` arrives after the client's trailing silence; if
  speech resumes, the speculative result is dropped;
- malformed input gets an ``error`` event; input that breaks the framing
  closes that connection. Nothing a client sends takes the server down or
  fills the log with tracebacks.

URIs: ``tcp://HOST:PORT``, ``unix:///path/to.sock`` and ``stdio://`` (one
client on stdin/stdout; the daemon exits when stdin closes, like the
single-engine Wyoming servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
from wyoming.asr import Transcribe, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.asr import Transcript as WyomingTranscript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, Eventable, async_write_event
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Describe,
    Info,
    SelectProgram,
    TtsProgram,
    TtsVoice,
    TtsVoiceSpeaker,
    WakeModel,
    WakeProgram,
)
from wyoming.ping import Ping, Pong
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStopped,
)
from wyoming.vad import VoiceStarted, VoiceStopped
from wyoming.wake import Detect, Detection, NotDetected

from edgevoice import __version__
from edgevoice.audio import Audio, AudioError, float_to_pcm16, pcm_to_float
from edgevoice.config import Settings
from edgevoice.engines.base import (
    AsrEngine,
    EngineKind,
    EngineRequestError,
    FloatAudio,
    SynthesizeOptions,
    TranscribeOptions,
    Transcript,
    VadEngine,
    VadStream,
    WakeEngine,
    WakeStream,
)
from edgevoice.errors import EngineError, UnknownModelError
from edgevoice.hub import EngineHub, LoadedModel
from edgevoice.protocols.base import ProtocolServer
from edgevoice.text import SentenceBuffer

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
MAX_LINE_BYTES = 64 * 1024
"""Longest header line; longer ones break the framing (connection closed)."""
MAX_DATA_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
MAX_BAD_EVENTS = 3
"""Consecutive unreadable events before a connection is closed."""
VAD_SPEECH_PROBABILITY = 0.5
TTS_CHUNK_SAMPLES = 4096
"""Samples per outgoing ``audio-chunk`` (about 0.19 s at 22.05 kHz)."""

_EDGEVOICE = Attribution(name="edgevoice", url="")  # no public home page yet
# engine plugin -> (attribution, distribution whose version is the model version)
_ENGINE_ATTRIBUTION: dict[str, tuple[Attribution, str]] = {
    "faster-whisper": (
        Attribution(
            name="SYSTRAN (faster-whisper), OpenAI (Whisper)",
            url="https://github.com/SYSTRAN/faster-whisper",
        ),
        "faster-whisper",
    ),
    "piper": (
        Attribution(
            name="Open Home Foundation (Piper)", url="https://github.com/OHF-Voice/piper1-gpl"
        ),
        "piper-tts",
    ),
    "microwakeword": (
        Attribution(
            name="Kevin Ahrendt (microWakeWord)", url="https://github.com/kahrendt/microWakeWord"
        ),
        "pymicro-wakeword",
    ),
}


class ClientError(Exception):
    """Something the client sent that we answer with an ``error`` event.

    ``fatal`` means the byte stream can no longer be trusted (broken framing):
    the connection is closed after the error is sent.
    """

    def __init__(self, text: str, code: str, *, fatal: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.fatal = fatal


# ------------------------------------------------------------------ framing


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """Read one event; ``None`` at end of stream.

    Unlike ``wyoming.event.async_read_event`` (which ends the stream on any
    parse error), this tells a bad event (:class:`ClientError`, not fatal)
    from broken framing (fatal).
    """
    try:
        line = await reader.readline()
    except ValueError:  # LimitOverrunError wrapped by readline
        raise ClientError(
            f"header line longer than {MAX_LINE_BYTES} bytes", "bad-event", fatal=True
        ) from None
    if not line or not line.endswith(b"\n"):
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise ClientError("event header is not a JSON line", "bad-event") from None
    if not isinstance(header, dict):
        raise ClientError("event header is not a JSON object", "bad-event")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    data = header.get("data") or {}
    try:
        if data_length:
            raw = await reader.readexactly(data_length)
            try:
                extra = json.loads(raw)
            except ValueError:
                raise ClientError(
                    "event data is not JSON (wrong data_length?)", "bad-data-length", fatal=True
                ) from None
            if not isinstance(extra, dict) or not isinstance(data, dict):
                raise ClientError(
                    "event data is not a JSON object (wrong data_length?)",
                    "bad-data-length",
                    fatal=True,
                )
            data.update(extra)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ClientError("event has no type", "bad-event")
    if not isinstance(data, dict):
        raise ClientError("event data is not a JSON object", "bad-event")
    return Event(type=event_type, data=data, payload=payload)


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ClientError(
            f"{key} must be a non-negative integer", f"bad-{key}".replace("_", "-"), fatal=True
        )
    if value > limit:
        raise ClientError(
            f"{key} {value} exceeds {limit} bytes", f"bad-{key}".replace("_", "-"), fatal=True
        )
    return value


# -------------------------------------------------------------------- info


def _dist_version(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _engine_attribution(engine: str) -> tuple[Attribution, str | None]:
    known = _ENGINE_ATTRIBUTION.get(engine)
    if known is not None:
        return known[0], _dist_version(known[1])
    return Attribution(name=f"{engine} (edgevoice engine plugin)", url=""), None


def _programs(models: Sequence[LoadedModel[Any]]) -> dict[str, list[LoadedModel[Any]]]:
    """Models grouped into Wyoming programs, one per engine plugin, in config order."""
    grouped: dict[str, list[LoadedModel[Any]]] = {}
    for model in models:
        grouped.setdefault(model.slot.plugin.name, []).append(model)
    # The default model's program first: clients that do not select a
    # program use the first one.
    return dict(sorted(grouped.items(), key=lambda item: not any(m.default for m in item[1])))


def build_info(hub: EngineHub) -> Info:
    """The ``info`` answer: one program per engine for ASR, TTS and wake words."""
    asr: list[AsrProgram] = []
    for engine, models in _programs(hub.models(EngineKind.ASR)).items():
        attribution, version = _engine_attribution(engine)
        ordered = sorted(models, key=lambda m: not m.default)
        asr.append(
            AsrProgram(
                name=engine,
                attribution=_EDGEVOICE,
                installed=True,
                description=f"edgevoice: {models[0].slot.plugin.description}",
                version=__version__,
                models=[
                    AsrModel(
                        name=m.name,
                        attribution=attribution,
                        installed=True,
                        description=f"{engine} {m.config.model}",
                        version=version,
                        languages=list(m.engine.capabilities.languages),
                    )
                    for m in ordered
                ],
                supports_transcript_streaming=True,
            )
        )
    tts: list[TtsProgram] = []
    for engine, models in _programs(hub.models(EngineKind.TTS)).items():
        attribution, version = _engine_attribution(engine)
        voices: list[TtsVoice] = []
        for m in sorted(models, key=lambda m: not m.default):
            caps = m.engine.capabilities
            for voice in caps.voices:
                voices.append(
                    TtsVoice(
                        name=voice.name,
                        attribution=attribution,
                        installed=True,
                        description=voice.description or f"{engine} {m.config.model}",
                        version=version,
                        languages=list(voice.languages),
                        speakers=[TtsVoiceSpeaker(s) for s in voice.speakers] or None,
                    )
                )
        tts.append(
            TtsProgram(
                name=engine,
                attribution=_EDGEVOICE,
                installed=True,
                description=f"edgevoice: {models[0].slot.plugin.description}",
                version=__version__,
                voices=voices,
                supports_synthesize_streaming=True,
            )
        )
    wake: list[WakeProgram] = []
    for engine, models in _programs(hub.models(EngineKind.WAKE)).items():
        attribution, version = _engine_attribution(engine)
        wake.append(
            WakeProgram(
                name=engine,
                attribution=_EDGEVOICE,
                installed=True,
                description=f"edgevoice: {models[0].slot.plugin.description}",
                version=__version__,
                models=[
                    WakeModel(
                        name=m.name,
                        attribution=attribution,
                        installed=True,
                        description=ww.phrase,
                        version=version,
                        languages=list(ww.languages),
                        phrase=ww.phrase,
                    )
                    for m in models
                    for ww in m.engine.capabilities.wake_words
                ],
            )
        )
    return Info(asr=asr, tts=tts, wake=wake)


# ------------------------------------------------------------ audio input


class _PcmInput:
    """Client PCM (any rate/width/channels) → mono float32 at the engine rate."""

    def __init__(self, target_hz: int) -> None:
        self.target_hz = target_hz
        self._rate: int | None = None
        self._resampler: Any = None

    @staticmethod
    def check_format(rate: Any, width: Any, channels: Any) -> None:
        if width not in (1, 2, 4):
            raise ClientError(
                f"unsupported sample width {width!r} (use 1, 2 or 4 bytes)", "unsupported-audio"
            )
        if not isinstance(rate, int) or not 1000 <= rate <= 384000:
            raise ClientError(f"unsupported sample rate {rate!r}", "unsupported-audio")
        if not isinstance(channels, int) or not 1 <= channels <= 32:
            raise ClientError(f"unsupported channel count {channels!r}", "unsupported-audio")

    def convert(self, chunk: AudioChunk) -> FloatAudio:
        self.check_format(chunk.rate, chunk.width, chunk.channels)
        try:
            samples = pcm_to_float(chunk.audio, chunk.width, chunk.channels)
        except AudioError as exc:
            raise ClientError(str(exc), "bad-audio") from None
        if chunk.rate == self.target_hz:
            return samples
        if self._rate != chunk.rate:
            import soxr

            self._rate = chunk.rate
            self._resampler = soxr.ResampleStream(
                chunk.rate, self.target_hz, 1, dtype="float32", quality="HQ"
            )
        out: FloatAudio = self._resampler.resample_chunk(samples)
        return out

    def flush(self) -> FloatAudio:
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        out: FloatAudio = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._resampler = None
        self._rate = None
        return out


# ---------------------------------------------------------------- sessions


@dataclass
class _AsrSession:
    model: LoadedModel[AsrEngine]
    options: TranscribeOptions
    pcm: _PcmInput
    vad: LoadedModel[VadEngine] | None = None
    vad_stream: VadStream | None = None
    chunks: list[FloatAudio] = field(default_factory=list)
    samples: int = 0
    received_s: float = 0.0
    rejected: bool = False
    in_speech: bool = False
    silence_s: float = 0.0
    speculation: asyncio.Task[Transcript] | None = None
    streamed: str = ""
    stream_started: bool = False
    finished: bool = False

    @property
    def rate_hz(self) -> int:
        return self.pcm.target_hz

    def audio(self) -> Audio:
        samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        return Audio(samples, self.rate_hz)

    def drop_speculation(self) -> None:
        if self.speculation is not None:
            self.speculation.cancel()
            self.speculation = None


@dataclass
class _WakeSession:
    streams: list[tuple[LoadedModel[WakeEngine], WakeStream]]
    pcm: _PcmInput
    detected: bool = False
    rejected: bool = False


@dataclass
class _TtsStream:
    """An open ``synthesize-start`` … ``synthesize-stop`` request."""

    options: SynthesizeOptions
    buffer: SentenceBuffer = field(default_factory=SentenceBuffer)
    rate_hz: int | None = None
    """Set when ``audio-start`` has been sent; every chunk uses this format."""
    timestamp_ms: int = 0


Job = Callable[[], Awaitable[None]]


# -------------------------------------------------------------- connection


class _Connection:
    """One client: reads events, answers inline or through its job queue."""

    def __init__(
        self,
        server: WyomingServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.server = server
        self.hub = server.hub
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self._write_lock = asyncio.Lock()
        self._jobs: asyncio.Queue[Job | None] = asyncio.Queue()
        self._job_running = False
        self._programs: dict[EngineKind, str] = {}
        self._transcribe: Transcribe | None = None
        self._detect: list[LoadedModel[WakeEngine]] | None = None
        self._asr: _AsrSession | None = None
        self._wake: _WakeSession | None = None
        self._tts: _TtsStream | None = None
        self._closed = False

    # ------------------------------------------------------------ plumbing

    @property
    def idle(self) -> bool:
        return (
            not self._job_running
            and self._jobs.empty()
            and self._asr is None
            and self._wake is None
            and self._tts is None
        )

    async def send(self, *events: Eventable | Event) -> None:
        async with self._write_lock:
            for item in events:
                event = item if isinstance(item, Event) else item.event()
                await async_write_event(event, self.writer)

    async def send_error(self, text: str, code: str) -> None:
        _LOGGER.info("Wyoming client %s: %s (%s)", self.peer, text, code)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(Error(text=text, code=code))

    async def run(self) -> None:
        worker = asyncio.create_task(self._job_worker(), name=f"wyoming-jobs-{self.peer}")
        bad = 0
        try:
            while True:
                try:
                    event = await read_event(self.reader)
                except ClientError as exc:
                    await self.send_error(exc.text, exc.code)
                    bad += 1
                    if exc.fatal or bad >= MAX_BAD_EVENTS:
                        break
                    continue
                if event is None:
                    break
                bad = 0
                try:
                    await self._dispatch(event)
                except ClientError as exc:
                    await self.send_error(exc.text, exc.code)
                    if exc.fatal:
                        break
                except (UnknownModelError, EngineRequestError) as exc:
                    await self.send_error(str(exc), _error_code(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._closed = True
            self._abort_sessions()
            # Let queued work finish only if the client is still there to get it.
            self._jobs.put_nowait(None)
            if self.writer.is_closing():
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await worker
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                await self.writer.wait_closed()

    def _abort_sessions(self) -> None:
        if self._asr is not None:
            self._asr.drop_speculation()
            self._asr = None
        if self._wake is not None:
            self._close_wake(self._wake)
            self._wake = None
        self._tts = None

    async def _job_worker(self) -> None:
        while True:
            job = await self._jobs.get()
            if job is None:
                return
            self._job_running = True
            try:
                await job()
            except ClientError as exc:
                await self.send_error(exc.text, exc.code)
            except (UnknownModelError, EngineRequestError, AudioError) as exc:
                await self.send_error(str(exc), _error_code(exc))
            except (ConnectionError, RuntimeError) as exc:
                if isinstance(exc, RuntimeError) and not self.writer.is_closing():
                    _LOGGER.error("Wyoming client %s: request failed: %s", self.peer, exc)
                    await self.send_error(f"request failed: {exc}", "engine-error")
                else:
                    _LOGGER.debug("Wyoming client %s went away during a request", self.peer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one line, no traceback storm; details at DEBUG
                _LOGGER.error("Wyoming client %s: request failed: %r", self.peer, exc)
                _LOGGER.debug("Traceback", exc_info=True)
                await self.send_error(f"request failed: {exc}", "engine-error")
            finally:
                self._job_running = False

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, event: Event) -> None:
        handler = _HANDLERS.get(event.type)
        if handler is None:
            _LOGGER.debug("Wyoming client %s: ignoring event %s", self.peer, event.type)
            return
        await handler(self, event)

    def _parse(self, cls: type[Any], event: Event) -> Any:
        try:
            return cls.from_event(event)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ClientError(f"invalid {event.type} event", "bad-event") from None

    async def _on_describe(self, event: Event) -> None:
        await self.send(build_info(self.hub))

    async def _on_ping(self, event: Event) -> None:
        ping = self._parse(Ping, event)
        await self.send(Pong(text=ping.text))

    async def _on_select_program(self, event: Event) -> None:
        name = self._parse(SelectProgram, event).name
        found = False
        for kind in (EngineKind.ASR, EngineKind.TTS, EngineKind.WAKE):
            if name in _programs(self.hub.models(kind)):
                self._programs[kind] = name
                found = True
        if not found:
            raise ClientError(f"unknown program {name!r}", "unknown-program")

    def _model(self, kind: EngineKind, name: str | None) -> LoadedModel[Any]:
        """A model by public name, within the selected program if there is one."""
        program = self._programs.get(kind)
        if program is None:
            return self.hub.get(kind, name)
        models = _programs(self.hub.models(kind))[program]
        if not name:
            return next((m for m in models if m.default), models[0])
        model = self.hub.get(kind, name)
        if model not in models:
            raise UnknownModelError(kind, name, [m.name for m in models])
        return model

    # ------------------------------------------------------------------ ASR

    async def _on_transcribe(self, event: Event) -> None:
        request = self._parse(Transcribe, event)
        self._model(EngineKind.ASR, request.name)  # unknown names fail now
        self._transcribe = request
        self._detect = None

    def _transcribe_options(
        self, model: LoadedModel[AsrEngine], request: Transcribe
    ) -> TranscribeOptions:
        caps = model.engine.capabilities
        language = None
        if request.language:
            language = _base_language(request.language)
            if language not in caps.languages:
                raise ClientError(
                    f"model {model.name!r} does not recognise language {request.language!r}",
                    "unsupported-language",
                )
        hints = [*(request.transcript_names or ()), *(request.transcript_terms or ())]
        prompt = ", ".join(str(h) for h in hints) if hints and caps.prompt else None
        return TranscribeOptions(language=language, prompt=prompt)

    async def _on_audio_start(self, event: Event) -> None:
        start = self._parse(AudioStart, event)
        if self._asr is not None or self._wake is not None:
            raise ClientError("audio-start while audio is already streaming", "unexpected-event")
        if self._detect is not None:
            models, self._detect = self._detect, None
            self._wake = await self._start_wake(models)
            self._check_start(start, self._wake)
            return
        request, self._transcribe = self._transcribe or Transcribe(), None
        model: LoadedModel[AsrEngine] = self._model(EngineKind.ASR, request.name)
        session = _AsrSession(
            model=model,
            options=self._transcribe_options(model, request),
            pcm=_PcmInput(model.engine.capabilities.sample_rate_hz),
        )
        self._asr = session
        self._check_start(start, session)
        if not session.rejected and self.hub.models(EngineKind.VAD):
            session.vad = self.hub.vad()
            session.vad_stream = await self.hub.run(session.vad, session.vad.engine.start_stream)

    def _check_start(self, start: AudioStart, session: _AsrSession | _WakeSession) -> None:
        try:
            _PcmInput.check_format(start.rate, start.width, start.channels)
        except ClientError:
            session.rejected = True  # swallow its chunks until audio-stop
            raise

    async def _on_audio_chunk(self, event: Event) -> None:
        chunk = self._parse(AudioChunk, event)
        if self._asr is None and self._wake is None and self._detect is not None:
            # Wake word clients may stream without audio-start.
            models, self._detect = self._detect, None
            self._wake = await self._start_wake(models)
        if self._asr is not None:
            await self._asr_chunk(self._asr, chunk)
        elif self._wake is not None:
            await self._wake_chunk(self._wake, chunk)
        else:
            raise ClientError("audio-chunk before audio-start", "no-audio-start")

    async def _on_audio_stop(self, event: Event) -> None:
        if self._asr is not None:
            session, self._asr = self._asr, None
            if not session.rejected:
                tail = session.pcm.flush()
                if len(tail):
                    session.chunks.append(tail)
                self._jobs.put_nowait(lambda: self._finish_transcript(session))
        elif self._wake is not None:
            wake, self._wake = self._wake, None
            self._close_wake(wake)
            if not wake.rejected and not wake.detected:
                await self.send(NotDetected())
        elif self._detect is not None:
            self._detect = None
            await self.send(NotDetected())
        else:
            raise ClientError("audio-stop before audio-start", "no-audio-start")

    async def _asr_chunk(self, session: _AsrSession, chunk: AudioChunk) -> None:
        if session.rejected:
            return
        try:
            duration_s = chunk.seconds
        except ZeroDivisionError:
            duration_s = 0.0
        limit = self.server.settings.limits.max_audio_s
        if session.received_s + duration_s > limit:
            session.rejected = True
            session.drop_speculation()
            session.chunks.clear()
            raise ClientError(f"audio longer than {limit:g} s", "audio-too-long")
        try:
            samples = session.pcm.convert(chunk)
        except ClientError:
            session.rejected = True
            session.drop_speculation()
            raise
        session.received_s += duration_s
        if not len(samples):
            return
        session.chunks.append(samples)
        session.samples += len(samples)
        if session.vad is None or session.vad_stream is None:
            return
        vad_rate = session.vad.engine.capabilities.sample_rate_hz
        vad_audio = Audio(samples, session.rate_hz).at_rate(vad_rate).samples
        probability = await self.hub.run(session.vad, session.vad_stream.process, vad_audio)
        if probability is None or session.rejected:
            return
        timestamp_ms = session.samples * 1000 // session.rate_hz
        if probability >= VAD_SPEECH_PROBABILITY:
            session.silence_s = 0.0
            if not session.in_speech:
                session.in_speech = True
                session.drop_speculation()  # speech resumed: that guess is stale
                await self.send(VoiceStarted(timestamp=timestamp_ms))
        elif session.in_speech:
            session.silence_s += len(samples) / session.rate_hz
            if session.silence_s >= self.server.settings.wyoming.end_of_speech_s:
                session.in_speech = False
                await self.send(VoiceStopped(timestamp=timestamp_ms))
                audio = session.audio()
                session.speculation = asyncio.create_task(
                    self._speculate(session, audio), name=f"wyoming-speculate-{self.peer}"
                )

    async def _decode(self, session: _AsrSession, audio: Audio) -> Transcript:
        return await self.hub.transcribe(audio, session.options, model=session.model.name)

    async def _speculate(self, session: _AsrSession, audio: Audio) -> Transcript:
        """Decode what was heard so far; stream it if it is still current."""
        started = time.monotonic()
        transcript = await self._decode(session, audio)
        current = asyncio.current_task()
        if session.speculation is current and not session.finished and not self._closed:
            _LOGGER.debug(
                "Speculative transcript after %.2f s: %r",
                time.monotonic() - started,
                transcript.text,
            )
            await self._stream_text(session, transcript)
        return transcript

    async def _stream_text(self, session: _AsrSession, transcript: Transcript) -> None:
        """Send the part of ``transcript`` not streamed yet as ``transcript-chunk``."""
        events: list[Eventable] = []
        if not session.stream_started:
            session.stream_started = True
            events.append(TranscriptStart(language=transcript.language))
        text = transcript.text
        if text.startswith(session.streamed) and len(text) > len(session.streamed):
            events.append(TranscriptChunk(text=text[len(session.streamed) :]))
            session.streamed = text
        if events:
            await self.send(*events)

    async def _finish_transcript(self, session: _AsrSession) -> None:
        transcript: Transcript | None = None
        speculation = session.speculation
        if speculation is not None and not session.in_speech:
            try:
                transcript = await speculation
            except asyncio.CancelledError:
                if not speculation.cancelled():
                    raise
            except (EngineError, RuntimeError) as exc:
                _LOGGER.debug("Speculative decode failed (%s); decoding again", exc)
        else:
            session.drop_speculation()
        if transcript is None:
            transcript = await self._decode(session, session.audio())
        session.finished = True
        await self._stream_text(session, transcript)
        await self.send(
            WyomingTranscript(text=transcript.text, language=transcript.language),
            TranscriptStop(),
        )

    # ----------------------------------------------------------------- wake

    async def _on_detect(self, event: Event) -> None:
        detect = self._parse(Detect, event)
        names = [n for n in (detect.names or []) if n]
        if names:
            models: list[LoadedModel[WakeEngine]] = []
            for name in names:
                model = self._model(EngineKind.WAKE, name)
                if model not in models:
                    models.append(model)
        else:
            program = self._programs.get(EngineKind.WAKE)
            models = [
                m
                for m in self.hub.models(EngineKind.WAKE)
                if program is None or m.slot.plugin.name == program
            ]
        if not models:
            raise ClientError("no wake word models are configured", "unknown-model")
        self._detect = models
        self._transcribe = None

    async def _start_wake(self, models: list[LoadedModel[WakeEngine]]) -> _WakeSession:
        streams = []
        for model in models:
            streams.append((model, await self.hub.run(model, model.engine.start_stream, None)))
        rate = models[0].engine.capabilities.sample_rate_hz
        return _WakeSession(streams=streams, pcm=_PcmInput(rate))

    def _close_wake(self, session: _WakeSession) -> None:
        for model, stream in session.streams:
            close = getattr(stream, "close", None)
            if close is not None:
                # Interpreter teardown belongs to the worker that ran it.
                model.slot.executor.submit(close)
        session.streams = []

    async def _wake_chunk(self, session: _WakeSession, chunk: AudioChunk) -> None:
        if session.rejected:
            return
        try:
            samples = session.pcm.convert(chunk)
        except ClientError:
            session.rejected = True
            raise
        if not len(samples):
            return
        for model, stream in session.streams:
            rate = model.engine.capabilities.sample_rate_hz
            audio = Audio(samples, session.pcm.target_hz).at_rate(rate).samples
            for detection in await self.hub.run(model, stream.process, audio):
                session.detected = True
                await self.send(Detection(name=detection.name, timestamp=detection.timestamp_ms))

    # ------------------------------------------------------------------ TTS

    def _synthesize_options(self, voice: Any) -> SynthesizeOptions:
        name = getattr(voice, "name", None) if voice is not None else None
        speaker = getattr(voice, "speaker", None) if voice is not None else None
        language = getattr(voice, "language", None) if voice is not None else None
        program = self._programs.get(EngineKind.TTS)
        if name:
            model, _ = self.hub.voice(name)
            if program is not None and model.slot.plugin.name != program:
                raise UnknownModelError(
                    EngineKind.TTS,
                    name,
                    [v.name for m, v in self.hub.all_voices() if m.slot.plugin.name == program],
                )
        elif language:
            wanted = _base_language(language)
            for model, info in self.hub.all_voices():
                if program is not None and model.slot.plugin.name != program:
                    continue
                if any(_base_language(lang) == wanted for lang in info.languages):
                    name = info.name
                    break
            else:
                raise ClientError(f"no voice for language {language!r}", "unknown-voice")
        elif program is not None:
            model = self._model(EngineKind.TTS, None)
            name = model.name
        return SynthesizeOptions(voice=name or None, speaker=speaker or None)

    async def _on_synthesize(self, event: Event) -> None:
        request = self._parse(Synthesize, event)
        if self._tts is not None:
            # Inside synthesize-start/stop the full text is repeated for old
            # servers; the streamed chunks already carry it.
            return
        options = self._synthesize_options(request.voice)
        text = request.text

        async def job() -> None:
            stream = _TtsStream(options)
            await self._synthesize_text(stream, text)
            await self._end_audio(stream, empty_ok=False)

        self._jobs.put_nowait(job)

    async def _on_synthesize_start(self, event: Event) -> None:
        request = self._parse(SynthesizeStart, event)
        if self._tts is not None:
            raise ClientError("synthesize-start while a synthesis is open", "unexpected-event")
        self._tts = _TtsStream(self._synthesize_options(request.voice))

    async def _on_synthesize_chunk(self, event: Event) -> None:
        chunk = self._parse(SynthesizeChunk, event)
        stream = self._tts
        if stream is None:
            raise ClientError("synthesize-chunk before synthesize-start", "unexpected-event")
        for sentence in stream.buffer.feed(chunk.text):
            self._jobs.put_nowait(functools.partial(self._synthesize_text, stream, sentence))

    async def _on_synthesize_stop(self, event: Event) -> None:
        stream = self._tts
        if stream is None:
            raise ClientError("synthesize-stop before synthesize-start", "unexpected-event")
        self._tts = None
        for sentence in stream.buffer.flush():
            self._jobs.put_nowait(functools.partial(self._synthesize_text, stream, sentence))

        async def finish() -> None:
            await self._end_audio(stream, empty_ok=True)
            await self.send(SynthesizeStopped())

        self._jobs.put_nowait(finish)

    async def _synthesize_text(self, stream: _TtsStream, text: str) -> None:
        if not text.strip():
            return
        _, rate, chunks = await self.hub.synthesize(text, stream.options)
        async for samples in chunks:
            if stream.rate_hz is None:
                stream.rate_hz = rate
                await self.send(AudioStart(rate=rate, width=2, channels=1, timestamp=0))
            elif rate != stream.rate_hz:  # one format per stream
                from edgevoice.audio import resample

                samples = resample(samples, rate, stream.rate_hz)  # noqa: PLW2901
            for i in range(0, len(samples), TTS_CHUNK_SAMPLES):
                piece = samples[i : i + TTS_CHUNK_SAMPLES]
                await self.send(
                    AudioChunk(
                        rate=stream.rate_hz,
                        width=2,
                        channels=1,
                        audio=float_to_pcm16(piece),
                        timestamp=stream.timestamp_ms,
                    )
                )
                stream.timestamp_ms += len(piece) * 1000 // stream.rate_hz

    async def _end_audio(self, stream: _TtsStream, *, empty_ok: bool) -> None:
        if stream.rate_hz is None:
            if not empty_ok:
                raise ClientError("text produced no speech", "no-speech")
            # Keep the event sequence clients expect even with no text.
            model, _ = self.hub.voice(stream.options.voice)
            stream.rate_hz = model.engine.capabilities.sample_rate_hz
            await self.send(AudioStart(rate=stream.rate_hz, width=2, channels=1, timestamp=0))
        await self.send(AudioStop(timestamp=stream.timestamp_ms))


def _error_code(exc: Exception) -> str:
    if isinstance(exc, UnknownModelError):
        return "unknown-voice" if exc.kind is EngineKind.TTS else "unknown-model"
    if isinstance(exc, AudioError):
        return "bad-audio"
    return "bad-request"


_Handler = Callable[[_Connection, Event], Awaitable[None]]
_HANDLERS: dict[str, _Handler] = {
    Describe().event().type: _Connection._on_describe,
    "ping": _Connection._on_ping,
    "select-program": _Connection._on_select_program,
    "transcribe": _Connection._on_transcribe,
    "audio-start": _Connection._on_audio_start,
    "audio-chunk": _Connection._on_audio_chunk,
    "audio-stop": _Connection._on_audio_stop,
    "detect": _Connection._on_detect,
    "synthesize": _Connection._on_synthesize,
    "synthesize-start": _Connection._on_synthesize_start,
    "synthesize-chunk": _Connection._on_synthesize_chunk,
    "synthesize-stop": _Connection._on_synthesize_stop,
}


# ------------------------------------------------------------------ server


class WyomingServer(ProtocolServer):
    """Serves the hub's ASR, TTS and wake-word models over Wyoming."""

    name = "wyoming"

    def __init__(self, settings: Settings, hub: EngineHub) -> None:
        self.settings = settings
        self.hub = hub
        self.config = settings.wyoming
        self._server: asyncio.AbstractServer | None = None
        self._addresses: list[str] = []
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._unix_path: str | None = None
        self._stdio_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._zeroconf: Any = None
        self._zeroconf_task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    async def start(self) -> None:
        uri = urlparse(self.config.uri)
        if uri.scheme == "tcp":
            host = uri.hostname or "0.0.0.0"
            port = uri.port if uri.port is not None else 10300
            self._server = await asyncio.start_server(
                self._on_client, host, port, limit=MAX_LINE_BYTES
            )
            for sock in self._server.sockets:
                addr = sock.getsockname()
                self._addresses.append(f"tcp://{addr[0]}:{addr[1]}")
            if self.config.zeroconf:
                bound_port = self._server.sockets[0].getsockname()[1]
                self._zeroconf_task = asyncio.create_task(
                    self._advertise(host, bound_port), name="wyoming-zeroconf"
                )
        elif uri.scheme == "unix":
            path = (uri.netloc + uri.path) or "/run/edgevoice/wyoming.sock"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._server = await asyncio.start_unix_server(
                self._on_client, path, limit=MAX_LINE_BYTES
            )
            self._unix_path = path
            self._addresses.append(f"unix://{path}")
        elif uri.scheme == "stdio":
            await self._start_stdio()
            self._addresses.append("stdio://")
        else:
            raise ValueError(
                f"wyoming.uri {self.config.uri!r}: use tcp://HOST:PORT, unix:///path or stdio://"
            )

    async def _start_stdio(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", buffering=0)
        )
        # stdout carries the protocol: keep a private handle on it and point
        # fd 1 at stderr, so a stray print() cannot corrupt the stream.
        out_fd = os.dup(1)
        sys.stdout.flush()
        os.dup2(2, 1)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop),
            os.fdopen(out_fd, "wb", buffering=0),
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        connection = _Connection(self, reader, writer, "stdio")

        async def serve() -> None:
            await connection.run()
            if not self._stopping:
                _LOGGER.info("stdin closed: stopping")
                signal.raise_signal(signal.SIGTERM)

        self._stdio_task = asyncio.create_task(serve(), name="wyoming-stdio")
        self._connections[self._stdio_task] = connection

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else "unix"
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(self, reader, writer, peer)
        self._connections[task] = connection
        _LOGGER.debug("Wyoming client %s connected", peer)
        try:
            await connection.run()
        except asyncio.CancelledError:
            # Cancelled by stop(). asyncio's stream callback calls
            # task.exception() on this task, which logs a cancelled task as
            # an error: end normally instead.
            pass
        except Exception as exc:  # never let one client's failure escape
            _LOGGER.error("Wyoming client %s: connection failed: %r", peer, exc)
            _LOGGER.debug("Traceback", exc_info=True)
        finally:
            self._connections.pop(task, None)
            _LOGGER.debug("Wyoming client %s disconnected", peer)

    async def _advertise(self, host: str, port: int) -> None:
        """Register ``_wyoming._tcp.local.``; a failure is a warning, never fatal."""
        try:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

            address = host if host not in ("0.0.0.0", "", "::") else _primary_ipv4()
            name = self.config.zeroconf_name or f"edgevoice-{self.settings.mqtt.node_id}"
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(address)],
                port=port,
                properties={"version": __version__},
            )
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            await self._zeroconf.async_register_service(info)
            _LOGGER.info("Advertising %s.%s on %s:%d", name, SERVICE_TYPE, address, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LOGGER.warning(
                "Zeroconf advertisement failed (Home Assistant will not "
                "discover this server; add it by host and port): %s",
                exc,
            )

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        if self._zeroconf_task is not None:
            self._zeroconf_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._zeroconf_task
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf.async_unregister_all_services()
                await self._zeroconf.async_close()
            self._zeroconf = None
        # Idle connections go now; busy ones get ``timeout_s`` to finish.
        for task, connection in list(self._connections.items()):
            if connection.idle:
                task.cancel()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)


def _primary_ipv4() -> str:
    """The address other hosts reach us on (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.setblocking(False)
        probe.connect(("224.0.0.251", 1))
        address: str = probe.getsockname()[0]
        return address
    finally:
        probe.close()


def _base_language(code: str) -> str:
    """``en_US``/``en-us`` → ``en``."""
    return code.replace("_", "-").split("-")[0].lower()
