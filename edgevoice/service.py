"""``edgevoice install-service``: the systemd unit (Linux) or launchd plist (macOS).

The unit and plist are rendered from the templates below; the copies in the
repository's ``systemd/`` folder are these templates rendered with the
defaults (``tests/test_systemd.py`` keeps them identical), so a wheel install
needs no data files.

An install is a list of :class:`Step` objects: ``--dry-run`` prints them,
otherwise they run in order (root needed unless ``--root`` stages into a
directory, as a package build does).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_USER = "edgevoice"
DEFAULT_PREFIX = Path("/opt/edgevoice/venv")
CONFIG_DIR = Path("/etc/edgevoice")
STATE_DIR = Path("/var/lib/edgevoice")
CACHE_DIR = Path("/var/cache/edgevoice")
UNIT_PATH = Path("/etc/systemd/system/edgevoice.service")
# macOS (launchd): a system daemon, Homebrew-style paths.
PLIST_LABEL = "com.edgevoice"
PLIST_PATH = Path("/Library/LaunchDaemons/com.edgevoice.plist")
MAC_CONFIG_DIR = Path("/usr/local/etc/edgevoice")
MAC_STATE_DIR = Path("/usr/local/var/lib/edgevoice")
MAC_CACHE_DIR = Path("/usr/local/var/cache/edgevoice")
MAC_LOG = Path("/usr/local/var/log/edgevoice.log")

UNIT_TEMPLATE = """\
# edgevoice: voice appliance daemon (Wyoming, OpenAI-compatible HTTP, MQTT).
# Installed by `edgevoice install-service` (see its --dry-run); edit
# /etc/edgevoice/config.toml, then `systemctl reload edgevoice` (SIGHUP).
# Local changes belong in `systemctl edit edgevoice` (a drop-in).

[Unit]
Description=edgevoice voice appliance daemon (ASR, TTS, wake word, VAD)
Wants=network-online.target
After=network-online.target sound.target

[Service]
Type=notify
# Only the daemon's own PID may send READY/WATCHDOG (no helper process can).
NotifyAccess=main
# The venv's Python itself, no wrapper: systemd signals and watches the daemon.
ExecStart={python} -m edgevoice serve --config /etc/edgevoice/config.toml
# SIGHUP reloads the config; kill (not Type=notify-reload) works on systemd < 253.
ExecReload=/bin/kill -HUP $MAINPID
# The daemon pings every WatchdogSec/2 from its event loop: a hung loop restarts.
WatchdogSec=30
Restart=on-failure
RestartSec=5
# The first start may download models (minutes on a Pi or a slow link).
TimeoutStartSec=15min
# Longer than shutdown_timeout_s (10 s): in-flight requests finish before SIGKILL.
TimeoutStopSec=30
Environment=PYTHONUNBUFFERED=1
# Hugging Face downloads go to the writable cache, not to a home directory.
Environment=HF_HOME=/var/cache/edgevoice/huggingface

User={user}
Group={user}
# Microphones and speakers (/dev/snd) belong to the audio group.
SupplementaryGroups=audio
ConfigurationDirectory=edgevoice
# The voice library ($STATE_DIRECTORY, edgevoice's state_dir).
StateDirectory=edgevoice
# Downloaded and assembled models ($CACHE_DIRECTORY, edgevoice's cache_dir).
CacheDirectory=edgevoice

# Secrets stay out of config.toml: uncomment a pair. systemd copies the file
# to $CREDENTIALS_DIRECTORY (readable by this service only); the variable
# points edgevoice's *_file key at it.
#LoadCredential=mqtt-password:/etc/edgevoice/credentials/mqtt-password
#Environment=EDGEVOICE_MQTT__PASSWORD_FILE=/run/credentials/edgevoice.service/mqtt-password
#LoadCredential=http-api-key:/etc/edgevoice/credentials/http-api-key
#Environment=EDGEVOICE_HTTP__API_KEY_FILE=/run/credentials/edgevoice.service/http-api-key

# Hardening.
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
NoNewPrivileges=true
# AF_NETLINK: zeroconf enumerates network interfaces through it.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# Only the sound devices; PrivateDevices= would hide /dev/snd altogether.
DevicePolicy=closed
DeviceAllow=char-alsa rw
# NVIDIA GPU (CUDA): uncomment, or add them in a drop-in.
#DeviceAllow=/dev/nvidiactl rw
#DeviceAllow=/dev/nvidia0 rw
#DeviceAllow=/dev/nvidia-uvm rw
#DeviceAllow=/dev/nvidia-uvm-tools rw
# Jetson (Tegra iGPU): also add SupplementaryGroups=video render.
#DeviceAllow=/dev/nvmap rw
#DeviceAllow=/dev/nvhost-ctrl rw
#DeviceAllow=/dev/nvhost-ctrl-gpu rw
#DeviceAllow=/dev/nvhost-prof-gpu rw
#DeviceAllow=/dev/nvhost-gpu rw
#DeviceAllow=/dev/nvhost-as-gpu rw
#DeviceAllow=/dev/nvgpu/igpu0/ctrl rw
# A regular user on ports > 1024: no capabilities at all.
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictNamespaces=true
RestrictSUIDSGID=true
LockPersonality=true
PrivateMounts=true
RemoveIPC=true
# Other users' processes are hidden; /proc/cpuinfo and meminfo stay (ML runtimes read them).
ProtectProc=invisible
SystemCallArchitectures=native
# Denied calls fail with EPERM instead of killing the process mid-request.
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0027
# No MemoryDenyWriteExecute=: CUDA, ONNX Runtime and CTranslate2 generate code
# at run time. No RestrictRealtime=: audio threads may ask for RT priority.

[Install]
WantedBy=multi-user.target
"""

PLIST_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!--
  edgevoice as a macOS launchd daemon. `edgevoice install-service` on macOS
  writes this to /Library/LaunchDaemons/com.edgevoice.plist and loads it:
    sudo launchctl bootstrap system /Library/LaunchDaemons/com.edgevoice.plist
  Reload the config: sudo launchctl kill HUP system/com.edgevoice
  Stop: sudo launchctl bootout system/com.edgevoice
  launchd has no sd_notify/watchdog: KeepAlive restarts it when it crashes.
-->
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>com.edgevoice</string>
  <key>ProgramArguments</key>
  <array>
    <string>{python}</string>
    <string>-m</string>
    <string>edgevoice</string>
    <string>serve</string>
    <string>--config</string>
    <string>/usr/local/etc/edgevoice/config.toml</string>
  </array>
  <key>UserName</key>
  <string>{user}</string>
  <key>EnvironmentVariables</key>
  <dict>
    <key>PYTHONUNBUFFERED</key>
    <string>1</string>
    <key>EDGEVOICE_CACHE_DIR</key>
    <string>/usr/local/var/cache/edgevoice</string>
    <key>EDGEVOICE_STATE_DIR</key>
    <string>/usr/local/var/lib/edgevoice</string>
    <key>HF_HOME</key>
    <string>/usr/local/var/cache/edgevoice/huggingface</string>
  </dict>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <dict>
    <key>SuccessfulExit</key>
    <false/>
  </dict>
  <key>ThrottleInterval</key>
  <integer>5</integer>
  <key>ExitTimeOut</key>
  <integer>30</integer>
  <key>StandardErrorPath</key>
  <string>/usr/local/var/log/edgevoice.log</string>
</dict>
</plist>
"""


class InstallError(RuntimeError):
    """The install cannot proceed; the message says why."""


@dataclass
class Step:
    """One install action: ``describe`` is what ``--dry-run`` prints."""

    describe: str
    run: Callable[[], None]


def python_for(prefix: Path) -> Path:
    """The interpreter the service runs: ``PREFIX/bin/python``."""
    return prefix / "bin" / "python"


def render_unit(user: str = DEFAULT_USER, prefix: Path = DEFAULT_PREFIX) -> str:
    return UNIT_TEMPLATE.format(user=user, python=python_for(prefix))


def render_plist(user: str = DEFAULT_USER, prefix: Path = DEFAULT_PREFIX) -> str:
    return PLIST_TEMPLATE.format(user=user, python=python_for(prefix))


def example_config() -> str:
    """``config.example.toml`` from the source tree, else the built-in defaults."""
    source = Path(__file__).resolve().parents[1] / "config.example.toml"
    if source.is_file():
        return source.read_text(encoding="utf-8")
    # Not the effective config: that would pin this host's paths and node id.
    return (
        "# edgevoice configuration: empty, so the built-in defaults apply.\n"
        "# Every key with its default: config.example.toml in the edgevoice sources;\n"
        "# `edgevoice check-config` prints the effective configuration.\n"
    )


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


def _run(argv: list[str]) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(argv, check=True)

    return run


def _write(path: Path, text: str, mode: int, owner: str | None = None) -> Callable[[], None]:
    def run() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.chmod(mode)
        if owner is not None:
            shutil.chown(partial, group=owner)
        partial.replace(path)

    return run


def _mkdir(path: Path, mode: int, owner: str | None = None) -> Callable[[], None]:
    def run() -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        if owner is not None:
            shutil.chown(path, user=owner, group=owner)

    return run


def plan_install(
    user: str = DEFAULT_USER,
    prefix: Path | None = None,
    *,
    root: Path | None = None,
    platform: str = sys.platform,
    start: bool = True,
) -> list[Step]:
    """The steps that install the service.

    ``prefix`` is the Python environment the service runs (default: the one
    running this command). ``root`` stages every file below a directory and
    skips user creation and service manager calls (packaging, tests).
    """
    prefix = Path(sys.prefix) if prefix is None else prefix
    python = python_for(prefix)
    staged = root is not None

    def at(path: Path) -> Path:
        return path if root is None else root / path.relative_to("/")

    steps: list[Step] = []
    if not python.exists() and not staged:
        raise InstallError(f"{python} does not exist: --prefix must be a Python environment")
    mac = platform == "darwin"
    config_dir = MAC_CONFIG_DIR if mac else CONFIG_DIR
    config = at(config_dir / "config.toml")
    owner = None if staged else user

    if not staged and not _user_exists(user):
        if mac:
            raise InstallError(
                f"user {user!r} does not exist: create it (System Settings or dscl), "
                "or pass --user with an existing account"
            )
        groups = ["--groups", "audio"] if _group_exists("audio") else []
        steps.append(
            Step(
                f"create system user {user!r} (home {STATE_DIR}, no login shell)",
                _run(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--home-dir",
                        str(STATE_DIR),
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        *groups,
                        user,
                    ]
                ),
            )
        )
    if mac:
        for directory in (MAC_STATE_DIR, MAC_CACHE_DIR):
            steps.append(
                Step(f"create {at(directory)} (owner {user})", _mkdir(at(directory), 0o750, owner))
            )
        steps.append(Step(f"create {at(MAC_LOG.parent)}", _mkdir(at(MAC_LOG.parent), 0o755)))
    else:
        # systemd creates State/CacheDirectory itself; made here too so models can
        # be put in place before the first start.
        for directory in (STATE_DIR, CACHE_DIR):
            steps.append(
                Step(f"create {at(directory)} (owner {user})", _mkdir(at(directory), 0o750, owner))
            )
    steps.append(Step(f"create {at(config_dir)}", _mkdir(at(config_dir), 0o755)))
    if config.exists():
        steps.append(Step(f"keep existing {config}", lambda: None))
    else:
        steps.append(
            Step(
                f"copy config.example.toml to {config} (mode 0640, group {user})",
                _write(config, example_config(), 0o640, owner),
            )
        )
    if mac:
        plist = at(PLIST_PATH)
        steps.append(
            Step(
                f"write {plist} (runs {python} -m edgevoice serve as {user})",
                _write(plist, render_plist(user, prefix), 0o644),
            )
        )
        if not staged and start:
            steps.append(
                Step(
                    f"launchctl bootstrap system {plist}",
                    _run(["launchctl", "bootstrap", "system", str(plist)]),
                )
            )
        return steps
    unit = at(UNIT_PATH)
    steps.append(
        Step(
            f"write {unit} (runs {python} -m edgevoice serve as {user})",
            _write(unit, render_unit(user, prefix), 0o644),
        )
    )
    if not staged:
        steps.append(Step("systemctl daemon-reload", _run(["systemctl", "daemon-reload"])))
        if start:
            steps.append(
                Step(
                    "systemctl enable --now edgevoice.service",
                    _run(["systemctl", "enable", "--now", "edgevoice.service"]),
                )
            )
    return steps


def install_service(
    user: str = DEFAULT_USER,
    prefix: Path | None = None,
    *,
    dry_run: bool = False,
    root: Path | None = None,
    start: bool = True,
    out: Callable[[str], None] = print,
) -> None:
    """Run (or with ``dry_run`` print) the install steps."""
    steps = plan_install(user, prefix, root=root, start=start)
    if dry_run:
        out("edgevoice install-service --dry-run: would")
        for i, step in enumerate(steps, 1):
            out(f"  {i}. {step.describe}")
        return
    if root is None and hasattr(os, "geteuid") and os.geteuid() != 0:
        raise InstallError("run as root (sudo), or see what it would do with --dry-run")
    for step in steps:
        out(f"- {step.describe}")
        try:
            step.run()
        except (OSError, subprocess.CalledProcessError) as exc:
            cmd = exc.cmd if isinstance(exc, subprocess.CalledProcessError) else None
            what = shlex.join(cmd) if isinstance(cmd, list) else str(exc)
            raise InstallError(f"{step.describe}: failed: {what}") from exc
    out("Installed. Logs: journalctl -u edgevoice -f")
