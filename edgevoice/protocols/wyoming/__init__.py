"""Wyoming: speech-to-text, text-to-speech and wake words for Home Assistant.

One process serves what usually takes three servers (wyoming-faster-whisper,
wyoming-piper, wyoming-openwakeword). The wire format comes from the
``wyoming`` package; the rest is a thin adapter over the hub and the voice
pipelines:

- :mod:`.framing`: reading events with bounds, field checks, and the one
  mapping of edgevoice's error taxonomy to ``error{text, code}``;
- :mod:`.info`: the ``describe`` answer (programs, models, voices);
- :mod:`.connection`: one client's events → hub sessions, the endpointing
  pipeline and the speech pipeline, with its job queue and timeouts;
- :mod:`.server`: listeners (``tcp://HOST:PORT``, ``unix:///path``,
  ``stdio://``), zeroconf, the connection limit, in-place reconfiguration
  and ordered stop.
"""

from edgevoice.protocols.wyoming.server import WyomingServer

__all__ = ["WyomingServer"]
