"""Wyoming ``info``: what the hub serves, as programs, models and voices.

One program per engine plugin for each of ASR, TTS and wake words; the
default model's program comes first (clients that do not select a program
use the first one). Attribution names the engine's authors and the version
of the package that provides the model.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Sequence
from typing import Any

from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Info,
    TtsProgram,
    TtsVoice,
    TtsVoiceSpeaker,
    WakeModel,
    WakeProgram,
)

from edgevoice import __version__
from edgevoice.engines.base import EngineKind, VoiceInfo, WakeWordInfo
from edgevoice.hub import EngineHub, LoadedModel
from edgevoice.voices import StoredVoice

_EDGEVOICE = Attribution(name="edgevoice", url="")  # no public home page yet
# engine plugin -> (attribution, distribution whose version is the model version)
_ENGINE_ATTRIBUTION: dict[str, tuple[Attribution, str]] = {
    "faster-whisper": (
        Attribution(
            name="SYSTRAN (faster-whisper), OpenAI (Whisper)",
            url="https://github.com/SYSTRAN/faster-whisper",
        ),
        "faster-whisper",
    ),
    "piper": (
        Attribution(
            name="Open Home Foundation (Piper)", url="https://github.com/OHF-Voice/piper1-gpl"
        ),
        "piper-tts",
    ),
    "microwakeword": (
        Attribution(
            name="Kevin Ahrendt (microWakeWord)", url="https://github.com/kahrendt/microWakeWord"
        ),
        "pymicro-wakeword",
    ),
}


@functools.cache
def _dist_version(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _engine_attribution(engine: str) -> tuple[Attribution, str | None]:
    known = _ENGINE_ATTRIBUTION.get(engine)
    if known is not None:
        return known[0], _dist_version(known[1])
    return Attribution(name=f"{engine} (edgevoice engine plugin)", url=""), None


def programs(models: Sequence[LoadedModel[Any]]) -> dict[str, list[LoadedModel[Any]]]:
    """Models grouped into Wyoming programs, one per engine plugin, in config order."""
    grouped: dict[str, list[LoadedModel[Any]]] = {}
    for model in models:
        grouped.setdefault(model.slot.plugin.name, []).append(model)
    # The default model's program first: clients that do not select a
    # program use the first one.
    return dict(sorted(grouped.items(), key=lambda item: not any(m.default for m in item[1])))


def build_info(
    hub: EngineHub,
    *,
    server_endpointing: bool = False,
    library_voices: Sequence[StoredVoice] = (),
) -> Info:
    """The ``info`` answer: one program per engine for ASR, TTS and wake words.

    ``server_endpointing``: the server ends utterances itself (its VAD), so ASR
    programs say ``requires_external_vad = false``.
    """
    asr: list[AsrProgram] = []
    for engine, models in programs(hub.models(EngineKind.ASR)).items():
        attribution, version = _engine_attribution(engine)
        ordered = sorted(models, key=lambda m: not m.default)
        asr.append(
            AsrProgram(
                name=engine,
                attribution=_EDGEVOICE,
                installed=True,
                description=f"edgevoice: {models[0].slot.plugin.description}",
                version=__version__,
                models=[
                    AsrModel(
                        name=m.name,
                        attribution=attribution,
                        installed=True,
                        description=f"{engine} {m.config.model}",
                        version=version,
                        languages=list(m.engine.capabilities.languages),
                    )
                    for m in ordered
                ],
                supports_transcript_streaming=True,
                requires_external_vad=not server_endpointing,
            )
        )
    tts: list[TtsProgram] = []
    for engine, models in programs(hub.models(EngineKind.TTS)).items():
        attribution, version = _engine_attribution(engine)
        voices: list[TtsVoice] = []
        if any(m.engine.capabilities.cloning for m in models):
            # Stored voices are spoken by the cloning model (hub.resolve_voice).
            voices.extend(
                TtsVoice(
                    name=stored.id,
                    attribution=_EDGEVOICE,
                    installed=True,
                    description=f"{stored.name} (voice library)",
                    version=None,
                    languages=[],
                )
                for stored in library_voices
            )
        for m in sorted(models, key=lambda m: not m.default):
            caps = m.engine.capabilities
            # An on-demand model never loaded yet lists its name as its voice.
            for voice in caps.voices or (VoiceInfo(m.name, ()),):
                voices.append(
                    TtsVoice(
                        name=voice.name,
                        attribution=attribution,
                        installed=True,
                        description=voice.description or f"{engine} {m.config.model}",
                        version=version,
                        languages=list(voice.languages),
                        speakers=[TtsVoiceSpeaker(s) for s in voice.speakers] or None,
                    )
                )
        tts.append(
            TtsProgram(
                name=engine,
                attribution=_EDGEVOICE,
                installed=True,
                description=f"edgevoice: {models[0].slot.plugin.description}",
                version=__version__,
                voices=voices,
                supports_synthesize_streaming=True,
            )
        )
    wake: list[WakeProgram] = []
    for engine, models in programs(hub.models(EngineKind.WAKE)).items():
        attribution, version = _engine_attribution(engine)
        wake.append(
            WakeProgram(
                name=engine,
                attribution=_EDGEVOICE,
                installed=True,
                description=f"edgevoice: {models[0].slot.plugin.description}",
                version=__version__,
                models=[
                    WakeModel(
                        name=m.name,
                        attribution=attribution,
                        installed=True,
                        description=ww.phrase,
                        version=version,
                        languages=list(ww.languages),
                        phrase=ww.phrase,
                    )
                    for m in models
                    # An on-demand model never loaded yet is listed by its name.
                    for ww in m.engine.capabilities.wake_words
                    or (WakeWordInfo(m.name, m.name, ()),)
                ],
            )
        )
    return Info(asr=asr, tts=tts, wake=wake)


def base_language(code: str) -> str:
    """``en_US``/``en-us`` → ``en``."""
    return code.replace("_", "-").split("-")[0].lower()
