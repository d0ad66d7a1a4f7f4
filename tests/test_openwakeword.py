"""openWakeWord on its real packaged models (pyopen-wakeword), fed Piper speech.

Each wake phrase is spoken by the Piper joe voice in the test (at three
speeds); it must fire its own model, and only its own, through the hub's wake
sessions and over Wyoming. Real recorded commands (../shared/testdata) and
other Piper speech must fire nothing.

Piper samples noise (``noise_scale``), so each synthesis differs; with it,
"Hey Mycroft" scored below the threshold in about one of four tries at speed
1.2 (and once at 1.0). The test voice runs without noise (deterministic), and
then every score is far from the 0.5 threshold either way (0.91-1.00 on its
own phrase at speeds 0.7-1.2, at most 0.14 for any other model or speech when
measured), so this holds on any CPU.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from pydantic import ValidationError
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.wake import Detect, Detection, NotDetected

from edgevoice.audio import decode, float_to_pcm16
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.engines.base import (
    EngineContext,
    EngineRequestError,
    FloatAudio,
    SynthesizeOptions,
    WakeEngine,
)
from edgevoice.engines.openwakeword import (
    BUILTIN_MODELS,
    PLUGIN,
    OpenWakeWordEngine,
    OpenWakeWordOptions,
    model_phrase,
    resolve_model,
)
from edgevoice.engines.registry import default_registry
from edgevoice.hub import EngineHub
from edgevoice.protocols.wyoming import WyomingServer
from edgevoice.testing import WakeEngineConformance
from tests.conftest import HOTWORDS_MP3, JOE, LAMP_WAV, LIGHT_DE_WAV, LIGHT_EN_WAV, read_event

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

PHRASES = {
    "alexa": "Alexa.",
    "hey_jarvis": "Hey Jarvis.",
    "hey_mycroft": "Hey Mycroft.",
    "hey_rhasspy": "Hey Rhasspy.",
    "okay_nabu": "Okay Nabu.",
}
OTHER_SPEECH = (
    "Turn on the kitchen lights.",
    "What is the weather like tomorrow?",
    "Hey, play some jazz in the living room.",
)
# Piper without sampling noise: the same audio on every run.
STEADY_JOE = JOE.model_copy(update={"options": {"noise_scale": 0.0, "noise_w_scale": 0.0}})
OWW = [ModelConfig(name=name, engine="openwakeword", model=name) for name in BUILTIN_MODELS]
# microWakeWord in the same process: both ship their own TFLite runtime.
MWW = ModelConfig(name="mww-hey-jarvis", engine="microwakeword", model="hey_jarvis")
RATE_HZ = 16000
CHUNK = 1280  # 80 ms, openWakeWord's step
TIMEOUT_S = 60.0


def _pad(audio: FloatAudio) -> FloatAudio:
    """Half a second of silence before, one after (a wake word needs its tail)."""
    silence = np.zeros(RATE_HZ // 2, np.float32)
    return np.concatenate([silence, audio, silence, silence])


# ------------------------------------------------------------ pure functions


def test_phrases_and_model_resolution(tmp_path: Path) -> None:
    assert model_phrase("hey_rhasspy") == "Hey Rhasspy"
    assert model_phrase("/models/turn_on_the_office_lights_v0.1.tflite") == (
        "turn on the office lights"
    )
    for name in BUILTIN_MODELS:
        assert resolve_model(name).is_file()
    with pytest.raises(FileNotFoundError, match="hey_rhasspy"):
        resolve_model("hey_siri")
    with pytest.raises(FileNotFoundError, match=r"\.tflite"):
        resolve_model(str(tmp_path / "missing.tflite"))
    not_tflite = tmp_path / "model.onnx"
    not_tflite.write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        resolve_model(str(not_tflite))


def test_options_are_validated() -> None:
    assert OpenWakeWordOptions().threshold == 0.5
    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"trigger_level": 0}, {"refractory_s": -1}):
        with pytest.raises(ValidationError):
            OpenWakeWordOptions.model_validate(bad)
    with pytest.raises(ValidationError):
        OpenWakeWordOptions.model_validate({"sensitivity": 1})


def test_plugin_is_registered_and_installed() -> None:
    statuses = {s.entry_point: s for s in default_registry().statuses()}
    assert statuses["openwakeword"].available
    assert statuses["openwakeword"].plugin is PLUGIN


def _engine(name: str, cache: Path, **options: object) -> OpenWakeWordEngine:
    entry = ModelConfig(name=name, engine="openwakeword", model=name)
    context = EngineContext(model=entry, device="cpu", cache_dir=cache, offline=True)
    engine = OpenWakeWordEngine(context, OpenWakeWordOptions.model_validate(options))
    engine.load()
    return engine


class TestConformance(WakeEngineConformance):
    @pytest.fixture
    def engine(self, tmp_path: Path) -> WakeEngine:
        return _engine("hey_rhasspy", tmp_path)


def test_a_stream_serves_only_its_wake_word(tmp_path: Path) -> None:
    engine = _engine("alexa", tmp_path)
    assert engine.capabilities.wake_words[0].phrase == "Alexa"
    assert engine.capabilities.sample_rate_hz == RATE_HZ
    with pytest.raises(EngineRequestError, match="alexa"):
        engine.start_stream(["hey_jarvis"])
    stream = engine.start_stream(["alexa"])
    assert stream.process(np.zeros(0, np.float32)) == []
    stream.close()


def test_missing_model_fails_at_load(tmp_path: Path) -> None:
    entry = ModelConfig(name="x", engine="openwakeword", model=str(tmp_path / "x.tflite"))
    context = EngineContext(model=entry, device="cpu", cache_dir=tmp_path, offline=True)
    engine = OpenWakeWordEngine(context, OpenWakeWordOptions())
    with pytest.raises(FileNotFoundError, match="okay_nabu"):
        engine.load()


# ----------------------------------------------------------------- the hub


def _settings(cache: Path) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        asr=[],
        tts=[STEADY_JOE],
        wake=[*OWW, MWW],
        vad=[],
        wyoming=WyomingConfig(uri="tcp://127.0.0.1:0", zeroconf=False),
        http=HttpConfig(enabled=False),
        mqtt=MqttConfig(enabled=False),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(shared_cache: Path) -> AsyncIterator[EngineHub]:
    async with EngineHub(_settings(shared_cache)) as loaded:
        yield loaded


async def _say(hub: EngineHub, text: str, speed: float = 1.0) -> FloatAudio:
    audio = await hub.synthesize_all(text, SynthesizeOptions(voice="joe", speed=speed))
    return _pad(audio.at_rate(RATE_HZ).samples)


async def _detect(hub: EngineHub, names: list[str], audio: FloatAudio) -> list[str]:
    """Names detected in ``audio``, fed in 80 ms chunks to one wake session."""
    found: list[str] = []
    async with hub.wake_session(names) as session:
        for i in range(0, len(audio), CHUNK):
            found.extend(d.name for d in await session.process(audio[i : i + CHUNK], RATE_HZ))
    return found


@MODULE_LOOP
@pytest.mark.parametrize("speed", [0.8, 1.0, 1.2])
@pytest.mark.parametrize("name", list(PHRASES))
async def test_each_wake_word_fires_on_its_phrase_only(
    hub: EngineHub, name: str, speed: float
) -> None:
    audio = await _say(hub, PHRASES[name], speed)
    # Every openWakeWord model listens; only the spoken one fires, once.
    assert await _detect(hub, list(PHRASES), audio) == [name]


@MODULE_LOOP
async def test_other_speech_fires_nothing(hub: EngineHub) -> None:
    clips = [await _say(hub, text) for text in OTHER_SPEECH]
    for path in (LAMP_WAV, LIGHT_EN_WAV, LIGHT_DE_WAV, HOTWORDS_MP3):
        recorded = await asyncio.to_thread(decode, path)
        clips.append(_pad(recorded.at_rate(RATE_HZ).samples))
    for audio in clips:
        assert await _detect(hub, list(PHRASES), audio) == []


@MODULE_LOOP
async def test_next_to_microwakeword(hub: EngineHub) -> None:
    # Both TFLite runtimes in one process, both models on one session.
    audio = await _say(hub, "Hey Jarvis, turn on the lights.")
    assert sorted(await _detect(hub, ["hey_jarvis", "mww-hey-jarvis"], audio)) == [
        "hey_jarvis",
        "mww-hey-jarvis",
    ]


# ----------------------------------------------------------------- Wyoming


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[WyomingServer]:
    async with WyomingServer(hub.settings, hub) as running:
        yield running


async def _stream(client: AsyncTcpClient, audio: FloatAudio) -> None:
    pcm = float_to_pcm16(audio)
    await client.write_event(AudioStart(RATE_HZ, 2, 1).event())
    for i in range(0, len(pcm), 2 * CHUNK):
        await client.write_event(AudioChunk(RATE_HZ, 2, 1, pcm[i : i + 2 * CHUNK]).event())
    await client.write_event(AudioStop().event())


@MODULE_LOOP
async def test_wyoming_detection(server: WyomingServer, hub: EngineHub) -> None:
    port = int(server.addresses[0].rsplit(":", 1)[1])
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Detect(names=["hey_rhasspy"]).event())
        await _stream(client, await _say(hub, PHRASES["hey_rhasspy"]))
        detection = Detection.from_event(await read_event(client, TIMEOUT_S))
        assert detection.name == "hey_rhasspy"
        await client.write_event(Detect(names=["okay_nabu", "alexa"]).event())
        await _stream(client, await _say(hub, OTHER_SPEECH[0]))
        assert NotDetected.is_type((await read_event(client, TIMEOUT_S)).type)


def test_engines_lists_openwakeword() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgevoice", "engines"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    line = lines["openwakeword"]
    assert "wake" in line and "installed" in line and "edgevoice[openwakeword]" in line
