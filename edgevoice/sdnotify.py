"""systemd's ``sd_notify`` protocol without libsystemd.

One datagram per message to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``
(a path, or an abstract socket written with a leading ``@``). Outside systemd
(no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon calls it
unconditionally. Messages are ``KEY=VALUE`` lines: ``READY=1``, ``STATUS=...``,
``WATCHDOG=1``, ``STOPPING=1``, ``RELOADING=1`` + ``MONOTONIC_USEC=...``.

Sending is a ``sendto`` on a local datagram socket that returns at once, or
waits at most :data:`SEND_TIMEOUT_S` when the manager's queue is full (Linux
queues only a few unread datagrams): bounded, so safe on the event loop, and a
READY=1 is not lost to a momentary backlog.
"""

from __future__ import annotations

import logging
import os
import socket
import time

_LOGGER = logging.getLogger(__name__)

SEND_TIMEOUT_S = 0.1


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and other transports are not supported


class SystemdNotifier:
    """Sends state changes to the service manager (no-op when not under systemd).

    ``unset_environment=True`` removes ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and
    ``$WATCHDOG_PID`` from ``os.environ`` so child processes do not inherit them.
    """

    def __init__(
        self, environ: dict[str, str] | None = None, *, unset_environment: bool = False
    ) -> None:
        env = dict(os.environ if environ is None else environ)
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        if env.get("NOTIFY_SOCKET") and self.address is None:
            _LOGGER.warning("Unsupported NOTIFY_SOCKET %r: not notifying", env["NOTIFY_SOCKET"])
        self.watchdog_usec = _watchdog_usec(env)
        self._sock: socket.socket | None = None
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1`` (half the timeout), or ``None``."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one message; ``False`` if not under systemd or it failed."""
        if self.address is None or not lines:
            return False
        message = "\n".join(lines).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            # Never fatal: systemd may be restarting, or the socket gone.
            _LOGGER.debug("sd_notify %r failed: %s", lines, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.notify(*_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # Type=notify-reload (systemd >= 253) needs MONOTONIC_USEC with RELOADING=1;
        # older systemd ignores it, ExecReload=kill -HUP works on both.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(status: str | None) -> list[str]:
    # One line: a newline would start a new KEY=VALUE assignment.
    return [] if status is None else ["STATUS=" + " ".join(status.split())]


def _watchdog_usec(env: dict[str, str]) -> int | None:
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    return usec if usec > 0 else None
