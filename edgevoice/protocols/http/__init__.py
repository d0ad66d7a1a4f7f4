"""The OpenAI-compatible audio API over aiohttp (``[http]`` in the config).

Routes: ``/v1/audio/transcriptions``, ``/v1/audio/translations``,
``/v1/audio/speech`` (+ WebSocket ``/v1/audio/speech/stream``),
``/v1/audio/voices``, ``/v1/models``, ``/health``, ``/metrics``,
``/openapi.json`` and ``/docs``.

Modules: :mod:`.server` (lifecycle, connection guards), :mod:`.app` (routes,
middleware), :mod:`.errors` (the taxonomy → OpenAI's error shape, once),
:mod:`.forms` (bounded bodies and fields), :mod:`.transcription`,
:mod:`.speech`, :mod:`.speech_stream` (WebSocket), :mod:`.voices` (voice
library), :mod:`.models`, :mod:`.metrics`, :mod:`.openapi`, :mod:`.state`.
"""

from edgevoice.protocols.http.server import HttpServer

__all__ = ["HttpServer"]
