"""The voice input pipeline: VAD endpointing, speculative and partial decoding.

One class, :class:`EndpointingPipeline`, serves every face that listens to a
speaker: Wyoming now, the local microphone loop and the realtime WebSocket
next. It is fed mono float32 audio at the ASR model's rate and emits events:

- :class:`SpeechStarted` / :class:`SpeechStopped` from the VAD (a speech
  probability at or above ``speech_threshold``; ``trailing_silence_s`` of
  non-speech ends it; ``min_speech_s`` of speech is needed to start);
- :class:`PartialTranscript`: a *speculative* decode started when speech
  stops (discarded if speech resumes, reused as the final transcript if the
  utterance ends there), and, with ``partial_interval_s``, partial decodes
  while speech goes on;
- :class:`FinalTranscript` when the utterance ends: the caller says so with
  :meth:`EndpointingPipeline.finish` (Wyoming's ``audio-stop``), or, with
  ``finish_silence_s`` set, the pipeline ends it itself after that much
  silence or ``max_utterance_s`` (the local loop); then it listens for the
  next utterance;
- :class:`NoSpeech` when ``no_speech_timeout_s`` of audio passed without
  speech.

All durations are measured in audio fed, never in wall-clock time, so the
pipeline behaves the same on any CPU at any speed.

Compute budget: speculative and partial decodes only use idle compute.

- They run only while audio arrives at about real-time pace: the pipeline
  measures the arrival rate (seconds of audio fed per wall-clock second over
  the last ``arrival_window_s``); above ``max_arrival_rate`` (a client that
  sends buffered audio as fast as the socket takes it) nothing is decoded
  before the final, which then starts at once.
- They start only when the model slot has a free worker and nobody waits for
  one (:class:`~edgevoice.fairness.FairLimiter`): a guess never queues ahead
  of a real request. A trigger that finds no room retries on the next piece.
- At most one is queued or running per pipeline, none starts once the final
  decode has begun, and the final decode never waits for a stale one: a
  speculation whose audio is not the whole utterance is cancelled (if it has
  not reached a worker yet it never runs) and the final decode starts at
  once. A speculation over the whole utterance (no speech since it started)
  is awaited and reused.

Without a VAD session there is no endpointing: audio is buffered and decoded
at :meth:`~EndpointingPipeline.finish`.

Threading: event-loop only; feed one chunk at a time from one task. Inference
and VAD run in the hub's worker pools through the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from edgevoice.audio import Audio
from edgevoice.engines.base import FloatAudio, Transcript
from edgevoice.errors import EdgeVoiceError
from edgevoice.hub import AsrSession, VadSession

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """How the pipeline finds utterances in a stream (all durations in seconds of audio)."""

    speech_threshold: float = 0.5
    """VAD probability at or above which a piece of audio is speech."""
    trailing_silence_s: float = 0.3
    """Non-speech after speech that ends it: :class:`SpeechStopped`, and a
    speculative decode starts."""
    min_speech_s: float = 0.0
    """Speech needed (without ``trailing_silence_s`` of silence inside) before
    :class:`SpeechStarted`; shorter noises are ignored. 0: the first speech piece."""
    finish_silence_s: float | None = None
    """``None``: the caller ends the utterance (:meth:`EndpointingPipeline.finish`).
    Else the pipeline ends it after this much silence following speech (at least
    ``trailing_silence_s``; the speculation started then is reused) and listens on."""
    complete_sentence_silence_s: float | None = None
    """With ``finish_silence_s``: end the utterance after only this much silence
    when the speculative decode (started at ``trailing_silence_s``) is done and
    its text ends a sentence (``.``, ``!``, ``?``, not ``...``): a finished
    command needs no longer wait, a pause inside one still gets the whole
    ``finish_silence_s``. ``None``: always wait ``finish_silence_s``."""
    max_utterance_s: float | None = None
    """With ``finish_silence_s``: an utterance whose speech runs this long is ended."""
    no_speech_timeout_s: float | None = None
    """:class:`NoSpeech` once this much audio passed (since the start or the last
    final transcript) without speech starting."""
    pre_roll_s: float = 1.0
    """With ``finish_silence_s``: audio kept from before speech starts (the rest of
    a long wait for speech is dropped, so waiting costs no memory)."""
    partial_interval_s: float | None = None
    """Partial decodes while speech goes on, one per this much new audio at most."""
    vad_piece_s: float = 0.1
    """Granularity of the VAD decisions (a chunk is judged in pieces this long)."""
    max_arrival_rate: float | None = 1.5
    """Speculative and partial decodes only while audio arrives at most this many
    times faster than real time (over ``arrival_window_s``); ``None``: always
    (tests that feed audio as fast as they can)."""
    arrival_window_s: float = 1.0
    """Wall-clock window over which the arrival rate is measured."""
    arrival_slack_s: float = 0.25
    """Audio that may arrive ahead of real time within the window and still count as paced."""
    end_only_when_paced: bool = False
    """With ``finish_silence_s``: end utterances (silence, ``max_utterance_s``,
    ``no_speech_timeout_s``) only while audio arrives at real-time pace. A
    recording sent faster (it has its own end: the caller's :meth:`finish`) is
    never cut at a pause."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    timestamp_ms: int
    """Audio position (since the pipeline started) where speech began."""


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    timestamp_ms: int
    """Audio position where ``trailing_silence_s`` of silence was complete."""


@dataclass(frozen=True, slots=True)
class PartialTranscript:
    """A transcript of the utterance so far; the final one may differ."""

    transcript: Transcript
    speculative: bool
    """Decoded at the end of speech (else a partial during speech)."""

    @property
    def text(self) -> str:
        return self.transcript.text


@dataclass(frozen=True, slots=True)
class FinalTranscript:
    transcript: Transcript
    reused_speculation: bool
    """The speculative decode at the end of speech was the final one."""

    @property
    def text(self) -> str:
        return self.transcript.text


@dataclass(frozen=True, slots=True)
class NoSpeech:
    """``no_speech_timeout_s`` of audio passed without speech."""

    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class DecodeFailed:
    """An automatic final decode (``finish_silence_s``) failed."""

    error: Exception


PipelineEvent = (
    SpeechStarted | SpeechStopped | PartialTranscript | FinalTranscript | NoSpeech | DecodeFailed
)
EventHandler = Callable[[PipelineEvent], Awaitable[None]]


@dataclass(eq=False)
class _Decode:
    """A speculative or partial decode in flight."""

    speculative: bool
    utterance: int
    speech_epoch: int
    """:attr:`EndpointingPipeline._speech_epoch` when it started; speech starting
    again afterwards makes it stale."""
    task: asyncio.Task[Transcript] = field(init=False)


class EndpointingPipeline:
    """Audio in, utterance events out (see the module docstring).

    ``asr`` and ``vad`` are session handles from the hub (not yet entered); the
    pipeline enters them in ``__aenter__`` and closes them in :meth:`aclose`.
    ``on_event`` is awaited for every event, in order; for events from a
    decode (partial, automatic final) it runs in the decode's task, and an
    exception it raises there is logged at DEBUG and dropped.
    """

    def __init__(
        self,
        asr: AsrSession,
        vad: VadSession | None,
        on_event: EventHandler,
        config: EndpointConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or EndpointConfig()
        self._clock = clock
        self._arrivals: deque[tuple[float, int]] = deque()
        """(wall-clock time, samples fed before that chunk) over the last window."""
        self.backlogged = False
        """Set by the caller when more audio already waits to be fed (a client
        ahead of us, or a busy machine): no speculative or partial decode starts
        then, whatever the measured arrival rate (the reader's pace hides the
        client's when we fall behind)."""
        self._asr = asr
        self._vad = vad
        self._on_event = on_event
        self._stack = contextlib.AsyncExitStack()
        self._closed = False
        self._finishing = False
        rate = asr.rate_hz
        self._piece = max(1, round(self.config.vad_piece_s * rate))
        self._total = 0
        """Samples fed since the start (the timeline of timestamps)."""
        self._utterance = 0
        self._utterance_begin = 0
        self._speech_epoch = 0
        self._heard_speech = False
        """Speech started in the current utterance."""
        self._in_speech = False
        self._last_speech = False
        self._candidate_start: int | None = None
        self._candidate = 0
        self._silence = 0
        self._speech_start = 0
        self._last_partial = 0
        self._no_speech_reported = False
        self._want_speculation = False
        self._job: _Decode | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        try:
            await self._stack.enter_async_context(self._asr)
            if self._vad is not None:
                await self._stack.enter_async_context(self._vad)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel decodes in flight and release the sessions; idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Future[Any]] = [*self._tasks]
        if self._job is not None:
            tasks.append(self._job.task)
            self._job = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._stack.aclose()
        except Exception:
            _LOGGER.debug("Closing the pipeline's sessions failed", exc_info=True)

    # ------------------------------------------------------------- feeding

    @property
    def asr(self) -> AsrSession:
        return self._asr

    @property
    def rate_hz(self) -> int:
        """The rate :meth:`feed` takes (the ASR model's)."""
        return self._asr.rate_hz

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def utterances(self) -> int:
        """Utterances the pipeline ended itself (``finish_silence_s``/``max_utterance_s``);
        grows inside :meth:`feed`, before the final decode is done (the local loop
        stops feeding there)."""
        return self._utterance

    def check_room(self, duration_s: float) -> None:
        """Raise :class:`~edgevoice.errors.LimitExceededError` if ``duration_s``
        more audio would cross the session's ``max_audio_s`` (check a chunk's
        declared length before converting it)."""
        self._asr.check_room(duration_s)

    async def feed(self, samples: FloatAudio) -> None:
        """Add the next chunk (mono float32 at :attr:`rate_hz`) and run the VAD on it.

        Raises :class:`~edgevoice.errors.LimitExceededError` past ``max_audio_s``
        of buffered audio (nothing of the chunk is kept then).
        """
        if self._closed or self._finishing:
            raise RuntimeError("the pipeline has finished")
        if not len(samples):
            return
        self._asr.append(samples)
        start = self._total
        self._note_arrival(start)
        self._total += len(samples)
        if self._vad is None:
            return
        probabilities = await self._vad.process_pieces(samples, self.rate_hz, self._piece)
        position = start
        for probability in probabilities:
            end = min(position + self._piece, self._total)
            await self._step(probability, position, end)
            position = end
            if self._closed or self._finishing:
                return

    async def finish(self) -> Transcript:
        """End the utterance now: the final transcript (also emitted as
        :class:`FinalTranscript`). The pipeline takes no audio afterwards."""
        if self._closed or self._finishing:
            raise RuntimeError("the pipeline has finished")
        self._finishing = True
        clip = self._asr.audio()
        transcript, reused = await self._final_decode(clip)
        await self._emit(FinalTranscript(transcript, reused))
        return transcript

    @property
    def arrival_rate(self) -> float:
        """Seconds of audio fed per wall-clock second over the last ``arrival_window_s``."""
        if not self._arrivals:
            return 0.0
        since, fed = self._arrivals[0]
        elapsed = max(self._clock() - since, 1e-3)
        return (self._total - fed) / self.rate_hz / elapsed

    @property
    def paced(self) -> bool:
        """Audio arrives near real time: speculation and partials may run.

        Over the last ``arrival_window_s``, at most ``max_arrival_rate`` times the
        wall time passed plus ``arrival_slack_s`` of audio came (the slack
        absorbs a stream's first chunks and network jitter)."""
        limit = self.config.max_arrival_rate
        if limit is None or not self._arrivals:
            return True
        since, fed = self._arrivals[0]
        fed_s = (self._total - fed) / self.rate_hz
        return fed_s <= limit * (self._clock() - since) + self.config.arrival_slack_s

    def _note_arrival(self, fed: int) -> None:
        now = self._clock()
        arrivals = self._arrivals
        arrivals.append((now, fed))
        window = self.config.arrival_window_s
        while len(arrivals) > 1 and now - arrivals[1][0] >= window:
            arrivals.popleft()

    def _may_end(self) -> bool:
        """The pipeline may end an utterance itself now (``end_only_when_paced``)."""
        return not self.config.end_only_when_paced or self.paced

    def _room_for_a_guess(self) -> bool:
        """A speculative/partial decode may start: audio is paced, and the slot has
        a free worker nobody waits for."""
        if self.backlogged or not self.paced:
            return False
        try:
            limiter = self._asr.model.slot.limiter
        except (EdgeVoiceError, RuntimeError):  # the slot went away in a reload
            return False
        return limiter.held < limiter.permits and limiter.waiting == 0

    # ------------------------------------------------------------ the VAD

    def _ms(self, position: int) -> int:
        return position * 1000 // self.rate_hz

    def _samples(self, seconds: float) -> int:
        return round(seconds * self.rate_hz)

    async def _step(self, probability: float | None, start: int, end: int) -> None:
        """One VAD piece ``[start, end)`` of the timeline."""
        config = self.config
        length = end - start
        speech = (
            self._last_speech if probability is None else probability >= config.speech_threshold
        )
        self._last_speech = speech
        if speech:
            self._silence = 0
            if not self._in_speech:
                if self._candidate_start is None:
                    self._candidate_start = start
                self._candidate += length
                if self._candidate >= self._samples(config.min_speech_s):
                    await self._speech_started(self._candidate_start)
            if self._in_speech:
                await self._during_speech(end)
            return
        self._silence += length
        if self._silence >= self._samples(config.trailing_silence_s):
            if self._in_speech:
                await self._speech_stopped(end)
            else:
                self._candidate_start, self._candidate = None, 0  # a noise, not speech
        if self._in_speech:
            return
        if self._want_speculation:
            self._speculate(end)
        auto = config.finish_silence_s
        if (
            auto is not None
            and self._heard_speech
            and (self._silence >= self._samples(auto) or self._sentence_complete())
            and self._may_end()
        ):
            self._auto_finish()
            return
        if not self._heard_speech:
            await self._waiting_for_speech(end)

    def _sentence_complete(self) -> bool:
        """The speculation over the whole utterance is done, ended a sentence, and
        ``complete_sentence_silence_s`` of silence followed the speech."""
        early = self.config.complete_sentence_silence_s
        job = self._job
        if early is None or self._silence < self._samples(early) or not self._reusable(job):
            return False
        assert job is not None
        task = job.task
        if not task.done() or task.exception() is not None:
            return False
        return ends_sentence(task.result().text)

    async def _speech_started(self, position: int) -> None:
        self._in_speech = True
        self._heard_speech = True
        self._speech_epoch += 1
        self._candidate_start, self._candidate = None, 0
        self._speech_start = position
        self._want_speculation = False
        job = self._job
        if job is not None and job.speculative:
            job.task.cancel()  # speech resumed: that guess is stale
            self._job = None
        await self._emit(SpeechStarted(self._ms(position)))

    async def _during_speech(self, end: int) -> None:
        config = self.config
        longest = config.max_utterance_s
        if (
            config.finish_silence_s is not None
            and longest is not None
            and end - self._speech_start >= self._samples(longest)
            and self._may_end()
        ):
            self._in_speech = False
            await self._emit(SpeechStopped(self._ms(end)))
            self._auto_finish()
            return
        interval = config.partial_interval_s
        if (
            interval is not None
            and end - self._last_partial >= self._samples(interval)
            and self._start_decode(end, speculative=False)
        ):
            self._last_partial = end

    async def _speech_stopped(self, end: int) -> None:
        self._in_speech = False
        await self._emit(SpeechStopped(self._ms(end)))
        self._want_speculation = True
        self._speculate(end)

    async def _waiting_for_speech(self, end: int) -> None:
        config = self.config
        timeout = config.no_speech_timeout_s
        if (
            timeout is not None
            and not self._no_speech_reported
            and end - self._utterance_begin >= self._samples(timeout)
            and self._may_end()
        ):
            self._no_speech_reported = True
            await self._emit(NoSpeech(self._ms(end)))
        if config.finish_silence_s is not None and self._candidate_start is None:
            # Waiting for speech costs no memory: keep only the pre-roll.
            self._asr.keep_last(self._samples(config.pre_roll_s) + (self._total - end))

    # ------------------------------------------------------------ decoding

    def _speculate(self, end: int) -> None:
        if self._start_decode(end, speculative=True):
            self._want_speculation = False

    def _start_decode(self, end: int, *, speculative: bool) -> bool:
        """Start a speculative/partial decode of the utterance through ``end`` if
        the budget allows (none queued or running for this pipeline)."""
        if self._finishing or self._closed or self._asr.decoding or self._job is not None:
            return False
        if not self._room_for_a_guess():
            return False
        audio = self._asr.audio()
        keep = len(audio.samples) - (self._total - end)
        clip = Audio(audio.samples[:keep], audio.rate_hz)
        job = _Decode(speculative, self._utterance, self._speech_epoch)
        job.task = asyncio.create_task(self._decode(job, clip), name="pipeline-decode")
        job.task.add_done_callback(_retrieve)
        self._job = job
        return True

    async def _decode(self, job: _Decode, clip: Audio) -> Transcript:
        """Decode ``clip``; report it as a partial if it is still current.

        The report happens inside this task, so a final transcript that reuses
        it always comes after its partial.
        """
        try:
            transcript = await self._asr.transcribe(clip)
        finally:
            if self._job is job and not job.speculative:
                self._job = None  # a partial is never reused
        current = job.utterance == self._utterance and (
            not job.speculative or job.speech_epoch == self._speech_epoch
        )
        if current and not self._finishing and not self._closed:
            await self._emit_quietly(PartialTranscript(transcript, job.speculative))
        return transcript

    def _reusable(self, job: _Decode | None) -> bool:
        return (
            job is not None
            and job.speculative
            and job.utterance == self._utterance
            and job.speech_epoch == self._speech_epoch
            and not self._in_speech
            and not job.task.cancelled()
        )

    async def _final_decode(self, clip: Audio) -> tuple[Transcript, bool]:
        """The final transcript of ``clip``: the current speculation's, if it covers
        the whole utterance, else a fresh decode (a stale decode is cancelled)."""
        job, self._job = self._job, None
        self._want_speculation = False
        if job is not None and self._reusable(job):
            try:
                return await job.task, True
            except asyncio.CancelledError:
                if not job.task.cancelled():
                    raise  # we were cancelled, not the speculation
            except (EdgeVoiceError, RuntimeError) as exc:
                _LOGGER.debug("Speculative decode failed (%s); decoding again", exc)
        elif job is not None:
            job.task.cancel()  # stale: never delays the final decode
        return await self._asr.transcribe(clip), False

    def _auto_finish(self) -> None:
        """End the utterance (``finish_silence_s``/``max_utterance_s``) and listen on."""
        clip = self._asr.audio()
        reusable = self._reusable(self._job)
        job = self._job
        self._spawn(self._auto_final(clip, job if reusable else None, job))
        self._job = None
        # The next utterance starts with an empty buffer.
        self._asr.keep_last(0)
        self._utterance += 1
        self._utterance_begin = self._total
        self._heard_speech = False
        self._in_speech = False
        self._want_speculation = False
        self._no_speech_reported = False
        self._candidate_start, self._candidate = None, 0
        self._last_partial = self._total

    async def _auto_final(self, clip: Audio, reuse: _Decode | None, job: _Decode | None) -> None:
        try:
            transcript: Transcript | None = None
            reused = False
            if reuse is not None:
                try:
                    transcript, reused = await reuse.task, True
                except asyncio.CancelledError:
                    if not reuse.task.cancelled():
                        raise
                except (EdgeVoiceError, RuntimeError) as exc:
                    _LOGGER.debug("Speculative decode failed (%s); decoding again", exc)
            elif job is not None:
                job.task.cancel()
            if transcript is None:
                transcript = await self._asr.transcribe(clip)
        except (EdgeVoiceError, RuntimeError) as exc:
            await self._emit_quietly(DecodeFailed(exc))
            return
        await self._emit_quietly(FinalTranscript(transcript, reused))

    # -------------------------------------------------------------- events

    async def _emit(self, event: PipelineEvent) -> None:
        await self._on_event(event)

    async def _emit_quietly(self, event: PipelineEvent) -> None:
        """Emit from a background task: a failing handler (client gone) is a debug line."""
        if self._closed:
            return
        try:
            await self._on_event(event)
        except Exception as exc:
            _LOGGER.debug("Pipeline event handler failed: %r", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name="pipeline-final")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_SENTENCE_END = re.compile(r"(?<![.…])[.!?。！？]['\"”’)\]]*$")


def ends_sentence(text: str) -> bool:
    """``text`` ends with a sentence's final punctuation (an ellipsis does not:
    it marks speech that trails off)."""
    return bool(_SENTENCE_END.search(text.strip()))


def _retrieve(task: asyncio.Task[Transcript]) -> None:
    """Mark a decode's failure as seen (it is handled where the result is used)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        _LOGGER.debug("Speculative/partial decode failed: %r", error)
