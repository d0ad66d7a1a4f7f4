"""What every protocol server (Wyoming, HTTP, MQTT, ...) implements for the daemon."""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from edgevoice.config import Settings


class ProtocolServer(abc.ABC):
    """A thin adapter between a wire protocol and the :class:`EngineHub`.

    It owns its listeners and tasks. :meth:`start` binds (and fails loudly if
    it cannot); :meth:`stop` stops accepting, lets in-flight requests finish
    within ``timeout_s`` and closes. Servers bound to port 0 report the real
    address in :attr:`addresses`.
    """

    name: str = "protocol"

    @abc.abstractmethod
    async def start(self) -> None:
        """Bind listeners / connect; return when serving."""

    @abc.abstractmethod
    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, finish in-flight work within ``timeout_s``, close."""

    async def reconfigure(self, settings: Settings) -> bool:
        """A reload brought ``settings``: adopt them without a restart if this
        server can (its listener does not change), so open connections and
        streams go on; ``False`` (the default) has the daemon restart it when
        its section changed."""
        return False

    async def hub_reloaded(self) -> None:  # noqa: B027 (optional hook, no-op by default)
        """A SIGHUP reload changed the hub's models while this server kept running.

        Servers that advertise models (MQTT discovery, ...) refresh it here;
        per-request lookups through the hub need nothing.
        """

    @property
    @abc.abstractmethod
    def addresses(self) -> list[str]:
        """Where the server listens, e.g. ``tcp://127.0.0.1:10300``."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(5.0)


_PEERS: weakref.WeakKeyDictionary[object, Callable[[], list[ProtocolServer]]] = (
    weakref.WeakKeyDictionary()
)


def set_peers(hub: object, servers: Callable[[], list[ProtocolServer]]) -> None:
    """The daemon names the protocol servers it runs on ``hub`` (status pages list them)."""
    _PEERS[hub] = servers


def peers(hub: object) -> list[ProtocolServer]:
    """The protocol servers running on ``hub``; empty when no daemon named them."""
    servers = _PEERS.get(hub)
    return servers() if servers is not None else []
