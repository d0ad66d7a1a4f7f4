"""Wake words with microWakeWord (TFLite). Extra: ``edgevoice[microwakeword]``.

``model`` is a built-in model of ``pymicro-wakeword`` (``okay_nabu``,
``hey_jarvis``, ``alexa``, ``hey_mycroft``) or a path to a microWakeWord
``.json`` config with its ``.tflite`` beside it. One config entry is one wake
word; its public ``name`` is what Wyoming ``detect{names}`` and detections use.

A model's interpreter carries streaming state, so every stream gets its own
interpreter (creating one takes about a millisecond).
"""

from __future__ import annotations

import json
import logging
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

ENGINE_NAME = "microwakeword"
BUILTIN_MODELS = ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")


class MicroWakeWordOptions(EngineOptions):
    probability_cutoff: float | None = Field(default=None, gt=0, lt=1)
    """Detection threshold; ``None`` uses the model's own (0.85-0.97)."""
    sliding_window_size: int | None = Field(default=None, ge=1, le=50)
    """Probabilities averaged per decision; ``None`` uses the model's own."""
    refractory_s: float = Field(default=2.0, ge=0)
    """After a detection, the same stream ignores this wake word this long."""


def resolve_config(model: str) -> Path:
    """The microWakeWord JSON config for a built-in name or a path (blocking)."""
    if model in BUILTIN_MODELS:
        import pymicro_wakeword

        return Path(pymicro_wakeword.__file__).parent / "models" / f"{model}.json"
    path = Path(model).expanduser()
    if path.suffix == ".tflite":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(
            f"wake word model {model!r} not found: use one of {', '.join(BUILTIN_MODELS)} "
            "or a path to a microWakeWord .json config"
        )
    return path


class _MicroWakeStream:
    """Per-connection detector state: features front end + one interpreter."""

    def __init__(self, engine: MicroWakeWordEngine) -> None:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

        assert engine.model_path is not None
        self._name = engine.info.name
        self._model = MicroWakeWord.from_config(engine.model_path)
        options = engine.options
        if options.probability_cutoff is not None:
            self._model.probability_cutoff = options.probability_cutoff
        if options.sliding_window_size is not None:
            from collections import deque

            self._model.sliding_window_size = options.sliding_window_size
            self._model._probabilities = deque(maxlen=options.sliding_window_size)
        self._features = MicroWakeWordFeatures()
        self._clock = wake_common.DetectionClock(self._name, options.refractory_s)

    def process(self, audio: FloatAudio) -> list[Detection]:
        detections: list[Detection] = []
        self._clock.advance(len(audio))
        for features in self._features.process_streaming(wake_common.to_pcm16(audio)):
            if not self._model.process_streaming(features):
                continue
            if (found := self._clock.detect()) is not None:
                detections.append(found)
        return detections

    def close(self) -> None:
        self._model.close()


class MicroWakeWordEngine(wake_common.WakeWordEngineBase[MicroWakeWordOptions, _MicroWakeStream]):
    """One wake word; each stream runs its own TFLite interpreter."""

    def __init__(self, context: EngineContext, options: MicroWakeWordOptions) -> None:
        info = WakeWordInfo(context.model.name, context.model.model.replace("_", " "))
        super().__init__(context, options, info)

    def load(self) -> None:
        path = resolve_config(self._context.model.model)
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        languages = tuple(raw.get("trained_languages") or ("en",))
        self.model_path = path
        self.info = WakeWordInfo(self._context.model.name, str(raw["wake_word"]), languages)
        # Fail at startup, not on the first request, if the runtime is broken.
        _MicroWakeStream(self).close()

    def _open_stream(self) -> _MicroWakeStream:
        return _MicroWakeStream(self)


PLUGIN = EnginePlugin(
    name=ENGINE_NAME,
    kind=EngineKind.WAKE,
    description="microWakeWord wake words (TFLite): okay_nabu, hey_jarvis, alexa, hey_mycroft",
    factory=MicroWakeWordEngine,
    options_model=MicroWakeWordOptions,
    requires=("pymicro_wakeword",),
    extra=ENGINE_NAME,
)
