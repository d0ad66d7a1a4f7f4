"""Remote Wyoming engines: ASR, TTS and wake words served by another Wyoming peer.

One engine name, ``wyoming``, for three kinds (``[[asr]]``, ``[[tts]]`` and
``[[wake]]`` entries; the entry point names a plugin per kind), forwards to
another Wyoming server (another edgevoice, or
any Wyoming peer: wyoming-faster-whisper, wyoming-piper, ...). This is how a
Raspberry Pi in each room borrows the GPU box's models::

    [[asr]]
    name = "big-whisper"
    engine = "wyoming"
    model = "large-v3"            # the peer's model name; "default" = the peer's default
    [asr.options]
    uris = ["tcp://gpu-box:10300", "tcp://backup:10300"]

``model`` names the peer's model (ASR), voice (TTS) or wake word (wake);
``default`` lets the peer choose. Each call connects (``connect_timeout_s``)
to the URI that last worked, then to the next ones (``retries`` rounds over
the whole list): a whole-clip transcription and a synthesis that produced no
audio yet are retried on the next URI; a wake-word stream whose peer goes
away mid-stream reconnects to the next URI and goes on with the next audio.
An ``error`` from the peer is not retried: it is the peer's answer.

Blocking, like every engine: each call runs the ``wyoming`` package's async
client in a private event loop in the calling worker thread (a wake stream
keeps its own loop and connection until it is closed). Reads wait at most
``timeout_s`` for each event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Final
from urllib.parse import urlparse

import numpy as np
from pydantic import Field, field_validator
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice
from wyoming.wake import Detect
from wyoming.wake import Detection as WyomingDetection

from edgevoice.audio import float_to_pcm16, pcm_to_float, resample
from edgevoice.engines.base import (
    AsrCapabilities,
    Detection,
    EngineContext,
    EngineKind,
    EngineOptions,
    EnginePlugin,
    EngineRequestError,
    FloatAudio,
    Segment,
    SynthesizeOptions,
    TranscribeOptions,
    TranscriptInfo,
    TtsCapabilities,
    VoiceInfo,
    WakeCapabilities,
    WakeWordInfo,
)

_LOGGER = logging.getLogger(__name__)

CHUNK_S: Final = 0.5
"""Seconds of audio per ``audio-chunk`` sent to the peer."""
DEFAULT_NAME: Final = "default"
"""``model = "default"``: send no name, the peer uses its default."""
_CLIENT_CODES: Final = frozenset(
    {"invalid_request", "bad_audio", "unknown_model", "unsupported", "limit_exceeded"}
)


class RemoteOptions(EngineOptions):
    uris: list[str] = Field(min_length=1, max_length=16)
    """Wyoming peers, ``tcp://HOST:PORT`` or ``unix:///path``, tried in order."""
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    """How long one connection attempt may take."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """How long to wait for each event from the peer."""
    retries: int = Field(default=1, ge=0, le=10)
    """Extra rounds over ``uris`` after every URI failed once."""

    @field_validator("uris")
    @classmethod
    def _check_uris(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            parsed = urlparse(uri)
            if parsed.scheme == "unix" and parsed.path:
                continue
            if parsed.scheme != "tcp" or not parsed.hostname or parsed.port is None:
                raise ValueError(f"{uri!r}: use tcp://HOST:PORT or unix:///path")
        return uris


class RemoteTtsOptions(RemoteOptions):
    sample_rate_hz: int = Field(default=22050, ge=8000, le=48000)
    """The rate this engine yields (the peer's audio is resampled to it)."""


class PeerError(RuntimeError):
    """The peer could not be reached or went away (the next URI is tried)."""


class _Peers:
    """The URIs and which one last worked. Thread-safe."""

    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        self._first = 0
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """Every URI for each round, starting with the one that last worked."""
        uris = self.options.uris
        with self._lock:
            first = self._first
        rotated = uris[first:] + uris[:first]
        return rotated * (self.options.retries + 1)

    def worked(self, uri: str) -> None:
        with self._lock:
            self._first = self.options.uris.index(uri)

    async def connect(self, uri: str) -> AsyncClient:
        client = AsyncClient.from_uri(
            uri, connect_timeout=self.options.connect_timeout_s, read_timeout=self.options.timeout_s
        )
        try:
            await client.connect()
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"{uri}: cannot connect ({exc or type(exc).__name__})") from exc
        return client

    def run(self, attempt: Any) -> Any:
        """Run ``attempt(uri)`` (a coroutine function) on each URI in turn until
        one does not raise :class:`PeerError`; blocking (a private event loop)."""

        async def each() -> Any:
            failures: list[str] = []
            for uri in self.order():
                try:
                    result = await attempt(uri)
                except PeerError as exc:
                    failures.append(str(exc))
                    _LOGGER.info("Wyoming peer failed: %s", exc)
                    continue
                self.worked(uri)
                return result
            raise RuntimeError("no Wyoming peer answered: " + "; ".join(failures))

        return asyncio.run(each())


async def _read(client: AsyncClient, uri: str, *wanted: str) -> Event:
    """The next event of a ``wanted`` type (others skipped); a peer error raises."""
    while True:
        try:
            event = await client.read_event()
        except (OSError, TimeoutError) as exc:
            raise PeerError(f"{uri}: {exc or type(exc).__name__}") from exc
        if event is None:
            raise PeerError(f"{uri}: the peer closed the connection")
        if Error.is_type(event.type):
            error = Error.from_event(event)
            if error.code in _CLIENT_CODES:
                raise EngineRequestError(f"remote: {error.text}")
            raise RuntimeError(f"remote {uri}: {error.text}")
        if event.type in wanted:
            return event


async def _write(client: AsyncClient, uri: str, event: Event) -> None:
    try:
        await client.write_event(event)
    except (OSError, RuntimeError) as exc:
        raise PeerError(f"{uri}: {exc}") from exc


async def _describe(peers: _Peers, uri: str) -> Info:
    client = await peers.connect(uri)
    try:
        await _write(client, uri, Describe().event())
        return Info.from_event(await _read(client, uri, "info"))
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def _name(context: EngineContext) -> str | None:
    model = context.model.model
    return None if model in ("", DEFAULT_NAME) else model


def _pcm_chunks(audio: FloatAudio, rate_hz: int) -> Iterator[bytes]:
    step = max(1, int(CHUNK_S * rate_hz))
    for start in range(0, len(audio), step):
        yield float_to_pcm16(audio[start : start + step])


# ------------------------------------------------------------------ ASR


class RemoteAsrEngine:
    """Transcribes on a Wyoming peer (whole clips; 16 kHz PCM)."""

    def __init__(self, context: EngineContext, options: RemoteOptions) -> None:
        self._peers = _Peers(options)
        self._name = _name(context)
        self._capabilities = AsrCapabilities(languages=())

    @property
    def capabilities(self) -> AsrCapabilities:
        return self._capabilities

    def load(self) -> None:
        """Blocking: ask a peer what it serves (the model's languages)."""
        info: Info = self._peers.run(lambda uri: _describe(self._peers, uri))
        models = [m for program in info.asr for m in program.models]
        chosen = [m for m in models if self._name is None or m.name == self._name]
        if not chosen:
            names = ", ".join(m.name for m in models) or "none"
            raise RuntimeError(f"the peer has no ASR model {self._name!r} (it has: {names})")
        languages = chosen[0].languages if self._name else [x for m in chosen for x in m.languages]
        self._capabilities = AsrCapabilities(languages=tuple(dict.fromkeys(languages)))

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        if options.task == "translate":
            raise EngineRequestError("a remote Wyoming model cannot translate")
        rate = self._capabilities.sample_rate_hz
        duration_s = len(audio) / rate

        async def attempt(uri: str) -> Transcript:
            client = await self._peers.connect(uri)
            try:
                await _write(client, uri, Transcribe(self._name, options.language).event())
                await _write(client, uri, AudioStart(rate=rate, width=2, channels=1).event())
                for pcm in _pcm_chunks(audio, rate):
                    chunk = AudioChunk(rate=rate, width=2, channels=1, audio=pcm)
                    await _write(client, uri, chunk.event())
                await _write(client, uri, AudioStop().event())
                return Transcript.from_event(await _read(client, uri, "transcript"))
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()

        transcript: Transcript = self._peers.run(attempt)
        language = transcript.language or options.language or ""
        info = TranscriptInfo(language, 1.0, duration_s)
        text = transcript.text.strip()
        segments = [Segment(0, 0.0, duration_s, " " + text, language=language)] if text else []
        return info, iter(segments)

    def close(self) -> None:
        """Nothing is held between calls."""


# ------------------------------------------------------------------ TTS


class RemoteTtsEngine:
    """Synthesizes on a Wyoming peer; audio is resampled to ``sample_rate_hz``."""

    def __init__(self, context: EngineContext, options: RemoteTtsOptions) -> None:
        self._peers = _Peers(options)
        self._options = options
        self._name = _name(context)
        self._capabilities = TtsCapabilities(voices=(), sample_rate_hz=options.sample_rate_hz)

    @property
    def capabilities(self) -> TtsCapabilities:
        return self._capabilities

    def load(self) -> None:
        """Blocking: ask a peer for its voices (they become this model's voices)."""
        info: Info = self._peers.run(lambda uri: _describe(self._peers, uri))
        voices = [
            VoiceInfo(
                v.name,
                tuple(v.languages),
                tuple(s.name for s in v.speakers or ()),
                v.description or "",
            )
            for program in info.tts
            for v in program.voices
        ]
        if self._name is not None:
            if all(v.name != self._name for v in voices):
                names = ", ".join(v.name for v in voices) or "none"
                raise RuntimeError(f"the peer has no voice {self._name!r} (it has: {names})")
            # The configured voice first: it is the model's default.
            voices.sort(key=lambda v: v.name != self._name)
        if not voices:
            raise RuntimeError("the peer offers no TTS voice")
        self._capabilities = TtsCapabilities(
            voices=tuple(voices), sample_rate_hz=self._options.sample_rate_hz, streaming=True
        )

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        """All the peer's audio for ``text``, as one chunk (fetched on first ``next``)."""
        if options.reference is not None:
            raise EngineRequestError("a remote Wyoming voice cannot clone a reference")
        voice = options.voice or self._name
        out_rate = self._options.sample_rate_hz

        async def attempt(uri: str) -> FloatAudio:
            client = await self._peers.connect(uri)
            try:
                request = Synthesize(
                    text, SynthesizeVoice(voice, speaker=options.speaker) if voice else None
                )
                await _write(client, uri, request.event())
                parts: list[FloatAudio] = []
                while True:
                    event = await _read(client, uri, "audio-chunk", "audio-stop")
                    if AudioStop.is_type(event.type):
                        break
                    chunk = AudioChunk.from_event(event)
                    if chunk.width != 2 or chunk.channels != 1:
                        raise RuntimeError(f"remote {uri}: unsupported audio format")
                    parts.append(resample(pcm_to_float(chunk.audio, 2), chunk.rate, out_rate))
                return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
            finally:
                with contextlib.suppress(Exception):
                    await client.disconnect()

        yield self._peers.run(attempt)

    def close(self) -> None:
        """Nothing is held between calls."""


# ----------------------------------------------------------------- wake


class RemoteWakeEngine:
    """Detects wake words on a Wyoming peer (one connection per stream)."""

    def __init__(self, context: EngineContext, options: RemoteOptions) -> None:
        self._peers = _Peers(options)
        self._name = _name(context)
        self._capabilities = WakeCapabilities(wake_words=())

    @property
    def capabilities(self) -> WakeCapabilities:
        return self._capabilities

    def load(self) -> None:
        info: Info = self._peers.run(lambda uri: _describe(self._peers, uri))
        words = [
            WakeWordInfo(m.name, m.phrase or m.name, tuple(m.languages))
            for program in info.wake
            for m in program.models
            if self._name is None or m.name == self._name
        ]
        if not words:
            raise RuntimeError(f"the peer has no wake word {self._name or '(any)'!r}")
        self._capabilities = WakeCapabilities(wake_words=tuple(words))

    def start_stream(self, names: Sequence[str] | None = None) -> RemoteWakeStream:
        known = [w.name for w in self._capabilities.wake_words]
        return RemoteWakeStream(self._peers, list(names) if names else known)

    def close(self) -> None:
        """Streams hold their own connections."""


class RemoteWakeStream:
    """One detection stream: a connection (in a private event loop) kept open
    across :meth:`process` calls; a peer that goes away is replaced by the next
    URI on the next call. Not thread-safe (one worker call at a time)."""

    def __init__(self, peers: _Peers, names: list[str]) -> None:
        self._peers = peers
        self._names = names
        self._loop = asyncio.new_event_loop()
        self._client: AsyncClient | None = None
        self._uri = ""
        self._reader: asyncio.Task[None] | None = None
        self._found: list[str] = []
        self._fed_ms = 0
        self._rate_hz = 16000

    async def _open(self) -> None:
        failures: list[str] = []
        for uri in self._peers.order():
            try:
                client = await self._peers.connect(uri)
                await _write(client, uri, Detect(names=self._names).event())
                start = AudioStart(rate=self._rate_hz, width=2, channels=1)
                await _write(client, uri, start.event())
            except PeerError as exc:
                failures.append(str(exc))
                continue
            self._peers.worked(uri)
            self._client, self._uri = client, uri
            self._reader = asyncio.create_task(self._read(client, uri))
            return
        raise RuntimeError("no Wyoming peer answered: " + "; ".join(failures))

    async def _read(self, client: AsyncClient, uri: str) -> None:
        with contextlib.suppress(PeerError):
            while True:
                event = await _read(client, uri, "detection")
                self._found.append(WyomingDetection.from_event(event).name or "")

    async def _lose(self, why: str) -> None:
        _LOGGER.info("Wyoming wake peer %s went away (%s); failing over", self._uri, why)
        await self._drop()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def _feed(self, pcm: bytes) -> list[str]:
        for _round in range(2):
            if self._client is not None and self._reader is not None and self._reader.done():
                await self._lose("it closed the stream")
            if self._client is None:
                await self._open()
            assert self._client is not None
            chunk = AudioChunk(rate=self._rate_hz, width=2, channels=1, audio=pcm)
            try:
                await _write(self._client, self._uri, chunk.event())
                break
            except PeerError as exc:
                await self._lose(str(exc))
        await asyncio.sleep(0.01)  # let the reader take what the peer sent
        found, self._found = self._found, []
        return found

    def process(self, audio: FloatAudio) -> list[Detection]:
        self._fed_ms += len(audio) * 1000 // self._rate_hz
        found = self._loop.run_until_complete(self._feed(float_to_pcm16(audio)))
        return [Detection(name, self._fed_ms) for name in found]

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._drop())
        self._loop.close()


# -------------------------------------------------------------- plugins


def _asr(context: EngineContext, options: Any) -> RemoteAsrEngine:
    return RemoteAsrEngine(context, options)


def _tts(context: EngineContext, options: Any) -> RemoteTtsEngine:
    return RemoteTtsEngine(context, options)


def _wake(context: EngineContext, options: Any) -> RemoteWakeEngine:
    return RemoteWakeEngine(context, options)


_BUILT_IN = "built in (wyoming is a core dependency)"

ASR_PLUGIN = EnginePlugin(
    name="wyoming",
    kind=EngineKind.ASR,
    description="Speech recognition on another Wyoming server (failover across uris)",
    factory=_asr,
    options_model=RemoteOptions,
    requires=("wyoming",),
    pip_hint=_BUILT_IN,
)
TTS_PLUGIN = EnginePlugin(
    name="wyoming",
    kind=EngineKind.TTS,
    description="Speech synthesis on another Wyoming server (failover across uris)",
    factory=_tts,
    options_model=RemoteTtsOptions,
    requires=("wyoming",),
    pip_hint=_BUILT_IN,
)
WAKE_PLUGIN = EnginePlugin(
    name="wyoming",
    kind=EngineKind.WAKE,
    description="Wake words detected by another Wyoming server (failover across uris)",
    factory=_wake,
    options_model=RemoteOptions,
    requires=("wyoming",),
    pip_hint=_BUILT_IN,
)
PLUGINS = (ASR_PLUGIN, TTS_PLUGIN, WAKE_PLUGIN)
"""The ``wyoming`` entry point: one plugin per kind, one name."""
