"""The Wyoming server: listeners (tcp, unix, stdio), zeroconf, connection limits, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Any
from urllib.parse import urlparse

from wyoming.event import async_write_event

from edgevoice import __version__
from edgevoice.config import Settings
from edgevoice.errors import BusyError
from edgevoice.fairness import client_scope
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import ProtocolServer
from edgevoice.protocols.wyoming.connection import WyomingConnection
from edgevoice.protocols.wyoming.framing import MAX_LINE_BYTES, error_event

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
REFUSAL_LOG_INTERVAL_S = 60.0
"""At most one log line per this long about refused connections (floods)."""


class WyomingServer(ProtocolServer):
    """Serves the hub's ASR, TTS and wake-word models over Wyoming.

    Connections beyond ``[limits] max_connections`` get an ``error`` (``busy``)
    and are closed. A reload that changes only how connections are served
    (not the listener) is applied in place (:meth:`reconfigure`): open streams
    go on, new connections are never refused.
    """

    name = "wyoming"

    def __init__(self, settings: Settings, hub: EngineHub) -> None:
        self.settings = settings
        self.hub = hub
        self._server: asyncio.AbstractServer | None = None
        self._addresses: list[str] = []
        self._connections: dict[asyncio.Task[Any], WyomingConnection] = {}
        self._unix_path: str | None = None
        self._stdio_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._zeroconf: Any = None
        self._zeroconf_task: asyncio.Task[None] | None = None
        self._tcp: tuple[str, int] | None = None
        """(host, bound port) of the TCP listener, for zeroconf."""
        self._refused = 0
        self._refusal_logged = -REFUSAL_LOG_INTERVAL_S

    @property
    def config(self) -> Any:
        return self.settings.wyoming

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    @property
    def connections(self) -> int:
        """Open connections."""
        return len(self._connections)

    async def reconfigure(self, settings: Settings) -> bool:
        """Adopt ``settings`` without restarting when the listener stays the same.

        Connections read the server's settings as they go, so open streams
        keep going under the new ``[wyoming]``/``[limits]`` values; a changed
        zeroconf name or switch re-advertises.
        """
        old, new = self.settings.wyoming, settings.wyoming
        if old.uri != new.uri:
            return False
        self.settings = settings
        if (old.zeroconf, old.zeroconf_name) != (new.zeroconf, new.zeroconf_name):
            await self._stop_advertising()
            self._advertise_if_wanted()
        return True

    async def start(self) -> None:
        uri = urlparse(self.config.uri)
        if uri.scheme == "tcp":
            host = uri.hostname or "0.0.0.0"
            port = uri.port if uri.port is not None else 10300
            self._server = await asyncio.start_server(
                self._on_client, host, port, limit=MAX_LINE_BYTES
            )
            for sock in self._server.sockets:
                addr = sock.getsockname()
                self._addresses.append(f"tcp://{addr[0]}:{addr[1]}")
            self._tcp = (host, self._server.sockets[0].getsockname()[1])
            self._advertise_if_wanted()
        elif uri.scheme == "unix":
            path = (uri.netloc + uri.path) or "/run/edgevoice/wyoming.sock"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._server = await asyncio.start_unix_server(
                self._on_client, path, limit=MAX_LINE_BYTES
            )
            self._unix_path = path
            self._addresses.append(f"unix://{path}")
        elif uri.scheme == "stdio":
            await self._start_stdio()
            self._addresses.append("stdio://")
        else:
            raise ValueError(
                f"wyoming.uri {self.config.uri!r}: use tcp://HOST:PORT, unix:///path or stdio://"
            )

    async def _start_stdio(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb", buffering=0)
        )
        # stdout carries the protocol: keep a private handle on it and point
        # fd 1 at stderr, so a stray print() cannot corrupt the stream.
        out_fd = os.dup(1)
        sys.stdout.flush()
        os.dup2(2, 1)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop),
            os.fdopen(out_fd, "wb", buffering=0),
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        # The one stdio client is never dropped as idle: its stdin closing ends the daemon.
        connection = WyomingConnection(self, reader, writer, "stdio", idle_timeout=False)

        async def serve() -> None:
            with client_scope("wyoming", "stdio"):
                await connection.run()
            if not self._stopping:
                _LOGGER.info("stdin closed: stopping")
                signal.raise_signal(signal.SIGTERM)

        self._stdio_task = asyncio.create_task(serve(), name="wyoming-stdio")
        self._connections[self._stdio_task] = connection

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if isinstance(peer_info, tuple) else "unix"
        if len(self._connections) >= self.settings.limits.max_connections:
            await self._refuse(writer, peer)
            return
        task = asyncio.current_task()
        assert task is not None
        connection = WyomingConnection(self, reader, writer, peer)
        self._connections[task] = connection
        _LOGGER.debug("Wyoming client %s connected", peer)
        try:
            with client_scope("wyoming", peer):
                await connection.run()
        except asyncio.CancelledError:
            # Cancelled by stop(). asyncio's stream callback calls
            # task.exception() on this task, which logs a cancelled task as
            # an error: end normally instead.
            pass
        except Exception as exc:  # never let one client's failure escape
            _LOGGER.error("Wyoming client %s: connection failed: %r", peer, exc)
            _LOGGER.debug("Traceback", exc_info=True)
        finally:
            self._connections.pop(task, None)
            _LOGGER.debug("Wyoming client %s disconnected", peer)

    async def _refuse(self, writer: asyncio.StreamWriter, peer: str) -> None:
        """Answer a connection over the limit with ``error`` (busy) and close it."""
        limit = self.settings.limits.max_connections
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged = now
            _LOGGER.warning(
                "Refusing Wyoming client %s: %d connections open (limits.max_connections); "
                "%d refused so far",
                peer,
                limit,
                self._refused,
            )
        error = BusyError(f"too many connections (limits.max_connections = {limit})")
        try:
            async with asyncio.timeout(1.0):
                await async_write_event(error_event(error).event(), writer)
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                await writer.wait_closed()

    def _advertise_if_wanted(self) -> None:
        if self.config.zeroconf and self._tcp is not None:
            self._zeroconf_task = asyncio.create_task(
                self._advertise(*self._tcp), name="wyoming-zeroconf"
            )

    async def _stop_advertising(self) -> None:
        if self._zeroconf_task is not None:
            self._zeroconf_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._zeroconf_task
            self._zeroconf_task = None
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):
                await self._zeroconf.async_unregister_all_services()
                await self._zeroconf.async_close()
            self._zeroconf = None

    async def _advertise(self, host: str, port: int) -> None:
        """Register ``_wyoming._tcp.local.``; a failure is a warning, never fatal."""
        try:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

            address = host if host not in ("0.0.0.0", "", "::") else _primary_ipv4()
            name = self.config.zeroconf_name or f"edgevoice-{self.settings.mqtt.node_id}"
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{name}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(address)],
                port=port,
                properties={"version": __version__},
            )
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            await self._zeroconf.async_register_service(info)
            _LOGGER.info("Advertising %s.%s on %s:%d", name, SERVICE_TYPE, address, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LOGGER.warning(
                "Zeroconf advertisement failed (Home Assistant will not "
                "discover this server; add it by host and port): %s",
                exc,
            )

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        await self._stop_advertising()
        # Idle connections go now; busy ones get ``timeout_s`` to finish.
        for task, connection in list(self._connections.items()):
            if connection.idle:
                task.cancel()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)


def _primary_ipv4() -> str:
    """The address other hosts reach us on (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.setblocking(False)
        probe.connect(("224.0.0.251", 1))
        address: str = probe.getsockname()[0]
        return address
    finally:
        probe.close()
