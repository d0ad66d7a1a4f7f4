"""Remote Wyoming engines against other edgevoice Wyoming servers on loopback.

The peers run real engines (tiny.en, Piper joe, microWakeWord hey_jarvis); two
Wyoming servers share the peer hub, so one can die while the other serves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from edgevoice.audio import decode
from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import SynthesizeOptions, TranscribeOptions
from edgevoice.errors import UnsupportedRequestError
from edgevoice.hub import EngineHub, HubStartError
from edgevoice.protocols.wyoming import WyomingServer
from tests.conftest import JOE, LIGHT_EN_TEXT, LIGHT_EN_WAV, TINY_EN, assert_means, words

pytestmark = pytest.mark.asyncio(loop_scope="module")

JARVIS = ModelConfig(name="hey_jarvis", engine="microwakeword", model="hey_jarvis")


def _settings(tmp: Path, cache: Path, **values: object) -> Settings:
    base: dict[str, object] = {
        "cache_dir": cache,
        "state_dir": tmp,
        "asr": [],
        "tts": [],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": True, "uri": "tcp://127.0.0.1:0", "zeroconf": False},
        "http": {"enabled": False},
        "mqtt": {"enabled": False},
    }
    base.update(values)
    return Settings(**base)  # type: ignore[arg-type]


def _uri(server: WyomingServer) -> str:
    port = int(server.addresses[0].rsplit(":", 1)[1])
    return f"tcp://127.0.0.1:{port}"


def _dead_uri() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def peer_hub(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> AsyncIterator[EngineHub]:
    settings = _settings(
        tmp_path_factory.mktemp("peer"), shared_cache, asr=[TINY_EN], tts=[JOE], wake=[JARVIS]
    )
    async with EngineHub(settings) as hub:
        yield hub


@pytest_asyncio.fixture(loop_scope="module")
async def peers(peer_hub: EngineHub) -> AsyncIterator[list[WyomingServer]]:
    """Two Wyoming servers over the peer hub (a test may stop either)."""
    servers = [WyomingServer(peer_hub.settings, peer_hub) for _ in range(2)]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop(1.0)


def _remote(tmp: Path, cache: Path, uris: list[str], *, connect_timeout_s: float = 2.0) -> Settings:
    options = {"uris": uris, "connect_timeout_s": connect_timeout_s, "timeout_s": 60.0}
    return _settings(
        tmp,
        cache,
        asr=[ModelConfig(name="far-ears", engine="wyoming", model="tiny-en", options=options)],
        tts=[
            ModelConfig(
                name="far-voice",
                engine="wyoming",
                model="joe",
                options={**options, "sample_rate_hz": 16000},
            )
        ],
        wake=[ModelConfig(name="far-wake", engine="wyoming", model="hey_jarvis", options=options)],
        wyoming={"enabled": False},
    )


async def test_transcribe_synthesize_and_wake_through_a_peer(
    peers: list[WyomingServer], tmp_path: Path, shared_cache: Path
) -> None:
    settings = _remote(tmp_path, shared_cache, [_dead_uri(), _uri(peers[0])])
    async with EngineHub(settings) as hub:
        # The peer's model languages and voices became this hub's.
        assert hub.asr("far-ears").engine.capabilities.languages == ("en",)
        assert [v.name for _m, v in hub.all_voices()] == ["joe"]
        assert hub.voice("joe")[0].name == "far-voice"

        audio = await asyncio.to_thread(decode, LIGHT_EN_WAV)
        transcript = await hub.transcribe(audio, model="far-ears")
        assert words(transcript.text) == words(LIGHT_EN_TEXT)
        with pytest.raises(UnsupportedRequestError, match="cannot translate"):
            await hub.transcribe(audio, TranscribeOptions(task="translate"), model="far-ears")

        spoken = await hub.synthesize_all("Hey Jarvis, turn on the lights.")
        assert spoken.rate_hz == 16000 and spoken.duration_s > 1.0
        heard = await hub.transcribe(spoken, model="far-ears")
        assert_means(heard.text, "jarvis", "lights")
        async with hub.speak("Turn on the kitchen lights.", SynthesizeOptions(voice="joe")) as s:
            chunks = [c async for c in s]
        assert chunks and all(c.rate_hz == 16000 for c in chunks)

        clip = np.concatenate([spoken.samples, np.zeros(8000, np.float32)])
        async with hub.wake_session(["far-wake"]) as session:
            found = []
            for start in range(0, len(clip), 1600):
                found += await session.process(clip[start : start + 1600], 16000)
            for _ in range(20):  # a detection may come back with a later chunk
                if found:
                    break
                found += await session.process(np.zeros(1600, np.float32), 16000)
        assert [d.name for d in found] == ["hey_jarvis"]


async def test_failover_when_the_first_peer_dies_mid_session(
    peers: list[WyomingServer],
    tmp_path: Path,
    shared_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edgevoice.engines.wyoming_remote")
    first, second = peers
    settings = _remote(tmp_path, shared_cache, [_uri(first), _uri(second)])
    async with EngineHub(settings) as hub:
        spoken = await hub.synthesize_all("Hey Jarvis, turn on the lights.")
        clip = np.concatenate([spoken.samples, np.zeros(8000, np.float32)])
        audio = await asyncio.to_thread(decode, LIGHT_EN_WAV)
        async with hub.asr_session("far-ears") as asr, hub.wake_session(["far-wake"]) as wake:
            asr.append(audio.at_rate(asr.rate_hz).samples)
            # Silence first: the wake stream is connected to the first peer.
            assert await wake.process(np.zeros(16000, np.float32), 16000) == []
            await first.stop(0.1)  # the first peer dies: its connections drop
            found = []
            for start in range(0, len(clip), 1600):
                found += await wake.process(clip[start : start + 1600], 16000)
            for _ in range(20):
                if found:
                    break
                found += await wake.process(np.zeros(1600, np.float32), 16000)
            assert [d.name for d in found] == ["hey_jarvis"]
            assert f"{_uri(first)} went away" in caplog.text
            transcript = await asr.transcribe()
            assert words(transcript.text) == words(LIGHT_EN_TEXT)
        # Speech goes to the second peer too.
        assert (await hub.synthesize_all("Hello.")).duration_s > 0.2


async def test_no_peer_reachable_fails_the_load_naming_the_uris(
    tmp_path: Path, shared_cache: Path
) -> None:
    dead = _dead_uri()
    settings = _remote(tmp_path, shared_cache, [dead], connect_timeout_s=1.0)
    with pytest.raises(HubStartError, match=f"no Wyoming peer answered: {dead}"):
        async with EngineHub(settings):
            pass
