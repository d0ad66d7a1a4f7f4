# Sourced by serve.sh and test.sh: make .venv with $PYTHON. Debian's python3
# lacks the venv module until python3-venv is installed.
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "python${pyver}-venv" >/dev/null
    fi
    "$PYTHON" -m venv .venv
fi
