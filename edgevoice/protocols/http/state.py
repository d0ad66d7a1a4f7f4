"""What every HTTP handler shares, stored on the aiohttp app under :data:`STATE`."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from edgevoice.config import Settings
from edgevoice.errors import BusyError
from edgevoice.hub import EngineHub
from edgevoice.protocols.http.metrics import Metrics
from edgevoice.voices import VoiceLibrary


@dataclass(frozen=True)
class Documents:
    """The OpenAPI document and the ``/docs`` page rendered from it."""

    spec: dict[str, Any]
    page: str


@dataclass
class ServerState:
    """Settings, hub, voice library, metrics and the request accounting.

    Only the event loop thread touches it.
    """

    settings: Settings
    hub: EngineHub
    library: VoiceLibrary
    metrics: Metrics
    api_key: str | None
    documents: Documents
    started_at: float = field(default_factory=time.time)
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no request is in flight (the middleware keeps it current)."""
    pending: Counter[str] = field(default_factory=Counter)
    """Requests (WebSockets included) in flight per remote address."""

    def request_started(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    def admit(self, client: str) -> None:
        """Count a request of ``client``; :class:`BusyError` past ``max_pending_per_client``."""
        limit = self.settings.limits.max_pending_per_client
        if self.pending[client] >= limit:
            raise BusyError(
                f"{limit} requests from this client are already in flight "
                "(limits.max_pending_per_client); retry when one has finished"
            )
        self.pending[client] += 1

    def release(self, client: str) -> None:
        self.pending[client] -= 1
        if self.pending[client] <= 0:
            del self.pending[client]


STATE: Final = web.AppKey("edgevoice_state", ServerState)


def state(request: web.Request) -> ServerState:
    return request.app[STATE]
