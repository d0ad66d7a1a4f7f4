"""What the voice-cloning engines share: checking a reference clip and caching
its encoded form per stored voice.

Blocking helpers for the engines' worker threads; :class:`ReferenceCache` is
safe to use from several of them at once.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from typing import Final, Generic, TypeVar

import numpy as np

from edgevoice.engines.base import EngineRequestError, FloatAudio, VoiceReference
from edgevoice.errors import BadAudioError

SILENT_PEAK: Final = 1e-4
"""A reference whose loudest sample is below this is silence, not a voice."""

T = TypeVar("T")


def check_reference(
    reference: VoiceReference, engine: str, min_s: float, max_s: float
) -> FloatAudio:
    """The reference's samples, or a client error saying why ``engine`` cannot
    clone from them (not mono, empty, implausible rate, non-finite, shorter
    than ``min_s`` or longer than ``max_s`` seconds, silent)."""
    param = "voice" if reference.voice_id else "voice_sample"
    samples = np.asarray(reference.audio, dtype=np.float32)
    if samples.ndim != 1:
        raise BadAudioError("reference audio must be mono samples", param=param)
    if samples.size == 0:
        raise BadAudioError("reference audio is empty", param=param)
    rate = reference.sample_rate_hz
    if not 1000 <= rate <= 384000:
        raise BadAudioError(f"reference sample rate {rate} Hz is not plausible", param=param)
    if not np.all(np.isfinite(samples)):
        raise BadAudioError("reference audio holds non-finite samples", param=param)
    duration_s = samples.size / rate
    if not min_s <= duration_s <= max_s:
        raise EngineRequestError(
            f"reference audio is {duration_s:.2f} s long; {engine} clones from "
            f"{min_s:g}-{max_s:g} s of speech",
            param=param,
        )
    if float(np.max(np.abs(samples))) < SILENT_PEAK:
        raise BadAudioError("reference audio is silent", param=param)
    return samples


class ReferenceCache(Generic[T]):
    """Encoded references, least recently used first out beyond ``capacity``;
    keyed by the stored voice id and a digest of the samples and their rate
    (a stored voice re-recorded under the same id is encoded again)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[tuple[str, str], T] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get_or_encode(
        self,
        reference: VoiceReference,
        samples: FloatAudio,
        encode: Callable[[FloatAudio, int], T],
    ) -> T:
        """The cached encoding of ``reference`` (its checked ``samples``), made
        with ``encode(samples, rate_hz)`` on a miss (blocking, outside the lock)."""
        digest = hashlib.blake2b(samples.tobytes(), digest_size=16)
        digest.update(str(reference.sample_rate_hz).encode())
        key = (reference.voice_id or "", digest.hexdigest())
        with self._lock:
            state = self._items.get(key)
            if state is not None:
                self._items.move_to_end(key)
                return state
        state = encode(samples, reference.sample_rate_hz)
        with self._lock:
            self._items[key] = state
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return state

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
