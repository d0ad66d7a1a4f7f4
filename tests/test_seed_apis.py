"""The compatible APIs, driven by the calls their own documentation shows.

The calls are those of ``../shared/seeds/`` (CosyVoice's API guide, the CSM
README, Fish's ``post_api`` MessagePack request, the real ``xinference-client``):
``requests`` exactly as the guides write them, run in worker threads so the
event loop keeps serving. Engines: Piper joe (a stock voice without style
control), the fake ``test-tts`` with cloning at 16 kHz (440 Hz with a
reference, 220 Hz without; length proportional to the text, so every length
is known exactly), faster-whisper tiny.en, and two real cloning engines with
random weights: pocket-tts (format, rate and length bounds) and CosyVoice 2
(style control, cross-lingual; exact lengths and the prompts its LLM gets).
Then auth, floods and hostile input against each API.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack  # type: ignore[import-untyped]
import numpy as np
import pytest
import pytest_asyncio
import requests
import websockets
from openapi_spec_validator import validate
from xinference_client.client.restful.restful_client import (  # type: ignore[import-untyped]
    Client as XinferenceClient,
)
from xinference_client.client.restful.restful_client import (
    RESTfulAudioModelHandle,
)

import tests.test_cosyvoice as cosy_tiny
from edgevoice.audio import decode, encode, pcm_to_float
from edgevoice.cli import main as cli_main
from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import EngineKind
from edgevoice.engines.cosyvoice import END_OF_PROMPT, CosyVoiceEngine
from edgevoice.hub import EngineHub
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.http.compat import find_stored
from edgevoice.protocols.http.state import STATE
from edgevoice.text import split_sentences
from edgevoice.voices import VoiceLibrary
from tests.conftest import JOE, LIGHT_EN_TEXT, LIGHT_EN_WAV, TINY_EN, assert_means
from tests.pocket_tiny import FRAME_SAMPLES as POCKET_FRAME_SAMPLES
from tests.pocket_tiny import MIN_FRAMES as POCKET_MIN_FRAMES
from tests.pocket_tiny import RATE_HZ as POCKET_RATE_HZ
from tests.pocket_tiny import build_tiny_model
from tests.pocket_tiny import max_samples as pocket_max_samples

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

JOE_STEADY = JOE.model_copy(update={"options": {"noise_scale": 0.0, "noise_w_scale": 0.0}})
CLONER_RATE_HZ = 16000
XINFERENCE_UID = "CosyVoice2-0.5B"
CLONER = ModelConfig(
    name="cloner",
    engine="test-tts",
    model="fake",
    options={"cloning": True, "sample_rate_hz": CLONER_RATE_HZ},
    aliases=[XINFERENCE_UID],  # how a Xinference model uid maps onto an edgevoice model
)
FAKE_ASR_TEXT = "turn on the living room light"
FAKE_ASR = ModelConfig(
    name="fake-asr",
    engine="test-asr",
    model="fake",
    aliases=["SenseVoiceSmall"],  # a Xinference uid
    options={"text": FAKE_ASR_TEXT},
)
SECONDS_PER_CHAR = 0.01  # the fake engine's default
MAX_INPUT_CHARS = 2000
SPEAKERS = {"中文女": "voice_anna", "narrator": "joe"}
EXPIRY_S = 4.0  # CSM sessions and generated files
MAX_FILES = 3
MAX_SESSIONS = 2


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(state_dir: Path, shared_cache: Path) -> AsyncIterator[HttpServer]:
    values: dict[str, Any] = {
        "cache_dir": shared_cache,
        "state_dir": state_dir,
        "tts": [JOE_STEADY, CLONER],
        "asr": [FAKE_ASR],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, "speakers": SPEAKERS},
        "limits": {
            "max_upload_bytes": 1 << 20,
            "max_input_chars": MAX_INPUT_CHARS,
            "session_timeout_s": EXPIRY_S,
            "stored_audio_ttl_s": EXPIRY_S,
            "max_stored_audio_files": MAX_FILES,
            "max_stream_sessions": MAX_SESSIONS,
        },
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
    # A browser's CORS preflight is allowed as CosyVoice's server allows it.
    response, _empty = await call(
        "OPTIONS",
        f"{base(server)}/inference_sft",
        headers={
            "Origin": "http://page.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-custom",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "content-type, x-custom"
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


# --------------------------------------------------------------------- CSM


async def csm_clone(server: HttpServer, text: str, **data: Any) -> tuple[requests.Response, bytes]:
    """The README's ``POST /v1/voice-clone`` with requests (form + ``audio_file``)."""
    return await call(
        "POST",
        f"{base(server)}/v1/voice-clone",
        data={"text": text, "context_text": LIGHT_EN_TEXT, **data},
        files={"audio_file": ("sample.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )


async def test_csm_voice_clone_and_fetch(server: HttpServer) -> None:
    text = "Hello, this is my cloned voice speaking."
    response, body = await csm_clone(server, text, speaker_id="999", temperature="0.6", topk="20")
    assert response.status_code == 200, body[:300]
    made = json.loads(body)
    assert set(made) == {"audio_url", "duration_seconds"}
    assert made["audio_url"].startswith("/v1/audio/") and made["audio_url"].endswith(".wav")
    assert made["duration_seconds"] == pytest.approx(fake_samples(text) / CLONER_RATE_HZ, abs=1e-3)
    response, wav = await call("GET", base(server) + made["audio_url"])
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/wav"
    audio = decode(wav)
    assert audio.rate_hz == CLONER_RATE_HZ and len(audio.samples) == fake_samples(text)
    assert abs(dominant_hz(audio.samples, CLONER_RATE_HZ) - 440) < 5
    # mp3, and max_audio_length_ms cuts the audio there.
    response, body = await csm_clone(server, text, output_format="mp3", max_audio_length_ms="250")
    assert response.status_code == 200, body[:300]
    made = json.loads(body)
    assert made["audio_url"].endswith(".mp3") and made["duration_seconds"] == 0.25
    response, mp3 = await call("GET", base(server) + made["audio_url"])
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert 0.24 <= decode(mp3).duration_s <= 0.25 + 0.15  # mp3 frames pad the end


async def test_csm_voice_clone_streamed(server: HttpServer) -> None:
    text = "Streaming audio responses. As they are made."
    response, body = await csm_clone(server, text, stream="true")
    assert response.status_code == 200, body[:300]
    assert response.headers["Content-Type"] == "audio/wav"
    assert len(decode(body).samples) == fake_samples(text)


async def test_csm_files_are_bounded_expire_and_never_leave_the_store(server: HttpServer) -> None:
    urls = []
    for n in range(MAX_FILES + 1):
        response, body = await csm_clone(server, f"File number {n}.")
        assert response.status_code == 200, body[:300]
        urls.append(json.loads(body)["audio_url"])
    statuses = [(await call("GET", base(server) + u))[0].status_code for u in urls]
    assert statuses == [404] + [200] * MAX_FILES  # the oldest made room
    for path in (
        "/v1/audio/..%2F..%2F..%2Fetc%2Fpasswd.wav",
        "/v1/audio/%2e%2e%2fvoices%2fvoice_anna.wav",
        "/v1/audio/" + "0" * 32 + ".wav",
        "/v1/audio/nothing.mp3",
    ):
        response, body = await call("GET", base(server) + path)
        assert response.status_code == 404, path
        assert b"root:" not in body
    await asyncio.sleep(EXPIRY_S + 0.5)
    response, body = await call("GET", base(server) + urls[-1])
    assert response.status_code == 404
    assert json.loads(body) == {"detail": "Audio file not found"}


async def test_csm_stream_text_session(server: HttpServer) -> None:
    url = base(server)
    response, body = await call(
        "POST",
        f"{url}/v1/streaming-session",
        files={"audio_file": ("sample.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 200, body[:300]
    session = json.loads(body)
    assert session["message"] == "Streaming session created successfully"
    chunks = ["Hello, ", "this is ", "streaming ", "text input."]
    samples = 0
    for i, chunk in enumerate(chunks):
        payload = {"session_id": session["session_id"], "text_chunk": chunk, "is_final": i == 3}
        response, wav = await call("POST", f"{url}/v1/stream-text", json=payload)
        assert response.status_code == 200, wav[:300]
        assert response.headers["Content-Type"] == "audio/wav"
        samples += len(decode(wav).samples) if len(wav) > 44 else 0
    assert samples == fake_samples("".join(chunks))
    response, body = await call("POST", f"{url}/v1/stream-text", json=payload)
    assert response.status_code == 404  # the final chunk ended the session
    assert "session" in json.loads(body)["detail"]


async def test_csm_websocket_as_documented(server: HttpServer) -> None:
    url = base(server)

    def create_session() -> str:  # the README's create_session, verbatim in spirit
        with LIGHT_EN_WAV.open("rb") as f:
            response = requests.post(f"{url}/v1/streaming-session", files={"audio_file": f})
        return str(response.json()["session_id"])

    session_id = await asyncio.to_thread(create_session)
    ws_url = f"ws://{url.replace('http://', '')}/v1/ws/stream-text/{session_id}"
    chunks = ["Hello, ", "this is ", "streaming ", "text input."]
    received = []
    async with websockets.connect(ws_url) as websocket:
        for i, chunk in enumerate(chunks):
            is_final = i == len(chunks) - 1
            await websocket.send(json.dumps({"text_chunk": chunk, "is_final": is_final}))
            received.append(await websocket.recv())
    wavs = [r for r in received if isinstance(r, bytes)]
    assert len(wavs) == len(chunks)  # one binary answer per chunk
    audio = [decode(wav) for wav in wavs if len(wav) > 44]
    assert sum(len(a.samples) for a in audio) == fake_samples("".join(chunks))


async def test_csm_sessions_are_bounded_and_expire(server: HttpServer) -> None:
    url = base(server)
    await asyncio.sleep(EXPIRY_S + 0.5)  # earlier tests' sessions are gone
    files = {"audio_file": ("sample.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")}
    opened = []
    for _ in range(MAX_SESSIONS):
        response, body = await call("POST", f"{url}/v1/streaming-session", files=files)
        assert response.status_code == 200, body[:300]
        opened.append(json.loads(body)["session_id"])
    response, body = await call("POST", f"{url}/v1/streaming-session", files=files)
    assert response.status_code == 429
    assert "max_stream_sessions" in json.loads(body)["detail"]
    await asyncio.sleep(EXPIRY_S + 0.5)
    payload = {"session_id": opened[0], "text_chunk": "Hi.", "is_final": True}
    response, body = await call("POST", f"{url}/v1/stream-text", json=payload)
    assert response.status_code == 404
    response, body = await call("POST", f"{url}/v1/streaming-session", files=files)
    assert response.status_code == 200


async def test_csm_bad_input_gets_fastapi_errors(server: HttpServer) -> None:
    url = base(server)
    response, body = await call("POST", f"{url}/v1/voice-clone", data={"text": "Hi."})
    assert response.status_code == 422
    assert json.loads(body)["detail"][0]["loc"] == ["body", "audio_file"]
    response, body = await csm_clone(server, "Hi.", output_format="ogg")
    assert response.status_code == 400
    assert "output_format" in json.loads(body)["detail"]
    response, body = await csm_clone(server, "Hi.", topk="many")
    assert response.status_code == 400
    response, body = await call(
        "POST",
        f"{url}/v1/voice-clone",
        data={"text": "Hi."},
        files={"audio_file": ("x.wav", b"RIFF" + b"\0" * 400, "audio/wav")},
    )
    assert response.status_code == 415
    assert isinstance(json.loads(body)["detail"], str)
    response, body = await call(
        "POST", f"{url}/v1/stream-text", json={"text_chunk": "Hi.", "is_final": True}
    )
    assert response.status_code == 422
    response, body = await call(
        "POST", f"{url}/v1/stream-text", json={"session_id": "nope", "text_chunk": "Hi."}
    )
    assert response.status_code == 404


# ------------------------------------------------------------- Fish Speech


def fish_request(**fields: Any) -> bytes:
    """What Fish's ``tools.post_api`` sends: a MessagePack ``ServeTTSRequest``."""
    request = {
        "text": "",
        "chunk_length": 200,
        "format": "wav",
        "references": [],
        "reference_id": None,
        "seed": None,
        "use_memory_cache": "off",
        "normalize": True,
        "streaming": False,
        "max_new_tokens": 1024,
        "top_p": 0.7,
        "repetition_penalty": 1.2,
        "temperature": 0.7,
        **fields,
    }
    packed: bytes = msgpack.packb(request, use_bin_type=True)
    return packed


async def fish_tts(server: HttpServer, **fields: Any) -> tuple[requests.Response, bytes]:
    return await call(
        "POST",
        f"{base(server)}/v1/tts",
        data=fish_request(**fields),
        headers={"content-type": "application/msgpack"},
    )


async def test_fish_tts_inline_reference_streamed(server: HttpServer) -> None:
    text = "Text to be input. Spoken with the reference voice."
    reference = {"audio": LIGHT_EN_WAV.read_bytes(), "text": LIGHT_EN_TEXT}
    response, body = await fish_tts(server, text=text, references=[reference], streaming=True)
    assert response.status_code == 200, body[:300]
    assert response.headers["Content-Type"] == "audio/wav"
    audio = decode(body)
    assert len(audio.samples) == fake_samples(text)
    assert abs(dominant_hz(audio.samples, CLONER_RATE_HZ) - 440) < 5
    response, body = await fish_tts(server, text=text, references=[reference], format="pcm")
    assert response.status_code == 200, body[:300]
    assert len(pcm(body)) == fake_samples(text)  # bare s16le at the model's rate
    response, body = await fish_tts(server, text=text, references=[reference], format="mp3")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert decode(body).duration_s >= fake_samples(text) / CLONER_RATE_HZ
    # JSON with base64 audio works too; no reference: the default (stock) voice.
    response, body = await call("POST", f"{base(server)}/v1/tts", json={"text": "Plain voice."})
    assert response.status_code == 200, body[:300]
    assert decode(body).rate_hz == 22050


async def test_a_fish_reference_serves_every_api(server: HttpServer) -> None:
    url = base(server)
    response, body = await call(
        "POST",
        f"{url}/v1/references/add",
        data={"id": "Bernd", "text": LIGHT_EN_TEXT},
        files={"audio": ("bernd.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 200, body[:300]
    assert json.loads(body)["success"] is True
    response, body = await call("GET", f"{url}/v1/references/list")
    assert "Bernd" in json.loads(body)["reference_ids"]
    text = "One voice. Every API."
    response, body = await fish_tts(server, text=text, reference_id="Bernd")
    assert response.status_code == 200, body[:300]
    assert abs(dominant_hz(decode(body).samples, CLONER_RATE_HZ) - 440) < 5
    response, body = await call(  # CosyVoice's spk_id
        "POST", f"{url}/inference_sft", data={"tts_text": text, "spk_id": "Bernd"}
    )
    assert response.status_code == 200, body[:300]
    assert len(pcm(body)) == fake_samples(text)
    response, body = await call(  # OpenAI's voice: the library id
        "POST",
        f"{url}/v1/audio/speech",
        json={"model": "cloner", "input": text, "voice": "voice_bernd", "response_format": "wav"},
    )
    assert response.status_code == 200, body[:300]
    assert len(decode(body).samples) == fake_samples(text)
    response, body = await call(
        "POST",
        f"{url}/v1/references/add",
        data={"id": "Bernd", "text": LIGHT_EN_TEXT},
        files={"audio": ("bernd.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 409
    response, body = await call(
        "DELETE", f"{url}/v1/references/delete", json={"reference_id": "Bernd"}
    )
    assert response.status_code == 200 and json.loads(body)["success"] is True
    response, body = await fish_tts(server, text=text, reference_id="Bernd")
    assert response.status_code == 404
    assert json.loads(body)["statusCode"] == 404


async def test_fish_bad_input_gets_fish_errors(server: HttpServer) -> None:
    url = base(server)
    bad: list[tuple[dict[str, Any], int, str]] = [
        ({"format": "wav"}, 422, "text"),
        ({"text": "Hi.", "format": "ogg"}, 400, "format"),
        ({"text": "Hi.", "format": "mp3", "streaming": True}, 400, "wav"),
        ({"text": "Hi.", "chunk_length": 50}, 400, "chunk_length"),
        ({"text": "Hi.", "reference_id": "nobody"}, 404, "nobody"),
        ({"text": "Hi.", "references": [{"audio": "%%%", "text": "x"}]}, 400, "base64"),
        ({"text": "Hi.", "references": "everything"}, 400, "references"),
        ({"text": "x" * (MAX_INPUT_CHARS + 1)}, 400, "max_input_chars"),
    ]
    for fields, status, word in bad:
        response, body = await call("POST", f"{url}/v1/tts", json=fields)
        assert response.status_code == status, (fields, body[:200])
        error = json.loads(body)
        assert set(error) == {"statusCode", "message", "error"}
        assert error["statusCode"] == status and word in error["message"]
    response, body = await call(
        "POST",
        f"{url}/v1/tts",
        data=b"\xc1garbage",
        headers={"content-type": "application/msgpack"},
    )
    assert response.status_code == 400
    response, body = await call("POST", f"{url}/v1/references/add", data={"id": "x"})
    assert response.status_code in (415, 422)
    response, body = await call(
        "POST", f"{url}/v1/references/add", data={"id": "x"}, files={"audio": ("a.wav", b"1")}
    )
    assert response.status_code == 422 and "text" in json.loads(body)["message"]


async def test_voices_import_a_fish_ref_data_tree(
    server: HttpServer, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = decode(LIGHT_EN_WAV.read_bytes())
    ref = tmp_path / "ref_data"
    files = {
        "SPEAKER1/happy/21.15-26.44.wav": LIGHT_EN_WAV.read_bytes(),
        "SPEAKER1/sad/30.1-32.71.flac": encode(sample.samples, sample.rate_hz, "flac"),
        # too short, then a good one: the first usable sample is taken
        "SPEAKER2/calm/0.0-0.5.wav": encode(
            sample.samples[: sample.rate_hz // 2], sample.rate_hz, "wav"
        ),
        "SPEAKER2/calm/1.0-3.0.wav": LIGHT_EN_WAV.read_bytes(),
        "SPEAKER2/mute/no-transcript.wav": LIGHT_EN_WAV.read_bytes(),
        "SPEAKER3/angry/1.wav": LIGHT_EN_WAV.read_bytes(),
        "SPEAKER3/neutral/1.wav": LIGHT_EN_WAV.read_bytes(),
    }
    for name, data in files.items():
        path = ref / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if "no-transcript" not in name:
            path.with_suffix(".lab").write_text(LIGHT_EN_TEXT, encoding="utf-8")
    config = tmp_path / "edgevoice.toml"
    config.write_text(f'state_dir = "{state_dir}"\n', encoding="utf-8")
    argv = ["voices", "import", str(ref), "--config", str(config), "--log-level", "ERROR"]
    assert await asyncio.to_thread(cli_main, argv) == 1  # SPEAKER2/mute has no .lab
    out, err = capsys.readouterr()
    assert "SPEAKER1/happy -> voice_speaker1-happy" in out
    assert "SPEAKER2/calm -> voice_speaker2-calm" in out
    assert "SPEAKER2/mute: not imported" in err and ".lab" in err
    assert await asyncio.to_thread(cli_main, argv) == 1
    assert "(already stored)" in capsys.readouterr().out  # a second import keeps them
    text = "An imported speaker."
    for fields in ({"emotion": "sad"}, {"emotion": "happy"}, {}):
        response, body = await fish_tts(server, text=text, reference_id="SPEAKER1", **fields)
        assert response.status_code == 200, (fields, body[:300])
        assert abs(dominant_hz(decode(body).samples, CLONER_RATE_HZ) - 440) < 5
    response, body = await fish_tts(server, text=text, reference_id="SPEAKER1", emotion="angry")
    assert response.status_code == 404
    assert "SPEAKER1/angry" in json.loads(body)["message"]
    # One voice per speaker with its emotions as styles: the name alone picks
    # its neutral style (else its first), in every API that takes a voice name.
    library = VoiceLibrary(state_dir / "voices")
    picked = {
        name: await asyncio.to_thread(find_stored, library, name)
        for name in ("SPEAKER1", "SPEAKER3", "speaker3/ANGRY", "SPEAKER9")
    }
    assert picked == {
        "SPEAKER1": "voice_speaker1-happy",
        "SPEAKER3": "voice_speaker3-neutral",
        "speaker3/ANGRY": "voice_speaker3-angry",
        "SPEAKER9": None,
    }
    for spk_id in ("SPEAKER3", "SPEAKER1/sad"):
        response, body = await call(
            "POST", f"{base(server)}/inference_sft", data={"tts_text": text, "spk_id": spk_id}
        )
        assert response.status_code == 200, body[:300]
        assert len(pcm(body)) == fake_samples(text)
    for voice in await asyncio.to_thread(library.voices):
        if voice.name.startswith("SPEAKER"):
            await asyncio.to_thread(library.delete, voice.id)


# -------------------------------------------------------------- Xinference


def xinference_model(url: str, model_uid: str, api_key: str | None = None) -> Any:
    """Xinference's documented calls: ``Client(url)``, then ``client.get_model(uid)``."""
    client = XinferenceClient(url, api_key=api_key)
    return client.get_model(model_uid)


async def test_xinference_client_calls(server: HttpServer) -> None:
    url = base(server)
    model = await asyncio.to_thread(xinference_model, url, XINFERENCE_UID)
    assert isinstance(model, RESTfulAudioModelHandle)
    text = "Speech through the Xinference client. Cloned."
    prompt = LIGHT_EN_WAV.read_bytes()

    def streamed() -> bytes:
        chunks = model.speech(
            text, prompt_speech=prompt, prompt_text=LIGHT_EN_TEXT, response_format="wav",
            stream=True,
        )  # fmt: skip
        assert inspect.isgenerator(chunks)  # as Xinference's guide checks
        out = bytearray()
        for chunk in chunks:
            assert isinstance(chunk, bytes)
            out += chunk
        return bytes(out)

    audio = decode(await asyncio.to_thread(streamed))
    assert len(audio.samples) == fake_samples(text)
    assert abs(dominant_hz(audio.samples, CLONER_RATE_HZ) - 440) < 5  # prompt_speech reached it
    body = await asyncio.to_thread(
        model.speech, text, prompt_speech=prompt, prompt_text=LIGHT_EN_TEXT,
        instruct_text="Speak cheerfully.", response_format="wav",
    )  # fmt: skip
    assert len(decode(body).samples) == fake_samples(text)
    # No prompt: the model's own voice (220 Hz), mp3 by default.
    plain = decode(await asyncio.to_thread(model.speech, text))
    assert abs(dominant_hz(plain.samples, plain.rate_hz) - 220) < 5
    # The guide's CosyVoice-SFT call: a speaker name of [http] speakers.
    wav = await asyncio.to_thread(
        model.speech, "Hello there.", voice="narrator", response_format="wav"
    )
    assert decode(wav).rate_hz == 22050  # narrator is Piper joe
    # Xinference's CosyVoice-Instruct call on a model without style control: refused.
    joe = await asyncio.to_thread(xinference_model, url, "joe")
    with pytest.raises(RuntimeError, match="Failed to speech"):
        await asyncio.to_thread(
            joe.speech, "Hello.", voice="joe", instruct_text="Speak like a rebel leader."
        )
    response = await asyncio.to_thread(
        requests.post,
        f"{url}/v1/audio/speech",
        json={"model": "joe", "input": "Hello.", "kwargs": json.dumps({"instruct_text": "Loud."})},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "instruct_text"
    assert "style control" in response.json()["error"]["message"]
    # An unknown uid: get_model fails as Xinference's client reports it.
    with pytest.raises(RuntimeError, match="Failed to get the model"):
        await asyncio.to_thread(xinference_model, url, "no-such-uid")
    # kwargs that are not a JSON object: OpenAI's error shape, naming the field.
    response = await asyncio.to_thread(
        requests.post,
        f"{url}/v1/audio/speech",
        json={"model": XINFERENCE_UID, "input": text, "kwargs": "[1, 2"},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "kwargs"


async def test_cosyvoice_port_serves_an_unchanged_client(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "state_dir": tmp_path / "state",
        "tts": [CLONER],
        "asr": [],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, "cosyvoice_port": 0},
    }
    settings = Settings(**values)
    async with EngineHub(settings) as hub, HttpServer(settings, hub) as srv:
        ports = {int(address.rsplit(":", 1)[1]) for address in srv.addresses}
        assert len(ports) == 2 and srv.port in ports
        (cosyvoice_port,) = ports - {srv.port}
        text = "Served on the CosyVoice port."
        response, body = await call(
            "POST",
            f"http://127.0.0.1:{cosyvoice_port}/inference_sft",
            data={"tts_text": text, "spk_id": "cloner"},
        )
        assert response.status_code == 200, body[:300]
        assert len(pcm(body)) == fake_samples(text)


async def test_oversize_bodies_get_each_api_s_shape(server: HttpServer) -> None:
    url = base(server)
    big = b"\0" * ((1 << 20) + 1024)  # over limits.max_upload_bytes
    response, body = await call(
        "POST",
        f"{url}/inference_zero_shot",
        data={"tts_text": "Hi.", "prompt_text": "x"},
        files={"prompt_wav": ("p.wav", big, "audio/wav")},
    )
    assert response.status_code == 413
    assert "max_upload_bytes" in json.loads(body)["detail"]
    response, body = await call(
        "POST",
        f"{url}/v1/voice-clone",
        data={"text": "Hi."},
        files={"audio_file": ("a.wav", big, "audio/wav")},
    )
    assert response.status_code == 413
    assert "detail" in json.loads(body)
    response, body = await fish_tts(server, text="Hi.", references=[{"audio": big, "text": "x"}])
    assert response.status_code == 413
    assert json.loads(body)["statusCode"] == 413
    # The daemon keeps serving: a plain query-string GET as a browser would send it.
    response, body = await call(
        "GET", f"{url}/inference_sft", params={"tts_text": "Still here.", "spk_id": "cloner"}
    )
    assert response.status_code == 200
    assert len(pcm(body)) == fake_samples("Still here.")


async def test_xinference_transcriptions_call(server: HttpServer) -> None:
    model = await asyncio.to_thread(xinference_model, base(server), "SenseVoiceSmall")
    result = await asyncio.to_thread(model.transcriptions, LIGHT_EN_WAV.read_bytes())
    assert result["text"] == FAKE_ASR_TEXT
    result = await asyncio.to_thread(
        model.transcriptions, LIGHT_EN_WAV.read_bytes(), language="en", response_format="json"
    )
    assert result["text"] == FAKE_ASR_TEXT
    with pytest.raises(RuntimeError, match="Failed to transcribe"):
        await asyncio.to_thread(model.transcriptions, b"not audio" * 100)


# --------------------------------------- a real cloning engine: pocket-tts
#
# The same documented calls against Pocket TTS built from its shipped config
# with random weights (tests/pocket_tiny.py): a real cloning engine's whole
# path (reference decoding and encoding, streamed generation at 24 kHz).
# Random weights say nothing intelligible, so these check format, rate and
# length bounds, never content.

POCKET_UID = "CosyVoice-300M"  # a Xinference uid, as an alias of the pocket model
WHISPER_UID = "whisper-tiny.en"  # and one of faster-whisper tiny.en


def pocket_bounds(text: str) -> tuple[int, int]:
    """Fewest and most samples Pocket TTS may make for ``text`` (any weights).

    Each sentence is one synthesis: at least its 6 frames (the end-of-speech
    threshold of -20 ends every piece there), at most Pocket TTS's cap.
    """
    sentences = split_sentences(text)
    return (
        len(sentences) * POCKET_MIN_FRAMES * POCKET_FRAME_SAMPLES,
        sum(pocket_max_samples(s) for s in sentences),
    )


def check_pocket_audio(samples: np.ndarray[Any, Any], text: str) -> None:
    low, high = pocket_bounds(text)
    assert low <= len(samples) <= high, (len(samples), low, high)
    assert np.all(np.isfinite(samples)) and float(np.max(np.abs(samples))) > 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pocket(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> AsyncIterator[HttpServer]:
    config = await asyncio.to_thread(build_tiny_model, tmp_path_factory.mktemp("pocket-tiny"))
    root = tmp_path_factory.mktemp("pocket-server")
    values: dict[str, Any] = {
        "cache_dir": shared_cache,
        "state_dir": root / "state",
        "offline": True,
        "tts": [
            ModelConfig(
                name="pocket",
                engine="pocket-tts",
                model=str(config),
                aliases=[POCKET_UID],
                options={"voice": str(LIGHT_EN_WAV), "eos_threshold": -20},
            ),
            JOE_STEADY,
        ],
        "asr": [TINY_EN.model_copy(update={"aliases": [WHISPER_UID]})],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, "speakers": {"中文女": "Clara"}},
        "limits": {"max_upload_bytes": 1 << 20, "max_input_chars": MAX_INPUT_CHARS},
    }
    settings = Settings(**values)
    async with EngineHub(settings) as hub, HttpServer(settings, hub) as srv:
        yield srv


async def test_pocket_cosyvoice_guide_calls(pocket: HttpServer) -> None:
    url = base(pocket)
    cases = [  # the guide's requests examples, one per cloning mode
        (
            "/inference_zero_shot",
            {"tts_text": "Hope you can do even better than me.", "prompt_text": LIGHT_EN_TEXT},
        ),
        ("/inference_cross_lingual", {"tts_text": "Hello, this is a cross-lingual test"}),
    ]
    for path, payload in cases:
        response, body = await call("POST", url + path, data=payload, files=prompt_files())
        assert response.status_code == 200, (path, body[:300])
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["Transfer-Encoding"] == "chunked"  # streamed as it is made
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert int(response.headers["X-Sample-Rate"]) == POCKET_RATE_HZ
        check_pocket_audio(pcm(body), payload["tts_text"])
    # CosyVoice's own client: GET with the form body.
    response, body = await call(
        "GET", url + "/inference_zero_shot", data=cases[0][1], files=prompt_files()
    )
    assert response.status_code == 200, body[:300]
    check_pocket_audio(pcm(body), cases[0][1]["tts_text"])
    # Pocket TTS has no style control: instruct2 is refused, in FastAPI's shape.
    response, body = await call(
        "POST",
        url + "/inference_instruct2",
        data={"tts_text": "Hello, I am a test", "instruct_text": "Speak cheerfully"},
        files=prompt_files(),
    )
    assert response.status_code == 400
    assert "style control" in json.loads(body)["detail"]
    # An English model: Chinese text cannot be spoken cross-lingually.
    response, body = await call(
        "POST",
        url + "/inference_cross_lingual",
        data={"tts_text": "你好，我是通义千问语音合成大模型"},
        files=prompt_files(),
    )
    assert response.status_code == 400 and "English" in json.loads(body)["detail"]
    # A stock voice still works on /inference_sft next to the cloner.
    response, body = await call(
        "POST", url + "/inference_sft", data={"tts_text": "Hello there.", "spk_id": "joe"}
    )
    assert response.status_code == 200 and int(response.headers["X-Sample-Rate"]) == 22050


async def test_pocket_csm_calls(pocket: HttpServer) -> None:
    url = base(pocket)
    text = "Hello, this is my cloned voice speaking."
    files = {"audio_file": ("sample.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")}
    response, body = await call(
        "POST",
        f"{url}/v1/voice-clone",
        data={"text": text, "context_text": LIGHT_EN_TEXT, "temperature": "0.6", "topk": "20"},
        files=files,
    )
    assert response.status_code == 200, body[:300]
    made = json.loads(body)
    response, wav = await call("GET", url + made["audio_url"])
    assert response.status_code == 200 and response.headers["Content-Type"] == "audio/wav"
    audio = decode(wav)
    assert audio.rate_hz == POCKET_RATE_HZ
    assert made["duration_seconds"] == pytest.approx(audio.duration_s, abs=1e-3)
    check_pocket_audio(audio.samples, text)
    response, body = await call(
        "POST", f"{url}/v1/voice-clone", data={"text": text, "stream": "true"}, files=files
    )
    assert response.status_code == 200 and response.headers["Transfer-Encoding"] == "chunked"
    check_pocket_audio(decode(body).samples, text)
    response, body = await call(
        "POST", f"{url}/v1/voice-clone", data={"text": text, "output_format": "mp3"}, files=files
    )
    made = json.loads(body)
    response, mp3 = await call("GET", url + made["audio_url"])
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert decode(mp3).duration_s >= made["duration_seconds"]
    # The README's streaming session: HTTP chunks, then the WebSocket.
    response, body = await call("POST", f"{url}/v1/streaming-session", files=files)
    sid = json.loads(body)["session_id"]
    chunks = ["Hello, ", "this is ", "streaming ", "text input."]
    samples = 0
    for i, chunk in enumerate(chunks):
        payload = {"session_id": sid, "text_chunk": chunk, "is_final": i == len(chunks) - 1}
        response, wav = await call("POST", f"{url}/v1/stream-text", json=payload)
        assert response.status_code == 200 and response.headers["Content-Type"] == "audio/wav"
        if len(wav) > 44:
            piece = decode(wav)
            assert piece.rate_hz == POCKET_RATE_HZ
            samples += len(piece.samples)
    # However the session cuts the text into pieces, each holds a word at least.
    high = sum(pocket_max_samples(word) for word in "".join(chunks).split())
    assert POCKET_MIN_FRAMES * POCKET_FRAME_SAMPLES <= samples <= high
    response, body = await call("POST", f"{url}/v1/streaming-session", files=files)
    ws_url = f"ws://{url.replace('http://', '')}/v1/ws/stream-text/{json.loads(body)['session_id']}"
    async with websockets.connect(ws_url) as websocket:
        received = []
        for i, chunk in enumerate(chunks):
            await websocket.send(json.dumps({"text_chunk": chunk, "is_final": i == 3}))
            received.append(await websocket.recv())
    assert all(isinstance(r, bytes) for r in received)
    total = sum(len(decode(r).samples) for r in received if isinstance(r, bytes) and len(r) > 44)
    assert POCKET_MIN_FRAMES * POCKET_FRAME_SAMPLES <= total <= high


async def test_pocket_fish_calls(pocket: HttpServer) -> None:
    url = base(pocket)
    text = "Text to be input. Spoken with the reference voice."
    reference = {"audio": LIGHT_EN_WAV.read_bytes(), "text": LIGHT_EN_TEXT}
    response, body = await fish_tts(pocket, text=text, references=[reference], streaming=True)
    assert response.status_code == 200, body[:300]
    assert response.headers["Transfer-Encoding"] == "chunked"
    audio = decode(body)
    assert audio.rate_hz == POCKET_RATE_HZ
    check_pocket_audio(audio.samples, text)
    response, body = await fish_tts(pocket, text=text, references=[reference], format="pcm")
    assert response.status_code == 200
    check_pocket_audio(pcm(body), text)
    encoded = base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode()
    response, body = await call(  # JSON with base64 audio
        "POST",
        f"{url}/v1/tts",
        json={"text": text, "references": [{"audio": encoded, "text": LIGHT_EN_TEXT}]},
    )
    assert response.status_code == 200, body[:300]
    check_pocket_audio(decode(body).samples, text)
    # A reference added through Fish serves Fish, CosyVoice and OpenAI alike.
    response, body = await call(
        "POST",
        f"{url}/v1/references/add",
        data={"id": "Clara", "text": LIGHT_EN_TEXT},
        files={"audio": ("clara.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 200, body[:300]
    response, body = await fish_tts(pocket, text=text, reference_id="Clara")
    assert response.status_code == 200, body[:300]
    check_pocket_audio(decode(body).samples, text)
    for spk_id in ("Clara", "中文女"):
        response, body = await call(
            "POST", f"{url}/inference_sft", data={"tts_text": text, "spk_id": spk_id}
        )
        assert response.status_code == 200, body[:300]
        assert int(response.headers["X-Sample-Rate"]) == POCKET_RATE_HZ
        check_pocket_audio(pcm(body), text)
    response, body = await call(
        "POST",
        f"{url}/v1/audio/speech",
        json={"model": "pocket", "input": text, "voice": "voice_clara", "response_format": "wav"},
    )
    assert response.status_code == 200, body[:300]
    check_pocket_audio(decode(body).samples, text)
    response, body = await call(
        "DELETE", f"{url}/v1/references/delete", json={"reference_id": "Clara"}
    )
    assert response.status_code == 200
    response, body = await fish_tts(pocket, text=text, reference_id="Clara")
    assert response.status_code == 404 and json.loads(body)["statusCode"] == 404


async def test_pocket_xinference_client_calls(pocket: HttpServer) -> None:
    model = await asyncio.to_thread(xinference_model, base(pocket), POCKET_UID)
    text = "The text to generate audio for."
    prompt = LIGHT_EN_WAV.read_bytes()
    # The guide's CosyVoice clone call (mp3 by default), its cross-lingual call, streaming.
    cloned = await asyncio.to_thread(
        model.speech, text, prompt_text=LIGHT_EN_TEXT, prompt_speech=prompt
    )
    audio = decode(cloned)
    assert audio.rate_hz == POCKET_RATE_HZ
    low, high = pocket_bounds(text)
    assert low <= round(audio.duration_s * POCKET_RATE_HZ) <= high + 1152 * 2  # mp3 padding
    wav = await asyncio.to_thread(model.speech, text, prompt_speech=prompt, response_format="wav")
    check_pocket_audio(decode(wav).samples, text)

    def streamed() -> bytes:
        chunks = model.speech(text, prompt_speech=prompt, response_format="wav", stream=True)
        assert inspect.isgenerator(chunks)
        out = bytearray()
        for chunk in chunks:
            assert isinstance(chunk, bytes)
            out += chunk
        return bytes(out)

    check_pocket_audio(decode(await asyncio.to_thread(streamed)).samples, text)
    # instruct_text on a model without style control: refused, not ignored.
    with pytest.raises(RuntimeError, match="Failed to speech"):
        await asyncio.to_thread(
            model.speech, text, prompt_speech=prompt, instruct_text="Speak like a rebel."
        )


# ------------------------------------------------------- auth, limits, attacks

API_KEY = "seed-api-key"
WS_MAX_BYTES = 4096


@pytest_asyncio.fixture(loop_scope="module")
async def secured(tmp_path: Path) -> AsyncIterator[HttpServer]:
    """The fake cloner behind an API key, at most 2 requests in flight per client."""
    values: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "state_dir": tmp_path / "state",
        "tts": [CLONER],
        "asr": [FAKE_ASR],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, "api_key": API_KEY},
        "limits": {"max_pending_per_client": 2, "max_ws_message_bytes": WS_MAX_BYTES},
    }
    settings = Settings(**values)
    async with EngineHub(settings) as hub, HttpServer(settings, hub) as srv:
        yield srv


async def recv_bytes(websocket: Any) -> bytes:
    message = await websocket.recv()
    assert isinstance(message, bytes), message
    return message


def error_keys(path: str) -> set[str]:
    """The keys of the error body of the API ``path`` belongs to."""
    if path.startswith(("/v1/tts", "/v1/references")):
        return {"statusCode", "message", "error"}  # Fish Speech
    if path.startswith("/v1/audio/speech"):
        return {"error"}  # OpenAI (Xinference's client)
    return {"detail"}  # FastAPI: CosyVoice and CSM


async def test_every_adapter_needs_the_api_key(secured: HttpServer) -> None:
    url = base(secured)
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    sample = {"audio_file": ("s.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/inference_sft", {"data": {"tts_text": "Hi there.", "spk_id": "cloner"}}),
        ("GET", "/inference_sft", {"params": {"tts_text": "Hi there.", "spk_id": "cloner"}}),
        ("POST", "/inference_zero_shot",
         {"data": {"tts_text": "Hi there.", "prompt_text": "x"}, "files": prompt_files()}),
        ("POST", "/v1/voice-clone", {"data": {"text": "Hi there."}, "files": sample}),
        ("POST", "/v1/streaming-session", {"files": sample}),
        ("POST", "/v1/tts", {"json": {"text": "Hi there."}}),
        ("GET", "/v1/references/list", {}),
        ("POST", "/v1/audio/speech", {"json": {"model": XINFERENCE_UID, "input": "Hi there."}}),
    ]  # fmt: skip
    for method, path, kwargs in calls:
        response, body = await call(method, url + path, **kwargs)
        assert response.status_code == 401, (path, body[:200])
        assert set(json.loads(body)) == error_keys(path), (path, body[:200])  # the API's shape
        response, body = await call(method, url + path, headers=bearer, **kwargs)
        assert response.status_code == 200, (path, body[:300])
    response, body = await call("GET", url + "/v1/audio/" + "0" * 32 + ".wav")
    assert response.status_code == 401  # even a missing file says nothing without the key
    assert "API key" in json.loads(body)["detail"]
    response, body = await call("POST", f"{url}/v1/streaming-session", headers=bearer, files=sample)
    ws_url = f"ws://127.0.0.1:{secured.port}/v1/ws/stream-text/{json.loads(body)['session_id']}"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url):
            pass
    assert refused.value.response.status_code == 401
    async with websockets.connect(ws_url, additional_headers=bearer) as websocket:
        await websocket.send(json.dumps({"text_chunk": "Hi there.", "is_final": True}))
        assert len(decode(await recv_bytes(websocket)).samples) == fake_samples("Hi there.")
    # Xinference's client asks /v1/cluster/auth (public) and then sends its key.
    response, body = await call("GET", f"{url}/v1/cluster/auth")
    assert response.status_code == 200 and json.loads(body) == {"auth": True}
    with pytest.raises(RuntimeError, match="Failed to get the model"):
        await asyncio.to_thread(xinference_model, url, XINFERENCE_UID)
    model = await asyncio.to_thread(xinference_model, url, XINFERENCE_UID, API_KEY)
    wav = await asyncio.to_thread(model.speech, "Hi there.", response_format="wav")
    assert len(decode(wav).samples) == fake_samples("Hi there.")
    # The spec says so: every adapter operation but the auth probe needs the key.
    response, body = await call("GET", f"{url}/openapi.json")
    spec = json.loads(body)
    await asyncio.to_thread(validate, spec)  # the keyed spec, with each API's 401
    for path in ("/inference_sft", "/v1/voice-clone", "/v1/tts", "/v1/references/add"):
        for operation in spec["paths"][path].values():
            assert "401" in operation["responses"] and operation.get("security") != []
    assert spec["paths"]["/v1/cluster/auth"]["get"]["security"] == []


async def test_a_flood_of_stalled_uploads_is_bounded(secured: HttpServer) -> None:
    """Uploads that never finish hold at most max_pending_per_client slots;
    the next request of that client is refused at once, others keep being served."""
    url = base(secured)
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    release = asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        yield b"tts_text=Hello&prompt_text=x&"
        await release.wait()
        yield b"spk_id=cloner"

    async with aiohttp.ClientSession(headers=bearer) as session:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        stalled = [
            asyncio.create_task(
                session.post(f"{url}/inference_sft", data=stalled_body(), headers=headers)
            )
            for _ in range(2)
        ]
        assert secured.app is not None
        pending = secured.app[STATE].pending
        deadline = asyncio.get_running_loop().time() + 60
        while sum(pending.values()) < 2:  # both stalled uploads hold their slot
            assert not any(task.done() for task in stalled)
            assert asyncio.get_running_loop().time() < deadline, "the uploads never arrived"
            await asyncio.sleep(0.05)
        async with session.post(
            f"{url}/inference_sft", data={"tts_text": "Hi.", "spk_id": "cloner"}
        ) as response:
            assert response.status == 429
            assert "max_pending_per_client" in await response.text()
        for route in ("/v1/tts", "/v1/voice-clone", "/v1/references/add", "/v1/audio/speech"):
            async with session.post(url + route, json={}) as response:
                assert response.status == 429, route
                assert set(await response.json()) == error_keys(route)  # each API's shape
        release.set()
        for task in stalled:
            async with await task as response:
                assert response.status == 200
                assert len(pcm(await response.read())) == fake_samples("Hello")
        async with session.post(
            f"{url}/inference_sft", data={"tts_text": "Hi.", "spk_id": "cloner"}
        ) as response:
            assert response.status == 200


async def test_csm_websocket_attacks(secured: HttpServer) -> None:
    url = base(secured)
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    sample = {"audio_file": ("s.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")}

    async def session() -> str:
        response, body = await call(
            "POST", f"{url}/v1/streaming-session", headers=bearer, files=sample
        )
        assert response.status_code == 200, body[:300]
        return str(json.loads(body)["session_id"])

    ws_base = f"ws://127.0.0.1:{secured.port}/v1/ws/stream-text/"
    with pytest.raises(websockets.InvalidStatus) as unknown:
        async with websockets.connect(ws_base + "no-such-session", additional_headers=bearer):
            pass
    assert unknown.value.response.status_code == 404
    async with websockets.connect(ws_base + await session(), additional_headers=bearer) as ws:
        await ws.send("not json {")
        assert "JSON" in json.loads(await ws.recv())["detail"]
        await ws.send(json.dumps({"text_chunk": 42}))
        assert "text_chunk" in json.loads(await ws.recv())["detail"]
        await ws.send(b"\x00binary frames are ignored")
        await ws.send(json.dumps({"text_chunk": "Still serving.", "is_final": True}))
        assert len(decode(await recv_bytes(ws)).samples) == fake_samples("Still serving.")
    async with websockets.connect(ws_base + await session(), additional_headers=bearer) as ws:
        await ws.send(json.dumps({"text_chunk": "x" * (WS_MAX_BYTES * 2)}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # too big
    # A text chunk over max_input_chars (pending, never ending a sentence) is refused.
    sid = await session()
    response, body = await call(
        "POST",
        f"{url}/v1/stream-text",
        headers=bearer,
        json={"session_id": sid, "text_chunk": "word " * 2000},
    )
    assert response.status_code in (400, 413), body[:300]
    assert "max_input_chars" in json.loads(body)["detail"]


async def test_adapters_refuse_hostile_input(server: HttpServer, state_dir: Path) -> None:
    url = base(server)
    empty = {"prompt_wav": ("p.wav", b"", "audio/wav")}
    response, body = await call(
        "POST",
        f"{url}/inference_zero_shot",
        data={"tts_text": "Hi.", "prompt_text": "x"},
        files=empty,
    )
    assert response.status_code in (400, 415, 422), body[:300]
    assert "detail" in json.loads(body)
    silence = encode(np.zeros(CLONER_RATE_HZ * 2, dtype=np.float32), CLONER_RATE_HZ, "wav")
    for files in ({"audio_file": ("a.wav", b"", "audio/wav")},
                  {"audio_file": ("a.wav", silence, "audio/wav")}):  # fmt: skip
        response, body = await call(
            "POST", f"{url}/v1/voice-clone", data={"text": "Hi."}, files=files
        )
        assert response.status_code in (400, 415, 422), body[:300]
        assert "detail" in json.loads(body)
    # A 31 s reference is refused by every API, each in its own shape.
    tone = np.sin(np.arange(31 * 8000, dtype=np.float32) * 0.3).astype(np.float32) * 0.3
    long_wav = encode(tone, 8000, "wav")
    response, body = await call(
        "POST",
        f"{url}/inference_zero_shot",
        data={"tts_text": "Hi.", "prompt_text": "x"},
        files={"prompt_wav": ("p.wav", long_wav, "audio/wav")},
    )
    assert response.status_code == 400 and "30 s" in json.loads(body)["detail"]
    response, body = await call(
        "POST",
        f"{url}/v1/voice-clone",
        data={"text": "Hi."},
        files={"audio_file": ("a.wav", long_wav, "audio/wav")},
    )
    assert response.status_code == 400 and "30 s" in json.loads(body)["detail"]
    response, body = await fish_tts(server, text="Hi.", references=[{"audio": long_wav}])
    assert response.status_code == 400 and "30 s" in json.loads(body)["message"]
    xinference = await asyncio.to_thread(xinference_model, url, XINFERENCE_UID)
    with pytest.raises(RuntimeError, match="Failed to speech"):
        await asyncio.to_thread(xinference.speech, "Hi.", prompt_speech=long_wav)
    # CSM: the same text and audio-length limits as every API.
    response, body = await csm_clone(server, "a" * (MAX_INPUT_CHARS + 1))
    assert response.status_code == 400 and "max_input_chars" in json.loads(body)["detail"]
    for max_ms in ("1e12", "-5", "nan"):
        response, body = await csm_clone(server, "Hi.", max_audio_length_ms=max_ms)
        assert response.status_code == 400, (max_ms, body[:300])
        assert "max_audio_length_ms" in json.loads(body)["detail"]
    for name in ("%00.wav", "a" * 4000 + ".wav", "..%5C..%5Cwin.ini.wav", "%2F.wav"):
        response, body = await call("GET", f"{url}/v1/audio/{name}")
        assert response.status_code == 404, name
    # Fish: a reference id that tries to leave the library is just a name.
    library = state_dir / "voices"
    response, body = await call(
        "POST",
        f"{url}/v1/references/add",
        data={"id": "../../../../tmp/evil", "text": LIGHT_EN_TEXT},
        files={"audio": ("e.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 200, body[:300]
    stored = {p.resolve().parent for p in library.rglob("*")}
    assert stored == {library.resolve()}
    response, body = await call(
        "DELETE", f"{url}/v1/references/delete", json={"reference_id": "../../../../tmp/evil"}
    )
    assert response.status_code == 200
    response, body = await call(
        "POST",
        f"{url}/v1/references/add",
        data={"id": "x" * 10_000, "text": LIGHT_EN_TEXT},
        files={"audio": ("e.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 400 and json.loads(body)["statusCode"] == 400
    reference = {"audio": LIGHT_EN_WAV.read_bytes(), "text": "x"}
    hostile: list[dict[str, Any]] = [
        {"text": "Hi.", "references": [reference] * 9},
        {"text": "Hi.", "references": [{"audio": "", "text": "x"}]},
        {"text": "Hi.", "references": [{"audio": b"", "text": "x"}]},
        {"text": "Hi.", "references": [{"audio": LIGHT_EN_WAV.read_bytes(), "text": 5}]},
        {"text": "Hi.", "reference_id": "../../etc/passwd"},
        {"text": "Hi.", "reference_id": 7},
        {"text": 12},
        {"text": "Hi.", "chunk_length": "200"},
        {"text": "Hi.", "streaming": "yes"},
    ]
    for fields in hostile:
        response, body = await fish_tts(server, **fields)
        assert 400 <= response.status_code < 500, (fields.keys(), body[:300])
        error = json.loads(body)
        assert set(error) == {"statusCode", "message", "error"}
    for raw in (b"\x91" * 100_000, msgpack.packb([1, 2, 3]), b""):
        response, body = await call(
            "POST", f"{url}/v1/tts", data=raw, headers={"content-type": "application/msgpack"}
        )
        assert 400 <= response.status_code < 500
        assert json.loads(body)["statusCode"] == response.status_code
    # A method a route lacks: 405, in that API's shape.
    for method, path in (
        ("DELETE", "/inference_sft"),
        ("GET", "/v1/tts"),
        ("PUT", "/v1/voice-clone"),
    ):
        response, body = await call(method, url + path)
        assert response.status_code == 405, (method, path)
        assert set(json.loads(body)) == error_keys(path), (path, body[:200])
    # CosyVoice: an unknown field is ignored as FastAPI does; a non-UTF-8 form is refused.
    response, body = await call(
        "POST",
        f"{url}/inference_sft",
        data=b"tts_text=\xff\xfe&spk_id=joe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400 and "UTF-8" in json.loads(body)["detail"]
    response, body = await call(
        "POST", f"{url}/inference_sft", data={"tts_text": "Hello there.", "spk_id": "joe", "x": "1"}
    )
    assert response.status_code == 200


async def test_xinference_client_transcribes_with_whisper(pocket: HttpServer) -> None:
    model = await asyncio.to_thread(xinference_model, base(pocket), WHISPER_UID)
    assert isinstance(model, RESTfulAudioModelHandle)
    with LIGHT_EN_WAV.open("rb") as audio_file:  # the guide's call
        audio = audio_file.read()
    result = await asyncio.to_thread(model.transcriptions, audio=audio)
    assert_means(result["text"], "living", "room", "light")
    verbose = await asyncio.to_thread(
        model.transcriptions, audio, language="en", response_format="verbose_json"
    )
    assert_means(verbose["text"], "living", "room")
    assert verbose["segments"] and verbose["duration"] > 1


# ------------------------------- a cloning engine with style control: CosyVoice 2
#
# The CosyVoice 2 engine built from a tiny random-weight model directory
# (tests/test_cosyvoice.py): multilingual, with instruct mode, and every
# output length known exactly. So the modes a style-less cloner refuses run
# here, and the LLM's prompts show what each API's fields became.


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cosy(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[HttpServer, CosyVoiceEngine]]:
    model_dir = await asyncio.to_thread(
        cosy_tiny.build_tiny_model, tmp_path_factory.mktemp("cosyvoice-tiny")
    )
    root = tmp_path_factory.mktemp("cosy-server")
    exact = {"min_token_text_ratio": cosy_tiny.RATIO, "max_token_text_ratio": cosy_tiny.RATIO}
    values: dict[str, Any] = {
        "cache_dir": root / "cache",
        "state_dir": root / "state",
        "offline": True,
        "tts": [
            ModelConfig(
                name="cosy",
                engine="cosyvoice",
                model=str(model_dir),
                aliases=["CosyVoice-300M-Instruct"],
                options=exact,
            )
        ],
        "asr": [],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    settings = Settings(**values)
    async with EngineHub(settings) as hub, HttpServer(settings, hub) as srv:
        engine = hub.get(EngineKind.TTS, "cosy").engine
        assert isinstance(engine, CosyVoiceEngine)
        yield srv, engine


async def test_cosyvoice_modes_on_a_style_capable_cloner(
    cosy: tuple[HttpServer, CosyVoiceEngine],
) -> None:
    server, engine = cosy
    url = base(server)
    instruct = "Speak with a cheerful and energetic tone"
    end_of_prompt = engine.text_tokens(END_OF_PROMPT)
    with cosy_tiny.LlmCalls(engine) as llm:
        zero_shot_fields = {
            "tts_text": "希望你以后能够做的比我还好呦",
            "prompt_text": LIGHT_EN_TEXT,
        }
        for path, payload in (
            ("/inference_zero_shot", zero_shot_fields),
            ("/inference_cross_lingual", {"tts_text": "你好，我是通义千问语音合成大模型"}),
            ("/inference_instruct2", {"tts_text": "Hello, I am a test", "instruct_text": instruct}),
        ):
            response, body = await call("POST", url + path, data=payload, files=prompt_files())
            assert response.status_code == 200, (path, body[:300])
            assert int(response.headers["X-Sample-Rate"]) == cosy_tiny.RATE_HZ
            audio = pcm(body)
            assert len(audio) == cosy_tiny.expected_samples(engine, payload["tts_text"]), path
    zero_shot, cross, instructed = llm.calls
    assert zero_shot["prompt_text"].tolist()[0] == engine.text_tokens(LIGHT_EN_TEXT)
    assert int(cross["prompt_text_len"][0]) == 0  # cross-lingual: no transcript prompt
    assert instructed["prompt_text"].tolist()[0] == engine.text_tokens(instruct) + end_of_prompt
    # /inference_instruct: a stored voice (added through Fish) with an instruction.
    response, body = await call(
        "POST",
        f"{url}/v1/references/add",
        data={"id": "Dora", "text": LIGHT_EN_TEXT},
        files={"audio": ("dora.wav", LIGHT_EN_WAV.read_bytes(), "audio/wav")},
    )
    assert response.status_code == 200, body[:300]
    with cosy_tiny.LlmCalls(engine) as llm:
        response, body = await call(
            "POST",
            f"{url}/inference_instruct",
            data={"tts_text": "Hello, I am a test", "spk_id": "Dora", "instruct_text": instruct},
        )
        assert response.status_code == 200, body[:300]
        assert len(pcm(body)) == cosy_tiny.expected_samples(engine, "Hello, I am a test")
        # Xinference's client: the guide's instruct call, on the same model by its uid.
        model = await asyncio.to_thread(xinference_model, url, "CosyVoice-300M-Instruct")
        wav = await asyncio.to_thread(
            model.speech, "Hello, I am a test", prompt_speech=LIGHT_EN_WAV.read_bytes(),
            instruct_text=instruct, response_format="wav",
        )  # fmt: skip
        assert len(decode(wav).samples) == cosy_tiny.expected_samples(engine, "Hello, I am a test")
    for call_kwargs in llm.calls:
        assert (
            call_kwargs["prompt_text"].tolist()[0] == engine.text_tokens(instruct) + end_of_prompt
        )
