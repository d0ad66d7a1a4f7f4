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


def compat_paths(limits: LimitsConfig) -> dict[str, Any]:
    """The compatible APIs' paths, with this configuration's limits."""
    paths: dict[str, Any] = {}
    for path, (operation_id, summary, fields) in COSYVOICE.items():
        paths[path] = {
            method: _cosyvoice_operation(operation_id, summary, fields, method, limits)
            for method in ("get", "post")
        }
    return paths
