"""EngineHub: engine lifecycle, name mapping and the thread boundary.

The hub loads every configured engine at startup (before the daemon reports
ready), maps public model/voice names to engines, runs every blocking engine
call in a per-engine worker pool sized by ``max_concurrency`` (so one busy
model never starves another, and the event loop never waits on inference),
shares one engine between entries that configure the same model identically,
and exposes the capabilities protocols advertise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from edgevoice.audio import Audio
from edgevoice.config import ConfigError, ModelConfig, Settings, validate_engines
from edgevoice.devices import DeviceChoice, probe_machine, select_device
from edgevoice.engines.base import (
    AsrCapabilities,
    AsrEngine,
    Engine,
    EngineContext,
    EngineKind,
    EnginePlugin,
    FloatAudio,
    Segment,
    SynthesizeOptions,
    TranscribeOptions,
    Transcript,
    TranscriptInfo,
    TtsCapabilities,
    TtsEngine,
    VadCapabilities,
    VadEngine,
    VoiceInfo,
    WakeCapabilities,
    WakeEngine,
)
from edgevoice.engines.registry import EngineRegistry, default_registry
from edgevoice.errors import UnknownModelError
from edgevoice.fairness import FairLimiter

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")


class HubStartError(RuntimeError):
    """An engine the config selects could not be loaded; the message says why."""


@dataclass
class EngineSlot:
    """One loaded engine instance and the worker pool its calls run in."""

    key: str
    plugin: EnginePlugin
    engine: Engine
    device: DeviceChoice
    executor: ThreadPoolExecutor
    max_concurrency: int
    limiter: FairLimiter
    """Permits for calls into the engine, shared fairly between faces and clients."""
    requests: int = 0
    busy_s: float = 0.0
    audio_s: float = 0.0
    load_s: float = 0.0
    active: int = 0
    """Calls (and iterations) in flight; a slot retired by a reload closes at 0."""


@dataclass
class HubReload:
    """What :meth:`EngineHub.reload` did (public names of the entries)."""

    loaded: list[str]
    """Entries whose engine was loaded anew."""
    kept: list[str]
    """Entries served by an engine that was already loaded."""
    retired: int
    """Engines no longer used (closed once idle)."""


@dataclass
class LoadedModel(Generic[E]):
    """A configured entry (public name) bound to its engine slot."""

    kind: EngineKind
    config: ModelConfig
    slot: EngineSlot
    default: bool = False
    public_names: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def engine(self) -> E:
        return cast(E, self.slot.engine)


class EngineHub:
    """Owns every engine; protocols call its async methods."""

    def __init__(
        self,
        settings: Settings,
        registry: EngineRegistry | None = None,
        *,
        only: dict[EngineKind, list[str] | None] | None = None,
    ) -> None:
        """``only`` restricts loading to some kinds/names (the one-shot CLI):
        a kind missing from it loads nothing, ``None`` loads all of that kind."""
        self.settings = settings
        self._registry = registry or default_registry()
        self._only = only
        self._slots: dict[str, EngineSlot] = {}
        self._models: dict[EngineKind, list[LoadedModel[Any]]] = {k: [] for k in EngineKind}
        self._names: dict[EngineKind, dict[str, LoadedModel[Any]]] = {k: {} for k in EngineKind}
        self._voices: dict[str, tuple[LoadedModel[TtsEngine], str]] = {}
        # id(slot) -> (slot, task closing it once idle), for slots a reload dropped.
        self._retiring: dict[int, tuple[EngineSlot, asyncio.Task[None]]] = {}
        self._reload_lock = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle

    def _selected(self, kind: EngineKind, settings: Settings | None = None) -> list[ModelConfig]:
        entries = (settings or self.settings).models(kind)
        if self._only is None:
            return entries
        if kind not in self._only:
            return []
        names = self._only[kind]
        if names is None:
            return entries
        picked = [e for e in entries if e.name in names or set(e.aliases) & set(names)]
        if not picked and names:
            raise UnknownModelError(kind, names[0], [e.name for e in entries])
        return picked

    def _slot_key(
        self, kind: EngineKind, entry: ModelConfig, options: Any, settings: Settings | None = None
    ) -> str:
        return json.dumps(
            [
                kind.value,
                entry.engine,
                entry.model,
                (settings or self.settings).device_for(entry),
                options.model_dump(mode="json"),
            ],
            sort_keys=True,
        )

    async def start(self) -> None:
        """Validate, then load every selected engine in worker threads."""
        try:
            validated = validate_engines(self.settings, self._registry)
        except ConfigError as exc:
            raise HubStartError(str(exc)) from None
        loads: list[asyncio.Future[None]] = []
        pending: list[tuple[EngineKind, ModelConfig, str]] = []
        loop = asyncio.get_running_loop()
        for kind in EngineKind:
            for entry in self._selected(kind):
                options = validated[(kind, entry.name)]
                key = self._slot_key(kind, entry, options)
                pending.append((kind, entry, key))
                if key in self._slots:
                    self._grow(self._slots[key], entry.max_concurrency)
                    continue
                try:
                    slot = self._new_slot(kind, entry, key)
                except HubStartError:
                    await self.close()
                    raise
                self._slots[key] = slot
                loads.append(
                    loop.run_in_executor(
                        slot.executor, self._load_slot, slot, kind, entry, options, self.settings
                    )
                )
        results = await asyncio.gather(*loads, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise HubStartError("; ".join(str(e) for e in errors)) from errors[0]
        for kind, entry, key in pending:
            self._bind(kind, entry, self._slots[key])
        self._finish_defaults()

    def _new_slot(self, kind: EngineKind, entry: ModelConfig, key: str) -> EngineSlot:
        """An unloaded slot for ``entry`` with its own worker pool."""
        try:
            plugin = self._registry.get(entry.engine, kind)
        except (LookupError, RuntimeError) as exc:
            raise HubStartError(f"{kind.value} model {entry.name!r}: {exc}") from None
        executor = ThreadPoolExecutor(
            max_workers=entry.max_concurrency, thread_name_prefix=f"ev-{entry.name}"
        )
        return EngineSlot(
            key,
            plugin,
            cast(Engine, None),
            DeviceChoice("cpu", ""),
            executor,
            entry.max_concurrency,
            FairLimiter(entry.max_concurrency),
        )

    @staticmethod
    def _grow(slot: EngineSlot, max_concurrency: int) -> None:
        """Let a shared slot serve the largest ``max_concurrency`` of its entries."""
        if max_concurrency > slot.max_concurrency:
            # ThreadPoolExecutor starts further workers on demand.
            slot.executor._max_workers = max_concurrency
            slot.max_concurrency = max_concurrency
            slot.limiter.permits = max_concurrency

    def _load_slot(
        self,
        slot: EngineSlot,
        kind: EngineKind,
        entry: ModelConfig,
        options: Any,
        settings: Settings,
    ) -> None:
        """Blocking: pick the device, build and load the engine (with ``settings``,
        which on a reload are the new ones)."""
        label = f"{kind.value} model {entry.name!r} ({entry.engine} {entry.model})"
        try:
            facts = probe_machine(slot.plugin.runtime)
            slot.device = select_device(settings.device_for(entry), slot.plugin.devices, facts)
            _LOGGER.info("Loading %s on %s (%s)", label, slot.device.device, slot.device.reason)
            context = EngineContext(
                model=entry,
                device=slot.device.device,
                cache_dir=settings.cache_dir,
                offline=settings.offline,
            )
            started = time.monotonic()
            engine = slot.plugin.factory(context, options)
            engine.load()
            slot.engine = engine
            slot.load_s = time.monotonic() - started
            _LOGGER.info("Loaded %s in %.2f s", label, slot.load_s)
        except Exception as exc:
            hint = ""
            if isinstance(exc, ImportError):
                hint = f" ({slot.plugin.install_hint()})"
            raise HubStartError(f"{label}: {exc}{hint}") from exc

    def _bind(self, kind: EngineKind, entry: ModelConfig, slot: EngineSlot) -> None:
        entries = self._models[kind]
        model: LoadedModel[Any] = LoadedModel(
            kind, entry, slot, public_names=(entry.name, *entry.aliases)
        )
        entries.append(model)
        for public in model.public_names:
            self._names[kind][public] = model
        if kind is EngineKind.TTS:
            engine = cast(TtsEngine, slot.engine)
            voices = engine.capabilities.voices
            for public in model.public_names:
                self._voices.setdefault(public, (model, voices[0].name if voices else ""))
            for voice in voices:
                self._voices.setdefault(voice.name, (model, voice.name))

    def _finish_defaults(self) -> None:
        for entries in self._models.values():
            if entries and not any(m.default for m in entries):
                marked = [m for m in entries if m.config.default]
                (marked or entries)[0].default = True

    async def reload(self, settings: Settings) -> HubReload:
        """Switch to ``settings`` without a gap in service (SIGHUP).

        Engines that are new or whose configuration changed load first, next to
        the running ones, in worker threads; then every public name is switched
        over in one step (no request sees a half-applied config); engines no
        longer used close in the background once their in-flight calls finished
        (at most ``shutdown_timeout_s`` later). On any error nothing changes and
        :class:`HubStartError` is raised. Per-entry ``max_concurrency`` of a
        kept engine only grows.
        """
        async with self._reload_lock:
            return await self._reload(settings)

    async def _reload(self, settings: Settings) -> HubReload:
        try:
            validated = validate_engines(settings, self._registry)
        except ConfigError as exc:
            raise HubStartError(str(exc)) from None
        loop = asyncio.get_running_loop()
        plan: list[tuple[EngineKind, ModelConfig, EngineSlot]] = []
        fresh: dict[str, EngineSlot] = {}
        loads: list[asyncio.Future[None]] = []
        for kind in EngineKind:
            for entry in self._selected(kind, settings):
                options = validated[(kind, entry.name)]
                key = self._slot_key(kind, entry, options, settings)
                slot = self._slots.get(key) or fresh.get(key)
                if slot is None:
                    try:
                        slot = self._new_slot(kind, entry, key)
                    except HubStartError:
                        await self._close_slots(list(fresh.values()))
                        raise
                    fresh[key] = slot
                    loads.append(
                        loop.run_in_executor(
                            slot.executor, self._load_slot, slot, kind, entry, options, settings
                        )
                    )
                else:
                    self._grow(slot, entry.max_concurrency)
                plan.append((kind, entry, slot))
        try:
            results = await asyncio.gather(*loads, return_exceptions=True)
        except asyncio.CancelledError:
            # Abandoned (shutdown): what the worker threads still load is dropped.
            await self._close_slots(list(fresh.values()))
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._close_slots(list(fresh.values()))
            raise HubStartError("; ".join(str(e) for e in errors)) from errors[0]

        # The switch: synchronous, so no request observes a mix of old and new.
        old = (self._models, self._names, self._voices, self._slots, self.settings)
        self._models = {k: [] for k in EngineKind}
        self._names = {k: {} for k in EngineKind}
        self._voices = {}
        try:
            for kind, entry, slot in plan:
                self._bind(kind, entry, slot)
            self._finish_defaults()
        except Exception:
            self._models, self._names, self._voices, self._slots, self.settings = old
            await self._close_slots(list(fresh.values()))
            raise
        used = {slot.key: slot for _kind, _entry, slot in plan}
        retired = [slot for key, slot in self._slots.items() if key not in used]
        self._slots = used
        self.settings = settings
        for slot in retired:
            task = asyncio.create_task(self._retire(slot), name=f"retire-{slot.plugin.name}")
            self._retiring[id(slot)] = (slot, task)
        summary = HubReload(
            loaded=[e.name for _k, e, s in plan if s.key in fresh],
            kept=[e.name for _k, e, s in plan if s.key not in fresh],
            retired=len(retired),
        )
        _LOGGER.info(
            "Reloaded engines: %d loaded (%s), %d kept, %d retired",
            len(summary.loaded),
            ", ".join(summary.loaded) or "-",
            len(summary.kept),
            summary.retired,
        )
        return summary

    async def _retire(self, slot: EngineSlot) -> None:
        """Close an engine a reload dropped once nothing uses it (bounded wait)."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        # Polling keeps the request hot path a plain counter (no Event per call).
        while slot.active > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if slot.active > 0:
            _LOGGER.warning("Closing %s with %d calls still running", slot.plugin.name, slot.active)
        await self._close_slots([slot])
        self._retiring.pop(id(slot), None)

    async def _close_slots(self, slots: list[EngineSlot]) -> None:
        loop = asyncio.get_running_loop()
        for slot in slots:
            engine: Engine | None = slot.engine
            slot.engine = cast(Engine, None)  # closed once, even if this task is cancelled
            if engine is not None:
                try:
                    await loop.run_in_executor(slot.executor, engine.close)
                except Exception:
                    _LOGGER.exception("Error closing engine %s", slot.plugin.name)
            slot.executor.shutdown(wait=False, cancel_futures=True)

    async def wait_retired(self) -> None:
        """Wait until engines dropped by reloads are closed (tests, shutdown)."""
        await asyncio.gather(*(t for _s, t in self._retiring.values()), return_exceptions=True)

    async def __aenter__(self) -> EngineHub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release every engine (in its own thread) and stop the worker pools."""
        retiring = list(self._retiring.values())
        self._retiring.clear()
        for _slot, task in retiring:
            task.cancel()
        await asyncio.gather(*(task for _slot, task in retiring), return_exceptions=True)
        slots = list(self._slots.values()) + [slot for slot, _task in retiring]
        self._slots.clear()
        for kind in EngineKind:
            self._models[kind].clear()
            self._names[kind].clear()
        self._voices.clear()
        await self._close_slots(slots)

    # -------------------------------------------------------------- lookups

    def models(self, kind: EngineKind) -> list[LoadedModel[Any]]:
        return list(self._models[kind])

    def slots(self) -> list[EngineSlot]:
        return list(self._slots.values())

    def get(self, kind: EngineKind, name: str | None = None) -> LoadedModel[Any]:
        """The model called ``name`` (or alias); the default one for ``None``/empty."""
        entries = self._models[kind]
        if not name:
            for model in entries:
                if model.default:
                    return model
            if entries:
                return entries[0]
            raise UnknownModelError(kind, "(default)", [])
        try:
            return self._names[kind][name]
        except KeyError:
            raise UnknownModelError(kind, name, [m.name for m in entries]) from None

    def asr(self, name: str | None = None) -> LoadedModel[AsrEngine]:
        return self.get(EngineKind.ASR, name)

    def wake(self, name: str | None = None) -> LoadedModel[WakeEngine]:
        return self.get(EngineKind.WAKE, name)

    def vad(self, name: str | None = None) -> LoadedModel[VadEngine]:
        return self.get(EngineKind.VAD, name)

    def voice(self, name: str | None = None) -> tuple[LoadedModel[TtsEngine], str]:
        """The TTS model and engine voice for a public voice name."""
        if not name:
            model: LoadedModel[TtsEngine] = self.get(EngineKind.TTS)
            voices = model.engine.capabilities.voices
            return model, voices[0].name if voices else ""
        try:
            return self._voices[name]
        except KeyError:
            raise UnknownModelError(EngineKind.TTS, name, self.voice_names()) from None

    def voice_names(self) -> list[str]:
        return list(self._voices)

    def asr_capabilities(self) -> list[tuple[LoadedModel[AsrEngine], AsrCapabilities]]:
        return [(m, m.engine.capabilities) for m in self._models[EngineKind.ASR]]

    def tts_capabilities(self) -> list[tuple[LoadedModel[TtsEngine], TtsCapabilities]]:
        return [(m, m.engine.capabilities) for m in self._models[EngineKind.TTS]]

    def wake_capabilities(self) -> list[tuple[LoadedModel[WakeEngine], WakeCapabilities]]:
        return [(m, m.engine.capabilities) for m in self._models[EngineKind.WAKE]]

    def vad_capabilities(self) -> list[tuple[LoadedModel[VadEngine], VadCapabilities]]:
        return [(m, m.engine.capabilities) for m in self._models[EngineKind.VAD]]

    def all_voices(self) -> list[tuple[LoadedModel[TtsEngine], VoiceInfo]]:
        return [
            (m, voice)
            for m in self._models[EngineKind.TTS]
            for voice in m.engine.capabilities.voices
        ]

    # ------------------------------------------------------- thread boundary

    async def run(self, model: LoadedModel[Any], fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` in ``model``'s worker pool.

        The call waits for a fair turn (:mod:`edgevoice.fairness`): callers
        queue per face and client, so one busy client cannot starve others.
        The turn is held until the worker thread is done, even when the
        awaiting task is cancelled, so the pool never runs more than
        ``max_concurrency`` calls.
        """
        slot = model.slot
        loop = asyncio.get_running_loop()

        def timed() -> T:
            started = time.monotonic()
            try:
                return fn(*args)
            finally:
                slot.busy_s += time.monotonic() - started

        def release(_future: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(slot.limiter.release)

        slot.active += 1
        try:
            await slot.limiter.acquire()
            try:
                future = slot.executor.submit(timed)
            except BaseException:
                slot.limiter.release()
                raise
            future.add_done_callback(release)
            return await asyncio.wrap_future(future)
        finally:
            slot.active -= 1

    async def iterate(self, model: LoadedModel[Any], iterator: Iterator[T]) -> AsyncIterator[T]:
        """Consume a blocking (lazy) iterator one ``next()`` at a time in the pool."""
        done = object()
        model.slot.active += 1
        try:
            while True:
                item = await self.run(model, next, iterator, done)
                if item is done:
                    return
                yield cast(T, item)
        finally:
            try:
                close = getattr(iterator, "close", None)
                if close is not None:
                    try:
                        await asyncio.shield(self.run(model, close))
                    except (ValueError, RuntimeError, asyncio.CancelledError):
                        pass  # still executing in another worker: it ends by itself
            finally:
                model.slot.active -= 1

    # ------------------------------------------------------------------ ASR

    async def transcribe_segments(
        self,
        audio: Audio,
        options: TranscribeOptions | None = None,
        model: str | None = None,
    ) -> tuple[LoadedModel[AsrEngine], TranscriptInfo, AsyncIterator[Segment]]:
        """Start transcribing; segments stream as the engine decodes them."""
        loaded = self.asr(model)
        options = options or TranscribeOptions()
        engine = loaded.engine
        rate = engine.capabilities.sample_rate_hz
        loaded.slot.requests += 1
        loaded.slot.audio_s += audio.duration_s

        def begin() -> tuple[TranscriptInfo, Iterator[Segment]]:
            return engine.transcribe(audio.at_rate(rate).samples, options)

        info, segments = await self.run(loaded, begin)
        return loaded, info, self.iterate(loaded, segments)

    async def transcribe(
        self,
        audio: Audio,
        options: TranscribeOptions | None = None,
        model: str | None = None,
    ) -> Transcript:
        """Transcribe a whole clip; the lazy segments are consumed in the worker."""
        loaded = self.asr(model)
        options = options or TranscribeOptions()
        engine = loaded.engine
        rate = engine.capabilities.sample_rate_hz
        loaded.slot.requests += 1
        loaded.slot.audio_s += audio.duration_s

        def work() -> Transcript:
            info, segments = engine.transcribe(audio.at_rate(rate).samples, options)
            return Transcript.from_segments(info, list(segments))

        return await self.run(loaded, work)

    # ------------------------------------------------------------------ TTS

    def _tts_request(
        self, options: SynthesizeOptions | None
    ) -> tuple[LoadedModel[TtsEngine], SynthesizeOptions]:
        """Resolve the public voice name to a model and that engine's voice."""
        options = options or SynthesizeOptions()
        loaded, engine_voice = self.voice(options.voice)
        loaded.slot.requests += 1
        return loaded, dataclasses.replace(options, voice=engine_voice or None)

    async def synthesize(
        self, text: str, options: SynthesizeOptions | None = None
    ) -> tuple[LoadedModel[TtsEngine], int, AsyncIterator[FloatAudio]]:
        """Start synthesis; returns the model, its sample rate and the audio chunks.

        ``options.voice`` is a public voice name (entry name, alias or engine voice).
        """
        loaded, request = self._tts_request(options)
        engine = loaded.engine
        chunks = await self.run(loaded, engine.synthesize, text, request)
        return loaded, engine.capabilities.sample_rate_hz, self.iterate(loaded, chunks)

    async def synthesize_all(self, text: str, options: SynthesizeOptions | None = None) -> Audio:
        """Synthesize and join all chunks (one worker call)."""
        import numpy as np

        loaded, request = self._tts_request(options)
        engine = loaded.engine

        def work() -> FloatAudio:
            parts = list(engine.synthesize(text, request))
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

        samples = await self.run(loaded, work)
        return Audio(samples, engine.capabilities.sample_rate_hz)
