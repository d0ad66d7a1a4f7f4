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
import os
import subprocess
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

    async def factory(
        *, mqtt: bool = True, devices: Any = None, hermes_site: str | None = None, **audio_io: Any
    ) -> Running:
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
                hermes=hermes_site is not None,
                hermes_site_id=hermes_site or "default",
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


# ---------------------------------------------------- Home Assistant conversation


class ConversationStandIn:
    """A stand-in for Home Assistant's REST API: ``POST /api/conversation/process``
    with a bearer token, answering like Home Assistant's default agent."""

    TOKEN = "ha-long-lived-token"

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.unauthorized = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def process(request: web.Request) -> web.Response:
            if request.headers.get("Authorization") != f"Bearer {self.TOKEN}":
                self.unauthorized += 1
                return web.json_response({"message": "Unauthorized"}, status=401)
            body = await request.json()
            self.requests.append(body)
            first = len(self.requests) == 1
            speech = "Which lamp do you mean?" if first else "Done, the light is on."
            return web.json_response(
                {
                    "response": {
                        "speech": {"plain": {"speech": speech, "extra_data": None}},
                        "response_type": "action_done",
                        "language": "en",
                        "data": {"targets": [], "success": [], "failed": []},
                    },
                    "conversation_id": body.get("conversation_id") or "conv-01",
                    "continue_conversation": first,
                }
            )

        app = web.Application()
        app.router.add_post("/api/conversation/process", process)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_home_assistant_conversation_reply_and_follow_up(
    start_loop: Callable[..., Any],
    hub: EngineHub,
    hey_jarvis: FloatAudio,
    lamp: FloatAudio,
    light: FloatAudio,
) -> None:
    ha = ConversationStandIn()
    await ha.start()
    try:
        # The sound card mock lets the test speak the follow-up once the loop listens.
        card = MockSoundCard(
            [silence(0.3), hey_jarvis, silence(1.0), lamp, silence(1.5)], pace=PACE
        )
        run = await start_loop(
            mqtt=False,
            devices=card,
            no_speech_timeout_s=60.0,
            conversation={"url": ha.url, "token": ConversationStandIn.TOKEN, "language": "en"},
        )
        await start(run)
        await until(lambda: len(ha.requests) == 1, "the first conversation request")
        first = ha.requests[0]
        assert close_enough(first["text"], LAMP_TEXT), first
        assert first["language"] == "en" and "conversation_id" not in first
        # The reply is spoken, then the loop listens again without a wake word.
        await until(lambda: run.loop.listening, "listening for the follow-up")
        reply = Audio(card.played_audio, card.output_rate_hz)
        assert close_enough((await hub.transcribe(reply)).text, "Which lamp do you mean?")
        card.add_clip(np.concatenate([light, silence(1.5)]))
        await until(lambda: len(ha.requests) == 2, "the follow-up request")
        follow_up = ha.requests[1]
        assert close_enough(follow_up["text"], LIGHT_EN_TEXT), follow_up
        assert follow_up["conversation_id"] == "conv-01"
        assert run.loop.stats.turns == 1  # one wake word, two commands
        await until(lambda: not run.loop.listening and not run.server.player.busy, "the end")
        assert ha.unauthorized == 0
    finally:
        await ha.stop()


# ------------------------------------------------------- other faces play here


async def test_tts_say_with_play_is_spoken_and_never_wakes_the_loop(
    start_loop: Callable[..., Any], probe: Probe, hub: EngineHub
) -> None:
    # The mock's microphone hears its speaker, as in a room.
    card = MockSoundCard(pace=PACE, echo=True)
    run = await start_loop(devices=card)
    await probe.subscribe(f"{run.base}/tts/done")
    await start(run)
    await until(run.server.running.is_set, "the loop to run")
    text = "Hey Jarvis, turn on the living room lamp."
    request = {"text": text, "play": True, "format": "wav", "id": "play1"}
    await probe.publish(f"{run.base}/tts/say", json.dumps(request))
    done = json.loads((await probe.expect(f"{run.base}/tts/done")).payload)
    assert done["played"] is True and done["played_s"] > 1.0, done
    played = Audio(card.played_audio, card.output_rate_hz)
    heard = (await hub.transcribe(played)).text
    assert close_enough(heard, "turn on the living room lamp"), heard
    heard_at = run.loop.audio_s
    await until(lambda: run.loop.audio_s > heard_at + 2.0, "the echo to be heard")
    assert run.loop.detections == 0
    # The same words from someone in the room do wake it: only our own voice is ignored.
    card.echo = False
    card.add_clip(np.concatenate([played.at_rate(CAPTURE_RATE_HZ).samples, silence(1.0)]))
    await until(lambda: run.loop.detections == 1, "the wake word from the room")


async def test_http_play_flag_speaks_on_the_speaker(
    start_loop: Callable[..., Any], hub: EngineHub, tmp_path: Path
) -> None:
    import aiohttp

    from edgevoice.protocols.http import HttpServer

    out = tmp_path / "out.wav"
    wav = write_wav(tmp_path / "in.wav", silence(1.0))
    run = await start_loop(mqtt=False, input=f"file:{wav}", output=f"file:{out}")
    await start(run)
    settings = run.server.settings.model_copy(
        update={"http": HttpConfig(enabled=True, host="127.0.0.1", port=0)}
    )
    http = HttpServer(settings, hub)
    await http.start()
    url = f"http://127.0.0.1:{http.port}/v1/audio/speech"
    try:
        await until(run.server.running.is_set, "the loop to run")
        async with aiohttp.ClientSession() as session:
            body = {"input": LIGHT_EN_TEXT, "play": True}
            async with session.post(url, json=body) as response:
                assert response.status == 200, await response.text()
                result = await response.json()
            assert result["played"] is True and result["duration_s"] > 1.0
            spoken = await transcribe_file(hub, out)
            assert close_enough(spoken, LIGHT_EN_TEXT), spoken
            # Without audio_io there is no speaker: a client error naming `play`.
            await run.server.stop(1.0)
            async with session.post(url, json=body) as response:
                assert response.status == 400
                error = (await response.json())["error"]
            assert error["param"] == "play" and "no local speaker" in error["message"]
    finally:
        await http.stop(1.0)


async def test_hermes_play_bytes_play_on_the_speaker(
    start_loop: Callable[..., Any], probe: Probe, hub: EngineHub
) -> None:
    card = MockSoundCard(pace=PACE)
    site = f"site{uid()}"
    run = await start_loop(devices=card, hermes_site=site)
    await probe.subscribe(f"hermes/audioServer/{site}/playFinished")
    await start(run)
    await until(run.server.running.is_set, "the loop to run")
    # Hermes TTS renders playBytes; this node, the site's audio server, plays them.
    await probe.publish(
        "hermes/tts/say", json.dumps({"text": LAMP_TEXT, "siteId": site, "id": "h1"})
    )
    finished = json.loads((await probe.expect(f"hermes/audioServer/{site}/playFinished")).payload)
    assert finished == {"id": "h1", "siteId": site}
    heard = (await hub.transcribe(Audio(card.played_audio, card.output_rate_hz))).text
    assert close_enough(heard, LAMP_TEXT), heard


# ---------------------------------------------------------------- real devices


async def test_devices_command_lists_or_explains(capsys: pytest.CaptureFixture[str]) -> None:
    from edgevoice.cli import main

    code = await asyncio.to_thread(main, ["devices"])
    out, err = capsys.readouterr()
    if code == 0:
        assert "INDEX" in out or "no sound devices found" in out
    else:
        assert "PortAudio" in err


PORTAUDIO_RUN = r"""
import asyncio, faulthandler, sys
faulthandler.dump_traceback_later(240, exit=True)  # a hang says where, then ends
import numpy as np
from edgevoice.audio import Audio
from edgevoice.audio_io.devices import list_devices, AudioDeviceError
from edgevoice.audio_io.server import AudioIoServer
from edgevoice.config import ModelConfig, Settings
from edgevoice.hub import EngineHub

try:
    names = [d.name for d in list_devices()]
except AudioDeviceError as exc:
    print("SKIP", exc); sys.exit(0)
if "edgevoice_null" not in names:
    print("SKIP no ALSA null device listed:", names); sys.exit(0)

async def main():
    settings = Settings(
        cache_dir=sys.argv[1], state_dir=sys.argv[2], asr=[], tts=[], vad=[],
        wake=[ModelConfig(name="hey_jarvis", engine="microwakeword", model="hey_jarvis")],
        wyoming={"enabled": False}, http={"enabled": False},
        audio_io={"enabled": True, "mode": "esphome", "input": "edgevoice_null",
                  "output": "edgevoice_null", "esphome_host": "127.0.0.1", "esphome_port": 0,
                  "zeroconf": False, "required": True},
    )
    async with EngineHub(settings) as hub:
        server = AudioIoServer(settings, hub)
        await server.start()
        loop = server.loop
        try:
            await asyncio.wait_for(server.running.wait(), 30)
            async with asyncio.timeout(30):
                while loop.audio_s < 1.0:
                    await asyncio.sleep(0.05)
            tone = Audio(np.full(8000, 0.1, dtype=np.float32), 16000)
            result = await asyncio.wait_for(server.player.play_audio(tone, "tone"), 30)
            print("OK", round(loop.audio_s, 2), result.played, result.duration_s)
        except TimeoutError:
            print("STUCK", loop.audio_s, server.attempts, server.device_error, flush=True)
            raise
        finally:
            await server.stop(1.0)

asyncio.run(main())
"""


async def test_real_portaudio_path_with_an_alsa_null_device(tmp_path: Path) -> None:
    """PortAudio capture and playback for real, on ALSA's null device (declared in
    a private ~/.asoundrc); skipped, saying why, where PortAudio or ALSA is missing."""
    import sys

    home = tmp_path / "home"
    home.mkdir()
    (home / ".asoundrc").write_text(
        'pcm.edgevoice_null {\n  type null\n  hint { show on description "edgevoice test" }\n}\n'
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PORTAUDIO_RUN,
        str(tmp_path / "cache"),
        str(tmp_path / "state"),
        env={**os.environ, "HOME": str(home)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 300)
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        pytest.fail("PortAudio run hung:\n" + stdout.decode()[-2000:] + stderr.decode()[-4000:])
    done = subprocess.CompletedProcess(
        [], process.returncode or 0, stdout.decode(), stderr.decode()
    )
    output = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert output, done.stderr[-3000:]
    if output[-1].startswith("SKIP"):
        pytest.skip(f"no PortAudio device to test with: {output[-1][5:]}")
    ok, audio_s, played, duration_s = output[-1].split()
    assert ok == "OK" and float(audio_s) >= 1.0
    assert played == "True" and float(duration_s) > 0.4


async def test_daemon_starts_headless_and_serves_the_other_faces(
    shared_cache: Path, tmp_path: Path
) -> None:
    """No sound device: the daemon starts, says why audio is off, and HTTP serves."""
    import aiohttp

    from edgevoice.daemon import Daemon

    settings = Settings(
        cache_dir=shared_cache,
        state_dir=tmp_path / "state",
        asr=[],
        tts=[],
        vad=[],
        wake=WAKE_WORDS[:1],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(enabled=True, host="127.0.0.1", port=0),
        audio_io=AudioIoConfig(
            enabled=True,
            mode="esphome",
            input="no-such-sound-card",
            output="no-such-sound-card",
            esphome_host="127.0.0.1",
            esphome_port=0,
            zeroconf=False,
            retry_min_s=0.05,
            retry_max_s=0.2,
        ),
    )
    daemon = Daemon(settings)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), WAIT_S)
        audio = next(s for s in daemon.servers if s.name == "audio_io")
        assert isinstance(audio, AudioIoServer)
        await until(lambda: audio.attempts >= 2, "retries")
        assert audio.device_error and not audio.running.is_set()
        http = next(s for s in daemon.servers if s.name == "http")
        health = http.addresses[0].rstrip("/") + "/health"
        async with aiohttp.ClientSession() as session, session.get(health) as response:
            assert response.status == 200
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, WAIT_S)


async def test_command_action_gets_the_text_and_its_answer_is_spoken(
    start_loop: Callable[..., Any],
    hub: EngineHub,
    hey_jarvis: FloatAudio,
    lamp: FloatAudio,
    tmp_path: Path,
) -> None:
    heard = tmp_path / "heard.txt"
    script = (
        f'read -r line; printf "%s|%s" "$line" "$EDGEVOICE_WAKE_WORD" > {heard}; '
        'echo "The lamp is on."'
    )
    card = MockSoundCard([silence(0.3), hey_jarvis, silence(1.0), lamp, silence(1.5)], pace=PACE)
    run = await start_loop(
        mqtt=False,
        devices=card,
        awake_sound="",
        command={"argv": ["/bin/sh", "-c", script], "speak_output": True},
    )
    await start(run)
    await until(heard.exists, "the command to run")
    text, wake_word = (await asyncio.to_thread(heard.read_text)).split("|")
    assert close_enough(text, LAMP_TEXT) and wake_word == "hey_jarvis"
    await until(lambda: len(card.played) > 0 and not run.server.player.busy, "the answer")
    spoken = (await hub.transcribe(Audio(card.played_audio, card.output_rate_hz))).text
    assert close_enough(spoken, "The lamp is on."), spoken


async def test_hostile_action_endpoints_fail_alone(  # noqa: PLR0917
    start_loop: Callable[..., Any],
    probe: Probe,
    hey_jarvis: FloatAudio,
    lamp: FloatAudio,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A webhook that never answers, a Home Assistant that answers 2 MB of
    garbage, a program that floods stdout: each fails alone (bounded), the
    MQTT transcript still goes out and the loop is idle again."""

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(WAIT_S)
        return web.Response(text="late")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"\xff" * (2 * 1024 * 1024), content_type="application/json")

    app = web.Application()
    app.router.add_post("/hook", stall)
    app.router.add_post("/api/conversation/process", garbage)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        wav = write_wav(
            tmp_path / "in.wav", silence(0.5), hey_jarvis, silence(1.0), lamp, silence(2)
        )
        run = await start_loop(
            input=f"file:{wav}",
            output=f"file:{tmp_path / 'out.wav'}",
            webhook={"url": f"{base}/hook", "timeout_s": 1.0},
            conversation={"url": base, "token": "t"},
            command={
                "argv": ["/bin/sh", "-c", "yes flood | head -c 3000000"],
                "speak_output": True,
            },
        )
        await probe.subscribe(f"{run.base}/#")
        await probe.expect(f"{run.base}/state", lambda m: m.payload == b"idle")  # retained
        await start(run)
        transcript = json.loads((await probe.expect(f"{run.base}/asr/transcript")).payload)
        assert close_enough(transcript["text"], LAMP_TEXT)
        # After "thinking" (the actions run), "idle" once every action is over.
        await probe.expect(f"{run.base}/state", lambda m: m.payload == b"thinking")
        message = await probe.expect(f"{run.base}/state", lambda m: m.payload == b"idle")
        failures = [r.getMessage() for r in caplog.records if "action failed" in r.getMessage()]
        assert {f.split("the ")[1].split(" action")[0] for f in failures} == {
            "webhook",
            "command",
            "conversation",
        }, failures
        assert not run.server.player.busy
        assert message.payload == b"idle"
    finally:
        await runner.cleanup()
