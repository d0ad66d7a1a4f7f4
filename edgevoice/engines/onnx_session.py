"""onnxruntime sessions whose memory stays bounded, shared by the ONNX engines.

onnxruntime's defaults keep memory: a CPU arena that grows to the largest
request and keeps it (gigabytes after one long unpunctuated text), and
memory-pattern planning that caches per input shape. Sessions made here turn
both off; a TTS model's run time is dominated by compute, not allocation.
onnxruntime itself is imported only when a session is made, so importing
this module (and the engines that use it) stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def onnx_providers(
    device: str, *, engine: str = "this engine", cuda_options: Mapping[str, Any] | None = None
) -> list[Any]:
    """onnxruntime execution providers for a resolved device (``cpu``, ``cuda[:N]``).

    CUDA grows its arena only by what each run asks for, so a long request
    does not leave a doubled arena behind; CPU stays as the fallback for the
    few operators CUDA lacks. ``cuda_options`` adds provider options.
    """
    family, _, index = device.partition(":")
    if family == "cuda":
        cuda = {
            "device_id": int(index or 0),
            "arena_extend_strategy": "kSameAsRequested",
            **(cuda_options or {}),
        }
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    if family != "cpu":
        raise ValueError(f"{engine} runs on cpu or cuda, not {device!r}")
    return ["CPUExecutionProvider"]


def inference_session(
    path: Path,
    device: str,
    *,
    engine: str = "this engine",
    intra_op_threads: int = 0,
    cuda_options: Mapping[str, Any] | None = None,
) -> Any:
    """An onnxruntime session that gives memory back after each run (blocking).

    ``intra_op_threads`` 0 lets onnxruntime decide.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.intra_op_num_threads = intra_op_threads
    return onnxruntime.InferenceSession(
        str(path),
        sess_options=options,
        providers=onnx_providers(device, engine=engine, cuda_options=cuda_options),
    )
