"""onnxruntime sessions whose memory stays bounded, shared by the ONNX engines.

onnxruntime's defaults keep memory: a CPU arena that grows to the largest
request and keeps it (gigabytes after one long unpunctuated text), and
memory-pattern planning that caches per input shape. Sessions made here keep
the arena (without it Piper runs 14 % slower, twice as slow on a long
sentence) but shrink it back, and plan no memory patterns. When: after every
run (``shrink="every_run"``), or only when the engine asks
(:meth:`ShrinkingSession.shrink_after_next_run`, ``shrink="on_release"``):
an engine whose runs come in bursts (Piper, sentence after sentence) keeps
its arena while busy, since every page handed back is faulted in again by the
next run, and gives it back from ``release_memory`` when the hub sees it idle.
onnxruntime itself is imported only when a session is made, so importing
this module (and the engines that use it) stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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
    model: Path | bytes,
    device: str,
    *,
    engine: str = "this engine",
    intra_op_threads: int = 0,
    cuda_options: Mapping[str, Any] | None = None,
    shrink: Literal["every_run", "on_release"] = "every_run",
    stop_spinning: bool = False,
) -> ShrinkingSession:
    """An onnxruntime session (from a file or serialized bytes) that gives its
    arena back (blocking): after each run, or (``on_release``) after the run
    that follows :meth:`ShrinkingSession.shrink_after_next_run`.

    ``intra_op_threads`` 0: one per CPU this process may run on (onnxruntime's
    own default counts the machine's cores, and its threads spin on one core
    when the process is pinned to it). ``stop_spinning``: the pool's threads
    stop spinning when a run ends — for sessions that run by turns (Piper's
    encoder and decoder), where one session's spinning threads would take the
    cores from the other's run (the paragraph took 645 ms instead of 420).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_mem_pattern = False
    options.intra_op_num_threads = intra_op_threads or available_cpus()
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    session = onnxruntime.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        sess_options=options,
        providers=onnx_providers(device, engine=engine, cuda_options=cuda_options),
    )
    return ShrinkingSession(session, every_run=shrink == "every_run")


SHRINK_CPU_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")
"""The run option (key, value) that ends a run by shrinking the CPU arena."""


class ShrinkingSession:
    """An ``InferenceSession`` whose runs hand the CPU arena's unused chunks back
    when they end (onnxruntime's ``memory.enable_memory_arena_shrinkage`` run
    option): every run, or (``every_run=False``) only the run after
    :meth:`shrink_after_next_run`. Anything else is the session's own."""

    def __init__(self, session: Any, *, every_run: bool = True) -> None:
        import onnxruntime

        self.session = session
        self.every_run = every_run
        self._keep_options = onnxruntime.RunOptions()
        self._shrink_options = onnxruntime.RunOptions()
        self._shrink_options.add_run_config_entry(*SHRINK_CPU_ARENA)
        self._shrink_next = False

    def shrink_after_next_run(self) -> None:
        """Make the next run (in any thread) end by shrinking the arena."""
        self._shrink_next = True

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        shrink = self.every_run or self._shrink_next
        self._shrink_next = False
        if run_options is not None:
            if shrink:
                run_options.add_run_config_entry(*SHRINK_CPU_ARENA)
        else:
            run_options = self._shrink_options if shrink else self._keep_options
        return self.session.run(output_names, input_feed, run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)
