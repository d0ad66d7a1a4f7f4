"""funasr: SenseVoiceSmall (and an FSMN-VAD) built from their configs with random weights.

No FunASR weights install offline, so the test writes SenseVoiceSmall's
model directory itself: its config (tiny dimensions), a sentencepiece
tokenizer trained here with SenseVoice's tag tokens, a CMVN file and random
weights saved as ``model.pt``; likewise a tiny FSMN-VAD directory, used
through the ``vad_model`` path option (Xinference's offline VAD). The real
loading and decoding code runs through the hub and the OpenAI-compatible
HTTP API; random weights say nothing, so the tests check types, shapes,
bounds and that no tag survives in the text. The tag parser is checked on
real SenseVoice output strings.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError

from edgevoice.audio import Audio, decode
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.engines.base import EngineKind, EngineRequestError, TranscribeOptions
from edgevoice.engines.funasr import (
    MODELS,
    SENSEVOICE_LANGUAGES,
    FunAsrEngine,
    FunAsrOptions,
    RichText,
    merge_spans,
    parse_rich_text,
    resolve_model,
    split_long,
)
from edgevoice.hub import EngineHub
from edgevoice.model_files import ModelNotFoundError
from edgevoice.protocols.http import HttpServer
from tests.conftest import LAMP_WAV, LIGHT_EN_WAV

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
# openai-python marks translations deprecated; the endpoint is what we test.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

EMOTIONS = {"happy", "sad", "angry", "neutral", "fearful", "disgusted", "surprised"}
EVENTS = {"speech", "bgm", "applause", "laughter", "cry", "sneeze", "breath", "cough"}

# ------------------------------------------------------------ tag parser

# Real SenseVoiceSmall output (its README's examples and FunASR's demos).
REAL_OUTPUTS = [
    (
        "<|en|><|NEUTRAL|><|Speech|><|woitn|>the tribal chieftain called for the boy and "
        "presented him with fifty pieces of gold",
        RichText(
            "the tribal chieftain called for the boy and presented him with fifty pieces of gold",
            "en",
            "neutral",
            ("speech",),
        ),
    ),
    (
        "<|zh|><|NEUTRAL|><|Speech|><|withitn|>开放时间早上9点至下午5点。",
        RichText("开放时间早上9点至下午5点。", "zh", "neutral", ("speech",)),
    ),
    (
        "<|yue|><|NEUTRAL|><|Speech|><|withitn|>呢几个字都表达唔到，我想讲嘅意思。",
        RichText("呢几个字都表达唔到，我想讲嘅意思。", "yue", "neutral", ("speech",)),
    ),
    (
        "<|ja|><|NEUTRAL|><|Speech|><|withitn|>うちの中学は弁当制で持っていきない場合は、"
        "50円の学校販売のパンを買う。",
        RichText(
            "うちの中学は弁当制で持っていきない場合は、50円の学校販売のパンを買う。",
            "ja",
            "neutral",
            ("speech",),
        ),
    ),
    (
        "<|ko|><|NEUTRAL|><|Speech|><|withitn|>조금만 생각을 하면서 살면 훨씬 편할 거야.",
        RichText("조금만 생각을 하면서 살면 훨씬 편할 거야.", "ko", "neutral", ("speech",)),
    ),
    (
        "<|en|><|HAPPY|><|BGM|><|withitn|>Welcome to the show!",
        RichText("Welcome to the show!", "en", "happy", ("bgm",)),
    ),
    (
        "<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>",
        RichText("", None, None, (), no_speech=True),
    ),
    # Merged VAD segments repeat the tags: the first language and emotion win,
    # events accumulate once each.
    (
        "<|en|><|NEUTRAL|><|Speech|><|withitn|>Hello.<|en|><|HAPPY|><|Laughter|><|withitn|>"
        "Ha ha.<|zh|><|SAD|><|Speech|><|woitn|>好的",
        RichText("Hello. Ha ha. 好的", "en", "neutral", ("speech", "laughter")),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), REAL_OUTPUTS)
def test_tags_become_metadata(raw: str, expected: RichText) -> None:
    assert parse_rich_text(raw) == expected


def test_tag_parser_on_odd_input() -> None:
    assert parse_rich_text("no tags at all") == RichText("no tags at all")
    assert parse_rich_text("<|en|>half <|open tag") == RichText("half <|open tag", "en")
    assert parse_rich_text("<|unknown_tag|>text<|xx|>") == RichText("text")
    hostile = "<|" * 50_000 + "|>" * 50_000 + "<|en|>" * 10_000
    parsed = parse_rich_text(hostile)  # linear: returns at once
    assert parsed.language == "en" and "<|en|>" not in parsed.text


def test_spans_are_merged_and_cut() -> None:
    spans = [(0, 10), (12, 20), (30, 45), (50, 52)]
    assert list(merge_spans(spans, 20)) == [(0, 20), (30, 45), (50, 52)]
    assert list(merge_spans(spans, 100)) == [(0, 52)]
    assert list(merge_spans([], 10)) == []
    assert list(split_long([(0, 25), (30, 31)], 10)) == [(0, 10), (10, 20), (20, 25), (30, 31)]


def test_options_and_model_resolution(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        FunAsrOptions.model_validate({"vad": "fsmn-vad"})
    with pytest.raises(ValidationError):
        FunAsrOptions(max_segment_s=600)
    assert FunAsrOptions(language=" ZH ").language == "zh"
    with pytest.raises(ModelNotFoundError, match="SenseVoiceSmall"):
        resolve_model("sense-voice", tmp_path, True, MODELS, "model")
    with pytest.raises(ModelNotFoundError, match="offline"):
        resolve_model("SenseVoiceSmall", tmp_path, True, MODELS, "model")
    with pytest.raises(ModelNotFoundError, match="not a FunASR model directory"):
        resolve_model(str(tmp_path), tmp_path, True, MODELS, "model")


# ---------------------------------------------------------- tiny models

SENSEVOICE_TAGS = [
    *(f"<|{t}|>" for t in (*SENSEVOICE_LANGUAGES, "nospeech")),
    *(f"<|{t}|>" for t in ("HAPPY", "SAD", "ANGRY", "NEUTRAL", "EMO_UNKNOWN")),
    *(f"<|{t}|>" for t in ("Speech", "BGM", "Applause", "Laughter", "Event_UNK")),
    "<|withitn|>",
    "<|woitn|>",
]


def _cmvn(dim: int) -> str:
    """A Kaldi-nnet CMVN file (FunASR's am.mvn format) for ``dim`` features."""
    means = " ".join(["-8.0"] * dim)
    scales = " ".join(["0.25"] * dim)
    return (
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n<AddShift> {dim} {dim}\n"
        f"<LearnRateCoef> 0 [ {means} ]\n<Rescale> {dim} {dim}\n"
        f"<LearnRateCoef> 0 [ {scales} ]\n</Nnet>\n"
    )


def build_sensevoice(root: Path) -> Path:
    """SenseVoiceSmall's model directory with tiny dimensions and random weights."""
    import sentencepiece as spm
    import torch
    import yaml
    from funasr.register import tables

    root.mkdir(parents=True, exist_ok=True)
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(
            ["turn on the living room light", "hello world how are you", "开放时间早上"] * 30
        ),
        model_writer=trained,
        vocab_size=80,
        user_defined_symbols=SENSEVOICE_TAGS,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (root / "tiny.bpe.model").write_bytes(trained.getvalue())
    vocab = spm.SentencePieceProcessor(model_proto=trained.getvalue()).vocab_size()
    features = 80 * 7  # n_mels x lfr_m
    config: dict[str, Any] = {
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1},
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": {
            "output_size": 32,
            "attention_heads": 2,
            "linear_units": 64,
            "num_blocks": 2,
            "tp_blocks": 1,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": 11,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": 80,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": 7,
            "lfr_n": 6,
            "cmvn_file": None,
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "am.mvn").write_text(_cmvn(features))
    # The layout of the published repo: configuration.json names the files.
    metas = {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"bpemodel": "tiny.bpe.model"},
        "frontend_conf": {"cmvn_file": "am.mvn"},
    }
    (root / "configuration.json").write_text(
        json.dumps(
            {"framework": "pytorch", "task": "auto-speech-recognition", "file_path_metas": metas}
        )
    )
    torch.manual_seed(0)  # the same random weights every run
    model = tables.model_classes.get("SenseVoiceSmall")(
        encoder=config["encoder"],
        encoder_conf=config["encoder_conf"],
        input_size=features,
        vocab_size=vocab,
        **config["model_conf"],
    )
    torch.save(model.state_dict(), root / "model.pt")
    return root


def build_fsmn_vad(root: Path) -> Path:
    """An FSMN-VAD model directory (config.yaml layout) with tiny dimensions."""
    import torch
    import yaml
    from funasr.register import tables

    root.mkdir(parents=True, exist_ok=True)
    encoder_conf = {
        "input_dim": 400,
        "input_affine_dim": 16,
        "fsmn_layers": 2,
        "linear_dim": 16,
        "proj_dim": 8,
        "lorder": 4,
        "rorder": 0,
        "lstride": 1,
        "rstride": 0,
        "output_affine_dim": 16,
        "output_dim": 8,
    }
    model_conf = {
        "sample_rate": 16000,
        "detect_mode": 1,
        "max_end_silence_time": 800,
        "max_start_silence_time": 3000,
        "window_size_ms": 200,
        "sil_to_speech_time_thres": 150,
        "speech_to_sil_time_thres": 150,
        "max_single_segment_time": 60000,
        "speech_noise_thres": 0.6,
        "sil_pdf_ids": [0],
        "frame_in_ms": 10,
        "frame_length_ms": 25,
    }
    config = {
        "model": "FsmnVADStreaming",
        "model_conf": model_conf,
        "encoder": "FSMN",
        "encoder_conf": encoder_conf,
        "frontend": "WavFrontendOnline",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": 80,
            "frame_length": 25,
            "frame_shift": 10,
            "dither": 0.0,
            "lfr_m": 5,
            "lfr_n": 1,
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "am.mvn").write_text(_cmvn(400))
    torch.manual_seed(0)
    model = tables.model_classes.get("FsmnVADStreaming")(
        encoder="FSMN", encoder_conf=encoder_conf, **model_conf
    )
    torch.save(model.state_dict(), root / "model.pt")
    return root


def build_paraformer(root: Path) -> Path:
    """A Paraformer model directory (config.yaml, tokens.json, model.pt), tiny and random."""
    import torch
    import yaml
    from funasr.register import tables

    root.mkdir(parents=True, exist_ok=True)
    tokens = ["<blank>", "<s>", "</s>", *"开放时间早上点至下午", "hello", "world", "<unk>"]
    (root / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
    width = 32
    layers = {"attention_heads": 2, "linear_units": 64, "num_blocks": 2, "kernel_size": 11}
    dropout = {"dropout_rate": 0.1, "positional_dropout_rate": 0.1}
    parts: dict[str, Any] = {
        "encoder": "SANMEncoder",
        "encoder_conf": {
            **layers,
            **dropout,
            "output_size": width,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
        },
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            **layers,
            **dropout,
            "self_attention_dropout_rate": 0.1,
            "src_attention_dropout_rate": 0.1,
            "att_layer_num": 2,
            "sanm_shfit": 0,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {
            "idim": width,
            "threshold": 1.0,
            "l_order": 1,
            "r_order": 1,
            "tail_threshold": 0.45,
        },
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True},
    }
    model_conf = {"ctc_weight": 0.0, "predictor_weight": 1.0, "predictor_bias": 1}
    config = {
        "model": "Paraformer",
        "model_conf": model_conf,
        **parts,
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": 80,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": 7,
            "lfr_n": 6,
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    (root / "am.mvn").write_text(_cmvn(80 * 7))
    torch.manual_seed(0)
    model = tables.model_classes.get("Paraformer")(
        **parts, **model_conf, input_size=80 * 7, vocab_size=len(tokens)
    )
    torch.save(model.state_dict(), root / "model.pt")
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("funasr")
    return (
        build_sensevoice(root / "sensevoice"),
        build_fsmn_vad(root / "fsmn-vad"),
        build_paraformer(root / "paraformer"),
    )


MAX_SEGMENT_S = 1.0


def _settings(cache: Path, sensevoice: Path, vad: Path, paraformer: Path) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        offline=True,
        asr=[
            ModelConfig(name="sensevoice", engine="funasr", model=str(sensevoice)),
            # Xinference's offline VAD: vad_model is a local model directory.
            ModelConfig(
                name="sensevoice-vad",
                engine="funasr",
                model=str(sensevoice),
                options={
                    "vad_model": str(vad),
                    "max_segment_s": MAX_SEGMENT_S,
                    "merge_length_s": 0,
                    "vad_window_s": 5,
                    "language": "en",
                },
            ),
            ModelConfig(name="paraformer", engine="funasr", model=str(paraformer)),
        ],
        tts=[],
        wake=[],
        vad=[],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(host="127.0.0.1", port=0),
        mqtt=MqttConfig(enabled=False),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: tuple[Path, Path, Path]
) -> AsyncIterator[EngineHub]:
    settings = _settings(tmp_path_factory.mktemp("cache"), *model_dirs)
    async with EngineHub(settings) as loaded:
        yield loaded


def _check_transcript_segments(segments: Any, duration_s: float, longest_s: float) -> None:
    previous_end = 0.0
    for index, segment in enumerate(segments):
        assert segment.id == index
        assert previous_end <= segment.start_s < segment.end_s <= duration_s + 1e-6
        assert segment.end_s - segment.start_s <= longest_s + 1e-6
        previous_end = segment.end_s
        assert isinstance(segment.text, str) and "<|" not in segment.text
        assert segment.language is None or segment.language in SENSEVOICE_LANGUAGES
        assert segment.emotion is None or segment.emotion in EMOTIONS
        assert set(segment.events) <= EVENTS


@MODULE_LOOP
async def test_sensevoice_transcribes_through_the_hub(hub: EngineHub) -> None:
    engine = hub.get(EngineKind.ASR, "sensevoice").engine
    assert isinstance(engine, FunAsrEngine)
    caps = engine.capabilities
    assert caps.languages == SENSEVOICE_LANGUAGES and not caps.translate
    audio = await asyncio.to_thread(decode, LAMP_WAV, rate_hz=16000)
    transcript = await hub.transcribe(audio, model="sensevoice")
    assert transcript.duration_s == pytest.approx(audio.duration_s)
    assert transcript.language in SENSEVOICE_LANGUAGES
    assert isinstance(transcript.text, str) and "<|" not in transcript.text
    # Without a VAD, 30 s windows: this 3 s clip is one piece (random weights
    # decode some tokens from it: CTC's blank never wins every frame).
    assert len(transcript.segments) == 1
    _check_transcript_segments(transcript.segments, audio.duration_s, 30.0)
    assert transcript.emotion is None or transcript.emotion in EMOTIONS
    assert set(transcript.events) <= EVENTS


@MODULE_LOOP
async def test_the_vad_model_path_cuts_long_audio(hub: EngineHub) -> None:
    engine = hub.get(EngineKind.ASR, "sensevoice-vad").engine
    assert isinstance(engine, FunAsrEngine)
    vad = engine._vad
    assert vad is not None
    vad_model, _kwargs = vad
    inference = vad_model.inference
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inference(*args, **kwargs)

    vad_model.inference = counting
    try:
        clip = (await asyncio.to_thread(decode, LIGHT_EN_WAV, rate_hz=16000)).samples
        long_audio = Audio(np.concatenate([clip] * 5), 16000)  # 12 s
        spans = list(engine.spans(long_audio.samples))
        assert calls[0] == 3, "the VAD sees 5 s windows"
        for start, end in spans:
            assert 0 <= start < end <= len(long_audio.samples)
            assert end - start <= MAX_SEGMENT_S * 16000
        transcript = await hub.transcribe(long_audio, model="sensevoice-vad")
    finally:
        vad_model.inference = inference
    assert transcript.language == "en"  # the entry's configured language
    assert len(transcript.segments) >= 2, "12 s in pieces of at most 1 s"
    _check_transcript_segments(transcript.segments, long_audio.duration_s, MAX_SEGMENT_S)


@MODULE_LOOP
async def test_paraformer_transcribes_chinese_without_tags(hub: EngineHub) -> None:
    engine = hub.get(EngineKind.ASR, "paraformer").engine
    assert isinstance(engine, FunAsrEngine)
    assert engine.capabilities.languages == ("zh",)
    audio = await asyncio.to_thread(decode, LIGHT_EN_WAV, rate_hz=16000)
    transcript = await hub.transcribe(audio, model="paraformer")
    assert transcript.language == "zh" and isinstance(transcript.text, str)
    assert len(transcript.segments) == 1, "random CIF weights still fire some tokens"
    segment = transcript.segments[0]
    assert (segment.language, segment.emotion, segment.events) == (None, None, ())
    assert segment.end_s == pytest.approx(audio.duration_s)
    with pytest.raises(EngineRequestError, match="does not know language 'en'"):
        await hub.transcribe(audio, TranscribeOptions(language="en"), model="paraformer")


@MODULE_LOOP
async def test_request_errors(hub: EngineHub) -> None:
    audio = Audio(np.zeros(16000, np.float32), 16000)
    with pytest.raises(EngineRequestError, match="cannot translate"):
        await hub.transcribe(audio, TranscribeOptions(task="translate"), model="sensevoice")
    with pytest.raises(EngineRequestError, match="does not know language 'de'"):
        await hub.transcribe(audio, TranscribeOptions(language="de"), model="sensevoice")
    silence = await hub.transcribe(audio, TranscribeOptions(language="zh"), model="sensevoice")
    assert silence.language == "zh" and isinstance(silence.text, str)
    empty = await hub.transcribe(Audio(np.zeros(0, np.float32), 16000), model="sensevoice")
    assert empty.segments == () and empty.text == ""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[HttpServer]:
    async with HttpServer(hub.settings, hub) as running:
        yield running


@MODULE_LOOP
async def test_openai_client_verbose_json(server: HttpServer) -> None:
    def make() -> openai.AsyncOpenAI:
        made = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0
        )
        _ = made.audio.transcriptions
        return made

    oai = await asyncio.to_thread(make)
    result = await oai.audio.transcriptions.create(
        model="sensevoice-vad", file=LIGHT_EN_WAV, response_format="verbose_json"
    )
    assert isinstance(result.text, str) and "<|" not in result.text
    assert result.duration == pytest.approx(2.4, abs=0.05)
    body = result.model_dump()
    for segment in body.get("segments") or []:
        assert segment["end"] - segment["start"] <= MAX_SEGMENT_S + 1e-3
        assert "<|" not in segment["text"]
        assert segment.get("emotion") is None or segment["emotion"] in EMOTIONS
        assert set(segment.get("events") or []) <= EVENTS
    with pytest.raises(openai.BadRequestError):
        await oai.audio.translations.create(model="sensevoice", file=LIGHT_EN_WAV)
    text = await oai.audio.transcriptions.create(
        model="sensevoice", file=LAMP_WAV, response_format="text"
    )
    assert isinstance(text, str) and "<|" not in text


# --------------------------------------------------------------------- CLI


def test_engines_lists_funasr_and_pocket_tts() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgevoice", "engines"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    assert "asr" in lines["funasr"] and "installed" in lines["funasr"]
    assert "cpu,cuda" in lines["funasr"] and "edgevoice[funasr]" in lines["funasr"]
    assert "tts" in lines["pocket-tts"] and "installed" in lines["pocket-tts"]
    assert "edgevoice[pocket-tts]" in lines["pocket-tts"]
