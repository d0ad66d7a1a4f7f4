#!/usr/bin/env bash
# The README's test command: installs test dependencies (Python and Debian),
# then lint, type check and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# Services and tools the tests start themselves (loopback only).
need_apt=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2' || need_apt+=(libportaudio2)
# The web page's tests drive Debian's Chromium through its WebDriver.
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
fi

source scripts/ensure-venv.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# CosyVoice 2's runtime declares torchaudio and CUDA-only requirements it does not import:
# it installs without them (edgevoice[cosyvoice], part of .[test], lists what it needs).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'cosyvoice2-eu==0.2.8'

.venv/bin/ruff format --check edgevoice tests bench scripts
.venv/bin/ruff check edgevoice tests bench scripts
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
