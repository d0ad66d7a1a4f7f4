"""The systemd unit, launchd plist, sd_notify wire format, journald logging, install-service."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevoice.cli import main
from edgevoice.config import Settings
from edgevoice.sdnotify import SystemdNotifier
from edgevoice.service import (
    PLIST_PATH,
    UNIT_PATH,
    plan_install,
    python_for,
    render_plist,
    render_unit,
)
from tests.conftest import REPO

UNIT = REPO / "systemd" / "edgevoice.service"
PLIST = REPO / "systemd" / "com.edgevoice.plist"


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (comments skipped; repeated keys kept in order)."""
    directives: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key, []).append(value)
    return directives


# ------------------------------------------------------------------ the unit


def test_checked_in_files_are_the_rendered_templates() -> None:
    assert UNIT.read_text() == render_unit()
    assert PLIST.read_text() == render_plist()


def test_unit_contract() -> None:
    d = unit_directives(UNIT.read_text())
    one = {key: values[-1] for key, values in d.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    # The venv's python directly, no wrapper process.
    assert one["ExecStart"].split() == [
        "/opt/edgevoice/venv/bin/python",
        "-m",
        "edgevoice",
        "serve",
        "--config",
        "/etc/edgevoice/config.toml",
    ]
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["WatchdogSec"] == "30"
    assert one["Restart"] == "on-failure"
    assert one["TimeoutStartSec"] == "15min"
    assert float(one["TimeoutStopSec"]) > Settings.model_fields["shutdown_timeout_s"].default
    assert one["User"] == "edgevoice"
    assert one["SupplementaryGroups"] == "audio"
    for directory in ("ConfigurationDirectory", "StateDirectory", "CacheDirectory"):
        assert one[directory] == "edgevoice"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] == "true"
    assert one["PrivateTmp"] == "true"
    assert one["NoNewPrivileges"] == "true"
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert one["DevicePolicy"] == "closed"
    assert d["DeviceAllow"] == ["char-alsa rw"]
    assert "MemoryDenyWriteExecute" not in d  # CUDA / ONNX Runtime JIT
    text = UNIT.read_text()
    assert "#DeviceAllow=/dev/nvidia-uvm rw" in text
    assert "#DeviceAllow=/dev/nvmap rw" in text
    assert "#LoadCredential=mqtt-password:" in text
    assert "#Environment=EDGEVOICE_MQTT__PASSWORD_FILE=/run/credentials/edgevoice.service/" in text


def _verifiable_unit(tmp_path: Path) -> Path:
    # verify demands that ExecStart's binary exists: the test points it at this
    # interpreter (the only change).
    unit = tmp_path / "edgevoice.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgevoice/venv/bin/python", sys.executable))
    return unit


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd (scripts/test.sh does)")
    return path


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path)
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either

    # verify really checks: a typo in a directive fails it.
    broken = tmp_path / "broken" / "edgevoice.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty"))
    result = subprocess.run(
        [_systemd_analyze(), "verify", str(broken)], capture_output=True, text=True, check=False
    )
    assert "Failed to parse sec value, ignoring: thirty" in result.stderr


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path)
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(
        r"Overall exposure level for edgevoice.service: ([\d.]+) (\w+)", result.stdout
    )
    assert match, result.stdout + result.stderr
    assert float(match[1]) < 3.0, match[0]


def test_launchd_plist() -> None:
    plist = plistlib.loads(PLIST.read_bytes())
    assert plist["Label"] == "com.edgevoice"
    assert plist["ProgramArguments"][:4] == [
        "/opt/edgevoice/venv/bin/python",
        "-m",
        "edgevoice",
        "serve",
    ]
    assert plist["UserName"] == "edgevoice"
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["EnvironmentVariables"]["EDGEVOICE_CACHE_DIR"] == "/usr/local/var/cache/edgevoice"


# ---------------------------------------------------------------- sd_notify


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    name = f"edgevoice-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield "@" + name, sock
    sock.close()


def test_notify_abstract_socket(abstract_listener: tuple[str, socket.socket]) -> None:
    address, sock = abstract_listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready("Serving Wyoming on tcp://0.0.0.0:10300\nHTTP")
    assert sock.recv(4096) == b"READY=1\nSTATUS=Serving Wyoming on tcp://0.0.0.0:10300 HTTP"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    before = time.monotonic_ns() // 1000
    assert notifier.reloading("Reloading configuration")
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    assert lines[2] == "STATUS=Reloading configuration"
    key, usec = lines[1].split("=")
    # CLOCK_MONOTONIC, as systemd compares it with its own.
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= time.monotonic_ns() // 1000
    notifier.close()


def test_notify_path_socket_and_watchdog(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"})
        assert notifier.watchdog_interval_s == 15.0
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.status("Loading models…")
        assert sock.recv(4096) == "STATUS=Loading models…".encode()
        notifier.close()
    # The manager went away: sending fails quietly.
    assert not notifier.ready()


def test_notify_disabled_cases() -> None:
    assert not SystemdNotifier({}).ready()
    assert SystemdNotifier({}).watchdog_interval_s is None
    # vsock transports are not supported: no-op, not a crash.
    assert not SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    # WATCHDOG_PID names another process (we were started through a wrapper).
    other = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(other).watchdog_interval_s is None
    mine = {**other, "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier(mine).watchdog_interval_s == 0.5


# ------------------------------------------------------------------ logging

_LOG_SCRIPT = (
    "import logging; from edgevoice.daemon import setup_logging; "
    "setup_logging('INFO'); logging.getLogger('edgevoice.test').info('hello %s', 'journal')"
)


@pytest.mark.parametrize("journal", [True, False])
def test_log_lines_without_timestamps_under_journald(journal: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"
    result = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    if journal:
        assert result.stderr == "INFO edgevoice.test: hello journal\n"
    else:
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO edgevoice.test: hello journal\n",
            result.stderr,
        )


# ----------------------------------------------------------- install-service


def test_install_service_dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prefix = Path(sys.prefix)
    user = "edgevoice-test-nobody"
    assert main(["install-service", "--dry-run", "--user", user, "--prefix", str(prefix)]) == 0
    out = capsys.readouterr().out.splitlines()
    python = python_for(prefix)
    config = Path("/etc/edgevoice/config.toml")
    step5 = (
        f"  5. keep existing {config}"
        if config.exists()
        else f"  5. copy config.example.toml to {config} (mode 0640, group {user})"
    )
    assert out == [
        "edgevoice install-service --dry-run: would",
        f"  1. create system user '{user}' (home /var/lib/edgevoice, no login shell)",
        f"  2. create /var/lib/edgevoice (owner {user})",
        f"  3. create /var/cache/edgevoice (owner {user})",
        "  4. create /etc/edgevoice",
        step5,
        f"  6. write {UNIT_PATH} (runs {python} -m edgevoice serve as {user})",
        "  7. systemctl daemon-reload",
        "  8. systemctl enable --now edgevoice.service",
    ]

    # A prefix that is not a Python environment is refused.
    assert main(["install-service", "--dry-run", "--prefix", str(tmp_path)]) == 1
    assert "does not exist: --prefix must be a Python environment" in capsys.readouterr().err


def test_install_service_staged_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = tmp_path / "root"
    args = ["install-service", "--root", str(root), "--prefix", "/opt/ev", "--user", "voice"]
    assert main(args) == 0
    unit = root / "etc/systemd/system/edgevoice.service"
    assert unit.read_text() == render_unit("voice", Path("/opt/ev"))
    assert unit_directives(unit.read_text())["ExecStart"] == [
        "/opt/ev/bin/python -m edgevoice serve --config /etc/edgevoice/config.toml"
    ]
    config = root / "etc/edgevoice/config.toml"
    assert config.read_text() == (REPO / "config.example.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    assert (root / "var/lib/edgevoice").is_dir()
    assert (root / "var/cache/edgevoice").is_dir()
    capsys.readouterr()

    # An existing config is kept.
    config.write_text('log_level = "DEBUG"\n')
    assert main([*args, "--dry-run"]) == 0
    assert f"keep existing {config}" in capsys.readouterr().out
    assert main(args) == 0
    assert config.read_text() == 'log_level = "DEBUG"\n'


def test_install_plan_for_macos(tmp_path: Path) -> None:
    steps = plan_install("voice", Path("/opt/ev"), root=tmp_path, platform="darwin", start=False)
    for step in steps:
        step.run()
    plist = tmp_path / PLIST_PATH.relative_to("/")
    assert plistlib.loads(plist.read_bytes())["ProgramArguments"][0] == "/opt/ev/bin/python"
    assert (tmp_path / "usr/local/etc/edgevoice/config.toml").is_file()
    assert (tmp_path / "usr/local/var/cache/edgevoice").is_dir()
