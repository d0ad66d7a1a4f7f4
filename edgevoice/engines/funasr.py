"""ASR with FunASR: SenseVoiceSmall and Paraformer-zh. Extra: ``edgevoice[funasr]``.

``model`` is a FunASR model directory (``config.yaml`` or ``configuration.json``
with ``model.pt``, tokenizer and ``am.mvn``), one of the models Xinference
lists (``SenseVoiceSmall`` → ``FunAudioLLM/SenseVoiceSmall``, ``paraformer-zh``
→ ``funasr/paraformer-zh``) or another Hugging Face repo id; repos come from
``cache_dir`` (downloaded there unless ``offline = true``).

SenseVoice tags what it hears: ``<|en|><|HAPPY|><|Speech|><|withitn|>text``.
The tags are stripped from the text into each segment's ``language``,
``emotion`` and ``events`` (see :func:`parse_rich_text`), which the
transcript carries as well.

Long audio is cut before decoding, so memory stays bounded: with
``vad_model`` (``"fsmn-vad"``, or, as Xinference documents for offline use, a
local path to a downloaded FSMN-VAD model directory) at the speech segments
the VAD finds, at most ``max_segment_s`` each, neighbours merged up to
``merge_length_s`` (Xinference's ``merge_vad``); the VAD itself looks at
``vad_window_s`` of audio at a time. Without a VAD the audio is cut into
windows of ``max_segment_s``. Segments are decoded lazily, one per ``next()``.
``punc_model`` (``"ct-punc"`` or a local path) adds punctuation to models that
output none (Paraformer). torch, funasr and its models load in :meth:`load`;
fbank features come from kaldi-native-fbank (no torchaudio).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydantic import Field, field_validator

from edgevoice.engines.base import (
    AsrCapabilities,
    EngineContext,
    EngineKind,
    EngineOptions,
    EnginePlugin,
    EngineRequestError,
    FloatAudio,
    Segment,
    TranscribeOptions,
    TranscriptInfo,
)
from edgevoice.model_files import ModelNotFoundError, as_local_path, hf_snapshot

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME: Final = "funasr"
SAMPLE_RATE_HZ: Final = 16000
MIN_SPAN_S: Final = 0.05
"""Shorter pieces of audio are not decoded (too short for one feature frame)."""

MODELS: Final[Mapping[str, str]] = {
    "SenseVoiceSmall": "FunAudioLLM/SenseVoiceSmall",
    "sensevoice-small": "FunAudioLLM/SenseVoiceSmall",
    "paraformer-zh": "funasr/paraformer-zh",
}
"""Xinference's FunASR model names → their Hugging Face repos."""
VAD_MODELS: Final[Mapping[str, str]] = {"fsmn-vad": "funasr/fsmn-vad"}
PUNC_MODELS: Final[Mapping[str, str]] = {"ct-punc": "funasr/ct-punc"}

SENSEVOICE_LANGUAGES: Final = ("zh", "en", "yue", "ja", "ko")
"""What SenseVoiceSmall recognises (``language=None`` detects among them)."""
_LANGUAGE_TAGS: Final = frozenset({*SENSEVOICE_LANGUAGES, "nospeech"})
_EMOTION_TAGS: Final[Mapping[str, str | None]] = {
    "HAPPY": "happy",
    "SAD": "sad",
    "ANGRY": "angry",
    "NEUTRAL": "neutral",
    "FEARFUL": "fearful",
    "DISGUSTED": "disgusted",
    "SURPRISED": "surprised",
    "EMO_UNKNOWN": None,
}
_EVENT_TAGS: Final[Mapping[str, str | None]] = {
    "Speech": "speech",
    "BGM": "bgm",
    "Applause": "applause",
    "Laughter": "laughter",
    "Cry": "cry",
    "Sneeze": "sneeze",
    "Breath": "breath",
    "Cough": "cough",
    "Event_UNK": None,
}
_TAG = re.compile(r"<\|([^<>|]{0,40})\|>")


@dataclass(frozen=True, slots=True)
class RichText:
    """SenseVoice output with its tags taken out."""

    text: str
    language: str | None = None
    """The first language tag (``zh``, ``en``, ``yue``, ``ja``, ``ko``)."""
    emotion: str | None = None
    """The first known emotion tag, lower case (``happy``, ``neutral``, ...)."""
    events: tuple[str, ...] = ()
    """Known audio-event tags, lower case, in order, each once (``speech``, ``bgm``, ...)."""
    no_speech: bool = False
    """The model tagged the audio ``<|nospeech|>``."""


def parse_rich_text(raw: str) -> RichText:
    """Strip SenseVoice's ``<|…|>`` tags out of ``raw`` into metadata.

    ``"<|en|><|HAPPY|><|Speech|><|withitn|>Hello."`` → text ``"Hello."``,
    language ``en``, emotion ``happy``, events ``("speech",)``. Tags anywhere
    in the text count (merged segments repeat them); unknown tags and the
    ``withitn``/``woitn`` markers are dropped. Linear in ``len(raw)``.
    """
    language: str | None = None
    emotion: str | None = None
    events: dict[str, None] = {}
    no_speech = False
    for match in _TAG.finditer(raw):
        tag = match[1]
        if tag in _LANGUAGE_TAGS:
            if tag == "nospeech":
                no_speech = True
            elif language is None:
                language = tag
        elif tag in _EMOTION_TAGS:
            if emotion is None:
                emotion = _EMOTION_TAGS[tag]
        elif (event := _EVENT_TAGS.get(tag)) is not None:
            events[event] = None
    text = " ".join(_TAG.sub(" ", raw).split())
    return RichText(text, language, emotion, tuple(events), no_speech)


class FunAsrOptions(EngineOptions):
    language: str | None = None
    """Default language when a request names none (SenseVoice: zh, en, yue, ja,
    ko; None detects)."""
    use_itn: bool = True
    """SenseVoice: punctuation and inverse text normalisation ("twenty" → "20")."""
    ban_emo_unk: bool = False
    """SenseVoice: always pick an emotion instead of "unknown"."""
    vad_model: str | None = None
    """``"fsmn-vad"`` or a local FSMN-VAD model directory; ``None`` cuts fixed windows."""
    max_segment_s: float = Field(default=30.0, ge=1.0, le=60.0)
    """Longest piece decoded at once (the VAD's ``max_single_segment_time``)."""
    merge_length_s: float = Field(default=15.0, ge=0.0, le=60.0)
    """Neighbouring VAD segments are merged up to this length (0: never)."""
    vad_window_s: float = Field(default=60.0, ge=5.0, le=600.0)
    """Audio the VAD analyses at once (bounds its feature memory)."""
    punc_model: str | None = None
    """``"ct-punc"`` or a local punctuation model directory (for Paraformer)."""
    cpu_threads: int = Field(default=0, ge=0, le=256)
    """torch intra-op threads; 0 leaves the process's setting. Process-wide."""

    @field_validator("language")
    @classmethod
    def _language(cls, value: str | None) -> str | None:
        return None if value is None else value.strip().lower() or None


def resolve_model(
    model: str, cache_dir: Path, offline: bool, names: Mapping[str, str], what: str
) -> Path:
    """The local directory of a FunASR model (blocking; may download)."""
    local = as_local_path(model)
    if local is None:
        repo_id = names.get(model, model)
        if "/" not in repo_id:
            raise ModelNotFoundError(
                f"unknown FunASR {what} {model!r}: use a local model directory, one of "
                f"{', '.join(names)} or an org/repo id"
            )
        local = hf_snapshot(
            repo_id,
            cache_dir=cache_dir,
            offline=offline,
            install_hint=(
                f"download the {what} once (offline = false) or set it to a local FunASR "
                "model directory"
            ),
        )
    if not local.is_dir() or not any(
        (local / name).is_file() for name in ("config.yaml", "configuration.json")
    ):
        raise ModelNotFoundError(
            f"{local} is not a FunASR model directory (no config.yaml or configuration.json)"
        )
    return local


def merge_spans(spans: Iterable[tuple[int, int]], max_samples: int) -> Iterator[tuple[int, int]]:
    """Merge neighbouring ``(start, end)`` spans while the merged one stays within
    ``max_samples`` (Xinference's ``merge_vad``); lazy."""
    current: tuple[int, int] | None = None
    for start, end in spans:
        if current is not None and end - current[0] <= max_samples:
            current = (current[0], end)
            continue
        if current is not None:
            yield current
        current = (start, end)
    if current is not None:
        yield current


def split_long(spans: Iterable[tuple[int, int]], max_samples: int) -> Iterator[tuple[int, int]]:
    """Cut spans longer than ``max_samples`` into pieces of at most that."""
    for start, end in spans:
        for piece in range(start, end, max_samples):
            yield piece, min(end, piece + max_samples)


class FunAsrEngine:
    """One FunASR model (SenseVoice, Paraformer, ...) with its optional VAD and
    punctuation models.

    Thread-safe: every call decodes with its own copy of the model's keyword
    arguments (FunASR's ``AutoModel`` keeps per-call state, so it is not used
    for decoding). Blocking; runs in the hub's worker threads.
    """

    def __init__(self, context: EngineContext, options: FunAsrOptions) -> None:
        self._context = context
        self._options = options
        self._model: Any = None
        self._kwargs: dict[str, Any] = {}
        self._vad: tuple[Any, dict[str, Any]] | None = None
        self._punc: tuple[Any, dict[str, Any]] | None = None
        self._sensevoice = True
        self._capabilities = AsrCapabilities(
            languages=SENSEVOICE_LANGUAGES, sample_rate_hz=SAMPLE_RATE_HZ
        )

    @property
    def capabilities(self) -> AsrCapabilities:
        return self._capabilities

    def load(self) -> None:
        import torch
        from funasr import AutoModel

        started = time.monotonic()
        threads = self._options.cpu_threads or torch.get_num_threads()
        device = self._context.device
        cache, offline = self._context.cache_dir, self._context.offline

        def build(path: Path, **extra: Any) -> tuple[Any, dict[str, Any]]:
            # build_model, not AutoModel(): no update check over the network,
            # no logging.basicConfig, and the thread count stays as we set it.
            model, kwargs = AutoModel.build_model(
                model=str(path),
                device=device,
                ncpu=threads,
                disable_update=True,
                disable_pbar=True,
                disable_log=True,
                **extra,
            )
            kwargs.pop("cache", None)
            return model, dict(kwargs)

        model_dir = resolve_model(self._context.model.model, cache, offline, MODELS, "model")
        self._model, self._kwargs = build(model_dir)
        class_name = str(self._kwargs.get("model", type(self._model).__name__))
        self._sensevoice = "SenseVoice" in class_name
        if self._options.vad_model is not None:
            vad_dir = resolve_model(self._options.vad_model, cache, offline, VAD_MODELS, "VAD")
            self._vad = build(
                vad_dir, max_single_segment_time=int(self._options.max_segment_s * 1000)
            )
        if self._options.punc_model is not None:
            punc_dir = resolve_model(
                self._options.punc_model, cache, offline, PUNC_MODELS, "punctuation model"
            )
            self._punc = build(punc_dir)
        if self._sensevoice:
            languages: tuple[str, ...] = SENSEVOICE_LANGUAGES
        else:
            languages = (self._options.language or "zh",)
        if self._options.language is not None and self._options.language not in languages:
            raise ValueError(
                f"language {self._options.language!r} is not one of {class_name}'s: "
                f"{', '.join(languages)}"
            )
        self._capabilities = AsrCapabilities(languages=languages, sample_rate_hz=SAMPLE_RATE_HZ)
        # One short run: a broken model fails now, not on the first request.
        self._decode(np.zeros(SAMPLE_RATE_HZ // 2, np.float32), self._options.language)
        _LOGGER.info(
            "FunASR %s (%s%s%s) loaded on %s in %.2f s",
            self._context.model.model,
            class_name,
            ", VAD" if self._vad else "",
            ", punctuation" if self._punc else "",
            device,
            time.monotonic() - started,
        )

    # ------------------------------------------------------------ decoding

    def _request_language(self, options: TranscribeOptions) -> str | None:
        language = options.language or self._options.language
        if language is None:
            return None
        language = language.strip().lower()
        if language not in self._capabilities.languages:
            raise EngineRequestError(
                f"model {self._context.model.name!r} does not know language {language!r}; "
                f"it knows {', '.join(self._capabilities.languages)}",
                param="language",
            )
        return language

    def _decode(self, samples: FloatAudio, language: str | None) -> RichText:
        """Decode one bounded piece of audio (blocking)."""
        import torch

        kwargs = dict(self._kwargs)
        kwargs.update(
            language=language or "auto",
            use_itn=self._options.use_itn,
            ban_emo_unk=self._options.ban_emo_unk,
        )
        with torch.no_grad():
            results, _meta = self._model.inference(data_in=[samples], key=["utterance"], **kwargs)
        raw = str(results[0].get("text", "")) if results else ""
        rich = parse_rich_text(raw)
        if self._punc is not None and rich.text:
            punc_model, punc_kwargs = self._punc
            with torch.no_grad():
                punctuated, _meta = punc_model.inference(
                    data_in=rich.text, key=["utterance"], **punc_kwargs
                )
            if punctuated and punctuated[0].get("text"):
                rich = RichText(
                    str(punctuated[0]["text"]),
                    rich.language,
                    rich.emotion,
                    rich.events,
                    rich.no_speech,
                )
        return rich

    def _vad_spans(self, audio: FloatAudio) -> Iterator[tuple[int, int]]:
        """Speech spans (sample offsets) found by the VAD, window by window; lazy."""
        import torch

        assert self._vad is not None
        vad_model, vad_kwargs = self._vad
        window = int(self._options.vad_window_s * SAMPLE_RATE_HZ)
        for offset in range(0, len(audio), window):
            chunk = audio[offset : offset + window]
            if len(chunk) < MIN_SPAN_S * SAMPLE_RATE_HZ:
                break
            with torch.no_grad():
                results, _meta = vad_model.inference(
                    data_in=[chunk], key=["utterance"], cache={}, **vad_kwargs
                )
            for begin_ms, end_ms in results[0].get("value", []) if results else []:
                start = offset + max(0, int(begin_ms * SAMPLE_RATE_HZ / 1000))
                end = offset + min(len(chunk), int(end_ms * SAMPLE_RATE_HZ / 1000))
                if end > start:
                    yield start, end

    def spans(self, audio: FloatAudio) -> Iterator[tuple[int, int]]:
        """The pieces ``audio`` is decoded in (sample offsets, each at most
        ``max_segment_s``); lazy."""
        longest = int(self._options.max_segment_s * SAMPLE_RATE_HZ)
        if self._vad is None:
            found: Iterable[tuple[int, int]] = [(0, len(audio))]
        else:
            merge_s = min(self._options.merge_length_s, self._options.max_segment_s)
            merge = int(merge_s * SAMPLE_RATE_HZ)
            found = merge_spans(self._vad_spans(audio), merge) if merge else self._vad_spans(audio)
        shortest = int(MIN_SPAN_S * SAMPLE_RATE_HZ)
        return (s for s in split_long(found, longest) if s[1] - s[0] >= shortest)

    def _segments(
        self, audio: FloatAudio, spans: Iterator[tuple[int, int]], language: str | None
    ) -> Iterator[Segment]:
        index = 0
        for start, end in spans:
            rich = self._decode(audio[start:end], language)
            if not rich.text and rich.emotion is None and not rich.events:
                continue
            text = rich.text
            if text[:1].isascii() and text[:1].isalnum():
                text = " " + text  # Whisper's convention: words joined by their leading space
            yield Segment(
                id=index,
                start_s=start / SAMPLE_RATE_HZ,
                end_s=end / SAMPLE_RATE_HZ,
                text=text,
                no_speech_prob=1.0 if rich.no_speech and not rich.text else 0.0,
                language=rich.language,
                emotion=rich.emotion,
                events=rich.events,
            )
            index += 1

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        """Decode the first piece now (its language is the transcript's), the
        rest lazily. Blocking: runs in a worker thread."""
        if self._model is None:
            raise RuntimeError("engine not loaded")
        if options.task == "translate":
            raise EngineRequestError(
                f"model {self._context.model.name!r} cannot translate; it only transcribes",
                param="task",
            )
        language = self._request_language(options)
        samples = np.asarray(audio, dtype=np.float32).ravel()
        duration_s = len(samples) / SAMPLE_RATE_HZ
        segments = self._segments(samples, self.spans(samples), language)
        first = next(segments, None)
        detected = first.language if first is not None else None
        info = TranscriptInfo(
            language=language or detected or self._capabilities.languages[0],
            language_probability=1.0,
            duration_s=duration_s,
        )
        if first is None:
            return info, iter(())
        return info, itertools.chain((first,), segments)

    def close(self) -> None:
        self._model = None
        self._vad = None
        self._punc = None


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.ASR,
    description=(
        "FunASR speech recognition (torch): SenseVoiceSmall with language, emotion and "
        "audio-event tags, Paraformer-zh; optional FSMN-VAD"
    ),
    factory=FunAsrEngine,
    options_model=FunAsrOptions,
    requires=("funasr", "torch", "kaldi_native_fbank"),
    devices=("cpu", "cuda"),
    runtime="torch",
    extra=ENGINE_NAME,
)
