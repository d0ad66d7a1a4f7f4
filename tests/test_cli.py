"""The CLI as a user runs it: real models, real files, subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgevoice.audio import decode
from tests.conftest import (
    GERMAN_KEYWORDS,
    HOTWORDS_MP3,
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_DE_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    TRANSLATION_KEYWORDS,
    assert_means,
    overlap,
)


def edgevoice(
    *args: str, env_home: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ)
    env.pop("EDGEVOICE_CONFIG", None)
    if env_home is not None:
        env["HOME"] = str(env_home)
        env["XDG_CACHE_HOME"] = str(env_home / ".cache")
    return subprocess.run(
        [sys.executable, "-m", "edgevoice", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        input=stdin,
        timeout=300,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def base_config(home: Path) -> Path:
    path = home / "base.toml"
    path.write_text(
        '[[asr]]\nname = "base"\nengine = "faster-whisper"\nmodel = "base"\n', encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    ("path", "expected"), [(LAMP_WAV, LAMP_TEXT), (LIGHT_EN_WAV, LIGHT_EN_TEXT)]
)
def test_transcribe_english_files_exactly(home: Path, path: Path, expected: str) -> None:
    result = edgevoice("transcribe", str(path), env_home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_transcribe_hotword_prompt(home: Path) -> None:
    result = edgevoice("transcribe", str(HOTWORDS_MP3), "--prompt", "ComfyUI", env_home=home)
    assert result.returncode == 0, result.stderr
    assert "ComfyUI" in result.stdout
    result = edgevoice("transcribe", str(HOTWORDS_MP3), "--hotwords", "ComfyUI", env_home=home)
    assert "ComfyUI" in result.stdout


def test_german_with_base_detected_and_translated(home: Path, base_config: Path) -> None:
    result = edgevoice(
        "transcribe",
        str(LIGHT_DE_WAV),
        "--config",
        str(base_config),
        "--format",
        "verbose_json",
        env_home=home,
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["language"] == "german"
    assert_means(body["text"], *GERMAN_KEYWORDS)
    assert body["words"][0]["word"].strip()
    result = edgevoice(
        "transcribe",
        str(LIGHT_DE_WAV),
        "--config",
        str(base_config),
        "--task",
        "translate",
        # Greedy decoding of this clip falls back to temperature sampling
        # (avg log-prob < -1), which is random; beam search is deterministic.
        "--beam-size",
        "5",
        env_home=home,
    )
    assert result.returncode == 0, result.stderr
    assert_means(result.stdout, *TRANSLATION_KEYWORDS)


@pytest.mark.parametrize("fmt", ["json", "srt", "vtt"])
def test_transcript_formats(home: Path, fmt: str) -> None:
    result = edgevoice("transcribe", str(LIGHT_EN_WAV), "--format", fmt, env_home=home)
    assert result.returncode == 0, result.stderr
    if fmt == "json":
        assert json.loads(result.stdout) == {"text": LIGHT_EN_TEXT}
    elif fmt == "srt":
        assert result.stdout.startswith("1\n00:00:00,000 --> 00:00:0")
        assert LIGHT_EN_TEXT in result.stdout
    else:
        assert result.stdout.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:0")


def test_speak_every_format_round_trips(home: Path, tmp_path: Path) -> None:
    sentence = "The front door is locked and the alarm is on."
    for ext in ("wav", "flac", "mp3", "opus", "aac", "pcm"):
        out = tmp_path / f"speech.{ext}"
        result = edgevoice("speak", sentence, "-o", str(out), env_home=home)
        assert result.returncode == 0, result.stderr
        assert out.stat().st_size > 1000
        if ext == "pcm":
            continue
        assert decode(out).duration_s > 1.5
        back = edgevoice("transcribe", str(out), env_home=home)
        # Piper's duration noise differs on every run, and tiny.en sometimes hears
        # "and" as "in": a word's tolerance, never the exact text.
        assert overlap(back.stdout, sentence) >= 0.8, (ext, back.stdout)


def test_speak_speed_and_stdin(home: Path, tmp_path: Path) -> None:
    normal, fast = tmp_path / "n.wav", tmp_path / "f.wav"
    assert (
        edgevoice("speak", "-", "-o", str(normal), env_home=home, stdin="Hello world.").returncode
        == 0
    )
    assert (
        edgevoice(
            "speak", "Hello world.", "--speed", "2", "-o", str(fast), env_home=home
        ).returncode
        == 0
    )
    assert decode(fast).duration_s < 0.7 * decode(normal).duration_s


def test_engines_lists_builtins() -> None:
    result = edgevoice("engines")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "asr" in lines["faster-whisper"] and "installed" in lines["faster-whisper"]
    assert "cpu,cuda" in lines["faster-whisper"]
    # USABLE HERE: what this machine can run (a GPU runner lists cuda first).
    assert lines["faster-whisper"].split()[4] in ("cpu", "cuda,cpu")
    assert "USABLE HERE" in result.stdout.splitlines()[0]
    assert "edgevoice[faster-whisper]" in lines["faster-whisper"]
    assert "tts" in lines["piper"] and "edgevoice[piper]" in lines["piper"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.wav", b"", "empty audio input"),
        ("cut.mp3", HOTWORDS_MP3.read_bytes()[:2000], "truncated"),
        ("notes.wav", b"shopping list\n" * 20, "could not decode audio"),
        ("missing.wav", None, "No such file"),
    ],
    ids=["empty", "truncated-mp3", "text-as-wav", "missing"],
)
def test_bad_audio_is_a_clear_error(
    home: Path, tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    result = edgevoice("transcribe", str(path), env_home=home)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_requests_are_clear_errors(home: Path, tmp_path: Path) -> None:
    cases = [
        (("speak", "", "-o", str(tmp_path / "x.wav")), "text is empty"),
        (("speak", "Hi.", "-o", str(tmp_path / "x.txt")), "cannot tell the audio format"),
        (("speak", "Hi.", "--voice", "nova", "-o", str(tmp_path / "x.wav")), "nova"),
        (("transcribe", str(LIGHT_DE_WAV), "--task", "translate"), "English-only"),
        (("transcribe", str(LIGHT_EN_WAV), "--model", "large"), "large"),
        (
            ("transcribe", str(LIGHT_EN_WAV), "--config", str(tmp_path / "none.toml")),
            "config file not found",
        ),
    ]
    for args, message in cases:
        result = edgevoice(*args, env_home=home)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.wav").exists()
