"""Short feedback sounds: built-in tones (no files shipped) or audio files.

``chime`` (wake word heard), ``done`` (command handled) and ``alarm`` (a timer
finished) are generated; any other non-empty value is a path to an audio file
(decoded once, bounded by ``[limits] max_audio_s``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from edgevoice.audio import Audio, decode
from edgevoice.engines.base import FloatAudio

SOUND_RATE_HZ = 22050
BUILTIN_SOUNDS = ("chime", "done", "alarm")


def _tone(freq_hz: float, duration_s: float, level: float = 0.3) -> FloatAudio:
    t = np.arange(int(duration_s * SOUND_RATE_HZ), dtype=np.float32) / SOUND_RATE_HZ
    envelope = np.minimum(1.0, np.minimum(t, duration_s - t) / 0.01).astype(np.float32)
    out: FloatAudio = (level * envelope * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    return out


def _gap(duration_s: float) -> FloatAudio:
    return np.zeros(int(duration_s * SOUND_RATE_HZ), dtype=np.float32)


def builtin_sound(name: str) -> Audio:
    """One of :data:`BUILTIN_SOUNDS`."""
    if name == "chime":
        samples = np.concatenate([_tone(880, 0.09), _gap(0.03), _tone(1320, 0.12)])
    elif name == "done":
        samples = np.concatenate([_tone(1320, 0.08), _gap(0.03), _tone(880, 0.1)])
    elif name == "alarm":
        beep = np.concatenate([_tone(1000, 0.15, 0.4), _gap(0.1)])
        samples = np.concatenate([beep, beep, beep, _gap(0.4)])
    else:
        raise ValueError(f"unknown built-in sound {name!r}; use one of {', '.join(BUILTIN_SOUNDS)}")
    return Audio(samples.astype(np.float32), SOUND_RATE_HZ)


async def load_sound(value: str, max_audio_s: float) -> Audio | None:
    """The sound a config value names: ``""`` → ``None``, a built-in name, or a file.

    Raises :class:`~edgevoice.audio.AudioError` / :class:`OSError` for a bad file.
    """
    if not value:
        return None
    if value in BUILTIN_SOUNDS:
        return builtin_sound(value)
    return await asyncio.to_thread(_decode_file, value, max_audio_s)


def _decode_file(value: str, max_audio_s: float) -> Audio:
    """Blocking: decode the sound file ``value`` names."""
    return decode(Path(value).expanduser(), max_duration_s=max_audio_s)
