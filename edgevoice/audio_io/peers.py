"""How faces sharing one hub find each other: the local speaker and the MQTT bridge.

The daemon builds every face from ``(settings, hub)`` alone and names the
servers it runs on a hub (:func:`edgevoice.protocols.base.peers`). Faces that
work together look each other up at the moment they need one (so a face
restarted by a reload is found again): the voice loop publishes through the
server named ``mqtt``; MQTT ``tts/say`` with ``play``, the HTTP play flag and
Hermes ``playBytes`` play on the ``speaker`` role, which audio_io registers
here while it runs. Event-loop only. Imports nothing heavy (the other faces
import this).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgevoice.audio_io.player import PlaybackResult, Player
    from edgevoice.engines.base import SynthesizeOptions

_FACES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def register(hub: Any, role: str, face: Any) -> None:
    """``face`` serves ``role`` (``"mqtt"``, ``"speaker"``) for ``hub`` from now on."""
    _FACES.setdefault(hub, {})[role] = face


def unregister(hub: Any, role: str, face: Any) -> None:
    """``face`` no longer serves ``role`` (a newer registration is left alone)."""
    faces = _FACES.get(hub)
    if faces is not None and faces.get(role) is face:
        del faces[role]


def find(hub: Any, role: str) -> Any | None:
    """The face serving ``role`` for ``hub`` now, or ``None``: one registered here,
    else a protocol server of that name the daemon runs on ``hub``."""
    faces = _FACES.get(hub)
    if faces is not None and role in faces:
        return faces[role]
    from edgevoice.protocols.base import peers

    for server in peers(hub):
        if server.name == role:
            return server
    return None


def local_player(hub: Any) -> Player | None:
    """The local speaker's :class:`~edgevoice.audio_io.player.Player`, when audio_io runs."""
    player: Player | None = find(hub, "speaker")
    return player


async def play_on_speaker(hub: Any, data: bytes, label: str) -> dict[str, Any]:
    """Play an encoded audio file on the local speaker, waiting until it played.

    For the other faces' play hooks; never raises: returns ``{"played": True,
    "played_s": ...}`` or ``{"played": False, "play_error": "..."}``.
    """
    player = local_player(hub)
    if player is None:
        return {"played": False, "play_error": "no local speaker is configured ([audio_io])"}
    from edgevoice.errors import EdgeVoiceError

    max_audio_s = float(hub.settings.limits.max_audio_s)
    try:
        result = await player.play_bytes(data, label, max_audio_s=max_audio_s)
    except (EdgeVoiceError, ValueError, OSError) as exc:
        return {"played": False, "play_error": str(exc)}
    if result.played:
        return {"played": True, "played_s": round(result.duration_s, 3)}
    return {"played": False, "play_error": result.error or "not played"}


def require_player(hub: Any, param: str = "play") -> Player:
    """The local speaker's player, or :class:`~edgevoice.errors.UnsupportedRequestError`
    (``param``) when this node has none (``[audio_io]`` off)."""
    player = local_player(hub)
    if player is None:
        from edgevoice.errors import UnsupportedRequestError

        raise UnsupportedRequestError(
            "this node has no local speaker ([audio_io] is off)", param=param
        )
    return player


async def speak_on_speaker(
    hub: Any, text: str, options: SynthesizeOptions | None, label: str
) -> PlaybackResult:
    """Speak ``text`` on the local speaker (synthesized while it plays), in order
    with everything else; waits until played. Raises what the speak pipeline
    raises (unknown voice, text over ``max_input_chars``), ``UnsupportedRequestError``
    without audio_io, ``SpeakerUnavailableError`` (503) without a device,
    ``BusyError`` when the speaker's queue is full."""
    player = require_player(hub)
    return await player.play_speech(hub, text, options, label)
