"""Zero-shot voice cloning with CosyVoice 2 (FunAudioLLM) on torch, CUDA or CPU.

Extra: ``edgevoice[cosyvoice]`` and the runtime itself, installed without its
dependencies: ``pip install --no-deps cosyvoice2-eu==0.2.8`` (it ships
CosyVoice 2's ``cosyvoice`` and ``matcha`` packages; its declared
requirements pin torchaudio, openai-whisper, deepspeed and onnxruntime-gpu,
none of which inference needs, so the extra lists what it really imports).

``model`` is a CosyVoice 2 model directory as FunAudioLLM publishes it
(``cosyvoice2.yaml``, ``llm.pt``, ``flow.pt``, ``hift.pt``, ``campplus.onnx``,
``speech_tokenizer_v2.onnx``, ``CosyVoice-BlankEN/``), a local path or a
Hugging Face repository id (``FunAudioLLM/CosyVoice2-0.5B``, fetched into
``cache_dir``; from the cache only with ``offline = true``). The model is
built from the directory's own ``cosyvoice2.yaml`` (its ``llm``, ``flow``,
``hift`` and ``feat_extractor`` sections; the data pipeline and training
sections name training-only packages and are skipped).

The front end is this module's: the reference clip's speech tokens (the S3
tokenizer ONNX model on Whisper-style 128-bin log-mels), its speaker
embedding (the CAM++ ONNX model on Kaldi fbank from kaldi-native-fbank) and
its 24 kHz mel prompt, kept per stored voice in a bounded LRU (keyed by the
voice id and a hash of the samples), so a stored voice is encoded once.
torchaudio is not needed: while the runtime is imported, a stand-in module
satisfies the one unused ``import torchaudio`` of its file utilities (only
when torchaudio is not installed; the stand-in is removed right after and
raises if anything ever uses it).

Modes, as CosyVoice 2 defines them: with a transcript of the reference,
zero-shot (the LLM continues the reference's speech tokens); without one,
cross-lingual (the speaker comes from the flow prompt alone); with
``instructions`` (``"用开心的语气说"``, ``"Speak slowly and softly"``),
CosyVoice 2's instruct mode (``instructions<|endofprompt|>`` as the LLM's
prompt text). Audio streams as generated: the LLM runs in a helper thread and
every 25 speech tokens (1 s) the flow and HiFT vocoder turn the new tokens
into audio; a closed stream stops the LLM at its next token. ``speed`` other
than 1 stretches each sentence's mel (CosyVoice's own speed control) and
yields it whole. Each sentence's speech tokens are capped at
``max_token_text_ratio`` times its text tokens, so work is bounded per request.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
import re
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydantic import Field, model_validator

from edgevoice.audio import decode, resample
from edgevoice.engines.base import (
    EngineContext,
    EngineKind,
    EngineOptions,
    EnginePlugin,
    EngineRequestError,
    FloatAudio,
    SynthesizeOptions,
    TtsCapabilities,
    VoiceInfo,
    VoiceReference,
)
from edgevoice.engines.cloning_common import ReferenceCache, check_reference
from edgevoice.engines.torch_common import avoid_cudnn_attention
from edgevoice.errors import ClientError, UnknownModelError
from edgevoice.model_files import ModelNotFoundError, as_local_path
from edgevoice.text import split_sentences

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME: Final = "cosyvoice"
RUNTIME_HINT: Final = (
    "pip install 'edgevoice[cosyvoice]' && pip install --no-deps 'cosyvoice2-eu==0.2.8'"
)
MIN_SPEED: Final = 0.5
MAX_SPEED: Final = 2.0
TOKENIZER_RATE_HZ: Final = 16000
"""The speech tokenizer's and speaker encoder's input rate."""
MODEL_FILES: Final = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt")
FRONTEND_FILES: Final = ("campplus.onnx", "speech_tokenizer_v2.onnx")
QWEN_DIR: Final = "CosyVoice-BlankEN"
END_OF_PROMPT: Final = "<|endofprompt|>"
QWEN_SPECIAL_TOKENS: Final = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
        "[breath]", "<strong>", "</strong>", "[noise]",
        "[laughter]", "[cough]", "[clucking]", "[accent]",
        "[quick_breath]", "<laughter>", "</laughter>",
        "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
    ],
}  # fmt: skip
"""The tokens CosyVoice 2 adds to its Qwen tokenizer, in its order (their ids follow it)."""
MODEL_SECTIONS: Final = frozenset({"llm", "flow", "hift", "feat_extractor"})
"""Sections of ``cosyvoice2.yaml`` that build the inference model."""

_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CosyVoiceOptions(EngineOptions):
    voice: str | None = None
    """Default voice: a reference audio file cloned when a request brings none.
    ``None``: every request must bring a reference (a voice sample or a stored voice)."""
    voice_text: str | None = Field(default=None, max_length=500)
    """Transcript of ``voice`` (zero-shot mode; without it, cross-lingual)."""
    languages: list[str] = Field(
        default_factory=lambda: ["zh", "en", "ja", "ko", "yue"], min_length=1, max_length=32
    )
    """ISO codes the voices are listed with (CosyVoice 2 speaks these)."""
    fp16: bool = False
    """Half-precision flow and LLM (CUDA only)."""
    min_reference_s: float = Field(default=1.0, ge=0.2, le=29.0)
    """Shortest reference clip accepted for cloning."""
    max_reference_s: float = Field(default=30.0, ge=1.0, le=30.0)
    """Longest reference clip accepted (the speech tokenizer takes 30 s at most)."""
    max_cached_voices: int = Field(default=16, ge=1, le=1024)
    """Encoded references kept (least recently used dropped first)."""
    max_piece_chars: int = Field(default=200, ge=20, le=1000)
    """Longest text generated in one piece; longer sentences are cut."""
    max_instruction_chars: int = Field(default=300, ge=1, le=2000)
    """Longest ``instructions`` accepted."""
    max_token_text_ratio: float = Field(default=20.0, gt=0.0, le=50.0)
    """Most speech tokens (25 a second) per text token of a piece: the generation cap."""
    min_token_text_ratio: float = Field(default=2.0, ge=0.0, le=50.0)
    """Fewest speech tokens per text token (end of speech is ignored before)."""

    @model_validator(mode="after")
    def _ranges(self) -> CosyVoiceOptions:
        if self.min_reference_s >= self.max_reference_s:
            raise ValueError("min_reference_s must be below max_reference_s")
        if self.min_token_text_ratio > self.max_token_text_ratio:
            raise ValueError("min_token_text_ratio must not exceed max_token_text_ratio")
        return self


# ------------------------------------------------------------ pure helpers


def torch_device(device: str) -> str:
    """The torch device for the hub's resolved ``device`` (``cpu``, ``cuda``, ``cuda:N``)."""
    family, _, index = device.partition(":")
    if family == "cpu":
        return "cpu"
    if family == "cuda":
        return f"cuda:{int(index or 0)}"
    raise ValueError(f"cosyvoice runs on cpu or cuda, not {device!r}")


def check_fp16(device: str, fp16: bool) -> bool:
    """Whether to run half precision on ``device``; fp16 on CPU is a config error."""
    if fp16 and not device.startswith("cuda"):
        raise ValueError("fp16 needs a CUDA device; set fp16 = false on cpu")
    return fp16


def onnx_providers(device: str, available: list[str]) -> list[Any]:
    """onnxruntime providers for the front-end models on ``device``.

    CUDA when the engine runs there and onnxruntime has the CUDA provider
    (``onnxruntime-gpu``); CPU otherwise (the front end is small).
    """
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def model_sections(config: str) -> str:
    """The part of a ``cosyvoice2.yaml`` that builds the inference model.

    Keeps the top-level plain scalars (``sample_rate``, ``llm_input_size``,
    ...) and the ``llm``, ``flow``, ``hift`` and ``feat_extractor``
    sections; drops the seed setters, the tokenizer and data pipeline and the
    training sections, whose tags import training-only packages.
    """
    blocks: list[tuple[str, str, list[str]]] = []
    for line in config.splitlines():
        if match := _TOP_KEY.match(line):
            blocks.append((match.group(1), match.group(2).strip(), [line]))
        elif blocks:
            blocks[-1][2].append(line)
    kept = []
    for key, raw_value, lines in blocks:
        value = raw_value.split(" #", 1)[0].strip()
        body = [rest for rest in lines[1:] if rest.strip() and not rest.lstrip().startswith("#")]
        plain = bool(value) and not value.startswith(("!", "[", "{", "&", "*", "|", ">"))
        if key in MODEL_SECTIONS or (plain and not body and not key.startswith("_")):
            kept.append("\n".join(lines))
    missing = MODEL_SECTIONS - {key for key, _, _ in blocks}
    if missing:
        raise ModelNotFoundError(
            f"not a CosyVoice 2 config: no {', '.join(sorted(missing))} section"
        )
    return "\n".join(kept) + "\n"


def whisper_log_mel(audio_16k: FloatAudio, n_mels: int = 128) -> FloatAudio:
    """Whisper's log-mel spectrogram ``[n_mels, frames]`` of 16 kHz audio (the S3
    tokenizer's input): 25 ms Hann frames every 10 ms, Slaney mel filters,
    log10 floored 8 below the peak, scaled as Whisper does. Blocking."""
    import torch
    from librosa.filters import mel as mel_filters

    samples = torch.from_numpy(np.ascontiguousarray(audio_16k, dtype=np.float32))
    window = torch.hann_window(400)
    stft = torch.stft(samples, 400, 160, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filters(sr=16000, n_fft=400, n_mels=n_mels))
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    result: FloatAudio = ((log_spec + 4.0) / 4.0).numpy().astype(np.float32)
    return result


def kaldi_fbank(audio_16k: FloatAudio, bins: int = 80) -> FloatAudio:
    """Kaldi fbank ``[frames, bins]`` of 16 kHz audio without dither (the CAM++
    speaker encoder's input, as ``torchaudio.compliance.kaldi.fbank`` computes it)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = TOKENIZER_RATE_HZ
    opts.mel_opts.num_bins = bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(TOKENIZER_RATE_HZ, np.asarray(audio_16k, np.float32).tolist())
    fbank.input_finished()
    if fbank.num_frames_ready == 0:
        return np.zeros((0, bins), np.float32)
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)


# ---------------------------------------------------------------- runtime


def _no_torchaudio(name: str) -> Any:
    raise AttributeError(
        f"torchaudio.{name}: torchaudio is not installed and edgevoice's cosyvoice engine "
        "does not use it"
    )


def import_runtime() -> dict[str, Any]:
    """Import CosyVoice 2's runtime modules (blocking; seconds).

    Its file utilities ``import torchaudio`` for a loader this engine never
    calls; without torchaudio a stand-in module is in ``sys.modules`` only for
    the duration of the import. transformers and lightning are imported
    first so their own torchaudio probes see the truth.
    """
    import lightning  # noqa: F401
    import transformers  # noqa: F401

    stand_in: types.ModuleType | None = None
    if "torchaudio" not in sys.modules and importlib.util.find_spec("torchaudio") is None:
        stand_in = types.ModuleType("torchaudio")
        stand_in.__getattr__ = _no_torchaudio  # type: ignore[method-assign]
        sys.modules["torchaudio"] = stand_in
    try:
        import cosyvoice.cli.model as cli_model
        import matcha.utils.audio  # noqa: F401
        from hyperpyyaml import load_hyperpyyaml
    finally:
        if stand_in is not None and sys.modules.get("torchaudio") is stand_in:
            del sys.modules["torchaudio"]
    return {"CosyVoice2Model": cli_model.CosyVoice2Model, "load_hyperpyyaml": load_hyperpyyaml}


def locate_model(model: str, cache_dir: Path, offline: bool) -> Path:
    """The local CosyVoice 2 model directory for ``model`` (blocking; may download)."""
    local = as_local_path(model)
    if local is None and _REPO_ID.match(model):
        import huggingface_hub

        hf_cache = cache_dir / "huggingface"
        try:
            local = Path(
                huggingface_hub.snapshot_download(model, cache_dir=hf_cache, local_files_only=True)
            )
        except Exception:  # not cached (huggingface_hub raises several types)
            if offline:
                raise ModelNotFoundError(
                    f"{model} is not in the cache and offline = true; download it once with "
                    "offline = false, or name a local CosyVoice 2 directory"
                ) from None
            _LOGGER.info("Downloading %s", model)
            try:
                local = Path(huggingface_hub.snapshot_download(model, cache_dir=hf_cache))
            except Exception as exc:
                raise ModelNotFoundError(f"could not download {model}: {exc}") from exc
    if local is None or not local.is_dir():
        raise ModelNotFoundError(
            f"{model!r} is not a CosyVoice 2 model directory or a Hugging Face repository id"
        )
    missing = [
        name for name in (*MODEL_FILES, *FRONTEND_FILES, QWEN_DIR) if not (local / name).exists()
    ]
    if missing:
        raise ModelNotFoundError(
            f"{local} is not a CosyVoice 2 model: missing {', '.join(missing)}"
        )
    return local


@dataclass(frozen=True, slots=True)
class PromptState:
    """A reference clip encoded for CosyVoice 2 (tensors on the engine's device)."""

    speech_tokens: Any
    """``[1, n]`` int32 speech tokens (25 a second)."""
    speech_feat: Any
    """``[1, 2n, 80]`` mel frames of the clip at the model's rate."""
    embedding: Any
    """``[1, 192]`` speaker embedding."""
    duration_s: float


def _enough(tokens: list[int], finished: threading.Event, needed: int) -> bool:
    return finished.is_set() or len(tokens) >= needed


@dataclass(frozen=True, slots=True)
class _Piece:
    """One piece of text to speak with one prompt."""

    ids: list[int]
    """Text tokens of the piece."""
    prompt_ids: list[int]
    """Text tokens of the LLM's prompt (transcript, or instructions); may be empty."""
    prompt: PromptState
    llm_prompt: bool
    """The LLM continues the reference's speech tokens (zero-shot mode)."""
    request_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    """Key of this piece's vocoder cache in the CosyVoice model."""


# ----------------------------------------------------------------- engine


class CosyVoiceEngine:
    """One CosyVoice 2 model; clones any reference voice, one prompt per voice cached.

    Thread-safe: the modules' weights are only read, every request keeps its
    state in its own generator (and its own entry of the vocoder cache, keyed
    by a fresh id), the prompt cache has its own lock. Every method is
    blocking and runs in the hub's worker threads; each streamed piece runs
    the LLM in one helper thread, which stops when the stream is closed.
    """

    def __init__(self, context: EngineContext, options: CosyVoiceOptions) -> None:
        self._context = context
        self._options = options
        self._model: Any = None
        self._tokenizer: Any = None
        self._feat_extractor: Any = None
        self._campplus: Any = None
        self._speech_tokenizer: Any = None
        self._device: Any = None
        self._fp16 = False
        self._rate_hz = 24000
        self._default: tuple[PromptState, str | None] | None = None
        self._voices: ReferenceCache[PromptState] = ReferenceCache(options.max_cached_voices)
        self._lock = threading.Lock()
        self.reference_encodings = 0
        """References encoded so far (cache misses); for tests and metrics."""
        self._capabilities = self._make_capabilities()

    def _make_capabilities(self) -> TtsCapabilities:
        return TtsCapabilities(
            voices=(
                VoiceInfo(
                    self._context.model.name,
                    tuple(self._options.languages),
                    description="CosyVoice 2: zero-shot voice cloning, style instructions",
                ),
            ),
            sample_rate_hz=self._rate_hz,
            streaming=True,
            cloning=True,
            instructions=True,
        )

    @property
    def capabilities(self) -> TtsCapabilities:
        return self._capabilities

    @property
    def device(self) -> str:
        """The torch device the model runs on (``cpu``, ``cuda:N``)."""
        return torch_device(self._context.device)

    def load(self) -> None:
        import onnxruntime
        import torch

        started = time.monotonic()
        device = torch_device(self._context.device)
        fp16 = check_fp16(device, self._options.fp16)
        avoid_cudnn_attention(device, fp16, "CosyVoice 2")
        root = locate_model(
            self._context.model.model, self._context.cache_dir, self._context.offline
        )
        runtime = import_runtime()
        try:
            config_text = model_sections((root / "cosyvoice2.yaml").read_text(encoding="utf-8"))
            configs = runtime["load_hyperpyyaml"](
                config_text, overrides={"qwen_pretrain_path": str(root / QWEN_DIR)}
            )
        except ModelNotFoundError:
            raise
        except Exception as exc:
            raise ModelNotFoundError(f"cannot build CosyVoice 2 from {root}: {exc}") from exc
        llm, flow, hift = configs["llm"], configs["flow"], configs["hift"]
        try:
            llm.load_state_dict(self._weights(root / "llm.pt"), strict=True)
            flow.load_state_dict(self._weights(root / "flow.pt"), strict=True)
            # A HiFi-GAN checkpoint names the generator's weights generator.*
            hift_weights = {
                k.replace("generator.", ""): v for k, v in self._weights(root / "hift.pt").items()
            }
            hift.load_state_dict(hift_weights, strict=True)
        except (RuntimeError, OSError, ValueError) as exc:
            raise ModelNotFoundError(f"CosyVoice 2 weights in {root} do not fit: {exc}") from exc
        torch_dev = torch.device(device)
        for module in (llm, flow, hift):
            module.to(torch_dev).eval()
        model = runtime["CosyVoice2Model"](llm, flow, hift, fp16)
        model.device = torch_dev  # it picks cuda whenever one exists; the config decides here

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root / QWEN_DIR))
        tokenizer.add_special_tokens(QWEN_SPECIAL_TOKENS)
        session_options = onnxruntime.SessionOptions()
        session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = 1
        providers = onnx_providers(device, onnxruntime.get_available_providers())
        if device.startswith("cuda") and providers == ["CPUExecutionProvider"]:
            _LOGGER.info("onnxruntime has no CUDA provider; the CosyVoice front end runs on CPU")
        try:
            campplus = onnxruntime.InferenceSession(
                str(root / "campplus.onnx"), session_options, providers=["CPUExecutionProvider"]
            )
            speech_tokenizer = onnxruntime.InferenceSession(
                str(root / "speech_tokenizer_v2.onnx"), session_options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelNotFoundError(f"CosyVoice 2 front-end models in {root}: {exc}") from exc

        self._model, self._tokenizer = model, tokenizer
        self._feat_extractor = configs["feat_extractor"]
        self._campplus, self._speech_tokenizer = campplus, speech_tokenizer
        self._device, self._fp16 = torch_dev, fp16
        self._rate_hz = int(configs.get("sample_rate", 24000))
        self._capabilities = self._make_capabilities()
        self._default = self._load_default_voice()
        _LOGGER.info(
            "CosyVoice 2 %s loaded on %s%s in %.2f s",
            self._context.model.model,
            device,
            " (fp16)" if fp16 else "",
            time.monotonic() - started,
        )

    def _weights(self, path: Path) -> dict[str, Any]:
        import torch

        weights: dict[str, Any] = torch.load(
            path, map_location=self._device or "cpu", weights_only=True
        )
        return weights

    def _load_default_voice(self) -> tuple[PromptState, str | None] | None:
        voice = self._options.voice
        if voice is None:
            return None
        path = as_local_path(voice)
        if path is None or not path.is_file():
            raise ModelNotFoundError(f"default voice {voice!r} is not an audio file")
        try:
            audio = decode(path, max_duration_s=self._options.max_reference_s + 1.0)
            samples = self._checked_reference(VoiceReference(audio.samples, audio.rate_hz))
        except ClientError as exc:
            raise ModelNotFoundError(f"default voice {path}: {exc}") from None
        return self._encode(samples, audio.rate_hz), self._options.voice_text

    # ------------------------------------------------------------ voices

    def _checked_reference(self, reference: VoiceReference) -> FloatAudio:
        """The reference's samples, or a client error saying why they cannot clone."""
        options = self._options
        return check_reference(
            reference, ENGINE_NAME, options.min_reference_s, options.max_reference_s
        )

    def _encode(self, samples: FloatAudio, rate_hz: int) -> PromptState:
        """Speech tokens, mel prompt and speaker embedding of a clip (blocking, the
        expensive part of a new voice)."""
        import torch

        started = time.monotonic()
        audio_16k = resample(samples, rate_hz, TOKENIZER_RATE_HZ)
        audio_model = resample(samples, rate_hz, self._rate_hz)
        feats = whisper_log_mel(audio_16k)
        inputs = self._speech_tokenizer.get_inputs()
        tokens = self._speech_tokenizer.run(
            None,
            {
                inputs[0].name: feats[None, :, :],
                inputs[1].name: np.array([feats.shape[1]], dtype=np.int32),
            },
        )[0]
        tokens = np.asarray(tokens).astype(np.int64).ravel()
        fbank = kaldi_fbank(audio_16k)
        fbank = fbank - fbank.mean(axis=0, keepdims=True)
        embedding = np.asarray(
            self._campplus.run(None, {self._campplus.get_inputs()[0].name: fbank[None, :, :]})[0],
            dtype=np.float32,
        ).ravel()
        with torch.inference_mode():
            mel = self._feat_extractor(torch.from_numpy(np.ascontiguousarray(audio_model))[None, :])
        feat = mel.squeeze(0).transpose(0, 1)
        # CosyVoice 2 needs exactly two mel frames per speech token.
        count = min(int(feat.shape[0]) // 2, len(tokens))
        if count == 0:
            raise EngineRequestError("reference audio is too short to clone", param="voice_sample")
        state = PromptState(
            speech_tokens=torch.tensor(tokens[:count], dtype=torch.int32)[None, :].to(self._device),
            speech_feat=feat[: 2 * count][None, :, :].to(self._device),
            embedding=torch.from_numpy(embedding)[None, :].to(self._device),
            duration_s=len(samples) / rate_hz,
        )
        with self._lock:
            self.reference_encodings += 1
        _LOGGER.debug(
            "Encoded a %.1f s reference into %d speech tokens in %.2f s",
            state.duration_s,
            count,
            time.monotonic() - started,
        )
        return state

    def _reference_state(self, reference: VoiceReference) -> PromptState:
        """The cached prompt of ``reference``, encoding it on a miss (blocking)."""
        samples = self._checked_reference(reference)
        return self._voices.get_or_encode(reference, samples, self._encode)

    def cached_voices(self) -> int:
        """Encoded references held now."""
        return len(self._voices)

    def text_tokens(self, text: str) -> list[int]:
        """CosyVoice 2's text tokens for ``text`` (its Qwen tokenizer)."""
        ids: list[int] = self._tokenizer([text])["input_ids"][0]
        return [int(i) for i in ids]

    # -------------------------------------------------------- synthesis

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        """Yield float32 audio at the model's rate (24 kHz) as it is generated.

        Blocking: runs in the hub's worker thread. Request errors (text,
        voice, speed, instructions, a reference that cannot clone) raise
        before the first chunk; the reference is encoded (or found in the
        cache) here too.
        """
        if self._model is None:
            raise RuntimeError("engine not loaded")
        if not text.strip():
            raise EngineRequestError("text is empty", param="input")
        if not math.isfinite(options.speed) or not MIN_SPEED <= options.speed <= MAX_SPEED:
            raise EngineRequestError(
                f"speed {options.speed:g} is out of range for cosyvoice "
                f"({MIN_SPEED:g}-{MAX_SPEED:g})",
                param="speed",
            )
        name = self._context.model.name
        if options.voice not in (None, name):
            raise UnknownModelError("tts", options.voice, [name], param="voice")
        if options.speaker:
            raise EngineRequestError(
                "cosyvoice voices have no speakers; clone a voice with a voice sample or a "
                "stored voice instead",
                param="speaker",
            )
        instructions = (options.instructions or "").strip() or None
        if instructions is None and options.reference is not None:
            instructions = (options.reference.instruct_text or "").strip() or None
        if instructions is not None and len(instructions) > self._options.max_instruction_chars:
            raise EngineRequestError(
                f"instructions are {len(instructions)} characters; cosyvoice takes at most "
                f"{self._options.max_instruction_chars}",
                param="instructions",
            )
        pieces = [p for p in split_sentences(text, self._options.max_piece_chars) if p.strip()]
        if not pieces:
            raise EngineRequestError("text produced no speech", param="input")
        if options.reference is not None:
            prompt = self._reference_state(options.reference)
            transcript = options.reference.text
        elif self._default is not None:
            prompt, transcript = self._default
        else:
            raise EngineRequestError(
                f"model {name!r} has no default voice: send a voice sample or a stored voice",
                param="voice",
            )
        if instructions is not None:
            prompt_text = f"{instructions}{END_OF_PROMPT}"
            llm_prompt = False
        elif transcript and transcript.strip():
            prompt_text, llm_prompt = transcript.strip(), True
        else:  # cross-lingual: the speaker comes from the flow prompt alone
            prompt_text, llm_prompt = "", False
        return self._generate(pieces, prompt, prompt_text, llm_prompt, options.speed)

    def _generate(
        self,
        pieces: list[str],
        prompt: PromptState,
        prompt_text: str,
        llm_prompt: bool,
        speed: float,
    ) -> Iterator[FloatAudio]:
        produced = False
        prompt_ids = self.text_tokens(prompt_text) if prompt_text else []
        for piece in pieces:
            ids = self.text_tokens(piece)
            if not ids:
                continue
            request = _Piece(ids, prompt_ids, prompt, llm_prompt)
            for chunk in self._piece(request, speed):
                if len(chunk):
                    produced = True
                    yield chunk
        if not produced:
            raise EngineRequestError("text produced no speech", param="input")

    def _llm_tokens(self, piece: _Piece, stop: threading.Event) -> Iterator[int]:
        """The LLM's speech tokens for one piece (blocking generator; ends when ``stop`` is set)."""
        import torch

        device = self._device

        def ids(values: Any) -> Any:
            return torch.tensor(values, dtype=torch.int32, device=device).reshape(1, -1)

        def length(tensor: Any) -> Any:
            return torch.tensor([tensor.shape[1]], dtype=torch.int32, device=device)

        text, prompt_text = ids(piece.ids), ids(piece.prompt_ids)
        speech = piece.prompt.speech_tokens if piece.llm_prompt else ids([])
        with torch.inference_mode(), self._autocast():
            tokens = self._model.llm.inference(
                text=text,
                text_len=length(text),
                prompt_text=prompt_text,
                prompt_text_len=length(prompt_text),
                prompt_speech_token=speech,
                prompt_speech_token_len=length(speech),
                embedding=torch.zeros(0, piece.prompt.embedding.shape[1], device=device),
                max_token_text_ratio=self._options.max_token_text_ratio,
                min_token_text_ratio=self._options.min_token_text_ratio,
            )
            try:
                for token in tokens:
                    if stop.is_set():
                        break
                    yield int(token)
            finally:
                tokens.close()

    def _autocast(self) -> Any:
        import torch

        if self._fp16:
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    def _to_audio(
        self, tokens: list[int], piece: _Piece, *, offset: int, finalize: bool, speed: float = 1.0
    ) -> FloatAudio:
        """Flow + vocoder: the audio of ``tokens`` from ``offset`` on (blocking)."""
        import torch

        with torch.inference_mode():
            speech = self._model.token2wav(
                token=torch.tensor([tokens], dtype=torch.int32, device=self._device),
                prompt_token=piece.prompt.speech_tokens,
                prompt_feat=piece.prompt.speech_feat,
                embedding=piece.prompt.embedding,
                token_offset=offset,
                uuid=piece.request_id,
                stream=not finalize,
                finalize=finalize,
                speed=speed,
            )
        audio = np.asarray(speech.float().cpu().numpy(), dtype=np.float32).ravel()
        return np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)

    def _piece(self, piece: _Piece, speed: float) -> Iterator[FloatAudio]:
        """One piece's audio: streamed every ``token_hop_len`` tokens, or whole when
        ``speed`` stretches it (CosyVoice's speed control needs the whole mel)."""
        model = self._model
        stop = threading.Event()
        model.hift_cache_dict[piece.request_id] = None
        try:
            if speed != 1.0:
                tokens = list(self._llm_tokens(piece, stop))
                if tokens:
                    yield self._to_audio(tokens, piece, offset=0, finalize=True, speed=speed)
                return
            yield from self._stream(piece, stop)
        finally:
            stop.set()
            model.hift_cache_dict.pop(piece.request_id, None)

    def _stream(self, piece: _Piece, stop: threading.Event) -> Iterator[FloatAudio]:
        """CosyVoice 2's streaming schedule: the LLM in a helper thread, audio for
        every ``token_hop_len`` new tokens (plus the flow's lookahead)."""
        tokens: list[int] = []
        changed = threading.Condition()
        finished = threading.Event()
        failure: list[BaseException] = []

        def run_llm() -> None:
            try:
                for token in self._llm_tokens(piece, stop):
                    with changed:
                        tokens.append(token)
                        changed.notify_all()
            except BaseException as exc:  # handed to the consumer, which raises it
                failure.append(exc)
            finally:
                with changed:
                    finished.set()
                    changed.notify_all()

        hop = int(self._model.token_hop_len)
        lookahead = int(self._model.flow.pre_lookahead_len)
        prompt_len = int(piece.prompt.speech_tokens.shape[1])
        prompt_pad = math.ceil(prompt_len / hop) * hop - prompt_len
        worker = threading.Thread(target=run_llm, name="cosyvoice-llm", daemon=True)
        worker.start()
        try:
            offset = 0
            ready: list[int] = []
            while True:
                this_hop = hop + prompt_pad if offset == 0 else hop
                needed = offset + this_hop + lookahead
                with changed:
                    changed.wait_for(functools.partial(_enough, tokens, finished, needed))
                    ready = list(tokens)
                if len(ready) >= needed:
                    window = ready[:needed]
                    yield self._to_audio(window, piece, offset=offset, finalize=False)
                    offset += this_hop
                elif finished.is_set():
                    break
            worker.join()
            if failure:
                raise failure[0]
            if ready:  # the rest, and the vocoder's held-back tail
                yield self._to_audio(ready, piece, offset=offset, finalize=True)
        finally:
            stop.set()
            worker.join()

    def close(self) -> None:
        self._model = None
        self._default = None
        self._campplus = self._speech_tokenizer = None
        self._voices.clear()


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.TTS,
    description="CosyVoice 2 (torch, CUDA or CPU): zero-shot voice cloning, instructions, streamed",
    factory=CosyVoiceEngine,
    options_model=CosyVoiceOptions,
    requires=(
        "cosyvoice",
        "matcha",
        "torch",
        "transformers",
        "hyperpyyaml",
        "diffusers",
        "conformer",
        "lightning",
        "onnxruntime",
        "kaldi_native_fbank",
    ),
    devices=("cpu", "cuda"),
    runtime="torch",
    extra=ENGINE_NAME,
    pip_hint=RUNTIME_HINT,
)
