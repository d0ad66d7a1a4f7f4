"""Run the torch engines on a GPU through the hub: the CUDA paths CI cannot run.

CI has no GPU, so the test suite covers device *selection* table-driven and runs
every engine on CPU. On a machine with an NVIDIA GPU this script loads each
given model through :class:`~edgevoice.hub.EngineHub` with ``device = "auto"``
(the daemon's default), checks that the hub chose CUDA, and runs requests
through the same calls the protocols make:

- ``--whisper DIR``: transformers Whisper (float16 on CUDA). With ``--expect``
  the transcript of each ``--wav`` must hold at least 80 % of its words
  (order-free, as the tests compare); three requests at once must be batched.
- ``--sensevoice DIR`` / ``--paraformer DIR`` (optionally ``--fsmn-vad DIR``):
  FunASR models; random-weight models say nothing, so only shapes and bounds.
- ``--cosyvoice DIR``: CosyVoice 2 cloning with ``fp16 = true``, streamed and
  whole, from the first ``--wav`` as the reference voice.

Prints one JSON line per check and exits 1 if any check failed::

    python scripts/cuda_check.py --whisper ~/models/whisper-tiny.en \\
        --wav living_room_light_en.wav --expect "Turn on the living room light."
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgevoice.audio import decode
from edgevoice.config import HttpConfig, ModelConfig, MqttConfig, Settings, WyomingConfig
from edgevoice.engines.base import EngineKind, SynthesizeOptions, TranscribeOptions, VoiceReference
from edgevoice.hub import EngineHub

RATE_HZ = 16000


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _overlap(got: str, expected: str) -> float:
    want, have = _words(expected), set(_words(got))
    return sum(1 for w in want if w in have) / max(1, len(want))


def _settings(
    cache: Path, asr: list[ModelConfig], tts: list[ModelConfig], device: str = "auto"
) -> Settings:
    return Settings(
        cache_dir=cache,
        state_dir=cache / "state",
        offline=True,
        device=device,
        asr=asr,
        tts=tts,
        wake=[],
        vad=[],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(enabled=False),
        mqtt=MqttConfig(enabled=False),
    )


def _device_of(hub: EngineHub, kind: str, name: str) -> str:
    return hub.get(EngineKind(kind), name).slot.device.device


async def _whisper(args: argparse.Namespace, cache: Path, want: str) -> dict[str, Any]:
    entry = ModelConfig(
        name="whisper",
        engine="transformers-whisper",
        model=str(args.whisper),
        max_concurrency=3,
        options={"batch_window_ms": 50, "temperature": [0.0]},
    )
    audio = [await asyncio.to_thread(decode, wav, rate_hz=RATE_HZ) for wav in args.wav]
    async with EngineHub(_settings(cache, [entry], [], args.device)) as hub:
        device = _device_of(hub, "asr", "whisper")
        engine: Any = hub.asr("whisper").engine
        assert device.startswith(want), f"hub chose {device}, wanted {want}"
        results = []
        for clip, wav in zip(audio, args.wav, strict=True):
            times = []
            for _ in range(args.repeat):  # the first run includes CUDA's warm-up
                started = time.perf_counter()
                transcript = await hub.transcribe(clip, TranscribeOptions(word_timestamps=True))
                times.append(round(time.perf_counter() - started, 3))
            words = [w for s in transcript.segments for w in s.words]
            assert words and words[-1].end_s <= transcript.duration_s + 0.05
            results.append({"wav": wav.name, "text": transcript.text, "s": times})
        for expected, result in zip(args.expect, results, strict=False):
            score = _overlap(result["text"], expected)
            assert score >= 0.8, f"{result['text']!r} vs {expected!r}"
        before = engine.batch_stats.requests
        batch = await asyncio.gather(*(hub.transcribe(audio[0]) for _ in range(3)))
        assert engine.batch_stats.requests == before + 3 and engine.batch_stats.largest >= 2
        for transcript in batch:
            if args.expect:
                assert _overlap(transcript.text, args.expect[0]) >= 0.8, transcript.text
        return {
            "device": device,
            "dtype": str(engine._dtype),
            "results": results,
            "largest_batch": engine.batch_stats.largest,
        }


async def _funasr(args: argparse.Namespace, cache: Path, want: str) -> dict[str, Any]:
    entries = []
    if args.sensevoice:
        entries.append(ModelConfig(name="sensevoice", engine="funasr", model=str(args.sensevoice)))
        if args.fsmn_vad:
            entries.append(
                ModelConfig(
                    name="sensevoice-vad",
                    engine="funasr",
                    model=str(args.sensevoice),
                    options={"vad_model": str(args.fsmn_vad), "max_segment_s": 1.0},
                )
            )
    if args.paraformer:
        entries.append(ModelConfig(name="paraformer", engine="funasr", model=str(args.paraformer)))
    audio = await asyncio.to_thread(decode, args.wav[0], rate_hz=RATE_HZ)
    out: dict[str, Any] = {}
    async with EngineHub(_settings(cache, entries, [], args.device)) as hub:
        for entry in entries:
            device = _device_of(hub, "asr", entry.name)
            assert device.startswith(want), f"{entry.name}: hub chose {device}, wanted {want}"
            started = time.perf_counter()
            transcript = await hub.transcribe(audio, model=entry.name)
            elapsed = time.perf_counter() - started
            assert "<|" not in transcript.text, transcript.text
            for segment in transcript.segments:
                assert 0 <= segment.start_s <= segment.end_s <= transcript.duration_s + 0.05
            out[entry.name] = {
                "device": device,
                "segments": len(transcript.segments),
                "s": round(elapsed, 3),
            }
    return out


async def _cosyvoice(args: argparse.Namespace, cache: Path, want: str) -> dict[str, Any]:
    entry = ModelConfig(
        name="cosy",
        engine="cosyvoice",
        model=str(args.cosyvoice),
        options={"fp16": want == "cuda" and not args.no_fp16},
    )
    reference_audio = await asyncio.to_thread(decode, args.wav[0])
    reference = VoiceReference(
        reference_audio.samples,
        reference_audio.rate_hz,
        args.expect[0] if args.expect else None,
    )
    options = SynthesizeOptions(reference=reference)
    async with EngineHub(_settings(cache, [], [entry], args.device)) as hub:
        device = _device_of(hub, "tts", "cosy")
        engine: Any = hub.get(EngineKind.TTS, "cosy").engine
        assert device.startswith(want), f"hub chose {device}, wanted {want}"
        runs = []
        for _ in range(args.repeat):  # the first run includes CUDA's warm-up
            started = time.perf_counter()
            _model, rate, chunks = await hub.synthesize("Good morning. The lights are on.", options)
            first_s = None
            parts = []
            async for chunk in chunks:
                first_s = first_s if first_s is not None else time.perf_counter() - started
                parts.append(chunk)
            runs.append((round(first_s or 0.0, 3), round(time.perf_counter() - started, 3)))
        samples = np.concatenate(parts)
        assert samples.dtype == np.float32 and samples.size > 0
        assert np.all(np.isfinite(samples)) and np.all(np.abs(samples) <= 1.0)
        whole = await hub.synthesize_all("Hello there.", options)
        assert whole.samples.size > 0 and np.all(np.isfinite(whole.samples))
        return {
            "device": device,
            "fp16": bool(engine._fp16),
            "chunks": len(parts),
            "audio_s": round(samples.size / rate, 3),
            "first_chunk_and_total_s": runs,
        }


async def _main(args: argparse.Namespace) -> int:
    checks: list[tuple[str, Callable[..., Awaitable[dict[str, Any]]]]] = []
    if args.whisper:
        checks.append(("transformers-whisper", _whisper))
    if args.sensevoice or args.paraformer:
        checks.append(("funasr", _funasr))
    if args.cosyvoice:
        checks.append(("cosyvoice", _cosyvoice))
    failed = 0
    for name, check in checks:
        with tempfile.TemporaryDirectory() as cache:
            try:
                result = await check(args, Path(cache), args.want)
                print(json.dumps({"check": name, "ok": True, **result}), flush=True)
            except Exception as exc:  # one check's failure is reported, the others still run
                failed += 1
                print(json.dumps({"check": name, "ok": False, "error": repr(exc)}), flush=True)
                traceback.print_exc()
    return 1 if failed or not checks else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--whisper", type=Path)
    parser.add_argument("--sensevoice", type=Path)
    parser.add_argument("--paraformer", type=Path)
    parser.add_argument("--fsmn-vad", type=Path)
    parser.add_argument("--cosyvoice", type=Path)
    parser.add_argument("--wav", type=Path, action="append", required=True)
    parser.add_argument("--expect", action="append", default=[], help="the text of each --wav")
    parser.add_argument("--no-fp16", action="store_true", help="CosyVoice in float32 on CUDA")
    parser.add_argument("--device", default="auto", help="the daemon's device setting")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per check")
    parser.add_argument("--want", default="cuda", help="the device family the hub must choose")
    sys.exit(asyncio.run(_main(parser.parse_args())))


if __name__ == "__main__":
    main()
