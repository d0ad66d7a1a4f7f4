"""Fair shares of an engine between faces and clients.

Every blocking engine call goes through one :class:`FairLimiter` per engine
slot (``max_concurrency`` permits). When calls wait, the next permit goes
round-robin first over *faces* (wyoming, http, mqtt, audio_io, ...) and then
over the *clients* of that face, so a burst of 500 MQTT requests takes one
face's share and a Wyoming client's transcription runs next, not last.

Who is asking is carried in a context variable that each protocol sets once
per connection or request (:func:`client_scope`); tasks inherit it, so the
hub's API needs no extra argument.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_CLIENT: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "edgevoice_client", default=("local", "")
)


def current_client() -> tuple[str, str]:
    """``(face, client)`` of the code running now; ``("local", "")`` by default."""
    return _CLIENT.get()


@contextmanager
def client_scope(face: str, client: str) -> Iterator[None]:
    """Attribute the engine calls made inside (and in tasks started inside) to a client."""
    token = _CLIENT.set((face, client))
    try:
        yield
    finally:
        _CLIENT.reset(token)


@dataclass
class _Waiter:
    future: asyncio.Future[None]


class FairLimiter:
    """``permits`` concurrent holders; waiters served round-robin by face, then client.

    Only the event loop thread touches it (no locks needed).
    """

    def __init__(self, permits: int) -> None:
        self._permits = permits
        self._held = 0
        # face -> client -> waiters, both in round-robin order (served ones move last).
        self._queues: OrderedDict[str, OrderedDict[str, deque[_Waiter]]] = OrderedDict()

    @property
    def permits(self) -> int:
        return self._permits

    @permits.setter
    def permits(self, value: int) -> None:
        self._permits = value
        self._wake()

    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        return sum(len(q) for clients in self._queues.values() for q in clients.values())

    async def acquire(self) -> None:
        if self._held < self._permits and not self._queues:
            self._held += 1
            return
        face, client = current_client()
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        self._queues.setdefault(face, OrderedDict()).setdefault(client, deque()).append(waiter)
        try:
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted just as we were cancelled: pass the permit on.
                self.release()
            else:
                self._remove(face, client, waiter)
            raise

    def release(self) -> None:
        self._held -= 1
        self._wake()

    def _remove(self, face: str, client: str, waiter: _Waiter) -> None:
        clients = self._queues.get(face)
        if clients is None or client not in clients:
            return
        queue = clients[client]
        try:
            queue.remove(waiter)
        except ValueError:
            return
        if not queue:
            del clients[client]
            if not clients:
                del self._queues[face]

    def _wake(self) -> None:
        while self._held < self._permits and self._queues:
            face, clients = next(iter(self._queues.items()))
            client, queue = next(iter(clients.items()))
            waiter = queue.popleft()
            # Served: this client goes behind its face's others, the face behind other faces.
            if queue:
                clients.move_to_end(client)
            else:
                del clients[client]
            if clients:
                self._queues.move_to_end(face)
            else:
                del self._queues[face]
            if waiter.future.done():
                continue  # cancelled while queued
            self._held += 1
            waiter.future.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
