"""The HTTP face's lifecycle: aiohttp's Runner/Site split plus connection guards.

aiohttp closes idle keep-alive connections (``keepalive_timeout``, from
``limits.idle_timeout_s``) but gives a client unlimited time to finish a
request's headers. :class:`_GuardedRequestHandler` adds that deadline
(``limits.header_timeout_s``: slowloris) and refuses connections past
``limits.max_connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from edgevoice.config import Settings
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import ProtocolServer
from edgevoice.protocols.http.app import build_app, documents, read_api_key
from edgevoice.protocols.http.state import STATE

_LOGGER = logging.getLogger(__name__)

_LINGERING_S = 2.0
"""How long a connection answered before its body arrived keeps reading it."""


class _GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a deadline for each request's headers.

    The deadline runs from the connection's start, and again from the first
    byte of each later request, until aiohttp has parsed a complete request
    head. Event loop only.
    """

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout_s: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections
        self._header_timer: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        """True while no complete request head is queued or being handled."""
        return not (self._messages or self._request_in_progress or self._upgraded)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self._loop.call_later(self._header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._awaiting_head() and self.transport is not None:
            _LOGGER.debug(
                "HTTP: no complete request head within %.1f s; closing the connection",
                self._header_timeout_s,
            )
            self.force_close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._max_connections:
            _LOGGER.debug("HTTP: %d connections open; refusing one more", self._max_connections)
            self.force_close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_head():
            self._arm()  # part of a request head: it must complete in time
        else:
            self._disarm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # A request aiohttp cannot parse (a control byte in a header, a bad
        # request line) is the client's fault: answered 400, logged at DEBUG.
        if isinstance(kwargs.get("exc_info"), HttpProcessingError):
            self.logger.debug(*args, **kwargs)
        else:
            super().log_exception(*args, **kwargs)

    async def _handle_request(self, *args: Any, **kwargs: Any) -> Any:
        self._disarm()
        return await super()._handle_request(*args, **kwargs)


class _GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`_GuardedRequestHandler` connections."""

    def __init__(self, base: web.Server, *, header_timeout_s: float, max_connections: int) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            **base._kwargs,
        )
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections

    def set_limits(self, header_timeout_s: float, max_connections: int) -> None:
        """For connections made from now on."""
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections

    def __call__(self) -> RequestHandler:
        return _GuardedRequestHandler(
            self,
            header_timeout_s=self._header_timeout_s,
            max_connections=self._max_connections,
            loop=self._loop,
            **self._kwargs,
        )


class _GuardedAppRunner(web.AppRunner):
    def __init__(
        self, app: web.Application, *, header_timeout_s: float, max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        return _GuardedServer(
            await super()._make_server(),
            header_timeout_s=self._header_timeout_s,
            max_connections=self._max_connections,
        )


class HttpServer(ProtocolServer):
    """The OpenAI-compatible API; ``addresses`` reports the bound port (port 0 works)."""

    name = "http"

    def __init__(self, settings: Settings, hub: EngineHub) -> None:
        self.settings = settings
        self.hub = hub
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        api_key = await asyncio.to_thread(read_api_key, self.settings)
        self.app = build_app(self.settings, self.hub, api_key)
        limits = self.settings.limits
        # In-flight requests are drained in stop(); what is still running after
        # that is cancelled quickly.
        self._runner = _GuardedAppRunner(
            self.app,
            header_timeout_s=limits.header_timeout_s,
            max_connections=limits.max_connections,
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=limits.idle_timeout_s,
            # After an early answer (429, 413, ...) aiohttp reads and drops the
            # rest of the body so the client sees the answer; not for 10 s.
            lingering_time=_LINGERING_S,
        )
        await self._runner.setup()
        http = self.settings.http
        self._site = web.TCPSite(self._runner, http.host, http.port)
        try:
            await self._site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        if http.cosyvoice_port is not None:
            # The same app on CosyVoice's port: an unchanged client pointing at 50000 works.
            await web.TCPSite(self._runner, http.host, http.cosyvoice_port).start()
        if api_key is None and http.host not in ("127.0.0.1", "localhost", "::1"):
            _LOGGER.info("HTTP API has no api_key: anyone on the network can use it")

    async def reconfigure(self, settings: Settings) -> bool:
        """Adopt a reload's settings in place when the listener stays the same.

        New ``[limits]``, ``cors_origins`` and API key apply to the next
        request and connection; open requests and WebSockets go on. The
        keep-alive timeout of connections already open stays as it was.
        """
        old, new = self.settings.http, settings.http
        listener = (new.host, new.port, new.cosyvoice_port)
        if (
            self.app is None
            or not new.enabled
            or listener != (old.host, old.port, old.cosyvoice_port)
        ):
            return False
        api_key = await asyncio.to_thread(read_api_key, settings)
        limits = settings.limits
        st = self.app[STATE]
        st.settings = settings
        st.api_key = api_key
        st.documents = documents(settings, api_key)
        st.library.max_voices = limits.max_voices
        st.library.max_bytes = limits.max_voice_library_bytes
        server = self._runner.server if self._runner is not None else None
        if isinstance(server, _GuardedServer):
            server.set_limits(limits.header_timeout_s, limits.max_connections)
        self.settings = settings
        return True

    async def stop(self, timeout_s: float) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        app = self.app
        assert app is not None
        st = app[STATE]
        if self._site is not None:
            await self._site.stop()  # stop accepting
        for ws in list(st.websockets):
            await ws.close(code=1001, message=b"server shutting down")
        # The middleware counts open requests; WebSockets just closed drop out.
        if st.inflight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.idle.wait(), timeout_s)
        if st.inflight:
            _LOGGER.warning(
                "HTTP: %d request(s) still running after %.1f s", st.inflight, timeout_s
            )
        await runner.cleanup()

    @property
    def addresses(self) -> list[str]:
        if self._runner is None:
            return []
        out = []
        for address in self._runner.addresses:
            host, port = address[0], address[1]
            out.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        return out

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        for address in self._runner.addresses if self._runner else []:
            return int(address[1])
        raise RuntimeError("HTTP server is not listening")
