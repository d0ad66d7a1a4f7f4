"""Engine contracts: what every ASR, TTS, wake-word and VAD plugin implements.

Engines know nothing about asyncio, sockets or protocols. Every method here is
*blocking* and is called by :class:`edgevoice.hub.EngineHub` from a worker
thread. Per-request state lives in stream/session objects, so one loaded model
serves every connection.

Audio crossing this boundary is always mono ``float32`` in ``[-1, 1]`` as a
numpy array; the sample rate is the engine's declared ``sample_rate_hz``
(ASR, wake and VAD engines receive audio at their rate, TTS engines produce
audio at theirs). Conversion happens once, in :mod:`edgevoice.audio`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from edgevoice.errors import UnsupportedRequestError

if TYPE_CHECKING:
    from edgevoice.config import ModelConfig

FloatAudio = npt.NDArray[np.float32]
"""Mono float32 samples in [-1, 1]."""

Task = Literal["transcribe", "translate"]


class EngineKind(enum.StrEnum):
    ASR = "asr"
    TTS = "tts"
    WAKE = "wake"
    VAD = "vad"


# Engines raise these two from the shared taxonomy (edgevoice.errors).
EngineRequestError = UnsupportedRequestError
"""The request cannot be served by this engine (a client-side fault)."""


class EngineOptions(BaseModel):
    """Base for each engine's own options table (``[asr.options]`` etc.)."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------- ASR


@dataclass(frozen=True, slots=True)
class AsrCapabilities:
    languages: tuple[str, ...]
    """ISO 639-1 codes the model recognises."""
    sample_rate_hz: int = 16000
    translate: bool = False
    """Can translate speech to English (``task="translate"``)."""
    word_timestamps: bool = False
    streaming: bool = False
    """Emits partial text while audio is still arriving."""
    prompt: bool = False
    """Honours ``prompt``/``hotwords`` hints."""


@dataclass(frozen=True, slots=True)
class TranscribeOptions:
    language: str | None = None
    """ISO 639-1 code; ``None`` detects the language."""
    task: Task = "transcribe"
    prompt: str | None = None
    """Initial prompt: earlier text or vocabulary the model should expect."""
    hotwords: str | None = None
    beam_size: int | None = None
    """``None`` uses the engine's configured default."""
    temperature: float | None = None
    word_timestamps: bool = False
    vad_filter: bool | None = None


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start_s: float
    end_s: float
    probability: float = 1.0


@dataclass(frozen=True, slots=True)
class Segment:
    id: int
    start_s: float
    end_s: float
    text: str
    words: tuple[Word, ...] = ()
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    compression_ratio: float = 1.0
    tokens: tuple[int, ...] = ()
    language: str | None = None
    """Language the engine tagged this segment with (SenseVoice tags each one)."""
    emotion: str | None = None
    """Speech emotion the engine recognised (``happy``, ``sad``, ``angry``, ``neutral``, ...)."""
    events: tuple[str, ...] = ()
    """Audio events the engine tagged (``speech``, ``bgm``, ``applause``, ``laughter``, ...)."""


@dataclass(frozen=True, slots=True)
class TranscriptInfo:
    """What is known before the first segment is decoded."""

    language: str
    language_probability: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str
    language: str
    duration_s: float
    segments: tuple[Segment, ...] = ()
    language_probability: float = 1.0
    emotion: str | None = None
    """The emotion of the first segment that has one (engines that recognise emotion)."""
    events: tuple[str, ...] = ()
    """Every audio event tagged in any segment, in order of first appearance."""

    @classmethod
    def from_segments(cls, info: TranscriptInfo, segments: Sequence[Segment]) -> Transcript:
        return cls(
            text=join_segment_text(segments),
            language=info.language,
            duration_s=info.duration_s,
            segments=tuple(segments),
            language_probability=info.language_probability,
            emotion=next((s.emotion for s in segments if s.emotion), None),
            events=tuple(dict.fromkeys(e for s in segments for e in s.events)),
        )


def join_segment_text(segments: Sequence[Segment]) -> str:
    return "".join(s.text for s in segments).strip()


@runtime_checkable
class AsrEngine(Protocol):
    """Speech-to-text. Blocking; every method runs in a worker thread."""

    @property
    def capabilities(self) -> AsrCapabilities: ...

    def load(self) -> None:
        """Load the model (blocking, may take seconds)."""

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        """Start decoding ``audio`` (mono float32 at ``sample_rate_hz``).

        Returns the info and a *lazy* iterator of segments; the hub consumes
        the iterator in a worker thread, one ``next()`` at a time, so partial
        results can stream to clients.
        """
        ...

    def close(self) -> None:
        """Release the model."""


# --------------------------------------------------------------------- TTS


@dataclass(frozen=True, slots=True)
class VoiceInfo:
    name: str
    languages: tuple[str, ...]
    speakers: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class TtsCapabilities:
    voices: tuple[VoiceInfo, ...]
    sample_rate_hz: int
    streaming: bool = True
    """Yields audio sentence by sentence."""
    cloning: bool = False
    """Accepts a reference voice sample (:class:`VoiceReference`)."""
    instructions: bool = False
    """Honours free-text style instructions."""


@dataclass(frozen=True, slots=True)
class VoiceReference:
    """A reference sample for voice cloning."""

    audio: FloatAudio
    sample_rate_hz: int
    text: str | None = None
    """Transcript of the sample, when known."""
    instruct_text: str | None = None
    voice_id: str | None = None
    """The voice library id when the sample is a stored voice (engines key caches by it)."""


@dataclass(frozen=True, slots=True)
class SynthesizeOptions:
    voice: str | None = None
    """A voice of this engine; ``None`` uses its first voice."""
    speaker: str | None = None
    speed: float = 1.0
    """1.0 is the voice's natural rate; 2.0 twice as fast."""
    instructions: str | None = None
    reference: VoiceReference | None = None
    continuation: bool = False
    """The text continues a stream whose first audio is already out: an engine
    that cuts its first chunk short for a quick start need not."""


@runtime_checkable
class TtsEngine(Protocol):
    """Text-to-speech. Blocking; every method runs in a worker thread."""

    @property
    def capabilities(self) -> TtsCapabilities: ...

    def load(self) -> None: ...

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        """Yield mono float32 audio at ``sample_rate_hz``, one chunk per sentence.

        The generator is lazy: the first chunk is ready as soon as the first
        sentence is synthesized.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class ReleasesMemory(Protocol):
    """Optional, any engine kind: memory an engine keeps while busy, for speed
    (an allocator arena the next request would otherwise fault in again), and
    hands back when idle. The hub calls :meth:`release_memory` in a worker
    thread once the engine has had no call for ``release_memory_after_s``
    (``[settings]``); a request may start while it runs."""

    def release_memory(self) -> None: ...


# -------------------------------------------------------------- wake word


@dataclass(frozen=True, slots=True)
class WakeWordInfo:
    name: str
    phrase: str
    languages: tuple[str, ...] = ("en",)


@dataclass(frozen=True, slots=True)
class WakeCapabilities:
    wake_words: tuple[WakeWordInfo, ...]
    sample_rate_hz: int = 16000


@dataclass(frozen=True, slots=True)
class Detection:
    name: str
    timestamp_ms: int
    """Milliseconds of audio processed by the stream when it fired."""


class WakeStream(Protocol):
    """Per-connection wake-word state."""

    def process(self, audio: FloatAudio) -> list[Detection]:
        """Feed the next chunk (any length); return detections in it."""
        ...


@runtime_checkable
class WakeEngine(Protocol):
    @property
    def capabilities(self) -> WakeCapabilities: ...

    def load(self) -> None: ...

    def start_stream(self, names: Sequence[str] | None = None) -> WakeStream:
        """A fresh detector for ``names`` (all wake words when ``None``)."""
        ...

    def close(self) -> None: ...


# -------------------------------------------------------------------- VAD


@dataclass(frozen=True, slots=True)
class VadCapabilities:
    sample_rate_hz: int = 16000


class VadStream(Protocol):
    def process(self, audio: FloatAudio) -> float | None:
        """Feed the next chunk; return the highest speech probability (0..1)
        of the frames completed by it, or ``None`` when no frame completed."""
        ...


@runtime_checkable
class VadEngine(Protocol):
    @property
    def capabilities(self) -> VadCapabilities: ...

    def load(self) -> None: ...

    def start_stream(self) -> VadStream: ...

    def close(self) -> None: ...


Engine = AsrEngine | TtsEngine | WakeEngine | VadEngine


# ----------------------------------------------------------------- plugins


@dataclass(frozen=True, slots=True)
class EngineContext:
    """What the hub hands an engine factory besides its own options."""

    model: ModelConfig
    device: str
    """Resolved device: ``cpu``, ``cuda``, ``cuda:N`` or ``mlx``."""
    cache_dir: Path
    offline: bool


@dataclass(frozen=True, slots=True)
class EnginePlugin:
    """What an ``edgevoice.engines`` entry point names.

    The entry-point name, this ``name``, the pip extra and the config value
    ``engine = "..."`` are the same string.
    """

    name: str
    kind: EngineKind
    description: str
    factory: Callable[[EngineContext, Any], Engine]
    """Builds an (unloaded) engine from its context and validated options."""
    options_model: type[EngineOptions] = EngineOptions
    requires: tuple[str, ...] = ()
    """Importable module names the engine needs (checked with find_spec)."""
    devices: tuple[str, ...] = ("cpu",)
    """Device families the engine can run on: cpu, cuda, mlx."""
    runtime: str | None = None
    """Library whose view of the GPU decides ``device = "auto"``:
    ``ctranslate2``, ``onnxruntime`` or ``torch``."""
    extra: str | None = None
    """``pip install edgevoice[<extra>]`` installs the requirements."""
    pip_hint: str | None = None
    """Install hint for third-party plugins that are not extras of edgevoice."""

    def install_hint(self) -> str:
        if self.pip_hint:
            return self.pip_hint
        return f"pip install 'edgevoice[{self.extra or self.name}]'"


@dataclass(slots=True)
class PluginStatus:
    plugin: EnginePlugin | None
    entry_point: str
    source: str
    """Distribution that registered the entry point."""
    missing: list[str] = field(default_factory=list)
    error: str | None = None
    """Set when the plugin itself failed to import."""

    @property
    def available(self) -> bool:
        return self.plugin is not None and not self.missing and self.error is None
