"""The daemon: hub from config, protocol servers, signals, ordered shutdown."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from edgevoice.config import Settings
from edgevoice.engines.registry import EngineRegistry
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import ProtocolServer

_LOGGER = logging.getLogger(__name__)

# (config section with an ``enabled`` flag, "module:factory"). A factory takes
# (settings, hub) and returns an unstarted ProtocolServer.
PROTOCOLS: tuple[tuple[str, str], ...] = (
    ("mqtt", "edgevoice.protocols.mqtt:MqttBridge"),
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


def build_servers(settings: Settings, hub: EngineHub) -> list[ProtocolServer]:
    servers = []
    for section, factory_path in PROTOCOLS:
        protocol_config: Any = getattr(settings, section)
        if protocol_config.enabled:
            servers.append(_load_factory(factory_path)(settings, hub))
    return servers


class Daemon:
    """Runs until SIGTERM/SIGINT; a second signal stops at once."""

    def __init__(self, settings: Settings, registry: EngineRegistry | None = None) -> None:
        self.settings = settings
        self._registry = registry
        self._stop = asyncio.Event()
        self._signals = 0
        self._main: asyncio.Task[Any] | None = None
        self.hub: EngineHub | None = None
        self.servers: list[ProtocolServer] = []
        self.ready = asyncio.Event()

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals == 1:
            _LOGGER.info("Stopping: finishing in-flight work (up to %.0f s)",
                         self.settings.shutdown_timeout_s)
            self._stop.set()
        elif self._main is not None:
            _LOGGER.warning("Second signal: stopping now")
            self._main.cancel()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread / Windows
                pass

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self._install_signals(loop)
        _LOGGER.info("Loading models")
        async with EngineHub(self.settings, self._registry) as hub:
            self.hub = hub
            started: list[ProtocolServer] = []
            try:
                for server in build_servers(self.settings, hub):
                    await server.start()
                    started.append(server)
                    _LOGGER.info("Serving %s on %s", server.name, ", ".join(server.addresses))
                self.servers = started
                _LOGGER.info("Ready")
                self.ready.set()
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._stop.wait(), name="wait-for-stop")
            finally:
                await self._stop_servers(started)
        _LOGGER.info("Stopped")

    async def _stop_servers(self, servers: list[ProtocolServer]) -> None:
        timeout = self.settings.shutdown_timeout_s
        results = await asyncio.gather(
            *(server.stop(timeout) for server in reversed(servers)), return_exceptions=True
        )
        for server, result in zip(reversed(servers), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                _LOGGER.error("Error stopping %s: %s", server.name, result)
