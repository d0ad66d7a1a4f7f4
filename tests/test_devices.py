"""Device selection is a pure function of machine facts: table-driven."""

from __future__ import annotations

import pytest

from edgevoice.devices import DeviceError, MachineFacts, select_device

NO_GPU = MachineFacts()
ONE_GPU = MachineFacts(cuda_devices=1)
TWO_GPUS = MachineFacts(cuda_devices=2)
MAC = MachineFacts(apple_silicon=True, mlx_installed=True)
MAC_NO_MLX = MachineFacts(apple_silicon=True, mlx_installed=False)
CPU_CUDA = ("cpu", "cuda")
ALL = ("cpu", "cuda", "mlx")


@pytest.mark.parametrize(
    ("requested", "supported", "facts", "expected", "reason_part"),
    [
        ("auto", CPU_CUDA, NO_GPU, "cpu", "no CUDA device visible"),
        ("auto", CPU_CUDA, ONE_GPU, "cuda", "1 CUDA device"),
        ("auto", ("cpu",), ONE_GPU, "cpu", "no CUDA support"),
        ("auto", ALL, MAC, "mlx", "Apple Silicon"),
        ("auto", CPU_CUDA, MAC, "cpu", "no CUDA device visible"),
        ("auto", ALL, MAC_NO_MLX, "cpu", "mlx not installed"),
        ("auto", ALL, TWO_GPUS, "cuda", "2 CUDA device"),
        ("AUTO", CPU_CUDA, NO_GPU, "cpu", "auto"),
        ("cpu", CPU_CUDA, ONE_GPU, "cpu", "configured"),
        ("cuda", CPU_CUDA, ONE_GPU, "cuda", "configured"),
        ("cuda:1", CPU_CUDA, TWO_GPUS, "cuda:1", "configured"),
        ("mlx", ALL, MAC, "mlx", "configured"),
    ],
)
def test_select_device(
    requested: str, supported: tuple[str, ...], facts: MachineFacts, expected: str, reason_part: str
) -> None:
    choice = select_device(requested, supported, facts)
    assert choice.device == expected
    assert reason_part in choice.reason


@pytest.mark.parametrize(
    ("requested", "supported", "facts", "message"),
    [
        ("gpu", CPU_CUDA, ONE_GPU, "invalid device"),
        ("cuda", CPU_CUDA, NO_GPU, "0 CUDA device(s) visible"),
        ("cuda:1", CPU_CUDA, ONE_GPU, "1 CUDA device(s) visible"),
        ("cuda", ("cpu",), ONE_GPU, "not supported by this engine"),
        ("mlx", ALL, NO_GPU, "Apple Silicon"),
        ("mlx", CPU_CUDA, MAC, "not supported"),
    ],
)
def test_select_device_errors(
    requested: str, supported: tuple[str, ...], facts: MachineFacts, message: str
) -> None:
    with pytest.raises(DeviceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_device(requested, supported, facts)


def test_choice_family_and_index() -> None:
    choice = select_device("cuda:1", CPU_CUDA, TWO_GPUS)
    assert (choice.family, choice.index) == ("cuda", 1)


def test_usable_devices_say_what_this_machine_can_run() -> None:
    from edgevoice.devices import usable_devices

    assert usable_devices(("cpu", "cuda"), NO_GPU) == ["cpu"]
    assert usable_devices(("cpu", "cuda"), ONE_GPU) == ["cuda", "cpu"]
    assert usable_devices(("cpu", "cuda"), TWO_GPUS) == ["cuda(x2)", "cpu"]
    assert usable_devices(("cpu",), ONE_GPU) == ["cpu"]
    assert usable_devices(("cpu", "mlx"), MAC) == ["mlx", "cpu"]
    assert usable_devices(("mlx",), NO_GPU) == []
