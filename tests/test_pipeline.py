"""The endpointing pipeline with real Silero VAD and Whisper tiny.en, no sockets.

Audio is fed as fast as the test can (durations inside the pipeline are
counted in audio, not wall-clock time), so nothing here depends on CPU speed.
Tests of speculation and partials switch the arrival-rate gate off
(``max_arrival_rate=None``) or drive it with a fake clock; tests of the gate
feed with the real clock. Where a test needs a decode to wait, it holds the
model's only worker with a gate instead of guessing how long inference takes.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
    hub: EngineHub,
    recorder: Recorder,
    vad: bool = True,
    clock: Callable[[], float] | None = None,
    **config: Any,
) -> EndpointingPipeline:
    """A pipeline that speculates whatever the arrival rate, unless ``config``
    sets ``max_arrival_rate``."""
    config.setdefault("max_arrival_rate", None)
    return EndpointingPipeline(
        hub.asr_session(),
        hub.vad_session() if vad else None,
        recorder,
        EndpointConfig(**config),
        **({} if clock is None else {"clock": clock}),
    )


class FakeClock:
    """Wall-clock time that the test advances as if audio came at real time."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


async def _feed_paced(pipeline: EndpointingPipeline, audio: FloatAudio, clock: FakeClock) -> None:
    for i in range(0, len(audio), CHUNK):
        piece = audio[i : i + CHUNK]
        await pipeline.feed(piece)
        clock.now_s += len(piece) / RATE


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


async def test_a_guess_waits_for_a_free_worker_and_is_reused(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    gate, holder = _hold_worker(hub)
    async with _pipeline(hub, recorder) as pipeline:
        await _feed(pipeline, np.concatenate([clips["light"], _silence(0.7)]))
        # The only worker is busy: the speculation does not queue behind it.
        assert len(recorder.of(SpeechStopped)) == 1 and pipeline.asr.decoding == 0
        gate.set()
        await holder
        # The worker is free: the next silence starts it, and finish reuses it.
        await _feed(pipeline, _silence(0.2))
        assert pipeline.asr.decoding == 1
        transcript = await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    assert recorder.of(FinalTranscript)[0].reused_speculation
    assert_means(transcript.text, "living", "room", "light")
    assert len(decoded) == 1


async def test_speculation_discarded_when_speech_resumes(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    first, second = clips["light"], clips["lamp"]
    async with _pipeline(hub, recorder) as pipeline:
        await _feed(pipeline, np.concatenate([first, _silence(0.8)]))
        assert len(recorder.of(SpeechStopped)) == 1 and pipeline.asr.decoding == 1
        await _feed(pipeline, np.concatenate([second, _silence(0.8)]))
        assert len(recorder.of(SpeechStarted)) == 2 and len(recorder.of(SpeechStopped)) == 2
        # The stale guess may still hold the worker (it cannot be stopped there);
        # once it is done, the next silence starts the guess over both sentences.
        for _ in range(int(DEADLINE_S / 0.02)):
            if not pipeline.asr.decoding:
                break
            await asyncio.sleep(0.02)
        await _feed(pipeline, _silence(0.2))
        transcript = await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    # The first guess (one sentence) was stale: never reported after speech resumed,
    # never final. The final is the guess over both sentences.
    assert decoded[-1] > len(first) + round(0.8 * RATE)
    final = recorder.of(FinalTranscript)[0]
    assert final.reused_speculation
    for partial in recorder.of(PartialTranscript):
        assert partial.speculative
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
            # A partial never queues behind a busy worker.
            assert pipeline.asr.decoding == 0
        final = asyncio.create_task(pipeline.finish())
        await asyncio.sleep(0.1)
        gate.set()
        await holder
        transcript = await asyncio.wait_for(final, DEADLINE_S)
    # No partial was decoded before the final.
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


async def test_audio_faster_than_real_time_gets_no_guesses(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client sending buffered audio as fast as it can: no speculation, no partials;
    the final decode is the only one and starts at once."""
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    audio = np.concatenate([clips["light"], _silence(0.8), clips["lamp"], _silence(0.8)])
    config: dict[str, Any] = {"max_arrival_rate": 1.5, "partial_interval_s": 0.5}
    async with _pipeline(hub, recorder, **config) as pipeline:
        await _feed(pipeline, audio)
        assert not pipeline.paced and pipeline.arrival_rate > 1.5
        assert pipeline.asr.decoding == 0
        transcript = await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    assert len(recorder.of(SpeechStopped)) == 2  # the VAD still ran
    assert not recorder.of(PartialTranscript)
    assert decoded == [len(audio)]
    assert not recorder.of(FinalTranscript)[0].reused_speculation
    assert_means(transcript.text, "light", "lamp")


async def test_audio_at_real_time_gets_speculation(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same gate with audio at real-time pace (a fake clock) speculates and
    reuses the speculation."""
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    clock = FakeClock()
    async with _pipeline(hub, recorder, clock=clock, max_arrival_rate=1.5) as pipeline:
        await _feed_paced(pipeline, np.concatenate([clips["light"], _silence(0.7)]), clock)
        assert pipeline.paced and 0.5 <= pipeline.arrival_rate <= 1.6
        transcript = await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    assert recorder.of(FinalTranscript)[0].reused_speculation
    assert len(decoded) == 1
    assert_means(transcript.text, "living", "room", "light")


async def test_a_burst_then_real_time_speculates_once_the_burst_is_behind(
    hub: EngineHub, clips: dict[str, FloatAudio]
) -> None:
    """Buffered pre-roll sent at once, then live audio: the rate is measured over
    the last window, so speculation comes back once the burst left it."""
    recorder = Recorder()
    clock = FakeClock()
    async with _pipeline(hub, recorder, clock=clock, max_arrival_rate=1.5) as pipeline:
        await _feed(pipeline, _silence(2.0))  # the burst: no wall time passes
        assert not pipeline.paced
        await _feed_paced(pipeline, np.concatenate([clips["light"], _silence(0.7)]), clock)
        assert pipeline.paced
        await recorder.wait_for(PartialTranscript)
        await pipeline.finish()
    assert recorder.of(FinalTranscript)[0].reused_speculation


async def test_a_fast_recording_is_not_cut_when_ending_needs_pace(
    hub: EngineHub, clips: dict[str, FloatAudio]
) -> None:
    """``end_only_when_paced``: silence inside a recording sent at once ends nothing;
    the caller's finish does. The same audio at real time is cut there."""
    audio = np.concatenate([clips["light"], _silence(1.0), clips["lamp"], _silence(1.0)])
    config: dict[str, Any] = {
        "max_arrival_rate": 1.5,
        "finish_silence_s": 0.6,
        "end_only_when_paced": True,
    }
    recorder = Recorder()
    async with _pipeline(hub, recorder, **config) as pipeline:
        await _feed(pipeline, audio)
        assert pipeline.utterances == 0
        transcript = await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    assert_means(transcript.text, "light", "lamp")
    recorder = Recorder()
    clock = FakeClock()
    async with _pipeline(hub, recorder, clock=clock, **config) as pipeline:
        await _feed_paced(pipeline, audio, clock)
        await recorder.wait_for(FinalTranscript, 2)
    assert pipeline.utterances == 2


async def test_no_guesses_while_audio_waits_to_be_fed(
    hub: EngineHub, clips: dict[str, FloatAudio], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller says more audio is already waiting (``backlogged``): no guess
    starts, whatever the arrival rate; once it caught up, speculation resumes."""
    decoded = _count_decodes(hub, monkeypatch)
    recorder = Recorder()
    async with _pipeline(hub, recorder) as pipeline:
        pipeline.backlogged = True
        await _feed(pipeline, np.concatenate([clips["light"], _silence(0.7)]))
        assert len(recorder.of(SpeechStopped)) == 1 and pipeline.asr.decoding == 0
        pipeline.backlogged = False
        await _feed(pipeline, _silence(0.2))
        assert pipeline.asr.decoding == 1
        await asyncio.wait_for(pipeline.finish(), DEADLINE_S)
    assert recorder.of(FinalTranscript)[0].reused_speculation
    assert len(decoded) == 1


@pytest.mark.parametrize(
    ("text", "early"),
    [
        ("Turn on the living room light.", True),
        ("Turn on the living room light?", True),
        ("Turn on the living room", False),
        ("Turn on the living room...", False),
    ],
)
async def test_a_finished_sentence_ends_the_utterance_early(
    hub: EngineHub,
    clips: dict[str, FloatAudio],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    early: bool,
) -> None:
    """``complete_sentence_silence_s``: once the speculation is done and its text
    ends a sentence, a short silence ends the utterance; otherwise the whole
    ``finish_silence_s`` is waited. (Real VAD and decode; the decode's text is
    set, so the rule is tested whatever punctuation tiny.en chooses here.)"""
    engine = hub.asr().engine
    original = engine.transcribe

    def punctuated(audio: FloatAudio, options: Any) -> Any:
        info, segments = original(audio, options)
        decoded = list(segments)
        if not decoded:
            return info, iter(())
        whole = dataclasses.replace(decoded[0], end_s=decoded[-1].end_s, text=text)
        return info, iter([whole])

    monkeypatch.setattr(engine, "transcribe", punctuated)
    recorder = Recorder()
    speech = clips["light"][: round(1.55 * RATE)]  # the clip without its trailing silence
    async with _pipeline(
        hub,
        recorder,
        trailing_silence_s=0.2,
        finish_silence_s=2.0,
        complete_sentence_silence_s=0.3,
    ) as pipeline:
        await _feed(pipeline, np.concatenate([speech, _silence(0.25)]))
        await recorder.wait_for(PartialTranscript)  # the speculation is done
        await asyncio.sleep(0)
        silence_s = 0.25
        while pipeline.utterances == 0 and silence_s < 1.5:
            await _feed(pipeline, _silence(0.1))
            silence_s += 0.1
        if early:
            assert pipeline.utterances == 1 and silence_s < 1.0, silence_s
            await recorder.wait_for(FinalTranscript)
            (final,) = recorder.of(FinalTranscript)
            assert final.reused_speculation and final.text == text
        else:
            assert pipeline.utterances == 0  # waits for finish_silence_s (2 s)
            await _feed(pipeline, _silence(0.7))
            assert pipeline.utterances == 1


async def test_sentence_ends() -> None:
    from edgevoice.pipeline.endpointing import ends_sentence

    assert all(map(ends_sentence, ["Lamp on.", "Really?", 'Wow!"', "开灯。", " done. "]))
    assert not any(map(ends_sentence, ["Turn on the", "Turn on the...", "Hmm…", "", "e.g"]))
