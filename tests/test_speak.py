"""The speak pipeline: text (whole or in chunks) → bounded sentences → audio in order.

Real Piper (``en_US-joe-medium``) speaks wherever the audio itself matters;
the fake ``test-tts`` engine stands in where a test needs thousands of
sentences synthesized quickly (the pipeline's bounds, not the voice, are
under test there). No assertion depends on synthesis speed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgevoice.config import LimitsConfig, ModelConfig, Settings
from edgevoice.engines.base import SynthesizeOptions
from edgevoice.errors import LimitExceededError, UnknownModelError, UnsupportedRequestError
from edgevoice.hub import EngineHub
from edgevoice.pipeline.speak import SpokenAudio, TextFeed, speak
from edgevoice.testing import FakeTtsEngine
from edgevoice.text import split_sentences
from tests.conftest import JOE

FAKE = ModelConfig(
    name="fake", engine="test-tts", model="fake", options={"seconds_per_char": 0.0005}
)


@pytest.fixture
async def piper_hub(
    make_settings: Callable[..., Settings], shared_cache: Path
) -> AsyncIterator[EngineHub]:
    async with EngineHub(make_settings(asr=[], tts=[JOE], cache_dir=shared_cache)) as hub:
        yield hub


@pytest.fixture
async def fake_hub(make_settings: Callable[..., Settings]) -> AsyncIterator[EngineHub]:
    async with EngineHub(make_settings(asr=[], tts=[FAKE])) as hub:
        yield hub


async def _words(count: int, word: str = "word ") -> AsyncIterator[str]:
    for _ in range(count):
        yield word


async def _collect(hub: EngineHub, text: Any, **kwargs: Any) -> list[SpokenAudio]:
    async with speak(hub, text, **kwargs) as speech:
        return [chunk async for chunk in speech]


async def test_whole_text_is_spoken_sentence_by_sentence_in_order(piper_hub: EngineHub) -> None:
    text = "Turn on the kitchen light. It is dark in here, isn't it? Thank you."
    chunks = await _collect(piper_hub, text)
    assert [c.sentence for c in chunks] == sorted(c.sentence for c in chunks)
    spoken = list(dict.fromkeys((c.sentence, c.text) for c in chunks))
    assert [t for _i, t in spoken] == split_sentences(text)
    for chunk in chunks:
        assert chunk.rate_hz == 22050
        assert chunk.samples.dtype == np.float32 and len(chunk.samples) > 0
        assert np.all(np.isfinite(chunk.samples)) and np.abs(chunk.samples).max() <= 1.0
    # Three short sentences are seconds of speech, not silence.
    assert sum(c.duration_s for c in chunks) > 2.0
    assert max(np.abs(c.samples).max() for c in chunks) > 0.1


async def test_only_the_first_sentence_gets_a_quick_lead_chunk(piper_hub: EngineHub) -> None:
    """Piper speaks the first 3 words of a long first sentence as their own chunk
    (first audio sooner); later sentences are synthesized while earlier ones play,
    so they stay whole (one model run each, unbroken prosody)."""
    text = (
        "The weather today is sunny with a light breeze. "
        "Later this evening expect clouds rolling in from the west."
    )
    chunks = await _collect(piper_hub, text)
    per_sentence = [sum(1 for c in chunks if c.sentence == i) for i in range(2)]
    assert per_sentence == [2, 1], per_sentence


async def test_text_over_the_limit_is_refused_before_any_work(piper_hub: EngineHub) -> None:
    model, _voice = piper_hub.voice(None)
    requests, busy_s = model.slot.requests, model.slot.busy_s
    megabyte = "word" * 262144
    with pytest.raises(LimitExceededError, match="max_input_chars") as caught:
        speak(piper_hub, megabyte)
    assert caught.value.limit == "max_input_chars"
    assert (model.slot.requests, model.slot.busy_s) == (requests, busy_s)


async def test_unknown_voice_is_refused_at_once(piper_hub: EngineHub) -> None:
    with pytest.raises(UnknownModelError):
        speak(piper_hub, "Hello.", SynthesizeOptions(voice="nobody"))


async def test_engine_error_surfaces_before_any_audio(piper_hub: EngineHub) -> None:
    with pytest.raises(UnsupportedRequestError, match="speaker"):
        await _collect(piper_hub, "Hello there.", options=SynthesizeOptions(speaker="nobody"))


async def test_text_with_nothing_to_say_yields_no_audio(piper_hub: EngineHub) -> None:
    assert await _collect(piper_hub, " ... !!! ?? — ") == []


async def test_long_unpunctuated_text_is_spoken_in_bounded_pieces(piper_hub: EngineHub) -> None:
    limits = LimitsConfig(max_sentence_chars=40)
    text = " ".join(f"item{i % 10}" for i in range(40))  # 239 chars, no punctuation
    chunks = await _collect(piper_hub, text, limits=limits)
    pieces = list(dict.fromkeys((c.sentence, c.text) for c in chunks))
    assert len(pieces) >= 6
    assert all(len(t) <= 40 for _i, t in pieces)
    # Nothing lost or reordered: the pieces are the text.
    assert " ".join(t for _i, t in pieces) == text
    assert all(len(c.samples) > 0 for c in chunks)


async def test_twenty_thousand_word_chunks_stream_with_bounded_pending_text(
    fake_hub: EngineHub,
) -> None:
    """The issue's ``synthesize-chunk "word "`` x 20 000: linear, bounded, complete."""
    limits = LimitsConfig(max_sentence_chars=300, max_input_chars=4096)
    pieces: dict[int, str] = {}
    audio_s = 0.0
    async with speak(fake_hub, _words(20000), limits=limits) as speech:
        async for chunk in speech:
            pieces[chunk.sentence] = chunk.text
            audio_s += chunk.duration_s
    assert all(len(text) <= 300 for text in pieces.values())
    assert sum(len(text.split()) for text in pieces.values()) == 20000
    assert audio_s > 0 and speech.audio_s == pytest.approx(audio_s)
    assert speech.sentences == len(pieces)


async def test_text_feed_refuses_a_flood_and_still_speaks_what_it_took(
    fake_hub: EngineHub,
) -> None:
    feed = TextFeed(max_pending_chars=4096)
    accepted = 0
    with pytest.raises(LimitExceededError, match="max_input_chars"):
        for _ in range(20000):
            feed.put("word ")
            accepted += 1
    assert accepted == 4096 // 5 and feed.pending_chars <= 4096
    feed.close()
    chunks = await _collect(fake_hub, feed)
    texts = dict((c.sentence, c.text) for c in chunks)
    assert sum(len(t.split()) for t in texts.values()) == accepted
    with pytest.raises(RuntimeError, match="closed"):
        feed.put("more")


async def test_text_feed_chunks_arrive_while_speaking(piper_hub: EngineHub) -> None:
    """A handler pushes LLM-like tokens while audio streams back."""
    feed = TextFeed(max_pending_chars=4096)
    tokens = ["Hel", "lo th", "ere.", " How ", "are", " you", " to", "day?", " Fine"]
    got: list[SpokenAudio] = []

    async def push() -> None:
        for token in tokens:
            feed.put(token)
            await asyncio.sleep(0.01)
        feed.close()

    async with piper_hub.speak(feed) as speech:  # the hub's handle on the same pipeline
        pusher = asyncio.create_task(push())
        got = [chunk async for chunk in speech]
        await pusher
    texts = list(dict.fromkeys(c.text for c in got))
    assert texts == ["Hello there.", "How are you today?", "Fine"]


async def test_at_most_one_piece_is_synthesized_ahead(fake_hub: EngineHub) -> None:
    model, _voice = fake_hub.voice(None)
    engine = model.engine
    assert isinstance(engine, FakeTtsEngine)
    text = " ".join(f"Sentence number {i}." for i in range(20))
    async with speak(fake_hub, text) as speech:
        first = await anext(speech)
        assert first.sentence == 0
        # However long the consumer dawdles, the producer stops one piece ahead.
        for _ in range(20):
            await asyncio.sleep(0.02)
        assert len(engine.calls) <= 2
    assert len(engine.calls) <= 2


async def test_consumer_stopping_early_releases_the_model(piper_hub: EngineHub) -> None:
    model, _voice = piper_hub.voice(None)
    text = " ".join(["This is a sentence that takes a moment to say."] * 30)
    async with speak(piper_hub, text) as speech:
        async for _chunk in speech:
            break
    assert await _idle(model)
    # The model serves the next request normally.
    chunks = await _collect(piper_hub, "Still here.")
    assert chunks and sum(c.duration_s for c in chunks) > 0.3


async def _idle(model: Any, deadline_s: float = 60.0) -> bool:
    """Whether the model's slot drops to no activity (worker calls finish on their own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while model.slot.active and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    return bool(model.slot.active == 0)


async def test_cancelling_the_consumer_stops_synthesis(fake_hub: EngineHub) -> None:
    model, _voice = fake_hub.voice(None)
    engine = model.engine
    assert isinstance(engine, FakeTtsEngine)
    started = asyncio.Event()

    async def consume() -> None:
        async with speak(fake_hub, _words(100_000)) as speech:
            async for _chunk in speech:
                started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _idle(model)
    calls = len(engine.calls)
    await asyncio.sleep(0.1)
    assert len(engine.calls) == calls  # nothing synthesizes on behind the consumer's back


_RSS_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from edgevoice.config import LimitsConfig, Settings
from edgevoice.hub import EngineHub
from edgevoice.pipeline.speak import speak
from tests.conftest import JOE

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

async def main():
    settings = Settings(
        cache_dir=Path(sys.argv[1]), state_dir=Path(sys.argv[1]) / "state", asr=[], tts=[JOE],
        wake=[], vad=[], wyoming={"enabled": False}, http={"enabled": False},
        mqtt={"enabled": False}, release_memory_after_s=0.1,
    )
    async with EngineHub(settings) as hub:
        async with speak(hub, "Warm up.") as speech:
            async for _ in speech:
                pass
        idle = rss_mb()
        text = ("word " * 1000)[:4096]  # the default max_input_chars, no punctuation
        pieces, longest, audio_s = set(), 0, 0.0
        async with speak(hub, text, limits=LimitsConfig()) as speech:
            async for chunk in speech:
                pieces.add(chunk.sentence)
                longest = max(longest, len(chunk.text))
                audio_s += chunk.duration_s
        kept = rss_mb()  # the voice keeps its arena while busy
        slot = hub.voice(None)[0].slot
        for _ in range(3000):  # the hub hands it back once the voice idles
            if slot.released_s > slot.last_used_s and slot.active == 0:
                break
            await asyncio.sleep(0.02)
        print(json.dumps({"idle_mb": idle, "kept_mb": kept, "after_mb": rss_mb(),
                          "pieces": len(pieces), "longest": longest, "audio_s": audio_s}))

asyncio.run(main())
"""


@pytest.mark.slow
def test_rss_returns_near_idle_after_long_unpunctuated_text(tmp_path: Path) -> None:
    """4096 characters without punctuation (the issue: RSS 0.3 → 5.9 GB kept),
    once the voice is idle (``release_memory_after_s``; it keeps its arena while busy).

    Measured in a fresh interpreter; the margin is generous (allocator noise),
    the failure it guards against is gigabytes.
    """
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["pieces"] >= 4096 // 300 and measured["longest"] <= 300, measured
    assert measured["audio_s"] > 60, measured
    assert measured["after_mb"] - measured["idle_mb"] < 200, measured
