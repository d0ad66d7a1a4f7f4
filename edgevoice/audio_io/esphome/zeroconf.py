"""``_esphomelib._tcp.local.``: how Home Assistant discovers an ESPHome device."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from edgevoice import __version__

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_esphomelib._tcp.local."
ESPHOME_VERSION = "2025.9.0"
"""The ESPHome release whose API we speak (what Home Assistant's checks read)."""


def primary_ipv4() -> str:
    """The address other hosts reach us on (the default route's), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
            address: str = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    return address


class EsphomeAdvertiser:
    """Registers the device on mDNS; a failure is a warning (HA can add it by host)."""

    def __init__(self, name: str, mac: str, *, encrypted: bool) -> None:
        self.name = name
        self.mac = mac.replace(":", "").lower()
        self.encrypted = encrypted
        self._zeroconf: Any = None

    async def start(self, host: str, port: int) -> None:
        try:
            from zeroconf import IPVersion
            from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

            address = host if host not in ("0.0.0.0", "", "::") else primary_ipv4()
            properties = {
                "version": ESPHOME_VERSION,
                "mac": self.mac,
                "board": "host",
                "platform": "HOST",
                "network": "ethernet",
                "project_name": "edgevoice.edgevoice",
                "project_version": __version__,
            }
            if self.encrypted:
                properties["api_encryption"] = "Noise_NNpsk0_25519_ChaChaPoly_SHA256"
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{self.name}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(address)],
                port=port,
                properties=properties,
                server=f"{self.name}.local.",
            )
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
            await self._zeroconf.async_register_service(info)
            _LOGGER.info("Advertising %s.%s on %s:%d", self.name, SERVICE_TYPE, address, port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _LOGGER.warning(
                "Zeroconf advertisement failed (add the device in Home Assistant by host "
                "and port): %s",
                exc,
            )

    async def stop(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is not None:
            try:
                await zeroconf.async_unregister_all_services()
                await zeroconf.async_close()
            except Exception as exc:
                _LOGGER.debug("Closing zeroconf: %s", exc)
