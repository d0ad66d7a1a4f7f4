"""The mlx-whisper engine on MLX's CPU backend (``mlx[cpu]`` on Linux): real
tiny.en weights (converted from the packaged CTranslate2 model) through the hub
and the OpenAI HTTP API, plus a tiny random-weight multilingual Whisper built
here for the translate, language and word-timestamp paths.

MLX on CPU is slow (a 2.4 s clip takes tens of seconds on a busy CPU), so the
real model decodes once, with word timestamps, and nothing here assumes speed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError

from edgevoice.config import ModelConfig, Settings
from edgevoice.devices import DeviceError, MachineFacts, select_device
from edgevoice.engines.base import EngineContext, EngineRequestError, Segment, TranscribeOptions
from edgevoice.engines.mlx_whisper import (
    PLUGIN,
    MlxWhisperAsrEngine,
    MlxWhisperOptions,
    choose_dtype,
    resolve_model,
)
from edgevoice.hub import EngineHub
from edgevoice.model_files import ModelNotFoundError
from edgevoice.protocols.http import HttpServer
from edgevoice.testing import check_asr_engine
from tests.conftest import (
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    assert_plugin_discovered,
    noise,
    openai_audio_client,
    overlap,
    words,
)

RATE_HZ = 16000

pytestmark = pytest.mark.filterwarnings("ignore:Word-level timestamps on translations:UserWarning")


# ------------------------------------------------------------- pure functions

MAC = MachineFacts(apple_silicon=True, mlx_installed=True)
LINUX = MachineFacts()


@pytest.mark.parametrize(
    ("requested", "facts", "device", "dtype"),
    [
        ("auto", MAC, "mlx", "float16"),  # Apple GPU
        ("auto", LINUX, "cpu", "float32"),  # mlx[cpu] on Linux
        ("auto", MachineFacts(cuda_devices=1), "cpu", "float32"),  # no CUDA path here
        ("cpu", MAC, "cpu", "float32"),
        ("mlx", MAC, "mlx", "float16"),
    ],
)
def test_device_and_dtype_selection(
    requested: str, facts: MachineFacts, device: str, dtype: str
) -> None:
    choice = select_device(requested, PLUGIN.devices, facts)
    assert choice.device == device
    assert choose_dtype(choice.device, "auto") == dtype
    assert choose_dtype(choice.device, "float32") == "float32"


def test_devices_this_engine_cannot_use() -> None:
    with pytest.raises(DeviceError, match="Apple Silicon"):
        select_device("mlx", PLUGIN.devices, LINUX)
    with pytest.raises(DeviceError, match="not supported"):
        select_device("cuda", PLUGIN.devices, MachineFacts(cuda_devices=1))


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": []},
        {"temperature": [-0.1]},
        {"dtype": "bfloat16"},
        {"no_speech_threshold": 2},
        {"hallucination_silence_threshold_s": 0},
        {"beam_size": 5},  # no beam search in mlx-whisper: not an option here
    ],
)
def test_options_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MlxWhisperOptions.model_validate(bad)


def test_plugin_declares_its_extra_and_is_discovered() -> None:
    assert_plugin_discovered(PLUGIN, "mlx-whisper")
    assert PLUGIN.devices == ("cpu", "mlx")


def test_model_resolution_errors(tmp_path: Path) -> None:
    # Names and repo ids: tests/test_engines.py (shared by the Whisper engines).
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        resolve_model("tiny.en", tmp_path, offline=True)
    entry = ModelConfig(name="x", engine="mlx-whisper", model=str(tmp_path))
    engine = MlxWhisperAsrEngine(
        EngineContext(model=entry, device="cpu", cache_dir=tmp_path, offline=True),
        MlxWhisperOptions(),
    )
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        engine.load()
    with pytest.raises(RuntimeError, match="not loaded"):
        engine.transcribe(np.zeros(RATE_HZ, np.float32), TranscribeOptions())


# ------------------------------------------------ a tiny random multilingual model


def _build_random_mlx_whisper(out: Path) -> Path:
    """A multilingual MLX Whisper with tiny dimensions and random weights whose
    decoder always says " hello" (its final layer norm points there), saved as
    mlx-whisper loads it: config.json + weights.npz."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.tokenizer import get_tokenizer
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=64,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51865,
        n_text_ctx=32,
        n_text_state=64,
        n_text_head=2,
        n_text_layer=1,
    )
    mx.random.seed(0)
    weights = dict(tree_flatten(Whisper(dims).parameters()))
    (hello,) = get_tokenizer(True, num_languages=99).encode(" hello")
    target = weights["decoder.token_embedding.weight"][hello]
    weights["decoder.ln.weight"] = mx.zeros_like(weights["decoder.ln.weight"])
    weights["decoder.ln.bias"] = target / mx.linalg.norm(target) * 1000
    out.mkdir(parents=True)
    mx.savez(str(out / "weights.npz"), **weights)
    (out / "config.json").write_text(json.dumps({**vars(dims), "model_type": "whisper"}))
    return out


@pytest.fixture(scope="module")
def random_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlxWhisperAsrEngine]:
    path = _build_random_mlx_whisper(tmp_path_factory.mktemp("random-mlx") / "model")
    entry = ModelConfig(name="random", engine="mlx-whisper", model=str(path))
    engine = MlxWhisperAsrEngine(
        EngineContext(model=entry, device="cpu", cache_dir=path, offline=True),
        MlxWhisperOptions(temperature=[0.0]),
    )
    engine.load()
    yield engine
    engine.close()


def test_random_model_capabilities_and_conformance(random_engine: MlxWhisperAsrEngine) -> None:
    caps = random_engine.capabilities
    assert caps.translate and caps.word_timestamps and caps.prompt and not caps.streaming
    assert len(caps.languages) == 99 and caps.languages[0] == "en"
    check_asr_engine(random_engine, noise(2.0))


def test_translate_with_word_timestamps_and_detection(random_engine: MlxWhisperAsrEngine) -> None:
    info, segments = random_engine.transcribe(
        noise(3.0), TranscribeOptions(task="translate", language="de_DE", word_timestamps=True)
    )
    got = list(segments)
    assert info.language == "de" and info.duration_s == pytest.approx(3.0)
    assert got and all(isinstance(s, Segment) for s in got)
    for seg in got:
        assert 0 <= seg.start_s <= seg.end_s <= info.duration_s
        assert seg.words and words("".join(w.word for w in seg.words)) == words(seg.text)
        for word in seg.words:
            assert seg.start_s <= word.start_s <= word.end_s <= seg.end_s
    detected, _segments = random_engine.transcribe(
        noise(1.0, seed=1), TranscribeOptions(prompt="kitchen " * 500)
    )
    assert detected.language in random_engine.capabilities.languages
    assert 0.0 < detected.language_probability <= 1.0


def test_bad_requests(random_engine: MlxWhisperAsrEngine) -> None:
    with pytest.raises(EngineRequestError, match="language 'xx'"):
        random_engine.transcribe(noise(1.0), TranscribeOptions(language="xx"))
    info, segments = random_engine.transcribe(np.zeros(0, np.float32), TranscribeOptions())
    assert info.duration_s == 0.0 and list(segments) == []


# ---------------------------------- real tiny.en: hub and the OpenAI HTTP API


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    mlx_tiny_en: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[EngineHub, HttpServer]]:
    entry = ModelConfig(
        name="mlx-tiny-en",
        engine="mlx-whisper",
        model=str(mlx_tiny_en),
        options={"temperature": [0.0]},
    )
    values: dict[str, Any] = {
        "cache_dir": tmp_path_factory.mktemp("cache"),
        "state_dir": tmp_path_factory.mktemp("state"),
        "asr": [entry],
        "tts": [],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    async with EngineHub(Settings(**values)) as hub, HttpServer(hub.settings, hub) as srv:
        yield hub, srv


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_real_speech_over_http_with_words(served: tuple[EngineHub, HttpServer]) -> None:
    """One decode of the real model (slow on CPU): text and word times over HTTP."""
    hub, server = served
    loaded = hub.asr("mlx-tiny-en")
    assert loaded.slot.device.device == "cpu"
    assert loaded.engine.capabilities.languages == ("en",)
    oai = await asyncio.to_thread(openai_audio_client, server.port, 1800)
    result = await oai.audio.transcriptions.create(
        file=LIGHT_EN_WAV,
        model="mlx-tiny-en",
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    assert overlap(result.text, LIGHT_EN_TEXT) >= 0.8, result.text
    assert result.language == "english"
    assert result.words and overlap(" ".join(w.word for w in result.words), LIGHT_EN_TEXT) >= 0.8
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and all(0 <= w.start <= w.end <= 2.5 for w in result.words)
    # English-only: translation is refused before any decoding, in OpenAI's error shape.
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.audio.translations.create(file=LIGHT_EN_WAV, model="mlx-tiny-en")
    assert "English-only" in str(bad.value)
    await oai.close()
