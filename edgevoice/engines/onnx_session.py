"""onnxruntime sessions whose memory stays bounded, shared by the ONNX engines.

onnxruntime's defaults keep memory: a CPU arena that grows to the largest
request and keeps it (gigabytes after one long unpunctuated text), and
memory-pattern planning that caches per input shape. Sessions made here keep
the arena (without it Piper runs 14 % slower, twice as slow on a long
sentence) but shrink it back after every run, and plan no memory patterns.
onnxruntime itself is imported only when a session is made, so importing
this module (and the engines that use it) stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgevoice.devices import available_cpus


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

    ``intra_op_threads`` 0: one per CPU this process may run on (onnxruntime's
    own default counts the machine's cores, and its threads spin on one core
    when the process is pinned to it).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_mem_pattern = False
    options.intra_op_num_threads = intra_op_threads or available_cpus()
    session = onnxruntime.InferenceSession(
        str(path),
        sess_options=options,
        providers=onnx_providers(device, engine=engine, cuda_options=cuda_options),
    )
    return ShrinkingSession(session, onnxruntime.RunOptions())


_SHRINK_CPU_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")


class ShrinkingSession:
    """An ``InferenceSession`` whose every ``run`` hands the CPU arena's unused
    chunks back when it ends (onnxruntime's ``memory.enable_memory_arena_shrinkage``
    run option); anything else is the session's own."""

    def __init__(self, session: Any, run_options: Any) -> None:
        self.session = session
        run_options.add_run_config_entry(*_SHRINK_CPU_ARENA)
        self._run_options = run_options

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        if run_options is not None:
            run_options.add_run_config_entry(*_SHRINK_CPU_ARENA)
        return self.session.run(output_names, input_feed, run_options or self._run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)
