"""One error taxonomy for every face.

Engines, the hub, the audio layer and the voice pipeline raise these; each
protocol maps them once to its own wire shape (OpenAI's error JSON, a Wyoming
``error`` event, an MQTT error message). The split that matters to a client
is :class:`ClientError` (the request is at fault: do not retry as is) versus
:class:`ServerError` (the daemon failed: retrying may help).

This module imports nothing from edgevoice, so every layer can use it.
"""

from __future__ import annotations

from collections.abc import Sequence


class EdgeVoiceError(Exception):
    """Base of every error a request can end with."""

    code = "internal_error"
    """Stable machine-readable code (Wyoming ``code``, OpenAI ``code``, MQTT ``code``)."""


class ClientError(EdgeVoiceError):
    """The request is at fault (bad input, unknown name, a limit crossed)."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        """The request field at fault, when one is (OpenAI's ``param``)."""


class BadAudioError(ClientError, ValueError):
    """Audio that is empty, corrupt or in an unsupported format."""

    code = "bad_audio"


class UnknownModelError(ClientError, LookupError):
    """A request named a model or voice that is not configured or stored.

    The message never lists other stored ids (voice-library ids are private
    to whoever created them); ``known`` names configured models only.
    """

    code = "unknown_model"

    def __init__(
        self, kind: str, name: str, known: Sequence[str] = (), *, param: str | None = None
    ) -> None:
        what = "voice" if kind == "tts" else f"{kind} model"
        message = f"unknown {what} {name!r}"
        if known:
            message += f"; available: {', '.join(known)}"
        super().__init__(message, param=param)
        self.kind = kind
        self.name = name
        self.known = list(known)


class UnsupportedRequestError(ClientError, ValueError):
    """The chosen engine cannot serve this request.

    For example: translation asked of an English-only model, an unknown
    speaker, text that phonemizes to nothing, cloning on a model that cannot.
    """

    code = "unsupported"


class LimitExceededError(ClientError):
    """A request crossed a ``[limits]`` bound; checked before the work is done."""

    code = "limit_exceeded"

    def __init__(
        self,
        limit: str,
        maximum: float,
        *,
        what: str | None = None,
        unit: str = "",
        param: str | None = None,
    ) -> None:
        subject = what or limit
        shown = f"{maximum:g}" if isinstance(maximum, float) else str(maximum)
        super().__init__(
            f"{subject} exceeds the limit of {shown}{' ' + unit if unit else ''} (limits.{limit})",
            param=param,
        )
        self.limit = limit
        """The ``[limits]`` key crossed."""
        self.maximum = maximum


class PayloadTooLargeError(LimitExceededError):
    """A byte-size limit (upload, message, library) was crossed (HTTP 413)."""


class BusyError(ClientError):
    """Too many requests pending for this client or face; retry later (HTTP 429)."""

    code = "busy"


class ServerError(EdgeVoiceError):
    """The daemon failed to serve a well-formed request."""

    code = "server_error"


class EngineError(ServerError, RuntimeError):
    """An engine failed while serving a request."""

    code = "engine_error"


class ShuttingDownError(ServerError):
    """The daemon is stopping or the model was retired; retry elsewhere or later."""

    code = "unavailable"
