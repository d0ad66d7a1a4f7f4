"""The audio_io face: sound devices, the player, and the loop of the configured mode.

:class:`AudioIoServer` is what the daemon starts for ``[audio_io] enabled``.
It owns the local speaker's :class:`~edgevoice.audio_io.player.Player`
(registered for the other faces' play hooks), the voice loop
(:class:`~edgevoice.audio_io.loop.StandaloneLoop`, or the ESPHome satellite
in ``mode = "esphome"``) and one task that opens the sound devices and runs
the loop on them.

Headless and faulty hardware: when the devices cannot be opened (no sound
card, no PortAudio library) or fail mid-run (unplugged), that task logs one
clear line and tries again with exponential backoff (``retry_min_s`` →
``retry_max_s``), while every other face keeps serving. Only with
``required = true`` does :meth:`AudioIoServer.start` fail when the first
attempt fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from typing import TYPE_CHECKING

import aiohttp

from edgevoice.audio import Audio
from edgevoice.audio_io import peers
from edgevoice.audio_io.actions import Actions
from edgevoice.audio_io.devices import (
    CAPTURE_RATE_HZ,
    AudioDeviceError,
    DeviceFactory,
    Microphone,
    Speaker,
    SystemDevices,
)
from edgevoice.audio_io.loop import StandaloneLoop, WakeLoop
from edgevoice.audio_io.player import Player
from edgevoice.audio_io.sounds import load_sound
from edgevoice.config import ConfigError, Settings
from edgevoice.engines.base import EngineKind
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import ProtocolServer

if TYPE_CHECKING:
    from edgevoice.audio_io.esphome.satellite import EsphomeSatellite

_LOGGER = logging.getLogger(__name__)

STABLE_RUN_S = 30.0
"""A device run this long resets the retry backoff."""


class AudioIoServer(ProtocolServer):
    """The local microphone/speaker face (see the module docstring).

    ``devices`` opens the sound devices; the default (:class:`SystemDevices`)
    serves PortAudio and ``file:`` devices. Tests pass a
    :class:`~edgevoice.audio_io.devices.MockSoundCard`.
    """

    name = "audio_io"

    def __init__(
        self, settings: Settings, hub: EngineHub, *, devices: DeviceFactory | None = None
    ) -> None:
        self.settings = settings
        self.config = settings.audio_io
        self.hub = hub
        self.devices: DeviceFactory = devices or SystemDevices(self.config.file_pace)
        self.player = Player(max_queued=self.config.max_queued_playback, volume=self.config.volume)
        self.loop: WakeLoop | None = None
        self.satellite: EsphomeSatellite | None = None
        """The ESPHome satellite (``mode = "esphome"``)."""
        self.actions: Actions | None = None
        self.sounds: dict[str, Audio | None] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._mic: Microphone | None = None
        self._speaker: Speaker | None = None
        self.device_error: str | None = None
        """Why the devices are not running now (``None`` while they run)."""
        self.running = asyncio.Event()
        """Set while the devices are open and the loop runs."""
        self.attempts = 0
        """Attempts to open the devices (tests check the backoff)."""
        self._device_failed = asyncio.Event()

    # --------------------------------------------------------------- lifecycle

    def _check(self) -> None:
        config = self.config
        hub = self.hub
        if not hub.models(EngineKind.WAKE):
            raise ConfigError("audio_io needs at least one [[wake]] model")
        for name in config.wake_words:
            hub.wake(name)  # UnknownModelError names the configured ones
        if config.mode == "standalone":
            if not hub.models(EngineKind.VAD):
                raise ConfigError("audio_io (standalone) needs a [[vad]] model for end of speech")
            hub.vad(config.vad_model)
            hub.asr(config.asr_model)

    async def start(self) -> None:
        self._check()
        config = self.config
        max_s = self.settings.limits.max_audio_s
        self.sounds = {
            "awake": await load_sound(config.awake_sound, max_s),
            "done": await load_sound(config.done_sound, max_s),
            "timer": await load_sound(config.timer_sound, max_s),
        }
        self._session = aiohttp.ClientSession()
        await self.player.start()
        self.player.on_device_error = self._on_speaker_error
        try:
            if config.mode == "esphome":
                # aioesphomeapi takes seconds to import on a small machine: not on the loop.
                await asyncio.to_thread(
                    importlib.import_module, "edgevoice.audio_io.esphome.satellite"
                )
                from edgevoice.audio_io.esphome.satellite import EsphomeSatellite

                self.satellite = EsphomeSatellite(
                    self.settings, self.hub, self.player, self._session, self.sounds
                )
                await self.satellite.start()
                self.loop = self.satellite
            else:
                self.actions = Actions(self.settings, self.hub, self._session)
                self.loop = StandaloneLoop(config, self.hub, self.player, self.actions, self.sounds)
            if config.required:
                self.attempts += 1
                await self._open()  # fails the daemon's start when audio is required
        except BaseException:
            await self._close_parts()
            raise
        peers.register(self.hub, "speaker", self.player)
        self._task = asyncio.create_task(self._run(), name="audio-io-devices")

    async def stop(self, timeout_s: float) -> None:
        peers.unregister(self.hub, "speaker", self.player)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._close_parts()

    async def _close_parts(self) -> None:
        if isinstance(self.loop, StandaloneLoop):
            await self.loop.aclose()
        if self.satellite is not None:
            await self.satellite.stop()
        await self.player.close()
        await self._close_devices()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def addresses(self) -> list[str]:
        config = self.config
        where = [f"audio://{config.mode} (input {config.input!r}, output {config.output!r})"]
        if self.satellite is not None:
            where.extend(self.satellite.addresses)
        return where

    # ------------------------------------------------------------------ devices

    async def _open(self) -> None:
        config = self.config
        block = max(1, round(config.block_ms * CAPTURE_RATE_HZ / 1000))
        queue_blocks = max(2, round(config.input_queue_s * 1000 / config.block_ms))
        try:
            self._speaker = await self.devices.open_output(config.output)
            self._mic = await self.devices.open_input(
                config.input, block_samples=block, queue_blocks=queue_blocks
            )
        except BaseException:
            await self._close_devices()
            raise
        self.player.attach(self._speaker)
        self.device_error = None

    async def _close_devices(self) -> None:
        mic, self._mic = self._mic, None
        speaker, self._speaker = self._speaker, None
        for device in (mic, speaker):
            if device is not None:
                try:
                    await device.close()
                except Exception as exc:
                    _LOGGER.debug("Closing %s: %s", device.name, exc)

    def _on_speaker_error(self, exc: AudioDeviceError) -> None:
        self._device_failed.set()

    async def _run(self) -> None:
        """Open the devices and run the loop; on failure log, back off, retry."""
        config = self.config
        delay = config.retry_min_s
        while True:
            started = time.monotonic()
            try:
                if self._mic is None:
                    self.attempts += 1
                    await self._open()
                assert self._mic is not None and self.loop is not None
                _LOGGER.info(
                    "Voice loop (%s) running: microphone %s, speaker %s",
                    config.mode,
                    self._mic.name,
                    self._speaker.name if self._speaker is not None else "-",
                )
                self.running.set()
                await self._run_loop(self._mic)
            except AudioDeviceError as exc:
                self.device_error = str(exc)
                if time.monotonic() - started >= STABLE_RUN_S:
                    delay = config.retry_min_s
                _LOGGER.warning(
                    "Audio devices unavailable: %s; retrying in %.0f s "
                    "(the other protocols keep serving)",
                    exc,
                    delay,
                )
            finally:
                self.running.clear()
                self.player.detach(self.device_error or "the sound devices are closed")
                await self._close_devices()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(config.retry_max_s, config.retry_min_s))

    async def _run_loop(self, mic: Microphone) -> None:
        """The loop until it fails, or until the speaker failed."""
        assert self.loop is not None
        self._device_failed.clear()
        loop_task = asyncio.create_task(self.loop.run(mic), name="audio-io-loop")
        failed = asyncio.create_task(self._device_failed.wait(), name="audio-io-speaker-failed")
        try:
            await asyncio.wait({loop_task, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (loop_task, failed):
                task.cancel()
            results = await asyncio.gather(loop_task, failed, return_exceptions=True)
        for result in results:
            if isinstance(result, AudioDeviceError):
                raise result
        if failed.done() and not failed.cancelled():
            raise AudioDeviceError("the speaker failed")
        with contextlib.suppress(IndexError):
            error = results[0]
            if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
                raise error
