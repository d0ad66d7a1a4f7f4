"""TTS with Piper (VITS voices on onnxruntime). Extra: ``edgevoice[piper]``.

``model`` is a Piper voice name (``en_US-joe-medium``), a path to a voice's
``.onnx`` file (its ``.onnx.json`` beside it) or a voice a package provides.
Audio streams sentence by sentence. A stream's first sentence starts sooner:
the voice's graph is cut where its decoder begins (:mod:`.vits_decoder`), and
the first ``first_chunk_s`` of the sentence's audio is decoded alone while the
rest follows — the whole sentence's text goes through the model, so its
intonation is kept. A voice that cannot be cut speaks its first
``first_chunk_words`` words as their own piece instead.

Memory is bounded whatever the text: the model never receives more than
``max_chunk_chars`` characters at once (longer sentences are cut at clause,
then word boundaries; VITS memory grows with the input length, about 1 MB
a phoneme), and onnxruntime plans no memory patterns. Its CPU arena is kept
while the voice is busy (handing it back after every sentence cost 17 % of
the synthesis time: the next sentence faulted every page in again) and
handed back, with the heap's free pages, by :meth:`PiperTtsEngine.release_memory`,
which the hub calls once the voice is idle (``release_memory_after_s``).
Phonemization (espeak-ng, holding the GIL) happens only inside
:meth:`PiperTtsEngine.synthesize`, which the hub runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

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
)
from edgevoice.engines.onnx_session import ShrinkingSession, inference_session
from edgevoice.engines.vits_decoder import MAX_DIFFERENCE, ChunkedDecoder, cut_voice, forget_cut
from edgevoice.memory import return_freed_memory
from edgevoice.model_files import ModelNotFoundError, as_local_path, hf_snapshot, packaged_model
from edgevoice.text import split_for_streaming, split_sentences

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "piper"
_VOICE_RE = re.compile(
    r"^(?P<lang>[a-z]{2,3})_(?P<region>[A-Za-z]{2,3})-(?P<name>[^-]+)-(?P<quality>x_low|low|medium|high)$"
)


class PiperOptions(EngineOptions):
    speaker: str | None = None
    """Default speaker of a multi-speaker voice (name or numeric id)."""
    length_scale: float | None = Field(default=None, gt=0)
    """Phoneme length; None uses the voice's own. Request ``speed`` divides it."""
    noise_scale: float | None = Field(default=None, ge=0)
    noise_w_scale: float | None = Field(default=None, ge=0)
    volume: float = Field(default=1.0, gt=0, le=4)
    normalize_audio: bool = True
    sentence_silence_s: float = Field(default=0.0, ge=0, le=5)
    """Silence appended after each sentence."""
    first_chunk_s: float = Field(default=0.3, ge=0, le=5)
    """Seconds of a stream's first sentence decoded on their own when the
    sentence is at least three times as long, so audio starts about twice as
    soon (the sentence is not cut: its text goes through the model whole); 0
    decodes whole sentences. Longer on a device that decodes slowly: the rest
    of the sentence must be decoded before this much has played (no gap), at
    the pace the decoder has shown so far. Needs the voice's decoder to be cut
    out of its graph (Piper's exports, with the ``onnx`` package; the halves
    are kept in ``cache_dir/piper-cut``)."""
    first_chunk_words: int = Field(default=3, ge=0, le=20)
    """For a voice whose decoder cannot be cut out: speak the first N words of a
    long first sentence as their own piece (0: whole sentences). Only a stream's
    first sentence is cut (the others are synthesized while the first plays)."""
    max_chunk_chars: int = Field(default=300, ge=20, le=2000)
    """Most characters the model synthesizes at once; a longer sentence is cut at
    clause, then word boundaries (the model's memory grows with its input)."""


def resolve_voice(model: str, cache_dir: Path, offline: bool) -> Path:
    """Path of the voice's ``.onnx`` file (blocking)."""
    if (local := as_local_path(model)) is not None:
        if local.is_dir():
            candidates = sorted(local.glob("*.onnx"))
            if not candidates:
                raise ModelNotFoundError(f"no .onnx voice in {local}")
            return candidates[0]
        return local
    packaged = packaged_model(ENGINE_NAME, model)
    if packaged is not None and packaged.installed():
        return packaged.locate(cache_dir)
    match = _VOICE_RE.match(model)
    if not match:
        raise ModelNotFoundError(
            f"unknown Piper voice {model!r}: use a voice name like en_US-lessac-medium "
            "or a path to a .onnx voice file"
        )
    lang = match["lang"]
    subdir = f"{lang}/{lang}_{match['region']}/{match['name']}/{match['quality']}"
    hint = (
        f"pip install {packaged.pip}"
        if packaged is not None
        else f'download {model}.onnx and {model}.onnx.json and set model = "/path/{model}.onnx"'
    )
    root = hf_snapshot(
        "rhasspy/piper-voices",
        cache_dir=cache_dir,
        offline=offline,
        allow_patterns=[f"{subdir}/{model}.onnx", f"{subdir}/{model}.onnx.json"],
        install_hint=hint,
    )
    path = root / subdir / f"{model}.onnx"
    if not path.is_file():
        raise ModelNotFoundError(f"Piper voice {model!r} not found in rhasspy/piper-voices")
    return path


_PIPER_CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


class PiperTtsEngine:
    """One Piper voice (possibly multi-speaker)."""

    def __init__(self, context: EngineContext, options: PiperOptions) -> None:
        self._context = context
        self._options = options
        self._voice: Any = None
        self._sessions: tuple[ShrinkingSession, ...] = ()
        self._encoder: ShrinkingSession | None = None
        """The graph up to its decoder, when it could be cut (else None)."""
        self._decoder: ChunkedDecoder | None = None
        self._typical_peak = 0.0
        """A cut voice's peak on a reference sentence, before normalization."""
        self._streams = 0
        """Syntheses under way (a first span is planned for the wait behind them)."""
        self._streams_lock = threading.Lock()
        self._speakers: dict[str, int] = {}
        self._capabilities = TtsCapabilities(
            voices=(VoiceInfo(context.model.name, ("en",)),), sample_rate_hz=22050
        )

    @property
    def capabilities(self) -> TtsCapabilities:
        return self._capabilities

    def load(self) -> None:
        from piper import PiperVoice
        from piper.config import PiperConfig

        path = resolve_voice(
            self._context.model.model, self._context.cache_dir, self._context.offline
        )
        config_path = Path(f"{path}.json")
        if not config_path.is_file():
            raise ModelNotFoundError(f"Piper voice config {config_path} is missing")
        started = time.monotonic()
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        config = PiperConfig.from_dict(raw)
        if not (self._options.first_chunk_s > 0 and self._load_cut(path, config)):
            session = self._session_for(path, stop_spinning=False)
            self._sessions = (session,)
            self._voice = PiperVoice(session=session, config=config)
        language = raw.get("language", {}).get("code") or raw.get("espeak", {}).get("voice", "en")
        self._speakers = dict(self._voice.config.speaker_id_map)
        self._capabilities = TtsCapabilities(
            voices=(
                VoiceInfo(
                    self._context.model.name,
                    (language,),
                    speakers=tuple(self._speakers),
                    description=f"Piper {path.stem}",
                ),
            ),
            sample_rate_hz=int(self._voice.config.sample_rate),
            streaming=True,
        )
        if self._options.speaker is not None:
            self._speaker_id(self._options.speaker)  # fail at startup, not per request
        # One tiny synthesis so the first real request is as fast as later ones
        # (onnxruntime initializes its kernels on the first run).
        self.release_memory()
        _LOGGER.info(
            "Piper voice %s loaded from %s on %s in %.2f s",
            self._context.model.name,
            path,
            self._context.device,
            time.monotonic() - started,
        )

    def _load_cut(self, path: Path, config: Any) -> bool:
        """Load the voice cut before its decoder (from the cache, or cut now) and
        check that a decode in spans equals the whole; False, with the engine as
        before, where anything fails (no cut, no ``onnx``, a cache it cannot
        write or read, a decoder that is not local after all)."""
        from piper import PiperVoice

        cut = None
        try:
            cut = cut_voice(path, self._context.cache_dir)
            if cut is None:
                return False
            encoder, decoder = (
                self._session_for(part, stop_spinning=True) for part in (cut.encoder, cut.decoder)
            )
            self._encoder, self._decoder = encoder, ChunkedDecoder(decoder, cut, config.hop_length)
            # Phonemes and ids only: runs go through the two halves.
            self._voice = PiperVoice(session=encoder, config=config)
            handoff = self._encode(
                self._voice.phonemes_to_ids(self._voice.phonemize(_REFERENCE_TEXT)[0])
            )
            frames = int(handoff[cut.latent].shape[-1])
            reference = next(self._decoder.decode(handoff, [(0, frames)]))
            self._typical_peak = float(np.max(np.abs(reference)))
            # The decoder's pace from the check's runs: the first run (above)
            # set kernels up and grew the arena, several times slower.
            self._decoder.pace = None
            difference = self._decoder.check(handoff)
            if difference > MAX_DIFFERENCE:
                raise ValueError(f"a decode in spans differs from the whole by {difference:.2g}")
        except Exception:
            _LOGGER.warning("Piper voice %s: not cut before its decoder", path, exc_info=True)
            if cut is not None:
                forget_cut(cut.encoder.parent)  # the next start cuts it again
            self._voice = self._encoder = self._decoder = None
            return False
        self._sessions = (encoder, decoder)
        return True

    def _session_for(self, model: Path | bytes, *, stop_spinning: bool) -> ShrinkingSession:
        return inference_session(
            model,
            self._context.device,
            engine="Piper",
            cuda_options=_PIPER_CUDA_OPTIONS,
            shrink="on_release",
            stop_spinning=stop_spinning,
        )

    def _encode(self, ids: list[int], config: Any = None) -> dict[str, np.ndarray]:
        """Phoneme ids -> what the decoder needs (the latent first), as Piper's
        ``phoneme_ids_to_audio`` feeds its whole graph."""
        assert self._encoder is not None and self._decoder is not None
        voice_config = self._voice.config
        scales = np.array(
            [
                _setting(config, "noise_scale", voice_config.noise_scale),
                _setting(config, "length_scale", voice_config.length_scale),
                _setting(config, "noise_w_scale", voice_config.noise_w_scale),
            ],
            dtype=np.float32,
        )
        feed = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": scales,
        }
        if voice_config.num_speakers > 1:
            speaker = _setting(config, "speaker_id", voice_config.default_speaker_id)
            feed["sid"] = np.array([speaker], dtype=np.int64)
        names = [value.name for value in self._encoder.get_outputs()]
        return dict(zip(names, self._encoder.run(None, feed), strict=True))

    def _speak_whole(self, piece: str, config: Any, pause: FloatAudio) -> Iterator[FloatAudio]:
        """One piece through Piper's whole graph, a chunk (and ``pause``) per sentence."""
        for chunk in self._voice.synthesize(piece, config):
            audio: FloatAudio = chunk.audio_float_array
            if len(audio):
                yield np.concatenate([audio, pause]) if len(pause) else audio

    def _speak_split(
        self, piece: str, config: Any, quick_start: bool, pause: FloatAudio
    ) -> Iterator[FloatAudio]:
        """One piece through the cut graph: each sentence encoded whole, its audio
        decoded in spans (the first ``first_chunk_s`` alone when ``quick_start``),
        normalized as Piper does (by the sentence's peak) without waiting for it,
        ``pause`` after each sentence's last span."""
        decoder = self._decoder
        assert decoder is not None
        frame_s = decoder.hop / self._capabilities.sample_rate_hz
        first_frames = max(1, round(self._options.first_chunk_s / frame_s))
        for phonemes in self._voice.phonemize(piece):
            if not phonemes:
                continue
            handoff = self._encode(self._voice.phonemes_to_ids(phonemes), config)
            frames = int(handoff[decoder.latent].shape[-1])
            spans = [(0, frames)]
            first = 0
            if quick_start:
                # Each of the voice's workers takes the streams' runs in turn.
                sharing = -(-self._streams // self._context.model.max_concurrency)
                first = decoder.first_span(frames, first_frames, frame_s, sharing=sharing)
            if first:
                spans = [(0, first), (first, frames)]
            quick_start = False
            gain: float | None = None
            # The first of several spans cannot see the sentence's peak: its gain
            # is capped at what the voice's typical peak gives (no quiet lead-in
            # raised to full scale, no first 0.3 s louder than the rest).
            floor = self._typical_peak if len(spans) > 1 else 0.0
            for index, raw in enumerate(decoder.decode(handoff, spans)):
                audio, gain = _level(raw, gain, self._options.normalize_audio, floor)
                audio = np.clip(audio * self._options.volume, -1.0, 1.0).astype(np.float32)
                last = index == len(spans) - 1
                yield np.concatenate([audio, pause]) if last and len(pause) else audio

    def _speaker_id(self, speaker: str | None) -> int | None:
        if speaker is None or speaker == "":
            return None
        if speaker in self._speakers:
            return self._speakers[speaker]
        if speaker.isdigit() and int(speaker) in self._speakers.values():
            return int(speaker)
        if not self._speakers and speaker == "0":
            return None
        known = ", ".join(self._speakers) or "none (single-speaker voice)"
        raise EngineRequestError(
            f"unknown speaker {speaker!r} for voice {self._context.model.name!r}; speakers: {known}"
        )

    def synthesize(self, text: str, options: SynthesizeOptions) -> Iterator[FloatAudio]:
        if self._voice is None:
            raise RuntimeError("engine not loaded")
        from piper import SynthesisConfig

        if not text.strip():
            raise EngineRequestError("text is empty")
        if not 0.1 <= options.speed <= 10:
            raise EngineRequestError(f"speed {options.speed} is out of range")
        base_scale = self._options.length_scale or self._voice.config.length_scale
        config = SynthesisConfig(
            speaker_id=self._speaker_id(options.speaker or self._options.speaker),
            length_scale=base_scale / options.speed,
            noise_scale=self._options.noise_scale,
            noise_w_scale=self._options.noise_w_scale,
            normalize_audio=self._options.normalize_audio,
            volume=self._options.volume,
        )
        pause = np.zeros(
            round(self._options.sentence_silence_s * self._capabilities.sample_rate_hz),
            dtype=np.float32,
        )
        produced = False
        split = self._decoder is not None
        pieces = (
            split_sentences(text, self._options.max_chunk_chars)
            if options.continuation or split
            else split_for_streaming(
                text,
                lead_words=self._options.first_chunk_words,
                max_chars=self._options.max_chunk_chars,
            )
        )
        quick_start = not options.continuation
        with self._one_more_stream():
            for piece in pieces:
                chunks = (
                    self._speak_split(piece, config, quick_start, pause)
                    if split
                    else self._speak_whole(piece, config, pause)
                )
                quick_start = False
                for audio in chunks:
                    produced = True
                    yield audio
        if not produced:
            raise EngineRequestError("text produced no speech")

    @contextlib.contextmanager
    def _one_more_stream(self) -> Iterator[None]:
        """Counts the syntheses under way (their runs queue for the voice's workers)."""
        with self._streams_lock:
            self._streams += 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._streams -= 1

    def release_memory(self) -> None:
        """Hand back what the last requests left: one tiny synthesis that ends by
        shrinking onnxruntime's arena, then the heap's free pages."""
        voice, sessions = self._voice, self._sessions
        if voice is None:
            return
        for session in sessions:
            session.shrink_after_next_run()
        if self._decoder is not None:
            pace = self._decoder.pace  # not the pace of a run that ends by shrinking
            for _ in self._speak_split("Ready.", None, False, _NO_PAUSE):
                pass
            self._decoder.pace = pace
        else:
            for _ in voice.synthesize("Ready."):
                pass
        return_freed_memory()

    def close(self) -> None:
        self._voice = None
        self._sessions = ()
        self._encoder = self._decoder = None


def _setting(config: Any, name: str, default: Any) -> Any:
    """A ``SynthesisConfig`` field, or the voice's own where it is None (as Piper does)."""
    value = getattr(config, name, None) if config is not None else None
    return default if value is None else value


_NO_PAUSE: FloatAudio = np.zeros(0, dtype=np.float32)
_REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog."
"""What a cut voice's typical peak is measured on, when it loads."""
_GAIN_RAMP = 256
"""Samples over which a lowered gain fades in (no click inside a sentence)."""


def _level(
    audio: FloatAudio, gain: float | None, normalize: bool, floor: float = 0.0
) -> tuple[FloatAudio, float | None]:
    """Piper's normalization (peak to 1.0) for one span of a sentence: the first
    span sets the gain (from its peak, or ``floor`` where that is higher); a
    later span louder than that gain allows lowers it, fading over a few
    milliseconds (each sample within full scale), so nothing clips and the gain
    does not jump."""
    if not normalize:
        return audio, gain
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak < 1e-8:
        return np.zeros_like(audio), gain
    wanted = 1.0 / (peak if gain is not None else max(peak, floor))
    if gain is None or wanted >= gain:
        return audio * (gain or wanted), gain or wanted
    ramp = np.ones(len(audio), dtype=np.float32) * wanted
    fade = min(_GAIN_RAMP, len(audio))
    # Fade from the gain so far, each sample kept within full scale.
    ceiling = 1.0 / np.maximum(np.abs(audio[:fade]), 1e-8)
    ramp[:fade] = np.minimum(np.linspace(gain, wanted, fade, dtype=np.float32), ceiling)
    return audio * ramp, wanted


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.TTS,
    description="Piper neural text-to-speech (VITS voices on onnxruntime)",
    factory=PiperTtsEngine,
    options_model=PiperOptions,
    requires=("piper", "onnxruntime"),
    devices=("cpu", "cuda"),
    runtime="onnxruntime",
    extra=ENGINE_NAME,
)
