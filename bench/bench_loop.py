"""The local voice loop: latency to the transcript, idle CPU, wake-word false accepts.

Not a test: run it by hand on an otherwise idle machine.

    python bench/bench_loop.py                    # everything (needs mosquitto)
    python bench/bench_loop.py --only idle        # latency | idle | false-accepts
    python bench/bench_loop.py --speech-min 10    # minutes of speech for false accepts

One process loads what the default daemon loads for the loop: Whisper tiny.en
(int8, beam 1), Piper en_US-joe-medium, the four built-in microWakeWord models
and Silero VAD. The microphone is the sound card mock of the tests
(:class:`~edgevoice.audio_io.devices.MockSoundCard`) at real-time pace, so the
loop runs exactly as on a device, without one.

Measured:

- **Latency** (standalone mode, ``[audio_io.mqtt]`` on a local Mosquitto):
  "Hey Jarvis" (Piper), 1 s, then each English test command, then silence.
  From the microphone block holding the last sample of speech to the
  ``<base>/asr/transcript`` message at a subscriber, and from the end-point
  (``finish_silence_s`` of silence later, when the loop decides the command
  is over) to that message. Target: ≤ 0.5 s from the end-point.
- **Idle CPU**: the loop listening for the four wake words on silence (and on
  the test clips without a wake word) for ``--idle-s`` seconds at real time;
  process CPU seconds per wall second (all threads), as % of one core.
  Target: ≤ 10 %.
- **False accepts**: ``--speech-min`` minutes of speech without a wake word
  (Piper reading sentences drawn from the Python standard library's
  documentation, at varied speeds, plus the test clips), fed to the same wake
  session as the loop's (all four words); detections counted, per word.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgevoice.audio import decode  # noqa: E402
from edgevoice.audio_io.devices import CAPTURE_RATE_HZ, Microphone, MockSoundCard  # noqa: E402
from edgevoice.audio_io.server import AudioIoServer  # noqa: E402
from edgevoice.config import (  # noqa: E402
    AudioIoConfig,
    HttpConfig,
    ModelConfig,
    MqttConfig,
    Settings,
    WyomingConfig,
)
from edgevoice.engines.base import FloatAudio, SynthesizeOptions  # noqa: E402
from edgevoice.hub import EngineHub  # noqa: E402
from edgevoice.protocols.base import set_peers  # noqa: E402
from edgevoice.protocols.mqtt import MqttBridge  # noqa: E402

TESTDATA = REPO.parent / "shared" / "testdata"
COMMANDS = ("turn_on_the_living_room_lamp.wav", "living_room_light_en.wav")
OTHER_CLIPS = ("living_room_light_de.wav", "hotwords.mp3")
WAKE_WORDS = ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")


def _settings(cache_dir: Path, state_dir: Path) -> Settings:
    return Settings(
        cache_dir=cache_dir,
        state_dir=state_dir,
        asr=[
            ModelConfig(
                name="tiny-en",
                engine="faster-whisper",
                model="tiny.en",
                options={"min_window_s": 10.0},  # as the built-in default model
            )
        ],
        tts=[
            ModelConfig(
                name="joe",
                engine="piper",
                model="en_US-joe-medium",
                options={"noise_scale": 0.0, "noise_w_scale": 0.0},
            ),
            ModelConfig(name="joe-varied", engine="piper", model="en_US-joe-medium"),
        ],
        wake=[ModelConfig(name=w, engine="microwakeword", model=w) for w in WAKE_WORDS],
        vad=[ModelConfig(name="silero", engine="silero-vad", model="silero")],
        wyoming=WyomingConfig(enabled=False),
        http=HttpConfig(enabled=False),
    )


def _silence(seconds: float) -> FloatAudio:
    return np.zeros(int(seconds * CAPTURE_RATE_HZ), dtype=np.float32)


def _clip(name: str) -> FloatAudio:
    return decode(TESTDATA / name, rate_hz=CAPTURE_RATE_HZ).samples


def _speech_end(samples: FloatAudio) -> int:
    """Index just after the last sample louder than -40 dBFS (20 ms windows)."""
    window = CAPTURE_RATE_HZ // 50
    level = 10 ** (-40 / 20)
    for end in range(len(samples), 0, -window):
        if float(np.sqrt(np.mean(samples[max(0, end - window) : end] ** 2))) > level:
            return end
    return 0


class _TimedCard(MockSoundCard):
    """The test sound card, noting when each microphone block was delivered."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delivered: list[tuple[int, float]] = []
        """(samples delivered so far, time.monotonic()) per block."""

    async def open_input(self, spec: str, *, block_samples: int, queue_blocks: int) -> Microphone:
        mic = await super().open_input(spec, block_samples=block_samples, queue_blocks=queue_blocks)
        card = self
        total = 0

        class Timed:
            name = mic.name

            async def read(self) -> FloatAudio:
                nonlocal total
                block = await mic.read()
                total += len(block)
                card.delivered.append((total, time.monotonic()))
                return block

            async def close(self) -> None:
                await mic.close()

        return Timed()

    def time_of(self, sample: int) -> float:
        """When the block holding ``sample`` was read; a sample not read yet (the
        transcript came before it) is placed at real-time pace after the last."""
        for total, at in self.delivered:
            if total >= sample:
                return at
        if not self.delivered:
            raise LookupError(sample)
        total, at = self.delivered[-1]
        return at + (sample - total) / CAPTURE_RATE_HZ


# ------------------------------------------------------------------ latency


class _Broker:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.process = subprocess.Popen(
            [exe, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def bench_latency(hub: EngineHub, hey: FloatAudio, rounds: int, workdir: Path) -> None:
    import aiomqtt

    broker = _Broker(workdir)
    try:
        base_settings = hub.settings.model_copy(
            update={
                "mqtt": MqttConfig(
                    enabled=True,
                    url=f"mqtt://127.0.0.1:{broker.port}",
                    node_id="bench",
                    discovery=False,
                ),
                "audio_io": AudioIoConfig(enabled=True, wake_words=["hey_jarvis"]),
            }
        )
        bridge = MqttBridge(base_settings, hub)
        await bridge.start()
        await bridge.wait_online(30)
        from_speech: list[float] = []
        from_endpoint: list[float] = []
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            await client.subscribe(f"{bridge.base}/asr/transcript")
            for _round in range(rounds):
                for name in COMMANDS:
                    command = _clip(name)
                    lead = np.concatenate([_silence(0.5), hey, _silence(1.0)])
                    card = _TimedCard(clips=[lead, command, _silence(3.0)], pace=1.0)
                    server = AudioIoServer(base_settings, hub, devices=card)
                    set_peers(hub, functools.partial(list, [bridge, server]))
                    await server.start()
                    try:
                        message = await asyncio.wait_for(anext(client.messages), 60)
                        arrived = time.monotonic()
                    finally:
                        await server.stop(1.0)
                    text = json.loads(bytes(message.payload))["text"]
                    speech_end = len(lead) + _speech_end(command)
                    endpoint = speech_end + round(
                        base_settings.audio_io.finish_silence_s * CAPTURE_RATE_HZ
                    )
                    from_speech.append(arrived - card.time_of(speech_end))
                    from_endpoint.append(arrived - card.time_of(endpoint))
                    print(
                        f"  {name}: {text!r}: {from_speech[-1]:.3f} s after the speech, "
                        f"{from_endpoint[-1]:.3f} s after the end-point",
                        flush=True,
                    )
        await bridge.stop(1.0)
        finish = base_settings.audio_io.finish_silence_s
        print(
            f"latency (median of {len(from_speech)}): end of speech → MQTT transcript "
            f"{statistics.median(from_speech):.3f} s (finish_silence_s = {finish}); "
            f"end-point → transcript {statistics.median(from_endpoint):.3f} s"
        )
    finally:
        broker.stop()


# --------------------------------------------------------------------- idle


async def bench_idle(hub: EngineHub, seconds: float) -> None:
    settings = hub.settings.model_copy(update={"audio_io": AudioIoConfig(enabled=True)})
    for label, clips in (
        ("silence", [_silence(seconds + 5)]),
        ("speech without a wake word", [_clip(n) for n in (*COMMANDS, *OTHER_CLIPS)] * 50),
    ):
        card = MockSoundCard(clips=clips, pace=1.0)
        server = AudioIoServer(settings, hub, devices=card)
        await server.start()
        try:
            await asyncio.wait_for(server.running.wait(), 30)
            await asyncio.sleep(2.0)  # settle
            cpu0, wall0 = time.process_time(), time.monotonic()
            await asyncio.sleep(seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        finally:
            await server.stop(1.0)
        print(
            f"idle listening ({len(WAKE_WORDS)} wake words, {label}): "
            f"{100 * cpu / wall:.1f} % of one core over {wall:.0f} s"
        )


# ------------------------------------------------------------ false accepts


def _sentences(limit_words: int) -> list[str]:
    """English sentences from the standard library's docstrings, without wake words."""
    import argparse as m1
    import asyncio as m2
    import collections as m3
    import email as m4
    import json as m5
    import logging as m6
    import pathlib as m7
    import subprocess as m8
    import textwrap as m9
    import threading as m10

    banned = re.compile(r"jarvis|nabu|alexa|mycroft", re.IGNORECASE)
    found: list[str] = []
    seen: set[str] = set()
    for module in (m1, m2, m3, m4, m5, m6, m7, m8, m9, m10):
        for obj in [module, *vars(module).values()]:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for raw in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                sentence = raw.strip()
                words = sentence.split()
                if not 6 <= len(words) <= 30 or sentence in seen or banned.search(sentence):
                    continue
                if not re.fullmatch(r"[A-Za-z0-9 ,.;:'()!?-]+", sentence):
                    continue  # code, markup
                seen.add(sentence)
                found.append(sentence)
    random.Random(7).shuffle(found)
    out, words_so_far = [], 0
    for sentence in found:
        out.append(sentence)
        words_so_far += len(sentence.split())
        if words_so_far >= limit_words:
            break
    return out


async def bench_false_accepts(hub: EngineHub, minutes: float) -> None:
    target_s = minutes * 60
    rng = random.Random(11)
    pieces: list[FloatAudio] = [_clip(n) for n in (*COMMANDS, *OTHER_CLIPS)]
    total_s = sum(len(p) for p in pieces) / CAPTURE_RATE_HZ
    started = time.monotonic()
    for sentence in _sentences(int(target_s * 3)):
        if total_s >= target_s:
            break
        options = SynthesizeOptions(voice="joe-varied", speed=rng.choice((0.85, 1.0, 1.15)))
        audio = await hub.synthesize_all(sentence, options)
        samples = audio.at_rate(CAPTURE_RATE_HZ).samples
        pieces.extend([samples, _silence(rng.uniform(0.2, 0.8))])
        total_s += len(pieces[-2]) / CAPTURE_RATE_HZ + len(pieces[-1]) / CAPTURE_RATE_HZ
    print(
        f"  synthesized {total_s / 60:.1f} min of speech in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    stream = np.concatenate(pieces)
    detections: dict[str, int] = dict.fromkeys(WAKE_WORDS, 0)
    block = 1024
    async with hub.wake_session() as session:
        for start in range(0, len(stream), block * 16):
            for found in await session.process(stream[start : start + block * 16], CAPTURE_RATE_HZ):
                detections[found.name] += 1
    per_hour = {w: n * 3600 / total_s for w, n in detections.items()}
    print(
        f"false accepts on {total_s / 60:.1f} min of speech without a wake word: "
        + ", ".join(f"{w} {n} ({per_hour[w]:.1f}/h)" for w, n in detections.items())
    )


# --------------------------------------------------------------------- main


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("latency", "idle", "false-accepts"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--speech-min", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        async with EngineHub(_settings(work / "cache", work / "state")) as hub:
            hey = (
                (await hub.synthesize_all("Hey Jarvis.", SynthesizeOptions(voice="joe")))
                .at_rate(CAPTURE_RATE_HZ)
                .samples
            )
            if args.only in (None, "idle"):
                await bench_idle(hub, args.idle_s)
            if args.only in (None, "latency"):
                await bench_latency(hub, hey, args.rounds, work)
            if args.only in (None, "false-accepts"):
                await bench_false_accepts(hub, args.speech_min)


if __name__ == "__main__":
    asyncio.run(main())
