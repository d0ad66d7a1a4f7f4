"""Sound devices: PortAudio (sounddevice), ``file:`` devices, and a mock sound card for tests.

A :class:`Microphone` yields mono float32 blocks at :data:`CAPTURE_RATE_HZ`; a
:class:`Speaker` takes mono float32 at its own :attr:`~Speaker.rate_hz` (the
player resamples to it) and returns from :meth:`~Speaker.write` once the audio
is accepted at playback pace.

- **PortAudio** (``default``, a device index, or a substring of its name):
  capture runs in PortAudio's callback thread, which only copies each block
  into a bounded queue (a full queue drops the block and counts an overflow,
  never blocking); playback writes in a worker thread. A device that fails or
  disappears raises :class:`AudioDeviceError` from ``read``/``write``.
- **file:** ``file:PATH`` as the microphone plays a WAV file at real-time pace
  (times ``pace``), then silence; it never drops audio: a reader that falls
  behind gets the next blocks at once until it has caught up, so a slow CPU
  stretches the timeline instead of losing words. As the speaker it appends
  to a WAV file (created at :data:`FILE_OUTPUT_RATE_HZ` when missing), as
  fast as audio comes.
- :class:`MockSoundCard`: a **hardware mock for tests only** (never chosen by
  a config value): scripted microphone audio, a speaker that records what it
  is given and can echo it into the microphone, and failure injection
  (unplugged mid-run).

Threading: the classes are used from the event loop; every blocking call
(opening PortAudio streams, file reads and writes) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgevoice.audio import StreamResampler, to_mono
from edgevoice.engines.base import FloatAudio

_LOGGER = logging.getLogger(__name__)

CAPTURE_RATE_HZ = 16000
"""Rate of every microphone block (what the wake, VAD and ASR engines take)."""
FILE_OUTPUT_RATE_HZ = 22050
"""Rate of a ``file:`` speaker's WAV when the file does not exist yet."""
MAX_FILE_INPUT_S = 4 * 3600.0
"""Longest ``file:`` microphone recording read (longer files are cut)."""
_FILE_READ_S = 1.0
"""A ``file:`` microphone reads this much per worker call."""
_MAX_AHEAD_S = 0.5
"""A PortAudio input further ahead of the wall clock than this has no sample
clock (ALSA ``null``): its callback is held back to real time."""
_OUTPUT_PIECE_S = 0.1
"""Speakers take audio in pieces this long (so a stop takes effect quickly)."""


class AudioDeviceError(RuntimeError):
    """A sound device is missing, cannot be opened, or failed while in use."""


class Microphone(Protocol):
    """Mono float32 blocks at :data:`CAPTURE_RATE_HZ`."""

    name: str

    async def read(self) -> FloatAudio:
        """The next block; raises :class:`AudioDeviceError` when the device failed."""
        ...

    async def close(self) -> None: ...


class Speaker(Protocol):
    """Plays mono float32 at :attr:`rate_hz`."""

    name: str
    rate_hz: int

    async def write(self, samples: FloatAudio) -> None:
        """Play ``samples``; returns at playback pace. :class:`AudioDeviceError` on failure."""
        ...

    async def drain(self) -> None:
        """Wait until everything written has been heard."""
        ...

    async def close(self) -> None: ...


class DeviceFactory(Protocol):
    """Opens the devices the config names (:class:`SystemDevices`, or a test's mock)."""

    async def open_input(self, spec: str, *, block_samples: int, queue_blocks: int) -> Microphone:
        """Open a microphone; :class:`AudioDeviceError` if it cannot be opened."""
        ...

    async def open_output(self, spec: str) -> Speaker:
        """Open a speaker; :class:`AudioDeviceError` if it cannot be opened."""
        ...


def file_path(spec: str) -> Path | None:
    """The path of a ``file:PATH`` device spec, else ``None``."""
    if spec.startswith("file:"):
        return Path(spec[len("file:") :]).expanduser()
    return None


# ------------------------------------------------------------------- PortAudio


def _sounddevice() -> Any:
    """Import sounddevice (blocking: it loads and initializes PortAudio)."""
    try:
        import sounddevice
    except OSError as exc:  # the PortAudio library itself is missing
        raise AudioDeviceError(
            f"PortAudio is not available ({exc}); install libportaudio2 (Debian) "
            "or use file: devices"
        ) from None
    except ImportError as exc:
        raise AudioDeviceError(
            f"sounddevice is not installed ({exc}); install edgevoice[audio-io]"
        ) from None
    return sounddevice


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One PortAudio device, as ``edgevoice devices`` lists it."""

    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_rate_hz: int
    default_input: bool
    default_output: bool


def list_devices() -> list[DeviceInfo]:
    """Blocking: every PortAudio device; :class:`AudioDeviceError` without PortAudio."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        apis = sd.query_hostapis()
        default_in, default_out = sd.default.device
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"cannot list sound devices: {exc}") from None
    found = []
    for device in devices:
        index = int(device["index"])
        found.append(
            DeviceInfo(
                index=index,
                name=str(device["name"]),
                host_api=str(apis[device["hostapi"]]["name"]),
                max_input_channels=int(device["max_input_channels"]),
                max_output_channels=int(device["max_output_channels"]),
                default_rate_hz=int(device["default_samplerate"]),
                default_input=index == default_in,
                default_output=index == default_out,
            )
        )
    return found


def _resolve_device(sd: Any, spec: str, kind: str) -> tuple[int | None, dict[str, Any]]:
    """Blocking: the PortAudio device for ``spec`` (``default``, an index, or a
    case-insensitive substring of a name) and its info."""
    channels_key = f"max_{kind}_channels"
    try:
        if spec in ("", "default"):
            info = sd.query_devices(kind=kind)
            return None, dict(info)
        if spec.isdigit():
            info = sd.query_devices(int(spec))
            if info[channels_key] < 1:
                raise AudioDeviceError(f"sound device {spec} ({info['name']}) has no {kind}")
            return int(spec), dict(info)
        for info in sd.query_devices():
            if spec.lower() in str(info["name"]).lower() and info[channels_key] > 0:
                return int(info["index"]), dict(info)
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"no {kind} sound device {spec!r}: {exc}") from None
    except ValueError as exc:
        raise AudioDeviceError(f"no {kind} sound device {spec!r}: {exc}") from None
    raise AudioDeviceError(f"no {kind} sound device matches {spec!r} (see `edgevoice devices`)")


class PortAudioMicrophone:
    """A PortAudio input stream; the callback only copies into a bounded queue."""

    def __init__(self, spec: str, *, block_samples: int, queue_blocks: int) -> None:
        self.name = f"PortAudio input {spec!r}"
        self._spec = spec
        self._block = block_samples
        self._queue: queue.Queue[FloatAudio] = queue.Queue(maxsize=max(1, queue_blocks))
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._resampler: StreamResampler | None = None
        self.overflows = 0
        """Blocks dropped because the loop did not keep up (or PortAudio overflowed)."""
        self._reported_overflows = 0
        self._error: str | None = None
        self._waiting = False
        self._rate_hz = CAPTURE_RATE_HZ
        self._clock_start: float | None = None
        self._frames = 0

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        sd = _sounddevice()
        device, info = _resolve_device(sd, self._spec, "input")
        self.name = f"PortAudio input {info['name']!r}"
        rate = CAPTURE_RATE_HZ
        try:
            sd.check_input_settings(device=device, channels=1, samplerate=rate, dtype="float32")
        except Exception:
            rate = int(info["default_samplerate"])
            self._resampler = StreamResampler(rate, CAPTURE_RATE_HZ)
        block = max(1, round(self._block * rate / CAPTURE_RATE_HZ))
        self._rate_hz = rate
        try:
            self._stream = sd.InputStream(
                device=device,
                channels=1,
                samplerate=rate,
                dtype="float32",
                blocksize=block,
                callback=self._callback,
                finished_callback=self._finished,
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            self._stream = None
            raise AudioDeviceError(f"cannot open {self.name}: {exc}") from None
        _LOGGER.info("Microphone: %s at %d Hz", self.name, rate)

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # PortAudio's thread: copy and hand over. A real device calls this at its
        # sample clock; a clockless one (ALSA ``null``, some broken drivers) calls
        # it in a tight loop, which would hold the GIL and flood the event loop:
        # such a stream is held back to real time here (a real device is never
        # that far ahead, so it never waits).
        if status and status.input_overflow:
            self.overflows += 1
        self._pace(frames)
        block = np.array(indata[:, 0], dtype=np.float32)
        if not np.isfinite(block).all():
            # NaN/inf from a driver would poison every engine downstream.
            np.nan_to_num(block, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        try:
            self._queue.put_nowait(block)
        except queue.Full:
            self.overflows += 1
            return
        loop = self._loop
        if loop is not None and self._waiting:
            # Wake the reader only when it waits: one wake-up per empty queue,
            # not one per block.
            self._waiting = False
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._ready.set)

    def _pace(self, frames: int) -> None:
        now = time.monotonic()
        if self._clock_start is None:
            self._clock_start = now
        self._frames += frames
        ahead_s = self._frames / self._rate_hz - (now - self._clock_start)
        if ahead_s > _MAX_AHEAD_S:
            time.sleep(min(ahead_s - _MAX_AHEAD_S / 2, 1.0))
        elif ahead_s < -5.0:
            # Far behind (a stall, a suspend): restart the clock.
            self._clock_start, self._frames = now, 0

    def _finished(self) -> None:
        # The stream stopped by itself (device unplugged, fatal error).
        if self._error is None:
            self._error = f"{self.name} stopped (unplugged?)"
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._ready.set)

    async def read(self) -> FloatAudio:
        while True:
            try:
                block = self._queue.get_nowait()
            except queue.Empty:
                if self._error is not None or self._stream is None:
                    raise AudioDeviceError(self._error or f"{self.name} is closed") from None
                self._ready.clear()
                self._waiting = True
                if not self._queue.empty():
                    continue
                try:
                    # A live stream delivers a block every few ms; silence this
                    # long means the device is gone without telling us.
                    await asyncio.wait_for(self._ready.wait(), 5.0)
                except TimeoutError:
                    raise AudioDeviceError(f"{self.name} delivers no audio") from None
                continue
            if self.overflows != self._reported_overflows:
                _LOGGER.warning(
                    "%s: %d blocks dropped (the voice loop fell behind)",
                    self.name,
                    self.overflows - self._reported_overflows,
                )
                self._reported_overflows = self.overflows
            if self._resampler is not None:
                block = self._resampler.process(block)
            return block

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self._error = self._error or f"{self.name} is closed"
            await asyncio.to_thread(_close_stream, stream)


class PortAudioSpeaker:
    """A PortAudio output stream at the device's default rate; writes run in a thread."""

    def __init__(self, spec: str) -> None:
        self.name = f"PortAudio output {spec!r}"
        self._spec = spec
        self.rate_hz = 48000
        self._stream: Any = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        sd = _sounddevice()
        device, info = _resolve_device(sd, self._spec, "output")
        self.name = f"PortAudio output {info['name']!r}"
        self.rate_hz = int(info["default_samplerate"]) or 48000
        try:
            self._stream = sd.OutputStream(
                device=device, channels=1, samplerate=self.rate_hz, dtype="float32"
            )
            self._stream.start()
        except sd.PortAudioError as exc:
            self._stream = None
            raise AudioDeviceError(f"cannot open {self.name}: {exc}") from None
        _LOGGER.info("Speaker: %s at %d Hz", self.name, self.rate_hz)

    async def write(self, samples: FloatAudio) -> None:
        if self._stream is None:
            raise AudioDeviceError(f"{self.name} is closed")
        await asyncio.to_thread(self._write, samples)

    def _write(self, samples: FloatAudio) -> None:
        with self._lock:
            stream = self._stream
            if stream is None:
                raise AudioDeviceError(f"{self.name} is closed")
            try:
                stream.write(np.ascontiguousarray(samples.reshape(-1, 1)))
            except Exception as exc:
                raise AudioDeviceError(f"{self.name} failed: {exc}") from None

    async def drain(self) -> None:
        # A blocking write returns once PortAudio buffered it; its latency is left.
        stream = self._stream
        if stream is not None:
            latency = float(getattr(stream, "latency", 0.0) or 0.0)
            await asyncio.sleep(min(latency, 1.0))

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await asyncio.to_thread(_close_stream, stream)


def _close_stream(stream: Any) -> None:
    try:
        stream.stop()
    except Exception as exc:
        _LOGGER.debug("Stopping a PortAudio stream: %s", exc)
    try:
        stream.close()
    except Exception as exc:
        _LOGGER.debug("Closing a PortAudio stream: %s", exc)


# ----------------------------------------------------------------- file: devices


class _Pacer:
    """Real-time pace (times ``pace``) for simulated devices: never drops, catches up."""

    def __init__(self, pace: float) -> None:
        self.pace = pace
        self._start: float | None = None
        self._elapsed_s = 0.0

    async def advance(self, duration_s: float) -> None:
        """Wait until ``duration_s`` more audio is due (no wait when behind)."""
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._elapsed_s / self.pace
        self._elapsed_s += duration_s
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > 5.0:
            # Far behind (a slow machine, a pause): restart the clock instead of
            # bursting minutes of audio at once.
            self._start = now
            self._elapsed_s = duration_s


class FileMicrophone:
    """``file:PATH``: the WAV file at real-time pace (times ``pace``), then silence."""

    def __init__(self, path: Path, *, block_samples: int, pace: float) -> None:
        self.name = f"file:{path}"
        self.path = path
        self._block = block_samples
        self._pacer = _Pacer(pace)
        self._file: Any = None
        self._resampler: StreamResampler | None = None
        self._pending = np.zeros(0, dtype=np.float32)
        self._read_s = 0.0
        self.finished = asyncio.Event()
        """Set once the whole file was delivered (silence follows)."""
        self.delivered_s = 0.0
        """Seconds of audio delivered (file and silence)."""

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        import soundfile

        try:
            self._file = soundfile.SoundFile(str(self.path))
        except (OSError, RuntimeError) as exc:  # soundfile raises LibsndfileError(RuntimeError)
            raise AudioDeviceError(f"cannot open {self.name}: {exc}") from None
        rate = int(self._file.samplerate)
        if rate != CAPTURE_RATE_HZ:
            self._resampler = StreamResampler(rate, CAPTURE_RATE_HZ)

    def _read_more(self) -> FloatAudio | None:
        """Blocking: the next second of the file at 16 kHz mono, ``None`` at its end."""
        f = self._file
        if f is None or self._read_s >= MAX_FILE_INPUT_S:
            return None
        frames = int(f.samplerate * _FILE_READ_S)
        data = f.read(frames, dtype="float32", always_2d=True)
        if not len(data):
            tail = self._resampler.flush() if self._resampler is not None else None
            self._resampler = None
            return tail if tail is not None and len(tail) else None
        self._read_s += len(data) / f.samplerate
        mono = to_mono(data)
        if self._resampler is not None:
            mono = self._resampler.process(mono)
        return mono

    async def read(self) -> FloatAudio:
        while len(self._pending) < self._block and self._file is not None:
            more = await asyncio.to_thread(self._read_more)
            if more is None:
                file, self._file = self._file, None
                await asyncio.to_thread(file.close)
                break
            self._pending = np.concatenate([self._pending, more])
        if len(self._pending) >= self._block or (len(self._pending) and self._file is None):
            block, self._pending = self._pending[: self._block], self._pending[self._block :]
            if len(block) < self._block:
                block = np.concatenate([block, np.zeros(self._block - len(block), np.float32)])
        else:
            self.finished.set()
            block = np.zeros(self._block, dtype=np.float32)
        duration_s = len(block) / CAPTURE_RATE_HZ
        await self._pacer.advance(duration_s)
        self.delivered_s += duration_s
        return block

    async def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await asyncio.to_thread(file.close)


class FileSpeaker:
    """``file:PATH``: appends to a WAV file as fast as it is written (playback
    takes no wall-clock time, so a slow machine never makes the loop's audio
    clock and the speaker disagree)."""

    def __init__(self, path: Path) -> None:
        self.name = f"file:{path}"
        self.path = path
        self.rate_hz = FILE_OUTPUT_RATE_HZ
        self._file: Any = None
        self._lock = asyncio.Lock()
        self.written_s = 0.0
        """Seconds of audio written since opened."""

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        import soundfile

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file() and self.path.stat().st_size > 44:
                f = soundfile.SoundFile(str(self.path), mode="r+")
                f.seek(0, soundfile.SEEK_END)
            else:
                f = soundfile.SoundFile(
                    str(self.path),
                    mode="w",
                    samplerate=FILE_OUTPUT_RATE_HZ,
                    channels=1,
                    subtype="PCM_16",
                    format="WAV",
                )
        except (OSError, RuntimeError) as exc:
            raise AudioDeviceError(f"cannot open {self.name}: {exc}") from None
        if f.channels != 1:
            f.close()
            raise AudioDeviceError(f"{self.name}: an existing file must be mono")
        self._file = f
        self.rate_hz = int(f.samplerate)

    def _write(self, samples: FloatAudio) -> None:
        f = self._file
        if f is None:
            raise AudioDeviceError(f"{self.name} is closed")
        f.write(np.clip(samples, -1.0, 1.0))
        f.flush()  # keeps the header valid for readers while we run

    async def write(self, samples: FloatAudio) -> None:
        if not len(samples):
            return
        async with self._lock:
            try:
                await asyncio.to_thread(self._write, samples)
            except (OSError, RuntimeError) as exc:
                if isinstance(exc, AudioDeviceError):
                    raise
                raise AudioDeviceError(f"{self.name} failed: {exc}") from None
        self.written_s += len(samples) / self.rate_hz

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            await asyncio.to_thread(file.close)


class SystemDevices:
    """What a config names: PortAudio devices and ``file:`` devices."""

    def __init__(self, pace: float = 1.0) -> None:
        self.pace = pace

    async def open_input(self, spec: str, *, block_samples: int, queue_blocks: int) -> Microphone:
        path = file_path(spec)
        if path is not None:
            mic = FileMicrophone(path, block_samples=block_samples, pace=self.pace)
            await mic.open()
            return mic
        pa = PortAudioMicrophone(spec, block_samples=block_samples, queue_blocks=queue_blocks)
        await pa.open()
        return pa

    async def open_output(self, spec: str) -> Speaker:
        path = file_path(spec)
        if path is not None:
            speaker = FileSpeaker(path)
            await speaker.open()
            return speaker
        pa = PortAudioSpeaker(spec)
        await pa.open()
        return pa


# --------------------------------------------------------------- mock sound card


class MockSoundCard:
    """A **hardware mock** for tests (the only mock the tests use; no config
    value selects it): a microphone that plays scripted clips then silence at
    ``pace``, a speaker that records everything it plays (and, with
    ``echo=True``, feeds it back into the microphone, as a speaker next to a
    microphone does), and failure injection.

    ``fail_open`` makes opening fail (no sound card); ``unplug()`` makes the
    open devices fail on their next call (unplugged mid-run), and further
    opens fail until ``plug_in()``.
    """

    def __init__(
        self,
        clips: Sequence[FloatAudio] = (),
        *,
        pace: float = 1.0,
        echo: bool = False,
        output_rate_hz: int = 16000,
        fail_open: bool = False,
    ) -> None:
        self._clips: deque[FloatAudio] = deque(np.asarray(c, dtype=np.float32) for c in clips)
        self.pace = pace
        self.echo = echo
        self.output_rate_hz = output_rate_hz
        self.plugged = not fail_open
        self.played: list[FloatAudio] = []
        """Everything the speaker played, at ``output_rate_hz``."""
        self._echo: deque[FloatAudio] = deque()

    def unplug(self) -> None:
        self.plugged = False

    def plug_in(self) -> None:
        self.plugged = True

    def add_clip(self, clip: FloatAudio) -> None:
        self._clips.append(np.asarray(clip, dtype=np.float32))

    def _take_echo(self, samples: int) -> FloatAudio:
        """Up to ``samples`` of echo (at the capture rate) for the next microphone block."""
        if not self._echo:
            return np.zeros(0, dtype=np.float32)
        buffered = np.concatenate(self._echo)
        self._echo.clear()
        if len(buffered) > samples:
            self._echo.append(buffered[samples:])
        return buffered[:samples]

    @property
    def played_audio(self) -> FloatAudio:
        return np.concatenate(self.played) if self.played else np.zeros(0, np.float32)

    def _check(self, what: str) -> None:
        if not self.plugged:
            raise AudioDeviceError(f"mock sound card: {what} unplugged")

    async def open_input(self, spec: str, *, block_samples: int, queue_blocks: int) -> Microphone:
        self._check("microphone")
        return _MockMicrophone(self, block_samples)

    async def open_output(self, spec: str) -> Speaker:
        self._check("speaker")
        return _MockSpeaker(self)


class _MockMicrophone:
    def __init__(self, card: MockSoundCard, block_samples: int) -> None:
        self.name = "mock sound card microphone"
        self._card = card
        self._block = block_samples
        self._pending = np.zeros(0, dtype=np.float32)
        self._pacer = _Pacer(card.pace)

    async def read(self) -> FloatAudio:
        card = self._card
        card._check("microphone")
        while len(self._pending) < self._block and card._clips:
            self._pending = np.concatenate([self._pending, card._clips.popleft()])
        block = self._pending[: self._block]
        self._pending = self._pending[self._block :]
        if len(block) < self._block:
            block = np.concatenate([block, np.zeros(self._block - len(block), np.float32)])
        echo = card._take_echo(self._block)
        if len(echo):  # what the speaker played reaches the microphone
            block = block.copy()
            block[: len(echo)] += echo
        await self._pacer.advance(self._block / CAPTURE_RATE_HZ)
        return block

    async def close(self) -> None:
        return None


class _MockSpeaker:
    def __init__(self, card: MockSoundCard) -> None:
        self.name = "mock sound card speaker"
        self._card = card
        self.rate_hz = card.output_rate_hz

    async def write(self, samples: FloatAudio) -> None:
        card = self._card
        card._check("speaker")
        card.played.append(np.array(samples, dtype=np.float32))
        if card.echo:
            from edgevoice.audio import resample

            card._echo.append(resample(samples, self.rate_hz, CAPTURE_RATE_HZ))
        await asyncio.sleep(len(samples) / self.rate_hz / card.pace)

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        return None
