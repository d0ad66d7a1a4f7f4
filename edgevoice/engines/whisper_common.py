"""What the Whisper engines share: options, model lookup, request checks.

faster-whisper, transformers-whisper and mlx-whisper decode the same model
family with different runtimes; their option names, short model names, the
English-only and language checks and the capabilities they report are the
same, so they live here once. Cheap to import: no runtime is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import Field, field_validator

from edgevoice.engines.base import (
    AsrCapabilities,
    EngineOptions,
    EngineRequestError,
    TranscribeOptions,
)
from edgevoice.model_files import ModelNotFoundError, as_local_path, hf_snapshot

SAMPLE_RATE_HZ = 16000
"""What every Whisper model hears."""
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_PROMPT_CHARS = 2000


class WhisperOptions(EngineOptions):
    """Options every Whisper engine takes (each engine adds its own)."""

    language: str | None = None
    """Default language when a request names none (None: detect)."""
    initial_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    temperature: list[float] = Field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    """Fallback temperatures, tried in order when a window's decoding fails the thresholds."""
    condition_on_previous_text: bool = True
    """Long-form: condition each window on the text of the previous one."""

    @field_validator("temperature")
    @classmethod
    def _temperatures(cls, value: list[float]) -> list[float]:
        if not value or len(value) > 10 or any(not 0 <= t <= 2 for t in value):
            raise ValueError("temperature needs 1 to 10 values between 0 and 2")
        return value


class WhisperThresholdOptions(WhisperOptions):
    """Whisper's fallback thresholds (the engines that expose them)."""

    compression_ratio_threshold: float | None = Field(default=2.4, gt=0)
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = Field(default=0.6, ge=0, le=1)


def resolve_whisper_model(
    model: str,
    cache_dir: Path,
    offline: bool,
    *,
    engine: str,
    short_names: Mapping[str, str],
    allow_patterns: Sequence[str],
    install_hint: str,
    local_kind: str = "local directory",
) -> Path:
    """Where the model directory for ``model`` is (blocking).

    ``model`` is a local path, one of ``short_names`` or an ``org/repo`` id
    fetched (only ``allow_patterns``) into ``cache_dir`` unless ``offline``.
    """
    if (local := as_local_path(model)) is not None:
        return local
    repo_id = short_names.get(model, model)
    if "/" not in repo_id:
        raise ModelNotFoundError(
            f"unknown {engine} model {model!r}: use a {local_kind}, one of "
            f"{', '.join(short_names)} or an org/repo id"
        )
    return hf_snapshot(
        repo_id,
        cache_dir=cache_dir,
        offline=offline,
        allow_patterns=list(allow_patterns),
        install_hint=install_hint,
    )


def normalize_language(language: str | None) -> str | None:
    """``en-US`` / ``en_US`` / ``EN`` → ``en``."""
    if language is None:
        return None
    return language.split("-")[0].split("_")[0].strip().lower() or None


def whisper_capabilities(
    languages: tuple[str, ...], *, translate: bool, streaming: bool
) -> AsrCapabilities:
    """What a Whisper model can do: every engine gives word times and takes a prompt."""
    return AsrCapabilities(
        languages=languages,
        sample_rate_hz=SAMPLE_RATE_HZ,
        translate=translate,
        word_timestamps=True,
        streaming=streaming,
        prompt=True,
    )


def request_language(
    model_name: str,
    capabilities: AsrCapabilities,
    options: TranscribeOptions,
    default_language: str | None,
) -> str | None:
    """The language to decode ``options`` in (None: detect), after the request checks.

    Raises :class:`EngineRequestError` for a translation on an English-only
    model or a language the model does not know.
    """
    if options.task == "translate" and not capabilities.translate:
        raise EngineRequestError(
            f"model {model_name!r} is English-only and cannot translate; "
            "use a multilingual model such as 'base'",
            param="task",
        )
    requested = options.language or default_language
    language = normalize_language(requested)
    if requested is not None and (language is None or language not in capabilities.languages):
        raise EngineRequestError(
            f"model {model_name!r} does not support language {(language or requested)!r}",
            param="language",
        )
    return language


def prompt_with_hotwords(options: TranscribeOptions, default_prompt: str | None) -> str | None:
    """The request's prompt (or the default) with its hotwords appended.

    Hotwords have no slot of their own in Whisper: they join the prompt.
    """
    return " ".join(p for p in (options.prompt or default_prompt, options.hotwords) if p) or None
