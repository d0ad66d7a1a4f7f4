"""``/v1/audio/voices``: built-in voices and the voice library (cloning references).

Uploads are refused before the body is read when no loaded TTS model can
clone (a reference nobody can use is only a liability), and the library's
quota (``limits.max_voices``, ``limits.max_voice_library_bytes``) is
checked before anything is stored. A 404 names the requested id only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from edgevoice.errors import UnsupportedRequestError
from edgevoice.protocols.http.errors import client_error
from edgevoice.protocols.http.forms import read_form
from edgevoice.protocols.http.state import state
from edgevoice.voices import VoiceNotFoundError


async def list_voices(request: web.Request) -> web.Response:
    st = state(request)
    data: list[dict[str, Any]] = []
    for model, caps in st.hub.tts_capabilities():
        for info in caps.voices:
            data.append(
                {
                    "id": info.name,
                    "object": "audio.voice",
                    "type": "builtin",
                    "name": info.name,
                    "model": model.name,
                    "engine": model.slot.plugin.name,
                    "languages": list(info.languages),
                    "speakers": list(info.speakers),
                    "cloning": caps.cloning,
                }
            )
    stored = await asyncio.to_thread(st.library.voices)
    data.extend(v.to_json() for v in stored)
    return web.json_response({"object": "list", "data": data})


async def create_voice(request: web.Request) -> web.Response:
    st = state(request)
    if not any(caps.cloning for _model, caps in st.hub.tts_capabilities()):
        error = UnsupportedRequestError(
            "no configured TTS model can clone voices, so the voice library takes no "
            "uploads; configure a model whose engine supports cloning",
        )
        error.code = "cloning_not_supported"
        raise error
    form = await read_form(request, st.settings.limits)
    name = form.get("name")
    if not name:
        raise client_error("name is required", "name", "missing_name")
    upload = form.files.get("audio_sample") or form.files.get("file")
    if upload is None:
        raise client_error(
            "audio_sample is required (a 1–30 s recording)", "audio_sample", "missing_file"
        )
    transcript = form.get("transcript") or form.get("text") or None
    voice = await asyncio.to_thread(st.library.add, name, upload.data, transcript)
    return web.json_response(voice.to_json(), status=201)


def _not_found(voice_id: str) -> VoiceNotFoundError:
    error = VoiceNotFoundError(voice_id)
    error.param = "voice_id"
    return error


async def get_voice(request: web.Request) -> web.Response:
    st = state(request)
    voice_id = request.match_info["voice_id"]
    try:
        voice = await asyncio.to_thread(st.library.get, voice_id)
    except VoiceNotFoundError:
        raise _not_found(voice_id) from None
    return web.json_response(voice.to_json())


async def delete_voice(request: web.Request) -> web.Response:
    st = state(request)
    voice_id = request.match_info["voice_id"]
    try:
        await asyncio.to_thread(st.library.delete, voice_id)
    except VoiceNotFoundError:
        raise _not_found(voice_id) from None
    return web.json_response({"id": voice_id, "object": "audio.voice.deleted", "deleted": True})
