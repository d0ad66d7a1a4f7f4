"""pocket-tts: zero-shot voice cloning on a Pocket TTS model with random weights.

No Pocket TTS weights install offline, so the model is built from the config
the package ships (english_2m_2026-10, its Mimi encoder shrunk) with the
weight paths set to null, a sentencepiece tokenizer trained here on a few
sentences and ``n_bins`` = its vocabulary size. The whole real path runs:
config resolution, load, reference encoding, the cache of encoded voices,
streamed generation and decoding, through the hub, the OpenAI-compatible
HTTP API (openai client: inline ``voice_sample`` and a stored library voice)
and Wyoming. Random weights say nothing intelligible, so the tests check
format, rate, length bounds and what the engine did, never words.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from edgevoice.audio import Audio, decode, encode, pcm_to_float
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.engines.base import (
    EngineContext,
    EngineKind,
    EngineRequestError,
    SynthesizeOptions,
    VoiceReference,
)
from edgevoice.engines.pocket_tts import (
    PocketTtsEngine,
    PocketTtsOptions,
    resolve_config,
    time_stretch,
)
from edgevoice.errors import BadAudioError, UnknownModelError
from edgevoice.hub import EngineHub
from edgevoice.model_files import ModelNotFoundError
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.wyoming import WyomingServer
from edgevoice.testing import check_tts_engine
from edgevoice.voices import decode_reference
from tests.conftest import LAMP_TEXT, LAMP_WAV, LIGHT_EN_WAV, read_event
from tests.pocket_tiny import (
    FRAME_SAMPLES,
    MIN_FRAMES,
    RATE_HZ,
    build_tiny_model,
    max_samples,
)

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("pocket-tiny"))


def _entries(config: Path) -> list[ModelConfig]:
    return [
        # An end-of-speech threshold this low ends every piece at its 6th frame
        # (plus Pocket TTS's few trailing frames): lengths follow the text alone.
        ModelConfig(
            name="pocket",
            engine="pocket-tts",
            model=str(config),
            aliases=["cloner"],
            options={"voice": str(LIGHT_EN_WAV), "max_cached_voices": 3, "eos_threshold": -20},
        ),
        # And this high never ends a piece before Pocket TTS's length cap.
        ModelConfig(
            name="babbler",
            engine="pocket-tts",
            model=str(config),
            options={"voice": str(LAMP_WAV), "eos_threshold": 20, "max_piece_chars": 2000},
        ),
    ]


def _settings(cache: Path, config: Path) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        offline=True,
        asr=[],
        tts=_entries(config),
        wake=[],
        vad=[],
        wyoming=WyomingConfig(uri="tcp://127.0.0.1:0", zeroconf=False),
        http=HttpConfig(host="127.0.0.1", port=0),
        mqtt=MqttConfig(enabled=False),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    tmp_path_factory: pytest.TempPathFactory, tiny_config: Path
) -> AsyncIterator[EngineHub]:
    async with EngineHub(_settings(tmp_path_factory.mktemp("cache"), tiny_config)) as loaded:
        yield loaded


def _engine(hub: EngineHub) -> PocketTtsEngine:
    engine = hub.get(EngineKind.TTS, "pocket").engine
    assert isinstance(engine, PocketTtsEngine)
    return engine


def _reference(path: Path = LAMP_WAV, voice_id: str | None = None) -> VoiceReference:
    audio = decode_reference(path.read_bytes())
    return VoiceReference(audio.samples, audio.rate_hz, LAMP_TEXT, voice_id=voice_id)


def _check_audio(samples: np.ndarray[Any, Any], text: str) -> None:
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
    pieces = max(1, text.count("."))
    assert pieces * MIN_FRAMES * FRAME_SAMPLES <= len(samples) <= max_samples(text), len(samples)


# ------------------------------------------------------------------ units


def test_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="min_reference_s"):
        PocketTtsOptions(min_reference_s=10, max_reference_s=5)
    with pytest.raises(ValidationError):
        PocketTtsOptions.model_validate({"voices": "alba"})
    with pytest.raises(ValidationError):
        PocketTtsOptions(max_cached_voices=0)


def test_time_stretch_keeps_pitch_and_scales_length() -> None:
    t = np.arange(RATE_HZ * 2) / RATE_HZ
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for speed in (0.5, 1.5, 2.0):
        stretched = time_stretch(tone, speed, RATE_HZ)
        assert len(stretched) == pytest.approx(len(tone) / speed, rel=0.01)
        body = stretched[RATE_HZ // 10 : -RATE_HZ // 10]
        spectrum = np.abs(np.fft.rfft(body))
        assert np.argmax(spectrum) * RATE_HZ / len(body) == pytest.approx(440, abs=5)
    assert time_stretch(tone, 1.0, RATE_HZ) is tone


def test_config_resolution_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="english_2m_2026-10"):
        resolve_config("no-such-model", tmp_path, offline=True)
    # A shipped config needs its weights from Hugging Face: offline and not cached.
    with pytest.raises(ModelNotFoundError, match="offline"):
        resolve_config("english_2m_2026-10", tmp_path, offline=True)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_config(str(tmp_path / "missing.yaml"), tmp_path, offline=True)
    broken = tmp_path / "broken.yaml"
    broken.write_text("flow_lm:\n  lookup_table:\n    tokenizer_path: nowhere.model\n")
    with pytest.raises(ModelNotFoundError, match=r"nowhere\.model does not exist"):
        resolve_config(str(broken), tmp_path, offline=True)
    http = tmp_path / "http.yaml"
    http.write_text("weights_path: https://example.com/model.safetensors\n")
    with pytest.raises(ModelNotFoundError, match="download it"):
        resolve_config(str(http), tmp_path, offline=True)


def test_resolution_makes_paths_local(tiny_config: Path, tmp_path: Path) -> None:
    resolved = resolve_config(str(tiny_config), tmp_path, offline=True)
    table = resolved.config["flow_lm"]["lookup_table"]
    assert table["tokenizer_path"] == str(tiny_config.parent / "tokenizer.model")
    assert resolved.cloning and resolved.shipped is None
    # A directory holding one config works too.
    assert resolve_config(str(tiny_config.parent), tmp_path, offline=True).config == resolved.config


def test_a_bad_default_voice_fails_the_load(tiny_config: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    silent.write_bytes(encode(np.zeros(48000, np.float32), 24000, "wav"))
    cases = [
        ({}, "needs a default voice"),
        ({"voice": str(silent)}, "silent"),
        ({"voice": "alba"}, "released weights"),
        ({"voice": str(tmp_path / "nowhere.wav")}, "does not exist"),
    ]
    for options, message in cases:
        entry = ModelConfig(name="p", engine="pocket-tts", model=str(tiny_config))
        context = EngineContext(model=entry, device="cpu", cache_dir=tmp_path, offline=True)
        engine = PocketTtsEngine(context, PocketTtsOptions.model_validate(options))
        with pytest.raises(ModelNotFoundError, match=message):
            engine.load()
    entry = ModelConfig(name="p", engine="pocket-tts", model=str(tiny_config))
    context = EngineContext(model=entry, device="cuda", cache_dir=tmp_path, offline=True)
    with pytest.raises(ValueError, match="runs on cpu"):
        PocketTtsEngine(context, PocketTtsOptions()).load()


# ---------------------------------------------------------------- the hub


@MODULE_LOOP
async def test_conformance_and_capabilities(hub: EngineHub) -> None:
    engine = _engine(hub)
    caps = engine.capabilities
    assert caps.cloning and caps.streaming and caps.sample_rate_hz == RATE_HZ
    assert [v.name for v in caps.voices] == ["pocket"] and caps.voices[0].languages == ("en",)
    await asyncio.to_thread(check_tts_engine, engine)


@MODULE_LOOP
async def test_hub_clones_and_streams_audio(hub: EngineHub) -> None:
    text = "Hello there. This is me."
    model, rate, chunks = await hub.synthesize(text, SynthesizeOptions(reference=_reference()))
    parts = [chunk async for chunk in chunks]
    assert model.name == "pocket" and rate == RATE_HZ
    assert len(parts) >= 2, "audio streams as it is generated"
    _check_audio(np.concatenate(parts), text)


@MODULE_LOOP
async def test_a_voice_is_encoded_once_and_the_cache_is_bounded(hub: EngineHub) -> None:
    engine = _engine(hub)
    stored = _reference(voice_id="voice_lamp")
    before = engine.reference_encodings
    # Three sentences, each synthesized on its own by the speak pipeline: one encoding.
    async with hub.speak("One. Two. Three.", SynthesizeOptions(reference=stored)) as speech:
        sentences = {audio.sentence async for audio in speech}
    assert sentences == {0, 1, 2}
    assert engine.reference_encodings == before + 1
    await hub.synthesize_all("Again.", SynthesizeOptions(reference=stored))
    assert engine.reference_encodings == before + 1
    # The same samples under another id are another cache entry.
    renamed = _reference(voice_id="voice_lamp-2")
    await hub.synthesize_all("Renamed.", SynthesizeOptions(reference=renamed))
    assert engine.reference_encodings == before + 2
    # max_cached_voices = 3: two more voices push the stored one out.
    for path in (LIGHT_EN_WAV, LAMP_WAV):
        other = _reference(path, voice_id=f"voice_{path.stem[:8].replace('_', '-')}")
        await hub.synthesize_all("Hi.", SynthesizeOptions(reference=other))
    assert engine.cached_voices() == 3
    count = engine.reference_encodings
    await hub.synthesize_all("Back.", SynthesizeOptions(reference=stored))
    assert engine.reference_encodings == count + 1


@MODULE_LOOP
async def test_bad_references_are_client_errors(hub: EngineHub) -> None:
    cases: list[tuple[np.ndarray[Any, Any], int, type[Exception], str]] = [
        (np.zeros(0, np.float32), 24000, BadAudioError, "empty"),
        (np.zeros(48000, np.float32), 24000, BadAudioError, "silent"),
        (np.full(48000, np.nan, np.float32), 24000, BadAudioError, "non-finite"),
        (np.full(8000, 0.1, np.float32), 16000, EngineRequestError, r"0\.50 s long"),
        (np.full(8000 * 40, 0.1, np.float32), 8000, EngineRequestError, r"40\.00 s long"),
        (np.full(48000, 0.1, np.float32), 10, BadAudioError, "sample rate"),
        (np.ones((2, 24000), np.float32) * 0.1, 24000, BadAudioError, "mono"),
    ]
    for samples, rate, error, message in cases:
        options = SynthesizeOptions(reference=VoiceReference(samples, rate))
        with pytest.raises(error, match=message):
            await hub.synthesize("Hi.", options)
    with pytest.raises(EngineRequestError, match="speed"):
        await hub.synthesize("Hi.", SynthesizeOptions(speed=4.0))
    with pytest.raises(EngineRequestError, match="speakers"):
        await hub.synthesize("Hi.", SynthesizeOptions(speaker="alba"))
    with pytest.raises(EngineRequestError, match="empty"):
        await hub.synthesize("   ", SynthesizeOptions())
    with pytest.raises(UnknownModelError):
        await asyncio.to_thread(_engine(hub).synthesize, "Hi.", SynthesizeOptions(voice="somebody"))
    # The model keeps serving.
    audio = await hub.synthesize_all("Okay.")
    _check_audio(audio.samples, "Okay.")


@MODULE_LOOP
async def test_a_stream_closed_early_stops_generation(hub: EngineHub) -> None:
    """A client that goes away mid-sentence stops Pocket TTS's generation threads."""
    engine = hub.get(EngineKind.TTS, "babbler").engine
    assert isinstance(engine, PocketTtsEngine)
    mimi = engine._model.mimi
    decode_from_latent = mimi.decode_from_latent
    decoded = [0]

    def counting(latent: Any, state: Any) -> Any:
        decoded[0] += int(latent.shape[1])
        return decode_from_latent(latent, state)

    mimi.decode_from_latent = counting
    text = "words " * 300
    # Run to its end, this would generate at least (tokens / 3 + 2) s of frames.
    tokens = len(engine._model.flow_lm.conditioner.tokenizer.encode(text.strip()))
    full_frames = int((tokens / 3 + 2) * 12.5)
    try:
        _model, _rate, chunks = await hub.synthesize(text, SynthesizeOptions(voice="babbler"))
        first = await anext(chunks)
        assert 0 < len(first) < max_samples(text)
        await chunks.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + TIMEOUT_S
        while _generating() and time.monotonic() < deadline:  # noqa: ASYNC110 (threads)
            await asyncio.sleep(0.2)
        assert not _generating()
        # Stopped, not run to its end: far fewer frames than the cap were decoded.
        assert decoded[0] < full_frames // 2, (decoded[0], full_frames)
    finally:
        mimi.decode_from_latent = decode_from_latent
    audio = await hub.synthesize_all("Still here.", SynthesizeOptions(voice="pocket"))
    assert len(audio.samples) > 0


def _generating() -> bool:
    """Whether a Pocket TTS generation or decoder thread is alive."""
    names = ("run_generation", "_decode_audio_worker")
    return any(
        getattr(getattr(t, "_target", None), "__name__", "") in names for t in threading.enumerate()
    )


# ----------------------------------------------------------------- HTTP


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(hub: EngineHub) -> AsyncIterator[tuple[HttpServer, openai.AsyncOpenAI]]:
    async with HttpServer(hub.settings, hub) as server:

        def make() -> openai.AsyncOpenAI:
            made = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0
            )
            _ = made.audio.speech, made.audio.voices, made.models
            return made

        yield server, await asyncio.to_thread(make)


@MODULE_LOOP
async def test_openai_client_clones_an_inline_voice_sample(
    http: tuple[HttpServer, openai.AsyncOpenAI], hub: EngineHub
) -> None:
    _server, oai = http
    engine = _engine(hub)
    before = engine.reference_encodings
    sample = base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode()
    text = "Good morning. The lights are on. Have a nice day."
    response = await oai.audio.speech.create(
        model="cloner",
        voice="alloy",
        input=text,
        response_format="wav",
        extra_body={"voice_sample": sample, "voice_sample_text": "Turn on the living room light."},
    )
    audio = await asyncio.to_thread(decode, response.content)
    assert audio.rate_hz == RATE_HZ
    _check_audio(audio.samples, text)
    assert engine.reference_encodings == before + 1, "one encoding for all three sentences"
    pcm = await oai.audio.speech.create(
        model="pocket", voice="alloy", input="Hi.", response_format="pcm",
        extra_body={"voice_sample": sample},
    )  # fmt: skip
    _check_audio(pcm_to_float(pcm.content, 2), "Hi.")
    assert engine.reference_encodings == before + 1, "the same sample again: cached"


@MODULE_LOOP
async def test_openai_client_speaks_with_a_stored_voice(
    http: tuple[HttpServer, openai.AsyncOpenAI], hub: EngineHub
) -> None:
    server, oai = http
    engine = _engine(hub)
    created = await oai.audio.voices.create(
        name="Lamp voice", audio_sample=LAMP_WAV, consent="x", extra_body={"transcript": LAMP_TEXT}
    )
    try:
        before = engine.reference_encodings
        for text in ("First request. Two sentences.", "Second request."):
            speech = await oai.audio.speech.create(
                model="pocket", voice={"id": created.id}, input=text, response_format="flac"
            )
            audio = await asyncio.to_thread(decode, speech.content)
            assert audio.rate_hz == RATE_HZ
            _check_audio(audio.samples, text)
        assert engine.reference_encodings == before + 1, "a stored voice is encoded once"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/v1/audio/voices") as listing,
        ):
            voices = {v["id"]: v for v in (await listing.json())["data"]}
        assert voices["pocket"]["cloning"] is True and created.id in voices
    finally:
        await oai.audio.voices.delete(created.id)


@MODULE_LOOP
async def test_http_bad_voice_samples(http: tuple[HttpServer, openai.AsyncOpenAI]) -> None:
    _server, oai = http
    garbage = base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 10).decode()
    with pytest.raises(openai.APIStatusError) as undecodable:
        await oai.audio.speech.create(
            model="pocket", voice="alloy", input="Hi.", extra_body={"voice_sample": garbage}
        )
    assert undecodable.value.status_code in (400, 415)
    short = encode(np.full(12000, 0.2, np.float32), 24000, "wav")
    with pytest.raises(openai.BadRequestError, match="1-30 s"):
        await oai.audio.speech.create(
            model="pocket",
            voice="alloy",
            input="Hi.",
            extra_body={"voice_sample": base64.b64encode(short).decode()},
        )
    silent = encode(np.zeros(48000, np.float32), 24000, "wav")
    with pytest.raises(openai.BadRequestError, match="silent"):
        await oai.audio.speech.create(
            model="pocket",
            voice="alloy",
            input="Hi.",
            extra_body={"voice_sample": base64.b64encode(silent).decode()},
        )
    # Still serving.
    ok = await oai.audio.speech.create(
        model="pocket", voice="alloy", input="Fine.", response_format="wav"
    )
    assert (await asyncio.to_thread(decode, ok.content)).rate_hz == RATE_HZ


# -------------------------------------------------------------- Wyoming


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wyoming(hub: EngineHub) -> AsyncIterator[WyomingServer]:
    async with WyomingServer(hub.settings, hub) as running:
        yield running


@MODULE_LOOP
async def test_wyoming_lists_and_speaks_the_cloned_default_voice(wyoming: WyomingServer) -> None:
    port = int(wyoming.addresses[0].rsplit(":", 1)[1])
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while (event := await read_event(client, TIMEOUT_S)).type != "info":
            pass
        info = Info.from_event(event)
        voices = {v.name for program in info.tts for v in program.voices}
        assert "pocket" in voices
        text = "Turn on the lamp. Thank you."
        await client.write_event(
            Synthesize(text=text, voice=SynthesizeVoice(name="pocket")).event()
        )
        start = AudioStart.from_event(await read_event(client, TIMEOUT_S))
        pcm = b""
        chunks = 0
        while (event := await read_event(client, TIMEOUT_S)).type != "audio-stop":
            pcm += AudioChunk.from_event(event).audio
            chunks += 1
    assert (start.rate, start.width, start.channels) == (RATE_HZ, 2, 1)
    assert chunks >= 2
    _check_audio(Audio(pcm_to_float(pcm, 2), start.rate).samples, text)
