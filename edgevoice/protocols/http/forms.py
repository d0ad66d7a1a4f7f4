"""Request bodies (multipart forms, JSON) and their fields, parsed within the limits.

A body that is malformed, too large, or cut off by a client that went away
ends in a client error (or :class:`ClientGone`), never an unhandled
exception: aiohttp's parser errors are all caught here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from edgevoice.config import LimitsConfig
from edgevoice.errors import PayloadTooLargeError
from edgevoice.protocols.http.errors import ApiError, client_error

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_FIELD_BYTES: Final = 1 << 20
"""A text field (not a file) longer than this is refused."""
_MAX_PARTS: Final = 256
"""Form fields and files in one body (ours take a dozen)."""
_THREAD_JSON_BYTES: Final = 1 << 16
"""JSON bodies above this are parsed in a worker thread (large ones take a while)."""


class ClientGone(Exception):
    """The client closed the connection while we read its request; nobody to answer."""


@dataclass(frozen=True, slots=True)
class UploadedFile:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Form:
    """A parsed multipart/form-data body."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def getall(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))

    def as_dict(self) -> dict[str, Any]:
        return {k: v[-1] for k, v in self.fields.items() if v}


def body_limit(limits: LimitsConfig) -> int:
    """Largest request body: JSON may carry a base64 sample (4/3 of the upload limit)."""
    return limits.max_upload_bytes * 4 // 3 + (1 << 16)


def too_large(limit_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError("max_upload_bytes", limit_bytes, what="request body", unit="bytes")


def _stalled(idle_timeout_s: float) -> ApiError:
    return ApiError(
        408,
        f"the request body stalled: nothing arrived for {idle_timeout_s:g} s "
        "(limits.idle_timeout_s)",
        code="request_timeout",
    )


async def read_form(request: web.Request, limits: LimitsConfig) -> Form:
    """Stream-parse a multipart body, refusing it as soon as it passes
    ``limits.max_upload_bytes`` or stalls for ``limits.idle_timeout_s``."""
    limit_bytes = limits.max_upload_bytes
    idle_s = limits.idle_timeout_s
    if not request.content_type.startswith("multipart/"):
        raise ApiError(
            415,
            f"expected a multipart/form-data body, got {request.content_type or 'none'}",
            code="unsupported_media_type",
        )
    if request.content_length is not None and request.content_length > limit_bytes + 65536:
        raise too_large(limit_bytes)
    form = Form()
    total = 0
    try:
        reader = await request.multipart()
        parts = 0
        while (part := await _within(idle_s, reader.next())) is not None:
            parts += 1
            if parts > _MAX_PARTS:
                raise client_error(f"more than {_MAX_PARTS} form fields", code="invalid_multipart")
            # Buffered parts parse without yielding (and aiohttp re-parses the
            # part header on each .name): let others run between parts.
            await asyncio.sleep(0)
            if not isinstance(part, BodyPartReader):
                continue  # nested multiparts are not ours
            name, filename = part.name, part.filename
            if not name:
                continue
            chunks = bytearray()
            while chunk := await _within(idle_s, part.read_chunk(1 << 16)):
                total += len(chunk)
                if total > limit_bytes:
                    raise too_large(limit_bytes)
                chunks += chunk
                if filename is None and len(chunks) > _MAX_FIELD_BYTES:
                    raise client_error(f"form field {name!r} is too long", name)
            if filename is not None:
                form.files[name] = UploadedFile(
                    filename,
                    part.headers.get("Content-Type", "application/octet-stream"),
                    bytes(chunks),
                )
            else:
                charset = part.get_charset(default="utf-8")
                try:
                    text = chunks.decode(charset)
                except (UnicodeDecodeError, LookupError):
                    raise client_error(f"form field {name!r} is not {charset} text", name) from None
                form.fields.setdefault(name, []).append(text)
    except ConnectionError as exc:
        raise ClientGone(str(exc)) from None
    except (HttpProcessingError, ValueError, AssertionError, LookupError, EOFError) as exc:
        # aiohttp's parser: bad boundaries, headers with control bytes, a body
        # cut short (the client went away or lied about its length), ...
        if request.transport is None or request.transport.is_closing():
            raise ClientGone(f"{type(exc).__name__}: {exc}") from None
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise client_error(
            f"malformed multipart body: {detail}", code="invalid_multipart"
        ) from None
    return form


async def _within(timeout_s: float, step: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout(timeout_s):
            return await step
    except TimeoutError:
        raise _stalled(timeout_s) from None


async def read_json(request: web.Request, limits: LimitsConfig) -> dict[str, Any]:
    """The JSON object body (large bodies are parsed in a worker thread).

    At most :func:`body_limit` bytes, each read within ``limits.idle_timeout_s``.
    """
    max_bytes = body_limit(limits)
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(limits.max_upload_bytes)
    raw = bytearray()
    try:
        while chunk := await _within(limits.idle_timeout_s, request.content.readany()):
            raw += chunk
            if len(raw) > max_bytes:
                raise too_large(limits.max_upload_bytes)
    except ConnectionError as exc:
        raise ClientGone(str(exc)) from None
    except HttpProcessingError as exc:
        raise client_error(f"malformed request body: {exc.message}", code="invalid_json") from None
    try:
        if len(raw) > _THREAD_JSON_BYTES:
            body = await asyncio.to_thread(json.loads, bytes(raw))
        else:
            body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise client_error(
            f"request body is not valid JSON: {detail}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise client_error("request body must be a JSON object", code="invalid_json")
    return body


# ----------------------------------------------------------------- fields


def parse_float(value: Any, param: str, low: float, high: float) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise client_error(f"{param} must be a number, not {value!r}", param) from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise client_error(f"{param} must be between {low:g} and {high:g}, not {value!r}", param)
    return number


def parse_int(value: Any, param: str, low: int, high: int) -> int | None:
    number = parse_float(value, param, low, high)
    if number is None:
        return None
    if not number.is_integer():
        raise client_error(f"{param} must be a whole number, not {value!r}", param)
    return int(number)


def parse_bool(value: Any, param: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", "null"):
        return False
    raise client_error(f"{param} must be true or false, not {value!r}", param)


def parse_choice(value: Any, param: str, choices: tuple[str, ...], default: str) -> str:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in choices:
        raise client_error(f"{param} must be one of {', '.join(choices)}; got {value!r}", param)
    return value


def optional_str(value: Any, param: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise client_error(f"{param} must be a string", param)
    return value
