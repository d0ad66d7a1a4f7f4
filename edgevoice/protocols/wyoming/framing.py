"""Wyoming wire format: reading events with bounds, checking their fields, errors.

An event is a JSON header line, optional extra JSON data and an optional
binary payload. ``wyoming.event.async_read_event`` ends the stream on any
parse error; :func:`read_event` tells a bad event (answered with an
``error``, the connection stays) from broken framing (answered, then the
connection is closed), and bounds every part before reading it.

:func:`error_code` is the one place the Wyoming face maps edgevoice's error
taxonomy (:mod:`edgevoice.errors`) to ``error{text, code}``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from wyoming.error import Error
from wyoming.event import Event

from edgevoice.errors import ClientError, EdgeVoiceError, UnknownModelError

MAX_LINE_BYTES: Final = 64 * 1024
"""Longest header line; longer ones break the framing (connection closed)."""
MAX_DATA_BYTES: Final = 1024 * 1024
"""Largest extra-data part (JSON; synthesize text lives here)."""
MAX_PAYLOAD_BYTES: Final = 4 * 1024 * 1024
"""Largest binary payload: one ``audio-chunk`` (2 min of 16 kHz mono s16; clients
send about 64 ms per chunk)."""
MAX_BAD_EVENTS: Final = 3
"""Consecutive unreadable events before a connection is closed."""


class ProtocolError(ClientError):
    """Something only Wyoming can get wrong (framing, event order, fields).

    ``fatal`` means the byte stream can no longer be trusted (broken framing):
    the connection is closed after the error is sent.
    """

    def __init__(self, text: str, wire_code: str, *, fatal: bool = False) -> None:
        super().__init__(text)
        self.wire_code = wire_code
        self.fatal = fatal


def error_code(exc: EdgeVoiceError) -> str:
    """The ``error`` event's ``code`` for any error of the taxonomy."""
    if isinstance(exc, ProtocolError):
        return exc.wire_code
    if isinstance(exc, UnknownModelError):
        return "unknown-voice" if exc.kind == "tts" else "unknown-model"
    return exc.code.replace("_", "-")


def error_event(exc: EdgeVoiceError) -> Error:
    return Error(text=str(exc), code=error_code(exc))


# ------------------------------------------------------------------ reading


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """Read one event; ``None`` at end of stream.

    Raises :class:`ProtocolError` for a bad event (not fatal) or broken
    framing (fatal). Cancelling it between parts loses the event: callers keep
    one read in flight rather than cancelling it.
    """
    try:
        line = await reader.readline()
    except ValueError:  # LimitOverrunError wrapped by readline
        raise ProtocolError(
            f"header line longer than {MAX_LINE_BYTES} bytes", "bad-event", fatal=True
        ) from None
    if not line or not line.endswith(b"\n"):
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise ProtocolError("event header is not a JSON line", "bad-event") from None
    if not isinstance(header, dict):
        raise ProtocolError("event header is not a JSON object", "bad-event")
    data_length = _length(header, "data_length", MAX_DATA_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    data = header.get("data") or {}
    try:
        if data_length:
            raw = await reader.readexactly(data_length)
            try:
                extra = json.loads(raw)
            except ValueError:
                raise ProtocolError(
                    "event data is not JSON (wrong data_length?)", "bad-data-length", fatal=True
                ) from None
            if not isinstance(extra, dict) or not isinstance(data, dict):
                raise ProtocolError(
                    "event data is not a JSON object (wrong data_length?)",
                    "bad-data-length",
                    fatal=True,
                )
            data.update(extra)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ProtocolError("event has no type", "bad-event")
    if not isinstance(data, dict):
        raise ProtocolError("event data is not a JSON object", "bad-event")
    return Event(type=event_type, data=data, payload=payload)


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    code = f"bad-{key}".replace("_", "-")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{key} must be a non-negative integer", code, fatal=True)
    if value > limit:
        raise ProtocolError(f"{key} {value} exceeds {limit} bytes", code, fatal=True)
    return value


# ------------------------------------------------------------------- fields

_STR: Final = "a string"
_STRS: Final = "a list of strings"
_INT: Final = "an integer"
_OBJECT: Final = "an object"

# Fields we read, per event type: key -> (expected shape, required).
_FIELDS: Final[dict[str, dict[str, tuple[str, bool]]]] = {
    "ping": {"text": (_STR, False)},
    "select-program": {"name": (_STR, True)},
    "transcribe": {
        "name": (_STR, False),
        "language": (_STR, False),
        "transcript_names": (_STRS, False),
        "transcript_terms": (_STRS, False),
    },
    "audio-start": {"rate": (_INT, True), "width": (_INT, True), "channels": (_INT, True)},
    "audio-chunk": {"rate": (_INT, True), "width": (_INT, True), "channels": (_INT, True)},
    "detect": {"names": (_STRS, False)},
    "synthesize": {"text": (_STR, True), "voice": (_OBJECT, False)},
    "synthesize-start": {"voice": (_OBJECT, False)},
    "synthesize-chunk": {"text": (_STR, True)},
}
_VOICE_FIELDS: Final = ("name", "speaker", "language")


def _shape_ok(value: Any, shape: str) -> bool:
    if shape == _STR:
        return isinstance(value, str)
    if shape == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if shape == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, dict) and all(
        value.get(key) is None or isinstance(value[key], str) for key in _VOICE_FIELDS
    )


def check_fields(event: Event) -> None:
    """Raise :class:`ProtocolError` (``bad-event``) unless the fields we read have
    the types the Wyoming spec gives them (``null`` is absent)."""
    for key, (shape, required) in _FIELDS.get(event.type, {}).items():
        value = event.data.get(key)
        if value is None:
            if required:
                raise ProtocolError(f"invalid {event.type} event: {key} is missing", "bad-event")
            continue
        if not _shape_ok(value, shape):
            raise ProtocolError(
                f"invalid {event.type} event: {key} must be {shape}"
                + (" with string name/speaker/language" if shape == _OBJECT else ""),
                "bad-event",
            )
