"""Prometheus metrics of the HTTP face: requests, latency, audio seconds, engine time."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final

from edgevoice.engines.base import EngineKind
from edgevoice.hub import EngineHub

_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    total_s: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1
        self.total_s += seconds
        self.count += 1


# (metric, EngineSlot attribute, type, help)
_ENGINE_METRICS: Final = (
    ("edgevoice_engine_busy_seconds_total", "busy_s", "counter",
     "Seconds engines spent in worker calls."),
    ("edgevoice_engine_requests_total", "requests", "counter",
     "Requests engines served (all protocols)."),
    ("edgevoice_engine_audio_seconds_total", "audio_s", "counter",
     "Seconds of audio engines received."),
    ("edgevoice_engine_load_seconds", "load_s", "gauge", "Seconds the engine took to load."),
)  # fmt: skip


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Request counters and latency histograms, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = defaultdict(_Histogram)
        self.audio_s: dict[tuple[str, str], float] = defaultdict(float)
        """(direction ``in``/``out``, model) → seconds of audio."""

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        # Clients choose the method: anything unusual shares one label.
        method = method if method in _METHODS else "OTHER"
        self.requests[(method, route, status)] += 1
        self.latency[route].observe(seconds)

    def add_audio(self, direction: str, model: str, seconds: float) -> None:
        self.audio_s[(direction, model)] += seconds

    def render(self, hub: EngineHub) -> str:
        out: list[str] = []

        def header(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        header(
            "edgevoice_http_requests_total", "counter", "HTTP requests by method, route and status."
        )
        for (method, route, status), count in sorted(self.requests.items()):
            out.append(
                f'edgevoice_http_requests_total{{method="{_label(method)}",'
                f'route="{_label(route)}",status="{status}"}} {count}'
            )
        name = "edgevoice_http_request_duration_seconds"
        header(name, "histogram", "Time from request to the end of the response.")
        for route, hist in sorted(self.latency.items()):
            r = _label(route)
            for bound, count in zip(LATENCY_BUCKETS_S, hist.buckets, strict=True):
                out.append(f'{name}_bucket{{route="{r}",le="{bound:g}"}} {count}')
            out.append(f'{name}_bucket{{route="{r}",le="+Inf"}} {hist.count}')
            out.append(f'{name}_sum{{route="{r}"}} {hist.total_s:.6f}')
            out.append(f'{name}_count{{route="{r}"}} {hist.count}')
        header(
            "edgevoice_http_audio_seconds_total",
            "counter",
            "Seconds of audio transcribed (direction=in) and synthesized (direction=out).",
        )
        for (direction, model), seconds in sorted(self.audio_s.items()):
            out.append(
                f'edgevoice_http_audio_seconds_total{{direction="{direction}",'
                f'model="{_label(model)}"}} {seconds:.3f}'
            )
        engine_rows: list[tuple[str, str, str, Any]] = []
        for kind in EngineKind:
            for loaded in hub.models(kind):
                engine_rows.append((kind.value, loaded.name, loaded.slot.plugin.name, loaded.slot))
        for metric, attr, kind_text, text in _ENGINE_METRICS:
            header(metric, kind_text, text)
            for kind_value, model_name, engine, slot in engine_rows:
                value = getattr(slot, attr)
                out.append(
                    f'{metric}{{kind="{kind_value}",model="{_label(model_name)}",'
                    f'engine="{_label(engine)}"}} {float(value):.6f}'
                )
        return "\n".join(out) + "\n"
