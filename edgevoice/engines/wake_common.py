"""What the wake-word engines share: PCM conversion, the refractory clock, checks.

microWakeWord and openWakeWord both take 16 kHz 16-bit PCM, report a
detection at the end of the chunk that completed it, and ignore their wake
word for ``refractory_s`` after a detection; that logic lives here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from edgevoice.engines.base import (
    Detection,
    EngineContext,
    EngineOptions,
    EngineRequestError,
    FloatAudio,
    WakeCapabilities,
    WakeWordInfo,
)

SAMPLE_RATE_HZ = 16000


def to_pcm16(audio: FloatAudio) -> bytes:
    """float32 samples (clipped to [-1, 1]) → little-endian 16-bit PCM."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class DetectionClock:
    """A stream's position in samples and its refractory period.

    Not thread-safe: one stream is fed from one worker call at a time.
    """

    def __init__(self, name: str, refractory_s: float) -> None:
        self._name = name
        self._refractory_samples = round(refractory_s * SAMPLE_RATE_HZ)
        self._samples = 0
        self._last_detection: int | None = None

    def advance(self, samples: int) -> None:
        """Count a fed chunk of ``samples`` samples (before its detections)."""
        self._samples += samples

    def detect(self) -> Detection | None:
        """A detection at the end of the last chunk, or None inside the refractory period.

        The front ends work in 10-80 ms steps; the exact position inside a
        chunk does not matter to clients.
        """
        now = self._samples
        if self._last_detection is not None and now - self._last_detection < (
            self._refractory_samples
        ):
            return None
        self._last_detection = now
        return Detection(self._name, now * 1000 // SAMPLE_RATE_HZ)


def check_names(info: WakeWordInfo, names: Sequence[str] | None) -> None:
    """Refuse a stream for wake words this engine does not serve (None: any)."""
    if names is not None and info.name not in names:
        raise EngineRequestError(
            f"wake word engine {info.name!r} does not serve {', '.join(names)}"
        )


def wake_capabilities(info: WakeWordInfo) -> WakeCapabilities:
    """One wake word at 16 kHz."""
    return WakeCapabilities(wake_words=(info,), sample_rate_hz=SAMPLE_RATE_HZ)


OptionsT = TypeVar("OptionsT", bound=EngineOptions)
StreamT = TypeVar("StreamT")


class WakeWordEngineBase(Generic[OptionsT, StreamT]):
    """One wake word from one model file; each stream opens its own interpreter.

    Subclasses set :attr:`model_path` in ``load()`` and make a stream in
    :meth:`_open_stream`. Streams are per connection, the engine is shared.
    """

    def __init__(self, context: EngineContext, options: OptionsT, info: WakeWordInfo) -> None:
        self._context = context
        self.options = options
        self.model_path: Path | None = None
        """The loaded model file; None until ``load()``."""
        self.info = info

    @property
    def capabilities(self) -> WakeCapabilities:
        return wake_capabilities(self.info)

    def _open_stream(self) -> StreamT:
        raise NotImplementedError

    def start_stream(self, names: Sequence[str] | None = None) -> StreamT:
        check_names(self.info, names)
        if self.model_path is None:
            raise RuntimeError("engine not loaded")
        return self._open_stream()

    def close(self) -> None:
        self.model_path = None
