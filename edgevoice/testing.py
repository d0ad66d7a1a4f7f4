"""For plugin authors and our own tests: fake engines and a conformance suite.

Fake engines (registered as the ``test-asr`` and ``test-tts`` engine plugins)
need no model and run anywhere. They are deterministic stand-ins, named as
such, used to test protocol behaviour that no installable model offers (voice
cloning) and to exercise error paths.

Conformance: call :func:`check_asr_engine` / :func:`check_tts_engine` /
:func:`check_wake_engine` / :func:`check_vad_engine` on your *loaded* engine
in your own test suite, or subclass :class:`AsrEngineConformance` etc. in a
pytest module and provide an ``engine`` fixture.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pydantic import Field

from edgevoice.engines.base import (
    AsrCapabilities,
    AsrEngine,
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
    TtsEngine,
    VadCapabilities,
    VadEngine,
    VoiceInfo,
    WakeEngine,
    WakeStream,
    Word,
)
from edgevoice.engines.registry import EngineRegistry, default_registry
from edgevoice.text import split_sentences

# ------------------------------------------------------------- fake ASR


class FakeAsrOptions(EngineOptions):
    text: str = "this is a fake transcript"
    """What every transcription returns (words spread evenly over the audio)."""
    languages: list[str] = Field(default_factory=lambda: ["en"])
    translate: bool = False
    fail: bool = False
    """Raise on transcribe: exercises engine-failure paths."""
    load_gate: str = ""
    """Name of a :data:`LOAD_GATES` event ``load()`` waits for (a slow load, bounded
    by :data:`LOAD_GATE_MAX_S`); empty loads at once."""
    fail_load: str = ""
    """When set, ``load()`` raises ``RuntimeError`` with this text."""


LOAD_GATES: dict[str, threading.Event] = {}
"""Events fake engines' ``load()`` waits for (``FakeAsrOptions.load_gate``): a
test sets one to finish a "slow" load exactly when it wants."""
LOAD_GATE_MAX_S = 60.0
"""Longest a gated fake load waits before it fails (a test that never opens it)."""


class FakeAsrEngine:
    """Stand-in ASR: returns the configured text; timestamps follow the audio length."""

    def __init__(self, options: FakeAsrOptions | None = None) -> None:
        self.options = options or FakeAsrOptions()
        self.loaded = False
        self.calls: list[TranscribeOptions] = []

    @property
    def capabilities(self) -> AsrCapabilities:
        return AsrCapabilities(
            languages=tuple(self.options.languages),
            translate=self.options.translate,
            word_timestamps=True,
            streaming=True,
            prompt=True,
        )

    def load(self) -> None:
        """Blocking: waits for the ``load_gate`` event when one is named."""
        if self.options.load_gate:
            gate = LOAD_GATES.setdefault(self.options.load_gate, threading.Event())
            if not gate.wait(LOAD_GATE_MAX_S):
                raise RuntimeError(f"load gate {self.options.load_gate!r} never opened")
        if self.options.fail_load:
            raise RuntimeError(self.options.fail_load)
        self.loaded = True

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        if self.options.fail:
            raise RuntimeError("fake engine failure")
        if options.task == "translate" and not self.options.translate:
            raise EngineRequestError("fake model cannot translate")
        self.calls.append(options)
        duration = len(audio) / self.capabilities.sample_rate_hz
        info = TranscriptInfo(options.language or self.options.languages[0], 1.0, duration)
        return info, self._segments(duration)

    def _segments(self, duration: float) -> Iterator[Segment]:
        words = self.options.text.split()
        if not words or duration <= 0:
            return
        step = duration / len(words)
        half = max(1, len(words) // 2)
        for seg_id, group in enumerate((words[:half], words[half:])):
            if not group:
                continue
            offset = 0 if seg_id == 0 else half
            timed = tuple(
                Word(" " + w, (offset + i) * step, (offset + i + 1) * step)
                for i, w in enumerate(group)
            )
            yield Segment(
                id=seg_id,
                start_s=timed[0].start_s,
                end_s=timed[-1].end_s,
                text=" " + " ".join(group),
                words=timed,
            )

    def close(self) -> None:
        self.loaded = False


# ------------------------------------------------------------- fake TTS


class FakeTtsOptions(EngineOptions):
    voices: list[str] = Field(default_factory=lambda: ["fake"])
    speakers: list[str] = Field(default_factory=list)
    sample_rate_hz: int = Field(default=24000, ge=8000, le=48000)
    cloning: bool = False
    """Declare voice cloning: with a reference the tone is 440 Hz instead of 220 Hz."""
    seconds_per_char: float = Field(default=0.01, gt=0)


class FakeTtsEngine:
    """Stand-in TTS: a sine tone per sentence, length proportional to its text.

    220 Hz normally, 440 Hz when a cloning reference is given, so tests can
    tell that the reference reached the engine.
    """

    PLAIN_HZ = 220.0
    CLONED_HZ = 440.0

    def __init__(self, options: FakeTtsOptions | None = None) -> None:
        self.options = options or FakeTtsOptions()
        self.loaded = False
        self.calls: list[tuple[str, SynthesizeOptions]] = []

    @property
    def capabilities(self) -> TtsCapabilities:
        return TtsCapabilities(
            voices=tuple(
                VoiceInfo(v, ("en",), speakers=tuple(self.options.speakers))
                for v in self.options.voices
            ),
            sample_rate_hz=self.options.sample_rate_hz,
            streaming=True,
            cloning=self.options.cloning,
            instructions=True,
        )

    def load(self) -> None:
        self.loaded = True

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        if not text.strip():
            raise EngineRequestError("text is empty")
        if options.voice is not None and options.voice not in self.options.voices:
            raise EngineRequestError(f"unknown voice {options.voice!r}")
        if options.reference is not None and not self.options.cloning:
            raise EngineRequestError("this engine cannot clone voices")
        self.calls.append((text, options))
        freq = self.CLONED_HZ if options.reference is not None else self.PLAIN_HZ
        rate = self.options.sample_rate_hz
        for sentence in split_sentences(text):
            seconds = max(0.1, len(sentence) * self.options.seconds_per_char / options.speed)
            t = np.arange(round(seconds * rate), dtype=np.float32) / rate
            yield (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)

    def close(self) -> None:
        self.loaded = False


def _fake_asr_factory(_context: EngineContext, options: Any) -> FakeAsrEngine:
    return FakeAsrEngine(options)


def _fake_tts_factory(_context: EngineContext, options: Any) -> FakeTtsEngine:
    return FakeTtsEngine(options)


FAKE_ASR_PLUGIN = EnginePlugin(
    name="test-asr",
    kind=EngineKind.ASR,
    description="fake ASR for tests and plugin authors (returns configured text)",
    factory=_fake_asr_factory,
    options_model=FakeAsrOptions,
    devices=("cpu",),
    pip_hint="built in (edgevoice.testing)",
)
FAKE_TTS_PLUGIN = EnginePlugin(
    name="test-tts",
    kind=EngineKind.TTS,
    description="fake TTS for tests and plugin authors (sine tones; optional cloning)",
    factory=_fake_tts_factory,
    options_model=FakeTtsOptions,
    devices=("cpu",),
    pip_hint="built in (edgevoice.testing)",
)


def register_fake_engines(registry: EngineRegistry | None = None) -> None:
    """Make ``test-asr`` and ``test-tts`` usable in ``registry`` (the process-wide one).

    They are not entry points, so a production daemon never offers them; a
    test suite (this project's ``conftest.py``, or a plugin author's) calls this.
    """
    registry = registry or default_registry()
    for plugin in (FAKE_ASR_PLUGIN, FAKE_TTS_PLUGIN):
        registry.register(plugin, source="edgevoice.testing")


def tone(seconds: float, rate_hz: int = 16000, freq_hz: float = 440.0) -> FloatAudio:
    t = np.arange(round(seconds * rate_hz), dtype=np.float32) / rate_hz
    return (0.3 * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32)


# ---------------------------------------------------------- conformance


def check_asr_engine(engine: AsrEngine, speech: FloatAudio | None = None) -> None:
    """Assert the ASR contract on a *loaded* engine (raises AssertionError)."""
    caps = engine.capabilities
    assert caps.languages, "capabilities.languages must not be empty"
    assert caps.sample_rate_hz > 0
    audio = speech if speech is not None else tone(1.0, caps.sample_rate_hz)
    info, segments = engine.transcribe(audio, TranscribeOptions())
    assert info.duration_s > 0, "TranscriptInfo.duration_s must be the audio length"
    assert abs(info.duration_s - len(audio) / caps.sample_rate_hz) < 0.1
    collected = list(segments)
    for seg in collected:
        assert isinstance(seg, Segment)
        assert 0 <= seg.start_s <= seg.end_s <= info.duration_s + 0.5
    if caps.word_timestamps:
        _info, timed = engine.transcribe(audio, TranscribeOptions(word_timestamps=True))
        for seg in timed:
            for word in seg.words:
                assert seg.start_s - 0.05 <= word.start_s <= word.end_s <= seg.end_s + 0.05
    if not caps.translate:
        try:
            _i, segs = engine.transcribe(audio, TranscribeOptions(task="translate"))
            list(segs)
        except EngineRequestError:
            pass
        else:
            raise AssertionError("an engine that cannot translate must raise EngineRequestError")


def check_tts_engine(engine: TtsEngine, text: str = "Hello there. How are you today?") -> None:
    """Assert the TTS contract on a *loaded* engine."""
    caps = engine.capabilities
    assert caps.voices, "capabilities.voices must not be empty"
    assert caps.sample_rate_hz > 0
    chunks = list(engine.synthesize(text, SynthesizeOptions(voice=caps.voices[0].name)))
    assert chunks, "synthesize must yield audio"
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.ndim == 1
        assert np.all(np.abs(chunk) <= 1.0)
    if caps.streaming:
        assert len(chunks) >= 2, "a streaming engine yields one chunk per sentence"
    slow = sum(len(c) for c in engine.synthesize(text, SynthesizeOptions(speed=0.5)))
    fast = sum(len(c) for c in engine.synthesize(text, SynthesizeOptions(speed=2.0)))
    assert slow > fast, "speed must change the duration"
    try:
        list(engine.synthesize("", SynthesizeOptions()))
    except EngineRequestError:
        pass
    else:
        raise AssertionError("empty text must raise EngineRequestError")


def check_wake_engine(engine: WakeEngine) -> None:
    caps = engine.capabilities
    assert caps.wake_words, "capabilities.wake_words must not be empty"
    stream: WakeStream = engine.start_stream(None)
    detections: list[Detection] = []
    for _ in range(20):
        detections.extend(stream.process(np.zeros(1600, dtype=np.float32)))
    assert not detections, "silence must not trigger a wake word"


def check_vad_engine(engine: VadEngine) -> None:
    caps: VadCapabilities = engine.capabilities
    stream = engine.start_stream()
    probs = [
        stream.process(np.zeros(caps.sample_rate_hz // 10, dtype=np.float32)) for _ in range(10)
    ]
    values = [p for p in probs if p is not None]
    assert values, "VAD must report a probability for 1 s of audio"
    assert all(0.0 <= p <= 1.0 for p in values)
    assert max(values) < 0.5, "silence must not be speech"


class AsrEngineConformance:
    """Subclass in a pytest module and provide an ``engine`` fixture (loaded)."""

    def test_asr_contract(self, engine: AsrEngine) -> None:
        check_asr_engine(engine)


class TtsEngineConformance:
    def test_tts_contract(self, engine: TtsEngine) -> None:
        check_tts_engine(engine)


class WakeEngineConformance:
    def test_wake_contract(self, engine: WakeEngine) -> None:
        check_wake_engine(engine)


class VadEngineConformance:
    def test_vad_contract(self, engine: VadEngine) -> None:
        check_vad_engine(engine)


__all__: Sequence[str] = [
    "FAKE_ASR_PLUGIN",
    "FAKE_TTS_PLUGIN",
    "AsrEngineConformance",
    "FakeAsrEngine",
    "FakeAsrOptions",
    "FakeTtsEngine",
    "FakeTtsOptions",
    "TtsEngineConformance",
    "VadEngineConformance",
    "WakeEngineConformance",
    "check_asr_engine",
    "check_tts_engine",
    "check_vad_engine",
    "check_wake_engine",
    "tone",
]
