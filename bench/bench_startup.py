"""Cold start to READY=1: ``python -m edgevoice serve`` with the offline defaults.

Starts a fresh daemon process per run the way systemd does (``NOTIFY_SOCKET``
pointing at a socket this script listens on) and times, from the spawn:

- ``imports``: the first ``STATUS=Loading models…`` (interpreter + imports + config),
- ``models``: ``STATUS=Models loaded`` (every engine loaded, in parallel threads),
- ``ready``: ``READY=1`` (every listener bound: Wyoming, HTTP).

The models are the built-in defaults (tiny.en, en_US-joe-medium, the four
microWakeWord words, Silero VAD), all from installed packages (``offline =
true``); Wyoming and HTTP listen on loopback port 0; MQTT is off (it needs a
broker). Each run uses a new empty cache directory (a first start: Piper's
voice is cut before its decoder then), or with ``--warm-cache`` one cache
directory that an unmeasured start filled (a restart).

    python bench/bench_startup.py [--runs 5] [--zeroconf] [--warm-cache]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT_S = 300.0


def _config(tmp: Path, zeroconf: bool, cache: Path) -> Path:
    config = tmp / "config.toml"
    config.write_text(
        f'cache_dir = "{cache}"\n'
        f'state_dir = "{tmp / "state"}"\n'
        "offline = true\n"
        "[wyoming]\n"
        'uri = "tcp://127.0.0.1:0"\n'
        f"zeroconf = {'true' if zeroconf else 'false'}\n"
        "[http]\n"
        'host = "127.0.0.1"\n'
        "port = 0\n"
        "[mqtt]\n"
        "enabled = false\n"
    )
    return config


def one_run(zeroconf: bool, cache: Path | None = None) -> dict[str, float]:
    """Seconds from spawn to each milestone (``cache``: the cache directory to
    use; a new empty one if None)."""
    with tempfile.TemporaryDirectory(prefix="edgevoice-bench-") as name:
        tmp = Path(name)
        config = _config(tmp, zeroconf, cache or tmp / "cache")
        notify = tmp / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(notify))
            env = {**os.environ, "NOTIFY_SOCKET": str(notify), "JOURNAL_STREAM": "0:0"}
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-m", "edgevoice", "serve", "--config", str(config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            marks: dict[str, float] = {}
            try:
                while "ready" not in marks:
                    sock.settimeout(max(0.1, TIMEOUT_S - (time.monotonic() - started)))
                    try:
                        message = sock.recv(4096).decode()
                    except TimeoutError:
                        raise SystemExit("no READY=1 within the timeout") from None
                    now = time.monotonic() - started
                    if "STATUS=Loading models" in message:
                        marks.setdefault("imports", now)
                    if "STATUS=Models loaded" in message:
                        marks.setdefault("models", now)
                    if "READY=1" in message:
                        marks["ready"] = now
                        print(f"    {message.splitlines()[-1]}", file=sys.stderr)
            finally:
                process.terminate()
                _out, err = process.communicate(timeout=60)
            if process.returncode != 0:
                raise SystemExit(f"daemon exited {process.returncode}:\n{err.decode()}")
            loads = [line for line in err.decode().splitlines() if " Loaded " in line]
            for line in loads:
                print(f"    {line}", file=sys.stderr)
            return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--zeroconf", action="store_true", help="advertise Wyoming over mDNS")
    parser.add_argument(
        "--warm-cache", action="store_true", help="restarts: one cache dir, filled first"
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgevoice-cache-") as shared:
        cache = Path(shared) if args.warm_cache else None
        if cache is not None:
            print("filling the cache (not measured)", file=sys.stderr)
            one_run(args.zeroconf, cache)
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs}", file=sys.stderr)
            rows.append(one_run(args.zeroconf, cache))
    kind = "restart, cache filled" if args.warm_cache else "first start, empty cache"
    print(f"cold start to READY=1 ({kind}; {args.runs} runs, {os.cpu_count()} CPUs), seconds:")
    print(f"{'milestone':<10} {'median':>7} {'min':>7} {'max':>7}")
    for key in ("imports", "models", "ready"):
        values = [row[key] for row in rows]
        print(
            f"{key:<10} {statistics.median(values):>7.2f} {min(values):>7.2f} {max(values):>7.2f}"
        )


if __name__ == "__main__":
    main()
