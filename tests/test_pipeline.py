"""The endpointing pipeline with real Silero VAD and Whisper tiny.en, no sockets.

Audio is fed as fast as the test can (durations inside the pipeline are
counted in audio, not wall-clock time), so nothing here depends on CPU speed.
Where a test needs a decode to wait, it holds the model's only worker with a
gate instead of guessing how long inference takes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from edgevoice.audio import decode
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.engines.base import FloatAudio
from edgevoice.errors import LimitExceededError
from edgevoice.hub import EngineHub
from edgevoice.pipeline.endpointing import (
    EndpointConfig,
    EndpointingPipeline,
    FinalTranscript,
    NoSpeech,
    PartialTranscript,
    PipelineEvent,
    SpeechStarted,
    SpeechStopped,
)
from tests.conftest import LAMP_WAV, LIGHT_EN_WAV, TINY_EN, assert_means

pytestmark = pytest.mark.asyncio(loop_scope="module")

SILERO = ModelConfig(name="silero", engine="silero-vad", model="silero")
RATE = 16000
CHUNK = 1024
DEADLINE_S = 120.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    state = tmp_path_factory.mktemp("pipeline")
    settings = Settings(
        cache_dir=shared_cache,
        state_dir=state,
        asr=[TINY_EN],
        tts=[],
        wake=[],
        vad=[SILERO],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(enabled=False),
        mqtt=MqttConfig(enabled=False),
    )
    async with EngineHub(settings) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clips() -> dict[str, FloatAudio]:
    light, lamp = await asyncio.gather(
        asyncio.to_thread(decode, LIGHT_EN_WAV), asyncio.to_thread(decode, LAMP_WAV)
    )
    return {"light": light.at_rate(RATE).samples, "lamp": lamp.at_rate(RATE).samples}


def _silence(seconds: float) -> FloatAudio:
    return np.zeros(round(seconds * RATE), np.float32)


class Recorder:
    """Collects pipeline events; counts the engine's decodes."""

    def __init__(self) -> None:
        self.events: list[PipelineEvent] = []

    async def __call__(self, event: PipelineEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, kind: type[Any], count: int = 1) -> None:
        for _ in range(int(DEADLINE_S / 0.02)):
            if len(self.of(kind)) >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind.__name__} in {self.events}")


async def _feed(pipeline: EndpointingPipeline, audio: FloatAudio) -> None:
    for i in range(0, len(audio), CHUNK):
        await pipeline.feed(audio[i : i + CHUNK])


def _count_decodes(hub: EngineHub, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the clips the engine really decodes (their lengths in samples)."""
    engine = hub.asr().engine
    original = engine.transcribe
    decoded: list[int] = []

    def counting(audio: FloatAudio, options: Any) -> Any:
        decoded.append(len(audio))
        return original(audio, options)

    monkeypatch.setattr(engine, "transcribe", counting)
    return decoded


def _hold_worker(hub: EngineHub) -> tuple[threading.Event, asyncio.Task[Any]]:
    """Occupy tiny.en's only worker until the returned gate is set."""
    gate = threading.Event()
    task = asyncio.create_task(hub.run(hub.asr(), gate.wait, DEADLINE_S))
    return gate, task


def _pipeline(
    hub: EngineHub, recorder: Recorder, vad: bool = True, **config: Any
) -> EndpointingPipeline:
    return EndpointingPipeline(
        hub.asr_session(),
        hub.vad_session() if vad else None,
        recorder,
        EndpointConfig(**config),
    )


async def test_endpoints_found_and_speculation_reused_when_the_utterance_ended(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    speech = clips["light"]
    async with _pipeline(hub, recorder) as pipeline:
        await _feed(pipeline, np.concatenate([_silence(0.5), speech, _silence(1.0)]))
        # The speculation started at the end of speech streams as a partial...
        await recorder.wait_for(PartialTranscript)
        transcript = await pipeline.finish()
    started, stopped = recorder.of(SpeechStarted), recorder.of(SpeechStopped)
    assert len(started) == 1 and len(stopped) == 1
    # The speech lies within the clip (VAD frames are 32 ms; allow a little slack).
    speech_end_ms = (0.5 + len(speech) / RATE) * 1000
    assert 300 <= started[0].timestamp_ms <= 1500
    assert speech_end_ms - 800 <= stopped[0].timestamp_ms <= speech_end_ms + 1000
    # ...and is the final transcript: one decode in all.
    (partial,) = recorder.of(PartialTranscript)
    (final,) = recorder.of(FinalTranscript)
    assert partial.speculative and final.reused_speculation
    assert final.text == partial.text == transcript.text
    assert_means(transcript.text, "turn", "living", "room", "light")
    assert len(decoded) == 1
    kinds = [type(e) for e in recorder.events]
    assert kinds.index(PartialTranscript) < kinds.index(FinalTranscript)


async def test_finish_while_the_speculation_runs_reuses_it(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    gate, holder = _hold_worker(hub)
    async with _pipeline(hub, recorder) as pipeline:
        await _feed(pipeline, np.concatenate([clips["light"], _silence(0.7)]))
        assert pipeline.asr.decoding == 1  # the speculation waits for the worker
        final = asyncio.create_task(pipeline.finish())
        await asyncio.sleep(0.1)
        gate.set()
        await holder
        transcript = await asyncio.wait_for(final, DEADLINE_S)
    assert recorder.of(FinalTranscript)[0].reused_speculation
    assert_means(transcript.text, "living", "room", "light")
    assert len(decoded) == 1


async def test_speculation_discarded_when_speech_resumes(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    # The worker is busy: the first speculation is still queued when speech resumes.
    gate, holder = _hold_worker(hub)
    first, second = clips["light"], clips["lamp"]
    async with _pipeline(hub, recorder) as pipeline:
        await _feed(pipeline, np.concatenate([first, _silence(0.8)]))
        assert len(recorder.of(SpeechStopped)) == 1 and pipeline.asr.decoding == 1
        await _feed(pipeline, np.concatenate([second, _silence(0.8)]))
        assert len(recorder.of(SpeechStarted)) == 2 and len(recorder.of(SpeechStopped)) == 2
        gate.set()
        await holder
        transcript = await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    # The stale guess never ran; the second one covered both sentences and was final.
    assert len(decoded) == 1 and decoded[0] > len(first) + round(0.8 * RATE)
    partials = recorder.of(PartialTranscript)
    assert len(partials) <= 1
    final = recorder.of(FinalTranscript)[0]
    assert final.reused_speculation
    assert_means(transcript.text, "light", "lamp")


async def test_a_stale_decode_never_delays_the_final(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    gate, holder = _hold_worker(hub)
    speech = clips["lamp"]
    async with _pipeline(hub, recorder, partial_interval_s=0.25) as pipeline:
        for i in range(0, len(speech), CHUNK):
            await pipeline.feed(speech[i : i + CHUNK])
            # The budget: one partial or speculative decode at a time, however many are due.
            assert pipeline.asr.decoding <= 1
        assert pipeline.asr.decoding == 1  # a partial waits for the worker
        final = asyncio.create_task(pipeline.finish())
        await asyncio.sleep(0.1)
        gate.set()
        await holder
        transcript = await asyncio.wait_for(final, DEADLINE_S)
    # The queued partial was dropped, not decoded before the final.
    assert decoded == [len(speech)]
    assert not recorder.of(FinalTranscript)[0].reused_speculation
    assert_means(transcript.text, "living", "room", "lamp")


async def test_partials_while_speech_goes_on(hub: EngineHub, clips: dict[str, FloatAudio]) -> None:
    recorder = Recorder()
    speech = clips["lamp"]
    async with _pipeline(hub, recorder, partial_interval_s=0.5) as pipeline:
        for i in range(0, len(speech), CHUNK):
            await pipeline.feed(speech[i : i + CHUNK])
            await asyncio.sleep(0)  # let a finished partial report
        await recorder.wait_for(PartialTranscript)
        await pipeline.finish()
    partials = recorder.of(PartialTranscript)
    assert partials and not any(p.speculative for p in partials)
    kinds = [type(e) for e in recorder.events]
    assert kinds.index(SpeechStarted) < kinds.index(PartialTranscript)
    assert kinds[-1] is FinalTranscript


async def test_auto_finish_and_no_speech_timeout(
    hub: EngineHub, clips: dict[str, FloatAudio]
) -> None:
    recorder = Recorder()
    config: dict[str, Any] = {
        "finish_silence_s": 0.6,
        "no_speech_timeout_s": 1.0,
        "pre_roll_s": 0.5,
    }
    async with _pipeline(hub, recorder, **config) as pipeline:
        # Nobody speaks: a timeout, and the wait costs no memory.
        await _feed(pipeline, _silence(3.0))
        (timeout,) = recorder.of(NoSpeech)
        assert 1000 <= timeout.timestamp_ms <= 1200
        assert pipeline.asr.duration_s <= 0.5 + CHUNK / RATE
        # A command, then silence: the pipeline ends the utterance by itself.
        await _feed(pipeline, np.concatenate([clips["light"], _silence(1.0)]))
        await recorder.wait_for(FinalTranscript)
        final = recorder.of(FinalTranscript)[0]
        assert final.reused_speculation  # speculated at 0.3 s, final at 0.6 s of silence
        assert_means(final.text, "living", "room", "light")
        # ...and listens for the next one.
        await _feed(pipeline, np.concatenate([clips["lamp"], _silence(1.0)]))
        await recorder.wait_for(FinalTranscript, 2)
        assert_means(recorder.of(FinalTranscript)[1].text, "living", "room", "lamp")
    # The timeout counts again after each final transcript.
    assert isinstance(recorder.events[0], NoSpeech)
    assert len(recorder.of(SpeechStarted)) == len(recorder.of(SpeechStopped)) == 2


async def test_max_utterance_cuts_long_speech(hub: EngineHub, clips: dict[str, FloatAudio]) -> None:
    recorder = Recorder()
    async with _pipeline(hub, recorder, finish_silence_s=0.6, max_utterance_s=1.0) as pipeline:
        await _feed(pipeline, np.concatenate([clips["lamp"], _silence(1.0)]))
        await recorder.wait_for(FinalTranscript, 2)
    # Speech went on past 1 s: that utterance was ended there, the rest is the next one.
    kinds = [type(e) for e in recorder.events if not isinstance(e, PartialTranscript)]
    assert kinds[:3] == [SpeechStarted, SpeechStopped, SpeechStarted]
    first_start, cut = recorder.of(SpeechStarted)[0], recorder.of(SpeechStopped)[0]
    assert cut.timestamp_ms - first_start.timestamp_ms <= 1000 + 1000 * CHUNK // RATE


async def test_without_vad_the_whole_stream_is_decoded(
    hub: EngineHub, clips: dict[str, FloatAudio]
) -> None:
    recorder = Recorder()
    async with _pipeline(hub, recorder, vad=False) as pipeline:
        await _feed(pipeline, clips["light"])
        transcript = await pipeline.finish()
    assert [type(e) for e in recorder.events] == [FinalTranscript]
    assert_means(transcript.text, "living", "room", "light")
    with pytest.raises(RuntimeError, match="finished"):
        await pipeline.feed(clips["light"])


async def test_audio_beyond_the_limit_is_refused(
    hub: EngineHub, make_settings: Callable[..., Settings]
) -> None:
    recorder = Recorder()
    session = hub.asr_session(max_audio_s=2.0)
    async with EndpointingPipeline(session, hub.vad_session(), recorder) as pipeline:
        await pipeline.feed(_silence(1.5))
        pipeline.check_room(0.5)
        with pytest.raises(LimitExceededError, match="max_audio_s"):
            pipeline.check_room(0.6)
        with pytest.raises(LimitExceededError):
            await pipeline.feed(_silence(0.6))
        assert pipeline.asr.duration_s == 1.5
