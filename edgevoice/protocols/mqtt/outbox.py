"""Messages waiting to be published, capped in bytes.

Replies produced while the broker is away wait here and go out, in order,
right after the next connect. The total size is bounded
(``limits.max_mqtt_outbox_bytes``): when a new message does not fit, the
oldest ones are dropped (counted and logged), so a long broker outage costs a
bounded amount of memory however much the daemon has to say.

Event loop only (no locks).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)


@dataclass(slots=True)
class OutgoingMessage:
    """One publish, kept until the broker has it (or it expires)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None
    deadline: float | None = None
    """``time.monotonic()`` after which the message is stale (MQTT 5 expiry)."""
    what: str = ""
    """For logs and error reports: what this message answers."""
    topic_for_error: str = ""
    request_id: str | None = None

    @property
    def size_bytes(self) -> int:
        """What holding the message costs, roughly (payload, topic, correlation)."""
        return len(self.payload) + len(self.topic) + len(self.correlation or b"") + 64

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def describe(self) -> str:
        return self.what or self.topic


class Outbox:
    """A FIFO of :class:`OutgoingMessage` holding at most ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._messages: deque[OutgoingMessage] = deque()
        self._bytes = 0
        self.dropped = 0
        """Messages dropped because the outbox was full (since start)."""
        self._dropped_now = 0

    def __len__(self) -> int:
        return len(self._messages)

    def __bool__(self) -> bool:
        return bool(self._messages)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def append(self, message: OutgoingMessage) -> None:
        """Keep ``message``; drop the oldest while it does not fit (it alone, if too big)."""
        size = message.size_bytes
        if size > self.max_bytes:
            self._drop(message)
            return
        while self._messages and self._bytes + size > self.max_bytes:
            self._drop(self.popleft())
        self._messages.append(message)
        self._bytes += size

    def _drop(self, message: OutgoingMessage) -> None:
        # One ERROR line per outage (then DEBUG), and a summary when it drains:
        # a long outage must not also flood the log.
        self.dropped += 1
        self._dropped_now += 1
        log = _LOGGER.error if self._dropped_now == 1 else _LOGGER.debug
        log(
            "MQTT outbox full (%d bytes, limits.max_mqtt_outbox_bytes); dropped %s (%d bytes)",
            self.max_bytes,
            message.describe(),
            message.size_bytes,
        )

    def peek(self) -> OutgoingMessage:
        return self._messages[0]

    def popleft(self) -> OutgoingMessage:
        message = self._messages.popleft()
        self._bytes -= message.size_bytes
        if not self._messages and self._dropped_now:
            _LOGGER.warning(
                "MQTT outbox drained; %d message(s) were dropped while it was full",
                self._dropped_now,
            )
            self._dropped_now = 0
        return message

    def describe(self) -> str:
        return ", ".join(m.describe() for m in self._messages)
