"""What the compatible APIs (CosyVoice, CSM, Fish Speech) share.

Each compatible API is a thin adapter in its own module over the same hub,
voice library and cloning engines as the OpenAI face; this module holds the
pieces they have in common: reading form fields from any body (multipart,
urlencoded, the query string; GET bodies too, as CosyVoice's client sends
them), resolving a speaker name (``[http] speakers``, configured voices,
voice-library ids and names), picking the cloning model, turning an uploaded
sample into a :class:`~edgevoice.engines.base.VoiceReference`, and float
audio into 16-bit PCM. All file I/O and decoding runs in worker threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edgevoice.audio import float_to_pcm16
from edgevoice.engines.base import FloatAudio, VoiceReference
from edgevoice.errors import UnknownModelError, UnsupportedRequestError
from edgevoice.hub import LoadedModel
from edgevoice.protocols.http.errors import client_error, to_api_error
from edgevoice.protocols.http.forms import ClientGone, UploadedFile, read_form, too_large
from edgevoice.protocols.http.models import resolve_tts
from edgevoice.protocols.http.state import ServerState
from edgevoice.voices import (
    VoiceLibrary,
    VoiceNotFoundError,
    decode_reference,
    slugify,
    valid_voice_id,
)

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Fields:
    """A request's named text fields and uploaded files."""

    values: dict[str, str]
    files: dict[str, UploadedFile]

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if value else None


async def read_fields(request: web.Request, st: ServerState) -> Fields:
    """Form fields from a multipart or urlencoded body (any method), over the query string.

    Bounded like every body of the HTTP face (``limits.max_upload_bytes``,
    ``limits.idle_timeout_s``).
    """
    values: dict[str, str] = dict(request.query)
    files: dict[str, UploadedFile] = {}
    ctype = request.content_type
    limits = st.settings.limits
    if ctype.startswith("multipart/"):
        form = await read_form(request, limits)
        values.update(form.as_dict())
        files = form.files
    elif ctype == "application/x-www-form-urlencoded" and request.body_exists:
        limit = limits.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        raw = bytearray()
        try:
            async with asyncio.timeout(limits.idle_timeout_s):
                while chunk := await request.content.readany():
                    raw += chunk
                    if len(raw) > limit:
                        raise too_large(limit)
        except TimeoutError:
            raise client_error("the request body stalled", code="request_timeout") from None
        except ConnectionError as exc:
            raise ClientGone(str(exc)) from None
        except HttpProcessingError as exc:
            raise client_error(f"malformed request body: {exc.message}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise client_error("form body is not UTF-8") from None
        values.update(parse_qsl(text, keep_blank_values=True, max_num_fields=256))
    return Fields(values, files)


# ----------------------------------------------------------------- voices


@dataclass(frozen=True, slots=True)
class Speaker:
    """What a speaker name resolves to: a model and its voice, or a stored reference."""

    model: LoadedModel[Any]
    voice: str
    reference: VoiceReference | None


DEFAULT_STYLES: Final = ("neutral", "default", "normal")
"""The style a speaker name alone picks, when it has one of these (else its first by name)."""


def find_stored(library: VoiceLibrary, name: str) -> str | None:
    """Blocking: the library id for an id, a display name or its slug; None if none.

    A speaker imported from a Fish ``ref_data`` tree is stored as one voice
    per style (``SPEAKER/EMOTION``); its name alone picks its default style
    (:data:`DEFAULT_STYLES`, else the first by name), so ``SPEAKER`` works
    wherever a voice name does (CosyVoice's ``spk_id``, Fish's ``reference_id``).
    """
    if valid_voice_id(name):
        return name
    slug_id = f"voice_{slugify(name)}"
    folded = name.casefold()
    voices = library.voices()
    for voice in voices:
        if voice.name.casefold() == folded:
            return voice.id
    try:
        library.get(slug_id)
    except VoiceNotFoundError:
        pass
    else:
        if slugify(name) != "voice":
            return slug_id
    styles = {
        voice.name.casefold().removeprefix(f"{folded}/"): voice.id
        for voice in voices
        if voice.name.casefold().startswith(f"{folded}/")
    }
    for style in (*DEFAULT_STYLES, *sorted(styles)):
        if style in styles:
            return styles[style]
    return None


def cloning_model(st: ServerState, param: str | None = None) -> LoadedModel[Any]:
    """The model compatible APIs clone with: the default TTS model if it can, else the first."""
    default = resolve_tts(st.hub, None)
    if default.engine.capabilities.cloning:
        return default
    for model, caps in st.hub.tts_capabilities():
        if caps.cloning:
            return model
    error = UnsupportedRequestError(
        "no configured TTS model can clone voices; configure one whose engine supports cloning",
        param=param,
    )
    error.code = "cloning_not_supported"
    raise error


async def resolve_speaker(st: ServerState, name: str, param: str) -> Speaker:
    """A speaker name → configured voice or stored voice (through ``[http] speakers``).

    An unknown name is an :class:`UnknownModelError` that lists configured
    voices only (stored voices belong to whoever stored them).
    """
    hub = st.hub
    target = st.settings.http.speakers.get(name, name)
    if target in hub.voice_names():
        model, _engine_voice = hub.voice(target)
        return Speaker(model, target, None)
    stored = await asyncio.to_thread(find_stored, st.library, target)
    if stored is None:
        raise UnknownModelError("tts", name, hub.voice_names(), param=param)
    model = cloning_model(st, param)
    try:
        reference = await asyncio.to_thread(st.library.reference, stored)
    except VoiceNotFoundError:
        raise UnknownModelError("tts", name, hub.voice_names(), param=param) from None
    return Speaker(model, model.name, reference)


async def uploaded_reference(
    data: bytes, text: str | None, instruct_text: str | None = None
) -> VoiceReference:
    """A cloning reference from an uploaded sample (decoded, 1-30 s, in a worker thread)."""
    audio = await asyncio.to_thread(decode_reference, data)
    return VoiceReference(audio.samples, audio.rate_hz, text, instruct_text)


def require_instructions(
    st: ServerState, model: LoadedModel[Any], param: str = "instruct_text"
) -> None:
    """Refuse style instructions for a model that cannot follow them (never ignore them)."""
    if not model.engine.capabilities.instructions:
        able = [m.name for m, caps in st.hub.tts_capabilities() if caps.instructions]
        raise UnsupportedRequestError(
            f"model {model.name!r} (engine {model.slot.plugin.name}) has no style control, "
            "so it cannot follow instruct_text"
            + (f"; models that can: {', '.join(able)}" if able else ""),
            param=param,
        )


def to_pcm16(samples: FloatAudio) -> bytes:
    """Float audio → 16-bit little-endian PCM bytes (blocking, cheap)."""
    return float_to_pcm16(np.asarray(samples, dtype=np.float32))


class MissingFields(Exception):
    """Required fields absent: FastAPI's 422 in the FastAPI-shaped APIs."""

    def __init__(self, fields: list[str]) -> None:
        super().__init__(", ".join(fields))
        self.fields = fields


def require(fields: Fields, names: tuple[str, ...], files: frozenset[str] = frozenset()) -> None:
    """Raise :class:`MissingFields` for each of ``names`` absent (``files`` must be uploads)."""
    absent = [
        n for n in names if (n not in fields.files if n in files else fields.values.get(n) is None)
    ]
    if absent:
        raise MissingFields(absent)


def fastapi_error(exc: BaseException, headers: dict[str, str] | None = None) -> web.Response:
    """FastAPI's error shape (CosyVoice's and CSM's servers are FastAPI apps).

    Missing fields are 422 ``{"detail": [{type, loc, msg, input}]}``; anything
    else ``{"detail": message}`` with the status the HTTP face gives it.
    """
    if isinstance(exc, MissingFields):
        detail = [
            {"type": "missing", "loc": ["body", name], "msg": "Field required", "input": None}
            for name in exc.fields
        ]
        return web.json_response({"detail": detail}, status=422, headers=headers)
    error = to_api_error(exc)
    if error.status >= 500 and error.status != 503:
        _LOGGER.error("Request failed", exc_info=exc)
    return web.json_response(
        {"detail": error.message}, status=error.status, headers={**(headers or {}), **error.headers}
    )


def unpack_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """Xinference's client sends extra fields as a JSON string ``kwargs``
    (``prompt_text``, ``instruct_text``, ...): merged under the top-level fields.

    A ``kwargs`` that is not a JSON object (as a string) is a 400.
    """
    raw = body.get("kwargs")
    if raw is None or raw == "":
        return body
    if not isinstance(raw, str):
        raise client_error("kwargs must be a JSON object encoded as a string", "kwargs")
    try:
        extra = json.loads(raw)
    except (ValueError, RecursionError):
        raise client_error("kwargs is not valid JSON", "kwargs") from None
    if not isinstance(extra, dict):
        raise client_error("kwargs must be a JSON object", "kwargs")
    rest = {k: v for k, v in body.items() if k != "kwargs"}
    return {**extra, **rest}


# ------------------------------------------------------------ error shapes

ErrorShape = Callable[[BaseException], web.Response]
"""An exception → its answer in one compatible API's error shape."""


class ErrorShapes(dict[str, ErrorShape]):
    """Route (canonical path) → the error shape of the compatible API it belongs to."""


ERROR_SHAPES: Final = web.AppKey("edgevoice_compat_error_shapes", ErrorShapes)


def add_error_shape(app: web.Application, paths: Iterable[str], shape: ErrorShape) -> None:
    """Errors the shared middleware answers on ``paths`` (401, 429, 405...) take ``shape``."""
    if ERROR_SHAPES not in app:
        app[ERROR_SHAPES] = ErrorShapes()
    for path in paths:
        app[ERROR_SHAPES][path] = shape


def compat_error(request: web.Request, exc: BaseException) -> web.Response | None:
    """``exc`` in the shape of the compatible API ``request`` went to; None for the OpenAI face.

    The HTTP face's middleware (auth, per-client bound, unknown methods) asks
    this first, so a CosyVoice or CSM client gets FastAPI's ``{"detail"}`` and a
    Fish client ``{"statusCode", "message", "error"}`` for those errors too.
    """
    shapes = request.app.get(ERROR_SHAPES)
    if not shapes:
        return None
    resource = request.match_info.route.resource
    shape = shapes.get(resource.canonical if resource is not None else request.path)
    return None if shape is None else shape(exc)
