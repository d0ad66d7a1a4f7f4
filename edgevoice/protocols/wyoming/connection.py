"""One Wyoming client: events in, hub sessions and pipelines, events out.

- Every connection reads events in its own task; ``describe`` and ``ping``
  are answered inline, never behind inference (which runs in the hub's
  worker pools).
- Speech to text goes through the one endpointing pipeline
  (:mod:`edgevoice.pipeline.endpointing`): VAD events become
  ``voice-started``/``voice-stopped``, the speculative decode at the end of
  speech streams as ``transcript-chunk`` before ``audio-stop`` arrives, and
  the final transcript reuses it when speech did not resume.
- ``[wyoming] endpointing = "server"`` (with a VAD model): the pipeline ends
  the utterance after ``finish_silence_s`` of silence and the ``transcript``
  goes out at once, before ``audio-stop`` (Home Assistant reads while it
  uploads and stops at the first ``transcript``). Audio that still arrives
  is drained unread until ``audio-stop`` or the client closes.
- Wake words go through a hub wake session, which keeps detecting across a
  reload (or ends with a clean ``error``).
- Transcription and synthesis finish in a per-connection job queue (at most
  ``[limits] max_pending_per_client`` jobs), so the reader keeps going.
- Every input is bounded: audio by ``max_audio_s`` as it arrives, text by
  ``max_input_chars`` before any work, silence by ``idle_timeout_s`` and
  ``session_timeout_s``. Malformed input gets an ``error`` event; broken
  framing closes that connection. A client going away is a DEBUG line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from wyoming.asr import Transcribe, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.asr import Transcript as WyomingTranscript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, Eventable, async_write_event
from wyoming.info import Describe, SelectProgram
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStopped
from wyoming.vad import VoiceStarted, VoiceStopped
from wyoming.wake import Detect, Detection, NotDetected

from edgevoice.audio import PcmConverter, float_to_pcm16
from edgevoice.engines.base import (
    AsrEngine,
    EngineKind,
    FloatAudio,
    SynthesizeOptions,
    TranscribeOptions,
    Transcript,
    WakeEngine,
)
from edgevoice.errors import (
    BusyError,
    ClientError,
    EdgeVoiceError,
    EngineError,
    LimitExceededError,
    ShuttingDownError,
    UnknownModelError,
    UnsupportedRequestError,
)
from edgevoice.hub import LoadedModel, WakeSession
from edgevoice.pipeline.endpointing import (
    DecodeFailed,
    EndpointConfig,
    EndpointingPipeline,
    FinalTranscript,
    NoSpeech,
    PartialTranscript,
    PipelineEvent,
    SpeechStarted,
    SpeechStopped,
)
from edgevoice.pipeline.speak import Speech, TextFeed, speak
from edgevoice.protocols.wyoming.framing import (
    MAX_BAD_EVENTS,
    ProtocolError,
    check_fields,
    error_event,
    read_event,
)
from edgevoice.protocols.wyoming.info import base_language, build_info, programs

if TYPE_CHECKING:
    from edgevoice.protocols.wyoming.server import WyomingServer

_LOGGER = logging.getLogger(__name__)

TTS_CHUNK_SAMPLES: Final = 4096
"""Samples per outgoing ``audio-chunk`` (about 0.19 s at 22.05 kHz)."""
CONVERT_IN_THREAD_BYTES: Final = 64 * 1024
"""Audio payloads larger than this are converted in a worker thread."""
TIMEOUT_POLL_S: Final = 1.0
"""How often a connection re-checks whether a timeout applies (its state changes)."""

Job = Callable[[], Awaitable[None]]


# ---------------------------------------------------------------- streams


@dataclass
class _Listening:
    """An ``audio-start`` … ``audio-stop`` stream to transcribe."""

    pipeline: EndpointingPipeline | None
    pcm: PcmConverter
    streamed: str = ""
    """Text already sent as ``transcript-chunk``."""
    stream_started: bool = False
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    """The ``transcript`` (or an ``error``) went out: the turn is over."""

    @property
    def rejected(self) -> bool:
        """Refused (bad format, too long): its chunks are dropped until ``audio-stop``."""
        return self.pipeline is None


@dataclass
class _Detecting:
    """A wake-word stream."""

    session: WakeSession | None
    pcm: PcmConverter
    detected: bool = False

    @property
    def rejected(self) -> bool:
        return self.session is None


@dataclass
class _Speaking:
    """An open ``synthesize-start`` … ``synthesize-stop`` request."""

    feed: TextFeed
    """Streamed text for the speak pipeline (bounded by ``max_input_chars`` unspoken)."""
    stop_received: asyncio.Event = field(default_factory=asyncio.Event)
    rejected: bool = False
    """Text came faster than it was spoken: the rest of the chunks are dropped."""


@dataclass
class _AudioOut:
    """One outgoing audio stream: ``audio-start``, chunks, ``audio-stop``."""

    rate_hz: int | None = None
    """Set once ``audio-start`` went out; every chunk uses this format."""
    timestamp_ms: int = 0


_REJECTED: Final = object()
"""A ``transcribe`` that was answered with an error: its audio is dropped."""


# -------------------------------------------------------------- connection


class WyomingConnection:
    """One client: reads events, answers inline or through its job queue.

    Event-loop only. ``idle_timeout=False`` (the stdio client) never closes
    the connection for silence.
    """

    def __init__(
        self,
        server: WyomingServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        *,
        idle_timeout: bool = True,
    ) -> None:
        self.server = server
        self.hub = server.hub
        self.reader = reader
        self._read_ahead: asyncio.Task[Event | None] | None = None
        """The read of the next event, started while this one is handled."""
        self.writer = writer
        self.peer = peer
        self._idle_timeout = idle_timeout
        self._write_lock = asyncio.Lock()
        self._jobs: asyncio.Queue[Job | None] = asyncio.Queue()
        self._pending = 0
        """Jobs queued or running (bounded by ``max_pending_per_client``)."""
        self._programs: dict[EngineKind, str] = {}
        self._transcribe: tuple[LoadedModel[AsrEngine], TranscribeOptions] | object | None = None
        self._detect: list[LoadedModel[WakeEngine]] | None = None
        self._listening: _Listening | None = None
        self._detecting: _Detecting | None = None
        self._speaking: _Speaking | None = None
        self._last_event = time.monotonic()

    # ------------------------------------------------------------ plumbing

    @property
    def idle(self) -> bool:
        """Nothing queued, running or open."""
        return not self._pending and not self._streaming

    @property
    def _streaming(self) -> bool:
        return (
            self._listening is not None or self._detecting is not None or self._speaking is not None
        )

    @property
    def _server_endpointing(self) -> bool:
        """The server ends utterances (``[wyoming] endpointing`` and a VAD model)."""
        return self.server.settings.wyoming.endpointing == "server" and bool(
            self.hub.models(EngineKind.VAD)
        )

    @property
    def _limits(self) -> Any:
        return self.server.settings.limits

    async def send(self, *events: Eventable | Event) -> None:
        async with self._write_lock:
            for item in events:
                event = item if isinstance(item, Event) else item.event()
                await async_write_event(event, self.writer)

    async def send_error(self, exc: EdgeVoiceError) -> None:
        event = error_event(exc)
        _LOGGER.info("Wyoming client %s: %s (%s)", self.peer, event.text, event.code)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(event)

    def _read_timeout_s(self) -> float | None:
        """How long the client may stay silent now; ``None``: no limit."""
        if self._streaming:
            return float(self._limits.session_timeout_s)
        if self._pending:
            return None  # the client waits for our answer
        return float(self._limits.idle_timeout_s) if self._idle_timeout else None

    async def _watchdog(self) -> None:
        """Close the connection once the client was silent longer than allowed."""
        while True:
            limit = self._read_timeout_s()
            wait_s = TIMEOUT_POLL_S
            if limit is not None:
                left = limit - (time.monotonic() - self._last_event)
                if left <= 0:
                    _LOGGER.debug("Wyoming client %s: silent for %.0f s, closing", self.peer, limit)
                    self.writer.close()  # the reader sees the end of the stream
                    return
                wait_s = min(wait_s, left)
            await asyncio.sleep(wait_s)

    async def run(self) -> None:
        worker = asyncio.create_task(self._job_worker(), name=f"wyoming-jobs-{self.peer}")
        watchdog = asyncio.create_task(self._watchdog(), name=f"wyoming-timeout-{self.peer}")
        bad = 0
        ahead = asyncio.create_task(read_event(self.reader))
        try:
            while True:
                try:
                    event = await ahead
                except ProtocolError as exc:
                    await self.send_error(exc)
                    bad += 1
                    if exc.fatal or bad >= MAX_BAD_EVENTS:
                        break
                    ahead = asyncio.create_task(read_event(self.reader))
                    continue
                if event is None:
                    break
                bad = 0
                self._last_event = time.monotonic()
                # Read one event ahead while this one is handled: whether it is
                # complete already tells that the client is ahead of us. The
                # yield also gives other connections a turn after each event
                # (a flood of buffered events must not hold the loop).
                ahead = self._read_ahead = asyncio.create_task(read_event(self.reader))
                await asyncio.sleep(0)
                try:
                    await self._dispatch(event)
                except ProtocolError as exc:
                    await self.send_error(exc)
                    if exc.fatal:
                        break
                except EdgeVoiceError as exc:
                    await self.send_error(exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            _LOGGER.debug("Wyoming client %s went away", self.peer)
        finally:
            self._read_ahead = None
            if not ahead.done():
                ahead.cancel()
            with contextlib.suppress(
                asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, ProtocolError
            ):
                await ahead
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            await self._close_streams()
            # Let queued work finish only if the client is still there to get it.
            self._jobs.put_nowait(None)
            if self.writer.is_closing():
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await worker
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                await self.writer.wait_closed()

    async def _close_streams(self) -> None:
        """Release every open stream's sessions (never raises)."""
        listening, self._listening = self._listening, None
        if listening is not None and listening.pipeline is not None:
            await listening.pipeline.aclose()
        detecting, self._detecting = self._detecting, None
        if detecting is not None and detecting.session is not None:
            await detecting.session.aclose()
        speaking, self._speaking = self._speaking, None
        if speaking is not None:
            speaking.rejected = True
            speaking.feed.close()
            speaking.stop_received.set()

    def _enqueue(self, job: Job) -> None:
        """Queue a job; :class:`BusyError` beyond ``max_pending_per_client``."""
        limit = self._limits.max_pending_per_client
        if self._pending >= limit:
            raise BusyError(
                f"{limit} requests already pending on this connection "
                "(limits.max_pending_per_client)"
            )
        self._pending += 1
        self._jobs.put_nowait(job)

    async def _job_worker(self) -> None:
        while True:
            job = await self._jobs.get()
            if job is None:
                return
            try:
                await job()
            except EdgeVoiceError as exc:
                if isinstance(exc, ShuttingDownError) or not isinstance(exc, ClientError):
                    _LOGGER.warning("Wyoming client %s: request failed: %s", self.peer, exc)
                await self.send_error(exc)
            except ConnectionError:
                _LOGGER.debug("Wyoming client %s went away during a request", self.peer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one line, no traceback storm; details at DEBUG
                if self.writer.is_closing():
                    _LOGGER.debug("Wyoming client %s went away during a request", self.peer)
                else:
                    _LOGGER.error("Wyoming client %s: request failed: %r", self.peer, exc)
                    _LOGGER.debug("Traceback", exc_info=True)
                    await self.send_error(EngineError(f"request failed: {exc}"))
            finally:
                self._pending -= 1

    # ------------------------------------------------------------ dispatch

    async def _dispatch(self, event: Event) -> None:
        handler = _HANDLERS.get(event.type)
        if handler is None:
            _LOGGER.debug("Wyoming client %s: ignoring event %s", self.peer, event.type)
            return
        check_fields(event)
        await handler(self, event)

    async def _on_describe(self, event: Event) -> None:
        stored = await asyncio.to_thread(self.hub.library.voices)
        await self.send(
            build_info(self.hub, server_endpointing=self._server_endpointing, library_voices=stored)
        )

    async def _on_ping(self, event: Event) -> None:
        await self.send(Pong(text=Ping.from_event(event).text))

    async def _on_select_program(self, event: Event) -> None:
        name = SelectProgram.from_event(event).name
        found = False
        for kind in (EngineKind.ASR, EngineKind.TTS, EngineKind.WAKE):
            if name in programs(self.hub.models(kind)):
                self._programs[kind] = name
                found = True
        if not found:
            raise ProtocolError(f"unknown program {name!r}", "unknown-program")

    def _model(self, kind: EngineKind, name: str | None) -> LoadedModel[Any]:
        """A model by public name, within the selected program if there is one."""
        program = self._programs.get(kind)
        if program is None:
            return self.hub.get(kind, name)
        models = programs(self.hub.models(kind)).get(program, [])
        if not models:
            raise UnknownModelError(kind, name or "(default)")
        if not name:
            return next((m for m in models if m.default), models[0])
        model = self.hub.get(kind, name)
        if model not in models:
            raise UnknownModelError(kind, name, [m.name for m in models])
        return model

    # ------------------------------------------------------------------ ASR

    async def _on_transcribe(self, event: Event) -> None:
        request = Transcribe.from_event(event)
        self._detect = None
        self._transcribe = _REJECTED  # until resolved: its audio is dropped
        model: LoadedModel[AsrEngine] = self._model(EngineKind.ASR, request.name)
        self._transcribe = (model, self._transcribe_options(model, request))

    def _transcribe_options(
        self, model: LoadedModel[AsrEngine], request: Transcribe
    ) -> TranscribeOptions:
        caps = model.engine.capabilities
        language = None
        if request.language:
            language = base_language(request.language)
            if language not in caps.languages:
                raise ProtocolError(
                    f"model {model.name!r} does not recognise language {request.language!r}",
                    "unsupported-language",
                )
        hints = [*(request.transcript_names or ()), *(request.transcript_terms or ())]
        prompt = ", ".join(hints) if hints and caps.prompt else None
        return TranscribeOptions(language=language, prompt=prompt)

    async def _on_audio_start(self, event: Event) -> None:
        start = AudioStart.from_event(event)
        if self._listening is not None or self._detecting is not None:
            raise ProtocolError("audio-start while audio is already streaming", "unexpected-event")
        if self._detect is not None:
            models, self._detect = self._detect, None
            self._detecting = _Detecting(None, PcmConverter(16000))
            PcmConverter.check_format(start.rate, start.width, start.channels)
            self._detecting = await self._start_detecting(models)
            return
        request, self._transcribe = self._transcribe, None
        self._listening = _Listening(None, PcmConverter(16000))
        PcmConverter.check_format(start.rate, start.width, start.channels)
        if request is _REJECTED:
            return
        if request is None:
            model: LoadedModel[AsrEngine] = self._model(EngineKind.ASR, None)
            request = (model, TranscribeOptions())
        assert isinstance(request, tuple)
        self._listening = await self._start_listening(*request)

    async def _start_listening(
        self, model: LoadedModel[AsrEngine], options: TranscribeOptions
    ) -> _Listening:
        settings = self.server.settings
        vad = self.hub.vad_session() if self.hub.models(EngineKind.VAD) else None
        asr = self.hub.asr_session(model, options, max_audio_s=settings.limits.max_audio_s)
        listening = _Listening(None, PcmConverter(asr.rate_hz))

        async def on_event(event: PipelineEvent) -> None:
            await self._on_pipeline_event(listening, event)

        wyoming = settings.wyoming
        config = EndpointConfig(trailing_silence_s=wyoming.end_of_speech_s)
        if vad is not None and self._server_endpointing:
            config = EndpointConfig(
                trailing_silence_s=min(wyoming.end_of_speech_s, wyoming.finish_silence_s),
                finish_silence_s=wyoming.finish_silence_s,
                complete_sentence_silence_s=wyoming.complete_sentence_silence_s,
                min_speech_s=wyoming.min_speech_s,
                max_utterance_s=wyoming.max_utterance_s,
                no_speech_timeout_s=wyoming.max_utterance_s,
                # A recording sent faster than real time ends at audio-stop.
                end_only_when_paced=True,
            )
        pipeline = EndpointingPipeline(asr, vad, on_event, config)
        await pipeline.__aenter__()
        listening.pipeline = pipeline
        return listening

    async def _on_audio_chunk(self, event: Event) -> None:
        chunk = AudioChunk.from_event(event)
        if self._listening is None and self._detecting is None and self._detect is not None:
            # Wake word clients may stream without audio-start.
            models, self._detect = self._detect, None
            self._detecting = _Detecting(None, PcmConverter(16000))
            self._detecting = await self._start_detecting(models)
        if self._listening is not None:
            await self._listen_chunk(self._listening, chunk)
        elif self._detecting is not None:
            await self._detect_chunk(self._detecting, chunk)
        else:
            raise ProtocolError("audio-chunk before audio-start", "no-audio-start")

    async def _convert(self, pcm: PcmConverter, chunk: AudioChunk) -> FloatAudio:
        PcmConverter.check_format(chunk.rate, chunk.width, chunk.channels)
        if len(chunk.audio) > CONVERT_IN_THREAD_BYTES:
            return await asyncio.to_thread(
                pcm.convert, chunk.audio, chunk.rate, chunk.width, chunk.channels
            )
        return pcm.convert(chunk.audio, chunk.rate, chunk.width, chunk.channels)

    async def _listen_chunk(self, listening: _Listening, chunk: AudioChunk) -> None:
        pipeline = listening.pipeline
        if pipeline is None or pipeline.utterances or listening.answered.is_set():
            return  # refused, or the server ended the turn: drained until audio-stop
        try:
            PcmConverter.check_format(chunk.rate, chunk.width, chunk.channels)
            # Refused as soon as the declared length crosses max_audio_s, before converting.
            pipeline.check_room(len(chunk.audio) / (chunk.rate * chunk.width * chunk.channels))
            samples = await self._convert(listening.pcm, chunk)
            # More audio already waiting in the socket: the client is ahead of us
            # (a recording sent at once, or we fell behind): no guesses now.
            ahead = self._read_ahead
            pipeline.backlogged = ahead is not None and ahead.done()
            await pipeline.feed(samples)
        except ClientError:
            listening.pipeline = None  # drop the rest until audio-stop
            await pipeline.aclose()
            raise

    async def _on_audio_stop(self, event: Event) -> None:
        if self._listening is not None:
            listening, self._listening = self._listening, None
            pipeline = listening.pipeline
            if pipeline is None:
                return
            try:
                tail = listening.pcm.flush()
                if len(tail) and not pipeline.utterances and not listening.answered.is_set():
                    await pipeline.feed(tail)
                if pipeline.utterances or listening.answered.is_set():
                    # The server ended the turn: its transcript is out or on its way.
                    self._enqueue(lambda: self._after_the_turn(listening, pipeline))
                else:
                    self._enqueue(lambda: self._finish_listening(pipeline))
            except BaseException:
                await pipeline.aclose()
                raise
        elif self._detecting is not None:
            detecting, self._detecting = self._detecting, None
            if detecting.session is not None:
                await detecting.session.aclose()
                if not detecting.detected:
                    await self.send(NotDetected())
        elif self._detect is not None:
            self._detect = None
            await self.send(NotDetected())
        else:
            raise ProtocolError("audio-stop before audio-start", "no-audio-start")

    async def _finish_listening(self, pipeline: EndpointingPipeline) -> None:
        try:
            await pipeline.finish()  # the transcript goes out as a pipeline event
        finally:
            await pipeline.aclose()

    async def _after_the_turn(self, listening: _Listening, pipeline: EndpointingPipeline) -> None:
        try:
            await listening.answered.wait()
        finally:
            await pipeline.aclose()

    async def _on_pipeline_event(self, listening: _Listening, event: PipelineEvent) -> None:
        if listening.answered.is_set():
            return  # one transcript per turn; what follows it is drained
        pipeline = listening.pipeline
        if (
            pipeline is not None
            and pipeline.utterances
            and not isinstance(event, FinalTranscript | DecodeFailed)
        ):
            return  # the turn is over: no events of a next utterance
        if isinstance(event, NoSpeech):
            # Server endpointing and nobody spoke: end the turn with no text.
            listening.answered.set()
            await self.send(WyomingTranscript(text=""), TranscriptStop())
        elif isinstance(event, DecodeFailed):
            listening.answered.set()
            error = event.error
            await self.send_error(
                error if isinstance(error, EdgeVoiceError) else EngineError(str(error))
            )
        elif isinstance(event, SpeechStarted):
            await self.send(VoiceStarted(timestamp=event.timestamp_ms))
        elif isinstance(event, SpeechStopped):
            await self.send(VoiceStopped(timestamp=event.timestamp_ms))
        elif isinstance(event, PartialTranscript):
            await self._stream_text(listening, event.transcript)
        elif isinstance(event, FinalTranscript):
            transcript = event.transcript
            await self._stream_text(listening, transcript)
            listening.answered.set()
            await self.send(
                WyomingTranscript(text=transcript.text, language=transcript.language),
                TranscriptStop(),
            )

    async def _stream_text(self, listening: _Listening, transcript: Transcript) -> None:
        """Send the part of ``transcript`` not streamed yet as ``transcript-chunk``."""
        events: list[Eventable] = []
        if not listening.stream_started:
            listening.stream_started = True
            events.append(TranscriptStart(language=transcript.language))
        text = transcript.text
        if text.startswith(listening.streamed) and len(text) > len(listening.streamed):
            events.append(TranscriptChunk(text=text[len(listening.streamed) :]))
            listening.streamed = text
        if events:
            await self.send(*events)

    # ----------------------------------------------------------------- wake

    async def _on_detect(self, event: Event) -> None:
        detect = Detect.from_event(event)
        self._transcribe = None
        self._detect = None
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
            raise UnknownModelError(EngineKind.WAKE, "(any)")
        self._detect = models

    async def _start_detecting(self, models: list[LoadedModel[WakeEngine]]) -> _Detecting:
        session = self.hub.wake_session(models)
        await session.__aenter__()
        return _Detecting(session, PcmConverter(session.rate_hz))

    async def _detect_chunk(self, detecting: _Detecting, chunk: AudioChunk) -> None:
        session = detecting.session
        if session is None:
            return
        try:
            samples = await self._convert(detecting.pcm, chunk)
            found = await session.process(samples, detecting.pcm.target_hz) if len(samples) else []
        except EdgeVoiceError:
            # Bad audio, or the wake word went away in a reload: say so once,
            # drop the rest of the stream until audio-stop.
            detecting.session = None
            await session.aclose()
            raise
        for detection in found:
            detecting.detected = True
            await self.send(Detection(name=detection.name, timestamp=detection.timestamp_ms))

    # ------------------------------------------------------------------ TTS

    async def _voice_options(self, voice: Any) -> SynthesizeOptions:
        """A stored voice (library id) is cloned by the cloning model; others as below."""
        name = getattr(voice, "name", None) if voice is not None else None
        if self.hub.is_stored_voice(name):
            return await self.hub.resolve_voice(SynthesizeOptions(voice=name))
        return self._synthesize_options(voice)

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
            wanted = base_language(language)
            for model, info in self.hub.all_voices():
                if program is not None and model.slot.plugin.name != program:
                    continue
                if any(base_language(lang) == wanted for lang in info.languages):
                    name = info.name
                    break
            else:
                raise UnknownModelError(EngineKind.TTS, f"(language {language})")
        elif program is not None:
            name = self._model(EngineKind.TTS, None).name
        return SynthesizeOptions(voice=name or None, speaker=speaker or None)

    async def _on_synthesize(self, event: Event) -> None:
        if self._speaking is not None:
            # Inside synthesize-start/stop the full text is repeated for old
            # servers; the streamed chunks already carry it.
            return
        request = Synthesize.from_event(event)
        # The voice is resolved and the length checked now, before any work.
        options = await self._voice_options(request.voice)
        speech = speak(self.hub, request.text, options, self._limits)

        async def job() -> None:
            async with speech:
                out = _AudioOut()
                await self._stream_speech(out, speech)
                await self._end_audio(out, speech, empty_ok=False)

        self._enqueue(job)

    async def _on_synthesize_start(self, event: Event) -> None:
        request = SynthesizeStart.from_event(event)
        if self._speaking is not None:
            raise ProtocolError("synthesize-start while a synthesis is open", "unexpected-event")
        feed = TextFeed(self._limits.max_input_chars)
        options = await self._voice_options(request.voice)
        speech = speak(self.hub, feed, options, self._limits)
        speaking = _Speaking(feed)

        async def job() -> None:
            async with speech:
                out = _AudioOut()
                await self._stream_speech(out, speech)
                await self._end_audio(out, speech, empty_ok=True)
            await speaking.stop_received.wait()
            await self.send(SynthesizeStopped())

        self._enqueue(job)
        self._speaking = speaking

    async def _on_synthesize_chunk(self, event: Event) -> None:
        chunk = SynthesizeChunk.from_event(event)
        speaking = self._speaking
        if speaking is None:
            raise ProtocolError("synthesize-chunk before synthesize-start", "unexpected-event")
        if speaking.rejected:
            return
        try:
            speaking.feed.put(chunk.text)
        except LimitExceededError:
            # Text arrives faster than it is spoken: what was taken is still
            # spoken, the rest is refused (once) and dropped.
            speaking.rejected = True
            speaking.feed.close()
            raise

    async def _on_synthesize_stop(self, event: Event) -> None:
        speaking, self._speaking = self._speaking, None
        if speaking is None:
            raise ProtocolError("synthesize-stop before synthesize-start", "unexpected-event")
        speaking.feed.close()
        speaking.stop_received.set()

    async def _stream_speech(self, out: _AudioOut, speech: Speech) -> None:
        async for audio in speech:
            if out.rate_hz is None:
                out.rate_hz = speech.rate_hz
                await self.send(AudioStart(rate=out.rate_hz, width=2, channels=1, timestamp=0))
            samples = audio.samples
            for i in range(0, len(samples), TTS_CHUNK_SAMPLES):
                piece = samples[i : i + TTS_CHUNK_SAMPLES]
                await self.send(
                    AudioChunk(
                        rate=out.rate_hz,
                        width=2,
                        channels=1,
                        audio=float_to_pcm16(piece),
                        timestamp=out.timestamp_ms,
                    )
                )
                out.timestamp_ms += len(piece) * 1000 // out.rate_hz

    async def _end_audio(self, out: _AudioOut, speech: Speech, *, empty_ok: bool) -> None:
        if out.rate_hz is None:
            if not empty_ok:
                raise UnsupportedRequestError("text produced no speech")
            # Keep the event sequence clients expect even with no text.
            out.rate_hz = speech.rate_hz
            await self.send(AudioStart(rate=out.rate_hz, width=2, channels=1, timestamp=0))
        await self.send(AudioStop(timestamp=out.timestamp_ms))


_Handler = Callable[[WyomingConnection, Event], Awaitable[None]]
_HANDLERS: dict[str, _Handler] = {
    Describe().event().type: WyomingConnection._on_describe,
    "ping": WyomingConnection._on_ping,
    "select-program": WyomingConnection._on_select_program,
    "transcribe": WyomingConnection._on_transcribe,
    "audio-start": WyomingConnection._on_audio_start,
    "audio-chunk": WyomingConnection._on_audio_chunk,
    "audio-stop": WyomingConnection._on_audio_stop,
    "detect": WyomingConnection._on_detect,
    "synthesize": WyomingConnection._on_synthesize,
    "synthesize-start": WyomingConnection._on_synthesize_start,
    "synthesize-chunk": WyomingConnection._on_synthesize_chunk,
    "synthesize-stop": WyomingConnection._on_synthesize_stop,
}
