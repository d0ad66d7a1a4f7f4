"""Model lifecycle: on-demand loads, TTL unloads, load/unload, failures, states.

Fake engines stand in (the lifecycle is the hub's, not the engine's); a slow
load is a fake ASR load gated by a :data:`edgevoice.testing.LOAD_GATES` event,
so a test decides exactly when it finishes instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import aiomqtt
import numpy as np
import openai
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from edgevoice.audio import Audio, encode
from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import EngineKind, SynthesizeOptions
from edgevoice.errors import BusyError, EngineError, UnknownModelError
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.mqtt.bridge import MqttBridge
from edgevoice.protocols.wyoming import WyomingServer
from edgevoice.testing import LOAD_GATES
from tests.conftest import Mosquitto

FAST = ModelConfig(name="fast", engine="test-asr", model="fake", options={"text": "fast model"})


def _clip(seconds: float = 1.0) -> Audio:
    return Audio(np.zeros(int(16000 * seconds), dtype=np.float32), 16000)


async def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    LOAD_GATES["lifecycle"] = event
    yield event
    event.set()  # never leave a worker waiting
    LOAD_GATES.pop("lifecycle", None)


def _states(hub: EngineHub) -> dict[str, str]:
    return {s.name: s.state for s in hub.model_states()}


async def test_on_demand_model_loads_on_first_use_without_blocking_others(
    make_settings: Callable[..., Settings], gate: threading.Event
) -> None:
    slow = ModelConfig(
        name="slow",
        engine="test-asr",
        model="fake",
        load="on_demand",
        options={"text": "slow model", "load_gate": "lifecycle"},
    )
    settings = make_settings(asr=[FAST, slow], tts=[])
    async with EngineHub(settings) as hub:
        assert _states(hub) == {"fast": "loaded", "slow": "unloaded"}
        # Listed before its first load, with placeholder capabilities.
        assert hub.asr("slow").engine.capabilities.languages == ()
        waiting = asyncio.create_task(hub.transcribe(_clip(), model="slow"))
        await _until(lambda: _states(hub)["slow"] == "loading")
        # The other model serves while "slow" is still loading.
        for _ in range(3):
            served = await asyncio.wait_for(hub.transcribe(_clip(), model="fast"), 30)
            assert served.text == "fast model"
        assert not waiting.done()
        gate.set()
        transcript = await asyncio.wait_for(waiting, 30)
        assert transcript.text == "slow model"
        status = {s.name: s for s in hub.model_states()}["slow"]
        assert status.state == "loaded" and status.device == "cpu" and status.load == "on_demand"
        assert hub.asr("slow").engine.capabilities.languages == ("en",)


async def test_requests_waiting_on_a_load_share_it_and_time_out_clearly(
    make_settings: Callable[..., Settings], gate: threading.Event
) -> None:
    slow = ModelConfig(
        name="slow",
        engine="test-asr",
        model="fake",
        load="on_demand",
        load_timeout_s=0.3,
        options={"load_gate": "lifecycle"},
    )
    async with EngineHub(make_settings(asr=[FAST, slow], tts=[])) as hub:
        with pytest.raises(EngineError, match=r"'slow' is still loading after 0.3 s"):
            await hub.transcribe(_clip(), model="slow")
        assert _states(hub)["slow"] == "loading"  # the load goes on
        gate.set()
        await _until(lambda: _states(hub)["slow"] == "loaded")
        assert (await hub.transcribe(_clip(), model="slow")).text


async def test_failed_on_demand_load_names_why_and_others_keep_serving(
    make_settings: Callable[..., Settings],
) -> None:
    broken = ModelConfig(
        name="broken",
        engine="test-asr",
        model="fake",
        load="on_demand",
        options={"fail_load": "weights are corrupt"},
    )
    async with EngineHub(make_settings(asr=[FAST, broken], tts=[])) as hub:
        for _ in range(2):  # each request tries again, and says why it failed
            with pytest.raises(EngineError, match=r"'broken'.*weights are corrupt"):
                await hub.transcribe(_clip(), model="broken")
        status = {s.name: s for s in hub.model_states()}["broken"]
        assert status.state == "failed" and "weights are corrupt" in (status.error or "")
        assert (await hub.transcribe(_clip(), model="fast")).text == "fast model"
        with pytest.raises(EngineError, match="weights are corrupt"):
            async with hub.asr_session("broken"):
                pass
        assert all(s.active == 0 for s in hub.slots())


async def test_ttl_unloads_idle_models_never_busy_ones(
    make_settings: Callable[..., Settings],
) -> None:
    expiring = ModelConfig(name="expiring", engine="test-asr", model="fake", ttl_s=0.2)
    changes: list[dict[str, str]] = []
    async with EngineHub(make_settings(asr=[FAST, expiring], tts=[])) as hub:
        hub.add_state_listener(lambda: changes.append(_states(hub)))
        assert _states(hub)["expiring"] == "loaded"  # load = "startup" by default
        # An open session holds it past its TTL: never unloaded under it.
        async with hub.asr_session("expiring") as session:
            await asyncio.sleep(0.6)
            assert _states(hub)["expiring"] == "loaded"
            session.append(_clip().samples)
            assert (await session.transcribe()).text
        await _until(lambda: _states(hub)["expiring"] == "unloaded")
        assert _states(hub)["fast"] == "loaded"  # no TTL: stays
        assert {"expiring": "unloaded", "fast": "loaded"} in changes
        status = {s.name: s for s in hub.model_states()}["expiring"]
        assert status.memory_bytes is None and status.idle_s is None
        # A new request loads it again.
        assert (await hub.transcribe(_clip(), model="expiring")).text
        assert _states(hub)["expiring"] in {"loaded", "unloaded"}
        assert any(c["expiring"] == "loaded" for c in changes[-3:])


async def test_load_and_unload_by_name(make_settings: Callable[..., Settings]) -> None:
    lazy_tts = ModelConfig(
        name="lazy-voice", engine="test-tts", model="fake", load="on_demand",
        options={"voices": ["amy", "bob"], "sample_rate_hz": 16000},
    )  # fmt: skip
    async with EngineHub(make_settings(asr=[FAST], tts=[lazy_tts])) as hub:
        with pytest.raises(UnknownModelError):
            await hub.load("nope")
        status = await hub.load("lazy-voice")
        assert status.state == "loaded" and status.kind is EngineKind.TTS
        # Voices known after the first load resolve.
        assert hub.voice("bob")[1] == "bob"
        async with hub.speak("Hello there.", SynthesizeOptions(voice="bob")) as speech:
            chunks = [chunk async for chunk in speech]
        assert chunks and speech.rate_hz == 16000
        async with hub.asr_session("fast"):
            with pytest.raises(BusyError, match="in use"):
                await hub.unload("fast")
        assert (await hub.unload("lazy-voice")).state == "unloaded"
        assert (await hub.unload("lazy-voice")).state == "unloaded"  # idempotent
        # Still listed, with the capabilities it had; speaking loads it again.
        assert [v.name for _m, v in hub.all_voices()] == ["amy", "bob"]
        async with hub.speak("Again.", SynthesizeOptions(voice="amy")) as speech:
            assert [chunk async for chunk in speech]
        assert _states(hub)["lazy-voice"] == "loaded"


async def test_on_demand_tts_speaks_at_its_rate_on_first_use(
    make_settings: Callable[..., Settings],
) -> None:
    lazy_tts = ModelConfig(
        name="lazy-voice", engine="test-tts", model="fake", load="on_demand",
        options={"sample_rate_hz": 16000},
    )  # fmt: skip
    async with EngineHub(make_settings(asr=[FAST], tts=[lazy_tts])) as hub:
        async with hub.speak("First words.") as speech:
            rates = {chunk.rate_hz async for chunk in speech}
        assert rates == {16000} and speech.rate_hz == 16000
        _model, rate, chunks = await hub.synthesize("More words.")
        assert rate == 16000 and [c async for c in chunks]


# ------------------------------------------------------------------ HTTP


async def test_http_models_show_state_and_load_unload_endpoints(
    make_settings: Callable[..., Settings], gate: threading.Event
) -> None:
    slow = ModelConfig(
        name="slow",
        engine="test-asr",
        model="fake",
        load="on_demand",
        options={"text": "slow model", "load_gate": "lifecycle"},
    )
    broken = ModelConfig(
        name="broken",
        engine="test-asr",
        model="fake",
        load="on_demand",
        options={"fail_load": "no such weights"},
    )
    settings = make_settings(
        asr=[FAST, slow, broken], tts=[], http={"host": "127.0.0.1", "port": 0}
    )
    wav = encode(_clip().samples, 16000, "wav")
    async with (
        EngineHub(settings) as hub,
        HttpServer(settings, hub) as server,
        aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http,
    ):
        oai = await asyncio.to_thread(
            openai.AsyncOpenAI,
            base_url=f"http://127.0.0.1:{server.port}/v1",
            api_key="unused",
            max_retries=0,
        )
        listed = await oai.models.list()
        states = {m.id: (m.model_extra or {}).get("state") for m in listed.data}
        assert states == {"fast": "loaded", "slow": "unloaded", "broken": "unloaded"}

        loading = asyncio.create_task(http.post("/v1/models/slow/load"))
        await _until(lambda: _states(hub)["slow"] == "loading")
        # A request to the loading model waits; the other model answers meanwhile.
        waiting = asyncio.create_task(
            oai.audio.transcriptions.create(file=("a.wav", wav), model="slow")
        )
        for _ in range(2):
            served = await oai.audio.transcriptions.create(file=("a.wav", wav), model="fast")
            assert served.text == "fast model"
        async with http.get("/v1/models/slow") as response:
            assert (await response.json())["state"] == "loading"
        assert not waiting.done()
        gate.set()
        async with await loading as response:
            body = await response.json()
            assert response.status == 200, body
            assert body["state"] == "loaded" and body["device"] == "cpu"
        assert (await waiting).text == "slow model"

        async with http.post("/v1/models/slow/unload") as response:
            assert response.status == 200 and (await response.json())["state"] == "unloaded"
        async with http.post("/v1/models/nope/load") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "model_not_found"
        async with http.post("/v1/models/broken/load") as response:
            error = (await response.json())["error"]
            assert response.status == 500 and "no such weights" in error["message"]
        with pytest.raises(openai.InternalServerError, match="no such weights"):
            await oai.audio.transcriptions.create(file=("a.wav", wav), model="broken")
        async with http.get("/v1/models/broken") as response:
            body = await response.json()
            assert body["state"] == "failed" and "no such weights" in body["error"]
        # An on-demand transcription loads "slow" again.
        assert (await oai.audio.transcriptions.create(file=("a.wav", wav), model="slow")).text
        await oai.close()


# --------------------------------------------------------------- Wyoming


async def _wyoming_read(client: AsyncTcpClient, kind: str) -> Event:
    while True:
        event = await asyncio.wait_for(client.read_event(), 60)
        assert event is not None, "server closed the connection"
        if event.type == kind:
            return event
        assert event.type != "error", event.data


async def test_wyoming_lists_unloaded_models_and_loads_them_on_use(
    make_settings: Callable[..., Settings],
) -> None:
    lazy_asr = ModelConfig(
        name="lazy-asr", engine="test-asr", model="fake", load="on_demand",
        options={"text": "lazy words"},
    )  # fmt: skip
    lazy_tts = ModelConfig(
        name="lazy-voice", engine="test-tts", model="fake", load="on_demand",
        options={"voices": ["amy"], "sample_rate_hz": 16000},
    )  # fmt: skip
    lazy_wake = ModelConfig(
        name="okay_nabu", engine="microwakeword", model="okay_nabu", load="on_demand"
    )
    settings = make_settings(
        asr=[FAST, lazy_asr],
        tts=[lazy_tts],
        wake=[lazy_wake],
        wyoming={"enabled": True, "uri": "tcp://127.0.0.1:0", "zeroconf": False},
    )
    async with EngineHub(settings) as hub, WyomingServer(settings, hub) as server:
        assert set(_states(hub).values()) == {"loaded", "unloaded"}
        port = int(server.addresses[0].rsplit(":", 1)[1])
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            info = Info.from_event(await _wyoming_read(client, "info"))
            asr_models = {m.name: m.installed for p in info.asr for m in p.models}
            assert asr_models == {"fast": True, "lazy-asr": True}
            assert [v.name for p in info.tts for v in p.voices] == ["lazy-voice"]
            assert [m.name for p in info.wake for m in p.models] == ["okay_nabu"]
            assert all(p.installed for p in [*info.asr, *info.tts, *info.wake])

            await client.write_event(Transcribe(name="lazy-asr").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            pcm = bytes(2 * 16000)
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm).event())
            await client.write_event(AudioStop().event())
            transcript = Transcript.from_event(await _wyoming_read(client, "transcript"))
            assert transcript.text == "lazy words"

            await client.write_event(
                Synthesize("Hello there.", SynthesizeVoice("lazy-voice")).event()
            )
            start = AudioStart.from_event(await _wyoming_read(client, "audio-start"))
            assert start.rate == 16000
            await _wyoming_read(client, "audio-stop")

            # Once loaded, the real voices are listed.
            await client.write_event(Describe().event())
            info = Info.from_event(await _wyoming_read(client, "info"))
            assert [v.name for p in info.tts for v in p.voices] == ["amy"]
        assert _states(hub) == {
            "fast": "loaded", "lazy-asr": "loaded", "lazy-voice": "loaded", "okay_nabu": "unloaded"
        }  # fmt: skip


# ------------------------------------------------------------------ MQTT


async def test_mqtt_publishes_model_states_retained_on_change(
    make_settings: Callable[..., Settings], mosquitto: Mosquitto
) -> None:
    lazy = ModelConfig(name="lazy", engine="test-asr", model="fake", load="on_demand")
    settings = make_settings(
        asr=[FAST, lazy],
        tts=[],
        mqtt={"enabled": True, "url": mosquitto.url, "node_id": "lifecycle", "topic_prefix": "lc"},
    )
    topic = "lc/lifecycle/models"

    def states(payload: Any) -> dict[str, str]:
        return {m["name"]: m["state"] for m in json.loads(payload)["models"]}

    async with EngineHub(settings) as hub:
        bridge = MqttBridge(settings, hub)
        await bridge.start()
        try:
            await bridge.wait_online(30)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as watcher:
                await watcher.subscribe(topic)
                seen: list[dict[str, str]] = []

                async def until(expected: dict[str, str]) -> None:
                    async with asyncio.timeout(30):
                        async for message in watcher.messages:
                            seen.append(states(message.payload))
                            if seen[-1] == expected:
                                return

                await until({"fast": "loaded", "lazy": "unloaded"})  # retained
                await hub.load("lazy")
                await until({"fast": "loaded", "lazy": "loaded"})
                assert {"fast": "loaded", "lazy": "loading"} in seen
                await hub.unload("lazy")
                await until({"fast": "loaded", "lazy": "unloaded"})
        finally:
            await bridge.stop(5.0)
