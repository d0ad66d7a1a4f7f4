"""The OpenAPI 3.1 document of the HTTP API and the offline ``/docs`` page rendered from it."""
# ruff: noqa: E501  (the spec is data: long descriptions read best on one line)

from __future__ import annotations

import copy
import html
import json
from typing import Any

from edgevoice import __version__ as VERSION
from edgevoice.config import LimitsConfig
from edgevoice.protocols.http.openapi_compat import SCHEMAS as COMPAT_SCHEMAS
from edgevoice.protocols.http.openapi_compat import compat_paths

_ERROR_RESPONSES = {
    "400": "Bad field, or a `[limits]` bound crossed (audio longer than `limits.max_audio_s`, text longer than `limits.max_input_chars`, ...)",
    "401": "Missing or wrong API key (when `api_key` is set)",
    "404": "Unknown model or voice (the message lists configured names only)",
    "408": "The request body stalled: nothing arrived for `limits.idle_timeout_s`",
    "413": "Upload larger than `limits.max_upload_bytes` (or a full voice library: `limits.max_voice_library_bytes`)",
    "415": "Audio that cannot be decoded, or a body that is not multipart/form-data",
    "426": "Plain HTTP request to the WebSocket route",
    "429": "`limits.max_pending_per_client` requests of this client are in flight (see `Retry-After`)",
    "500": "Engine failure (the daemon keeps serving)",
    "503": "The model is being retired by a reload, or the daemon is stopping (see `Retry-After`)",
}
_COMMON = ("429", "500")
"""Any counted route can answer these (and 401 when an API key is set)."""
AUDIO_TYPES = {
    "audio/mpeg": "mp3",
    "audio/ogg": "opus",
    "audio/aac": "aac",
    "audio/flac": "flac",
    "audio/wav": "wav",
    "audio/pcm": "pcm (s16le mono 24 kHz)",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(code: str) -> dict[str, Any]:
    return {
        "description": _ERROR_RESPONSES[code],
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _errors(*codes: str) -> dict[str, Any]:
    """The error responses of a counted route (401 is added when a key is set)."""
    return {code: _error(code) for code in sorted({*codes, *_COMMON})}


def _allow_null(schema: dict[str, Any]) -> None:
    """JSON ``null`` for an optional field means "not given" (as the server reads it)."""
    required = set(schema.get("required", ()))
    for name, prop in schema["properties"].items():
        if name in required:
            continue
        if "oneOf" in prop:
            prop["oneOf"].append({"type": "null"})
            continue
        if isinstance(prop.get("type"), str):
            prop["type"] = [prop["type"], "null"]
        if "enum" in prop:
            prop["enum"] = [*prop["enum"], None]


def _sse(event: str) -> dict[str, Any]:
    """A Server-Sent Event whose ``data`` is JSON matching schema ``event``."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": _ref(event),
            },
        },
    }


_UI_TYPES = (
    "text/html",
    "text/javascript",
    "text/css",
    "image/svg+xml",
    "image/png",
    "image/x-icon",
    "application/json",
    "application/manifest+json",
)


def _page_responses(content: dict[str, Any]) -> dict[str, Any]:
    """A static file of the web page: 200, 304 (ETag), 404 (no such file)."""
    return {
        "200": {"description": "The file", "content": content},
        "304": {"description": "Not modified (`If-None-Match` matched its `ETag`)"},
        "404": _error("404"),
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_TRANSCRIBE_FIELDS: dict[str, Any] = {
    "file": {"type": "string", "format": "binary", "description": "Audio file (wav, flac, mp3, ogg, opus, m4a, webm, ...)."},
    "model": {"type": "string", "description": "A configured ASR model or alias; OpenAI names such as `whisper-1` mean the default model."},
    "prompt": {"type": "string", "description": "Text the model should expect (vocabulary, previous sentence)."},
    "response_format": {"type": "string", "enum": ["json", "text", "srt", "verbose_json", "vtt"], "default": "json"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1, "description": "0 or omitted: the engine's fallback schedule (OpenAI's meaning)."},
    "hotwords": {"type": "string", "description": "edgevoice extension: words to boost (faster-whisper hotwords)."},
    "beam_size": {"type": "integer", "minimum": 1, "maximum": 20, "description": "edgevoice extension: beam search width (default: the model's `beam_size` option)."},
}  # fmt: skip

# Multipart field names travel in a part header: control characters cannot.
_FORM_FIELD_NAME = {"pattern": "^[^\\x00-\\x1f\\x7f]*$"}

# Standard base64 (padded), optionally as a data URL.
_BASE64 = "^(data:[^,]*,)?(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

_MODEL_STATE_FIELDS: dict[str, Any] = {
    "state": {"type": "string", "enum": ["loaded", "loading", "unloaded", "failed"]},
    "device": {"type": ["string", "null"], "description": "Where it runs (null before its first load)."},
    "memory_bytes": {"type": ["integer", "null"], "description": "Estimate: the process's RSS growth while it loaded (null when unloaded or unknown)."},
    "load": {"type": "string", "enum": ["startup", "on_demand"]},
    "ttl_s": {"type": "number", "description": "Unloaded after this many idle seconds (0 = never)."},
    "idle_s": {"type": ["number", "null"]},
    "error": {"type": ["string", "null"], "description": "Why the last load failed (state `failed`)."},
}  # fmt: skip


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _ref("ErrorDetail")},
    },
    "ErrorDetail": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {
                "type": "string",
                "description": "`invalid_request_error` or `server_error`.",
            },
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    },
    "TranscriptionRequest": {
        "type": "object",
        "propertyNames": _FORM_FIELD_NAME,
        "required": ["file"],
        "properties": {
            **_TRANSCRIBE_FIELDS,
            "language": {"type": "string", "description": "ISO 639-1 code; omitted: detect."},
            "timestamp_granularities[]": {
                "type": "array",
                "items": {"type": "string", "enum": ["word", "segment"]},
                "description": "With `verbose_json`: `word` adds per-word start/end times.",
            },
            "stream": {
                "type": "boolean",
                "default": False,
                "description": "Server-Sent Events `transcript.text.delta` per decoded segment, then `transcript.text.done`.",
            },
        },
    },
    "TranslationRequest": {
        "type": "object",
        "propertyNames": _FORM_FIELD_NAME,
        "required": ["file"],
        "properties": dict(_TRANSCRIBE_FIELDS),
    },
    "Transcription": {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}},
    },
    "TranscriptionVerbose": {
        "type": "object",
        "required": ["text", "language", "duration"],
        "properties": {
            "task": {"type": "string"},
            "language": {"type": "string"},
            "duration": {"type": "number"},
            "text": {"type": "string"},
            "segments": {"type": "array", "items": _ref("Segment")},
            "words": {"type": "array", "items": _ref("Word")},
        },
    },
    "Segment": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "start": {"type": "number"},
            "end": {"type": "number"},
            "text": {"type": "string"},
            "tokens": {"type": "array", "items": {"type": "integer"}},
            "avg_logprob": {"type": "number"},
            "no_speech_prob": {"type": "number"},
        },
    },
    "Word": {
        "type": "object",
        "required": ["word", "start", "end"],
        "properties": {
            "word": {"type": "string"},
            "start": {"type": "number", "description": "Seconds from the start of the file."},
            "end": {"type": "number"},
        },
    },
    "TranscriptionStreamEvent": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {
                "type": "string",
                "enum": ["transcript.text.delta", "transcript.text.done", "error"],
            },
            "delta": {"type": "string"},
            "text": {"type": "string"},
            "error": _ref("ErrorDetail"),
        },
    },
    "SpeechRequest": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "model": {
                "type": "string",
                "description": "A configured TTS model or alias (`tts-1` etc. mean the default).",
            },
            "input": {
                "type": "string",
                "minLength": 1,
                "maxLength": 4096,
                "pattern": "\\S",
                "description": "Text to speak, not blank (limit `limits.max_input_chars`).",
            },
            "voice": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "required": ["id"],
                        "properties": {"id": {"type": "string", "minLength": 1}},
                    },
                ],
                "description": "A configured voice, a stored voice id (`voice_...`) or `{\"id\": ...}`. OpenAI's names (alloy, echo, ...) use the model's own voice.",
            },
            "instructions": {"type": "string"},
            "response_format": {
                "type": "string",
                "enum": ["mp3", "opus", "aac", "flac", "wav", "pcm"],
                "default": "mp3",
            },
            "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0, "default": 1.0},
            "stream_format": {"type": "string", "enum": ["audio", "sse"], "default": "audio"},
            "voice_sample": {
                "type": "string",
                "contentEncoding": "base64",
                "pattern": _BASE64,
                "description": "Cloning (CSM style): base64 reference audio (or data URL), 1–30 s.",
            },
            "voice_sample_text": {"type": "string", "description": "Transcript of `voice_sample`."},
            "speaker": {"type": "string", "description": "Speaker of a multi-speaker voice."},
            "play": {
                "type": "boolean",
                "default": False,
                "description": "Speak it on this node's local speaker (`[audio_io]`) instead of returning audio; answers `SpeechPlayed` once played (400 without audio_io, 503 while its device is missing).",
            },
        },
    },
    "SpeechPlayed": {
        "type": "object",
        "required": ["played", "duration_s"],
        "properties": {
            "played": {"type": "boolean"},
            "duration_s": {"type": "number"},
            "error": {"type": "string"},
        },
    },
    "SpeechForm": {
        "type": "object",
        "propertyNames": _FORM_FIELD_NAME,
        "required": ["input"],
        "properties": {
            "model": {"type": "string"},
            "input": {"type": "string", "minLength": 1, "pattern": "\\S"},
            "voice": {"type": "string"},
            "response_format": {
                "type": "string",
                "enum": ["mp3", "opus", "aac", "flac", "wav", "pcm"],
            },
            "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0},
            "stream_format": {"type": "string", "enum": ["audio", "sse"]},
            "prompt_speech": {
                "type": "string",
                "format": "binary",
                "description": "Cloning (Xinference style): reference audio, 1–30 s.",
            },
            "prompt_text": {"type": "string", "description": "Transcript of `prompt_speech`."},
            "instruct_text": {
                "type": "string",
                "description": "Style instruction for the cloned voice.",
            },
        },
    },
    "SpeechStreamEvent": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {
                "type": "string",
                "enum": ["speech.audio.delta", "speech.audio.done", "error"],
                "description": "`error` (with `error`) when synthesis fails after the first audio.",
            },
            "error": _ref("ErrorDetail"),
            "audio": {
                "type": "string",
                "description": "Base64 audio in `response_format`; concatenated deltas form the file.",
            },
            "usage": {
                "type": "object",
                "description": "input_tokens = input characters; output_tokens = milliseconds of audio.",
                "properties": {
                    "input_tokens": {"type": "integer"},
                    "output_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    },
    "Voice": {
        "type": "object",
        "required": ["id", "object", "name", "type"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "const": "audio.voice"},
            "type": {"type": "string", "enum": ["builtin", "audio_sample"]},
            "name": {"type": "string"},
            "created_at": {"type": "integer"},
            "transcript": {"type": ["string", "null"]},
            "duration_s": {"type": "number"},
            "model": {"type": "string"},
            "engine": {"type": "string"},
            "cloning": {"type": "boolean"},
        },
    },
    "VoiceList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Voice")},
        },
    },
    "VoiceCreateForm": {
        "type": "object",
        "propertyNames": _FORM_FIELD_NAME,
        "required": ["name", "audio_sample"],
        "properties": {
            "name": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "pattern": "[^\\s\\x00-\\x1f\\x7f-\\x9f]",
                "description": "Display name (control characters are dropped; not blank).",
            },
            "audio_sample": {
                "type": "string",
                "format": "binary",
                "description": "Reference recording, 1–30 s.",
            },
            "transcript": {
                "type": "string",
                "description": "What the sample says (helps cloning engines).",
            },
            "consent": {
                "type": "string",
                "description": "Accepted for OpenAI client compatibility; ignored.",
            },
        },
    },
    "VoiceDeleted": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "audio.voice.deleted"},
            "deleted": {"type": "boolean"},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "kind": {"type": "string", "enum": ["asr", "tts"]},
            "engine": {"type": "string"},
            "aliases": {"type": "array", "items": {"type": "string"}},
            "default": {"type": "boolean"},
            "capabilities": {"type": "object"},
            **_MODEL_STATE_FIELDS,
        },
    },
    "ModelState": {
        "type": "object",
        "required": ["id", "object", "kind", "state"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model.state"},
            "kind": {"type": "string", "enum": ["asr", "tts", "wake", "vad"]},
            **_MODEL_STATE_FIELDS,
        },
    },
    "ModelList": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref("Model")},
        },
    },
    "Health": {
        "type": "object",
        "properties": {
            "status": {"type": "string"},
            "models": {"type": "object"},
            "uptime_s": {"type": "number"},
        },
    },
}


def _status_schema() -> dict[str, Any]:
    """``GET /v1/status``'s body (see :mod:`edgevoice.protocols.http.status`)."""
    count = {"type": "integer", "minimum": 0}
    status_schema = {
        "type": "object",
        "required": ["version", "uptime_s", "memory", "models", "protocols", "mqtt", "metrics"],
        "properties": {
            "object": {"type": "string", "const": "status"},
            "version": {"type": "string"},
            "uptime_s": {"type": "number"},
            "memory": {
                "type": "object",
                "properties": {"rss_bytes": {"type": ["integer", "null"]}},
            },
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["kind", "name", "engine", "device", "state"],
                    "properties": {
                        "kind": {"type": "string", "enum": ["asr", "tts", "wake", "vad"]},
                        "name": {"type": "string"},
                        "aliases": {"type": "array", "items": {"type": "string"}},
                        "default": {"type": "boolean"},
                        "engine": {"type": "string"},
                        "device": {"type": "string"},
                        "state": {"type": "string", "enum": ["ready", "busy", "retiring"]},
                        "memory_bytes": {
                            "type": ["integer", "null"],
                            "description": "When the engine reports it.",
                        },
                        "sessions": count,
                        "requests": count,
                        "busy_s": {"type": "number"},
                        "audio_s": {"type": "number"},
                        "load_s": {"type": "number"},
                    },
                },
            },
            "protocols": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "addresses"],
                    "properties": {
                        "name": {"type": "string"},
                        "addresses": {"type": "array", "items": {"type": "string"}},
                        "clients": {
                            **count,
                            "description": "Connected clients (HTTP: clients with requests in flight).",
                        },
                        "websockets": count,
                        "requests_in_flight": count,
                        "connected": {
                            "type": "boolean",
                            "description": "MQTT: connected to the broker.",
                        },
                    },
                },
            },
            "mqtt": {
                "type": "object",
                "properties": {
                    "enabled": {"type": "boolean"},
                    "connected": {"type": ["boolean", "null"]},
                    "broker": {"type": ["string", "null"]},
                },
            },
            "metrics": {
                "type": "object",
                "description": "The `/metrics` figures that matter, summed.",
                "properties": {
                    "http_requests_total": count,
                    "http_errors_total": count,
                    "audio_in_s": {"type": "number"},
                    "audio_out_s": {"type": "number"},
                    "engine_busy_s": {"type": "number"},
                    "engine_requests_total": count,
                },
            },
        },
    }
    return status_schema


def build_spec(
    limits: LimitsConfig | None = None, *, api_key: bool = False, local_speaker: bool = False
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every route the server registers, with ``limits``.

    With ``api_key`` every route but ``/health``, ``/openapi.json`` and
    ``/docs`` requires the bearer key; without, none does (and none answers 401).
    Speech's ``play`` flag is offered only where a local speaker exists
    (``[audio_io]`` on); elsewhere the server refuses it.
    """
    limits = limits or LimitsConfig()
    schemas = copy.deepcopy(_SCHEMAS)
    if not local_speaker:
        for name in ("SpeechRequest", "SpeechForm"):
            schemas[name]["properties"].pop("play", None)
    _allow_null(schemas["SpeechRequest"])
    schemas["SpeechRequest"]["properties"]["input"]["maxLength"] = limits.max_input_chars
    audio_content = {t: {"schema": {"type": "string", "format": "binary"}} for t in AUDIO_TYPES}
    transcript_content = {
        "application/json": {
            "schema": {"oneOf": [_ref("Transcription"), _ref("TranscriptionVerbose")]}
        },
        "text/plain": {"schema": {"type": "string"}},
        "text/event-stream": {"schema": _sse("TranscriptionStreamEvent")},
    }
    voice_id = {"name": "voice_id", "in": "path", "required": True, "schema": {"type": "string"}}
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/v1/audio/transcriptions": {
            "post": {
                "operationId": "createTranscription",
                "tags": ["audio"],
                "summary": "Transcribe audio",
                "description": "Multipart, exactly as openai-python sends it. `text`, `srt` and `vtt` answer plain text; `stream=true` answers Server-Sent Events.",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _ref("TranscriptionRequest")}},
                },
                "responses": {
                    "200": {"description": "The transcript", "content": transcript_content},
                    **_errors("400", "404", "408", "413", "415", "503"),
                },
            }
        },
        "/v1/audio/translations": {
            "post": {
                "operationId": "createTranslation",
                "tags": ["audio"],
                "summary": "Translate speech to English text",
                "description": "Needs a multilingual model; an English-only model answers 400.",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _ref("TranslationRequest")}},
                },
                "responses": {
                    "200": {"description": "The English transcript", "content": transcript_content},
                    **_errors("400", "404", "408", "413", "415", "503"),
                },
            }
        },
        "/v1/audio/speech": {
            "post": {
                "operationId": "createSpeech",
                "tags": ["audio"],
                "summary": "Synthesize speech",
                "description": "JSON as OpenAI specifies; `stream_format=audio` streams chunked audio from the first sentence on, `sse` sends `speech.audio.delta`/`speech.audio.done` events. Voice cloning: JSON `voice_sample` + `voice_sample_text`, multipart `prompt_speech` + `prompt_text`, or a stored voice id; the model must declare cloning.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("SpeechRequest")},
                        "multipart/form-data": {"schema": _ref("SpeechForm")},
                    },
                },
                "responses": {
                    "200": {
                        "description": "Audio in `response_format`, SSE events, or with `play` what was played",
                        "content": {
                            **audio_content,
                            "text/event-stream": {"schema": _sse("SpeechStreamEvent")},
                            "application/json": {"schema": _ref("SpeechPlayed")},
                        },
                    },
                    **_errors("400", "404", "408", "413", "415", "503"),
                },
            }
        },
        "/v1/audio/speech/stream": {
            "get": {
                "operationId": "streamSpeech",
                "tags": ["audio"],
                "summary": "WebSocket: stream text in, audio out",
                "description": 'Upgrade to a WebSocket. First message: JSON options (`model`, `voice`, `response_format` default `pcm`, `speed`, `instructions`, `voice_sample`, `voice_sample_text`). Then `{"text_chunk": "...", "is_final": false}` messages. The server sends a binary audio message per completed sentence and `{"type": "done", ...}` after `is_final: true`; errors arrive as `{"type": "error", "error": {...}}`.',
                "responses": {
                    "101": {"description": "Switching protocols"},
                    **_errors("400", "426"),
                },
            }
        },
        "/v1/audio/voices": {
            "get": {
                "operationId": "listVoices",
                "tags": ["voices"],
                "summary": "List built-in and stored voices",
                "responses": {"200": _json(_ref("VoiceList")), **_errors()},
            },
            "post": {
                "operationId": "createVoice",
                "tags": ["voices"],
                "summary": "Store a reference voice for cloning",
                "description": "Stored under the state directory, normalized (mono 24 kHz 16-bit WAV); survives restarts.",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _ref("VoiceCreateForm")}},
                },
                "responses": {
                    "201": _json(_ref("Voice"), "Created"),
                    **_errors("400", "408", "413", "415"),
                },
            },
        },
        "/v1/audio/voices/{voice_id}": {
            "get": {
                "operationId": "getVoice",
                "tags": ["voices"],
                "summary": "A stored voice",
                "parameters": [voice_id],
                "responses": {"200": _json(_ref("Voice")), **_errors("404")},
            },
            "delete": {
                "operationId": "deleteVoice",
                "tags": ["voices"],
                "summary": "Delete a stored voice",
                "parameters": [voice_id],
                "responses": {"200": _json(_ref("VoiceDeleted")), **_errors("404")},
            },
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "tags": ["models"],
                "summary": "ASR and TTS models",
                "responses": {"200": _json(_ref("ModelList")), **_errors()},
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "operationId": "getModel",
                "tags": ["models"],
                "summary": "One model (by name or alias)",
                "parameters": [model_id],
                "responses": {"200": _json(_ref("Model")), **_errors("404")},
            }
        },
        "/v1/models/{model_id}/load": {
            "post": {
                "operationId": "loadModel",
                "tags": ["models"],
                "summary": "Load a model now (any kind; waits at most its load_timeout_s)",
                "parameters": [model_id],
                "responses": {"200": _json(_ref("ModelState")), **_errors("404", "503")},
            }
        },
        "/v1/models/{model_id}/unload": {
            "post": {
                "operationId": "unloadModel",
                "tags": ["models"],
                "summary": "Unload a model (it loads again on demand); 429 while in use",
                "parameters": [model_id],
                "responses": {"200": _json(_ref("ModelState")), **_errors("404", "503")},
            }
        },
        "/v1/realtime": {
            "get": {
                "operationId": "realtimeTranscription",
                "tags": ["audio"],
                "summary": "WebSocket: OpenAI Realtime transcription sessions",
                "description": 'Upgrade to a WebSocket speaking OpenAI\'s GA Realtime API for transcription sessions. Send `session.update` (`session.type = "transcription"`, `audio.input.format` `{"type": "audio/pcm", "rate": 24000}`, `audio.input.transcription` `{model, language, prompt}`, `audio.input.turn_detection` `{"type": "server_vad", threshold, prefix_padding_ms, silence_duration_ms}` or null) before audio, then `input_audio_buffer.append` (base64 pcm16), `input_audio_buffer.commit`, `input_audio_buffer.clear`. The server sends `session.created`/`session.updated`, `input_audio_buffer.speech_started`/`speech_stopped`/`committed`/`cleared`, `conversation.item.input_audio_transcription.delta`/`completed`/`failed` and `error`. The beta form (`?intent=transcription`, `transcription_session.update`) is accepted too. Browsers pass the API key as the subprotocol `openai-insecure-api-key.<key>` (next to `realtime`) or as `?api_key=`. Bad events get an `error` event and the socket stays open; a message over twice `limits.max_ws_message_bytes` closes it (1009). Bounded by `limits.max_audio_s` per item, `limits.max_connections` and `limits.session_timeout_s`.',
                "parameters": [
                    {
                        "name": "intent",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["transcription"]},
                    }
                ],
                "responses": {
                    "101": {"description": "Switching protocols"},
                    **_errors("400", "426"),
                },
            }
        },
        "/v1/status": {
            "get": {
                "operationId": "status",
                "tags": ["service"],
                "summary": "What the web page's Status section shows: models, servers, clients, memory",
                "responses": {"200": _json(_status_schema()), **_errors()},
            }
        },
        "/": {
            "get": {
                "operationId": "webPage",
                "tags": ["service"],
                "summary": "The web page (no API key needed; its API calls carry one)",
                "security": [],
                "responses": _page_responses({"text/html": {"schema": {"type": "string"}}}),
            }
        },
        "/ui": {
            "get": {
                "operationId": "webPageRedirect",
                "tags": ["service"],
                "summary": "Redirects to `/ui/`",
                "security": [],
                "responses": {
                    "308": {"description": "To `/ui/`"},
                    **_page_responses({"text/html": {"schema": {"type": "string"}}}),
                },
            }
        },
        "/ui/": {
            "get": {
                "operationId": "webPageUi",
                "tags": ["service"],
                "summary": "The web page",
                "security": [],
                "responses": _page_responses({"text/html": {"schema": {"type": "string"}}}),
            }
        },
        "/ui/{path}": {
            "get": {
                "operationId": "webAsset",
                "tags": ["service"],
                "summary": "A file of the web page (scripts, styles, icons)",
                "security": [],
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": _page_responses(
                    {t: {"schema": {"type": "string"}} for t in _UI_TYPES}
                ),
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "tags": ["service"],
                "summary": "Liveness and loaded models (no API key needed)",
                "security": [],
                "responses": {"200": _json(_ref("Health"))},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["service"],
                "summary": "Prometheus metrics: requests, latency, audio seconds, engine busy time",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["service"],
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "tags": ["service"],
                "summary": "Readable API documentation (rendered from this document)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    paths.update(compat_paths(limits, api_key=api_key))  # CosyVoice, CSM, Fish Speech
    schemas.update(copy.deepcopy(COMPAT_SCHEMAS))
    if api_key:
        for item in paths.values():
            for operation in item.values():
                if operation.get("security") != []:
                    operation["responses"].setdefault("401", _error("401"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgevoice OpenAI-compatible audio API",
            "version": VERSION,
            "description": "Speech-to-text, text-to-speech, voice cloning and a voice library, served from local engines. Point an OpenAI SDK's `base_url` at `http://<host>:<port>/v1`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}] if api_key else [],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Required only when `[http] api_key` (or `api_key_file`) is set.",
                }
            },
        },
    }


# -------------------------------------------------------------------- docs

_CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
code,.path{font-family:ui-monospace,monospace} .method{display:inline-block;min-width:4.5rem;font-weight:bold;text-transform:uppercase}
.get{color:#1a7f37}.post{color:#0b5cad}.delete{color:#b42318}
table{border-collapse:collapse;margin:.5rem 0;width:100%} td,th{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f5f5} nav a{margin-right:.8rem}
"""


def _schema_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "oneOf" in schema:
        return " | ".join(_schema_type(s) for s in schema["oneOf"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " | ".join(kind)
    if kind == "array":
        return f"array of {_schema_type(schema.get('items', {}))}"
    if "enum" in schema:
        return f"{kind}: " + " | ".join(str(v) for v in schema["enum"])
    if schema.get("format") == "binary":
        return "file"
    return str(kind)


def _esc(text: Any) -> str:
    """HTML-escape, rendering `backticks` as code."""
    parts = html.escape(str(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _schema_table(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    if "$ref" in schema:
        schema = schemas[str(schema["$ref"]).rsplit("/", 1)[-1]]
    props: dict[str, Any] = schema.get("properties", {})
    if not props:
        return f"<p><code>{_esc(_schema_type(schema))}</code></p>"
    required = set(schema.get("required", ()))
    rows = []
    for name, prop in props.items():
        limits = [
            f"{key} {prop[key]}"
            for key in ("minimum", "maximum", "maxLength", "default")
            if key in prop
        ]
        text = " ".join([prop.get("description", ""), "; ".join(limits)]).strip()
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code>{' *' if name in required else ''}</td>"
            f"<td>{_esc(_schema_type(prop))}</td><td>{_esc(text)}</td></tr>"
        )
    return (
        "<table><tr><th>field (* required)</th><th>type</th><th>notes</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def render_docs(spec: dict[str, Any]) -> str:
    """A self-contained HTML page (no scripts, no CDN) describing every route."""
    schemas: dict[str, Any] = spec["components"]["schemas"]
    info = spec["info"]
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(info['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(info['title'])}</h1><p>version {html.escape(info['version'])} · "
        "<a href='/openapi.json'>openapi.json</a></p>",
        f"<p>{_esc(info['description'])}</p>",
        '<p>Errors use OpenAI\'s shape: <code>{"error": {"message", "type", '
        '"param", "code"}}</code>, except on the compatible APIs (CosyVoice, CSM, Fish '
        "Speech), which answer in their own (see each). When an API key is configured, send "
        "<code>Authorization: Bearer &lt;key&gt;</code>.</p><nav>",
    ]
    operations = [
        (path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
    ]
    out.extend(
        f"<a href='#{html.escape(op['operationId'])}'>{html.escape(op['operationId'])}</a>"
        for _path, _method, op in operations
    )
    out.append("</nav>")
    for path, method, op in operations:
        out.append(
            f"<h2 id='{html.escape(op['operationId'])}'><span class='method {method}'>{method}</span>"
            f"<span class='path'>{html.escape(path)}</span></h2>"
        )
        out.append(f"<p><strong>{_esc(op.get('summary', ''))}</strong></p>")
        if op.get("description"):
            out.append(f"<p>{_esc(op['description'])}</p>")
        for param in op.get("parameters", []):
            out.append(
                f"<p>Path parameter <code>{html.escape(param['name'])}</code> "
                f"({_esc(_schema_type(param['schema']))})</p>"
            )
        body = op.get("requestBody")
        if body:
            for content_type, media in body["content"].items():
                out.append(f"<h3>Request: <code>{html.escape(content_type)}</code></h3>")
                out.append(_schema_table(media["schema"], schemas))
        out.append(
            "<h3>Responses</h3><table><tr><th>status</th><th>meaning</th><th>content</th></tr>"
        )
        for status, response in op["responses"].items():
            types = ", ".join(response.get("content", {}))
            out.append(
                f"<tr><td>{html.escape(status)}</td><td>{_esc(response['description'])}</td>"
                f"<td>{html.escape(types)}</td></tr>"
            )
        out.append("</table>")
    out.append("<h2>Schemas</h2>")
    for name, schema in schemas.items():
        out.append(f"<h3 id='schema-{html.escape(name)}'>{html.escape(name)}</h3>")
        out.append(_schema_table(schema, schemas))
    out.append("</body></html>")
    return "\n".join(out)
