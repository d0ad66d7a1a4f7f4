"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client.

One real server (port 0) per module with real engines: Whisper tiny.en (alias
whisper-1), multilingual Whisper base, Piper joe (alias tts-1); the fake
``test-tts`` engine stands in for a cloning engine (440 Hz with a reference,
220 Hz without) and a failing ``test-asr`` for engine faults.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio
from openapi_spec_validator import validate

from edgevoice.audio import Audio, decode, encode, pcm_to_float
from edgevoice.config import ModelConfig, Settings
from edgevoice.daemon import Daemon
from edgevoice.engines.base import EngineKind
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.http.app import read_api_key
from edgevoice.protocols.http.state import STATE
from edgevoice.testing import FakeTtsEngine
from tests.conftest import (
    BASE,
    GERMAN_KEYWORDS,
    JOE,
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_DE_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    TINY_EN,
    TRANSLATION_KEYWORDS,
    assert_means,
    words,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    # openai-python marks translations deprecated; the endpoint is what we test.
    pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning"),
]

# Piper without its random noise: the same text gives the same audio every time.
JOE_STEADY = JOE.model_copy(update={"options": {"noise_scale": 0.0, "noise_w_scale": 0.0}})
# 16 kHz, so pcm output (24 kHz) has to be resampled.
CLONER = ModelConfig(
    name="cloner",
    engine="test-tts",
    model="fake",
    options={"cloning": True, "sample_rate_hz": 16000},
)
BROKEN = ModelConfig(name="broken", engine="test-asr", model="fake", options={"fail": True})
UPLOAD_MB = 1.0


def _settings(state_dir: Path, cache_dir: Path, **http: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": cache_dir,
        "state_dir": state_dir,
        "asr": [TINY_EN, BASE, BROKEN],
        "tts": [JOE_STEADY, CLONER],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, **http},
        "limits": {"max_upload_bytes": int(UPLOAD_MB * (1 << 20))},
    }
    return Settings(**values)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> AsyncIterator[EngineHub]:
    settings = _settings(tmp_path_factory.mktemp("state"), shared_cache)
    async with EngineHub(settings) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[HttpServer]:
    async with HttpServer(hub.settings, hub) as srv:
        await asyncio.to_thread(client, srv)  # slow to make (TLS settings, lazy imports)
        yield srv


_CLIENTS: dict[tuple[int, str], openai.AsyncOpenAI] = {}


def client(server: HttpServer, api_key: str = "unused") -> openai.AsyncOpenAI:
    """One openai client per server and key (making one loads TLS settings and
    imports modules lazily: slow enough to trip the event-loop guard)."""
    key = (server.port, api_key)
    if key not in _CLIENTS:
        made = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key, max_retries=0
        )
        _ = made.audio.transcriptions, made.audio.speech, made.audio.voices, made.models
        _CLIENTS[key] = made
    return _CLIENTS[key]


def url(server: HttpServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def dominant_hz(audio: Audio) -> float:
    spectrum = np.abs(np.fft.rfft(audio.samples))
    return float(np.argmax(spectrum) * audio.rate_hz / len(audio.samples))


def wav_bytes(audio: Audio) -> bytes:
    return encode(audio.samples, audio.rate_hz, "wav")


# ------------------------------------------------------------ transcription


async def test_transcription_every_response_format(server: HttpServer) -> None:
    oai = client(server)
    result = await oai.audio.transcriptions.create(file=LIGHT_EN_WAV, model="whisper-1")
    assert result.text == LIGHT_EN_TEXT
    # 44.1 kHz stereo input is resampled on the server.
    lamp = await oai.audio.transcriptions.create(file=LAMP_WAV, model="tiny-en")
    assert lamp.text == LAMP_TEXT
    text = await oai.audio.transcriptions.create(
        file=LIGHT_EN_WAV, model="whisper-1", response_format="text"
    )
    assert text == LIGHT_EN_TEXT + "\n"
    srt = await oai.audio.transcriptions.create(
        file=LIGHT_EN_WAV, model="whisper-1", response_format="srt"
    )
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0") and LIGHT_EN_TEXT in srt
    vtt = await oai.audio.transcriptions.create(
        file=LIGHT_EN_WAV, model="whisper-1", response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and LIGHT_EN_TEXT in vtt
    verbose = await oai.audio.transcriptions.create(
        file=LIGHT_EN_WAV,
        model="whisper-1",
        response_format="verbose_json",
        language="en",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.text == LIGHT_EN_TEXT
    assert verbose.language == "english"
    assert verbose.duration == pytest.approx(2.4, abs=0.05)
    assert verbose.segments and verbose.segments[0].text.strip() == LIGHT_EN_TEXT
    assert [w.word for w in verbose.words or []] == LIGHT_EN_TEXT.split()


async def test_word_timestamps_are_right(server: HttpServer) -> None:
    """LIGHT_EN + 2 s silence + LAMP: each LAMP word starts where it does alone, plus the offset."""
    oai = client(server)
    first = decode(LIGHT_EN_WAV, rate_hz=16000)
    second = decode(LAMP_WAV, rate_hz=16000)
    joined = Audio(
        np.concatenate([first.samples, np.zeros(32000, np.float32), second.samples]), 16000
    )
    offset = first.duration_s + 2.0

    async def timed_words(audio: Audio) -> list[tuple[str, float]]:
        result = await oai.audio.transcriptions.create(
            file=("clip.wav", wav_bytes(audio), "audio/wav"),
            model="whisper-1",
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
        assert result.segments is None  # only words were asked for
        return [(w.word, w.start) for w in result.words or []]

    alone = await timed_words(second)
    together = await timed_words(joined)
    assert words(" ".join(w for w, _ in alone)) == words(LAMP_TEXT)
    tail = together[-len(alone) :]
    assert [w for w, _ in tail] == [w for w, _ in alone]
    for (word, start_joined), (_, start_alone) in zip(tail, alone, strict=True):
        assert abs(start_joined - (start_alone + offset)) <= 0.3, word
    assert words(" ".join(w for w, _ in together[: -len(alone)])) == words(LIGHT_EN_TEXT)


async def test_streaming_transcription(server: HttpServer) -> None:
    stream = await client(server).audio.transcriptions.create(
        file=LAMP_WAV, model="whisper-1", stream=True
    )
    deltas: list[str] = []
    done: list[str] = []
    async for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done.append(event.text)
    assert deltas and "".join(deltas).strip() == LAMP_TEXT
    assert done == [LAMP_TEXT]


async def test_german_translation_with_base(server: HttpServer) -> None:
    oai = client(server)
    # Beam search (an edgevoice field, through extra_body) makes the first,
    # greedy-free decoding pass right, so no random temperature fallback runs.
    beam = {"beam_size": 5}
    result = await oai.audio.translations.create(
        file=LIGHT_DE_WAV, model="base", temperature=0, extra_body=beam
    )
    assert_means(result.text, *TRANSLATION_KEYWORDS)
    verbose = await oai.audio.translations.create(
        file=LIGHT_DE_WAV,
        model="base",
        response_format="verbose_json",
        temperature=0,
        extra_body=beam,
    )
    assert verbose.language == "english"
    assert_means(verbose.text, *TRANSLATION_KEYWORDS)  # two beam decodes may differ in a word
    srt = await oai.audio.translations.create(
        file=LIGHT_DE_WAV, model="base", response_format="srt", extra_body=beam
    )
    assert "-->" in srt and "living room" in srt.lower()
    # The same file transcribed (not translated) by base stays German.
    german = await oai.audio.transcriptions.create(file=LIGHT_DE_WAV, model="base", language="de")
    assert_means(german.text, *GERMAN_KEYWORDS)


async def test_translation_needs_a_multilingual_model(server: HttpServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client(server).audio.translations.create(file=LIGHT_DE_WAV, model="whisper-1")
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "translation_not_supported" and error["param"] == "model"
    assert "tiny-en" in error["message"] and "base" in error["message"]


async def test_transcription_errors(server: HttpServer) -> None:
    oai = client(server)
    with pytest.raises(openai.NotFoundError) as not_found:
        await oai.audio.transcriptions.create(file=LIGHT_EN_WAV, model="large-v9")
    assert not_found.value.body == {
        "message": "unknown asr model 'large-v9'; available: tiny-en, base, broken",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.BadRequestError) as bad_temperature:
        await oai.audio.transcriptions.create(file=LIGHT_EN_WAV, model="whisper-1", temperature=3)
    assert bad_temperature.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad_format:
        await oai.audio.transcriptions.create(
            file=LIGHT_EN_WAV,
            model="whisper-1",
            response_format="diarized_json",
        )
    assert bad_format.value.param == "response_format"
    with pytest.raises(openai.APIStatusError) as undecodable:
        await oai.audio.transcriptions.create(
            file=("notes.wav", b"this is not audio at all", "audio/wav"), model="whisper-1"
        )
    assert undecodable.value.status_code == 415
    assert undecodable.value.code == "unsupported_audio"
    too_big = b"\0" * int(UPLOAD_MB * (1 << 20) + 1024)
    with pytest.raises(openai.APIStatusError) as oversized:
        await oai.audio.transcriptions.create(file=("big.wav", too_big), model="whisper-1")
    assert oversized.value.status_code == 413
    # An engine failure is a 500, and the server keeps serving.
    with pytest.raises(openai.InternalServerError) as failed:
        await oai.audio.transcriptions.create(file=LIGHT_EN_WAV, model="broken")
    assert failed.value.status_code == 500 and "fake engine failure" in failed.value.message
    again = await oai.audio.transcriptions.create(file=LIGHT_EN_WAV, model="whisper-1")
    assert again.text == LIGHT_EN_TEXT
    async with aiohttp.ClientSession() as session:
        async with session.post(url(server, "/v1/audio/transcriptions"), json={}) as response:
            assert response.status == 415
            assert (await response.json())["error"]["code"] == "unsupported_media_type"
        async with session.get(url(server, "/v1/nothing-here")) as response:
            assert response.status == 404
            assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------ speech

SPEECH_TEXT = "Turn on the living room light."


async def test_speech_every_format_decodes(server: HttpServer) -> None:
    oai = client(server)
    durations: dict[str, float] = {}
    for fmt in ("wav", "mp3", "opus", "aac", "flac", "pcm"):
        path = server.settings.state_dir / f"speech.{fmt}"
        async with oai.audio.speech.with_streaming_response.create(
            model="tts-1", voice="joe", input=SPEECH_TEXT, response_format=fmt
        ) as response:
            assert response.headers["content-type"].startswith("audio/")
            await response.stream_to_file(path)
        data = await asyncio.to_thread(path.read_bytes)
        if fmt == "pcm":
            audio = Audio(pcm_to_float(data, 2), 24000)
        else:
            audio = await asyncio.to_thread(decode, data)
        durations[fmt] = audio.duration_s
        if fmt in ("wav", "pcm"):
            heard = await server.hub.transcribe(audio, model="tiny-en")
            assert words(heard.text) == words(SPEECH_TEXT), fmt
    # Piper varies its timing from call to call: a plausible length is all
    # that can be compared across separate requests.
    for fmt, seconds in durations.items():
        assert 0.8 < seconds < 2.5, fmt


async def test_speech_pcm_is_24khz_and_speed_changes_length(server: HttpServer) -> None:
    oai = client(server)
    # The fake engine is deterministic: a 220 Hz tone of 0.01 s per character, at 16 kHz.
    text = "A sentence of forty characters, exactly."
    pcm = await oai.audio.speech.create(
        model="cloner", voice="alloy", input=text, response_format="pcm"
    )
    tone = Audio(pcm_to_float(pcm.content, 2), 24000)
    assert tone.duration_s == pytest.approx(len(text) * 0.01, abs=0.01)
    assert dominant_hz(tone) == pytest.approx(FakeTtsEngine.PLAIN_HZ, abs=5)
    wav = await oai.audio.speech.create(
        model="cloner", voice="alloy", input=text, response_format="wav", speed=2.0
    )
    fast = await asyncio.to_thread(decode, wav.content)
    assert fast.rate_hz == 16000  # other formats keep the engine's rate
    assert fast.duration_s == pytest.approx(tone.duration_s / 2, abs=0.01)

    async def joe_seconds(speed: float) -> float:
        response = await oai.audio.speech.create(
            model="tts-1", voice="alloy", input=SPEECH_TEXT, response_format="pcm", speed=speed
        )
        return len(response.content) / 2 / 24000

    normal, quick = await joe_seconds(1.0), await joe_seconds(2.0)
    assert 0.4 * normal < quick < 0.8 * normal  # Piper halves phoneme length, not pauses


async def test_speech_sse(server: HttpServer) -> None:
    async with client(server).audio.speech.with_streaming_response.create(
        model="tts-1",
        voice="joe",
        input="Hello there. How are you today?",
        response_format="wav",
        stream_format="sse",
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        body = await response.text()
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2  # one per sentence
    assert events[-1]["type"] == "speech.audio.done"
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == len("Hello there. How are you today?")
    data = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    audio = await asyncio.to_thread(decode, data)
    assert usage["output_tokens"] == pytest.approx(audio.duration_s * 1000, abs=5)
    heard = await server.hub.transcribe(audio, model="tiny-en")
    assert words(heard.text) == words("Hello there. How are you today?")


async def test_speech_client_gone_before_the_first_audio_is_no_error(
    server: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that resets its connection while the first sentence is being
    synthesized (before the headers go out) is logged at debug, not as an
    aiohttp "Error handling request" traceback a LAN client could flood."""
    import logging
    import socket

    assert server.app is not None
    metrics = server.app[STATE].metrics
    sentence = "The weather today is sunny with a light breeze from the west " * 3 + "."
    caplog.set_level(logging.DEBUG)
    for stream_format in ("sse", "audio"):
        before = sum(metrics.audio_s.values())
        body = json.dumps(
            {"model": "joe", "input": sentence, "response_format": "pcm"}
            | {"stream_format": stream_format}
        ).encode()
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # RST
        writer.write(
            b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await asyncio.sleep(0.02)  # the request is read; its first sentence is not done
        writer.transport.abort()
        # The handler ran to its end (it counts the audio it made) ...
        for _ in range(600):
            if sum(metrics.audio_s.values()) > before:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    # ... and nothing was logged as an error.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert any("went away" in r.getMessage() for r in caplog.records)


async def test_speech_errors_and_voice_names(server: HttpServer) -> None:
    oai = client(server)
    ok = await oai.audio.speech.create(
        model="gpt-4o-mini-tts", voice={"id": "joe"}, input="Hi.", response_format="pcm"
    )
    assert len(ok.content) > 2400
    with pytest.raises(openai.NotFoundError) as unknown_voice:
        await oai.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    assert unknown_voice.value.code == "voice_not_found" and "joe" in unknown_voice.value.message
    with pytest.raises(openai.NotFoundError):
        await oai.audio.speech.create(model="tts-9", voice="alloy", input="Hi.")
    with pytest.raises(openai.NotFoundError):
        await oai.audio.speech.create(model="cloner", voice={"id": "voice_missing"}, input="Hi.")
    with pytest.raises(openai.BadRequestError) as too_fast:
        await oai.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", speed=4.5)
    assert too_fast.value.param == "speed"
    with pytest.raises(openai.BadRequestError) as too_long:
        await oai.audio.speech.create(model="tts-1", voice="alloy", input="a" * 4097)
    assert too_long.value.param == "input"
    with pytest.raises(openai.BadRequestError) as empty:
        await oai.audio.speech.create(model="tts-1", voice="alloy", input="  ")
    assert empty.value.param == "input"
    with pytest.raises(openai.BadRequestError) as bad_format:
        await oai.audio.speech.create(
            model="tts-1",
            voice="alloy",
            input="Hi.",
            response_format="ogg",  # type: ignore[arg-type]
        )
    assert bad_format.value.param == "response_format"
    oversized = {"model": "cloner", "input": "Hi.", "voice_sample": "A" * (2 << 20)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url(server, "/v1/audio/speech"), json=oversized) as response,
    ):
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url(server, "/v1/audio/speech"),
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"


# ----------------------------------------------------------------- cloning


def cloner_engine(hub: EngineHub) -> FakeTtsEngine:
    engine = hub.get(EngineKind.TTS, "cloner").engine
    assert isinstance(engine, FakeTtsEngine)
    return engine


async def test_cloning_json_voice_sample(server: HttpServer) -> None:
    oai = client(server)
    sample = base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode()
    cloned = await oai.audio.speech.create(
        model="cloner",
        voice="alloy",
        input="Hello. This is me.",
        response_format="wav",
        extra_body={"voice_sample": sample, "voice_sample_text": LIGHT_EN_TEXT},
    )
    audio = await asyncio.to_thread(decode, cloned.content)
    assert dominant_hz(audio) == pytest.approx(FakeTtsEngine.CLONED_HZ, abs=5)
    reference = cloner_engine(server.hub).calls[-1][1].reference
    assert reference is not None and reference.text == LIGHT_EN_TEXT
    assert len(reference.audio) / reference.sample_rate_hz == pytest.approx(2.4, abs=0.05)
    plain = await oai.audio.speech.create(
        model="cloner", voice="alloy", input="Hello.", response_format="wav"
    )
    audio = await asyncio.to_thread(decode, plain.content)
    assert dominant_hz(audio) == pytest.approx(FakeTtsEngine.PLAIN_HZ, abs=5)


async def test_cloning_multipart_prompt_speech(server: HttpServer) -> None:
    form = aiohttp.FormData()
    form.add_field("model", "cloner")
    form.add_field("input", "Good morning.")
    form.add_field("response_format", "flac")
    form.add_field("prompt_text", LAMP_TEXT)
    form.add_field("instruct_text", "cheerful")
    form.add_field("prompt_speech", LAMP_WAV.read_bytes(), filename="ref.wav")
    async with (
        aiohttp.ClientSession() as session,
        session.post(url(server, "/v1/audio/speech"), data=form) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "audio/flac"
        data = await response.read()
    audio = await asyncio.to_thread(decode, data)
    assert dominant_hz(audio) == pytest.approx(FakeTtsEngine.CLONED_HZ, abs=5)
    reference = cloner_engine(server.hub).calls[-1][1].reference
    assert reference is not None
    assert (reference.text, reference.instruct_text) == (LAMP_TEXT, "cheerful")


async def test_cloning_with_a_model_that_cannot_clone(server: HttpServer) -> None:
    sample = base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode()
    with pytest.raises(openai.BadRequestError) as caught:
        await client(server).audio.speech.create(
            model="tts-1", voice="alloy", input="Hi.", extra_body={"voice_sample": sample}
        )
    assert caught.value.code == "cloning_not_supported"
    assert "'joe'" in caught.value.message and "cloner (test-tts)" in caught.value.message
    with pytest.raises(openai.BadRequestError) as short:
        await client(server).audio.speech.create(
            model="cloner",
            voice="alloy",
            input="Hi.",
            extra_body={
                "voice_sample": base64.b64encode(
                    wav_bytes(Audio(np.ones(800, np.float32) * 0.1, 16000))
                ).decode()
            },
        )
    assert "1-30 s" in short.value.message


# ------------------------------------------------------------ voice library


async def test_voice_library(server: HttpServer) -> None:
    oai = client(server)
    created = await oai.audio.voices.create(
        name="../../Grandma's voice",
        audio_sample=LAMP_WAV,
        consent="cons_unused",
        extra_body={"transcript": LAMP_TEXT},
    )
    assert created.id == "voice_grandma-s-voice" and created.name == "../../Grandma's voice"
    library = server.settings.state_dir / "voices"
    stored = await asyncio.to_thread(decode, library / f"{created.id}.wav")
    assert stored.rate_hz == 24000 and stored.duration_s == pytest.approx(3.0, abs=0.05)
    assert float(np.max(np.abs(stored.samples))) == pytest.approx(0.891, abs=0.01)
    second = await oai.audio.voices.create(
        name="Grandma's voice", audio_sample=LAMP_WAV, consent="x"
    )
    assert second.id == "voice_grandma-s-voice-2"

    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/v1/audio/voices")) as response:
            listing = await response.json()
        ids = {v["id"]: v for v in listing["data"]}
        assert ids["joe"]["type"] == "builtin" and ids["fake"]["cloning"] is True
        assert ids[created.id]["transcript"] == LAMP_TEXT
        async with session.get(url(server, f"/v1/audio/voices/{created.id}")) as response:
            assert (await response.json())["name"] == created.name
        for bad in ("..%2F..%2Fetc%2Fpasswd", "voice_..", "joe", "voice_A"):
            async with session.delete(url(server, f"/v1/audio/voices/{bad}")) as response:
                assert response.status == 404, bad
        form = aiohttp.FormData()
        form.add_field("name", "too short")
        form.add_field(
            "audio_sample",
            wav_bytes(Audio(np.ones(8000, np.float32) * 0.1, 16000)),
            filename="a.wav",
        )
        async with session.post(url(server, "/v1/audio/voices"), data=form) as response:
            assert response.status == 400
        form = aiohttp.FormData()
        form.add_field("name", "garbage")
        form.add_field("audio_sample", b"RIFF....garbage", filename="a.wav")
        async with session.post(url(server, "/v1/audio/voices"), data=form) as response:
            assert response.status == 415

    speech = await oai.audio.speech.create(
        model="cloner", voice={"id": created.id}, input="Hello.", response_format="wav"
    )
    audio = await asyncio.to_thread(decode, speech.content)
    assert dominant_hz(audio) == pytest.approx(FakeTtsEngine.CLONED_HZ, abs=5)
    reference = cloner_engine(server.hub).calls[-1][1].reference
    assert reference is not None and reference.text == LAMP_TEXT
    with pytest.raises(openai.BadRequestError):  # joe cannot clone
        await oai.audio.speech.create(model="tts-1", voice={"id": created.id}, input="Hello.")

    deleted = await oai.audio.voices.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    await oai.audio.voices.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await oai.audio.voices.delete(created.id)
    assert sorted(p.name for p in library.iterdir()) == []


async def test_voice_library_survives_a_daemon_restart(make_settings: Any, tmp_path: Path) -> None:
    settings: Settings = make_settings(
        asr=[], tts=[CLONER], http={"enabled": True, "host": "127.0.0.1", "port": 0}
    )

    async def run_daemon() -> tuple[Daemon, asyncio.Task[None], str]:
        daemon = Daemon(settings)
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 30)
        (http,) = [s for s in daemon.servers if s.name == "http"]
        return daemon, task, http.addresses[0]

    async def stop(daemon: Daemon, task: asyncio.Task[None]) -> None:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    daemon, task, base = await run_daemon()
    try:
        oai = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        voice = await oai.audio.voices.create(name="Kept", audio_sample=LIGHT_EN_WAV, consent="x")
    finally:
        await stop(daemon, task)

    daemon, task, base = await run_daemon()
    try:
        oai = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/v1/audio/voices") as response,
        ):
            stored = [v for v in (await response.json())["data"] if v["type"] == "audio_sample"]
        assert [(v["id"], v["name"]) for v in stored] == [(voice.id, "Kept")]
        speech = await oai.audio.speech.create(
            model="cloner", voice=voice.id, input="Hello again.", response_format="wav"
        )
        audio = await asyncio.to_thread(decode, speech.content)
        assert dominant_hz(audio) == pytest.approx(FakeTtsEngine.CLONED_HZ, abs=5)
    finally:
        await stop(daemon, task)


# --------------------------------------------------------------- websocket


async def test_websocket_speech_stream(server: HttpServer) -> None:
    binary: list[bytes] = []
    events: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url(server, "/v1/audio/speech/stream")) as ws,
    ):
        await ws.send_json({"voice": "joe", "response_format": "pcm"})
        for piece in ("Turn on the living ", "room light. Then switch", " off the lamp."):
            await ws.send_json({"text_chunk": piece, "is_final": False})
        # The first sentence is complete before the final message.
        first = await ws.receive(timeout=30)
        assert first.type is aiohttp.WSMsgType.BINARY
        binary.append(first.data)
        await ws.send_json({"text_chunk": "", "is_final": True})
        async for message in ws:
            if message.type is aiohttp.WSMsgType.BINARY:
                binary.append(message.data)
            else:
                events.append(json.loads(message.data))
                if events[-1]["type"] in ("done", "error"):
                    break
        await ws.send_str("{broken")
        error = await ws.receive_json(timeout=10)
        assert error["type"] == "error" and error["error"]["code"] == "invalid_value"
    assert events[-1]["type"] == "done" and events[-1]["sentences"] == 2
    assert events[-1]["sample_rate"] == 24000
    assert len(binary) >= 2
    audio = Audio(pcm_to_float(b"".join(binary), 2), 24000)
    assert events[-1]["audio_seconds"] == pytest.approx(audio.duration_s, abs=0.05)
    heard = await server.hub.transcribe(audio, model="tiny-en")
    assert words(heard.text)[:6] == words(SPEECH_TEXT)
    assert words(heard.text)[-3:] == ["off", "the", "lamp"]


async def test_websocket_rejects_bad_options(server: HttpServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url(server, "/v1/audio/speech/stream")) as ws,
    ):
        await ws.send_json({"voice": "nobody"})
        error = await ws.receive_json(timeout=10)
    assert error["type"] == "error" and error["error"]["code"] == "voice_not_found"


# ------------------------------------------------- models, service routes


async def test_models_health_metrics(server: HttpServer) -> None:
    oai = client(server)
    listing = await oai.models.list()
    kinds = {m.id: m.model_extra["kind"] for m in listing.data if m.model_extra}
    assert kinds == {
        "tiny-en": "asr",
        "base": "asr",
        "broken": "asr",
        "joe": "tts",
        "cloner": "tts",
    }
    whisper = await oai.models.retrieve("whisper-1")
    assert whisper.id == "tiny-en" and whisper.owned_by == "edgevoice"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("gpt-5")
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/health")) as response:
            health = await response.json()
        assert health["status"] == "ok" and health["models"]["tts"] == ["joe", "cloner"]
        async with session.get(url(server, "/metrics")) as response:
            assert response.content_type == "text/plain"
            text = await response.text()
    assert "# TYPE edgevoice_http_requests_total counter" in text
    assert 'route="/v1/models",status="200"' in text
    assert 'edgevoice_http_request_duration_seconds_count{route="/v1/models"}' in text
    busy = [
        line for line in text.splitlines()
        if line.startswith('edgevoice_engine_busy_seconds_total{kind="asr",model="tiny-en"')
    ]  # fmt: skip
    assert len(busy) == 1
    if "transcriptions" in text:  # other tests in this module ran first
        assert float(busy[0].split()[-1]) > 0


async def test_openapi_document_and_docs(server: HttpServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(url(server, "/openapi.json")) as response:
            spec = await response.json()
        async with session.get(url(server, "/docs")) as response:
            assert response.content_type == "text/html"
            page = await response.text()
    await asyncio.to_thread(validate, spec)  # slow: not on the loop
    assert spec["openapi"].startswith("3.1")
    assert server.app is not None
    routes = {
        (r.method.lower(), r.resource.canonical)
        for r in server.app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(m, p) for p, item in spec["paths"].items() for m in item}
    assert routes == documented
    for _method, path in routes:
        assert path in page
    assert "<script" not in page and "cdn" not in page.lower()


async def test_api_key_and_cors(hub: EngineHub, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    settings = hub.settings.model_copy(
        update={
            "http": hub.settings.http.model_copy(
                update={"api_key_file": key_file, "cors_origins": ["http://ui.local"]}
            )
        }
    )
    async with HttpServer(settings, hub) as secured:
        for key in ("nope", "s3cret"):
            await asyncio.to_thread(client, secured, key)
        with pytest.raises(openai.AuthenticationError) as wrong:
            await client(secured, "nope").models.list()
        assert wrong.value.code == "invalid_api_key"
        assert [m.id for m in (await client(secured, "s3cret").models.list()).data]
        async with aiohttp.ClientSession() as session:
            async with session.get(url(secured, "/v1/models")) as response:
                assert response.status == 401
            async with session.get(url(secured, "/health")) as response:
                assert response.status == 200
            async with session.options(
                url(secured, "/v1/audio/speech"),
                headers={"Origin": "http://ui.local", "Access-Control-Request-Method": "POST"},
            ) as response:
                assert response.status == 204
                assert response.headers["Access-Control-Allow-Origin"] == "http://ui.local"
                assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
            async with session.get(
                url(secured, "/health"), headers={"Origin": "http://evil.local"}
            ) as response:
                assert "Access-Control-Allow-Origin" not in response.headers
    assert read_api_key(hub.settings) is None


async def test_cors_is_off_by_default(server: HttpServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url(server, "/health"), headers={"Origin": "http://ui.local"}) as response,
    ):
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_stop_drains_in_flight_requests(hub: EngineHub) -> None:
    paragraph = "One sentence here. Another sentence follows. And a third one ends it."
    srv = HttpServer(hub.settings, hub)
    await srv.start()
    port = srv.port
    assert srv.app is not None
    state = srv.app[STATE]

    async def request() -> bytes:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/v1/audio/speech",
                json={"model": "joe", "input": paragraph, "response_format": "wav"},
            ) as response,
        ):
            assert response.status == 200
            return await response.read()

    pending = asyncio.create_task(request())
    for _ in range(1000):  # until the server has the request
        if state.inflight:
            break
        await asyncio.sleep(0.01)
    await srv.stop(30.0)
    audio = await asyncio.to_thread(decode, await pending)
    heard = await hub.transcribe(audio, model="tiny-en")
    assert words(heard.text)[:2] == ["one", "sentence"] and "third" in words(heard.text)
    assert srv.addresses == []
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}/health")
