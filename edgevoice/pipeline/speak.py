"""Text chunks → sentences → audio, in order: the one TTS pipeline under every face.

Wyoming ``synthesize`` / ``synthesize-chunk``, HTTP ``/v1/audio/speech`` and its
WebSocket, MQTT speak requests and the local voice loop all call
:func:`speak` (or :meth:`EngineHub.speak <edgevoice.hub.EngineHub.speak>`)::

    async with hub.speak(text_or_chunks, options) as speech:
        async for audio in speech:          # SpokenAudio, in order
            send(audio.samples, speech.rate_hz)

Bounds, all from ``[limits]``: whole text longer than ``max_input_chars`` is
refused before any work; streamed text is split by a linear
:class:`~edgevoice.text.SentenceBuffer` into pieces of at most
``max_sentence_chars``; a :class:`TextFeed` holds at most ``max_input_chars``
of text not yet taken for synthesis; audio is synthesized at most one piece
ahead of the consumer. The voice is resolved once, when the stream is created,
and the model's slot is held until the stream closes (a reload lets it finish
on the old engine). Synthesis (phonemization included) runs in the model's
worker pool, one piece per call; only the bounded sentence splitting runs on
the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, cast

from edgevoice.config import LimitsConfig
from edgevoice.engines.base import FloatAudio, SynthesizeOptions, TtsEngine
from edgevoice.errors import LimitExceededError
from edgevoice.text import SentenceBuffer, split_sentences

if TYPE_CHECKING:
    from edgevoice.hub import EngineHub, LoadedModel

_LOGGER = logging.getLogger(__name__)

TextInput = str | AsyncIterable[str]
"""What :func:`speak` takes: a whole text, or its chunks as they arrive."""


@dataclass(frozen=True, slots=True)
class SpokenAudio:
    """One chunk of synthesized audio."""

    samples: FloatAudio
    """Mono float32 in [-1, 1] at ``rate_hz``."""
    rate_hz: int
    sentence: int
    """0-based index of the sentence (or bounded piece of one) this chunk speaks."""
    text: str
    """That sentence's text (whitespace normalised)."""

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate_hz


def input_limit_error(limits: LimitsConfig, *, param: str | None = None) -> LimitExceededError:
    """The one error for synthesis text over ``[limits] max_input_chars``."""
    return LimitExceededError(
        "max_input_chars",
        limits.max_input_chars,
        what="input text",
        unit="characters",
        param=param,
    )


class TextFeed:
    """Text chunks a protocol handler pushes for one :func:`speak` stream.

    :meth:`put` never blocks (call it from the handler that reads the
    socket); it raises :class:`LimitExceededError` when the text not yet taken
    for synthesis would exceed ``max_pending_chars``. :meth:`close` marks the
    end of the text. Event-loop only.
    """

    def __init__(self, max_pending_chars: int) -> None:
        self.max_pending_chars = max_pending_chars
        self._chunks: collections.deque[str] = collections.deque()
        self._pending = 0
        self._closed = False
        self._ready = asyncio.Event()

    @property
    def pending_chars(self) -> int:
        """Characters put and not yet taken by the speak pipeline."""
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, chunk: str) -> None:
        """Queue ``chunk`` (non-blocking)."""
        if self._closed:
            raise RuntimeError("text feed is closed")
        if self._pending + len(chunk) > self.max_pending_chars:
            raise LimitExceededError(
                "max_input_chars",
                self.max_pending_chars,
                what="text waiting to be spoken",
                unit="characters",
            )
        if chunk:
            self._chunks.append(chunk)
            self._pending += len(chunk)
            self._ready.set()

    def close(self) -> None:
        """End of text: the stream speaks what is left and ends."""
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while not self._chunks:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        chunk = self._chunks.popleft()
        self._pending -= len(chunk)
        return chunk


@dataclass(frozen=True, slots=True)
class _End:
    error: BaseException | None = None


_DONE: Final = _End()


def _raise_if_cancelled() -> None:
    """Stop the producer once it was asked to, even if an await on the way
    swallowed the ``CancelledError`` (``hub.iterate`` closing an engine
    generator does)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _speakable(text: str) -> bool:
    """Whether a piece holds anything to say (not only punctuation or symbols)."""
    return any(ch.isalnum() for ch in text)


class Speech:
    """An open synthesis stream: an async iterator of :class:`SpokenAudio` and an
    async context manager (leaving it, or :meth:`aclose`, stops synthesis at once).

    Created by :func:`speak`; event-loop only, one consumer.
    """

    def __init__(
        self,
        hub: EngineHub,
        model: LoadedModel[TtsEngine],
        request: SynthesizeOptions,
        text: TextInput,
        limits: LimitsConfig,
    ) -> None:
        self._hub = hub
        self.model = model
        """The model speaking (resolved once; kept across a reload)."""
        self.rate_hz: int = model.engine.capabilities.sample_rate_hz
        """Sample rate of every chunk."""
        self._request = request
        self._text = text
        self._limits = limits
        self.sentences = 0
        """Sentences (bounded pieces) started so far."""
        self.audio_s = 0.0
        """Seconds of audio handed to the consumer so far."""
        self._queue: asyncio.Queue[SpokenAudio | _End] = asyncio.Queue(maxsize=1)
        self._task: asyncio.Task[None] | None = None
        self._finished = False

    # ----------------------------------------------------------- consumer side

    async def __aenter__(self) -> Speech:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[SpokenAudio]:
        return self

    async def __anext__(self) -> SpokenAudio:
        if self._finished:
            raise StopAsyncIteration
        if self._task is None:
            # Created here, in the consumer's task, so the fair-share client
            # scope (contextvars) of the request carries over.
            self._task = asyncio.create_task(self._produce(), name="speak")
        item = await self._queue.get()
        self._queue.task_done()
        if isinstance(item, _End):
            self._finished = True
            await self._reap()
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        self.audio_s += item.duration_s
        return item

    async def aclose(self) -> None:
        """Stop synthesis (the engine's generator is closed in its worker); idempotent."""
        self._finished = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        await self._reap()

    async def _reap(self) -> None:
        if self._task is None:
            return
        try:
            await self._task
        except asyncio.CancelledError:
            # The producer's own cancellation is expected; the consumer's is not ours to eat.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    # ----------------------------------------------------------- producer side

    async def _sentences(self) -> AsyncGenerator[str, None]:
        max_chars = self._limits.max_sentence_chars
        if isinstance(self._text, str):
            for sentence in split_sentences(self._text, max_chars):
                yield sentence
            return
        buffer = SentenceBuffer(
            max_sentence_chars=max_chars, max_pending_chars=self._limits.max_input_chars
        )
        async for chunk in self._text:
            if not isinstance(chunk, str):
                raise TypeError(f"text chunks must be str, not {type(chunk).__name__}")
            for sentence in buffer.feed(chunk):
                yield sentence
        for sentence in buffer.flush():
            yield sentence

    async def _produce(self) -> None:
        """Synthesize piece by piece, handing each chunk over before the next is made."""
        slot = self.model.slot
        slot.active += 1  # hold the slot: a reload retires it only once we are done
        try:
            try:
                await self._hub.ensure_loaded(self.model)  # an on-demand model loads now
                self.rate_hz = self.model.engine.capabilities.sample_rate_hz
                async with contextlib.aclosing(self._sentences()) as sentences:
                    async for sentence in sentences:
                        _raise_if_cancelled()
                        if _speakable(sentence):
                            await self._speak_one(sentence)
            except Exception as exc:
                await self._hand_over(_End(exc))
            else:
                await self._hand_over(_DONE)
        finally:
            slot.active -= 1

    async def _speak_one(self, sentence: str) -> None:
        index = self.sentences
        self.sentences += 1
        engine, request = self.model.engine, self._request
        if index:  # the first audio is out: no quick first chunk needed
            request = dataclasses.replace(request, continuation=True)

        def chunks() -> Iterator[FloatAudio]:
            # A generator: even engine.synthesize's eager part runs in the worker.
            yield from engine.synthesize(sentence, request)

        # hub.iterate is an async generator: closing it closes the engine's in its worker.
        audio = cast(AsyncGenerator[FloatAudio, None], self._hub.iterate(self.model, chunks()))
        async with contextlib.aclosing(audio):
            async for samples in audio:
                if len(samples):
                    await self._hand_over(SpokenAudio(samples, self.rate_hz, index, sentence))

    async def _hand_over(self, item: SpokenAudio | _End) -> None:
        _raise_if_cancelled()
        # Wait until the consumer has taken it: at most one chunk is ready ahead.
        await self._queue.put(item)
        await self._queue.join()


def speak(
    hub: EngineHub,
    text: TextInput,
    options: SynthesizeOptions | None = None,
    limits: LimitsConfig | None = None,
) -> Speech:
    """Start speaking ``text`` (a whole string, or chunks such as a :class:`TextFeed`).

    Checks before any work, raising at once: the voice (``options.voice``, a
    public voice name; :class:`~edgevoice.errors.UnknownModelError`) and, for
    a whole string, its length against ``max_input_chars``
    (:class:`LimitExceededError`). Engine errors (an unknown speaker, a bad
    speed) surface from the first ``__anext__``, before any audio; errors later
    in a stream surface after the audio made before them. Pieces with nothing
    to say (only punctuation) are skipped; text with nothing to say at all
    yields no audio. ``limits`` defaults to the hub's ``[limits]``.
    """
    limits = limits or hub.settings.limits
    if isinstance(text, str) and len(text) > limits.max_input_chars:
        raise input_limit_error(limits)
    options = options or SynthesizeOptions()
    model, engine_voice = hub.voice(options.voice)
    request = dataclasses.replace(options, voice=engine_voice or None)
    model.slot.requests += 1
    return Speech(hub, model, request, text, limits)
