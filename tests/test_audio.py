"""Audio layer: decode any format, resample, encode every output format."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgevoice import audio
from edgevoice.audio import AudioError, StreamEncoder, decode, encode, pcm_to_float
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
    with pytest.raises(AudioError, match="limit is 2 s"):
        decode(LAMP_WAV, max_duration_s=2)


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
