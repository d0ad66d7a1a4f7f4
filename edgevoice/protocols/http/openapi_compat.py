"""OpenAPI paths and schemas of the compatible APIs (CosyVoice, ...), merged into ``/openapi.json``."""
# ruff: noqa: E501  (the spec is data: long descriptions read best on one line)

from __future__ import annotations

from typing import Any

from edgevoice.config import LimitsConfig

_FIELD_NAME = {"pattern": "^[^\\x00-\\x1f\\x7f]*$"}

SCHEMAS: dict[str, Any] = {
    "FastApiError": {
        "type": "object",
        "required": ["detail"],
        "description": "FastAPI's error shape: a message, or for missing fields a list of `{type, loc, msg, input}`.",
        "properties": {
            "detail": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "loc", "msg"],
                            "properties": {
                                "type": {"type": "string"},
                                "loc": {"type": "array", "items": {"type": "string"}},
                                "msg": {"type": "string"},
                                "input": {},
                            },
                        },
                    },
                ]
            }
        },
    },
}

SCHEMAS.update(
    {
        "FishError": {
            "type": "object",
            "required": ["statusCode", "message", "error"],
            "properties": {
                "statusCode": {"type": "integer"},
                "message": {"type": "string"},
                "error": {"type": "string"},
            },
        },
        "FishReference": {
            "type": "object",
            "required": ["audio"],
            "properties": {
                "audio": {
                    "type": "string",
                    "contentEncoding": "base64",
                    "minLength": 1,
                    "description": "Reference audio (bytes in MessagePack, base64 in JSON), 1-30 s.",
                },
                "text": {"type": "string", "description": "Its transcript."},
            },
        },
        "FishTtsRequest": {
            "type": "object",
            "required": ["text"],
            "properties": {
                "text": {"type": "string", "minLength": 1, "pattern": "\\S"},
                "chunk_length": {
                    "type": "integer",
                    "minimum": 100,
                    "maximum": 300,
                    "default": 200,
                    "description": "Sentences are cut at most this long (and at most `limits.max_sentence_chars`).",
                },
                "format": {"type": "string", "enum": ["wav", "pcm", "mp3"], "default": "wav"},
                "references": {
                    "type": "array",
                    "maxItems": 8,
                    "items": {"$ref": "#/components/schemas/FishReference"},
                    "description": "Inline references; the first is cloned.",
                },
                "reference_id": {
                    "type": ["string", "null"],
                    "description": "A stored voice: id or name (see `/v1/references/list`).",
                },
                "emotion": {
                    "type": ["string", "null"],
                    "description": "edgevoice: with `reference_id`, the emotion of an imported `ref_data` speaker.",
                },
                "normalize": {"type": "boolean", "default": True},
                "streaming": {
                    "type": "boolean",
                    "default": False,
                    "description": "Stream the audio as it is made (wav only).",
                },
            },
        },
        "FishReferenceResult": {
            "type": "object",
            "required": ["success", "message", "reference_id"],
            "properties": {
                "success": {"type": "boolean"},
                "message": {"type": "string"},
                "reference_id": {"type": "string"},
            },
        },
        "FishReferenceList": {
            "type": "object",
            "required": ["success", "reference_ids", "message"],
            "properties": {
                "success": {"type": "boolean"},
                "reference_ids": {"type": "array", "items": {"type": "string"}},
                "message": {"type": "string"},
            },
        },
        "CsmClone": {
            "type": "object",
            "required": ["audio_url", "duration_seconds"],
            "properties": {"audio_url": {"type": "string"}, "duration_seconds": {"type": "number"}},
        },
        "CsmSession": {
            "type": "object",
            "required": ["session_id", "message"],
            "properties": {"session_id": {"type": "string"}, "message": {"type": "string"}},
        },
        "CsmTextChunk": {
            "type": "object",
            "required": ["session_id"],
            "properties": {
                "session_id": {"type": "string", "minLength": 1},
                "text_chunk": {"type": "string", "default": ""},
                "is_final": {"type": "boolean", "default": False},
            },
        },
    }
)

_COSY_FIELDS: dict[str, dict[str, Any]] = {
    "tts_text": {
        "type": "string",
        "minLength": 1,
        "pattern": "\\S",
        "description": "The text to speak.",
    },
    "spk_id": {
        "type": "string",
        "minLength": 1,
        "description": "A configured voice, a voice-library id or name, or a name of `[http] speakers` (e.g. `中文女`).",
    },
    "prompt_text": {"type": "string", "description": "Transcript of `prompt_wav`."},
    "prompt_wav": {
        "type": "string",
        "format": "binary",
        "description": "Reference recording, 1-30 s.",
    },
    "instruct_text": {
        "type": "string",
        "minLength": 1,
        "description": "Style instruction; refused (400) when the model has no style control.",
    },
}

COSYVOICE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "/inference_sft": (
        "cosyvoiceSft",
        "Speak with a stored or configured voice",
        ("tts_text", "spk_id"),
    ),
    "/inference_zero_shot": (
        "cosyvoiceZeroShot",
        "Clone a voice from a sample and its transcript",
        ("tts_text", "prompt_text", "prompt_wav"),
    ),
    "/inference_cross_lingual": (
        "cosyvoiceCrossLingual",
        "Clone a voice into another language (400 on an English-only model for non-Latin text)",
        ("tts_text", "prompt_wav"),
    ),
    "/inference_instruct": (
        "cosyvoiceInstruct",
        "A voice with a style instruction (needs a model with style control)",
        ("tts_text", "spk_id", "instruct_text"),
    ),
    "/inference_instruct2": (
        "cosyvoiceInstruct2",
        "A cloned voice with a style instruction (needs a cloning model with style control)",
        ("tts_text", "instruct_text", "prompt_wav"),
    ),
}
"""Path → (operationId, summary, required form fields)."""


def _fastapi_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FastApiError"}}},
    }


def _either_error(description: str) -> dict[str, Any]:
    """A status both the middleware (OpenAI shape) and the handler (FastAPI shape) may answer."""
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/Error"},
                        {"$ref": "#/components/schemas/FastApiError"},
                    ]
                }
            }
        },
    }


def _cosyvoice_operation(
    operation_id: str, summary: str, fields: tuple[str, ...], method: str, limits: LimitsConfig
) -> dict[str, Any]:
    properties = {name: dict(_COSY_FIELDS[name]) for name in fields}
    properties["tts_text"]["maxLength"] = limits.max_input_chars
    form = {
        "type": "object",
        "propertyNames": _FIELD_NAME,
        "required": list(fields),
        "properties": properties,
    }
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}}
    if "prompt_wav" not in fields:
        content["application/x-www-form-urlencoded"] = {"schema": form}
    return {
        "operationId": f"{operation_id}{'Get' if method == 'get' else ''}",
        "tags": ["cosyvoice"],
        "summary": summary,
        "description": "CosyVoice's FastAPI endpoint (GET and POST, form fields; CosyVoice's client sends GET with a form body). Answers raw 16-bit little-endian mono PCM at the model's rate (`X-Sample-Rate`), streamed sentence by sentence. Errors in FastAPI's shape `{\"detail\": ...}`; a missing field is 422.",
        "requestBody": {"required": True, "content": content},
        "responses": {
            "200": {
                "description": "s16le mono PCM at the model's rate",
                "headers": {"X-Sample-Rate": {"schema": {"type": "integer"}}},
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            "400": _either_error(
                "Bad field, a `[limits]` bound crossed, or a capability the model lacks (instruct text without style control, cross-lingual text on an English-only model)"
            ),
            "404": _fastapi_error("Unknown `spk_id` (the message lists configured voices only)"),
            "408": _either_error("The request body stalled for `limits.idle_timeout_s`"),
            "413": _either_error("Body larger than `limits.max_upload_bytes`"),
            "415": _either_error(
                "`prompt_wav` cannot be decoded, or a body that is not multipart/form-data"
            ),
            "422": _fastapi_error("A required field is missing"),
            "429": _either_error("Too many requests of this client in flight (see `Retry-After`)"),
            "500": _either_error("Engine failure (the daemon keeps serving)"),
            "503": _either_error(
                "The model is being retired by a reload, or the daemon is stopping"
            ),
        },
    }


def _cosyvoice_preflight(operation_id: str) -> dict[str, Any]:
    return {
        "operationId": f"{operation_id}Preflight",
        "tags": ["cosyvoice"],
        "summary": "CORS preflight: every origin, method and header, as CosyVoice's server allows",
        "description": "With `[http] cors_origins` set, the HTTP face's own CORS policy answers instead (204).",
        "responses": {
            "200": {
                "description": "Allowed",
                "headers": {
                    "Access-Control-Allow-Origin": {"schema": {"type": "string"}},
                    "Access-Control-Allow-Methods": {"schema": {"type": "string"}},
                },
            },
            "204": {"description": "Allowed by `[http] cors_origins`"},
            "429": _either_error("Too many requests of this client in flight"),
            "500": _either_error("Failure"),
        },
    }


def _csm_errors(*codes: str) -> dict[str, Any]:
    described = {
        "400": "Bad field or a `[limits]` bound crossed",
        "404": "Unknown or expired session, or no such generated file",
        "408": "The request body stalled for `limits.idle_timeout_s`",
        "413": "Body larger than `limits.max_upload_bytes`",
        "415": "`audio_file` cannot be decoded, or a wrong body type",
        "422": "A required field is missing",
        "429": "Too many requests of this client in flight, or `limits.max_stream_sessions` sessions open",
        "500": "Engine failure (the daemon keeps serving)",
        "503": "The model is being retired by a reload, or the daemon is stopping",
    }
    return {code: _either_error(described[code]) for code in sorted({*codes, "429", "500"})}


def _csm_form(limits: LimitsConfig, *, text: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "audio_file": {
            "type": "string",
            "format": "binary",
            "description": "Voice sample to clone, 1-30 s.",
        },
        "context_text": {"type": "string", "description": "Transcript of the sample."},
        "speaker_id": {
            "type": "integer",
            "minimum": 0,
            "maximum": 2**31,
            "default": 999,
            "description": "Accepted for compatibility.",
        },
        "temperature": {
            "type": "number",
            "minimum": 0,
            "maximum": 2,
            "default": 0.6,
            "description": "Accepted for compatibility (engines choose their sampling).",
        },
        "topk": {
            "type": "integer",
            "minimum": 1,
            "maximum": 100000,
            "default": 20,
            "description": "Accepted for compatibility.",
        },
        "output_format": {"type": "string", "enum": ["wav", "mp3"], "default": "wav"},
    }
    required = ["audio_file"]
    if text:
        properties["text"] = {
            "type": "string",
            "minLength": 1,
            "maxLength": limits.max_input_chars,
            "pattern": "\\S",
        }
        properties["max_audio_length_ms"] = {
            "type": "number",
            "minimum": 1,
            "maximum": limits.max_audio_s * 1000,
            "default": 15000,
        }
        properties["stream"] = {
            "type": "boolean",
            "default": False,
            "description": "Answer the audio itself, streamed as it is made.",
        }
        required.insert(0, "text")
    return {
        "type": "object",
        "propertyNames": _FIELD_NAME,
        "required": required,
        "properties": properties,
    }


def _csm_paths(limits: LimitsConfig) -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "/v1/voice-clone": {
            "post": {
                "operationId": "csmVoiceClone",
                "tags": ["csm"],
                "summary": "CSM: clone a voice and speak",
                "description": "Answers `{audio_url, duration_seconds}` for a file kept `limits.stored_audio_ttl_s` (at most `limits.max_stored_audio_files` / `max_stored_audio_bytes`, oldest dropped), or with `stream` the audio itself. Errors in FastAPI's shape.",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _csm_form(limits, text=True)}},
                },
                "responses": {
                    "200": {
                        "description": "Where the file is, or the streamed audio",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CsmClone"}
                            },
                            "audio/wav": binary,
                            "audio/mpeg": binary,
                        },
                    },
                    **_csm_errors("400", "408", "413", "415", "422", "503"),
                },
            }
        },
        "/v1/audio/{filename}": {
            "get": {
                "operationId": "csmAudioFile",
                "tags": ["csm"],
                "summary": "CSM: a generated file (until it expires)",
                "parameters": [
                    {
                        "name": "filename",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[^/]+\\.(wav|mp3)$"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The file",
                        "content": {"audio/wav": binary, "audio/mpeg": binary},
                    },
                    **_csm_errors("404"),
                },
            }
        },
        "/v1/streaming-session": {
            "post": {
                "operationId": "csmStreamingSession",
                "tags": ["csm"],
                "summary": "CSM: open a text-streaming session with a cloned voice",
                "description": "At most `limits.max_stream_sessions` open; each expires after `limits.session_timeout_s` unused.",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _csm_form(limits, text=False)}},
                },
                "responses": {
                    "200": {
                        "description": "The session",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CsmSession"}
                            }
                        },
                    },
                    **_csm_errors("400", "408", "413", "415", "422", "503"),
                },
            }
        },
        "/v1/stream-text": {
            "post": {
                "operationId": "csmStreamText",
                "tags": ["csm"],
                "summary": "CSM: a text chunk in, the WAV of the sentences it completes out",
                "description": "A WAV with no samples when the chunk completes no sentence; `is_final` speaks the rest and ends the session.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CsmTextChunk"}
                        }
                    },
                },
                "responses": {
                    "200": {"description": "WAV", "content": {"audio/wav": binary}},
                    **_csm_errors("400", "404", "408", "413", "422", "503"),
                },
            }
        },
        "/v1/ws/stream-text/{session_id}": {
            "get": {
                "operationId": "csmStreamTextWebSocket",
                "tags": ["csm"],
                "summary": "CSM WebSocket: JSON `{text_chunk, is_final}` in, one binary WAV out per message",
                "description": 'Errors arrive as text messages `{"detail": ...}`; the socket closes after `is_final`.',
                "parameters": [
                    {
                        "name": "session_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "101": {"description": "Switching protocols"},
                    "404": _fastapi_error("Unknown or expired session (before the upgrade)"),
                    "426": _fastapi_error("Plain HTTP request to the WebSocket route"),
                    "429": _either_error("Too many requests of this client in flight"),
                    "500": _either_error("Failure"),
                },
            }
        },
    }


def _fish_error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/Error"},
                        {"$ref": "#/components/schemas/FishError"},
                    ]
                }
            }
        },
    }


def _fish_errors(*codes: str) -> dict[str, Any]:
    described = {
        "400": "Bad field or a `[limits]` bound crossed (streaming needs wav; chunk_length 100-300)",
        "404": "Unknown `reference_id` (and `emotion`)",
        "408": "The request body stalled for `limits.idle_timeout_s`",
        "409": "A reference with this id exists",
        "413": "Body larger than `limits.max_upload_bytes`, or a full voice library",
        "415": "Reference audio cannot be decoded, or a wrong body type",
        "422": "A required field is missing",
        "429": "Too many requests of this client in flight",
        "500": "Engine failure (the daemon keeps serving)",
        "503": "The model is being retired by a reload, or the daemon is stopping",
    }
    return {code: _fish_error(described[code]) for code in sorted({*codes, "429", "500"})}


def _fish_paths(limits: LimitsConfig) -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    tts_body = {"$ref": "#/components/schemas/FishTtsRequest"}
    return {
        "/v1/tts": {
            "post": {
                "operationId": "fishTts",
                "tags": ["fish"],
                "summary": "Fish Speech: speak, optionally cloning an inline or stored reference",
                "description": "JSON (reference audio as base64) or MessagePack (`application/msgpack`, as `tools.post_api` sends). `references` clones the first inline sample; `reference_id` (+ `emotion`) a stored voice. Sampling fields are accepted and ignored. Errors in Fish's shape.",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": tts_body},
                        "application/msgpack": {"schema": tts_body},
                    },
                },
                "responses": {
                    "200": {
                        "description": "Audio in `format` (pcm: s16le at the model's rate)",
                        "content": {"audio/wav": binary, "audio/mpeg": binary, "audio/pcm": binary},
                    },
                    **_fish_errors("400", "404", "408", "413", "415", "422", "503"),
                },
            }
        },
        "/v1/references/add": {
            "post": {
                "operationId": "fishAddReference",
                "tags": ["fish"],
                "summary": "Fish Speech: store a reference voice (in the voice library)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "propertyNames": _FIELD_NAME,
                                "required": ["id", "audio", "text"],
                                "properties": {
                                    "id": {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 100,
                                        "pattern": "[0-9A-Za-z]",
                                    },
                                    "audio": {
                                        "type": "string",
                                        "format": "binary",
                                        "description": "1-30 s of speech.",
                                    },
                                    "text": {"type": "string", "minLength": 1, "maxLength": 2000},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Stored",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FishReferenceResult"}
                            }
                        },
                    },
                    **_fish_errors("400", "408", "409", "413", "415", "422"),
                },
            }
        },
        "/v1/references/list": {
            "get": {
                "operationId": "fishListReferences",
                "tags": ["fish"],
                "summary": "Fish Speech: stored reference ids",
                "responses": {
                    "200": {
                        "description": "The ids",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FishReferenceList"}
                            }
                        },
                    },
                    **_fish_errors(),
                },
            }
        },
        "/v1/references/delete": {
            "delete": {
                "operationId": "fishDeleteReference",
                "tags": ["fish"],
                "summary": "Fish Speech: delete a stored reference",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["reference_id"],
                                "properties": {"reference_id": {"type": "string", "minLength": 1}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Deleted",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FishReferenceResult"}
                            }
                        },
                    },
                    **_fish_errors("400", "404", "408", "413", "422"),
                },
            }
        },
    }


_UNAUTHORIZED: dict[str, str] = {
    "cosyvoice": "FastApiError",
    "csm": "FastApiError",
    "fish": "FishError",
}
"""Tag → the schema of that API's 401 (the shared middleware answers in each API's shape)."""


def compat_paths(limits: LimitsConfig, *, api_key: bool = False) -> dict[str, Any]:
    """The compatible APIs' paths, with this configuration's limits (and 401s when keyed)."""
    paths: dict[str, Any] = {}
    for path, (operation_id, summary, fields) in COSYVOICE.items():
        paths[path] = {
            method: _cosyvoice_operation(operation_id, summary, fields, method, limits)
            for method in ("get", "post")
        }
        paths[path]["options"] = _cosyvoice_preflight(operation_id)
    paths.update(_csm_paths(limits))
    paths.update(_fish_paths(limits))
    paths.update(XINFERENCE_PATHS)
    if api_key:
        for item in paths.values():
            for operation in item.values():
                schema = _UNAUTHORIZED.get(operation["tags"][0])
                if schema is not None and operation.get("security") != []:
                    operation["responses"]["401"] = {
                        "description": "Missing or wrong API key (`Authorization: Bearer <key>`)",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{schema}"}
                            }
                        },
                    }
    return paths


XINFERENCE_PATHS: dict[str, Any] = {
    "/v1/cluster/auth": {
        "get": {
            "operationId": "xinferenceClusterAuth",
            "tags": ["xinference"],
            "summary": "Xinference: whether requests need the API key",
            "description": "Asked by Xinference's `Client(url, api_key)` before anything else; only when this says `auth: true` does it send the key. `client.get_model(uid)` then reads `/v1/models/{model_id}` (its `model_type` is `audio`; a uid is a model name or alias), and `model.speech(...)` / `model.transcriptions(...)` are `/v1/audio/speech` / `/v1/audio/transcriptions` with extra arguments (`prompt_text`, `instruct_text`) in a JSON `kwargs` string.",
            "security": [],
            "responses": {
                "200": {
                    "description": "Whether an API key is configured",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["auth"],
                                "properties": {"auth": {"type": "boolean"}},
                            }
                        }
                    },
                }
            },
        }
    }
}
