"""Engine discovery through the ``edgevoice.engines`` entry-point group.

Built-in engines are registered the same way as third-party ones. Importing a
plugin module must stay cheap: heavy libraries are imported inside ``load()``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from edgevoice.config import ConfigError, Settings
from edgevoice.engines.base import EngineKind, EnginePlugin, PluginStatus

_LOGGER = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgevoice.engines"


class UnknownEngineError(LookupError):
    """No plugin of that name/kind is registered."""


class EngineUnavailableError(RuntimeError):
    """The plugin exists but its dependencies are not installed."""


def _missing_modules(names: Iterable[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def _load_entry_point(ep: EntryPoint) -> list[PluginStatus]:
    """The plugin(s) an entry point names: one :class:`EnginePlugin`, or a tuple
    of plugins of that same name, one per kind (``wyoming``: asr, tts, wake)."""
    source = ep.dist.name if ep.dist is not None else "?"
    try:
        loaded = ep.load()
    except Exception as exc:  # a broken third-party plugin must not take us down
        _LOGGER.warning("Skipping engine plugin %r from %s: %s", ep.name, source, exc)
        return [PluginStatus(None, ep.name, source, error=f"{type(exc).__name__}: {exc}")]
    plugins = list(loaded) if isinstance(loaded, tuple | list) else [loaded]
    msg = None
    if not plugins or not all(isinstance(p, EnginePlugin) for p in plugins):
        msg = f"entry point {ep.value!r} is not an EnginePlugin (or a tuple of them)"
    elif any(p.name != ep.name for p in plugins):
        names = ", ".join(sorted({p.name for p in plugins}))
        msg = f"entry point name {ep.name!r} differs from plugin name {names!r}"
    elif len({p.kind for p in plugins}) != len(plugins):
        msg = f"entry point {ep.name!r} names two plugins of one kind"
    if msg is not None:
        _LOGGER.warning("Skipping engine plugin %r from %s: %s", ep.name, source, msg)
        return [PluginStatus(None, ep.name, source, error=msg)]
    return [PluginStatus(p, ep.name, source, missing=_missing_modules(p.requires)) for p in plugins]


class EngineRegistry:
    """All engine plugins found, by name and kind (one name may serve several kinds)."""

    def __init__(self, statuses: Iterable[PluginStatus]) -> None:
        self._statuses = {_key(s): s for s in statuses}

    @classmethod
    def discover(cls) -> EngineRegistry:
        eps = entry_points(group=ENTRY_POINT_GROUP)
        # Deduplicate: an editable install can expose the same distribution twice.
        seen: dict[str, EntryPoint] = {}
        for ep in eps:
            seen.setdefault(ep.name, ep)
        return cls(
            status
            for ep in sorted(seen.values(), key=lambda e: e.name)
            for status in _load_entry_point(ep)
        )

    def register(self, plugin: EnginePlugin, source: str = "runtime") -> None:
        """Add a plugin without an entry point (tests, embedding)."""
        status = PluginStatus(
            plugin, plugin.name, source, missing=_missing_modules(plugin.requires)
        )
        self._statuses[_key(status)] = status

    def statuses(self) -> list[PluginStatus]:
        return sorted(self._statuses.values(), key=_key_order)

    def _status(self, name: str, kind: EngineKind) -> PluginStatus | None:
        """The plugin ``name`` of ``kind``, else a broken entry point of that name."""
        return self._statuses.get((name, kind)) or self._statuses.get((name, None))

    def names(self, kind: EngineKind) -> list[str]:
        return [
            s.entry_point for s in self.statuses() if s.plugin is not None and s.plugin.kind is kind
        ]

    def get(self, name: str, kind: EngineKind) -> EnginePlugin:
        """The plugin ``name`` of ``kind``, with its dependencies installed."""
        status = self._status(name, kind)
        if status is None or status.plugin is None:
            known = ", ".join(self.names(kind)) or "none"
            detail = f" ({status.error})" if status is not None and status.error else ""
            raise UnknownEngineError(
                f"unknown {kind.value} engine {name!r}{detail}; installed {kind.value} engines: "
                f"{known}"
            )
        if status.missing:
            raise EngineUnavailableError(
                f"{kind.value} engine {name!r} needs {', '.join(status.missing)}: "
                f"{status.plugin.install_hint()}"
            )
        return status.plugin

    def lookup(self, name: str, kind: EngineKind) -> EnginePlugin:
        """Like :meth:`get` but without the dependency check (for validation)."""
        status = self._status(name, kind)
        if status is None or status.plugin is None:
            known = ", ".join(self.names(kind)) or "none"
            raise UnknownEngineError(
                f"unknown {kind.value} engine {name!r}; known {kind.value} engines: {known}"
            )
        return status.plugin


def _key(status: PluginStatus) -> tuple[str, EngineKind | None]:
    return (status.entry_point, status.plugin.kind if status.plugin is not None else None)


def _key_order(status: PluginStatus) -> tuple[str, str]:
    return (status.entry_point, status.plugin.kind.value if status.plugin is not None else "")


_DEFAULT: EngineRegistry | None = None


def default_registry() -> EngineRegistry:
    """The process-wide registry, discovered once."""
    global _DEFAULT  # noqa: PLW0603 - a cache of the entry-point scan
    if _DEFAULT is None:
        _DEFAULT = EngineRegistry.discover()
    return _DEFAULT


def validate_engines(
    settings: Settings, registry: EngineRegistry | None = None
) -> dict[tuple[EngineKind, str], Any]:
    """Check every entry names a known engine and validate its options.

    Returns the validated options models keyed by (kind, entry name). Raises
    :class:`ConfigError` naming every offending key.
    """
    registry = registry or default_registry()
    validated: dict[tuple[EngineKind, str], Any] = {}
    problems: list[str] = []
    for kind in EngineKind:
        for i, entry in enumerate(settings.models(kind)):
            try:
                plugin = registry.lookup(entry.engine, kind)
            except UnknownEngineError as exc:
                problems.append(f"  {kind.value}.{i}.engine: {exc}")
                continue
            try:
                validated[(kind, entry.name)] = plugin.options_model.model_validate(entry.options)
            except ValidationError as exc:
                for err in exc.errors():
                    key = ".".join(str(p) for p in err["loc"])
                    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                    problems.append(f"  {kind.value}.{i}.options.{key}: {msg}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))
    return validated
