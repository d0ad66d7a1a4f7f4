"""The local speaker: one ordered playback queue, never interleaved.

Everything that plays on the speaker (wake/done sounds, spoken replies, MQTT
``tts/say`` with ``play``, the HTTP API's play flag, Hermes ``playBytes``,
Home Assistant's TTS and announcements in satellite mode) goes through one
:class:`Player`: items play one after another, in the order submitted, each
to its end (or until :meth:`Player.stop_all`). At most ``max_queued`` items
wait; more are refused with :class:`~edgevoice.errors.BusyError`. Each item is
bounded by the limits of whatever produced it (text length, audio duration).

Threading: event-loop only. Synthesis runs in the hub's workers; device
writes in worker threads (see :mod:`.devices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import numpy as np

from edgevoice.audio import Audio, StreamResampler, decode
from edgevoice.audio_io.devices import AudioDeviceError, Speaker
from edgevoice.engines.base import FloatAudio, SynthesizeOptions
from edgevoice.errors import BusyError, ShuttingDownError
from edgevoice.fairness import client_scope

_LOGGER = logging.getLogger(__name__)

PIECE_S = 0.1
"""Audio goes to the speaker in pieces this long (a stop takes effect within one)."""

AudioChunks = AsyncGenerator[tuple[FloatAudio, int], None]
"""What an item plays: mono float32 chunks with their sample rate."""


class SpeakerUnavailableError(ShuttingDownError):
    """The local speaker's device is missing now (headless, unplugged): retry later."""


@dataclass(frozen=True, slots=True)
class PlaybackResult:
    played: bool
    """Played to its end."""
    duration_s: float = 0.0
    """Seconds of audio played."""
    error: str | None = None
    """Why it did not play (fully): stopped, device failure, bad audio."""


@dataclass(eq=False)
class _Item:
    label: str
    chunks: Callable[[], AudioChunks]
    done: asyncio.Future[PlaybackResult]
    played_s: float = 0.0
    stop_reason: str = "stopped"
    task: asyncio.Task[None] | None = field(default=None, repr=False)


async def _one_clip(audio: Audio) -> AudioChunks:
    yield audio.samples, audio.rate_hz


class Player:
    """One ordered playback queue for the local speaker (see the module docstring).

    The speaker is attached and detached by whoever owns the devices (it may
    be missing: headless, unplugged); while none is attached, submitting
    raises :class:`SpeakerUnavailableError` and queued items fail with that
    reason. ``on_activity(True/False)`` listeners hear when playback starts and
    stops (the voice loop pauses wake detection meanwhile).
    """

    def __init__(self, *, max_queued: int = 16, volume: float = 1.0) -> None:
        self.max_queued = max_queued
        self.volume = volume
        """Gain applied to everything played (0..1)."""
        self._speaker: Speaker | None = None
        self._unavailable = "no speaker is attached"
        self._queue: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._current: _Item | None = None
        self._task: asyncio.Task[None] | None = None
        self.on_activity: list[Callable[[bool], None]] = []
        self.on_device_error: Callable[[AudioDeviceError], None] | None = None
        """Called when the speaker fails mid-playback (the owner reopens it)."""

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audio-io-player")

    async def close(self) -> None:
        """Stop playback, fail what is queued, end the queue task."""
        self.stop_all("the speaker is shutting down")
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def attach(self, speaker: Speaker) -> None:
        self._speaker = speaker

    def detach(self, reason: str) -> None:
        """The speaker is gone: stop what plays and fail what is queued."""
        self._speaker = None
        self._unavailable = reason
        self.stop_all(reason)

    @property
    def speaker(self) -> Speaker | None:
        return self._speaker

    @property
    def available(self) -> bool:
        return self._speaker is not None

    @property
    def busy(self) -> bool:
        """Something plays or waits to play."""
        return self._current is not None or bool(self._queue)

    # ------------------------------------------------------------- submitting

    def submit(
        self, chunks: Callable[[], AudioChunks], label: str
    ) -> asyncio.Future[PlaybackResult]:
        """Queue an item; its future resolves when it played (or failed). Raises
        :class:`SpeakerUnavailableError` without a speaker, :class:`BusyError`
        when ``max_queued`` items wait already."""
        if self._speaker is None:
            raise SpeakerUnavailableError(f"no local speaker: {self._unavailable}")
        if len(self._queue) >= self.max_queued:
            raise BusyError(f"the local speaker has {len(self._queue)} items waiting; try later")
        item = _Item(label, chunks, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._ready.set()
        return item.done

    async def play(self, chunks: Callable[[], AudioChunks], label: str) -> PlaybackResult:
        """Queue an item and wait until it played."""
        return await self.submit(chunks, label)

    async def play_audio(self, audio: Audio, label: str) -> PlaybackResult:
        return await self.play(lambda: _one_clip(audio), label)

    def submit_audio(self, audio: Audio, label: str) -> asyncio.Future[PlaybackResult]:
        return self.submit(lambda: _one_clip(audio), label)

    async def play_bytes(self, data: bytes, label: str, *, max_audio_s: float) -> PlaybackResult:
        """Decode an audio file (any format :func:`~edgevoice.audio.decode` reads,
        at most ``max_audio_s``) and play it. Raises the decoder's errors."""
        if self._speaker is None:
            raise SpeakerUnavailableError(f"no local speaker: {self._unavailable}")
        audio = await asyncio.to_thread(decode, data, max_duration_s=max_audio_s)
        return await self.play_audio(audio, label)

    def submit_speech(
        self, hub: object, text: str, options: SynthesizeOptions | None, label: str
    ) -> asyncio.Future[PlaybackResult]:
        """Queue ``text`` spoken by the speak pipeline (synthesized while it plays).

        The voice and the text's length are checked now (the pipeline's errors
        are raised here); synthesis starts when the item's turn comes.
        """
        from edgevoice.hub import EngineHub
        from edgevoice.pipeline.speak import speak

        assert isinstance(hub, EngineHub)
        speech = speak(hub, text, options)

        async def chunks() -> AudioChunks:
            async with speech:
                async for audio in speech:
                    yield audio.samples, audio.rate_hz

        # Nothing runs before the item's turn (the speech task starts on iteration).
        return self.submit(chunks, label)

    async def play_speech(
        self, hub: object, text: str, options: SynthesizeOptions | None, label: str
    ) -> PlaybackResult:
        return await self.submit_speech(hub, text, options, label)

    def stop_all(self, reason: str = "stopped") -> None:
        """Stop what plays now and drop everything queued (their results say ``reason``)."""
        queued, self._queue = list(self._queue), deque()
        for item in queued:
            if not item.done.done():
                item.done.set_result(PlaybackResult(False, 0.0, reason))
        current = self._current
        if current is not None and current.task is not None and not current.task.done():
            current.stop_reason = reason
            current.task.cancel(reason)

    # ------------------------------------------------------------- the queue

    async def _run(self) -> None:
        with client_scope("audio_io", "speaker"):
            while True:
                while not self._queue:
                    self._ready.clear()
                    await self._ready.wait()
                item = self._queue.popleft()
                self._current = item
                self._notify(True)
                item.task = asyncio.create_task(self._play(item), name=f"play-{item.label}")
                try:
                    await asyncio.shield(item.task)
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if me is not None and me.cancelling():  # the queue itself is closing
                        item.task.cancel()
                        await asyncio.gather(item.task, return_exceptions=True)
                        self._finish(item, PlaybackResult(False, item.played_s, "shutting down"))
                        raise
                    # Only this item was stopped (stop_all): the queue goes on.
                    self._finish(item, PlaybackResult(False, item.played_s, item.stop_reason))
                except AudioDeviceError as exc:
                    _LOGGER.warning("Speaker failed while playing %s: %s", item.label, exc)
                    self._finish(item, PlaybackResult(False, item.played_s, str(exc)))
                    if self.on_device_error is not None:
                        self.on_device_error(exc)
                except Exception as exc:
                    _LOGGER.info("Could not play %s: %s", item.label, exc)
                    self._finish(item, PlaybackResult(False, item.played_s, str(exc)))
                else:
                    self._finish(item, PlaybackResult(True, item.played_s))
                finally:
                    self._current = None
                    self._notify(False)

    @staticmethod
    def _finish(item: _Item, result: PlaybackResult) -> None:
        if not item.done.done():
            item.done.set_result(result)

    def _notify(self, active: bool) -> None:
        for listener in list(self.on_activity):
            try:
                listener(active)
            except Exception:
                _LOGGER.exception("Player activity listener failed")

    async def _play(self, item: _Item) -> None:
        speaker = self._speaker
        if speaker is None:
            raise SpeakerUnavailableError(f"no local speaker: {self._unavailable}")
        resampler: StreamResampler | None = None
        piece = max(1, round(PIECE_S * speaker.rate_hz))
        async with contextlib.aclosing(item.chunks()) as chunks:
            async for samples, rate_hz in chunks:
                if resampler is None or resampler.from_hz != rate_hz:
                    if resampler is not None:
                        await self._write(speaker, resampler.flush(), piece, item)
                    resampler = StreamResampler(rate_hz, speaker.rate_hz)
                await self._write(speaker, resampler.process(samples), piece, item)
        if resampler is not None:
            await self._write(speaker, resampler.flush(), piece, item)
        await speaker.drain()

    async def _write(self, speaker: Speaker, samples: FloatAudio, piece: int, item: _Item) -> None:
        if self.volume != 1.0:
            samples = (samples * np.float32(self.volume)).astype(np.float32)
        for start in range(0, len(samples), piece):
            part = samples[start : start + piece]
            await speaker.write(part)
            item.played_s += len(part) / speaker.rate_hz
