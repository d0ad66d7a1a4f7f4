"""Transcript output formats shared by the CLI and the HTTP API (OpenAI's shapes)."""

from __future__ import annotations

import json
from typing import Any, Final, Literal

from edgevoice.engines.base import Transcript

TranscriptFormat = Literal["text", "json", "verbose_json", "srt", "vtt"]
TRANSCRIPT_FORMATS: Final[tuple[str, ...]] = ("text", "json", "verbose_json", "srt", "vtt")

# OpenAI's verbose_json reports the language by its English name.
LANGUAGE_NAMES: Final[dict[str, str]] = {
    "en": "english",
    "de": "german",
    "fr": "french",
    "es": "spanish",
    "it": "italian",
    "nl": "dutch",
    "pt": "portuguese",
    "pl": "polish",
    "ru": "russian",
    "uk": "ukrainian",
    "sv": "swedish",
    "da": "danish",
    "no": "norwegian",
    "fi": "finnish",
    "cs": "czech",
    "tr": "turkish",
    "el": "greek",
    "hu": "hungarian",
    "ro": "romanian",
    "zh": "chinese",
    "ja": "japanese",
    "ko": "korean",
    "ar": "arabic",
    "he": "hebrew",
    "hi": "hindi",
    "vi": "vietnamese",
    "th": "thai",
    "id": "indonesian",
    "ca": "catalan",
    "fa": "persian",
}


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(transcript: Transcript) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start_s, ',')} --> {_timestamp(s.end_s, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(transcript.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    blocks = [
        f"{_timestamp(s.start_s, '.')} --> {_timestamp(s.end_s, '.')}\n{s.text.strip()}\n"
        for s in transcript.segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose_json(transcript: Transcript, task: str = "transcribe") -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task,
        "language": LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": round(transcript.duration_s, 3),
        "text": transcript.text,
        "segments": [
            {
                "id": s.id,
                "seek": 0,
                "start": round(s.start_s, 3),
                "end": round(s.end_s, 3),
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
                # What engines such as SenseVoice tag (language, emotion, audio events).
                **({"language": s.language} if s.language else {}),
                **({"emotion": s.emotion} if s.emotion else {}),
                **({"events": list(s.events)} if s.events else {}),
            }
            for s in transcript.segments
        ],
    }
    if transcript.emotion:
        body["emotion"] = transcript.emotion
    if transcript.events:
        body["events"] = list(transcript.events)
    words = [w for s in transcript.segments for w in s.words]
    if words:
        body["words"] = [
            {"word": w.word.strip(), "start": round(w.start_s, 3), "end": round(w.end_s, 3)}
            for w in words
        ]
    return body


def format_transcript(transcript: Transcript, fmt: str, task: str = "transcribe") -> str:
    """Render ``transcript`` as OpenAI's ``response_format`` would."""
    if fmt == "text":
        return transcript.text + "\n"
    if fmt == "json":
        return json.dumps({"text": transcript.text}, ensure_ascii=False)
    if fmt == "verbose_json":
        return json.dumps(verbose_json(transcript, task), ensure_ascii=False)
    if fmt == "srt":
        return to_srt(transcript)
    if fmt == "vtt":
        return to_vtt(transcript)
    raise ValueError(
        f"unknown transcript format {fmt!r}; use one of {', '.join(TRANSCRIPT_FORMATS)}"
    )
