"""What the torch engines share about the torch runtime (imports torch only when called)."""

from __future__ import annotations

import logging

_LOGGER = logging.getLogger(__name__)


def avoid_cudnn_attention(device: str, half: bool, why: str) -> bool:
    """Turn PyTorch's cuDNN attention backend off for half-precision models on
    CUDA; True when this call turned it off.

    cuDNN attention (which PyTorch picks for float16/bfloat16 on recent GPUs)
    builds an execution plan for every new shape in every thread. Token-by-token
    decoding meets a new key length at every token, and the hub's worker threads
    (and CosyVoice's per-request LLM thread) each start with no plans: measured on
    an H100 (scripts/cuda_check.py), CosyVoice 2's LLM took 62-75 ms a token
    against 6 ms with it off, Whisper's first request in a new thread 0.8 s
    against 0.2 s. The flash and memory-efficient kernels serve decoding as well.
    The switch is process-wide (PyTorch has no per-model one); float32 and CPU
    never use cuDNN attention, so they leave it alone.
    """
    import torch

    if not (half and device.startswith("cuda") and torch.backends.cuda.cudnn_sdp_enabled()):
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    _LOGGER.info(
        "PyTorch's cuDNN attention turned off (process-wide) for %s: it builds a plan per "
        "shape per thread, which token-by-token decoding pays on every new length",
        why,
    )
    return True
