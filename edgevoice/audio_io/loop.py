"""The microphone loop: wake word → (standalone) endpointing → ASR → actions → TTS.

:class:`WakeLoop` reads the microphone block by block and runs the wake-word
session (``[audio_io] wake_words``, or all wake models) on every block that
nothing else claims, while the speaker is silent: detection pauses while
edgevoice itself plays (and ``echo_guard_s`` after), so it never triggers on
its own voice. Repeated detections within ``wake_refractory_s`` of audio are
ignored. Subclasses claim blocks (:meth:`WakeLoop.on_block`) while they
listen, and act on a wake word (:meth:`WakeLoop.on_wake`).

:class:`StandaloneLoop` (``mode = "standalone"``), one turn::

    idle ──wake word──► [awake sound; the microphone's audio meanwhile is dropped]
         ──► listening: EndpointingPipeline (VAD; ends after finish_silence_s,
             max_utterance_s, or no_speech_timeout_s without speech)
         ──► thinking: ASR result → actions (MQTT, webhook, command, HA)
         ──► speaking: replies on the speaker → [done sound]
         ──► idle, or listening again without a wake word when Home Assistant
             continues the conversation

While a turn is thinking, wake detection is live again (a new wake word
starts a new turn). All durations are audio time (blocks read), so the loop
behaves the same on any CPU; only the speaker's activity is wall-clock.

Threading: event-loop only, one task reads the microphone; each turn's
decode and actions run in their own task. Engine calls go through hub
sessions in ``client_scope("audio_io", ...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from edgevoice.audio import Audio, resample
from edgevoice.audio_io.actions import Actions, Command
from edgevoice.audio_io.devices import CAPTURE_RATE_HZ, Microphone
from edgevoice.audio_io.player import PlaybackResult, Player
from edgevoice.config import AudioIoConfig
from edgevoice.engines.base import EngineKind, FloatAudio, SynthesizeOptions, TranscribeOptions
from edgevoice.errors import EdgeVoiceError
from edgevoice.fairness import client_scope
from edgevoice.hub import EngineHub, WakeSession
from edgevoice.pipeline.endpointing import (
    DecodeFailed,
    EndpointConfig,
    EndpointingPipeline,
    FinalTranscript,
    NoSpeech,
    PipelineEvent,
    SpeechStarted,
)

_LOGGER = logging.getLogger(__name__)


class WakeLoop:
    """Reads the microphone and detects wake words (see the module docstring)."""

    def __init__(self, config: AudioIoConfig, hub: EngineHub, player: Player) -> None:
        self.config = config
        self.hub = hub
        self.player = player
        self.wake_names: list[str] | None = list(config.wake_words) or None
        """Wake words listened for (``[[wake]]`` names); ``None``: every wake
        model; empty: none (a satellite whose wake words were all deselected)."""
        self.muted = False
        """No wake detection (and, in subclasses, no listening)."""
        self.audio_s = 0.0
        """Seconds of microphone audio read (the loop's clock)."""
        self.detections = 0
        self._last_wake_s: float | None = None
        self._wake_changed = False
        self._quiet_since_s = -1e9
        """:attr:`audio_s` when the speaker last went quiet."""
        player.on_activity.append(self._speaker_activity)

    def _speaker_activity(self, active: bool) -> None:
        if not active:
            self._quiet_since_s = self.audio_s

    def speaker_quiet(self) -> bool:
        """Nothing plays, and nothing played for ``echo_guard_s`` of microphone audio."""
        return (
            not self.player.busy and self.audio_s - self._quiet_since_s >= self.config.echo_guard_s
        )

    def detach(self) -> None:
        """Stop following the player (the loop is discarded)."""
        with contextlib.suppress(ValueError):
            self.player.on_activity.remove(self._speaker_activity)

    def set_wake_words(self, names: list[str] | None) -> None:
        """Listen for these wake words (``None``: all) from the next block on."""
        self.wake_names = None if names is None else list(names)
        self._wake_changed = True

    def _wake_session(self) -> WakeSession | None:
        if not self.hub.models(EngineKind.WAKE) or self.wake_names == []:
            return None
        return self.hub.wake_session(self.wake_names)

    def wake_live(self) -> bool:
        """Whether a block may be fed to wake detection now."""
        return not self.muted and self.speaker_quiet()

    async def run(self, mic: Microphone) -> None:
        """Read ``mic`` until cancelled; raises what ``mic.read`` raises
        (:class:`~edgevoice.audio_io.devices.AudioDeviceError`)."""
        with client_scope("audio_io", "microphone"):
            try:
                while True:
                    self._wake_changed = False
                    session = self._wake_session()
                    async with contextlib.AsyncExitStack() as stack:
                        if session is not None:
                            await stack.enter_async_context(session)
                        while not self._wake_changed:
                            await self._step(await mic.read(), session)
            finally:
                await self.on_stopped()

    async def _step(self, block: FloatAudio, session: WakeSession | None) -> None:
        self.audio_s += len(block) / CAPTURE_RATE_HZ
        if await self.on_block(block):
            return
        if session is None or not self.wake_live():
            return
        for detection in await session.process(block, CAPTURE_RATE_HZ):
            last = self._last_wake_s
            if last is not None and self.audio_s - last < self.config.wake_refractory_s:
                continue
            self._last_wake_s = self.audio_s
            self.detections += 1
            _LOGGER.info("Wake word %s detected at %.2f s", detection.name, self.audio_s)
            await self.on_wake(detection.name)
            break

    async def on_block(self, block: FloatAudio) -> bool:
        """A microphone block; ``True`` when the subclass used it (no wake detection)."""
        return False

    async def on_wake(self, wake_word: str) -> None:
        """A wake word was detected (the block is not passed to :meth:`on_block`)."""

    async def on_stopped(self) -> None:
        """The microphone loop ended (device failure, shutdown): release what it held."""


# ------------------------------------------------------------------ standalone


@dataclass(eq=False)
class _Listening:
    """One command being recorded through the endpointing pipeline."""

    pipeline: EndpointingPipeline
    wake_word: str | None
    turn: int
    result: asyncio.Future[PipelineEvent]
    utterances: int = 0
    over: bool = False
    """The pipeline ended the utterance (or gave up): feed it no more."""
    speech: bool = False

    async def on_event(self, event: PipelineEvent) -> None:
        if isinstance(event, SpeechStarted):
            self.speech = True
        elif isinstance(event, FinalTranscript | NoSpeech | DecodeFailed):
            if isinstance(event, NoSpeech):
                self.over = True
            if not self.result.done():
                self.result.set_result(event)


MAX_HELD_S = 5.0
"""Most microphone audio kept while a due turn waits for a late speaker."""


def _hold(pending: _Pending, block: FloatAudio) -> None:
    pending.held.append(block)
    pending.held_samples += len(block)
    while pending.held_samples > MAX_HELD_S * CAPTURE_RATE_HZ and len(pending.held) > 1:
        pending.held_samples -= len(pending.held.popleft())


@dataclass(eq=False)
class _Pending:
    """Listening is due once the speaker is quiet (after the awake sound or a reply)."""

    wake_word: str | None
    turn: int
    sound: asyncio.Future[PlaybackResult] | None = None
    until_s: float = 0.0
    """Microphone audio before this point (:attr:`WakeLoop.audio_s`) is dropped:
    the sound's own length plus ``echo_guard_s`` (audio time, so a loop that
    reads late drops no more than that)."""
    held: deque[FloatAudio] = field(default_factory=deque)
    """Audio after ``until_s`` while the speaker still reports the sound as
    playing (a slow machine or device): kept, up to ``MAX_HELD_S``, and
    recorded first once it is quiet, so a late speaker loses no words."""
    held_samples: int = 0


@dataclass
class LoopStats:
    """Counters for logs, tests and benchmarks."""

    turns: int = 0
    transcripts: int = 0
    no_speech: int = 0
    failures: int = 0
    last_transcript: Command | None = None
    history: list[str] = field(default_factory=list)


class StandaloneLoop(WakeLoop):
    """``mode = "standalone"``: the whole voice loop on this machine."""

    def __init__(
        self,
        config: AudioIoConfig,
        hub: EngineHub,
        player: Player,
        actions: Actions,
        sounds: dict[str, Audio | None],
    ) -> None:
        super().__init__(config, hub, player)
        self.actions = actions
        self.sounds = sounds
        self.stats = LoopStats()
        self._listen: _Listening | None = None
        self._pending: _Pending | None = None
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoint_config = EndpointConfig(
            speech_threshold=config.speech_threshold,
            trailing_silence_s=config.end_of_speech_s,
            min_speech_s=config.min_speech_s,
            finish_silence_s=max(config.finish_silence_s, config.end_of_speech_s),
            complete_sentence_silence_s=config.complete_sentence_silence_s,
            max_utterance_s=config.max_utterance_s,
            no_speech_timeout_s=config.no_speech_timeout_s,
            pre_roll_s=0.5,
        )

    @property
    def listening(self) -> bool:
        """Recording a command now (after a wake word, or a follow-up)."""
        return self._listen is not None

    # ------------------------------------------------------------- wake word

    async def on_wake(self, wake_word: str) -> None:
        self._turn += 1
        self.stats.turns += 1
        turn = self._turn
        await self._drop_listening()
        self._spawn(self.actions.wake(wake_word))
        self._spawn(self._state("listening", turn))
        sound = self.sounds.get("awake")
        future = self._submit_sound(sound, "awake sound") if sound is not None else None
        until_s = self.audio_s
        if future is not None and sound is not None:
            until_s += sound.duration_s + self.config.echo_guard_s
        self._pending = _Pending(wake_word, turn, future, until_s)

    def _submit_sound(self, sound: Audio, label: str) -> asyncio.Future[PlaybackResult] | None:
        try:
            return self.player.submit_audio(sound, label)
        except EdgeVoiceError as exc:
            _LOGGER.debug("No %s: %s", label, exc)
            return None

    # ------------------------------------------------------------- listening

    async def on_block(self, block: FloatAudio) -> bool:
        pending = self._pending
        if pending is not None:
            if self.muted:
                self._pending = None
                return False
            if self.audio_s < pending.until_s:
                return True  # the awake sound (or a reply) is playing: not speech
            if (pending.sound is not None and not pending.sound.done()) or (
                not self.speaker_quiet()
            ):
                _hold(pending, block)  # due already; the speaker is just late
                return True
            self._pending = None
            await self._start_listening(pending)
            listen = self._listen
            if listen is not None:
                while pending.held and not listen.over:
                    await self._feed(listen, pending.held.popleft())
        listen = self._listen
        if listen is None:
            return False
        await self._feed(listen, block)
        if listen.over and self._listen is listen:
            self._listen = None  # the turn's task takes the result from here
        return True

    async def _start_listening(self, pending: _Pending) -> None:
        config = self.config
        try:
            asr = self.hub.asr_session(
                config.asr_model, TranscribeOptions(language=config.language)
            )
            vad = self.hub.vad_session(config.vad_model)
        except EdgeVoiceError as exc:
            _LOGGER.error("Voice loop cannot listen: %s", exc)
            self._spawn(self._state("idle", pending.turn))
            return
        listen = _Listening(
            pipeline=None,  # type: ignore[arg-type]  # set right below
            wake_word=pending.wake_word,
            turn=pending.turn,
            result=asyncio.get_running_loop().create_future(),
        )
        listen.pipeline = EndpointingPipeline(asr, vad, listen.on_event, self.endpoint_config)
        try:
            await listen.pipeline.__aenter__()
        except EdgeVoiceError as exc:
            _LOGGER.error("Voice loop cannot listen: %s", exc)
            self._spawn(self._state("idle", pending.turn))
            return
        listen.utterances = listen.pipeline.utterances
        self._listen = listen
        self._spawn(self._run_turn(listen))

    async def _feed(self, listen: _Listening, block: FloatAudio) -> None:
        pipeline = listen.pipeline
        if pipeline.rate_hz != CAPTURE_RATE_HZ:
            block = resample(block, CAPTURE_RATE_HZ, pipeline.rate_hz)
        try:
            await pipeline.feed(block)
        except (EdgeVoiceError, RuntimeError) as exc:
            _LOGGER.warning("Voice loop stopped recording: %s", exc)
            listen.over = True
            if not listen.result.done():
                listen.result.set_result(DecodeFailed(exc))
            return
        if pipeline.utterances != listen.utterances:
            listen.over = True  # ended by silence or max_utterance_s; decoding now

    async def _drop_listening(self) -> None:
        listen, self._listen = self._listen, None
        self._pending = None
        if listen is not None:
            listen.over = True
            if not listen.result.done():
                listen.result.cancel()
            await listen.pipeline.aclose()

    async def on_stopped(self) -> None:
        await self._drop_listening()

    # ----------------------------------------------------------------- a turn

    async def _run_turn(self, listen: _Listening) -> None:
        try:
            event = await listen.result
        except asyncio.CancelledError:
            await listen.pipeline.aclose()
            if listen.result.cancelled():
                return  # superseded by a new wake word
            raise
        await listen.pipeline.aclose()
        turn = listen.turn
        if isinstance(event, NoSpeech):
            self.stats.no_speech += 1
            _LOGGER.info("No command followed the wake word")
            await self._state("idle", turn)
            return
        if isinstance(event, DecodeFailed):
            self.stats.failures += 1
            _LOGGER.warning("Voice loop: transcription failed: %s", event.error)
            await self._state("idle", turn)
            return
        assert isinstance(event, FinalTranscript)
        transcript = event.transcript
        text = transcript.text.strip()
        if not text:
            _LOGGER.info("The command transcribed to nothing")
            await self._state("idle", turn)
            return
        command = Command(
            text=text,
            language=transcript.language,
            wake_word=listen.wake_word,
            duration_s=transcript.duration_s,
            id=uuid.uuid4().hex[:12],
        )
        self.stats.transcripts += 1
        self.stats.last_transcript = command
        self.stats.history.append(text)
        del self.stats.history[:-100]
        _LOGGER.info("Command: %r", text)
        await self._state("thinking", turn)
        outcome = await self.actions.handle(command)
        if outcome.replies:
            await self._state("speaking", turn)
            options = SynthesizeOptions(voice=self.config.voice or None)
            for reply in outcome.replies:
                try:
                    result = await self.player.play_speech(self.hub, reply, options, "reply")
                except EdgeVoiceError as exc:
                    _LOGGER.warning("Cannot speak the reply: %s", exc)
                    break
                if not result.played:
                    _LOGGER.info("Reply not played: %s", result.error)
        done = self.sounds.get("done")
        if done is not None:
            self._submit_sound(done, "done sound")
        if outcome.continue_conversation and turn == self._turn and not self.muted:
            _LOGGER.info("The conversation continues: listening without a wake word")
            self._pending = _Pending(None, turn)
            await self._state("listening", turn)
            return
        await self._state("idle", turn)

    async def _state(self, state: str, turn: int) -> None:
        if turn == self._turn:  # a newer turn owns the state
            await self.actions.state(state)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name="audio-io-turn")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _LOGGER.error("Voice loop task failed: %r", exc, exc_info=exc)

    async def aclose(self) -> None:
        """Cancel turns in flight (shutdown)."""
        await self._drop_listening()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
