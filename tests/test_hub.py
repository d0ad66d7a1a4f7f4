"""EngineHub with real engines: names, defaults, threads, sharing, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edgevoice.audio import Audio, decode
from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import (
    AsrEngine,
    EngineKind,
    EngineRequestError,
    ReleasesMemory,
    SynthesizeOptions,
    TranscribeOptions,
)
from edgevoice.errors import LimitExceededError, ShuttingDownError, UnknownModelError
from edgevoice.hub import EngineHub, HubStartError, LoadedModel, WakeSession
from edgevoice.pipeline.speak import speak
from tests.conftest import (
    GERMAN_KEYWORDS,
    HOTWORDS_MP3,
    JOE,
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_DE_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    TINY_EN,
    TRANSLATION_KEYWORDS,
    Mosquitto,
    assert_means,
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
    assert_means(german.text, *GERMAN_KEYWORDS)
    # Beam search: greedy decoding of this clip falls back to random sampling.
    translate = TranscribeOptions(task="translate", beam_size=5)
    english = await real_hub.transcribe(audio, translate, model="base")
    assert_means(english.text, *TRANSLATION_KEYWORDS)
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


# ---------------------------------------------------------------- sessions

FAKE = ModelConfig(name="fake", engine="test-asr", model="-", options={"text": "old engine"})
SILERO = ModelConfig(name="silero", engine="silero-vad", model="silero")


def _wake_entry(name: str, **options: float) -> ModelConfig:
    return ModelConfig(name=name, engine="microwakeword", model=name, options=options)


def _session_settings(
    make_settings: Callable[..., Settings], *, asr_text: str, wake: list[ModelConfig], **extra: Any
) -> Settings:
    fake = FAKE.model_copy(update={"options": {"text": asr_text}})
    return make_settings(asr=[fake], tts=[JOE], wake=wake, vad=[SILERO], **extra)


async def _hey_jarvis(hub: EngineHub) -> np.ndarray:
    """Joe saying the wake phrase, at 16 kHz, with silence around it."""
    audio = await hub.synthesize_all("Hey Jarvis, turn on the lights.")
    silence = np.zeros(8000, np.float32)
    return np.concatenate([silence, audio.at_rate(16000).samples, silence])


async def _detect(session: WakeSession, audio: np.ndarray) -> list[str]:
    found: list[str] = []
    for i in range(0, len(audio), 1024):
        found += [d.name for d in await session.process(audio[i : i + 1024], 16000)]
    return found


async def test_open_sessions_finish_on_the_old_engine_across_a_reload(
    make_settings: Callable[..., Settings],
) -> None:
    # A long shutdown timeout: the retired engines wait for the open sessions.
    wake = [_wake_entry("hey_jarvis"), _wake_entry("alexa")]
    before = _session_settings(make_settings, asr_text="old engine", wake=wake)
    after = _session_settings(
        make_settings, asr_text="new engine", wake=wake[1:], shutdown_timeout_s=600.0
    )
    async with EngineHub(before) as hub:
        phrase = await _hey_jarvis(hub)
        old_asr_slot = hub.asr("fake").slot
        async with (
            hub.asr_session("fake") as asr,
            hub.wake_session(["hey_jarvis"]) as detector,
            hub.vad_session() as vad,
        ):
            assert old_asr_slot.active >= 1 and asr in old_asr_slot.sessions
            asr.append(phrase)
            summary = await hub.reload(after)
            assert summary.retired == 2  # the old fake ASR and hey_jarvis
            # The open sessions go on with the engines they started with...
            assert (await asr.transcribe()).text == "old engine"
            assert await _detect(detector, phrase) == ["hey_jarvis"]
            assert await vad.process(phrase[8000:24000], 16000) is not None
            assert not old_asr_slot.closed
            # ...while new requests and sessions get the new configuration.
            assert (await hub.transcribe(Audio(phrase, 16000), model="fake")).text == "new engine"
            async with hub.asr_session("fake") as fresh:
                fresh.append(phrase)
                assert (await fresh.transcribe()).text == "new engine"
            with pytest.raises(UnknownModelError):
                hub.wake_session(["hey_jarvis"])
        # Closing the sessions lets the old engines go without waiting out the timeout.
        await asyncio.wait_for(hub.wait_retired(), 60)
        assert old_asr_slot.closed and old_asr_slot.active == 0


async def test_sessions_outliving_the_reload_timeout_move_or_end_cleanly(
    make_settings: Callable[..., Settings],
) -> None:
    wake = [_wake_entry("hey_jarvis"), _wake_entry("alexa")]
    before = _session_settings(make_settings, asr_text="old engine", wake=wake)
    # hey_jarvis changes (a new engine under the same name); alexa goes away.
    after = _session_settings(
        make_settings,
        asr_text="new engine",
        wake=[_wake_entry("hey_jarvis", refractory_s=1.0)],
        shutdown_timeout_s=0.2,
    )
    async with EngineHub(before) as hub:
        phrase = await _hey_jarvis(hub)
        async with (
            hub.asr_session("fake") as asr,
            hub.wake_session(["hey_jarvis"]) as jarvis,
            hub.wake_session(["alexa"]) as alexa,
        ):
            asr.append(phrase)
            old_jarvis = jarvis.models[0]
            await hub.reload(after)
            await asyncio.wait_for(hub.wait_retired(), 60)
            assert old_jarvis.slot.closed
            # Moved to the engines now serving the same names: detection goes on.
            assert jarvis.models[0] is hub.wake("hey_jarvis")
            assert await _detect(jarvis, phrase) == ["hey_jarvis"]
            assert (await asr.transcribe()).text == "new engine"
            # No engine serves alexa any more: a clean error, not a pool failure.
            with pytest.raises(ShuttingDownError, match="alexa"):
                await alexa.process(phrase[:1024], 16000)
        # Leaving the sessions raised nothing.


async def test_a_closed_hub_answers_shutting_down(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(asr=[FAKE], tts=[], wake=[_wake_entry("alexa")])
    hub = EngineHub(settings)
    await hub.start()
    model = hub.asr("fake")
    async with hub.wake_session() as detector:
        await detector.process(np.zeros(1600, np.float32), 16000)
        await hub.close()
        with pytest.raises(ShuttingDownError):
            await detector.process(np.zeros(1600, np.float32), 16000)
    with pytest.raises(ShuttingDownError):
        await hub.run(model, time.sleep, 0)
    with pytest.raises(ShuttingDownError):
        hub.asr_session(model)


async def _busy_one_worker_hub(
    make_settings: Callable[..., Settings], shutdown_timeout_s: float
) -> tuple[
    EngineHub, LoadedModel[AsrEngine], threading.Event, asyncio.Task[bool], asyncio.Task[Any]
]:
    """A hub whose one worker runs a call held by the returned gate, while a second
    call waits for the worker."""
    one_worker = ModelConfig(name="fake", engine="test-asr", model="-", max_concurrency=1)
    hub = EngineHub(make_settings(asr=[one_worker], tts=[], shutdown_timeout_s=shutdown_timeout_s))
    await hub.start()
    model = hub.asr("fake")
    gate = threading.Event()
    running = asyncio.create_task(hub.run(model, gate.wait, 600))
    waiting = asyncio.create_task(hub.run(model, lambda: model.engine.capabilities.languages))
    while model.slot.active < 2:  # noqa: ASYNC110 (both calls made)
        await asyncio.sleep(0.01)
    return hub, model, gate, running, waiting


async def test_close_lets_calls_already_made_finish(
    make_settings: Callable[..., Settings],
) -> None:
    """A call made before close() runs on the engine, not on a closed one: found
    by a one-core run, where a request queued for the worker thread ran after
    close() had dropped the engine (AttributeError instead of a transcript)."""
    hub, model, gate, running, waiting = await _busy_one_worker_hub(make_settings, 600.0)
    closing = asyncio.create_task(hub.close())
    await asyncio.sleep(0.2)
    assert not closing.done()  # close() waits for the calls, not for a timeout
    gate.set()
    assert await running is True
    assert await waiting == ("en",)
    await closing
    with pytest.raises(ShuttingDownError):
        await hub.run(model, time.sleep, 0)


async def test_close_ends_calls_still_waiting_after_its_timeout(
    make_settings: Callable[..., Settings],
) -> None:
    hub, model, gate, running, waiting = await _busy_one_worker_hub(make_settings, 0.2)
    closing = asyncio.create_task(hub.close())
    while model.slot.engine is not None:  # noqa: ASYNC110 (the drain gave up: engine dropped)
        await asyncio.sleep(0.01)
    gate.set()
    assert await running is True  # the call already running finishes
    with pytest.raises(ShuttingDownError):  # the one still waiting ends cleanly
        await waiting
    await closing


async def _until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_an_idle_engine_hands_back_the_memory_it_kept(
    make_settings: Callable[..., Settings],
) -> None:
    """Piper keeps onnxruntime's arena while busy; the hub has it released once the
    voice had no request for ``release_memory_after_s`` — never during a stream,
    and not again until the voice is used."""
    hub = EngineHub(make_settings(asr=[], tts=[JOE], release_memory_after_s=0.2))
    async with hub:
        model, _voice = hub.voice(None)
        slot = model.slot
        await _until(lambda: slot.released_s > slot.last_used_s)  # the load's leftovers
        calls = 0
        engine = model.engine
        assert isinstance(engine, ReleasesMemory)
        release = engine.release_memory

        def counted() -> None:
            nonlocal calls
            calls += 1
            release()

        engine.release_memory = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.6)
        assert calls == 0  # nothing used since: nothing to hand back
        async with speak(hub, "One sentence. Then another one.") as speech:
            await anext(speech)
            await asyncio.sleep(0.6)  # the stream is open: the voice is in use
            assert calls == 0
            async for _chunk in speech:
                pass
        await _until(lambda: calls == 1)
        await asyncio.sleep(0.6)
        assert calls == 1


async def test_asr_session_buffer_is_bounded(make_settings: Callable[..., Settings]) -> None:
    hub = EngineHub(make_settings(asr=[FAKE], tts=[]))
    async with hub, hub.asr_session(max_audio_s=2.0) as session:
        session.append(np.zeros(16000, np.float32))
        with pytest.raises(LimitExceededError, match="max_audio_s"):
            session.append(np.zeros(16001, np.float32))
        session.check_room(1.0)
        session.keep_last(8000)
        assert session.duration_s == 0.5
        session.append(np.zeros(16000, np.float32))
        assert (await session.transcribe()).text == "old engine"
        assert session.decoding == 0


# ------------------------------------------------------ library voices


def _dominant_hz(samples: np.ndarray, rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate_hz)[int(np.argmax(spectrum))])


async def test_stored_voices_clone_through_the_hub_and_wyoming(
    make_settings: Callable[..., Settings],
) -> None:
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize, SynthesizeVoice

    from edgevoice.protocols.wyoming import WyomingServer
    from edgevoice.voices import VoiceNotFoundError

    plain = ModelConfig(name="plain", engine="test-tts", model="fake", options={"voices": ["p"]})
    cloner = ModelConfig(
        name="cloner", engine="test-tts", model="fake",
        options={"voices": ["c"], "cloning": True, "sample_rate_hz": 16000},
    )  # fmt: skip
    settings = make_settings(
        asr=[],
        tts=[plain, cloner],
        wyoming={"enabled": True, "uri": "tcp://127.0.0.1:0", "zeroconf": False},
    )
    async with EngineHub(settings) as hub, WyomingServer(settings, hub) as server:
        sample = await asyncio.to_thread(LAMP_WAV.read_bytes)
        stored = await asyncio.to_thread(hub.library.add, "Grandpa", sample, "a transcript")
        options = await hub.resolve_voice(SynthesizeOptions(voice=stored.id))
        assert options.voice == "cloner" and options.reference is not None
        assert options.reference.voice_id == stored.id and options.reference.text
        async with hub.speak("Hello there.", options) as speech:
            audio = np.concatenate([chunk.samples async for chunk in speech])
        assert abs(_dominant_hz(audio, 16000) - 440) < 20  # cloned (220 Hz without)
        # Configured names are not library ids; unknown ids name no stored voice.
        assert (await hub.resolve_voice(SynthesizeOptions(voice="p"))).reference is None
        with pytest.raises(VoiceNotFoundError):
            await hub.resolve_voice(SynthesizeOptions(voice="voice_nobody"))

        port = int(server.addresses[0].rsplit(":", 1)[1])
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 30)
            assert event is not None
            info = Info.from_event(event)
            (program,) = info.tts
            assert stored.id in [v.name for v in program.voices]
            await client.write_event(Synthesize("Hello.", SynthesizeVoice(stored.id)).event())
            pcm = b""
            while True:
                event = await asyncio.wait_for(client.read_event(), 30)
                assert event is not None and event.type != "error", event
                if AudioStart.is_type(event.type):
                    assert AudioStart.from_event(event).rate == 16000
                elif AudioChunk.is_type(event.type):
                    pcm += AudioChunk.from_event(event).audio
                elif AudioStop.is_type(event.type):
                    break
        heard = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        assert abs(_dominant_hz(heard, 16000) - 440) < 20


async def test_mqtt_voice_can_name_a_stored_voice(
    make_settings: Callable[..., Settings], mosquitto: Mosquitto
) -> None:
    import json

    import aiomqtt

    from edgevoice.protocols.mqtt.bridge import MqttBridge

    cloner = ModelConfig(
        name="cloner", engine="test-tts", model="fake",
        options={"cloning": True, "sample_rate_hz": 16000},
    )  # fmt: skip
    settings = make_settings(
        asr=[],
        tts=[cloner],
        mqtt={"enabled": True, "url": mosquitto.url, "node_id": "voices", "topic_prefix": "lib"},
    )
    async with EngineHub(settings) as hub:
        sample = await asyncio.to_thread(LAMP_WAV.read_bytes)
        stored = await asyncio.to_thread(hub.library.add, "Grandma", sample, None)
        bridge = MqttBridge(settings, hub)
        await bridge.start()
        try:
            await bridge.wait_online(30)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                await client.subscribe("lib/voices/tts/audio/+")
                request = {"text": "Hello there.", "voice": stored.id, "id": "cloned-1"}
                await client.publish("lib/voices/tts/say", json.dumps(request))
                async with asyncio.timeout(30):
                    message = await anext(aiter(client.messages))
            assert str(message.topic) == "lib/voices/tts/audio/cloned-1"
            assert isinstance(message.payload, bytes)
            audio = np.frombuffer(message.payload[44:], dtype="<i2").astype(np.float32)
            assert abs(_dominant_hz(audio, 16000) - 440) < 20  # cloned (220 Hz without)
        finally:
            await bridge.stop(5.0)
