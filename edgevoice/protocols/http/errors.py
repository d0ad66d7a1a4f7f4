"""OpenAI's error shape: the one place the HTTP face maps edgevoice's error taxonomy.

Handlers raise the shared errors (:mod:`edgevoice.errors`): a
:class:`~edgevoice.errors.ClientError` with the field at fault, an
:class:`~edgevoice.errors.UnknownModelError`, a
:class:`~edgevoice.errors.LimitExceededError`, ... and :func:`to_api_error`
turns any of them (and aiohttp's own HTTP exceptions) into
``{"error": {message, type, param, code}}`` with its status, for plain
responses, Server-Sent Events and WebSocket ``error`` events alike.
Failures only HTTP has (a missing API key, a wrong media type, a WebSocket
route fetched without an upgrade) are :class:`ApiError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import hdrs, web

from edgevoice.errors import (
    BadAudioError,
    BusyError,
    ClientError,
    EdgeVoiceError,
    LimitExceededError,
    PayloadTooLargeError,
    ShuttingDownError,
    UnknownModelError,
)

# The taxonomy's codes as OpenAI-compatible clients know them.
_OPENAI_CODES: Final = {
    "invalid_request": "invalid_value",
    "bad_audio": "unsupported_audio",
    "busy": "rate_limit_exceeded",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.type = "server_error" if status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def client_error(message: str, param: str | None = None, code: str | None = None) -> ClientError:
    """A 400 about one request field, with a specific OpenAI ``code`` when given."""
    error = ClientError(message, param=param)
    if code is not None:
        error.code = code
    return error


def _status(exc: EdgeVoiceError) -> int:
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, BusyError):
        return 429
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, BadAudioError):
        return 415
    if isinstance(exc, ClientError | LimitExceededError):
        return 400
    if isinstance(exc, ShuttingDownError):
        return 503
    return 500


def _code(exc: EdgeVoiceError) -> str:
    if isinstance(exc, PayloadTooLargeError):
        return "request_too_large"
    if isinstance(exc, UnknownModelError):
        return "voice_not_found" if exc.kind in ("tts", "voice") else "model_not_found"
    return _OPENAI_CODES.get(exc.code, exc.code)


_AIOHTTP_CODES: Final = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def to_api_error(exc: BaseException, request: web.Request | None = None) -> ApiError:
    """The OpenAI-shaped error (status, headers, body) for anything a handler raises.

    Anything outside the taxonomy is a 500 (the caller logs its traceback).
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EdgeVoiceError):
        status = _status(exc)
        param = exc.param if isinstance(exc, ClientError) else None
        retry = {"Retry-After": "1"} if status in (429, 503) else None
        return ApiError(status, str(exc), param=param, code=_code(exc), headers=retry)
    if isinstance(exc, web.HTTPException):
        # aiohttp's own: an unknown route, a method the route lacks, a body
        # over client_max_size, a malformed WebSocket handshake.
        headers: dict[str, str] = {}
        if exc.status == 405 and (allow := exc.headers.get(hdrs.ALLOW)) is not None:
            headers["Allow"] = allow
        if exc.status == 413 or request is None:
            message = exc.text or exc.reason
        else:
            message = f"{exc.reason}: {request.method} {request.path}"
        if exc.status == 413:
            message = message.replace("Request Entity Too Large", "request body too large")
        return ApiError(exc.status, message, code=_AIOHTTP_CODES.get(exc.status), headers=headers)
    return ApiError(500, f"internal error: {exc}", code="server_error")


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The ``{"error": {...}}`` body for an event stream (SSE, WebSocket)."""
    return to_api_error(exc).body()
