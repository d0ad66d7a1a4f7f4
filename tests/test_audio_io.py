"""The local voice loop with ``file:`` devices, real engines and a real Mosquitto.

The microphone is a WAV file played at ``file_pace`` times real time (it never
drops audio: a slow machine stretches the timeline instead of losing words);
the speaker is a WAV file the test transcribes. Where the test must act at a
point of the conversation (a follow-up after the reply was spoken) or needs a
speaker the microphone hears, it uses :class:`MockSoundCard`, the one hardware
mock (sound card only). Waits are generous upper bounds, never asserted timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from aiohttp import web

from edgevoice.audio import Audio, decode
from edgevoice.audio_io.devices import (
    CAPTURE_RATE_HZ,
    AudioDeviceError,
    FileMicrophone,
    MockSoundCard,
)
from edgevoice.audio_io.loop import StandaloneLoop
from edgevoice.audio_io.player import Player
from edgevoice.audio_io.server import AudioIoServer
from edgevoice.config import (
    AudioIoConfig,
    HttpConfig,
    ModelConfig,
    MqttConfig,
    Settings,
    WyomingConfig,
    load_config,
)
from edgevoice.engines.base import FloatAudio, SynthesizeOptions
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import set_peers
from edgevoice.protocols.mqtt import MqttBridge
from tests.conftest import (
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    REPO,
    TINY_EN,
    Mosquitto,
    words,
)
from tests.test_mqtt import Probe

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

WAIT_S = 120.0
"""Upper bound for anything to happen (engines on a loaded 2-core machine)."""
PACE = 4.0
"""``file:`` devices run at this multiple of real time."""

# Piper with its noise scales at 0 says exactly the same every time: the wake
# word input is the same on every machine.
JOE_STEADY = ModelConfig(
    name="joe",
    engine="piper",
    model="en_US-joe-medium",
    options={"noise_scale": 0.0, "noise_w_scale": 0.0},
)
WAKE_WORDS = [
    ModelConfig(name=name, engine="microwakeword", model=name)
    for name in ("hey_jarvis", "okay_nabu")
]
SILERO = ModelConfig(name="silero", engine="silero-vad", model="silero")


def uid() -> str:
    return uuid.uuid4().hex[:8]


def close_enough(got: str, want: str, *, missing: int = 1) -> bool:
    """At most ``missing`` of ``want``'s words absent from ``got`` (tiny.en's
    decodes of these clips differ a little between CPUs, never more)."""
    have = set(words(got))
    return sum(w not in have for w in words(want)) <= missing


def silence(seconds: float) -> FloatAudio:
    return np.zeros(int(seconds * CAPTURE_RATE_HZ), dtype=np.float32)


def write_wav(path: Path, *parts: FloatAudio) -> Path:
    sf.write(str(path), np.concatenate(parts), CAPTURE_RATE_HZ, subtype="PCM_16")
    return path


def clip(path: Path) -> FloatAudio:
    return decode(path, rate_hz=CAPTURE_RATE_HZ).samples


async def transcribe_file(hub: EngineHub, path: Path) -> str:
    audio = await asyncio.to_thread(decode, path)
    return (await hub.transcribe(audio)).text


async def until(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    async def poll() -> None:
        while not check():  # noqa: ASYNC110 (polling counters)
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# ------------------------------------------------------------------ fixtures


@contextlib.asynccontextmanager
async def audio_io_hub(state_dir: Path, cache_dir: Path) -> AsyncIterator[EngineHub]:
    """tiny.en, steady joe, hey_jarvis + okay_nabu, silero: loaded for real."""
    settings = Settings(
        cache_dir=cache_dir,
        state_dir=state_dir,
        asr=[TINY_EN],
        tts=[JOE_STEADY],
        wake=WAKE_WORDS,
        vad=[SILERO],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(enabled=False),
        mqtt=MqttConfig(enabled=False),
    )
    async with EngineHub(settings) as loaded:
        yield loaded


async def say_hey_jarvis(hub: EngineHub) -> FloatAudio:
    """Piper saying "Hey Jarvis." at 16 kHz."""
    audio = await hub.synthesize_all("Hey Jarvis.", SynthesizeOptions(voice="joe"))
    return audio.at_rate(CAPTURE_RATE_HZ).samples


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    shared_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EngineHub]:
    async with audio_io_hub(tmp_path_factory.mktemp("state"), shared_cache) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hey_jarvis(hub: EngineHub) -> FloatAudio:
    return await say_hey_jarvis(hub)


@pytest.fixture(scope="module")
def lamp() -> FloatAudio:
    return clip(LAMP_WAV)


@pytest.fixture(scope="module")
def light() -> FloatAudio:
    return clip(LIGHT_EN_WAV)


def settings_for(hub: EngineHub, **audio_io: Any) -> Settings:
    """The hub's settings with an ``[audio_io]`` for one test (``file:`` pace PACE)."""
    # 128 ms blocks: half the engine calls per second of the default 64 ms.
    values: dict[str, Any] = {
        "enabled": True,
        "file_pace": PACE,
        "retry_min_s": 0.05,
        "block_ms": 128,
    }
    values.update(audio_io)
    return hub.settings.model_copy(update={"audio_io": AudioIoConfig(**values)})


class Running:
    """An audio_io server (and maybe an MQTT bridge) for one test."""

    def __init__(self, server: AudioIoServer, bridge: MqttBridge | None) -> None:
        self.server = server
        self.bridge = bridge

    @property
    def loop(self) -> StandaloneLoop:
        assert isinstance(self.server.loop, StandaloneLoop)
        return self.server.loop

    @property
    def base(self) -> str:
        assert self.bridge is not None
        return self.bridge.base


@pytest_asyncio.fixture(loop_scope="module")
async def start_loop(hub: EngineHub, mosquitto: Mosquitto) -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []

    async def factory(*, mqtt: bool = True, devices: Any = None, **audio_io: Any) -> Running:
        settings = settings_for(hub, **audio_io)
        bridge = None
        if mqtt:
            mqtt_config = MqttConfig(
                enabled=True,
                url=mosquitto.url,
                node_id=f"node-{uid()}",
                topic_prefix=f"ev-{uid()}",
                discovery=False,
                reconnect_min_s=0.1,
            )
            settings = settings.model_copy(update={"mqtt": mqtt_config})
            bridge = MqttBridge(settings, hub)
            await bridge.start()
            await bridge.wait_online(WAIT_S)
        server = AudioIoServer(settings, hub, devices=devices)
        # What the daemon does: the faces of one hub find each other.
        set_peers(hub, lambda: [s for s in (bridge, server) if s is not None])
        running.append(Running(server, bridge))
        return running[-1]

    yield factory
    for item in running:
        await item.server.stop(1.0)
        if item.bridge is not None:
            await item.bridge.stop(1.0)


async def start(run: Running) -> Running:
    await run.server.start()
    return run


@pytest_asyncio.fixture(loop_scope="module")
async def probe(mosquitto: Mosquitto) -> AsyncIterator[Probe]:
    async with Probe(mosquitto.port) as client:
        yield client


# --------------------------------------------------------------------- config


async def test_every_audio_io_key_is_documented() -> None:
    example = REPO / "config.example.toml"
    settings = load_config(example)
    assert settings.audio_io.enabled is False  # off by default
    text = example.read_text(encoding="utf-8")
    assert "[audio_io]" in text
    config = settings.audio_io
    sections = ("mqtt", "webhook", "command", "conversation")
    for key in type(config).model_fields:
        if key in sections:
            continue
        assert f"{key} =" in text, f"config.example.toml does not document audio_io.{key}"
    for section in sections:
        assert f"[audio_io.{section}]" in text
        for key in type(getattr(config, section)).model_fields:
            assert f"{key} =" in text, f"config.example.toml lacks audio_io.{section}.{key}"


# ------------------------------------------------------------- standalone


async def test_wake_word_then_command_publishes_the_transcript(
    start_loop: Callable[..., Any],
    probe: Probe,
    hey_jarvis: FloatAudio,
    lamp: FloatAudio,
    tmp_path: Path,
) -> None:
    wav = write_wav(tmp_path / "in.wav", silence(0.5), hey_jarvis, silence(1.0), lamp, silence(2.0))
    run = await start_loop(input=f"file:{wav}", output=f"file:{tmp_path / 'out.wav'}")
    await probe.subscribe(f"{run.base}/#")
    await start(run)

    wake = await probe.expect(f"{run.base}/wake/detected", timeout_s=WAIT_S)
    assert json.loads(wake.payload)["wake_word"] == "hey_jarvis"
    message = await probe.expect(f"{run.base}/asr/transcript", timeout_s=WAIT_S)
    transcript = json.loads(message.payload)
    assert close_enough(transcript["text"], LAMP_TEXT), transcript
    assert transcript["wake_word"] == "hey_jarvis"
    assert transcript["language"] == "en"
    assert 1.0 < transcript["duration_s"] < 10.0
    # The bridge's retained "idle" from before comes first; then the turn.
    states: list[str] = []
    while "thinking" not in states or states[-1] != "idle":
        message = await probe.expect(f"{run.base}/state")
        states.append(bytes(message.payload).decode())
    turn = states[states.index("listening") :]
    assert turn == ["listening", "thinking", "idle"], states
    # The awake chime played on the speaker.
    assert sf.info(str(tmp_path / "out.wav")).duration > 0.1


async def test_no_wake_word_no_transcript(
    start_loop: Callable[..., Any], probe: Probe, lamp: FloatAudio, tmp_path: Path
) -> None:
    wav = write_wav(tmp_path / "in.wav", silence(0.5), lamp, silence(0.5), lamp, silence(1.0))
    run = await start_loop(input=f"file:{wav}", output=f"file:{tmp_path / 'out.wav'}")
    await probe.subscribe(f"{run.base}/#")
    await start(run)
    # Everything in the file was heard, then 2 s of silence more.
    await until(lambda: run.loop.audio_s > 10.0, "the whole file to be played")
    await asyncio.sleep(0.5)
    assert run.loop.detections == 0
    assert run.loop.stats.turns == 0
    assert not [m for m in probe.messages if m.topic.matches(f"{run.base}/asr/transcript")]
    assert not [m for m in probe.messages if m.topic.matches(f"{run.base}/wake/detected")]


async def webhook_receiver() -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    """A webhook receiver on loopback collecting the JSON it gets."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/hook", received


async def test_two_commands_give_two_transcripts_and_webhook_posts(  # noqa: PLR0917
    start_loop: Callable[..., Any],
    probe: Probe,
    hey_jarvis: FloatAudio,
    lamp: FloatAudio,
    light: FloatAudio,
    tmp_path: Path,
) -> None:
    runner, url, received = await webhook_receiver()
    try:
        wav = write_wav(
            tmp_path / "in.wav",
            silence(0.5),
            hey_jarvis,
            silence(1.0),
            lamp,
            silence(2.0),
            hey_jarvis,
            silence(1.0),
            light,
            silence(2.0),
        )
        run = await start_loop(
            input=f"file:{wav}",
            output=f"file:{tmp_path / 'out.wav'}",
            webhook={"url": url, "headers": {"X-Test": "1"}},
        )
        await probe.subscribe(f"{run.base}/asr/transcript")
        await start(run)
        first = json.loads((await probe.expect(f"{run.base}/asr/transcript")).payload)
        second = json.loads((await probe.expect(f"{run.base}/asr/transcript")).payload)
        assert close_enough(first["text"], LAMP_TEXT), first
        assert close_enough(second["text"], LIGHT_EN_TEXT), second
        await until(lambda: len(received) == 2, "two webhook posts")
        assert [r["id"] for r in received] == [first["id"], second["id"]]
        assert received[0]["text"] == first["text"] and received[0]["wake_word"] == "hey_jarvis"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------- the player


def tone(level: float, seconds: float, rate_hz: int = 16000) -> Audio:
    return Audio(np.full(int(seconds * rate_hz), level, dtype=np.float32), rate_hz)


async def test_player_plays_in_order_never_interleaved() -> None:
    card = MockSoundCard(pace=20.0)
    player = Player(max_queued=3)
    player.attach(await card.open_output("mock"))
    await player.start()
    try:
        levels = [0.1, 0.2, 0.3]
        futures = [player.submit_audio(tone(level, 0.5), f"tone {level}") for level in levels]
        with pytest.raises(Exception, match="waiting"):
            player.submit_audio(tone(0.9, 0.1), "one too many")
        results = await asyncio.gather(*futures)
        assert all(r.played for r in results)
        played = card.played_audio
        # Each tone is contiguous, in submission order (resampling smears edges only).
        runs = [round(float(v), 1) for v in played[:: len(played) // 30]]
        first_of = [runs.index(level) for level in levels]
        last_of = [len(runs) - 1 - runs[::-1].index(level) for level in levels]
        assert first_of == sorted(first_of)
        assert all(last_of[i] < first_of[i + 1] for i in range(len(levels) - 1)), runs
    finally:
        await player.close()


async def test_player_without_a_speaker_says_so() -> None:
    player = Player()
    await player.start()
    try:
        with pytest.raises(Exception, match="no local speaker"):
            player.submit_audio(tone(0.1, 0.1), "nowhere")
    finally:
        await player.close()


# ------------------------------------------------------------- headless


async def test_no_sound_card_logs_retries_and_keeps_running(
    start_loop: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgevoice.audio_io.server")
    card = MockSoundCard(fail_open=True, pace=PACE)
    run = await start_loop(mqtt=False, devices=card, retry_min_s=0.05, retry_max_s=0.2)
    await start(run)  # not required: starts without a sound card
    await until(lambda: run.server.attempts >= 3, "three attempts to open the sound card")
    assert not run.server.running.is_set()
    assert "mock sound card" in (run.server.device_error or "")
    lines = [
        r.getMessage() for r in caplog.records if "Audio devices unavailable" in r.getMessage()
    ]
    assert lines and "retrying in" in lines[0] and "keep serving" in lines[0]
    # The card comes back (plugged in): the loop runs; unplugged mid-run: retried again.
    card.plug_in()
    await until(run.server.running.is_set, "the loop to run once the card is back")
    attempts = run.server.attempts
    card.unplug()
    await until(lambda: not run.server.running.is_set(), "the unplugged card to be noticed")
    await until(lambda: run.server.attempts > attempts, "a new attempt after the unplug")
    card.plug_in()
    await until(run.server.running.is_set, "the loop to run again")


async def test_required_audio_fails_the_start(start_loop: Callable[..., Any]) -> None:
    run = await start_loop(mqtt=False, devices=MockSoundCard(fail_open=True), required=True)
    with pytest.raises(AudioDeviceError, match="mock sound card"):
        await run.server.start()


async def test_missing_file_device_is_a_clear_error(
    start_loop: Callable[..., Any], tmp_path: Path
) -> None:
    run = await start_loop(
        mqtt=False,
        input=f"file:{tmp_path / 'missing.wav'}",
        output=f"file:{tmp_path / 'out.wav'}",
        required=True,
    )
    with pytest.raises(AudioDeviceError, match=r"cannot open file:.*missing\.wav"):
        await run.server.start()


async def test_file_microphone_plays_then_gives_silence(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "in.wav", np.full(1600, 0.5, dtype=np.float32))
    mic = FileMicrophone(wav, block_samples=1024, pace=50.0)
    await mic.open()
    blocks = [await mic.read() for _ in range(4)]
    await mic.close()
    assert float(blocks[0].max()) > 0.4 and len(blocks[0]) == 1024
    assert mic.finished.is_set()
    assert float(np.abs(blocks[-1]).max()) == 0.0
