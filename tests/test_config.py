"""Config: TOML + env precedence, strict keys, engine option validation."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgevoice.config import ConfigError, effective_config_toml, load_config
from edgevoice.engines.base import EngineKind
from edgevoice.engines.registry import validate_engines


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EDGEVOICE_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_defaults_are_the_offline_models() -> None:
    settings = load_config(None)
    assert [(m.name, m.engine, m.model) for m in settings.asr] == [
        ("tiny-en", "faster-whisper", "tiny.en")
    ]
    assert [(m.name, m.engine, m.model) for m in settings.tts] == [
        ("joe", "piper", "en_US-joe-medium")
    ]
    validate_engines(settings)


def test_env_overrides_beat_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "log_level = 'WARNING'\n[http]\nport = 8001\nhost = '127.0.0.1'\n")
    monkeypatch.setenv("EDGEVOICE_HTTP__PORT", "9000")
    settings = load_config(path)
    assert settings.http.port == 9000
    assert settings.http.host == "127.0.0.1"
    assert settings.log_level == "WARNING"


def test_edgevoice_config_env_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "shutdown_timeout_s = 3\n")
    monkeypatch.setenv("EDGEVOICE_CONFIG", str(path))
    assert load_config(None).shutdown_timeout_s == 3


def test_user_config_is_found(tmp_path: Path) -> None:
    user = tmp_path / "home" / ".config" / "edgevoice" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("offline = true\n", encoding="utf-8")
    assert load_config(None).offline is True


def test_several_models_and_default(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[[asr]]
name = "tiny-en"
engine = "faster-whisper"
model = "tiny.en"

[[asr]]
name = "base"
engine = "faster-whisper"
model = "base"
default = true
options = { beam_size = 5, language = "de" }
""",
    )
    settings = load_config(path)
    assert [m.name for m in settings.asr] == ["tiny-en", "base"]
    options = validate_engines(settings)
    assert options[(EngineKind.ASR, "base")].beam_size == 5


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("colour = 'red'\n", "colour: unknown key"),
        ("[http]\nprot = 80\n", "http.prot: unknown key"),
        ("[http]\nport = 'eighty'\n", "http.port"),
        (
            "[[asr]]\nname = 'x'\nengine = 'faster-whisper'\nmodel = 'tiny.en'\nsize = 1\n",
            "asr.0.size: unknown key",
        ),
        (
            "[[asr]]\nname = 'bad name!'\nengine = 'faster-whisper'\nmodel = 'tiny.en'\n",
            "asr.0.name",
        ),
        (
            "[[tts]]\nname='a'\nengine='piper'\nmodel='m'\n[[tts]]\nname='a'\nengine='piper'\nmodel='n'\n",
            "duplicate name 'a'",
        ),
        ("log_level = 'LOUD'\n", "log_level"),
        ("[mqtt\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, toml))
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        (
            "[[asr]]\nname='x'\nengine='whisperx'\nmodel='tiny'\n",
            "asr.0.engine: unknown asr engine 'whisperx'",
        ),
        (
            "[[tts]]\nname='x'\nengine='faster-whisper'\nmodel='tiny'\n",
            "tts.0.engine: unknown tts engine",
        ),
        (
            "[[asr]]\nname='x'\nengine='faster-whisper'\nmodel='tiny'\noptions={beam_size=0}\n",
            "asr.0.options.beam_size",
        ),
        (
            "[[asr]]\nname='x'\nengine='faster-whisper'\nmodel='tiny'\noptions={beams=2}\n",
            "asr.0.options.beams: unknown key",
        ),
        (
            "[[tts]]\nname='x'\nengine='piper'\nmodel='m'\noptions={volume=-1}\n",
            "tts.0.options.volume",
        ),
    ],
)
def test_engine_and_option_errors_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    settings = load_config(_write(tmp_path, toml))
    with pytest.raises(ConfigError) as info:
        validate_engines(settings)
    assert key in str(info.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_effective_config_redacts_secrets_and_round_trips(tmp_path: Path) -> None:
    path = _write(tmp_path, "[http]\napi_key = 'sk-very-secret'\n[mqtt]\npassword = 'hunter2'\n")
    text = effective_config_toml(load_config(path))
    assert "sk-very-secret" not in text and "hunter2" not in text
    parsed = tomllib.loads(text)
    assert parsed["http"]["api_key"] == "**********"
    assert parsed["asr"][0]["name"] == "tiny-en"


def test_config_example_is_valid_and_documents_every_key() -> None:
    example = Path(__file__).resolve().parents[1] / "config.example.toml"
    settings = load_config(example)
    validate_engines(settings)
    text = example.read_text(encoding="utf-8")
    for section in ("wyoming", "http", "mqtt"):
        for key in type(getattr(settings, section)).model_fields:
            assert f"{key} =" in text, f"config.example.toml does not document {section}.{key}"
    for key in ("log_level", "device", "offline", "cache_dir", "state_dir", "shutdown_timeout_s"):
        assert f"{key} =" in text


def test_check_config_cli(tmp_path: Path) -> None:
    good = _write(tmp_path, "[http]\napi_key = 'secret-key'\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgevoice", "check-config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "secret-key" not in result.stdout and 'api_key = "**********"' in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[[asr]]\nname='x'\nengine='faster-whisper'\nmodel='tiny'\noptions={beams=2}\n")
    result = subprocess.run(
        [sys.executable, "-m", "edgevoice", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "asr.0.options.beams: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
