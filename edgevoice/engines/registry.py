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


def _load_entry_point(ep: EntryPoint) -> PluginStatus:
    source = ep.dist.name if ep.dist is not None else "?"
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken third-party plugin must not take us down
        _LOGGER.warning("Skipping engine plugin %r from %s: %s", ep.name, source, exc)
        return PluginStatus(None, ep.name, source, error=f"{type(exc).__name__}: {exc}")
    if not isinstance(plugin, EnginePlugin):
        msg = f"entry point {ep.value!r} is not an EnginePlugin"
        _LOGGER.warning("Skipping engine plugin %r from %s: %s", ep.name, source, msg)
        return PluginStatus(None, ep.name, source, error=msg)
    if plugin.name != ep.name:
        msg = f"entry point name {ep.name!r} differs from plugin name {plugin.name!r}"
        _LOGGER.warning("Skipping engine plugin from %s: %s", source, msg)
        return PluginStatus(None, ep.name, source, error=msg)
    return PluginStatus(plugin, ep.name, source, missing=_missing_modules(plugin.requires))


class EngineRegistry:
    """All engine plugins found, by name."""

    def __init__(self, statuses: Iterable[PluginStatus]) -> None:
        self._statuses = {s.entry_point: s for s in statuses}

    @classmethod
    def discover(cls) -> EngineRegistry:
        eps = entry_points(group=ENTRY_POINT_GROUP)
        # Deduplicate: an editable install can expose the same distribution twice.
        seen: dict[str, EntryPoint] = {}
        for ep in eps:
            seen.setdefault(ep.name, ep)
        return cls(_load_entry_point(ep) for ep in sorted(seen.values(), key=lambda e: e.name))

    def register(self, plugin: EnginePlugin, source: str = "runtime") -> None:
        """Add a plugin without an entry point (tests, embedding)."""
        self._statuses[plugin.name] = PluginStatus(
            plugin, plugin.name, source, missing=_missing_modules(plugin.requires)
        )

    def statuses(self) -> list[PluginStatus]:
        return sorted(self._statuses.values(), key=lambda s: s.entry_point)

    def names(self, kind: EngineKind) -> list[str]:
        return [
            s.entry_point for s in self.statuses() if s.plugin is not None and s.plugin.kind is kind
        ]

    def get(self, name: str, kind: EngineKind) -> EnginePlugin:
        """The plugin ``name`` of ``kind``, with its dependencies installed."""
        status = self._statuses.get(name)
        if status is None or status.plugin is None or status.plugin.kind is not kind:
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
        status = self._statuses.get(name)
        if status is None or status.plugin is None or status.plugin.kind is not kind:
            known = ", ".join(self.names(kind)) or "none"
            raise UnknownEngineError(
                f"unknown {kind.value} engine {name!r}; known {kind.value} engines: {known}"
            )
        return status.plugin


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
