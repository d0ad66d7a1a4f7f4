"""The Wyoming server over real TCP, with the wyoming client, real engines and real speech."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop, wav_to_chunks
from wyoming.client import AsyncTcpClient, AsyncUnixClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info, SelectProgram
from wyoming.ping import Ping, Pong
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)
from wyoming.wake import Detect, Detection, NotDetected

from edgevoice import __version__
from edgevoice.audio import decode, float_to_pcm16, pcm_to_float
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.hub import EngineHub
from edgevoice.protocols.wyoming import WyomingServer
from tests.conftest import (
    BASE,
    JOE,
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_DE_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    REPO,
    TINY_EN,
    stalled_s,
    words,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAKE_ASR = ModelConfig(
    name="fake", engine="test-asr", model="fake", options={"text": "from the other program"}
)
WAKE = [
    ModelConfig(name=w, engine="microwakeword", model=w)
    for w in ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")
]
VAD = [ModelConfig(name="silero", engine="silero-vad", model="silero", max_concurrency=4)]
TIMEOUT_S = 60.0


def _settings(cache: Path, **wyoming: Any) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        asr=[TINY_EN.model_copy(update={"default": True}), BASE, FAKE_ASR],
        tts=[JOE],
        wake=WAKE,
        vad=VAD,
        wyoming=WyomingConfig(uri="tcp://127.0.0.1:0", zeroconf=False, **wyoming),
        http=HttpConfig(enabled=False),
        mqtt=MqttConfig(enabled=False),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(shared_cache: Path) -> AsyncIterator[EngineHub]:
    async with EngineHub(_settings(shared_cache)) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[WyomingServer]:
    async with WyomingServer(hub.settings, hub) as running:
        yield running


def _port(server: WyomingServer) -> int:
    return int(server.addresses[0].rsplit(":", 1)[1])


def _client(server: WyomingServer) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", _port(server))


async def _read(client: AsyncTcpClient) -> Event:
    event = await asyncio.wait_for(client.read_event(), TIMEOUT_S)
    assert event is not None, "server closed the connection"
    return event


async def _read_until(client: AsyncTcpClient, *types: str) -> tuple[Event, list[Event]]:
    seen: list[Event] = []
    while True:
        event = await _read(client)
        seen.append(event)
        if event.type in types:
            return event, seen


async def _final_transcript(client: AsyncTcpClient) -> Transcript:
    """Read through ``transcript-stop``; return the ``transcript``."""
    _, seen = await _read_until(client, "transcript-stop", "error")
    final = [e for e in seen if e.type == "transcript"]
    assert len(final) == 1, seen
    return Transcript.from_event(final[0])


def _wav_chunks(path: Path, samples_per_chunk: int = 1024) -> list[Event]:
    with wave.open(str(path), "rb") as wav:
        start = AudioStart(wav.getframerate(), wav.getsampwidth(), wav.getnchannels())
        chunks = [c.event() for c in wav_to_chunks(wav, samples_per_chunk)]
    return [start.event(), *chunks, AudioStop().event()]


def _pcm_events(audio: np.ndarray, rate: int = 16000, chunk: int = 1024) -> list[Event]:
    pcm = float_to_pcm16(audio.astype(np.float32))
    step = chunk * 2
    return [
        AudioStart(rate, 2, 1).event(),
        *(AudioChunk(rate, 2, 1, pcm[i : i + step]).event() for i in range(0, len(pcm), step)),
        AudioStop().event(),
    ]


async def _write_paced(client: AsyncTcpClient, events: list[Event]) -> None:
    """Write ``events``, each ``audio-chunk`` when its audio would have been captured."""
    started = time.monotonic()
    sent_s = 0.0
    for event in events:
        await client.write_event(event)
        if event.type == "audio-chunk":
            chunk = AudioChunk.from_event(event)
            sent_s += len(chunk.audio) / (chunk.rate * chunk.width * chunk.channels)
            await asyncio.sleep(max(0.0, started + sent_s - time.monotonic()))


async def _transcribe(server: WyomingServer, events: list[Event], **request: Any) -> Transcript:
    async with _client(server) as client:
        await client.write_event(Transcribe(**request).event())
        for event in events:
            await client.write_event(event)
        final, _ = await _read_until(client, "transcript", "error")
        assert final.type == "transcript", final.data
        return Transcript.from_event(final)


# ---------------------------------------------------------------- describe


async def test_describe_lists_every_model_voice_and_wake_word(server: WyomingServer) -> None:
    async with _client(server) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await _read(client))
    # Programs by engine; the default model's program comes first.
    assert [p.name for p in info.asr] == ["faster-whisper", "test-asr"]
    whisper = info.asr[0]
    assert whisper.supports_transcript_streaming and whisper.installed
    # Server endpointing (the default, with a VAD model): Home Assistant needs no VAD.
    assert whisper.requires_external_vad is False
    assert whisper.version == __version__
    assert [m.name for m in whisper.models] == ["tiny-en", "base"]
    assert whisper.models[0].languages == ["en"]
    assert {"en", "de", "fr"} <= set(whisper.models[1].languages)
    assert all(m.installed and m.version for m in whisper.models)
    assert "faster-whisper" in whisper.models[0].attribution.url
    (tts,) = info.tts
    assert tts.name == "piper" and tts.supports_synthesize_streaming
    assert [(v.name, v.languages) for v in tts.voices] == [("joe", ["en_US"])]
    assert tts.voices[0].attribution.name and tts.voices[0].installed
    (wake,) = info.wake
    assert wake.name == "microwakeword"
    assert {m.name: m.phrase for m in wake.models} == {
        "okay_nabu": "Okay Nabu",
        "hey_jarvis": "Hey Jarvis",
        "alexa": "Alexa",
        "hey_mycroft": "Hey Mycroft",
    }
    assert "kahrendt" in wake.models[0].attribution.url


# --------------------------------------------------------------------- ASR


@pytest.mark.parametrize(("path", "text"), [(LAMP_WAV, LAMP_TEXT), (LIGHT_EN_WAV, LIGHT_EN_TEXT)])
async def test_transcribes_english_files(server: WyomingServer, path: Path, text: str) -> None:
    # The lamp file is 44.1 kHz stereo: converted on the fly.
    transcript = await _transcribe(server, _wav_chunks(path), name="tiny-en", language="en")
    assert words(transcript.text) == words(text)
    assert transcript.language == "en"


async def test_transcribe_picks_model_and_language(server: WyomingServer) -> None:
    transcript = await _transcribe(server, _wav_chunks(LIGHT_DE_WAV), name="base", language="de")
    assert words(transcript.text) == ["schalte", "das", "wohnzimmerlicht", "ein"]
    assert transcript.language == "de"


async def test_unknown_model_and_language_are_errors(server: WyomingServer) -> None:
    async with _client(server) as client:
        await client.write_event(Transcribe(name="large-v9").event())
        error = Error.from_event(await _read(client))
        assert error.code == "unknown-model" and "tiny-en" in error.text
        await client.write_event(Transcribe(name="tiny-en", language="de").event())
        for event in _wav_chunks(LIGHT_EN_WAV)[:1]:
            await client.write_event(event)
        error = Error.from_event(await _read(client))
        assert error.code == "unsupported-language"


async def test_streaming_transcript_arrives_while_audio_still_flows(
    server: WyomingServer,
) -> None:
    speech = decode(LIGHT_EN_WAV).samples
    events = _pcm_events(np.concatenate([speech, np.zeros(16000, np.float32)]))
    received: list[Event] = []
    async with _client(server) as client:

        async def collect() -> None:
            while True:
                event = await _read(client)
                received.append(event)
                if event.type == "transcript-stop":
                    return

        reader = asyncio.create_task(collect())
        await client.write_event(Transcribe(language="en").event())
        # At real time, as a microphone: speculation runs only on paced audio.
        await _write_paced(client, events[:-1])
        # Speech ended inside the stream: the text comes before audio-stop.
        for _ in range(int(TIMEOUT_S / 0.05)):
            if any(e.type == "transcript-chunk" for e in received):
                break
            await asyncio.sleep(0.05)
        sent_stop_after = len(received)
        await client.write_event(events[-1])
        await asyncio.wait_for(reader, TIMEOUT_S)
    types = [e.type for e in received]
    assert "transcript-chunk" in types[:sent_stop_after]
    assert types.index("voice-started") < types.index("voice-stopped")
    stream = [t for t in types if t.startswith("transcript")]
    assert stream[0] == "transcript-start"
    assert stream[-2:] == ["transcript", "transcript-stop"]
    assert set(stream[1:-2]) == {"transcript-chunk"}
    chunks = "".join(
        TranscriptChunk.from_event(e).text for e in received if e.type == "transcript-chunk"
    )
    final = Transcript.from_event(next(e for e in received if e.type == "transcript"))
    assert chunks == final.text
    assert words(final.text) == words(LIGHT_EN_TEXT)


async def test_describe_answered_while_three_transcriptions_run(server: WyomingServer) -> None:
    events = _wav_chunks(LAMP_WAV, samples_per_chunk=4096)
    done: list[str] = []

    async def one() -> None:
        transcript = await _transcribe(server, events, language="en")
        done.append(transcript.text)

    jobs = [asyncio.create_task(one()) for _ in range(3)]
    await asyncio.sleep(0.3)  # all three are streaming or decoding by now
    async with _client(server) as client:
        for _ in range(3):
            await client.write_event(Describe().event())
            assert Info.is_type((await _read(client)).type)
            await client.write_event(Ping(text="x").event())
            assert Pong.from_event(await _read(client)).text == "x"
            # Answered while the three decodes (one at a time on tiny-en) go on.
            assert len(done) < 3
    await asyncio.gather(*jobs)
    assert [words(t) for t in done] == [words(LAMP_TEXT)] * 3


async def test_select_program(server: WyomingServer) -> None:
    async with _client(server) as client:
        await client.write_event(SelectProgram(name="test-asr").event())
        await client.write_event(Transcribe().event())
        for event in _wav_chunks(LIGHT_EN_WAV, 4096):
            await client.write_event(event)
        assert (await _final_transcript(client)).text == "from the other program"
        # Models of another program are not reachable through this one.
        await client.write_event(Transcribe(name="tiny-en").event())
        assert Error.from_event(await _read(client)).code == "unknown-model"
        await client.write_event(SelectProgram(name="no-such-program").event())
        assert Error.from_event(await _read(client)).code == "unknown-program"
        await client.write_event(SelectProgram(name="faster-whisper").event())
        await client.write_event(Transcribe().event())
        for event in _wav_chunks(LIGHT_EN_WAV, 4096):
            await client.write_event(event)
        assert words((await _final_transcript(client)).text) == words(LIGHT_EN_TEXT)


# --------------------------------------------------------------------- TTS


async def _collect_audio(client: AsyncTcpClient) -> tuple[list[Event], np.ndarray, int]:
    events: list[Event] = []
    while True:
        event = await _read(client)
        events.append(event)
        if event.type in ("audio-stop", "error"):
            break
    start = AudioStart.from_event(events[0])
    chunks = [AudioChunk.from_event(e) for e in events if e.type == "audio-chunk"]
    assert all((c.rate, c.width, c.channels) == (start.rate, 2, 1) for c in chunks)
    audio = pcm_to_float(b"".join(c.audio for c in chunks), 2)
    return events, audio, start.rate


async def test_home_assistant_streaming_tts_flow(server: WyomingServer, hub: EngineHub) -> None:
    text = "Hello there, this is a streaming test. The lights are on. Goodbye!"
    async with _client(server) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="joe")).event())
        for word in re.findall(r"\S+\s*", text):  # word by word, as from an LLM
            await client.write_event(SynthesizeChunk(text=word).event())
        # HA also sends the whole text for servers without streaming.
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice("joe")).event())
        await client.write_event(SynthesizeStop().event())
        events, audio, rate = await _collect_audio(client)
        stopped = await _read(client)
    types = [e.type for e in events]
    assert types[0] == "audio-start" and types.count("audio-start") == 1
    assert types[-1] == "audio-stop" and stopped.type == "synthesize-stopped"
    assert rate == 22050
    # Spoken once (the compatibility synthesize is not repeated), and intelligibly.
    from edgevoice.audio import Audio

    heard = await hub.transcribe(Audio(audio, rate), model="tiny-en")
    assert words(heard.text) == words(text)


async def test_synthesize_voice_speaker_and_errors(server: WyomingServer) -> None:
    async with _client(server) as client:
        await client.write_event(Synthesize(text="Hi there.", voice=SynthesizeVoice("joe")).event())
        events, audio, rate = await _collect_audio(client)
        assert events[0].type == "audio-start" and len(audio) > rate // 4
        await client.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice("nobody")).event())
        error = Error.from_event(await _read(client))
        assert error.code == "unknown-voice" and "joe" in error.text
        voice = SynthesizeVoice(name="joe", speaker="alice")
        await client.write_event(Synthesize(text="Hi.", voice=voice).event())
        assert Error.from_event(await _read(client)).code == "unsupported"
        await client.write_event(SynthesizeChunk(text="stray").event())
        assert Error.from_event(await _read(client)).code == "unexpected-event"
        # Language picks a voice.
        await client.write_event(
            Synthesize(text="Okay.", voice=SynthesizeVoice(language="en")).event()
        )
        events, _audio, _rate = await _collect_audio(client)
        assert events[-1].type == "audio-stop"


# -------------------------------------------------------------------- wake


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def spoken(hub: EngineHub) -> dict[str, np.ndarray]:
    clips = {}
    for key, text in (
        ("wake", "Hey Jarvis, turn on the lights."),
        ("command", "Turn on the kitchen lights."),
    ):
        audio = await hub.synthesize_all(text)
        clips[key] = np.concatenate([audio.at_rate(16000).samples, np.zeros(8000, np.float32)])
    return clips


async def test_wake_word_detected_and_not(
    server: WyomingServer, spoken: dict[str, np.ndarray]
) -> None:
    async with _client(server) as client:
        await client.write_event(Detect(names=["hey_jarvis"]).event())
        for event in _pcm_events(spoken["wake"]):
            await client.write_event(event)
        event = await _read(client)
        assert event.type == "detection"
        detection = Detection.from_event(event)
        assert detection.name == "hey_jarvis" and detection.timestamp
        await client.write_event(Detect(names=["hey_jarvis", "okay_nabu"]).event())
        for event in _pcm_events(spoken["command"]):
            await client.write_event(event)
        assert NotDetected.is_type((await _read(client)).type)
        await client.write_event(Detect(names=["hey_siri"]).event())
        assert Error.from_event(await _read(client)).code == "unknown-model"


async def test_wake_word_at_44k_stereo_without_audio_start(
    server: WyomingServer, spoken: dict[str, np.ndarray]
) -> None:
    from edgevoice.audio import resample

    mono = resample(spoken["wake"], 16000, 44100)
    stereo = np.repeat(float_to_pcm16(mono), 1)
    pcm = np.frombuffer(stereo, dtype="<i2").repeat(2).tobytes()
    async with _client(server) as client:
        await client.write_event(Detect().event())  # every wake word
        for i in range(0, len(pcm), 4096):
            await client.write_event(AudioChunk(44100, 2, 2, pcm[i : i + 4096]).event())
        assert Detection.from_event(await _read(client)).name == "hey_jarvis"


# --------------------------------------------------------------- bad input


async def _raw(server: WyomingServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", _port(server))


async def _still_works(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await async_write_event(Ping(text="alive").event(), writer)
    event = await asyncio.wait_for(async_read_event(reader), TIMEOUT_S)
    assert event is not None and Pong.from_event(event).text == "alive"


async def _expect_error(reader: asyncio.StreamReader, code: str) -> None:
    event = await asyncio.wait_for(async_read_event(reader), TIMEOUT_S)
    assert event is not None and event.type == "error", event
    assert Error.from_event(event).code == code


async def _expect_closed(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""


async def test_bad_input(
    server: WyomingServer, hub: EngineHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgevoice")
    # A line that is not JSON: error, the connection still works.
    reader, writer = await _raw(server)
    writer.write(b"this is not json\n")
    await _expect_error(reader, "bad-event")
    await _still_works(reader, writer)
    # Audio before audio-start: error, still works.
    await async_write_event(AudioChunk(16000, 2, 1, bytes(320)).event(), writer)
    await _expect_error(reader, "no-audio-start")
    await _still_works(reader, writer)
    # Width 3: error; its chunks are dropped; then a normal request works.
    await async_write_event(Transcribe().event(), writer)
    await async_write_event(AudioStart(16000, 3, 1).event(), writer)
    await _expect_error(reader, "bad-audio")
    for _ in range(5):
        await async_write_event(AudioChunk(16000, 3, 1, bytes(3 * 160)).event(), writer)
    await async_write_event(AudioStop().event(), writer)
    await _still_works(reader, writer)
    writer.close()

    # Wrong data_length: the framing is gone, so the connection is closed.
    reader, writer = await _raw(server)
    data = json.dumps({"text": "hi"}).encode()
    writer.write(json.dumps({"type": "ping", "data_length": len(data) + 20}).encode() + b"\n")
    next_event = {"type": "ping", "data": {"text": "x" * 40}}
    writer.write(data + b"\n" + json.dumps(next_event).encode() + b"\n")
    await _expect_error(reader, "bad-data-length")
    await _expect_closed(reader)
    # A negative or absurd payload_length: error, closed.
    for length in (-5, 1 << 40):
        reader, writer = await _raw(server)
        writer.write(json.dumps({"type": "audio-chunk", "payload_length": length}).encode() + b"\n")
        await _expect_error(reader, "bad-payload-length")
        await _expect_closed(reader)
    # payload_length shorter than the payload: the rest reads as garbage lines.
    reader, writer = await _raw(server)
    header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}}
    writer.write(json.dumps({**header, "payload_length": 4}).encode() + b"\n")
    writer.write(b"\x01\x02\x03\x04" + b"\xff\xfe garbage\n" * 10)
    await _expect_error(reader, "no-audio-start")
    for _ in range(3):
        await _expect_error(reader, "bad-event")
    await _expect_closed(reader)

    # A client that disconnects mid-stream does not disturb the others.
    reader, writer = await _raw(server)
    await async_write_event(Transcribe().event(), writer)
    for event in _wav_chunks(LAMP_WAV)[:20]:
        await async_write_event(event, writer)
    writer.close()
    transcript = await _transcribe(server, _wav_chunks(LIGHT_EN_WAV, 4096), language="en")
    assert words(transcript.text) == words(LIGHT_EN_TEXT)

    # No traceback storms: nothing above INFO from us, and no tracebacks at all.
    ours = [r for r in caplog.records if r.name.startswith("edgevoice")]
    assert not [r for r in ours if r.levelno >= logging.WARNING], [r.getMessage() for r in ours]
    assert not [r for r in caplog.records if r.exc_info]


async def test_ten_minutes_of_audio_is_refused(hub: EngineHub) -> None:
    # Client endpointing: with server endpointing, silence this long ends the turn
    # (an empty transcript after max_utterance_s) before the limit is reached.
    settings = hub.settings.model_copy(
        update={
            "limits": hub.settings.limits.model_copy(update={"max_audio_s": 20.0}),
            "wyoming": hub.settings.wyoming.model_copy(update={"endpointing": "client"}),
        }
    )
    async with WyomingServer(settings, hub) as small:
        reader, writer = await _raw(small)
        await async_write_event(Transcribe().event(), writer)
        await async_write_event(AudioStart(16000, 2, 1).event(), writer)
        ten_s = bytes(16000 * 2 * 10)
        for _ in range(60):  # 10 minutes
            await async_write_event(AudioChunk(16000, 2, 1, ten_s).event(), writer)
        await _expect_error(reader, "limit-exceeded")
        await async_write_event(AudioStop().event(), writer)
        await _still_works(reader, writer)
        writer.close()


# ------------------------------------------------------ limits and attacks


def _limited(hub: EngineHub, **limits: Any) -> Settings:
    """The hub's settings with some ``[limits]`` changed (for a second server)."""
    return hub.settings.model_copy(update={"limits": hub.settings.limits.model_copy(update=limits)})


class DescribeProbe:
    """Another client asking ``describe`` over and over, as Home Assistant's
    health probe does; records each round trip."""

    def __init__(self, server: WyomingServer) -> None:
        self.server = server
        self.round_trips_s: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with _client(self.server) as client:
            while not self._stop.is_set():
                started, waited = time.monotonic(), stalled_s()
                await client.write_event(Describe().event())
                assert Info.is_type((await _read(client)).type)
                # Less what the loop lost to others (waiting for a CPU, garbage collection).
                starved = stalled_s() - waited
                self.round_trips_s.append(time.monotonic() - started - starved)
                await asyncio.sleep(0.02)

    async def __aenter__(self) -> DescribeProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        # Home Assistant gives a Wyoming server 1 s to answer.
        assert self.round_trips_s and max(self.round_trips_s) < 1.0, self.round_trips_s


async def test_text_over_the_limit_is_refused_before_any_work(
    server: WyomingServer, hub: EngineHub
) -> None:
    limit = hub.settings.limits.max_input_chars
    spoken_before = hub.voice("joe")[0].slot.requests
    async with _client(server) as client:
        await client.write_event(Synthesize(text="word " * (16000 // 5)).event())
        error = Error.from_event(await _read(client))
        assert error.code == "limit-exceeded" and str(limit) in error.text
        await client.write_event(Ping(text="still here").event())
        assert Pong.from_event(await _read(client)).text == "still here"
    assert hub.voice("joe")[0].slot.requests == spoken_before  # nothing was synthesized


async def test_a_megabyte_of_text_is_refused_while_describe_answers(
    server: WyomingServer,
) -> None:
    async with DescribeProbe(server), _client(server) as client:
        await client.write_event(Synthesize(text="a" * 1_000_000).event())
        assert Error.from_event(await _read(client)).code == "limit-exceeded"


async def test_a_flood_of_synthesize_chunks_is_bounded(hub: EngineHub) -> None:
    # Small bounds keep the speech that is still produced short on any CPU.
    settings = _limited(hub, max_input_chars=200, max_sentence_chars=50)
    async with WyomingServer(settings, hub) as small:
        async with DescribeProbe(small), _client(small) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice("joe")).event())
            for i in range(20_000):
                await client.write_event(SynthesizeChunk(text="word ").event())
                if i % 100 == 0:
                    await asyncio.sleep(0)  # this test's own writes must not hog the loop
            await client.write_event(SynthesizeStop().event())
            events: list[Event] = []
            while not events or events[-1].type != "synthesize-stopped":
                events.append(await _read(client))
        types = [e.type for e in events]
        # Refused once when the unspoken text crossed the bound; what was taken is spoken.
        assert types.count("error") == 1
        assert Error.from_event(events[types.index("error")]).code == "limit-exceeded"
        assert types.count("audio-start") == 1 and types.count("audio-stop") == 1
        assert types.index("audio-stop") < types.index("synthesize-stopped")


async def test_malformed_fields_are_bad_events(server: WyomingServer) -> None:
    reader, writer = await _raw(server)
    for event in (
        Event("detect", {"names": 5}),
        Event("detect", {"names": ["hey_jarvis", 7]}),
        Event("synthesize", {"text": {"nested": "object"}}),
        Event("synthesize", {"text": "hi", "voice": {"name": ["joe"]}}),
        Event("synthesize-chunk", {}),
        Event("transcribe", {"language": 42}),
        Event("audio-start", {"rate": "16000", "width": 2, "channels": 1}),
        Event("select-program", {"name": None}),
    ):
        await async_write_event(event, writer)
        await _expect_error(reader, "bad-event")
        await _still_works(reader, writer)
    writer.close()


async def test_two_hours_of_audio_are_refused_as_the_limit_is_crossed(hub: EngineHub) -> None:
    # Client endpointing: with server endpointing, silence ends the turn (an empty
    # transcript after max_utterance_s) and the rest is drained, never buffered.
    async with WyomingServer(_with_wyoming(hub, endpointing="client"), hub) as server:
        await _two_hours_refused(server, hub)


async def _two_hours_refused(server: WyomingServer, hub: EngineHub) -> None:
    limit_s = hub.settings.limits.max_audio_s
    reader, writer = await _raw(server)
    await async_write_event(Transcribe().event(), writer)
    await async_write_event(AudioStart(16000, 2, 1).event(), writer)
    answer = asyncio.create_task(async_read_event(reader))
    ten_s = bytes(16000 * 2 * 10)
    sent_s = 0.0
    while sent_s < 2 * 3600 and not answer.done():
        await async_write_event(AudioChunk(16000, 2, 1, ten_s).event(), writer)
        sent_s += 10
        await asyncio.sleep(0)
    event = await asyncio.wait_for(answer, TIMEOUT_S)
    assert event is not None and Error.from_event(event).code == "limit-exceeded"
    assert f"{limit_s:g}" in Error.from_event(event).text
    assert sent_s < 2 * 3600  # refused long before the two hours were sent
    await async_write_event(AudioStop().event(), writer)
    await _still_works(reader, writer)
    writer.close()
    transcript = await _transcribe(server, _wav_chunks(LIGHT_EN_WAV, 4096), language="en")
    assert words(transcript.text) == words(LIGHT_EN_TEXT)


def _hold_tts(hub: EngineHub) -> tuple[threading.Event, asyncio.Task[Any]]:
    """Occupy the Piper voice's only worker until the returned gate is set."""
    gate = threading.Event()
    return gate, asyncio.create_task(hub.run(hub.voice("joe")[0], gate.wait, TIMEOUT_S))


async def test_pending_requests_per_connection_are_bounded(hub: EngineHub) -> None:
    async with WyomingServer(_limited(hub, max_pending_per_client=2), hub) as small:
        gate, holder = _hold_tts(hub)
        try:
            async with _client(small) as client:
                for i in range(5):
                    await client.write_event(Synthesize(text=f"Number {i}.").event())
                # One runs (waiting for the voice), one waits in the queue: three are refused.
                for _ in range(3):
                    assert Error.from_event(await _read(client)).code == "busy"
                gate.set()
                await holder
                for _ in range(2):
                    events, audio, rate = await _collect_audio(client)
                    assert events[-1].type == "audio-stop" and len(audio) > rate // 4
        finally:
            gate.set()
            await holder


async def test_idle_and_stalled_connections_time_out(hub: EngineHub) -> None:
    settings = _limited(hub, idle_timeout_s=1.0, session_timeout_s=1.0)
    async with WyomingServer(settings, hub) as small:
        # Silent: closed.
        reader, writer = await _raw(small)
        await _expect_closed(reader)
        # An open audio stream that stalls: closed too.
        reader, writer = await _raw(small)
        await async_write_event(Detect(names=["hey_jarvis"]).event(), writer)
        await async_write_event(AudioStart(16000, 2, 1).event(), writer)
        await _expect_closed(reader)
        # A client that keeps talking stays.
        reader, writer = await _raw(small)
        for _ in range(30):
            await asyncio.sleep(0.1)
            await _still_works(reader, writer)
        writer.close()
        # Waiting for an answer is not idleness.
        gate, holder = _hold_tts(hub)
        try:
            async with AsyncTcpClient("127.0.0.1", _port(small)) as client:
                await client.write_event(Synthesize(text="Still there?").event())
                await asyncio.sleep(2.5)
                gate.set()
                events, _audio, _rate = await _collect_audio(client)
                assert events[-1].type == "audio-stop"
        finally:
            gate.set()
            await holder


async def test_connections_beyond_the_limit_are_refused(hub: EngineHub) -> None:
    async with WyomingServer(_limited(hub, max_connections=2), hub) as small:
        first, second = await _raw(small), await _raw(small)
        for reader, writer in (first, second):
            await _still_works(reader, writer)
        reader, _writer = await _raw(small)
        await _expect_error(reader, "busy")
        await _expect_closed(reader)
        first[1].close()
        for _ in range(int(TIMEOUT_S / 0.05)):  # the server notices the close
            if small.connections < 2:
                break
            await asyncio.sleep(0.05)
        reader, writer = await _raw(small)
        await _still_works(reader, writer)
        writer.close()
        second[1].close()


# ------------------------------------------------------------------ reloads

WAKE_RELOAD = [
    ModelConfig(name=w, engine="microwakeword", model=w) for w in ("hey_jarvis", "alexa")
]


def _wake_settings(cache: Path, wake: list[ModelConfig], **extra: Any) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        asr=[FAKE_ASR],
        tts=[JOE],
        wake=wake,
        vad=[],
        wyoming=WyomingConfig(uri="tcp://127.0.0.1:0", zeroconf=False),
        http=HttpConfig(enabled=False),
        mqtt=MqttConfig(enabled=False),
        **extra,
    )


async def _stream_wake(writer: asyncio.StreamWriter, audio: np.ndarray) -> None:
    pcm = float_to_pcm16(audio)
    for i in range(0, len(pcm), 2048):
        await async_write_event(AudioChunk(16000, 2, 1, pcm[i : i + 2048]).event(), writer)


async def _next_of(reader: asyncio.StreamReader, *types: str) -> Event:
    while True:
        event = await asyncio.wait_for(async_read_event(reader), TIMEOUT_S)
        assert event is not None, "connection closed"
        if event.type in types:
            return event


async def test_reload_removing_the_wake_word_mid_stream(
    shared_cache: Path, spoken: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="edgevoice")
    before = _wake_settings(shared_cache, WAKE_RELOAD)
    async with EngineHub(before) as hub, WyomingServer(hub.settings, hub) as server:
        reader, writer = await _raw(server)
        await async_write_event(Detect(names=["hey_jarvis"]).event(), writer)
        await async_write_event(AudioStart(16000, 2, 1).event(), writer)
        await _stream_wake(writer, spoken["wake"])
        assert Detection.from_event(await _next_of(reader, "detection")).name == "hey_jarvis"
        # A reload drops hey_jarvis; the open stream keeps its engine and keeps detecting.
        removed = _wake_settings(shared_cache, WAKE_RELOAD[1:], shutdown_timeout_s=600.0)
        await hub.reload(removed)
        await _stream_wake(writer, spoken["wake"])
        assert Detection.from_event(await _next_of(reader, "detection")).name == "hey_jarvis"
        await async_write_event(AudioStop().event(), writer)
        await _still_works(reader, writer)
        writer.close()
        await asyncio.wait_for(hub.wait_retired(), TIMEOUT_S)  # the stream ended: no wait

        # A stream still open when the old engine must close gets a clean error.
        await hub.reload(before)
        reader, writer = await _raw(server)
        await async_write_event(Detect(names=["hey_jarvis"]).event(), writer)
        await async_write_event(AudioStart(16000, 2, 1).event(), writer)
        await _stream_wake(writer, spoken["command"])
        await _still_works(reader, writer)
        await hub.reload(_wake_settings(shared_cache, WAKE_RELOAD[1:], shutdown_timeout_s=0.1))
        await asyncio.wait_for(hub.wait_retired(), TIMEOUT_S)
        await _stream_wake(writer, spoken["wake"])
        await _expect_error(reader, "unavailable")
        await _stream_wake(writer, spoken["wake"])  # the rest of the stream is dropped
        await async_write_event(AudioStop().event(), writer)
        await async_write_event(Describe().event(), writer)
        info = Info.from_event(await _next_of(reader, "info"))
        assert [m.name for m in info.wake[0].models] == ["alexa"]
        writer.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_reload_changing_wyoming_keeps_open_streams(
    shared_cache: Path, spoken: dict[str, np.ndarray]
) -> None:
    from edgevoice.daemon import Daemon
    from edgevoice.sdnotify import SystemdNotifier

    first = _wake_settings(shared_cache, WAKE_RELOAD)
    changed = first.model_copy(
        update={"wyoming": first.wyoming.model_copy(update={"end_of_speech_s": 0.5})}
    )
    daemon = Daemon(first, notifier=SystemdNotifier({}), config_loader=lambda: changed)
    run = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), TIMEOUT_S)
        (wyoming,) = daemon.servers
        assert isinstance(wyoming, WyomingServer)
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(wyoming))
        await async_write_event(Detect(names=["hey_jarvis"]).event(), writer)
        await async_write_event(AudioStart(16000, 2, 1).event(), writer)
        await _stream_wake(writer, spoken["command"])
        daemon.request_reload()
        await asyncio.wait_for(daemon.reloaded.wait(), TIMEOUT_S)
        # Applied in place: same server, new settings, the open stream goes on.
        assert daemon.servers == [wyoming]
        assert wyoming.settings.wyoming.end_of_speech_s == 0.5
        async with AsyncTcpClient("127.0.0.1", _port(wyoming)) as other:
            await other.write_event(Ping(text="new").event())
            assert Pong.from_event(await _read(other)).text == "new"
        await _stream_wake(writer, spoken["wake"])
        assert Detection.from_event(await _next_of(reader, "detection")).name == "hey_jarvis"
        writer.close()
    finally:
        daemon.request_stop()
        await asyncio.wait_for(run, TIMEOUT_S)


async def test_reconfigure_in_place_unless_the_listener_changes(hub: EngineHub) -> None:
    async with WyomingServer(hub.settings, hub) as running:

        def wyoming(**changes: Any) -> Settings:
            return hub.settings.model_copy(
                update={"wyoming": hub.settings.wyoming.model_copy(update=changes)}
            )

        assert await running.reconfigure(_limited(hub, max_connections=7))
        assert running.settings.limits.max_connections == 7
        assert await running.reconfigure(wyoming(end_of_speech_s=0.8))
        assert await running.reconfigure(wyoming(zeroconf=True, zeroconf_name="renamed"))
        assert running._zeroconf_task is not None  # advertising (or warning) under the new name
        assert not await running.reconfigure(wyoming(uri="tcp://127.0.0.1:1"))
        async with _client(running) as client:
            await client.write_event(Ping(text="same server").event())
            assert Pong.from_event(await _read(client)).text == "same server"


async def test_unix_socket(hub: EngineHub, tmp_path: Path) -> None:
    path = tmp_path / "wyoming.sock"
    settings = hub.settings.model_copy(
        update={"wyoming": WyomingConfig(uri=f"unix://{path}", zeroconf=False)}
    )
    async with WyomingServer(settings, hub) as local:
        assert local.addresses == [f"unix://{path}"]
        async with AsyncUnixClient(str(path)) as client:
            await client.write_event(Describe().event())
            event = await client.read_event()
            assert event is not None and Info.from_event(event).asr
    assert not path.exists()


async def test_zeroconf_advertises_or_warns(
    hub: EngineHub, caplog: pytest.LogCaptureFixture
) -> None:
    from zeroconf.asyncio import AsyncZeroconf

    name = f"edgevoice-test-{os.getpid()}"
    settings = hub.settings.model_copy(
        update={"wyoming": WyomingConfig(uri="tcp://0.0.0.0:0", zeroconf_name=name)}
    )
    async with WyomingServer(settings, hub) as advertised:
        port = int(advertised.addresses[0].rsplit(":", 1)[1])
        task = advertised._zeroconf_task
        assert task is not None
        await asyncio.wait_for(task, TIMEOUT_S)
        if advertised._zeroconf is None:  # no multicast here: a warning, still serving
            assert "Zeroconf advertisement failed" in caplog.text
        else:
            browser = AsyncZeroconf()
            try:
                info = await browser.async_get_service_info(
                    "_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.", timeout=3000
                )
            finally:
                await browser.async_close()
            assert info is not None and info.port == port
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Ping().event())
            assert (await _read(client)).type == "pong"


# ---------------------------------------- wyoming-faster-whisper's procedure


def _serve_config(tmp_path: Path, cache: Path, uri: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
cache_dir = "{cache}"
state_dir = "{tmp_path / "state"}"
tts = []
wake = []
vad = []

[[asr]]
name = "tiny-int8"
engine = "faster-whisper"
model = "tiny.en"

[wyoming]
uri = "{uri}"
zeroconf = false

[http]
enabled = false

[mqtt]
enabled = false
""",
        encoding="utf-8",
    )
    return config


async def _wfw_procedure(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, startup_s: float
) -> None:
    """describe → transcribe → audio → transcript, as in wyoming-faster-whisper's tests."""
    await async_write_event(Describe().event(), writer)
    while True:
        event = await asyncio.wait_for(async_read_event(reader), timeout=startup_s)
        assert event is not None
        if not Info.is_type(event.type):
            continue
        info = Info.from_event(event)
        assert len(info.asr) == 1, "Expected one asr service"
        assert any(m.name == "tiny-int8" for m in info.asr[0].models)
        break
    await async_write_event(Transcribe(name="tiny-int8").event(), writer)
    for event in _wav_chunks(LAMP_WAV):
        await async_write_event(event, writer)
    while True:
        event = await asyncio.wait_for(async_read_event(reader), timeout=TIMEOUT_S)
        assert event is not None
        if not Transcript.is_type(event.type):
            continue
        text = re.sub(r"[^a-z ]", "", Transcript.from_event(event).text.lower().strip())
        assert text == "turn on the living room lamp"
        break


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    env["PYTHONPATH"] = str(REPO)
    return env


async def _spawn_serve(config: Path, stdin: int) -> asyncio.subprocess.Process:
    """``python -m edgevoice serve --config CONFIG`` with stdout/stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgevoice",
        "serve",
        "--config",
        str(config),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )


async def test_wyoming_faster_whisper_procedure_over_stdio(
    tmp_path: Path, shared_cache: Path
) -> None:
    config = _serve_config(tmp_path, shared_cache, "stdio://")
    proc = await _spawn_serve(config, asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await _wfw_procedure(proc.stdout, proc.stdin, startup_s=TIMEOUT_S)
        # Closing stdin ends the server cleanly, like wyoming-faster-whisper.
        proc.stdin.close()
        _, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr


async def test_wyoming_faster_whisper_procedure_over_tcp(
    tmp_path: Path, shared_cache: Path
) -> None:
    config = _serve_config(tmp_path, shared_cache, "tcp://127.0.0.1:0")
    proc = await _spawn_serve(config, asyncio.subprocess.DEVNULL)
    assert proc.stderr is not None
    try:
        port = None
        log: list[str] = []
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), TIMEOUT_S)).decode()
            assert line, "".join(log)
            log.append(line)
            if match := re.search(r"Serving wyoming on tcp://[\d.]+:(\d+)", line):
                port = int(match.group(1))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _wfw_procedure(reader, writer, startup_s=5)
        writer.close()
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr


# ------------------------------------------------------- server endpointing


def _with_wyoming(hub: EngineHub, **wyoming: Any) -> Settings:
    return hub.settings.model_copy(
        update={"wyoming": hub.settings.wyoming.model_copy(update=wyoming)}
    )


async def _home_assistant_stt(port: int, speech: np.ndarray) -> tuple[str, bool, int]:
    """Home Assistant's Wyoming STT (homeassistant/components/wyoming/stt.py since
    2026.5): upload and read at once, return on the first ``transcript`` and cancel
    the upload. The "microphone" streams the speech, then silence at real time
    until the answer comes (at most ``TIMEOUT_S``), like a live satellite.

    Returns the text, whether ``audio-stop`` was sent before the answer, and how
    many chunks of silence were sent.
    """
    pcm = float_to_pcm16(speech.astype(np.float32))
    step = 1024 * 2
    silence = bytes(step)
    stop_sent = False
    silent_chunks = 0
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(16000, 2, 1).event())

        async def upload() -> None:
            nonlocal stop_sent, silent_chunks
            speech_events = [
                AudioChunk(16000, 2, 1, pcm[i : i + step]).event() for i in range(0, len(pcm), step)
            ]
            await _write_paced(client, speech_events)
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                await asyncio.sleep(1024 / 16000)
                await client.write_event(AudioChunk(16000, 2, 1, silence).event())
                silent_chunks += 1
            stop_sent = True
            await client.write_event(AudioStop().event())

        async def receive() -> str:
            while True:
                event = await client.read_event()
                assert event is not None, "connection lost"
                assert not Error.is_type(event.type), event.data
                if Transcript.is_type(event.type):
                    return Transcript.from_event(event).text

        upload_task = asyncio.create_task(upload())
        receive_task = asyncio.create_task(receive())
        try:
            await asyncio.wait((upload_task, receive_task), return_when=asyncio.FIRST_COMPLETED)
            text = await asyncio.wait_for(receive_task, TIMEOUT_S)
        finally:
            upload_task.cancel()
            await asyncio.gather(upload_task, return_exceptions=True)
    return text, stop_sent, silent_chunks


async def test_server_endpointing_ends_home_assistants_turn(
    server: WyomingServer, caplog: pytest.LogCaptureFixture
) -> None:
    speech = decode(LIGHT_EN_WAV).samples
    with caplog.at_level(logging.INFO, logger="edgevoice"):
        text, stop_sent, silent_chunks = await _home_assistant_stt(_port(server), speech)
        # The server said the utterance was over: no audio-stop was needed.
        assert not stop_sent
        assert words(text) == words(LIGHT_EN_TEXT)
        # The trailing silence it waited for is at least finish_silence_s (in audio).
        finish_s = server.settings.wyoming.finish_silence_s
        assert silent_chunks * 1024 / 16000 >= finish_s - len(speech) / 16000
        # Home Assistant hung up mid-stream: the server shrugs and serves the next.
        async with _client(server) as client:
            await client.write_event(Describe().event())
            assert (await _read(client)).type == "info"
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_audio_after_the_turn_is_drained(server: WyomingServer) -> None:
    speech = decode(LIGHT_EN_WAV).samples
    audio = np.concatenate([speech, np.zeros(16000, np.float32)])
    async with _client(server) as client:
        await client.write_event(Transcribe(language="en").event())
        events = _pcm_events(audio)
        await _write_paced(client, events[:-1])  # live: the server ends the turn
        final = await _final_transcript(client)
        assert words(final.text) == words(LIGHT_EN_TEXT)
        # More speech after the turn ended, then audio-stop: no second answer, no error.
        for event in _pcm_events(decode(LAMP_WAV).at_rate(16000).samples)[1:-1]:
            await client.write_event(event)
        await client.write_event(events[-1])
        await client.write_event(Ping(text="after").event())
        after = await _read(client)
        assert after.type == "pong", after
        # The same connection transcribes the next turn.
        await client.write_event(Transcribe(language="en").event())
        await _write_paced(client, events)
        again = await _final_transcript(client)
        assert words(again.text) == words(LIGHT_EN_TEXT)


async def test_server_endpointing_without_speech_ends_with_no_text(hub: EngineHub) -> None:
    settings = _with_wyoming(hub, max_utterance_s=1.0)
    async with WyomingServer(settings, hub) as small, _client(small) as client:
        await client.write_event(Transcribe(language="en").event())
        await _write_paced(client, _pcm_events(np.zeros(2 * 16000, np.float32))[:-1])
        final = await _final_transcript(client)
        assert final.text == ""


async def test_a_recording_sent_at_once_is_never_cut_at_a_pause(server: WyomingServer) -> None:
    """Server endpointing ends live turns only: a buffered recording (sent faster
    than real time) with a 1 s pause inside is one transcript, at audio-stop."""
    light, lamp = decode(LIGHT_EN_WAV).samples, decode(LAMP_WAV).at_rate(16000).samples
    audio = np.concatenate([light, np.zeros(16000, np.float32), lamp])
    async with _client(server) as client:
        await client.write_event(Transcribe(language="en").event())
        events = _pcm_events(audio)
        for event in events[:-1]:
            await client.write_event(event)
        await client.write_event(Ping(text="x").event())
        _, seen = await _read_until(client, "pong")
        assert not any(e.type == "transcript" for e in seen)
        await client.write_event(events[-1])
        final = await _final_transcript(client)
    got = words(final.text)
    assert "light" in got and "lamp" in got, got


async def test_client_endpointing_waits_for_audio_stop(hub: EngineHub) -> None:
    settings = _with_wyoming(hub, endpointing="client")
    speech = decode(LIGHT_EN_WAV).samples
    audio = np.concatenate([speech, np.zeros(16000, np.float32)])
    async with WyomingServer(settings, hub) as small, _client(small) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await _read(client))
        assert info.asr[0].requires_external_vad is True
        await client.write_event(Transcribe(language="en").event())
        events = _pcm_events(audio)
        for event in events[:-1]:
            await client.write_event(event)
        # No transcript without audio-stop (a ping round trip proves the audio was read).
        await client.write_event(Ping(text="x").event())
        _, seen = await _read_until(client, "pong")
        assert not any(e.type == "transcript" for e in seen)
        await client.write_event(events[-1])
        final = await _final_transcript(client)
        assert words(final.text) == words(LIGHT_EN_TEXT)
