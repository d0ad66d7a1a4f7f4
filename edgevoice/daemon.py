"""The daemon: hub from config, protocol servers, signals, ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from edgevoice.config import ConfigError, Settings, config_source, load_config
from edgevoice.engines.base import EngineKind
from edgevoice.engines.registry import EngineRegistry
from edgevoice.hub import EngineHub, HubStartError
from edgevoice.protocols.base import ProtocolServer, set_peers
from edgevoice.sdnotify import SystemdNotifier

_LOGGER = logging.getLogger(__name__)

# (config section with an ``enabled`` flag, "module:factory"). A factory takes
# (settings, hub) and returns an unstarted ProtocolServer.
PROTOCOLS: tuple[tuple[str, str], ...] = (
    ("wyoming", "edgevoice.protocols.wyoming:WyomingServer"),
    ("mqtt", "edgevoice.protocols.mqtt:MqttBridge"),
    ("http", "edgevoice.protocols.http:HttpServer"),
    ("audio_io", "edgevoice.audio_io.server:AudioIoServer"),
)

ServerFactory = Callable[[Settings, EngineHub], ProtocolServer]


def setup_logging(level: str) -> None:
    """One line per event on stderr; no timestamps under journald (it adds them)."""
    if "JOURNAL_STREAM" in os.environ:
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    # Third-party chatter stays at WARNING unless we debug.
    if level != "DEBUG":
        for noisy in ("faster_whisper", "piper", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_factory(path: str) -> ServerFactory:
    module_name, _, attr = path.partition(":")
    factory: ServerFactory = getattr(importlib.import_module(module_name), attr)
    return factory


_PROTOCOL_LABELS = {
    "wyoming": "Wyoming",
    "http": "HTTP",
    "mqtt": "MQTT",
    "audio_io": "local audio",
}

# A broker connection cannot overlap with its replacement (same client id: the
# broker drops the older one and its will marks the node offline).
_NO_OVERLAP = frozenset({"mqtt"})


class Daemon:
    """Runs until SIGTERM/SIGINT; a second signal stops at once; SIGHUP reloads.

    Talks to systemd (``Type=notify``) through :class:`SystemdNotifier`:
    ``READY=1`` once every engine is loaded and every listener bound,
    ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` from a task on the event loop (a
    blocked loop stops the pings and systemd restarts us), ``STOPPING=1`` on
    SIGTERM, ``RELOADING=1`` + ``MONOTONIC_USEC`` then ``READY=1`` around a
    reload, and ``STATUS=`` lines throughout.
    """

    def __init__(
        self,
        settings: Settings,
        registry: EngineRegistry | None = None,
        *,
        notifier: SystemdNotifier | None = None,
        config_loader: Callable[[], Settings] | None = None,
    ) -> None:
        """``config_loader`` (blocking) reads the configuration again on SIGHUP;
        by default the file the settings came from (:func:`config_source`)."""
        self.settings = settings
        self._registry = registry
        self.notifier = notifier or SystemdNotifier()
        self._config_loader = config_loader or functools.partial(
            load_config, config_source(settings)
        )
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._signals = 0
        self._main: asyncio.Task[Any] | None = None
        self.hub: EngineHub | None = None
        self._servers: dict[str, ProtocolServer] = {}
        self.ready = asyncio.Event()
        self.reloads = 0
        """Reloads finished (applied or rejected); tests wait on it."""
        self.reloaded = asyncio.Event()
        """Set after each reload attempt, cleared when the next one starts."""

    @property
    def servers(self) -> list[ProtocolServer]:
        return list(self._servers.values())

    # ---------------------------------------------------------------- signals

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals == 1:
            timeout = self.settings.shutdown_timeout_s
            _LOGGER.info("Stopping: finishing in-flight work (up to %.0f s)", timeout)
            self.notifier.stopping(f"Stopping: finishing in-flight requests (up to {timeout:g} s)")
            self._stop.set()
        elif self._main is not None:
            _LOGGER.warning("Second signal: stopping now")
            self._main.cancel()

    def request_reload(self) -> None:
        """SIGHUP: reload the configuration (several signals coalesce)."""
        self._reload_wanted.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        handlers: list[tuple[signal.Signals, Callable[[], None]]] = [
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ]
        installed = []
        for sig, handler in handlers:
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not main thread / Windows
                pass
        return installed

    # -------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        installed = self._install_signals(loop)
        watchdog: asyncio.Task[None] | None = None
        if (interval := self.notifier.watchdog_interval_s) is not None:
            # From the start: loading happens in threads, the loop stays free.
            watchdog = asyncio.create_task(self._watchdog(interval), name="sd-watchdog")
        try:
            await self._serve()
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.notifier.close()
        _LOGGER.info("Stopped")

    async def _watchdog(self, interval_s: float) -> None:
        _LOGGER.debug("Watchdog: pinging systemd every %.1f s", interval_s)
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    async def _serve(self) -> None:
        _LOGGER.info("Loading models")
        self.notifier.status("Loading models…")
        hub = EngineHub(self.settings, self._registry)
        try:
            await hub.start()
        except HubStartError as exc:
            self.notifier.status(f"Failed to load models: {exc}")
            raise
        self.hub = hub
        set_peers(hub, lambda: self.servers)
        if self._stop.is_set():  # SIGTERM while loading: never report READY
            await hub.close()
            return
        try:
            self.notifier.status("Models loaded; starting listeners")
            for section, factory in self._enabled(self.settings):
                server = factory(self.settings, hub)
                try:
                    await server.start()
                except Exception as exc:
                    self.notifier.status(f"Failed to start {_label(section, server)}: {exc}")
                    raise
                self._servers[section] = server
                _LOGGER.info("Serving %s on %s", server.name, ", ".join(server.addresses))
            status = self.serving_status()
            _LOGGER.info("Ready: %s", status)
            self.ready.set()
            self.notifier.ready(status)
            await self._until_stopped()
        finally:
            await self._stop_servers(list(self._servers.values()))
            self._servers.clear()
            await hub.close()

    async def _until_stopped(self) -> None:
        stop = asyncio.create_task(self._stop.wait(), name="wait-for-stop")
        try:
            while not self._stop.is_set():
                wanted = asyncio.create_task(self._reload_wanted.wait(), name="wait-for-sighup")
                await _first(stop, wanted)
                if self._stop.is_set():
                    break
                self._reload_wanted.clear()
                reload = asyncio.create_task(self.reload(), name="reload")
                await _first(stop, reload)
                # SIGTERM during a reload: the reload (e.g. a model download) is abandoned.
        finally:
            stop.cancel()
            await asyncio.gather(stop, return_exceptions=True)

    def serving_status(self) -> str:
        """The ``STATUS=`` line while serving."""
        parts = [
            f"{_label(section, server)} on {', '.join(server.addresses)}"
            for section, server in self._servers.items()
        ]
        hub = self.hub
        models = [m.name for kind in EngineKind for m in hub.models(kind)] if hub else []
        where = "Serving " + "; ".join(parts) if parts else "Running (no protocol enabled)"
        return f"{where} — models: {', '.join(models) or 'none'}"

    # ----------------------------------------------------------------- reload

    async def reload(self) -> bool:
        """Read the configuration again and apply it; ``False`` if rejected.

        Engines: :meth:`EngineHub.reload` (new ones load before old ones go).
        A running server first gets :meth:`ProtocolServer.reconfigure`: one that
        adopts the new settings in place (its listener is unchanged) keeps its
        connections and open streams. Others whose section changed are
        restarted: the replacement starts
        first where it can bind next to the old server (new address), else the
        old one stops first (same address: a short gap on that listener).
        """
        self.reloaded.clear()
        _LOGGER.info("Reloading configuration")
        self.notifier.reloading("Reloading configuration")
        try:
            applied = await self._reload()
        except Exception:
            _LOGGER.exception("Reload failed")
            applied = False
        finally:
            self.reloads += 1
            self.reloaded.set()
        if applied:
            status = self.serving_status()
            _LOGGER.info("Reloaded: %s", status)
        else:
            status = f"{self.serving_status()} (reload rejected: see log)"
        self.notifier.ready(status)
        return applied

    async def _reload(self) -> bool:
        assert self.hub is not None
        try:
            new = await asyncio.to_thread(self._config_loader)
        except (ConfigError, OSError) as exc:
            _LOGGER.error("Reload rejected, keeping the running configuration: %s", exc)
            return False
        try:
            await self.hub.reload(new)
        except HubStartError as exc:
            _LOGGER.error("Reload rejected, keeping the running configuration: %s", exc)
            return False
        old = self.settings
        self.settings = new
        if new.log_level != old.log_level:
            setup_logging(new.log_level)
        restarted = await self._apply_protocols(old, new)
        for section, server in list(self._servers.items()):
            if section not in restarted:
                try:
                    await server.hub_reloaded()
                except Exception:
                    _LOGGER.exception("Reload: %s could not refresh its models", server.name)
        return True

    async def _apply_protocols(self, old: Settings, new: Settings) -> set[str]:
        """Start/stop/restart servers whose section changed; returns those sections."""
        assert self.hub is not None
        timeout = new.shutdown_timeout_s
        touched: set[str] = set()
        for section, factory_path in PROTOCOLS:
            old_config: Any = getattr(old, section)
            new_config: Any = getattr(new, section)
            running = self._servers.get(section)
            if running is not None and new_config.enabled and await running.reconfigure(new):
                continue  # adopted in place (same listener): open streams go on
            if new_config == old_config and (running is not None) == new_config.enabled:
                continue
            touched.add(section)
            if not new_config.enabled:
                if running is not None:
                    _LOGGER.info("Reload: stopping %s", _label(section, running))
                    del self._servers[section]
                    await _stop_quietly(running, timeout)
                continue
            try:
                replacement = _load_factory(factory_path)(new, self.hub)
            except Exception:
                _LOGGER.exception("Reload: cannot create the %s server", section)
                continue
            label = _label(section, replacement)
            if running is None:
                await self._start_logged(section, replacement, f"Reload: starting {label}")
                continue
            _LOGGER.info("Reload: restarting %s with its new settings", label)
            if section not in _NO_OVERLAP:
                try:
                    await replacement.start()
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        _LOGGER.error("Reload: %s keeps its old settings: %s", label, exc)
                        await _stop_quietly(replacement, 0)
                        continue
                    await _stop_quietly(replacement, 0)
                    replacement = _load_factory(factory_path)(new, self.hub)
                except Exception as exc:
                    _LOGGER.error("Reload: %s keeps its old settings: %s", label, exc)
                    await _stop_quietly(replacement, 0)
                    continue
                else:
                    # New address bound next to the old one: no gap.
                    self._servers[section] = replacement
                    _LOGGER.info("Serving %s on %s", label, ", ".join(replacement.addresses))
                    await _stop_quietly(running, timeout)
                    continue
            # Same address (or a broker connection): the old one has to go first.
            del self._servers[section]
            await _stop_quietly(running, timeout)
            if not await self._start_logged(section, replacement, ""):
                fallback = _load_factory(factory_path)(old, self.hub)
                await self._start_logged(section, fallback, f"Reload: back to the old {label}")
        return touched

    async def _start_logged(self, section: str, server: ProtocolServer, message: str) -> bool:
        if message:
            _LOGGER.info("%s", message)
        try:
            await server.start()
        except Exception as exc:
            _LOGGER.error("Cannot start %s: %s", _label(section, server), exc)
            await _stop_quietly(server, 0)
            return False
        self._servers[section] = server
        _LOGGER.info("Serving %s on %s", server.name, ", ".join(server.addresses))
        return True

    # --------------------------------------------------------------- shutdown

    async def _stop_servers(self, servers: list[ProtocolServer]) -> None:
        timeout = self.settings.shutdown_timeout_s
        results = await asyncio.gather(
            *(server.stop(timeout) for server in reversed(servers)), return_exceptions=True
        )
        for server, result in zip(reversed(servers), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                _LOGGER.error("Error stopping %s: %s", server.name, result)

    def _enabled(self, settings: Settings) -> list[tuple[str, ServerFactory]]:
        enabled = []
        for section, factory_path in PROTOCOLS:
            protocol_config: Any = getattr(settings, section)
            if protocol_config.enabled:
                enabled.append((section, _load_factory(factory_path)))
        return enabled


def _label(section: str, server: ProtocolServer) -> str:
    return _PROTOCOL_LABELS.get(section, server.name)


async def _stop_quietly(server: ProtocolServer, timeout_s: float) -> None:
    try:
        await server.stop(timeout_s)
    except Exception as exc:
        _LOGGER.debug("Stopping %s: %s", server.name, exc)


async def _first(*tasks: asyncio.Task[Any]) -> None:
    """Wait until one of ``tasks`` is done; cancel (and await) the others except
    the long-lived first one (the stop waiter)."""
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks[1:]:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled() and (exc := task.exception()) is not None:
            _LOGGER.error("%s failed: %s", task.get_name(), exc, exc_info=exc)
