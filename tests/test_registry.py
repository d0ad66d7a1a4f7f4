"""Plugin discovery: built-ins via entry points, broken plugins skipped."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint

import pytest

from edgevoice.engines.base import EngineKind, EnginePlugin
from edgevoice.engines.registry import (
    EngineRegistry,
    EngineUnavailableError,
    UnknownEngineError,
    _load_entry_point,
    default_registry,
)
from edgevoice.testing import FAKE_TTS_PLUGIN, _fake_asr_factory


def test_builtins_are_entry_points() -> None:
    discovered = EngineRegistry.discover()
    assert "faster-whisper" in discovered.names(EngineKind.ASR)
    assert "piper" in discovered.names(EngineKind.TTS)
    sources = {s.entry_point: s.source for s in discovered.statuses()}
    assert sources["faster-whisper"] == "edgevoice"
    # The fake engines are no entry points: only a test suite registers them.
    assert "test-asr" not in sources and "test-tts" not in sources
    registry = default_registry()  # conftest.py registered them here
    assert "test-asr" in registry.names(EngineKind.ASR)
    assert {s.entry_point: s.source for s in registry.statuses()}["test-tts"] == (
        "edgevoice.testing"
    )


def test_broken_plugin_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    broken = EntryPoint(
        name="broken", value="edgevoice_no_such_module:PLUGIN", group="edgevoice.engines"
    )
    wrong = EntryPoint(name="wrong", value="edgevoice.testing:tone", group="edgevoice.engines")
    with caplog.at_level(logging.WARNING):
        statuses = [*_load_entry_point(broken), *_load_entry_point(wrong)]
    assert all(s.plugin is None and s.error for s in statuses)
    assert "ModuleNotFoundError" in (statuses[0].error or "")
    assert "not an EnginePlugin" in (statuses[1].error or "")
    assert "Skipping engine plugin 'broken'" in caplog.text
    registry = EngineRegistry([*statuses, *default_registry().statuses()])
    with pytest.raises(UnknownEngineError, match="broken"):
        registry.get("broken", EngineKind.ASR)
    assert registry.get("faster-whisper", EngineKind.ASR).name == "faster-whisper"


def test_missing_dependency_names_the_extra() -> None:
    plugin = EnginePlugin(
        name="needs-mlx",
        kind=EngineKind.ASR,
        description="x",
        factory=_fake_asr_factory,
        requires=("mlx_whisper_not_installed",),
        extra="mlx-whisper",
    )
    registry = EngineRegistry([])
    registry.register(plugin)
    with pytest.raises(EngineUnavailableError, match=r"pip install 'edgevoice\[mlx-whisper\]'"):
        registry.get("needs-mlx", EngineKind.ASR)
    assert registry.lookup("needs-mlx", EngineKind.ASR) is plugin


def test_kind_mismatch_is_unknown() -> None:
    registry = EngineRegistry([])
    registry.register(FAKE_TTS_PLUGIN)
    with pytest.raises(UnknownEngineError, match="unknown asr engine 'test-tts'"):
        registry.get("test-tts", EngineKind.ASR)


def test_one_name_serves_several_kinds() -> None:
    """``wyoming`` is one entry point, one extra and one config value for the
    asr, tts and wake entries; each kind finds its own plugin."""
    discovered = EngineRegistry.discover()
    plugins = {kind: discovered.get("wyoming", kind) for kind in EngineKind if kind.value != "vad"}
    assert {k: p.kind for k, p in plugins.items()} == {k: k for k in plugins}
    assert {p.name for p in plugins.values()} == {"wyoming"}
    rows = [s for s in discovered.statuses() if s.entry_point == "wyoming"]
    assert [s.plugin.kind.value for s in rows if s.plugin] == ["asr", "tts", "wake"]
    with pytest.raises(UnknownEngineError, match="unknown vad engine 'wyoming'"):
        discovered.get("wyoming", EngineKind.VAD)


def test_a_tuple_entry_point_must_name_itself_once_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    misnamed = EntryPoint(
        name="remote", value="edgevoice.engines.wyoming_remote:PLUGINS", group="edgevoice.engines"
    )
    twice = EntryPoint(
        name="test-tts", value="edgevoice.testing:FAKE_TTS_PLUGIN", group="edgevoice.engines"
    )
    with caplog.at_level(logging.WARNING):
        (bad_name,) = _load_entry_point(misnamed)
        (good,) = _load_entry_point(twice)
    assert bad_name.plugin is None and "differs from plugin name" in (bad_name.error or "")
    assert good.plugin is FAKE_TTS_PLUGIN
