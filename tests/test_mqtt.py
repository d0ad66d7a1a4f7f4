"""MQTT bridge against a real Mosquitto broker, real engines (tiny.en, joe) and real clients."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import uuid
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiomqtt
import av
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from edgevoice.audio import decode
from edgevoice.config import HttpConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.fairness import client_scope
from edgevoice.hub import EngineHub
from edgevoice.protocols.mqtt import MqttBridge, parse_broker_url, parse_say
from edgevoice.protocols.mqtt import bridge as mqtt_bridge
from edgevoice.protocols.mqtt.bridge import MAX_CONCURRENT_REQUESTS
from edgevoice.protocols.mqtt.messages import (
    MAX_RESPONSE_TOPIC_BYTES,
    MqttRequestError,
    check_response_topic,
    checked_id,
)
from tests.conftest import (
    JOE,
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    TINY_EN,
    Mosquitto,
    words,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

# Generous upper bounds for waiting on the broker/engines (never asserted as timings).
WAIT_S = 60.0
DAEMON_START_S = 180.0


def uid() -> str:
    return uuid.uuid4().hex[:8]


def v5_properties(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for key, value in values.items():
        setattr(props, key, value)
    return props


class Probe:
    """A user's MQTT client: subscribes, publishes and waits for matching messages."""

    def __init__(
        self,
        port: int,
        *,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        identifier: str | None = None,
        clean_session: bool | None = None,
    ) -> None:
        self.client = aiomqtt.Client(
            "127.0.0.1",
            port,
            protocol=protocol,
            identifier=identifier or f"probe-{uid()}",
            clean_session=clean_session,
        )
        self.messages: list[aiomqtt.Message] = []
        self._used: set[int] = set()
        self._new = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Probe:
        await self.client.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        try:
            await self.client.__aexit__(None, None, None)
        except aiomqtt.MqttError:
            pass  # the broker is already gone

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                self.messages.append(message)
                self._new.set()
        except aiomqtt.MqttError:
            pass

    async def subscribe(self, *filters: str) -> None:
        await self.client.subscribe([(f, 1) for f in filters])

    async def publish(self, topic: str, payload: bytes | str, **kwargs: Any) -> None:
        await self.client.publish(topic, payload, qos=1, **kwargs)

    async def expect(
        self,
        topic_filter: str,
        where: Callable[[aiomqtt.Message], bool] | None = None,
        timeout_s: float = WAIT_S,
    ) -> aiomqtt.Message:
        """The next not yet consumed message on ``topic_filter`` (matching ``where``)."""

        async def find() -> aiomqtt.Message:
            while True:
                for i, message in enumerate(self.messages):
                    if (
                        i not in self._used
                        and message.topic.matches(topic_filter)
                        and (where is None or where(message))
                    ):
                        self._used.add(i)
                        return message
                self._new.clear()
                await self._new.wait()

        return await asyncio.wait_for(find(), timeout_s)

    async def expect_json(
        self,
        topic_filter: str,
        where: Callable[[dict[str, Any]], bool] | None = None,
        timeout_s: float = WAIT_S,
    ) -> dict[str, Any]:
        message = await self.expect(
            topic_filter,
            lambda m: where is None or where(json.loads(payload(m))),
            timeout_s,
        )
        data: dict[str, Any] = json.loads(payload(message))
        return data


def payload(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


async def until(check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110 (polling bridge counters)
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def transcribe_bytes(hub: EngineHub, data: bytes) -> str:
    audio = await asyncio.to_thread(decode, data)
    return (await hub.transcribe(audio)).text


# ------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EngineHub]:
    settings = Settings(
        cache_dir=shared_cache,
        state_dir=tmp_path_factory.mktemp("state"),
        asr=[TINY_EN],
        tts=[JOE],
        wake=[],
        vad=[],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(enabled=False),
    )
    async with EngineHub(settings) as loaded:
        yield loaded


BridgeFactory = Callable[..., Awaitable[MqttBridge]]


@pytest_asyncio.fixture(loop_scope="module")
async def make_bridge(hub: EngineHub, mosquitto: Mosquitto) -> AsyncIterator[BridgeFactory]:
    """Start bridges with a unique node id/topic prefix; stopped at the end."""
    bridges: list[MqttBridge] = []

    async def factory(limits: dict[str, Any] | None = None, **overrides: Any) -> MqttBridge:
        values: dict[str, Any] = {
            "enabled": True,
            "url": mosquitto.url,
            "node_id": f"node-{uid()}",
            "topic_prefix": f"ev-{uid()}",
            "discovery_prefix": f"ha-{uid()}",
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
        }
        values.update(overrides)
        update: dict[str, Any] = {"mqtt": MqttConfig(**values)}
        if limits:
            update["limits"] = hub.settings.limits.model_copy(update=limits)
        settings = hub.settings.model_copy(update=update)
        bridge = MqttBridge(settings, hub)
        await bridge.start()
        bridges.append(bridge)
        await bridge.wait_online(WAIT_S)
        return bridge

    yield factory
    for bridge in bridges:
        await bridge.stop(5.0)


@pytest_asyncio.fixture(loop_scope="module")
async def probe(mosquitto: Mosquitto) -> AsyncIterator[Probe]:
    async with Probe(mosquitto.port) as client:
        yield client


# --------------------------------------------------------------------- units


async def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://broker.lan").port == 1883
    tls = parse_broker_url("mqtts://u%40x:p%3Aw@broker:8884")
    assert (tls.host, tls.port, tls.tls, tls.username, tls.password) == (
        "broker",
        8884,
        True,
        "u@x",
        "p:w",
    )
    with pytest.raises(ValueError, match="scheme"):
        parse_broker_url("http://broker")


async def test_parse_say_plain_text_and_json() -> None:
    assert parse_say(b"Hello there").text == "Hello there"
    request = parse_say(b'{"text": "Hi", "voice": "joe", "speed": 1.5, "format": "mp3", "id": 7}')
    assert (request.text, request.voice, request.speed, request.format, request.id) == (
        "Hi",
        "joe",
        1.5,
        "mp3",
        "7",
    )


async def test_ids_and_response_topics_that_may_reach_a_topic() -> None:
    reserved = ["edgevoice", "homeassistant", "hermes"]
    assert check_response_topic("replies/kitchen-1", reserved) == "replies/kitchen-1"
    assert check_response_topic("edgevoicex/r", reserved) == "edgevoicex/r"
    for bad in [
        "",
        "a/#",
        "a/+/b",
        "#",
        "a\0b",
        "$SYS/x",
        "edgevoice",
        "edgevoice/node/status",
        "homeassistant/device/t/config",
        "hermes/asr/textCaptured",
        "r/" + "x" * MAX_RESPONSE_TOPIC_BYTES,
    ]:
        with pytest.raises(MqttRequestError, match="response topic"):
            check_response_topic(bad, reserved)
    assert checked_id(None, "id") is None
    assert checked_id(7, "id") == "7"
    assert checked_id("say-1.a:b_c", "id") == "say-1.a:b_c"
    for bad_id in ["a/b", "#", "+", "a b", "x" * 65, True, 1.5, {"a": 1}]:
        with pytest.raises(MqttRequestError, match="id"):
            checked_id(bad_id, "id")


# ------------------------------------------------------------- speak / ASR


async def test_speak_publishes_audio_that_transcribes_back(
    make_bridge: BridgeFactory, probe: Probe, hub: EngineHub
) -> None:
    bridge = await make_bridge()
    base = bridge.base
    await probe.subscribe(f"{base}/tts/#", f"{base}/error")

    await probe.publish(f"{base}/tts/say", json.dumps({"text": LIGHT_EN_TEXT, "id": "say1"}))
    audio = await probe.expect(f"{base}/tts/audio/say1")
    done = await probe.expect_json(f"{base}/tts/done")
    assert not audio.retain
    assert payload(audio)[:4] == b"RIFF"
    decoded = await asyncio.to_thread(decode, payload(audio))
    assert done["id"] == "say1"
    assert done["duration_s"] == pytest.approx(decoded.duration_s, abs=0.01)
    assert done["audio_topic"] == f"{base}/tts/audio/say1"
    assert words(await transcribe_bytes(hub, payload(audio))) == words(LIGHT_EN_TEXT)

    # Plain text (as Home Assistant's notify sends it) and another format.
    await probe.publish(f"{base}/tts/say", LAMP_TEXT)
    done = await probe.expect_json(f"{base}/tts/done")
    audio = await probe.expect(done["audio_topic"])
    assert words(await transcribe_bytes(hub, payload(audio))) == words(LAMP_TEXT)

    await probe.publish(
        f"{base}/tts/say",
        json.dumps({"text": "Hello.", "format": "flac", "id": "f1", "play": True, "speed": 1.2}),
    )
    audio = await probe.expect(f"{base}/tts/audio/f1")
    done = await probe.expect_json(f"{base}/tts/done")
    assert payload(audio)[:4] == b"fLaC"
    assert done["played"] is False
    assert "speaker" in done["play_error"]


async def test_transcribe_rpc_mqtt5(make_bridge: BridgeFactory, probe: Probe) -> None:
    bridge = await make_bridge()
    reply_topic = f"reply/{uid()}"
    await probe.subscribe(reply_topic)
    await probe.client.publish(
        f"{bridge.base}/asr/transcribe",
        LAMP_WAV.read_bytes(),
        qos=1,
        properties=v5_properties(
            ResponseTopic=reply_topic, CorrelationData=b"corr-1", MessageExpiryInterval=300
        ),
    )
    reply = await probe.expect(reply_topic)
    assert reply.properties is not None
    assert getattr(reply.properties, "CorrelationData", None) == b"corr-1"
    assert not reply.retain
    data = json.loads(payload(reply))
    assert words(data["text"]) == words(LAMP_TEXT)
    assert data["language"] == "en"
    assert data["duration_s"] == pytest.approx(3.0, abs=0.1)
    assert data["id"]


async def test_transcribe_mqtt311_json_and_binary(
    make_bridge: BridgeFactory, mosquitto: Mosquitto
) -> None:
    bridge = await make_bridge()
    async with Probe(mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.subscribe(f"{bridge.base}/asr/transcript")
        request = {
            "audio_b64": base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode(),
            "id": "v3-1",
            "language": "en",
        }
        await client.publish(f"{bridge.base}/asr/transcribe", json.dumps(request))
        reply = await client.expect_json(f"{bridge.base}/asr/transcript")
        assert reply["id"] == "v3-1"
        assert words(reply["text"]) == words(LIGHT_EN_TEXT)
        assert reply["language"] == "en"

        await client.publish(f"{bridge.base}/asr/transcribe", LAMP_WAV.read_bytes())
        reply = await client.expect_json(f"{bridge.base}/asr/transcript")
        assert words(reply["text"]) == words(LAMP_TEXT)


async def test_expired_request_gets_no_reply(
    make_bridge: BridgeFactory, probe: Probe, hub: EngineHub
) -> None:
    bridge = await make_bridge()
    reply_topic = f"reply/{uid()}"
    await probe.subscribe(reply_topic, f"{bridge.base}/error")
    gate = threading.Event()
    # Occupy tiny.en's only worker so the request waits past its expiry.
    blocker = asyncio.create_task(hub.run(hub.asr(), gate.wait, 30.0))
    try:
        await probe.client.publish(
            f"{bridge.base}/asr/transcribe",
            LAMP_WAV.read_bytes(),
            qos=1,
            properties=v5_properties(
                ResponseTopic=reply_topic, CorrelationData=b"late", MessageExpiryInterval=1
            ),
        )
        await until(lambda: bridge.in_flight > 0)
        await asyncio.sleep(1.5)
    finally:
        gate.set()
        await blocker
    error = await probe.expect_json(f"{bridge.base}/error")
    assert "expired" in error["error"]
    assert error["topic"] == f"{bridge.base}/asr/transcribe"
    reply = await probe.expect_json(reply_topic)
    assert "expired" in reply["error"]
    assert not any("text" in json.loads(payload(m)) for m in probe.messages)


# --------------------------------------------------- discovery / availability


async def test_discovery_availability_and_events(
    make_bridge: BridgeFactory, mosquitto: Mosquitto
) -> None:
    bridge = await make_bridge()
    base, node = bridge.base, bridge.node_id
    ha = bridge.config.discovery_prefix
    config_topic = f"{ha}/device/{node}/config"
    async with Probe(mosquitto.port) as client:
        await client.subscribe(f"{base}/#", config_topic)
        status = await client.expect(f"{base}/status")
        assert (payload(status), status.retain) == (b"online", True)
        config_message = await client.expect(config_topic)
        assert config_message.retain
        config = json.loads(payload(config_message))
        assert config["availability_topic"] == f"{base}/status"
        platforms = {c["p"]: c for c in config["components"].values()}
        assert set(platforms) == {"notify", "sensor", "binary_sensor", "event", "select"}
        assert platforms["notify"]["command_topic"] == f"{base}/tts/say"
        assert platforms["sensor"]["state_topic"] == f"{base}/asr/transcript"
        assert "[:255]" in platforms["sensor"]["value_template"]
        assert platforms["sensor"]["json_attributes_topic"] == f"{base}/asr/transcript"
        assert platforms["binary_sensor"]["state_topic"] == f"{base}/state"
        assert platforms["event"]["state_topic"] == f"{base}/wake/detected"
        assert platforms["select"]["options"] == ["joe"]
        assert len({c["unique_id"] for c in config["components"].values()}) == 5
        state = await client.expect(f"{base}/state")
        assert (payload(state), state.retain) == (b"idle", True)
        assert payload(await client.expect(f"{base}/voice")) == b"joe"

        # Home Assistant restarts: discovery is sent again.
        await client.publish(f"{ha}/status", "online")
        again = await client.expect(config_topic)
        assert json.loads(payload(again)) == config

        # Voice select round trip.
        await client.publish(f"{base}/voice/set", "joe")
        assert payload(await client.expect(f"{base}/voice")) == b"joe"

        # Events from the (future) local voice loop.
        await bridge.publish_wake("okay_nabu")
        wake = await client.expect_json(f"{base}/wake/detected")
        assert wake == {"event_type": "detected", "wake_word": "okay_nabu"}
        await bridge.publish_state("listening")
        assert payload(await client.expect(f"{base}/state")) == b"listening"
        long_text = "word " * 100
        await bridge.publish_transcript(long_text, language="en", duration_s=1.5, id="loop1")
        transcript = await client.expect_json(f"{base}/asr/transcript")
        assert transcript["text"] == long_text
        assert (transcript["id"], transcript["language"]) == ("loop1", "en")
        with pytest.raises(ValueError, match="state"):
            await bridge.publish_state("dancing")  # type: ignore[arg-type]

        # Clean stop: offline, retained.
        await bridge.stop(5.0)
        status = await client.expect(f"{base}/status")
        assert payload(status) == b"offline"
    async with Probe(mosquitto.port) as late:
        await late.subscribe(f"{base}/status")
        status = await late.expect(f"{base}/status")
        assert (payload(status), status.retain) == (b"offline", True)


# ------------------------------------------------------------- bad payloads


async def test_bad_payloads_reported_and_bridge_keeps_working(
    make_bridge: BridgeFactory, probe: Probe
) -> None:
    bridge = await make_bridge(limits={"max_input_chars": 50, "max_upload_bytes": 256 * 1024})
    base = bridge.base
    await probe.subscribe(f"{base}/error", f"{base}/tts/done", f"{base}/asr/transcript")
    junk_b64 = base64.b64encode(b"definitely not audio").decode()
    good_b64 = base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode()
    # (topic, payload, words in the error, its code, the id it names)
    cases: list[tuple[str, bytes | str, str, str, str | None]] = [
        ("tts/say", b'{"text": ', "not valid JSON", "invalid_request", None),
        ("tts/say", json.dumps({"voice": "joe", "id": "m1"}), "text", "invalid_request", "m1"),
        (
            "tts/say",
            json.dumps({"text": "x" * 51, "id": "long1"}),
            "limit of 50",
            "limit_exceeded",
            "long1",
        ),
        (
            "tts/say",
            json.dumps({"text": "Hi", "voice": "nobody", "id": "v1"}),
            "nobody",
            "unknown_model",
            "v1",
        ),
        (
            "tts/say",
            json.dumps({"text": "Hi", "format": "xyz", "id": "f1"}),
            "format",
            "invalid_request",
            "f1",
        ),
        (
            "tts/say",
            json.dumps({"text": "Hi", "speed": 10, "id": "s1"}),
            "speed",
            "invalid_request",
            "s1",
        ),
        # An id that cannot go into a topic is not echoed either.
        ("tts/say", json.dumps({"text": "Hi", "id": "a/b"}), "id: string", "invalid_request", None),
        ("tts/say", b"\xff\xfe\xfd", "UTF-8", "invalid_request", None),
        ("tts/say", b"   ", "empty", "invalid_request", None),
        ("tts/say", b"x" * (256 * 1024 + 1), "max_upload_bytes", "limit_exceeded", None),
        ("asr/transcribe", b"this is not audio at all", "audio", "bad_audio", None),
        ("asr/transcribe", b"", "empty", "invalid_request", None),
        (
            "asr/transcribe",
            json.dumps({"id": "b1", "audio_b64": "!!!"}),
            "base64",
            "invalid_request",
            "b1",
        ),
        ("asr/transcribe", json.dumps({"id": "b2"}), "audio_b64", "invalid_request", "b2"),
        (
            "asr/transcribe",
            json.dumps({"id": "b3", "audio_b64": junk_b64}),
            "audio",
            "bad_audio",
            "b3",
        ),
        (
            "asr/transcribe",
            json.dumps({"id": "b4", "audio_b64": good_b64, "model": "nope"}),
            "nope",
            "unknown_model",
            "b4",
        ),
        (
            "asr/transcribe",
            b'{"id": "b5", "audio_b64": ',
            "not valid JSON",
            "invalid_request",
            None,
        ),
        ("voice/set", "nobody", "nobody", "unknown_model", None),
    ]
    for suffix, body, *_ in cases:
        await probe.publish(f"{base}/{suffix}", body)
    errors = [await probe.expect_json(f"{base}/error") for _ in cases]
    for suffix, _, needle, code, request_id in cases:
        match = [
            e
            for e in errors
            if e["topic"] == f"{base}/{suffix}"
            and needle.lower() in e["error"].lower()
            and e["code"] == code
            and e.get("id") == request_id
        ]
        assert match, f"no error for {suffix} {needle!r} in {errors}"
        errors.remove(match[0])
    # Still subscribed and working.
    await probe.publish(f"{base}/tts/say", json.dumps({"text": "Still here.", "id": "ok1"}))
    assert (await probe.expect_json(f"{base}/tts/done"))["id"] == "ok1"
    await probe.publish(f"{base}/asr/transcribe", json.dumps({"audio_b64": good_b64, "id": "ok2"}))
    reply = await probe.expect_json(f"{base}/asr/transcript")
    assert (reply["id"], words(reply["text"])) == ("ok2", words(LIGHT_EN_TEXT))


# ------------------------------------------------------------------- Hermes


def wav_chunks(path: Path, frames: int = 1024) -> Iterator[bytes]:
    """The file as Hermes audioFrame messages: small 16-bit WAV files."""
    samples, rate = sf.read(path, dtype="int16")
    for start in range(0, len(samples), frames):
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(samples[start : start + frames].tobytes())
        yield buffer.getvalue()


async def test_hermes_say_and_listen(
    make_bridge: BridgeFactory, probe: Probe, hub: EngineHub
) -> None:
    site = f"site{uid()}"
    await make_bridge(hermes=True, hermes_site_id=site)
    await probe.subscribe(
        f"hermes/audioServer/{site}/playBytes/+", "hermes/tts/sayFinished", "hermes/asr/#"
    )
    await probe.publish(
        "hermes/tts/say",
        json.dumps({"text": LAMP_TEXT, "siteId": site, "id": "h1", "sessionId": "s1"}),
    )
    play = await probe.expect(f"hermes/audioServer/{site}/playBytes/h1")
    assert words(await transcribe_bytes(hub, payload(play))) == words(LAMP_TEXT)
    finished = await probe.expect_json("hermes/tts/sayFinished", lambda d: d["siteId"] == site)
    assert finished == {"id": "h1", "sessionId": "s1", "siteId": site}

    await probe.publish(
        "hermes/asr/startListening", json.dumps({"siteId": site, "sessionId": "s2"})
    )
    for chunk in wav_chunks(LIGHT_EN_WAV):
        await probe.publish(f"hermes/audioServer/{site}/audioFrame", chunk)
    await probe.publish("hermes/asr/stopListening", json.dumps({"siteId": site, "sessionId": "s2"}))
    captured = await probe.expect_json("hermes/asr/textCaptured", lambda d: d["siteId"] == site)
    assert words(captured["text"]) == words(LIGHT_EN_TEXT)
    assert (captured["sessionId"], captured["lang"]) == ("s2", "en")
    assert 0 < captured["likelihood"] <= 1


async def test_hermes_sessions_are_bounded_and_expire(
    make_bridge: BridgeFactory, probe: Probe
) -> None:
    site = f"site{uid()}"
    timeout_s = 1.5
    bridge = await make_bridge(
        hermes=True,
        hermes_site_id=site,
        limits={"session_timeout_s": timeout_s, "max_pending_per_client": 2, "max_audio_s": 10},
    )
    assert bridge.hermes is not None
    await probe.subscribe("hermes/error/asr", "hermes/asr/textCaptured")

    def mine(data: dict[str, Any]) -> bool:
        return bool(data.get("siteId") == site)

    async def start(session_id: str) -> None:
        await probe.publish(
            "hermes/asr/startListening", json.dumps({"siteId": site, "sessionId": session_id})
        )

    # At most max_pending_per_client sessions are open; more are refused as busy.
    for session_id in ("s1", "s2", "s3"):
        await start(session_id)
    busy = await probe.expect_json("hermes/error/asr", lambda d: mine(d) and d["sessionId"] == "s3")
    assert "max_pending_per_client" in busy["error"]
    # Never fed: both expire on their own (a timer, not a later message, ends them).
    expired = [
        await probe.expect_json(
            "hermes/error/asr", lambda d: mine(d) and d["sessionId"] in ("s1", "s2")
        )
        for _ in range(2)
    ]
    assert all("session_timeout_s" in e["error"] for e in expired), expired
    assert bridge.hermes.sessions == 0

    # Longer than the limit: refused at stopListening, the audio dropped as it crossed.
    await start("long")
    silence = io.BytesIO()
    with wave.open(silence, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(bytes(2 * 16000 * 11))
    await probe.publish(f"hermes/audioServer/{site}/audioSessionFrame/long", silence.getvalue())
    await probe.publish(
        "hermes/asr/stopListening", json.dumps({"siteId": site, "sessionId": "long"})
    )
    too_long = await probe.expect_json(
        "hermes/error/asr", lambda d: mine(d) and d["sessionId"] == "long"
    )
    assert "max_audio_s" in too_long["error"]

    # A session that keeps receiving audio outlives the timeout and is transcribed.
    await start("fed")
    chunks = list(wav_chunks(LIGHT_EN_WAV))
    pause_s = 2 * timeout_s / len(chunks)  # the frames span twice the timeout
    for chunk in chunks:
        await probe.publish(f"hermes/audioServer/{site}/audioSessionFrame/fed", chunk)
        await asyncio.sleep(pause_s)
    await probe.publish(
        "hermes/asr/stopListening", json.dumps({"siteId": site, "sessionId": "fed"})
    )
    captured = await probe.expect_json("hermes/asr/textCaptured", mine)
    assert captured["sessionId"] == "fed"
    assert words(captured["text"]) == words(LIGHT_EN_TEXT)


# ------------------------------------------------- attacks: ids, topics, bounds


async def test_hostile_ids_and_response_topics_publish_nowhere_else(
    make_bridge: BridgeFactory,
    probe: Probe,
    mosquitto: Mosquitto,
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = f"site{uid()}"
    bridge = await make_bridge(hermes=True, hermes_site_id=site)
    base, node = bridge.base, bridge.node_id
    prefix, ha = bridge.config.topic_prefix, bridge.config.discovery_prefix
    attack = f"atk-{uid()}"
    say = json.dumps({"text": "Hi."}).encode()
    wav = LAMP_WAV.read_bytes()
    # (request topic suffix, payload, MQTT 5 properties, the property at fault)
    cases: list[tuple[str, bytes, dict[str, Any], str]] = [
        ("tts/say", say, {"UserProperty": [("id", "a/b")]}, "user property id"),
        ("tts/say", say, {"UserProperty": [("id", "#")]}, "user property id"),
        ("tts/say", say, {"UserProperty": [("id", "+")]}, "user property id"),
        ("tts/say", say, {"UserProperty": [("id", "x" * 65)]}, "user property id"),
        ("tts/say", say, {"UserProperty": [("client", "a/#")]}, "user property client"),
        ("asr/transcribe", wav, {"ResponseTopic": f"{attack}/#"}, "ResponseTopic"),
        ("asr/transcribe", wav, {"ResponseTopic": f"{attack}/+/x"}, "ResponseTopic"),
        ("asr/transcribe", wav, {"ResponseTopic": f"{ha}/device/t/config"}, "ResponseTopic"),
        ("asr/transcribe", wav, {"ResponseTopic": f"{base}/status"}, "ResponseTopic"),
        ("asr/transcribe", wav, {"ResponseTopic": f"{prefix}/other/asr/x"}, "ResponseTopic"),
        ("asr/transcribe", wav, {"ResponseTopic": "hermes/asr/textCaptured"}, "ResponseTopic"),
        ("asr/transcribe", wav, {"ResponseTopic": f"{attack}/{'x' * 300}"}, "ResponseTopic"),
        (
            "asr/transcribe",
            wav,
            {"ResponseTopic": f"{attack}/ok", "CorrelationData": b"c" * 2000},
            "CorrelationData",
        ),
    ]
    hermes_cases: list[tuple[str, dict[str, Any]]] = [
        ("hermes/tts/say", {"text": "Hi.", "siteId": site, "id": "a/b"}),
        ("hermes/tts/say", {"text": "Hi.", "siteId": site, "id": "h1", "sessionId": "#"}),
        ("hermes/asr/startListening", {"siteId": site, "sessionId": "s/+"}),
        ("hermes/asr/stopListening", {"siteId": site, "sessionId": "#"}),
    ]
    async with Probe(mosquitto.port) as watcher:
        await watcher.subscribe("#")
        await probe.subscribe(f"{base}/error", "hermes/error/#", f"{attack}/#")
        for suffix, body, props, _ in cases:
            await probe.client.publish(
                f"{base}/{suffix}", body, qos=1, properties=v5_properties(**props)
            )
        for topic, data in hermes_cases:
            await probe.publish(topic, json.dumps(data))
        errors = [await probe.expect_json(f"{base}/error") for _ in [*cases, *hermes_cases]]
        for suffix, _, _, param in cases:
            match = [
                e for e in errors if e["topic"] == f"{base}/{suffix}" and e.get("param") == param
            ]
            assert match, f"no error for {param} in {errors}"
            errors.remove(match[0])
        assert len(errors) == len(hermes_cases)
        assert all(e["code"] == "invalid_request" and "id" not in e for e in errors), errors
        hermes_errors = [
            await probe.expect_json("hermes/error/#", lambda d: d["siteId"] == site)
            for _ in hermes_cases
        ]
        assert all(e["sessionId"] is None for e in hermes_errors), hermes_errors

        # A well-formed request afterwards is answered on its (allowed) response topic.
        await probe.client.publish(
            f"{base}/asr/transcribe",
            wav,
            qos=1,
            properties=v5_properties(ResponseTopic=f"{attack}/ok", UserProperty=[("id", "fine.1")]),
        )
        reply = await probe.expect_json(f"{attack}/ok", lambda d: d.get("id") == "fine.1")
        assert words(reply["text"]) == words(LAMP_TEXT)
        await watcher.expect(f"{attack}/ok")

    requests = {f"{base}/{suffix}" for suffix, *_ in cases} | {t for t, _ in hermes_cases}
    allowed = requests | {
        f"{base}/status",
        f"{base}/state",
        f"{base}/voice",
        f"{base}/models",  # retained model lifecycle states
        f"{base}/error",
        f"{ha}/device/{node}/config",
        f"{attack}/ok",
        "hermes/error/tts",
        "hermes/error/asr",
    }
    roots = (f"{prefix}/", f"{ha}/", f"{attack}/", "hermes/")
    seen = {str(m.topic) for m in watcher.messages if str(m.topic).startswith(roots)}
    assert seen <= allowed, sorted(seen - allowed)
    assert not [m for m in watcher.messages if str(m.topic).startswith("hermes/audioServer")]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logged, logged


async def test_per_client_pending_bound_answers_busy(
    make_bridge: BridgeFactory, probe: Probe, hub: EngineHub
) -> None:
    bridge = await make_bridge(limits={"max_pending_per_client": 2})
    base = bridge.base
    await probe.subscribe(f"{base}/tts/done", f"{base}/error")
    voice, _ = hub.voice()
    gate = threading.Event()
    # Occupy the voice's worker so every request stays pending.
    blocker = asyncio.create_task(hub.run(voice, gate.wait, 60.0))
    # Clients "a" and "b" name themselves; the rest share one anonymous bound.
    senders = [("a", 5), ("b", 2), ("", 3)]
    try:
        for client, count in senders:
            for i in range(count):
                props: list[tuple[str, str]] = [("id", f"{client or 'n'}{i}")]
                if client:
                    props.append(("client", client))
                await probe.client.publish(
                    f"{base}/tts/say",
                    json.dumps({"text": "Hi.", "format": "pcm"}),
                    qos=1,
                    properties=v5_properties(UserProperty=props),
                )
        busy = [await probe.expect_json(f"{base}/error") for _ in range(4)]
        assert {e["id"] for e in busy} == {"a2", "a3", "a4", "n2"}
        assert all(e["code"] == "busy" for e in busy), busy
        assert bridge.in_flight + bridge.queued == 6
    finally:
        gate.set()
        await blocker
    done = {(await probe.expect_json(f"{base}/tts/done"))["id"] for _ in range(6)}
    assert done == {"a0", "a1", "b0", "b1", "n0", "n1"}
    await until(lambda: bridge.in_flight + bridge.queued == 0)


async def test_queue_bound_holds_across_many_clients(
    make_bridge: BridgeFactory, probe: Probe, hub: EngineHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many clients, one request each: the per-client bound never trips, the total does.
    queue_limit = 3
    monkeypatch.setattr(mqtt_bridge, "MAX_QUEUED_REQUESTS", queue_limit)
    bridge = await make_bridge()
    base = bridge.base
    await probe.subscribe(f"{base}/tts/done", f"{base}/error")
    voice, _ = hub.voice()
    gate = threading.Event()
    blocker = asyncio.create_task(hub.run(voice, gate.wait, 60.0))
    admitted = MAX_CONCURRENT_REQUESTS + queue_limit
    refused = 2
    try:
        for i in range(admitted + refused):
            await probe.client.publish(
                f"{base}/tts/say",
                json.dumps({"text": "Hi.", "format": "pcm"}),
                qos=1,
                properties=v5_properties(UserProperty=[("client", f"c{i}"), ("id", f"q{i}")]),
            )
        busy = [await probe.expect_json(f"{base}/error") for _ in range(refused)]
        assert {e["id"] for e in busy} == {f"q{i}" for i in range(admitted, admitted + refused)}
        assert all(e["code"] == "busy" and "queued" in e["error"] for e in busy), busy
        assert (bridge.in_flight, bridge.queued) == (MAX_CONCURRENT_REQUESTS, queue_limit)
    finally:
        gate.set()
        await blocker
    done = {(await probe.expect_json(f"{base}/tts/done"))["id"] for _ in range(admitted)}
    assert done == {f"q{i}" for i in range(admitted)}


async def test_other_faces_get_turns_during_an_mqtt_burst(
    make_bridge: BridgeFactory, probe: Probe, hub: EngineHub
) -> None:
    burst = 200
    bridge = await make_bridge(limits={"max_pending_per_client": burst})
    base = bridge.base
    done_topic = f"{base}/tts/done"
    await probe.subscribe(done_topic, f"{base}/error")
    lamp = await asyncio.to_thread(decode, LAMP_WAV)
    tally = {"scanned": 0, "answered": 0, "other_at": 0}
    errors: list[aiomqtt.Message] = []

    def answered() -> int:
        # Incremental: rescanning hundreds of replies on every poll would load the loop.
        for message in probe.messages[tally["scanned"] :]:
            if not message.topic.matches(done_topic):
                errors.append(message)
                continue
            tally["answered"] += 1
            if b'"other1"' in payload(message):
                tally["other_at"] = tally["answered"]
        tally["scanned"] = len(probe.messages)
        return tally["answered"]

    def check_bounds() -> None:
        # The burst waits in the bridge's queue, not as hundreds of tasks.
        assert bridge.in_flight <= MAX_CONCURRENT_REQUESTS
        assert len(asyncio.all_tasks()) < MAX_CONCURRENT_REQUESTS + 40

    for i in range(burst):
        request = {"text": "Hi there.", "format": "pcm", "id": f"burst{i}"}
        await probe.publish(f"{base}/tts/say", json.dumps(request))
    check_bounds()
    await until(lambda: answered() >= 1)
    # Another MQTT client that names itself takes turns with the burst's sender.
    await probe.client.publish(
        f"{base}/tts/say",
        json.dumps({"text": "Me too.", "format": "pcm", "id": "other1"}),
        qos=1,
        properties=v5_properties(UserProperty=[("client", "other")]),
    )
    check_bounds()
    await until(lambda: answered() > 0 and tally["other_at"] > 0)
    # Another face's client (a Wyoming connection, say) asks for speech and a
    # transcription while most of the burst still waits.
    with client_scope("wyoming", "other"):
        speech = await hub.synthesize_all("Testing the other face.")
        answered_at_speech = answered()
        check_bounds()
        transcript = await hub.transcribe(lamp)
        answered_at_transcript = answered()
    # Sized to the slowest CPU: 200 short syntheses, one at a time.
    await until(lambda: answered() == burst + 1, timeout_s=20 * WAIT_S)
    assert not errors, [payload(m) for m in errors]
    assert speech.duration_s > 0.5
    assert words(transcript.text) == words(LAMP_TEXT)
    # Compared with the burst itself, not with the clock.
    assert tally["other_at"] < burst // 2, tally
    assert answered_at_speech < burst // 2, answered_at_speech
    assert answered_at_transcript < burst // 2, answered_at_transcript


def long_opus(duration_s: float, bitrate: int = 6000) -> bytes:
    """An Ogg/Opus file of ``duration_s`` of a 440 Hz tone at ``bitrate`` bit/s.

    One second is encoded (PyAV, libopus, 120 ms frames) and its packets are
    muxed again and again, so hours of audio take a second to make.
    """
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48000, options={"frame_duration": "120"})
        stream.bit_rate = bitrate
        stream.layout = "mono"
        t = np.arange(48000) / 48000
        tone = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.rate = 48000
        frame.pts = 0
        packets = [bytes(p) for p in stream.encode(frame)]
        packets += [bytes(p) for p in stream.encode(None)]
        span = 48000 * 120 // 1000
        for i in range(int(duration_s * 1000 / 120)):
            packet = av.Packet(packets[1 + i % (len(packets) - 2)])
            packet.stream = stream
            packet.time_base = Fraction(1, 48000)
            packet.pts = packet.dts = i * span
            packet.duration = span
            container.mux(packet)
    return buffer.getvalue()


async def test_two_hour_opus_is_refused_fast_with_bounded_memory(
    make_bridge: BridgeFactory, probe: Probe
) -> None:
    data = await asyncio.to_thread(long_opus, 2 * 3600)
    assert len(data) < 6 * 1024 * 1024  # a few MB: well under limits.max_upload_bytes
    bridge = await make_bridge()
    reply_topic = f"reply/{uid()}"
    await probe.subscribe(reply_topic)
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    await probe.client.publish(
        f"{bridge.base}/asr/transcribe",
        data,
        qos=1,
        properties=v5_properties(ResponseTopic=reply_topic, UserProperty=[("id", "opus2h")]),
    )
    reply = await probe.expect_json(reply_topic)
    elapsed_s = time.monotonic() - started
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib) / 1024
    assert (reply["code"], reply["limit"], reply["id"]) == (
        "limit_exceeded",
        "max_audio_s",
        "opus2h",
    )
    # Decoding it all would take 2 h x 48 kHz x 4 bytes = 1.3 GiB (and tens of
    # seconds); the container's declared duration refuses it before decoding.
    assert grown_mib < 200, grown_mib
    assert elapsed_s < 10, elapsed_s
    # The bridge keeps serving.
    await probe.client.publish(
        f"{bridge.base}/asr/transcribe",
        LAMP_WAV.read_bytes(),
        qos=1,
        properties=v5_properties(ResponseTopic=reply_topic),
    )
    assert words((await probe.expect_json(reply_topic))["text"]) == words(LAMP_TEXT)


async def test_outbox_is_capped_in_bytes_while_the_broker_is_away(
    make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cap = 64 * 1024
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    await asyncio.to_thread(broker.start)
    try:
        bridge = await make_bridge(url=broker.url, limits={"max_mqtt_outbox_bytes": cap})
        base = bridge.base
        user = f"user-{uid()}"
        async with Probe(
            broker.port, protocol=aiomqtt.ProtocolVersion.V311, identifier=user, clean_session=False
        ) as client:
            await client.subscribe(f"{base}/asr/transcript")
        await asyncio.to_thread(broker.stop)
        await until(lambda: not bridge.connected)
        text = "word " * 400  # 2 kB a message
        count = 100
        for i in range(count):
            await bridge.publish_transcript(text, id=f"t{i}")
            assert bridge.outbox_bytes <= cap
        assert bridge.outbox_dropped >= count - cap // len(text)
        assert bridge.outbox_size + bridge.outbox_dropped == count
        full = [r for r in caplog.records if "outbox full" in r.getMessage()]
        assert [r.levelno for r in full if r.levelno >= logging.ERROR] == [logging.ERROR]

        await asyncio.to_thread(broker.start)
        await bridge.wait_online(WAIT_S)
        async with Probe(
            broker.port, protocol=aiomqtt.ProtocolVersion.V311, identifier=user, clean_session=False
        ) as client:
            last = await client.expect_json(
                f"{base}/asr/transcript", lambda d: d["id"] == f"t{count - 1}"
            )
            assert last["text"] == text
            kept = [json.loads(payload(m))["id"] for m in client.messages]
        # The newest were kept, in order; the oldest were dropped.
        assert kept == [f"t{i}" for i in range(count - len(kept), count)]
        assert len(kept) == bridge.outbox_size or bridge.outbox_size == 0
        assert "t0" not in kept
    finally:
        await asyncio.to_thread(broker.stop)


# ------------------------------------------------------------ broker restart


async def test_broker_restart_reconnects_and_answers_in_flight_request(
    make_bridge: BridgeFactory, hub: EngineHub, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    await asyncio.to_thread(broker.start)
    try:
        bridge = await make_bridge(url=broker.url, keepalive_s=5)
        base = bridge.base
        user = f"user-{uid()}"
        # A user with a persistent session: replies wait in the broker for them.
        async with Probe(
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V311,
            identifier=user,
            clean_session=False,
        ) as client:
            await client.subscribe(f"{base}/status", f"{base}/asr/transcript")
            assert payload(await client.expect(f"{base}/status")) == b"online"
            gate = threading.Event()
            blocker = asyncio.create_task(hub.run(hub.asr(), gate.wait, 30.0))
            try:
                request = {
                    "audio_b64": base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode(),
                    "id": "inflight",
                }
                await client.publish(f"{base}/asr/transcribe", json.dumps(request))
                await until(lambda: bridge.in_flight > 0)
                await asyncio.to_thread(broker.stop)
            finally:
                gate.set()
                await blocker
        await until(lambda: bridge.outbox_size > 0)
        assert not bridge.connected
        await asyncio.to_thread(broker.start)
        await bridge.wait_online(WAIT_S)
        assert bridge.connections == 2
        async with Probe(
            broker.port,
            protocol=aiomqtt.ProtocolVersion.V311,
            identifier=user,
            clean_session=False,
        ) as client:
            # The broker sent the bridge's will ("offline") as it shut down, then
            # the bridge came back "online".
            await client.expect(f"{base}/status", lambda m: payload(m) == b"online")
            reply = await client.expect_json(f"{base}/asr/transcript")
            assert reply["id"] == "inflight"
            assert words(reply["text"]) == words(LIGHT_EN_TEXT)
            # New requests work on the new connection.
            await client.subscribe(f"{base}/tts/done")
            await client.publish(f"{base}/tts/say", json.dumps({"text": "Back.", "id": "b1"}))
            assert (await client.expect_json(f"{base}/tts/done"))["id"] == "b1"
    finally:
        await asyncio.to_thread(broker.stop)


# ----------------------------------------------------- daemons: pool, LWT


class Daemon:
    """``python -m edgevoice serve`` with only MQTT enabled."""

    def __init__(self, workdir: Path, cache: Path, mqtt: dict[str, Any]) -> None:
        self.node_id = str(mqtt["node_id"])
        workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f'cache_dir = "{cache}"',
            f'state_dir = "{workdir / "state"}"',
            "wake = []",
            "vad = []",
            "[[asr]]",
            'name = "tiny-en"',
            'engine = "faster-whisper"',
            'model = "tiny.en"',
            "[[tts]]",
            'name = "joe"',
            'engine = "piper"',
            'model = "en_US-joe-medium"',
            "[wyoming]",
            "enabled = false",
            "[http]",
            "enabled = false",
            "[mqtt]",
            "enabled = true",
            *(f"{k} = {json.dumps(v)}" for k, v in mqtt.items()),
        ]
        self.config = workdir / "config.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = workdir / "daemon.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "edgevoice",
                "serve",
                "--config",
                str(self.config),
                stdout=log,
                stderr=log,
                env=env,
            )

    async def signal(self, sig: int) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), WAIT_S)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool_daemons(
    mosquitto: Mosquitto, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, str, list[Daemon]]]:
    prefix, pool = f"ev-{uid()}", f"pool-{uid()}"
    workdir = tmp_path_factory.mktemp("daemons")
    daemons = [
        Daemon(
            workdir / name,
            shared_cache,
            {
                "url": mosquitto.url,
                "node_id": f"{name}-{uid()}",
                "topic_prefix": prefix,
                "pool": pool,
                "reconnect_min_s": 0.2,
            },
        )
        for name in ("a", "b")
    ]
    for daemon in daemons:
        await daemon.start()
    try:
        async with Probe(mosquitto.port) as watcher:
            await watcher.subscribe(f"{prefix}/+/status")
            for daemon in daemons:
                await watcher.expect(
                    f"{prefix}/{daemon.node_id}/status",
                    lambda m: payload(m) == b"online",
                    timeout_s=DAEMON_START_S,
                )
        yield prefix, pool, daemons
    except BaseException:
        for daemon in daemons:
            sys.stderr.write(daemon.log.read_text(errors="replace"))
        raise
    finally:
        for daemon in daemons:
            if daemon.process is not None and daemon.process.returncode is None:
                await daemon.signal(signal.SIGKILL)


async def pool_round(
    probe: Probe, prefix: str, pool: str, count: int
) -> dict[bytes, dict[str, Any]]:
    """``count`` transcribe requests to the pool; every reply, keyed by correlation."""
    reply_topic = f"reply/{uid()}"
    await probe.subscribe(reply_topic)
    files = [(LAMP_WAV, LAMP_TEXT), (LIGHT_EN_WAV, LIGHT_EN_TEXT)]
    expected: dict[bytes, str] = {}
    for i in range(count):
        path, text = files[i % 2]
        correlation = f"req-{i}".encode()
        expected[correlation] = text
        await probe.client.publish(
            f"{prefix}/pool/{pool}/asr/transcribe",
            path.read_bytes(),
            qos=1,
            properties=v5_properties(ResponseTopic=reply_topic, CorrelationData=correlation),
        )
    replies: dict[bytes, dict[str, Any]] = {}
    for _ in range(count):
        message = await probe.expect(reply_topic)
        assert message.properties is not None
        correlation = bytes(getattr(message.properties, "CorrelationData", b""))
        assert correlation not in replies, f"{correlation!r} answered twice"
        replies[correlation] = json.loads(payload(message))
    # Anything answered twice would have arrived by the time a last request returns.
    await asyncio.sleep(1.0)
    assert len([m for m in probe.messages if m.topic.matches(reply_topic)]) == count
    for correlation, text in expected.items():
        assert words(replies[correlation]["text"]) == words(text)
    return replies


async def test_pool_of_two_daemons_splits_requests(
    pool_daemons: tuple[str, str, list[Daemon]], probe: Probe
) -> None:
    prefix, pool, daemons = pool_daemons
    replies = await pool_round(probe, prefix, pool, 8)
    served = [r["node_id"] for r in replies.values()]
    assert set(served) == {d.node_id for d in daemons}, served


async def test_lwt_offline_after_sigkill_and_pool_survives(
    pool_daemons: tuple[str, str, list[Daemon]], probe: Probe
) -> None:
    prefix, pool, (killed, survivor) = pool_daemons
    await probe.subscribe(f"{prefix}/+/status")
    await probe.expect(f"{prefix}/{killed.node_id}/status", lambda m: payload(m) == b"online")
    assert await killed.signal(signal.SIGKILL) == -signal.SIGKILL
    status = await probe.expect(f"{prefix}/{killed.node_id}/status")
    assert payload(status) == b"offline"

    replies = await pool_round(probe, prefix, pool, 3)
    assert {r["node_id"] for r in replies.values()} == {survivor.node_id}

    # Clean shutdown of the real daemon publishes offline itself.
    assert await survivor.signal(signal.SIGTERM) == 0
    await probe.expect(f"{prefix}/{survivor.node_id}/status", lambda m: payload(m) == b"offline")


# ------------------------------------------------- MQTT 3.1.1 fallback, auth


class MqttV311OnlyProxy:
    """Stands in for a broker that only speaks MQTT 3.1.1: refuses MQTT 5
    CONNECTs (CONNACK code 1, as such brokers do) and pipes the rest to Mosquitto."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refused_v5 = 0
        self.server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> MqttV311OnlyProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"mqtt://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(1)
        length, shift, raw = 0, 0, b""
        while True:
            byte = await reader.readexactly(1)
            raw += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = await reader.readexactly(length)
        if body[6] == 5:  # protocol level after the "MQTT" name
            self.refused_v5 += 1
            writer.write(b"\x20\x02\x00\x01")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        up_writer.write(header + raw + body)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()


async def test_falls_back_to_mqtt311_when_broker_refuses_mqtt5(
    make_bridge: BridgeFactory, mosquitto: Mosquitto
) -> None:
    async with MqttV311OnlyProxy(mosquitto.port) as proxy:
        bridge = await make_bridge(url=proxy.url)
        assert bridge.protocol_version == "3.1.1"
        assert proxy.refused_v5 == 1
        async with Probe(mosquitto.port, protocol=aiomqtt.ProtocolVersion.V311) as client:
            await client.subscribe(f"{bridge.base}/asr/transcript", f"{bridge.base}/status")
            assert payload(await client.expect(f"{bridge.base}/status")) == b"online"
            request = {
                "audio_b64": base64.b64encode(LAMP_WAV.read_bytes()).decode(),
                "id": "fallback",
            }
            await client.publish(f"{bridge.base}/asr/transcribe", json.dumps(request))
            reply = await client.expect_json(f"{bridge.base}/asr/transcript")
            assert (reply["id"], words(reply["text"])) == ("fallback", words(LAMP_TEXT))
        await bridge.stop(5.0)


async def test_password_file_from_systemd_credentials(
    make_bridge: BridgeFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Mosquitto(tmp_path / "broker", users={"voice": "s3cret"})
    await asyncio.to_thread(broker.start)
    try:
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "mqtt-password").write_text("s3cret\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
        bridge = await make_bridge(
            url=broker.url, username="voice", password_file=Path("mqtt-password")
        )
        assert bridge.connected
        # A wrong password is not fatal: the bridge logs it and keeps retrying.
        settings = bridge.settings.model_copy(
            update={
                "mqtt": bridge.config.model_copy(
                    update={"password": SecretStr("wrong"), "node_id": f"n-{uid()}"}
                )
            }
        )
        refused = MqttBridge(settings, bridge.hub)
        await refused.start()
        assert not refused.connected
        assert any("refused" in r.getMessage() for r in caplog.records)
        await refused.stop(1.0)
    finally:
        await asyncio.to_thread(broker.stop)
