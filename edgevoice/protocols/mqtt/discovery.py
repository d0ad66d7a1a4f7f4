"""Home Assistant MQTT discovery for the bridge (device-based, one retained message).

One config message on ``<discovery_prefix>/device/<node_id>/config`` describes
the device and all of its entities (Home Assistant 2024.11+ "device discovery"):

- ``notify`` *Speak*: publishes the message text to ``<base>/tts/say``;
- ``sensor`` *Last transcript*: ``<base>/asr/transcript`` (state cut to the 255
  characters HA allows, the full text and language as attributes);
- ``binary_sensor`` *Listening*: ``ON`` while ``<base>/state`` is ``listening``;
- ``event`` *Wake word*: ``<base>/wake/detected`` (event type ``detected``);
- ``select`` *Voice*: the default voice of speak requests (``<base>/voice/set``).

All share the availability topic ``<base>/status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgevoice import __version__

# Home Assistant refuses sensor states longer than this.
HA_STATE_MAX_CHARS = 255


def discovery_topic(discovery_prefix: str, node_id: str) -> str:
    return f"{discovery_prefix}/device/{node_id}/config"


def discovery_config(
    *,
    node_id: str,
    base: str,
    voices: Sequence[str],
) -> dict[str, Any]:
    """The device discovery payload for one node (pure; no I/O)."""
    uid = f"edgevoice_{node_id}"
    components: dict[str, dict[str, Any]] = {
        f"{uid}_speak": {
            "p": "notify",
            "name": "Speak",
            "unique_id": f"{uid}_speak",
            "command_topic": f"{base}/tts/say",
            "icon": "mdi:account-voice",
        },
        f"{uid}_transcript": {
            "p": "sensor",
            "name": "Last transcript",
            "unique_id": f"{uid}_transcript",
            "state_topic": f"{base}/asr/transcript",
            "value_template": f"{{{{ value_json.text[:{HA_STATE_MAX_CHARS}] }}}}",
            "json_attributes_topic": f"{base}/asr/transcript",
            "json_attributes_template": (
                "{{ {'text': value_json.text, 'language': value_json.language,"
                " 'duration_s': value_json.duration_s} | tojson }}"
            ),
            "icon": "mdi:text-to-speech",
        },
        f"{uid}_listening": {
            "p": "binary_sensor",
            "name": "Listening",
            "unique_id": f"{uid}_listening",
            "state_topic": f"{base}/state",
            "value_template": "{{ 'ON' if value == 'listening' else 'OFF' }}",
            "icon": "mdi:microphone",
        },
        f"{uid}_wake": {
            "p": "event",
            "name": "Wake word",
            "unique_id": f"{uid}_wake",
            "state_topic": f"{base}/wake/detected",
            "event_types": ["detected"],
            "icon": "mdi:account-voice",
        },
        f"{uid}_voice": {
            "p": "select",
            "name": "Voice",
            "unique_id": f"{uid}_voice",
            "command_topic": f"{base}/voice/set",
            "state_topic": f"{base}/voice",
            "options": list(voices),
            "icon": "mdi:account-music",
        },
    }
    return {
        "device": {
            "identifiers": [uid],
            "name": f"edgevoice {node_id}",
            "manufacturer": "edgevoice",
            "model": "edgevoice voice appliance",
            "sw_version": __version__,
        },
        "origin": {"name": "edgevoice", "sw_version": __version__},
        "availability_topic": f"{base}/status",
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "components": components,
    }
