"""ASR with Hugging Face transformers Whisper. Extra: ``edgevoice[transformers-whisper]``.

Any Whisper checkpoint in Hugging Face format (``openai/whisper-*``,
``distil-whisper/*``, fine-tunes; a local directory or a repo id resolved
through :mod:`edgevoice.model_files`). Devices: CUDA in float16 (Jetson too, with
NVIDIA's torch build) and CPU in float32. The heavy libraries (torch,
transformers) are imported in :meth:`TransformersWhisperAsrEngine.load`.

Requests that wait at the same time are decoded together: each call of
:meth:`~TransformersWhisperAsrEngine.transcribe` hands its audio to a
:class:`RequestBatcher`, which collects the requests arriving within
``batch_window_ms`` (or while the model is busy) into one ``generate()``
call of at most ``batch_size`` clips. How many requests can wait at once is
bounded by the model entry's ``max_concurrency`` (the hub's worker threads),
so set that to the batch size you want.

Jetson: install NVIDIA's torch build for your JetPack first, then
``transformers`` (the extra pins the PyPI torch, which has no Jetson GPU
support); ``device = "auto"`` then finds the GPU through ``torch.cuda``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from pydantic import Field

from edgevoice.devices import available_cpus
from edgevoice.engines import whisper_common
from edgevoice.engines.base import (
    AsrCapabilities,
    EngineContext,
    EngineKind,
    EnginePlugin,
    EngineRequestError,
    FloatAudio,
    Segment,
    TranscribeOptions,
    TranscriptInfo,
    Word,
)
from edgevoice.engines.torch_common import avoid_cudnn_attention
from edgevoice.model_files import ModelNotFoundError

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "transformers-whisper"

WINDOW_S = 30.0
"""Whisper's input window; longer audio is decoded long-form (sequentially)."""

# Well-known checkpoints by short name; anything else is a path or an org/repo id.
SHORT_NAMES: dict[str, str] = {
    "tiny.en": "openai/whisper-tiny.en",
    "tiny": "openai/whisper-tiny",
    "base.en": "openai/whisper-base.en",
    "base": "openai/whisper-base",
    "small.en": "openai/whisper-small.en",
    "small": "openai/whisper-small",
    "medium.en": "openai/whisper-medium.en",
    "medium": "openai/whisper-medium",
    "large-v2": "openai/whisper-large-v2",
    "large-v3": "openai/whisper-large-v3",
    "large": "openai/whisper-large-v3",
    "large-v3-turbo": "openai/whisper-large-v3-turbo",
    "turbo": "openai/whisper-large-v3-turbo",
    "distil-small.en": "distil-whisper/distil-small.en",
    "distil-medium.en": "distil-whisper/distil-medium.en",
    "distil-large-v3": "distil-whisper/distil-large-v3",
}
# Configs, tokenizer files and safetensors weights; not the TF/Flax/pickle copies.
_HF_FILES = ["*.json", "*.txt", "*.safetensors"]

# Whisper's word-splitting rules (openai-whisper timing.py).
_PREPEND_PUNCTUATION = "\"'“¡¿([{-"
_APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
MAX_BEAM_SIZE = 20


class TransformersWhisperOptions(whisper_common.WhisperThresholdOptions):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights' precision; ``auto`` = float16 on CUDA, float32 on CPU."""
    beam_size: int = Field(default=1, ge=1, le=MAX_BEAM_SIZE)
    """Default beam size (1 = greedy, fastest)."""
    compression_ratio_threshold: float | None = Field(default=1.35, gt=0)
    """transformers' token-level zlib ratio (its docs recommend 1.35, not Whisper's 2.4)."""
    batch_size: int = Field(default=8, ge=1, le=64)
    """Most clips decoded in one ``generate()`` call."""
    batch_window_ms: float = Field(default=30.0, ge=0, le=1000)
    """How long a request waits for others to join its batch (ms)."""
    cpu_threads: int = Field(default=0, ge=0, le=256)
    """torch intra-op threads on CPU; 0 = the CPUs this process may use. Process-wide."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel; word timestamps switch to ``eager`` for their call only."""


def resolve_model(model: str, cache_dir: Path, offline: bool) -> Path:
    """Where the Hugging Face Whisper directory for ``model`` is (blocking)."""
    return whisper_common.resolve_whisper_model(
        model,
        cache_dir,
        offline,
        engine=ENGINE_NAME,
        short_names=SHORT_NAMES,
        allow_patterns=_HF_FILES,
        install_hint=(
            'put a Hugging Face Whisper directory somewhere and set model = "/path" '
            "(or allow downloads: offline = false)"
        ),
    )


def choose_dtype(device: str, requested: str) -> str:
    """The torch dtype name for ``device`` (pure: testable without torch or a GPU).

    float16 on CPU is refused: many CPU kernels lack it and it is slower than
    float32 there.
    """
    family = device.split(":", 1)[0]
    if requested == "auto":
        return "float16" if family == "cuda" else "float32"
    if requested == "float16" and family != "cuda":
        raise ValueError("dtype float16 needs a CUDA device; use float32 or bfloat16 on CPU")
    return requested


def cpu_thread_count(requested: int, available: int) -> int:
    """torch's intra-op thread count: ``requested``, or every CPU this process may use."""
    return max(1, requested if requested > 0 else available)


# ------------------------------------------------------------------ words


def _split_on_unicode(
    tokens: Sequence[int], decode: Callable[[list[int]], str]
) -> list[tuple[str, list[int]]]:
    """Split token positions where the decoded text is whole characters."""
    full = decode(list(tokens))
    pieces: list[tuple[str, list[int]]] = []
    current: list[int] = []
    offset = 0
    for pos in range(len(tokens)):
        current.append(pos)
        text = decode([tokens[p] for p in current])
        bad = text.find("\ufffd")
        if bad < 0 or (offset + bad < len(full) and full[offset + bad] == "\ufffd"):
            pieces.append((text, current))
            current = []
            offset += len(text)
    if current:
        pieces.append((decode([tokens[p] for p in current]), current))
    return pieces


def group_words(
    tokens: Sequence[int],
    decode: Callable[[list[int]], str],
    *,
    split_on_spaces: bool = True,
) -> list[tuple[str, list[int]]]:
    """Group text tokens into words: ``(text, positions in tokens)`` each.

    Whisper's rules: a word starts at a token that begins with a space or is
    punctuation; opening punctuation joins the next word, closing punctuation
    the previous one. Languages written without spaces split per character.
    """
    pieces = _split_on_unicode(tokens, decode)
    if split_on_spaces:
        words: list[tuple[str, list[int]]] = []
        for text, positions in pieces:
            if (
                not words
                or text.startswith(" ")
                or text.strip() in _APPEND_PUNCTUATION + (_PREPEND_PUNCTUATION)
            ):
                words.append((text, list(positions)))
            else:
                prev_text, prev_positions = words[-1]
                words[-1] = (prev_text + text, prev_positions + positions)
    else:
        words = [(text, list(positions)) for text, positions in pieces]
    return _merge_punctuation(words)


def _merge_punctuation(words: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    # Opening punctuation joins the following word.
    merged: list[tuple[str, list[int]]] = []
    pending: tuple[str, list[int]] | None = None
    for word_text, word_positions in words:
        text, positions = word_text, word_positions
        if pending is not None:
            text, positions = pending[0] + text.lstrip(), pending[1] + positions
            pending = None
        stripped = text.strip()
        if stripped and all(c in _PREPEND_PUNCTUATION for c in stripped) and stripped != "-":
            pending = (text, positions)
            continue
        merged.append((text, positions))
    if pending is not None:
        merged.append(pending)
    # Closing punctuation joins the preceding word.
    out: list[tuple[str, list[int]]] = []
    for text, positions in merged:
        stripped = text.strip()
        if out and stripped and all(c in _APPEND_PUNCTUATION for c in stripped):
            prev_text, prev_positions = out[-1]
            out[-1] = (prev_text + text.strip(), prev_positions + positions)
        else:
            out.append((text, positions))
    return out


def timed_words(
    tokens: Sequence[int],
    token_times_s: Sequence[float],
    decode: Callable[[list[int]], str],
    *,
    first_text_token: int,
    start_s: float,
    end_s: float,
    split_on_spaces: bool = True,
) -> list[Word]:
    """Words of one segment with times from transformers' token timestamps.

    ``tokens`` are the segment's tokens (timestamp tokens included) and
    ``token_times_s[i]`` is where token ``i`` *ends* (seconds, from the
    cross-attention alignment); a token starts where the previous one ended.
    Tokens from ``first_text_token`` up (timestamps, specials) are not text.
    Times are clamped to ``[start_s, end_s]``.
    """
    text_positions = [i for i, t in enumerate(tokens) if t < first_text_token]
    text_tokens = [tokens[i] for i in text_positions]
    words = []
    for text, positions in group_words(text_tokens, decode, split_on_spaces=split_on_spaces):
        if not text.strip():
            continue
        first, last = text_positions[positions[0]], text_positions[positions[-1]]
        begin = float(token_times_s[first - 1]) if first > 0 else start_s
        finish = float(token_times_s[last]) if last < len(token_times_s) else end_s
        begin = min(max(begin, start_s), end_s)
        finish = min(max(finish, begin), end_s)
        words.append(Word(text, round(begin, 3), round(finish, 3)))
    return words


# ---------------------------------------------------------------- batching

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass(eq=False)
class _Ticket(Generic[Req, Res]):
    request: Req
    key: Hashable
    arrived_s: float
    result: Res | None = None
    error: BaseException | None = None
    done: bool = False

    def value(self) -> Res:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)
    """Sizes of the last 100 batches."""


class RequestBatcher(Generic[Req, Res]):
    """Collects concurrent blocking calls into batches; thread-safe and bounded.

    :meth:`submit` blocks its calling thread until the request's result is
    ready. The first waiting request leads the next batch: it waits until
    ``window_s`` after its own arrival (or until ``max_batch`` requests with
    its key wait), then runs ``run`` on up to ``max_batch`` requests with the
    same key, in arrival order, in its own thread. One batch runs at a time;
    requests arriving meanwhile queue for the next one, so a busy model
    batches more. Only requests with equal ``key`` share a batch. When a
    batch of several fails, each of its requests is retried alone, so one
    bad request cannot fail the others. Waiting requests are bounded by the
    callers' threads (the hub's ``max_concurrency``).
    """

    def __init__(
        self,
        run: Callable[[list[Req]], list[Res]],
        *,
        max_batch: int,
        window_s: float,
        key: Callable[[Req], Hashable] = lambda _r: None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._window_s = window_s
        self._key = key
        self._cond = threading.Condition()
        self._waiting: list[_Ticket[Req, Res]] = []
        self._running = False
        self.stats = BatchStats()

    @property
    def waiting(self) -> int:
        """Requests queued for a batch that has not started."""
        with self._cond:
            return len(self._waiting)

    def submit(self, request: Req) -> Res:
        ticket: _Ticket[Req, Res] = _Ticket(request, self._key(request), time.monotonic())
        with self._cond:
            self._waiting.append(ticket)
            self._cond.notify_all()
            while True:
                if ticket.done:
                    return ticket.value()
                if not self._running and self._waiting[0] is ticket:
                    batch = self._gather(ticket)
                    break
                self._cond.wait()
        self._execute(batch)
        return ticket.value()

    def _gather(self, leader: _Ticket[Req, Res]) -> list[_Ticket[Req, Res]]:
        """As the leader (lock held): wait for the window, then take the batch."""
        deadline = leader.arrived_s + self._window_s
        while self._count(leader.key) < self._max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch = [t for t in self._waiting if t.key == leader.key][: self._max_batch]
        taken = set(map(id, batch))
        self._waiting = [t for t in self._waiting if id(t) not in taken]
        self._running = True
        return batch

    def _count(self, key: Hashable) -> int:
        return sum(1 for t in self._waiting if t.key == key)

    def _execute(self, batch: list[_Ticket[Req, Res]]) -> None:
        try:
            self._fill(batch)
        finally:
            with self._cond:
                for ticket in batch:
                    if not ticket.done and ticket.result is None and ticket.error is None:
                        ticket.error = RuntimeError("batch aborted")
                    ticket.done = True
                self._running = False
                stats = self.stats
                stats.batches += 1
                stats.requests += len(batch)
                stats.largest = max(stats.largest, len(batch))
                stats.sizes = [*stats.sizes[-99:], len(batch)]
                self._cond.notify_all()

    def _fill(self, batch: list[_Ticket[Req, Res]]) -> None:
        try:
            results = self._run([t.request for t in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            _LOGGER.debug("Batch of %d failed (%s); retrying one by one", len(batch), exc)
            for ticket in batch:
                self._fill([ticket])
            return
        for ticket, result in zip(batch, results, strict=True):
            ticket.result = result


# ------------------------------------------------------------------ engine


@dataclass(frozen=True, slots=True)
class _DecodeKey:
    """What requests must share to be decoded in one ``generate()`` call."""

    task: str
    prompt: str | None
    beam_size: int
    temperature: tuple[float, ...]
    word_timestamps: bool
    long_form: bool


@dataclass(frozen=True, slots=True)
class _Request:
    audio: FloatAudio
    language: str | None
    key: _DecodeKey


@dataclass(frozen=True, slots=True)
class _Result:
    language: str
    language_probability: float
    segments: tuple[Segment, ...]


class TransformersWhisperAsrEngine:
    """Whisper via transformers; one loaded model serves all requests, batched.

    Threading: :meth:`transcribe` may be called from several worker threads
    at once; they meet in the batcher and one ``generate()`` runs at a time.
    """

    def __init__(self, context: EngineContext, options: TransformersWhisperOptions) -> None:
        self._context = context
        self._options = options
        self._model: Any = None
        self._processor: Any = None
        self._torch: Any = None
        self._device: Any = None
        self._dtype: Any = None
        self._lang_to_id: dict[str, int] = {}
        self._eos_id = 50256
        self._max_prompt_tokens = 223
        # Known after load (from the checkpoint's generation config).
        self._capabilities = whisper_common.whisper_capabilities(
            ("en",), translate=False, streaming=False
        )
        self._batcher: RequestBatcher[_Request, _Result] = RequestBatcher(
            self._decode_batch,
            max_batch=options.batch_size,
            window_s=options.batch_window_ms / 1000,
            key=lambda r: r.key,
        )

    @property
    def capabilities(self) -> AsrCapabilities:
        return self._capabilities

    @property
    def batch_stats(self) -> BatchStats:
        return self._batcher.stats

    @property
    def multilingual(self) -> bool:
        return bool(self._lang_to_id)

    def load(self) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        path = resolve_model(
            self._context.model.model, self._context.cache_dir, self._context.offline
        )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelNotFoundError(
                f"{path} is not a Hugging Face model directory (no config.json)"
            )
        family, _, index = self._context.device.partition(":")
        dtype_name = choose_dtype(self._context.device, self._options.dtype)
        if family == "cuda":
            device = torch.device("cuda", int(index or 0))
        else:
            device = torch.device("cpu")
            threads = cpu_thread_count(self._options.cpu_threads, available_cpus())
            if torch.get_num_threads() != threads:
                _LOGGER.info("torch CPU threads: %d (process-wide)", threads)
                torch.set_num_threads(threads)
        dtype = getattr(torch, dtype_name)
        avoid_cudnn_attention(self._context.device, dtype_name != "float32", "transformers-whisper")
        started = time.monotonic()
        processor = WhisperProcessor.from_pretrained(str(path), local_files_only=True)
        model = WhisperForConditionalGeneration.from_pretrained(
            str(path),
            dtype=dtype,
            local_files_only=True,
            attn_implementation=self._options.attn_implementation,
        )
        if model.config.model_type != "whisper":
            raise ModelNotFoundError(
                f"{path} holds a {model.config.model_type!r} model, not Whisper"
            )
        model.to(device)
        model.eval()
        gen = model.generation_config
        lang_to_id = dict(getattr(gen, "lang_to_id", None) or {})
        multilingual = bool(getattr(gen, "is_multilingual", bool(lang_to_id))) and bool(lang_to_id)
        self._lang_to_id = (
            {k.strip("<|>"): int(v) for k, v in sorted(lang_to_id.items(), key=lambda kv: kv[1])}
            if multilingual
            else {}
        )
        task_to_id = dict(getattr(gen, "task_to_id", None) or {})
        self._eos_id = int(gen.eos_token_id if gen.eos_token_id is not None else 50256)
        self._max_prompt_tokens = int(model.config.max_target_positions) // 2 - 1
        self._torch, self._model, self._processor = torch, model, processor
        self._device, self._dtype = device, dtype
        self._capabilities = whisper_common.whisper_capabilities(
            tuple(self._lang_to_id) if multilingual else ("en",),
            translate=multilingual and "translate" in task_to_id,
            streaming=False,
        )
        _LOGGER.info(
            "transformers-whisper %s loaded from %s on %s (%s, %s) in %.2f s",
            self._context.model.model,
            path,
            device,
            dtype_name,
            "multilingual" if multilingual else "English-only",
            time.monotonic() - started,
        )
        batch = min(self._options.batch_size, self._context.model.max_concurrency)
        if batch < self._options.batch_size:
            # Only max_concurrency hub workers call transcribe() at once.
            _LOGGER.info(
                "%s: batches of at most %d (batch_size %d; raise max_concurrency to batch more)",
                self._context.model.name,
                batch,
                self._options.batch_size,
            )

    # ------------------------------------------------------------ requests

    def transcribe(
        self, audio: FloatAudio, options: TranscribeOptions
    ) -> tuple[TranscriptInfo, Iterator[Segment]]:
        """Decode ``audio`` (blocking; batched with concurrent calls).

        The whole clip is decoded before this returns (in one batch); the
        segments iterator only hands the results out.
        """
        if self._model is None:
            raise RuntimeError("engine not loaded")
        language = whisper_common.request_language(
            self._context.model.name, self._capabilities, options, self._options.language
        )
        duration_s = len(audio) / whisper_common.SAMPLE_RATE_HZ
        if len(audio) == 0:
            return TranscriptInfo(language or "en", 1.0, 0.0), iter(())
        temperature = (
            (float(options.temperature),)
            if options.temperature is not None
            else tuple(self._options.temperature)
        )
        beam_size = options.beam_size or self._options.beam_size
        if not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise EngineRequestError(
                f"beam_size must be between 1 and {MAX_BEAM_SIZE}", param="beam_size"
            )
        key = _DecodeKey(
            task=options.task if self.multilingual else "transcribe",
            prompt=whisper_common.prompt_with_hotwords(options, self._options.initial_prompt),
            beam_size=beam_size,
            temperature=temperature,
            word_timestamps=options.word_timestamps,
            long_form=duration_s > WINDOW_S,
        )
        result = self._batcher.submit(_Request(audio, language, key))
        info = TranscriptInfo(
            language=result.language,
            language_probability=result.language_probability,
            duration_s=duration_s,
        )
        return info, iter(result.segments)

    def _features(self, audios: list[FloatAudio], long_form: bool) -> tuple[Any, Any]:
        extractor = self._processor.feature_extractor
        extra: dict[str, Any] = {"padding": "longest", "truncation": False} if long_form else {}
        batch = extractor(
            audios,
            sampling_rate=whisper_common.SAMPLE_RATE_HZ,
            return_tensors="pt",
            return_attention_mask=True,
            **extra,
        )
        features = batch["input_features"].to(self._device, dtype=self._dtype)
        return features, batch["attention_mask"].to(self._device)

    def _detect_languages(self, features: Any) -> list[tuple[str, float]]:
        """Most likely language and its probability, per clip (first 30 s)."""
        torch = self._torch
        start_id = self._model.generation_config.decoder_start_token_id
        window = features[:, :, : int(WINDOW_S * 100)]
        tokens = torch.full((window.shape[0], 1), start_id, dtype=torch.long, device=self._device)
        with torch.inference_mode():
            logits = self._model(input_features=window, decoder_input_ids=tokens).logits[:, -1]
        codes = list(self._lang_to_id)
        probs = logits[:, [self._lang_to_id[c] for c in codes]].float().softmax(-1)
        best = probs.argmax(-1).tolist()
        return [(codes[b], float(probs[i, b])) for i, b in enumerate(best)]

    def _prompt_ids(self, prompt: str | None) -> Any:
        if not prompt:
            return None
        ids = self._processor.get_prompt_ids(prompt, return_tensors="pt")
        if len(ids) > self._max_prompt_tokens:  # keep <|startofprev|> and the latest text
            ids = self._torch.cat([ids[:1], ids[-(self._max_prompt_tokens - 1) :]])
        return ids.to(self._device)

    def _decode_batch(self, requests: list[_Request]) -> list[_Result]:
        """Blocking: one ``generate()`` over ``requests`` (equal keys)."""
        torch = self._torch
        key = requests[0].key
        features, attention_mask = self._features([r.audio for r in requests], key.long_form)
        if self.multilingual:
            detected: list[tuple[str, float] | None] = [None] * len(requests)
            unknown = [i for i, r in enumerate(requests) if r.language is None]
            if unknown:
                for i, found in zip(
                    unknown, self._detect_languages(features[unknown]), strict=True
                ):
                    detected[i] = found
            languages = [
                (r.language, 1.0) if r.language is not None else detected[i] or ("en", 0.0)
                for i, r in enumerate(requests)
            ]
        else:
            languages = [("en", 1.0)] * len(requests)
        kwargs: dict[str, Any] = {
            "attention_mask": attention_mask,
            "return_timestamps": True,
            "return_segments": True,
            "return_token_timestamps": key.word_timestamps,
            "num_beams": key.beam_size,
            "temperature": key.temperature if len(key.temperature) > 1 else key.temperature[0],
            "condition_on_prev_tokens": self._options.condition_on_previous_text,
        }
        if len(key.temperature) > 1:
            kwargs["compression_ratio_threshold"] = self._options.compression_ratio_threshold
            kwargs["logprob_threshold"] = self._options.logprob_threshold
            kwargs["no_speech_threshold"] = self._options.no_speech_threshold
        if self.multilingual:
            kwargs["language"] = [code for code, _p in languages]
            kwargs["task"] = key.task
        prompt_ids = self._prompt_ids(key.prompt)
        if prompt_ids is not None:
            kwargs["prompt_ids"] = prompt_ids
        config = self._model.config
        attention = config._attn_implementation
        try:
            with torch.inference_mode():
                output = self._model.generate(features, **kwargs)
        finally:
            # Word timestamps need eager attention; give the next request SDPA back.
            config._attn_implementation = attention
        started = time.monotonic()
        results = []
        durations = [len(r.audio) / whisper_common.SAMPLE_RATE_HZ for r in requests]
        for i, raw_segments in enumerate(output["segments"]):
            code, probability = languages[i]
            segments = self._convert(raw_segments, durations[i], key.word_timestamps, code)
            results.append(_Result(code, probability, tuple(segments)))
        _LOGGER.debug(
            "Decoded a batch of %d (%s) in %.2f s", len(requests), key, time.monotonic() - started
        )
        return results

    def _decode(self, tokens: list[int]) -> str:
        text: str = self._processor.tokenizer.decode(tokens)
        return text

    def _convert(
        self, raw_segments: list[dict[str, Any]], duration_s: float, words: bool, language: str
    ) -> list[Segment]:
        segments: list[Segment] = []
        for raw in raw_segments:
            tokens = [int(t) for t in raw["tokens"].tolist()]
            text_tokens = [t for t in tokens if t < self._eos_id]
            text = self._decode(text_tokens)
            if not text.strip():
                continue
            start_s = min(max(float(raw["start"]), 0.0), duration_s)
            end_s = min(max(float(raw["end"]), start_s), duration_s)
            timed: list[Word] = []
            if words and "token_timestamps" in raw:
                times = [float(t) for t in raw["token_timestamps"].tolist()]
                timed = timed_words(
                    tokens,
                    times,
                    self._decode,
                    first_text_token=self._eos_id,
                    start_s=0.0,
                    end_s=duration_s,
                    split_on_spaces=language not in _NO_SPACE_LANGUAGES,
                )
                if timed:  # like faster-whisper: the segment spans its words
                    start_s, end_s = timed[0].start_s, max(timed[-1].end_s, timed[0].start_s)
            segments.append(
                Segment(
                    id=len(segments),
                    start_s=round(start_s, 3),
                    end_s=round(end_s, 3),
                    text=text,
                    words=tuple(timed),
                    tokens=tuple(text_tokens),
                )
            )
        return segments

    def close(self) -> None:
        torch = self._torch
        on_cuda = self._device is not None and self._device.type == "cuda"
        self._model = None
        self._processor = None
        if torch is not None and on_cuda:
            torch.cuda.empty_cache()


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.ASR,
    description="Whisper speech-to-text on transformers/torch (float16 CUDA incl. Jetson, "
    "float32 CPU), batched",
    factory=TransformersWhisperAsrEngine,
    options_model=TransformersWhisperOptions,
    requires=("torch", "transformers"),
    devices=("cpu", "cuda"),
    runtime="torch",
    extra=ENGINE_NAME,
)
