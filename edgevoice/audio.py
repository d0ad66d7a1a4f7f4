"""Audio in one place: decode anything, resample (soxr), encode what clients ask for.

Inside edgevoice audio is mono float32 in [-1, 1] (:class:`Audio`). Decoding
accepts WAV (any rate/width/channels), FLAC, MP3, Ogg/Opus/Vorbis, M4A/AAC,
WebM and whatever else FFmpeg (through PyAV) reads. Every failure to decode
raises :class:`AudioError`, which protocols turn into client errors.

Decoding is bounded: :func:`decode` reads the container's declared duration
first and refuses a file over ``max_duration_s`` before decoding anything,
then decodes block by block, downmixing and resampling each block into the
target rate as it goes, with a running duration count that stops as soon as
the limit is crossed (declared durations can lie). The source's full-rate
multichannel float array never exists.

Streams of raw PCM (Wyoming, WebSocket and satellite audio) go through
:class:`PcmConverter` / :class:`StreamResampler`, the one streaming
resampler every face uses.

All functions here are blocking CPU work; protocols call them in worker threads
when the input can be large.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from edgevoice.engines.base import FloatAudio
from edgevoice.errors import BadAudioError, LimitExceededError
from edgevoice.memory import load_module

_LOGGER = logging.getLogger(__name__)

OutputFormat = Literal["wav", "flac", "mp3", "opus", "aac", "pcm"]
OUTPUT_FORMATS: Final[tuple[OutputFormat, ...]] = ("wav", "flac", "mp3", "opus", "aac", "pcm")
CONTENT_TYPES: Final[dict[str, str]] = {
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "pcm": "audio/pcm",
}
# (container format, codec, fixed sample rate or None)
_AV_OUTPUT: Final[dict[str, tuple[str, str, int | None]]] = {
    "flac": ("flac", "flac", None),
    "mp3": ("mp3", "libmp3lame", None),
    "opus": ("ogg", "libopus", 48000),
    "aac": ("adts", "aac", None),
}

MAX_NATIVE_RATE_HZ: Final = 48000
"""Without a target rate, audio is decoded at its own rate up to this one (speech
needs no more; a 192 kHz file would otherwise cost four times the memory)."""
_BLOCK_FRAMES: Final = 16384
"""Source frames per libsndfile read (8 channels: 512 KiB of float32)."""
PCM_WIDTHS: Final = (1, 2, 4)
PCM_RATES_HZ: Final = (1000, 384000)
"""Lowest and highest sample rate accepted for raw PCM input."""
PCM_MAX_CHANNELS: Final = 32


AudioError = BadAudioError
"""Audio that is empty, corrupt or in an unsupported format."""


def duration_limit_error(max_duration_s: float) -> LimitExceededError:
    """The one error for audio longer than ``[limits] max_audio_s``."""
    return LimitExceededError("max_audio_s", max_duration_s, what="audio duration", unit="s")


@dataclass(frozen=True, slots=True)
class Audio:
    samples: FloatAudio
    """Mono float32 in [-1, 1]."""
    rate_hz: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate_hz if self.rate_hz else 0.0

    def at_rate(self, rate_hz: int) -> Audio:
        if rate_hz == self.rate_hz:
            return self
        return Audio(resample(self.samples, self.rate_hz, rate_hz), rate_hz)


# ----------------------------------------------------------------- helpers


def resample(samples: FloatAudio, from_hz: int, to_hz: int) -> FloatAudio:
    """High-quality resampling of a whole clip with soxr (blocking)."""
    if from_hz == to_hz or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    import soxr

    out: FloatAudio = soxr.resample(samples, from_hz, to_hz, quality="HQ").astype(
        np.float32, copy=False
    )
    return out


class StreamResampler:
    """Mono float32 chunks at ``from_hz`` → chunks at ``to_hz``, keeping filter state
    across chunks (soxr ``ResampleStream``, HQ).

    Blocking CPU work, cheap per chunk; one instance per stream, not thread-safe.
    Equal rates pass chunks through untouched. :meth:`flush` returns the
    filter's tail at the end of a stream and resets it for the next one.
    """

    def __init__(self, from_hz: int, to_hz: int) -> None:
        if from_hz <= 0 or to_hz <= 0:
            raise AudioError(f"invalid sample rate {from_hz} → {to_hz} Hz")
        self.from_hz = from_hz
        self.to_hz = to_hz
        self._stream: Any = None
        if from_hz != to_hz:
            import soxr

            self._stream = soxr.ResampleStream(from_hz, to_hz, 1, dtype="float32", quality="HQ")

    def process(self, samples: FloatAudio) -> FloatAudio:
        """Resample one chunk; the output may be a little shorter (filter delay)."""
        if self._stream is None:
            return samples.astype(np.float32, copy=False)
        out: FloatAudio = self._stream.resample_chunk(
            np.ascontiguousarray(samples, dtype=np.float32)
        )
        return out

    def flush(self) -> FloatAudio:
        """The remaining output at the end of a stream; the resampler starts afresh after."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out: FloatAudio = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return out


class PcmConverter:
    """Client PCM chunks (any rate, width and channel count, which may change between
    chunks) → mono float32 at ``target_hz``.

    Blocking but cheap per chunk (call it on the loop for small chunks, in a
    worker for big ones); one per stream, not thread-safe. Raises
    :class:`AudioError` for a format it cannot take.
    """

    def __init__(self, target_hz: int) -> None:
        self.target_hz = target_hz
        self._resampler: StreamResampler | None = None
        self.received_s = 0.0
        """Seconds of input converted so far (at the input's own rate)."""

    @staticmethod
    def check_format(rate_hz: object, width: object, channels: object) -> None:
        """Raise :class:`AudioError` unless this is a PCM format we convert."""
        if width not in PCM_WIDTHS:
            raise AudioError(f"unsupported sample width {width!r} (use 1, 2 or 4 bytes)")
        low, high = PCM_RATES_HZ
        if not isinstance(rate_hz, int) or isinstance(rate_hz, bool) or not low <= rate_hz <= high:
            raise AudioError(f"unsupported sample rate {rate_hz!r} (use {low}–{high} Hz)")
        if (
            not isinstance(channels, int)
            or isinstance(channels, bool)
            or not 1 <= channels <= PCM_MAX_CHANNELS
        ):
            raise AudioError(f"unsupported channel count {channels!r}")

    def convert(self, data: bytes, rate_hz: int, width: int, channels: int) -> FloatAudio:
        """One chunk of little-endian PCM → mono float32 at ``target_hz``."""
        self.check_format(rate_hz, width, channels)
        samples = pcm_to_float(data, width, channels)
        self.received_s += len(samples) / rate_hz
        head = np.zeros(0, dtype=np.float32)
        if self._resampler is None or self._resampler.from_hz != rate_hz:
            if self._resampler is not None:
                head = self._resampler.flush()  # the old rate's tail comes first
            self._resampler = StreamResampler(rate_hz, self.target_hz)
        out = self._resampler.process(samples)
        return np.concatenate([head, out]) if len(head) else out

    def flush(self) -> FloatAudio:
        """The resampler's tail at the end of a stream (then ready for the next one)."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        out = self._resampler.flush()
        self._resampler = None
        self.received_s = 0.0
        return out


def to_mono(samples: npt.NDArray[np.float32]) -> FloatAudio:
    """(frames, channels) or (frames,) → (frames,) by averaging channels."""
    if samples.ndim == 1:
        return samples
    if samples.shape[1] == 1:
        return samples[:, 0]
    mono: FloatAudio = samples.mean(axis=1, dtype=np.float32)
    return mono


def pcm_to_float(data: bytes, width: int, channels: int = 1) -> FloatAudio:
    """Raw little-endian signed PCM (width 1=u8, 2, 4 bytes) → mono float32."""
    if width not in PCM_WIDTHS:
        raise AudioError(f"unsupported sample width {width} bytes (use 1, 2 or 4)")
    if channels < 1:
        raise AudioError(f"invalid channel count {channels}")
    frame = width * channels
    if len(data) % frame:
        raise AudioError(f"PCM data length {len(data)} is not a multiple of the frame size {frame}")
    if width == 1:
        ints = np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0
        scaled = ints / 128.0
    elif width == 2:
        scaled = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        scaled = (np.frombuffer(data, dtype="<i4").astype(np.float64) / 2147483648.0).astype(
            np.float32
        )
    return to_mono(scaled.reshape(-1, channels)) if channels > 1 else scaled


def float_to_pcm16(samples: FloatAudio) -> bytes:
    """Mono float32 → s16le bytes (clipped)."""
    clipped = np.clip(samples, -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


# ----------------------------------------------------------------- decoding


class _Collector:
    """Mono blocks at the source rate → one clip at the target rate, counting
    the source duration and stopping as soon as it crosses the limit."""

    def __init__(self, rate_hz: int | None, max_duration_s: float | None) -> None:
        self._rate_hz = rate_hz
        self._max_duration_s = max_duration_s
        self._resampler: StreamResampler | None = None
        self._chunks: list[FloatAudio] = []
        self.source_s = 0.0

    def add(self, mono: FloatAudio, source_hz: int) -> None:
        if len(mono) == 0:
            return
        if source_hz <= 0:
            raise AudioError("audio stream has no sample rate")
        self.source_s += len(mono) / source_hz
        if self._max_duration_s is not None and self.source_s > self._max_duration_s:
            raise duration_limit_error(self._max_duration_s)
        if not np.isfinite(mono).all():
            raise AudioError("audio contains NaN or infinite samples")
        if self._resampler is None or self._resampler.from_hz != source_hz:
            target = self._rate_hz or (
                self._resampler.to_hz
                if self._resampler is not None
                else min(source_hz, MAX_NATIVE_RATE_HZ)
            )
            if self._resampler is not None:
                self._chunks.append(self._resampler.flush())
            self._resampler = StreamResampler(source_hz, target)
        out = self._resampler.process(mono)
        if len(out):
            # A copy: the block may be a view into a decoder buffer or a big read.
            self._chunks.append(np.array(out, dtype=np.float32, copy=True))

    def finish(self) -> Audio:
        if self._resampler is None:
            raise AudioError("audio input contains no samples")
        self._chunks.append(self._resampler.flush())
        samples = np.concatenate(self._chunks)
        self._chunks.clear()
        if len(samples) == 0:
            raise AudioError("audio input contains no samples")
        return Audio(samples, self._resampler.to_hz)


def _check_declared(declared_s: float | None, max_duration_s: float | None) -> None:
    if max_duration_s is not None and declared_s is not None and declared_s > max_duration_s:
        _LOGGER.debug("Audio declares %.1f s; refused before decoding", declared_s)
        raise duration_limit_error(max_duration_s)


def _decode_soundfile(source: io.BytesIO | str, collector: _Collector, max_s: float | None) -> bool:
    """WAV through libsndfile (exact for every WAV sample format), block by block.

    False when libsndfile cannot open it (FFmpeg reads some WAVs it refuses).
    """
    import soundfile as sf

    try:
        handle = sf.SoundFile(source)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        if isinstance(source, io.BytesIO):
            source.seek(0)
        return False
    with handle:
        rate = int(handle.samplerate)
        if rate <= 0:
            raise AudioError("audio stream has no sample rate")
        # libsndfile derives WAV frames from the header, clamped to the data present.
        _check_declared(handle.frames / rate if handle.frames > 0 else None, max_s)
        try:
            while True:
                block = handle.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                collector.add(to_mono(block), rate)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError(f"could not decode audio: {exc}") from None
    return True


def _declared_s(container: Any, stream: Any) -> float | None:
    """The duration the container claims (header, last Ogg page, bitrate estimate)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return float(container.duration) / 1_000_000
    return None


# FFmpeg sample formats (packed names) → numpy dtype and the scale to [-1, 1].
_AV_SAMPLES: Final[dict[str, tuple[str, float, float]]] = {
    "u8": ("u1", 128.0, 128.0),
    "s16": ("<i2", 0.0, 32768.0),
    "s32": ("<i4", 0.0, 2147483648.0),
    "s64": ("<i8", 0.0, 9223372036854775808.0),
    "flt": ("<f4", 0.0, 1.0),
    "dbl": ("<f8", 0.0, 1.0),
}
_AV_BATCH_SAMPLES: Final = 8192
"""Decoded frames (20 ms each for Opus) are batched to about this many samples
before resampling: per-call overhead, not arithmetic, dominates small frames."""


def _frame_to_mono(frame: Any) -> FloatAudio:
    """One decoded PyAV frame (any sample format, any layout) → mono float32."""
    dtype, offset, scale = _AV_SAMPLES[frame.format.packed.name]
    samples = int(frame.samples)
    channels = int(frame.layout.nb_channels) or 1
    if frame.format.is_planar:
        planes = [np.frombuffer(plane, dtype=dtype, count=samples) for plane in frame.planes]
        data = planes[0] if channels == 1 else np.stack(planes[:channels], axis=1)
    else:
        data = np.frombuffer(frame.planes[0], dtype=dtype, count=samples * channels)
        data = data.reshape(samples, channels)
    if data.ndim == 2:
        data = data.mean(axis=1, dtype=np.float64) if dtype == "<f8" else data.mean(axis=1)
    mono = data.astype(np.float32)  # a copy: the frame's buffer is reused by the decoder
    if offset:
        mono -= offset
    if scale != 1.0:
        mono /= scale
    return mono


def _decode_pyav(source: io.BytesIO | str, collector: _Collector, max_s: float | None) -> None:
    av = load_module("av")

    declared_s: float | None = None
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.audio:
                raise AudioError("no audio stream found in the input")
            stream = container.streams.audio[0]
            declared_s = _declared_s(container, stream)
            _check_declared(declared_s, max_s)
            batch: list[FloatAudio] = []
            batched, batch_hz = 0, 0
            for frame in container.decode(stream):
                rate = int(frame.sample_rate)
                if batch and (rate != batch_hz or batched >= _AV_BATCH_SAMPLES):
                    collector.add(np.concatenate(batch), batch_hz)
                    batch.clear()
                    batched = 0
                mono = _frame_to_mono(frame)
                batch.append(mono)
                batched += len(mono)
                batch_hz = rate
            if batch:
                collector.add(np.concatenate(batch), batch_hz)
    except (AudioError, LimitExceededError):
        raise
    except av.error.FFmpegError as exc:
        raise AudioError(f"could not decode audio: {exc.strerror or exc!s}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise AudioError(f"could not decode audio: {exc}") from None
    if collector.source_s == 0:
        raise AudioError("could not decode audio: no audio samples in the input")
    # A cut-off download still decodes its first frames; the container's own
    # duration tells us most of it is missing.
    if declared_s and declared_s > 1.0 and collector.source_s < 0.5 * declared_s:
        raise AudioError(
            f"audio is truncated: decoded {collector.source_s:.1f} s of {declared_s:.1f} s"
        )


def decode(
    data: bytes | Path,
    *,
    rate_hz: int | None = None,
    max_duration_s: float | None = None,
) -> Audio:
    """Decode an audio file (bytes or a path) to mono float32 at ``rate_hz``.

    Without ``rate_hz`` the result keeps the source rate, capped at
    :data:`MAX_NATIVE_RATE_HZ`. With ``max_duration_s``, a file whose header
    declares more is refused before decoding, and decoding stops as soon as
    the running count of decoded source audio crosses it. Memory stays in the
    order of the *output* (at most ``max_duration_s`` at the target rate),
    whatever the source's rate and channel count. Blocking.

    Raises :class:`AudioError` for empty, corrupt or unsupported input and
    :class:`~edgevoice.errors.LimitExceededError` (``max_audio_s``) for too long.
    """
    source: io.BytesIO | str
    if isinstance(data, Path):
        try:
            with data.open("rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise AudioError(f"cannot read {data}: {exc.strerror or exc!s}") from None
        source = str(data)
    else:
        magic = data[:4]
        source = io.BytesIO(data)
    if not magic:
        raise AudioError("empty audio input (0 bytes)")
    collector = _Collector(rate_hz, max_duration_s)
    # libsndfile reads every WAV sample format exactly; FFmpeg covers the rest
    # (FLAC, mp3, m4a, webm, ogg, ...) and WAVs libsndfile refuses.
    if not (magic in (b"RIFF", b"RF64") and _decode_soundfile(source, collector, max_duration_s)):
        _decode_pyav(source, collector, max_duration_s)
    return collector.finish()


# ----------------------------------------------------------------- encoding


def wav_header(rate_hz: int, data_bytes: int | None, channels: int = 1, width: int = 2) -> bytes:
    """A RIFF/WAVE header; ``data_bytes=None`` writes the 'unknown length'
    sizes streaming servers use (0xFFFFFFFF)."""
    size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff,
        b"WAVE",
        b"fmt ",
        16,
        1,
        channels,
        rate_hz,
        rate_hz * channels * width,
        channels * width,
        width * 8,
        b"data",
        size,
    )


class _Sink:
    """A write-only, non-seekable file object PyAV muxes into."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class StreamEncoder:
    """Incremental encoder: feed float chunks, get encoded bytes as they are ready.

    ``wav`` streams a header with unknown length followed by s16le data;
    ``pcm`` is bare s16le; the other formats go through FFmpeg.
    """

    def __init__(self, fmt: str, rate_hz: int) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise AudioError(
                f"unsupported output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}"
            )
        self.format = fmt
        self.rate_hz = rate_hz
        self._header_sent = False
        self._closed = False
        self._container: Any = None
        self._stream: Any = None
        self._sink = _Sink()
        if fmt in _AV_OUTPUT:
            av = load_module("av")

            container_format, codec, fixed_rate = _AV_OUTPUT[fmt]
            options = {"page_duration": "20000"} if container_format == "ogg" else {}
            self._container = av.open(self._sink, "w", format=container_format, options=options)
            self._stream = self._container.add_stream(
                codec, rate=fixed_rate or rate_hz, layout="mono"
            )
            ctx = self._stream.codec_context
            self._resampler = av.AudioResampler(
                format=ctx.format.name, layout="mono", rate=ctx.sample_rate
            )

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def write(self, samples: FloatAudio) -> bytes:
        if self._closed:
            raise RuntimeError("encoder is closed")
        if self._container is None:
            pcm = float_to_pcm16(samples)
            if self.format == "wav" and not self._header_sent:
                self._header_sent = True
                return wav_header(self.rate_hz, None) + pcm
            return pcm
        av = load_module("av")

        if len(samples) == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1),
            format="flt",
            layout="mono",
        )
        frame.sample_rate = self.rate_hz
        for resampled in self._resampler.resample(frame):
            for packet in self._stream.encode(resampled):
                self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        if self._container is None:
            if self.format == "wav" and not self._header_sent:
                self._header_sent = True
                return wav_header(self.rate_hz, None)
            return b""
        for resampled in self._resampler.resample(None):
            for packet in self._stream.encode(resampled):
                self._container.mux(packet)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


def encode(samples: FloatAudio, rate_hz: int, fmt: str) -> bytes:
    """Encode a whole clip; WAV gets exact sizes in its header."""
    if fmt == "wav":
        pcm = float_to_pcm16(samples)
        return wav_header(rate_hz, len(pcm)) + pcm
    encoder = StreamEncoder(fmt, rate_hz)
    return encoder.write(samples) + encoder.close()


def format_for_path(path: Path) -> str:
    """Output format from a file extension (``.ogg`` means opus, ``.raw`` pcm)."""
    ext = path.suffix.lower().lstrip(".")
    ext = {"ogg": "opus", "raw": "pcm", "adts": "aac"}.get(ext, ext)
    if ext not in OUTPUT_FORMATS:
        raise AudioError(
            f"cannot tell the audio format from {path.name!r}: use one of "
            + ", ".join(f".{f}" for f in OUTPUT_FORMATS)
        )
    return ext
