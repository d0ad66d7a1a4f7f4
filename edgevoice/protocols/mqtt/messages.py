"""What comes in over MQTT and what may go back out.

- Request payloads (:class:`SayRequest`, :class:`TranscribeRequest`) and
  their parsing (plain text, JSON, raw audio).
- :class:`RequestContext`: where a request came from (MQTT 5 properties).
  Every value that can end up in a topic — JSON ``id``, the MQTT 5 user
  property ``id``, the response topic, Hermes ``id``/``sessionId`` — is
  checked here before it reaches one (:func:`checked_id`,
  :func:`check_response_topic`).
- :func:`error_fields`: the one mapping of :mod:`edgevoice.errors` to the
  MQTT error message shape.

Pure functions and data (no connection state); parsing of large payloads is
blocking and runs in a worker thread (the bridge decides).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgevoice.errors import (
    ClientError,
    EdgeVoiceError,
    LimitExceededError,
    ShuttingDownError,
)

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
"""Ids go into topics (``<base>/tts/audio/<id>``): no ``/``, ``+``, ``#``, no spaces."""
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
ID_RULE = "1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'"
MAX_RESPONSE_TOPIC_BYTES = 256
"""Longest MQTT 5 response topic accepted (UTF-8 bytes)."""
MAX_CORRELATION_BYTES = 1024
"""Longest MQTT 5 correlation data echoed back."""
_USER_PROPERTIES = ("id", "client", "model", "language")
"""MQTT 5 user properties the bridge reads; others are ignored (not even copied)."""


class MqttRequestError(ClientError, ValueError):
    """A request payload or property the bridge rejects (``invalid_request``).

    ``request_id`` is the request's id when it could be read and is valid,
    so the error report can name it.
    """

    def __init__(
        self, message: str, *, request_id: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.request_id = request_id


class RequestExpiredError(ClientError):
    """The request's MQTT 5 message expiry passed before its reply was ready."""

    code = "expired"


# ------------------------------------------------------------ ids and topics


def valid_id(value: object) -> str | None:
    """``value`` as an id when it is one that may go into a topic, else None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if _REQUEST_ID.match(text) else None


def checked_id(value: object, source: str) -> str | None:
    """An id from ``source`` (``"id"``, ``"user property id"``, ``"sessionId"``...).

    None when absent; :class:`MqttRequestError` when present but not an id
    that may go into a topic.
    """
    if value is None or value == "":
        return None
    checked = valid_id(value)
    if checked is None:
        raise MqttRequestError(f"{source}: must be {ID_RULE}", param=source)
    return checked


def check_response_topic(topic: str, reserved_prefixes: Sequence[str]) -> str:
    """An MQTT 5 response topic the bridge may publish a reply to, or :class:`MqttRequestError`.

    Refused: empty or longer than :data:`MAX_RESPONSE_TOPIC_BYTES`, wildcards
    (``+``, ``#``) or NUL, broker topics (``$...``), and anything under a
    reserved prefix (the daemon's own topic prefix, the discovery prefix, Hermes),
    so a request cannot make the daemon publish onto topics others trust.
    """
    if not topic:
        raise MqttRequestError("response topic is empty", param="ResponseTopic")
    if len(topic.encode("utf-8")) > MAX_RESPONSE_TOPIC_BYTES:
        raise MqttRequestError(
            f"response topic is longer than {MAX_RESPONSE_TOPIC_BYTES} bytes",
            param="ResponseTopic",
        )
    if any(c in topic for c in "+#\0"):
        raise MqttRequestError(
            "response topic must not contain wildcards ('+', '#')", param="ResponseTopic"
        )
    if topic.startswith("$"):
        raise MqttRequestError(
            "response topic must not be a broker ($) topic", param="ResponseTopic"
        )
    for prefix in reserved_prefixes:
        if topic == prefix or topic.startswith(prefix + "/"):
            raise MqttRequestError(
                f"response topic must not be under {prefix!r}/ (reserved)", param="ResponseTopic"
            )
    return topic


def new_id() -> str:
    return uuid.uuid4().hex[:12]


# ------------------------------------------------------------------ requests


def _error_text(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SayRequest(_Request):
    text: str = Field(min_length=1)
    voice: str | None = None
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    format: Literal["wav", "flac", "mp3", "opus", "aac", "pcm"] = "wav"
    play: bool = False


class TranscribeRequest(_Request):
    audio_b64: str = Field(min_length=1)
    language: str | None = None
    model: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = None


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MqttRequestError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MqttRequestError("JSON payload must be an object")
    return data


def parse_say(payload: bytes) -> SayRequest:
    """Blocking for large payloads: a speak request, JSON or plain text (``{"text": payload}``).

    A rejected JSON request's error carries its id when that id is valid.
    """
    stripped = payload.strip()
    if stripped[:1] == b"{":
        data = _json_object(stripped)
        try:
            return SayRequest.model_validate(data)
        except ValidationError as exc:
            raise MqttRequestError(_error_text(exc), request_id=valid_id(data.get("id"))) from None
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        raise MqttRequestError("speak payload is neither JSON nor UTF-8 text") from None
    if not text:
        raise MqttRequestError("text: empty speak request", param="text")
    return SayRequest(text=text)


def parse_transcribe(payload: bytes) -> tuple[TranscribeRequest | None, bytes]:
    """Blocking for large payloads: the JSON form with ``audio_b64``, or raw audio bytes."""
    if not payload:
        raise MqttRequestError("empty transcribe request (0 bytes)")
    if payload.lstrip()[:1] != b"{":
        return None, payload
    data = _json_object(payload)
    request_id = valid_id(data.get("id"))
    try:
        request = TranscribeRequest.model_validate(data)
    except ValidationError as exc:
        raise MqttRequestError(_error_text(exc), request_id=request_id) from None
    try:
        audio = base64.b64decode(request.audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise MqttRequestError(
            "audio_b64 is not valid base64", request_id=request_id, param="audio_b64"
        ) from None
    return request, audio


# ------------------------------------------------------------------ context


@dataclass(slots=True)
class RequestContext:
    """Where a request came from and where its answers go.

    Built by :meth:`from_message`, which never raises: a property that may
    not be used (a response topic with wildcards, an id with ``/``) is left
    out and the problem kept in :attr:`problem`, so the request is refused
    with an error on ``<base>/error`` and nothing is published elsewhere.
    """

    topic: str
    response_topic: str | None = None
    correlation: bytes | None = None
    deadline: float | None = None
    """``time.monotonic()`` after which the reply is stale (MQTT 5 message expiry)."""
    user: dict[str, str] = field(default_factory=dict)
    """Checked MQTT 5 user properties (``id``, ``client``, ``model``, ``language``)."""
    problem: MqttRequestError | None = None
    received: float = field(default_factory=time.monotonic)

    @classmethod
    def from_message(
        cls, message: aiomqtt.Message, reserved_prefixes: Sequence[str] = ()
    ) -> RequestContext:
        ctx = cls(topic=str(message.topic))
        props = message.properties
        if props is None:
            return ctx
        try:
            response_topic = getattr(props, "ResponseTopic", None)
            if response_topic is not None:
                ctx.response_topic = check_response_topic(str(response_topic), reserved_prefixes)
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                if len(correlation) > MAX_CORRELATION_BYTES:
                    raise MqttRequestError(
                        f"correlation data is longer than {MAX_CORRELATION_BYTES} bytes",
                        param="CorrelationData",
                    )
                ctx.correlation = bytes(correlation)
            expiry = getattr(props, "MessageExpiryInterval", None)
            if expiry is not None:
                ctx.deadline = ctx.received + float(expiry)
            for key, value in getattr(props, "UserProperty", None) or []:
                if key in _USER_PROPERTIES:
                    ctx.user[str(key)] = str(value)
            for key in ("id", "client"):
                if key in ctx.user:
                    checked = checked_id(ctx.user.pop(key), f"user property {key}")
                    if checked is not None:
                        ctx.user[key] = checked
        except MqttRequestError as exc:
            ctx.problem = exc
        return ctx

    @property
    def client_key(self) -> str:
        """Whose request this is, for the per-client bound and fair turns.

        MQTT does not tell subscribers who published; a client that names
        itself (user property ``client``) or its reply topic is counted on its
        own, everyone else together (the whole face is one client).
        """
        if "client" in self.user:
            return f"client:{self.user['client']}"
        if self.response_topic:
            return f"reply:{self.response_topic}"
        return ""

    def check_expiry(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestExpiredError(
                "request expired (MQTT message expiry) before its reply was ready"
            )


Handler = Callable[[aiomqtt.Message], Awaitable[None]]
"""Runs on the reader, inline: must be quick (engine work goes into a request task)."""


@dataclass(frozen=True, slots=True)
class Route:
    filter: str
    """Topic filter the message must match (no ``$share`` prefix)."""
    handler: Handler
    subscription: str = ""
    """What to subscribe to; defaults to ``filter``."""
    request: bool = True
    """A request (retained copies are refused, unsubscribed first at shutdown)."""

    @property
    def subscribe_to(self) -> str:
        return self.subscription or self.filter


# ------------------------------------------------------------------- errors


def error_fields(exc: BaseException) -> dict[str, Any]:
    """The MQTT shape of any error a request can end with (the one mapping).

    ``{"error": text, "code": code}``, plus ``param`` (the field at fault)
    and ``limit``/``maximum`` (the ``[limits]`` key crossed) when known.
    Errors outside the taxonomy become ``internal_error`` without details
    (the daemon log has the traceback).
    """
    if isinstance(exc, asyncio.CancelledError):
        exc = ShuttingDownError("request cancelled at shutdown")
    if not isinstance(exc, EdgeVoiceError):
        return {"error": "internal error (see the daemon log)", "code": EdgeVoiceError.code}
    fields: dict[str, Any] = {"error": str(exc), "code": exc.code}
    if isinstance(exc, ClientError) and exc.param:
        fields["param"] = exc.param
    if isinstance(exc, LimitExceededError):
        fields["limit"] = exc.limit
        fields["maximum"] = exc.maximum
    return fields
