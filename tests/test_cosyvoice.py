"""cosyvoice: zero-shot voice cloning on a CosyVoice 2 model with random weights.

No CosyVoice 2 weights install offline, so the test builds a model directory
the way FunAudioLLM lays one out: a ``cosyvoice2.yaml`` with the official
structure and tiny dimensions (plus the tokenizer, data-pipeline and seed
sections the engine must skip), ``llm.pt``/``flow.pt``/``hift.pt`` saved from
the modules that config builds (random weights), a Qwen2 ``CosyVoice-BlankEN``
with a byte-level BPE tokenizer trained here, and the two front-end models
FunAudioLLM ships only as ONNX graphs (CAM++ speaker encoder, S3 speech
tokenizer v2) stood in by tiny random graphs with the same inputs and
outputs. The LLM's end-of-speech outputs are pushed down, so each sentence
yields exactly ``ratio`` speech tokens per text token and every output length
is known exactly: 960 samples (2 mel frames of 480) per speech token.

The whole real path runs: model location, config filtering, load, the front
end (log-mels, fbank, ONNX), the prompt cache, the LLM in its helper thread,
CosyVoice 2's streaming flow + HiFT schedule, through the hub, the
OpenAI-compatible HTTP API (openai client: a stored voice, an inline sample
with instructions, the streamed response) and Wyoming (a stored voice by its
id). Random weights say nothing, so the tests check format, rate, exact
lengths and what the engine did, never words.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from edgevoice.audio import decode, encode, pcm_to_float
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.devices import DeviceError, MachineFacts, select_device
from edgevoice.engines.base import (
    EngineContext,
    EngineKind,
    EngineRequestError,
    SynthesizeOptions,
    VoiceReference,
)
from edgevoice.engines.cosyvoice import (
    END_OF_PROMPT,
    PLUGIN,
    QWEN_DIR,
    QWEN_SPECIAL_TOKENS,
    CosyVoiceEngine,
    CosyVoiceOptions,
    check_fp16,
    import_runtime,
    kaldi_fbank,
    locate_model,
    model_sections,
    onnx_providers,
    torch_device,
    whisper_log_mel,
)
from edgevoice.errors import BadAudioError, UnknownModelError
from edgevoice.hub import EngineHub
from edgevoice.model_files import ModelNotFoundError
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.wyoming import WyomingServer
from edgevoice.testing import check_tts_engine
from edgevoice.text import split_sentences
from edgevoice.voices import decode_reference
from tests.conftest import LAMP_TEXT, LAMP_WAV, LIGHT_EN_TEXT, LIGHT_EN_WAV, read_event

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
TIMEOUT_S = 300.0
RATE_HZ = 24000
SAMPLES_PER_TOKEN = 960
"""24 kHz audio per speech token: 2 mel frames of 480 samples."""
SPEECH_TOKENS = 64
"""The tiny model's speech-token vocabulary (CosyVoice 2: 6561)."""
RATIO = 6.0
"""Speech tokens per text token in the test entries (min = max: exact lengths)."""

_CORPUS = [
    "Turn on the living room lamp.",
    "Turn on the living room light.",
    "Hello there, this is a tiny test model speaking.",
    "Good morning! The lights are on. Have a nice day.",
    "Speak slowly and softly, like a bedtime story.",
    "The quick brown fox jumps over the lazy dog; numbers 0 1 2 3 4 5 6 7 8 9.",
]

TINY_CONFIG = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

# fixed params
sample_rate: 24000
llm_input_size: 32
llm_output_size: 32
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: {speech_tokens}
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512  # the encoder's lookahead and upsampling layers are 512 wide
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {speech_tokens}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: True
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [32]
            dropout: 0.0
            attention_head_dim: 16
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'
            static_chunk_size: !ref <token_frame_rate> * <token_mel_ratio>
            num_decoding_left_chunks: 2

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 16
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3]
    resblock_dilation_sizes: [[1]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1], [1], [1]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16

# processor functions (training only: they import openai-whisper, pyarrow, pyworld)
parquet_opener: !name:cosyvoice.dataset.processor.parquet_opener
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
data_pipeline: [
    !ref <parquet_opener>,
]
train_conf:
    optim: adam
    max_epoch: 200
""".replace("{speech_tokens}", str(SPEECH_TOKENS))


# ------------------------------------------------------------- the model


def _onnx_model(
    inputs: list[Any], outputs: list[Any], nodes: list[Any], weights: list[Any], path: Path
) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _front_end_models(root: Path, rng: np.random.Generator) -> None:
    """Random stand-ins for campplus.onnx and speech_tokenizer_v2.onnx (same I/O)."""
    from onnx import TensorProto, helper, numpy_helper

    # CAM++: fbank [1, frames, 80] -> embedding [1, 192].
    _onnx_model(
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, None, 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 192])],
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["output"]),
        ],
        [numpy_helper.from_array(rng.standard_normal((80, 192)).astype(np.float32), "w")],
        root / "campplus.onnx",
    )
    # S3 tokenizer v2: log-mels [1, 128, frames] (100/s) -> tokens [1, frames / 4] (25/s).
    _onnx_model(
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, None]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, None])],
        [
            helper.make_node("Transpose", ["feats"], ["frames"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["frames", "w"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["all"], axis=2, keepdims=0),
            helper.make_node("Slice", ["all", "start", "end", "axis", "step"], ["indices"]),
        ],
        [
            numpy_helper.from_array(
                rng.standard_normal((128, SPEECH_TOKENS)).astype(np.float32), "w"
            ),
            numpy_helper.from_array(np.array([0], np.int64), "start"),
            numpy_helper.from_array(np.array([2**62], np.int64), "end"),
            numpy_helper.from_array(np.array([1], np.int64), "axis"),
            numpy_helper.from_array(np.array([4], np.int64), "step"),
        ],
        root / "speech_tokenizer_v2.onnx",
    )


def build_tiny_model(root: Path) -> Path:
    """A CosyVoice 2 model directory with random weights and tiny dimensions."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        _CORPUS * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    qwen = root / QWEN_DIR
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(qwen)
    vocab = bpe.get_vocab_size() + len(QWEN_SPECIAL_TOKENS["additional_special_tokens"]) + 8
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
    )
    Qwen2ForCausalLM(config).save_pretrained(qwen)

    (root / "cosyvoice2.yaml").write_text(TINY_CONFIG, encoding="utf-8")
    runtime = import_runtime()
    built = runtime["load_hyperpyyaml"](
        model_sections(TINY_CONFIG), overrides={"qwen_pretrain_path": str(qwen)}
    )
    with torch.no_grad():
        # No end of speech and no fill tokens: every step yields a speech token.
        built["llm"].llm_decoder.bias[SPEECH_TOKENS:] = -1e4
    torch.save(built["llm"].state_dict(), root / "llm.pt")
    torch.save(built["flow"].state_dict(), root / "flow.pt")
    torch.save(
        {f"generator.{k}": v for k, v in built["hift"].state_dict().items()}, root / "hift.pt"
    )
    _front_end_models(root, rng)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("cosyvoice-tiny"))


def _entries(model: Path) -> list[ModelConfig]:
    exact = {"min_token_text_ratio": RATIO, "max_token_text_ratio": RATIO}
    return [
        ModelConfig(
            name="cosy",
            engine="cosyvoice",
            model=str(model),
            aliases=["cloner"],
            default=True,
            options={
                "voice": str(LAMP_WAV),
                "voice_text": LAMP_TEXT,
                "max_cached_voices": 3,
                **exact,
            },
        ),
        # Long generations (the cap is 20 tokens a text token), no default voice.
        ModelConfig(
            name="babbler",
            engine="cosyvoice",
            model=str(model),
            options={"min_token_text_ratio": 20.0, "max_token_text_ratio": 20.0},
        ),
    ]


def _settings(cache: Path, model: Path) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        offline=True,
        asr=[],
        tts=_entries(model),
        wake=[],
        vad=[],
        wyoming=WyomingConfig(uri="tcp://127.0.0.1:0", zeroconf=False),
        http=HttpConfig(host="127.0.0.1", port=0),
        mqtt=MqttConfig(enabled=False),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> AsyncIterator[EngineHub]:
    async with EngineHub(_settings(tmp_path_factory.mktemp("cache"), tiny_model)) as loaded:
        yield loaded


def _engine(hub: EngineHub, name: str = "cosy") -> CosyVoiceEngine:
    engine = hub.get(EngineKind.TTS, name).engine
    assert isinstance(engine, CosyVoiceEngine)
    return engine


def _reference(
    path: Path = LAMP_WAV, voice_id: str | None = None, text: str | None = LAMP_TEXT
) -> VoiceReference:
    audio = decode_reference(path.read_bytes())
    return VoiceReference(audio.samples, audio.rate_hz, text, voice_id=voice_id)


def expected_samples(engine: CosyVoiceEngine, text: str, ratio: float = RATIO) -> int:
    """The exact length of ``text`` spoken by the tiny model (any prompt, any voice)."""
    pieces = [p for p in split_sentences(text, 200) if p.strip()]
    return sum(int(len(engine.text_tokens(p)) * ratio) for p in pieces) * SAMPLES_PER_TOKEN


def _check_audio(samples: np.ndarray[Any, Any], expected: int) -> None:
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
    assert len(samples) == expected, (len(samples), expected)


class LlmCalls:
    """Records the LLM's calls (their prompts) and the speech tokens it yielded."""

    def __init__(self, engine: CosyVoiceEngine) -> None:
        self.llm = engine._model.llm
        self.inference = self.llm.inference
        self.calls: list[dict[str, Any]] = []
        self.tokens = 0

    def __enter__(self) -> LlmCalls:
        def recording(**kwargs: Any) -> Iterator[Any]:
            self.calls.append(kwargs)
            for token in self.inference(**kwargs):
                self.tokens += 1
                yield token

        self.llm.inference = recording
        return self

    def __exit__(self, *exc: object) -> None:
        self.llm.inference = self.inference


# ------------------------------------------------------------------ units


def test_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="min_reference_s"):
        CosyVoiceOptions(min_reference_s=10, max_reference_s=5)
    with pytest.raises(ValidationError, match="min_token_text_ratio"):
        CosyVoiceOptions(min_token_text_ratio=10, max_token_text_ratio=5)
    with pytest.raises(ValidationError):
        CosyVoiceOptions(max_reference_s=60)  # the speech tokenizer takes 30 s at most
    with pytest.raises(ValidationError):
        CosyVoiceOptions.model_validate({"instruct": "happy"})


def test_device_selection_without_a_gpu() -> None:
    assert PLUGIN.runtime == "torch" and PLUGIN.devices == ("cpu", "cuda")
    assert select_device("auto", PLUGIN.devices, MachineFacts(cuda_devices=1)).device == "cuda"
    assert select_device("auto", PLUGIN.devices, MachineFacts()).device == "cpu"
    assert select_device("cuda:1", PLUGIN.devices, MachineFacts(cuda_devices=2)).device == "cuda:1"
    with pytest.raises(DeviceError):
        select_device("cuda", PLUGIN.devices, MachineFacts())
    with pytest.raises(DeviceError):
        select_device("mlx", PLUGIN.devices, MachineFacts(apple_silicon=True, mlx_installed=True))
    assert [torch_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="cpu or cuda"):
        torch_device("mlx")
    assert check_fp16("cuda:0", True) and not check_fp16("cpu", False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_fp16("cpu", True)
    cuda_ep = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers("cuda:1", cuda_ep) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert onnx_providers("cuda:0", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert onnx_providers("cpu", cuda_ep) == ["CPUExecutionProvider"]
    assert "--no-deps" in PLUGIN.install_hint()


def test_config_keeps_the_model_and_skips_training_sections() -> None:
    kept = model_sections(TINY_CONFIG)
    for key in ("sample_rate:", "llm:", "flow:", "hift:", "feat_extractor:", "allowed_special:"):
        assert f"\n{key}" in f"\n{kept}"
    for key in ("__set_seed1", "parquet_opener", "get_tokenizer", "data_pipeline", "train_conf"):
        assert key not in kept
    with pytest.raises(ModelNotFoundError, match="hift"):
        model_sections(TINY_CONFIG.replace("\nhift:", "\nvocoder:"))


def test_front_end_features_have_the_models_shapes() -> None:
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    mel = whisper_log_mel(tone)
    assert mel.shape == (128, 100) and mel.dtype == np.float32
    assert float(mel.max()) - float(mel.min()) <= 2.0 + 1e-6  # floored 8 log10 below the peak
    fbank = kaldi_fbank(tone)
    assert fbank.shape == (1 + (16000 - 400) // 160, 80)
    assert kaldi_fbank(np.zeros(100, np.float32)).shape == (0, 80)


def test_model_location_errors(tiny_model: Path, tmp_path: Path) -> None:
    assert locate_model(str(tiny_model), tmp_path, offline=True) == tiny_model
    with pytest.raises(ModelNotFoundError, match="offline"):
        locate_model("FunAudioLLM/CosyVoice2-0.5B", tmp_path, offline=True)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        locate_model(str(tmp_path / "nowhere"), tmp_path, offline=True)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "cosyvoice2.yaml").write_text(TINY_CONFIG)
    with pytest.raises(ModelNotFoundError, match=r"missing llm\.pt, flow\.pt"):
        locate_model(str(partial), tmp_path, offline=True)


def test_a_bad_default_voice_or_device_fails_the_load(tiny_model: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    silent.write_bytes(encode(np.zeros(48000, np.float32), 24000, "wav"))
    for options, device, error, message in [
        ({"voice": str(silent)}, "cpu", ModelNotFoundError, "silent"),
        ({"voice": str(tmp_path / "nowhere.wav")}, "cpu", ModelNotFoundError, "does not exist"),
        ({"fp16": True}, "cpu", ValueError, "fp16 needs a CUDA device"),
    ]:
        entry = ModelConfig(name="c", engine="cosyvoice", model=str(tiny_model))
        context = EngineContext(model=entry, device=device, cache_dir=tmp_path, offline=True)
        engine = CosyVoiceEngine(context, CosyVoiceOptions.model_validate(options))
        with pytest.raises(error, match=message):
            engine.load()


# ---------------------------------------------------------------- the hub


@MODULE_LOOP
async def test_conformance_and_capabilities(hub: EngineHub) -> None:
    engine = _engine(hub)
    caps = engine.capabilities
    assert caps.cloning and caps.streaming and caps.instructions
    assert caps.sample_rate_hz == RATE_HZ and [v.name for v in caps.voices] == ["cosy"]
    assert engine.device == "cpu"
    await asyncio.to_thread(check_tts_engine, engine)


@MODULE_LOOP
async def test_two_torch_loads_leave_process_state_alone(hub: EngineHub) -> None:
    """The hub loaded two CosyVoice models (each a transformers ``from_pretrained``)
    at startup. transformers patches process-wide state while it builds a model; the
    hub's loads take turns, so nothing is left patched for the next model (a stuck
    ``tie_weights`` patch loaded Whisper's output layer on the meta device)."""
    import torch
    from transformers import PreTrainedModel

    assert _engine(hub, "babbler") is not _engine(hub)
    assert PreTrainedModel.tie_weights.__qualname__ == "PreTrainedModel.tie_weights"
    assert torch.get_default_dtype() == torch.float32
    assert torch.linspace.__module__ in {"torch", None}, torch.linspace


@MODULE_LOOP
async def test_hub_clones_and_streams_exact_lengths(hub: EngineHub) -> None:
    engine = _engine(hub)
    text = "Good morning. The lights are on."
    model, rate, chunks = await hub.synthesize(text, SynthesizeOptions(reference=_reference()))
    parts = [chunk async for chunk in chunks]
    assert model.name == "cosy" and rate == RATE_HZ
    # The longer sentence alone spans more than one 25-token hop: streamed in pieces.
    assert len(parts) >= 3, [len(p) for p in parts]
    _check_audio(np.concatenate(parts), expected_samples(engine, text))


@MODULE_LOOP
async def test_modes_follow_transcript_and_instructions(hub: EngineHub) -> None:
    engine = _engine(hub)
    end_of_prompt = engine.text_tokens(END_OF_PROMPT)
    with LlmCalls(engine) as llm:
        # Zero-shot: the transcript is the prompt text, the clip's tokens the speech prompt.
        await hub.synthesize_all("Hello there.", SynthesizeOptions(reference=_reference()))
        # Cross-lingual: no transcript, no LLM prompt at all.
        await hub.synthesize_all("Hello there.", SynthesizeOptions(reference=_reference(text=None)))
        # Instructions: CosyVoice 2's instruct mode.
        instructed = SynthesizeOptions(reference=_reference(), instructions="Speak slowly.")
        audio = await hub.synthesize_all("Hello there.", instructed)
    zero_shot, cross, instruct = llm.calls
    assert zero_shot["prompt_text"].tolist()[0] == engine.text_tokens(LAMP_TEXT)
    assert int(zero_shot["prompt_speech_token_len"][0]) > 0
    assert int(cross["prompt_text_len"][0]) == 0 and int(cross["prompt_speech_token_len"][0]) == 0
    prompt = instruct["prompt_text"].tolist()[0]
    assert prompt[-len(end_of_prompt) :] == end_of_prompt
    assert prompt == engine.text_tokens("Speak slowly." + END_OF_PROMPT)
    assert int(instruct["prompt_speech_token_len"][0]) == 0
    _check_audio(audio.samples, expected_samples(engine, "Hello there."))


@MODULE_LOOP
async def test_a_voice_is_encoded_once_and_the_cache_is_bounded(hub: EngineHub) -> None:
    engine = _engine(hub)
    stored = _reference(voice_id="voice_lamp")
    before = engine.reference_encodings
    async with hub.speak("One. Two. Three.", SynthesizeOptions(reference=stored)) as speech:
        sentences = {audio.sentence async for audio in speech}
    assert sentences == {0, 1, 2}
    assert engine.reference_encodings == before + 1
    await hub.synthesize_all("Again.", SynthesizeOptions(reference=stored))
    assert engine.reference_encodings == before + 1
    renamed = _reference(voice_id="voice_lamp-2")
    await hub.synthesize_all("Renamed.", SynthesizeOptions(reference=renamed))
    assert engine.reference_encodings == before + 2
    # max_cached_voices = 3: two more voices push the stored one out.
    for voice_id in ("voice_light", "voice_light-2"):
        other = _reference(LIGHT_EN_WAV, voice_id=voice_id, text=LIGHT_EN_TEXT)
        await hub.synthesize_all("Hi.", SynthesizeOptions(reference=other))
    assert engine.cached_voices() == 3
    count = engine.reference_encodings
    await hub.synthesize_all("Back.", SynthesizeOptions(reference=stored))
    assert engine.reference_encodings == count + 1


@MODULE_LOOP
async def test_bad_requests_are_client_errors(hub: EngineHub) -> None:
    cases: list[tuple[np.ndarray[Any, Any], int, type[Exception], str]] = [
        (np.zeros(0, np.float32), 24000, BadAudioError, "empty"),
        (np.zeros(48000, np.float32), 24000, BadAudioError, "silent"),
        (np.full(48000, np.nan, np.float32), 24000, BadAudioError, "non-finite"),
        (np.full(8000, 0.1, np.float32), 16000, EngineRequestError, r"0\.50 s long"),
        (np.full(8000 * 40, 0.1, np.float32), 8000, EngineRequestError, r"40\.00 s long"),
        (np.full(48000, 0.1, np.float32), 10, BadAudioError, "sample rate"),
        (np.ones((2, 24000), np.float32) * 0.1, 24000, BadAudioError, "mono"),
    ]
    for samples, rate, error, message in cases:
        options = SynthesizeOptions(reference=VoiceReference(samples, rate))
        with pytest.raises(error, match=message):
            await hub.synthesize("Hi.", options)
    requests: list[tuple[SynthesizeOptions, str]] = [
        (SynthesizeOptions(speed=4.0), "speed"),
        (SynthesizeOptions(speaker="alba"), "speakers"),
        (SynthesizeOptions(instructions="x" * 301), "instructions are 301 characters"),
        (SynthesizeOptions(voice="babbler"), "no default voice"),
    ]
    for options, message in requests:
        with pytest.raises(EngineRequestError, match=message):
            await hub.synthesize("Hi.", options)
    with pytest.raises(EngineRequestError, match="empty"):
        await hub.synthesize("   ", SynthesizeOptions())
    with pytest.raises(UnknownModelError):
        await asyncio.to_thread(_engine(hub).synthesize, "Hi.", SynthesizeOptions(voice="x"))
    audio = await hub.synthesize_all("Okay.")
    _check_audio(audio.samples, expected_samples(_engine(hub), "Okay."))


@MODULE_LOOP
async def test_concurrent_requests_keep_their_own_state(hub: EngineHub) -> None:
    """Two streams at once on one model: each gets its own vocoder cache and length."""
    engine = _engine(hub)
    texts = ["Good morning. The lights are on.", "Have a nice day."]
    stored = _reference(voice_id="voice_lamp")
    inline = _reference(LIGHT_EN_WAV, text=None)
    results = await asyncio.gather(
        hub.synthesize_all(texts[0], SynthesizeOptions(reference=stored)),
        hub.synthesize_all(texts[1], SynthesizeOptions(reference=inline)),
    )
    for text, audio in zip(texts, results, strict=True):
        _check_audio(audio.samples, expected_samples(engine, text))
    assert not engine._model.hift_cache_dict


def _llm_threads() -> int:
    return sum(t.name == "cosyvoice-llm" for t in threading.enumerate())


@MODULE_LOOP
async def test_a_stream_closed_early_stops_the_llm(hub: EngineHub) -> None:
    engine = _engine(hub, "babbler")
    text = " ".join(_CORPUS[2:5])
    cap = max(int(len(engine.text_tokens(p)) * 20) for p in split_sentences(text, 200))
    with LlmCalls(engine) as llm:
        options = SynthesizeOptions(voice="babbler", reference=_reference())
        _model, _rate, chunks = await hub.synthesize(text, options)
        first = await anext(chunks)
        assert 0 < len(first) < cap * SAMPLES_PER_TOKEN
        await chunks.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + TIMEOUT_S
        while _llm_threads() and time.monotonic() < deadline:  # noqa: ASYNC110 (threads)
            await asyncio.sleep(0.1)
        assert _llm_threads() == 0
        assert len(llm.calls) == 1 and llm.tokens < cap, (llm.tokens, cap)
    assert not engine._model.hift_cache_dict, "the closed stream's vocoder cache is gone"
    audio = await hub.synthesize_all("Still here.")
    assert len(audio.samples) > 0


# ----------------------------------------------------------------- HTTP


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(hub: EngineHub) -> AsyncIterator[tuple[HttpServer, openai.AsyncOpenAI]]:
    async with HttpServer(hub.settings, hub) as server:

        def make() -> openai.AsyncOpenAI:
            made = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0
            )
            _ = made.audio.speech, made.audio.voices, made.models
            return made

        yield server, await asyncio.to_thread(make)


@MODULE_LOOP
async def test_openai_client_speaks_with_a_stored_voice(
    http: tuple[HttpServer, openai.AsyncOpenAI], hub: EngineHub
) -> None:
    _server, oai = http
    engine = _engine(hub)
    created = await oai.audio.voices.create(
        name="Lamp voice", audio_sample=LAMP_WAV, consent="x", extra_body={"transcript": LAMP_TEXT}
    )
    try:
        before = engine.reference_encodings
        requests: list[tuple[str, Literal["wav", "flac"]]] = [
            ("First request. Two sentences.", "wav"),
            ("Second request.", "flac"),
        ]
        for text, fmt in requests:
            speech = await oai.audio.speech.create(
                model="cosy", voice={"id": created.id}, input=text, response_format=fmt
            )
            audio = await asyncio.to_thread(decode, speech.content)
            assert audio.rate_hz == RATE_HZ
            # The codecs carry 16-bit samples: the length is exact, the values rounded.
            assert len(audio.samples) == expected_samples(engine, text)
        assert engine.reference_encodings == before + 1, "a stored voice is encoded once"
        # The streamed response: raw 16-bit PCM as it is generated.
        text = "Good morning. Have a nice day."
        pcm = b""
        async with oai.audio.speech.with_streaming_response.create(
            model="cosy", voice={"id": created.id}, input=text, response_format="pcm"
        ) as streamed:
            async for block in streamed.iter_bytes():
                pcm += block
        assert len(pcm) == 2 * expected_samples(engine, text)
        assert engine.reference_encodings == before + 1
    finally:
        await oai.audio.voices.delete(created.id)


@MODULE_LOOP
async def test_openai_client_clones_a_sample_with_instructions(
    http: tuple[HttpServer, openai.AsyncOpenAI], hub: EngineHub
) -> None:
    _server, oai = http
    engine = _engine(hub)
    sample = base64.b64encode(LIGHT_EN_WAV.read_bytes()).decode()
    text = "Good morning."
    with LlmCalls(engine) as llm:
        response = await oai.audio.speech.create(
            model="cloner",
            voice="alloy",
            input=text,
            instructions="Speak slowly and softly.",
            response_format="wav",
            extra_body={"voice_sample": sample},
        )
    audio = await asyncio.to_thread(decode, response.content)
    assert audio.rate_hz == RATE_HZ and len(audio.samples) == expected_samples(engine, text)
    (call,) = llm.calls
    expected_prompt = engine.text_tokens("Speak slowly and softly." + END_OF_PROMPT)
    assert call["prompt_text"].tolist()[0] == expected_prompt
    short = encode(np.full(12000, 0.2, np.float32), 24000, "wav")
    with pytest.raises(openai.BadRequestError, match="1-30 s"):
        await oai.audio.speech.create(
            model="cosy",
            voice="alloy",
            input="Hi.",
            extra_body={"voice_sample": base64.b64encode(short).decode()},
        )


# -------------------------------------------------------------- Wyoming


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wyoming(hub: EngineHub) -> AsyncIterator[WyomingServer]:
    async with WyomingServer(hub.settings, hub) as running:
        yield running


@MODULE_LOOP
async def test_wyoming_speaks_a_stored_voice(wyoming: WyomingServer, hub: EngineHub) -> None:
    engine = _engine(hub)
    add: Callable[[], Any] = lambda: hub.library.add(  # noqa: E731
        "Light voice", LIGHT_EN_WAV.read_bytes(), LIGHT_EN_TEXT
    )
    stored = await asyncio.to_thread(add)
    port = int(wyoming.addresses[0].rsplit(":", 1)[1])
    text = "Turn on the lamp. Thank you."
    before = engine.reference_encodings
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        while (event := await read_event(client, TIMEOUT_S)).type != "info":
            pass
        voices = {v.name for program in Info.from_event(event).tts for v in program.voices}
        assert {"cosy", stored.id} <= voices
        for _ in range(2):
            await client.write_event(
                Synthesize(text=text, voice=SynthesizeVoice(name=stored.id)).event()
            )
            start = AudioStart.from_event(await read_event(client, TIMEOUT_S))
            pcm = b""
            chunks = 0
            while (event := await read_event(client, TIMEOUT_S)).type != "audio-stop":
                pcm += AudioChunk.from_event(event).audio
                chunks += 1
            assert (start.rate, start.width, start.channels) == (RATE_HZ, 2, 1)
            assert chunks >= 2
            assert len(pcm_to_float(pcm, 2)) == expected_samples(engine, text)
    assert engine.reference_encodings == before + 1, "the stored voice is encoded once"


def test_edgevoice_engines_lists_cosyvoice() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgevoice", "engines"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    row = lines["cosyvoice"]
    assert "tts" in row and "installed" in row and "cpu,cuda" in row
    assert "edgevoice[cosyvoice]" in row and "--no-deps" in row


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_cpu(tiny_model: Path, hf_tiny_en: Path) -> None:
    """scripts/cuda_check.py is what runs the torch engines on a GPU (CI has none):
    run here on CPU so it keeps working; its checks must pass and say so."""
    import json

    script = Path(__file__).resolve().parents[1] / "scripts" / "cuda_check.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--device=cpu",
            "--want=cpu",
            "--repeat=1",
            f"--whisper={hf_tiny_en}",
            f"--cosyvoice={tiny_model}",
            f"--wav={LIGHT_EN_WAV}",
            f"--expect={LIGHT_EN_TEXT}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["check"], r["ok"], r["device"]) for r in reports] == [
        ("transformers-whisper", True, "cpu"),
        ("cosyvoice", True, "cpu"),
    ]
    assert reports[0]["largest_batch"] >= 2
    assert reports[1]["chunks"] >= 1 and not reports[1]["fp16"]
