"""The voice library: sanitized ids, validated and normalized samples, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgevoice.audio import AudioError, decode, encode
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
