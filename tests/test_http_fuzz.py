"""Schemathesis over ``/openapi.json`` against the live server: the document is true.

The real ``st run`` (examples, coverage and fuzzing phases; a bounded number
of cases per operation, a fixed seed) drives the server on loopback with an
API key set, and every check must pass: no 5xx, only documented statuses,
documented content types, bodies that match their schemas, 401 without the
key, 405 with ``Allow`` for other methods, schema-violating input rejected and
schema-valid input accepted.

Two things a JSON schema cannot say are configured instead of loosened in
the document: a multipart ``file`` is "bytes" to the schema but must be
decodable audio (random bytes get 415, as documented), and a WebSocket route
cannot be fetched "validly" with plain HTTP (426 whatever the parameters,
documented).

The engines are the fast fakes, so the run takes about a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from edgevoice.config import ModelConfig, Settings
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer

API_KEY = "fuzz-key"
MAX_EXAMPLES = 12
"""Cases per operation and phase: enough to reach every branch of a handler's
validation, small enough for ~60 s on 2 cores."""
RUN_TIMEOUT_S = 300.0

CONFIG = """
[generation]
database = "none"

[[operations]]
include-operation-id = ["createTranscription", "createTranslation", "createSpeech", "createVoice"]
# "file"/"audio_sample"/"prompt_speech" are bytes to a schema but must be
# decodable audio; a model name is any string, and unknown ones are 404.
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "415"]

[[operations]]
include-operation-id = ["streamSpeech", "realtimeTranscription"]
# Plain HTTP cannot make a WebSocket handshake: the documented 426, whatever
# the parameters.
checks.positive_data_acceptance.expected-statuses = ["426"]
checks.negative_data_rejection.expected-statuses = ["400", "426"]

[[operations]]
include-tag = "cosyvoice"
# CosyVoice: a random spk_id is unknown (404), random prompt_wav bytes are not
# audio (415), and text of only punctuation, or non-Latin text for the
# English-only cloner's cross-lingual mode, is refused (400): all documented.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "415"]

[[operations]]
include-operation-id = ["csmVoiceClone", "csmStreamingSession", "csmStreamText", "csmAudioFile"]
# CSM: audio_file must be decodable audio (415); a random session or file name
# is unknown (404); punctuation-only text is refused (400); the session bound (429).
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "415", "429"]

[[operations]]
include-tag = "fish"
# Fish: reference audio must be decodable (415), a random reference_id or a
# taken id is unknown (404) / a conflict (409); punctuation-only text is 400.
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "409", "415"]

[[operations]]
include-operation-id = ["csmStreamTextWebSocket"]
checks.positive_data_acceptance.expected-statuses = ["426"]
checks.negative_data_rejection.expected-statuses = ["400", "426"]
"""


def _settings(root: Path) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": root / "cache",
        "state_dir": root / "state",
        "asr": [
            ModelConfig(
                name="fake-asr",
                engine="test-asr",
                model="fake",
                aliases=["whisper-1"],
                options={"translate": True, "languages": ["en", "de"]},
            )
        ],
        "tts": [
            ModelConfig(name="cloner", engine="test-tts", model="fake", options={"cloning": True})
        ],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, "api_key": API_KEY},
        # The fuzzer sends one request at a time; the default per-client bound holds.
    }
    return Settings(**values)


@pytest.mark.slow
async def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    settings = _settings(tmp_path)
    async with EngineHub(settings) as hub, HttpServer(settings, hub) as server:
        base = f"http://127.0.0.1:{server.port}"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(config), "--no-color",
            "run", f"{base}/openapi.json",
            "--checks", "all",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", "9",
            "--workers", "1",
            "--request-timeout", "30",
            "--header", f"Authorization: Bearer {API_KEY}",
            "--no-shrink",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )  # fmt: skip
        try:
            output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    report = output.decode(errors="replace")
    (tmp_path / "report.txt").write_text(report)
    failures = report[report.find("= FAILURES =") :]
    assert process.returncode == 0, failures[:20000] or report[-4000:]
