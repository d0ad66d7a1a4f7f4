"""What keeps the daemon's resident memory small.

- Freed heap goes back to the OS: glibc keeps large freed blocks for reuse (its
  mmap threshold rises after the first big free), so without
  :func:`return_freed_memory` RSS would stay near the peak of the largest
  request, or of a model's load (its file read before its tensors were built).
- The daemon's worker threads share two malloc arenas (glibc gives each
  thread that allocates under contention an arena of its own, up to 8 per core,
  and each keeps its free memory fragmented): :func:`limit_malloc_arenas`, unless
  ``MALLOC_ARENA_MAX`` is set in the environment.
- Imports a configured daemon may never use are deferred: faster-whisper
  imports PyAV (FFmpeg, ~16 MB resident) at import time, though edgevoice hands
  it decoded samples; PyAV loads on the first compressed upload instead.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from types import ModuleType

_IMPORT_LOCK = threading.RLock()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None on other C libraries)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    return trim


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (before worker threads start); False where the
    C library is not glibc or ``MALLOC_ARENA_MAX`` already decides."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt: Callable[[int, int], int] = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (blocking, about a millisecond:
    call it from a worker thread)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def defer_import(name: str) -> None:
    """Make ``import name`` return a stand-in that imports the real module on its
    first attribute access (nothing happens if ``name`` is imported already or not
    installed). Unlike ``importlib.util.LazyLoader``, whose module Python 3.11's
    ``import`` statement loads at once (it reads ``__spec__``), the stand-in holds
    until the module is used."""
    with _IMPORT_LOCK:
        if name in sys.modules or importlib.util.find_spec(name) is None:
            return
        stand_in = ModuleType(name, f"{name}, imported on first use")

        def __getattr__(attr: str) -> object:
            return getattr(load_module(name), attr)

        stand_in.__dict__.update(__getattr__=__getattr__, _edgevoice_deferred=True)
        sys.modules[name] = stand_in


def _deferred(module: ModuleType | None) -> bool:
    return module is not None and bool(module.__dict__.get("_edgevoice_deferred"))


def load_module(name: str) -> ModuleType:
    """``import name``, completing a deferred import (under a lock: one thread
    imports it, the others wait)."""
    with _IMPORT_LOCK:
        if _deferred(sys.modules.get(name)):
            del sys.modules[name]
        return importlib.import_module(name)


def is_loaded(name: str) -> bool:
    """Whether ``name`` is imported and not merely deferred."""
    module = sys.modules.get(name)
    return module is not None and not _deferred(module)
