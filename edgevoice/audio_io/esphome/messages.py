"""The ESPHome API's messages: aioesphomeapi's protobuf definitions and type ids.

The protobuf classes are generated at import, so they are typed ``Any`` here;
:func:`decode` turns a frame into a message (``None`` for a type we do not
know), :func:`message_type` gives the id a message is sent with.
"""

from __future__ import annotations

import importlib
from typing import Any


def _load() -> tuple[Any, dict[int, Any], dict[Any, int]]:
    try:
        api = importlib.import_module("aioesphomeapi.api_pb2")
        core = importlib.import_module("aioesphomeapi.core")
    except ImportError as exc:
        raise RuntimeError(
            f"ESPHome satellite mode needs aioesphomeapi ({exc}); install edgevoice[audio-io]"
        ) from None
    by_id: dict[int, Any] = dict(core.MESSAGE_TYPE_TO_PROTO)
    return api, by_id, {cls: type_id for type_id, cls in by_id.items()}


pb, MESSAGES_BY_ID, MESSAGE_IDS = _load()
"""``pb``: the ``api_pb2`` module (``pb.HelloRequest`` ...)."""


def message_type(message: Any) -> int:
    """The type id ``message`` is framed with."""
    return MESSAGE_IDS[type(message)]


def decode(type_id: int, payload: bytes) -> Any | None:
    """The message in a frame; ``None`` for an unknown type. Raises
    :class:`ValueError` for a payload that does not parse."""
    cls = MESSAGES_BY_ID.get(type_id)
    if cls is None:
        return None
    try:
        return cls.FromString(payload)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ValueError(f"malformed {cls.__name__}: {exc}") from None


def encode(message: Any) -> tuple[int, bytes]:
    return message_type(message), message.SerializeToString()
