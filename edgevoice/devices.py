"""Device selection: a pure function of machine facts, so it is testable anywhere."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import re
from dataclasses import dataclass

_LOGGER = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|mlx|cuda(:\d+)?)$")


@dataclass(frozen=True, slots=True)
class MachineFacts:
    """What the engine's runtime can see; gathered by :func:`probe_machine`."""

    cuda_devices: int = 0
    """GPUs the engine's runtime sees (ctranslate2 / onnxruntime / torch)."""
    apple_silicon: bool = False
    mlx_installed: bool = False


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    device: str
    """``cpu``, ``cuda``, ``cuda:N`` or ``mlx``."""
    reason: str

    @property
    def family(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def index(self) -> int:
        _, _, idx = self.device.partition(":")
        return int(idx) if idx else 0


class DeviceError(ValueError):
    """The requested device is malformed or not usable by this engine here."""


def select_device(requested: str, supported: tuple[str, ...], facts: MachineFacts) -> DeviceChoice:
    """Pick the device for an engine.

    ``requested`` is the config value; ``supported`` the device families the
    engine declares (``cpu``, ``cuda``, ``mlx``). ``auto`` prefers CUDA when
    the engine's runtime sees a GPU, then MLX on Apple Silicon with mlx
    installed, else CPU. An explicit device the engine or machine cannot use
    is an error rather than a silent fallback.
    """
    requested = requested.strip().lower()
    if not _DEVICE_RE.match(requested):
        raise DeviceError(f"invalid device {requested!r}: use auto, cpu, cuda, cuda:N or mlx")
    if requested == "auto":
        if "cuda" in supported and facts.cuda_devices > 0:
            return DeviceChoice("cuda", f"auto: {facts.cuda_devices} CUDA device(s) visible")
        if "mlx" in supported and facts.apple_silicon and facts.mlx_installed:
            return DeviceChoice("mlx", "auto: Apple Silicon with mlx installed")
        why = []
        if "cuda" in supported:
            why.append("no CUDA device visible")
        else:
            why.append("engine has no CUDA support")
        if "mlx" in supported and facts.apple_silicon and not facts.mlx_installed:
            why.append("mlx not installed")
        return DeviceChoice("cpu", "auto: " + ", ".join(why))

    family = requested.split(":", 1)[0]
    if family not in supported:
        raise DeviceError(
            f"device {requested!r} is not supported by this engine (supports: "
            f"{', '.join(supported)})"
        )
    if family == "cuda":
        index = int(requested.partition(":")[2] or 0)
        if facts.cuda_devices <= index:
            raise DeviceError(
                f"device {requested!r} requested but {facts.cuda_devices} CUDA device(s) visible"
            )
    if family == "mlx" and not (facts.apple_silicon and facts.mlx_installed):
        raise DeviceError("device 'mlx' needs Apple Silicon with the mlx package installed")
    return DeviceChoice(requested, "configured")


def usable_devices(supported: tuple[str, ...], facts: MachineFacts) -> list[str]:
    """The device families of ``supported`` this machine can run, best first
    (what ``auto`` would pick comes first)."""
    usable = []
    if "cuda" in supported and facts.cuda_devices > 0:
        usable.append("cuda" if facts.cuda_devices == 1 else f"cuda(x{facts.cuda_devices})")
    if "mlx" in supported and facts.apple_silicon and facts.mlx_installed:
        usable.append("mlx")
    if "cpu" in supported:
        usable.append("cpu")
    return usable


def _cuda_devices(runtime: str) -> int:
    try:
        if runtime == "ctranslate2" and importlib.util.find_spec("ctranslate2"):
            import ctranslate2

            return int(ctranslate2.get_cuda_device_count())
        if runtime == "onnxruntime" and importlib.util.find_spec("onnxruntime"):
            import onnxruntime

            return 1 if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else 0
        if runtime == "torch" and importlib.util.find_spec("torch"):
            import torch

            return int(torch.cuda.device_count())
    except Exception as exc:  # a broken CUDA install means "no GPU", not a crash
        _LOGGER.debug("CUDA probe via %s failed: %s", runtime, exc)
    return 0


def probe_machine(runtime: str | None) -> MachineFacts:
    """Gather facts as ``runtime`` (ctranslate2, onnxruntime, torch) sees them.

    Blocking (imports the runtime): call from a worker thread.
    """
    apple = platform.system() == "Darwin" and platform.machine() == "arm64"
    return MachineFacts(
        cuda_devices=_cuda_devices(runtime) if runtime else 0,
        apple_silicon=apple,
        mlx_installed=apple and importlib.util.find_spec("mlx") is not None,
    )


def available_cpus() -> int:
    """CPUs this process may run on: its affinity (taskset, systemd's
    ``CPUAffinity``, a container's cpuset), which onnxruntime and CTranslate2 do
    not consult when they size their thread pools."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
