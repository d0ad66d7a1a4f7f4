"""The voice library: reference voices for cloning, stored under ``state_dir/voices``.

Each stored voice is two files named by its id: ``<id>.wav`` (the reference
sample, normalized: mono, 24 kHz, 16-bit, DC removed, peak at -1 dBFS) and
``<id>.json`` (name, transcript, creation time). Ids are generated from the
sanitized name (``voice_<slug>``), so a request can never name a path outside
the library: every lookup checks the id against :data:`VOICE_ID_PATTERN`
before touching the filesystem.

The library is bounded: ``limits.max_voices`` voices and
``limits.max_voice_library_bytes`` of stored samples, checked before a new
voice is written. Errors belong to the shared taxonomy (bad samples are
client errors; an unknown id is an :class:`~edgevoice.errors.UnknownModelError`
that names that id only, never the other stored ones).

Every method is blocking (file I/O, decoding); the HTTP API calls them in
worker threads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from edgevoice.audio import Audio, AudioError, decode, float_to_pcm16, wav_header
from edgevoice.engines.base import VoiceReference
from edgevoice.errors import (
    ClientError,
    LimitExceededError,
    PayloadTooLargeError,
    UnknownModelError,
)

_LOGGER = logging.getLogger(__name__)

VOICE_ID_PATTERN: Final = re.compile(r"^voice_[a-z0-9][a-z0-9-]{0,63}$")
STORED_RATE_HZ: Final = 24000
MIN_REFERENCE_S: Final = 1.0
MAX_REFERENCE_S: Final = 30.0
MAX_NAME_CHARS: Final = 100
MAX_TRANSCRIPT_CHARS: Final = 2000
_PEAK: Final = 10 ** (-1 / 20)  # -1 dBFS


class VoiceLibraryError(ClientError, ValueError):
    """A bad voice name, transcript or reference sample (a client fault)."""

    code = "invalid_voice"


class VoiceNotFoundError(UnknownModelError):
    """No stored voice has this id (the message names this id only)."""

    def __init__(self, voice_id: str) -> None:
        super().__init__("tts", voice_id, param="voice")


@dataclass(frozen=True, slots=True)
class StoredVoice:
    id: str
    name: str
    created_at: int
    """Unix time (seconds)."""
    duration_s: float
    transcript: str | None = None

    def to_json(self) -> dict[str, Any]:
        """OpenAI's voice object, plus our fields."""
        return {
            "id": self.id,
            "object": "audio.voice",
            "type": "audio_sample",
            "name": self.name,
            "created_at": self.created_at,
            "duration_s": round(self.duration_s, 3),
            "transcript": self.transcript,
        }


def sanitize_name(name: str) -> str:
    """A display name without control characters, whitespace collapsed."""
    # Control characters go; format characters stay (emoji sequences use ZWJ).
    cleaned = "".join(
        " " if c.isspace() else c for c in name if c.isspace() or unicodedata.category(c) != "Cc"
    )
    cleaned = " ".join(cleaned.split())
    if not cleaned:
        raise VoiceLibraryError("voice name is empty")
    if len(cleaned) > MAX_NAME_CHARS:
        raise VoiceLibraryError(f"voice name is longer than {MAX_NAME_CHARS} characters")
    return cleaned


def slugify(name: str) -> str:
    """``"Grandma's Voice #2"`` → ``"grandma-s-voice-2"`` (ASCII, at most 48 chars)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:48].strip("-")
    return slug or "voice"


def valid_voice_id(voice_id: str) -> bool:
    return bool(VOICE_ID_PATTERN.fullmatch(voice_id))


def normalize_reference(audio: Audio) -> Audio:
    """Mono 24 kHz, DC removed, peak at -1 dBFS; validates the 1-30 s length."""
    duration = audio.duration_s
    if duration < MIN_REFERENCE_S or duration > MAX_REFERENCE_S:
        raise VoiceLibraryError(
            f"reference audio is {duration:.1f} s long; it must be "
            f"{MIN_REFERENCE_S:.0f}-{MAX_REFERENCE_S:.0f} s"
        )
    resampled = audio.at_rate(STORED_RATE_HZ).samples
    centered = resampled - np.float32(resampled.mean())
    peak = float(np.max(np.abs(centered))) if len(centered) else 0.0
    if peak < 1e-4:
        raise VoiceLibraryError("reference audio is silent")
    samples = (centered * np.float32(_PEAK / peak)).astype(np.float32)
    return Audio(samples, STORED_RATE_HZ)


def decode_reference(data: bytes) -> Audio:
    """Decode and normalize a reference sample (blocking).

    Raises :class:`AudioError` when undecodable, :class:`VoiceLibraryError`
    when too short, too long or silent.
    """
    try:
        audio = decode(data, max_duration_s=MAX_REFERENCE_S + 1.0)
    except LimitExceededError:
        raise VoiceLibraryError(
            f"reference audio is longer than {MAX_REFERENCE_S:.0f} s; it must be "
            f"{MIN_REFERENCE_S:.0f}-{MAX_REFERENCE_S:.0f} s"
        ) from None
    return normalize_reference(audio)


class VoiceLibrary:
    """Stored reference voices, at most ``max_voices`` and ``max_bytes``. Blocking; thread-safe."""

    def __init__(
        self, root: Path, *, max_voices: int = 100, max_bytes: int = 200 * 1024 * 1024
    ) -> None:
        self.root = root
        self.max_voices = max_voices
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def usage(self) -> tuple[int, int]:
        """``(voices, bytes)`` stored now (sample and metadata files)."""
        if not self.root.is_dir():
            return 0, 0
        count = 0
        size = 0
        for path in self.root.iterdir():
            if not path.name.startswith("voice_"):
                continue
            if path.suffix == ".json":
                count += 1
            if path.suffix in (".json", ".wav"):
                try:
                    size += path.stat().st_size
                except OSError:
                    continue  # deleted meanwhile
        return count, size

    def _check_quota(self, new_bytes: int) -> None:
        """Raise when one more voice of ``new_bytes`` would not fit."""
        count, size = self.usage()
        if count >= self.max_voices:
            raise LimitExceededError(
                "max_voices",
                self.max_voices,
                what="the voice library",
                unit="voices; delete one first",
            )
        if size + new_bytes > self.max_bytes:
            raise PayloadTooLargeError(
                "max_voice_library_bytes",
                self.max_bytes,
                what=f"the voice library ({size} bytes stored, {new_bytes} more)",
                unit="bytes; delete a voice first",
            )

    def _paths(self, voice_id: str) -> tuple[Path, Path]:
        if not valid_voice_id(voice_id):
            raise VoiceNotFoundError(voice_id)
        return self.root / f"{voice_id}.wav", self.root / f"{voice_id}.json"

    def add(self, name: str, audio_data: bytes, transcript: str | None = None) -> StoredVoice:
        """Validate, normalize and store a reference sample; returns the new voice."""
        display = sanitize_name(name)
        text = " ".join(transcript.split()) if transcript else None
        if text and len(text) > MAX_TRANSCRIPT_CHARS:
            raise VoiceLibraryError(f"transcript is longer than {MAX_TRANSCRIPT_CHARS} characters")
        self._check_quota(0)  # a full library refuses before decoding anything
        audio = decode_reference(audio_data)
        pcm = float_to_pcm16(audio.samples)
        with self._lock:
            # Checked again under the lock: concurrent uploads cannot both squeeze in.
            self._check_quota(len(pcm) + 44 + 1024)
            self.root.mkdir(parents=True, exist_ok=True)
            base = f"voice_{slugify(display)}"
            voice_id, n = base, 1
            while any(p.exists() for p in self._paths(voice_id)):
                n += 1
                voice_id = f"{base}-{n}"
            voice = StoredVoice(
                id=voice_id,
                name=display,
                created_at=int(time.time()),
                duration_s=audio.duration_s,
                transcript=text or None,
            )
            wav_path, meta_path = self._paths(voice_id)
            _write_atomic(wav_path, wav_header(STORED_RATE_HZ, len(pcm)) + pcm)
            meta = {
                "id": voice.id,
                "name": voice.name,
                "created_at": voice.created_at,
                "duration_s": voice.duration_s,
                "transcript": voice.transcript,
            }
            # The metadata is written last: a voice exists once its .json does.
            _write_atomic(meta_path, json.dumps(meta, ensure_ascii=False).encode())
        _LOGGER.info("Stored voice %s (%r, %.1f s)", voice.id, voice.name, voice.duration_s)
        return voice

    def get(self, voice_id: str) -> StoredVoice:
        _wav, meta_path = self._paths(voice_id)
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VoiceNotFoundError(voice_id) from None
        except (OSError, ValueError) as exc:
            _LOGGER.warning("Unreadable voice metadata %s: %s", meta_path, exc)
            raise VoiceNotFoundError(voice_id) from None
        return StoredVoice(
            id=voice_id,
            name=str(raw.get("name", voice_id)),
            created_at=int(raw.get("created_at", 0)),
            duration_s=float(raw.get("duration_s", 0.0)),
            transcript=raw.get("transcript") or None,
        )

    def voices(self) -> list[StoredVoice]:
        if not self.root.is_dir():
            return []
        voices = []
        for meta_path in sorted(self.root.glob("voice_*.json")):
            try:
                voices.append(self.get(meta_path.stem))
            except VoiceNotFoundError:
                continue
        return sorted(voices, key=lambda v: (v.created_at, v.id))

    def reference(self, voice_id: str) -> VoiceReference:
        """The stored sample as a cloning reference."""
        voice = self.get(voice_id)
        wav_path, _meta = self._paths(voice_id)
        try:
            audio = decode(wav_path, max_duration_s=MAX_REFERENCE_S + 1.0)
        except AudioError as exc:
            _LOGGER.warning("Unreadable voice sample %s: %s", wav_path, exc)
            raise VoiceNotFoundError(voice_id) from None
        return VoiceReference(
            audio=audio.samples,
            sample_rate_hz=audio.rate_hz,
            text=voice.transcript,
            voice_id=voice_id,
        )

    def delete(self, voice_id: str) -> None:
        wav_path, meta_path = self._paths(voice_id)
        with self._lock:
            try:
                meta_path.unlink()
            except FileNotFoundError:
                raise VoiceNotFoundError(voice_id) from None
            wav_path.unlink(missing_ok=True)
        _LOGGER.info("Deleted voice %s", voice_id)


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
