"""Audio in one place: decode anything, resample (soxr), encode what clients ask for.

Inside edgevoice audio is mono float32 in [-1, 1] (:class:`Audio`). Decoding
accepts WAV (any rate/width/channels), FLAC, MP3, Ogg/Opus/Vorbis, M4A/AAC,
WebM and whatever else FFmpeg (through PyAV) reads. Every failure to decode
raises :class:`AudioError`, which protocols turn into client errors.

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


class AudioError(ValueError):
    """Audio that is empty, corrupt, too long or in an unsupported format."""


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
    """High-quality resampling with soxr (blocking)."""
    if from_hz == to_hz or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    import soxr

    out: FloatAudio = soxr.resample(samples, from_hz, to_hz, quality="HQ").astype(
        np.float32, copy=False
    )
    return out


def to_mono(samples: npt.NDArray[np.float32]) -> FloatAudio:
    """(frames, channels) or (frames,) → (frames,) by averaging channels."""
    if samples.ndim == 1:
        return samples
    mono: FloatAudio = samples.mean(axis=1, dtype=np.float32)
    return mono


def pcm_to_float(data: bytes, width: int, channels: int = 1) -> FloatAudio:
    """Raw little-endian signed PCM (width 1=u8, 2, 4 bytes) → mono float32."""
    if width not in (1, 2, 4):
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


def silence(duration_s: float, rate_hz: int) -> FloatAudio:
    return np.zeros(round(duration_s * rate_hz), dtype=np.float32)


# ----------------------------------------------------------------- decoding


def _decode_soundfile(data: bytes) -> Audio | None:
    """WAV/FLAC through libsndfile (exact for every WAV sample format)."""
    if not data.startswith((b"RIFF", b"RF64", b"fLaC")):
        return None
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, MemoryError):
        return None  # let FFmpeg try (it reads some WAVs libsndfile refuses)
    return Audio(to_mono(samples), int(rate))


def _decode_pyav(data: bytes) -> Audio:
    import av

    chunks: list[FloatAudio] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioError("no audio stream found in the input")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.sample_rate
            if not rate:
                raise AudioError("audio stream has no sample rate")
            # Downmix and convert to packed float in FFmpeg; rate stays native so
            # resampling happens once, in soxr.
            declared_s = container.duration / 1_000_000 if container.duration else None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    except AudioError:
        raise
    except av.error.FFmpegError as exc:
        raise AudioError(f"could not decode audio: {exc.strerror or exc!s}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise AudioError(f"could not decode audio: {exc}") from None
    if not chunks:
        raise AudioError("could not decode audio: no audio samples in the input")
    audio = Audio(np.concatenate(chunks), int(rate))
    # A cut-off download still decodes its first frames; the container's own
    # duration tells us most of it is missing.
    if declared_s and declared_s > 1.0 and audio.duration_s < 0.5 * declared_s:
        raise AudioError(
            f"audio is truncated: decoded {audio.duration_s:.1f} s of {declared_s:.1f} s"
        )
    return audio


def decode(
    data: bytes | Path,
    *,
    rate_hz: int | None = None,
    max_duration_s: float | None = None,
) -> Audio:
    """Decode a whole audio file to mono float32, resampled to ``rate_hz``.

    Raises :class:`AudioError` for empty, corrupt, unsupported or too long input.
    """
    if isinstance(data, Path):
        path = data
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AudioError(f"cannot read {path}: {exc.strerror or exc!s}") from None
    if not data:
        raise AudioError("empty audio input (0 bytes)")
    # libsndfile reads WAV/FLAC/Ogg exactly (all WAV sample formats); FFmpeg
    # covers the rest (mp3, m4a, webm, opus, ...).
    audio = _decode_soundfile(data) or _decode_pyav(data)
    if len(audio.samples) == 0:
        raise AudioError("audio input contains no samples")
    if max_duration_s is not None and audio.duration_s > max_duration_s:
        raise AudioError(
            f"audio is {audio.duration_s:.1f} s long; the limit is {max_duration_s:.0f} s"
        )
    if not np.all(np.isfinite(audio.samples)):
        raise AudioError("audio contains NaN or infinite samples")
    return audio.at_rate(rate_hz) if rate_hz else audio


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

    def __init__(self, fmt: str, rate_hz: int, *, streaming: bool = True) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise AudioError(
                f"unsupported output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}"
            )
        self.format = fmt
        self.rate_hz = rate_hz
        self._streaming = streaming
        self._header_sent = False
        self._closed = False
        self._container: Any = None
        self._stream: Any = None
        self._sink = _Sink()
        if fmt in _AV_OUTPUT:
            import av

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
        import av

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
    encoder = StreamEncoder(fmt, rate_hz, streaming=False)
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
