"""Hostile input over HTTP: every bound holds and the daemon keeps serving others.

Each test is one attack from issue 9 (files that decode to hours of audio,
floods of WebSocket text, stalled and vanishing clients, malformed multipart,
a voice library without a quota) turned into a check that the request is
refused or served within bounds, that ``/health`` answers within Home
Assistant's one-second probe timeout meanwhile, and that nothing is logged
as a traceback. The engines are the fake ``test-asr``/``test-tts`` (the
attacks are about the HTTP face and the audio layer, not inference).

No assertion depends on this machine's speed: "refused early" is measured
against the time this machine takes to decode a known slice of the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import openai
import pytest
import pytest_asyncio
import soundfile as sf

from edgevoice.audio import decode, encode
from edgevoice.config import ModelConfig, Settings
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer
from edgevoice.testing import tone
from tests.conftest import LAMP_WAV, stalled_s

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

FAKE_ASR = ModelConfig(name="fake-asr", engine="test-asr", model="fake", aliases=["whisper-1"])
CLONER = ModelConfig(
    name="cloner", engine="test-tts", model="fake", options={"cloning": True}, aliases=["tts-1"]
)
PLAIN_TTS = ModelConfig(
    name="plain", engine="test-tts", model="fake", options={"voices": ["plain"]}
)

HEALTH_PROBE_TIMEOUT_S = 1.0
"""Home Assistant's probe timeout: /health must answer within it under any attack."""


def _settings(state_dir: Path, cache_dir: Path, tts: list[ModelConfig], **limits: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": cache_dir,
        "state_dir": state_dir,
        "asr": [FAKE_ASR],
        "tts": tts,
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
        "limits": limits,
    }
    return Settings(**values)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EngineHub]:
    root = tmp_path_factory.mktemp("limits")
    async with EngineHub(_settings(root / "state", root / "cache", [CLONER])) as loaded:
        yield loaded


@contextlib.asynccontextmanager
async def serving(hub: EngineHub, tmp_path: Path, **limits: Any) -> AsyncIterator[HttpServer]:
    """An HTTP server over ``hub`` with these ``[limits]`` (its own voice library)."""
    settings = _settings(tmp_path / "state", tmp_path / "cache", [CLONER], **limits)
    async with HttpServer(settings, hub) as server:
        yield server


def base_url(server: HttpServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def openai_client(server: HttpServer) -> openai.AsyncOpenAI:
    """An openai client, made in a worker (making one is slow: TLS settings, lazy imports)."""

    def make() -> openai.AsyncOpenAI:
        made = openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="x", max_retries=0)
        _ = made.audio.transcriptions, made.audio.speech
        return made

    return await asyncio.to_thread(make)


class HealthProbe:
    """Polls ``/health`` every 50 ms on its own connection and keeps the slowest answer."""

    def __init__(self, server: HttpServer) -> None:
        self.url = base_url(server) + "/health"
        self.latencies_s: list[float] = []
        """Each answer's wall time less what the loop thread lost to others
        (waiting for a CPU, garbage collection: see ``stalled_s``)."""
        self.starved_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                started, waited = time.monotonic(), stalled_s()
                try:
                    async with asyncio.timeout(10 * HEALTH_PROBE_TIMEOUT_S):
                        async with session.get(self.url) as response:
                            assert response.status == 200
                            await response.read()
                except TimeoutError:
                    pass
                starved = stalled_s() - waited
                self.latencies_s.append(time.monotonic() - started - starved)
                self.starved_s.append(starved)
                await asyncio.sleep(0.05)

    async def __aenter__(self) -> HealthProbe:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self.latencies_s, "/health was never probed"
        slowest = max(self.latencies_s)
        starved = self.starved_s[self.latencies_s.index(slowest)]
        assert slowest < HEALTH_PROBE_TIMEOUT_S, (
            f"/health took {slowest:.2f} s (+ {starved:.2f} s the loop lost to others)"
        )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail if anything logs an error or a traceback inside (client faults are DEBUG)."""
    caplog.set_level(logging.DEBUG, logger="edgevoice")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    start = len(caplog.records)
    yield
    bad = [
        f"{r.name} {r.levelname}: {r.getMessage()}"
        for r in caplog.records[start:]
        if r.exc_info or r.levelno >= logging.ERROR
    ]
    assert not bad, f"{len(bad)} error/traceback records, first: {bad[:3]}"


# ------------------------------------------------- attack files, made fast


def _repeat_packets(short: bytes, container_format: str, duration_s: float) -> bytes:
    """``short``'s middle packet repeated for ``duration_s`` (encoding that much
    audio would take minutes; copying packets takes a second)."""
    with av.open(io.BytesIO(short), mode="r") as src:
        stream = src.streams.audio[0]
        packets = [p for p in src.demux(stream) if p.size]
        packet = packets[len(packets) // 2]
        step = int(packet.duration or 0)
        assert step > 0 and stream.time_base is not None
        count = int(duration_s / float(step * stream.time_base))
        out = io.BytesIO()
        with av.open(out, "w", format=container_format) as dst:
            target = dst.add_stream_from_template(stream)
            for i in range(count):
                packet.pts = packet.dts = i * step
                packet.stream = target
                dst.mux(packet)
    return out.getvalue()


def opus_silence(duration_s: float) -> bytes:
    """Ogg/Opus silence at 6 kbit/s: two hours fit in 2.7 MB."""
    short = io.BytesIO()
    with av.open(short, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        stream.bit_rate = 6000
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 48000), np.float32), format="flt", layout="mono"
        )
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return _repeat_packets(short.getvalue(), "ogg", duration_s)


def flac_silence(duration_s: float, *, declare_length: bool) -> bytes:
    """8-channel 192 kHz FLAC silence (25 min: 2.3 MB). With ``declare_length``
    its STREAMINFO states the true length; without, "unknown" (0 samples)."""
    rate, channels = 192000, 8
    short = io.BytesIO()
    sf.write(short, np.zeros((rate, channels), np.int16), rate, format="FLAC", subtype="PCM_16")
    data = bytearray(_repeat_packets(short.getvalue(), "flac", duration_s))
    assert data[:4] == b"fLaC"
    # STREAMINFO: 8 bytes in, bytes 10..17 hold rate (20 bits), channels-1 (3),
    # bits-1 (5) and the total sample count (36 bits); then a 16-byte MD5.
    info = 8
    fields = int.from_bytes(data[info + 10 : info + 18], "big") & ~((1 << 36) - 1)
    total = round(duration_s * rate) if declare_length else 0
    data[info + 10 : info + 18] = (fields | total).to_bytes(8, "big")
    data[info + 18 : info + 34] = bytes(16)
    return bytes(data)


def decode_seconds(data: bytes) -> float:
    """How long this machine takes to decode ``data`` (blocking)."""
    started = time.monotonic()
    decode(data, rate_hz=16000)
    return time.monotonic() - started


# ------------------------------------------------------------------ audio


async def _transcribe(server: HttpServer, name: str, data: bytes) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", data, filename=name)
    async with (
        aiohttp.ClientSession() as session,
        session.post(base_url(server) + "/v1/audio/transcriptions", data=form) as response,
    ):
        return response.status, await response.json()


@pytest.fixture(scope="module")
def two_hour_opus() -> tuple[bytes, float]:
    """The file, and this machine's time to decode its first 30 s (1/240): the
    yardstick for "refused early". Made outside the event loop (sync fixture)."""
    data = opus_silence(7200.0)
    return data, decode_seconds(data[: len(data) // 240])


@pytest.fixture(scope="module")
def long_flacs() -> tuple[bytes, bytes]:
    """25 min of 8 x 192 kHz silence, with its length declared and hidden."""
    return (
        flac_silence(25 * 60.0, declare_length=True),
        flac_silence(25 * 60.0, declare_length=False),
    )


async def test_two_hour_opus_is_refused_before_decoding(
    hub: EngineHub,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    two_hour_opus: tuple[bytes, float],
) -> None:
    data, slice_s = two_hour_opus
    assert len(data) < 4 << 20  # small enough for any upload limit
    async with serving(hub, tmp_path) as server, HealthProbe(server):
        with no_tracebacks(caplog):
            rss_before = peak_rss_mb()
            started = time.monotonic()
            status, body = await _transcribe(server, "long.ogg", data)
            elapsed_s = time.monotonic() - started
            rss_growth = peak_rss_mb() - rss_before
    assert status == 400, body
    assert body["error"]["code"] == "limit_exceeded"
    assert "limits.max_audio_s" in body["error"]["message"]
    # Decoding all of it would take ~240 slices; refusing takes less than 24.
    assert elapsed_s < 24 * slice_s + 0.5, (elapsed_s, slice_s)
    assert rss_growth < 50, f"peak memory grew {rss_growth:.0f} MB"


async def test_eight_channel_192khz_flac_is_refused(
    hub: EngineHub,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    long_flacs: tuple[bytes, bytes],
) -> None:
    """25 minutes of 8 x 192 kHz (9 GB as float32) in 2.3 MB: refused by its
    declared length, and with the length hidden, by counting while decoding."""
    assert all(len(data) < 3 << 20 for data in long_flacs)
    short = await asyncio.to_thread(encode, tone(2.0), 16000, "flac")
    async with serving(hub, tmp_path, max_audio_s=20.0) as server, HealthProbe(server):
        with no_tracebacks(caplog):
            rss_before = peak_rss_mb()
            for data in long_flacs:
                status, body = await _transcribe(server, "long.flac", data)
                assert status == 400, body
                assert body["error"]["code"] == "limit_exceeded"
            rss_growth = peak_rss_mb() - rss_before
            # Served normally right after.
            status, body = await _transcribe(server, "short.flac", short)
            assert status == 200 and body["text"], body
    # 20 s of the source as float32 would be 123 MB; decoding streams at 16 kHz mono.
    assert rss_growth < 100, f"peak memory grew {rss_growth:.0f} MB"


async def test_upload_over_the_byte_limit(hub: EngineHub, tmp_path: Path) -> None:
    async with serving(hub, tmp_path, max_upload_bytes=64 * 1024) as server:
        oai = await openai_client(server)
        with pytest.raises(openai.APIStatusError) as caught:
            await oai.audio.transcriptions.create(
                file=("big.wav", bytes(200 * 1024)), model="whisper-1"
            )
        assert caught.value.status_code == 413
        assert caught.value.code == "request_too_large"
        await oai.close()


async def test_text_limits(hub: EngineHub, tmp_path: Path) -> None:
    async with serving(hub, tmp_path, max_input_chars=100) as server:
        oai = await openai_client(server)
        with pytest.raises(openai.BadRequestError) as too_long:
            await oai.audio.speech.create(model="tts-1", voice="alloy", input="word " * 21)
        assert too_long.value.code == "limit_exceeded" and too_long.value.param == "input"
        assert "limits.max_input_chars" in too_long.value.message
        with pytest.raises(openai.BadRequestError) as prompt:
            await oai.audio.transcriptions.create(
                file=LAMP_WAV, model="whisper-1", prompt="p" * 101
            )
        assert prompt.value.param == "prompt"
        ok = await oai.audio.speech.create(
            model="tts-1", voice="alloy", input="word " * 20, response_format="pcm"
        )
        assert len(ok.content) > 0
        await oai.close()


# -------------------------------------------------------------- websocket

STREAM = "/v1/audio/speech/stream"


async def _ws_outcome(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict[str, Any]], int]:
    """Events until the server closes (or says done); audio bytes received."""
    events: list[dict[str, Any]] = []
    audio_bytes = 0
    async for message in ws:
        if message.type is aiohttp.WSMsgType.BINARY:
            audio_bytes += len(message.data)
        elif message.type is aiohttp.WSMsgType.TEXT:
            events.append(json.loads(message.data))
            if events[-1]["type"] == "done":
                break
    return events, audio_bytes


async def test_websocket_message_over_the_limit_closes(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(hub, tmp_path) as server, HealthProbe(server):
        with no_tracebacks(caplog):
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(base_url(server) + STREAM) as ws,
            ):
                await ws.send_json({"voice": "fake", "response_format": "pcm"})
                events: list[dict[str, Any]] = []
                # The server closes (1009) after reading 1 MiB; the rest of the
                # message may then meet a reset connection.
                with contextlib.suppress(ConnectionError):
                    await ws.send_str(json.dumps({"text_chunk": "a" * (5 << 20), "is_final": True}))
                with contextlib.suppress(ConnectionError):
                    events, _audio = await _ws_outcome(ws)
                assert ws.closed
                # 1009 when the close frame arrives before the reset, else 1006.
                assert ws.close_code in (
                    aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                    aiohttp.WSCloseCode.ABNORMAL_CLOSURE,
                )
            assert not [e for e in events if e["type"] == "done"]
            assert any("exceeds limit" in r.getMessage() for r in caplog.records)
            # The next stream is served.
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(base_url(server) + STREAM) as ws,
            ):
                await ws.send_json({"voice": "fake", "response_format": "pcm"})
                await ws.send_json({"text_chunk": "Hello there.", "is_final": True})
                events, audio_bytes = await _ws_outcome(ws)
            assert events[-1]["type"] == "done" and audio_bytes > 0


async def test_websocket_unspoken_text_is_bounded(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1 MB of unpunctuated text in one message: an error event, the stream closes."""
    async with serving(hub, tmp_path) as server, HealthProbe(server):
        with no_tracebacks(caplog):
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(base_url(server) + STREAM) as ws,
            ):
                await ws.send_json({"voice": "fake", "response_format": "pcm"})
                await ws.send_json({"text_chunk": "word " * 200_000, "is_final": True})
                events, _audio = await _ws_outcome(ws)
                assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    (error,) = events
    assert error["type"] == "error" and error["error"]["code"] == "limit_exceeded"
    assert "limits.max_input_chars" in error["error"]["message"]


async def test_websocket_flood_of_small_chunks(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """20 000 chunks of "word ": either spoken in bounded pieces or refused once
    more than max_input_chars wait unspoken; never a frozen daemon."""
    async with serving(hub, tmp_path) as server, HealthProbe(server):
        with no_tracebacks(caplog):
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(base_url(server) + STREAM) as ws,
            ):
                await ws.send_json({"voice": "fake", "response_format": "pcm"})
                reader = asyncio.create_task(_ws_outcome(ws))
                with contextlib.suppress(ConnectionError):
                    for i in range(20_000):
                        await ws.send_json({"text_chunk": "word ", "is_final": False})
                        if i % 500 == 0:
                            await asyncio.sleep(0)  # let the probe and the server run
                        if reader.done():
                            break
                    await ws.send_json({"text_chunk": "", "is_final": True})
                events, audio_bytes = await asyncio.wait_for(reader, 120)
    kinds = [e["type"] for e in events]
    if "error" in kinds:
        assert events[-1]["error"]["code"] == "limit_exceeded", events
    else:
        assert kinds[-1] == "done" and audio_bytes > 0


async def test_websocket_path_without_upgrade(hub: EngineHub, tmp_path: Path) -> None:
    async with (
        serving(hub, tmp_path) as server,
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + STREAM) as response,
    ):
        assert response.status == 426
        assert response.headers["Upgrade"] == "websocket"
        assert (await response.json())["error"]["code"] == "upgrade_required"


# ---------------------------------------------------- connections, clients


async def _stalled_upload(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A multipart upload that sends its headers and a little body, then stalls."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    boundary = "b0undary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    writer.write(
        (
            "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            "Content-Length: 100000\r\n\r\n"
        ).encode()
        + head
        + bytes(1000)
    )
    await writer.drain()
    return reader, writer


async def test_pending_requests_per_client(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(hub, tmp_path, max_pending_per_client=2) as server, HealthProbe(server):
        with no_tracebacks(caplog):
            stalled = [await _stalled_upload(server) for _ in range(2)]
            async with aiohttp.ClientSession() as session:
                for _ in range(100):  # until the server holds both
                    async with session.get(base_url(server) + "/v1/models") as response:
                        body = await response.json()
                        if response.status == 429:
                            break
                    await asyncio.sleep(0.02)
                assert response.status == 429
                assert response.headers["Retry-After"] == "1"
                assert body["error"]["code"] == "rate_limit_exceeded"
                for _reader, writer in stalled:  # the stalled clients give up
                    writer.transport.abort()
                for _ in range(100):
                    async with session.get(base_url(server) + "/v1/models") as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.02)
                assert response.status == 200
    assert any("went away" in r.getMessage() for r in caplog.records)


async def test_stalled_body_times_out(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(hub, tmp_path, idle_timeout_s=1.0) as server:
        with no_tracebacks(caplog):
            reader, writer = await _stalled_upload(server)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 408"), head
            writer.close()
            # A JSON body that stops halfway, likewise.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                b'{"input": "Hello'
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 408"), head
            writer.close()


async def _closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(1024):
                pass
    except TimeoutError:
        return False
    return True


async def test_slow_headers_and_idle_connections_are_closed(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(hub, tmp_path, header_timeout_s=0.5, idle_timeout_s=3.0) as server:
        with no_tracebacks(caplog):
            # Slowloris: a header line every 0.2 s, never finishing.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                for i in range(50):
                    await asyncio.sleep(0.2)
                    if reader.at_eof():
                        break
                    writer.write(f"X-Slow-{i}: 1\r\n".encode())
                    await writer.drain()
            assert await _closed_within(reader, 2.0)
            assert time.monotonic() - started < 5.0
            writer.close()
            # A connection that says nothing at all.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await _closed_within(reader, 3.0)
            writer.close()
            # A keep-alive connection between requests is idle, not slow: it stays
            # open past the header deadline, until idle_timeout_s.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            assert not await _closed_within(reader, 1.5)
            assert await _closed_within(reader, 5.0)
            writer.close()


async def test_malformed_multipart_is_a_client_error(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    boundary = "xyz"
    bodies = {
        "control byte in a part header": (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="a\x01.wav"\r\nX-Bad\x07: 1\r\n\r\nRIFF\r\n--{boundary}--\r\n'
        ).encode("latin-1"),
        "no closing boundary": (
            f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\n'
        ).encode(),
        "garbage": b"\x00\xff" * 100,
    }
    async with serving(hub, tmp_path) as server, aiohttp.ClientSession() as session:
        with no_tracebacks(caplog):
            for what, body in bodies.items():
                async with session.post(
                    base_url(server) + "/v1/audio/transcriptions",
                    data=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                ) as response:
                    assert response.status == 400, what
                    error = (await response.json())["error"]
                    assert error["type"] == "invalid_request_error", what


async def test_many_clients_vanishing_mid_upload(
    hub: EngineHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """200 clients start an upload and close: DEBUG lines, no traceback storm."""
    async with (
        serving(hub, tmp_path, max_pending_per_client=256, max_connections=512) as server,
        HealthProbe(server),
    ):
        with no_tracebacks(caplog):
            clients = [await _stalled_upload(server) for _ in range(200)]
            await asyncio.sleep(0.5)
            for _reader, writer in clients:
                writer.close()
            await asyncio.sleep(0.5)
            status, body = await _transcribe(
                server, "ok.wav", await asyncio.to_thread(encode, tone(1.0), 16000, "wav")
            )
            assert status == 200, body


# ---------------------------------------------------------- voice library


async def _upload_voice(
    session: aiohttp.ClientSession, server: HttpServer, name: str, sample: bytes
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field("audio_sample", sample, filename="sample.wav")
    async with session.post(base_url(server) + "/v1/audio/voices", data=form) as response:
        return response.status, await response.json()


async def test_voice_library_quota(hub: EngineHub, tmp_path: Path) -> None:
    sample = await asyncio.to_thread(LAMP_WAV.read_bytes)
    # One 3 s voice takes ~145 kB stored (24 kHz 16-bit).
    async with (
        serving(hub, tmp_path / "count", max_voices=2) as server,
        aiohttp.ClientSession() as session,
    ):
        for name in ("one", "two"):
            status, body = await _upload_voice(session, server, name, sample)
            assert status == 201, body
        status, body = await _upload_voice(session, server, "three", sample)
        assert status == 400 and body["error"]["code"] == "limit_exceeded"
        assert "limits.max_voices" in body["error"]["message"]
        async with session.delete(base_url(server) + "/v1/audio/voices/voice_one") as response:
            assert response.status == 200
        status, body = await _upload_voice(session, server, "three", sample)
        assert status == 201, body
    async with (
        serving(hub, tmp_path / "bytes", max_voice_library_bytes=200_000) as server,
        aiohttp.ClientSession() as session,
    ):
        status, body = await _upload_voice(session, server, "one", sample)
        assert status == 201, body
        status, body = await _upload_voice(session, server, "two", sample)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        assert "limits.max_voice_library_bytes" in body["error"]["message"]
        assert len(list((tmp_path / "bytes" / "state" / "voices").glob("*.wav"))) == 1


async def test_voice_uploads_need_a_cloning_model(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "state", tmp_path / "cache", [PLAIN_TTS])
    sample = await asyncio.to_thread(LAMP_WAV.read_bytes)
    async with (
        EngineHub(settings) as plain_hub,
        HttpServer(settings, plain_hub) as server,
        aiohttp.ClientSession() as session,
    ):
        status, body = await _upload_voice(session, server, "mine", sample)
        assert status == 400 and body["error"]["code"] == "cloning_not_supported"
    assert not (tmp_path / "state" / "voices").exists()


async def test_unknown_voice_never_lists_stored_ids(hub: EngineHub, tmp_path: Path) -> None:
    sample = await asyncio.to_thread(LAMP_WAV.read_bytes)
    async with serving(hub, tmp_path) as server, aiohttp.ClientSession() as session:
        status, stored = await _upload_voice(session, server, "Private Person", sample)
        assert status == 201
        oai = await openai_client(server)
        with pytest.raises(openai.NotFoundError) as unknown:
            await oai.audio.speech.create(model="cloner", voice="nobody", input="Hi.")
        with pytest.raises(openai.NotFoundError) as unknown_id:
            await oai.audio.speech.create(model="cloner", voice="voice_nobody", input="Hi.")
        await oai.close()
        async with session.get(base_url(server) + "/v1/audio/voices/voice_nobody") as response:
            assert response.status == 404
            lookup = (await response.json())["error"]["message"]
    for message in (unknown.value.message, unknown_id.value.message, lookup):
        assert stored["id"] not in message and "Private" not in message, message
    assert "fake" in unknown.value.message  # configured voices may be named


async def test_reload_adopts_new_limits_in_place(hub: EngineHub, tmp_path: Path) -> None:
    async with (
        serving(hub, tmp_path, max_input_chars=100) as server,
        aiohttp.ClientSession() as session,
    ):
        text = {"model": "tts-1", "input": "word " * 12, "response_format": "pcm"}
        async with session.post(base_url(server) + "/v1/audio/speech", json=text) as response:
            assert response.status == 200
            await response.read()
        tighter = _settings(tmp_path / "state", tmp_path / "cache", [CLONER], max_input_chars=50)
        assert await server.reconfigure(tighter)
        async with session.post(base_url(server) + "/v1/audio/speech", json=text) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "limit_exceeded"
        async with session.get(base_url(server) + "/openapi.json") as response:
            spec = await response.json()
        assert (
            spec["components"]["schemas"]["SpeechRequest"]["properties"]["input"]["maxLength"] == 50
        )
        # A new listener needs a restart (the daemon's job).
        moved = tighter.model_copy(
            update={"http": tighter.http.model_copy(update={"port": server.port + 1})}
        )
        assert not await server.reconfigure(moved)


async def test_what_schemathesis_found_holds(hub: EngineHub, tmp_path: Path) -> None:
    """405 names the allowed methods; blank input is refused and the document says so."""
    async with serving(hub, tmp_path) as server, aiohttp.ClientSession() as session:
        async with session.delete(base_url(server) + "/v1/models") as response:
            assert response.status == 405
            assert "GET" in response.headers["Allow"].split(",")[0]
            assert (await response.json())["error"]["code"] == "method_not_allowed"
        async with session.get(base_url(server) + "/openapi.json") as response:
            spec = await response.json()
        text = spec["components"]["schemas"]["SpeechRequest"]["properties"]["input"]
        assert text["minLength"] == 1 and text["pattern"] == "\\S"
        for blank in ("", "   "):
            body = {"model": "tts-1", "input": blank}
            async with session.post(base_url(server) + "/v1/audio/speech", json=body) as response:
                assert response.status == 400
                assert (await response.json())["error"]["param"] == "input"
