"""ASR with mlx-whisper (Whisper on Apple's MLX). Extra: ``edgevoice[mlx-whisper]``.

Made for Apple Silicon, where ``device = "mlx"`` runs on the GPU in
float16. ``device = "cpu"`` runs MLX's CPU backend in float32 — on Linux
that is ``pip install "mlx[cpu]"`` (which the extra installs there); it works
but is slow, so use it for testing rather than serving. Models: a local MLX
Whisper directory (``config.json`` + ``weights.npz``/``weights.safetensors``)
or an ``mlx-community`` repo id, resolved through :mod:`edgevoice.model_files`.
The heavy libraries are imported in :meth:`MlxWhisperAsrEngine.load`.

mlx-whisper keeps one model in a process-wide holder and MLX evaluation is
not meant to be driven from several threads at once, so every mlx-whisper
engine in the process decodes under one lock (requests queue; no batching).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgevoice.engines import whisper_common
from edgevoice.engines.base import (
    AsrCapabilities,
    EngineContext,
    EngineKind,
    EnginePlugin,
    FloatAudio,
    Segment,
    TranscribeOptions,
    TranscriptInfo,
    Word,
)
from edgevoice.model_files import ModelNotFoundError

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "mlx-whisper"

SHORT_NAMES: dict[str, str] = {
    "tiny.en": "mlx-community/whisper-tiny.en-mlx",
    "tiny": "mlx-community/whisper-tiny-mlx",
    "base.en": "mlx-community/whisper-base.en-mlx",
    "base": "mlx-community/whisper-base-mlx",
    "small.en": "mlx-community/whisper-small.en-mlx",
    "small": "mlx-community/whisper-small-mlx",
    "medium.en": "mlx-community/whisper-medium.en-mlx",
    "medium": "mlx-community/whisper-medium-mlx",
    "large-v2": "mlx-community/whisper-large-v2-mlx",
    "large-v3": "mlx-community/whisper-large-v3-mlx",
    "large": "mlx-community/whisper-large-v3-mlx",
    "large-v3-turbo": "mlx-community/whisper-large-v3-turbo",
    "turbo": "mlx-community/whisper-large-v3-turbo",
}
_MLX_FILES = ["config.json", "weights.npz", "weights.safetensors"]

_MLX_LOCK = threading.Lock()
"""Serialises every mlx-whisper call in the process (shared model holder, MLX state)."""


class MlxWhisperOptions(whisper_common.WhisperThresholdOptions):
    """mlx-whisper has no beam search: a request's ``beam_size`` is ignored."""

    dtype: Literal["auto", "float16", "float32"] = "auto"
    """``auto`` = float16 on the Apple GPU (``mlx``), float32 on CPU."""
    hallucination_silence_threshold_s: float | None = Field(default=None, gt=0)
    """With word timestamps: skip silences longer than this around likely hallucinations."""


def resolve_model(model: str, cache_dir: Path, offline: bool) -> Path:
    """Where the MLX Whisper directory for ``model`` is (blocking)."""
    return whisper_common.resolve_whisper_model(
        model,
        cache_dir,
        offline,
        engine=ENGINE_NAME,
        short_names=SHORT_NAMES,
        allow_patterns=_MLX_FILES,
        install_hint=(
            "put an MLX Whisper directory (config.json + weights) somewhere and set "
            'model = "/path" (or allow downloads: offline = false)'
        ),
    )


def choose_dtype(device: str, requested: str) -> str:
    """``float16`` or ``float32`` for ``device`` (``mlx`` = Apple GPU, ``cpu``); pure."""
    if requested != "auto":
        return requested
    return "float16" if device == "mlx" else "float32"


class MlxWhisperAsrEngine:
    """Whisper via mlx-whisper; one loaded model serves all requests, one at a time."""

    def __init__(self, context: EngineContext, options: MlxWhisperOptions) -> None:
        self._context = context
        self._options = options
        self._model: Any = None
        self._mx: Any = None
        self._device: Any = None
        self._path = ""
        self._fp16 = False
        self._languages: tuple[str, ...] = ("en",)
        self._capabilities = whisper_common.whisper_capabilities(
            ("en",), translate=False, streaming=False
        )

    @property
    def capabilities(self) -> AsrCapabilities:
        return self._capabilities

    def load(self) -> None:
        import mlx.core as mx
        from mlx_whisper.load_models import load_model
        from mlx_whisper.tokenizer import LANGUAGES

        path = resolve_model(
            self._context.model.model, self._context.cache_dir, self._context.offline
        )
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not an MLX Whisper directory (no config.json)")
        device = mx.gpu if self._context.device == "mlx" else mx.cpu
        if device == mx.gpu and not mx.is_available(mx.gpu):
            raise RuntimeError("device 'mlx' needs MLX's GPU backend (Apple Silicon with mlx)")
        dtype_name = choose_dtype(self._context.device, self._options.dtype)
        started = time.monotonic()
        with _MLX_LOCK, mx.stream(device):
            model = load_model(str(path), dtype=getattr(mx, dtype_name))
        multilingual = bool(model.is_multilingual)
        languages = tuple(list(LANGUAGES)[: model.num_languages]) if multilingual else ("en",)
        self._mx, self._model, self._device = mx, model, device
        self._path, self._fp16 = str(path), dtype_name == "float16"
        self._languages = languages
        self._capabilities = whisper_common.whisper_capabilities(
            languages, translate=multilingual, streaming=False
        )
        _LOGGER.info(
            "mlx-whisper %s loaded from %s on %s (%s, %s) in %.2f s",
            self._context.model.model,
            path,
            device,
            dtype_name,
            "multilingual" if multilingual else "English-only",
            time.monotonic() - started,
        )

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        """Decode ``audio`` (blocking; the whole clip before returning)."""
        if self._model is None:
            raise RuntimeError("engine not loaded")
        language = whisper_common.request_language(
            self._context.model.name, self._capabilities, options, self._options.language
        )
        duration_s = len(audio) / whisper_common.SAMPLE_RATE_HZ
        if len(audio) == 0:
            return TranscriptInfo(language or "en", 1.0, 0.0), iter(())
        if options.beam_size is not None and options.beam_size > 1:
            _LOGGER.debug("mlx-whisper has no beam search; decoding greedily")
        temperature: float | tuple[float, ...] = (
            float(options.temperature)
            if options.temperature is not None
            else tuple(self._options.temperature)
        )
        with _MLX_LOCK, self._mx.stream(self._device):
            probability = 1.0
            if language is None and self._model.is_multilingual:
                language, probability = self._detect_language(audio)
            result = self._run(audio, options, language, temperature)
        info = TranscriptInfo(
            language=str(result.get("language") or language or "en"),
            language_probability=probability,
            duration_s=duration_s,
        )
        return info, iter(self._convert(result["segments"], duration_s))

    def _detect_language(self, audio: FloatAudio) -> tuple[str, float]:
        """Most likely language of the first 30 s and its probability (lock held)."""
        from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

        mel = log_mel_spectrogram(audio, n_mels=self._model.dims.n_mels, padding=N_SAMPLES)
        window = pad_or_trim(mel, N_FRAMES, axis=-2).astype(
            self._mx.float16 if self._fp16 else self._mx.float32
        )
        _tokens, probs = self._model.detect_language(window)
        code = max(probs, key=probs.get)
        return str(code), float(probs[code])

    def _run(
        self,
        audio: FloatAudio,
        options: TranscribeOptions,
        language: str | None,
        temperature: float | tuple[float, ...],
    ) -> dict[str, Any]:
        # The package re-exports its transcribe() function under the module's name.
        module = importlib.import_module("mlx_whisper.transcribe")
        holder = module.ModelHolder
        # Hand mlx-whisper our loaded model instead of letting it load its own.
        holder.model, holder.model_path = self._model, self._path
        decode: dict[str, Any] = {"fp16": self._fp16, "task": options.task}
        if language is not None:
            decode["language"] = language
        result: dict[str, Any] = module.transcribe(
            audio,
            path_or_hf_repo=self._path,
            verbose=None,
            temperature=temperature,
            compression_ratio_threshold=self._options.compression_ratio_threshold,
            logprob_threshold=self._options.logprob_threshold,
            no_speech_threshold=self._options.no_speech_threshold,
            condition_on_previous_text=self._options.condition_on_previous_text,
            initial_prompt=whisper_common.prompt_with_hotwords(
                options, self._options.initial_prompt
            ),
            word_timestamps=options.word_timestamps,
            hallucination_silence_threshold=(
                self._options.hallucination_silence_threshold_s if options.word_timestamps else None
            ),
            **decode,
        )
        return result

    @staticmethod
    def _convert(raw_segments: list[dict[str, Any]], duration_s: float) -> list[Segment]:
        segments: list[Segment] = []
        for raw in raw_segments:
            text = str(raw.get("text", ""))
            if not text.strip():
                continue
            start_s = min(max(float(raw["start"]), 0.0), duration_s)
            end_s = min(max(float(raw["end"]), start_s), duration_s)
            words = tuple(
                Word(
                    str(w["word"]),
                    round(min(max(float(w["start"]), 0.0), duration_s), 3),
                    round(min(max(float(w["end"]), float(w["start"]), 0.0), duration_s), 3),
                    float(w.get("probability", 1.0)),
                )
                for w in raw.get("words") or ()
            )
            if words:
                start_s, end_s = min(start_s, words[0].start_s), max(end_s, words[-1].end_s)
            segments.append(
                Segment(
                    id=len(segments),
                    start_s=round(start_s, 3),
                    end_s=round(end_s, 3),
                    text=text,
                    words=words,
                    avg_logprob=float(raw.get("avg_logprob", 0.0)),
                    no_speech_prob=float(raw.get("no_speech_prob", 0.0)),
                    temperature=float(raw.get("temperature", 0.0)),
                    compression_ratio=float(raw.get("compression_ratio", 1.0)),
                    tokens=tuple(int(t) for t in raw.get("tokens", ())),
                )
            )
        return segments

    def close(self) -> None:
        with _MLX_LOCK:
            if self._path:
                module = importlib.import_module("mlx_whisper.transcribe")
                if module.ModelHolder.model is self._model:
                    module.ModelHolder.model = None
                    module.ModelHolder.model_path = None
            self._model = None


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.ASR,
    description="Whisper speech-to-text on Apple MLX (float16 Apple GPU; float32 CPU, slow)",
    factory=MlxWhisperAsrEngine,
    options_model=MlxWhisperOptions,
    requires=("mlx", "mlx_whisper"),
    devices=("cpu", "mlx"),
    runtime=None,
    extra=ENGINE_NAME,
)
