"""The voice side of the Home Assistant satellite (``[audio_io] mode = "esphome"``).

The message flow, as Home Assistant's ESPHome integration drives a Voice PE
(and as linux-voice-assistant implements it):

1. Home Assistant connects, reads the device info (feature flags: voice
   assistant, API audio, announce, start conversation, timers), lists the
   entities and subscribes to the voice assistant
   (``SubscribeVoiceAssistantRequest``); it asks which wake words exist
   (``VoiceAssistantConfigurationRequest``) and may choose others
   (``VoiceAssistantSetConfiguration``; shown as a select in Home Assistant).
2. A wake word detected here → awake sound → ``VoiceAssistantRequest(start,
   wake_word_phrase)`` and the microphone's audio as ``VoiceAssistantAudio``
   (16 kHz s16le mono) until Home Assistant's VAD says the speech ended
   (``STT_VAD_END``/``STT_END``), the run ends, or
   ``no_speech_timeout_s + max_utterance_s`` of audio were sent (then
   ``VoiceAssistantAudio(end)``).
3. Home Assistant's run events: ``INTENT_END`` (``conversation_id``,
   ``continue_conversation``), ``TTS_END`` (the reply's URL, or earlier on
   ``INTENT_PROGRESS tts_start_streaming``): the URL is fetched (bounded by
   ``[limits] max_upload_bytes``/``max_audio_s``) and played; then
   ``VoiceAssistantAnnounceFinished``. When the conversation continues, a new
   run starts without a wake word once the speaker is quiet.
4. ``VoiceAssistantAnnounceRequest``: the pre-announcement and the media are
   played, then ``VoiceAssistantAnnounceFinished``; with
   ``start_conversation`` a run follows without a wake word.
5. Timers: when one finishes, ``timer_sound`` rings (at most ``timer_ring_s``;
   a wake word or the mute switch stops it).
6. The media player entity plays URLs (same ordered queue), stops, sets the
   volume; the mute switch stops listening.

Event-loop only: the connection readers call the ``handle_*`` methods; the
microphone task calls :meth:`on_block`/:meth:`on_wake`; playback runs in
tasks this object owns.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from edgevoice.audio import Audio, decode, float_to_pcm16
from edgevoice.audio_io.actions import read_at_most
from edgevoice.audio_io.esphome.framing import decode_key
from edgevoice.audio_io.esphome.messages import pb
from edgevoice.audio_io.esphome.server import (
    MEDIA_PLAYER_KEY,
    MUTE_SWITCH_KEY,
    ApiConnection,
    EsphomeApiServer,
)
from edgevoice.audio_io.esphome.zeroconf import EsphomeAdvertiser
from edgevoice.audio_io.loop import WakeLoop
from edgevoice.audio_io.player import PlaybackResult, Player
from edgevoice.config import Settings
from edgevoice.engines.base import EngineKind, FloatAudio
from edgevoice.errors import EdgeVoiceError
from edgevoice.hub import EngineHub

_LOGGER = logging.getLogger(__name__)

# aioesphomeapi.model's enums, as plain ints (the wire values).
FEATURE_VOICE_ASSISTANT = 1 << 0
FEATURE_API_AUDIO = 1 << 2
FEATURE_TIMERS = 1 << 3
FEATURE_ANNOUNCE = 1 << 4
FEATURE_START_CONVERSATION = 1 << 5
SUBSCRIBE_API_AUDIO = 1 << 2

EVENT_ERROR = 0
EVENT_RUN_START = 1
EVENT_RUN_END = 2
EVENT_STT_END = 4
EVENT_INTENT_END = 6
EVENT_TTS_END = 8
EVENT_STT_VAD_END = 12
EVENT_INTENT_PROGRESS = 100

TIMER_FINISHED = 3
TIMER_CANCELLED = 2

MEDIA_IDLE = 1
MEDIA_PLAYING = 2
MEDIA_ANNOUNCING = 4
MEDIA_COMMAND_STOP = 2
MEDIA_COMMAND_MUTE = 3
MEDIA_COMMAND_UNMUTE = 4

URL_TIMEOUT_S = 60.0
"""Fetching one media URL (Home Assistant's TTS can take a while to render)."""


def default_device_name(node_id: str) -> str:
    """``edgevoice-<node_id>`` in ESPHome's name alphabet (``[a-z0-9-]``, ≤ 31)."""
    cleaned = "".join(c if c.isalnum() else "-" for c in node_id.lower()).strip("-")
    return f"edgevoice-{cleaned or 'satellite'}"[:31].rstrip("-")


def default_mac() -> str:
    """This host's MAC (what Home Assistant keys the device by)."""
    node = uuid.getnode()
    return ":".join(f"{(node >> shift) & 0xFF:02x}" for shift in range(40, -8, -8))


@dataclass(eq=False)
class _Run:
    """One pipeline run in Home Assistant, from the start request to the reply."""

    wake_word: str | None
    phrase: str
    conversation_id: str = ""
    streaming: bool = False
    stream_until_s: float = 0.0
    tts_url: str | None = None
    tts_started: bool = False
    continue_conversation: bool = False


@dataclass(eq=False)
class _PendingStart:
    run: _Run
    sound: asyncio.Future[PlaybackResult] | None
    until_s: float


@dataclass
class SatelliteStats:
    """Counters for logs and tests."""

    runs: int = 0
    audio_frames: int = 0
    replies_played: int = 0
    announcements: int = 0
    timer_rings: int = 0
    media_played: int = 0
    wake_words: list[str] = field(default_factory=list)


class EsphomeSatellite(WakeLoop):
    """A Home Assistant Assist satellite over the ESPHome API (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        hub: EngineHub,
        player: Player,
        session: aiohttp.ClientSession,
        sounds: dict[str, Audio | None],
    ) -> None:
        config = settings.audio_io
        super().__init__(config, hub, player)
        self.settings = settings
        self.sounds = sounds
        self._http = session
        node_id = settings.mqtt.node_id
        self.device_name = config.esphome_name or default_device_name(node_id)
        self.friendly_name = config.esphome_friendly_name or f"edgevoice {node_id}"
        self.mac = (config.esphome_mac or default_mac()).lower()
        key = config.esphome_encryption_key
        psk = decode_key(key.get_secret_value()) if key is not None else None
        self.feature_flags = (
            FEATURE_VOICE_ASSISTANT
            | FEATURE_API_AUDIO
            | FEATURE_ANNOUNCE
            | FEATURE_START_CONVERSATION
            | FEATURE_TIMERS
        )
        limits = settings.limits
        self.api = EsphomeApiServer(
            self,
            host=config.esphome_host,
            port=config.esphome_port,
            name=self.device_name,
            friendly_name=self.friendly_name,
            mac=self.mac,
            psk=psk,
            max_connections=min(limits.max_connections, 16),
            idle_timeout_s=limits.idle_timeout_s,
            hello_timeout_s=limits.header_timeout_s,
        )
        self._advertiser = (
            EsphomeAdvertiser(self.device_name, self.mac, encrypted=psk is not None)
            if config.zeroconf
            else None
        )
        self.voice_client: ApiConnection | None = None
        self.stats = SatelliteStats()
        self._run: _Run | None = None
        self._pending: _PendingStart | None = None
        self._ringing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._media_state = MEDIA_IDLE
        self._volume_before_mute: float | None = None
        self._warned_offline = False

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.api.start()
        _LOGGER.info(
            "ESPHome API for Home Assistant on %s (device %s, %s)",
            self.api.address,
            self.device_name,
            "encrypted" if self.api.psk is not None else "plaintext",
        )
        if self._advertiser is not None:
            await self._advertiser.start(self.config.esphome_host, self.api.bound_port)

    async def stop(self) -> None:
        if self._advertiser is not None:
            await self._advertiser.stop()
        await self.api.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.detach()

    @property
    def addresses(self) -> list[str]:
        return [f"{self.api.address} (ESPHome API)"]

    @property
    def port(self) -> int:
        return self.api.bound_port

    # ------------------------------------------------------------- microphone

    def wake_live(self) -> bool:
        if self._ringing is not None:
            return not self.muted  # a wake word stops the alarm, which is playing
        return super().wake_live()

    async def on_wake(self, wake_word: str) -> None:
        if self._ringing is not None:
            _LOGGER.info("Wake word %s stops the timer", wake_word)
            self._stop_ringing()
            return
        if self._run is not None:
            _LOGGER.debug("Wake word %s ignored: a run is in progress", wake_word)
            return
        if self.voice_client is None or self.voice_client.closed:
            if not self._warned_offline:
                self._warned_offline = True
                _LOGGER.warning(
                    "Wake word %s heard, but Home Assistant is not connected", wake_word
                )
            return
        self.stats.wake_words.append(wake_word)
        run = _Run(wake_word=wake_word, phrase=self._phrase(wake_word))
        self._start_run(run, self.sounds.get("awake"))

    def _start_run(self, run: _Run, sound: Audio | None) -> None:
        """Begin ``run``: streaming starts after ``sound`` (and the echo guard)."""
        self._run = run
        self.stats.runs += 1
        future = None
        if sound is not None:
            try:
                future = self.player.submit_audio(sound, "awake sound")
            except EdgeVoiceError as exc:
                _LOGGER.debug("No awake sound: %s", exc)
        until_s = self.audio_s
        if future is not None and sound is not None:
            until_s += sound.duration_s + self.config.echo_guard_s
        self._pending = _PendingStart(run, future, until_s)

    def _phrase(self, wake_word: str) -> str:
        for model in self.hub.models(EngineKind.WAKE):
            if model.name == wake_word:
                words = model.engine.capabilities.wake_words
                return str(words[0].phrase) if words else wake_word
        return wake_word

    async def on_block(self, block: FloatAudio) -> bool:
        pending = self._pending
        if pending is not None:
            if self.muted or self._run is not pending.run:
                self._pending = None
                return False
            if (
                self.audio_s < pending.until_s
                or (pending.sound is not None and not pending.sound.done())
                or not self.speaker_quiet()
            ):
                return True  # the awake sound plays: not the command
            self._pending = None
            self._begin_streaming(pending.run)
        run = self._run
        if run is None or not run.streaming:
            return False
        client = self.voice_client
        if client is None or client.closed:
            self._end_run(run)
            return True
        client.send(pb.VoiceAssistantAudio(data=float_to_pcm16(block)))
        self.stats.audio_frames += 1
        if self.audio_s >= run.stream_until_s:
            _LOGGER.info(
                "Stopped streaming: %.0f s of audio sent", self.audio_s - run.stream_until_s
            )
            client.send(pb.VoiceAssistantAudio(end=True))
            run.streaming = False
        return True

    def _begin_streaming(self, run: _Run) -> None:
        client = self.voice_client
        if client is None or client.closed:
            self._end_run(run)
            return
        client.send(
            pb.VoiceAssistantRequest(
                start=True,
                wake_word_phrase=run.phrase if run.wake_word else "",
                conversation_id=run.conversation_id,
            )
        )
        config = self.config
        run.streaming = True
        run.stream_until_s = self.audio_s + config.no_speech_timeout_s + config.max_utterance_s
        _LOGGER.info("Streaming the command to Home Assistant (%s)", run.wake_word or "follow-up")

    def _end_run(self, run: _Run) -> None:
        run.streaming = False
        if self._run is run:
            self._run = None
        if self._pending is not None and self._pending.run is run:
            self._pending = None

    async def on_stopped(self) -> None:
        run = self._run
        if run is not None and run.streaming:
            run.streaming = False
            client = self.voice_client
            if client is not None:
                client.send(pb.VoiceAssistantAudio(end=True))
        self._pending = None

    # ---------------------------------------------------------- connections

    def connection_lost(self, connection: ApiConnection) -> None:
        if self.voice_client is connection:
            self.voice_client = None
            _LOGGER.info("Home Assistant's voice connection closed")
            if self._run is not None:
                self._end_run(self._run)

    def handle_voice_message(self, connection: ApiConnection, message: Any) -> None:
        if isinstance(message, pb.SubscribeVoiceAssistantRequest):
            if message.subscribe:
                if not message.flags & SUBSCRIBE_API_AUDIO:
                    _LOGGER.warning(
                        "Home Assistant asked for UDP audio; this satellite streams over the API"
                    )
                self.voice_client = connection
                self._warned_offline = False
                _LOGGER.info(
                    "Home Assistant (%s) subscribed to the voice assistant", connection.peer
                )
            elif self.voice_client is connection:
                self.voice_client = None
        elif isinstance(message, pb.VoiceAssistantResponse):
            if message.error and self._run is not None:
                _LOGGER.warning("Home Assistant could not start a pipeline run")
                self._end_run(self._run)
        elif isinstance(message, pb.VoiceAssistantEventResponse):
            data = {item.name: item.value for item in message.data}
            self._on_event(int(message.event_type), data)
        elif isinstance(message, pb.VoiceAssistantAnnounceRequest):
            self._spawn(self._announce(connection, message))
        elif isinstance(message, pb.VoiceAssistantTimerEventResponse):
            self._on_timer(message)
        elif isinstance(message, pb.VoiceAssistantConfigurationRequest):
            connection.send(self._configuration())
        elif isinstance(message, pb.VoiceAssistantSetConfiguration):
            self._set_configuration(list(message.active_wake_words))
        else:
            _LOGGER.debug("ESPHome API: %s ignored", type(message).__name__)

    # ------------------------------------------------------------ run events

    def _on_event(self, event_type: int, data: dict[str, str]) -> None:
        run = self._run
        _LOGGER.debug("Home Assistant event %d %s", event_type, data)
        if run is None:
            return
        if event_type == EVENT_RUN_START:
            run.tts_url = data.get("url") or None
        elif event_type in (EVENT_STT_VAD_END, EVENT_STT_END):
            run.streaming = False
            if event_type == EVENT_STT_END:
                _LOGGER.info("Home Assistant heard %r", data.get("text", ""))
        elif event_type == EVENT_INTENT_PROGRESS:
            if data.get("tts_start_streaming") == "1" and run.tts_url:
                self._play_reply(run, run.tts_url)
        elif event_type == EVENT_INTENT_END:
            run.conversation_id = data.get("conversation_id", run.conversation_id)
            run.continue_conversation = data.get("continue_conversation") == "1"
        elif event_type == EVENT_TTS_END:
            url = data.get("url") or run.tts_url
            if url:
                self._play_reply(run, url)
        elif event_type == EVENT_ERROR:
            run.streaming = False
            _LOGGER.warning(
                "Home Assistant's pipeline failed: %s %s", data.get("code"), data.get("message")
            )
        elif event_type == EVENT_RUN_END:
            run.streaming = False
            if not run.tts_started:
                self._finish_run(run)

    def _play_reply(self, run: _Run, url: str) -> None:
        if run.tts_started:
            return
        run.tts_started = True
        self._spawn(self._reply(run, url))

    async def _reply(self, run: _Run, url: str) -> None:
        result = await self.play_url(url, "Home Assistant's reply")
        if result.played:
            self.stats.replies_played += 1
        client = self.voice_client
        if client is not None:
            client.send(pb.VoiceAssistantAnnounceFinished(success=result.played))
        self._finish_run(run)

    def _finish_run(self, run: _Run) -> None:
        if self._run is not run:
            return
        self._end_run(run)
        if run.continue_conversation and not self.muted and self.voice_client is not None:
            _LOGGER.info("The conversation continues: listening without a wake word")
            follow_up = _Run(wake_word=None, phrase="", conversation_id=run.conversation_id)
            self._start_run(follow_up, None)

    # ---------------------------------------------------------- announcements

    async def _announce(self, connection: ApiConnection, message: Any) -> None:
        urls = [u for u in (message.preannounce_media_id, message.media_id) if u]
        played = True
        for url in urls:
            result = await self.play_url(url, "announcement")
            played = played and result.played
        if played:
            self.stats.announcements += 1
        connection.send(pb.VoiceAssistantAnnounceFinished(success=played))
        if message.start_conversation and played and self._run is None and not self.muted:
            self._start_run(_Run(wake_word=None, phrase=""), None)

    async def play_url(self, url: str, label: str) -> PlaybackResult:
        """Fetch ``url`` (bounded), decode it and play it; never raises."""
        limits = self.settings.limits
        try:
            async with self._http.get(
                url, timeout=aiohttp.ClientTimeout(total=URL_TIMEOUT_S)
            ) as response:
                if response.status >= 400:
                    raise ValueError(f"HTTP {response.status}")
                try:
                    data = await read_at_most(response.content, limits.max_upload_bytes)
                except ValueError:
                    raise ValueError(
                        f"larger than {limits.max_upload_bytes} bytes (limits.max_upload_bytes)"
                    ) from None
            audio = await asyncio.to_thread(decode, data, max_duration_s=limits.max_audio_s)
            return await self.player.play_audio(audio, label)
        except (aiohttp.ClientError, TimeoutError, ValueError, EdgeVoiceError) as exc:
            _LOGGER.warning("Cannot play %s from %s: %s", label, url, exc)
            return PlaybackResult(False, 0.0, str(exc))

    # ------------------------------------------------------------------ timers

    def _on_timer(self, message: Any) -> None:
        event = int(message.event_type)
        if event == TIMER_FINISHED and self._ringing is None:
            _LOGGER.info("Timer %r finished", message.name or message.timer_id)
            self._ringing = asyncio.create_task(self._ring(), name="audio-io-timer")
            self._tasks.add(self._ringing)
            self._ringing.add_done_callback(self._tasks.discard)
        elif event == TIMER_CANCELLED and self._ringing is not None:
            self._stop_ringing()

    async def _ring(self) -> None:
        sound = self.sounds.get("timer")
        try:
            if sound is None:
                return
            # Bounded in audio played (a file speaker plays in no time).
            rings = max(1, math.ceil(self.config.timer_ring_s / max(sound.duration_s, 0.1)))
            for _ in range(rings):
                result = await self.player.play_audio(sound, "timer finished")
                if not result.played:
                    break
                self.stats.timer_rings += 1
        finally:
            self._ringing = None

    def _stop_ringing(self) -> None:
        ringing, self._ringing = self._ringing, None
        if ringing is not None:
            ringing.cancel()
            self.player.stop_all("the timer was stopped")

    # ------------------------------------------------------- wake word choice

    def _configuration(self) -> Any:
        models = self.hub.models(EngineKind.WAKE)
        available = []
        for model in models:
            words = model.engine.capabilities.wake_words
            phrase = str(words[0].phrase) if words else model.name
            languages = list(words[0].languages) if words else ["en"]
            available.append(
                pb.VoiceAssistantWakeWord(
                    id=model.name, wake_word=phrase, trained_languages=languages
                )
            )
        active = self.wake_names if self.wake_names is not None else [m.name for m in models]
        return pb.VoiceAssistantConfigurationResponse(
            available_wake_words=available,
            active_wake_words=active,
            max_active_wake_words=max(1, len(models)),
        )

    def _set_configuration(self, names: list[str]) -> None:
        known = {model.name for model in self.hub.models(EngineKind.WAKE)}
        chosen = [name for name in dict.fromkeys(names) if name in known]
        unknown = [name for name in names if name not in known]
        if unknown:
            _LOGGER.warning("Home Assistant chose wake words this satellite lacks: %s", unknown)
        _LOGGER.info("Wake words set by Home Assistant: %s", ", ".join(chosen) or "none")
        self.set_wake_words(chosen)

    # --------------------------------------------------------------- entities

    def media_player_state(self) -> Any:
        return pb.MediaPlayerStateResponse(
            key=MEDIA_PLAYER_KEY,
            state=self._media_state,
            volume=self.player.volume,
            muted=self._volume_before_mute is not None,
        )

    def _set_media_state(self, state: int) -> None:
        self._media_state = state
        self.api.broadcast_states(self.media_player_state())

    def handle_entity_command(self, connection: ApiConnection, message: Any) -> None:
        if isinstance(message, pb.SwitchCommandRequest):
            if message.key == MUTE_SWITCH_KEY:
                self.set_muted(bool(message.state))
            return
        if message.key != MEDIA_PLAYER_KEY:
            return
        if message.has_media_url:
            announcement = bool(message.has_announcement and message.announcement)
            self._spawn(self._play_media(message.media_url, announcement))
        elif message.has_command:
            command = int(message.command)
            if command == MEDIA_COMMAND_STOP:
                self.player.stop_all("stopped by Home Assistant")
                self._set_media_state(MEDIA_IDLE)
            elif command == MEDIA_COMMAND_MUTE and self._volume_before_mute is None:
                self._volume_before_mute = self.player.volume
                self.player.volume = 0.0
            elif command == MEDIA_COMMAND_UNMUTE and self._volume_before_mute is not None:
                self.player.volume, self._volume_before_mute = self._volume_before_mute, None
            self.api.broadcast_states(self.media_player_state())
        elif message.has_volume:
            volume = min(1.0, max(0.0, float(message.volume)))
            if self._volume_before_mute is not None:
                self._volume_before_mute = volume
            else:
                self.player.volume = volume
            self.api.broadcast_states(self.media_player_state())

    async def _play_media(self, url: str, announcement: bool) -> None:
        self._set_media_state(MEDIA_ANNOUNCING if announcement else MEDIA_PLAYING)
        try:
            result = await self.play_url(url, "announcement" if announcement else "media")
            if result.played:
                self.stats.media_played += 1
        finally:
            self._set_media_state(MEDIA_IDLE)

    def set_muted(self, muted: bool) -> None:
        """The mute switch: no wake word, no listening (and the alarm stops)."""
        self.muted = muted
        _LOGGER.info("Microphone %s", "muted" if muted else "unmuted")
        if muted:
            self._stop_ringing()
            run = self._run
            if run is not None:
                if run.streaming and self.voice_client is not None:
                    self.voice_client.send(pb.VoiceAssistantRequest(start=False))
                self._end_run(run)
        self.api.broadcast_states(pb.SwitchStateResponse(key=MUTE_SWITCH_KEY, state=muted))

    # ----------------------------------------------------------------- tasks

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name="audio-io-esphome")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _LOGGER.error("Satellite task failed: %r", exc, exc_info=exc)
