"""The MQTT face: :class:`MqttBridge` and its parts.

- :mod:`.bridge`: the connection, routing, admission (bounds, fair turns) and handlers;
- :mod:`.messages`: request payloads, ids and response topics checked, error shape;
- :mod:`.outbox`: messages waiting for the broker, capped in bytes;
- :mod:`.discovery`: Home Assistant device discovery (pure);
- :mod:`.hermes`: Hermes (Rhasspy) topics, talking to the bridge through a Protocol.

Imports go one way: bridge → hermes → messages/outbox; nothing imports bridge.
"""

from edgevoice.protocols.mqtt.bridge import MqttBridge, parse_broker_url
from edgevoice.protocols.mqtt.messages import SayRequest, parse_say

__all__ = ["MqttBridge", "SayRequest", "parse_broker_url", "parse_say"]
