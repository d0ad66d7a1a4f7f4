"""Zero-shot voice-cloning TTS with Kyutai's Pocket TTS on CPU. Extra: ``edgevoice[pocket-tts]``.

``model`` names a Pocket TTS config: one the package ships (``english``,
``english_2m_2026-10``, ``french``, ``german``, ...), a local ``.yaml`` file
(or a directory holding one) or an ``hf://org/repo/path.yaml@rev`` file. The
config's ``hf://`` weights and tokenizer are fetched into ``cache_dir``
through huggingface_hub (from the cache only with ``offline = true``); local
paths in it are relative to the config file. The cloning weights
(``weights_path``, a gated repository) fall back to the config's
``weights_path_without_voice_cloning``; such a model speaks its predefined
voices but declares no cloning.

Every request may carry a reference clip (:class:`~edgevoice.engines.base.VoiceReference`):
an inline sample or a stored voice of the library. Its encoded state (the
Mimi encoding run through the flow LM) is kept in a bounded LRU keyed by the
stored voice's id and a hash of the samples, so a stored voice (or the same
sample sent again, sentence after sentence) is encoded once. Pocket TTS
conditions on the audio alone; a transcript that comes with the sample is
not needed and is ignored. Without a reference the entry speaks its default
``voice``: a predefined voice of a shipped config (``alba``, ...) or a local
audio or ``.safetensors`` state file.

Audio streams as it is generated (Pocket TTS decodes frame groups of 80 ms
while the next latents are generated); ``speed`` other than 1 time-stretches
each sentence (pitch kept) and yields it whole. Text is cut into sentences
(long ones into bounded pieces) and each piece's generation length is bounded
by Pocket TTS itself (its token count), so memory stays bounded per request.
Pocket TTS runs two helper threads per piece (generation and decoding); a
closed stream stops them.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import threading
import time
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
from edgevoice.errors import ClientError, UnknownModelError
from edgevoice.model_files import ModelNotFoundError, as_local_path
from edgevoice.text import split_sentences

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME: Final = "pocket-tts"
MIN_SPEED: Final = 0.5
MAX_SPEED: Final = 2.0

CONFIG_LANGUAGES: Final = {
    "english": "en",
    "french": "fr",
    "german": "de",
    "portuguese": "pt",
    "italian": "it",
    "spanish": "es",
    "dutch": "nl",
}
"""Shipped config name prefix → the ISO 639-1 code its voices speak."""

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class PocketTtsOptions(EngineOptions):
    voice: str | None = None
    """Default voice: a predefined voice of a shipped config (``alba``, ...), or a
    local audio file or ``.safetensors`` voice state. ``None``: the config
    language's default voice (a custom config must name one)."""
    language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")
    """ISO code the voices speak; ``None`` follows the shipped config's name (else ``en``)."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature; ``None`` uses the config's (0.3)."""
    eos_threshold: float | None = Field(default=None, ge=-20.0, le=20.0)
    """End-of-speech logit threshold; ``None`` uses the config's."""
    quantize: bool = False
    """Dynamic int8 quantization of the flow LM (smaller and faster on x86)."""
    min_reference_s: float = Field(default=1.0, ge=0.1, le=30.0)
    """Shortest reference clip accepted for cloning."""
    max_reference_s: float = Field(default=30.0, ge=1.0, le=120.0)
    """Longest reference clip accepted (its state grows with its length)."""
    max_cached_voices: int = Field(default=16, ge=1, le=1024)
    """Encoded reference states kept (least recently used dropped first)."""
    max_piece_chars: int = Field(default=300, ge=20, le=2000)
    """Longest text generated in one piece; longer sentences are cut."""
    cpu_threads: int = Field(default=0, ge=0, le=256)
    """torch intra-op threads; 0 leaves the process's setting. Process-wide."""

    @model_validator(mode="after")
    def _reference_range(self) -> PocketTtsOptions:
        if self.min_reference_s >= self.max_reference_s:
            raise ValueError("min_reference_s must be below max_reference_s")
        return self


# ----------------------------------------------------------- speed (WSOLA)


def time_stretch(samples: FloatAudio, speed: float, rate_hz: int) -> FloatAudio:
    """``samples`` played ``speed`` times as fast at the same pitch (WSOLA).

    Overlap-add of 40 ms Hann frames, each taken within ±10 ms of its nominal
    position where it best continues the previous one. Blocking; linear in
    the length.
    """
    if speed == 1.0 or len(samples) == 0:
        return samples
    frame = max(16, int(0.04 * rate_hz))
    hop_out = frame // 2
    hop_in = hop_out * speed
    tolerance = max(1, int(0.01 * rate_hz))
    n_out = max(1, round(len(samples) / speed))
    padded = np.concatenate(
        [np.zeros(tolerance, np.float32), samples, np.zeros(frame + 2 * tolerance, np.float32)]
    )
    window = np.hanning(frame).astype(np.float32)
    out = np.zeros(n_out + frame, np.float32)
    norm = np.zeros(n_out + frame, np.float32)
    natural: FloatAudio | None = None
    pos_in = 0.0
    for pos_out in range(0, n_out, hop_out):
        nominal = round(pos_in) + tolerance
        start = nominal
        if natural is not None:
            low = nominal - tolerance
            region = padded[low : low + frame + 2 * tolerance]
            score = np.correlate(region, natural, mode="valid")
            start = low + int(np.argmax(score))
        start = min(start, len(padded) - frame - hop_out)
        out[pos_out : pos_out + frame] += padded[start : start + frame] * window
        norm[pos_out : pos_out + frame] += window
        natural = padded[start + hop_out : start + hop_out + frame]
        pos_in += hop_in
    stretched = out[:n_out] / np.maximum(norm[:n_out], 1e-3)
    return np.clip(stretched, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------- model files


def _hf_file(url: str, cache_dir: Path, offline: bool) -> Path:
    """The local copy of ``hf://org/repo/path[@revision]`` (blocking; may download)."""
    import huggingface_hub

    spec = url.removeprefix("hf://")
    spec, _, revision = spec.partition("@")
    parts = spec.split("/")
    if len(parts) < 3 or not all(parts):
        raise ModelNotFoundError(f"{url!r} is not hf://org/repo/path[@revision]")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    hf_cache = cache_dir / "huggingface"
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id,
                filename,
                revision=revision or None,
                cache_dir=hf_cache,
                local_files_only=True,
            )
        )
    except Exception:  # not cached (huggingface_hub raises several types)
        if offline:
            raise ModelNotFoundError(
                f"{url} is not in the cache and offline = true; download it once with "
                "offline = false, or point the config at a local file"
            ) from None
    _LOGGER.info("Downloading %s", url)
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision or None, cache_dir=hf_cache
            )
        )
    except Exception as exc:
        raise ModelNotFoundError(f"could not download {url}: {exc}") from exc


def fetch(location: str, base: Path, cache_dir: Path, offline: bool) -> Path:
    """A config's file reference as a local path: ``hf://`` fetched, relative to ``base``."""
    if location.startswith("hf://"):
        return _hf_file(location, cache_dir, offline)
    if location.startswith(("http://", "https://")):
        raise ModelNotFoundError(
            f"{location}: download it and name the local file in the config instead"
        )
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist")
    return path


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    config: dict[str, Any]
    """The config with every file reference made local."""
    shipped: str | None
    """The shipped config's name (``english_2m_2026-10``), for predefined voices."""
    cloning: bool
    """The voice-cloning weights were found (or the config loads none)."""


def resolve_config(model: str, cache_dir: Path, offline: bool) -> ResolvedConfig:
    """Load ``model``'s YAML config and make its weight and tokenizer paths local (blocking)."""
    import yaml
    from pocket_tts.utils.config import CONFIGS_DIR

    shipped: str | None = None
    local = as_local_path(model)
    if local is not None:
        if local.is_dir():
            found = sorted(local.glob("*.yaml")) + sorted(local.glob("*.yml"))
            if len(found) != 1:
                raise ModelNotFoundError(f"{local} must hold exactly one Pocket TTS .yaml config")
            local = found[0]
        path = local
    elif model.startswith("hf://"):
        path = _hf_file(model, cache_dir, offline)
    elif _NAME.fullmatch(model) and (CONFIGS_DIR / f"{model}.yaml").is_file():
        path, shipped = CONFIGS_DIR / f"{model}.yaml", model
    else:
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise ModelNotFoundError(
            f"unknown Pocket TTS model {model!r}: use a config the package ships "
            f"({', '.join(known)}), a local .yaml config or an hf:// config file"
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelNotFoundError(f"cannot read Pocket TTS config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelNotFoundError(f"{path} is not a Pocket TTS config")
    base = path.parent

    def local_file(value: Any) -> Any:
        return str(fetch(value, base, cache_dir, offline)) if isinstance(value, str) else value

    config = dict(raw)
    for section in ("flow_lm", "mimi"):
        if isinstance(sub := config.get(section), dict):
            config[section] = sub = dict(sub)
            sub["weights_path"] = local_file(sub.get("weights_path"))
            if section == "flow_lm" and isinstance(table := sub.get("lookup_table"), dict):
                sub["lookup_table"] = {
                    **table,
                    "tokenizer_path": local_file(table.get("tokenizer_path")),
                }
    cloning = True
    weights = config.get("weights_path")
    without = config.pop("weights_path_without_voice_cloning", None)
    if isinstance(weights, str):
        try:
            config["weights_path"] = local_file(weights)
        except ModelNotFoundError as exc:
            if not isinstance(without, str):
                raise
            _LOGGER.warning(
                "Pocket TTS voice-cloning weights unavailable (%s); loading the weights "
                "without voice cloning (accept the terms of kyutai/pocket-tts and log in "
                "to Hugging Face to clone voices)",
                exc,
            )
            config["weights_path"] = local_file(without)
            cloning = False
    elif isinstance(without, str):
        config["weights_path"] = local_file(without)
        cloning = False
    return ResolvedConfig(config, shipped, cloning)


def config_language(shipped: str | None) -> str:
    for prefix, code in CONFIG_LANGUAGES.items():
        if shipped is not None and shipped.startswith(prefix):
            return code
    return "en"


# ----------------------------------------------------------------- engine


class PocketTtsEngine:
    """One Pocket TTS model; clones any reference voice, one state per voice cached.

    Thread-safe: each request generates from its own copy of the voice state
    (the model's weights are only read); the state cache has its own lock.
    Every method is blocking and runs in the hub's worker threads.
    """

    def __init__(self, context: EngineContext, options: PocketTtsOptions) -> None:
        self._context = context
        self._options = options
        self._model: Any = None
        self._rate_hz = 24000
        self._default_state: Any = None
        self._cloning = True
        self._voices: ReferenceCache[Any] = ReferenceCache(options.max_cached_voices)
        self._lock = threading.Lock()
        self.reference_encodings = 0
        """References encoded so far (cache misses); for tests and metrics."""
        language = options.language or "en"
        self._capabilities = TtsCapabilities(
            voices=(VoiceInfo(context.model.name, (language,)),),
            sample_rate_hz=self._rate_hz,
            streaming=True,
            cloning=True,
        )

    @property
    def capabilities(self) -> TtsCapabilities:
        return self._capabilities

    def load(self) -> None:
        import torch

        threads = torch.get_num_threads()
        # pocket_tts sets torch's process-wide thread count to 1 when imported;
        # loading one engine must not change the others'.
        from pocket_tts import TTSModel

        torch.set_num_threads(self._options.cpu_threads or threads)
        pocket_logger = logging.getLogger("pocket_tts")
        if pocket_logger.level == logging.NOTSET:  # it logs every step at INFO
            pocket_logger.setLevel(logging.WARNING)

        started = time.monotonic()
        family = self._context.device.split(":", 1)[0]
        if family != "cpu":
            raise ValueError(f"pocket-tts runs on cpu, not {self._context.device!r}")
        resolved = resolve_config(
            self._context.model.model, self._context.cache_dir, self._context.offline
        )
        import yaml

        self._context.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", suffix=".yaml", dir=self._context.cache_dir, encoding="utf-8"
        ) as resolved_yaml:
            yaml.safe_dump(resolved.config, resolved_yaml)
            resolved_yaml.flush()
            model = TTSModel.load_model(
                config=resolved_yaml.name,
                temp=self._options.temperature,
                eos_threshold=self._options.eos_threshold,
                quantize=self._options.quantize,
            )
        model.eval()
        self._model = model
        self._rate_hz = int(model.sample_rate)
        self._cloning = resolved.cloning
        self._default_state = self._load_default_voice(resolved)
        language = self._options.language or config_language(resolved.shipped)
        self._capabilities = TtsCapabilities(
            voices=(
                VoiceInfo(
                    self._context.model.name,
                    (language,),
                    description=(
                        f"Pocket TTS {resolved.shipped or Path(self._context.model.model).stem}"
                        + (", voice cloning" if self._cloning else "")
                    ),
                ),
            ),
            sample_rate_hz=self._rate_hz,
            streaming=True,
            cloning=self._cloning,
        )
        _LOGGER.info(
            "Pocket TTS %s loaded (%s voice cloning) in %.2f s",
            self._context.model.model,
            "with" if self._cloning else "without",
            time.monotonic() - started,
        )

    def _load_default_voice(self, resolved: ResolvedConfig) -> Any:
        """The state of the entry's default voice (blocking; may fetch a predefined voice)."""
        from pocket_tts.default_parameters import get_default_voice_for_language
        from pocket_tts.utils.utils import _ORIGINS_OF_PREDEFINED_VOICES, get_predefined_voice

        voice = self._options.voice
        if voice is None:
            if resolved.shipped is None:
                raise ModelNotFoundError(
                    "a custom Pocket TTS config needs a default voice: set the voice option "
                    "to a reference audio file or a .safetensors voice state"
                )
            voice = get_default_voice_for_language(resolved.shipped)
        if voice in _ORIGINS_OF_PREDEFINED_VOICES:
            if resolved.shipped is None:
                raise ModelNotFoundError(
                    f"predefined voice {voice!r} belongs to the released weights of a shipped "
                    "config; with a custom config set voice to a reference audio file"
                )
            location = get_predefined_voice(language=resolved.shipped, name=voice)
            state_file = _hf_file(location, self._context.cache_dir, self._context.offline)
            return self._model.get_state_for_audio_prompt(state_file)
        if voice.startswith("hf://"):
            path: Path | None = _hf_file(voice, self._context.cache_dir, self._context.offline)
        else:
            path = as_local_path(voice)
        if path is None or not path.is_file():
            raise ModelNotFoundError(
                f"default voice {voice!r} is neither a predefined Pocket TTS voice nor a file"
            )
        if path.suffix == ".safetensors":
            return self._model.get_state_for_audio_prompt(path)
        if not self._cloning:
            raise ModelNotFoundError(
                f"default voice {path} is a reference clip, but the voice-cloning weights are "
                "unavailable; use a predefined voice or a .safetensors voice state"
            )
        try:
            audio = decode(path, max_duration_s=self._options.max_reference_s + 1.0)
            samples = self._checked_reference(VoiceReference(audio.samples, audio.rate_hz))
        except ClientError as exc:
            raise ModelNotFoundError(f"default voice {path}: {exc}") from None
        return self._encode(samples, audio.rate_hz)

    # ------------------------------------------------------------ voices

    def _checked_reference(self, reference: VoiceReference) -> FloatAudio:
        """The reference's samples, or a client error saying why they cannot clone."""
        options = self._options
        return check_reference(
            reference, ENGINE_NAME, options.min_reference_s, options.max_reference_s
        )

    def _encode(self, samples: FloatAudio, rate_hz: int) -> Any:
        """Encode a reference clip into a voice state (blocking, the expensive part)."""
        import torch

        audio = resample(samples, rate_hz, self._rate_hz)
        tensor = torch.from_numpy(np.ascontiguousarray(audio))[None, :]
        started = time.monotonic()
        state = self._model.get_state_for_audio_prompt(tensor)
        with self._lock:
            self.reference_encodings += 1
        _LOGGER.debug(
            "Encoded a %.1f s reference in %.2f s",
            len(audio) / self._rate_hz,
            time.monotonic() - started,
        )
        return state

    def _reference_state(self, reference: VoiceReference) -> Any:
        """The cached state of ``reference``, encoding it on a miss (blocking)."""
        if not self._cloning:
            raise EngineRequestError(
                f"model {self._context.model.name!r} was loaded without the Pocket TTS "
                "voice-cloning weights and cannot clone voices",
                param="voice",
            )
        samples = self._checked_reference(reference)
        return self._voices.get_or_encode(reference, samples, self._encode)

    def cached_voices(self) -> int:
        """Encoded reference states held now."""
        return len(self._voices)

    # -------------------------------------------------------- synthesis

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        """Yield float32 audio at 24 kHz as it is generated.

        Blocking: runs in the hub's worker thread. Request errors (text,
        voice, speed, a reference that cannot clone) raise before the first
        chunk; the reference is encoded (or found in the cache) here too.
        """
        model = self._model
        if model is None:
            raise RuntimeError("engine not loaded")
        if not text.strip():
            raise EngineRequestError("text is empty", param="input")
        if not math.isfinite(options.speed) or not MIN_SPEED <= options.speed <= MAX_SPEED:
            raise EngineRequestError(
                f"speed {options.speed:g} is out of range for pocket-tts "
                f"({MIN_SPEED:g}-{MAX_SPEED:g})",
                param="speed",
            )
        name = self._context.model.name
        if options.voice not in (None, name):
            raise UnknownModelError("tts", options.voice, [name], param="voice")
        if options.speaker:
            raise EngineRequestError(
                "pocket-tts voices have no speakers; clone a voice with a voice sample or a "
                "stored voice instead",
                param="speaker",
            )
        pieces = [p for p in split_sentences(text, self._options.max_piece_chars) if p.strip()]
        if not pieces:
            raise EngineRequestError("text produced no speech", param="input")
        if options.reference is not None:
            state = self._reference_state(options.reference)
        else:
            state = self._default_state
        return self._generate(model, state, pieces, options.speed)

    def _generate(
        self, model: Any, state: Any, pieces: list[str], speed: float
    ) -> Iterator[FloatAudio]:
        produced = False
        for piece in pieces:
            stop = threading.Event()
            stream = model.generate_audio_stream(state, piece, copy_state=True, stop=stop)
            finished = False
            try:
                if speed == 1.0:
                    for chunk in stream:
                        audio = _to_float(chunk)
                        if len(audio):
                            produced = True
                            yield audio
                else:
                    whole = [_to_float(chunk) for chunk in stream]
                    audio = time_stretch(
                        np.concatenate(whole) if whole else np.zeros(0, np.float32),
                        speed,
                        self._rate_hz,
                    )
                    if len(audio):
                        produced = True
                        yield audio
                finished = True
            finally:
                if not finished:  # closed early: Pocket TTS's threads stop at their next frame
                    stop.set()
                stream.close()
        if not produced:
            raise EngineRequestError("text produced no speech", param="input")

    def close(self) -> None:
        self._model = None
        self._default_state = None
        self._voices.clear()


def _to_float(chunk: Any) -> FloatAudio:
    audio = np.asarray(chunk.detach().cpu().numpy(), dtype=np.float32).ravel()
    return np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.TTS,
    description="Pocket TTS (Kyutai, torch on CPU): zero-shot voice cloning, streamed",
    factory=PocketTtsEngine,
    options_model=PocketTtsOptions,
    requires=("pocket_tts", "torch"),
    devices=("cpu",),
    extra=ENGINE_NAME,
)
