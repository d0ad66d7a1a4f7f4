"""The voice library: sanitized ids, validated and normalized samples, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgevoice.audio import AudioError, decode, encode
from edgevoice.errors import LimitExceededError, PayloadTooLargeError, UnknownModelError
from edgevoice.testing import tone
from edgevoice.voices import (
    STORED_RATE_HZ,
    VoiceLibrary,
    VoiceLibraryError,
    VoiceNotFoundError,
    sanitize_name,
    slugify,
    valid_voice_id,
)
from tests.conftest import LAMP_TEXT, LAMP_WAV


def test_names_and_ids_are_sanitized() -> None:
    assert slugify("Grandma's Voice #2") == "grandma-s-voice-2"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("Zoë Ångström") == "zoe-angstrom"
    assert slugify("???") == "voice"
    assert len(slugify("x" * 500)) == 48
    assert sanitize_name("  A\tname\x00 with\ncontrols ") == "A name with controls"
    with pytest.raises(VoiceLibraryError):
        sanitize_name("\x00 \n")
    with pytest.raises(VoiceLibraryError):
        sanitize_name("n" * 101)
    for bad in ("../voice_x", "voice_x/../../y", "voice_", "voice_A", "joe", "voice_x.wav", ""):
        assert not valid_voice_id(bad), bad
    assert valid_voice_id("voice_grandma-s-voice-2")


def test_add_normalizes_and_survives_a_new_instance(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    library = VoiceLibrary(root)
    voice = library.add("Lamp / speaker", LAMP_WAV.read_bytes(), f"  {LAMP_TEXT}\n")
    assert voice.id == "voice_lamp-speaker"
    assert voice.transcript == LAMP_TEXT
    assert voice.duration_s == pytest.approx(3.0, abs=0.02)
    info = sf.info(str(root / f"{voice.id}.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (STORED_RATE_HZ, 1, "PCM_16")
    stored = decode(root / f"{voice.id}.wav")
    assert float(np.max(np.abs(stored.samples))) == pytest.approx(10 ** (-1 / 20), abs=0.002)
    assert abs(float(stored.samples.mean())) < 1e-3

    reopened = VoiceLibrary(root)
    assert [v.id for v in reopened.voices()] == [voice.id]
    assert reopened.get(voice.id) == voice
    reference = reopened.reference(voice.id)
    assert reference.sample_rate_hz == STORED_RATE_HZ and reference.text == LAMP_TEXT
    assert len(reference.audio) == len(stored.samples)

    again = reopened.add("Lamp / speaker", LAMP_WAV.read_bytes())
    assert again.id == "voice_lamp-speaker-2"
    reopened.delete(voice.id)
    with pytest.raises(VoiceNotFoundError):
        reopened.get(voice.id)
    with pytest.raises(VoiceNotFoundError):
        reopened.delete(voice.id)
    assert sorted(p.name for p in root.iterdir()) == [
        "voice_lamp-speaker-2.json",
        "voice_lamp-speaker-2.wav",
    ]


def test_reference_audio_is_validated(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path / "voices")
    with pytest.raises(VoiceLibraryError, match="1-30 s"):
        library.add("short", encode(tone(0.5), 16000, "wav"))
    with pytest.raises(VoiceLibraryError, match="1-30 s"):
        library.add("long", encode(tone(31.0, 8000), 8000, "wav"))
    with pytest.raises(VoiceLibraryError, match="silent"):
        library.add("silence", encode(np.zeros(32000, np.float32), 16000, "wav"))
    with pytest.raises(AudioError):
        library.add("garbage", b"definitely not audio")
    with pytest.raises(VoiceLibraryError):
        library.add("x", LAMP_WAV.read_bytes(), "t" * 2001)
    assert library.voices() == []


def test_lookups_never_leave_the_library(tmp_path: Path) -> None:
    root = tmp_path / "voices"
    secret = tmp_path / "voice_secret.json"
    secret.write_text('{"name": "outside"}')
    library = VoiceLibrary(root)
    for bad in ("../voice_secret", "..%2Fvoice_secret", "/etc/passwd", "voice_secret/.."):
        with pytest.raises(VoiceNotFoundError):
            library.get(bad)
        with pytest.raises(VoiceNotFoundError):
            library.delete(bad)
    assert secret.exists()


def test_quota_is_checked_before_storing(tmp_path: Path) -> None:
    sample = LAMP_WAV.read_bytes()
    counted = VoiceLibrary(tmp_path / "count", max_voices=1)
    counted.add("first", sample)
    with pytest.raises(LimitExceededError) as full:
        counted.add("second", sample)
    assert full.value.limit == "max_voices" and "limits.max_voices" in str(full.value)
    assert [v.id for v in counted.voices()] == ["voice_first"]
    assert counted.usage()[0] == 1

    # One 3 s sample is ~145 kB stored (24 kHz, 16-bit).
    sized = VoiceLibrary(tmp_path / "bytes", max_bytes=200_000)
    sized.add("first", sample)
    with pytest.raises(PayloadTooLargeError) as too_big:
        sized.add("second", sample)
    assert too_big.value.limit == "max_voice_library_bytes"
    assert sorted(p.name for p in (tmp_path / "bytes").iterdir()) == [
        "voice_first.json",
        "voice_first.wav",
    ]
    sized.delete("voice_first")
    assert sized.add("second", sample).id == "voice_second"
    # A library that holds nothing refuses before decoding anything.
    with pytest.raises(LimitExceededError):
        VoiceLibrary(tmp_path / "none", max_voices=0).add("x", b"not even audio")


def test_unknown_ids_name_only_themselves(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path / "voices")
    library.add("Private Person", LAMP_WAV.read_bytes())
    with pytest.raises(VoiceNotFoundError) as caught:
        library.reference("voice_someone-else")
    assert "voice_someone-else" in str(caught.value)
    assert "private" not in str(caught.value).lower()
    assert isinstance(caught.value, UnknownModelError) and caught.value.param == "voice"


def test_long_reference_is_refused_without_decoding_it_all(tmp_path: Path) -> None:
    library = VoiceLibrary(tmp_path / "voices")
    ten_minutes = encode(tone(600.0, 8000), 8000, "flac")
    with pytest.raises(VoiceLibraryError, match="1-30 s"):
        library.add("long", ten_minutes)
    assert library.voices() == []


def test_names_keep_format_characters() -> None:
    # Emoji sequences join with ZWJ (a format character): names keep them.
    family = "\U0001f469\u200d\U0001f467"
    assert sanitize_name(f"{family}\x07 voice") == f"{family} voice"
