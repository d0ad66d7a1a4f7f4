#!/usr/bin/env bash
# The README's first command: install edgevoice with the built-in offline
# defaults (Whisper tiny.en, Piper en_US-joe-medium, wake words, VAD) into
# .venv and run the daemon in the foreground. Extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
source scripts/ensure-venv.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[default]'
exec .venv/bin/edgevoice serve "$@"
