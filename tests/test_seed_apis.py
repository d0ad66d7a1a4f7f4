"""The compatible APIs, driven by the calls their own documentation shows.

The calls are those of ``../shared/seeds/`` (CosyVoice's API guide, ...):
``requests`` exactly as the guides write them, run in worker threads so the
event loop keeps serving. Engines: Piper joe (a stock voice without style
control) and the fake ``test-tts`` with cloning at 16 kHz (440 Hz with a
reference, 220 Hz without; length proportional to the text), so the
expected length of every answer is known.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import requests

from edgevoice.audio import pcm_to_float
from edgevoice.config import ModelConfig, Settings
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer
from edgevoice.text import split_sentences
from tests.conftest import JOE, LIGHT_EN_TEXT, LIGHT_EN_WAV

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

JOE_STEADY = JOE.model_copy(update={"options": {"noise_scale": 0.0, "noise_w_scale": 0.0}})
CLONER_RATE_HZ = 16000
CLONER = ModelConfig(
    name="cloner",
    engine="test-tts",
    model="fake",
    options={"cloning": True, "sample_rate_hz": CLONER_RATE_HZ},
)
SECONDS_PER_CHAR = 0.01  # the fake engine's default
MAX_INPUT_CHARS = 2000
SPEAKERS = {"中文女": "voice_anna", "narrator": "joe"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> AsyncIterator[HttpServer]:
    values: dict[str, Any] = {
        "cache_dir": shared_cache,
        "state_dir": tmp_path_factory.mktemp("state"),
        "tts": [JOE_STEADY, CLONER],
        "asr": [],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, "speakers": SPEAKERS},
        "limits": {"max_upload_bytes": 1 << 20, "max_input_chars": MAX_INPUT_CHARS},
    }
    settings = Settings(**values)
    async with EngineHub(settings) as hub, HttpServer(settings, hub) as srv:
        yield srv


def base(server: HttpServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def fake_samples(text: str) -> int:
    """Samples the fake engine makes for ``text`` at the cloner's rate."""
    return sum(
        round(max(0.1, len(s) * SECONDS_PER_CHAR) * CLONER_RATE_HZ) for s in split_sentences(text)
    )


def dominant_hz(samples: np.ndarray[Any, Any], rate_hz: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate_hz / len(samples))


def saved_output(response: requests.Response) -> bytes:
    """What the guides' examples write to ``output.wav``."""
    out = bytearray()
    for chunk in response.iter_content(chunk_size=8192):
        if chunk:
            out += chunk
    return bytes(out)


def prompt_files() -> dict[str, Any]:
    return {"prompt_wav": ("prompt_audio.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")}


async def call(method: str, url: str, **kwargs: Any) -> tuple[requests.Response, bytes]:
    """A blocking ``requests`` call in a worker thread; the body read there too."""

    def run() -> tuple[requests.Response, bytes]:
        response = requests.request(method, url, stream=True, timeout=60, **kwargs)
        return response, saved_output(response)

    return await asyncio.to_thread(run)


def pcm(body: bytes) -> np.ndarray[Any, Any]:
    assert len(body) % 2 == 0
    return pcm_to_float(body, 2)


# --------------------------------------------------------------- CosyVoice


async def test_cosyvoice_sft_as_documented(server: HttpServer) -> None:
    # The guide's requests example (POST, stream=True), with a configured voice.
    response, body = await call(
        "POST",
        f"{base(server)}/inference_sft",
        data={"tts_text": "Hello, I am a test of the sft mode.", "spk_id": "joe"},
    )
    assert response.status_code == 200, body[:300]
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    rate = int(response.headers["X-Sample-Rate"])
    assert rate == 22050  # Piper joe's own rate, as CosyVoice sends its model's
    audio = pcm(body)
    assert 0.5 < len(audio) / rate < 10
    assert float(np.sqrt(np.mean(audio**2))) > 0.01
    # CosyVoice's own client: GET with the same form body; and a [http] speakers name.
    response, again = await call(
        "GET",
        f"{base(server)}/inference_sft",
        data={"tts_text": "Hello, I am a test of the sft mode.", "spk_id": "narrator"},
    )
    assert response.status_code == 200
    assert again == body  # Piper without noise: the same voice, the same audio


async def test_cosyvoice_zero_shot_clones_at_the_model_rate(server: HttpServer) -> None:
    text = "Hope you can do even better than me. Really."
    response, body = await call(
        "POST",
        f"{base(server)}/inference_zero_shot",
        data={"tts_text": text, "prompt_text": LIGHT_EN_TEXT},
        files=prompt_files(),
    )
    assert response.status_code == 200, body[:300]
    assert int(response.headers["X-Sample-Rate"]) == CLONER_RATE_HZ
    audio = pcm(body)
    assert len(audio) == fake_samples(text)
    assert abs(dominant_hz(audio, CLONER_RATE_HZ) - 440) < 5  # the reference reached it


async def test_cosyvoice_cross_lingual(server: HttpServer) -> None:
    text = "Hello, this is a cross-lingual test"
    response, body = await call(
        "POST",
        f"{base(server)}/inference_cross_lingual",
        data={"tts_text": text},
        files=prompt_files(),
    )
    assert response.status_code == 200, body[:300]
    assert len(pcm(body)) == fake_samples(text)
    # The fake cloner is English-only: Chinese text is refused, not mumbled.
    response, body = await call(
        "POST",
        f"{base(server)}/inference_cross_lingual",
        data={"tts_text": "你好，我是通义千问语音合成大模型"},
        files=prompt_files(),
    )
    assert response.status_code == 400
    assert "English" in json.loads(body)["detail"]


async def test_cosyvoice_instruct_needs_style_control(server: HttpServer) -> None:
    payload = {
        "tts_text": "Hello, I am a test",
        "spk_id": "joe",
        "instruct_text": "Speak with a cheerful and energetic tone",
    }
    response, body = await call("POST", f"{base(server)}/inference_instruct", data=payload)
    assert response.status_code == 400
    detail = json.loads(body)["detail"]
    assert "style control" in detail and "cloner" in detail  # says which model can
    # instruct2 on the cloner (which follows instructions) works.
    response, body = await call(
        "POST",
        f"{base(server)}/inference_instruct2",
        data={"tts_text": payload["tts_text"], "instruct_text": payload["instruct_text"]},
        files=prompt_files(),
    )
    assert response.status_code == 200, body[:300]
    assert len(pcm(body)) == fake_samples(payload["tts_text"])


async def test_cosyvoice_bad_input_gets_fastapi_errors(server: HttpServer) -> None:
    url = base(server)
    response, body = await call("POST", f"{url}/inference_zero_shot", data={"tts_text": "Hi."})
    assert response.status_code == 422
    missing = {tuple(d["loc"]) for d in json.loads(body)["detail"]}
    assert missing == {("body", "prompt_text"), ("body", "prompt_wav")}
    response, body = await call(
        "POST", f"{url}/inference_sft", data={"tts_text": "Hi.", "spk_id": "nobody"}
    )
    assert response.status_code == 404
    assert "nobody" in json.loads(body)["detail"]
    response, body = await call(
        "POST",
        f"{url}/inference_zero_shot",
        data={"tts_text": "Hi.", "prompt_text": "x"},
        files={"prompt_wav": ("p.wav", b"not audio at all" * 64, "audio/wav")},
    )
    assert response.status_code == 415
    assert isinstance(json.loads(body)["detail"], str)
    response, body = await call(
        "POST",
        f"{url}/inference_sft",
        data={"tts_text": "a" * (MAX_INPUT_CHARS + 1), "spk_id": "joe"},
    )
    assert response.status_code == 400
    assert "max_input_chars" in json.loads(body)["detail"]
    response, body = await call(
        "POST", f"{url}/inference_sft", data={"tts_text": "...", "spk_id": "joe"}
    )
    assert response.status_code == 400


async def test_a_stored_voice_serves_every_api(server: HttpServer) -> None:
    url = base(server)
    response, body = await call(
        "POST",
        f"{url}/v1/audio/voices",
        data={"name": "Anna", "transcript": LIGHT_EN_TEXT},
        files={"audio_sample": ("anna.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 201, body[:300]
    text = "A stored voice. Spoken through CosyVoice."
    for spk_id in ("voice_anna", "Anna", "中文女"):  # id, display name, [http] speakers
        response, body = await call(
            "POST", f"{url}/inference_sft", data={"tts_text": text, "spk_id": spk_id}
        )
        assert response.status_code == 200, body[:300]
        audio = pcm(body)
        assert len(audio) == fake_samples(text)
        assert abs(dominant_hz(audio, CLONER_RATE_HZ) - 440) < 5
    response, body = await call(
        "POST",
        f"{url}/inference_instruct",
        data={"tts_text": text, "spk_id": "中文女", "instruct_text": "Whisper it."},
    )
    assert response.status_code == 200, body[:300]
    assert len(pcm(body)) == fake_samples(text)
    response, body = await call("DELETE", f"{url}/v1/audio/voices/voice_anna")
    assert response.status_code == 200
    response, body = await call(
        "POST", f"{url}/inference_sft", data={"tts_text": text, "spk_id": "中文女"}
    )
    assert response.status_code == 404
