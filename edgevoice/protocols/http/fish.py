"""Fish Speech's HTTP API (``tools.api``), on the same hub and voice library.

``POST /v1/tts`` takes Fish's request (JSON, or MessagePack as
``tools.post_api`` sends it): ``text``, ``references`` (inline
``{audio, text}``: bytes, or base64 in JSON), ``reference_id`` (a stored
voice: its id or name; with ``emotion``, the voice ``SPEAKER/EMOTION`` that
``edgevoice voices import`` made from a ``ref_data`` tree), ``format``
(wav|pcm|mp3), ``streaming`` (WAV only, as in Fish), ``chunk_length``
(100-300 characters: sentences are cut at most this long) and ``normalize``.
Sampling fields (``temperature``, ``top_p``, ``seed``, ...) are accepted for
compatibility; the engines choose their own sampling. ``pcm`` is bare s16le
at the model's rate.

``/v1/references/add`` (multipart ``id``, ``audio``, ``text``), ``GET
/v1/references/list`` and ``DELETE /v1/references/delete`` (``reference_id``)
manage the voice library (its quotas apply), so a reference added here is a
stored voice for every API: CosyVoice's ``spk_id``, OpenAI's ``voice``.

Errors come in Fish's shape ``{"statusCode", "message", "error"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web

from edgevoice.audio import StreamEncoder
from edgevoice.engines.base import SynthesizeOptions, VoiceReference
from edgevoice.errors import ClientError, LimitExceededError
from edgevoice.pipeline.speak import SpokenAudio, speak
from edgevoice.protocols.http.compat import (
    MissingFields,
    add_error_shape,
    cloning_model,
    find_stored,
    read_fields,
    uploaded_reference,
)
from edgevoice.protocols.http.errors import ApiError, client_error, to_api_error
from edgevoice.protocols.http.forms import (
    ClientGone,
    parse_choice,
    read_json,
    too_large,
)
from edgevoice.protocols.http.speech import check_text, log_stream_failure
from edgevoice.protocols.http.state import ServerState, state
from edgevoice.voices import VoiceLibrary, VoiceNotFoundError

_LOGGER = logging.getLogger(__name__)

FORMATS: Final = ("wav", "pcm", "mp3")
MAX_REFERENCES: Final = 8
CHUNK_RANGE: Final = (100, 300)
MAX_SAMPLE_BYTES: Final = 64 * 1024 * 1024
"""A ref_data sample larger than this is skipped unread (30 s of any sane format is far less)."""


def fish_error(exc: BaseException) -> web.Response:
    """Fish's error shape: ``{"statusCode", "message", "error"}`` with the face's status."""
    if isinstance(exc, MissingFields):
        error = ApiError(422, f"missing field(s): {', '.join(exc.fields)}")
    else:
        error = to_api_error(exc)
    if error.status >= 500 and error.status != 503:
        _LOGGER.error("Fish Speech request failed", exc_info=exc)
    body = {
        "statusCode": error.status,
        "message": error.message,
        "error": HTTPStatus(error.status).phrase,
    }
    return web.json_response(body, status=error.status, headers=error.headers)


async def _read_body(request: web.Request, st: ServerState) -> dict[str, Any]:
    ctype = request.content_type
    if ctype in ("application/msgpack", "application/x-msgpack"):
        limit = st.settings.limits.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
        raw = bytearray()
        try:
            async with asyncio.timeout(st.settings.limits.idle_timeout_s):
                while chunk := await request.content.readany():
                    raw += chunk
                    if len(raw) > limit:
                        raise too_large(limit)
        except TimeoutError:
            raise client_error("the request body stalled", code="request_timeout") from None
        except ConnectionError as exc:
            raise ClientGone(str(exc)) from None
        try:
            import msgpack  # type: ignore[import-untyped]
        except ImportError:
            raise ApiError(415, "MessagePack bodies need the msgpack package; send JSON") from None
        try:
            body = await asyncio.to_thread(msgpack.unpackb, bytes(raw), raw=False)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise client_error(f"request body is not valid MessagePack: {exc}") from None
        if not isinstance(body, dict):
            raise client_error("request body must be a map")
        return body
    return await read_json(request, st.settings.limits)


def _audio_bytes(value: Any, limit: int) -> bytes:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str) and value:
        if len(value) > limit * 4 // 3 + 64:
            raise too_large(limit)
        try:
            data = base64.b64decode(
                value.partition(",")[2] if value.startswith("data:") else value, validate=True
            )
        except (binascii.Error, ValueError):
            raise client_error("references[].audio is not valid base64", "references") from None
    else:
        raise client_error("references[].audio must be audio bytes (base64 in JSON)", "references")
    if len(data) > limit:
        raise too_large(limit)
    return data


async def _reference(st: ServerState, body: dict[str, Any]) -> VoiceReference | None:
    ref_id = body.get("reference_id")
    emotion = body.get("emotion")
    for name, value in (("reference_id", ref_id), ("emotion", emotion)):
        if value is not None and not isinstance(value, str):
            raise client_error(f"{name} must be a string", name)
    refs = body.get("references", [])
    if refs != []:
        if not isinstance(refs, list) or len(refs) > MAX_REFERENCES:
            raise client_error(
                f"references must be a list of at most {MAX_REFERENCES} {{audio, text}}",
                "references",
            )
        for ref in refs:
            if not isinstance(ref, dict) or not isinstance(ref.get("audio"), str | bytes):
                raise client_error("references[] must be {audio, text}", "references")
            if "text" in ref and not isinstance(ref["text"], str):
                raise client_error("references[].text must be a string", "references")
        first = refs[0]
        text = first.get("text")
        data = _audio_bytes(first.get("audio"), st.settings.limits.max_upload_bytes)
        return await uploaded_reference(data, text or None)
    if not ref_id:
        return None
    stored = await asyncio.to_thread(_find_reference, st, ref_id, emotion or None)
    if stored is None:
        raise _not_found(ref_id[:100], emotion)
    return await asyncio.to_thread(st.library.reference, stored)


def _not_found(ref_id: str, emotion: str | None) -> ClientError:
    error = VoiceNotFoundError(f"{ref_id}/{emotion}" if emotion else ref_id)
    error.param = "reference_id"
    return error


def _find_reference(st: ServerState, ref_id: str, emotion: str | None) -> str | None:
    """Blocking: a stored voice for ``reference_id`` (and ``emotion``)."""
    target = st.settings.http.speakers.get(ref_id, ref_id)
    if emotion is not None:
        return find_stored(st.library, f"{target}/{emotion}")
    return find_stored(st.library, target)  # an imported speaker: its default emotion


T = TypeVar("T")


def _typed(body: dict[str, Any], name: str, kind: type[T], default: T) -> T:
    """A field of exactly JSON type ``kind`` (no coercion: ``"1"`` is no number), or the default."""
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise client_error(f"{name} must be of type {kind.__name__}", name)
    return value


async def tts(request: web.Request) -> web.StreamResponse:
    """``POST /v1/tts``."""
    st = state(request)
    limits = st.settings.limits
    try:
        body = await _read_body(request, st)
        if body.get("text") is None:
            raise MissingFields(["text"])
        text = check_text(body.get("text"), limits.max_input_chars, "text")
        fmt = parse_choice(_typed(body, "format", str, "wav"), "format", FORMATS, "wav")
        streaming = _typed(body, "streaming", bool, False)
        if streaming and fmt != "wav":
            raise client_error("streaming only supports the wav format", "format")
        chunk_length = _typed(body, "chunk_length", int, 200)
        if not CHUNK_RANGE[0] <= chunk_length <= CHUNK_RANGE[1]:
            raise client_error(
                f"chunk_length must be between {CHUNK_RANGE[0]} and {CHUNK_RANGE[1]}, "
                f"not {chunk_length}",
                "chunk_length",
            )
        _typed(body, "normalize", bool, True)
        reference = await _reference(st, body)
        if reference is not None:
            model = cloning_model(st, "references")
            options = SynthesizeOptions(voice=model.name, reference=reference)
        else:
            options = SynthesizeOptions()
        sentence_limits = limits.model_copy(
            update={"max_sentence_chars": min(chunk_length, limits.max_sentence_chars)}
        )
        spoken = speak(st.hub, text, options, sentence_limits)
        try:
            first = await anext(spoken, None)
            if first is None:
                raise client_error("text produced no speech (nothing to say)", "text")
            encoder = await asyncio.to_thread(StreamEncoder, fmt, spoken.rate_hz)
            if not streaming:
                data = await asyncio.to_thread(encoder.write, first.samples)
                parts = [data]
                async for chunk in spoken:
                    parts.append(await asyncio.to_thread(encoder.write, chunk.samples))
                parts.append(await asyncio.to_thread(encoder.close))
                await spoken.aclose()
                st.metrics.add_audio("out", spoken.model.name, spoken.audio_s)
                return web.Response(
                    body=b"".join(parts),
                    headers={
                        "Content-Type": encoder.content_type,
                        "Content-Disposition": f"attachment; filename=audio.{fmt}",
                        "X-Sample-Rate": str(spoken.rate_hz),
                    },
                )
        except BaseException:
            await spoken.aclose()
            raise
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return fish_error(exc)
    return await _stream(request, st, spoken, encoder, first)


async def _stream(
    request: web.Request, st: ServerState, spoken: Any, encoder: StreamEncoder, first: SpokenAudio
) -> web.StreamResponse:
    async with spoken:
        response = web.StreamResponse(
            headers={"Content-Type": encoder.content_type, "X-Sample-Rate": str(spoken.rate_hz)}
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)  # a client gone already: quietly, as below
            chunk: SpokenAudio | None = first
            while chunk is not None:
                if data := await asyncio.to_thread(encoder.write, chunk.samples):
                    await response.write(data)
                chunk = await anext(spoken, None)
            if tail := await asyncio.to_thread(encoder.close):
                await response.write(tail)
            await response.write_eof()
        except ConnectionError:
            _LOGGER.debug("Fish Speech client went away mid-stream")
        except Exception as exc:
            log_stream_failure(exc, "Fish Speech synthesis failed mid-stream")
            if request.transport is not None:
                request.transport.close()
        finally:
            st.metrics.add_audio("out", spoken.model.name, spoken.audio_s)
    return response


# -------------------------------------------------------------- references


async def add_reference(request: web.Request) -> web.Response:
    st = state(request)
    try:
        fields = await read_fields(request, st)
        absent = [n for n in ("id", "text") if not fields.values.get(n)]
        absent += [] if "audio" in fields.files else ["audio"]
        if absent:
            raise MissingFields(absent)
        ref_id = fields.values["id"]
        cloning_model(st, "audio")  # a reference nobody can use is refused
        existing = await asyncio.to_thread(find_stored, st.library, ref_id)
        if existing is not None:
            raise ApiError(409, f"reference {ref_id[:100]!r} already exists")
        voice = await asyncio.to_thread(
            st.library.add, ref_id, fields.files["audio"].data, fields.values["text"]
        )
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return fish_error(exc)
    return web.json_response(
        {
            "success": True,
            "message": f"reference {voice.name!r} added as voice {voice.id}",
            "reference_id": voice.name,
        }
    )


async def list_references(request: web.Request) -> web.Response:
    st = state(request)
    voices = await asyncio.to_thread(st.library.voices)
    return web.json_response(
        {
            "success": True,
            "reference_ids": [v.name for v in voices],
            "message": f"{len(voices)} references",
        }
    )


async def delete_reference(request: web.Request) -> web.Response:
    st = state(request)
    try:
        if request.content_type in ("application/json", ""):
            body = await read_json(request, st.settings.limits) if request.body_exists else {}
            values = {**request.query, **body}
        else:
            values = {**(await read_fields(request, st)).values}
        ref_id = values.get("reference_id")
        if not isinstance(ref_id, str) or not ref_id:
            raise MissingFields(["reference_id"])
        stored = await asyncio.to_thread(find_stored, st.library, ref_id)
        if stored is None:
            raise _not_found(ref_id[:100], None)
        try:
            await asyncio.to_thread(st.library.delete, stored)
        except VoiceNotFoundError:
            raise _not_found(ref_id[:100], None) from None
    except (ClientGone, ConnectionError):
        raise
    except Exception as exc:
        return fish_error(exc)
    return web.json_response(
        {"success": True, "message": f"reference {ref_id!r} deleted", "reference_id": ref_id}
    )


def add_fish_routes(app: web.Application) -> None:
    """Fish Speech's ``/v1/tts`` and ``/v1/references/*``."""
    app.router.add_post("/v1/tts", tts)
    app.router.add_post("/v1/references/add", add_reference)
    app.router.add_get("/v1/references/list", list_references)
    app.router.add_delete("/v1/references/delete", delete_reference)
    paths = ("/v1/tts", "/v1/references/add", "/v1/references/list", "/v1/references/delete")
    add_error_shape(app, paths, fish_error)


# ------------------------------------------------------------ ref_data import

REF_AUDIO_SUFFIXES: Final = (".wav", ".flac", ".mp3", ".ogg")


@dataclass(frozen=True, slots=True)
class ImportedVoice:
    name: str
    """``SPEAKER/EMOTION``."""
    voice_id: str | None
    """The stored voice, or None when it failed (``error`` says why)."""
    error: str | None = None
    existed: bool = False


def import_ref_data(library: VoiceLibrary, root: Path) -> list[ImportedVoice]:
    """Blocking: store a Fish ``ref_data/SPEAKER/EMOTION/*.wav|.lab`` tree in the library.

    Each speaker is one voice with its emotions as styles: each
    ``SPEAKER/EMOTION`` is stored as the library voice named so, picked by
    ``/v1/tts`` with ``reference_id=SPEAKER`` and ``emotion=EMOTION``; the
    speaker's name alone (Fish's ``reference_id``, CosyVoice's ``spk_id``)
    picks its ``neutral``/``default``/``normal`` emotion, else its first by
    name. Each style is made from its first sample (sorted by name) that has a
    ``.lab`` transcript and is 1-30 s long. Voices already stored are kept;
    library quotas apply. Symbolic links are not followed.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    results: list[ImportedVoice] = []
    for speaker in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for emotion in sorted(p for p in speaker.iterdir() if p.is_dir() and not p.is_symlink()):
            name = f"{speaker.name}/{emotion.name}"
            existing = find_stored(library, name)
            if existing is not None:
                results.append(ImportedVoice(name, existing, existed=True))
                continue
            results.append(_import_one(library, name, emotion))
    return results


def _import_one(library: VoiceLibrary, name: str, folder: Path) -> ImportedVoice:
    error = "no audio file with a .lab transcript"
    samples = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in REF_AUDIO_SUFFIXES and p.is_file() and not p.is_symlink()
    )
    for sample in samples:
        lab = sample.with_suffix(".lab")
        if not lab.is_file():
            continue
        try:
            if sample.stat().st_size > MAX_SAMPLE_BYTES:
                error = f"{sample.name}: larger than {MAX_SAMPLE_BYTES} bytes"
                continue
            transcript = lab.read_text(encoding="utf-8").strip()
            voice = library.add(name, sample.read_bytes(), transcript or None)
        except (ClientError, OSError, UnicodeDecodeError) as exc:
            error = f"{sample.name}: {exc}"
            if isinstance(exc, LimitExceededError):
                break  # the library is full: no other sample will fit
            continue
        return ImportedVoice(name, voice.id)
    return ImportedVoice(name, None, error)
