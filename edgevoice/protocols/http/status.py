"""``GET /v1/status``: what the web page's Status section shows, as one JSON object.

Models (kind, engine, device, state, load time, work done), the protocol
servers of this daemon with their addresses and clients, the MQTT
connection, the HTTP figures from ``/metrics`` that matter, and the process's
memory. Cheap to build (no engine calls), so the page polls it.

The HTTP face knows the daemon's other servers through
:func:`~edgevoice.protocols.base.peers` (the daemon names them); an HTTP
server run on its own lists itself only.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from typing import Any, Final

from aiohttp import web

from edgevoice import __version__
from edgevoice.engines.base import EngineKind
from edgevoice.hub import EngineSlot
from edgevoice.protocols.base import ProtocolServer, peers
from edgevoice.protocols.http.state import ServerState, state

STATUS_PATH: Final = "/v1/status"


def _rss_bytes() -> int | None:
    """Blocking (reads /proc): the resident memory of this process."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _slot_state(slot: EngineSlot) -> str:
    if slot.closed:
        return "retiring"
    # ``active`` counts calls in flight and open sessions (each once).
    return "busy" if slot.active > len(slot.sessions) else "ready"


def _models(st: ServerState) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for kind in EngineKind:
        for model in st.hub.models(kind):
            slot = model.slot
            memory = getattr(slot.engine, "memory_bytes", None)
            out.append(
                {
                    "kind": kind.value,
                    "name": model.name,
                    "aliases": list(model.config.aliases),
                    "default": model.default,
                    "engine": slot.plugin.name,
                    "device": slot.device.device,
                    "state": _slot_state(slot),
                    "memory_bytes": memory if isinstance(memory, int) else None,
                    "sessions": len(slot.sessions),
                    "requests": slot.requests,
                    "busy_s": round(slot.busy_s, 3),
                    "audio_s": round(slot.audio_s, 3),
                    "load_s": round(slot.load_s, 3),
                }
            )
    return out


def _protocol(server: ProtocolServer) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": server.name, "addresses": list(server.addresses)}
    connections = getattr(server, "connections", None)  # Wyoming
    if isinstance(connections, int):
        entry["clients"] = connections
    connected = getattr(server, "connected", None)  # MQTT
    if isinstance(connected, bool):
        entry["connected"] = connected
        for figure in ("in_flight", "queued", "outbox_size"):
            value = getattr(server, figure, None)
            if isinstance(value, int):
                entry[figure] = value
    return entry


def _protocols(request: web.Request, st: ServerState) -> list[dict[str, Any]]:
    running = peers(st.hub)
    if not any(getattr(server, "app", None) is request.app for server in running):
        # An HTTP server run without the daemon: itself, as the client reached it.
        own: dict[str, Any] = {"name": "http", "addresses": [f"{request.scheme}://{request.host}"]}
        return [{**own, **_http_clients(st)}]
    out = []
    for server in running:
        entry = _protocol(server)
        if getattr(server, "app", None) is request.app:
            entry.update(_http_clients(st))
        out.append(entry)
    return out


def _http_clients(st: ServerState) -> dict[str, Any]:
    return {
        "clients": len(st.pending),
        "websockets": len(st.websockets),
        "requests_in_flight": st.inflight,
    }


def _mqtt(st: ServerState, protocols: list[dict[str, Any]]) -> dict[str, Any]:
    config = st.settings.mqtt
    live = next((p for p in protocols if p["name"] == "mqtt"), None)
    return {
        "enabled": config.enabled,
        "connected": live.get("connected") if live else None,
        "broker": config.url if config.enabled else None,
    }


def _figures(st: ServerState) -> dict[str, Any]:
    metrics = st.metrics
    requests = sum(metrics.requests.values())
    errors = sum(n for (_m, _r, status), n in metrics.requests.items() if status >= 400)
    audio = {"in": 0.0, "out": 0.0}
    for (direction, _model), seconds in metrics.audio_s.items():
        audio[direction] = audio.get(direction, 0.0) + seconds
    slots = st.hub.slots()
    return {
        "http_requests_total": requests,
        "http_errors_total": errors,
        "audio_in_s": round(audio["in"], 3),
        "audio_out_s": round(audio["out"], 3),
        "engine_busy_s": round(sum(s.busy_s for s in slots), 3),
        "engine_requests_total": sum(s.requests for s in slots),
    }


async def status(request: web.Request) -> web.Response:
    """``GET /v1/status``."""
    st = state(request)
    protocols = _protocols(request, st)
    body = {
        "object": "status",
        "version": __version__,
        "uptime_s": round(time.time() - st.started_at, 1),
        "memory": {"rss_bytes": await asyncio.to_thread(_rss_bytes)},
        "models": _models(st),
        "protocols": protocols,
        "mqtt": _mqtt(st, protocols),
        "metrics": _figures(st),
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})
