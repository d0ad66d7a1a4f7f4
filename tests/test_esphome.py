"""Satellite mode, driven by ``aioesphomeapi.APIClient`` exactly as Home Assistant drives it.

:class:`HomeAssistantStandIn` does what Home Assistant's ESPHome integration
does with a voice satellite (connect, device info, list entities, subscribe to
states and to the voice assistant, read the wake word configuration), and
plays Home Assistant's side of a pipeline run: it takes the streamed audio,
transcribes it with the real engines, sends the run's events, and serves the
reply's audio on loopback, as Home Assistant serves its TTS URLs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from aioesphomeapi import (
    MediaPlayerInfo,
    SwitchInfo,
    VoiceAssistantAnnounceFinished,
    VoiceAssistantAudioSettings,
    VoiceAssistantEventType,
    VoiceAssistantFeature,
    VoiceAssistantTimerEventType,
)
from aioesphomeapi.client import APIClient
from aioesphomeapi.core import APIConnectionError
from aiohttp import web

from edgevoice.audio import Audio, decode, encode, pcm_to_float
from edgevoice.audio_io.devices import CAPTURE_RATE_HZ, MockSoundCard
from edgevoice.audio_io.esphome.satellite import EsphomeSatellite
from edgevoice.audio_io.server import AudioIoServer
from edgevoice.engines.base import FloatAudio, SynthesizeOptions
from edgevoice.hub import EngineHub
from tests.conftest import LAMP_TEXT, LAMP_WAV
from tests.test_audio_io import (
    PACE,
    WAIT_S,
    audio_io_hub,
    close_enough,
    say_hey_jarvis,
    settings_for,
    silence,
    transcribe_file,
    until,
    write_wav,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

REPLY_TEXT = "The living room lamp is on."
MAX_HA_AUDIO_BYTES = 60 * CAPTURE_RATE_HZ * 2
"""The stand-in keeps at most a minute of streamed audio."""


class MediaServer:
    """Serves audio files on loopback, as Home Assistant serves TTS and media URLs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def start(self) -> None:
        async def serve(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            self.requests.append(name)
            if name not in self.files:
                raise web.HTTPNotFound()
            return web.Response(body=self.files[name], content_type="audio/wav")

        app = web.Application()
        app.router.add_get("/api/tts_proxy/{name}", serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def add(self, name: str, audio: Audio, fmt: str = "wav") -> str:
        self.files[name] = encode(audio.samples, audio.rate_hz, fmt)
        return f"{self.base}/api/tts_proxy/{name}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class HomeAssistantStandIn:
    """A stand-in for Home Assistant's ESPHome integration (an ``APIClient``)."""

    def __init__(self, port: int, *, noise_psk: str | None = None) -> None:
        self.cli = APIClient(
            "127.0.0.1", port, None, client_info="Home Assistant stand-in", noise_psk=noise_psk
        )
        self.starts: list[tuple[str, str | None]] = []
        self.stops: list[bool] = []
        self.audio = bytearray()
        self.finished: list[bool] = []
        self.states: list[Any] = []
        self.started = asyncio.Event()
        self.announce_done = asyncio.Event()
        self.info: Any = None
        self.entities: list[Any] = []
        self.config: Any = None
        self._unsubscribe: Callable[[], None] | None = None

    async def connect(self) -> None:
        await self.cli.connect(login=True)
        self.info = await self.cli.device_info()
        self.entities, _services = await self.cli.list_entities_services()
        self.cli.subscribe_states(self.states.append)
        self._unsubscribe = self.cli.subscribe_voice_assistant(
            handle_start=self._start,
            handle_stop=self._stop,
            handle_audio=self._audio,
            handle_announcement_finished=self._announce_finished,
        )
        self.config = await self.cli.get_voice_assistant_configuration(WAIT_S)

    async def _start(
        self,
        conversation_id: str,
        flags: int,
        audio_settings: VoiceAssistantAudioSettings,
        wake_word_phrase: str | None,
    ) -> int | None:
        self.starts.append((conversation_id, wake_word_phrase))
        self.audio = bytearray()
        self.started.set()
        return 0  # audio over the API connection

    async def _stop(self, abort: bool) -> None:
        self.stops.append(abort)

    async def _audio(self, data: bytes, data2: bytes | None) -> None:
        if len(self.audio) < MAX_HA_AUDIO_BYTES:
            self.audio += data

    async def _announce_finished(self, finished: VoiceAssistantAnnounceFinished) -> None:
        self.finished.append(finished.success)
        self.announce_done.set()

    def event(self, event: VoiceAssistantEventType, **data: str) -> None:
        self.cli.send_voice_assistant_event(event, data or None)

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.cli.disconnect()


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
    return decode(LAMP_WAV, rate_hz=CAPTURE_RATE_HZ).samples


@pytest_asyncio.fixture(loop_scope="module")
async def media() -> AsyncIterator[MediaServer]:
    server = MediaServer()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def start_satellite(hub: EngineHub) -> AsyncIterator[Callable[..., Any]]:
    servers: list[AudioIoServer] = []
    clients: list[HomeAssistantStandIn] = []

    async def factory(
        devices: Any = None,
        noise_psk: str | None = None,
        connect: bool = True,
        limits: dict[str, Any] | None = None,
        **audio_io: Any,
    ) -> tuple[AudioIoServer, EsphomeSatellite, HomeAssistantStandIn]:
        values: dict[str, Any] = {
            "mode": "esphome",
            "esphome_host": "127.0.0.1",
            "esphome_port": 0,
            "zeroconf": False,
            "esphome_name": "kitchen-satellite",
            "esphome_mac": "02:00:00:00:00:11",
        }
        if noise_psk is not None:
            values["esphome_encryption_key"] = noise_psk
        values.update(audio_io)
        settings = settings_for(hub, **values)
        if limits:
            settings = settings.model_copy(
                update={"limits": settings.limits.model_copy(update=limits)}
            )
        server = AudioIoServer(settings, hub, devices=devices)
        await server.start()
        servers.append(server)
        satellite = server.satellite
        assert satellite is not None
        ha = HomeAssistantStandIn(satellite.port, noise_psk=noise_psk)
        clients.append(ha)
        if connect:
            await ha.connect()
        return server, satellite, ha

    yield factory
    for client in clients:
        try:
            await client.close()
        except Exception:
            pass
    for server in servers:
        await server.stop(1.0)


def pcm_audio(data: bytes) -> Audio:
    return Audio(pcm_to_float(bytes(data), 2), CAPTURE_RATE_HZ)


# ------------------------------------------------------------------- the flow


async def test_home_assistant_runs_a_pipeline_through_the_satellite(  # noqa: PLR0917
    start_satellite: Callable[..., Any],
    media: MediaServer,
    hub: EngineHub,
    hey_jarvis: FloatAudio,
    lamp: FloatAudio,
    tmp_path: Path,
) -> None:
    wav = write_wav(tmp_path / "in.wav", silence(0.5), hey_jarvis, silence(1.0), lamp, silence(3.0))
    out = tmp_path / "out.wav"
    _server, _satellite, ha = await start_satellite(input=f"file:{wav}", output=f"file:{out}")

    # What Home Assistant reads when it adopts the device.
    assert ha.info.name == "kitchen-satellite"
    assert ha.info.mac_address == "02:00:00:00:00:11"
    flags = VoiceAssistantFeature(ha.info.voice_assistant_feature_flags)
    for feature in ("VOICE_ASSISTANT", "API_AUDIO", "ANNOUNCE", "TIMERS", "START_CONVERSATION"):
        assert getattr(VoiceAssistantFeature, feature) in flags
    assert {type(e) for e in ha.entities} == {MediaPlayerInfo, SwitchInfo}
    assert {w.id for w in ha.config.available_wake_words} == {"hey_jarvis", "okay_nabu"}
    await until(lambda: any(getattr(s, "key", None) == 2 for s in ha.states), "the switch state")

    # The wake word in the microphone's audio starts a run with its phrase...
    await asyncio.wait_for(ha.started.wait(), WAIT_S)
    _conversation_id, phrase = ha.starts[0]
    assert phrase is not None and phrase.lower() == "hey jarvis"
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_RUN_START)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_STT_START)
    # ... and the audio frames that follow, concatenated, are the command.
    want_bytes = int((len(lamp) / CAPTURE_RATE_HZ + 1.5) * CAPTURE_RATE_HZ * 2)
    await until(lambda: len(ha.audio) >= want_bytes, "the command's audio")
    heard = (await hub.transcribe(pcm_audio(ha.audio))).text
    assert close_enough(heard, LAMP_TEXT), heard
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_STT_VAD_END)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_STT_END, text=heard)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_INTENT_START)
    ha.event(
        VoiceAssistantEventType.VOICE_ASSISTANT_INTENT_END,
        conversation_id="conv-1",
        continue_conversation="1",
    )
    reply = await hub.synthesize_all(REPLY_TEXT, SynthesizeOptions(voice="joe"))
    url = media.add("reply.wav", reply)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_TTS_START, text=REPLY_TEXT)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_TTS_END, url=url)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_RUN_END)

    # The reply is fetched from the URL, played, and reported played.
    await asyncio.wait_for(ha.announce_done.wait(), WAIT_S)
    assert ha.finished == [True]
    assert media.requests == ["reply.wav"]
    spoken = await transcribe_file(hub, out)
    assert close_enough(spoken, REPLY_TEXT), spoken
    # Home Assistant continues the conversation: a new run without a wake word.
    await until(lambda: len(ha.starts) == 2, "the follow-up run")
    assert ha.starts[1] == ("conv-1", None)
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_RUN_END)


async def test_announcement_and_media_play(
    start_satellite: Callable[..., Any], media: MediaServer, hub: EngineHub, tmp_path: Path
) -> None:
    out = tmp_path / "out.wav"
    wav = write_wav(tmp_path / "in.wav", silence(1.0))
    _server, satellite, ha = await start_satellite(input=f"file:{wav}", output=f"file:{out}")
    chime = Audio(np.sin(np.arange(4410, dtype=np.float32) / 5.0) * 0.2, 22050)
    speech = await hub.synthesize_all("Dinner is ready.", SynthesizeOptions(voice="joe"))
    finished = await ha.cli.send_voice_assistant_announcement_await_response(
        media.add("dinner.mp3", speech, "mp3"),
        WAIT_S,
        text="Dinner is ready.",
        preannounce_media_id=media.add("chime.wav", chime),
    )
    assert finished.success
    assert media.requests == ["chime.wav", "dinner.mp3"]  # in order, never interleaved
    assert satellite.stats.announcements == 1
    assert close_enough(await transcribe_file(hub, out), "Dinner is ready.")

    # A missing URL: reported as not played, and the satellite goes on.
    failed = await ha.cli.send_voice_assistant_announcement_await_response(
        f"{media.base}/api/tts_proxy/missing.wav", WAIT_S
    )
    assert not failed.success

    # The media player entity plays a URL and reports its state.
    player = next(e for e in ha.entities if isinstance(e, MediaPlayerInfo))
    ha.cli.media_player_command(player.key, media_url=media.add("again.wav", speech))
    await until(lambda: satellite.stats.media_played == 1, "the media to play")
    ha.cli.media_player_command(player.key, volume=0.5)
    await until(
        lambda: any(getattr(s, "volume", None) == 0.5 for s in ha.states), "the volume state"
    )
    assert satellite.player.volume == 0.5


async def test_a_finished_timer_rings(start_satellite: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    wav = write_wav(tmp_path / "in.wav", silence(1.0))
    _server, satellite, ha = await start_satellite(
        input=f"file:{wav}", output=f"file:{out}", timer_ring_s=3.0
    )
    ha.cli.send_voice_assistant_timer_event(
        VoiceAssistantTimerEventType.VOICE_ASSISTANT_TIMER_STARTED, "t1", "tea", 60, 60, True
    )
    ha.cli.send_voice_assistant_timer_event(
        VoiceAssistantTimerEventType.VOICE_ASSISTANT_TIMER_FINISHED, "t1", "tea", 60, 0, False
    )
    await until(lambda: satellite.stats.timer_rings >= 1, "the timer to ring")
    await until(lambda: satellite._ringing is None, "the ringing to end (timer_ring_s)")
    rang_s = sf.info(str(out)).duration
    assert 1.0 <= rang_s <= 3.0 + 1.5  # bounded by timer_ring_s
    samples, _rate = sf.read(str(out), dtype="float32")
    assert float(np.abs(samples).max()) > 0.2  # a sound, not silence


async def test_choosing_a_wake_word_from_home_assistant_changes_what_triggers(
    start_satellite: Callable[..., Any], hey_jarvis: FloatAudio
) -> None:
    card = MockSoundCard(pace=PACE)
    _server, satellite, ha = await start_satellite(devices=card)
    await ha.cli.set_voice_assistant_configuration(["okay_nabu"])
    await until(lambda: satellite.wake_names == ["okay_nabu"], "the new wake word")
    config = await ha.cli.get_voice_assistant_configuration(WAIT_S)
    assert config.active_wake_words == ["okay_nabu"]

    # "Hey Jarvis" no longer triggers...
    heard_at = satellite.audio_s
    card.add_clip(np.concatenate([silence(0.3), hey_jarvis, silence(1.5)]))
    await until(lambda: satellite.audio_s > heard_at + 3.0, "the clip to be heard")
    assert not ha.starts and satellite.detections == 0

    # ... until Home Assistant chooses it again.
    await ha.cli.set_voice_assistant_configuration(["hey_jarvis"])
    await until(lambda: satellite.wake_names == ["hey_jarvis"], "the chosen wake word")
    card.add_clip(np.concatenate([silence(0.3), hey_jarvis, silence(1.5)]))
    await asyncio.wait_for(ha.started.wait(), WAIT_S)
    assert ha.starts[0][1] is not None and ha.starts[0][1].lower() == "hey jarvis"
    ha.event(VoiceAssistantEventType.VOICE_ASSISTANT_RUN_END)

    # The mute switch: no wake word triggers while muted.
    switch = next(e for e in ha.entities if isinstance(e, SwitchInfo))
    ha.cli.switch_command(switch.key, True)
    await until(lambda: satellite.muted, "the mute switch")
    starts = len(ha.starts)
    heard_at = satellite.audio_s
    card.add_clip(np.concatenate([silence(0.3), hey_jarvis, silence(1.5)]))
    await until(lambda: satellite.audio_s > heard_at + 3.0, "the clip to be heard")
    assert len(ha.starts) == starts


# ------------------------------------------------------------------ attacks


async def test_malformed_and_oversized_frames_close_only_that_connection(
    start_satellite: Callable[..., Any], tmp_path: Path
) -> None:
    wav = write_wav(tmp_path / "in.wav", silence(1.0))
    _server, satellite, ha = await start_satellite(
        input=f"file:{wav}", output="file:" + str(tmp_path / "o.wav")
    )
    attacks = [
        b"\x07garbage",  # bad preamble
        b"\x00\xff\xff\xff\xff\x7f\x01",  # a 34 GB frame
        b"\x00\x05\x07\xff\xff\xff\xff\xff",  # DeviceInfoRequest... with a malformed payload
        b"\x00" + b"\xff" * 20,  # varint that never ends
    ]
    for attack in attacks:
        reader, writer = await asyncio.open_connection("127.0.0.1", satellite.port)
        writer.write(attack)
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(), WAIT_S)
        except ConnectionError:
            data = b""
        assert data == b""  # closed by the server, nothing sent
        writer.close()
    # Home Assistant's connection was never disturbed.
    info = await ha.cli.device_info()
    assert info.name == "kitchen-satellite"


async def test_noise_encryption(start_satellite: Callable[..., Any], tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    wav = write_wav(tmp_path / "in.wav", silence(1.0))
    _server, satellite, ha = await start_satellite(
        input=f"file:{wav}", output="file:" + str(tmp_path / "o.wav"), noise_psk=key
    )
    assert ha.info.name == "kitchen-satellite"
    assert ha.config.available_wake_words
    # A client with another key, or none, is refused at the handshake.
    wrong = APIClient(
        "127.0.0.1", satellite.port, None, noise_psk=base64.b64encode(os.urandom(32)).decode()
    )
    with pytest.raises(APIConnectionError):
        await wrong.connect(login=True)
    plain = APIClient("127.0.0.1", satellite.port, None)
    with pytest.raises(APIConnectionError):
        await plain.connect(login=True)


async def test_without_home_assistant_a_wake_word_is_only_logged(
    start_satellite: Callable[..., Any],
    hey_jarvis: FloatAudio,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wav = write_wav(tmp_path / "in.wav", silence(0.3), hey_jarvis, silence(1.0))
    _server, satellite, _ha = await start_satellite(
        input=f"file:{wav}", output="file:" + str(tmp_path / "o.wav"), connect=False
    )
    await until(lambda: satellite.detections == 1, "the wake word")
    assert satellite.stats.runs == 0
    assert "Home Assistant is not connected" in caplog.text


async def test_connection_flood_is_bounded(
    start_satellite: Callable[..., Any], tmp_path: Path
) -> None:
    wav = write_wav(tmp_path / "in.wav", silence(1.0))
    _server, satellite, ha = await start_satellite(
        input=f"file:{wav}",
        output="file:" + str(tmp_path / "o.wav"),
        limits={"header_timeout_s": 1.0},
    )
    limit = satellite.api.max_connections
    idle = [await asyncio.open_connection("127.0.0.1", satellite.port) for _ in range(limit + 3)]
    try:
        # Connections past the limit are closed at once; Home Assistant's stays served.
        refused = 0
        for reader, _writer in idle[limit - 1 :]:
            with contextlib.suppress(TimeoutError, ConnectionError):
                if await asyncio.wait_for(reader.read(), 5.0) == b"":
                    refused += 1
        assert refused >= 3
        assert len(satellite.api.connections) <= limit
        assert (await ha.cli.device_info()).name == "kitchen-satellite"
        # Sockets that never say hello lose their slot after header_timeout_s.
        for reader, _writer in idle[: limit - 1]:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        late = HomeAssistantStandIn(satellite.port)
        await late.connect()
        assert late.info.name == "kitchen-satellite"
        await late.close()
    finally:
        for _reader, writer in idle:
            writer.close()
