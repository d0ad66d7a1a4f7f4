"""Audio layer: decode any format, resample, encode every output format."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from edgevoice import audio
from edgevoice.audio import AudioError, StreamEncoder, decode, encode, pcm_to_float
from edgevoice.errors import LimitExceededError
from edgevoice.testing import tone
from tests.conftest import HOTWORDS_MP3, LAMP_WAV, LIGHT_EN_WAV


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def test_decode_44k_stereo_wav_to_16k_mono() -> None:
    decoded = decode(LAMP_WAV, rate_hz=16000)
    assert decoded.rate_hz == 16000
    assert decoded.samples.dtype == np.float32 and decoded.samples.ndim == 1
    assert decoded.duration_s == pytest.approx(3.0, abs=0.05)


def test_decode_mp3() -> None:
    decoded = decode(HOTWORDS_MP3)
    assert decoded.rate_hz == 44100
    assert decoded.duration_s == pytest.approx(4.0, abs=0.1)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_decode_wav_any_width_and_channels(width: int, channels: int, tmp_path: Path) -> None:
    rate = 11025
    signal = tone(0.5, rate, 300.0)
    subtype = {1: "PCM_U8", 2: "PCM_16", 3: "PCM_24", 4: "PCM_32"}[width]
    path = tmp_path / "x.wav"
    sf.write(path, np.stack([signal] * channels, axis=1), rate, subtype=subtype)
    decoded = decode(path, rate_hz=16000)
    assert decoded.duration_s == pytest.approx(0.5, abs=0.01)
    assert _dominant_hz(decoded.samples, 16000) == pytest.approx(300.0, abs=5)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac"])
def test_encode_roundtrip_keeps_pitch_and_length(fmt: str) -> None:
    rate = 22050
    signal = tone(1.0, rate, 440.0)
    data = encode(signal, rate, fmt)
    back = decode(data, rate_hz=rate)
    assert back.duration_s == pytest.approx(1.0, abs=0.08)
    assert _dominant_hz(back.samples, rate) == pytest.approx(440.0, abs=5)


def test_pcm_is_bare_s16le() -> None:
    signal = tone(0.25, 16000)
    data = encode(signal, 16000, "pcm")
    assert len(data) == 2 * len(signal)
    assert np.allclose(pcm_to_float(data, 2), signal, atol=1e-3)


def test_stream_encoder_yields_bytes_before_close() -> None:
    rate = 22050
    for fmt in ("mp3", "opus", "aac", "wav", "pcm"):
        encoder = StreamEncoder(fmt, rate)
        early = b"".join(encoder.write(tone(0.5, rate)) for _ in range(4))
        assert early, f"{fmt}: nothing before close"
        data = early + encoder.close()
        if fmt != "pcm":
            assert decode(data).duration_s == pytest.approx(2.0, abs=0.1)


def test_streamed_wav_header_has_unknown_length_but_decodes() -> None:
    encoder = StreamEncoder("wav", 16000)
    data = encoder.write(tone(0.5, 16000)) + encoder.close()
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff"
    assert decode(data).duration_s == pytest.approx(0.5, abs=0.01)


def test_whole_wav_has_exact_header() -> None:
    data = encode(tone(0.5, 16000), 16000, "wav")
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.getnframes() == 8000


def test_resample_changes_length_not_pitch() -> None:
    out = audio.resample(tone(1.0, 44100, 1000.0), 44100, 16000)
    assert len(out) == 16000
    assert _dominant_hz(out, 16000) == pytest.approx(1000.0, abs=3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty audio input"),
        (b"this is a text file, not audio\n" * 10, "could not decode audio"),
        (HOTWORDS_MP3.read_bytes()[:2000], "truncated"),
        (LIGHT_EN_WAV.read_bytes()[:44], "no samples|could not decode"),
    ],
    ids=["empty", "text", "truncated-mp3", "header-only-wav"],
)
def test_bad_input_raises_audio_error(data: bytes, message: str) -> None:
    with pytest.raises(AudioError, match=message):
        decode(data)


def test_too_long_audio_is_rejected() -> None:
    with pytest.raises(LimitExceededError, match="limit of 2 s") as caught:
        decode(LAMP_WAV, max_duration_s=2)
    assert caught.value.limit == "max_audio_s"


def test_pcm_to_float_rejects_bad_width_and_length() -> None:
    with pytest.raises(AudioError, match="sample width 3"):
        pcm_to_float(b"\0" * 6, 3)
    with pytest.raises(AudioError, match="not a multiple"):
        pcm_to_float(b"\0" * 3, 2)


def test_format_for_path() -> None:
    assert audio.format_for_path(Path("x.ogg")) == "opus"
    assert audio.format_for_path(Path("x.MP3")) == "mp3"
    with pytest.raises(AudioError, match="cannot tell"):
        audio.format_for_path(Path("x.txt"))


# ------------------------------------------------------- streaming conversion


def test_stream_resampler_matches_whole_clip_resampling() -> None:
    signal = tone(1.0, 44100, 1000.0)
    resampler = audio.StreamResampler(44100, 16000)
    parts = [resampler.process(signal[i : i + 1234]) for i in range(0, len(signal), 1234)]
    out = np.concatenate([*parts, resampler.flush()])
    assert len(out) == pytest.approx(16000, abs=2)
    assert _dominant_hz(out, 16000) == pytest.approx(1000.0, abs=3)
    # Same rate: chunks pass through untouched.
    same = audio.StreamResampler(16000, 16000)
    chunk = signal[:100]
    assert same.process(chunk) is chunk
    assert len(same.flush()) == 0


def test_pcm_converter_takes_any_format_and_rate_changes() -> None:
    converter = audio.PcmConverter(16000)
    stereo = np.stack([tone(0.5, 48000, 500.0)] * 2, axis=1)
    pcm = (stereo * 32767).astype("<i2").tobytes()
    first = converter.convert(pcm, 48000, 2, 2)
    # The client switches to 22.05 kHz mono u8 mid-stream: the old rate's tail comes first.
    mono_u8 = ((tone(0.5, 22050, 500.0) * 127) + 128).astype(np.uint8).tobytes()
    second = converter.convert(mono_u8, 22050, 1, 1)
    out = np.concatenate([first, second, converter.flush()])
    assert len(out) == pytest.approx(16000, abs=8)
    assert converter.received_s == 0.0  # reset by flush
    assert _dominant_hz(out, 16000) == pytest.approx(500.0, abs=5)
    for rate, width, channels in [(16000, 3, 1), (500, 2, 1), (16000, 2, 0), (True, 2, 1)]:
        with pytest.raises(AudioError):
            converter.convert(b"\0" * 12, rate, width, channels)


def test_decode_caps_native_rate_and_reads_flac_from_path(tmp_path: Path) -> None:
    path = tmp_path / "hi.flac"
    sf.write(path, np.stack([tone(0.5, 96000, 300.0)] * 3, axis=1), 96000)
    decoded = decode(path)
    assert decoded.rate_hz == audio.MAX_NATIVE_RATE_HZ
    assert decoded.duration_s == pytest.approx(0.5, abs=0.01)
    assert _dominant_hz(decoded.samples, decoded.rate_hz) == pytest.approx(300.0, abs=5)


# ------------------------------------------------------------ bounded decoding
#
# The attack files are built at test time in a fraction of a second: a short
# real encoding whose header claims hours (the declared-duration check), or
# whose header hides its real length (the running count). Memory is measured
# in a fresh interpreter: its peak RSS during decode() minus its RSS before.

_OGG_CRC_TABLE: list[int] = []
for _i in range(256):
    _r = _i << 24
    for _ in range(8):
        _r = ((_r << 1) ^ 0x04C11DB7) if _r & 0x80000000 else (_r << 1)
    _OGG_CRC_TABLE.append(_r & 0xFFFFFFFF)


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[((crc >> 24) & 0xFF) ^ byte]
    return crc


def _ogg_pages(data: bytes) -> list[bytearray]:
    pages, offset = [], 0
    while offset < len(data):
        assert data[offset : offset + 4] == b"OggS"
        count = data[offset + 26]
        size = 27 + count + sum(data[offset + 27 : offset + 27 + count])
        pages.append(bytearray(data[offset : offset + size]))
        offset += size
    return pages


def _ogg_page(page: bytearray, *, granule: int, sequence: int, last: bool) -> bytes:
    page[5] = (page[5] & ~0x04) | (0x04 if last else 0)  # end-of-stream flag
    page[6:14] = struct.pack("<q", granule)
    page[18:22] = struct.pack("<I", sequence)
    page[22:26] = b"\0\0\0\0"
    page[22:26] = struct.pack("<I", _ogg_crc(bytes(page)))
    return bytes(page)


def _opus_silence(seconds: float, *, repeat: int = 1, claim_s: float | None = None) -> bytes:
    """An Ogg/Opus file of ``seconds * repeat`` seconds of silence at 6 kbit/s (the
    encoded pages repeated), whose last page claims ``claim_s`` seconds."""
    import av

    sink = io.BytesIO()
    with av.open(sink, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        stream.bit_rate = 6000
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, round(48000 * seconds)), dtype=np.float32), format="flt", layout="mono"
        )
        frame.sample_rate, frame.pts = 48000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    pages = _ogg_pages(sink.getvalue())
    head, audio_pages = pages[:2], pages[2:]  # OpusHead, OpusTags
    span = struct.unpack("<q", audio_pages[-1][6:14])[0]
    out = [bytes(p) for p in head]
    sequence = 2
    for copy in range(repeat):
        for index, page in enumerate(audio_pages):
            granule = struct.unpack("<q", page[6:14])[0] + copy * span
            last = copy == repeat - 1 and index == len(audio_pages) - 1
            if last and claim_s is not None:
                granule = round(claim_s * 48000) + 312
            out.append(_ogg_page(bytearray(page), granule=granule, sequence=sequence, last=last))
            sequence += 1
    return b"".join(out)


def _flac_8ch_192k(seconds: float, *, claim_s: float | None) -> bytes:
    """8-channel 192 kHz FLAC of silence whose STREAMINFO claims ``claim_s``
    seconds (``None``: length unknown, as a streaming encoder writes it)."""
    sink = io.BytesIO()
    sf.write(
        sink,
        np.zeros((round(192000 * seconds), 8), dtype=np.int16),
        192000,
        format="FLAC",
        subtype="PCM_16",
    )
    data = bytearray(sink.getvalue())
    # STREAMINFO: 20 bits rate, 3 channels-1, 5 bits-1, 36 bits total samples.
    fields = int.from_bytes(data[18:26], "big")
    total = 0 if claim_s is None else round(claim_s * 192000)
    fields = (fields & ~((1 << 36) - 1)) | total
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


_MEASURE = """
import json, sys, time
from edgevoice.audio import decode, encode
from edgevoice.errors import LimitExceededError
from edgevoice.testing import tone

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

for fmt in ("opus", "flac", "wav"):  # load every codec once
    decode(encode(tone(0.2, 48000), 48000, fmt), rate_hz=16000)
data = open(sys.argv[1], "rb").read()
before = status("VmRSS")
started = time.monotonic()
try:
    audio = decode(data, rate_hz=16000, max_duration_s=float(sys.argv[2]))
    refused, decoded_s = False, audio.duration_s
except LimitExceededError as exc:
    refused, decoded_s = exc.limit == "max_audio_s", None
elapsed = time.monotonic() - started
print(json.dumps({"refused": refused, "decoded_s": decoded_s, "elapsed_s": elapsed,
                  "extra_mb": status("VmHWM") - before}))
"""


def _measure_decode(path: Path, max_duration_s: float) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(max_duration_s)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    measured: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


@pytest.mark.parametrize(
    "attack",
    ["opus-2h-6kbps", "flac-8ch-192k-25min"],
)
def test_declared_long_audio_refused_before_decoding(attack: str, tmp_path: Path) -> None:
    """The issue's OOM inputs: refused from the header, in < 1 s and < 50 MB.

    (Only the header is read, so the time bound holds on any CPU.)
    """
    path = tmp_path / attack
    if attack.startswith("opus"):
        path.write_bytes(_opus_silence(20.0, claim_s=2 * 3600))
    else:
        path.write_bytes(_flac_8ch_192k(1.0, claim_s=25 * 60))
    measured = _measure_decode(path, 300)
    assert measured["refused"], measured
    assert measured["elapsed_s"] < 1.0, measured
    assert measured["extra_mb"] < 50, measured


def test_lying_duration_stops_decoding_at_the_limit(tmp_path: Path) -> None:
    """An Ogg/Opus stream of 400 s whose header claims 1 s: decoding counts
    as it goes and stops at the 300 s limit, memory bounded by the output."""
    path = tmp_path / "lying.opus"
    path.write_bytes(_opus_silence(20.0, repeat=20, claim_s=1.0))
    measured = _measure_decode(path, 300)
    assert measured["refused"], measured
    assert measured["extra_mb"] < 50, measured
    # The same file under a higher limit decodes in full: the refusal was the count.
    decoded = decode(path, rate_hz=16000, max_duration_s=500)
    assert decoded.duration_s == pytest.approx(400, abs=1)


def test_unknown_length_flac_is_counted_while_decoding() -> None:
    data = _flac_8ch_192k(3.0, claim_s=None)
    with pytest.raises(LimitExceededError, match="max_audio_s"):
        decode(data, rate_hz=16000, max_duration_s=2.0)
    decoded = decode(data, rate_hz=16000, max_duration_s=5.0)
    assert decoded.duration_s == pytest.approx(3.0, abs=0.01)
