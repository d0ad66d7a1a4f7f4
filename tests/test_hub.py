"""EngineHub with real engines: names, defaults, threads, sharing, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from edgevoice.audio import decode
from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import (
    EngineKind,
    EngineRequestError,
    SynthesizeOptions,
    TranscribeOptions,
)
from edgevoice.errors import UnknownModelError
from edgevoice.hub import EngineHub, HubStartError
from tests.conftest import (
    HOTWORDS_MP3,
    JOE,
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_DE_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    TINY_EN,
    words,
)


async def test_real_hub_transcribes_test_files(real_hub: EngineHub) -> None:
    for path, expected in ((LAMP_WAV, LAMP_TEXT), (LIGHT_EN_WAV, LIGHT_EN_TEXT)):
        audio = await asyncio.to_thread(decode, path)
        transcript = await real_hub.transcribe(audio)
        assert transcript.text == expected
        assert transcript.language == "en"


async def test_default_and_alias_lookup(real_hub: EngineHub) -> None:
    assert real_hub.asr().name == "tiny-en"  # first entry is the default
    assert real_hub.asr("whisper-1").name == "tiny-en"
    assert real_hub.voice("tts-1")[0].name == "joe"
    with pytest.raises(UnknownModelError, match="available: tiny-en, base"):
        real_hub.asr("large-v3")
    with pytest.raises(UnknownModelError, match="unknown voice 'nova'"):
        real_hub.voice("nova")


async def test_multilingual_base_detects_german_and_translates(real_hub: EngineHub) -> None:
    audio = await asyncio.to_thread(decode, LIGHT_DE_WAV)
    german = await real_hub.transcribe(audio, model="base")
    assert german.language == "de"
    assert german.text == "Schalte das Wohnzimmerlicht ein."
    # Beam search: greedy decoding of this clip falls back to random sampling.
    translate = TranscribeOptions(task="translate", beam_size=5)
    english = await real_hub.transcribe(audio, translate, model="base")
    assert words(english.text) == words("Turn the living room light on.")
    with pytest.raises(EngineRequestError, match="English-only"):
        await real_hub.transcribe(audio, TranscribeOptions(task="translate"))


async def test_hotwords_and_prompt_hint(real_hub: EngineHub) -> None:
    audio = await asyncio.to_thread(decode, HOTWORDS_MP3)
    plain = await real_hub.transcribe(audio)
    assert "ComfyUI" not in plain.text
    hinted = await real_hub.transcribe(audio, TranscribeOptions(hotwords="ComfyUI"))
    assert "ComfyUI" in hinted.text
    prompted = await real_hub.transcribe(audio, TranscribeOptions(prompt="ComfyUI"))
    assert "ComfyUI" in prompted.text


async def test_segments_stream_lazily(real_hub: EngineHub) -> None:
    audio = await asyncio.to_thread(decode, LAMP_WAV)
    _model, info, segments = await real_hub.transcribe_segments(audio)
    assert info.duration_s == pytest.approx(3.0, abs=0.05)
    texts = [segment.text async for segment in segments]
    assert "".join(texts).strip() == LAMP_TEXT


async def test_synthesize_streams_one_chunk_per_sentence(real_hub: EngineHub) -> None:
    model, rate, chunks = await real_hub.synthesize(
        "Good morning. The coffee is ready. Have a nice day.", SynthesizeOptions(voice="joe")
    )
    collected = [c async for c in chunks]
    assert model.name == "joe" and rate == 22050
    assert len(collected) == 3
    whole = await real_hub.synthesize_all("Good morning.")
    assert whole.rate_hz == 22050 and 0.5 < whole.duration_s < 3


async def test_loop_stays_responsive_during_inference(real_hub: EngineHub) -> None:
    audio = await asyncio.to_thread(decode, LAMP_WAV)
    job = asyncio.create_task(real_hub.transcribe(audio, model="base"))
    gaps = []
    while not job.done():
        started = time.monotonic()
        await asyncio.sleep(0.01)
        gaps.append(time.monotonic() - started)
    await job
    assert len(gaps) > 5  # the loop kept ticking while the model worked


async def test_same_model_is_loaded_once(make_settings: Callable[..., Settings]) -> None:
    twin = ModelConfig(name="tiny-twin", engine="faster-whisper", model="tiny.en")
    settings = make_settings(asr=[TINY_EN, twin], tts=[])
    async with EngineHub(settings) as hub:
        assert hub.asr("tiny-en").slot is hub.asr("tiny-twin").slot
        assert len(hub.slots()) == 1


async def test_concurrency_is_bounded_per_model(make_settings: Callable[..., Settings]) -> None:
    fake = ModelConfig(name="fake", engine="test-asr", model="-", max_concurrency=2)
    settings = make_settings(asr=[fake], tts=[])
    async with EngineHub(settings) as hub:
        model = hub.asr("fake")
        active = 0
        peak = 0

        def work() -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            time.sleep(0.05)
            active -= 1

        await asyncio.gather(*(hub.run(model, work) for _ in range(6)))
        assert peak == 2


async def test_only_loads_what_is_asked(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(asr=[TINY_EN], tts=[JOE])
    async with EngineHub(settings, only={EngineKind.TTS: None}) as hub:
        assert [m.name for m in hub.models(EngineKind.TTS)] == ["joe"]
        assert hub.models(EngineKind.ASR) == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (ModelConfig(name="x", engine="faster-whisper", model="small"), "not available offline"),
        (
            ModelConfig(name="x", engine="faster-whisper", model="tiny.en", device="cuda"),
            "CUDA device",
        ),
        (ModelConfig(name="x", engine="nope", model="tiny.en"), "unknown asr engine 'nope'"),
    ],
)
async def test_start_failure_names_the_model(
    make_settings: Callable[..., Settings], entry: ModelConfig, message: str
) -> None:
    settings = make_settings(asr=[entry], tts=[], offline=True)
    with pytest.raises(HubStartError, match=message):
        async with EngineHub(settings):
            pass


async def test_engine_failure_surfaces_and_hub_keeps_serving(
    make_settings: Callable[..., Settings],
) -> None:
    broken = ModelConfig(name="broken", engine="test-asr", model="-", options={"fail": True})
    good = ModelConfig(name="good", engine="test-asr", model="-", options={"text": "all good"})
    settings = make_settings(asr=[broken, good], tts=[])
    async with EngineHub(settings) as hub:
        audio = decode(LIGHT_EN_WAV)
        with pytest.raises(RuntimeError, match="fake engine failure"):
            await hub.transcribe(audio, model="broken")
        assert (await hub.transcribe(audio, model="good")).text == "all good"
        with pytest.raises(RuntimeError, match="fake engine failure"):
            await hub.transcribe(audio, model="broken")
