"""Wake-word (microwakeword) and VAD (silero-vad) engines, directly (no hub)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgevoice.audio import decode, resample
from edgevoice.config import ModelConfig
from edgevoice.engines.base import (
    EngineContext,
    EngineOptions,
    EngineRequestError,
    FloatAudio,
    SynthesizeOptions,
    VadEngine,
    WakeEngine,
)
from edgevoice.engines.microwakeword import MicroWakeWordEngine, MicroWakeWordOptions
from edgevoice.engines.piper import PiperOptions, PiperTtsEngine
from edgevoice.engines.silero_vad import SileroVadEngine
from edgevoice.testing import VadEngineConformance, WakeEngineConformance
from tests.conftest import JOE, LIGHT_EN_WAV


def _context(entry: ModelConfig, cache: Path) -> EngineContext:
    return EngineContext(model=entry, device="cpu", cache_dir=cache, offline=True)


def _wake(name: str, cache: Path) -> MicroWakeWordEngine:
    entry = ModelConfig(name=name, engine="microwakeword", model=name)
    engine = MicroWakeWordEngine(_context(entry, cache), MicroWakeWordOptions())
    engine.load()
    return engine


@pytest.fixture(scope="module")
def piper_16k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FloatAudio]]:
    """Joe saying a wake phrase and a plain command, at 16 kHz."""
    engine = PiperTtsEngine(_context(JOE, tmp_path_factory.mktemp("piper")), PiperOptions())
    engine.load()
    rate = engine.capabilities.sample_rate_hz
    clips = {}
    for key, text in (
        ("wake", "Hey Jarvis, turn on the lights."),
        ("command", "Turn on the kitchen lights."),
    ):
        audio = np.concatenate(list(engine.synthesize(text, SynthesizeOptions())))
        clips[key] = resample(audio, rate, 16000)
    engine.close()
    yield clips


def _feed(engine: WakeEngine, audio: FloatAudio, chunk: int = 1024) -> list[str]:
    stream = engine.start_stream(None)
    found: list[str] = []
    padded = np.concatenate([np.zeros(8000, np.float32), audio, np.zeros(8000, np.float32)])
    for i in range(0, len(padded), chunk):
        found.extend(d.name for d in stream.process(padded[i : i + chunk]))
    return found


class TestMicroWakeWordConformance(WakeEngineConformance):
    @pytest.fixture
    def engine(self, tmp_path: Path) -> WakeEngine:
        return _wake("okay_nabu", tmp_path)


class TestSileroConformance(VadEngineConformance):
    @pytest.fixture
    def engine(self, tmp_path: Path) -> VadEngine:
        entry = ModelConfig(name="silero", engine="silero-vad", model="silero")
        vad = SileroVadEngine(_context(entry, tmp_path), EngineOptions())
        vad.load()
        return vad


def test_builtin_wake_words_describe_their_phrase(tmp_path: Path) -> None:
    phrases = {
        name: _wake(name, tmp_path).capabilities.wake_words[0]
        for name in ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")
    }
    assert {n: w.phrase for n, w in phrases.items()} == {
        "okay_nabu": "Okay Nabu",
        "hey_jarvis": "Hey Jarvis",
        "alexa": "Alexa",
        "hey_mycroft": "Hey Mycroft",
    }
    assert "de" in phrases["okay_nabu"].languages


def test_hey_jarvis_detected_in_synthesized_speech(
    tmp_path: Path, piper_16k: dict[str, FloatAudio]
) -> None:
    jarvis = _wake("hey_jarvis", tmp_path)
    assert _feed(jarvis, piper_16k["wake"]) == ["hey_jarvis"]  # once: refractory period
    assert _feed(jarvis, piper_16k["command"]) == []
    # Other wake words stay quiet on the same speech.
    for other in ("okay_nabu", "alexa", "hey_mycroft"):
        assert _feed(_wake(other, tmp_path), piper_16k["wake"]) == []


def test_streams_are_independent(tmp_path: Path, piper_16k: dict[str, FloatAudio]) -> None:
    jarvis = _wake("hey_jarvis", tmp_path)
    quiet = jarvis.start_stream(["hey_jarvis"])
    quiet.process(np.zeros(16000, np.float32))
    assert _feed(jarvis, piper_16k["wake"], chunk=160) == ["hey_jarvis"]
    with pytest.raises(EngineRequestError):
        jarvis.start_stream(["alexa"])


def test_missing_wake_model_is_a_clear_error(tmp_path: Path) -> None:
    entry = ModelConfig(name="x", engine="microwakeword", model=str(tmp_path / "nope.json"))
    engine = MicroWakeWordEngine(_context(entry, tmp_path), MicroWakeWordOptions())
    with pytest.raises(FileNotFoundError, match="okay_nabu"):
        engine.load()


def test_silero_finds_speech_in_real_recording(tmp_path: Path) -> None:
    entry = ModelConfig(name="silero", engine="silero-vad", model="silero")
    vad = SileroVadEngine(_context(entry, tmp_path), EngineOptions())
    vad.load()
    speech = decode(LIGHT_EN_WAV).at_rate(16000).samples
    stream = vad.start_stream()
    # Odd chunk sizes: frames are assembled across chunks.
    probs = [stream.process(speech[i : i + 700]) for i in range(0, len(speech), 700)]
    values = [p for p in probs if p is not None]
    assert len(values) >= len(speech) // 512 // 2
    assert max(values) > 0.9
    silence = vad.start_stream()
    quiet = [silence.process(np.zeros(1600, np.float32)) for _ in range(10)]
    assert max(p for p in quiet if p is not None) < 0.1
