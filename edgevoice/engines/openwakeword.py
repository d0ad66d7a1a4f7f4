"""Wake words with openWakeWord (TFLite). Extra: ``edgevoice[openwakeword]``.

``model`` is a built-in model of ``pyopen-wakeword`` (``alexa``,
``hey_jarvis``, ``hey_mycroft``, ``hey_rhasspy``, ``okay_nabu``) or a path to
an openWakeWord ``.tflite`` classifier (the shared melspectrogram and
embedding models come with the package). One config entry is one wake word;
its public ``name`` is what Wyoming ``detect{names}`` and detections use.

openWakeWord scores every 80 ms of audio; a detection needs ``trigger_level``
scores at or above ``threshold`` (each score below takes one back), like
wyoming-openwakeword. Every stream has its own feature front end and
classifier, since both carry streaming state.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from edgevoice.engines import wake_common
from edgevoice.engines.base import (
    Detection,
    EngineContext,
    EngineKind,
    EngineOptions,
    EnginePlugin,
    FloatAudio,
    WakeWordInfo,
)

_LOGGER = logging.getLogger(__name__)

ENGINE_NAME = "openwakeword"
BUILTIN_MODELS: dict[str, str] = {
    "alexa": "Alexa",
    "hey_jarvis": "Hey Jarvis",
    "hey_mycroft": "Hey Mycroft",
    "hey_rhasspy": "Hey Rhasspy",
    "okay_nabu": "Okay Nabu",
}
"""Built-in model → the phrase it listens for."""
_VERSION_SUFFIX = re.compile(r"_v\d+(\.\d+)*$")


class OpenWakeWordOptions(EngineOptions):
    threshold: float = Field(default=0.5, gt=0, lt=1)
    """Score (0-1) an 80 ms step needs to count as an activation."""
    trigger_level: int = Field(default=1, ge=1, le=50)
    """Activations needed for a detection (higher: fewer false wakes, slower)."""
    refractory_s: float = Field(default=2.0, ge=0)
    """After a detection, the same stream ignores this wake word this long."""


def resolve_model(model: str) -> Path:
    """The classifier ``.tflite`` for a built-in name or a path (blocking)."""
    if model in BUILTIN_MODELS:
        import pyopen_wakeword

        return Path(pyopen_wakeword.__file__).parent / "models" / f"{model}.tflite"
    path = Path(model).expanduser()
    if path.suffix != ".tflite" or not path.is_file():
        raise FileNotFoundError(
            f"wake word model {model!r} not found: use one of {', '.join(BUILTIN_MODELS)} "
            "or a path to an openWakeWord .tflite model"
        )
    return path


def model_phrase(model: str) -> str:
    """What a model listens for: ``hey_jarvis`` → ``Hey Jarvis``; a path's file stem."""
    if model in BUILTIN_MODELS:
        return BUILTIN_MODELS[model]
    stem = _VERSION_SUFFIX.sub("", Path(model).stem)
    return stem.replace("_", " ").strip() or stem


class _OpenWakeStream:
    """Per-connection detector state: feature front end + one classifier.

    Not thread-safe: the hub feeds a stream from one worker call at a time.
    """

    def __init__(self, engine: OpenWakeWordEngine) -> None:
        from pyopen_wakeword import OpenWakeWord, OpenWakeWordFeatures

        assert engine.model_path is not None
        self._name = engine.info.name
        self._options = engine.options
        self._features: Any = OpenWakeWordFeatures.from_builtin()
        try:
            self._classifier: Any = OpenWakeWord.from_model(engine.model_path)
        except BaseException:
            self._features.close()
            raise
        self._clock = wake_common.DetectionClock(self._name, engine.options.refractory_s)
        self._activations = 0

    def process(self, audio: FloatAudio) -> list[Detection]:
        """Feed the next chunk (any length, 16 kHz); return detections in it."""
        if len(audio) == 0:
            return []
        self._clock.advance(len(audio))
        detections: list[Detection] = []
        threshold = self._options.threshold
        for embeddings in self._features.process_streaming(wake_common.to_pcm16(audio)):
            for score in self._classifier.process_streaming(embeddings):
                if score < threshold:
                    self._activations = max(0, self._activations - 1)
                    continue
                self._activations += 1
                if self._activations < self._options.trigger_level:
                    continue
                self._activations = 0
                if (found := self._clock.detect()) is not None:
                    detections.append(found)
        return detections

    def close(self) -> None:
        self._classifier.close()
        self._features.close()


class OpenWakeWordEngine(wake_common.WakeWordEngineBase[OpenWakeWordOptions, _OpenWakeStream]):
    """One openWakeWord model; each stream runs its own TFLite interpreters."""

    def __init__(self, context: EngineContext, options: OpenWakeWordOptions) -> None:
        info = WakeWordInfo(context.model.name, model_phrase(context.model.model))
        super().__init__(context, options, info)

    def load(self) -> None:
        self.model_path = resolve_model(self._context.model.model)
        # Fail at startup, not on the first request, if the model or runtime is broken.
        _OpenWakeStream(self).close()
        _LOGGER.info("openWakeWord %s loaded from %s", self.info.name, self.model_path)

    def _open_stream(self) -> _OpenWakeStream:
        return _OpenWakeStream(self)


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.WAKE,
    description=(
        "openWakeWord wake words (TFLite): alexa, hey_jarvis, hey_mycroft, hey_rhasspy, okay_nabu"
    ),
    factory=OpenWakeWordEngine,
    options_model=OpenWakeWordOptions,
    requires=("pyopen_wakeword",),
    extra=ENGINE_NAME,
)
