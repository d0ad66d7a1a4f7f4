"""Where edgevoice's memory goes: ``python -m bench.memory``.

1. Import stages in a fresh interpreter (RSS from /proc/self/smaps_rollup
   after each): the interpreter, the daemon's CLI, each engine library.
2. The default daemon (as ``python -m bench`` runs it) under environment
   variants (``MALLOC_ARENA_MAX``): RSS when ready and after one
   transcription and one synthesis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import _free_port, _ours, load_clips, synthesize, throughput, transcribe

STAGES = [
    ("python", "pass"),
    ("edgevoice.cli", "import edgevoice.cli"),
    ("wyoming face", "import edgevoice.protocols.wyoming"),
    ("http face", "import edgevoice.protocols.http"),
    ("mqtt face", "import edgevoice.protocols.mqtt"),
    ("numpy", "import numpy"),
    (
        "faster_whisper (PyAV deferred, as the engine loads it)",
        "from edgevoice.memory import defer_import; defer_import('av'); import faster_whisper",
    ),
    ("onnxruntime", "import onnxruntime"),
    ("piper", "import piper"),
    ("PyAV (first compressed upload)", "import av; av.open"),
]

_PROBE = """
import re, sys, json
def rss():
    text = open('/proc/self/smaps_rollup').read()
    return int(re.search(r'^Rss:\\s+(\\d+) kB', text, re.M).group(1)) / 1024
out = []
for name, code in json.loads(sys.argv[1]):
    try:
        exec(code)
    except Exception as exc:
        out.append((name, None, repr(exc)))
        continue
    out.append((name, rss(), ''))
print(json.dumps(out))
"""


def import_stages() -> list[tuple[str, float | None, str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(STAGES)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [(row[0], row[1], row[2]) for row in json.loads(done.stdout)]


async def daemon(env_extra: dict[str, str]) -> tuple[float, float, float]:
    """RSS ready, after one transcription and one synthesis, and after the
    benchmark's 4-client load (as ``python -m bench`` measures it)."""
    import os

    env = {**os.environ, **env_extra}
    clips = load_clips(quick=False)
    with tempfile.TemporaryDirectory() as tmp:
        server = _ours(Path(tmp), _free_port(), env)
        await server.start()
        try:
            ready = server.rss_mb()
            await transcribe(server.port, clips[0], paced=False, trailing_s=0.5)
            await synthesize(server.port, streaming=False)
            single = server.rss_mb()
            await throughput(server.port, clips, clients=4, per_client=3)
            await synthesize(server.port, streaming=True)
            return ready, single, server.rss_mb()
        finally:
            await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also run the daemon with this environment variable (repeatable)",
    )
    args = parser.parse_args()
    previous = 0.0
    print("| import stage | RSS (MB) | added |\n|---|---|---|")
    for name, rss, error in import_stages():
        if rss is None:
            print(f"| {name} | – | {error} |")
            continue
        print(f"| {name} | {rss:.0f} | {rss - previous:+.0f} |")
        previous = rss
    if args.skip_daemon:
        return
    print(
        "\n| daemon variant | RSS ready (MB) | after ASR + TTS | after 4-client load |"
        "\n|---|---|---|---|"
    )
    variants: list[tuple[str, dict[str, str]]] = [("default", {})]
    variants += [(v, dict([v.split("=", 1)])) for v in args.env]
    for label, env in variants:
        ready, single, loaded = asyncio.run(daemon(env))
        print(f"| {label} | {ready:.0f} | {single:.0f} | {loaded:.0f} |", flush=True)


if __name__ == "__main__":
    main()
