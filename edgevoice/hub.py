"""EngineHub: engine lifecycle, name mapping and the thread boundary.

The hub loads every ``load = "startup"`` engine at startup (before the daemon
reports ready) and the ``on_demand`` ones on first use (each behind its own
load lock, so a slow load never blocks other models; a request waits for it
at most ``load_timeout_s``), unloads engines idle for their ``ttl_s`` (never
one with open sessions or calls in flight), reports each model's state
(:meth:`EngineHub.model_states`), maps public model/voice names to engines,
runs every blocking engine call in a per-engine worker pool sized by
``max_concurrency`` (so one busy model never starves another, and the event
loop never waits on inference), shares one engine between entries that
configure the same model identically, and exposes the capabilities protocols advertise.

Streams hold their model through *sessions* (:meth:`EngineHub.asr_session`,
:meth:`EngineHub.wake_session`, :meth:`EngineHub.vad_session`, and
:meth:`EngineHub.speak` for TTS): the model is resolved once, when the
handle is made, and its slot is held until the session closes. A SIGHUP
reload lets open sessions finish on the engine they started with while new
ones get the new engine; a session still open ``shutdown_timeout_s`` later
moves to the model that now serves its name (or ends with
:class:`~edgevoice.errors.ShuttingDownError` when none does). Every call on a
closed engine raises that error, never an executor's ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar, cast

import numpy as np

from edgevoice.audio import Audio, duration_limit_error, resample
from edgevoice.config import ConfigError, ModelConfig, Settings
from edgevoice.devices import DeviceChoice, probe_machine, select_device
from edgevoice.engines.base import (
    AsrCapabilities,
    AsrEngine,
    Detection,
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
    VadStream,
    VoiceInfo,
    WakeCapabilities,
    WakeEngine,
    WakeStream,
)
from edgevoice.engines.registry import EngineRegistry, default_registry, validate_engines
from edgevoice.errors import (
    BusyError,
    EngineError,
    ShuttingDownError,
    UnknownModelError,
    UnsupportedRequestError,
)
from edgevoice.fairness import FairLimiter
from edgevoice.memory import return_freed_memory
from edgevoice.pipeline import speak as speak_pipeline
from edgevoice.voices import VoiceLibrary, valid_voice_id

_LOGGER = logging.getLogger(__name__)

# Building a torch model is not thread-safe: while transformers' ``from_pretrained``
# builds one it sets torch's process-wide default dtype and patches
# ``PreTrainedModel.tie_weights`` for every class. Two loads at once leave those
# patches in place, and the next model loads untied, its output layer still on the
# meta device. Engines that need torch therefore load one at a time.
_TORCH_LOAD_LOCK = threading.Lock()


def _load_lock(plugin: EnginePlugin) -> contextlib.AbstractContextManager[Any]:
    return _TORCH_LOAD_LOCK if "torch" in plugin.requires else contextlib.nullcontext()


T = TypeVar("T")
E = TypeVar("E")


class HubStartError(RuntimeError):
    """An engine the config selects could not be loaded; the message says why."""


SESSION_MOVE_WAIT_S = 5.0
"""How long closing a slot waits for a session's call in flight before moving it."""

IDLE_CHECK_MAX_S = 5.0
"""Longest pause between two checks for engines idle past their ``ttl_s``."""

ModelState = Literal["loaded", "loading", "unloaded", "failed"]


def _rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass(frozen=True)
class ModelStatus:
    """One configured model's lifecycle state (:meth:`EngineHub.model_states`)."""

    name: str
    kind: EngineKind
    engine: str
    model: str
    state: ModelState
    load: str
    """The configured policy: ``startup`` or ``on_demand``."""
    ttl_s: float
    device: str | None
    """The device it runs on (``None`` until first loaded)."""
    memory_bytes: int | None
    """Estimate: the process's RSS growth while it loaded (loads running at the
    same time blur it; memory on an accelerator is not counted); ``None`` when
    unloaded or unknown."""
    load_s: float
    idle_s: float | None
    """Seconds since its last call or session ended (``None`` while in use or unloaded)."""
    error: str | None
    """Why the last load failed (state ``failed``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "engine": self.engine,
            "model": self.model,
            "state": self.state,
            "load": self.load,
            "ttl_s": self.ttl_s,
            "device": self.device,
            "memory_bytes": self.memory_bytes,
            "memory_estimate": "rss_delta_at_load",
            "load_s": round(self.load_s, 3),
            "idle_s": None if self.idle_s is None else round(self.idle_s, 3),
            "error": self.error,
        }


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
    """Calls in worker threads, iterations and open sessions; a slot retired by a
    reload closes at 0 (or after ``shutdown_timeout_s``)."""
    sessions: set[_Session] = field(default_factory=set)
    """Sessions holding this slot (each also counts once in ``active``)."""
    closed: bool = False
    """Set when the slot starts closing: no new session may hold it."""
    kind: EngineKind = EngineKind.ASR
    load_args: tuple[Any, ...] = ()
    """``(entry, options, settings)`` to load the engine again (on demand)."""
    state: ModelState = "unloaded"
    error: str | None = None
    capabilities: Any = None
    """The engine's capabilities, kept while it is unloaded (what protocols list)."""
    memory_bytes: int | None = None
    on_demand: bool = False
    """Every entry it serves says ``load = "on_demand"`` (not loaded at start)."""
    ttl_s: float = 0.0
    load_timeout_s: float = 300.0
    last_used_s: float = field(default_factory=time.monotonic)
    load_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while the engine loads or unloads."""
    load_task: asyncio.Task[None] | None = None
    released_s: float = 0.0
    """When the engine last handed back the memory it keeps while busy."""


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
        """The engine; while unloaded, a stand-in that has only ``capabilities``
        (the last loaded engine's). Calls go through the hub, which loads first."""
        engine = self.slot.engine
        if engine is None and not self.slot.closed:
            return cast(E, _Unloaded(self.slot))
        return cast(E, engine)

    @property
    def loaded(self) -> bool:
        return self.slot.engine is not None


class _Unloaded:
    """What :attr:`LoadedModel.engine` is while the engine is not loaded."""

    def __init__(self, slot: EngineSlot) -> None:
        self._slot = slot

    @property
    def capabilities(self) -> Any:
        if self._slot.capabilities is not None:
            return self._slot.capabilities
        return _placeholder_capabilities(self._slot.kind)

    def __getattr__(self, name: str) -> Any:
        raise ShuttingDownError(f"{self._slot.plugin.name} engine is not loaded")


def _placeholder_capabilities(kind: EngineKind) -> Any:
    """Capabilities of an engine never loaded yet (listed before its first load)."""
    if kind is EngineKind.ASR:
        return AsrCapabilities(languages=())
    if kind is EngineKind.TTS:
        return TtsCapabilities(voices=(), sample_rate_hz=22050)
    if kind is EngineKind.WAKE:
        return WakeCapabilities(wake_words=())
    return VadCapabilities()


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
        self._reaper: asyncio.Task[None] | None = None
        self.library = VoiceLibrary(
            settings.state_dir / "voices",
            max_voices=settings.limits.max_voices,
            max_bytes=settings.limits.max_voice_library_bytes,
        )
        """The stored voices every face clones from (blocking methods: use threads)."""
        self._state_listeners: list[Callable[[], None]] = []

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
                slot.load_args = (entry, options, self.settings)
                self._slots[key] = slot
        self._apply_policies([(kind, entry, self._slots[key]) for kind, entry, key in pending])
        for slot in self._slots.values():
            if not slot.on_demand:
                loads.append(self._start_load(slot, loop))
        results = await asyncio.gather(*loads, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise HubStartError("; ".join(str(e) for e in errors)) from errors[0]
        for slot in self._slots.values():
            slot.state = "loaded" if slot.engine is not None else "unloaded"
        for kind, entry, key in pending:
            self._bind(kind, entry, self._slots[key])
        self._finish_defaults()
        self._reaper = asyncio.create_task(self._reap_idle(), name="hub-idle-unload")

    def _start_load(
        self, slot: EngineSlot, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[None]:
        slot.state = "loading"
        entry, options, settings = slot.load_args
        return loop.run_in_executor(
            slot.executor, self._load_slot, slot, slot.kind, entry, options, settings
        )

    @staticmethod
    def _apply_policies(plan: Sequence[tuple[EngineKind, ModelConfig, EngineSlot]]) -> None:
        """Per slot, from all entries it serves: on demand only when every entry
        says so; ``ttl_s`` 0 (never) when any says so, else the longest."""
        entries: dict[int, tuple[EngineSlot, list[ModelConfig]]] = {}
        for _kind, entry, slot in plan:
            entries.setdefault(id(slot), (slot, []))[1].append(entry)
        for slot, configs in entries.values():
            slot.on_demand = all(c.load == "on_demand" for c in configs)
            ttls = [c.ttl_s for c in configs]
            slot.ttl_s = 0.0 if 0 in ttls else max(ttls)
            slot.load_timeout_s = max(c.load_timeout_s for c in configs)

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
            kind=kind,
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
            with _load_lock(slot.plugin):
                started = time.monotonic()
                rss_before = _rss_bytes()
                engine = slot.plugin.factory(context, options)
                engine.load()
                return_freed_memory()  # what reading the model's files left on the heap
                rss_after = _rss_bytes()
            slot.capabilities = engine.capabilities
            slot.memory_bytes = (
                max(0, rss_after - rss_before)
                if rss_before is not None and rss_after is not None
                else None
            )
            slot.load_s = time.monotonic() - started
            slot.engine = engine
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
            voices = cast(TtsEngine, model.engine).capabilities.voices
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
                    slot.load_args = (entry, options, settings)
                    fresh[key] = slot
                else:
                    self._grow(slot, entry.max_concurrency)
                plan.append((kind, entry, slot))
        fresh_plan = [p for p in plan if p[2].key in fresh]
        self._apply_policies(fresh_plan)
        loads = [self._start_load(s, loop) for s in fresh.values() if not s.on_demand]
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
        for slot in fresh.values():
            slot.state = "loaded" if slot.engine is not None else "unloaded"

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
        self._apply_policies(plan)
        used = {slot.key: slot for _kind, _entry, slot in plan}
        retired = [slot for key, slot in self._slots.items() if key not in used]
        self._slots = used
        self.settings = settings
        self.library.max_voices = settings.limits.max_voices
        self.library.max_bytes = settings.limits.max_voice_library_bytes
        for slot in retired:
            task = asyncio.create_task(self._retire(slot), name=f"retire-{slot.plugin.name}")
            self._retiring[id(slot)] = (slot, task)
        self._state_changed()
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

    async def _drain(self, slots: list[EngineSlot], *, sessions: bool = False) -> None:
        """Wait (bounded by ``shutdown_timeout_s``) until no call runs on ``slots``,
        nor, with ``sessions``, any session is open on them (otherwise open sessions
        do not count: they move or end when their slot closes)."""

        def busy(slot: EngineSlot) -> bool:
            return slot.active > (0 if sessions else len(slot.sessions))

        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        # Polling keeps the request hot path a plain counter (no Event per call).
        while any(busy(s) for s in slots) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _retire(self, slot: EngineSlot) -> None:
        """Close an engine a reload dropped once nothing uses it (bounded wait).

        Open sessions keep the old engine until they end; those still open
        after ``shutdown_timeout_s`` move to the model now serving their name
        (or end with :class:`ShuttingDownError` when there is none).
        """
        await self._drain([slot], sessions=True)
        calls = slot.active - len(slot.sessions)
        if calls > 0:
            _LOGGER.warning("Closing %s with %d calls still running", slot.plugin.name, calls)
        await self._close_slots([slot])
        self._retiring.pop(id(slot), None)

    async def _close_slots(self, slots: list[EngineSlot]) -> None:
        loop = asyncio.get_running_loop()
        for slot in slots:
            slot.closed = True
            for session in list(slot.sessions):
                try:
                    await session._slot_closing(slot)
                except Exception:
                    _LOGGER.exception("Moving a session off %s failed", slot.plugin.name)
            engine: Engine | None = slot.engine
            slot.engine = cast(Engine, None)  # closed once, even if this task is cancelled
            slot.state = "unloaded"
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
        """Release every engine (in its own thread) and stop the worker pools.

        Calls already made (waiting for a worker or running) finish first, for at
        most ``shutdown_timeout_s``; later ones end with :class:`ShuttingDownError`.
        """
        await self._drain(list(self._slots.values()))
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
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

    # ------------------------------------------------------ on-demand loading

    async def ensure_loaded(self, model: LoadedModel[Any]) -> None:
        """Load ``model``'s engine if it is not loaded (on demand), waiting at most
        its ``load_timeout_s``.

        Loads run in the model's own worker pool behind its own lock, so other
        models keep serving. Raises :class:`EngineError` naming why the load
        failed or that it timed out (the load goes on; a later request may find
        it loaded), :class:`ShuttingDownError` for a closed model.
        """
        slot = model.slot
        if slot.engine is not None:
            return
        if slot.closed:
            raise _gone(model)
        task = slot.load_task
        if task is None or task.done():
            task = asyncio.create_task(self._load_on_demand(slot), name=f"load-{model.name}")
            task.add_done_callback(_retrieve)
            slot.load_task = task
        try:
            await asyncio.wait_for(asyncio.shield(task), slot.load_timeout_s)
        except TimeoutError:
            raise EngineError(
                f"{model.kind.value} model {model.name!r} is still loading after "
                f"{slot.load_timeout_s:g} s (load_timeout_s); try again later"
            ) from None
        if slot.engine is None:  # unloaded again meanwhile (explicit unload, shutdown)
            if slot.closed:
                raise _gone(model)
            await self.ensure_loaded(model)

    async def _load_on_demand(self, slot: EngineSlot) -> None:
        async with slot.load_lock:
            if slot.engine is not None or slot.closed:
                return
            loop = asyncio.get_running_loop()
            self._set_state(slot, "loading")
            try:
                await self._start_load(slot, loop)
            except HubStartError as exc:
                slot.error = str(exc)
                self._set_state(slot, "failed")
                _LOGGER.warning("On-demand load failed: %s", exc)
                raise EngineError(f"load failed: {exc}") from None
            except RuntimeError as exc:  # the pool was shut down: the hub closed
                slot.state = "unloaded"
                raise ShuttingDownError(f"{slot.plugin.name} engine closed") from exc
            slot.error = None
            slot.last_used_s = time.monotonic()
            self._register_voices(slot)
            self._set_state(slot, "loaded")

    def _register_voices(self, slot: EngineSlot) -> None:
        """Map a TTS engine's voices (known once it first loaded) to its models."""
        if slot.kind is not EngineKind.TTS:
            return
        for model in self._models[EngineKind.TTS]:
            if model.slot is slot:
                for voice in cast(TtsEngine, slot.engine).capabilities.voices:
                    self._voices.setdefault(voice.name, (model, voice.name))
                voices = slot.engine.capabilities.voices  # type: ignore[union-attr]
                for public in model.public_names:
                    current = self._voices.get(public)
                    if current is not None and current[0] is model and not current[1]:
                        self._voices[public] = (model, voices[0].name if voices else "")

    async def _unload_slot(self, slot: EngineSlot, *, idle_only: bool) -> bool:
        """Close ``slot``'s engine, keeping the slot (it loads again on demand).

        Never while sessions are open or calls in flight (:class:`BusyError`,
        or ``False`` with ``idle_only``). Returns whether it unloaded.
        """
        async with slot.load_lock:
            if slot.engine is None or slot.closed:
                return False
            if slot.active > 0:
                if idle_only:
                    return False
                raise BusyError(
                    f"{slot.kind.value} model is in use ({len(slot.sessions)} open sessions, "
                    f"{slot.active - len(slot.sessions)} calls); unload it when idle"
                )
            if idle_only and (slot.ttl_s <= 0 or self._idle_s(slot) < slot.ttl_s):
                return False
            engine: Engine = slot.engine
            slot.engine = cast(Engine, None)
            slot.memory_bytes = None
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(slot.executor, engine.close)
            except Exception:
                _LOGGER.exception("Error closing engine %s", slot.plugin.name)
            _LOGGER.info(
                "Unloaded %s engine (%s)", slot.plugin.name, "idle" if idle_only else "asked"
            )
            self._set_state(slot, "unloaded")
            return True

    @staticmethod
    def _idle_s(slot: EngineSlot) -> float:
        return time.monotonic() - slot.last_used_s

    async def _release_memory(self, slot: EngineSlot) -> None:
        """Let an idle engine hand back the memory it keeps while busy (in its pool)."""
        release = getattr(slot.engine, "release_memory", None)
        if release is None:
            return
        slot.released_s = time.monotonic()
        try:
            done = asyncio.get_running_loop().run_in_executor(slot.executor, release)
        except RuntimeError:
            return  # the pool shut down meanwhile: the engine is closing anyway
        slot.active += 1  # close() and a reload's retirement wait for it
        try:
            await done
        except Exception:
            _LOGGER.exception("Releasing %s memory failed", slot.plugin.name)
        finally:
            slot.active -= 1

    async def _reap_idle(self) -> None:
        """Background: idle engines hand back the memory they keep while busy
        (after ``release_memory_after_s``); engines unused for their ``ttl_s`` unload."""
        while True:
            release_after = self.settings.release_memory_after_s
            ttls = [s.ttl_s for s in self._slots.values() if s.ttl_s > 0]
            pause = min([IDLE_CHECK_MAX_S, max(release_after / 2, 0.05), *(t / 4 for t in ttls)])
            await asyncio.sleep(max(pause, 0.02))
            for slot in list(self._slots.values()):
                idle = slot.engine is not None and slot.active == 0
                used_since = slot.last_used_s > slot.released_s
                if idle and used_since and self._idle_s(slot) >= release_after:
                    await self._release_memory(slot)
                    idle = slot.engine is not None and slot.active == 0
                if idle and 0 < slot.ttl_s <= self._idle_s(slot):
                    try:
                        await self._unload_slot(slot, idle_only=True)
                    except Exception:
                        _LOGGER.exception("Unloading idle %s failed", slot.plugin.name)

    def _find(self, name: str) -> LoadedModel[Any]:
        for kind in EngineKind:
            model = self._names[kind].get(name)
            if model is not None:
                return model
        raise UnknownModelError(
            EngineKind.ASR, name, [m.name for k in EngineKind for m in self._models[k]]
        )

    async def load(self, name: str) -> ModelStatus:
        """Load the model called ``name`` (any kind) now; its state after."""
        model = self._find(name)
        await self.ensure_loaded(model)
        return self.status(model)

    async def unload(self, name: str) -> ModelStatus:
        """Unload the model called ``name`` (with every entry sharing its engine);
        :class:`BusyError` while it serves sessions or calls."""
        model = self._find(name)
        if model.slot.load_task is not None and not model.slot.load_task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.shield(model.slot.load_task), model.slot.load_timeout_s
                )
        await self._unload_slot(model.slot, idle_only=False)
        return self.status(model)

    def status(self, model: LoadedModel[Any]) -> ModelStatus:
        """``model``'s lifecycle state now."""
        slot = model.slot
        loaded = slot.engine is not None
        return ModelStatus(
            name=model.name,
            kind=model.kind,
            engine=slot.plugin.name,
            model=model.config.model,
            state=slot.state,
            load=model.config.load,
            ttl_s=model.config.ttl_s,
            device=slot.device.device if slot.capabilities is not None else None,
            memory_bytes=slot.memory_bytes if loaded else None,
            load_s=slot.load_s,
            idle_s=self._idle_s(slot) if loaded and slot.active == 0 else None,
            error=slot.error,
        )

    def model_states(self) -> list[ModelStatus]:
        """Every configured model's state, device and memory estimate."""
        return [self.status(m) for kind in EngineKind for m in self._models[kind]]

    def add_state_listener(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (on the event loop) when a model's state changes;
        returns a function that removes it."""
        self._state_listeners.append(listener)
        return lambda: self._state_listeners.remove(listener)

    def _set_state(self, slot: EngineSlot, state: ModelState) -> None:
        if slot.state == state:
            return
        slot.state = state
        self._state_changed()

    def _state_changed(self) -> None:
        for listener in list(self._state_listeners):
            try:
                listener()
            except Exception:
                _LOGGER.exception("Model state listener failed")

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

    def is_stored_voice(self, name: str | None) -> bool:
        """Whether ``name`` reads as a voice-library id (not a configured voice)."""
        return bool(name) and name not in self._voices and valid_voice_id(name or "")

    def cloning_model(self) -> LoadedModel[TtsEngine]:
        """The TTS model that clones stored voices (the default one first)."""
        models = [m for m in self._models[EngineKind.TTS] if m.engine.capabilities.cloning]
        if not models:
            raise UnsupportedRequestError(
                "no configured TTS model clones voices (stored voices need one)", param="voice"
            )
        return sorted(models, key=lambda m: not m.default)[0]

    async def resolve_voice(self, options: SynthesizeOptions | None) -> SynthesizeOptions:
        """``options`` with a stored voice id in ``voice`` turned into the cloning
        model (its public name) and the stored reference (read in a thread).

        Other options come back unchanged. Raises
        :class:`~edgevoice.voices.VoiceNotFoundError` (an unknown voice; no
        stored ids are listed) or :class:`UnsupportedRequestError` (no model clones).
        """
        options = options or SynthesizeOptions()
        if options.reference is not None or not self.is_stored_voice(options.voice):
            return options
        assert options.voice is not None
        model = self.cloning_model()
        reference = await asyncio.to_thread(self.library.reference, options.voice)
        return dataclasses.replace(options, voice=model.name, reference=reference)

    def _replacement(self, model: LoadedModel[E]) -> LoadedModel[E] | None:
        """The model serving ``model``'s public name now, if on another open slot."""
        current = self._names[model.kind].get(model.name)
        if current is None or current.slot is model.slot or current.slot.closed:
            return None
        return cast(LoadedModel[E], current)

    def voice_names(self) -> list[str]:
        return list(self._voices)

    def asr_capabilities(self) -> list[tuple[LoadedModel[AsrEngine], AsrCapabilities]]:
        return [(m, m.engine.capabilities) for m in self._models[EngineKind.ASR]]

    def tts_capabilities(self) -> list[tuple[LoadedModel[TtsEngine], TtsCapabilities]]:
        return [(m, m.engine.capabilities) for m in self._models[EngineKind.TTS]]

    def all_voices(self) -> list[tuple[LoadedModel[TtsEngine], VoiceInfo]]:
        return [
            (m, voice)
            for m in self._models[EngineKind.TTS]
            for voice in m.engine.capabilities.voices
        ]

    # ------------------------------------------------------- thread boundary

    async def run(
        self,
        model: LoadedModel[Any],
        fn: Callable[..., T],
        *args: Any,
        on_done: Callable[[], None] | None = None,
    ) -> T:
        """Run blocking ``fn(*args)`` in ``model``'s worker pool.

        The call waits for a fair turn (:mod:`edgevoice.fairness`): callers
        queue per face and client, so one busy client cannot starve others.
        The turn is held until the worker thread is done, even when the
        awaiting task is cancelled, so the pool never runs more than
        ``max_concurrency`` calls. A call cancelled before its turn never runs.

        ``on_done`` is called on the event loop once the call no longer
        occupies (or waits for) a worker: finished, failed, or cancelled before
        it started; exactly once per call. A call on a closed slot raises
        :class:`ShuttingDownError`.
        """
        slot = model.slot
        loop = asyncio.get_running_loop()

        def timed() -> T:
            if slot.engine is None:  # closed after this call was queued (a bounded drain ended)
                raise _gone(model)
            started = time.monotonic()
            try:
                return fn(*args)
            finally:
                slot.busy_s += time.monotonic() - started

        def finished() -> None:
            slot.limiter.release()
            slot.active -= 1
            slot.last_used_s = time.monotonic()
            if on_done is not None:
                on_done()

        def release(_future: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(finished)

        slot.active += 1
        submitted = False
        try:
            if slot.engine is None:
                await self.ensure_loaded(model)
            await slot.limiter.acquire()
            try:
                future = slot.executor.submit(timed)
            except RuntimeError:  # the pool was shut down (slot closed) meanwhile
                slot.limiter.release()
                raise _gone(model) from None
            except BaseException:
                slot.limiter.release()
                raise
            submitted = True
            future.add_done_callback(release)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if future.cancelled() and not (task is not None and task.cancelling()):
                    # Not this caller's cancellation: the pool dropped the queued call
                    # because the slot closed.
                    raise _gone(model) from None
                raise
        finally:
            if not submitted:
                slot.active -= 1
                slot.last_used_s = time.monotonic()
                if on_done is not None:
                    on_done()

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
                    except (ValueError, RuntimeError, ShuttingDownError):
                        pass  # still executing in another worker: it ends by itself
                    # A CancelledError here is the caller's: the shielded close goes
                    # on in the worker, the cancellation must reach the caller.
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
        await self.ensure_loaded(loaded)
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
        return await self._transcribe(self.asr(model), audio, options or TranscribeOptions())

    async def _transcribe(
        self,
        loaded: LoadedModel[AsrEngine],
        audio: Audio,
        options: TranscribeOptions,
        on_done: Callable[[], None] | None = None,
    ) -> Transcript:
        loaded.slot.requests += 1
        loaded.slot.audio_s += audio.duration_s

        def work() -> Transcript:
            engine = loaded.engine  # workers run only while the slot is open
            rate = engine.capabilities.sample_rate_hz
            info, segments = engine.transcribe(audio.at_rate(rate).samples, options)
            return Transcript.from_segments(info, list(segments))

        return await self.run(loaded, work, on_done=on_done)

    # ------------------------------------------------------------- sessions

    def asr_session(
        self,
        model: str | LoadedModel[AsrEngine] | None = None,
        options: TranscribeOptions | None = None,
        *,
        max_audio_s: float | None = None,
    ) -> AsrSession:
        """A transcription session on one ASR model (``async with``).

        The model is resolved now (:class:`UnknownModelError` at once) and its
        slot is held from ``__aenter__`` to ``__aexit__``. ``max_audio_s``
        bounds the audio the session buffers (default ``[limits] max_audio_s``).
        """
        loaded = model if isinstance(model, LoadedModel) else self.asr(model)
        limit = self.settings.limits.max_audio_s if max_audio_s is None else max_audio_s
        return AsrSession(self, loaded, options or TranscribeOptions(), limit)

    def wake_session(
        self, models: Sequence[str | LoadedModel[WakeEngine]] | None = None
    ) -> WakeSession:
        """A wake-word detector over ``models`` (public names; all wake models for
        ``None``/empty), one engine stream each (``async with``)."""
        if not models:
            resolved = self.models(EngineKind.WAKE)
            if not resolved:
                raise UnknownModelError(EngineKind.WAKE, "(any)", [])
        else:
            resolved = []
            for item in models:
                loaded = item if isinstance(item, LoadedModel) else self.wake(item)
                if loaded not in resolved:
                    resolved.append(loaded)
        return WakeSession(self, resolved)

    def vad_session(self, model: str | LoadedModel[VadEngine] | None = None) -> VadSession:
        """A voice-activity stream on one VAD model (``async with``)."""
        loaded = model if isinstance(model, LoadedModel) else self.vad(model)
        return VadSession(self, loaded)

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
        await self.ensure_loaded(loaded)
        engine = loaded.engine
        chunks = await self.run(loaded, engine.synthesize, text, request)
        return loaded, engine.capabilities.sample_rate_hz, self.iterate(loaded, chunks)

    async def synthesize_all(self, text: str, options: SynthesizeOptions | None = None) -> Audio:
        """Synthesize and join all chunks (one worker call)."""
        loaded, request = self._tts_request(options)
        await self.ensure_loaded(loaded)
        engine = loaded.engine

        def work() -> FloatAudio:
            parts = list(engine.synthesize(text, request))
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

        samples = await self.run(loaded, work)
        return Audio(samples, engine.capabilities.sample_rate_hz)

    def speak(
        self, text: speak_pipeline.TextInput, options: SynthesizeOptions | None = None
    ) -> speak_pipeline.Speech:
        """Speak ``text`` (whole, or chunks such as a ``TextFeed``) in bounded pieces,
        in order, with this hub's ``[limits]`` (``async with hub.speak(...) as speech``).

        The voice is resolved and the text length checked now, raising at once;
        see :func:`edgevoice.pipeline.speak.speak`.
        """
        return speak_pipeline.speak(self, text, options)


# ------------------------------------------------------------------ sessions


def _gone(model: LoadedModel[Any]) -> ShuttingDownError:
    return ShuttingDownError(
        f"{model.kind.value} model {model.name!r} is no longer loaded (shutdown or reload)"
    )


@dataclass(eq=False)
class _Binding:
    """One model a session holds, and its engine stream (wake word, VAD)."""

    model: LoadedModel[Any]
    stream: Any = None
    busy: int = 0
    """Calls of this binding queued or running in a worker."""
    close_when_idle: Any = None
    """A stream to close (in the worker pool) once ``busy`` drops to 0."""


class _Session:
    """Holds model slots from ``__aenter__`` to ``__aexit__`` (or :meth:`aclose`).

    Event-loop only, one task at a time per session. While open, the session
    counts in each slot's ``active``, so a reload that retires the slot lets
    the session finish on it. A slot that closes under an open session (still
    open ``shutdown_timeout_s`` after the reload, or a shutdown) moves the
    session to the model now serving the same public name; when there is none,
    the session's calls raise :class:`ShuttingDownError`.
    """

    def __init__(self, hub: EngineHub, models: Sequence[LoadedModel[Any]]) -> None:
        for model in models:
            if model.slot.closed:
                raise _gone(model)
        self._hub = hub
        self._bound = [_Binding(model) for model in models]
        self._lost: list[str] = []
        self._lock = asyncio.Lock()  # stream calls and slot moves, one at a time
        self._state = "new"  # -> "open" -> "closed"

    @property
    def models(self) -> list[LoadedModel[Any]]:
        """The models serving this session now (after any move)."""
        return [b.model for b in self._bound]

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a session is entered once")
        for bound in self._bound:
            if bound.model.slot.closed:
                raise _gone(bound.model)
        for bound in self._bound:
            self._hold(bound.model.slot)
        self._state = "open"
        try:
            for bound in self._bound:  # held first: an idle unload cannot interleave
                await self._hub.ensure_loaded(bound.model)
            self._loaded()
            await self._open_streams()
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
        """Release the slots and close engine streams; idempotent, never raises."""
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        bound_list, self._bound = self._bound, []
        for bound in bound_list:
            self._close_stream(bound)
            if was_open:
                self._release(bound.model.slot)

    async def _open_streams(self) -> None:
        """Start the engine streams (in the worker pools)."""

    def _loaded(self) -> None:
        """Called once the models are loaded, before the streams start."""

    def _new_stream(self, model: LoadedModel[Any]) -> Any:
        """Blocking: a fresh engine stream for ``model`` (runs in its pool)."""
        return None

    # ------------------------------------------------------------ plumbing

    def _hold(self, slot: EngineSlot) -> None:
        slot.active += 1
        slot.sessions.add(self)

    def _release(self, slot: EngineSlot) -> None:
        slot.active -= 1
        slot.last_used_s = time.monotonic()
        if not any(b.model.slot is slot for b in self._bound):
            slot.sessions.discard(self)

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError("the session is not open (use `async with`)")
        if not self._bound:
            raise ShuttingDownError(
                f"{', '.join(self._lost) or 'the model'} is no longer loaded (shutdown or reload)"
            )

    async def _call(self, bound: _Binding, fn: Callable[..., T], *args: Any) -> T:
        """``hub.run`` for this binding, counting its calls in flight."""

        def done() -> None:
            bound.busy -= 1
            if bound.busy == 0 and bound.close_when_idle is not None:
                stream, bound.close_when_idle = bound.close_when_idle, None
                _close_in_pool(bound.model.slot, stream)

        bound.busy += 1
        return await self._hub.run(bound.model, fn, *args, on_done=done)

    def _close_stream(self, bound: _Binding) -> None:
        """Close ``bound``'s stream in its pool, after its calls in flight."""
        stream, bound.stream = bound.stream, None
        if stream is None:
            return
        if bound.busy:
            bound.close_when_idle = stream
        else:
            _close_in_pool(bound.model.slot, stream)

    async def _slot_closing(self, slot: EngineSlot) -> None:
        """Called by the hub before ``slot``'s engine closes: move or drop bindings."""
        if self._state != "open":
            return
        try:
            await asyncio.wait_for(self._lock.acquire(), SESSION_MOVE_WAIT_S)
        except TimeoutError:
            locked = False
        else:
            locked = True
        try:
            for bound in [b for b in self._bound if b.model.slot is slot]:
                old = bound.model
                # The old binding keeps its own count of calls in flight, so its
                # stream is closed in the old pool once they are done.
                self._close_stream(bound)
                index = self._bound.index(bound)
                replacement = self._hub._replacement(old)
                if replacement is None:
                    del self._bound[index]
                    self._lost.append(f"{old.kind.value} model {old.name!r}")
                    _LOGGER.info("%s model %s closed under an open session", old.kind, old.name)
                else:
                    self._bound[index] = _Binding(replacement)
                    self._hold(replacement.slot)
                    _LOGGER.info(
                        "Open session moved to the reloaded %s model %s", old.kind, old.name
                    )
                self._release(slot)
        finally:
            if locked:
                self._lock.release()


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a load task's failure seen (its waiters may all have timed out)."""
    if not task.cancelled():
        task.exception()


def _close_in_pool(slot: EngineSlot, stream: Any) -> None:
    """Close an engine stream in the worker pool that ran it (fire and forget)."""
    close = getattr(stream, "close", None)
    if close is None:
        return
    try:
        slot.executor.submit(close)
    except RuntimeError:  # pool already shut down: the engine is gone with it
        _LOGGER.debug("Stream of a closed %s engine not closed explicitly", slot.plugin.name)


class AsrSession(_Session):
    """Audio buffered for one utterance and decoded on a held ASR model slot.

    Feed mono float32 at :attr:`rate_hz` with :meth:`append`; :meth:`transcribe`
    decodes all of it (or a given clip). The buffer is bounded by
    ``max_audio_s`` (:class:`LimitExceededError` past it) and grows in place
    (amortized, never past the bound), so :meth:`audio` is a view, not a copy:
    clips taken from it stay valid while more audio is appended. Event-loop only.
    """

    def __init__(
        self,
        hub: EngineHub,
        model: LoadedModel[AsrEngine],
        options: TranscribeOptions,
        max_audio_s: float,
    ) -> None:
        super().__init__(hub, [model])
        self.options = options
        self.max_audio_s = max_audio_s
        self.rate_hz: int = model.engine.capabilities.sample_rate_hz
        """Rate of the audio this session buffers (the model's)."""
        self._buffer: FloatAudio = np.zeros(0, dtype=np.float32)
        self._samples = 0
        self.decoding = 0
        """This session's decodes queued or running in a worker."""

    def _loaded(self) -> None:
        self.rate_hz = self._bound[0].model.engine.capabilities.sample_rate_hz

    @property
    def model(self) -> LoadedModel[AsrEngine]:
        self._require_open()
        return cast(LoadedModel[AsrEngine], self._bound[0].model)

    @property
    def samples(self) -> int:
        """Samples buffered."""
        return self._samples

    @property
    def duration_s(self) -> float:
        return self._samples / self.rate_hz

    def check_room(self, duration_s: float) -> None:
        """Raise :class:`LimitExceededError` if ``duration_s`` more would cross ``max_audio_s``."""
        if self.duration_s + duration_s > self.max_audio_s + 1e-6:
            raise duration_limit_error(self.max_audio_s)

    def append(self, samples: FloatAudio) -> None:
        """Buffer ``samples`` (mono float32 at :attr:`rate_hz`)."""
        self.check_room(len(samples) / self.rate_hz)
        end = self._samples + len(samples)
        if end > len(self._buffer):
            # Double (at least 4 s), never beyond the bound: appends stay amortized O(1).
            bound = int(self.max_audio_s * self.rate_hz) + 1
            size = min(max(end, 2 * len(self._buffer), 4 * self.rate_hz), max(bound, end))
            grown = np.empty(size, dtype=np.float32)
            grown[: self._samples] = self._buffer[: self._samples]
            self._buffer = grown  # clips taken before keep the old array alive
        self._buffer[self._samples : end] = samples
        self._samples = end

    def audio(self) -> Audio:
        """Everything buffered, as one clip (a view; later appends do not change it)."""
        return Audio(self._buffer[: self._samples], self.rate_hz)

    def keep_last(self, samples: int) -> None:
        """Drop all but the last ``samples`` buffered (pre-roll while waiting for speech)."""
        if self._samples <= samples:
            return
        keep = max(samples, 0)
        # A fresh array: clips taken before still see their audio.
        tail = self._buffer[self._samples - keep : self._samples].copy()
        self._buffer, self._samples = tail, keep

    async def transcribe(self, audio: Audio | None = None) -> Transcript:
        """Decode ``audio`` (default: everything buffered) on the held model."""
        model = self.model
        clip = self.audio() if audio is None else audio

        def done() -> None:
            self.decoding -= 1

        self.decoding += 1
        return await self._hub._transcribe(model, clip, self.options, on_done=done)


class WakeSession(_Session):
    """Wake-word detection over one or more wake models, one engine stream each.

    Event-loop only; :meth:`process` calls run one at a time.
    """

    def __init__(self, hub: EngineHub, models: Sequence[LoadedModel[WakeEngine]]) -> None:
        super().__init__(hub, models)
        self.rate_hz: int = models[0].engine.capabilities.sample_rate_hz
        """The rate callers should feed (the first model's)."""

    def _loaded(self) -> None:
        self.rate_hz = self._bound[0].model.engine.capabilities.sample_rate_hz

    async def _open_streams(self) -> None:
        async with self._lock:
            for bound in self._bound:
                bound.stream = await self._call(bound, _start_wake_stream, bound.model)

    async def process(self, samples: FloatAudio, rate_hz: int) -> list[Detection]:
        """Feed the next chunk (mono float32 at ``rate_hz``); detections in it."""
        async with self._lock:
            self._require_open()
            detections: list[Detection] = []
            for bound in list(self._bound):
                if bound.stream is None:  # moved to a reloaded model: fresh state
                    bound.stream = await self._call(bound, _start_wake_stream, bound.model)
                found = await self._call(
                    bound, _feed_wake, bound.model, bound.stream, samples, rate_hz
                )
                detections.extend(found)
            return detections


def _start_wake_stream(model: LoadedModel[WakeEngine]) -> WakeStream:
    return model.engine.start_stream(None)


def _feed_wake(
    model: LoadedModel[WakeEngine], stream: WakeStream, samples: FloatAudio, rate_hz: int
) -> list[Detection]:
    return stream.process(resample(samples, rate_hz, model.engine.capabilities.sample_rate_hz))


class VadSession(_Session):
    """A voice-activity stream on one VAD model. Event-loop only."""

    def __init__(self, hub: EngineHub, model: LoadedModel[VadEngine]) -> None:
        super().__init__(hub, [model])
        self.rate_hz: int = model.engine.capabilities.sample_rate_hz

    def _loaded(self) -> None:
        self.rate_hz = self._bound[0].model.engine.capabilities.sample_rate_hz

    async def _open_streams(self) -> None:
        async with self._lock:
            bound = self._bound[0]
            bound.stream = await self._call(bound, _start_vad_stream, bound.model)

    async def process(self, samples: FloatAudio, rate_hz: int) -> float | None:
        """Feed the next chunk; the highest speech probability of the frames it
        completed, or ``None`` when it completed none."""
        (probability,) = await self.process_pieces(samples, rate_hz, max(len(samples), 1))
        return probability

    async def process_pieces(
        self, samples: FloatAudio, rate_hz: int, piece_samples: int
    ) -> list[float | None]:
        """Feed ``samples`` in pieces of ``piece_samples`` (at ``rate_hz``); one
        probability (or ``None``) per piece, all in one worker call."""
        async with self._lock:
            self._require_open()
            bound = self._bound[0]
            if bound.stream is None:  # moved to a reloaded model: fresh state
                bound.stream = await self._call(bound, _start_vad_stream, bound.model)
            return await self._call(
                bound, _feed_vad, bound.model, bound.stream, samples, rate_hz, piece_samples
            )


def _start_vad_stream(model: LoadedModel[VadEngine]) -> VadStream:
    return model.engine.start_stream()


def _feed_vad(
    model: LoadedModel[VadEngine],
    stream: VadStream,
    samples: FloatAudio,
    rate_hz: int,
    piece_samples: int,
) -> list[float | None]:
    vad_hz = model.engine.capabilities.sample_rate_hz
    audio = resample(samples, rate_hz, vad_hz)
    step = max(1, round(piece_samples * vad_hz / rate_hz))
    if not len(audio):
        return [None]
    return [stream.process(audio[i : i + step]) for i in range(0, len(audio), step)]
